"""The Cython kernels: evtchn.reference's algorithms with real atomics, so processes can race.

Every method has the interface, the step order and the return conventions of
``evtchn.reference.ReferenceKernels`` (read that first: it is the oracle, and each routine here
names the same Xen or Linux function). The difference is that each read-modify-write is a
seq_cst atomic on the shared segment, and the hypervisor side takes the locks Xen takes:

* send holds the sender's channel lock around reading its state and raising the peer
  (evtchn_send's evtchn_read_lock); raise_virq only *tries* it (evtchn_read_trylock) and drops
  the event when a writer (close, bind) holds it;
* FIFO set_pending locks the event's old and new queues (evtchn_fifo_set_pending after
  71ac522909) before it tests PENDING, MASKED and LINKED;
* the guest's upcall handler for a vCPU runs under that vCPU's handler lock (Linux never runs
  it twice at once on one CPU); everything else on the guest side is lock-free.

Locks are the robust spinlocks of evtchn._atomics, whose u64 word holds the owner: one id per
thread (tid and start time, see evtchn.layout), so threads of one process exclude each other as
processes do, and a dead owner (also one whose tid was reused) is taken over. Xen's channel lock
is a rwlock whose readers (send, EVTCHNOP_unmask, raise_virq) do not exclude one another; here
it is one owner word, so readers serialise, and a read-type holder stores its owner |
CHANNEL_LOCK_READER so that raise_virq can wait for a reader and drop its event only for a
writer, as Xen's trylock does (returning 0 then, so edge accounting stays exact). Waiting for an
upcall is a futex on the vCPU's kick word; a waiter registers in one of the vCPU's waiter slots,
and a sender only pays the wake-up system call when one is registered.

The entry methods compute the calling thread's owner id once (evtchn_self, a thread-local) and
pass it down as `me`; every nogil routine that takes a lock receives it.

Historical bugs (Host(inject=...), evtchn.layout.INJECTIONS) are put back where the reference
puts them (R1, R2, R6, R7); R9 (PENDING/LINKED tested before the queue locks) only matters
when processes race, so only the compiled backends model it.

Layout: all offsets come from evtchn.layout at import time; region offsets are read from each
domain's header in map_domain. The hot paths run without the GIL on raw pointers.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t, uintptr_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcpy
from libc.limits cimport INT_MAX
from posix.time cimport nanosleep, timespec
from cpython.exc cimport PyErr_CheckSignals

from evtchn._atomics cimport (
    at_load8, at_load16, at_load32, at_load64, at_load_sc32, at_load_sc64, at_store8,
    at_store32, at_store64, at_load_relaxed32, at_load_relaxed64, at_store_relaxed32,
    at_fetch_or32, at_fetch_or64, at_fetch_and32, at_fetch_and64, at_fetch_add32, at_fetch_sub32,
    at_exchange8, at_exchange32, at_exchange64, at_cas32, at_cas64,
    at_test_and_set_bit8, at_test_and_set_bit32, at_test_and_set_bit64,
    at_test_and_clear_bit32, at_test_and_clear_bit64,
    at_fence, cpu_relax, monotonic_ns, futex_wait_u32, futex_wake_u32,
    evtchn_self, evtchn_owner_init, evlock_owner_dead, evlock_set_policy,
    evlock_acquire, evlock_acquire_for, evlock_try, evlock_try_robust, evlock_release,
    evlock_spins, evlock_yields_per_check, EVTCHN_OWNER_TID_MASK, EVTCHN_OWNER_START_MASK,
)

import errno as E

from evtchn.errors import EvtchnError

cimport cython

from evtchn import layout as L

cdef extern from * nogil:
    # Count trailing zeros of a non-zero u64 (the index of its lowest set bit).
    int __builtin_ctzll(unsigned long long x)

cdef extern from "<sched.h>" nogil:
    int sched_yield()

# -- constants, from evtchn.layout (the one source); C globals so the kernels read them nogil --
cdef uint32_t ABI_2L = L.ABI_2L
cdef uint32_t ABI_3L = L.ABI_3L
cdef uint32_t ABI_FIFO = L.ABI_FIFO
cdef uint8_t ECS_RESERVED = L.ECS_RESERVED
cdef uint8_t ECS_UNBOUND = L.ECS_UNBOUND
cdef uint8_t ECS_INTERDOMAIN = L.ECS_INTERDOMAIN
cdef uint8_t ECS_IPI = L.ECS_IPI
cdef uint32_t VIRQ_TIMER = L.VIRQ_TIMER
cdef uint32_t NR_VIRQS = L.NR_VIRQS
cdef uint32_t VIRQ_PER_VCPU_MASK = sum(1 << v for v in L.VIRQ_PER_VCPU)

cdef uint32_t FIFO_PENDING = L.FIFO_PENDING
cdef uint32_t FIFO_MASKED = L.FIFO_MASKED
cdef uint32_t FIFO_LINKED = L.FIFO_LINKED
cdef uint32_t FIFO_BUSY = L.FIFO_BUSY
cdef unsigned FIFO_PENDING_BIT = L.FIFO_PENDING_BIT
cdef unsigned FIFO_LINKED_BIT = L.FIFO_LINKED_BIT
cdef uint32_t FIFO_WORDS_PER_PAGE = L.FIFO_WORDS_PER_PAGE
cdef uint32_t CB_READY = L.CB_READY
cdef uint32_t CB_HEAD = L.CB_HEAD
cdef int FIFO_LOCK_TRIES = L.FIFO_LOCK_TRIES
cdef int FIFO_LINK_RETRIES = L.FIFO_LINK_RETRIES

cdef uint32_t LEGACY_MAX_VCPUS = L.LEGACY_MAX_VCPUS
cdef uint32_t VCPU_INFO_SIZE = L.VCPU_INFO_SIZE
cdef uint32_t VI_UPCALL_PENDING = L.VI_UPCALL_PENDING
cdef uint32_t SI_PENDING = L.SI_PENDING
cdef uint32_t PAGE_SIZE = L.PAGE_SIZE

cdef uint32_t PORT_SIZE = L.PORT_SIZE
cdef uint32_t P_LOCK = L.P_LOCK
cdef uint32_t P_REMOTE_PORT = L.P_REMOTE_PORT
cdef uint32_t P_REMOTE_DOM = L.P_REMOTE_DOM
cdef uint32_t P_NOTIFY_VCPU = L.P_NOTIFY_VCPU
cdef uint32_t P_STATE = L.P_STATE
cdef uint32_t P_PRIORITY = L.P_PRIORITY
cdef uint32_t P_PENDING = L.P_PENDING
cdef uint32_t P_LASTQ = L.P_LASTQ

cdef uint32_t XEN_VCPU_SIZE = L.XEN_VCPU_SIZE
cdef uint32_t X_KICK = L.X_KICK
cdef uint32_t X_WAITERS = L.X_WAITERS
cdef uint32_t X_WAITER = L.X_WAITER
cdef enum:
    WAITER_SLOTS = 16                    # checked against layout.WAITER_SLOTS below
cdef uint32_t X_QUEUES = L.X_QUEUES
cdef uint32_t QUEUE_SIZE = L.QUEUE_SIZE
cdef uint32_t Q_TAIL = L.Q_TAIL
cdef uint32_t Q_LOCK = L.Q_LOCK
cdef uint32_t X_VIRQ = L.X_VIRQ
cdef uint32_t X_POLL_EVTCHN = L.X_POLL_EVTCHN
cdef uint32_t X_POLL = L.X_POLL
cdef uint32_t POLL_IDLE = L.POLL_IDLE
cdef uint32_t POLL_ACTIVE = L.POLL_ACTIVE
cdef uint32_t POLL_WOKEN = L.POLL_WOKEN
cdef int POLL_TIMEOUT = L.POLL_TIMEOUT
cdef int POLL_PENDING = L.POLL_PENDING
cdef int POLL_EVENT = L.POLL_EVENT
cdef int POLL_UPCALL = L.POLL_UPCALL
cdef uint32_t VI_UPCALL_MASK = L.VI_UPCALL_MASK

cdef uint32_t GUEST_VCPU_SIZE = L.GUEST_VCPU_SIZE
cdef uint32_t G_HANDLER_LOCK = L.G_HANDLER_LOCK
cdef uint32_t G_LOCAL_READY = L.G_LOCAL_READY
cdef uint32_t G_LOCAL_HEAD = L.G_LOCAL_HEAD
cdef uint32_t G_RESUME_WORD = L.G_RESUME_WORD
cdef uint32_t G_RESUME_BIT = L.G_RESUME_BIT

cdef uint32_t H_VALID = L.H_VALID
cdef uint32_t H_ARRAY_PAGES = L.H_ARRAY_PAGES
cdef uint32_t H_POLLERS = L.H_POLLERS

# Historical bugs put back on purpose (Host(inject=...)), so the stress harness can show that
# it catches them; 0 in normal operation. See evtchn.layout.INJECTIONS and the spec, section 5.
cdef uint32_t INJ_SELECTOR_FIRST = L.INJECTIONS["2l-selector-before-upcall-clear"]   # R1
cdef uint32_t INJ_UNMASK_TEST_FIRST = L.INJECTIONS["2l-unmask-test-before-clear"]    # R2
cdef uint32_t INJ_READY_EVERY_LINK = L.INJECTIONS["fifo-ready-every-link"]           # R6
cdef uint32_t INJ_OLD_TAIL_KEPT = L.INJECTIONS["fifo-old-tail-kept"]                 # R7
cdef uint32_t INJ_PENDING_BEFORE_LOCK = L.INJECTIONS["fifo-pending-before-lock"]     # R9
# R9's windows are nanoseconds wide; its injection widens them (timing only): the sender that
# set PENDING pauses before testing LINKED (the interrupt in 71ac522909's message), and a
# linker that found PENDING already set pauses with LINKED set and the queue locked.
cdef long R9_PAUSE_SET_NS = L.R9_PAUSE_SET_NS
cdef long R9_PAUSE_LINK_NS = L.R9_PAUSE_LINK_NS
cdef long R1_PAUSE_NS = L.R1_PAUSE_NS            # R1, R2, R6: the window widened (timing only)
cdef long R2_PAUSE_NS = L.R2_PAUSE_NS
cdef long R6_PAUSE_NS = L.R6_PAUSE_NS

cdef int EINVAL = 22
cdef int ESRCH = 3
cdef int ENOSPC = 28

# A 3-level scan covers W*W pending words: at most 64*64 bits, i.e. 64 u64 on the stack.
cdef enum:
    MAX_SCAN_U64 = 64

# The spin policy (evtchn.layout): the same constants as the Numba kernels.
# Longest single futex sleep in wait() and poll(): between slices we look for signals; all
# waiter slots taken, the upcall flag is polled this often instead.
cdef int64_t WAIT_SLICE_NS = L.WAIT_SLICE_NS
cdef int64_t WAIT_FALLBACK_NS = L.WAIT_FALLBACK_NS
cdef int SPIN_LOOKS_PER_CLOCK = L.SPIN_LOOKS_PER_CLOCK
# A lock taken from Python waits without the GIL this long between looks for signals.
cdef int64_t LOCK_SLICE_NS = L.LOCK_SLICE_NS
cdef unsigned UNMASK_BUSY_SPINS = L.UNMASK_BUSY_SPINS
cdef unsigned UNMASK_BUSY_YIELDS = L.UNMASK_BUSY_YIELDS
evlock_set_policy(L.LOCK_SPINS, L.LOCK_YIELDS_PER_CHECK)

# The owner bit of a channel lock taken read-type (send, EVTCHNOP_unmask, VIRQ raise).
cdef uint64_t CHANNEL_LOCK_READER = L.CHANNEL_LOCK_READER

if (WAITER_SLOTS != L.WAITER_SLOTS or EVTCHN_OWNER_TID_MASK != L.OWNER_TID_MASK
        or EVTCHN_OWNER_START_MASK != L.OWNER_START_MASK):
    raise ImportError("evtchn._core was built against another evtchn.layout: rebuild it")

# A forked child's thread has another tid: forget the parent's cached owner id there.
if evtchn_owner_init() != 0:
    raise ImportError("pthread_atfork failed")


def owner_id():
    """The calling thread's lock owner id, as the kernels store it (evtchn.owner.owner_id)."""
    return evtchn_self()


