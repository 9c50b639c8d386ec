"""The Numba backend: every ABI kernel as ``@njit(cache=True)`` code over raw shared-memory
addresses, with real CPU atomics (evtchn._numba_atomics), in the reference's step order.

``NumbaKernels`` has exactly the interface of ``evtchn.reference.ReferenceKernels``; each method
is a thin Python call into one jitted entry kernel (``k_*``). These take a *domain table*: an
int64 array of shape (domains, NCOLS), one row per domain mapped in this process, holding the
domain's base address, its configuration (ABI, word and link bits, vCPUs, port limit) and the
absolute addresses of its regions, read from the domain header when the domain is mapped. What
other processes change (``H_VALID``, ``H_ARRAY_PAGES``, ``H_INJECT``, port state, ...) is read
from the shared memory itself on every call, with atomic loads. A row whose base is 0 is a
domain this process has not mapped: a send to it is refused with -ESRCH (``Domain.send`` maps
every domain first, so only user code holding an old table can see that). Below the entry
kernels everything takes the table as an address and integers only (no array crosses a call, so
no reference counting), and evtchn.numba exposes the same internals to users' @njit code.

Multi-process protocol, shared with the Cython kernels (same lock words, same order, same spin
policy), so processes and threads on either backend drive one host: EVTCHNOP_send holds the
sender's channel lock (``P_LOCK``), EVTCHNOP_unmask the port's own, both read-type (owner id |
CHANNEL_LOCK_READER); a
VIRQ tries it, waits for a reader, drops the event for a writer, and re-checks its binding under
it; FIFO set_pending locks the (new, old) queue pair in address order, re-checks and gives
up after 3 tries; set_link retries with BUSY at most 4 times; a send to a port whose array page
is missing and expand_array pair up with fences (neither can miss the other); the upcall handler
runs under the robust per-vCPU handler lock (``G_HANDLER_LOCK``); a vCPU blocked in wait()
takes a waiter slot (its owner id in ``X_WAITER``, its bit in ``X_WAITERS``) and sleeps on the
``X_KICK`` futex, which mark_upcall_pending bumps and wakes only when a bit is set; wait() and
poll() free the slots of waiters that died blocked. A vCPU in SCHEDOP_poll (``poll``) is blocked the
same way and also sets its ``X_POLL`` word and counts itself in ``H_POLLERS``; every PENDING
0 -> 1 edge then checks the pollers (evtchn_check_pollers), and one cmpxchg on ``X_POLL`` decides
who ends a poll. Locks are robust spinlocks holding the owner id of a thread (see
_numba_atomics); every kernel that takes one gets the caller's id as ``me`` (NumbaKernels passes
evtchn.owner.owner_id()).

Guest-private per-vCPU state (resume position, FIFO local heads and local READY) is accessed
only under the handler lock, so it uses relaxed atomics; everything another process reads
without a common lock uses sequentially consistent ones.

Cache: kernels are compiled on first use and cached in ``__pycache__`` (``cache=True``), so a
worker process loads machine code instead of compiling. Numba keys that cache on this file only;
``refresh_cache_guard`` drops it when layout.py or _numba_atomics.py (whose constants and code
are baked in) change.
"""

from __future__ import annotations

import errno as _errno
import time

import numpy as np
from llvmlite import ir
from numba import njit, typeof, types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.extending import intrinsic

from . import layout as L
from ._numba_atomics import (
    cas_u32,
    cas_u64,
    cpu_relax,
    fence,
    fetch_add_u32,
    fetch_and_u32,
    fetch_and_u64,
    fetch_or_u8,
    fetch_or_u32,
    fetch_or_u64,
    fetch_sub_u32,
    futex_wait,
    futex_wake,
    load_u8,
    load_u16,
    load_u32,
    load_u64,
    lock_acquire,
    lock_acquire_for,
    lock_release,
    lock_try,
    lock_try_robust,
    monotonic_ns,
    owner_alive,
    sched_yield,
    store_u8,
    store_u32,
    store_u64,
    xchg_u32,
    xchg_u64,
)
from ._numba_cache import HERE as _HERE
from ._numba_cache import refresh_cache_guard
from .errors import EvtchnError
from .owner import owner_id

# --- domain table columns -----------------------------------------------------------------------
(
    C_BASE,
    C_ABI,
    C_WB,
    C_LB,
    C_VCPUS,
    C_MAXP,
    C_SIZE,
    C_SI,
    C_VIEXT,
    C_CTRL,
    C_L3P,
    C_L3M,
    C_L2SEL,
    C_PORTS,
    C_XV,
    C_GV,
    C_CPUMASK,
    C_EA,
    C_CPUB,
    C_PEND,
    C_MASK,
    C_SEL,
    C_L2B,
    C_LINKMASK,
    C_WSHIFT,
) = range(25)
NCOLS = 25

# --- constants baked into the kernels (module globals are compile-time constants) ----------------
ABI_2L, ABI_3L, ABI_FIFO = L.ABI_2L, L.ABI_3L, L.ABI_FIFO
ECS_RESERVED, ECS_UNBOUND = L.ECS_RESERVED, L.ECS_UNBOUND
ECS_INTERDOMAIN, ECS_IPI = L.ECS_INTERDOMAIN, L.ECS_IPI
PAGE_SIZE, WORDS_PER_PAGE = L.PAGE_SIZE, L.FIFO_WORDS_PER_PAGE
PENDING, MASKED, LINKED, BUSY = L.FIFO_PENDING, L.FIFO_MASKED, L.FIFO_LINKED, L.FIFO_BUSY
PENDING_BIT, LINKED_BIT = L.FIFO_PENDING_BIT, L.FIFO_LINKED_BIT
LOCK_TRIES, LINK_RETRIES = L.FIFO_LOCK_TRIES, L.FIFO_LINK_RETRIES
CB_READY, CB_HEAD = L.CB_READY, L.CB_HEAD
PORT_SIZE, P_LOCK, P_REMOTE_PORT, P_REMOTE_DOM = (
    L.PORT_SIZE,
    L.P_LOCK,
    L.P_REMOTE_PORT,
    L.P_REMOTE_DOM,
)
P_NOTIFY_VCPU, P_STATE, P_PRIORITY, P_PENDING, P_LASTQ = (
    L.P_NOTIFY_VCPU,
    L.P_STATE,
    L.P_PRIORITY,
    L.P_PENDING,
    L.P_LASTQ,
)
XEN_VCPU_SIZE, X_KICK, X_WAITERS, X_WAITER, X_QUEUES, X_VIRQ = (
    L.XEN_VCPU_SIZE,
    L.X_KICK,
    L.X_WAITERS,
    L.X_WAITER,
    L.X_QUEUES,
    L.X_VIRQ,
)
WAITER_SLOTS = L.WAITER_SLOTS
QUEUE_SIZE, Q_TAIL, Q_LOCK = L.QUEUE_SIZE, L.Q_TAIL, L.Q_LOCK
GUEST_VCPU_SIZE, G_HANDLER_LOCK, G_LOCAL_READY = (
    L.GUEST_VCPU_SIZE,
    L.G_HANDLER_LOCK,
    L.G_LOCAL_READY,
)
G_LOCAL_HEAD, G_RESUME_WORD, G_RESUME_BIT = L.G_LOCAL_HEAD, L.G_RESUME_WORD, L.G_RESUME_BIT
VCPU_INFO_SIZE, LEGACY_MAX_VCPUS, VI_UPCALL_PENDING = (
    L.VCPU_INFO_SIZE,
    L.LEGACY_MAX_VCPUS,
    L.VI_UPCALL_PENDING,
)
VI_UPCALL_MASK = L.VI_UPCALL_MASK
H_VALID, H_ARRAY_PAGES, H_INJECT, H_POLLERS = L.H_VALID, L.H_ARRAY_PAGES, L.H_INJECT, L.H_POLLERS
X_POLL_EVTCHN, X_POLL = L.X_POLL_EVTCHN, L.X_POLL
POLL_IDLE, POLL_ACTIVE, POLL_WOKEN = L.POLL_IDLE, L.POLL_ACTIVE, L.POLL_WOKEN
POLL_TIMEOUT, POLL_PENDING, POLL_EVENT, POLL_UPCALL = (
    L.POLL_TIMEOUT,
    L.POLL_PENDING,
    L.POLL_EVENT,
    L.POLL_UPCALL,
)
CHANNEL_LOCK_READER = L.CHANNEL_LOCK_READER
POLL_AGAIN = -0x10000  # a poll kernel's "no reason yet: sleep (again)"
VIRQ_TIMER, NR_VIRQS = L.VIRQ_TIMER, L.NR_VIRQS
VIRQ_PER_VCPU_0, VIRQ_PER_VCPU_1, VIRQ_PER_VCPU_2, VIRQ_PER_VCPU_3 = sorted(L.VIRQ_PER_VCPU)
INJ_SELECTOR_FIRST = L.INJECTIONS["2l-selector-before-upcall-clear"]  # R1
INJ_UNMASK_TEST_FIRST = L.INJECTIONS["2l-unmask-test-before-clear"]  # R2
INJ_READY_EVERY_LINK = L.INJECTIONS["fifo-ready-every-link"]  # R6
INJ_OLD_TAIL_KEPT = L.INJECTIONS["fifo-old-tail-kept"]  # R7
INJ_PENDING_BEFORE_LOCK = L.INJECTIONS["fifo-pending-before-lock"]  # R9
# R9's windows are nanoseconds wide; its injection widens them (timing only): the sender that
# set PENDING pauses before testing LINKED (the interrupt in 71ac522909's message), and a
# linker that found PENDING already set pauses with LINKED set and the queue locked.
R9_PAUSE_SET_NS, R9_PAUSE_LINK_NS = L.R9_PAUSE_SET_NS, L.R9_PAUSE_LINK_NS
R1_PAUSE_NS, R2_PAUSE_NS, R6_PAUSE_NS = L.R1_PAUSE_NS, L.R2_PAUSE_NS, L.R6_PAUSE_NS
EINVAL, ESRCH, ENOSPC, EINTR = _errno.EINVAL, _errno.ESRCH, _errno.ENOSPC, _errno.EINTR
FUTEX_WAKE_ALL = 0x7FFFFFFF
# The spin policy (evtchn.layout), the same constants as the Cython kernels.
WAIT_SLICE_NS = L.WAIT_SLICE_NS  # wait() and poll() return to Python this often (Ctrl-C)
WAIT_FALLBACK_NS = L.WAIT_FALLBACK_NS  # all waiter slots taken: poll the flag this often
SPIN_LOOKS_PER_CLOCK = L.SPIN_LOOKS_PER_CLOCK  # wait()'s spin: flag looks per clock read
LOCK_SLICE_NS = L.LOCK_SLICE_NS  # a lock taken from Python looks for signals this often
UNMASK_BUSY_SPINS, UNMASK_BUSY_YIELDS = L.UNMASK_BUSY_SPINS, L.UNMASK_BUSY_YIELDS
TID_MASK = L.OWNER_TID_MASK

