"""Duels: two real processes racing one known race over and over (spec section 5).

A random workload reaches the narrow races of the ABIs only now and then, and a later event
often repairs the damage before a quiescent check sees it. A duel sets up the exact starting
state, releases both sides through a spin barrier in shared memory, lets each side wait a
random few hundred nanoseconds (so that their relative timing sweeps across the race window),
performs the two operations at once, and then checks the invariant right away:

* consume-vs-send (2l, 3l; R1): vCPU v runs its upcall handler while a sender raises a port of
  v. Afterwards a pending unmasked port must have its selector bit(s) and an upcall pending.
* unmask-vs-send (2l, 3l; R2): the guest unmasks a masked port while a sender raises it.
  Afterwards a pending port must have its selector bit(s) and an upcall pending.
* drain-vs-link (fifo; R6): see _run_b_fifo.
* poll-vs-relink (fifo; R9, 71ac522909): see run_poller. A third process takes part: another
  vCPU's worker (side C) that keeps issuing EVTCHNOP_unmask on the port.

Side A is a sender process (the hypervisor path of EVTCHNOP_send), side B the worker of the
vCPU (the guest). Every other worker is paused or held meanwhile. Both sides count their
events in their usual tallies, so the exact accounting still holds after a duel.

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
D_LPORT_A = 6  # the sender's local ports for them
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
NAMES = {
    DUEL_CONSUME_SEND: "consume-vs-send",
    DUEL_UNMASK_SEND: "unmask-vs-send",
    DUEL_DRAIN_LINK: "drain-vs-link",
    DUEL_POLL_RELINK: "poll-vs-relink",
}

# drain-vs-link: ports (x, y, w, h, z) in the duel block after the common words
D_PORTS = 16  # 5 dom0 ports, then their 5 local ports
D_SENT = 26  # sends B made on the sender's domain (set-up of drain-vs-link)
D_HARD_END_NS = 27  # ... and after this one even if fewer than D_MIN_ITERS ran
D_MIN_ITERS = 28
PRIO_Q, PRIO_Q3, PRIO_Q2 = 4, 8, 12

# poll-vs-relink: its two ports are D_PORTS, D_PORTS + 1 (local ports at D_PORTS + 5, + 6)
D_C_SLOT = 29  # side C's worker slot (0: no side C)
D_CFLAG = 30  # C: done with iteration k (no unmask in flight)
D_CEDGES = 31  # C: PENDING 0 -> 1 edges its unmasks made in this iteration (B adds them)
D_CHECKED = 32  # B: iterations whose poll the port's event ended (the check applied)
PRIO_POLL = 7
POLL_TIMEOUT_S = 0.5

# violations recorded by B (codes continue stress.workers' list)
V_DUEL_SELECTOR_NO_UPCALL = 20
V_DUEL_STUCK = 21
V_DUEL_ORDER = 22
V_DUEL_EARLY_WAKE = 23
RECORDED = 4  # violations B records one by one; the rest are counted (D_HITS)
KIND_OF = {
    DUEL_CONSUME_SEND: "selector-no-upcall",
    DUEL_UNMASK_SEND: "stuck-pending",
    DUEL_DRAIN_LINK: "priority",
    DUEL_POLL_RELINK: "early-wake",
}

SPIN_LIMIT_NS = 2_000_000_000  # a side that waits this long for the other gives up


def _delays(rng, jitter: int) -> list:
    """Random delays (spin-loop iterations) at several scales: the race windows are a few
    nanoseconds wide and where they sit relative to the barrier depends on the machine."""
    scales = rng.choice([max(1, jitter // 16), max(1, jitter // 4), jitter, jitter * 4], 4096)
    return (rng.random(4096) * scales).astype(np.int64).tolist()


def _more(duel, k: int) -> bool:
    """B starts another iteration while the duel's time lasts, and past it (up to the hard
    end) until the minimum number of iterations ran: a loaded machine runs fewer per second."""
    now = time.monotonic_ns()
    if now < int(duel[D_END_NS]):
        return True
    return k < int(duel[D_MIN_ITERS]) and now < int(duel[D_HARD_END_NS])


def _spin(word, idx: int, want: int, other_done=None) -> bool:
    """Busy-wait until word[idx] == want; False if it took too long (the other side died or
    the duel ended)."""
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
            if time.monotonic_ns() > t_end:
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

    def sel_ok(self, v: int, port: int) -> tuple[bool, bool, bool]:
        """(selector bit(s) for port set on v, upcall pending on v, L1 set)."""
        w, lay = self.w, self.lay
        sel = int(self.words[(lay.vcpu_info(v) + L.vi_pending_sel(w)) // self.wbytes])
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
        return _poll_port(duel, k)
    if kind == DUEL_DRAIN_LINK:  # y
        return int(duel[D_PORTS + 1]), int(duel[D_PORTS + 5 + 1])
    if kind == DUEL_CONSUME_SEND:
        return int(duel[D_PORT_B]), int(duel[D_LPORT_B])
    return int(duel[D_PORT_A]), int(duel[D_LPORT_A])


def run_a(sender, duel) -> None:
    """Side A (a sender process): raise the port when released, for every iteration (in
    poll-vs-relink, once vCPU v is blocked in its poll)."""
    k_ = sender.env.host._k
    dm = sender.env.host._dm(0)
    domid = sender.dom.domid
    kind = int(duel[D_KIND])
    v = int(duel[D_VCPU])
    delays = _delays(sender.rng, int(duel[D_JITTER]))
    edges_row, one = sender.edges, 0
    h = sender.hdr
    k = 0
    while True:
        if not _spin(duel, D_BFLAG, k + 1, D_DONE):
            break
        k += 1
        dport, lport = _a_ports(duel, kind, k)
        if kind == DUEL_POLL_RELINK:
            t_end = time.monotonic_ns() + SPIN_LIMIT_NS
            while not _polling(dm, v) and time.monotonic_ns() < t_end:
                os.sched_yield()
        d = delays[k & 4095]
        duel[D_AFLAG] = k
        for _ in range(d):
            pass
        r = k_.send(domid, lport)
        if r > 0:
            edges_row[dport] += 1
            one += 1
        duel[D_ADONE] = k
    h[S.H_SENT] += k
    h[S.H_EDGES] += one


def _drain(vcpu, port: int | None = None) -> None:
    """Run vCPU's handler (up to 8 times) until a pass delivers nothing and, if given, `port`
    is no longer pending; every delivery is accounted."""
    k_, v, buf = vcpu.env.host._k, vcpu.v, vcpu.buf
    for _ in range(8):
        n = k_.consume(0, v, buf)
        if n:
            vcpu.account(buf[:n])
        elif port is None or not k_.is_pending(0, port):
            return


def run_b(vcpu, duel) -> None:
    """Side B (the vCPU's worker, the guest): one operation per iteration, then the check."""
    kind = int(duel[D_KIND])
    if kind == DUEL_DRAIN_LINK:
        return _run_b_fifo(vcpu, duel)
    if kind == DUEL_POLL_RELINK:
        return run_poller(vcpu, duel)
    env, st = vcpu.env, vcpu.env.stats
    k_ = env.host._k
    v = vcpu.v
    pa, pb = int(duel[D_PORT_A]), int(duel[D_PORT_B])
    port = pb if kind == DUEL_CONSUME_SEND else pa
    delays = _delays(np.random.default_rng(int(duel[D_END_NS]) ^ v), int(duel[D_JITTER]))
    bits = _Bits(env.host)
    buf = vcpu.buf
    hits = 0
    k = 0
    dom0 = env.dom0

    def drain():
        for _ in range(4):
            n = k_.consume(0, v, buf)
            if n:
                vcpu.account(buf[:n])
            if not k_.is_pending(0, port):
                return True
        return False

    drain()
    while _more(duel, k):
        k += 1
        if kind == DUEL_UNMASK_SEND:
            k_.guest_mask(0, pa)
        duel[D_BFLAG] = k
        if not _spin(duel, D_AFLAG, k):
            break
        for _ in range(delays[k & 4095]):
            pass
        if kind == DUEL_CONSUME_SEND:
            n = k_.consume(0, v, buf)
        else:
            k_.guest_unmask(0, pa)
            n = 0
        if not _spin(duel, D_ADONE, k):
            break
        if n:
            vcpu.account(buf[:n])
        # the check: a pending, unmasked port must be reachable by v's next upcall
        if k_.is_pending(0, port) and not k_.is_masked(0, port):
            have, up, _ = bits.sel_ok(v, port)
            if not (have and up):
                hits += 1
                if hits <= RECORDED:
                    code = V_DUEL_SELECTOR_NO_UPCALL if have else V_DUEL_STUCK
                    st.record(vcpu.slot, code, port, v, kind, k, time.monotonic_ns())
                if not have:  # repair: let Xen raise it again
                    dom0.mask(port)
                    dom0.unmask(port)
        if not drain():
            dom0.mask(port)
            dom0.unmask(port)
            drain()
    duel[D_ITERS] = k
    duel[D_HITS] = hits
    duel[D_DONE] = 1
    if kind == DUEL_UNMASK_SEND:
        k_.guest_unmask(0, pa)
        drain()


def _run_b_fifo(vcpu, duel) -> None:
    """drain-vs-link (fifo; R6, 70ccddb14a). Set up, one step at a time: queue Q holds x with
    the guest's local head on it and Xen's HEAD still naming h, which has since been moved to
    the lower-priority queue Q2 and linked there (h -> z); w waits on Q3 between them. Then
    the guest drains while the sender links y after x. Xen sets READY only for a new HEAD; if
    it also set READY for y, a guest that took y through LINK, emptied Q and then saw READY
    reads the stale HEAD h and walks Q2's events as if they were Q's: h and z are delivered
    before w. Checked: x, w, h, z are delivered in that order (y may come anywhere)."""
    env, st = vcpu.env, vcpu.env.stats
    k_ = env.host._k
    dom0 = env.dom0
    v = vcpu.v
    x, y, w, h, z = (int(duel[D_PORTS + i]) for i in range(5))
    lx, ly, lw, lh, lz = (int(duel[D_PORTS + 5 + i]) for i in range(5))
    sdom = int(duel[D_LPORT_A])  # the sender domain's domid
    edges = st.edges[int(duel[D_A_SLOT])]
    delays = _delays(np.random.default_rng(int(duel[D_END_NS]) ^ v), int(duel[D_JITTER]))
    buf = vcpu.buf
    one = buf[:1]
    hits = sent = k = 0

    def send(lp, dp):
        nonlocal sent
        sent += 1
        if k_.send(sdom, lp) > 0:
            edges[dp] += 1

    _drain(vcpu)
    want = [x, w, h, z]
    while _more(duel, k):
        k += 1
        dom0.set_priority(h, PRIO_Q)
        send(lh, h)
        send(lx, x)
        n = k_.consume(0, v, one)  # takes h; the local head is now x
        if n:
            vcpu.account(one[:n])
        dom0.set_priority(h, PRIO_Q2)
        send(lh, h)  # h -> Q2 (new HEAD there)
        send(lz, z)  # h -> z
        send(lw, w)  # w on Q3
        duel[D_BFLAG] = k
        if not _spin(duel, D_AFLAG, k):
            break
        for _ in range(delays[k & 4095]):
            pass
        n = k_.consume(0, v, buf)
        if not _spin(duel, D_ADONE, k):
            break
        got = buf[:n].tolist()
        if n:
            vcpu.account(buf[:n])
        seen = [p for p in got if p in (x, w, h, z)]
        if seen != want:
            hits += 1
            if hits <= RECORDED:
                bad = next((a for a, b in zip(seen, want) if a != b), x)
                st.record(vcpu.slot, V_DUEL_ORDER, bad, v, DUEL_DRAIN_LINK, k, time.monotonic_ns())
        _drain(vcpu)
    duel[D_ITERS] = k
    duel[D_HITS] = hits
    duel[D_SENT] = sent
    duel[D_DONE] = 1
    _drain(vcpu)


# -- poll-vs-relink (R9) ------------------------------------------------------------------------
def _poll_port(duel, k: int) -> tuple[int, int]:
    """(dom0 port, sender's local port) raced in iteration k: the two ports alternate, so Xen's
    HEAD, which the guest never clears, names the other port when the race starts."""
    i = k & 1
    return int(duel[D_PORTS + i]), int(duel[D_PORTS + 5 + i])


def _polling(dm, v: int) -> bool:
    return int(dm.u32[(dm.layout.xen_vcpu(v) + L.X_POLL) // 4]) == L.POLL_ACTIVE


def run_c(vcpu, duel) -> None:
    """Side C of poll-vs-relink (another vCPU of dom0): EVTCHNOP_unmask on the (unmasked) port
    over and over until A's send is done. Xen relinks a pending, unlinked event on unmask, so
    C and A both run set_pending on the port: the race R9 is about."""
    k_ = vcpu.env.host._k
    k = 0
    while True:
        if not _spin(duel, D_BFLAG, k + 1, D_DONE):
            break
        k += 1
        dport, _ = _poll_port(duel, k)
        made = 0
        t_end = time.monotonic_ns() + SPIN_LIMIT_NS
        while duel[D_ADONE] != k and time.monotonic_ns() < t_end:
            made += max(0, k_.hyp_unmask(0, dport))
        made += max(0, k_.hyp_unmask(0, dport))
        duel[D_CEDGES] = made
        duel[D_CFLAG] = k


def reachable(dm, v: int, prio: int, port: int) -> bool:
    """Would vCPU v's guest find `port` on its queue `prio` now? Follow the guest's local head,
    or Xen's HEAD when that is 0, through LINKED words (the guest never clears HEAD, so a word
    that is not LINKED ends the walk)."""
    u32, lay = dm.u32, dm.layout
    link_mask = (1 << dm.link_bits) - 1
    h = int(u32[(lay.guest_vcpu(v) + L.G_LOCAL_HEAD) // 4 + prio])
    if h == 0:
        h = int(u32[(lay.control_block(v) + L.CB_HEAD) // 4 + prio])
    pages = dm.hdr(L.H_ARRAY_PAGES) * L.FIFO_WORDS_PER_PAGE
    for _ in range(1 << 16):
        if h == 0 or h >= pages:
            return False
        w = int(u32[lay.event_word(h) // 4])
        if not w & L.FIFO_LINKED:
            return False
        if h == port:
            return True
        h = w & link_mask
    return False


def run_poller(vcpu, duel) -> None:
    """Side B of poll-vs-relink (R9, 71ac522909): vCPU v, with its queue drained, polls port p
    (SCHEDOP_poll) while A sends p and C unmasks p. Xen calls the pollers only after the event
    is queued and its queue unlocked, so when the poll returns because p's PENDING 0 -> 1 woke
    it, p must be on v's queue. With R9 put back, the sender that set PENDING sees LINKED set
    by C's relink, which has not written HEAD yet, and wakes the poller at once: the guest
    finds nothing, and a guest that then sleeps again with p still pending never wakes."""
    env, st = vcpu.env, vcpu.env.stats
    k_ = env.host._k
    dm = env.host._dm(0)
    v = vcpu.v
    edges = st.edges[int(duel[D_A_SLOT])]
    hits = k = checked = 0
    arr = np.zeros(1, np.uint32)

    while _more(duel, k):
        dport, _ = _poll_port(duel, k + 1)
        _drain(vcpu, dport)
        k += 1
        arr[0] = dport
        duel[D_BFLAG] = k
        reason, woke = k_.poll(0, v, arr, POLL_TIMEOUT_S)
        woken = reason == L.POLL_EVENT and woke == dport
        checked += woken
        # (a masked port is legitimately PENDING without being queued; the duel never masks)
        if woken and not k_.is_masked(0, dport) and not reachable(dm, v, PRIO_POLL, dport):
            hits += 1
            if hits <= RECORDED:
                st.record(
                    vcpu.slot, V_DUEL_EARLY_WAKE, dport, v, DUEL_POLL_RELINK, k, time.monotonic_ns()
                )
        if not (_spin(duel, D_ADONE, k) and _spin(duel, D_CFLAG, k)):
            break
        if duel[D_CEDGES]:
            edges[dport] += int(duel[D_CEDGES])
            duel[D_CEDGES] = 0
    duel[D_ITERS] = k
    duel[D_HITS] = hits
    duel[D_CHECKED] = checked
    duel[D_DONE] = 1
    _drain(vcpu, int(duel[D_PORTS]))
    _drain(vcpu, int(duel[D_PORTS + 1]))


def plan(env, abi: str, plain_channels: np.ndarray, sender: int = 0) -> list[dict]:
    """The duels for this ABI on this setup: ports of `sender`'s plain channels on one vCPU
    (two in the same bitmap word for consume-vs-send)."""
    st = env.stats
    if abi == "fifo":
        mine = plain_channels[st.ch_sender[plain_channels] == sender]
        vcs = st.ch_vcpu[mine].astype(np.int64)
        if not len(mine):
            return []
        counts = np.bincount(vcs)
        v = int(np.argmax(counts))
        if counts[v] < 5:
            return []
        five = mine[vcs == v][:5]
        plans = [
            dict(
                kind=DUEL_DRAIN_LINK,
                vcpu=v,
                sender=sender,
                ports=[int(p) for p in st.ch_dport[five]],
                lports=[int(p) for p in st.ch_lport[five]],
                channels=five.tolist(),
                pa=int(st.ch_dport[five[1]]),
                pb=0,
                la=0,
                lb=0,
            )
        ]
        if env.cfg.vcpus >= 2:  # side C is another vCPU's worker
            two = five[:2]
            plans.append(
                dict(
                    kind=DUEL_POLL_RELINK,
                    vcpu=v,
                    sender=sender,
                    c_vcpu=(v + 1) % env.cfg.vcpus,
                    ports=[int(p) for p in st.ch_dport[two]],
                    lports=[int(p) for p in st.ch_lport[two]],
                    channels=two.tolist(),
                    pa=int(st.ch_dport[two[0]]),
                    pb=0,
                    la=0,
                    lb=0,
                )
            )
        return plans
    mine = plain_channels[st.ch_sender[plain_channels] == sender]
    if len(mine) < 2:
        return []
    dports = st.ch_dport[mine].astype(np.int64)
    vcs = st.ch_vcpu[mine].astype(np.int64)
    w = 64
    order = np.lexsort((dports, dports // w, vcs))
    for i in range(len(order) - 1):
        a, b = order[i], order[i + 1]
        if vcs[a] == vcs[b] and dports[a] // w == dports[b] // w:
            base = dict(
                vcpu=int(vcs[a]),
                pa=int(dports[a]),
                pb=int(dports[b]),
                la=int(st.ch_lport[mine[a]]),
                lb=int(st.ch_lport[mine[b]]),
                sender=sender,
            )
            return [dict(base, kind=DUEL_CONSUME_SEND), dict(base, kind=DUEL_UNMASK_SEND)]
    return []