def spin_policy():
    """The spin and wait constants compiled into these kernels (tests compare them with
    evtchn.layout and with the Numba kernels')."""
    return {
        "LOCK_SPINS": evlock_spins,
        "LOCK_YIELDS_PER_CHECK": evlock_yields_per_check,
        "LOCK_SLICE_NS": LOCK_SLICE_NS,
        "UNMASK_BUSY_SPINS": UNMASK_BUSY_SPINS,
        "UNMASK_BUSY_YIELDS": UNMASK_BUSY_YIELDS,
        "WAIT_SLICE_NS": WAIT_SLICE_NS,
        "WAIT_FALLBACK_NS": WAIT_FALLBACK_NS,
        "SPIN_LOOKS_PER_CLOCK": SPIN_LOOKS_PER_CLOCK,
        "WAITER_SLOTS": WAITER_SLOTS,
        "FIFO_LOCK_TRIES": FIFO_LOCK_TRIES,
        "FIFO_LINK_RETRIES": FIFO_LINK_RETRIES,
    }


# -- one mapped domain ---------------------------------------------------------------------------
ctypedef struct dom_t:
    char *base               # NULL: this domid is not mapped (yet)
    size_t size              # bytes mapped at base
    uint32_t inject          # header H_INJECT: a historical bug to reproduce, 0 = none
    uint32_t abi
    uint32_t vcpus
    uint32_t wb              # xen_ulong_t width: 64, or 32 for the x86-32 compat layout
    uint32_t wshift          # log2(wb): ports to words by shifts, not divisions (hot paths)
    uint32_t link_mask       # FIFO: (1 << link_bits) - 1
    uint32_t max_fifo_ports  # FIFO: 1 << link_bits
    uint32_t nwords          # words a 2l/3l scan covers: W (2l) or W*W (3l)
    uint32_t sel_off         # evtchn_pending_sel in vcpu_info: 8 (x86-64) or 4 (compat)
    uint32_t l2sel_bytes     # 3l: one vCPU's L2 selector, W words
    uint64_t cpumask_bytes   # one vCPU's cpu_evtchn_mask
    char *pend               # 2l: shared_info.evtchn_pending; 3l: the L3 pending bitmap
    char *mask               # 2l: shared_info.evtchn_mask;    3l: the L3 mask bitmap
    char *shared_info
    char *vcpu_info_ext
    char *control
    char *l2_selector
    char *ports
    char *xen_vcpu
    char *guest_vcpu
    char *cpumask
    char *event_array
    uint32_t *valid          # header: valid_evtchns (grows, published with a release store)
    uint32_t *array_pages    # header: FIFO event-array pages added so far
    uint32_t *pollers        # header: vCPUs in SCHEDOP_poll (their poll_mask bit set)


# -- addresses of the per-port and per-vCPU structures (all offsets from evtchn.layout) ----------
cdef inline char *port_at(const dom_t *d, uint32_t port) noexcept nogil:
    return d.ports + <size_t>PORT_SIZE * port

cdef inline uint8_t port_state(const dom_t *d, uint32_t port) noexcept nogil:
    return at_load8(<uint8_t *>(port_at(d, port) + P_STATE))

cdef inline uint32_t notify_vcpu(const dom_t *d, uint32_t port) noexcept nogil:
    return at_load16(<uint16_t *>(port_at(d, port) + P_NOTIFY_VCPU))

cdef inline char *vcpu_info(const dom_t *d, uint32_t v) noexcept nogil:
    if v < LEGACY_MAX_VCPUS:
        return d.shared_info + <size_t>VCPU_INFO_SIZE * v
    return d.vcpu_info_ext + <size_t>VCPU_INFO_SIZE * (v - LEGACY_MAX_VCPUS)

cdef inline uint8_t *upcall_flag(const dom_t *d, uint32_t v) noexcept nogil:
    return <uint8_t *>(vcpu_info(d, v) + VI_UPCALL_PENDING)

cdef inline char *xen_vcpu(const dom_t *d, uint32_t v) noexcept nogil:
    return d.xen_vcpu + <size_t>XEN_VCPU_SIZE * v

cdef inline char *guest_vcpu(const dom_t *d, uint32_t v) noexcept nogil:
    return d.guest_vcpu + <size_t>GUEST_VCPU_SIZE * v

cdef inline uint32_t *guest_u32(const dom_t *d, uint32_t v, uint32_t field) noexcept nogil:
    return <uint32_t *>(guest_vcpu(d, v) + field)

cdef inline char *control_block(const dom_t *d, uint32_t v) noexcept nogil:
    return d.control + <size_t>PAGE_SIZE * v

cdef inline char *queue_at(const dom_t *d, uint32_t v, uint32_t prio) noexcept nogil:
    return xen_vcpu(d, v) + X_QUEUES + QUEUE_SIZE * prio

cdef inline uint32_t virq_port(const dom_t *d, uint32_t v, uint32_t virq) noexcept nogil:
    return at_load32(<uint32_t *>(xen_vcpu(d, v) + X_VIRQ + 4 * virq))


# -- xen_ulong_t bitmaps: u64 words, or u32 words in the compat layout ---------------------------
# One branch on d.wb per access; it is the same for a whole domain, so it predicts perfectly.
cdef inline uint64_t bm_load(const dom_t *d, char *base, size_t idx) noexcept nogil:
    if d.wb == 64:
        return at_load64(<uint64_t *>base + idx)
    return at_load32(<uint32_t *>base + idx)

cdef inline int bm_test_sc(const dom_t *d, char *base, uint32_t port) noexcept nogil:
    """Bit `port` of the bitmap, by a seq_cst load: the load that closes a store-buffering pair
    after a seq_cst RMW of the other bitmap (set_pending: set PENDING, read MASKED; unmask:
    clear MASKED, read PENDING). An acquire load may be satisfied before the RMW's store is
    visible (Arm); on x86 both compile to a plain mov after a locked RMW."""
    cdef size_t idx = port >> d.wshift
    if d.wb == 64:
        return (at_load_sc64(<uint64_t *>base + idx) >> (port % 64)) & 1
    return (at_load_sc32(<uint32_t *>base + idx) >> (port % 32)) & 1

cdef inline int bm_test_and_set(const dom_t *d, char *base, size_t idx,
                                unsigned bit) noexcept nogil:
    if d.wb == 64:
        return at_test_and_set_bit64(<uint64_t *>base + idx, bit)
    return at_test_and_set_bit32(<uint32_t *>base + idx, bit)

cdef inline int bm_test_and_clear(const dom_t *d, char *base, size_t idx,
                                  unsigned bit) noexcept nogil:
    if d.wb == 64:
        return at_test_and_clear_bit64(<uint64_t *>base + idx, bit)
    return at_test_and_clear_bit32(<uint32_t *>base + idx, bit)

cdef inline uint64_t bm_xchg(const dom_t *d, char *base, size_t idx, uint64_t v) noexcept nogil:
    if d.wb == 64:
        return at_exchange64(<uint64_t *>base + idx, v)
    return at_exchange32(<uint32_t *>base + idx, <uint32_t>v)

cdef inline void bm_or(const dom_t *d, char *base, size_t idx, uint64_t v) noexcept nogil:
    if d.wb == 64:
        at_fetch_or64(<uint64_t *>base + idx, v)
    else:
        at_fetch_or32(<uint32_t *>base + idx, <uint32_t>v)

cdef inline char *pending_sel(const dom_t *d, uint32_t v) noexcept nogil:
    """vcpu_info.evtchn_pending_sel (the L1 selector), as a one-word bitmap."""
    return vcpu_info(d, v) + d.sel_off

cdef inline char *l2_sel(const dom_t *d, uint32_t v) noexcept nogil:
    return d.l2_selector + <size_t>d.l2sel_bytes * v

cdef inline uint64_t mask_from(uint64_t bits, uint32_t bit) noexcept nogil:
    """bits with the bits below `bit` cleared (Linux MASK_LSBS); no bit survives bit >= 64."""
    if bit >= 64:
        return 0
    return bits & (~<uint64_t>0 << bit)

cdef inline uint32_t lowest_bit(uint64_t x) noexcept nogil:
    return <uint32_t>__builtin_ctzll(x)


# -- upcall and kick (vcpu_mark_events_pending, vcpu_kick) ---------------------------------------
cdef inline void kick(const dom_t *d, uint32_t v) noexcept nogil:
    """vcpu_kick: wake the vCPU's waiters, if any: only a blocked vCPU costs a system call. The
    load of the waiter bitmap follows the seq_cst RMW on the upcall flag and a fence (Dekker
    with waiter_enter, which sets its bit, fences, then re-reads the flag): one side sees the
    other."""
    cdef char *x = xen_vcpu(d, v)
    at_fence()
    if at_load32(<uint32_t *>(x + X_WAITERS)) != 0:
        at_fetch_add32(<uint32_t *>(x + X_KICK), 1)
        futex_wake_u32(<uint32_t *>(x + X_KICK), INT_MAX)


# -- waiters of a vCPU (Xen: the vCPU blocked in SCHEDOP_block / SCHEDOP_poll) -------------------
# A waiter claims one of WAITER_SLOTS u64 slots (CAS 0 -> its owner id), then sets the slot's
# bit in the X_WAITERS bitmap that kick() reads; it leaves by clearing its bit, then its slot.
# The owner ids let wait() and poll() repair the slots of a waiter that was killed while blocked,
# which would otherwise make every later kick of the vCPU pay a futex system call.
cdef int waiter_enter(const dom_t *d, uint32_t v, uint64_t me) noexcept nogil:
    """Register as blocked on vCPU v; the caller re-reads the upcall flag next (the fence here
    is the Dekker pairing with kick). Returns the slot, or -1 when all are taken: the caller
    then polls the upcall flag in short sleeps (WAIT_FALLBACK_NS) instead of the futex."""
    cdef char *x = xen_vcpu(d, v)
    cdef uint64_t *slots = <uint64_t *>(x + X_WAITER)
    cdef uint64_t expected
    cdef int i
    for i in range(WAITER_SLOTS):
        expected = 0
        if at_load_relaxed64(&slots[i]) == 0 and at_cas64(&slots[i], &expected, me):
            at_fetch_or32(<uint32_t *>(x + X_WAITERS), <uint32_t>1 << i)
            at_fence()
            return i
    return -1

