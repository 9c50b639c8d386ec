"""The resetting domain K: a kexec'ing guest whose channels are reset while events flow (R14).

K (same ABI as dom0, one vCPU) has RESET_CHANNELS interdomain channels to dom0 and receives
on them: K's sender (a process on dom0's side, the backends) sends on dom0's ports, K's vCPU
process consumes. Resetter processes call EVTCHNOP_reset on K (closes every port of K; dom0's
ends go back to unbound, waiting for K) and then bind K's channels again with
bind_interdomain, as a kexec'd guest's frontends do, while the sender keeps sending. A reset
may fail with EAGAIN (channels were opened while it ran, Xen 8d385b247b) or EBUSY (another
reset is in progress): the resetter retries and counts both. With two resetters each binds
its own half of the channels, so resets race each other (EBUSY) and the other's binds (EAGAIN).

Accounting, per channel and per binding ("epoch"), exact except for one bit a close owns:
a binding's bind sets K's new port pending (one event), and every send edge while it lasts
is either delivered or pending when a reset closes the port (close clears PENDING: that event
is destroyed, at most one per binding). So when its binder finds a binding closed, with E its
send edges and D its deliveries, X = 1 + E - D must be 0 or 1 (X < 0: a phantom delivery;
X > 1: X - 1 events lost), and X is counted as destroyed. At a quiescent point (K's sender
and resetters paused, K's vCPU drained) a live binding must have X == 0 exactly. Edges are
counted by K's sender, deliveries by K's vCPU, which reads in K's port table which binding a
delivered port belongs to (its dom0 port: the channel). A binder settles a binding and binds
again under a lock that K's vCPU holds for each handler run (BindLock), once K's sender
finished the send batch in flight (its seqcount): both tallies are complete when it reads
them, and a port closed and bound to another channel meanwhile is never counted for the wrong
one. Also checked: after a successful reset (one resetter) no port of K is open, and
at any time no binding of K is without its FIFO event-array word or masked, so that its
events would be parked for ever (a channel bound while a reset wiped K's array, R14).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time

import numpy as np

from evtchn import EvtchnError
from evtchn import layout as L

from . import shm as S

ROLES = ("ksender", "kvcpu", "resetter")

# violations recorded by K's processes (codes continue stress.workers' list, below the duels')
V_K_LOST = 8
V_K_PHANTOM = 9
V_K_PARKED = 10
V_K_OPEN = 11
V_K_ERROR = 12
V_K_DEAD = 13
KINDS = {
    V_K_LOST: "reset-lost",
    V_K_PHANTOM: "reset-phantom",
    V_K_PARKED: "reset-parked",
    V_K_OPEN: "reset-left-open",
    V_K_ERROR: "reset-error",
    V_K_DEAD: "dead-delivered",
}
DESCRIPTIONS = {
    "reset-lost": "a binding of the resetting domain lost more events than its close destroyed",
    "reset-phantom": "the resetting domain delivered more events than a binding raised",
    "reset-parked": "a bound port of the resetting domain without its array word, or masked",
    "reset-left-open": "a port of the resetting domain open after a reset succeeded",
    "reset-error": "EVTCHNOP_reset or a re-bind failed with an unexpected errno",
}

# where a V_K_ERROR happened (its second word)
WHERE_RESET, WHERE_SEND, WHERE_BIND, WHERE_DOM0 = range(4)

SEND_PERIOD = 0.001  # K's sender: one batch per millisecond
RESET_TRIES = 50  # attempts per reset round (EAGAIN / EBUSY retries)
QUIET_WAIT = 5.0  # seconds a binder waits for the sender's batch / the handler run to end
POLL = 0.002


def kdomid(cfg) -> int:
    """K's domid: created right after the sender domains."""
    return 1 + cfg.senders


def seeds(seed: int, n: int):
    return np.random.SeedSequence(seed).spawn(4)[3].spawn(n)


def names(cfg) -> list[str]:
    if not cfg.kchans:
        return []
    return ["ksender-0", "kvcpu-0"] + [f"resetter-{i}" for i in range(cfg.resetters)]


def owner(i: int, resetters: int) -> int:
    """The resetter that binds channel i again (each channel has one binder)."""
    return i % resetters


