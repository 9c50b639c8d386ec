"""The reference documentation: Sphinx builds docs/ with warnings as errors, and every public
name of the package has an entry in the HTML."""

from __future__ import annotations

import dataclasses
import html as _html
import inspect
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import sphinx  # noqa: F401  (the docs extra, installed with the test extra)

import evtchn
import evtchn.layout
import evtchn.numba

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}:\n{r.stdout[-3000:]}\n{r.stderr}"
    return out


def _members(qualname: str, cls: type) -> set[str]:
    """The class's own public members and fields (not those it inherits from OSError)."""
    names = {n for n in vars(cls) if not n.startswith("_")}
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    return {f"{qualname}.{n}" for n in names}


def public_names() -> set[str]:
    names = {"evtchn.__version__"}
    for name in evtchn.__all__:
        obj = getattr(evtchn, name)
        if isinstance(obj, types.ModuleType):
            continue
        names.add(f"evtchn.{name}")
        if inspect.isclass(obj):
            names |= _members(f"evtchn.{name}", obj)
    with evtchn.Host("reference") as host:  # attributes set in __init__
        dom = host.create_domain()
        names |= {f"evtchn.Host.{n}" for n in vars(host) if not n.startswith("_")}
        names |= {f"evtchn.Domain.{n}" for n in vars(dom) if not n.startswith("_")}
    for name, obj in vars(evtchn.layout).items():
        if name.startswith("_") or isinstance(obj, types.ModuleType):
            continue
        if type(obj).__module__ == "__future__":  # `annotations`
            continue
        names.add(f"evtchn.layout.{name}")
        if inspect.isclass(obj):
            names |= _members(f"evtchn.layout.{name}", obj)
    names |= {f"evtchn.numba.{n}" for n in evtchn.numba.__all__}
    names |= {f"evtchn.numba.Views.{f}" for f in evtchn.numba.Views._fields}
    return names


def test_docs_build_without_warnings_and_cover_every_public_name(html):
    ids: set[str] = set()
    for page in html.glob("*.html"):
        ids |= set(re.findall(r'\bid="([^"]+)"', page.read_text()))
    expected = public_names()
    assert len(expected) > 150  # the walk above found the API, not an empty module
    missing = sorted(expected - ids)
    assert not missing, f"public names without an entry in the docs: {missing}"


@pytest.mark.parametrize(
    "page, source",
    [("overview", "README.md"), ("stress", "stress/README.md"), ("bench", "bench/README.md")],
)
def test_guides_are_included_from_their_markdown(html, page, source):
    """The pages include the repository's markdown files (no copy that could drift)."""
    assert f"../{source}" in (ROOT / "docs" / f"{page}.md").read_text()
    text = _html.unescape(re.sub(r"<[^>]+>", "", (html / f"{page}.html").read_text()))
    text = text.replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"')
    for heading in re.findall(r"^#+ (.+)$", (ROOT / source).read_text(), re.M):
        plain = heading.replace("`", "").strip()
        assert plain in text.replace("¶", ""), f"{source}: heading {heading!r} not on {page}"
