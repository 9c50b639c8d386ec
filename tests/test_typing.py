"""The typed API: mypy --strict on the package, a user's script and every example; the .pyi stub
of the compiled module checked against the built module (mypy's stubtest)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mypy  # noqa: F401  (a test extra: a missing mypy must fail here, not skip)
import pytest

ROOT = Path(__file__).resolve().parent.parent
USER_SCRIPT = ROOT / "tests" / "typing" / "user_script.py"


def _mypy(tmp_path: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    # From the repository root, so pyproject.toml's [tool.mypy] applies and evtchn is read
    # from the source tree (its .pyi stubs beside the .pyx); --strict as a user would pass it.
    cmd = [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache")]
    return subprocess.run([*cmd, *targets], cwd=ROOT, capture_output=True, text=True, timeout=600)


def _examples() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "examples").rglob("*.py"))


def test_package_user_script_and_examples_pass_mypy_strict(tmp_path):
    targets = ["evtchn", str(USER_SCRIPT.relative_to(ROOT)), *_examples()]
    r = _mypy(tmp_path, *targets)
    assert r.returncode == 0, f"mypy --strict {' '.join(targets)}:\n{r.stdout}{r.stderr}"


def test_mypy_catches_a_misuse(tmp_path):
    """The check above can fail: a wrong use of the API is an error, not Any."""
    bad = tmp_path / "misuse.py"
    bad.write_text(
        "import evtchn\n"
        "def f(d: evtchn.Domain) -> str:\n"
        "    return d.alloc_unbound(0)\n"
        "def g(d: evtchn.Domain) -> int:\n"
        "    return d.consume(0)\n"
    )
    r = _mypy(tmp_path, str(bad))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "misuse.py:3: error: Incompatible return value type" in r.stdout, r.stdout
    assert "misuse.py:5: error: Incompatible return value type" in r.stdout, r.stdout


def test_compiled_module_matches_its_stub():
    pytest.importorskip("evtchn._core", reason="the Cython backend is not built")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy.stubtest",
            "evtchn._core",
            "--mypy-config-file",
            "pyproject.toml",
            "--allowlist",
            "tests/typing/stubtest-allowlist.txt",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("backend", ["cython", "numba", "reference"])
def test_user_script_runs(backend):
    if sys.version_info < (3, 11):
        pytest.importorskip("typing_extensions")  # installed with mypy
    r = subprocess.run(
        [sys.executable, str(USER_SCRIPT), backend],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the user script passed" in r.stdout