def setup(cfg, host, dom0, stats, kdom) -> None:
    """K's channels: dom0 allocates, K binds (K's vCPU will deliver the bind events)."""
    st = stats
    for i in range(cfg.kchans):
        d = dom0.alloc_unbound(kdom.domid)
        kp = kdom.bind_interdomain(0, d)
        st.kch_dport[i], st.kch_kport[i] = d, kp
        st.kchan_of[d] = i + 1
        st.kbinds[i] = 1


def make(role: str, env, index: int, rng):
    cls = {"ksender": KSender, "kvcpu": KVCPU, "resetter": Resetter}[role]
    return cls(env, index, rng)


class BindLock:
    """K's vCPU runs its handler and reads which binding each delivered port belongs to under
    this lock, and a binder settles a binding's tallies and binds again under it: so a port
    that a reset closed and a bind gave to another channel meanwhile is never counted for the
    wrong channel. An flock on the stats segment's file: the kernel drops it when its holder
    dies, so a killed K process cannot block the others."""

    def __init__(self, stats: S.Stats):
        self.fd = os.open(os.path.join(S.SHM_DIR, stats.name), os.O_RDWR)

    @contextlib.contextmanager
    def held(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)


def quiet(hdr_row, deadline_s: float, stop) -> bool:
    """Wait until a worker is not inside a send batch / handler run that had begun when we
    looked (its seqcount is even, or moved on)."""
    s0 = int(hdr_row[S.H_SEQ])
    if not s0 & 1:
        return True
    end = time.monotonic() + deadline_s
    while int(hdr_row[S.H_SEQ]) == s0:
        if time.monotonic() > end or stop():
            return False
        time.sleep(0.0002)
    return True


# ---------------------------------------------------------------------------------------------
class KSender:
    """dom0's side of K's channels (the backends): a batch of sends on dom0's ports every
    SEND_PERIOD, each new PENDING 0 -> 1 edge counted per channel. A send on a port that a
    reset left unbound is dropped, as in Xen (no edge)."""

    role = "ksender"

    def __init__(self, env, index: int, rng):
        self.env, self.index, self.rng = env, index, rng
        st = env.stats
        self.slot = st.k_slot(0)
        self.hdr = st.hdr[self.slot]
        self.n = env.cfg.kchans
        self.dports = st.kch_dport[: self.n].copy()
        self.kedges = st.kedges
        self.edges = np.zeros(4 * self.n, np.uint8)
        self.next = 0.0
        self.inline = False  # stress.run's single-process crew: never sleep

    def step(self) -> bool:
        now = time.monotonic()
        if now < self.next:
            if not self.inline:
                time.sleep(min(POLL, self.next - now))
            return False
        self.next = now + SEND_PERIOD
        pick = self.rng.integers(0, self.n, 4 * self.n)
        edges = self.edges
        h = self.hdr
        h[S.H_SEQ] += 1  # odd: a batch is in flight
        try:
            self.env.dom0.send_many(self.dports[pick], edges)
        except EvtchnError as exc:
            self.env.stats.record(self.slot, V_K_ERROR, 0, 0, exc.errno or 0, WHERE_SEND)
        else:
            np.add.at(self.kedges, pick, edges.astype(np.uint64))
            ne = int(np.count_nonzero(edges))
            h[S.H_SENT] += len(pick)
            h[S.H_EDGES] += ne
            h[S.H_BATCHES] += 1
        finally:
            h[S.H_SEQ] += 1
        return True


