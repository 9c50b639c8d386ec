"""Shared fixtures: the backends under test, and a guard that no test leaks /dev/shm segments."""

from __future__ import annotations

import importlib
import os
import time

import pytest

import evtchn

SHM = "/dev/shm"


def _available(backend: str) -> bool:
    if backend == "reference":
        return True
    module, cls = {
        "cython": ("evtchn._core", "CythonKernels"),
        "numba": ("evtchn.numba_kernels", "NumbaKernels"),
    }[backend]
    try:
        return hasattr(importlib.import_module(module), cls)
    except ImportError:
        return False


BACKENDS = [b for b in ("reference", "cython", "numba")]


def join_all(procs, timeout: float) -> None:
    """Join every child within one deadline; kill (and report) the stragglers, then require
    a clean exit from each (pytest-timeout cannot interrupt a wait in C, so bound it here)."""
    deadline = time.monotonic() + timeout
    hung = []
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            hung.append(p)
    for p in hung:
        p.kill()
        p.join(10)
    assert not hung, f"child processes did not finish within {timeout} s: {hung}"
    for p in procs:
        assert p.exitcode == 0, f"{p.name} exited with {p.exitcode}"


def pytest_configure(config):
    # CI must run the compiled backend, not silently fall back to the oracle alone.
    if os.environ.get("EVTCHN_REQUIRE_COMPILED") and not _available("cython"):
        raise pytest.UsageError("EVTCHN_REQUIRE_COMPILED is set but evtchn._core is not built")
    # A suite started as a background job without job control (`.ci/run &` from a script) has
    # SIGINT ignored, and every child would inherit that: the tests that send Ctrl-C to a
    # child would wait for nothing. Take SIGINT back, as a terminal's foreground job has it.
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.fixture(params=BACKENDS)
def backend(request):
    if not _available(request.param):
        pytest.skip(f"backend {request.param} is not available")
    return request.param


@pytest.fixture
def compiled(backend):
    """The backend, for tests whose processes race: the reference runs in one process."""
    if backend == "reference":
        pytest.skip("the reference backend runs in one process")
    return backend


@pytest.fixture
def host(backend):
    with evtchn.Host(backend) as h:
        yield h


def _ours() -> set[str]:
    return {n for n in os.listdir(SHM) if n.startswith(f"evtchn-{os.getpid()}-")}


@pytest.fixture(autouse=True)
def no_shm_leak():
    """Every test must release what it created, also when it fails."""
    before = _ours()
    yield
    leaked = _ours() - before
    for name in leaked:
        os.unlink(os.path.join(SHM, name))
    assert not leaked, f"test leaked shared memory: {sorted(leaked)}"


def _signal_state():
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    return handlers, signal.pthread_sigmask(signal.SIG_BLOCK, [])


@pytest.fixture(autouse=True)
def signals_restored():
    """Every test leaves the process's SIGINT/SIGTERM handlers and signal mask as it found
    them: children inherit an ignored or blocked SIGINT, and a later test's Ctrl-C to a
    child would then never arrive."""
    import signal

    before = _signal_state()
    yield
    after = _signal_state()
    if before is None or after == before:
        return
    handlers, mask = before
    for s, h in handlers.items():
        signal.signal(s, h)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    assert after == before, f"test changed the signal state: {before} -> {after}"
