"""Xen constants and the byte layout of evtchn's shared memory: the one source of offsets.

Every backend (reference, Cython, Numba), the stress harness and the C benchmark read their
offsets from here (the compiled kernels read them from the domain header, which this module
writes). Guest-visible structures are byte-exact with Xen's public headers for x86-64 and, with
``word_bits=32``, for the x86-32 compat layout (xen/include/public/xen.h, event_channel.h).

A domain lives in one POSIX shared-memory segment, page-aligned regions in this order:

    header        1 page   config, region offsets, Xen's per-domain scalars (event lock, ...)
    shared_info   1 page   vcpu_info[32] @0, evtchn_pending @2048, evtchn_mask after it
    vcpu_info_ext          vcpu_info of vCPUs 32.. (VCPUOP_register_vcpu_info), 64 B each
    control       fifo     one page per vCPU, control block at offset 0 (as Linux does)
    l3_pending    3l       W^2 words
    l3_mask       3l       W^2 words
    l2_selector   3l       W words per vCPU
    ports                  Xen's struct evtchn, PORT_SIZE bytes per port (hypervisor-private)
    xen_vcpu               Xen's per-vCPU state: kick futex, 16 FIFO queues, virq_to_evtchn
    guest_vcpu             Linux's per-CPU state: FIFO local heads, 2-level resume position
    cpumask                Linux's cpu_evtchn_mask: one bit per port per vCPU (2l, 3l)
    event_array   fifo     2^link_bits event words; pages become valid as expand_array adds them

The segment is sized for the ABI's limit but tmpfs only backs the pages that are touched, so a
domain with link_bits=28 and ten ports uses kilobytes of memory, not the 1 GiB its array could.
"""

from __future__ import annotations

import dataclasses

PAGE_SIZE = 4096
LAYOUT_VERSION = 3

# --- ABIs ------------------------------------------------------------------------------------
ABI_2L, ABI_3L, ABI_FIFO = 0, 1, 2
ABI_NAMES = {"2l": ABI_2L, "3l": ABI_3L, "fifo": ABI_FIFO}
ABI_BY_CODE = {code: name for name, code in ABI_NAMES.items()}

# --- Port states (struct evtchn.state, xen/include/xen/sched.h) and EVTCHNSTAT_* ------------
ECS_FREE, ECS_RESERVED, ECS_UNBOUND, ECS_INTERDOMAIN, ECS_PIRQ, ECS_VIRQ, ECS_IPI = range(7)
STATUS_NAMES = {
    ECS_FREE: "closed",
    ECS_RESERVED: "closed",
    ECS_UNBOUND: "unbound",
    ECS_INTERDOMAIN: "interdomain",
    ECS_PIRQ: "pirq",
    ECS_VIRQ: "virq",
    ECS_IPI: "ipi",
}

DOMID_SELF = 0x7FF0
DOMID_FIRST_RESERVED = 0x7FF0
EVTCHNS_PER_BUCKET = 64  # Xen: PAGE_SIZE / next_pow2(sizeof(struct evtchn)), 64-B aligned

# --- VIRQs (xen/include/public/xen.h; get_virq_type in event_channel.c) ----------------------
NR_VIRQS = 24
VIRQ_TIMER, VIRQ_DEBUG, VIRQ_CONSOLE, VIRQ_DOM_EXC, VIRQ_TBUF = 0, 1, 2, 3, 4
VIRQ_DEBUGGER, VIRQ_XENOPROF, VIRQ_CON_RING, VIRQ_PCPU_STATE = 6, 7, 8, 9
VIRQ_MEM_EVENT, VIRQ_ARGO, VIRQ_ENOMEM, VIRQ_XENPMU = 10, 11, 12, 13
VIRQ_PER_VCPU = frozenset({VIRQ_TIMER, VIRQ_DEBUG, VIRQ_XENOPROF, VIRQ_XENPMU})
VIRQ_PER_DOMAIN = frozenset({VIRQ_ARGO})
HARDWARE_DOMID = 0  # global VIRQs go to the hardware domain unless redirected