class KVCPU:
    """K's vCPU 0: blocks until its upcall is pending, runs the handler, and counts each
    delivery for the channel whose binding it was (K's port table names dom0's port)."""

    role = "kvcpu"

    def __init__(self, env, index: int, rng=None, inline: bool = False):
        self.env, self.inline = env, inline
        st = env.stats
        self.slot = st.k_slot(1)
        self.hdr = st.hdr[self.slot]
        self.kdom = env.kdom
        dm = self.kdom._dm
        self.u32 = dm.u32
        self.remote0 = (dm.layout.port(0) + L.P_REMOTE_PORT) // 4
        self.stride = L.PORT_SIZE // 4
        self.buf = np.zeros(1024, np.uint32)
        self.kchan_of = st.kchan_of
        self.kdeliv = st.kdeliv
        self.lock = BindLock(st)

    def step(self) -> bool:
        h, kdom = self.hdr, self.kdom
        if self.inline:
            if not kdom.upcall_pending(0):
                return False
        elif not kdom.wait(0, 0.05):
            return False
        h[S.H_WAKEUPS] += 1
        with self.lock.held():
            h[S.H_SEQ] += 1  # odd: inside the handler
            try:
                while True:
                    n = kdom.consume_into(0, self.buf)
                    h[S.H_BATCHES] += 1
                    if n:
                        self.account(self.buf[:n])
                    if n < len(self.buf):
                        break
            finally:
                h[S.H_SEQ] += 1
        return True

    def account(self, ports: np.ndarray) -> None:
        remote = self.u32[self.remote0 + ports.astype(np.int64) * self.stride]
        chan = self.kchan_of[remote].astype(np.int64) - 1
        bad = chan < 0
        if bad.any():
            for p in ports[bad][:8].tolist():
                self.env.stats.record(self.slot, V_K_DEAD, p, 0, 0, 0, time.monotonic_ns())
        np.add.at(self.kdeliv, chan[~bad], 1)
        self.hdr[S.H_DELIVERED] += len(ports)

    def flush_latency(self) -> None:
        pass  # K's deliveries are not timed


