"""Smoke test of the benchmark: `python -m bench --quick --json PATH` runs evtchn (Cython) and the
C yardstick on fifo and 2l, both deliver events, and neither loses or leaves any; the same run's
alternatives, multi-process, mapped-pages and latency sections; --compare on synthetic files;
--plot; the asv suite called once per benchmark without asv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH_TIMEOUT = 300  # s: spawn start-up, the C build and 4 runs of 0.25 s


def _cython_kernels() -> bool:
    try:
        from evtchn._core import CythonKernels  # noqa: F401
    except ImportError:
        return False
    return True


def _require_build() -> None:
    """Skip a test that runs evtchn (Cython) or the C program when either is missing; the
    --compare and formula tests need neither."""
    if not _cython_kernels():
        pytest.skip("the Cython backend is not built")
    if shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip("no C compiler")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    _require_build()
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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


def _impls():
    """What --quick measures: cython and C, and numba beside them when it is importable."""
    from conftest import _available

    return ("cython", "c") + (("numba",) if _available("numba") else ())


def test_rates_positive_for_evtchn_and_c(quick_run):
    _, out, _ = quick_run
    doc = json.loads(out.read_text())
    for abi in ("fifo", "2l"):
        assert doc[f"stream1x1_{abi}_cython_events_per_s"] > 0
        assert doc[f"stream1x1_{abi}_c_events_per_s"] > 0
        assert doc[f"stream1x1_{abi}_cython_over_c"] > 0
    rates = {
        k: v
        for k, v in doc.items()
        if k.endswith("_per_s")
        and k.startswith(("stream1x1_", "isolated_"))
        and "_per_event_" not in k
    }
    sides = len(_impls())  # stream: 2 ABIs x sides; isolated: also send/consume
    assert len(rates) == 6 * sides
    assert all(v > 0 for v in rates.values()), rates
    if "numba" in _impls():  # --beside auto: numba measured in the same run
        for abi in ("fifo", "2l"):
            assert doc[f"stream1x1_{abi}_numba_over_cython"] > 0
    for key in ("machine", "python", "numpy", "git_commit"):
        assert doc[key]


def test_no_event_lost_or_left(quick_run):
    """Every new edge a sender made was delivered exactly once, by evtchn and by the C program,
    and after each run nothing was pending or linked and a drain found nothing."""
    _, out, _ = quick_run
    runs = [
        r for r in json.loads(out.read_text())["runs"] if r["case"] in ("stream1x1", "isolated")
    ]
    assert {(r["case"], r["abi"], r["impl"]) for r in runs} == {
        (case, abi, impl)
        for case in ("stream1x1", "isolated")
        for abi in ("fifo", "2l")
        for impl in _impls()
    }
    for r in runs:
        what = f"{r['abi']} {r['impl']} rep {r['rep']}"
        assert r["delivered"] > 0, what
        assert r["delivered"] == r["edges"], what
        assert r["edges"] <= r["sent"], what
        assert r["left_pending"] == 0 and r["drained_after"] == 0, what
        if r["impl"] == "c":
            assert r["c_left_pending"] == 0 and r["refused"] == 0, what


def test_alternatives_side_by_side(quick_run):
    """multiprocessing.Queue, Pipe and os.eventfd ran in the same run, received every event,
    and each has a ratio against evtchn's fifo stream figure."""
    r, out, _ = quick_run
    doc = json.loads(out.read_text())
    for kind in ("mp_queue", "mp_queue_batch", "mp_pipe", "eventfd"):
        assert doc[f"alt_{kind}_events_per_s"] > 0, kind
        assert doc[f"stream1x1_fifo_cython_over_{kind}"] > 0, kind
    assert doc["stream1x1_per_event_fifo_cython_events_per_s"] > 0
    assert doc["stream1x1_per_event_fifo_cython_over_eventfd"] > 0
    per_event = [x for x in doc["runs"] if x["case"] == "stream1x1_per_event"]
    assert per_event and all(x["ok"] and x["delivered"] == x["edges"] > 0 for x in per_event)
    alt = [x for x in doc["runs"] if x["case"] == "alternative"]
    assert alt and all(x["ok"] and x["delivered"] == x["sent"] > 0 for x in alt)
    assert "target: evtchn fifo 1:1 at least 20x mp_queue" in r.stdout


