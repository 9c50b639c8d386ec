"""python -m bench study (bench/study): the quick study end to end, a small study on a Dask
cluster the test starts, a killed worker's task run again (and its shared memory swept), a
report whose decision follows the synthetic numbers it is built from, and bad arguments."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("dask")
pytest.importorskip("distributed")
pytest.importorskip("matplotlib")

from bench.study import decisions as D  # noqa: E402
from bench.study import ledger, report, runner, stats  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUICK_TIMEOUT = 900  # s: under 2 minutes on a quiet 2-core machine; CI machines are shared


def _study(*args, timeout=QUICK_TIMEOUT):
    return subprocess.run(
        [sys.executable, "-m", "bench", "study", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _cython_built() -> bool:
    try:
        from evtchn._core import CythonKernels  # noqa: F401
    except ImportError:
        return False
    return True


needs_build = pytest.mark.skipif(not _cython_built(), reason="the Cython backend is not built")


@needs_build
@pytest.mark.timeout(QUICK_TIMEOUT + 60)
def test_quick_study_runs_every_experiment(tmp_path):
    out = tmp_path / "quick"
    r = _study("--quick", "--report", str(out), "--quiet")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((out / "results.json").read_text())
    exps = {e["experiment"] for e in doc["configs"].values()}
    assert exps == {"capacity", "density", "memory", "lockout", "timer", "scaling", "cost"}
    bad = {k: e.get("reason") for k, e in doc["configs"].items() if e["status"] != "ok"}
    assert not bad
    assert doc["machine"]["cpus"] == os.cpu_count()
    text = (out / "report.md").read_text()
    assert "## Decisions" in text and "python -m bench study --quick" in text
    for png in ("capacity_guests.png", "memory_pages.png", "lockout_below.png", "timer_ns.png"):
        assert (out / png).stat().st_size > 0, png
    lock = [e["result"] for e in doc["configs"].values() if e["experiment"] == "lockout"]
    assert {r["consumer"] for r in lock} == {"linux", "scan-from-0"}
    # every round raised probes and passed its exact accounting (status ok above); how long
    # the victims waited is a measurement, not a test
    assert all(x["probes_raised"] > 0 for r in lock for x in r["rounds"])


@needs_build
def test_small_study_on_a_cluster_started_here(tmp_path):
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None, memory_limit=0
    ) as cluster:
        out = tmp_path / "small"
        r = _study(
            "--report",
            str(out),
            "--only",
            "memory",
            "--quick",
            "--config",
            "2l-*",
            "--seeds",
            "1",
            "--scheduler",
            cluster.scheduler_address,
            "--quiet",
        )
        assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((out / "results.json").read_text())
    assert sorted(doc["configs"]) == ["memory/2l-32/s0", "memory/2l-64/s0"]
    assert all(e["status"] == "ok" for e in doc["configs"].values())
    assert cluster.scheduler_address in doc["study"]["where"]
    # --from rebuilds the same report without running anything
    (out / "report.md").unlink()
    r = _study("--from", str(out / "results.json"))
    assert r.returncode == 0, r.stderr
    assert "Memory mapped" in (out / "report.md").read_text()


def _selftest(marker: Path, kill: str, i: int) -> dict:
    return {
        "task_key": f"selftest/{kill}/{i}",
        "experiment": "selftest",
        "config": kill,
        "params": {"kill": kill, "marker": str(marker)},
        "seed": 0,
        "timeout": 120,
    }


@needs_build
def test_killed_worker_is_retried_once_and_leaves_no_segment(tmp_path):
    once, always = tmp_path / "once", tmp_path / "always"
    cluster = runner.Cluster(parallel=1)
    try:
        specs = [_selftest(once, "once", 0), _selftest(always, "always", 1)]
        got = {spec["task_key"]: rec for spec, rec in cluster.run_all(specs)}
        res = [got[s["task_key"]] for s in specs]
        swept = cluster.sweep_workers()
    finally:
        cluster.close()
    assert res[0]["status"] == "ok", res[0]
    assert res[1]["status"] == "failed"
    assert "died" in res[1]["reason"]
    pids = [int(p.name.split("-")[1]) for d in (once, always) for p in d.glob("pid-*")]
    assert len(list(once.glob("pid-*"))) == 2  # killed once, then run again
    assert len(list(always.glob("pid-*"))) == 2  # killed, run again, killed: given up
    assert swept >= 0
    for pid in pids:
        assert ledger.segments_of(pid) == [], pid


def test_ledger_sweeps_only_dead_creators(tmp_path, monkeypatch):
    monkeypatch.setenv(ledger.ENV, str(tmp_path / "ledger"))
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = p.pid
    name = f"evtchn-{dead}-studytest"
    Path("/dev/shm", name).write_bytes(b"x")
    ledger.enter(dead)
    ledger.enter(os.getpid())
    try:
        assert ledger.sweep() == [name]
        assert not Path("/dev/shm", name).exists()
        assert (ledger.directory() / str(os.getpid())).exists()  # alive: kept
    finally:
        ledger.leave(os.getpid())
        Path("/dev/shm", name).unlink(missing_ok=True)


def _synthetic(costs: dict) -> dict:
    """A results document with only experiment 7, whose CPU costs per variant are `costs`
    (ns per send, per delivery), three seeds each with a small spread."""
    configs = {}
    for v, (send, deliver) in costs.items():
        for seed, jitter in enumerate((0.98, 1.0, 1.02)):
            side = {
                "send_ns_per_event": send * jitter,
                "deliver_ns_per_event": deliver * jitter,
                "events_per_s": 1e6,
                "edges": 10,
                "delivered": 10,
                "left_pending": 0,
            }
            configs[f"cost/{v}/s{seed}"] = {
                "experiment": "cost",
                "config": v,
                "seed": seed,
                "params": {},
                "status": "ok",
                "result": {
                    "variant": v,
                    "setup_s": 0.05,
                    "kernels": dict(side),
                    "stream": dict(side),
                },
            }
    return {
        "format": 1,
        "study": {
            "command": "synthetic",
            "options": {"quick": False},
            "experiments": ["cost"],
            "seeds": 3,
        },
        "machine": {},
        "versions": {},
        "configs": configs,
    }


def test_decision_follows_the_numbers(tmp_path):
    fifo_wins = _synthetic({"2l-64": (60, 30), "fifo": (30, 15), "3l-64": (61, 30)})
    l2_wins = copy.deepcopy(fifo_wins)
    for e in l2_wins["configs"].values():
        if e["config"] == "2l-64":
            for side in ("kernels", "stream"):
                e["result"][side]["send_ns_per_event"] /= 12
    texts = []
    for i, doc in enumerate((fifo_wins, l2_wins)):
        out = tmp_path / f"r{i}"
        out.mkdir()
        assert report.build(doc, out) is False  # nothing failed
        texts.append((out / "report.md").read_text())
    assert (
        "| What does one event cost in CPU time? | CPU ns per event, send + delivery, "
        "kernels alone (exp. 7) (lower is better) | fifo" in texts[0]
    )
    assert "kernels alone (exp. 7) (lower is better) | 2l-64" in texts[1]
    assert "**A typical domU: fifo**" in texts[0]
    assert "**A typical domU: 2l-64**" in texts[1]


def test_overlapping_intervals_are_inside_the_noise():
    m = D.METRICS["cost_kernels_ns"]
    c = D.compare(m, {"fifo": [10, 30, 20], "2l-64": [12, 28, 21], "3l-64": [100, 101, 99]})
    assert c.winner == "fifo" and c.noise and set(c.tied) == {"fifo", "2l-64"}
    assert "inside the noise" in c.text() and "ahead of 3l-64" in c.text()
    c = D.compare(m, {"fifo": [10, 10.1, 9.9], "2l-64": [20, 20.2, 19.8]})
    assert c.winner == "fifo" and not c.noise and "2.00x lower" in c.text()
    e = stats.estimate([1.0, 2.0, 3.0])
    assert e.mean == 2.0 and e.lo == pytest.approx(2 - 4.303 / 3**0.5, rel=1e-3)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--quick"], "--report DIR is required"),
        (["--report", "x", "--seeds", "0"], "--seeds must be at least 1"),
        (["--report", "x", "--only", "nosuch"], "unknown experiment 'nosuch'"),
        (["--from", "/nonexistent/results.json"], "no such file"),
        (["--report", "x", "--scheduler", "localhost"], "needs an address"),
        (["--report", "x", "--profile", "dom0_vcpus=zero"], "needs an integer"),
        (["--from", "x.json", "--quick"], "drop --quick"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args, words):
    r = _study(*args, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], r.stderr


def test_stress_link_bits_and_word_bits():
    from stress import cli as SC
    from stress import config as SCF

    cfgs, _ = SC.parse(["--abi", "fifo", "--link-bits", "20", "--ports", "200000", "--seed", "1"])
    assert cfgs[0].channels == 200000 and cfgs[0].link_bits == 20
    assert "--link-bits 20" in SC.replay_command(cfgs[0])
    cfgs, _ = SC.parse(["--abi", "2l", "--word-bits", "32", "--ports", "1000", "--seed", "1"])
    assert cfgs[0].word_bits == 32 and "--word-bits 32" in SC.replay_command(cfgs[0])
    for bad in (
        ["--abi", "fifo", "--link-bits", "16"],
        ["--abi", "2l", "--link-bits", "20"],
        ["--abi", "2l", "--word-bits", "32", "--ports", "2000"],
        ["--abi", "fifo", "--ports", "200000"],
    ):
        with pytest.raises(SCF.ConfigError):
            SC.parse(bad)
