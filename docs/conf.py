"""Sphinx configuration for evtchn's reference documentation.

Build: pip install -e '.[docs]' && sphinx-build -W -b html docs docs/_build/html
(tests/test_docs.py builds it with warnings as errors into a temporary folder.)
"""

from __future__ import annotations

import sys
from pathlib import Path

import evtchn

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

project = "evtchn"
author = "the evtchn developers"
copyright = "2026, the evtchn developers"
release = evtchn.__version__  # the one source: evtchn/_version.py
version = release

extensions = ["sphinx.ext.autodoc", "myst_parser", "layout_constants"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]

# Signatures as written; the types go in the parameter list of each entry.
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True}
# numpy.typing.ArrayLike is a long Union once expanded: keep its name.
autodoc_type_aliases = {"npt.ArrayLike": "numpy.typing.ArrayLike"}
# `name` in a docstring is a parameter or field name, shown as code.
default_role = "code"

# The README, CHANGELOG and the guides are included from where they live; their headings
# become targets, so one page can link to a section of another.
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"evtchn {release}"