# --- FIFO (xen/include/public/event_channel.h) ------------------------------------------------
FIFO_PENDING_BIT, FIFO_MASKED_BIT, FIFO_LINKED_BIT, FIFO_BUSY_BIT = 31, 30, 29, 28
FIFO_PENDING = 1 << FIFO_PENDING_BIT
FIFO_MASKED = 1 << FIFO_MASKED_BIT
FIFO_LINKED = 1 << FIFO_LINKED_BIT
FIFO_BUSY = 1 << FIFO_BUSY_BIT
FIFO_LINK_BITS = 17
FIFO_MAX_LINK_BITS = 28  # 4 flag bits leave 28 for LINK
FIFO_PRIORITY_MAX, FIFO_PRIORITY_DEFAULT, FIFO_PRIORITY_MIN = 0, 7, 15
FIFO_MAX_QUEUES = 16
FIFO_WORDS_PER_PAGE = PAGE_SIZE // 4
CONTROL_BLOCK_SIZE = 72  # u32 ready, u32 rsvd, u32 head[16]
CB_READY, CB_HEAD = 0, 8
FIFO_LOCK_TRIES = 3  # attempts to lock the (old, new) queue pair
FIFO_LINK_RETRIES = 4  # LINK cmpxchg retries with BUSY set

# --- Historical bugs the stress harness must catch (spec section 5), by name -> code ---------
INJECTIONS = {
    "2l-selector-before-upcall-clear": 1,  # R1: guest xchg's the selector, then clears the flag
    "2l-unmask-test-before-clear": 2,  # R2: guest tests PENDING before clearing the mask
    "fifo-ready-every-link": 3,  # R6: READY set on every link, not only a new HEAD
    "fifo-old-tail-kept": 4,  # R7: an old tail is not invalidated on relink
    "fifo-pending-before-lock": 5,  # R9: PENDING/LINKED tested before the queue locks
}
R9_PAUSE_SET_NS = 20_000  # R9 injection: after setting PENDING 0 -> 1 (timing only)
R9_PAUSE_LINK_NS = 300_000  # R9 injection: a relink holding LINKED and the queue lock
# R1, R2 and R6 are windows between two consecutive atomic operations of one CPU: another CPU
# lands in them only when the first is interrupted or descheduled there (in a VM, the host
# preempting the vCPU). Their injections put such a pause in the window (timing only, no
# state), so that stress.duels can put the other side's operation inside it every time.
R1_PAUSE_NS = 20_000  # R1 injection: guest, between the selector swap and the flag clear
R2_PAUSE_NS = 20_000  # R2 injection: guest unmask, between testing PENDING and clearing MASKED
R6_PAUSE_NS = 20_000  # R6 injection: Xen, between a link onto a tail and the READY it sets

# --- vcpu_info / shared_info (x86-64, and x86-32 compat when word_bits == 32) ----------------
LEGACY_MAX_VCPUS = 32
VCPU_INFO_SIZE = 64
VI_UPCALL_PENDING = 0  # u8
VI_UPCALL_MASK = 1  # u8
SI_PENDING = 2048  # evtchn_pending[W] after vcpu_info[32]


def vi_pending_sel(word_bits: int) -> int:
    """Offset of evtchn_pending_sel in vcpu_info: 8 on x86-64, 4 in the 32-bit compat layout."""
    return 8 if word_bits == 64 else 4


def si_mask(word_bits: int) -> int:
    """Offset of evtchn_mask in shared_info: right after the W words of evtchn_pending."""
    return SI_PENDING + word_bits * word_bits // 8


# --- Lock words and their owners ---------------------------------------------------------------
# Every lock word (per-channel lock, event lock, FIFO queue locks, handler lock, host create lock,
# reset lock) is a u64 holding its owner, 0 when free. An owner is one THREAD: low 32 bits its tid
# (gettid), high 32 bits its start time in clock ticks since boot (/proc/<tid>/stat field 22,
# masked to 31 bits so that an owner id is a positive int64). A waiter takes a lock over when the
# owner is dead: /proc/<tid>/stat is gone, says zombie, or shows another start time (the tid was
# reused). A start time of 0 means unknown (the owner's thread could not read its /proc entry):
# then only existence counts. Owner ids mean nothing across pid namespaces (Host.attach refuses
# that).
OWNER_TID_MASK = 0x7FFFFFFF  # bit 31 of the low word is free: tids are < 2^22
OWNER_START_MASK = 0x7FFFFFFF  # start time kept to 31 bits: 248 days of uptime at 100 Hz
# Xen's channel lock is a rwlock: senders, EVTCHNOP_unmask and VIRQ raisers read-lock it, the
# control plane write-locks it. Here it is one owner word; a read-type holder stores its owner |
# this bit, so that a VIRQ raiser (Xen: read_trylock, which fails only against a writer) can
# tell a reader, whom it waits for, from a writer, against whom it drops the event.
CHANNEL_LOCK_READER = 1 << 31

