"""python -m stress: the command line, the verdicts, the JSON, the worker watchdog, cleanup, and
that every historical bug of ``--inject`` is caught.

Runs that race processes need the Cython backend (the only one whose kernels work across
processes) and are skipped without it; the whole file takes about two minutes on two cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from evtchn import layout as L

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stress import checks as C  # noqa: E402
from stress import cli  # noqa: E402
from stress import config as CF  # noqa: E402
from stress import run as R  # noqa: E402
from stress import shm as S  # noqa: E402
from stress import workers as W  # noqa: E402


def _have_cython() -> bool:
    try:
        from evtchn._core import CythonKernels  # noqa: F401
    except ImportError:
        return False
    return True


needs_cython = pytest.mark.skipif(
    not _have_cython(), reason="evtchn._core is not built (pip install -e .)"
)

SMALL = ["--ports", "1024", "--vcpus", "8", "--duration", "2", "--duel", "0.5", "--no-progress"]


def stress(*args, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stress", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def segments_of(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"evtchn-{pid}-")]


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(d))
    return out


def _workers_of(pid: int, want: int, timeout: float = 60.0) -> list[int]:
    """The worker processes of a stress run: children of its forkserver (grandchildren)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        grand = [g for c in _children(pid) for g in _children(c)]
        if len(grand) >= want:
            return grand
        time.sleep(0.1)
    raise AssertionError(f"stress run {pid} did not start {want} workers")


# --- the command line -------------------------------------------------------------------------