_U64_ONE = np.uint64(1)
_U64_ZERO = np.uint64(0)
_U64_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


# --- relaxed / release atomics for lock-protected or publish-only stores -------------------------


def _check_ints(name, **tys):
    for what, ty in tys.items():
        if not isinstance(ty, types.Integer):
            raise TypingError(f"{name}: {what} must be an integer, got {ty}")


def _ptr32(context, builder, ty, val):
    addr = context.cast(builder, val, ty, types.uintp)
    return builder.inttoptr(addr, ir.IntType(32).as_pointer())


@intrinsic
def _load_rlx_u32(typingctx, addr):
    """Relaxed (monotonic) atomic load of the u32 at addr."""
    _check_ints("_load_rlx_u32", addr=addr)

    def codegen(context, builder, sig, args):
        return builder.load_atomic(_ptr32(context, builder, sig.args[0], args[0]), "monotonic", 4)

    return types.uint32(addr), codegen


def _make_store32(ordering, name):
    @intrinsic
    def store(typingctx, addr, val):
        _check_ints(name, addr=addr, val=val)

        def codegen(context, builder, sig, args):
            ptr = _ptr32(context, builder, sig.args[0], args[0])
            v = context.cast(builder, args[1], sig.args[1], types.uint32)
            builder.store_atomic(v, ptr, ordering, 4)
            return context.get_dummy_value()

        return types.none(addr, val), codegen

    store.__doc__ = f"{name}(addr, val): {ordering} atomic store of a u32."
    return store


_store_rlx_u32 = _make_store32("monotonic", "_store_rlx_u32")
_store_rel_u32 = _make_store32("release", "_store_rel_u32")


@intrinsic
def _tget(typingctx, tb, idx):
    """Element idx of the int64 domain table at address tb: a plain load marked invariant (the
    table does not change while a kernel runs), so LLVM may reuse it across atomics."""
    _check_ints("_tget", tb=tb, idx=idx)

    def codegen(context, builder, sig, args):
        base = context.cast(builder, args[0], sig.args[0], types.uintp)
        i = context.cast(builder, args[1], sig.args[1], types.intp)
        addr = builder.add(base, builder.mul(i, ir.Constant(i.type, 8)))
        ld = builder.load(builder.inttoptr(addr, ir.IntType(64).as_pointer()), align=8)
        ld.set_metadata("invariant.load", builder.module.add_metadata([]))
        return ld

    return types.int64(tb, idx), codegen


