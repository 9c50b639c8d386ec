"""The examples run as a newcomer runs them: ``python -m examples.split_driver`` from the
checkout, in a subprocess, on both backend loops (Python handles and @njit through
evtchn.numba). Every request must be answered exactly once and nothing may stay in /dev/shm,
also when a driver is killed midway or the run is interrupted."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SHM = "/dev/shm"
CMD = [sys.executable, "-m", "examples.split_driver"]
CONNECTED = re.compile(
    r"connected: frontend pid (\d+) .* backend pid (\d+) .* host /dev/shm/(\S+), "
    r"ring /dev/shm/(\S+)"
)
# A first @njit run compiles evtchn's kernels into the user's loop (a minute on a slow,
# loaded machine); a cached one starts in seconds.
TIMEOUT = 600


def _segments_of(pid: int) -> list[str]:
    """What a run whose toolstack had `pid` left in /dev/shm: its host, domains and ring are
    all named evtchn-<pid>-..."""
    return sorted(n for n in os.listdir(SHM) if n.startswith(f"evtchn-{pid}-"))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        [*CMD, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert not _segments_of(proc.pid), f"leaked: {_segments_of(proc.pid)}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("in_flight", [128, 1])
@pytest.mark.parametrize("path", ["python", "njit"])
def test_split_driver_answers_every_request_exactly_once(path, in_flight):
    """128 in flight: batches, most notifications held off. 1 in flight: ping-pong, every
    request and response goes through a final check and a sleep, where a lost wake-up would
    hang the run."""
    n = 3000
    njit = ["--njit"] if path == "njit" else []
    r = _run("--requests", str(n), "--in-flight", str(in_flight), "--rounds", "200", *njit)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"answered exactly once: {n} of {n} (backend handled {n})" in r.stdout, r.stdout
    m = re.search(
        r"notifications sent per request: ([\d.]+) \(frontend (\d+), backend (\d+)\)", r.stdout
    )
    assert m, r.stdout
    # Each side notified at least once (the first request, the first response); with 128 in
    # flight the hold-off spared most notifications (far fewer than one per request).
    assert int(m.group(2)) >= 1 and int(m.group(3)) >= 1, r.stdout
    if in_flight == 128:
        assert float(m.group(1)) < 1.0, r.stdout
    costs = r"Python handles [\d,]+ ns" + (r", @njit [\d,]+ ns" if path == "njit" else "")
    assert re.search(rf"^per-event cost .*: {costs}$", r.stdout, re.M), r.stdout
    assert r.stderr == "", r.stderr


def _sigint_default() -> None:
    # A test runner started as a background job without job control (`.ci/run &`) has SIGINT
    # ignored, and a child inherits that (Python then leaves it ignored): give the run the
    # Ctrl-C of a terminal's foreground job.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _start_and_wait_for_traffic(*args: str) -> tuple[subprocess.Popen[str], re.Match[str]]:
    """Start a long run; return once responses are flowing (the ring's rsp_prod > 0)."""
    proc = subprocess.Popen(
        [*CMD, "--requests", "100000000", "--rounds", "0", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's job
        preexec_fn=_sigint_default,
    )
    assert proc.stdout is not None
    m = None
    deadline = time.monotonic() + TIMEOUT
    while m is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = CONNECTED.search(line)
    if m is None:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the drivers did not connect:\n{out}\n{err}")
    ring = Path(SHM) / m.group(4)
    while time.monotonic() < deadline:
        idx = np.frombuffer(ring.read_bytes()[:16], np.uint32)
        if idx[2] > 0:  # rsp_prod: the backend has answered
            return proc, m
        time.sleep(0.01)
    proc.kill()
    pytest.fail("no response came through the ring")


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert not _segments_of(proc.pid), f"leaked: {_segments_of(proc.pid)}"
    return out, err


@pytest.mark.parametrize("path", ["python", "njit"])
@pytest.mark.parametrize("victim, survivor", [("backend", "frontend"), ("frontend", "backend")])
def test_a_killed_driver_stops_its_peer_with_a_clear_error(victim, survivor, path):
    proc, m = _start_and_wait_for_traffic(*(["--njit"] if path == "njit" else []))
    pid = int(m.group(1 if victim == "frontend" else 2))
    os.kill(pid, signal.SIGKILL)
    out, err = _finish(proc)
    assert proc.returncode == 1, out + err
    assert f"split_driver: error: the {victim} died, killed by SIGKILL" in err, err
    assert f"split_driver {survivor}: error: the {victim} went away: event channel port" in err
    assert "unbound now" in err, err
    if victim == "backend":
        assert "requests unanswered" in err, err
    assert "Traceback" not in err, err


def test_ctrl_c_stops_every_process_and_releases_the_memory():
    proc, _ = _start_and_wait_for_traffic()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends to the foreground job
    out, err = _finish(proc)
    assert proc.returncode == 130, out + err
    assert "interrupted; shared memory released" in err, err
    assert "Traceback" not in err, err