def test_help_lists_every_injection_as_a_choice():
    r = stress("--help")
    assert r.returncode == 0
    usage = " ".join(r.stdout.split())
    choices = "{" + ",".join(sorted(L.INJECTIONS)) + "}"
    assert choices in usage.replace(" ", "") or all(n in r.stdout for n in L.INJECTIONS)
    assert "--inject {" in r.stdout
    for name in L.INJECTIONS:
        assert name in r.stdout
    assert "cleanup" in r.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--abi", "2l", "--ports", "5000"], "above the 2l limit of 4096"),
        (["--abi", "fifo", "--ports", "131073"], "above the fifo limit of 131072"),
        (["--vcpus", "0"], "--vcpus must be at least 1"),
        (["--abi", "x86"], "invalid choice: 'x86'"),
        (["--workload", "zipf"], "invalid choice: 'zipf'"),
        (["--chaos", "wild"], "--chaos takes"),
        (["--inject", "fifo-old-tail-kept", "--abi", "2l"], "is a fifo bug"),
        (["--inject", "no-such-bug"], "invalid choice: 'no-such-bug'"),
        (["--duration", "0"], "--duration must be a positive number"),
        (["--duration", "1", "--events", "5"], "not allowed with argument"),
        (["--ports", "many"], "--ports must be an integer"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(args, needle):
    r = stress(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert needle in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_parse_defaults_and_caps():
    cfgs, _ = cli.parse(["--abi", "all", "--seed", "3"])
    assert [c.abi for c in cfgs] == ["fifo", "2l", "3l"]
    by = {c.abi: c for c in cfgs}
    assert by["fifo"].channels == 8192 and not by["fifo"].cap_note
    assert by["2l"].channels < 4096 and "4096" in by["2l"].cap_note  # capped, and said so
    assert all(c.seed == 3 for c in cfgs)
    # --inject picks its ABI when --abi is absent; the replay names everything that matters
    (cfg,), _ = cli.parse(["--inject", "2l-unmask-test-before-clear", "--seed", "11"])
    assert cfg.abi == "2l" and cfg.inject == "2l-unmask-test-before-clear"
    replay = cli.replay_command(cfg)
    assert "--seed 11" in replay and "--inject 2l-unmask-test-before-clear" in replay
    assert "--abi 2l" in replay
    # the headline command binds every port but port 0 and the closers' spare ones
    (cfg,), _ = cli.parse(["--abi", "fifo", "--ports", "131072", "--vcpus", "64"])
    k = CF.RESET_CHANNELS  # the resetting domain's channels take dom0 ports too
    assert cfg.channels == 131071 - CF.spare_ports(131072) - k and "131072" in cfg.cap_note
    (cfg,), _ = cli.parse(["--abi", "fifo", "--ports", "131072", "--chaos", "none"])
    assert cfg.channels == 131071 - k
    (cfg,), _ = cli.parse(
        ["--abi", "fifo", "--ports", "131072", "--chaos", "none", "--resets", "0"]
    )
    assert cfg.channels == 131071 and cfg.kchans == 0


def test_parse_chaos():
    assert CF.parse_chaos("none") == {"masks": 0.0, "moves": 0.0, "closes": 0.0}
    assert CF.parse_chaos("250") == {"masks": 250.0, "moves": 250.0, "closes": 250.0}
    mixed = CF.parse_chaos("masks=10,closes=0")
    assert mixed["masks"] == 10 and mixed["closes"] == 0
    assert mixed["moves"] == CF.CHAOS_PRESETS["moderate"]["moves"]
    for bad in ("fast", "masks=x", "spins=3", "-1", "nan"):
        with pytest.raises(CF.ConfigError):
            CF.parse_chaos(bad)


def test_latency_histogram_buckets():
    vals = np.array([1, 7, 8, 9, 1000, 123_456, 10**9, 3 * 10**12], np.int64)
    idx = W.hist_index(vals)
    assert (np.diff(idx) >= 0).all()
    mid = W.hist_value(idx)
    assert (np.abs(mid - vals) <= vals * 0.07 + 1).all()
    assert R.sample_mask(1000) == 0 and R.sample_mask(4096) == 0
    assert R.sample_mask(131071) == 15


# --- checks on hand-made states (single process, reference kernels) --------------------------


def test_checks_see_a_pending_port_that_no_upcall_reaches():
    import evtchn

    for abi in ("fifo", "2l"):
        with evtchn.Host("reference") as h:
            d0 = h.create_domain(abi, vcpus=2)
            s = h.create_domain(abi)
            ports = []
            for _ in range(8):
                p = d0.alloc_unbound(s.domid)
                ports.append((p, s.bind_interdomain(0, p)))
            s.consume(0)
            assert C.held_checks(C.Snapshot(h, d0.max_ports), "t") == []
            s.send(ports[3][1])
            assert C.held_checks(C.Snapshot(h, d0.max_ports), "t") == []
            assert list(d0.consume(0)) == [ports[3][0]]
            # now break it the way R2 does: PENDING set behind the mask, mask cleared, no raise
            p = ports[5][0]
            d0.mask(p)
            s.send(ports[5][1])
            dm = h._dm(0)
            if abi == "fifo":
                wi = dm.layout.event_word(p) // 4
                dm.u32[wi] = int(dm.u32[wi]) & ~L.FIFO_MASKED
            else:
                mask0 = (dm.layout.offsets["shared_info"] + L.si_mask(64)) // 8
                dm.words[mask0 + p // 64] = int(dm.words[mask0 + p // 64]) & ~(1 << (p % 64))
            found = C.held_checks(C.Snapshot(h, d0.max_ports), "t")
            assert [(v.kind, v.port) for v in found] == [("stuck-pending", p)]


# --- runs -------------------------------------------------------------------------------------


def test_reference_backend_runs_in_one_process(tmp_path):
    out = tmp_path / "ref.json"
    r = stress(
        "--backend",
        "reference",
        "--ports",
        "256",
        "--vcpus",
        "2",
        "--duration",
        "1",
        "--no-progress",
        "--seed",
        "5",
        "--json",
        str(out),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rec = json.loads(out.read_text())["runs"][0]
    assert rec["mode"].startswith("single process") and rec["verdict"] == "pass"
    assert rec["delivered"] > 0


def test_reference_backend_catches_an_old_tail_kept():
    """R7 needs no real concurrency: even the interleaved single-process run catches it."""
    r = stress(
        "--backend",
        "reference",
        "--inject",
        "fifo-old-tail-kept",
        "--ports",
        "256",
        "--vcpus",
        "2",
        "--duration",
        "1",
        "--no-progress",
        "--seed",
        "5",
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "--inject fifo-old-tail-kept" in r.stdout and "FAIL" in r.stdout


JSON_FIELDS = (
    "abi",
    "ports",
    "vcpus",
    "senders",
    "sent",
    "delivered",
    "coalesced",
    "delivered_per_s",
    "latency_ns",
    "fairness_jain",
    "worst_wait_ns",
    "mapped_pages",
    "violations",
    "verdict",
)


@needs_cython
@pytest.mark.parametrize("abi", ["fifo", "2l", "3l"])
def test_short_run_of_each_abi_passes(abi, tmp_path):
    out = tmp_path / f"{abi}.json"
    r = stress("--abi", abi, *SMALL, "--seed", "21", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["machine"]["cpus"] >= 1 and doc["versions"]["numpy"]
    assert doc["exit_code"] == 0
    (rec,) = doc["runs"]
    for key in JSON_FIELDS:
        assert key in rec, key
    assert rec["abi"] == abi and rec["ports"] == 1024 and rec["vcpus"] == 8
    assert rec["verdict"] == "pass" and rec["violations"] == []
    assert rec["delivered"] > 0 and rec["sent"] >= rec["delivered"] - rec["raised_by_unmask"]
    assert rec["coalesced"] == rec["sent"] - rec["edges"]
    lat = rec["latency_ns"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert 0 < rec["fairness_jain"] <= 1
    assert rec["mapped_pages"] >= 1
    assert rec["mode"] == "processes"
    want = (
        {"drain-vs-link", "poll-vs-relink", "relink-old-tail"}
        if abi == "fifo"
        else {"consume-vs-send", "unmask-vs-send"}
    )
    assert {d["duel"] for d in rec["duels"]} == want
    assert all(d["iterations"] > 0 and d["violations"] == 0 for d in rec["duels"])
    for d in rec["duels"]:
        if d["duel"] == "poll-vs-relink":  # the R9 check really ran, and passed
            assert d["woken_by_event"] > 0


CAUGHT_AS = {"fifo-pending-before-lock": "early-wake"}  # R9: by the poll-vs-relink duel


@needs_cython
@pytest.mark.parametrize("bug", sorted(L.INJECTIONS))
def test_every_injected_bug_is_caught(bug):
    r = stress(
        "--inject",
        bug,
        "--ports",
        "2048",
        "--vcpus",
        "16",
        "--duration",
        "2",
        "--no-progress",
        "--seed",
        "1",
    )
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    assert "FAIL" in r.stdout
    assert f"--inject {bug}" in r.stdout  # the replay command
    assert "seed 1" in r.stdout
    if bug in CAUGHT_AS:
        assert CAUGHT_AS[bug] in r.stdout, r.stdout[-3000:]


def test_numba_backend_passes_and_races_from_the_first_second(tmp_path):
    """Workers load numba's kernels before they report ready, so the racing window is not
    spent loading them (it once delivered nothing in a 2 s run)."""
    pytest.importorskip("numba")
    out = tmp_path / "numba.json"
    r = stress(
        "--backend",
        "numba",
        "--ports",
        "1024",
        "--vcpus",
        "8",
        "--duration",
        "2",
        "--no-progress",
        "--seed",
        "5",
        "--json",
        str(out),
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    (rec,) = json.loads(out.read_text())["runs"]
    assert rec["verdict"] == "pass" and rec["delivered_per_s"] > 0


@pytest.mark.parametrize("bug", sorted(L.INJECTIONS))
def test_every_injected_bug_is_caught_on_the_numba_backend_too(bug):
    """The numba kernels carry their own copy of each historical bug."""
    pytest.importorskip("numba")
    r = stress(
        "--inject",
        bug,
        "--backend",
        "numba",
        "--ports",
        "2048",
        "--vcpus",
        "16",
        "--duration",
        "2",
        "--no-progress",
        "--seed",
        "3",
        timeout=300,
    )
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    assert f"--inject {bug}" in r.stdout
    if bug in CAUGHT_AS:
        assert CAUGHT_AS[bug] in r.stdout, r.stdout[-3000:]


@needs_cython
def test_a_killed_worker_ends_the_run_with_exit_3_and_no_leftovers():
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stress",
            "--ports",
            "1024",
            "--vcpus",
            "8",
            "--duration",
            "60",
            "--no-progress",
            "--seed",
            "2",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        workers = _workers_of(p.pid, 8 + 2)
        time.sleep(1.0)
        victim = workers[len(workers) // 2]
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        out, _ = p.communicate(timeout=30)
        took = time.monotonic() - t_kill
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 3, out
    assert took < 10, took
    assert f"(pid {victim}) was killed by SIGKILL" in out
    assert "ERROR" in out
    assert segments_of(p.pid) == []
    for w in workers:  # every worker is gone too
        assert not S.pid_alive(w), w


@needs_cython
def test_ctrl_c_stops_cleanly():
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stress",
            "--ports",
            "1024",
            "--vcpus",
            "8",
            "--duration",
            "60",
            "--no-progress",
            "--seed",
            "2",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        _workers_of(p.pid, 8 + 2)
        time.sleep(1.0)
        os.killpg(p.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
        out, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 130, out
    assert "INTERRUPTED" in out and "Traceback" not in out
    assert segments_of(p.pid) == []


@needs_cython
def test_workers_leave_when_the_main_process_is_killed_and_cleanup_tidies_up():
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stress",
            "--ports",
            "1024",
            "--vcpus",
            "8",
            "--duration",
            "60",
            "--no-progress",
            "--seed",
            "2",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        workers = _workers_of(p.pid, 8 + 2)
        time.sleep(1.0)
    finally:
        p.kill()
        p.wait()
    deadline = time.monotonic() + 15
    while any(S.pid_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if S.pid_alive(w)]
    assert segments_of(p.pid)  # a SIGKILLed run cannot unlink its memory...
    r = stress("cleanup")
    assert r.returncode == 0, r.stderr
    assert segments_of(p.pid) == []  # ...and `cleanup` removes it


def test_cleanup_removes_what_dead_runs_left():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = child.pid
    orphan = Path("/dev/shm") / f"evtchn-{dead}-stress-deadbeef"
    mine = Path("/dev/shm") / f"evtchn-{os.getpid()}-stress-cafef00d"
    orphan.write_bytes(b"x")
    mine.write_bytes(b"x")
    try:
        r = stress("cleanup")
        assert r.returncode == 0, r.stderr
        assert not orphan.exists()
        assert mine.exists()  # its creator is alive: not touched
        assert orphan.name in r.stdout
    finally:
        for f in (orphan, mine):
            f.unlink(missing_ok=True)