def _make_plain(width):
    uty = {8: types.uint8, 32: types.uint32, 64: types.uint64}[width]

    @intrinsic
    def load(typingctx, addr):
        _check_ints("_pload", addr=addr)

        def codegen(context, builder, sig, args):
            a = context.cast(builder, args[0], sig.args[0], types.uintp)
            return builder.load(
                builder.inttoptr(a, ir.IntType(width).as_pointer()), align=width // 8
            )

        return uty(addr), codegen

    @intrinsic
    def store(typingctx, addr, val):
        _check_ints("_pstore", addr=addr, val=val)

        def codegen(context, builder, sig, args):
            a = context.cast(builder, args[0], sig.args[0], types.uintp)
            v = context.cast(builder, args[1], sig.args[1], uty)
            builder.store(v, builder.inttoptr(a, ir.IntType(width).as_pointer()), align=width // 8)
            return context.get_dummy_value()

        return types.none(addr, val), codegen

    return load, store


def _make_bit_op(op, width):
    name = f"_bt{op}{width}"

    @intrinsic
    def bitop(typingctx, addr, bit):
        _check_ints(name, addr=addr, bit=bit)

        def codegen(context, builder, sig, args):
            ity = ir.IntType(width)
            a = context.cast(builder, args[0], sig.args[0], types.uintp)
            ptr = builder.inttoptr(a, ity.as_pointer())
            b = context.cast(builder, args[1], sig.args[1], types.int64)
            b = builder.trunc(b, ity) if width < 64 else b
            m = builder.shl(ir.Constant(ity, 1), b)
            if op == "s":
                old = builder.atomic_rmw("or", ptr, m, "seq_cst")
            else:
                old = builder.atomic_rmw("and", ptr, builder.not_(m), "seq_cst")
            return builder.icmp_unsigned("!=", builder.and_(old, m), ir.Constant(ity, 0))

        return types.boolean(addr, bit), codegen

    what = "set" if op == "s" else "clear"
    bitop.__doc__ = (
        f"{name}(addr, bit) -> bool: seq_cst test_and_{what} of a bit of the "
        f"u{width} at addr (x86: lock bt{op})"
    )
    return bitop


# Test-and-set/clear of one bit: the RMW and the test in one function let LLVM emit x86's
# `lock bts` / `lock btr` instead of a cmpxchg loop (fetch_or's full old value is not needed).
_bts8, _bts32, _bts64 = (_make_bit_op("s", w) for w in (8, 32, 64))
_btr32, _btr64 = (_make_bit_op("r", w) for w in (32, 64))


# Private memory of the calling process (the consumer's output buffer, scratch): plain access.
_pstore_u8 = _make_plain(8)[1]
_pload_u32, _pstore_u32 = _make_plain(32)
_pload_u64, _pstore_u64 = _make_plain(64)


@intrinsic
def _scratch64(typingctx):
    """Address of 64 uint64 on the calling function's stack (its entry block)."""

    def codegen(context, builder, sig, args):
        buf = cgutils.alloca_once(builder, ir.IntType(64), size=64, name="scratch")
        return builder.ptrtoint(buf, ir.IntType(64))

    return types.int64(), codegen


# --- W-bit words (xen_ulong_t: 64, or 32 in the compat layout), carried as uint64 ----------------


@njit(cache=True)
def _wload(addr, wb):
    if wb == 64:
        return load_u64(addr)
    return np.uint64(load_u32(addr))


@njit(cache=True)
def _wor(addr, wb, val):
    """fetch_or on a W-bit word -> the old value."""
    if wb == 64:
        return fetch_or_u64(addr, val)
    return np.uint64(fetch_or_u32(addr, np.uint32(val & np.uint64(0xFFFFFFFF))))


@njit(cache=True)
def _wand(addr, wb, val):
    """fetch_and on a W-bit word -> the old value."""
    if wb == 64:
        return fetch_and_u64(addr, val)
    return np.uint64(fetch_and_u32(addr, np.uint32(val & np.uint64(0xFFFFFFFF))))


@njit(cache=True)
def _wxchg(addr, wb, val):
    if wb == 64:
        return xchg_u64(addr, val)
    return np.uint64(xchg_u32(addr, np.uint32(val & np.uint64(0xFFFFFFFF))))


@njit(cache=True)
def _bit(b):
    return _U64_ONE << np.uint64(b)


@njit(inline="always", cache=True)
def _test_and_set(tb, d, base, idx, bit):
    """test_and_set of bit `bit` of word `idx` of the W-bit array at `base`."""
    wb = _T(tb, d, C_WB)
    if wb == 64:
        return _bts64(base + idx * 8, bit)
    return _bts32(base + idx * 4, bit)


@njit(inline="always", cache=True)
def _test_and_clear(tb, d, base, idx, bit):
    wb = _T(tb, d, C_WB)
    if wb == 64:
        return _btr64(base + idx * 8, bit)
    return _btr32(base + idx * 4, bit)


@njit(cache=True)
def _test(tb, d, base, idx, bit):
    wb = _T(tb, d, C_WB)
    return (_wload(base + idx * (wb // 8), wb) >> np.uint64(bit)) & _U64_ONE != _U64_ZERO


# --- addresses (the DomainLayout accessors of layout.py, absolute) -------------------------------
# Internal kernels take the domain table as its address `tb` (and only integers otherwise):
# passing an array between jitted functions costs two atomic reference-count updates per call.


@njit(cache=True)
def _T(tb, d, col):
    return _tget(tb, d * NCOLS + col)


@njit(cache=True)
def _vcpu_info(tb, d, v):
    if v < LEGACY_MAX_VCPUS:
        return _T(tb, d, C_SI) + VCPU_INFO_SIZE * v
    return _T(tb, d, C_VIEXT) + VCPU_INFO_SIZE * (v - LEGACY_MAX_VCPUS)


@njit(cache=True)
def _port(tb, d, port):
    return _T(tb, d, C_PORTS) + PORT_SIZE * port


@njit(cache=True)
def _xen_vcpu(tb, d, v):
    return _T(tb, d, C_XV) + XEN_VCPU_SIZE * v


@njit(cache=True)
def _guest_vcpu(tb, d, v):
    return _T(tb, d, C_GV) + GUEST_VCPU_SIZE * v


@njit(cache=True)
def _control_block(tb, d, v):
    return _T(tb, d, C_CTRL) + PAGE_SIZE * v


@njit(cache=True)
def _queue(tb, d, v, prio):
    return _xen_vcpu(tb, d, v) + X_QUEUES + QUEUE_SIZE * prio


@njit(cache=True)
def _hdr(tb, d, off):
    return np.int64(load_u32(_T(tb, d, C_BASE) + off))


@njit(cache=True)
def _state(tb, d, port):
    return np.int64(load_u8(_port(tb, d, port) + P_STATE))


@njit(cache=True)
def _notify_vcpu(tb, d, port):
    return np.int64(load_u16(_port(tb, d, port) + P_NOTIFY_VCPU))


@njit(inline="always", cache=True)
def _port_ok(tb, d, port):
    """A port the guest can address (below the domain's limit)."""
    return port >= 0 and port < _T(tb, d, C_MAXP)


@njit(inline="always", cache=True)
def _vcpu_ok(tb, d, v):
    return v >= 0 and v < _T(tb, d, C_VCPUS)


@njit(cache=True)
def _fifo_word(tb, d, port):
    """Address of the port's event word, or 0 when its array page has not been added."""
    if port < 0 or port >= _hdr(tb, d, H_ARRAY_PAGES) * WORDS_PER_PAGE:
        return np.int64(0)
    return _T(tb, d, C_EA) + 4 * port


# --- upcall and kick (vcpu_mark_events_pending) --------------------------------------------------


@njit(inline="always", cache=True)
def _mark_upcall_pending(tb, d, v):
    """vcpu_mark_events_pending: test_and_set the upcall flag; on 0 -> 1 vcpu_kick, which
    wakes the vCPU's waiters only if one is registered. The fence orders the flag RMW before
    the bitmap load (Dekker with _waiter_enter: set the bit, fence, re-read the flag)."""
    if _bts8(_vcpu_info(tb, d, v) + VI_UPCALL_PENDING, 0):
        return
    x = _xen_vcpu(tb, d, v)
    fence()
    if load_u32(x + X_WAITERS) != 0:  # kick only a vCPU with a registered waiter
        fetch_add_u32(x + X_KICK, 1)
        futex_wake(x + X_KICK, FUTEX_WAKE_ALL)


# --- waiters of a vCPU (as _core.pyx: waiter_enter, waiter_leave, waiter_repair) ---------------


@njit(cache=True)
def _waiter_enter(tb, d, v, me):
    """Register as blocked on vCPU v: claim a free slot (CAS 0 -> me), set its bit, fence (the
    caller re-reads the upcall flag next). The slot, or -1 when all are taken (the caller then
    polls the flag every WAIT_FALLBACK_NS instead)."""
    x = _xen_vcpu(tb, d, v)
    for i in range(WAITER_SLOTS):
        slot = x + X_WAITER + 8 * i
        if load_u64(slot) == 0 and cas_u64(slot, 0, me) == 0:
            fetch_or_u32(x + X_WAITERS, np.uint32(1) << np.uint32(i))
            fence()
            return np.int64(i)
    return np.int64(-1)


@njit(cache=True)
def _waiter_leave(tb, d, v, i):
    """Clear the slot's bit, then free the slot (a leaver never clears a newcomer's bit)."""
    if i < 0:
        return
    x = _xen_vcpu(tb, d, v)
    fetch_and_u32(x + X_WAITERS, ~(np.uint32(1) << np.uint32(i)))
    store_u64(x + X_WAITER + 8 * i, 0)


@njit(cache=True)
def _waiter_repair(tb, d, v, me):
    """Free the slots of waiters of vCPU v that died blocked (or of this thread, which is not
    blocked since it is here): claim the slot (CAS dead -> me), then clear its bit and zero it,
    so two repairers never both act on one slot and a newcomer never loses its bit. Returns
    the number of slots repaired."""
    x = _xen_vcpu(tb, d, v)
    repaired = 0
    for i in range(WAITER_SLOTS):
        slot = x + X_WAITER + 8 * i
        owner = np.int64(load_u64(slot))
        if owner == 0:
            continue
        if (owner == me or not owner_alive(owner)) and np.int64(cas_u64(slot, owner, me)) == owner:
            _waiter_leave(tb, d, v, i)
            repaired += 1
    return repaired


@njit(cache=True)
def _unblock(tb, d, v):
    """vcpu_unblock of a vCPU whose poll this caller ended: wake its futex sleepers."""
    x = _xen_vcpu(tb, d, v)
    fetch_add_u32(x + X_KICK, 1)
    futex_wake(x + X_KICK, FUTEX_WAKE_ALL)


@njit(cache=True)
def _check_pollers(tb, d, port):
    """evtchn_check_pollers, called after PENDING went 0 -> 1: wake every vCPU polling this
    port (or polling several ports). A vCPU's poll_mask bit is cleared by one cmpxchg, which
    also records the port, so exactly one side (this, the timeout, or a kick) ends the poll.
    The seq_cst load of the pollers count follows the caller's seq_cst PENDING RMW: Dekker
    with poll(), which counts itself in, fences, then tests PENDING. No fence here: this runs
    on every new edge."""
    pollers = _T(tb, d, C_BASE) + H_POLLERS
    if load_u32(pollers) == 0:  # bitmap_empty(d->poll_mask): usual case
        return
    for v in range(_T(tb, d, C_VCPUS)):
        x = _xen_vcpu(tb, d, v)
        if load_u32(x + X_POLL) != POLL_ACTIVE:
            continue
        pe = np.int64(load_u32(x + X_POLL_EVTCHN))  # an i32: -1 (several ports) reads big
        if 0 < pe < 0x80000000 and pe != port:
            continue
        if cas_u32(x + X_POLL, POLL_ACTIVE, POLL_WOKEN | port) == POLL_ACTIVE:
            # The poller may be gone (and polling again) by now: touch nothing of its state
            # but the count (it clears poll_evtchn itself) and the kick, which it ignores
            # unless an upcall is pending.
            fetch_sub_u32(pollers, 1)
            _unblock(tb, d, v)


# --- hypervisor side: 2l / 3l -------------------------------------------------------------------


@njit(inline="always", cache=True)
def _raise_selectors(tb, d, v, port):
    """Selector bit(s) of the notify vCPU, then the upcall flag (event_2l.c order)."""
    w = _T(tb, d, C_WB)
    ws = _T(tb, d, C_WSHIFT)
    sel = _vcpu_info(tb, d, v) + _T(tb, d, C_SEL)
    if _T(tb, d, C_ABI) == ABI_3L:  # L2 bit port/W covers L3 word port/W
        l2 = port >> ws
        if _test_and_set(tb, d, _T(tb, d, C_L2SEL) + _T(tb, d, C_L2B) * v, l2 >> ws, l2 & (w - 1)):
            return
        if not _test_and_set(tb, d, sel, 0, l2 >> ws):
            _mark_upcall_pending(tb, d, v)
        return
    if not _test_and_set(tb, d, sel, 0, port >> ws):
        _mark_upcall_pending(tb, d, v)


@njit(inline="always", cache=True)
def _bitmap_set_pending(tb, d, v, port):
    """evtchn_2l_set_pending (event_2l.c): pending, then (if unmasked) selector(s), then the
    upcall flag; the mask is read seq_cst after the pending RMW (the store-buffering pair with
    the guest's unmask). Pollers are checked for a new edge only."""
    w = _T(tb, d, C_WB)
    ws = _T(tb, d, C_WSHIFT)
    if _test_and_set(tb, d, _T(tb, d, C_PEND), port >> ws, port & (w - 1)):
        return np.int64(0)  # coalesced: no pollers check
    if not _test(tb, d, _T(tb, d, C_MASK), port >> ws, port & (w - 1)):
        _raise_selectors(tb, d, v, port)
    _check_pollers(tb, d, port)
    return np.int64(1)


# --- hypervisor side: FIFO -----------------------------------------------------------------------


@njit(cache=True)
def _fifo_set_link(tb, d, tail_port, port):
    """evtchn_fifo_set_link (dae2a1c5f9): link the tail to `port` iff it is still LINKED; after
    one failed cmpxchg set BUSY and retry at most 4 times. 1 linked (or given up: "not
    linked"), 0 the tail was already consumed (the caller writes HEAD)."""
    tw = _fifo_word(tb, d, tail_port)
    if tw == 0:
        return False
    link_mask = _T(tb, d, C_LINKMASK)
    w = load_u32(tw)
    if not w & LINKED:
        return False
    old = cas_u32(tw, w, (w & ~(BUSY | link_mask)) | port)
    if old == w:
        return True
    fetch_or_u32(tw, BUSY)  # the guest cannot clear MASKED now
    w = load_u32(tw)
    for _ in range(LINK_RETRIES):
        if not w & LINKED:
            fetch_and_u32(tw, ~BUSY)
            return False
        old = cas_u32(tw, w, (w & ~(BUSY | link_mask)) | port)
        if old == w:
            return True  # the new value has BUSY clear
        w = old
    fetch_and_u32(tw, ~BUSY)  # misbehaving guest: "not linked"
    return True


@njit(cache=True)
def _lock(addr, me):
    """lock_acquire with its uncontended path inlined (one cmpxchg, no call)."""
    if load_u64(addr) == 0 and cas_u64(addr, 0, me) == 0:
        return
    lock_acquire(addr, me)


@njit(cache=True)
def _lock_pair(a, b, me):
    if a == b:
        _lock(a, me)
    elif a < b:
        _lock(a, me)
        _lock(b, me)
    else:
        _lock(b, me)
        _lock(a, me)


@njit(cache=True)
def _fifo_link_tail(tb, d, v, prio, q, port):
    """Append `port` to queue q (locked): LINK on the tail or a new HEAD; True if linked."""
    tail = q + Q_TAIL
    linked = False
    t = load_u32(tail)
    if t != 0:
        linked = _fifo_set_link(tb, d, np.int64(t), port)
    if not linked:  # the queue was empty: new HEAD
        _store_rel_u32(_control_block(tb, d, v) + CB_HEAD + 4 * prio, port)
    _store_rel_u32(tail, port)
    return linked


@njit(cache=True)
def _fifo_ready(tb, d, v, prio):
    """Set the queue's READY bit; vcpu_mark_events_pending only if it was clear (70ccddb14a)."""
    if not _bts32(_control_block(tb, d, v) + CB_READY, prio):
        _mark_upcall_pending(tb, d, v)


@njit(cache=True)
def _fifo_set_pending(tb, d, v, port, me):
    """evtchn_fifo_set_pending; pollers are checked last, after the event is queued and the
    queue unlocked, and only for a PENDING 0 -> 1 edge. Returns 1 for such an edge."""
    inject = _hdr(tb, d, H_INJECT)
    if inject == INJ_PENDING_BEFORE_LOCK:
        first = _fifo_set_pending_r9(tb, d, v, port, me)
    else:
        first = _fifo_queue_event(tb, d, v, port, me, inject)
    if first:
        _check_pollers(tb, d, port)
    return first


@njit(cache=True)
def _fifo_word_or_defer(tb, d, port, pe):
    """The port's event word; 0 when its page was not added, after noting the event in the
    port (evtchn->pending), which expand_array replays (917c123029)."""
    wa = _fifo_word(tb, d, port)
    if wa != 0:
        return wa
    store_u8(pe + P_PENDING, 1)
    # Dekker with expand_array (publish the page, fence, read the flags): if the page
    # appeared meanwhile, its replay may have missed our flag, so raise the event here.
    fence()
    return _fifo_word(tb, d, port)


@njit(cache=True)
def _fifo_queue_event(tb, d, v, port, me, inject):
    """The body of evtchn_fifo_set_pending, as in Xen after 71ac522909 (queue locks first).
    Returns 1 if PENDING went 0 -> 1."""
    pe = _port(tb, d, port)
    wa = _fifo_word_or_defer(tb, d, port, pe)
    if wa == 0:
        return np.int64(0)
    lastq = np.int64(0)
    prio = np.int64(0)
    q = np.int64(0)
    oq = np.int64(0)
    locked = False
    for _ in range(LOCK_TRIES):  # lock the (new, old) queue pair
        lastq = np.int64(load_u32(pe + P_LASTQ))
        prio = np.int64(load_u8(pe + P_PRIORITY))
        q = _queue(tb, d, v, prio)
        oq = _queue(tb, d, lastq >> 16, lastq & 0xFF)
        _lock_pair(q + Q_LOCK, oq + Q_LOCK, me)
        # Xen's re-check (71ac522909): the priority and lastq still name the same two queues,
        # comparing queue addresses.
        lastq = np.int64(load_u32(pe + P_LASTQ))
        if q == _queue(tb, d, v, np.int64(load_u8(pe + P_PRIORITY))) and oq == _queue(
            tb, d, lastq >> 16, lastq & 0xFF
        ):
            locked = True
            break
        if oq != q:
            lock_release(oq + Q_LOCK)
        lock_release(q + Q_LOCK)
    if not locked:
        return np.int64(0)  # "too many queue changes": nothing set
    first = not _bts32(wa, PENDING_BIT)
    linked = True
    did_link = False
    if not (load_u32(wa) & MASKED) and not _bts32(wa, LINKED_BIT):
        did_link = True
        if inject != INJ_OLD_TAIL_KEPT and load_u32(oq + Q_TAIL) == port:
            _store_rel_u32(oq + Q_TAIL, 0)  # an old tail: that queue is now empty
        if oq != q:
            _store_rel_u32(pe + P_LASTQ, (v << 16) | prio)
            lock_release(oq + Q_LOCK)
            oq = q
        linked = _fifo_link_tail(tb, d, v, prio, q, port)
    if oq != q:
        lock_release(oq + Q_LOCK)
    lock_release(q + Q_LOCK)
    if linked and did_link and inject == INJ_READY_EVERY_LINK:
        # R6 (as in _core.pyx): pause so that the guest can drain the queue through our LINK
        # before it sees this READY, as when this CPU is interrupted here (timing only).
        _pause_ns(R6_PAUSE_NS)
    if not linked or (did_link and inject == INJ_READY_EVERY_LINK):
        _fifo_ready(tb, d, v, prio)
    return np.int64(first)


@njit(cache=True)
def _pause_ns(ns):
    """nanosleep(ns) for R9's timing-only pauses. _numba_atomics has no nanosleep, so this is a
    futex wait, with a timeout, on a word of this frame's stack: no other thread knows its
    address, so nobody wakes it and its value cannot change; it ends by the timeout, or early
    on a signal as nanosleep does (neither retries)."""
    w = _scratch64()
    _pstore_u32(w, 0)
    futex_wait(w, 0, ns)


@njit(cache=True)
def _fifo_lock_old_queue(tb, d, pe, me):
    """Xen before 71ac522909 (lock_old_queue): lock only the queue the event was last on,
    re-checked under the lock, 3 tries. Returns its address, locked, or 0."""
    for _ in range(LOCK_TRIES):
        lastq = np.int64(load_u32(pe + P_LASTQ))
        oq = _queue(tb, d, lastq >> 16, lastq & 0xFF)
        _lock(oq + Q_LOCK, me)
        lastq = np.int64(load_u32(pe + P_LASTQ))
        if oq == _queue(tb, d, lastq >> 16, lastq & 0xFF):
            return oq
        lock_release(oq + Q_LOCK)
    return np.int64(0)


@njit(cache=True)
def _fifo_set_pending_r9(tb, d, v, port, me):
    """R9 put back: evtchn_fifo_set_pending as Xen had it before 71ac522909. PENDING is set and
    MASKED/LINKED tested before any queue lock, so a sender that set PENDING can see LINKED
    set by a concurrent linker (an unmask) that has not queued the event yet, and return:
    its pollers are then woken before the event is visible to the guest. Two pauses widen the
    windows (R9_PAUSE_*): the first where 71ac522909 says the sender got interrupted, the
    second inside the relink (Xen held that lock with interrupts off; this is only a longer
    critical section, as a slow or preempted CPU makes it). The rest is the old code's order."""
    pe = _port(tb, d, port)
    wa = _fifo_word_or_defer(tb, d, port, pe)
    if wa == 0:
        return np.int64(0)
    first = not _bts32(wa, PENDING_BIT)
    if first:
        _pause_ns(R9_PAUSE_SET_NS)
    if load_u32(wa) & (MASKED | LINKED):
        return np.int64(first)
    prio = np.int64(load_u8(pe + P_PRIORITY))  # no lock: may race a priority change
    q = _queue(tb, d, v, prio)
    oq = _fifo_lock_old_queue(tb, d, pe, me)
    if oq == 0:
        return np.int64(first)
    if _bts32(wa, LINKED_BIT):
        lock_release(oq + Q_LOCK)
        return np.int64(first)
    if not first:
        _pause_ns(R9_PAUSE_LINK_NS)
    if _load_rlx_u32(oq + Q_TAIL) == port:
        _store_rlx_u32(oq + Q_TAIL, 0)
    if oq != q:  # moved: switch to the new queue's lock
        _store_rel_u32(pe + P_LASTQ, (v << 16) | prio)
        lock_release(oq + Q_LOCK)
        _lock(q + Q_LOCK, me)
    linked = _fifo_link_tail(tb, d, v, prio, q, port)
    lock_release(q + Q_LOCK)
    if not linked:
        _fifo_ready(tb, d, v, prio)
    return np.int64(first)


@njit(inline="always", cache=True)
def _set_pending(tb, d, v, port, me):
    """evtchn_port_set_pending: nothing for an unusable port (evtchn_usable), else the ABI's."""
    if _state(tb, d, port) <= ECS_RESERVED:  # evtchn_usable()
        return np.int64(0)
    if _T(tb, d, C_ABI) == ABI_FIFO:
        return _fifo_set_pending(tb, d, v, port, me)
    return _bitmap_set_pending(tb, d, v, port)


@njit(cache=True)
def _hyp_unmask(tb, d, port, me):
    """EVTCHNOP_unmask (evtchn_unmask) under the port's channel lock, so it cannot relink a
    port that a concurrent close is freeing; the caller checked that the port is valid.
    Returns 1 if it set PENDING 0 -> 1 itself (FIFO: the guest acked between its test of
    PENDING and set_pending, as can happen in Xen), else 0."""
    lk = _port(tb, d, port) + P_LOCK
    _lock(lk, me | CHANNEL_LOCK_READER)
    edge = _hyp_unmask_locked(tb, d, port, me)
    lock_release(lk)
    return edge


@njit(cache=True)
def _hyp_unmask_locked(tb, d, port, me):
    """evtchn_fifo_unmask (clear MASKED, relink if PENDING) or evtchn_2l_unmask (clear the
    mask; if it was set and the port is pending, raise the selectors)."""
    if _state(tb, d, port) <= ECS_RESERVED:
        return np.int64(0)
    v = _notify_vcpu(tb, d, port)
    if _T(tb, d, C_ABI) == ABI_FIFO:
        wa = _fifo_word(tb, d, port)
        if wa == 0:
            return np.int64(0)
        fetch_and_u32(wa, ~MASKED)
        if load_u32(wa) & PENDING:  # relink if pending
            return _fifo_set_pending(tb, d, v, port, me)
        return np.int64(0)
    w = _T(tb, d, C_WB)
    ws = _T(tb, d, C_WSHIFT)
    if _test_and_clear(tb, d, _T(tb, d, C_MASK), port >> ws, port & (w - 1)) and _test(
        tb, d, _T(tb, d, C_PEND), port >> ws, port & (w - 1)
    ):
        _raise_selectors(tb, d, v, port)
    return np.int64(0)


# --- entry kernels: hypervisor side --------------------------------------------------------------


@njit(cache=True)
def _clear_pending(tb, d, port):
    """Clear PENDING; 1 if it was set (an event destroyed undelivered), else 0."""
    if _T(tb, d, C_ABI) == ABI_FIFO:
        wa = _fifo_word(tb, d, port)
        if wa == 0:
            return np.int64(0)
        return np.int64(_btr32(wa, PENDING_BIT))
    w = _T(tb, d, C_WB)
    ws = _T(tb, d, C_WSHIFT)
    return np.int64(_test_and_clear(tb, d, _T(tb, d, C_PEND), port >> ws, port & (w - 1)))


@njit(cache=True)
def _is_pending(tb, d, port):
    if _T(tb, d, C_ABI) == ABI_FIFO:
        wa = _fifo_word(tb, d, port)
        return wa != 0 and (load_u32(wa) & PENDING) != 0
    w = _T(tb, d, C_WB)
    ws = _T(tb, d, C_WSHIFT)
    return _test(tb, d, _T(tb, d, C_PEND), port >> ws, port & (w - 1))


@njit(cache=True)
def _is_masked(tb, d, port):
    if _T(tb, d, C_ABI) == ABI_FIFO:
        wa = _fifo_word(tb, d, port)
        return wa == 0 or (load_u32(wa) & MASKED) != 0
    w = _T(tb, d, C_WB)
    ws = _T(tb, d, C_WSHIFT)
    return _test(tb, d, _T(tb, d, C_MASK), port >> ws, port & (w - 1))


@njit(cache=True)
def _is_linked(tb, d, port):
    if _T(tb, d, C_ABI) != ABI_FIFO:
        return False
    wa = _fifo_word(tb, d, port)
    return wa != 0 and (load_u32(wa) & LINKED) != 0


@njit(cache=True)
def _expand_array(tb, d, me):
    """Linux fills the new page with MASKED; EVTCHNOP_expand_array (add_page_to_event_array)
    publishes it and re-raises the ports of its range sent to while it was missing
    (917c123029). 0 or -ENOSPC; the caller holds the event lock."""
    pages = _hdr(tb, d, H_ARRAY_PAGES)
    first = pages * WORDS_PER_PAGE
    if first >= np.int64(1) << _T(tb, d, C_LB):
        return np.int64(-ENOSPC)
    base = _T(tb, d, C_EA) + 4 * first
    for i in range(WORDS_PER_PAGE):
        store_u32(base + 4 * i, MASKED)
    store_u32(_T(tb, d, C_BASE) + H_ARRAY_PAGES, pages + 1)  # publish after the words
    fence()  # pairs with set_pending's re-check
    valid = _hdr(tb, d, H_VALID)
    for port in range(first, min(first + WORDS_PER_PAGE, valid)):
        if load_u8(_port(tb, d, port) + P_PENDING):
            _fifo_set_pending(tb, d, _notify_vcpu(tb, d, port), port, me)
    return np.int64(0)


@njit(inline="always", cache=True)
def _send(tb, nrows, d, port, me):
    """EVTCHNOP_send under the sender's channel lock: 1 new edge, 0 coalesced or dropped,
    -errno when refused."""
    if port < 0 or port >= _hdr(tb, d, H_VALID):
        return np.int64(-EINVAL)
    pe = _port(tb, d, port)
    _lock(pe + P_LOCK, me | CHANNEL_LOCK_READER)
    state = np.int64(load_u8(pe + P_STATE))
    if state == ECS_INTERDOMAIN:
        rd = np.int64(load_u16(pe + P_REMOTE_DOM))
        rport = np.int64(load_u32(pe + P_REMOTE_PORT))
        if rd >= nrows or _T(tb, rd, C_BASE) == 0:
            r = np.int64(-ESRCH)  # a peer this table does not map
        else:
            r = _set_pending(tb, rd, _notify_vcpu(tb, rd, rport), rport, me)
    elif state == ECS_IPI:
        r = _set_pending(tb, d, _notify_vcpu(tb, d, port), port, me)
    elif state == ECS_UNBOUND:
        r = np.int64(0)  # dropped silently, as Xen does
    else:
        r = np.int64(-EINVAL)
    lock_release(pe + P_LOCK)
    return r


@njit(cache=True)
def _channel_read_trylock(lk, me):
    """evtchn_read_trylock on the exclusive owner word (as _core.channel_read_trylock; `me` is
    the caller's reader value, owner | CHANNEL_LOCK_READER): 0 against a writer; 1 after
    waiting for a reader that is another thread or process (the caller releases); 2 beside a
    reader that is the calling thread itself, whose read lock nests as in Xen (nothing to
    release). A dead writer's lock is taken over (1), so its VIRQ is not dropped for good."""
    while True:
        if lock_try(lk, me):
            return 1
        owner = np.int64(load_u64(lk))
        if owner == 0:
            continue
        if not owner & CHANNEL_LOCK_READER:
            if owner_alive(owner):
                return 0
            if np.int64(cas_u64(lk, owner, me)) == owner:
                return 1
            continue
        if owner == me:
            return 2
        lock_acquire(lk, me)
        return 1


@njit(cache=True)
def _raise_virq(tb, d, virq, v, me):
    """send_guest_vcpu_virq / send_guest_domain_virq under a *try* of the channel lock
    (evtchn_read_trylock): dropped when a writer (close, bind) holds it, as in Xen."""
    per_vcpu = (
        virq == VIRQ_PER_VCPU_0
        or virq == VIRQ_PER_VCPU_1
        or virq == VIRQ_PER_VCPU_2
        or virq == VIRQ_PER_VCPU_3
    )
    port = np.int64(load_u32(_xen_vcpu(tb, d, v if per_vcpu else 0) + X_VIRQ + 4 * virq))
    if port == 0:
        return np.int64(0)
    lk = _port(tb, d, port) + P_LOCK
    locked = _channel_read_trylock(lk, me | CHANNEL_LOCK_READER)
    if not locked:
        return np.int64(0)
    r = np.int64(0)
    # Xen's virq_lock keeps the binding stable; here re-check under the channel lock that the
    # port still serves this VIRQ (it may have been closed and re-bound since the lookup).
    if load_u32(_xen_vcpu(tb, d, v if per_vcpu else 0) + X_VIRQ + 4 * virq) == port:
        r = _set_pending(tb, d, v if per_vcpu else _notify_vcpu(tb, d, port), port, me)
    if locked == 1:
        lock_release(lk)
    return r


# --- entry kernels: guest mask / unmask ----------------------------------------------------------


@njit(cache=True)
def _guest_mask(tb, d, port):
    """Linux mask_evtchn: set MASKED (FIFO, evtchn_fifo_mask) or the mask bit (2l/3l)."""
    if _T(tb, d, C_ABI) == ABI_FIFO:
        wa = _fifo_word(tb, d, port)
        if wa != 0:
            fetch_or_u32(wa, MASKED)
        return
    w = _T(tb, d, C_WB)
    ws = _T(tb, d, C_WSHIFT)
    _test_and_set(tb, d, _T(tb, d, C_MASK), port >> ws, port & (w - 1))


@njit(cache=True)
def _guest_unmask(tb, d, port, me):
    """Linux unmask_evtchn after the XSA-332 series (as _core.guest_unmask): a barrier first
    (evtchn_2l_unmask's smp_wmb, 4d3fe31bd993); FIFO: clear_masked_cond (f01337197419);
    2l/3l: evtchn_2l_unmask's HVM path (clear the mask, test pending, re-mask, hypercall)."""
    fence()  # XSA-332: every earlier write is visible before the port can be handled
    if _T(tb, d, C_ABI) == ABI_FIFO:
        return _fifo_guest_unmask(tb, d, port, me)
    w = _T(tb, d, C_WB)
    ws = _T(tb, d, C_WSHIFT)
    mask = _T(tb, d, C_MASK)
    if _hdr(tb, d, H_INJECT) == INJ_UNMASK_TEST_FIRST:  # R2: pending tested too early
        pending = _test(tb, d, _T(tb, d, C_PEND), port >> ws, port & (w - 1))
        _pause_ns(R2_PAUSE_NS)  # the window, widened (timing only)
        _test_and_clear(tb, d, mask, port >> ws, port & (w - 1))
    else:
        _test_and_clear(tb, d, mask, port >> ws, port & (w - 1))
        pending = _test(tb, d, _T(tb, d, C_PEND), port >> ws, port & (w - 1))
    if pending:
        _test_and_set(tb, d, mask, port >> ws, port & (w - 1))
        return _hyp_unmask(tb, d, port, me)
    return np.int64(0)


@njit(cache=True)
def _fifo_guest_unmask(tb, d, port, me):
    """events_fifo.c clear_masked_cond (as _core.fifo_guest_unmask): clear MASKED by a cmpxchg
    expecting BUSY clear, spinning with a CPU relax while Xen retries a LINK with BUSY set
    (dae2a1c5f9); a PENDING port goes to EVTCHNOP_unmask. After UNMASK_BUSY_SPINS relaxes and
    UNMASK_BUSY_YIELDS yields, BUSY may have been left by a sender killed in set_link:
    _fifo_clear_stale_busy."""
    wa = _fifo_word(tb, d, port)
    if wa == 0:
        return np.int64(0)
    w = load_u32(wa)
    busy = 0
    while True:
        if not w & MASKED:
            return np.int64(0)
        if w & PENDING:
            return _hyp_unmask(tb, d, port, me)
        expected = w & ~BUSY
        old = cas_u32(wa, expected, expected & ~MASKED)
        if old == expected:
            return np.int64(0)
        w = old
        if not w & BUSY:
            continue  # another change: retry at once
        busy += 1
        if busy <= UNMASK_BUSY_SPINS:
            cpu_relax()
        elif busy <= UNMASK_BUSY_SPINS + UNMASK_BUSY_YIELDS:
            sched_yield()
        else:
            _fifo_clear_stale_busy(tb, d, port, wa, me)
            busy = 0
            w = load_u32(wa)


@njit(cache=True)
def _fifo_clear_stale_busy(tb, d, port, wa, me):
    """As _core.fifo_clear_stale_busy: BUSY is only set by a linker holding the lock of the
    queue this event was last linked on (its lastq); once we hold that lock (lastq re-checked
    under it) no live linker is in set_link on this word, so a BUSY still set was left by a
    dead one: clear it."""
    pe = _port(tb, d, port)
    while True:
        lastq = np.int64(load_u32(pe + P_LASTQ))
        if (lastq >> 16) >= _T(tb, d, C_VCPUS):  # never written so by Xen: nothing to lock
            fetch_and_u32(wa, ~BUSY)
            return
        lk = _queue(tb, d, lastq >> 16, lastq & 0xFF) + Q_LOCK
        _lock(lk, me)
        if np.int64(load_u32(pe + P_LASTQ)) == lastq:
            break
        lock_release(lk)
    fetch_and_u32(wa, ~BUSY)
    lock_release(lk)


# --- guest side: the upcall handler --------------------------------------------------------------
# `out` is the caller's uint32 buffer (address, capacity); `pw` a scratch bitmap of W-bit words
# (address): bit k set = pending-array word k still to scan (2l: one word; 3l: W words).


@njit(cache=True)
def _active(tb, d, v, word):
    """pending & ~mask & cpu_evtchn_mask[cpu] of one word (active_evtchns)."""
    wb = _T(tb, d, C_WB)
    wbytes = wb // 8
    pend = _wload(_T(tb, d, C_PEND) + word * wbytes, wb)
    mask = _wload(_T(tb, d, C_MASK) + word * wbytes, wb)
    cpu = _wload(_T(tb, d, C_CPUMASK) + _T(tb, d, C_CPUB) * v + word * wbytes, wb)
    return pend & ~mask & cpu


@njit(inline="always", cache=True)
def _deliver(tb, d, port, out, n):
    """The IRQ ack then the handler: delivered iff this atomic clear saw PENDING set."""
    w = _T(tb, d, C_WB)
    ws = _T(tb, d, C_WSHIFT)
    if _test_and_clear(tb, d, _T(tb, d, C_PEND), port >> ws, port & (w - 1)):
        _pstore_u32(out + 4 * n, port)
        return n + 1
    return n


@njit(cache=True)
def _take_selectors(tb, d, v, pw, npw):
    """xchg the selector(s) to 0 into pw: bit k of the pw words = pending-array word k."""
    wb = _T(tb, d, C_WB)
    l1 = _wxchg(_vcpu_info(tb, d, v) + _T(tb, d, C_SEL), wb, _U64_ZERO)
    if _T(tb, d, C_ABI) == ABI_2L:
        _pstore_u64(pw, l1)
        return
    l2base = _T(tb, d, C_L2SEL) + _T(tb, d, C_L2B) * v
    for j in range(npw):
        if (l1 >> np.uint64(j)) & _U64_ONE:
            _pstore_u64(pw + 8 * j, _wxchg(l2base + j * (wb // 8), wb, _U64_ZERO))
        else:
            _pstore_u64(pw + 8 * j, _U64_ZERO)


@njit(cache=True)
def _put_back(tb, d, v, pw, npw):
    """Return unscanned selector bits, then set the upcall flag (a software resend)."""
    wb = _T(tb, d, C_WB)
    sel = _vcpu_info(tb, d, v) + _T(tb, d, C_SEL)
    if _T(tb, d, C_ABI) == ABI_2L:
        _wor(sel, wb, _pload_u64(pw))
    else:
        l2base = _T(tb, d, C_L2SEL) + _T(tb, d, C_L2B) * v
        l1 = _U64_ZERO
        for j in range(npw):
            x = _pload_u64(pw + 8 * j)
            if x != _U64_ZERO:
                _wor(l2base + j * (wb // 8), wb, x)
                l1 |= _bit(j)
        _wor(sel, wb, l1)
    fetch_or_u8(_vcpu_info(tb, d, v) + VI_UPCALL_PENDING, 1)


@njit(cache=True)
def _find_from(pw, npw, w, start):
    """The lowest set bit >= start of the bitmap pw (W bits per word), or -1."""
    ws = 6 if w == 64 else 5
    j = start >> ws
    if j >= npw:
        return np.int64(-1)
    x = _pload_u64(pw + 8 * j) & (_U64_ALL << np.uint64(start & (w - 1)))
    while True:
        if x != _U64_ZERO:
            return j * w + np.int64(trailing_zeros(x))
        j += 1
        if j >= npw:
            return np.int64(-1)
        x = _pload_u64(pw + 8 * j)


@njit(cache=True)
def _any(pw, npw):
    for j in range(npw):
        if _pload_u64(pw + 8 * j) != _U64_ZERO:
            return True
    return False


@njit(cache=True)
def _bitmap_handle(tb, d, v, out, cap, n, pw, npw, taken):
    """events_2l.c evtchn_2l_handle_events (3l: one more selector level): the timer first,
    then a rotating scan resuming after the last port handled. -> (n, out was full)"""
    w = _T(tb, d, C_WB)
    ws = _T(tb, d, C_WSHIFT)
    timer = np.int64(load_u32(_xen_vcpu(tb, d, v) + X_VIRQ + 4 * VIRQ_TIMER))
    if (
        timer != 0
        and n < cap
        and ((_active(tb, d, v, timer >> ws) >> np.uint64(timer & (w - 1))) & _U64_ONE) != _U64_ZERO
    ):
        n = _deliver(tb, d, timer, out, n)
    if not taken:
        _take_selectors(tb, d, v, pw, npw)
    nwords = w if _T(tb, d, C_ABI) == ABI_2L else w * w
    g = _guest_vcpu(tb, d, v)
    start_word = np.int64(_load_rlx_u32(g + G_RESUME_WORD))
    start_bit = np.int64(_load_rlx_u32(g + G_RESUME_BIT))
    word = start_word
    i = 0
    while _any(pw, npw):
        nxt = _find_from(pw, npw, w, word)
        if nxt < 0:  # wrap around
            word = 0
            i += 1
            continue
        word = nxt
        bits = _active(tb, d, v, word)
        bit = start_bit if (word == start_word and i == 0) else 0
        while True:
            cand = bits & (_U64_ALL << np.uint64(bit))
            if cand == _U64_ZERO:
                break
            if n == cap:  # out is full: give the rest back
                _put_back(tb, d, v, pw, npw)
                return n, True
            bit = np.int64(trailing_zeros(cand))
            n = _deliver(tb, d, word * w + bit, out, n)
            bit = (bit + 1) & (w - 1)
            _store_rlx_u32(g + G_RESUME_BIT, bit)
            _store_rlx_u32(g + G_RESUME_WORD, word if bit != 0 else (word + 1) & (nwords - 1))
            if bit == 0:
                break
        if word != start_word or i != 0:  # the start word is scanned twice
            at = pw + 8 * (word >> ws)
            _pstore_u64(at, _pload_u64(at) & ~_bit(word & (w - 1)))
        word = (word + 1) & (nwords - 1)
        i += 1
    return n, False


@njit(cache=True)
def _fifo_consume_one(tb, d, v, q, ready, out, n):
    """events_fifo.c consume_one: clear_linked by cmpxchg, deliver iff PENDING and not MASKED
    and our atomic clear of PENDING saw it; the next LINK becomes the local head."""
    slot = _guest_vcpu(tb, d, v) + G_LOCAL_HEAD + 4 * q
    port = np.int64(_load_rlx_u32(slot))
    if port == 0:
        port = np.int64(load_u32(_control_block(tb, d, v) + CB_HEAD + 4 * q))
    wa = _fifo_word(tb, d, port) if port != 0 else np.int64(0)
    if wa == 0:  # no valid HEAD: nothing to take
        return ready & ~np.uint32(1 << q), n
    link_mask = _T(tb, d, C_LINKMASK)
    w = load_u32(wa)
    while True:
        old = cas_u32(wa, w, w & ~(LINKED | link_mask))
        if old == w:
            break
        w = old
    nxt = np.int64(w & link_mask)
    if nxt == 0:
        ready &= ~np.uint32(1 << q)
    w = load_u32(wa)
    if (w & PENDING) and not (w & MASKED):  # masked: dropped, stays PENDING
        if _btr32(wa, PENDING_BIT):
            _pstore_u32(out + 4 * n, port)
            n += 1
    _store_rlx_u32(slot, nxt)
    return ready, n


@njit(cache=True)
def _fifo_handle(tb, d, v, out, cap, n):
    """events_fifo.c __evtchn_fifo_handle_events: lowest ready priority first, READY re-read
    after every event so a higher priority preempts."""
    cb_ready = _control_block(tb, d, v) + CB_READY
    local_ready = _guest_vcpu(tb, d, v) + G_LOCAL_READY
    ready = _load_rlx_u32(local_ready) | xchg_u32(cb_ready, 0)
    _store_rlx_u32(local_ready, 0)
    while ready != 0:
        if n == cap:
            _store_rlx_u32(local_ready, ready)
            fetch_or_u8(_vcpu_info(tb, d, v) + VI_UPCALL_PENDING, 1)
            return n, True
        q = np.int64(trailing_zeros(ready))
        ready, n = _fifo_consume_one(tb, d, v, q, ready, out, n)
        ready |= xchg_u32(cb_ready, 0)
    return n, False


@njit(cache=True)
def _consume(tb, d, v, out, cap, me):
    """__xen_evtchn_do_upcall under the vCPU's handler lock: clear upcall_pending, handle
    events, repeat while it was set again; stops early when out (cap ports) is full."""
    hl = _guest_vcpu(tb, d, v) + G_HANDLER_LOCK
    _lock(hl, me)
    flag = _vcpu_info(tb, d, v) + VI_UPCALL_PENDING
    abi = _T(tb, d, C_ABI)
    pw = _scratch64()
    npw = _T(tb, d, C_WB) if abi == ABI_3L else 1
    r1 = abi != ABI_FIFO and _hdr(tb, d, H_INJECT) == INJ_SELECTOR_FIRST
    n = np.int64(0)
    while True:
        if abi == ABI_FIFO:
            store_u8(flag, 0)
            n, full = _fifo_handle(tb, d, v, out, cap, n)
        elif r1:  # R1: the selector swapped first
            _take_selectors(tb, d, v, pw, npw)
            _pause_ns(R1_PAUSE_NS)  # the window, widened (timing only)
            store_u8(flag, 0)
            n, full = _bitmap_handle(tb, d, v, out, cap, n, pw, npw, True)
        else:
            store_u8(flag, 0)  # the master flag, then the selector
            n, full = _bitmap_handle(tb, d, v, out, cap, n, pw, npw, False)
        if full or not (load_u8(flag) & 1):
            break
    lock_release(hl)
    return n


@njit(nogil=True, cache=True)
def _wait(tb, d, v, timeout_ns, me, repair):
    """Sleep on the vCPU's kick futex until its upcall flag is set (True) or timeout_ns passed
    (False; < 0 waits forever). Returns early (False) when a signal interrupts the futex. With
    `repair`, first frees the waiter slots of waiters that died blocked. The caller is
    registered in a waiter slot for the whole call (kicks wake registered waiters only); with
    all slots taken it polls the flag every WAIT_FALLBACK_NS instead."""
    x = _xen_vcpu(tb, d, v)
    flag = _vcpu_info(tb, d, v) + VI_UPCALL_PENDING
    if load_u8(flag) & 1:
        return True
    if repair:
        _waiter_repair(tb, d, v, me)
    slot = _waiter_enter(tb, d, v, me)  # fences: Dekker with _mark_upcall_pending
    deadline = monotonic_ns() + timeout_ns
    got = False
    while True:
        seen = load_u32(x + X_KICK)
        fence()
        if load_u8(flag) & 1:
            got = True
            break
        if timeout_ns < 0:
            left = np.int64(-1)
        else:
            left = deadline - monotonic_ns()
            if left <= 0:
                break
        if slot < 0:
            _pause_ns(WAIT_FALLBACK_NS if left < 0 or left > WAIT_FALLBACK_NS else left)
        elif futex_wait(x + X_KICK, seen, left) == -EINTR:
            break
    _waiter_leave(tb, d, v, slot)
    return got


@njit(cache=True)
def _upcall_pending(tb, d, v):
    return (load_u8(_vcpu_info(tb, d, v) + VI_UPCALL_PENDING) & 1) != 0


@njit(cache=True)
def _spin_upcall(tb, d, v, until_ns):
    """wait()'s spin before it registers as a waiter: look at the upcall flag (a CPU relax
    between looks) until it is set (True) or CLOCK_MONOTONIC reaches until_ns (False). No
    waiter slot is taken, so a sender's kick pays no wake-up for a spinning vCPU."""
    flag = _vcpu_info(tb, d, v) + VI_UPCALL_PENDING
    while True:
        for _ in range(SPIN_LOOKS_PER_CLOCK):
            if load_u8(flag) & 1:
                return True
            cpu_relax()
        if monotonic_ns() >= until_ns:
            return False


# --- SCHEDOP_poll (do_poll): enter and test, sleep in slices, leave ------------------------------
# The blocking loop is Python-level around these, as wait()'s is, so Python sees Ctrl-C between
# slices. `st` (2 int64: entered, the kick count last seen) is written by the kernels: "entered"
# by the one that enters the poll, so a signal raised between two calls cannot leave the caller
# unsure whether it has a poll to leave.


@njit(cache=True)
def _poll_begin(tb, d, v, ports, nports, st, me):
    """do_poll up to the sleep: block the vCPU (repair dead waiters' slots, take one; its index
    is kept at st + 16), count it in the pollers and set its poll_mask bit, then test local
    events and each of the nports u32 ports at `ports` in the guest's order (-EINVAL for one
    beyond valid_evtchns or not in use). -> (reason, port), or (POLL_AGAIN, 0) when the caller
    is to sleep."""
    x = _xen_vcpu(tb, d, v)
    pollers = _T(tb, d, C_BASE) + H_POLLERS
    _waiter_repair(tb, d, v, me)
    _pstore_u64(st + 16, _waiter_enter(tb, d, v, me))  # before the kick snapshot: kicks count
    _pstore_u64(st + 8, load_u32(x + X_KICK))
    if xchg_u32(x + X_POLL, POLL_IDLE) == POLL_ACTIVE:
        fetch_sub_u32(pollers, 1)  # left by a poller of this vCPU that died
    # Count in before setting the bit: a pollers check that sees the bit must also see the
    # count (else it could claim us and take another poller's count to 0).
    fetch_add_u32(pollers, 1)
    _store_rel_u32(x + X_POLL_EVTCHN, 0xFFFFFFFF)  # -1: several ports, until tested
    xchg_u32(x + X_POLL, POLL_ACTIVE)
    fence()  # Dekker with _check_pollers: set, test
    _pstore_u64(st, 1)
    vi = _vcpu_info(tb, d, v)
    if load_u8(vi + VI_UPCALL_PENDING) & 1 and not load_u8(vi + VI_UPCALL_MASK) & 1:
        return np.int64(POLL_UPCALL), np.int64(0)  # local_events_need_delivery()
    for i in range(nports):  # evtchn_port_poll, in the guest's order
        port = np.int64(_pload_u32(ports + 4 * i))
        if port >= _hdr(tb, d, H_VALID) or _state(tb, d, port) <= ECS_RESERVED:
            return np.int64(-EINVAL), port  # invalid, or not in use (d4bfa0c78f)
        if _is_pending(tb, d, port):
            return np.int64(POLL_PENDING), port
    if nports == 1:
        _store_rel_u32(x + X_POLL_EVTCHN, _pload_u32(ports))
    return np.int64(POLL_AGAIN), np.int64(0)


@njit(nogil=True, cache=True)
def _poll_sleep(tb, d, v, st, deadline):
    """One slice of do_poll's block: (POLL_EVENT, port) if a pollers check cleared our bit,
    (POLL_UPCALL, 0) if a kick unblocked the vCPU, (POLL_TIMEOUT, 0) at `deadline` (monotonic
    ns; < 0: none); else sleep on the kick futex, at most WAIT_SLICE_NS, and return
    (POLL_AGAIN, 0). The kick count last seen is kept at st + 8, the waiter slot at st + 16
    (-1: none, so kicks do not see us: poll the upcall flag every WAIT_FALLBACK_NS)."""
    x = _xen_vcpu(tb, d, v)
    vi = _vcpu_info(tb, d, v)
    slot = np.int64(_pload_u64(st + 16))
    while True:
        seen = load_u32(x + X_KICK)
        fence()
        state = np.int64(load_u32(x + X_POLL))
        if state != POLL_ACTIVE:  # a pollers check woke us
            return np.int64(POLL_EVENT), state & ~np.int64(POLL_WOKEN)
        if seen == _pload_u64(st + 8):
            break
        # vcpu_kick -> vcpu_unblock ends the poll. A kick comes with the upcall flag set;
        # without it, this is a late wake-up from a pollers check that ended an earlier
        # poll: not ours.
        if load_u8(vi + VI_UPCALL_PENDING) & 1:
            return np.int64(POLL_UPCALL), np.int64(0)
        _pstore_u64(st + 8, seen)
    if slot < 0 and load_u8(vi + VI_UPCALL_PENDING) & 1:
        return np.int64(POLL_UPCALL), np.int64(0)  # no waiter slot: a kick may have missed us
    slice_ns = np.int64(WAIT_SLICE_NS)
    if deadline >= 0:
        left = deadline - monotonic_ns()
        if left <= 0:
            return np.int64(POLL_TIMEOUT), np.int64(0)
        if left < slice_ns:
            slice_ns = left
    if slot < 0:
        _pause_ns(WAIT_FALLBACK_NS if slice_ns > WAIT_FALLBACK_NS else slice_ns)
    else:
        futex_wait(x + X_KICK, seen, slice_ns)
    return np.int64(POLL_AGAIN), np.int64(0)


@njit(cache=True)
def _poll_end(tb, d, v, st):
    """Leave the poll -> the X_POLL value taken. Whoever clears the poll_mask bit ends the
    poll: if a pollers check cleared it, it counted us out and the poll ended with its event.
    Then the vCPU is unblocked (its waiter slot, kept at st + 16, freed)."""
    x = _xen_vcpu(tb, d, v)
    state = xchg_u32(x + X_POLL, POLL_IDLE)
    if state == POLL_ACTIVE:
        fetch_sub_u32(_T(tb, d, C_BASE) + H_POLLERS, 1)
    _store_rel_u32(x + X_POLL_EVTCHN, 0)
    _waiter_leave(tb, d, v, np.int64(_pload_u64(st + 16)))
    return np.int64(state)


# --- entry kernels: the domain table as an array, called once per Python call --------------------


@njit(cache=True)
def _tb(dt):
    return np.int64(dt.ctypes.data)


@njit(nogil=True, cache=True)
def k_set_pending(dt, d, v, port, me):
    """set_pending on (domain d, vCPU v, port) -> 1 if PENDING went 0 -> 1, else 0."""
    return _set_pending(_tb(dt), d, v, port, me)


@njit(cache=True)
def k_clear_pending(dt, d, port):
    return _clear_pending(_tb(dt), d, port)


@njit(nogil=True, cache=True)
def k_hyp_unmask(dt, d, port, me):
    return _hyp_unmask(_tb(dt), d, port, me)


@njit(cache=True)
def k_is_pending(dt, d, port):
    return _is_pending(_tb(dt), d, port)


@njit(cache=True)
def k_is_masked(dt, d, port):
    return _is_masked(_tb(dt), d, port)


@njit(cache=True)
def k_is_linked(dt, d, port):
    return _is_linked(_tb(dt), d, port)


@njit(nogil=True, cache=True)
def k_expand_array(dt, d, me):
    return _expand_array(_tb(dt), d, me)


@njit(nogil=True, cache=True)
def k_send(dt, d, port, me):
    return _send(_tb(dt), dt.shape[0], d, port, me)


@njit(nogil=True, cache=True)
def _send_many(tb, nrows, d, ports, nports, edges, nedges, me):
    """send() each port of the uint32 array at `ports`; the uint8 array at `edges` gets 1 where
    that send was a new edge (skipped when nedges < nports). Stops at the first refusal:
    (number sent, errno or 0)."""
    write = nedges >= nports
    for i in range(nports):
        r = _send(tb, nrows, d, np.int64(_pload_u32(ports + 4 * i)), me)
        if r < 0:
            return np.int64(i), -r
        if write:
            _pstore_u8(edges + i, r)
    return np.int64(nports), np.int64(0)


@njit(nogil=True, cache=True)
def k_send_many(dt, d, ports, edges, me):
    return _send_many(
        _tb(dt),
        dt.shape[0],
        d,
        np.int64(ports.ctypes.data),
        ports.shape[0],
        np.int64(edges.ctypes.data),
        edges.shape[0],
        me,
    )


@njit(nogil=True, cache=True)
def k_raise_virq(dt, d, virq, v, me):
    return _raise_virq(_tb(dt), d, virq, v, me)


@njit(cache=True)
def k_guest_mask(dt, d, port):
    _guest_mask(_tb(dt), d, port)


@njit(nogil=True, cache=True)
def k_guest_unmask(dt, d, port, me):
    return _guest_unmask(_tb(dt), d, port, me)


@njit(nogil=True, cache=True)
def k_consume(dt, d, v, out, me):
    return _consume(_tb(dt), d, v, np.int64(out.ctypes.data), out.shape[0], me)


@njit(nogil=True, cache=True)
def k_wait(dt, d, v, timeout_ns, me, repair):
    return _wait(_tb(dt), d, v, timeout_ns, me, repair)


@njit(nogil=True, cache=True)
def k_spin_upcall(dt, d, v, until_ns):
    return _spin_upcall(_tb(dt), d, v, until_ns)


@njit(cache=True)
def k_upcall_pending(dt, d, v):
    return _upcall_pending(_tb(dt), d, v)


@njit(cache=True)
def k_poll_begin(dt, d, v, ports, st, me):
    return _poll_begin(
        _tb(dt), d, v, np.int64(ports.ctypes.data), ports.shape[0], np.int64(st.ctypes.data), me
    )


@njit(nogil=True, cache=True)
def k_poll_sleep(dt, d, v, st, deadline):
    return _poll_sleep(_tb(dt), d, v, np.int64(st.ctypes.data), deadline)


@njit(cache=True)
def k_poll_end(dt, d, v, st):
    return _poll_end(_tb(dt), d, v, np.int64(st.ctypes.data))


# --- locks and guest bitops at raw addresses (the control plane's primitives) --------------------


@njit(nogil=True, cache=True)
def k_lock(addr, me, slice_ns):
    """One slice of a lock wait from Python: 1 taken, 0 not yet (slice_ns passed), -1 this
    thread already holds it (read-type or not: EDEADLK)."""
    if lock_try(addr, me):
        return np.int64(1)
    owner = np.int64(load_u64(addr))
    if owner != 0 and (owner | CHANNEL_LOCK_READER) == (me | CHANNEL_LOCK_READER):
        return np.int64(-1)
    return np.int64(0) if lock_acquire_for(addr, me, slice_ns) < 0 else np.int64(1)


@njit(cache=True)
def k_trylock(addr, me):
    return lock_try_robust(addr, me)


@njit(cache=True)
def k_unlock(addr):
    lock_release(addr)


@njit(cache=True)
def k_unlock_owned(addrs, me):
    """Release each lock at the addresses in the int64 array `addrs` that `me` holds
    (read-type or not); the number released."""
    released = 0
    for i in range(addrs.shape[0]):
        owner = np.int64(load_u64(addrs[i]))
        if owner != 0 and (owner | CHANNEL_LOCK_READER) == (me | CHANNEL_LOCK_READER):
            lock_release(addrs[i])
            released += 1
    return released


@njit(cache=True)
def k_set_bit(addr, bit, wb):
    _wor(addr, wb, _bit(bit))


@njit(cache=True)
def k_clear_bit(addr, bit, wb):
    _wand(addr, wb, ~_bit(bit))


# --- the domain table ----------------------------------------------------------------------------


def table_row(dm) -> np.ndarray:
    """The domain-table row of one mapped domain (evtchn.memory.DomainMemory)."""
    lay, base = dm.layout, dm.seg.address
    off = lay.offsets
    row = np.zeros(NCOLS, np.int64)
    row[C_BASE] = base
    row[C_ABI], row[C_WB], row[C_LB] = dm.abi, dm.word_bits, dm.link_bits
    row[C_VCPUS], row[C_MAXP], row[C_SIZE] = dm.vcpus, dm.max_ports, dm.seg.size
    for col, name in (
        (C_SI, "shared_info"),
        (C_VIEXT, "vcpu_info_ext"),
        (C_CTRL, "control"),
        (C_L3P, "l3_pending"),
        (C_L3M, "l3_mask"),
        (C_L2SEL, "l2_selector"),
        (C_PORTS, "ports"),
        (C_XV, "xen_vcpu"),
        (C_GV, "guest_vcpu"),
        (C_CPUMASK, "cpumask"),
        (C_EA, "event_array"),
    ):
        row[col] = base + off[name]
    row[C_CPUB] = lay.cpumask_bytes
    if dm.abi == L.ABI_3L:
        row[C_PEND], row[C_MASK] = row[C_L3P], row[C_L3M]
    else:
        row[C_PEND] = row[C_SI] + L.SI_PENDING
        row[C_MASK] = row[C_SI] + L.si_mask(dm.word_bits)
    row[C_SEL] = L.vi_pending_sel(dm.word_bits)
    row[C_L2B] = lay.l2_selector_bytes
    row[C_LINKMASK] = (1 << dm.link_bits) - 1
    row[C_WSHIFT] = dm.word_bits.bit_length() - 1
    return row


_NO_EDGES = np.zeros(0, np.uint8)


def _u32_vector(a):
    """The uint32[::1] buffer CythonKernels.poll takes, refused otherwise as its typed
    memoryview refuses it (TypeError for a non-buffer, ValueError for the wrong shape)."""
    if not isinstance(a, np.ndarray):
        a = np.asarray(memoryview(a))
    if a.dtype != np.uint32 or a.ndim != 1 or not a.flags.c_contiguous:
        raise ValueError(f"expected a 1-D contiguous uint32 buffer, got {a.dtype} {a.shape}")
    return a


class NumbaKernels:
    """The ReferenceKernels interface over jitted kernels; safe across processes."""

    name = "numba"
    multiprocess = True

    def __init__(self) -> None:
        self.doms = {}  # keeps every mapped segment alive
        self.table = np.zeros((4, NCOLS), np.int64)
        self._poll_ready = False  # poll's kernels compiled (see poll)

    def map_domain(self, dm) -> None:
        rows = self.table.shape[0]
        if dm.domid >= rows:  # grow; earlier tables stay valid for their rows
            new = np.zeros((max(2 * rows, dm.domid + 1), NCOLS), np.int64)
            new[:rows] = self.table
            self.table = new
        self.table[dm.domid] = table_row(dm)
        self.doms[dm.domid] = dm

    # -- locks and bitops at raw addresses ------------------------------------------------------
    def lock(self, address: int, reader: bool = False) -> None:
        """Take the lock for the calling thread (a channel lock read-type with `reader`, as a
        sender holds it), as CythonKernels.lock: without the GIL in slices of LOCK_SLICE_NS,
        Python signal handlers running between them; EDEADLK if this thread holds it."""
        me = owner_id() | (CHANNEL_LOCK_READER if reader else 0)
        while True:
            got = k_lock(address, me, LOCK_SLICE_NS)
            if got > 0:
                return
            if got < 0:
                raise EvtchnError(
                    _errno.EDEADLK, f"this thread already holds the lock at {address:#x}"
                )

    def trylock(self, address: int) -> bool:
        """Take the lock if it is free or its owner is dead; False if a live owner holds it."""
        return bool(k_trylock(address, owner_id()))

    def unlock(self, address: int) -> None:
        k_unlock(address)

    def unlock_owned(self, addresses) -> int:
        """Release each lock at `addresses` that the calling thread holds, in one kernel call
        (no signal can stop it halfway); returns how many it released."""
        return int(k_unlock_owned(np.asarray(addresses, np.int64), owner_id()))

    def set_bit(self, address: int, bit: int, word_bits: int) -> None:
        k_set_bit(address, bit, word_bits)

    def clear_bit(self, address: int, bit: int, word_bits: int) -> None:
        k_clear_bit(address, bit, word_bits)

    # -- hypervisor side --------------------------------------------------------------------------
    def set_pending(self, domid: int, vcpu: int, port: int) -> int:
        return k_set_pending(self.table, domid, vcpu, port, owner_id())

    def clear_pending(self, domid: int, port: int) -> int:
        return k_clear_pending(self.table, domid, port)

    def hyp_unmask(self, domid: int, port: int) -> int:
        return k_hyp_unmask(self.table, domid, port, owner_id())

    def is_pending(self, domid: int, port: int) -> bool:
        return bool(k_is_pending(self.table, domid, port))

    def is_masked(self, domid: int, port: int) -> bool:
        return bool(k_is_masked(self.table, domid, port))

    def is_linked(self, domid: int, port: int) -> bool:
        return bool(k_is_linked(self.table, domid, port))

    def expand_array(self, domid: int) -> int:
        return k_expand_array(self.table, domid, owner_id())

    def send(self, domid: int, port: int) -> int:
        return k_send(self.table, domid, port, owner_id())

    def warm_up(self) -> None:
        """Load every entry kernel from numba's cache (compiling what is missing) without
        running it, so that a process's first hypercalls do not pay for it: about half a
        second per process with a warm cache. The stress harness's workers call this before
        they report ready, so the racing clock does not count it."""
        t, i = self.table, 0
        u32, u8, st = np.zeros(1, np.uint32), np.zeros(1, np.uint8), np.zeros(3, np.int64)
        me = owner_id()
        for kernel, args in (
            (k_set_pending, (t, i, i, i, i)),
            (k_clear_pending, (t, i, i)),
            (k_hyp_unmask, (t, i, i, i)),
            (k_is_pending, (t, i, i)),
            (k_is_masked, (t, i, i)),
            (k_is_linked, (t, i, i)),
            (k_expand_array, (t, i, i)),
            (k_send, (t, i, i, i)),
            (k_send_many, (t, i, u32, u8, i)),
            (k_raise_virq, (t, i, i, i, i)),
            (k_guest_mask, (t, i, i)),
            (k_guest_unmask, (t, i, i, i)),
            (k_consume, (t, i, i, u32, i)),
            (k_wait, (t, i, i, i, me, True)),
            (k_upcall_pending, (t, i, i)),
            (k_spin_upcall, (t, i, i, i)),
            (k_poll_begin, (t, i, i, u32, st, me)),
            (k_poll_sleep, (t, i, i, st, i)),
            (k_poll_end, (t, i, i, st)),
            (k_lock, (i, me, i)),
            (k_trylock, (i, me)),
            (k_unlock, (i,)),
            (k_unlock_owned, (np.zeros(1, np.int64), me)),
            (k_set_bit, (i, i, i)),
            (k_clear_bit, (i, i, i)),
        ):
            kernel.compile(tuple(typeof(a) for a in args))
        self._poll_ready = True

    def send_many(self, domid: int, ports, edges=None) -> tuple[int, int]:
        n, err = k_send_many(
            self.table, domid, ports, _NO_EDGES if edges is None else edges, owner_id()
        )
        return int(n), int(err)

    def raise_virq(self, domid: int, virq: int, vcpu: int) -> int:
        return k_raise_virq(self.table, domid, virq, vcpu, owner_id())

    # -- guest side -------------------------------------------------------------------------------
    def guest_mask(self, domid: int, port: int) -> None:
        k_guest_mask(self.table, domid, port)

    def guest_unmask(self, domid: int, port: int) -> int:
        return k_guest_unmask(self.table, domid, port, owner_id())

    def consume(self, domid: int, vcpu: int, out) -> int:
        return k_consume(self.table, domid, vcpu, out, owner_id())

    def wait(self, domid: int, vcpu: int, timeout: float | None, spin_ns: int = 0) -> bool:
        """First spin on the upcall flag for up to spin_ns (not registered: kicks cost the
        sender nothing), in slices of at most WAIT_SLICE_NS; then futex waits of at most
        WAIT_SLICE_NS each, so Python sees Ctrl-C between them; each slice is one kernel call
        that registers the waiter and leaves again, so a signal between calls cannot leave a
        waiter slot taken. The first repairs dead waiters' slots."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if spin_ns > 0 and self._spin(domid, vcpu, spin_ns, timeout):
            return True
        me, repair = owner_id(), True
        while True:
            if deadline is None:
                slice_ns = WAIT_SLICE_NS
            else:
                slice_ns = min(WAIT_SLICE_NS, max(0, int((deadline - time.monotonic()) * 1e9)))
            if k_wait(self.table, domid, vcpu, slice_ns, me, repair):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            repair = False

    def _spin(self, domid: int, vcpu: int, spin_ns: int, timeout: float | None) -> bool:
        now = time.monotonic_ns()
        until = now + spin_ns
        if timeout is not None:
            until = min(until, now + int(max(0.0, timeout) * 1e9))
        while True:
            step = min(until, time.monotonic_ns() + WAIT_SLICE_NS)
            if k_spin_upcall(self.table, domid, vcpu, step):
                return True
            if step >= until:
                return False

    def upcall_pending(self, domid: int, vcpu: int) -> bool:
        return bool(k_upcall_pending(self.table, domid, vcpu))

    def poll(self, domid: int, vcpu: int, ports, timeout: float | None) -> tuple[int, int]:
        """SCHEDOP_poll (do_poll) for `vcpu`, as CythonKernels.poll: (reason, port) with a
        POLL_* reason, or (-errno, port). Blocks until a pollers check clears the vCPU's
        poll_mask bit (POLL_EVENT), a kick unblocks it (POLL_UPCALL) or `timeout` seconds
        pass (None: forever), in futex slices of at most 50 ms, so Python sees Ctrl-C between
        them, as in wait()."""
        ports = _u32_vector(ports)
        if ports.shape[0] > L.SCHED_POLL_MAX_PORTS:
            return -EINVAL, 0
        deadline = -1  # CLOCK_MONOTONIC ns, as the kernels' monotonic_ns
        if timeout is not None and float(timeout) < 1e9:  # longer: as good as forever
            deadline = time.monotonic_ns() + int(max(0.0, float(timeout)) * 1e9)
        st = np.zeros(3, np.int64)  # entered, kick count, waiter slot: see _poll_begin
        me = owner_id()
        reason, port, state = POLL_AGAIN, 0, POLL_IDLE
        if not self._poll_ready:
            # Compile (or load) the sleep and the clean-up before entering: done lazily in
            # the finally clause, Ctrl-C could interrupt it and leave the vCPU counted in.
            k_poll_sleep.compile(tuple(typeof(a) for a in (self.table, domid, vcpu, st, deadline)))
            k_poll_end.compile(tuple(typeof(a) for a in (self.table, domid, vcpu, st)))
            self._poll_ready = True
        try:
            reason, port = k_poll_begin(self.table, domid, vcpu, ports, st, me)
            while reason == POLL_AGAIN:
                reason, port = k_poll_sleep(self.table, domid, vcpu, st, deadline)
        finally:
            if st[0]:
                state = k_poll_end(self.table, domid, vcpu, st)
        # A pollers check that cleared the bit while we timed out or were kicked ended the
        # poll with its event (it already counted us out).
        if state & POLL_WOKEN and reason in (POLL_TIMEOUT, POLL_UPCALL):
            return POLL_EVENT, state & ~POLL_WOKEN
        return reason, port


# --- cache guard ----------------------------------------------------------------------------------

CACHE_DEPS = (_HERE / "layout.py", _HERE / "_numba_atomics.py", _HERE / "numba_kernels.py")


def spin_policy() -> dict:
    """The spin and wait constants these kernels run with (compare _core.spin_policy)."""
    from . import _numba_atomics as A

    return {
        "LOCK_SPINS": A.LOCK_SPINS,
        "LOCK_YIELDS_PER_CHECK": A.LOCK_YIELDS_PER_CHECK,
        "LOCK_SLICE_NS": LOCK_SLICE_NS,
        "UNMASK_BUSY_SPINS": UNMASK_BUSY_SPINS,
        "UNMASK_BUSY_YIELDS": UNMASK_BUSY_YIELDS,
        "WAIT_SLICE_NS": WAIT_SLICE_NS,
        "WAIT_FALLBACK_NS": WAIT_FALLBACK_NS,
        "SPIN_LOOKS_PER_CLOCK": SPIN_LOOKS_PER_CLOCK,
        "WAITER_SLOTS": WAITER_SLOTS,
        "FIFO_LOCK_TRIES": LOCK_TRIES,
        "FIFO_LINK_RETRIES": LINK_RETRIES,
    }


refresh_cache_guard(globals(), "numba_kernels.deps", CACHE_DEPS[:2])
