"""``.. layout-constants::``: every public constant of evtchn.layout, grouped by the section
comments of layout.py (``# --- FIFO ... ---``), each with its value and its trailing comment.

Autodoc documents module data only when it carries a ``#:`` doc comment; layout.py keeps Xen's
terse style (``P_LOCK = 0  # u32: ...``), so the entries are generated from its source instead,
and a constant added there appears here without anyone editing the docs.
"""

from __future__ import annotations

import ast
import inspect
import re

from docutils.parsers.rst import Directive
from sphinx.application import Sphinx

import evtchn.layout

SECTION = re.compile(r"^# -+ (.+?) -+$")
RST_SPECIAL = re.compile(r"([\\*`|_\[\]])")


def _escape(text: str) -> str:
    """Comment text as plain reST: no emphasis, references or substitutions."""
    return RST_SPECIAL.sub(r"\\\1", text)


def constants() -> list[tuple[str, list[tuple[str, str]]]]:
    """[(section title, [(name, comment), ...]), ...] in source order."""
    source = inspect.getsource(evtchn.layout)
    lines = source.splitlines()
    sections: list[tuple[str, list[tuple[str, str]]]] = [("General", [])]
    titles = {i + 1: m.group(1) for i, line in enumerate(lines) if (m := SECTION.match(line))}
    nodes = [n for n in ast.parse(source).body if isinstance(n, (ast.Assign, ast.AnnAssign))]
    last = 0
    for node in nodes:
        for lineno in sorted(t for t in titles if last < t < node.lineno):
            sections.append((titles[lineno], []))
        last = node.lineno
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        _, _, comment = lines[node.lineno - 1].partition("  # ")
        for name in names:
            if not name.startswith("_"):
                sections[-1][1].append((name, comment.strip()))
    return [(title, entries) for title, entries in sections if entries]


class LayoutConstants(Directive):
    def run(self) -> list[object]:
        out = []
        for title, entries in constants():
            out += [f".. rubric:: {_escape(title)}", ""]
            for name, comment in entries:
                out += [f".. autodata:: evtchn.layout.{name}", ""]
                if comment:
                    out += [f"   {_escape(comment)}", ""]
        self.state_machine.insert_input(out, "evtchn/layout.py (layout-constants)")
        return []


def drop_type_docstrings(
    app: Sphinx, what: str, name: str, obj: object, options: object, lines: list[str]
) -> None:
    """A constant has no docstring of its own: autodoc would show its type's (int, dict)."""
    if what == "data" and obj.__doc__ == type(obj).__doc__:
        del lines[:]


def setup(app: Sphinx) -> dict[str, object]:
    app.add_directive("layout-constants", LayoutConstants)
    app.connect("autodoc-process-docstring", drop_type_docstrings)
    return {"parallel_read_safe": True}
