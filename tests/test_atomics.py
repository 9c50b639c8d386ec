"""evtchn._atomics, exercised through the evtchn._atomics_test wrappers.

Single-process tests pin down each helper's return value and effect; the multi-process ones map
one /dev/shm file into spawned processes, as the real backends do, and check that the lock, the
atomic counters and the futexes work across address spaces.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import multiprocessing
import operator
import os
import signal
import threading
import time
import uuid

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

# Skipped, like the Cython backend's tests, when the extensions are not built (conftest's
# EVTCHN_REQUIRE_COMPILED is what makes CI insist on them).
at = pytest.importorskip("evtchn._atomics_test", reason="Cython extensions not built")

from evtchn import layout as L  # noqa: E402
from evtchn.owner import owner_alive, owner_id  # noqa: E402

CTX = multiprocessing.get_context("spawn")  # no inherited locks or threads, as in production
DTYPES = [np.uint8, np.uint16, np.uint32, np.uint64]
JOIN_TIMEOUT = 60.0  # generous: spawn start-up plus a loaded CI box

# Segment layout, in element indices of the uint32 / uint64 views; one cache line apiece.
SHM_SIZE = 4096
LOCK = 0  # u64: lock word (owner id)
FUTEX = 16  # u32: futex word
COUNTER = 16  # u64: counter
RESULT = 24  # u64 [2]: values a child reports back


# --- single process ---------------------------------------------------------------------------


def _top(dtype) -> int:
    return int(np.iinfo(dtype).max)


@pytest.mark.parametrize("dtype", DTYPES)
def test_load_store(dtype):
    a = np.zeros(3, dtype)
    top = _top(dtype)
    at.store(a, 1, top)
    assert a.tolist() == [0, top, 0]
    assert at.load(a, 1) == top and at.load_relaxed(a, 1) == top
    at.store_relaxed(a, 2, 5)
    assert a.tolist() == [0, top, 5]
    at.store(a, 0, 2**64 - 2)  # truncated to the element's width, as in C
    assert at.load(a, 0) == top - 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_fetch_ops_return_old_value(dtype):
    top = _top(dtype)
    a = np.array([0b1100, 7], dtype)
    assert at.fetch_or(a, 0, 0b0101) == 0b1100 and a[0] == 0b1101
    assert at.fetch_and(a, 0, 0b0110) == 0b1101 and a[0] == 0b0100
    assert at.fetch_add(a, 0, 3) == 4 and a[0] == 7
    assert at.fetch_sub(a, 0, 2) == 7 and a[0] == 5
    assert at.exchange(a, 0, top) == 5 and a[0] == top
    assert at.fetch_add(a, 0, 1) == top and a[0] == 0  # wraps
    assert at.fetch_sub(a, 0, 1) == 0 and a[0] == top
    assert a[1] == 7  # neighbour untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_cas(dtype):
    a = np.array([5], dtype)
    assert at.cas(a, 0, 5, 7) == (1, 5) and a[0] == 7
    assert at.cas(a, 0, 5, 9) == (0, 7) and a[0] == 7  # failure reports what it saw


@pytest.mark.parametrize("dtype", DTYPES)
def test_test_and_set_clear_bit(dtype):
    nbits = np.dtype(dtype).itemsize * 8
    for bit in (0, 1, nbits - 1):
        other = 1 << (bit ^ 1)  # a neighbouring bit, which must survive
        a = np.array([other], dtype)
        assert at.test_and_set_bit(a, 0, bit) == 0 and a[0] == other | 1 << bit
        assert at.test_and_set_bit(a, 0, bit) == 1 and a[0] == other | 1 << bit
        assert at.test_and_clear_bit(a, 0, bit) == 1 and a[0] == other
        assert at.test_and_clear_bit(a, 0, bit) == 0 and a[0] == other
    with pytest.raises(ValueError):
        at.test_and_set_bit(a, 0, nbits)


_MODEL = {
    "fetch_or": operator.or_,
    "fetch_and": operator.and_,
    "fetch_add": operator.add,
    "fetch_sub": operator.sub,
    "exchange": lambda old, v: v,
}


@pytest.mark.parametrize("dtype", DTYPES)
@given(
    ops=st.lists(st.tuples(st.sampled_from(sorted(_MODEL)), st.integers(0, 2**64 - 1)), max_size=30)
)
def test_rmw_matches_model(dtype, ops):
    mask = _top(dtype)
    a = np.zeros(1, dtype)
    model = 0
    for op, v in ops:
        assert getattr(at, op)(a, 0, v) == model
        model = _MODEL[op](model, v & mask) & mask
        assert int(a[0]) == model


def test_bounds_checked():
    with pytest.raises(IndexError):
        at.load(np.zeros(2, np.uint32), 2)


def test_fence_relax_clock():
    at.fence()
    at.relax()
    t0 = time.monotonic_ns()  # also CLOCK_MONOTONIC on Linux
    t = at.clock_ns()
    assert t0 <= t <= time.monotonic_ns()


def test_lock_try_release():
    w = np.zeros(1, np.uint64)
    me = at.owner_self()
    assert at.lock_try(w, 0, me) == 1 and w[0] == me
    assert at.lock_try(w, 0, me) == 0  # not re-entrant
    at.lock_release(w, 0)
    assert w[0] == 0
    at.lock_acquire(w, 0, me)  # uncontended: immediate
    assert w[0] == me


def test_owner_id_is_tid_and_start_time():
    """The C owner id is the one evtchn.owner computes: (start time << 32) | tid, per
    thread."""
    me = at.owner_self()
    assert me == owner_id() and me & L.OWNER_TID_MASK == threading.get_native_id()
    other = []
    t = threading.Thread(target=lambda: other.append((at.owner_self(), owner_id())))
    t.start()
    t.join()
    assert other[0][0] == other[0][1] != me


def test_owner_liveness():
    """Alive: this thread. Dead: a finished thread, a tid with another start time (a reused
    tid), a tid that does not exist."""
    me = at.owner_self()
    assert not at.owner_dead(me) and owner_alive(me)
    assert at.owner_dead(me + (1 << 32)) and not owner_alive(me + (1 << 32))
    ids = []
    t = threading.Thread(target=lambda: ids.append(at.owner_self()))
    t.start()
    t.join()
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{ids[0] & L.OWNER_TID_MASK}") and time.monotonic() < deadline:
        time.sleep(0.01)  # the thread is joined before its task is gone
    assert at.owner_dead(ids[0]) and not owner_alive(ids[0])
    assert at.owner_dead(L.OWNER_TID_MASK) and not owner_alive(L.OWNER_TID_MASK)


def test_lock_acquire_for_times_out_and_robust_try_takes_a_dead_lock():
    w = np.zeros(1, np.uint64)
    live = at.owner_self()
    w[0] = live + (1 << 32)  # our tid with another start time (a reused tid): dead
    assert at.lock_try_robust(w, 0, live) == 1 and w[0] == live
    assert at.lock_try_robust(w, 0, live + 5) == 0  # live owner: refused
    t0 = time.monotonic()
    assert at.lock_acquire_for(w, 0, live + 5, 50_000_000) == 0  # live owner: timed out
    assert 0.04 <= time.monotonic() - t0 < 30  # upper bound: no hang (a loaded machine stalls)
    assert w[0] == live


def test_futex_wait_times_out():
    a = np.zeros(1, np.uint32)
    t0 = time.monotonic()
    assert at.futex_wait(a, 0, 0, 50_000_000) == errno.ETIMEDOUT
    assert 0.045 <= time.monotonic() - t0 < 30  # upper bound: it timed out at all


def test_futex_wait_returns_at_once_if_value_differs():
    a = np.ones(1, np.uint32)
    t0 = time.monotonic()
    assert at.futex_wait(a, 0, 0, 60_000_000_000) == 0
    assert time.monotonic() - t0 < 30  # not the 60 s timeout


def test_futex_wait_interrupted_by_signal():
    a = np.zeros(1, np.uint32)
    old = signal.signal(signal.SIGALRM, lambda *_: None)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        rc = at.futex_wait(a, 0, 0, 5_000_000_000)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert rc == errno.EINTR


def test_futex_wake_without_waiters():
    assert at.futex_wake(np.zeros(1, np.uint32), 0, 1) == 0


# --- across processes -------------------------------------------------------------------------


@pytest.fixture
def shm():
    """(path, u32 view, u64 view) of a fresh zeroed /dev/shm file, unlinked afterwards."""
    # Named like the package's own segments so that conftest's leak guard covers it too.
    path = f"/dev/shm/evtchn-{os.getpid()}-test-atomics-{uuid.uuid4().hex[:12]}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        try:
            os.ftruncate(fd, SHM_SIZE)
        finally:
            os.close(fd)
        yield (path, *_views(path))
    finally:
        os.unlink(path)


def _views(path):
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, SHM_SIZE)  # MAP_SHARED: every process sees the same pages
    finally:
        os.close(fd)
    return np.frombuffer(mm, np.uint32), np.frombuffer(mm, np.uint64)


@contextlib.contextmanager
def _processes(*specs):
    """Start (target, args) processes; on the way out kill and reap any still running."""
    procs = [CTX.Process(target=target, args=args, daemon=True) for target, args in specs]
    try:
        for p in procs:
            p.start()
        yield procs
    finally:
        for p in procs:
            if p.pid is not None:
                if p.is_alive():
                    p.kill()
                p.join(10)


def _join(procs, timeout=JOIN_TIMEOUT):
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    assert not [p for p in procs if p.is_alive()], "child process hung"
    assert [p.exitcode for p in procs] == [0] * len(procs)


# Children: module-level so that spawn can import them.


def _child_locked_increment(path, n, barrier):
    u32, u64 = _views(path)
    barrier.wait(JOIN_TIMEOUT)  # start together, or they might never contend
    at.locked_increment(u64, LOCK, u64, COUNTER, n, at.owner_self())


def _child_fetch_add(path, n, barrier):
    u32, u64 = _views(path)
    barrier.wait(JOIN_TIMEOUT)
    at.hammer_fetch_add(u64, COUNTER, n)


def _child_hold_lock(path, held):
    _, u64 = _views(path)
    at.lock_acquire(u64, LOCK, at.owner_self())
    held.set()
    time.sleep(3600)  # until SIGKILLed


def _child_acquire_timed(path, waiting):
    u32, u64 = _views(path)
    me = at.owner_self()
    waiting.set()
    t0 = at.clock_ns()
    at.lock_acquire(u64, LOCK, me)
    at.store(u64, RESULT, at.clock_ns() - t0)
    assert at.load(u64, LOCK) == me
    at.lock_release(u64, LOCK)


def _child_futex_wait(path, ready):
    u32, u64 = _views(path)
    ready.set()
    t0 = at.clock_ns()
    at.store(u64, RESULT, at.futex_wait(u32, FUTEX, 0, 20_000_000_000))
    at.store(u64, RESULT + 1, at.clock_ns() - t0)


N_INCREMENTS = 200_000


def test_lock_mutual_exclusion_across_processes(shm):
    path, u32, u64 = shm
    barrier = CTX.Barrier(2)
    with _processes(*[(_child_locked_increment, (path, N_INCREMENTS, barrier))] * 2) as procs:
        _join(procs)
    assert u64[COUNTER] == 2 * N_INCREMENTS
    assert u64[LOCK] == 0


def test_fetch_add_across_processes(shm):
    path, _, u64 = shm
    barrier = CTX.Barrier(2)
    with _processes(*[(_child_fetch_add, (path, N_INCREMENTS, barrier))] * 2) as procs:
        _join(procs)
    assert u64[COUNTER] == 2 * N_INCREMENTS


def test_live_owner_keeps_lock(shm):
    path, u32, u64 = shm
    me = at.owner_self()
    assert at.lock_try(u64, LOCK, me)
    waiting = CTX.Event()
    with _processes((_child_acquire_timed, (path, waiting))) as (waiter,):
        assert waiting.wait(JOIN_TIMEOUT)
        time.sleep(0.3)  # hundreds of liveness checks by the waiter
        assert waiter.is_alive() and u64[LOCK] == me
        at.lock_release(u64, LOCK)
        _join([waiter])
    assert u64[RESULT] >= 250_000_000
    assert u64[LOCK] == 0


def test_dead_owner_lock_is_stolen(shm):
    path, u32, u64 = shm
    held = CTX.Event()
    with _processes((_child_hold_lock, (path, held))) as (owner,):
        assert held.wait(JOIN_TIMEOUT)
        assert int(u64[LOCK]) & L.OWNER_TID_MASK == owner.pid  # its main thread's tid
        owner.kill()
        owner.join(JOIN_TIMEOUT)  # reap it
        assert owner.exitcode == -signal.SIGKILL
    assert int(u64[LOCK]) & L.OWNER_TID_MASK == owner.pid  # the dead process still "holds" it
    with _processes((_child_acquire_timed, (path, CTX.Event()))) as (thief,):
        _join([thief])
    assert u64[RESULT] < 2_000_000_000
    assert u64[LOCK] == 0


def test_futex_wake_across_processes(shm):
    path, u32, u64 = shm
    ready = CTX.Event()
    with _processes((_child_futex_wait, (path, ready))) as (waiter,):
        assert ready.wait(JOIN_TIMEOUT)
        # Wake until somebody was actually asleep on the word: that proves the waiter slept in
        # the kernel on the same futex, seen from another address space.
        deadline = time.monotonic() + JOIN_TIMEOUT
        woken = 0
        while not woken and time.monotonic() < deadline:
            woken = at.futex_wake(u32, FUTEX, 1)
            if not woken:
                time.sleep(0.01)
        _join([waiter])
    assert woken == 1
    assert u64[RESULT] == 0  # woken, not timed out
    assert u64[RESULT + 1] < 20_000_000_000
