"""CPU atomics, a robust process-shared spinlock and a few syscalls for Numba ``@njit`` code.

Numba has no CPU atomics of its own, so these are ``numba.extending.intrinsic``\\ s that emit the
LLVM instructions directly (``load atomic``, ``store atomic``, ``atomicrmw``, ``cmpxchg``,
``fence``; ``pause`` through the ``llvm.x86.sse2.pause`` intrinsic, as Numba's JIT cannot take
inline asm). Every operation takes a RAW ADDRESS -- any integer, typically ``seg.address +
byte_offset`` or ``arr.ctypes.data + byte_offset`` -- so a kernel can reach any byte of a
shared-memory segment without one array view per width. The caller keeps the memory
mapped and the address naturally aligned (2/4/8 bytes for u16/u32/u64); a misaligned atomic is
undefined behaviour (on x86 it is a split lock: slow, and not atomic across cache lines).

Operations and their results (the ``uN`` functions return numba ``uintN``; mind that numba
promotes ``uint64 (op) int64`` to float64, so cast with ``np.uint64(...)``/``np.int64(...)``)::

    load_u8/16/32/64(addr)                   seq_cst atomic load (never hoisted out of a loop)
    store_u8/16/32/64(addr, val)             seq_cst atomic store (xchg on x86: a full barrier)
    fetch_{or,and,xor,add,sub}_u8/16/32/64(addr, val)   atomicrmw seq_cst -> the OLD value
    xchg_u8/16/32/64(addr, val)              atomicrmw xchg seq_cst -> the OLD value
    cas_u8/16/32/64(addr, expected, desired) cmpxchg seq_cst -> the OLD value seen
                                             (the swap happened iff old == expected)
    fence()                                  seq_cst fence
    cpu_relax()                              x86 ``pause`` / arm64 ``yield`` / nothing elsewhere

Syscalls (libc functions declared in the LLVM module; libc is linked into the process)::

    getpid() -> int64            sched_yield() -> int64 (0)       get_errno() -> int64
    kill(pid, sig) -> int64      0, or -1 with errno set (read it with get_errno())
    pid_alive(pid) -> bool       process exists and is not a zombie (kill(pid, 0) + /proc)
    monotonic_ns() -> int64      clock_gettime(CLOCK_MONOTONIC)
    futex_wait(addr, expected, timeout_ns) -> int64
        FUTEX_WAIT on a SHARED (non-private) futex, relative timeout (< 0: wait forever);
        0 when woken (or spuriously), -EAGAIN if *addr != expected on entry,
        -ETIMEDOUT, -EINTR (a signal arrived)
    futex_wake(addr, n) -> int64 number of waiters woken, or -errno

Lock owners (evtchn/layout.py, "Lock words"): one id per thread, ``(start << 32) | tid`` with
the thread's start time from /proc/<tid>/stat (evtchn.owner.owner_id computes it; pass it in)::

    owner_alive(owner) -> bool           the thread exists, is not a zombie, and has that start
                                         time (a reused tid is another owner)

Robust process-shared spinlock on a u64 word holding the owner id (0 = free)::

    lock_try(addr, me) -> bool
    lock_try_robust(addr, me) -> bool    also takes the lock over from a dead owner
    lock_acquire(addr, me) -> int64      0, or the id of a dead owner the lock was taken from
    lock_acquire_for(addr, me, slice_ns) -> int64   as lock_acquire, or -1 once slice_ns passed
    lock_release(addr)                   release store of 0

``lock_acquire`` spins ``LOCK_SPINS`` times with ``cpu_relax`` between looks at the word, then
``sched_yield``\\ s once per look, and every ``LOCK_YIELDS_PER_CHECK`` yields asks whether the
owner is alive (evtchn.layout's spin policy, the Cython kernels' too); a dead owner is replaced
by CAS (owner -> me), so of several waiters exactly one takes it over. The lock is not
recursive, ``me`` must be non-zero, and owner ids are only meaningful inside one pid
namespace. Bit 31 of the word (layout.CHANNEL_LOCK_READER) is part of the owner value.

All of these work inside ``@njit(cache=True)`` functions. Numba's cache does not track
dependencies: a caller's cache entry keeps the code of these functions as they were when it was
compiled, and is invalidated only when the caller's own source file changes.

Linux only (futex, /proc, glibc/musl ``__errno_location``); futex syscall numbers are known for
x86_64, aarch64, riscv64 and ppc64le.
"""

from __future__ import annotations