# One spin policy for every lock and bounded spin, in every backend: LOCK_SPINS looks at the word
# with a CPU relax between them, then a sched_yield per look, and every LOCK_YIELDS_PER_CHECK
# yields the owner's liveness is checked (a dead owner's lock is taken over). A lock taken from
# Python waits in slices of LOCK_SLICE_NS without the GIL and looks for signals between them.
LOCK_SPINS = 100
LOCK_YIELDS_PER_CHECK = 256
LOCK_SLICE_NS = 20_000_000
# The guest's FIFO unmask spins while BUSY is set (Xen retrying a LINK, at most 4 cmpxchgs);
# after UNMASK_BUSY_SPINS relaxes and UNMASK_BUSY_YIELDS yields it takes the queue lock the
# BUSY holder must hold, so that a sender killed inside set_link cannot hang the guest.
UNMASK_BUSY_SPINS = 4096
UNMASK_BUSY_YIELDS = 256

# --- Hypervisor-private struct evtchn, one per port -------------------------------------------
PORT_SIZE = 32
P_LOCK = 0  # u64: per-channel lock (owner id, | CHANNEL_LOCK_READER when read-type)
P_REMOTE_PORT = 8  # u32: interdomain peer port, or the VIRQ number
P_REMOTE_DOM = 12  # u16: interdomain/unbound peer domain
P_NOTIFY_VCPU = 14  # u16: notify_vcpu_id
P_STATE = 16  # u8: ECS_*
P_PRIORITY = 17  # u8: FIFO priority
P_PENDING = 18  # u8: FIFO "pending while the array page was missing"
P_LASTQ = 20  # u32: FIFO last queue: byte 0 priority, bytes 2-3 vCPU


def lastq_pack(vcpu: int, priority: int) -> int:
    """The P_LASTQ word: the queue (vCPU, priority) an event was last linked on."""
    return (vcpu << 16) | priority


# --- Hypervisor-private per-vCPU state ---------------------------------------------------------
XEN_VCPU_SIZE = 512
X_KICK = 0  # u32 futex word, bumped when a blocked vCPU is kicked
X_WAITERS = 4  # u32 bitmap: bit i set while waiter slot i's owner is blocked in wait()/poll()
X_POLL_EVTCHN = 8  # i32 poll_evtchn: 0, -1 (several), or port
X_POLL = 12  # u32: this vCPU's bit of d->poll_mask (POLL_* values)
WAITER_SLOTS = 16
X_WAITER = 16  # u64[WAITER_SLOTS]: owner id of each blocked waiter, 0 = free slot
X_QUEUES = X_WAITER + 8 * WAITER_SLOTS  # 16 x {u32 tail, u32 pad, u64 lock}
QUEUE_SIZE = 16
Q_TAIL, Q_LOCK = 0, 8
X_VIRQ = X_QUEUES + FIFO_MAX_QUEUES * QUEUE_SIZE  # u32 virq_to_evtchn[NR_VIRQS]
WAIT_SLICE_NS = 50_000_000  # wait() and poll() sleep at most this long between signal checks
WAIT_FALLBACK_NS = 1_000_000  # all waiter slots taken: poll the upcall flag this often
# wait() first spins on the upcall flag, unregistered (a kick then costs the sender no system
# call), for up to spin_ns; Host.wait_spin_ns is the default, which starts at WAIT_SPIN_NS
# (see bench/calls.py's and bench/latency.py's figures for how it was chosen).
WAIT_SPIN_NS = 0
SPIN_LOOKS_PER_CLOCK = 64  # flag looks between two clock reads while spinning

# --- SCHEDOP_poll (xen/common/sched/core.c do_poll, event_channel.c evtchn_check_pollers) -----
SCHED_POLL_MAX_PORTS = 128  # "fairly arbitrary limit": more is -EINVAL
POLL_IDLE = 0  # X_POLL: not polling
POLL_ACTIVE = 1  # polling: the poll_mask bit is set
POLL_WOKEN = 1 << 31  # | port: evtchn_check_pollers cleared the bit for `port`
# Why a poll returned (Xen returns 0 in every case; the model tells them apart).
POLL_TIMEOUT, POLL_PENDING, POLL_EVENT, POLL_UPCALL = 0, 1, 2, 3
POLL_REASONS = {
    POLL_TIMEOUT: "timeout",
    POLL_PENDING: "pending",
    POLL_EVENT: "event",
    POLL_UPCALL: "upcall",
}

