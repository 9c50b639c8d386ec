"""Duels: two or three real processes racing one known race over and over (spec section 5).

A random workload reaches the narrow races of the ABIs only now and then, and a later event
often repairs the damage before a quiescent check sees it. A duel sets up the exact starting
state, releases the sides through a spin barrier in shared memory, lets each side wait a
random few hundred nanoseconds (so that their relative timing sweeps across the race window),
performs the operations at once, and then checks the invariant right away. Every other
iteration is *aimed*: one side watches shared memory for the moment the other side has begun
the racy sequence and acts right then, so that it lands inside the window every time the
window is open (an injected bug's window is widened by a pause, evtchn.layout R*_PAUSE_NS,
as an interrupt in it would; on a loaded machine that pause also hands the CPU over):

* consume-vs-send (2l, 3l; R1): vCPU v runs its upcall handler while a sender raises port pb
  of v. Aimed: a trigger event on port pc (another selector word) makes the handler swap a
  non-zero selector, and the sender sends pb as soon as it sees the selector become 0.
  Afterwards a pending unmasked port must have its selector bit(s) and an upcall pending.
* unmask-vs-send (2l, 3l; R2): the guest unmasks a masked port while a sender raises it.
  Aimed: the guest announces its unmask and the sender sends right after. Afterwards a
  pending port must have its selector bit(s) and an upcall pending.
* drain-vs-link (fifo; R6), poll-vs-relink (fifo; R9, 71ac522909) and relink-old-tail (fifo;
  R7, e33d4257fc): stress.duels_fifo.

Side A is a sender process (the hypervisor path of EVTCHNOP_send), side B the worker of the
vCPU (the guest), side C (when there is one) another vCPU's worker. Every other worker is
paused or held meanwhile. Every side counts its events in the usual tallies, so the exact
accounting still holds after a duel.

The kernels are called directly (``host._k``) rather than through ``Domain``: the Python
wrappers add a microsecond of jitter that would swamp a window of a few nanoseconds.
"""

from __future__ import annotations

import os
import time

import numpy as np

from evtchn import layout as L

from . import shm as S

# duel block words (u64)
D_KIND = 0
D_A_SLOT = 1
D_B_SLOT = 2
D_VCPU = 3
D_PORT_A = 4  # dom0 port raced on
D_PORT_B = 5  # a second dom0 port in the same word (consume-vs-send)
D_LPORT_A = 6  # the sender's local ports for them (fifo duels: the sender's domid)
D_LPORT_B = 7
D_END_NS = 8  # B stops starting iterations after this monotonic time
D_BFLAG = 9  # B: ready for iteration k
D_AFLAG = 10  # A: released for iteration k
D_ADONE = 11  # A: done with iteration k
D_DONE = 12  # B: no more iterations
D_ITERS = 13  # iterations run
D_HITS = 14  # violations seen
D_JITTER = 15  # spin loop iterations of random delay, at most
N_DUEL = 48

DUEL_CONSUME_SEND = 1
DUEL_UNMASK_SEND = 2
DUEL_DRAIN_LINK = 3
DUEL_POLL_RELINK = 4
DUEL_OLD_TAIL = 5
NAMES = {
    DUEL_CONSUME_SEND: "consume-vs-send",
    DUEL_UNMASK_SEND: "unmask-vs-send",
    DUEL_DRAIN_LINK: "drain-vs-link",
    DUEL_POLL_RELINK: "poll-vs-relink",
    DUEL_OLD_TAIL: "relink-old-tail",
}
FIFO_KINDS = (DUEL_DRAIN_LINK, DUEL_POLL_RELINK, DUEL_OLD_TAIL)

# fifo duels: their dom0 ports in the duel block after the common words
D_PORTS = 16  # up to 5 dom0 ports, then their 5 local ports
D_SENT = 26  # sends B and C made on the sender's domain (set-up, side C)
D_HARD_END_NS = 27  # ... and after this one even if fewer than D_MIN_ITERS ran
D_MIN_ITERS = 28
PRIO_Q, PRIO_Q3, PRIO_Q2 = 4, 8, 12