import errno as _errno
import platform as _platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from . import layout as _L
from ._numba_cache import HERE as _HERE
from ._numba_cache import refresh_cache_guard as _refresh_cache_guard

__all__ = [
    "load_u8",
    "load_u16",
    "load_u32",
    "load_u64",
    "store_u8",
    "store_u16",
    "store_u32",
    "store_u64",
    "fetch_or_u8",
    "fetch_or_u16",
    "fetch_or_u32",
    "fetch_or_u64",
    "fetch_and_u8",
    "fetch_and_u16",
    "fetch_and_u32",
    "fetch_and_u64",
    "fetch_xor_u8",
    "fetch_xor_u16",
    "fetch_xor_u32",
    "fetch_xor_u64",
    "fetch_add_u8",
    "fetch_add_u16",
    "fetch_add_u32",
    "fetch_add_u64",
    "fetch_sub_u8",
    "fetch_sub_u16",
    "fetch_sub_u32",
    "fetch_sub_u64",
    "xchg_u8",
    "xchg_u16",
    "xchg_u32",
    "xchg_u64",
    "cas_u8",
    "cas_u16",
    "cas_u32",
    "cas_u64",
    "fence",
    "cpu_relax",
    "getpid",
    "sched_yield",
    "kill",
    "get_errno",
    "pid_alive",
    "owner_alive",
    "monotonic_ns",
    "futex_wait",
    "futex_wake",
    "lock_try",
    "lock_try_robust",
    "lock_acquire",
    "lock_acquire_for",
    "lock_release",
    "LOCK_SPINS",
    "LOCK_YIELDS_PER_CHECK",
]

_MACHINE = _platform.machine().lower()
_FUTEX_NR = {
    "x86_64": 202,
    "amd64": 202,
    "aarch64": 98,
    "arm64": 98,
    "riscv64": 98,
    "ppc64le": 221,
    "ppc64": 221,
}.get(_MACHINE)
FUTEX_WAIT, FUTEX_WAKE = 0, 1  # no FUTEX_PRIVATE_FLAG: the futexes are shared
CLOCK_MONOTONIC = 1

_UTYPES = {8: types.uint8, 16: types.uint16, 32: types.uint32, 64: types.uint64}
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_SEQ_CST = "seq_cst"


def _named(name, doc):
    """Give a typer function its public name before ``intrinsic`` copies it (repr, errors)."""

    def deco(fn):
        fn.__name__ = fn.__qualname__ = name
        fn.__doc__ = doc
        return intrinsic(fn)

    return deco


def _check_ints(name, **tys):
    for what, ty in tys.items():
        if not isinstance(ty, types.Integer):
            raise TypingError(f"{name}: {what} must be an integer, got {ty}")


def _addr_ptr(context, builder, ty, val, width):
    """Integer address -> ``iN*``."""
    addr = context.cast(builder, val, ty, types.uintp)
    return builder.inttoptr(addr, ir.IntType(width).as_pointer())


def _libc(builder, name, ret, args, var_arg=False):
    fnty = ir.FunctionType(ret, args, var_arg=var_arg)
    return cgutils.get_or_insert_function(builder.module, fnty, name)


def _load_errno(builder):
    loc = _libc(builder, "__errno_location", _I32.as_pointer(), [])
    return builder.load(builder.call(loc, []))


# --- loads and stores --------------------------------------------------------------------------