def test_headline_beside_its_c_anchor(quick_run):
    """The headline case ran the real stress run and the C anchor for fifo and 2l: both
    delivered, the stress run passed every check, the anchor's own accounting held, and the
    rates, the ratio and the CPU per role are figures."""
    r, out, _ = quick_run
    doc = json.loads(out.read_text())
    assert "headline: python -m stress" in r.stdout
    for abi in ("fifo", "2l"):
        assert doc[f"headline_{abi}_cython_delivered_per_s"] > 0
        assert doc[f"headline_{abi}_c_delivered_per_s"] > 0
        assert doc[f"headline_{abi}_cython_over_c"] > 0
        for impl in ("cython", "c"):
            for role in ("senders", "vcpus"):
                assert doc[f"headline_{abi}_{impl}_{role}_cpu_s_per_race_s"] is not None
    runs = [x for x in doc["runs"] if x["case"] == "headline"]
    assert {(x["abi"], x["impl"]) for x in runs} == {
        (abi, impl) for abi in ("fifo", "2l") for impl in ("cython", "c")
    }
    for x in runs:
        assert x["ok"] and x["delivered"] > 0, x
        if x["impl"] == "c":
            assert x["delivered"] == x["edges"] and x["left_pending"] == 0
        else:
            assert x["verdict"] == "pass" and x["violations"] == 0
    assert doc["config"]["headline"]["reps"] == 1


# -- --compare: two synthetic JSON files, no benchmark run -----------------------------------
def _compare(tmp_path, old: dict, new: dict, *extra):
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--compare",
            str(tmp_path / "old.json"),
            "--new",
            str(tmp_path / "new.json"),
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


OLD = {
    "stream1x1_fifo_cython_events_per_s": 1.0e6,
    "latency_idle_fifo_p50_ns": 20000,
    "git_commit": "abc",
    "runs": [],
    "stream1x1_fifo_cython_over_c": 0.5,
}


def test_compare_regression_exits_1(tmp_path):
    new = {**OLD, "stream1x1_fifo_cython_events_per_s": 0.80e6}  # rate -20%
    r = _compare(tmp_path, OLD, new)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "REGRESSION" in r.stdout and "stream1x1_fifo_cython_events_per_s" in r.stdout
    new = {**OLD, "latency_idle_fifo_p50_ns": 24000}  # time +20%
    assert _compare(tmp_path, OLD, new).returncode == 1
    assert _compare(tmp_path, OLD, new, "--threshold", "25").returncode == 0


def test_compare_improvement_exits_0(tmp_path):
    new = {
        **OLD,
        "stream1x1_fifo_cython_events_per_s": 2.0e6,
        "latency_idle_fifo_p50_ns": 9000,
        "new_figure_per_s": 5.0,
    }
    r = _compare(tmp_path, OLD, new)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "better" in r.stdout and "REGRESSION" not in r.stdout
    assert "new_figure_per_s: only in the new file" in r.stdout
    small = {**OLD, "stream1x1_fifo_cython_events_per_s": 0.9e6}  # -10%: within 15%
    assert _compare(tmp_path, OLD, small).returncode == 0


