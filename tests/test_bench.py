"""Smoke test of the benchmark: `python -m bench --quick --json PATH` runs evtchn (Cython) and the
C yardstick on fifo and 2l, both deliver events, and neither loses or leaves any."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH_TIMEOUT = 300            # s: spawn start-up, the C build and 4 runs of 0.25 s


def _cython_kernels() -> bool:
    try:
        from evtchn._core import CythonKernels  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [
    pytest.mark.skipif(not _cython_kernels(), reason="the Cython backend is not built"),
    pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None,
                       reason="no C compiler"),
]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.Popen([sys.executable, "-m", "bench", "--quick", "--json", str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=BENCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    # Hosts are named evtchn-<creator pid>-...: only the benchmark's own count (other
    # processes on the machine may be creating hosts meanwhile).
    ours = [n for n in os.listdir("/dev/shm") if n.startswith(f"evtchn-{proc.pid}-")]
    for name in ours:
        os.unlink(os.path.join("/dev/shm", name))
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out, ours


def test_quick_run_succeeds_and_leaks_nothing(quick_run):
    r, out, leaked = quick_run
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    assert out.is_file()
    assert not leaked, f"the benchmark left shared memory behind: {sorted(leaked)}"


def test_rates_positive_for_evtchn_and_c(quick_run):
    _, out, _ = quick_run
    doc = json.loads(out.read_text())
    for abi in ("fifo", "2l"):
        assert doc[f"stream1x1_{abi}_cython_events_per_s"] > 0
        assert doc[f"stream1x1_{abi}_c_events_per_s"] > 0
        assert doc[f"stream1x1_{abi}_cython_over_c"] > 0
    rates = {k: v for k, v in doc.items() if k.endswith("_per_s")}
    assert len(rates) == 12            # stream: 2 ABIs x 2 sides; isolated: also send/consume
    assert all(v > 0 for v in rates.values()), rates
    for key in ("machine", "python", "numpy", "git_commit"):
        assert doc[key]


def test_no_event_lost_or_left(quick_run):
    """Every new edge a sender made was delivered exactly once, by evtchn and by the C program,
    and after each run nothing was pending or linked and a drain found nothing."""
    _, out, _ = quick_run
    runs = json.loads(out.read_text())["runs"]
    assert {(r["case"], r["abi"], r["impl"]) for r in runs} == {
        (case, abi, impl) for case in ("stream1x1", "isolated") for abi in ("fifo", "2l")
        for impl in ("cython", "c")}
    for r in runs:
        what = f"{r['abi']} {r['impl']} rep {r['rep']}"
        assert r["delivered"] > 0, what
        assert r["delivered"] == r["edges"], what
        assert r["edges"] <= r["sent"], what
        assert r["left_pending"] == 0 and r["drained_after"] == 0, what
        if r["impl"] == "c":
            assert r["c_left_pending"] == 0 and r["refused"] == 0, what