cdef void waiter_leave(const dom_t *d, uint32_t v, int slot) noexcept nogil:
    """Clear the slot's bit, then free the slot: a slot is only reused once its bit is clear,
    so a leaver never clears a newcomer's bit."""
    cdef char *x = xen_vcpu(d, v)
    if slot < 0:
        return
    at_fetch_and32(<uint32_t *>(x + X_WAITERS), ~(<uint32_t>1 << slot))
    at_store64(<uint64_t *>(x + X_WAITER) + slot, 0)

cdef int waiter_repair(const dom_t *d, uint32_t v, uint64_t me) noexcept nogil:
    """Free the slots of waiters of vCPU v that died blocked (or of this very thread, which is
    not blocked since it is here). A dead slot is claimed first (CAS dead -> me), then its bit
    cleared and the slot zeroed as waiter_leave does: two repairers cannot both act on one
    slot, and a newcomer, which needs the slot at 0, never loses its bit. Returns the number
    of slots repaired."""
    cdef uint64_t *slots = <uint64_t *>(xen_vcpu(d, v) + X_WAITER)
    cdef uint64_t owner
    cdef int i, repaired = 0
    for i in range(WAITER_SLOTS):
        owner = at_load64(&slots[i])
        if owner == 0:
            continue
        if (owner == me or evlock_owner_dead(owner)) and at_cas64(&slots[i], &owner, me):
            waiter_leave(d, v, i)
            repaired += 1
    return repaired

cdef inline void mark_upcall_pending(const dom_t *d, uint32_t v) noexcept nogil:
    """test_and_set bit 0 of evtchn_upcall_pending; kick only on 0 -> 1."""
    if not at_test_and_set_bit8(upcall_flag(d, v), 0):
        kick(d, v)


cdef inline void unblock(const dom_t *d, uint32_t v) noexcept nogil:
    """vcpu_unblock of a vCPU whose poll this caller ended: wake its futex sleepers."""
    cdef char *x = xen_vcpu(d, v)
    at_fetch_add32(<uint32_t *>(x + X_KICK), 1)
    futex_wake_u32(<uint32_t *>(x + X_KICK), INT_MAX)

cdef void check_pollers(const dom_t *d, uint32_t port) noexcept nogil:
    """evtchn_check_pollers, called after PENDING went 0 -> 1: wake every vCPU polling this
    port (or polling several ports). A vCPU's poll_mask bit is cleared by one cmpxchg, which
    also records the port, so exactly one side (this, the timeout, or a kick) ends the poll.
    The seq_cst load of the pollers count follows the caller's seq_cst PENDING RMW: Dekker
    with poll(), which counts itself in, fences, then tests PENDING. No fence here: this runs
    on every new edge."""
    cdef uint32_t v, expected
    cdef int32_t pe
    cdef char *x
    if at_load_sc32(d.pollers) == 0:             # bitmap_empty(d->poll_mask): the usual case
        return
    for v in range(d.vcpus):
        x = xen_vcpu(d, v)
        if at_load_sc32(<uint32_t *>(x + X_POLL)) != POLL_ACTIVE:
            continue
        pe = <int32_t>at_load32(<uint32_t *>(x + X_POLL_EVTCHN))
        if pe > 0 and <uint32_t>pe != port:
            continue
        expected = POLL_ACTIVE
        if at_cas32(<uint32_t *>(x + X_POLL), &expected, POLL_WOKEN | port):
            # The poller may be gone (and polling again) by now: touch nothing of its state
            # but the count (it clears poll_evtchn itself) and the kick, which it ignores
            # unless an upcall is pending.
            at_fetch_sub32(d.pollers, 1)
            unblock(d, v)


# -- 2-level / 3-level hypervisor side (event_2l.c, generalised one level up for 3l) -------------
cdef inline void raise_selectors(const dom_t *d, uint32_t v, uint32_t port) noexcept nogil:
    """Selector(s) then the upcall flag, each a seq_cst test_and_set, in Xen's order."""
    cdef uint32_t sh = d.wshift, l2
    if d.abi == ABI_3L:                          # L2 bit `port / W` covers L3 word port / W
        l2 = port >> sh
        if bm_test_and_set(d, l2_sel(d, v), l2 >> sh, l2 & (d.wb - 1)):
            return
        if not bm_test_and_set(d, pending_sel(d, v), 0, l2 >> sh):
            mark_upcall_pending(d, v)
        return
    if not bm_test_and_set(d, pending_sel(d, v), 0, port >> sh):
        mark_upcall_pending(d, v)

cdef inline int bitmap_set_pending(const dom_t *d, uint32_t v, uint32_t port) noexcept nogil:
    """evtchn_2l_set_pending (event_2l.c): pending, then (if unmasked) selector(s), then the
    upcall flag. The mask is read seq_cst after the pending RMW: the guest's unmask clears the
    mask, then reads pending, so one of the two sees the other."""
    if bm_test_and_set(d, d.pend, port >> d.wshift, port & (d.wb - 1)):
        return 0                                 # coalesced: no pollers check
    if not bm_test_sc(d, d.mask, port):
        raise_selectors(d, v, port)
    check_pollers(d, port)
    return 1


# -- FIFO hypervisor side (event_fifo.c) ---------------------------------------------------------
cdef inline uint32_t *fifo_word(const dom_t *d, uint32_t port) noexcept nogil:
    """evtchn_fifo_word_from_port: NULL when the port's event-array page was not added. The
    acquire load pairs with expand_array's release store (the page is filled first)."""
    if port >= at_load32(d.array_pages) * FIFO_WORDS_PER_PAGE:
        return NULL
    return <uint32_t *>(d.event_array) + port

cdef inline int fifo_try_set_link(const dom_t *d, uint32_t *word, uint32_t *w,
                                  uint32_t link) noexcept nogil:
    """try_set_link: 0 if the tail is no longer LINKED (consumed: the caller writes HEAD), 1 if
    the cmpxchg linked it, -1 (Xen: -EAGAIN) if the word changed; *w is then refreshed."""
    if not w[0] & FIFO_LINKED:
        return 0
    if at_cas32(word, w, (w[0] & ~(FIFO_BUSY | d.link_mask)) | link):
        return 1
    return -1

cdef int fifo_set_link(const dom_t *d, uint32_t tail_port, uint32_t port) noexcept nogil:
    """evtchn_fifo_set_link (dae2a1c5f9): link the tail to `port` iff it is still LINKED; after
    one failed cmpxchg set BUSY (the guest cannot clear MASKED meanwhile) and retry at most 4
    times; a guest that keeps changing the word loses the event ("not linked")."""
    cdef uint32_t *word = fifo_word(d, tail_port)
    cdef uint32_t w
    cdef int r, _attempt
    if word == NULL:                             # cannot happen: a tail was linked in the array
        return 0
    w = at_load32(word)
    r = fifo_try_set_link(d, word, &w, port)
    if r >= 0:
        return r
    at_fetch_or32(word, FIFO_BUSY)               # guest_set_bit(BUSY)
    w = at_load32(word)
    for _attempt in range(FIFO_LINK_RETRIES):
        r = fifo_try_set_link(d, word, &w, port)
        if r >= 0:
            if r == 0:                           # r == 1 wrote the word with BUSY clear
                at_fetch_and32(word, ~FIFO_BUSY)
            return r
    at_fetch_and32(word, ~FIFO_BUSY)
    return 1

cdef inline void lock_pair(uint64_t *a, uint64_t *b, uint64_t me) noexcept nogil:
    """Lock one queue, or two in address order (Xen compares the queue pointers)."""
    if a == b:
        evlock_acquire(a, me)
    elif <uintptr_t>a < <uintptr_t>b:
        evlock_acquire(a, me)
        evlock_acquire(b, me)
    else:
        evlock_acquire(b, me)
        evlock_acquire(a, me)

cdef inline uint32_t lastq_pack(uint32_t v, uint32_t prio) noexcept nogil:
    """union evtchn_fifo_lastq: byte 0 last_priority, bytes 2-3 last_vcpu_id."""
    return (v << 16) | prio


cdef inline int fifo_lock_queues(const dom_t *d, uint32_t v, char *pe, char **pq,
                                 char **pold_q, uint32_t *pprio, uint64_t me) noexcept nogil:
    """The lock loop of evtchn_fifo_set_pending (71ac522909): lock the queue the event goes to
    (v's queue of its priority) and the one it was last linked on (lastq), one lock if they are
    the same, in address order. A guest may change the priority (or the control plane the
    vCPU) meanwhile, so re-check under the locks that the priority and lastq still name the
    same two queues, comparing queue addresses as Xen does; give up after 3 tries
    (e33d4257fc). Returns 1 with both held, 0 with none."""
    cdef uint32_t *plastq = <uint32_t *>(pe + P_LASTQ)
    cdef uint8_t *pprio_field = <uint8_t *>(pe + P_PRIORITY)
    cdef uint32_t lastq, prio
    cdef char *q
    cdef char *old_q
    cdef int _attempt
    for _attempt in range(FIFO_LOCK_TRIES):
        lastq = at_load32(plastq)
        prio = at_load8(pprio_field)
        q = queue_at(d, v, prio)
        old_q = queue_at(d, lastq >> 16, lastq & 0xFF)
        lock_pair(<uint64_t *>(q + Q_LOCK), <uint64_t *>(old_q + Q_LOCK), me)
        lastq = at_load32(plastq)
        if (q == queue_at(d, v, at_load8(pprio_field))
                and old_q == queue_at(d, lastq >> 16, lastq & 0xFF)):
            pq[0] = q
            pold_q[0] = old_q
            pprio[0] = prio
            return 1
        if q != old_q:
            evlock_release(<uint64_t *>(old_q + Q_LOCK))
        evlock_release(<uint64_t *>(q + Q_LOCK))
    return 0

cdef int fifo_set_pending(const dom_t *d, uint32_t v, uint32_t port, uint64_t me) noexcept nogil:
    """evtchn_fifo_set_pending (event_fifo.c after 71ac522909); pollers are checked last, after
    the event is queued and the queue unlocked, and only for a PENDING 0 -> 1 edge. Returns 1
    for such an edge."""
    cdef int first
    if d.inject == INJ_PENDING_BEFORE_LOCK:
        first = fifo_set_pending_r9(d, v, port, me)
    else:
        first = fifo_queue_event(d, v, port, me)
    if first:
        check_pollers(d, port)
    return first

cdef inline uint32_t *fifo_word_or_defer(const dom_t *d, uint32_t port, char *pe) noexcept nogil:
    """The port's event word; NULL when its page was not added, after noting the event in the
    port (evtchn->pending), which expand_array replays (917c123029)."""
    cdef uint32_t *word = fifo_word(d, port)
    if word != NULL:
        return word
    at_store8(<uint8_t *>(pe + P_PENDING), 1)
    # Dekker with expand_array (which publishes the page, fences, then reads the flag): if the
    # page appeared meanwhile its replay may have missed our flag, so raise the event here.
    at_fence()
    return fifo_word(d, port)