def _make_load(width):
    name = f"load_u{width}"
    ret = _UTYPES[width]

    @_named(name, f"{name}(addr) -> uint{width}: seq_cst atomic load of the u{width} at addr.")
    def load(typingctx, addr):
        _check_ints(name, addr=addr)

        def codegen(context, builder, sig, args):
            ptr = _addr_ptr(context, builder, sig.args[0], args[0], width)
            return builder.load_atomic(ptr, _SEQ_CST, width // 8)

        return ret(addr), codegen

    return load


def _make_store(width, ordering, name):
    @_named(name, f"{name}(addr, val): {ordering} atomic store of val (truncated to u{width}).")
    def store(typingctx, addr, val):
        _check_ints(name, addr=addr, val=val)

        def codegen(context, builder, sig, args):
            ptr = _addr_ptr(context, builder, sig.args[0], args[0], width)
            v = context.cast(builder, args[1], sig.args[1], _UTYPES[width])
            builder.store_atomic(v, ptr, ordering, width // 8)
            return context.get_dummy_value()

        return types.none(addr, val), codegen

    return store


load_u8, load_u16, load_u32, load_u64 = (_make_load(w) for w in (8, 16, 32, 64))
store_u8, store_u16, store_u32, store_u64 = (
    _make_store(w, _SEQ_CST, f"store_u{w}") for w in (8, 16, 32, 64)
)
_store_release_u32 = _make_store(32, "release", "_store_release_u32")
_store_release_u64 = _make_store(64, "release", "_store_release_u64")


# --- read-modify-write -------------------------------------------------------------------------


def _make_rmw(op, llvm_op, width):
    name = f"{op}_u{width}"
    ret = _UTYPES[width]

    @_named(
        name,
        f"{name}(addr, val) -> uint{width}: atomicrmw {llvm_op} seq_cst; returns the old value.",
    )
    def rmw(typingctx, addr, val):
        _check_ints(name, addr=addr, val=val)

        def codegen(context, builder, sig, args):
            ptr = _addr_ptr(context, builder, sig.args[0], args[0], width)
            v = context.cast(builder, args[1], sig.args[1], ret)
            return builder.atomic_rmw(llvm_op, ptr, v, _SEQ_CST)

        return ret(addr, val), codegen

    return rmw


def _make_cas(width):
    name = f"cas_u{width}"
    ret = _UTYPES[width]

    @_named(
        name,
        f"{name}(addr, expected, desired) -> uint{width}: cmpxchg seq_cst; returns "
        "the old value (the swap happened iff old == expected).",
    )
    def cas(typingctx, addr, expected, desired):
        _check_ints(name, addr=addr, expected=expected, desired=desired)

        def codegen(context, builder, sig, args):
            ptr = _addr_ptr(context, builder, sig.args[0], args[0], width)
            exp = context.cast(builder, args[1], sig.args[1], ret)
            des = context.cast(builder, args[2], sig.args[2], ret)
            pair = builder.cmpxchg(ptr, exp, des, _SEQ_CST, _SEQ_CST)
            return builder.extract_value(pair, 0)

        return ret(addr, expected, desired), codegen

    return cas


fetch_or_u8, fetch_or_u16, fetch_or_u32, fetch_or_u64 = (
    _make_rmw("fetch_or", "or", w) for w in (8, 16, 32, 64)
)
fetch_and_u8, fetch_and_u16, fetch_and_u32, fetch_and_u64 = (
    _make_rmw("fetch_and", "and", w) for w in (8, 16, 32, 64)
)
fetch_xor_u8, fetch_xor_u16, fetch_xor_u32, fetch_xor_u64 = (
    _make_rmw("fetch_xor", "xor", w) for w in (8, 16, 32, 64)
)
fetch_add_u8, fetch_add_u16, fetch_add_u32, fetch_add_u64 = (
    _make_rmw("fetch_add", "add", w) for w in (8, 16, 32, 64)
)
fetch_sub_u8, fetch_sub_u16, fetch_sub_u32, fetch_sub_u64 = (
    _make_rmw("fetch_sub", "sub", w) for w in (8, 16, 32, 64)
)
xchg_u8, xchg_u16, xchg_u32, xchg_u64 = (_make_rmw("xchg", "xchg", w) for w in (8, 16, 32, 64))
cas_u8, cas_u16, cas_u32, cas_u64 = (_make_cas(w) for w in (8, 16, 32, 64))


# --- barriers ----------------------------------------------------------------------------------


@_named("fence", "fence(): seq_cst memory fence (mfence on x86).")
def fence(typingctx):
    def codegen(context, builder, sig, args):
        builder.fence(_SEQ_CST)
        return context.get_dummy_value()

    return types.none(), codegen


# LLVM's target intrinsics rather than inline asm: Numba's JIT has no asm parser initialised
# ("Inline asm not supported by this streamer"), and both are marked as having side effects.
if _MACHINE in ("x86_64", "amd64", "i386", "i686", "x86"):
    _RELAX = ("llvm.x86.sse2.pause", [])  # pause
elif _MACHINE in ("aarch64", "arm64"):
    _RELAX = ("llvm.aarch64.hint", [ir.Constant(_I32, 1)])  # yield
else:
    _RELAX = None


@_named("cpu_relax", "cpu_relax(): spin-wait hint (x86 pause, arm64 yield, else nothing).")
def cpu_relax(typingctx):
    def codegen(context, builder, sig, args):
        if _RELAX is not None:
            name, hint_args = _RELAX
            fnty = ir.FunctionType(ir.VoidType(), [a.type for a in hint_args])
            builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), hint_args)
        return context.get_dummy_value()

    return types.none(), codegen