# --- Guest-private per-vCPU state (Linux per-CPU variables) ------------------------------------
GUEST_VCPU_SIZE = 128
G_HANDLER_LOCK = 0  # u64 lock: the upcall handler runs on one CPU at a time
G_LOCAL_READY = 8  # u32: READY bits taken but not yet served (consume stopped early)
G_LOCAL_HEAD = 12  # u32[16]: Linux's per-queue local head
G_RESUME_WORD = 76  # u32: 2l/3l current_word_idx (3l: index of the L3 word)
G_RESUME_BIT = 80  # u32: 2l/3l current_bit_idx

# --- Domain header (page 0) --------------------------------------------------------------------
DOMAIN_MAGIC = 0x31444E4843545645  # b"EVTCHND1" little-endian
H_MAGIC = 0  # u64
H_VERSION = 8
H_DOMID = 12
H_ABI = 16
H_VCPUS = 20
H_WORD_BITS = 24
H_LINK_BITS = 28
H_MAX_PORTS = 32  # effective limit: ports 0 .. max_ports-1
H_VALID = 36  # valid_evtchns: grows by buckets, never shrinks (XSA-338)
H_EVENT_LOCK = 40  # u64 lock: per-domain event_lock
H_ARRAY_PAGES = 48  # FIFO event-array pages added so far (num_evtchns / 1024)
H_ALLOC_HINT = 52  # no FREE port below this one
H_AUTO_EXPAND = 56  # guest expands the event array on bind (Linux behaviour)
H_INJECT = 60  # a known historical bug put back (INJECTIONS), 0 = none
H_RESET_LOCK = 64  # u64 lock: EVTCHNOP_reset in progress (Xen: d->next_evtchn != 0)
H_LAYOUT = 72  # u64 region offsets, in REGIONS order
REGIONS = (
    "shared_info",
    "vcpu_info_ext",
    "control",
    "l3_pending",
    "l3_mask",
    "l2_selector",
    "ports",
    "xen_vcpu",
    "guest_vcpu",
    "cpumask",
    "event_array",
)
H_REGION = {name: H_LAYOUT + 8 * i for i, name in enumerate(REGIONS)}
H_CPUMASK_BYTES = H_LAYOUT + 8 * len(REGIONS)  # u64: cpumask bytes per vCPU
H_SEGMENT_SIZE = H_CPUMASK_BYTES + 8  # u64
H_POLLERS = H_SEGMENT_SIZE + 8  # u32: vCPUs with their poll_mask bit set (bitmap_empty test)

# --- Host header ---------------------------------------------------------------------------------
HOST_MAGIC = 0x31484E4843545645  # b"EVTCHNH1"
HH_MAGIC = 0  # u64
HH_VERSION = 8
HH_NDOMAINS = 12  # published (release) after the domain segment is initialised
HH_CREATOR = 16  # pid of the creating process: the only one that unlinks
HH_INJECT = 20  # copied into each new domain's H_INJECT
HH_LOCK = 24  # u64 lock: serialises create_domain
HH_PIDNS = 32  # u64: inode of the creator's pid namespace (owner ids are tids in it)
HOST_SIZE = PAGE_SIZE
MAX_DOMAINS = DOMID_FIRST_RESERVED
SEGMENT_PREFIX = "evtchn-"


def domain_segment_name(host_name: str, domid: int) -> str:
    """The /dev/shm name of domain `domid`'s segment on host `host_name`."""
    return f"{host_name}-d{domid}"


def abi_max_ports(abi: int, word_bits: int, link_bits: int) -> int:
    """Ports the ABI can address: W^2 (2l), W^3 (3l), 2^link_bits (fifo)."""
    if abi == ABI_2L:
        return word_bits**2
    if abi == ABI_3L:
        return word_bits**3
    return 1 << link_bits