cdef inline int fifo_link_tail(const dom_t *d, uint32_t v, uint32_t prio, char *q,
                               uint32_t port) noexcept nogil:
    """Append `port` to queue q (locked): LINK on the tail, or a new HEAD when the queue was
    empty. Returns 1 if it was linked onto a tail."""
    cdef uint32_t *qtail = <uint32_t *>(q + Q_TAIL)
    cdef uint32_t tail = at_load_relaxed32(qtail)
    cdef int linked = 0
    if tail != 0:
        linked = fifo_set_link(d, tail, port)
    if not linked:                               # the queue was empty: a new HEAD
        at_store32(<uint32_t *>(control_block(d, v) + CB_HEAD) + prio, port)
    at_store_relaxed32(qtail, port)
    return linked

cdef inline void fifo_ready(const dom_t *d, uint32_t v, uint32_t prio) noexcept nogil:
    """Set the queue's READY bit; the upcall only if it was clear."""
    if not at_test_and_set_bit32(<uint32_t *>(control_block(d, v) + CB_READY), prio):
        mark_upcall_pending(d, v)

cdef int fifo_queue_event(const dom_t *d, uint32_t v, uint32_t port, uint64_t me) noexcept nogil:
    """The body of evtchn_fifo_set_pending, as in Xen after 71ac522909: lock the old and new
    queues, then test PENDING, MASKED and LINKED and link the event; READY and the upcall only
    for a new HEAD (70ccddb14a). Returns 1 if PENDING went 0 -> 1."""
    cdef char *pe = port_at(d, port)
    cdef uint32_t *word = fifo_word_or_defer(d, port, pe)
    cdef uint32_t prio = 0, first
    cdef char *q = NULL
    cdef char *old_q = NULL
    cdef uint32_t *old_tail
    cdef int linked, do_link
    if word == NULL:
        return 0
    if not fifo_lock_queues(d, v, pe, &q, &old_q, &prio, me):
        return 0                                 # "lost event (too many queue changes)"
    first = not at_test_and_set_bit32(word, FIFO_PENDING_BIT)
    do_link = (not at_load32(word) & FIFO_MASKED
               and not at_test_and_set_bit32(word, FIFO_LINKED_BIT))
    linked = 1
    if do_link:
        # An "old tail": the queue it was last on is empty now; forget it so that a later
        # link there cannot write into this event's word (e33d4257fc).
        old_tail = <uint32_t *>(old_q + Q_TAIL)
        if at_load_relaxed32(old_tail) == port and d.inject != INJ_OLD_TAIL_KEPT:
            at_store_relaxed32(old_tail, 0)
        if old_q != q:                           # moved: remember the new queue, drop the old
            at_store32(<uint32_t *>(pe + P_LASTQ), lastq_pack(v, prio))
            evlock_release(<uint64_t *>(old_q + Q_LOCK))
            old_q = q
        linked = fifo_link_tail(d, v, prio, q, port)
    if old_q != q:
        evlock_release(<uint64_t *>(old_q + Q_LOCK))
    evlock_release(<uint64_t *>(q + Q_LOCK))
    if linked and do_link and d.inject == INJ_READY_EVERY_LINK:
        # R6: READY for a link onto a non-empty queue too. The damage needs the guest to drain
        # the queue through our LINK before it sees this READY: pause here (as an interrupted
        # CPU would) so that the drain-vs-link duel can do that every time (timing only).
        pause_ns(R6_PAUSE_NS)
    if not linked or (do_link and d.inject == INJ_READY_EVERY_LINK):
        fifo_ready(d, v, prio)
    return first


cdef inline void pause_ns(long ns) noexcept nogil:
    cdef timespec ts
    ts.tv_sec = 0
    ts.tv_nsec = ns
    nanosleep(&ts, NULL)

cdef char *fifo_lock_old_queue(const dom_t *d, char *pe, uint64_t me) noexcept nogil:
    """Xen before 71ac522909 (lock_old_queue): lock only the queue the event was last on,
    re-checked under the lock, 3 tries. Returns it locked, or NULL."""
    cdef uint32_t *plastq = <uint32_t *>(pe + P_LASTQ)
    cdef uint32_t lastq
    cdef char *old_q
    cdef int _attempt
    for _attempt in range(FIFO_LOCK_TRIES):
        lastq = at_load32(plastq)
        old_q = queue_at(d, lastq >> 16, lastq & 0xFF)
        evlock_acquire(<uint64_t *>(old_q + Q_LOCK), me)
        lastq = at_load32(plastq)
        if old_q == queue_at(d, lastq >> 16, lastq & 0xFF):
            return old_q
        evlock_release(<uint64_t *>(old_q + Q_LOCK))
    return NULL

cdef int fifo_set_pending_r9(const dom_t *d, uint32_t v, uint32_t port,
                             uint64_t me) noexcept nogil:
    """R9 put back: evtchn_fifo_set_pending as Xen had it before 71ac522909. PENDING is set and
    MASKED/LINKED tested before any queue lock, so a sender that set PENDING can see LINKED
    set by a concurrent linker (an unmask) that has not queued the event yet, and return:
    its pollers are then woken before the event is visible to the guest. Two pauses widen the
    windows (R9_PAUSE_*): the first where 71ac522909 says the sender got interrupted, the
    second inside the relink (Xen held that lock with interrupts off; this is only a longer
    critical section, as a slow or preempted CPU makes it). The rest is the old code's order."""
    cdef char *pe = port_at(d, port)
    cdef uint32_t *word = fifo_word_or_defer(d, port, pe)
    cdef uint32_t prio
    cdef char *q
    cdef char *old_q
    cdef int first, linked
    if word == NULL:
        return 0
    first = not at_test_and_set_bit32(word, FIFO_PENDING_BIT)
    if first:
        pause_ns(R9_PAUSE_SET_NS)
    if at_load32(word) & (FIFO_MASKED | FIFO_LINKED):
        return first
    prio = at_load8(<uint8_t *>(pe + P_PRIORITY))   # no lock: may race a priority change
    q = queue_at(d, v, prio)
    old_q = fifo_lock_old_queue(d, pe, me)
    if old_q == NULL:
        return first
    if at_test_and_set_bit32(word, FIFO_LINKED_BIT):
        evlock_release(<uint64_t *>(old_q + Q_LOCK))
        return first
    if not first:
        pause_ns(R9_PAUSE_LINK_NS)
    if at_load_relaxed32(<uint32_t *>(old_q + Q_TAIL)) == port:
        at_store_relaxed32(<uint32_t *>(old_q + Q_TAIL), 0)
    if old_q != q:                               # moved: switch to the new queue's lock
        at_store32(<uint32_t *>(pe + P_LASTQ), lastq_pack(v, prio))
        evlock_release(<uint64_t *>(old_q + Q_LOCK))
        evlock_acquire(<uint64_t *>(q + Q_LOCK), me)
    linked = fifo_link_tail(d, v, prio, q, port)
    evlock_release(<uint64_t *>(q + Q_LOCK))
    if not linked:
        fifo_ready(d, v, prio)
    return first


# -- ABI dispatch (evtchn_port_set_pending, evtchn_port_unmask, ...) -----------------------------
cdef int channel_read_trylock(uint64_t *lock, uint64_t me_reader) noexcept nogil:
    """evtchn_read_trylock on the exclusive owner word: 0 (fail) only against a writer. A
    reader that is another thread or process is waited for (Xen would run beside it; here the
    two serialise): 1, the caller releases. A reader that is the calling thread itself is run
    beside, as in Xen (its read lock nests): 2, nothing to release. Owners are per thread, so
    a raise never runs unlocked beside another thread's reader, which a close could overtake
    to free the port under the raise. A writer that died holding the lock (a control-plane
    process killed inside close or bind) never releases it: its lock is taken over (1), as
    every other lock wait does, else this VIRQ's events would be dropped for good."""
    cdef uint64_t owner
    while True:
        if evlock_try(lock, me_reader):
            return 1
        owner = at_load64(lock)
        if owner == 0:
            continue
        if not owner & CHANNEL_LOCK_READER:
            if not evlock_owner_dead(owner):
                return 0
            if at_cas64(lock, &owner, me_reader):
                return 1
            continue
        if owner == me_reader:
            return 2
        evlock_acquire(lock, me_reader)
        return 1