# --- syscalls ----------------------------------------------------------------------------------


@_named("getpid", "getpid() -> int64")
def getpid(typingctx):
    def codegen(context, builder, sig, args):
        return builder.sext(builder.call(_libc(builder, "getpid", _I32, []), []), _I64)

    return types.int64(), codegen


@_named("sched_yield", "sched_yield() -> int64 (0)")
def sched_yield(typingctx):
    def codegen(context, builder, sig, args):
        return builder.sext(builder.call(_libc(builder, "sched_yield", _I32, []), []), _I64)

    return types.int64(), codegen


@_named("kill", "kill(pid, sig) -> int64: 0, or -1 with errno set (see get_errno).")
def kill(typingctx, pid, sig):
    _check_ints("kill", pid=pid, sig=sig)

    def codegen(context, builder, signature, args):
        p = context.cast(builder, args[0], signature.args[0], types.int32)
        s = context.cast(builder, args[1], signature.args[1], types.int32)
        fn = _libc(builder, "kill", _I32, [_I32, _I32])
        return builder.sext(builder.call(fn, [p, s]), _I64)

    return types.int64(pid, sig), codegen


@_named("get_errno", "get_errno() -> int64: this thread's errno.")
def get_errno(typingctx):
    def codegen(context, builder, sig, args):
        return builder.sext(_load_errno(builder), _I64)

    return types.int64(), codegen


def _timespec(builder):
    """An entry-block ``i64[2]`` (struct timespec on LP64) and pointers to its two fields."""
    ts = cgutils.alloca_once(builder, _I64, size=2, name="timespec")
    return ts, ts, builder.gep(ts, [ir.Constant(_I64, 1)])


@_named("monotonic_ns", "monotonic_ns() -> int64: clock_gettime(CLOCK_MONOTONIC) in ns.")
def monotonic_ns(typingctx):
    def codegen(context, builder, sig, args):
        ts, sec_p, nsec_p = _timespec(builder)
        fn = _libc(builder, "clock_gettime", _I32, [_I32, _I64.as_pointer()])
        builder.call(fn, [ir.Constant(_I32, CLOCK_MONOTONIC), ts])
        sec = builder.load(sec_p)
        nsec = builder.load(nsec_p)
        return builder.add(builder.mul(sec, ir.Constant(_I64, 1_000_000_000)), nsec)

    return types.int64(), codegen


def _syscall(builder, args):
    """``long syscall(long nr, ...)`` with i64 arguments; returns the result or -errno."""
    fn = _libc(builder, "syscall", _I64, [_I64], var_arg=True)
    res = builder.call(fn, [ir.Constant(_I64, _FUTEX_NR)] + args)
    neg_errno = builder.neg(builder.sext(_load_errno(builder), _I64))
    return builder.select(builder.icmp_signed("==", res, ir.Constant(_I64, -1)), neg_errno, res)


def _check_futex(name):
    if _FUTEX_NR is None:
        raise TypingError(f"{name}: futex syscall number unknown on {_MACHINE!r}")


@_named(
    "futex_wait",
    "futex_wait(addr, expected, timeout_ns) -> int64: shared FUTEX_WAIT; "
    "0, -EAGAIN, -ETIMEDOUT or -EINTR. timeout_ns < 0 waits forever.",
)
def futex_wait(typingctx, addr, expected, timeout_ns):
    _check_ints("futex_wait", addr=addr, expected=expected, timeout_ns=timeout_ns)
    _check_futex("futex_wait")

    def codegen(context, builder, sig, args):
        uaddr = context.cast(builder, args[0], sig.args[0], types.uint64)
        val = builder.zext(context.cast(builder, args[1], sig.args[1], types.uint32), _I64)
        tmo = context.cast(builder, args[2], sig.args[2], types.int64)
        ts, sec_p, nsec_p = _timespec(builder)
        billion = ir.Constant(_I64, 1_000_000_000)
        builder.store(builder.sdiv(tmo, billion), sec_p)
        builder.store(builder.srem(tmo, billion), nsec_p)
        forever = builder.icmp_signed("<", tmo, ir.Constant(_I64, 0))
        ts_arg = builder.select(forever, ir.Constant(_I64, 0), builder.ptrtoint(ts, _I64))
        zero = ir.Constant(_I64, 0)
        return _syscall(builder, [uaddr, ir.Constant(_I64, FUTEX_WAIT), val, ts_arg, zero, zero])

    return types.int64(addr, expected, timeout_ns), codegen


