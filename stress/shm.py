"""The harness's own shared memory: control words, per-worker counters and per-port tallies.

One /dev/shm file, ``evtchn-<creator pid>-stress-<hex>`` (so ``python -m stress cleanup`` finds
it next to the engine's segments), created and unlinked by the parent only; workers map it by
name. Every array has exactly one writer (a worker writes its own header and its own per-port
rows; the parent writes the control words), so no atomics are needed: the parent reads counters
only once the writers have acknowledged a pause, or as a monotonic progress figure.

Per-port tallies are indexed by dom0 port number, which is stable while a channel lives: a
closer retires a port only after its last event was delivered or counted as destroyed.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import secrets

import numpy as np

SHM_DIR = "/dev/shm"
PREFIX = "evtchn-"

# --- control words (u64, written by the parent) -------------------------------------------------
C_STOP = 0  # 1: every worker leaves its loop
C_PAUSE = 1  # 1: senders and chaos workers finish their batch and wait
C_HOLD = 2  # 1: vCPUs stop consuming (their queues fill up)
C_FINISH = 3  # 1: chaos workers undo what they hold (maskers unmask) and report FINISHED
C_EPOCH = 4  # bumped at each quiescent check (informational)
C_RELEASE = 5  # generation of the last vCPU release (vCPUs copy it to H_ACK)
C_SAMPLE_MASK = 6  # latency is timed on 1 port in (mask + 1): those with port_sampled set
C_DUEL = 7  # generation of the running duel (stress.duels), 0 = none
C_PHASE = 8  # what the parent is doing (PH_* below; read by tests and observers)
N_CTRL = 16

# --- phases of the parent (C_PHASE) ----------------------------------------------------------
PH_SETUP, PH_START, PH_RACE, PH_CHECK, PH_FINAL, PH_ORDERED, PH_DUEL, PH_STOP = range(1, 9)
PHASE_NAMES = ("-", "setup", "start", "race", "check", "final", "ordered", "duel", "stop")

# --- per-worker header (u64 words) ----------------------------------------------------------------
H_PID = 0
H_STATE = 1  # S_* below
H_LOOPS = 2  # heartbeat: bumped once per loop iteration
H_SEQ = 3  # odd while a vCPU is inside consume + accounting (a seqcount)
H_SENT = 4  # sends issued (senders)
H_EDGES = 5  # sends that set PENDING 0 -> 1
H_DELIVERED = 6  # ports delivered by consume (vCPUs)
H_BATCHES = 7  # send_many / consume batches
H_OPS = 8  # chaos operations (masks, moves, closes)
H_DESTROYED = 9  # pending edges cleared by a close (senders' closers)
H_CLOSES = 10  # close + rebind cycles done
H_LAT_MAX = 11  # worst latency sample seen (ns)
H_LAT_MAX_PORT = 12
H_NVIOL = 13  # violations recorded in this worker's ring
H_OVERLAPS = 14  # a port seen in another vCPU's handler at the same time (moved ports)
H_ACK = 15  # last release generation seen (vCPUs)
H_WAKEUPS = 16  # wait() calls that returned with an upcall pending
H_EMPTY = 17  # consume calls that delivered nothing
H_BUSY_NS = 18  # time spent sending / consuming (ns)
H_ERRNO = 19  # last unexpected errno
H_MOVES = 20
H_MASKS = 21
H_PRIOS = 22
H_TIMEOUTS = 23  # wait() calls that timed out
H_CPU_NS = 24  # CPU time the worker process used (updated every ~64 loops)
H_DUEL_ACK = 25  # generation of the last duel this worker took part in
H_RESETS = 26  # resetter: EVTCHNOP_reset calls that succeeded
H_EAGAIN = 27  # resetter: ... that returned EAGAIN (channels re-opened meanwhile) and were retried
H_EBUSY = 28  # resetter: ... that returned EBUSY (another reset in progress) and were retried
H_GAVE_UP = 29  # resetter: rounds whose reset still failed after RESET_TRIES attempts
H_BINDS = 30  # resetter: channels of K bound again after a reset closed them
H_RACED = 31  # resetter: ... of them while another resetter's reset was in progress
H_IN_RESET = 32  # resetter: 1 while inside EVTCHNOP_reset
N_HDR = 40

S_STARTING, S_READY, S_RUNNING, S_PAUSED, S_HELD, S_FINISHED, S_DONE, S_FAILED = range(8)
STATE_NAMES = ("starting", "ready", "running", "paused", "held", "finished", "done", "failed")

# --- violations recorded by workers -----------------------------------------------------------
VIOL_SLOTS = 32  # per worker; more are counted, not stored
VIOL_WORDS = 6  # kind, port, vcpu, a, b, time_ns

# --- per-port classes (u8 bit flags) ------------------------------------------------------------
CL_PERMA = 1  # masked for the whole run
CL_MASK = 2  # maskers toggle it
CL_MOVE = 4  # movers change its vCPU / priority
CL_CLOSE = 8  # its sender closes and rebinds it
CL_LIVE = 16  # a live channel's dom0 port (cleared when a closer retires it)

# --- per-port delivery tags: the vCPU a port may be delivered on, or one of these -------------
TAG_ANY = 0xFFFF  # moved ports: any vCPU
TAG_PERMA = 0xFFFE  # masked for the whole run: never
TAG_DEAD = 0xFFFD  # not a live channel's port (closed, or never bound): never

# --- latency histogram: log2 buckets with 8 linear sub-buckets ----------------------------------
HIST_SUB = 8
HIST_BUCKETS = 64 * HIST_SUB


@dataclasses.dataclass(frozen=True)
class Shape:
    """Everything the layout depends on; pickled to the workers."""

    senders: int
    vcpus: int
    chaos: int  # chaos worker processes (maskers + movers)
    nports: int  # dom0's max_ports: per-port arrays span 0 .. nports-1
    channels: int
    kchans: int = 0  # channels of the resetting domain K (stress.resetter); 0 = no K
    resetters: int = 0  # resetter processes of K

    @property
    def kworkers(self) -> int:
        """K's processes: its sender (on dom0's side), its vCPU and the resetters."""
        return 2 + self.resetters if self.kchans else 0

    @property
    def workers(self) -> int:
        return self.senders + self.vcpus + self.chaos + self.kworkers


def _layout(shape: Shape):
    """(name, dtype, shape) of every array, in order; each starts on a 64-byte boundary."""
    w, s, v, np_, c = shape.workers, shape.senders, shape.vcpus, shape.nports, shape.channels
    kc = max(1, shape.kchans)
    return [
        ("ctrl", np.uint64, (N_CTRL,)),
        ("duel", np.uint64, (48,)),
        ("hdr", np.uint64, (w, N_HDR)),
        ("viol", np.uint64, (w, VIOL_SLOTS, VIOL_WORDS)),
        # channel table (writers: the parent at setup, then the owning sender)
        ("ch_dport", np.uint32, (c,)),
        ("ch_lport", np.uint32, (c,)),
        ("ch_sender", np.uint32, (c,)),
        ("ch_vcpu", np.uint32, (c,)),
        ("ch_prio", np.uint32, (c,)),
        ("ch_class", np.uint8, (c,)),
        # per dom0 port
        ("port_class", np.uint8, (np_,)),
        ("port_tag", np.uint16, (np_,)),  # where a delivery is allowed (TAG_* or a vCPU)
        ("port_sampled", np.bool_, (np_,)),  # latency is timed on this port
        ("active", np.uint16, (np_,)),  # vCPU+1 whose handler holds the port now
        ("stamp", np.uint64, (np_,)),  # first send since the last handling (ns)
        ("edges", np.uint32, (s, np_)),  # per sender
        ("destroyed", np.uint32, (s, np_)),  # per sender (its closer)
        ("extra", np.uint32, (max(1, shape.chaos), np_)),  # edges made by a chaos unmask
        ("maybe", np.uint32, (max(1, shape.chaos), np_)),  # unmasks that may have made one
        ("delivered", np.uint32, (v, np_)),  # per vCPU
        ("lat_sum", np.uint64, (v, np_)),  # per vCPU
        ("lat_cnt", np.uint32, (v, np_)),  # per vCPU
        ("hist", np.uint64, (v, HIST_BUCKETS)),  # per vCPU
        # K's channels (stress.resetter); the writer of each is named
        ("kch_dport", np.uint32, (kc,)),  # dom0's port (fixed at setup)
        ("kch_kport", np.uint32, (kc,)),  # K's port of the current binding (its binder)
        ("kchan_of", np.uint16, (np_ if shape.kchans else 1,)),  # dom0 port -> channel + 1
        ("kedges", np.uint64, (kc,)),  # PENDING 0 -> 1 edges of the sends (K's sender)
        ("kdeliv", np.uint64, (kc,)),  # deliveries (K's vCPU)
        ("kbinds", np.uint64, (kc,)),  # bindings so far, the setup's included (binder)
        ("kbase_e", np.uint64, (kc,)),  # kedges when the current binding began (binder)
        ("kbase_d", np.uint64, (kc,)),  # kdeliv when the current binding began (binder)
        ("kdestroyed", np.uint64, (kc,)),  # events destroyed by the closes of ended bindings
    ]


def _offsets(shape: Shape):
    at, out = 0, {}
    for name, dtype, dims in _layout(shape):
        at = -(-at // 64) * 64
        nbytes = int(np.prod(dims)) * np.dtype(dtype).itemsize
        out[name] = (at, dtype, dims)
        at += nbytes
    return out, -(-at // mmap.PAGESIZE) * mmap.PAGESIZE


class Stats:
    """The mapped stats segment; ``Stats.create`` in the parent, ``Stats.attach`` in workers."""

    def __init__(self, name: str, shape: Shape, create: bool):
        self.name, self.shape, self.owner = name, shape, create
        self._pid = os.getpid()
        offsets, size = _offsets(shape)
        path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)  # sparse: only touched pages use memory
            elif os.fstat(fd).st_size < size:
                raise ValueError(f"stats segment {name!r} is smaller than its layout")
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.size = size
        raw = np.frombuffer(self._mm, np.uint8)  # frombuffer pins the mapping
        for key, (off, dtype, dims) in offsets.items():
            n = int(np.prod(dims))
            arr = raw[off : off + n * np.dtype(dtype).itemsize].view(dtype).reshape(dims)
            setattr(self, key, arr)

    @classmethod
    def create(cls, shape: Shape) -> Stats:
        name = f"{PREFIX}{os.getpid()}-stress-{secrets.token_hex(4)}"
        return cls(name, shape, True)

    @classmethod
    def attach(cls, name: str, shape: Shape) -> Stats:
        return cls(name, shape, False)

    # -- worker index helpers ---------------------------------------------------------------
    def sender_slot(self, i: int) -> int:
        return i

    def vcpu_slot(self, v: int) -> int:
        return self.shape.senders + v

    def chaos_slot(self, i: int) -> int:
        return self.shape.senders + self.shape.vcpus + i

    def k_slot(self, i: int) -> int:
        """K's processes: 0 its sender, 1 its vCPU, 2.. the resetters."""
        return self.shape.senders + self.shape.vcpus + self.shape.chaos + i

    def record(
        self, slot: int, kind: int, port: int, vcpu: int, a: int = 0, b: int = 0, t_ns: int = 0
    ) -> None:
        """Store a violation found by worker `slot` (only that worker calls this)."""
        h = self.hdr[slot]
        n = int(h[H_NVIOL])
        if n < VIOL_SLOTS:
            self.viol[slot, n] = (
                kind,
                port & (2**64 - 1),
                vcpu & (2**64 - 1),
                a & (2**64 - 1),
                b & (2**64 - 1),
                t_ns,
            )
        h[H_NVIOL] = n + 1

    def close(self) -> None:
        """Unmap (when nothing else holds a view) and, in the creating process, unlink."""
        if self.owner and os.getpid() == self._pid:
            unlink(self.name)
        for key, _, _ in _layout(self.shape):
            setattr(self, key, None)
        try:
            self._mm.close()
        except (BufferError, ValueError):
            pass


def unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


def leftovers() -> list[tuple[str, int]]:
    """(name, creator pid) of every evtchn segment in /dev/shm whose creator is gone."""
    out = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return out
    for name in sorted(names):
        if not name.startswith(PREFIX):
            continue
        pid_text = name[len(PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if not pid_alive(pid):
            out.append((name, pid))
    return out


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited: its segments are orphans too.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state != b"Z"
    except (OSError, IndexError):
        return True