def _pages(nbytes: int) -> int:
    return -(-nbytes // PAGE_SIZE) * PAGE_SIZE


@dataclasses.dataclass(frozen=True)
class DomainLayout:
    """Offsets of every region of one domain's segment (bytes from the segment start)."""

    abi: int
    vcpus: int
    word_bits: int
    link_bits: int
    max_ports: int
    offsets: dict[str, int]
    cpumask_bytes: int
    size: int

    @property
    def l2_selector_bytes(self) -> int:
        return self.word_bits * self.word_bits // 8

    @property
    def l3_bitmap_bytes(self) -> int:
        return self.word_bits**3 // 8

    def vcpu_info(self, vcpu: int) -> int:
        if vcpu < LEGACY_MAX_VCPUS:
            return self.offsets["shared_info"] + VCPU_INFO_SIZE * vcpu
        return self.offsets["vcpu_info_ext"] + VCPU_INFO_SIZE * (vcpu - LEGACY_MAX_VCPUS)

    def control_block(self, vcpu: int) -> int:
        return self.offsets["control"] + PAGE_SIZE * vcpu

    def l2_selector(self, vcpu: int) -> int:
        return self.offsets["l2_selector"] + self.l2_selector_bytes * vcpu

    def port(self, port: int) -> int:
        return self.offsets["ports"] + PORT_SIZE * port

    def xen_vcpu(self, vcpu: int) -> int:
        return self.offsets["xen_vcpu"] + XEN_VCPU_SIZE * vcpu

    def guest_vcpu(self, vcpu: int) -> int:
        return self.offsets["guest_vcpu"] + GUEST_VCPU_SIZE * vcpu

    def cpumask(self, vcpu: int) -> int:
        return self.offsets["cpumask"] + self.cpumask_bytes * vcpu

    def event_word(self, port: int) -> int:
        return self.offsets["event_array"] + 4 * port


def domain_layout(
    abi: int, vcpus: int, word_bits: int, link_bits: int, max_ports: int
) -> DomainLayout:
    """Place the regions of a domain; sizes follow the ABI's limits (see the module doc)."""
    w = word_bits
    fifo, l3 = abi == ABI_FIFO, abi == ABI_3L
    cpumask_bytes = 0 if fifo else _round(max(max_ports, w * w) // 8, 64)
    sizes = {
        "shared_info": PAGE_SIZE,
        "vcpu_info_ext": _pages(max(0, vcpus - LEGACY_MAX_VCPUS) * VCPU_INFO_SIZE),
        "control": PAGE_SIZE * vcpus if fifo else 0,
        "l3_pending": _pages(w**3 // 8) if l3 else 0,
        "l3_mask": _pages(w**3 // 8) if l3 else 0,
        "l2_selector": _pages(vcpus * w * w // 8) if l3 else 0,
        "ports": _pages(_round(max_ports, EVTCHNS_PER_BUCKET) * PORT_SIZE),
        "xen_vcpu": _pages(vcpus * XEN_VCPU_SIZE),
        "guest_vcpu": _pages(vcpus * GUEST_VCPU_SIZE),
        "cpumask": _pages(vcpus * cpumask_bytes),
        "event_array": _pages(4 << link_bits) if fifo else 0,
    }
    offsets, at = {}, PAGE_SIZE  # page 0 is the header
    for name in REGIONS:
        offsets[name] = at
        at += sizes[name]
    return DomainLayout(abi, vcpus, w, link_bits, max_ports, offsets, cpumask_bytes, at)


def _round(n: int, to: int) -> int:
    return -(-n // to) * to


def _check_alignment() -> None:
    """Every u64 lock word is naturally aligned and every region fits its slot: a misaligned
    atomic is not atomic, so a layout edit that breaks this must fail at import."""
    u64s = {
        "P_LOCK": P_LOCK,
        "H_EVENT_LOCK": H_EVENT_LOCK,
        "H_RESET_LOCK": H_RESET_LOCK,
        "H_LAYOUT": H_LAYOUT,
        "HH_LOCK": HH_LOCK,
        "HH_PIDNS": HH_PIDNS,
        "X_WAITER": X_WAITER,
        "X_QUEUES + Q_LOCK": X_QUEUES + Q_LOCK,
        "G_HANDLER_LOCK": G_HANDLER_LOCK,
    }
    bad = [name for name, off in u64s.items() if off % 8]
    bad += [n for n, size in (("PORT_SIZE", PORT_SIZE), ("QUEUE_SIZE", QUEUE_SIZE)) if size % 8]
    if X_VIRQ + 4 * NR_VIRQS > XEN_VCPU_SIZE or P_LASTQ + 4 > PORT_SIZE:
        bad.append("a per-vCPU or per-port field beyond its slot")
    if G_RESUME_BIT + 4 > GUEST_VCPU_SIZE or H_POLLERS + 4 > PAGE_SIZE:
        bad.append("a guest per-vCPU or header field beyond its slot")
    if bad:
        raise ImportError(f"evtchn.layout is inconsistent: {', '.join(bad)}")


_check_alignment()