@_named(
    "futex_wake",
    "futex_wake(addr, n) -> int64: shared FUTEX_WAKE of up to n waiters; "
    "the number woken, or -errno.",
)
def futex_wake(typingctx, addr, n):
    _check_ints("futex_wake", addr=addr, n=n)
    _check_futex("futex_wake")

    def codegen(context, builder, sig, args):
        uaddr = context.cast(builder, args[0], sig.args[0], types.uint64)
        cnt = builder.zext(context.cast(builder, args[1], sig.args[1], types.uint32), _I64)
        zero = ir.Constant(_I64, 0)
        return _syscall(builder, [uaddr, ir.Constant(_I64, FUTEX_WAKE), cnt, zero, zero, zero])

    return types.int64(addr, n), codegen


# /proc/<pid>/stat, to tell a zombie (dead but not yet reaped: kill(pid, 0) still succeeds)
# from a live process.


@_named("_open_rdonly", "_open_rdonly(path_addr) -> int64: open(path, O_RDONLY|O_CLOEXEC)")
def _open_rdonly(typingctx, path):
    def codegen(context, builder, sig, args):
        p = _addr_ptr(context, builder, sig.args[0], args[0], 8)
        fn = _libc(builder, "open", _I32, [ir.IntType(8).as_pointer(), _I32], var_arg=True)
        flags = ir.Constant(_I32, 0o2000000)  # O_RDONLY | O_CLOEXEC (Linux)
        return builder.sext(builder.call(fn, [p, flags]), _I64)

    return types.int64(path), codegen


@_named("_read", "_read(fd, buf_addr, n) -> int64")
def _read(typingctx, fd, buf, n):
    def codegen(context, builder, sig, args):
        f = context.cast(builder, args[0], sig.args[0], types.int32)
        b = _addr_ptr(context, builder, sig.args[1], args[1], 8)
        c = context.cast(builder, args[2], sig.args[2], types.int64)
        fn = _libc(builder, "read", _I64, [_I32, ir.IntType(8).as_pointer(), _I64])
        return builder.call(fn, [f, b, c])

    return types.int64(fd, buf, n), codegen


@_named("_close", "_close(fd) -> int64")
def _close(typingctx, fd):
    def codegen(context, builder, sig, args):
        f = context.cast(builder, args[0], sig.args[0], types.int32)
        return builder.sext(builder.call(_libc(builder, "close", _I32, [_I32]), [f]), _I64)

    return types.int64(fd), codegen


_EPERM = _errno.EPERM
_GONE = (_errno.ENOENT, _errno.ESRCH)
_PROC_PREFIX = np.frombuffer(b"/proc/", np.uint8).copy()
_STAT_SUFFIX = np.frombuffer(b"/stat\0", np.uint8).copy()
_TID_MASK = _L.OWNER_TID_MASK
_START_MASK = _L.OWNER_START_MASK


@njit(cache=True)
def _proc_stat(tid):
    """/proc/<tid>/stat -> (1, state letter, start time in ticks); (-1, 0, 0) when the task is
    gone (ENOENT/ESRCH); (0, 0, 0) when it could not be read otherwise (then nobody is
    declared dead: running out of file descriptors must not make a live owner's lock
    stealable). Fields after the last ')' (comm may hold any character): state is field 3,
    the start time field 22."""
    path = np.zeros(32, np.uint8)
    n = 0
    for c in _PROC_PREFIX:
        path[n] = c
        n += 1
    digits = np.zeros(12, np.uint8)
    nd = 0
    p = tid
    while True:
        digits[nd] = 48 + p % 10
        nd += 1
        p //= 10
        if p == 0:
            break
    for i in range(nd - 1, -1, -1):
        path[n] = digits[i]
        n += 1
    for c in _STAT_SUFFIX:
        path[n] = c
        n += 1
    fd = _open_rdonly(path.ctypes.data)
    if fd < 0:
        err = get_errno()
        return (np.int64(-1) if err == _GONE[0] or err == _GONE[1] else np.int64(0)), 0, 0
    buf = np.zeros(512, np.uint8)
    got = _read(fd, buf.ctypes.data, 511)
    err = get_errno()
    _close(fd)
    if got < 0 and err == _GONE[1]:  # exited between open and read
        return np.int64(-1), 0, 0
    close_paren = -1
    for i in range(got):
        if buf[i] == 41:  # ')'
            close_paren = i
    if close_paren < 0 or close_paren + 2 >= got:
        return np.int64(0), 0, 0
    i = close_paren + 2
    state = np.int64(buf[i])
    field = 3
    while field < 22 and i < got:
        if buf[i] == 32:  # ' '
            field += 1
        i += 1
    start = np.int64(0)
    while i < got and 48 <= buf[i] <= 57:
        start = start * 10 + np.int64(buf[i] - 48)
        i += 1
    if field < 22:
        return np.int64(0), 0, 0
    return np.int64(1), state, start


