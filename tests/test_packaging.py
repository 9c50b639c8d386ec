"""Packaging metadata that no other test exercises: one version, valid classifiers that claim
only the Python versions CI tests, and lint pins that pre-commit and CI share."""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from pathlib import Path

import pytest
import trove_classifiers

import evtchn

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_version_has_one_source():
    dynamic = PROJECT["tool"]["setuptools"]["dynamic"]["version"]
    assert "version" in PROJECT["project"]["dynamic"] and "version" not in PROJECT["project"]
    assert dynamic == {"attr": "evtchn._version.__version__"}
    assert evtchn.__version__ == importlib.metadata.version("evtchn")
    assert re.fullmatch(r"\d+\.\d+\.\d+", evtchn.__version__)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"\n## {evtchn.__version__}\n" in changelog, "CHANGELOG.md has no entry for it"


def test_classifiers_are_known():
    unknown = [
        c for c in PROJECT["project"]["classifiers"] if c not in trove_classifiers.classifiers
    ]
    assert not unknown, f"not trove classifiers: {unknown}"


def test_python_classifiers_are_the_versions_ci_tests():
    """.ci/run runs the suite on the machine's python3 and smoke-tests the sdist on
    CI_EXTRA_PYTHONS: the classifiers claim those and no others."""
    claimed = {
        c.rsplit(" :: ", 1)[1]
        for c in PROJECT["project"]["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    ci = (ROOT / ".ci" / "run").read_text()
    extra = re.search(r"CI_EXTRA_PYTHONS-([0-9. ]*)\}", ci)
    assert extra, ".ci/run no longer names its extra Pythons"
    extras = set(extra.group(1).split())
    assert extras < claimed and len(claimed - extras) == 1, (claimed, extras)
    if os.environ.get("CI"):  # this run is CI's: its Python is the one left
        assert claimed - extras == {f"{sys.version_info[0]}.{sys.version_info[1]}"}
    lowest = min(claimed, key=lambda v: tuple(map(int, v.split("."))))
    assert PROJECT["project"]["requires-python"] == f">={lowest}"


def test_pre_commit_pins_the_lint_extra():
    pins = set(PROJECT["project"]["optional-dependencies"]["lint"])
    config = (ROOT / ".pre-commit-config.yaml").read_text()
    hooks = set(re.findall(r'additional_dependencies: \["([^"]+)"\]', config))
    assert hooks == pins