cdef inline int port_pending(const dom_t *d, uint32_t port) noexcept nogil:
    """evtchn_port_is_pending: the FIFO word's PENDING (no page: not pending), or the bitmap bit."""
    cdef uint32_t *word
    if d.abi == ABI_FIFO:
        word = fifo_word(d, port)
        return word != NULL and (at_load32(word) & FIFO_PENDING) != 0
    return (bm_load(d, d.pend, port // d.wb) >> (port % d.wb)) & 1

cdef inline int set_pending(const dom_t *d, uint32_t v, uint32_t port, uint64_t me) noexcept nogil:
    """evtchn_port_set_pending: nothing for an unusable port (evtchn_usable), else the ABI's."""
    if port_state(d, port) <= ECS_RESERVED:
        return 0
    if d.abi == ABI_FIFO:
        return fifo_set_pending(d, v, port, me)
    return bitmap_set_pending(d, v, port)

cdef int hyp_unmask(const dom_t *d, uint32_t port, uint64_t me) noexcept nogil:
    """EVTCHNOP_unmask (evtchn_unmask: evtchn_2l_unmask / evtchn_fifo_unmask under the
    channel's read lock, so it cannot relink a port that a concurrent close is freeing).
    Returns 1 if it set PENDING 0 -> 1 itself (FIFO: the guest acked between the test and
    set_pending)."""
    cdef uint64_t *lock = <uint64_t *>(port_at(d, port) + P_LOCK)
    cdef int edge
    evlock_acquire(lock, me | CHANNEL_LOCK_READER)
    edge = hyp_unmask_locked(d, port, me)
    evlock_release(lock)
    return edge

cdef int hyp_unmask_locked(const dom_t *d, uint32_t port, uint64_t me) noexcept nogil:
    """evtchn_fifo_unmask (clear MASKED, relink if PENDING) or evtchn_2l_unmask (clear the
    mask; if it was set and the port is pending, raise the selectors: the pending bit is read
    seq_cst after the mask RMW, the store-buffering pair with set_pending)."""
    cdef uint32_t v, w
    cdef uint32_t *word
    if port_state(d, port) <= ECS_RESERVED:
        return 0
    v = notify_vcpu(d, port)
    if d.abi == ABI_FIFO:
        word = fifo_word(d, port)
        if word == NULL:
            return 0
        at_fetch_and32(word, ~FIFO_MASKED)
        # Relink if pending. As in Xen, a guest may ack (clear PENDING) between this test and
        # set_pending's test_and_set, which then sets PENDING again: the unmask itself makes a
        # new (spurious) edge, so a count of senders' edges can fall short of deliveries here.
        if at_load32(word) & FIFO_PENDING:
            return fifo_set_pending(d, v, port, me)
        return 0
    w = d.wb
    if bm_test_and_clear(d, d.mask, port // w, port % w) and bm_test_sc(d, d.pend, port):
        raise_selectors(d, v, port)
    return 0

cdef int guest_unmask(const dom_t *d, uint32_t port, uint64_t me) noexcept nogil:
    """Linux unmask_evtchn after the XSA-332 series: first a barrier, so that every write made
    before the unmask is visible before the event can be handled (evtchn_2l_unmask's smp_wmb,
    4d3fe31bd993; the FIFO cmpxchg is a full barrier in Linux, the fence here covers its
    early returns too). FIFO: evtchn_fifo_unmask / clear_masked_cond (f01337197419): clear
    MASKED only if not PENDING, else leave it to EVTCHNOP_unmask. 2l/3l: evtchn_2l_unmask's
    HVM path: clear the mask, test pending (seq_cst: the store-buffering pair with
    set_pending), re-mask and make the hypercall if it is."""
    cdef uint32_t wb = d.wb
    cdef int pending
    at_fence()
    if d.abi == ABI_FIFO:
        return fifo_guest_unmask(d, port, me)
    if d.inject == INJ_UNMASK_TEST_FIRST:        # R2: a send in between is left stuck
        pending = bm_test_sc(d, d.pend, port)
        pause_ns(R2_PAUSE_NS)                    # the window, widened (timing only)
        bm_test_and_clear(d, d.mask, port // wb, port % wb)
    else:                                        # clear the mask first, then test
        bm_test_and_clear(d, d.mask, port // wb, port % wb)
        pending = bm_test_sc(d, d.pend, port)
    if pending:
        bm_test_and_set(d, d.mask, port // wb, port % wb)
        return hyp_unmask(d, port, me)
    return 0

cdef int fifo_guest_unmask(const dom_t *d, uint32_t port, uint64_t me) noexcept nogil:
    """events_fifo.c clear_masked_cond (f01337197419, and "unmask only if masked"): a cmpxchg
    loop clearing MASKED that expects BUSY clear, so it spins (CPU relax) while Xen retries a
    LINK update on this word with BUSY set (evtchn_fifo_set_link, dae2a1c5f9); a PENDING port
    goes to EVTCHNOP_unmask instead. A live Xen holds BUSY for at most 4 cmpxchgs; after
    UNMASK_BUSY_SPINS relaxes and UNMASK_BUSY_YIELDS yields the BUSY holder may be a sender
    killed inside set_link, which fifo_clear_stale_busy recovers from."""
    cdef uint32_t *word = fifo_word(d, port)
    cdef uint32_t w, expected
    cdef unsigned busy = 0
    if word == NULL:
        return 0
    w = at_load32(word)
    while True:
        if not w & FIFO_MASKED:
            return 0
        if w & FIFO_PENDING:
            return hyp_unmask(d, port, me)
        expected = w & ~FIFO_BUSY
        if at_cas32(word, &expected, expected & ~FIFO_MASKED):
            return 0
        w = expected                             # the value seen
        if not w & FIFO_BUSY:
            continue                             # another change: retry at once
        busy += 1
        if busy <= UNMASK_BUSY_SPINS:
            cpu_relax()
        elif busy <= UNMASK_BUSY_SPINS + UNMASK_BUSY_YIELDS:
            sched_yield()
        else:
            fifo_clear_stale_busy(d, port, word, me)
            busy = 0
            w = at_load32(word)

cdef void fifo_clear_stale_busy(const dom_t *d, uint32_t port, uint32_t *word,
                                uint64_t me) noexcept nogil:
    """BUSY has stayed set far longer than a live Xen holds it. Only a linker that holds the
    lock of the queue this event was last linked on (its lastq) sets BUSY on its word: the
    event became that queue's tail under that lock, and its lastq changes only when it is
    linked again, which takes the same lock and first drops it as that queue's old tail
    (e33d4257fc), so no other queue's linker can still see it as a tail. So once we hold that
    lock (re-checking lastq under it, as set_pending does) no live linker is inside set_link
    on this word, and a BUSY still set was left by one that died there (its lock was taken
    over as a dead owner's): clear it. Linux has no such step (a Xen CPU does not die); a
    sender process here can. With the R7 injection (old tails kept) another queue's linker
    may still hold BUSY: clearing it then only makes that linker's cmpxchg retry."""
    cdef uint32_t *plastq = <uint32_t *>(port_at(d, port) + P_LASTQ)
    cdef uint32_t lastq
    cdef uint64_t *qlock
    while True:
        lastq = at_load32(plastq)
        if (lastq >> 16) >= d.vcpus:             # never written so by Xen: nothing to lock
            at_fetch_and32(word, ~FIFO_BUSY)
            return
        qlock = <uint64_t *>(queue_at(d, lastq >> 16, lastq & 0xFF) + Q_LOCK)
        evlock_acquire(qlock, me)
        if at_load32(plastq) == lastq:
            break
        evlock_release(qlock)
    at_fetch_and32(word, ~FIFO_BUSY)
    evlock_release(qlock)

cdef int expand_array(const dom_t *d, uint64_t me) noexcept nogil:
    """EVTCHNOP_expand_array (add_page_to_event_array): the guest fills the page with MASKED,
    the page count is published (release), then the ports of the new range that were sent to
    while it was missing are raised (917c123029). The caller holds the event lock."""
    cdef uint32_t pages = at_load32(d.array_pages)
    cdef uint32_t first = pages * FIFO_WORDS_PER_PAGE
    cdef uint32_t i, end, valid
    cdef uint32_t *base
    if first >= d.max_fifo_ports:
        return -ENOSPC
    base = <uint32_t *>(d.event_array) + first
    for i in range(FIFO_WORDS_PER_PAGE):
        at_store_relaxed32(base + i, FIFO_MASKED)
    at_store32(d.array_pages, pages + 1)
    at_fence()                                   # pairs with fifo_set_pending's re-check
    valid = at_load32(d.valid)
    end = first + FIFO_WORDS_PER_PAGE
    if valid < end:
        end = valid
    for i in range(first, end):
        if at_load8(<uint8_t *>(port_at(d, i) + P_PENDING)):
            fifo_set_pending(d, notify_vcpu(d, i), i, me)
    return 0


# -- guest side: the upcall handler (Linux __xen_evtchn_do_upcall and the ABIs' handle_events) --
cdef inline Py_ssize_t deliver(const dom_t *d, uint32_t port, uint32_t *out,
                               Py_ssize_t n) noexcept nogil:
    """The IRQ layer's ack (clear_evtchn) then the handler: delivered iff this call cleared
    PENDING, so no edge is delivered twice, even by two vCPUs."""
    if bm_test_and_clear(d, d.pend, port >> d.wshift, port & (d.wb - 1)):
        out[n] = port
        return n + 1
    return n

cdef inline uint64_t active_bits(const dom_t *d, uint32_t v, uint32_t word) noexcept nogil:
    """active_evtchns: pending & ~mask & cpu_evtchn_mask[cpu] for one word."""
    cdef char *cpu = d.cpumask + <size_t>d.cpumask_bytes * v
    return bm_load(d, d.pend, word) & ~bm_load(d, d.mask, word) & bm_load(d, cpu, word)

# The scan's set of pending words (W bits for 2l, W*W for 3l) is a stack bitmap `pw` of u64
# with a one-word summary of its non-zero u64s, so "any left?" and "next at or after i" are
# O(1) even for the 4096 words of a 64-bit 3l domain.
cdef inline int64_t pw_next(const uint64_t *pw, uint64_t summary, uint32_t nbits,
                            uint32_t start) noexcept nogil:
    """Index of the lowest set bit >= start, or -1."""
    cdef uint32_t k
    cdef uint64_t m
    if start >= nbits:
        return -1
    k = start >> 6
    m = mask_from(pw[k], start & 63)
    if m:
        return (<int64_t>k << 6) + lowest_bit(m)
    summary = mask_from(summary, k + 1)
    if not summary:
        return -1
    k = lowest_bit(summary)
    return (<int64_t>k << 6) + lowest_bit(pw[k])

cdef inline uint64_t pw_clear(uint64_t *pw, uint64_t summary, uint32_t i) noexcept nogil:
    pw[i >> 6] &= ~(<uint64_t>1 << (i & 63))
    if pw[i >> 6] == 0:
        summary &= ~(<uint64_t>1 << (i >> 6))
    return summary

cdef inline uint64_t take_selectors(const dom_t *d, uint32_t v, uint64_t *pw) noexcept nogil:
    """xchg the selector(s) to 0 into pw (bit j*W + k = L2 word j's bit k for 3l); returns the
    summary. The caller cleared upcall_pending first (Linux: "master flag must be cleared
    before clearing selector"); Xen sets them in the opposite order."""
    cdef uint64_t l1, part, summary = 0
    cdef uint32_t j, w = d.wb, b, k
    l1 = bm_xchg(d, pending_sel(d, v), 0, 0)
    if d.abi == ABI_2L:
        pw[0] = l1
        return 1 if l1 else 0
    for k in range((d.nwords + 63) >> 6):
        pw[k] = 0
    while l1:
        j = lowest_bit(l1)
        l1 &= l1 - 1
        part = bm_xchg(d, l2_sel(d, v), j, 0)
        if part:
            b = j * w
            pw[b >> 6] |= part << (b & 63)
            summary |= <uint64_t>1 << (b >> 6)
    return summary

cdef void put_back(const dom_t *d, uint32_t v, const uint64_t *pw) noexcept nogil:
    """`out` is full: return the unscanned selector bits (fetch_or) and re-raise the upcall
    locally (a software resend, as a Linux PV guest does), selectors first, then the flag."""
    cdef uint32_t w = d.wb, j, b
    cdef uint64_t part, l1 = 0
    cdef uint64_t wmask = ~<uint64_t>0 if w == 64 else 0xFFFFFFFF
    if d.abi == ABI_2L:
        bm_or(d, pending_sel(d, v), 0, pw[0])
    else:
        for j in range(w):
            b = j * w
            part = (pw[b >> 6] >> (b & 63)) & wmask
            if part:
                bm_or(d, l2_sel(d, v), j, part)
                l1 |= <uint64_t>1 << j
        bm_or(d, pending_sel(d, v), 0, l1)
    mark_upcall_pending(d, v)

cdef int bitmap_handle(const dom_t *d, uint32_t v, uint32_t *out, Py_ssize_t cap,
                       Py_ssize_t *pn, uint64_t *pw, int taken,
                       uint64_t summary) noexcept nogil:
    """evtchn_2l_handle_events (one more selector level for 3l): the timer VIRQ first, then
    the rotating scan that resumes right after the last port handled, visiting the start word
    twice (upper part, then all of it). `pw` is the caller's scan bitmap; with `taken` the
    selectors were already swapped into it (summary given). Returns 1 if it stopped because
    `out` is full."""
    # W and the word count are powers of two: masks and shifts (a division per event costs
    # more than the rest of the delivery on some CPUs).
    cdef uint32_t wmask = d.wb - 1, wshift = d.wshift, nmask = d.nwords - 1, nwords = d.nwords
    cdef uint32_t timer, start_word, start_bit, word, bit, i
    cdef uint32_t *rword = guest_u32(d, v, G_RESUME_WORD)
    cdef uint32_t *rbit = guest_u32(d, v, G_RESUME_BIT)
    cdef uint64_t bits, cand
    cdef int64_t nxt
    cdef Py_ssize_t n = pn[0]
    timer = virq_port(d, v, VIRQ_TIMER)          # "timer has highest priority"
    if timer and n < cap and (active_bits(d, v, timer >> wshift) >> (timer & wmask)) & 1:
        n = deliver(d, timer, out, n)
    if not taken:
        summary = take_selectors(d, v, pw)
    start_word = at_load_relaxed32(rword)
    start_bit = at_load_relaxed32(rbit)
    word = start_word
    i = 0
    while summary:
        nxt = pw_next(pw, summary, nwords, word)
        if nxt < 0:                              # wrap around
            word = 0
            i += 1
            continue
        word = <uint32_t>nxt
        bits = active_bits(d, v, word)
        bit = start_bit if (word == start_word and i == 0) else 0
        while True:
            cand = mask_from(bits, bit)
            if not cand:
                break
            if n == cap:                         # out is full: give the rest back
                put_back(d, v, pw)
                pn[0] = n
                return 1
            bit = lowest_bit(cand)
            n = deliver(d, (word << wshift) | bit, out, n)
            bit = (bit + 1) & wmask
            at_store_relaxed32(rbit, bit)
            at_store_relaxed32(rword, word if bit else (word + 1) & nmask)
            if bit == 0:
                break
        if word != start_word or i != 0:         # the start word is scanned twice
            summary = pw_clear(pw, summary, word)
        word = (word + 1) & nmask
        i += 1
    pn[0] = n
    return 0

cdef inline uint32_t fifo_consume_one(const dom_t *d, uint32_t v, uint32_t q, uint32_t ready,
                                      uint32_t *out, Py_ssize_t *pn) noexcept nogil:
    """events_fifo.c consume_one: take the local head, or Xen's HEAD once the local list ran
    out; clear_linked (a cmpxchg loop clearing LINKED and LINK, returning the old LINK);
    deliver iff PENDING and not MASKED (a masked event is dropped from the queue and stays
    PENDING) and our atomic clear of PENDING saw it set. Returns the updated ready bits."""
    cdef uint32_t *head_slot = guest_u32(d, v, G_LOCAL_HEAD + 4 * q)
    cdef uint32_t port = at_load_relaxed32(head_slot)
    cdef uint32_t *word
    cdef uint32_t w, nxt
    if port == 0:                                # acquire: pairs with Xen's HEAD store
        port = at_load32(<uint32_t *>(control_block(d, v) + CB_HEAD) + q)
    word = fifo_word(d, port) if port != 0 else NULL
    if word == NULL:                             # no valid HEAD: nothing to take
        return ready & ~(<uint32_t>1 << q)
    w = at_load32(word)
    while not at_cas32(word, &w, w & ~(FIFO_LINKED | d.link_mask)):
        pass
    nxt = w & d.link_mask
    if nxt == 0:
        ready &= ~(<uint32_t>1 << q)
    w = at_load32(word)
    if w & FIFO_PENDING and not w & FIFO_MASKED:
        if at_fetch_and32(word, ~FIFO_PENDING) & FIFO_PENDING:
            out[pn[0]] = port
            pn[0] += 1
    at_store_relaxed32(head_slot, nxt)
    return ready

cdef int fifo_handle(const dom_t *d, uint32_t v, uint32_t *out, Py_ssize_t cap,
                     Py_ssize_t *pn) noexcept nogil:
    """__evtchn_fifo_handle_events: lowest ready priority first, one event at a time, READY
    re-read after every event so that a newly readied higher priority preempts."""
    cdef uint32_t *ready_p = <uint32_t *>(control_block(d, v) + CB_READY)
    cdef uint32_t *local_ready = guest_u32(d, v, G_LOCAL_READY)
    cdef uint32_t ready
    ready = at_load_relaxed32(local_ready) | at_exchange32(ready_p, 0)
    at_store_relaxed32(local_ready, 0)
    while ready:
        if pn[0] == cap:                         # out is full: keep the rest for next time
            at_store_relaxed32(local_ready, ready)
            mark_upcall_pending(d, v)
            return 1
        ready = fifo_consume_one(d, v, lowest_bit(ready), ready, out, pn)
        ready |= at_exchange32(ready_p, 0)
    return 0

cdef Py_ssize_t consume(const dom_t *d, uint32_t v, uint32_t *out,
                        Py_ssize_t cap, uint64_t me) noexcept nogil:
    """__xen_evtchn_do_upcall under the vCPU's handler lock: clear upcall_pending (a seq_cst
    RMW, so it is ordered before the selector/READY xchg), handle, repeat while it was set
    again; stop early when `out` is full."""
    cdef uint8_t *flag = upcall_flag(d, v)
    cdef uint64_t *hlock = <uint64_t *>(guest_vcpu(d, v) + G_HANDLER_LOCK)
    cdef Py_ssize_t n = 0
    cdef int full
    cdef uint64_t pw[MAX_SCAN_U64]
    cdef uint64_t summary
    evlock_acquire(hlock, me)
    while True:
        if d.abi == ABI_FIFO:
            at_exchange8(flag, 0)
            full = fifo_handle(d, v, out, cap, &n)
        elif d.inject == INJ_SELECTOR_FIRST:     # R1: selector swapped, then the flag cleared
            summary = take_selectors(d, v, pw)
            pause_ns(R1_PAUSE_NS)                # the window, widened (timing only)
            at_exchange8(flag, 0)
            full = bitmap_handle(d, v, out, cap, &n, pw, 1, summary)
        else:                                    # the master flag, then the selector
            at_exchange8(flag, 0)
            full = bitmap_handle(d, v, out, cap, &n, pw, 0, 0)
        if full or not at_load8(flag) & 1:
            break
    evlock_release(hlock)
    return n


cdef int spin_upcall(const uint8_t *flag, int64_t until_ns) noexcept nogil:
    """wait()'s spin before it registers as a waiter: look at the upcall flag (a CPU relax
    between looks) until it is set (1) or CLOCK_MONOTONIC reaches until_ns (0). No waiter slot
    is taken, so a sender's kick pays no wake-up for a spinning vCPU."""
    cdef int _i
    while True:
        for _i in range(SPIN_LOOKS_PER_CLOCK):
            if at_load8(flag) & 1:
                return 1
            cpu_relax()
        if monotonic_ns() >= until_ns:
            return 0


cdef inline int64_t sleep_slice(int64_t deadline) noexcept nogil:
    """How long the next futex sleep of wait() or poll() may be: at most WAIT_SLICE_NS (then
    look for signals), no later than `deadline` (< 0: none); <= 0 once it passed."""
    cdef int64_t left
    if deadline < 0:
        return WAIT_SLICE_NS
    left = deadline - monotonic_ns()
    return left if left < WAIT_SLICE_NS else WAIT_SLICE_NS

cdef inline void block(uint32_t *kickw, uint32_t seen, int64_t slice_ns, int slot) noexcept nogil:
    """Sleep one slice of wait() or poll(): on the kick futex while kickw == seen, or, without
    a waiter slot (kicks do not see us), a short sleep after which the caller re-checks."""
    if slot >= 0:
        futex_wait_u32(kickw, seen, slice_ns)
    else:
        pause_ns(slice_ns if slice_ns < WAIT_FALLBACK_NS else WAIT_FALLBACK_NS)


# -- locks held from Python (evtchn.locks) -------------------------------------------------------
cpdef int release_owned(addresses) except -1:
    """Release each lock at `addresses` that the calling thread holds (read-type or not) and
    return how many it released. One C call: Python looks for signals only once it returned,
    so a KeyboardInterrupt cannot stop it halfway. Callers pass every lock they meant to take:
    those they did not get (a signal while waiting) or that another thread holds are left
    alone. Lock words are the same in every backend, so this releases Numba's locks too."""
    cdef uint64_t me = evtchn_self() | CHANNEL_LOCK_READER
    cdef uint64_t owner
    cdef uint64_t *w
    cdef uintptr_t address
    cdef int released = 0
    for address in addresses:
        w = <uint64_t *>address
        owner = at_load64(w)
        if owner != 0 and (owner | CHANNEL_LOCK_READER) == me:
            evlock_release(w)
            released += 1
    return released


@cython.final
cdef class Held:
    """Hold the locks at `addresses` for a ``with`` block (evtchn.locks.Held, compiled): taken
    in the order given (read-type channel locks with `reader`; with `busy` only tried, and
    EvtchnError(EBUSY, busy) if a live owner holds one), released on every way out.

    Compiled so that no Python code runs between the block's end and the release: a Python
    __exit__ would look for signals on entry, and a KeyboardInterrupt there would skip the
    release. In __enter__ a signal raised in a lock call after it took the lock is caught and
    the lock released (the address is recorded before the call)."""

    cdef object _k
    cdef list _addrs
    cdef bint _reader
    cdef object _busy

    def __init__(self, kernels, addresses, bint reader=False, busy=None):
        self._k = kernels
        self._addrs = list(addresses)
        self._reader = reader
        self._busy = busy

    def __enter__(self):
        cdef list taken = []
        try:
            for address in self._addrs:
                taken.append(address)
                if self._busy is None:
                    self._k.lock(address, self._reader)
                elif not self._k.trylock(address):
                    taken.pop()
                    raise EvtchnError(E.EBUSY, self._busy)
        except EvtchnError as exc:
            if exc.errno == E.EDEADLK:          # held by this thread outside this block
                taken.pop()
            release_owned(taken)
            raise
        except BaseException:
            release_owned(taken)
            raise
        return self

    def __exit__(self, *exc):
        release_owned(self._addrs)


# -- the backend ---------------------------------------------------------------------------------
@cython.final
cdef class CythonKernels:
    """The data-plane kernels on real shared memory; several processes may race on a host."""

    name = "cython"
    multiprocess = True

    cdef dom_t *_doms            # indexed by domid; entries with base == NULL are unmapped
    cdef uint32_t _ndoms         # 1 + highest mapped domid (release store, acquire loads)
    cdef uint32_t _cap
    cdef void **_retired         # old tables, kept until dealloc: a nogil kernel in another
    cdef uint32_t _nretired      # thread may still be reading one
    cdef dict _keep              # domid -> DomainMemory: keeps the mappings alive

    def __cinit__(self):
        self._doms = NULL
        self._ndoms = 0
        self._cap = 0
        self._retired = NULL
        self._nretired = 0
        self._keep = {}

    def __dealloc__(self):
        cdef uint32_t i
        for i in range(self._nretired):
            free(self._retired[i])
        free(self._retired)
        free(self._doms)

    # -- domains -------------------------------------------------------------------------------
    def map_domain(self, dm):
        """Record dm's base address and what the kernels need from its header."""
        cdef uint32_t domid = dm.domid
        cdef uint32_t cap
        cdef dom_t *table
        cdef dom_t *d
        cdef char *base = <char *><uintptr_t>dm.seg.address
        cdef void **retired
        if domid >= L.MAX_DOMAINS:
            raise ValueError(f"domid {domid} is beyond the domid space")
        if domid >= self._cap:
            cap = max(16, self._cap * 2, domid + 1)
            table = <dom_t *>calloc(cap, sizeof(dom_t))
            if table == NULL:
                raise MemoryError()
            if self._doms != NULL:
                retired = <void **>realloc(self._retired, (self._nretired + 1) * sizeof(void *))
                if retired == NULL:
                    free(table)
                    raise MemoryError()
                memcpy(table, self._doms, self._cap * sizeof(dom_t))
                retired[self._nretired] = self._doms
                self._retired = retired
                self._nretired += 1
            self._doms = table              # published before _ndoms can grow past the old cap
            self._cap = cap
        d = &self._doms[domid]
        self._keep[domid] = dm              # keeps the mapping alive
        off = {name: int(dm.seg.u64[L.H_REGION[name] // 8]) for name in L.REGIONS}
        d.abi = dm.abi
        d.vcpus = dm.vcpus
        d.wb = dm.word_bits
        d.wshift = 6 if d.wb == 64 else 5
        d.link_mask = (1 << dm.link_bits) - 1
        d.max_fifo_ports = 1 << dm.link_bits
        d.nwords = d.wb * d.wb if d.abi == ABI_3L else d.wb
        d.sel_off = L.vi_pending_sel(d.wb)
        d.l2sel_bytes = d.wb * d.wb // 8
        d.cpumask_bytes = int(dm.seg.u64[L.H_CPUMASK_BYTES // 8])
        d.shared_info = base + <size_t>off["shared_info"]
        d.vcpu_info_ext = base + <size_t>off["vcpu_info_ext"]
        d.control = base + <size_t>off["control"]
        d.l2_selector = base + <size_t>off["l2_selector"]
        d.ports = base + <size_t>off["ports"]
        d.xen_vcpu = base + <size_t>off["xen_vcpu"]
        d.guest_vcpu = base + <size_t>off["guest_vcpu"]
        d.cpumask = base + <size_t>off["cpumask"]
        d.event_array = base + <size_t>off["event_array"]
        if d.abi == ABI_3L:
            d.pend = base + <size_t>off["l3_pending"]
            d.mask = base + <size_t>off["l3_mask"]
        else:
            d.pend = d.shared_info + SI_PENDING
            d.mask = d.shared_info + <size_t>L.si_mask(d.wb)
        d.size = dm.seg.size
        d.inject = int(dm.seg.u32[L.H_INJECT // 4])     # fixed at creation, before publication
        d.valid = <uint32_t *>(base + H_VALID)
        d.array_pages = <uint32_t *>(base + H_ARRAY_PAGES)
        d.pollers = <uint32_t *>(base + H_POLLERS)
        at_fence()
        d.base = base                       # marks the entry mapped, after every field
        if domid + 1 > self._ndoms:
            at_store32(&self._ndoms, domid + 1)

    cdef dom_t *_lookup(self, uint32_t domid) noexcept nogil:
        """The mapped domain `domid`, or NULL."""
        cdef dom_t *d
        if domid >= at_load32(&self._ndoms):
            return NULL
        d = &self._doms[domid]
        return d if d.base != NULL else NULL

    cdef dom_t *_dom(self, Py_ssize_t domid) except NULL:
        cdef dom_t *d = NULL
        if 0 <= domid <= 0xFFFFFFFF:
            d = self._lookup(<uint32_t>domid)
        if d == NULL:
            raise KeyError(domid)
        return d

    # -- locks: robust owner-id spinlocks at absolute addresses (the control plane's) ----------
    def lock(self, uintptr_t address, bint reader=False):
        """Take the lock at `address` for the calling thread (a channel lock read-type with
        `reader`, as a sender holds it). Waits without the GIL in slices of LOCK_SLICE_NS and
        looks for signals between them, so Ctrl-C gets through (the lock is then not taken);
        a dead owner's lock is taken over. Raises EvtchnError(EDEADLK) if this thread already
        holds it. Once taken it returns at once: no signal is looked for after that."""
        cdef uint64_t *w = <uint64_t *>address
        cdef uint64_t me = evtchn_self()
        cdef uint64_t owner
        cdef int got
        if reader:
            me |= CHANNEL_LOCK_READER
        if evlock_try(w, me):
            return
        owner = at_load64(w)
        if owner != 0 and (owner | CHANNEL_LOCK_READER) == (me | CHANNEL_LOCK_READER):
            raise EvtchnError(E.EDEADLK, f"this thread already holds the lock at {address:#x}")
        while True:
            with nogil:                     # the holder may be a thread that needs the GIL
                got = evlock_acquire_for(w, me, LOCK_SLICE_NS)
            if got:
                return
            PyErr_CheckSignals()

    def trylock(self, uintptr_t address):
        """Take the lock if it is free or its owner is dead; False if a live owner holds it."""
        return bool(evlock_try_robust(<uint64_t *>address, evtchn_self()))

    def unlock(self, uintptr_t address):
        evlock_release(<uint64_t *>address)

    def unlock_owned(self, addresses):
        """Release each lock at `addresses` that the calling thread holds (see
        release_owned)."""
        return release_owned(addresses)

    # -- guest bitops on shared words (Linux set_bit / clear_bit on cpu_evtchn_mask) ---------
    cdef void *_word_at(self, uintptr_t address, unsigned bit, unsigned word_bits) except NULL:
        """The W-bit word at `address`, checked to lie in a mapped domain: a wrong address from
        Python must raise, not scribble over a shared segment."""
        cdef uint32_t i, n = self._ndoms
        cdef size_t nbytes = word_bits // 8
        cdef const dom_t *d
        if word_bits not in (32, 64) or bit >= word_bits or address % nbytes:
            raise ValueError(f"bad bit {bit} of a {word_bits}-bit word at {address:#x}")
        for i in range(n):
            d = &self._doms[i]
            if (d.base != NULL and <uintptr_t>d.base <= address
                    and address + nbytes <= <uintptr_t>d.base + d.size):
                return <void *>address
        raise ValueError(f"address {address:#x} is in no mapped domain")

    def set_bit(self, uintptr_t address, unsigned bit, unsigned word_bits):
        """Atomically set `bit` of the W-bit word at `address`."""
        cdef void *p = self._word_at(address, bit, word_bits)
        if word_bits == 64:
            at_fetch_or64(<uint64_t *>p, <uint64_t>1 << bit)
        else:
            at_fetch_or32(<uint32_t *>p, <uint32_t>1 << bit)

    def clear_bit(self, uintptr_t address, unsigned bit, unsigned word_bits):
        """Atomically clear `bit` of the W-bit word at `address`."""
        cdef void *p = self._word_at(address, bit, word_bits)
        if word_bits == 64:
            at_fetch_and64(<uint64_t *>p, ~(<uint64_t>1 << bit))
        else:
            at_fetch_and32(<uint32_t *>p, ~(<uint32_t>1 << bit))

    # -- hypervisor side -------------------------------------------------------------------------
    def upcall_pending(self, domid, uint32_t vcpu):
        return bool(at_load8(upcall_flag(self._dom(domid), vcpu)) & 1)

    def set_pending(self, domid, uint32_t vcpu, uint32_t port):
        cdef dom_t *d = self._dom(domid)
        cdef uint64_t me = evtchn_self()
        cdef int r
        with nogil:
            r = set_pending(d, vcpu, port, me)
        return r

    def clear_pending(self, domid, uint32_t port):
        """Clear PENDING; returns 1 if it was set (an event destroyed undelivered)."""
        cdef dom_t *d = self._dom(domid)
        cdef uint32_t *word
        if d.abi == ABI_FIFO:
            word = fifo_word(d, port)
            if word != NULL:
                return 1 if at_fetch_and32(word, ~FIFO_PENDING) & FIFO_PENDING else 0
            return 0
        return bm_test_and_clear(d, d.pend, port // d.wb, port % d.wb)

    def hyp_unmask(self, domid, uint32_t port):
        cdef dom_t *d = self._dom(domid)
        cdef uint64_t me = evtchn_self()
        cdef int edge
        with nogil:
            edge = hyp_unmask(d, port, me)
        return edge

    def is_pending(self, domid, uint32_t port):
        return bool(port_pending(self._dom(domid), port))

    def is_masked(self, domid, uint32_t port):
        cdef dom_t *d = self._dom(domid)
        cdef uint32_t *word
        if d.abi == ABI_FIFO:
            word = fifo_word(d, port)
            return word == NULL or bool(at_load32(word) & FIFO_MASKED)
        return bool((bm_load(d, d.mask, port // d.wb) >> (port % d.wb)) & 1)

    def is_linked(self, domid, uint32_t port):
        """FIFO is_busy: a LINKED port is not handed out again (78e24c269b)."""
        cdef dom_t *d = self._dom(domid)
        cdef uint32_t *word
        if d.abi != ABI_FIFO:
            return False
        word = fifo_word(d, port)
        return word != NULL and bool(at_load32(word) & FIFO_LINKED)

    def expand_array(self, domid):
        cdef dom_t *d = self._dom(domid)
        cdef uint64_t me = evtchn_self()
        cdef int r
        with nogil:
            r = expand_array(d, me)
        return r

    cdef int _send(self, const dom_t *d, uint32_t port, uint64_t me) noexcept nogil:
        """evtchn_send: under the sender's channel lock (read-type), read its state and raise
        the peer (interdomain), itself (IPI), or drop the event (unbound). -errno on refusal."""
        cdef char *pe
        cdef uint64_t *plock
        cdef uint8_t state
        cdef uint32_t rport
        cdef const dom_t *rd
        cdef int r
        if port >= at_load32(d.valid):           # port_is_valid()
            return -EINVAL
        pe = port_at(d, port)
        plock = <uint64_t *>(pe + P_LOCK)
        evlock_acquire(plock, me | CHANNEL_LOCK_READER)
        state = at_load8(<uint8_t *>(pe + P_STATE))
        if state == ECS_INTERDOMAIN:
            rd = self._lookup(at_load16(<uint16_t *>(pe + P_REMOTE_DOM)))
            rport = at_load32(<uint32_t *>(pe + P_REMOTE_PORT))
            if rd == NULL:                       # the peer's host mapping is missing here
                r = -ESRCH
            else:
                r = set_pending(rd, notify_vcpu(rd, rport), rport, me)
        elif state == ECS_IPI:
            r = set_pending(d, notify_vcpu(d, port), port, me)
        elif state == ECS_UNBOUND:
            r = 0                                # dropped silently, as Xen does
        else:
            r = -EINVAL
        evlock_release(plock)
        return r

    def send(self, domid, port):
        cdef dom_t *d = self._dom(domid)
        cdef uint64_t me = evtchn_self()
        cdef int r
        cdef uint32_t p
        if port < 0 or port > 0xFFFFFFFF:
            return -EINVAL
        p = port
        with nogil:
            r = self._send(d, p, me)
        return r

    def send_many(self, domid, const uint32_t[::1] ports, edges=None):
        """Send on each port in turn; stop at the first refused one. Returns (number sent,
        errno of the refusal or 0); edges[i] = 1 where send i set PENDING 0 -> 1."""
        cdef dom_t *d = self._dom(domid)
        cdef uint8_t[::1] ev
        cdef uint8_t *e = NULL
        cdef Py_ssize_t i, count = ports.shape[0]
        cdef const uint32_t *p = &ports[0] if count else NULL
        cdef uint64_t me = evtchn_self()
        cdef int r = 0
        if edges is not None:
            ev = edges
            if ev.shape[0] < count:
                raise ValueError("edges must be at least as long as ports")
            if count:
                e = &ev[0]
        with nogil:
            for i in range(count):
                r = self._send(d, p[i], me)
                if r < 0:
                    break
                if e != NULL:
                    e[i] = <uint8_t>r
        if r < 0:
            return i, -r
        return count, 0

    def raise_virq(self, domid, uint32_t virq, uint32_t vcpu):
        """send_guest_vcpu_virq / send_guest_global_virq: set_pending under a *try* of the
        channel lock (evtchn_read_trylock): the event is dropped when a writer (close, bind)
        holds it; a reader (a send, an unmask) would not exclude Xen's, so wait for it."""
        cdef dom_t *d = self._dom(domid)
        cdef uint64_t me = evtchn_self()
        cdef uint32_t port, target
        cdef uint64_t *plock
        cdef int per_vcpu, locked, r = 0
        if virq >= NR_VIRQS:
            return 0
        per_vcpu = (VIRQ_PER_VCPU_MASK >> virq) & 1
        with nogil:
            port = virq_port(d, vcpu if per_vcpu else 0, virq)
            if port != 0:
                plock = <uint64_t *>(port_at(d, port) + P_LOCK)
                locked = channel_read_trylock(plock, me | CHANNEL_LOCK_READER)
                if locked:
                    # Xen's virq_lock keeps the binding stable; here re-check under the channel
                    # lock that the port still serves this VIRQ (it may have been closed and
                    # re-bound to something else since the lookup).
                    if virq_port(d, vcpu if per_vcpu else 0, virq) == port:
                        target = vcpu if per_vcpu else notify_vcpu(d, port)
                        r = set_pending(d, target, port, me)
                    if locked == 1:
                        evlock_release(plock)
        return r

    # -- guest side ------------------------------------------------------------------------------
    def guest_mask(self, domid, uint32_t port):
        cdef dom_t *d = self._dom(domid)
        cdef uint32_t *word
        if d.abi == ABI_FIFO:
            word = fifo_word(d, port)
            if word != NULL:
                at_fetch_or32(word, FIFO_MASKED)
            return
        bm_test_and_set(d, d.mask, port // d.wb, port % d.wb)

    def guest_unmask(self, domid, uint32_t port):
        cdef dom_t *d = self._dom(domid)
        cdef uint64_t me = evtchn_self()
        cdef int edge
        with nogil:
            edge = guest_unmask(d, port, me)
        return edge

    def consume(self, domid, uint32_t vcpu, uint32_t[::1] out):
        """Run vCPU's upcall handler once into `out`; returns the number of ports delivered."""
        cdef dom_t *d = self._dom(domid)
        cdef Py_ssize_t cap = out.shape[0], n
        cdef uint32_t dummy
        cdef uint32_t *o = &out[0] if cap else &dummy
        cdef uint64_t me = evtchn_self()
        with nogil:
            n = consume(d, vcpu, o, cap, me)
        return n

    def poll(self, domid, uint32_t vcpu, const uint32_t[::1] ports, timeout):
        """SCHEDOP_poll (do_poll) for `vcpu`: returns (reason, port) with a POLL_* reason, or
        (-errno, port). Block the vCPU (a waiter slot, so kicks wake it; dead waiters' slots
        repaired first), set the poll_mask bit, then test local events and each port in turn
        (-EINVAL for a port beyond valid_evtchns), then block until evtchn_check_pollers
        clears the bit (POLL_EVENT), a kick unblocks the vCPU (POLL_UPCALL) or `timeout`
        seconds pass (None: forever). The sleep is the kick futex, in slices that look for
        signals, as wait() does."""
        cdef dom_t *d = self._dom(domid)
        cdef char *x = xen_vcpu(d, vcpu)
        cdef uint32_t *poll_w = <uint32_t *>(x + X_POLL)
        cdef uint32_t port = 0, kick0, state = POLL_ACTIVE
        cdef uint64_t me = evtchn_self()
        cdef int reason, slot
        cdef int64_t deadline = -1
        if ports.shape[0] > L.SCHED_POLL_MAX_PORTS:
            return -EINVAL, 0
        if timeout is not None and float(timeout) < 1e9:     # longer: as good as forever
            deadline = monotonic_ns() + <int64_t>(max(0.0, float(timeout)) * 1e9)
        waiter_repair(d, vcpu, me)
        slot = waiter_enter(d, vcpu, me)         # before the kick snapshot: kicks now count
        kick0 = at_load32(<uint32_t *>(x + X_KICK))
        if at_exchange32(poll_w, POLL_IDLE) == POLL_ACTIVE:
            at_fetch_sub32(d.pollers, 1)         # left by a poller of this vCPU that died
        # Count in before setting the bit: a pollers check that sees the bit must also see
        # the count (else it could claim us and take another poller's count to 0).
        at_fetch_add32(d.pollers, 1)
        at_store32(<uint32_t *>(x + X_POLL_EVTCHN), <uint32_t>-1)
        at_exchange32(poll_w, POLL_ACTIVE)
        at_fence()                               # Dekker with check_pollers: set, then test
        try:
            reason = self._poll_body(d, vcpu, ports, deadline, kick0, slot, &port)
        finally:
            # Leave the poll. Whoever clears the poll_mask bit ends it: if a pollers check
            # cleared it, it counted us out and the poll ended with its event.
            state = at_exchange32(poll_w, POLL_IDLE)
            if state == POLL_ACTIVE:
                at_fetch_sub32(d.pollers, 1)
            at_store32(<uint32_t *>(x + X_POLL_EVTCHN), 0)
            waiter_leave(d, vcpu, slot)
        if state & POLL_WOKEN and (reason == POLL_TIMEOUT or reason == POLL_UPCALL):
            return POLL_EVENT, state & ~POLL_WOKEN
        return reason, port

    cdef int _poll_body(self, dom_t *d, uint32_t vcpu, const uint32_t[::1] ports,
                        int64_t deadline, uint32_t kick0, int slot,
                        uint32_t *pport) except -1000:
        """do_poll after the poll_mask bit is set: the tests, then the blocking sleep."""
        cdef char *x = xen_vcpu(d, vcpu)
        cdef char *vi = vcpu_info(d, vcpu)
        cdef uint32_t *kickw = <uint32_t *>(x + X_KICK)
        cdef uint32_t *poll_w = <uint32_t *>(x + X_POLL)
        cdef Py_ssize_t i, n = ports.shape[0]
        cdef uint32_t port, seen, state
        cdef int64_t slice_ns
        if (at_load8(<uint8_t *>(vi + VI_UPCALL_PENDING)) & 1
                and not at_load8(<uint8_t *>(vi + VI_UPCALL_MASK)) & 1):
            return POLL_UPCALL                   # local_events_need_delivery()
        for i in range(n):                       # evtchn_port_poll, in the guest's order
            port = ports[i]
            pport[0] = port
            if port >= at_load32(d.valid) or port_state(d, port) <= ECS_RESERVED:
                return -EINVAL                   # invalid, or not in use (d4bfa0c78f)
            if port_pending(d, port):
                return POLL_PENDING
        pport[0] = 0
        if n == 1:
            at_store32(<uint32_t *>(x + X_POLL_EVTCHN), ports[0])
        while True:
            seen = at_load32(kickw)
            at_fence()
            state = at_load32(poll_w)
            if state != POLL_ACTIVE:             # a pollers check woke us
                pport[0] = state & ~POLL_WOKEN
                return POLL_EVENT
            if seen != kick0:
                # vcpu_kick -> vcpu_unblock ends the poll. A kick comes with the upcall flag
                # set; without it, this is a late wake-up from a pollers check that ended an
                # earlier poll: not ours.
                if at_load8(<uint8_t *>(vi + VI_UPCALL_PENDING)) & 1:
                    return POLL_UPCALL
                kick0 = seen
                continue
            if slot < 0 and at_load8(<uint8_t *>(vi + VI_UPCALL_PENDING)) & 1:
                return POLL_UPCALL               # no waiter slot: a kick may not have seen us
            slice_ns = sleep_slice(deadline)
            if slice_ns <= 0:
                return POLL_TIMEOUT
            with nogil:
                block(kickw, seen, slice_ns, slot)
            PyErr_CheckSignals()

    def wait(self, domid, uint32_t vcpu, timeout, int64_t spin_ns=0):
        """Block until vCPU has an upcall pending (a halted vCPU waiting for its interrupt);
        False if `timeout` seconds (None: forever) passed first. First spins on the upcall
        flag for up to `spin_ns` without registering (a kick then costs the sender no system
        call), in slices of at most WAIT_SLICE_NS without the GIL, checking for signals
        between slices. Then repairs the waiter slots of waiters that died blocked, takes a
        slot (kick() wakes registered waiters only), and sleeps on the kick futex in slices of
        at most WAIT_SLICE_NS without the GIL, checking for signals between slices. With all
        slots taken it polls the upcall flag every WAIT_FALLBACK_NS instead."""
        cdef dom_t *d = self._dom(domid)
        cdef uint8_t *flag = upcall_flag(d, vcpu)
        cdef char *x = xen_vcpu(d, vcpu)
        cdef uint32_t *kickw = <uint32_t *>(x + X_KICK)
        cdef uint32_t seen
        cdef uint64_t me
        cdef int slot, got
        cdef int64_t deadline = -1, slice_ns, until, step
        if at_load8(flag) & 1:
            return True
        if timeout is not None and float(timeout) < 1e9:     # longer: as good as forever
            deadline = monotonic_ns() + <int64_t>(max(0.0, float(timeout)) * 1e9)
        if spin_ns > 0:
            until = monotonic_ns() + spin_ns
            if 0 <= deadline < until:
                until = deadline
            while True:
                step = min(until, monotonic_ns() + WAIT_SLICE_NS)
                with nogil:
                    got = spin_upcall(flag, step)
                if got:
                    return True
                if step >= until:
                    break
                PyErr_CheckSignals()
        me = evtchn_self()
        waiter_repair(d, vcpu, me)
        slot = waiter_enter(d, vcpu, me)         # fences: Dekker with kick()
        try:
            while True:
                seen = at_load32(kickw)
                at_fence()
                if at_load8(flag) & 1:
                    return True
                slice_ns = sleep_slice(deadline)
                if slice_ns <= 0:
                    return False
                with nogil:
                    block(kickw, seen, slice_ns, slot)
                PyErr_CheckSignals()
        finally:
            waiter_leave(d, vcpu, slot)
