"""evtchn._numba_atomics: the atomics' values and effects, and their cross-process behaviour."""

from __future__ import annotations

import errno
import mmap
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest

pytest.importorskip("numba")

from conftest import join_all  # noqa: E402
from numba import njit  # noqa: E402

from evtchn import _numba_atomics as A  # noqa: E402
from evtchn import layout as L  # noqa: E402
from evtchn.owner import owner_id  # noqa: E402

WIDTHS = (8, 16, 32, 64)
MASK = {w: (1 << w) - 1 for w in WIDTHS}
JOIN_TIMEOUT = 120.0  # children compile their kernels on a cold cache first
SENTINEL = 0xA5
OFF = 64  # where the value under test sits in the buffer (aligned)

SPAWN = multiprocessing.get_context("spawn")


# --- helpers ------------------------------------------------------------------------------------


def _buffer():
    buf = np.full(256, SENTINEL, np.uint8)
    return buf, buf.ctypes.data + OFF


def _put(buf, width, value):
    buf[OFF : OFF + width // 8] = np.frombuffer(
        int(value).to_bytes(width // 8, sys.byteorder), np.uint8
    )


def _get(buf, width):
    return int.from_bytes(buf[OFF : OFF + width // 8].tobytes(), sys.byteorder)


def _assert_rest_untouched(buf, width):
    rest = np.concatenate([buf[:OFF], buf[OFF + width // 8 :]])
    assert (rest == SENTINEL).all(), "an atomic wrote outside its operand"


def _op(name, width):
    return getattr(A, f"{name}_u{width}")


def _return_type(dispatcher):
    (sig,) = dispatcher.nopython_signatures
    return str(sig.return_type)


def _jit1(fn):
    @njit
    def k(addr):
        return fn(addr)

    return k


def _jit2(fn):
    @njit
    def k(addr, v):
        return fn(addr, v)

    return k


def _jit3(fn):
    @njit
    def k(addr, a, b):
        return fn(addr, a, b)

    return k


def _new_shm(size=4096):
    path = f"/dev/shm/evtchn-test-numba-atomics-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return path


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:  # never mask the test's own failure
        pass


def _attach(path):
    """Map a /dev/shm file; returns (mmap, uint8 view, base address). Keep the mmap alive."""
    fd = os.open(path, os.O_RDWR)
    try:
        mm = mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    u8 = np.frombuffer(mm, np.uint8)
    return mm, u8, u8.ctypes.data


def _join_all(procs, timeout=JOIN_TIMEOUT):
    join_all(procs, timeout)


def _proc_state(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    return chr(stat[stat.rindex(b")") + 2])


def _wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


# --- loads and stores ---------------------------------------------------------------------------


@pytest.mark.parametrize("width", WIDTHS)
def test_load(width):
    buf, addr = _buffer()
    value = 0x8877665544332211 & MASK[width]
    _put(buf, width, value)
    k = _jit1(_op("load", width))
    assert k(addr) == value
    assert _return_type(k) == f"uint{width}"
    _assert_rest_untouched(buf, width)


@pytest.mark.parametrize("width", WIDTHS)
def test_store(width):
    buf, addr = _buffer()
    store = _jit2(_op("store", width))
    value = 0x0123456789ABCDEF & MASK[width]
    assert store(addr, value) is None
    assert _get(buf, width) == value
    if width < 64:
        store(addr, (1 << width) | 5)  # truncated to the width
        assert _get(buf, width) == 5
    store(addr, -1)  # two's complement, all ones
    assert _get(buf, width) == MASK[width]
    _assert_rest_untouched(buf, width)


def test_load_store_through_array_address():
    a = np.zeros(4, np.uint64)
    base = a.ctypes.data

    @njit
    def k(base):
        A.store_u64(base + 8, np.uint64(0xFFFFFFFFFFFFFFFF))
        A.store_u32(base + 16, 7)
        A.store_u16(base + 20, 9)
        A.store_u8(base + 22, 11)
        return (
            A.load_u64(base + 8),
            A.load_u32(base + 16),
            A.load_u16(base + 20),
            A.load_u8(base + 22),
        )

    assert k(np.uint64(base)) == (2**64 - 1, 7, 9, 11)  # uint64 addresses work too
    assert a[1] == 2**64 - 1
    assert a.view(np.uint32)[4] == 7
    assert a.view(np.uint16)[10] == 9
    assert a.view(np.uint8)[22] == 11


# --- read-modify-write --------------------------------------------------------------------------

RMW = {
    "fetch_or": lambda old, v: old | v,
    "fetch_and": lambda old, v: old & v,
    "fetch_xor": lambda old, v: old ^ v,
    "fetch_add": lambda old, v: old + v,
    "fetch_sub": lambda old, v: old - v,
    "xchg": lambda old, v: v,
}
RMW_CASES = [(0x5A, 0x0F), (0xF0, 0xFF), (0, 1), (1, 2), ("max", 1), (0x80, 0x80)]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", list(RMW))
def test_rmw(name, width):
    fn = _jit2(_op(name, width))
    fn(_buffer()[1], 0)
    assert _return_type(fn) == f"uint{width}"
    for init, v in RMW_CASES:
        init = MASK[width] if init == "max" else init
        buf, addr = _buffer()
        _put(buf, width, init)
        old = fn(addr, v)
        assert old == init, (name, width, init, v)
        assert _get(buf, width) == RMW[name](init, v) & MASK[width], (name, width, init, v)
        _assert_rest_untouched(buf, width)


@pytest.mark.parametrize("width", WIDTHS)
def test_rmw_high_bits(width):
    buf, addr = _buffer()
    top = 1 << (width - 1)
    _put(buf, width, 0)
    assert _jit2(_op("fetch_or", width))(addr, top) == 0
    assert _get(buf, width) == top
    not_top = ~top if width < 64 else MASK[64] ^ top  # < 64: a negative int mask
    assert _jit2(_op("fetch_and", width))(addr, not_top) == top
    assert _get(buf, width) == 0
    assert _jit2(_op("fetch_sub", width))(addr, 1) == 0  # wraps
    assert _get(buf, width) == MASK[width]
    assert _jit2(_op("fetch_add", width))(addr, 1) == MASK[width]
    assert _get(buf, width) == 0
    _assert_rest_untouched(buf, width)


@pytest.mark.parametrize("width", WIDTHS)
def test_cas(width):
    cas = _jit3(_op("cas", width))
    buf, addr = _buffer()
    a, b = 0x1122334455667788 & MASK[width], MASK[width]
    _put(buf, width, a)
    assert cas(addr, b, 3) == a  # mismatch: returns what it saw, no write
    assert _get(buf, width) == a
    assert cas(addr, a, b) == a  # match: returns expected, writes desired
    assert _get(buf, width) == b
    assert cas(addr, -1, 0) == b  # -1 is all ones at every width
    assert _get(buf, width) == 0
    _assert_rest_untouched(buf, width)


def test_fence_and_cpu_relax():
    @njit
    def k(addr):
        A.store_u32(addr, 1)
        A.fence()
        for _ in range(1000):
            A.cpu_relax()
        return A.load_u32(addr)

    buf, addr = _buffer()
    assert k(addr) == 1


def test_non_integer_address_is_a_typing_error():
    from numba.core.errors import TypingError

    @njit
    def k(x):
        return A.load_u32(x)

    with pytest.raises(TypingError):
        k(1.5)


# --- syscalls -----------------------------------------------------------------------------------


@njit
def _sys_basics(pid):
    return (A.getpid(), A.sched_yield(), A.kill(pid, 0), A.get_errno(), A.monotonic_ns())


def test_getpid_yield_monotonic():
    before = time.monotonic_ns()
    pid, yielded, _, _, now = _sys_basics(os.getpid())
    after = time.monotonic_ns()
    assert pid == os.getpid()
    assert yielded == 0
    assert before <= now <= after


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_kill_and_errno():
    assert _sys_basics(os.getpid())[2] == 0
    _, _, rc, err, _ = _sys_basics(_dead_pid())
    assert (rc, err) == (-1, errno.ESRCH)


def test_pid_alive():
    assert A.pid_alive(os.getpid())
    assert A.pid_alive(1)  # init: exists (EPERM counts as alive)
    assert not A.pid_alive(_dead_pid())
    assert not A.pid_alive(0)  # process groups are never "alive owners"
    assert not A.pid_alive(-5)
    assert not A.pid_alive(2**32 - 1)


def test_pid_alive_sees_through_zombies():
    child = subprocess.Popen(["true"])
    try:
        _wait_for(lambda: _proc_state(child.pid) == "Z", 10, "the child to become a zombie")
        os.kill(child.pid, 0)  # kill(pid, 0) still succeeds on a zombie...
        assert not A.pid_alive(child.pid)  # ...but it is not alive
    finally:
        child.wait()


@njit
def _futex_wait_timed(addr, expected, timeout_ns):
    t0 = A.monotonic_ns()
    rc = A.futex_wait(addr, expected, timeout_ns)
    return rc, A.monotonic_ns() - t0


def test_futex_wait_times_out_and_checks_value():
    buf, addr = _buffer()
    _put(buf, 32, 7)
    rc, elapsed = _futex_wait_timed(addr, 7, 50_000_000)
    assert rc == -errno.ETIMEDOUT
    assert 45_000_000 <= elapsed < 2_000_000_000
    rc, elapsed = _futex_wait_timed(addr, 8, 5_000_000_000)  # value differs: no sleep
    assert rc == -errno.EAGAIN
    assert elapsed < 1_000_000_000
    rc, elapsed = _futex_wait_timed(addr, 7, 1_100_000_000)  # tv_sec = 1, tv_nsec = 1e8
    assert rc == -errno.ETIMEDOUT
    assert 1_050_000_000 <= elapsed < 3_000_000_000
    assert _jit2(A.futex_wake)(addr, 1) == 0  # nobody waiting


# --- cross-process ------------------------------------------------------------------------------
# Layout of the shared page used below (byte offsets).
C_LOCK, C_LOCKED_COUNT, C_ATOMIC_COUNT, C_READY = 0, 8, 12, 16  # the lock is a u64
C_FLAG, C_WORD, C_RESULT, C_ELAPSED, C_STOLEN = 64, 68, 128, 136, 144
N_ITER = 200_000


@njit(cache=True)
def _counter_kernel(base, u32, n, me, nprocs):
    # Start together so the two processes really contend.
    A.fetch_add_u32(base + C_READY, 1)
    t0 = A.monotonic_ns()
    while A.load_u32(base + C_READY) < nprocs:
        A.cpu_relax()
        if A.monotonic_ns() - t0 > 30_000_000_000:
            return -1
    for _ in range(n):
        A.lock_acquire(base + C_LOCK, me)
        u32[C_LOCKED_COUNT // 4] += 1  # plain read-modify-write, guarded by the lock
        A.lock_release(base + C_LOCK)
        A.fetch_add_u32(base + C_ATOMIC_COUNT, 1)
    return 0


def _counter_child(path, n, nprocs):
    mm, u8, base = _attach(path)
    u32 = u8.view(np.uint32)
    if _counter_kernel(base, u32, n, owner_id(), nprocs) != 0:
        sys.exit(3)


def test_lock_and_fetch_add_across_processes():
    path = _new_shm()
    try:
        mm, u8, base = _attach(path)
        u32 = u8.view(np.uint32)
        procs = [
            SPAWN.Process(target=_counter_child, args=(path, N_ITER, 2), name=f"counter{i}")
            for i in range(2)
        ]
        for p in procs:
            p.start()
        _join_all(procs)
        assert u32[C_READY // 4] == 2
        assert u32[C_LOCKED_COUNT // 4] == 2 * N_ITER
        assert u32[C_ATOMIC_COUNT // 4] == 2 * N_ITER
        assert u8[C_LOCK : C_LOCK + 8].view(np.uint64)[0] == 0
    finally:
        _unlink(path)


def test_lock_try_and_release():
    buf, addr = _buffer()
    _put(buf, 64, 0)
    try_ = _jit2(A.lock_try)
    big = (1234 << 32) | 77  # a u64 owner id: the high half counts too
    assert try_(addr, big)
    assert _get(buf, 64) == big
    assert not try_(addr, 99)  # held: fails, word unchanged
    assert _get(buf, 64) == big
    _jit1(A.lock_release)(addr)
    assert _get(buf, 64) == 0
    me = owner_id()
    assert A.lock_acquire(addr, me) == 0  # free: taken at once, nothing stolen
    assert _get(buf, 64) == me
    A.lock_release(addr)
    _assert_rest_untouched(buf, 64)


def test_owner_alive_and_robust_lock():
    """Alive: this thread. Dead: our tid with another start time (a reused tid), a tid that
    does not exist. lock_try_robust takes a dead owner's lock, lock_acquire_for times out
    against a live one."""
    me = owner_id()
    assert A.owner_alive(me)
    assert not A.owner_alive(me + (1 << 32))
    assert not A.owner_alive(L.OWNER_TID_MASK)
    buf, addr = _buffer()
    _put(buf, 64, me + (1 << 32))
    assert A.lock_try_robust(addr, me) and _get(buf, 64) == me
    assert not A.lock_try_robust(addr, me + 5)
    assert A.lock_acquire_for(addr, me + 5, 30_000_000) == -1
    assert _get(buf, 64) == me
    _assert_rest_untouched(buf, 64)


@njit(cache=True)
def _hold_lock(base, me):
    A.lock_acquire(base + C_LOCK, me)
    A.store_u32(base + C_FLAG, 1)


def _holder_child(path):
    mm, u8, base = _attach(path)
    _hold_lock(base, owner_id())
    time.sleep(600)  # killed long before


@njit(cache=True)
def _steal_lock(base, me):
    A.store_u32(base + C_READY, 1)
    stolen = A.lock_acquire(base + C_LOCK, me)
    A.store_u64(base + C_ELAPSED, A.monotonic_ns())  # when it got the lock
    A.store_u64(base + C_STOLEN, stolen)
    A.store_u32(base + C_RESULT, 1)


def _stealer_child(path):
    mm, u8, base = _attach(path)
    _steal_lock(base, owner_id())


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_lock_of_killed_holder_is_stolen(reaped):
    path = _new_shm()
    holder = stealer = None
    try:
        mm, u8, base = _attach(path)
        u32, u64 = u8.view(np.uint32), u8.view(np.uint64)
        holder = SPAWN.Process(target=_holder_child, args=(path,), name="holder")
        holder.start()
        _wait_for(
            lambda: u32[C_FLAG // 4] == 1 or not holder.is_alive(),
            JOIN_TIMEOUT,
            "the holder to take the lock",
        )
        assert u64[C_LOCK // 8] & L.OWNER_TID_MASK == holder.pid  # its main thread's tid
        held_by = int(u64[C_LOCK // 8])
        # Started while the holder lives (Process.start() reaps finished children, which would
        # turn the zombie case into the reaped one); it waits in lock_acquire.
        stealer = SPAWN.Process(target=_stealer_child, args=(path,), name="stealer")
        stealer.start()
        _wait_for(
            lambda: u32[C_READY // 4] == 1 or not stealer.is_alive(),
            JOIN_TIMEOUT,
            "the stealer to start waiting",
        )
        time.sleep(0.05)
        assert u32[C_RESULT // 4] == 0 and u64[C_LOCK // 8] == held_by
        os.kill(holder.pid, signal.SIGKILL)
        killed_at = time.monotonic_ns()  # CLOCK_MONOTONIC, as monotonic_ns() in njit
        if reaped:
            holder.join(10)
        _join_all([stealer], timeout=10)
        if not reaped:  # dead but unreaped: kill(pid, 0) succeeds
            assert _proc_state(holder.pid) == "Z"
        assert u32[C_RESULT // 4] == 1
        assert u64[C_LOCK // 8] & L.OWNER_TID_MASK == stealer.pid
        assert u64[C_STOLEN // 8] == held_by
        took = int(u64[C_ELAPSED // 8]) - killed_at
        assert took < 2_000_000_000, f"the steal took {took} ns"
    finally:
        for p in (holder, stealer):
            if p is not None and p.is_alive():
                p.kill()
            if p is not None:
                p.join(10)
        _unlink(path)


@njit(cache=True)
def _spin_until_set(base):
    A.store_u32(base + C_FLAG, 1)
    n = 0
    while A.load_u32(base + C_WORD) == 0:  # must reload every time: not hoisted
        A.cpu_relax()
        n += 1
    A.store_u32(base + C_RESULT, 1)
    return n


def _spinner_child(path):
    mm, u8, base = _attach(path)
    _spin_until_set(base)


def test_spin_loop_sees_store_from_other_process():
    path = _new_shm()
    p = None
    try:
        mm, u8, base = _attach(path)
        u32 = u8.view(np.uint32)
        p = SPAWN.Process(target=_spinner_child, args=(path,), name="spinner")
        p.start()
        _wait_for(
            lambda: u32[C_FLAG // 4] == 1 or not p.is_alive(), JOIN_TIMEOUT, "the spinner to start"
        )
        time.sleep(0.05)  # let it spin for a while
        assert u32[C_RESULT // 4] == 0
        _jit2(A.store_u32)(base + C_WORD, 1)
        _join_all([p], timeout=10)
        assert u32[C_RESULT // 4] == 1
    finally:
        if p is not None and p.is_alive():
            p.kill()
            p.join(10)
        _unlink(path)


@njit(cache=True)
def _futex_waiter(base):
    A.store_u32(base + C_FLAG, 1)
    t0 = A.monotonic_ns()
    rc = A.futex_wait(base + C_WORD, 0, 20_000_000_000)
    A.store_u64(base + C_ELAPSED, A.monotonic_ns() - t0)
    A.store_u64(base + C_RESULT, rc)


def _futex_child(path):
    mm, u8, base = _attach(path)
    u8[C_RESULT : C_RESULT + 8] = 0xFF  # "no result yet"
    _futex_waiter(base)


def test_futex_wake_from_other_process():
    path = _new_shm()
    p = None
    try:
        mm, u8, base = _attach(path)
        u32, i64 = u8.view(np.uint32), u8.view(np.int64)
        p = SPAWN.Process(target=_futex_child, args=(path,), name="futex-waiter")
        p.start()
        _wait_for(
            lambda: u32[C_FLAG // 4] == 1 or not p.is_alive(), JOIN_TIMEOUT, "the waiter to start"
        )
        # After the flag the waiter's only way to sleep is the futex.
        _wait_for(lambda: _proc_state(p.pid) in ("S", None), 10, "the waiter to block")
        time.sleep(0.05)
        assert i64[C_RESULT // 8] == -1  # still waiting
        _jit2(A.store_u32)(base + C_WORD, 1)
        woken = _jit2(A.futex_wake)(base + C_WORD, 1)
        _join_all([p], timeout=10)
        assert woken == 1  # a shared futex: the other process's waiter
        assert i64[C_RESULT // 8] == 0  # woken, not timed out nor value-mismatched
        assert i64[C_ELAPSED // 8] < 10_000_000_000
    finally:
        if p is not None and p.is_alive():
            p.kill()
            p.join(10)
        _unlink(path)


# --- caching ------------------------------------------------------------------------------------

CACHE_KERNEL = textwrap.dedent("""
    import sys, time
    import numpy as np
    from numba import njit
    from evtchn._numba_atomics import (cas_u32, fetch_add_u64, futex_wake, load_u32,
                                       lock_acquire, lock_release, monotonic_ns, cpu_relax)

    @njit(cache=True)
    def kernel(base, me):
        lock_acquire(base, me)
        fetch_add_u64(base + 8, 5)
        cas_u32(base + 16, 0, 9)
        cpu_relax()
        lock_release(base)
        futex_wake(base + 16, 1)
        return load_u32(base + 16) + monotonic_ns() * 0

    a = np.zeros(4, np.uint64)
    t0 = time.perf_counter()
    r = kernel(a.ctypes.data, 1)
    t1 = time.perf_counter()
    assert r == 9 and a[1] == 5, (r, a)
    print(len(kernel.stats.cache_hits), len(kernel.stats.cache_misses), t1 - t0)
""")


def test_callers_cache_with_intrinsics(tmp_path):
    (tmp_path / "kern.py").write_text(CACHE_KERNEL)
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(A.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    env.pop("NUMBA_CACHE_DIR", None)
    env.pop("NUMBA_DISABLE_JIT", None)

    def run():
        out = subprocess.run(
            [sys.executable, "kern.py"],
            cwd=tmp_path,
            env=env,
            timeout=300,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        hits, misses, _ = out.stdout.split()
        return int(hits), int(misses)

    assert run() == (0, 1)  # compiled and written
    assert run() == (1, 0)  # a second process loads it: no recompile