@njit(cache=True)
def _proc_state(pid):
    """The state letter of /proc/<pid>/stat (ord('Z') for a zombie), or 0 if unreadable."""
    r, state, _ = _proc_stat(pid)
    return state if r > 0 else np.int64(0)


@njit(cache=True)
def pid_alive(pid):
    """True if process ``pid`` exists (even if owned by another user) and is not a zombie."""
    if pid <= 0 or pid > 0x7FFFFFFF:  # 0 and negatives address process groups
        return False
    if kill(pid, 0) != 0:
        return get_errno() == _EPERM  # ESRCH: gone
    state = _proc_state(pid)
    return not (state == 90 or state == 88 or state == 120)  # 'Z', 'X', 'x'


@njit(cache=True)
def owner_alive(owner):
    """False if the owner's thread is gone, a zombie, or its tid now names a thread with
    another start time (the tid was reused). Bit 31 (a read-type holder) is ignored."""
    owner = np.int64(owner)
    tid = owner & _TID_MASK
    if tid == 0:
        return False
    r, state, start = _proc_stat(tid)
    if r < 0:
        return False
    if r == 0:
        return True
    if state == 90 or state == 88 or state == 120:  # 'Z', 'X', 'x'
        return False
    if (owner >> 32) == 0:  # start time unknown (its /proc read failed): existence counts
        return True
    return (start & _START_MASK) == (owner >> 32)


# --- robust process-shared spinlock --------------------------------------------------------------

LOCK_SPINS = _L.LOCK_SPINS  # looks at the word, cpu_relax between them, before yielding
LOCK_YIELDS_PER_CHECK = _L.LOCK_YIELDS_PER_CHECK  # sched_yield calls between liveness checks


@njit(cache=True)
def lock_try(addr, me):
    """Take the lock at addr (u64 word, 0 = free) for owner `me` if it is free; True if taken."""
    if load_u64(addr) != 0:
        return False
    return cas_u64(addr, 0, me) == 0


@njit(cache=True)
def lock_try_robust(addr, me):
    """lock_try, and take the lock over from a dead owner; False if a live owner holds it."""
    for _ in range(2):
        owner = np.int64(load_u64(addr))
        if owner == 0:
            if cas_u64(addr, 0, me) == 0:
                return True
            continue
        if owner_alive(owner):
            return False
        return np.int64(cas_u64(addr, owner, me)) == owner
    return False


@njit(cache=True)
def lock_acquire_for(addr, me, slice_ns):
    """Take the lock at addr for owner `me`, taking it over from a dead owner. Returns 0, or
    the id of the dead owner it was taken from (whose critical section may have been left half
    done), or -1 once slice_ns (>= 0) passed without it."""
    me = np.int64(me)
    spins = 0
    yields = 0
    deadline = monotonic_ns() + slice_ns if slice_ns >= 0 else np.int64(-1)
    while True:
        owner = np.int64(load_u64(addr))
        if owner == 0:
            if cas_u64(addr, 0, me) == 0:
                return np.int64(0)
            continue
        if spins < LOCK_SPINS:
            spins += 1
            cpu_relax()
            continue
        sched_yield()
        yields += 1
        if yields % LOCK_YIELDS_PER_CHECK == 0 and not owner_alive(owner):
            if np.int64(cas_u64(addr, owner, me)) == owner:
                return owner
        if deadline >= 0 and monotonic_ns() >= deadline:
            return np.int64(-1)


@njit(cache=True)
def lock_acquire(addr, me):
    """Take the lock at addr for owner `me`: 0, or the id of the dead owner it was taken from."""
    return lock_acquire_for(addr, me, -1)


@njit(cache=True)
def lock_release(addr):
    """Release the lock at addr (release store of 0); the caller must hold it."""
    _store_release_u64(addr, 0)


_refresh_cache_guard(globals(), "numba_atomics.deps", (_HERE / "layout.py",))
