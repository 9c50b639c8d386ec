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
        (["--resets", "-1"], "--resets must be from 0 to 1000"),
        (["--resetters", "3"], "invalid choice: 3"),
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
    (cfg,), _ = cli.parse(["--resets", "20", "--resetters", "2", "--seed", "1"])
    assert "--resets 20 --resetters 2" in cli.replay_command(cfg)


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
    aimed = {"consume-vs-send", "unmask-vs-send", "drain-vs-link", "relink-old-tail"}
    assert all(d["aimed"] > 0 for d in rec["duels"] if d["duel"] in aimed)
    k = rec["resets"]  # the resetting domain K: reset, bound again, and its events delivered
    assert k["resets"] > 0 and k["rebinds"] >= k["resets"] and k["delivered"] > 0
    for d in rec["duels"]:
        if d["duel"] == "poll-vs-relink":  # the R9 check really ran, and passed
            assert d["woken_by_event"] > 0


# The duel aimed at each injected bug, and the violation it reports
CAUGHT_BY = {
    "2l-selector-before-upcall-clear": ("consume-vs-send", "selector-no-upcall"),  # R1
    "2l-unmask-test-before-clear": ("unmask-vs-send", "stuck-pending"),  # R2
    "fifo-ready-every-link": ("drain-vs-link", "priority"),  # R6
    "fifo-old-tail-kept": ("relink-old-tail", "old-tail"),  # R7
    "fifo-pending-before-lock": ("poll-vs-relink", "early-wake"),  # R9
}


def _assert_caught_by_its_duel(bug: str, r, json_path) -> None:
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-2000:]
    assert "FAIL" in r.stdout
    assert f"--inject {bug}" in r.stdout  # the replay command
    duel, kind = CAUGHT_BY[bug]
    (rec,) = json.loads(json_path.read_text())["runs"]
    (mine,) = [d for d in rec["duels"] if d["duel"] == duel]
    assert mine["violations"] > 0, rec["duels"]  # its own duel caught it, not luck elsewhere
    assert kind in rec["violation_counts"], rec["violation_counts"]
    assert any(v["kind"] == kind and v["phase"] == "duel" for v in rec["violations"])


@needs_cython
@pytest.mark.parametrize("bug", sorted(L.INJECTIONS))
def test_every_injected_bug_is_caught(bug, tmp_path):
    assert set(CAUGHT_BY) == set(L.INJECTIONS)
    out = tmp_path / "run.json"
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
        "--json",
        str(out),
    )
    _assert_caught_by_its_duel(bug, r, out)
    assert "seed 1" in r.stdout


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
def test_every_injected_bug_is_caught_on_the_numba_backend_too(bug, tmp_path):
    """The numba kernels carry their own copy of each historical bug."""
    pytest.importorskip("numba")
    out = tmp_path / "run.json"
    r = stress(
        "--inject",
        bug,
        "--backend",
        "numba",
        "--ports",
        "1024",
        "--vcpus",
        "4",
        "--duration",
        "2",
        "--no-progress",
        "--seed",
        "3",
        "--json",
        str(out),
        timeout=300,
    )
    _assert_caught_by_its_duel(bug, r, out)


# --- the resetting domain K (stress.resetter) ---------------------------------------------------


@needs_cython
def test_two_resetters_race_resets_with_binds(tmp_path):
    """Resets race each other (EBUSY) and the other resetter's binds. Xen's reset sees a
    channel re-opened while it ran and returns EAGAIN (8d385b247b), and every binding is
    accounted; an engine whose reset tears the FIFO state down anyway leaves a channel bound
    without its event-array page, and the run must say so (reset-parked, reset-lost)."""
    out = tmp_path / "run.json"
    r = stress(
        "--abi", "fifo", "--ports", "1024", "--vcpus", "4", "--duration", "6", "--duel", "0",
        "--resets", "200", "--resetters", "2", "--no-progress", "--seed", "5",
        "--json", str(out),
    )  # fmt: skip
    (rec,) = json.loads(out.read_text())["runs"]
    k = rec["resets"]
    assert k["resets"] > 100 and k["ebusy"] > 0 and k["rebinds_racing_a_reset"] > 0, k
    if r.returncode == 0:  # an engine with Xen's re-check: it saw the re-opened channels
        assert k["eagain"] > 0, k
    else:
        assert r.returncode == 1, r.stdout[-3000:]
        kinds = set(rec["violation_counts"])
        assert kinds and all(n.startswith("reset-") for n in kinds), rec["violation_counts"]
        assert "--resetters 2" in r.stdout and "seed 5" in r.stdout  # the replay