D_C_SLOT = 29  # side C's worker slot (0: no side C)
D_CFLAG = 30  # C: done with iteration k
D_CEDGES = 31  # C: PENDING 0 -> 1 edges C made in this iteration (B adds them)
D_CHECKED = 32  # B: iterations whose check applied (poll-vs-relink: the poll was ended by it)
PRIO_POLL = 7
POLL_TIMEOUT_S = 0.5
D_BGO = 33  # B: entering its operation of iteration k now (aimed iterations)
D_PORT_C = 34  # consume-vs-send: the trigger port (another word of v), 0 = none
D_LPORT_C = 35
D_AIMED = 36  # B: aimed iterations run
D_PARENT = 37  # the stress run's main process: a duel ends when it is gone

# violations recorded by B (codes continue stress.workers' list)
V_DUEL_SELECTOR_NO_UPCALL = 20
V_DUEL_STUCK = 21
V_DUEL_ORDER = 22
V_DUEL_EARLY_WAKE = 23
V_DUEL_OLD_TAIL = 24
RECORDED = 4  # violations B records one by one; the rest are counted (D_HITS)
KIND_OF = {
    DUEL_CONSUME_SEND: "selector-no-upcall",
    DUEL_UNMASK_SEND: "stuck-pending",
    DUEL_DRAIN_LINK: "priority",
    DUEL_POLL_RELINK: "early-wake",
    DUEL_OLD_TAIL: "old-tail",
}

SPIN_LIMIT_NS = 5_000_000_000  # a side that waits this long for the other gives up
AIM_DELAY = 400  # aimed unmask-vs-send: the sender's delay after the guest's signal, at most