def test_compare_unreadable_file_exits_2(tmp_path):
    (tmp_path / "bad.json").write_text("not json")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--compare",
            str(tmp_path / "bad.json"),
            "--new",
            str(tmp_path / "bad.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "not JSON" in r.stderr


# -- mapped pages per ABI --------------------------------------------------------------------
def test_mapped_pages_match_design_formulas(quick_run):
    _, out, _ = quick_run
    doc = json.loads(out.read_text())
    for abi, n, pages in (
        ("2l", 1024, 1),
        ("2l", 4096, 1),
        ("3l", 4096, 18),
        ("fifo", 1024, 2),
        ("fifo", 4096, 5),
    ):
        assert doc[f"mapped_{abi}_{n}_pages"] == pages, (abi, n)
        assert doc[f"mapped_{abi}_{n}_design_pages"] == pages, (abi, n)


def test_design_formula_limits():
    from bench import memory as M

    assert M.design_pages("2l", 1 << 15) is None  # beyond 64^2
    assert M.design_pages("3l", 1 << 20) is None  # beyond 64^3
    assert M.design_pages("3l", 1 << 17) == 1 + 16 + 1
    assert M.design_pages("fifo", 1 << 20) == 1024 + 1


# -- latency ---------------------------------------------------------------------------------
def test_latency_busy_and_idle_beside_c(quick_run):
    _, out, _ = quick_run
    doc = json.loads(out.read_text())
    for mode in ("busy", "idle"):
        for who in ("fifo", "2l", "c"):
            p50, p99 = doc[f"latency_{mode}_{who}_p50_ns"], doc[f"latency_{mode}_{who}_p99_ns"]
            assert 0 < p50 <= p99, (mode, who)
    samples = doc["latency_samples_ns"]
    assert set(samples) == {
        f"{w} {m}" for w in ("evtchn-fifo", "evtchn-2l", "C") for m in ("busy", "idle")
    }
    assert all(len(v) == 200 and min(v) > 0 for v in samples.values())


def test_calls_beside_kernel_and_setup(quick_run):
    _, out, _ = quick_run
    doc = json.loads(out.read_text())
    for key in (
        "calls_send_domain_ns",
        "calls_send_kernel_ns",
        "calls_consume_empty_domain_ns",
        "calls_consume_one_empty_ns",
        "calls_consume_into_empty_ns",
        "calls_consume_empty_kernel_ns",
        "setup_batch_ns",
        "setup_single_per_channel_ns",
    ):
        assert doc[key] > 0, key
    assert doc["calls_send_over_kernel"] == pytest.approx(
        doc["calls_send_domain_ns"] / doc["calls_send_kernel_ns"]
    )
    assert doc["setup_channels"] > 0


# -- N senders + N vCPUs ---------------------------------------------------------------------
def test_multi_process_throughput(quick_run):
    """--quick runs N = 1 and 2 pairs on fifo and 2l; every edge delivered exactly once."""
    _, out, _ = quick_run
    doc = json.loads(out.read_text())
    for abi in ("fifo", "2l"):
        for procs in (2, 4):
            assert doc[f"multi_{abi}_{procs}p_cython_events_per_s"] > 0, (abi, procs)
    multi = [r for r in doc["runs"] if r["case"] == "multi"]
    assert {(r["abi"], r["pairs"]) for r in multi} == {
        (a, n) for a in ("fifo", "2l") for n in (1, 2)
    }
    for r in multi:
        assert r["ok"] and r["delivered"] == r["edges"] > 0, r


def test_multi_64_processes_short(tmp_path):
    """32 senders + 32 vCPU processes, one short run per ABI: all delivered, nothing left."""
    _require_build()
    from bench.multi import Multi

    for abi in ("fifo", "2l"):
        m = Multi(abi, "cython", 32)
        try:
            r = m.run(0.2)
        finally:
            m.close()
        assert r["processes"] == 64 and r["ok"], r


# -- the asv suite (asv itself is not needed: each benchmark is called once, as asv would) ----
def test_asv_benchmarks_run_once(monkeypatch):
    import importlib
    import inspect
    import itertools
    import re

    _require_build()
    conf = json.loads(
        re.sub(r"^\s*//.*$", "", (REPO / "bench" / "asv.conf.json").read_text(), flags=re.M)
    )
    assert conf["environment_type"] == "existing" and conf["repo"] == ".."
    assert conf["benchmark_dir"] == "benchmarks"
    names = sorted(p.stem for p in (REPO / "bench" / "benchmarks").glob("bench_*.py"))
    assert names
    ran = 0
    for name in names:
        mod = importlib.import_module(f"bench.benchmarks.{name}")
        if hasattr(mod, "DURATION"):
            monkeypatch.setattr(mod, "DURATION", 0.1)
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != mod.__name__:
                continue
            params = (
                cls.params
                if isinstance(getattr(cls, "params", None), tuple)
                else (cls.params,)
                if hasattr(cls, "params")
                else ()
            )
            for combo in itertools.product(*params):
                obj = cls()
                if hasattr(obj, "setup"):
                    obj.setup(*combo)
                try:
                    for meth in [m for m in dir(obj) if m.startswith(("time_", "track_"))]:
                        value = getattr(obj, meth)(*combo)
                        if meth.startswith("track_"):
                            assert value > 0, (name, cls.__name__, meth, combo)
                        ran += 1
                finally:
                    if hasattr(obj, "teardown"):
                        obj.teardown(*combo)
    assert ran >= 10


# -- --plot ----------------------------------------------------------------------------------
def test_plot_from_a_file(quick_run, tmp_path):
    _, out, _ = quick_run
    r = subprocess.run(
        [sys.executable, "-m", "bench", "--plot", str(tmp_path / "png"), "--new", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert r.returncode == 2 and "needs matplotlib" in r.stderr, r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "png" / "throughput.png").stat().st_size > 0
    assert (tmp_path / "png" / "latency_cdf.png").stat().st_size > 0