def test_the_resetter_catches_a_reset_that_wipes_a_bound_channel(monkeypatch):
    """A broken EVTCHNOP_reset (in one process, reference backend): it leaves one channel of
    K bound and still tears K's FIFO event array down, as a reset racing a bind without
    Xen's EAGAIN re-check does. Its events would be parked for ever: caught, with the port."""
    import evtchn
    from evtchn import layout as Lay
    from stress import report

    real_reset = evtchn.Domain.reset

    def broken_reset(self):
        if self.domid != 3:  # K: dom0, two senders, then K
            return real_reset(self)
        dm = self._dm
        keep = next(p for p in range(1, self.valid_ports) if dm.state(p) > Lay.ECS_RESERVED)
        for p in range(keep + 1, self.valid_ports):
            if dm.state(p) > Lay.ECS_RESERVED:
                self.close(p)
        dm.set_hdr(Lay.H_ARRAY_PAGES, 0)  # the array torn down under a bound channel

    monkeypatch.setattr(evtchn.Domain, "reset", broken_reset)
    (cfg,), _ = cli.parse(
        ["--backend", "reference", "--abi", "fifo", "--ports", "256", "--vcpus", "2",
         "--senders", "2", "--duration", "1", "--resets", "50", "--seed", "9", "--no-progress"]
    )  # fmt: skip
    res = R.run(cfg)
    kinds = {v.kind for v in res.violations.items}
    assert {"reset-parked", "reset-left-open"} <= kinds, res.violations.counts
    parked = next(v for v in res.violations.items if v.kind == "reset-parked")
    assert parked.port is not None and parked.vcpu == 0 and "R14" in parked.detail
    text = report.violations_text([res.record], {"fifo": cfg.argv_replay})
    assert "seed 9" in text and "--resets 50" in text


# --- every role dies cleanly -------------------------------------------------------------------

RUN = ["--ports", "1024", "--vcpus", "4", "--no-progress", "--seed", "2"]