def delays(rng, jitter: int) -> list:
    """Random delays (spin-loop iterations) at several scales: the race windows are a few
    nanoseconds wide and where they sit relative to the barrier depends on the machine."""
    scales = rng.choice([max(1, jitter // 16), max(1, jitter // 4), jitter, jitter * 4], 4096)
    return (rng.random(4096) * scales).astype(np.int64).tolist()


def aimed(k: int) -> bool:
    """Odd iterations are aimed at the window, even ones sweep across it at random."""
    return bool(k & 1)


def more(duel, k: int) -> bool:
    """B starts another iteration while the duel's time lasts, and past it (up to the hard
    end) until the minimum number of iterations ran: a loaded machine runs fewer per second.
    Not once the run's main process is gone (looked at every 256 iterations)."""
    if k & 255 == 255 and not S.pid_alive(int(duel[D_PARENT])):
        return False
    now = time.monotonic_ns()
    if now < int(duel[D_END_NS]):
        return True
    return k < int(duel[D_MIN_ITERS]) and now < int(duel[D_HARD_END_NS])


def _gave_up(duel, n: int, t_end: int) -> bool:
    """A side's wait is over: too long, or (every 64K looks) the main process is gone."""
    if time.monotonic_ns() > t_end:
        return True
    return n & 0xFFFF == 0 and not S.pid_alive(int(duel[D_PARENT]))


def spin(word, idx: int, want: int, other_done=None) -> bool:
    """Busy-wait until word[idx] == want (word is the duel block); False if it took too long
    (the other side died or the duel ended)."""
    if word[idx] == want:
        return True
    t_end = time.monotonic_ns() + SPIN_LIMIT_NS
    n = 0
    while word[idx] != want:
        n += 1
        if n & 255 == 0:
            # the other side may be descheduled (more processes than CPUs): let it run
            os.sched_yield()
            if other_done is not None and word[other_done]:
                return False
            if _gave_up(word, n, t_end):
                return False
    return True


def spin_until(pred, duel) -> bool:
    """Busy-wait until pred() holds; False after SPIN_LIMIT_NS or once B is done."""
    t_end = time.monotonic_ns() + SPIN_LIMIT_NS
    n = 0
    while not pred():
        n += 1
        if n & 255 == 0:
            os.sched_yield()
            if duel[D_DONE] or _gave_up(duel, n, t_end):
                return False
    return True


class _Bits:
    """Reads of dom0's selector state for the check (2l / 3l)."""

    def __init__(self, host):
        dm = host._dm(0)
        self.dm, lay = dm, dm.layout
        self.w = dm.word_bits
        self.wbytes = self.w // 8
        self.words = dm.words
        self.l3 = dm.abi == L.ABI_3L
        self.lay = lay

    def sel_index(self, v: int) -> int:
        """Index in `words` of vCPU v's (first-level) selector word."""
        return (self.lay.vcpu_info(v) + L.vi_pending_sel(self.w)) // self.wbytes

    def sel_ok(self, v: int, port: int) -> tuple[bool, bool, bool]:
        """(selector bit(s) for port set on v, upcall pending on v, L1 set)."""
        w, lay = self.w, self.lay
        sel = int(self.words[self.sel_index(v)])
        up = bool(self.dm.u8[lay.vcpu_info(v) + L.VI_UPCALL_PENDING] & 1)
        if self.l3:
            l2w = port // w
            l2 = int(self.words[lay.l2_selector(v) // self.wbytes + l2w // w])
            have = bool((l2 >> (l2w % w)) & 1) and bool((sel >> (l2w // w)) & 1)
        else:
            have = bool((sel >> (port // w)) & 1)
        return have, up, sel != 0


def _a_ports(duel, kind: int, k: int) -> tuple[int, int]:
    """(dom0 port, sender's local port) that side A raises in iteration k."""
    if kind == DUEL_POLL_RELINK:
        return int(duel[D_PORTS + (k & 1)]), int(duel[D_PORTS + 5 + (k & 1)])
    if kind == DUEL_DRAIN_LINK:  # y
        return int(duel[D_PORTS + 1]), int(duel[D_PORTS + 5 + 1])
    if kind == DUEL_OLD_TAIL:  # t, the old tail
        return int(duel[D_PORTS]), int(duel[D_PORTS + 5])
    if kind == DUEL_CONSUME_SEND:
        return int(duel[D_PORT_B]), int(duel[D_LPORT_B])
    return int(duel[D_PORT_A]), int(duel[D_LPORT_A])


def run_a(sender, duel) -> None:
    """Side A (a sender process): raise the port when released, for every iteration; in aimed
    iterations right when B has begun (consume-vs-send: once B's handler swapped v's selector;
    unmask-vs-send: once B announced its unmask), in poll-vs-relink once v is in its poll."""
    k_ = sender.env.host._k
    dm = sender.env.host._dm(0)
    domid = sender.dom.domid
    kind = int(duel[D_KIND])
    v = int(duel[D_VCPU])
    delay = delays(sender.rng, int(duel[D_JITTER]))
    aim_delay = sender.rng.integers(0, AIM_DELAY, 4096).tolist()
    edges_row, one = sender.edges, 0
    h = sender.hdr
    sent = k = 0
    pc, lpc = int(duel[D_PORT_C]), int(duel[D_LPORT_C])
    sel = None
    if kind == DUEL_CONSUME_SEND and pc:
        words = dm.words
        sel_i = _Bits(sender.env.host).sel_index(v)

        def sel():
            return words[sel_i] == 0

    while True:
        if not spin(duel, D_BFLAG, k + 1, D_DONE):
            break
        k += 1
        dport, lport = _a_ports(duel, kind, k)
        if sel is not None:  # the trigger: v's selector and upcall now set, as by any event
            sent += 1
            if k_.send(domid, lpc) > 0:
                edges_row[pc] += 1
                one += 1
        if kind == DUEL_POLL_RELINK:
            from .duels_fifo import polling

            t_end = time.monotonic_ns() + SPIN_LIMIT_NS
            while not polling(dm, v) and time.monotonic_ns() < t_end:
                os.sched_yield()
        d = delay[k & 4095]
        duel[D_AFLAG] = k
        if aimed(k) and sel is not None:
            spin_until(sel, duel)  # B's handler swapped the selector: send now
        elif aimed(k) and kind == DUEL_UNMASK_SEND:
            if spin(duel, D_BGO, k, D_DONE):
                for _ in range(aim_delay[k & 4095]):
                    pass
        else:
            for _ in range(d):
                pass
        sent += 1
        r = k_.send(domid, lport)
        if r > 0:
            edges_row[dport] += 1
            one += 1
        duel[D_ADONE] = k
    h[S.H_SENT] += sent
    h[S.H_EDGES] += one


def run_b(vcpu, duel) -> None:
    """Side B (the vCPU's worker, the guest): one operation per iteration, then the check."""
    kind = int(duel[D_KIND])
    if kind in FIFO_KINDS:
        from . import duels_fifo

        return duels_fifo.run_b(vcpu, duel, kind)
    return _run_b_bitmap(vcpu, duel, kind)


def run_c(vcpu, duel) -> None:
    """Side C (another vCPU's worker) of the fifo duels that have one."""
    from . import duels_fifo

    duels_fifo.run_c(vcpu, duel, int(duel[D_KIND]))


def _run_b_bitmap(vcpu, duel, kind: int) -> None:
    """consume-vs-send and unmask-vs-send (2l, 3l)."""
    env, st = vcpu.env, vcpu.env.stats
    k_ = env.host._k
    v = vcpu.v
    pa, pb, pc = int(duel[D_PORT_A]), int(duel[D_PORT_B]), int(duel[D_PORT_C])
    port = pb if kind == DUEL_CONSUME_SEND else pa
    checked = [p for p in (port, pc) if p]
    delay = delays(np.random.default_rng(int(duel[D_END_NS]) ^ v), int(duel[D_JITTER]))
    bits = _Bits(env.host)
    buf = vcpu.buf
    hits = aims = k = 0
    dom0 = env.dom0

    def drain():
        for _ in range(4):
            n = k_.consume(0, v, buf)
            if n:
                vcpu.account(buf[:n])
            if not any(k_.is_pending(0, p) for p in checked):
                return True
        return False

    drain()
    while more(duel, k):
        k += 1
        if kind == DUEL_UNMASK_SEND:
            k_.guest_mask(0, pa)
        duel[D_BFLAG] = k
        if not spin(duel, D_AFLAG, k):
            break
        aim = aimed(k) and (kind == DUEL_UNMASK_SEND or pc != 0)
        aims += aim
        if not aim:
            for _ in range(delay[k & 4095]):
                pass
        if kind == DUEL_CONSUME_SEND:
            n = k_.consume(0, v, buf)
        else:
            duel[D_BGO] = k
            k_.guest_unmask(0, pa)
            n = 0
        if not spin(duel, D_ADONE, k):
            break
        if n:
            vcpu.account(buf[:n])
        # the check: a pending, unmasked port must be reachable by v's next upcall
        for p in checked:
            if k_.is_pending(0, p) and not k_.is_masked(0, p):
                have, up, _ = bits.sel_ok(v, p)
                if not (have and up):
                    hits += 1
                    if hits <= RECORDED:
                        code = V_DUEL_SELECTOR_NO_UPCALL if have else V_DUEL_STUCK
                        st.record(vcpu.slot, code, p, v, kind, k, time.monotonic_ns())
                    if not have:  # repair: let Xen raise it again
                        dom0.mask(p)
                        dom0.unmask(p)
        if not drain():
            for p in checked:
                dom0.mask(p)
                dom0.unmask(p)
            drain()
    duel[D_ITERS] = k
    duel[D_HITS] = hits
    duel[D_AIMED] = aims
    duel[D_DONE] = 1
    if kind == DUEL_UNMASK_SEND:
        k_.guest_unmask(0, pa)
        drain()


def plan(env, abi: str, plain_channels: np.ndarray, sender: int = 0) -> list[dict]:
    """The duels for this ABI on this setup, on `sender`'s plain channels (the parent saves
    and restores the priorities a fifo duel sets: `prios`)."""
    st = env.stats
    mine = plain_channels[st.ch_sender[plain_channels] == sender]
    if abi == "fifo":
        from .duels_fifo import plan_fifo

        return plan_fifo(env, mine, sender)
    if len(mine) < 2:
        return []
    dports = st.ch_dport[mine].astype(np.int64)
    vcs = st.ch_vcpu[mine].astype(np.int64)
    w = 64
    order = np.lexsort((dports, dports // w, vcs))
    for i in range(len(order) - 1):
        a, b = order[i], order[i + 1]
        if vcs[a] == vcs[b] and dports[a] // w == dports[b] // w:
            # the trigger of consume-vs-send: a port of the same vCPU in another word
            other = np.flatnonzero((vcs == vcs[a]) & (dports // w != dports[a] // w))
            c = int(other[0]) if len(other) else None
            base = dict(
                vcpu=int(vcs[a]),
                pa=int(dports[a]),
                pb=int(dports[b]),
                la=int(st.ch_lport[mine[a]]),
                lb=int(st.ch_lport[mine[b]]),
                pc=0 if c is None else int(dports[c]),
                lc=0 if c is None else int(st.ch_lport[mine[c]]),
                sender=sender,
            )
            return [dict(base, kind=DUEL_CONSUME_SEND), dict(base, kind=DUEL_UNMASK_SEND)]
    return []