class Resetter:
    """EVTCHNOP_reset on K at its share of --resets per second, then K binds again each of
    its channels that the reset (or another resetter's) closed; the epoch accounting of the
    module docstring at each such binding."""

    role = "resetter"

    def __init__(self, env, index: int, rng):
        self.env, self.index, self.rng = env, index, rng
        st, cfg = env.stats, env.cfg
        self.st = st
        self.slot = st.k_slot(2 + index)
        self.hdr = st.hdr[self.slot]
        self.kdom, self.dom0 = env.kdom, env.dom0
        self.kdm, self.dm0 = env.kdom._dm, env.dom0._dm
        self.alone = cfg.resetters == 1
        n = cfg.kchans
        self.mine = [i for i in range(n) if owner(i, cfg.resetters) == index]
        self.period = cfg.resetters / cfg.resets
        self.next = time.monotonic() + self.period * rng.random()
        self.sender_hdr = st.hdr[st.k_slot(0)]
        self.binder_hdrs = [st.hdr[st.k_slot(2 + r)] for r in range(cfg.resetters)]
        self.inline = False  # stress.run's single-process crew: nothing runs meanwhile
        self.lock = BindLock(st)

    def step(self) -> bool:
        now = time.monotonic()
        if now < self.next:
            if not self.inline:
                time.sleep(min(POLL, self.next - now))
            return False
        self.next = now + self.period * (0.5 + self.rng.random())
        if self.reset() and self.alone:
            self.check_closed()
        self.rebind()
        self.check_bound()
        return True

    def _stop(self) -> bool:
        return bool(self.st.ctrl[S.C_STOP])

    def reset(self) -> bool:
        """One reset of K, retried on EAGAIN and EBUSY; True if one succeeded."""
        h = self.hdr
        h[S.H_SEQ] += 1  # odd: a reset in progress (check_bound skips meanwhile)
        h[S.H_IN_RESET] = 1
        try:
            for _ in range(RESET_TRIES):
                try:
                    self.kdom.reset()
                except EvtchnError as exc:
                    if exc.errno == errno.EAGAIN:
                        h[S.H_EAGAIN] += 1
                    elif exc.errno == errno.EBUSY:
                        h[S.H_EBUSY] += 1
                    else:
                        self.st.record(self.slot, V_K_ERROR, 0, 0, exc.errno or 0, WHERE_RESET)
                        return False
                    if self._stop():
                        return False
                    time.sleep(0.0005 + 0.001 * self.rng.random())
                    continue
                h[S.H_RESETS] += 1
                return True
            h[S.H_GAVE_UP] += 1
            return False
        finally:
            h[S.H_IN_RESET] = 0
            h[S.H_SEQ] += 1

    def check_closed(self) -> None:
        """R14: a reset that succeeded left no port of K open (nobody else binds them)."""
        dm = self.kdm
        base = dm.layout.port(0) + L.P_STATE
        valid = dm.hdr(L.H_VALID)
        states = dm.u8[base : base + valid * L.PORT_SIZE : L.PORT_SIZE]
        for p in np.flatnonzero(states > L.ECS_RESERVED)[:4].tolist():
            self.st.record(self.slot, V_K_OPEN, p, 0, int(states[p]), 0, time.monotonic_ns())

    def rebind(self) -> None:
        st, h = self.st, self.hdr
        for i in self.mine:
            d = int(st.kch_dport[i])
            state = self.dm0.state(d)
            if state == L.ECS_INTERDOMAIN:
                continue
            if state != L.ECS_UNBOUND:  # dom0's end is never closed
                st.record(self.slot, V_K_ERROR, int(st.kch_kport[i]), 0, state, WHERE_DOM0)
                continue
            with self.lock.held():  # K's vCPU is outside its handler meanwhile
                if not self.end_binding(i):
                    continue  # tallies not settled yet: bind it again next round
                h[S.H_SEQ] += 1  # odd: a bind in progress (check_bound skips meanwhile)
                raced = self._resetting()
                try:
                    kp = self.kdom.bind_interdomain(0, d)
                except EvtchnError as exc:
                    kp0 = int(st.kch_kport[i])
                    st.record(self.slot, V_K_ERROR, kp0, 0, exc.errno or 0, WHERE_BIND)
                    continue
                finally:
                    h[S.H_SEQ] += 1
            st.kch_kport[i] = kp
            st.kbinds[i] += 1
            h[S.H_BINDS] += 1
            h[S.H_RACED] += raced or self._resetting()

    def _resetting(self) -> bool:
        """Is another resetter inside EVTCHNOP_reset now?"""
        return any(hd[S.H_IN_RESET] for r, hd in enumerate(self.binder_hdrs) if r != self.index)

    def end_binding(self, i: int) -> bool:
        """Channel i's binding was closed by a reset: settle its tallies (module docstring).
        The caller holds the bind lock (K's handler is not running); False if K's sender
        stayed inside a send batch for QUIET_WAIT."""
        st = self.st
        if not self.inline and not quiet(self.sender_hdr, QUIET_WAIT, self._stop):
            return False
        e, d = int(st.kedges[i]), int(st.kdeliv[i])
        x = 1 + (e - int(st.kbase_e[i])) - (d - int(st.kbase_d[i]))
        if 0 <= x <= 1:
            st.kdestroyed[i] += x
            self.hdr[S.H_DESTROYED] += x
        else:
            code = V_K_PHANTOM if x < 0 else V_K_LOST
            kp = int(st.kch_kport[i])
            st.record(self.slot, code, kp, 0, e - int(st.kbase_e[i]), d - int(st.kbase_d[i]))
        st.kbase_e[i], st.kbase_d[i] = e, d
        return True

    def check_bound(self) -> None:
        """No binding of K without its event-array word or masked (events parked for ever).
        Skipped while a resetter is inside a reset or a bind, and discarded if one began
        meanwhile (a seqlock over the resetters' seqcounts)."""
        seqs = [int(hd[S.H_SEQ]) for hd in self.binder_hdrs]
        if any(s & 1 for s in seqs):
            return
        bad = parked(self.env, self.st)
        if bad and seqs == [int(hd[S.H_SEQ]) for hd in self.binder_hdrs]:
            for kp, d, why in bad[:4]:
                self.st.record(self.slot, V_K_PARKED, kp, 0, d, why, time.monotonic_ns())


PARKED_NO_WORD, PARKED_MASKED = 1, 2


def parked(env, st) -> list[tuple[int, int, int]]:
    """(K port, dom0 port, why) of every live binding of K whose events would be parked: its
    FIFO array word is missing (why 1) or it is masked (why 2; nobody masks K's ports)."""
    dm0, kdm, kdom = env.dom0._dm, env.kdom._dm, env.kdom
    fifo = kdm.abi == L.ABI_FIFO
    words = kdm.array_pages() * L.FIFO_WORDS_PER_PAGE
    out = []
    for i in range(env.cfg.kchans):
        d = int(st.kch_dport[i])
        if dm0.state(d) != L.ECS_INTERDOMAIN:
            continue
        kp = dm0.port_u32(d, L.P_REMOTE_PORT)
        if fifo and kp >= words:
            out.append((kp, d, PARKED_NO_WORD))
        elif kdom.is_masked(kp):
            out.append((kp, d, PARKED_MASKED))
    return out