def _phase(pid: int) -> int:
    """What a run's main process is doing now (stress.shm C_PHASE), 0 before it says."""
    for name in os.listdir("/dev/shm"):
        if name.startswith(f"evtchn-{pid}-stress-"):
            try:
                with open(f"/dev/shm/{name}", "rb") as f:
                    f.seek(8 * S.C_PHASE)
                    raw = f.read(8)
            except OSError:
                continue
            if len(raw) == 8:
                return int.from_bytes(raw, "little")
    return 0


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _sigint_default() -> None:
    # A test runner started as a background job has SIGINT ignored, and a child inherits
    # that: the run must see Ctrl-C as it would from a terminal.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Run:
    """A stress run in its own session (a terminal's Ctrl-C reaches the whole group)."""

    def __init__(self, *args):
        self.p = subprocess.Popen(
            [sys.executable, "-m", "stress", *RUN, *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            preexec_fn=_sigint_default,
        )
        self.pid = self.p.pid

    def wait_phase(self, phase: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while _phase(self.pid) != phase:
            assert self.p.poll() is None, f"run ended before phase {phase}: {self.p.stdout.read()}"
            assert time.monotonic() < deadline, f"no phase {phase} in {timeout} s"
            time.sleep(0.002)

    def workers(self) -> list[int]:
        return [g for c in _children(self.pid) for g in _children(c)]

    def worker(self, comm: str, timeout: float = 60) -> int:
        """The worker whose name (stress.workers.set_comm) is `comm`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for w in self.workers():
                if _comm(w) == comm:
                    return w
            time.sleep(0.002)
        raise AssertionError(f"no worker {comm} in run {self.pid}: {self.workers()}")

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        try:
            out, _ = self.p.communicate(timeout=timeout)
        finally:
            if self.p.poll() is None:
                os.killpg(self.pid, signal.SIGKILL)
                self.p.communicate()
        return self.p.returncode, out


# (role, its process name, the phase in which it is killed, extra arguments)
ROLE_KILLS = [
    ("sender", "st-sender-1", S.PH_RACE, []),
    ("vcpu", "st-vcpu-2", S.PH_RACE, []),
    ("masker", "st-masker-0", S.PH_RACE, []),
    ("mover", "st-mover-1", S.PH_RACE, []),  # chaos slot 1: after the masker
    ("K's sender", "st-ksender-0", S.PH_RACE, []),
    ("K's vcpu", "st-kvcpu-0", S.PH_RACE, []),
    ("resetter", "st-resetter-0", S.PH_RACE, ["--resets", "100"]),  # busy resetting
    ("duel sender", "st-duel-A", S.PH_DUEL, ["--duration", "1", "--duel", "5"]),
    ("duel vcpu", "st-duel-B", S.PH_DUEL, ["--duration", "1", "--duel", "5"]),
    ("duel third", "st-duel-C", S.PH_DUEL, ["--duration", "1", "--duel", "5"]),
]


@needs_cython
@pytest.mark.parametrize("role, comm, phase, extra", ROLE_KILLS, ids=[r[0] for r in ROLE_KILLS])
def test_a_killed_worker_ends_the_run_with_exit_3_and_no_leftovers(role, comm, phase, extra):
    run = _Run("--duration", "60", *extra)
    run.wait_phase(phase)
    victim = run.worker(comm)  # for a duel role: it is inside the duel now
    time.sleep(0.3)
    workers = run.workers()
    t_kill = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    code, out = run.finish(30)
    took = time.monotonic() - t_kill
    assert code == 3, out
    assert took < 10, took
    assert f"(pid {victim}) was killed by SIGKILL" in out and "ERROR" in out, out
    assert segments_of(run.pid) == []
    for w in workers:  # every worker is gone too
        assert not S.pid_alive(w), (w, _comm(w))


# Ctrl-C (SIGINT to the run's process group, as a terminal sends it) in each phase
CTRL_C = [
    ("setup", S.PH_SETUP, ["--abi", "fifo", "--ports", "65536"]),  # a long setup
    ("racing", S.PH_RACE, ["--duration", "60"]),
    ("final check", S.PH_FINAL, ["--duration", "1"]),
    ("duel", S.PH_DUEL, ["--duration", "1", "--duel", "5"]),
]


@needs_cython
@pytest.mark.parametrize("phase, extra", [c[1:] for c in CTRL_C], ids=[c[0] for c in CTRL_C])
def test_ctrl_c_stops_cleanly(phase, extra):
    run = _Run(*extra)
    run.wait_phase(phase)
    workers = run.workers()
    t_int = time.monotonic()
    os.killpg(run.pid, signal.SIGINT)
    code, out = run.finish(30)
    took = time.monotonic() - t_int
    assert code == 130, out
    assert took < 10, took
    assert "INTERRUPTED" in out and "Traceback" not in out, out
    assert segments_of(run.pid) == []
    for w in workers:
        assert not S.pid_alive(w), (w, _comm(w))


@needs_cython
@pytest.mark.parametrize("phase", [S.PH_RACE, S.PH_DUEL], ids=["racing", "duel"])
def test_workers_leave_when_the_main_process_is_killed_and_cleanup_tidies_up(phase):
    run = _Run("--duration", "60" if phase == S.PH_RACE else "1", "--duel", "30")
    try:
        run.wait_phase(phase)
        if phase == S.PH_DUEL:
            run.worker("st-duel-B")
        workers = run.workers()
        time.sleep(0.5)
    finally:
        run.p.kill()
        run.p.communicate()
    deadline = time.monotonic() + 20
    while any(S.pid_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [(w, _comm(w)) for w in workers if S.pid_alive(w)]
    assert segments_of(run.pid)  # a SIGKILLed run cannot unlink its memory...
    r = stress("cleanup")
    assert r.returncode == 0, r.stderr
    assert segments_of(run.pid) == []  # ...and `cleanup` removes it


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
