"""The FIFO duels (stress.duels has the block layout, side A and the bitmap duels).

* drain-vs-link (R6, 70ccddb14a): the guest drains a queue while the sender links onto it.
* poll-vs-relink (R9, 71ac522909): a sender and an EVTCHNOP_unmask race set_pending on one
  port while its vCPU is blocked in SCHEDOP_poll.
* relink-old-tail (R7, e33d4257fc): the queue's last-consumed tail is relinked (on the same
  queue, or moved to another one) while another event is linked on that queue.

B is the worker of the port's vCPU (the guest), C another vCPU's worker; B and C send on the
sender's domain through its local ports, and count their edges in the sender's row only while
A, who writes that row too, is between iterations (the flags order them).
"""

from __future__ import annotations

import time

import numpy as np

from evtchn import layout as L

from . import duels as DU

PRIO_Q, PRIO_Q3, PRIO_Q2, PRIO_POLL = DU.PRIO_Q, DU.PRIO_Q3, DU.PRIO_Q2, DU.PRIO_POLL


def run_b(vcpu, duel, kind: int) -> None:
    {
        DU.DUEL_DRAIN_LINK: _run_b_drain_link,
        DU.DUEL_POLL_RELINK: _run_b_poll,
        DU.DUEL_OLD_TAIL: _run_b_old_tail,
    }[kind](vcpu, duel)


def run_c(vcpu, duel, kind: int) -> None:
    if kind == DU.DUEL_POLL_RELINK:
        _run_c_poll(vcpu, duel)
    elif kind == DU.DUEL_OLD_TAIL:
        _run_c_old_tail(vcpu, duel)


def drain(vcpu, port: int | None = None) -> None:
    """Run vCPU's handler (up to 8 times) until a pass delivers nothing and, if given, `port`
    is no longer pending; every delivery is accounted."""
    k_, v, buf = vcpu.env.host._k, vcpu.v, vcpu.buf
    for _ in range(8):
        n = k_.consume(0, v, buf)
        if n:
            vcpu.account(buf[:n])
        elif port is None or not k_.is_pending(0, port):
            return


class _Guest:
    """B's handles: the kernels, its sends on the sender's domain (edges into the sender's
    row), its handler runs (accounted), and its violation records."""

    def __init__(self, vcpu, duel):
        self.vcpu, self.duel = vcpu, duel
        env = vcpu.env
        self.k_, self.dom0, self.v, self.st = env.host._k, env.dom0, vcpu.v, env.stats
        self.sdom = int(duel[DU.D_LPORT_A])  # the sender domain's domid
        self.edges = self.st.edges[int(duel[DU.D_A_SLOT])]
        self.delay = DU.delays(
            np.random.default_rng(int(duel[DU.D_END_NS]) ^ vcpu.v), int(duel[DU.D_JITTER])
        )
        self.ports = [int(duel[DU.D_PORTS + i]) for i in range(5)]
        self.lports = [int(duel[DU.D_PORTS + 5 + i]) for i in range(5)]
        self.sent = self.hits = self.aims = 0

    def send(self, i: int) -> None:
        self.sent += 1
        if self.k_.send(self.sdom, self.lports[i]) > 0:
            self.edges[self.ports[i]] += 1

    def consume(self, cap: int | None = None) -> list:
        buf = self.vcpu.buf if cap is None else self.vcpu.buf[:cap]
        n = self.k_.consume(0, self.v, buf)
        if n:
            self.vcpu.account(buf[:n])
        return buf[:n].tolist()

    def hit(self, code: int, port: int, k: int) -> None:
        self.hits += 1
        if self.hits <= DU.RECORDED:
            kind = int(self.duel[DU.D_KIND])
            self.st.record(self.vcpu.slot, code, port, self.v, kind, k, time.monotonic_ns())

    def finish(self, k: int) -> None:
        d = self.duel
        d[DU.D_ITERS] = k
        d[DU.D_HITS] = self.hits
        d[DU.D_SENT] = self.sent
        d[DU.D_AIMED] = self.aims
        d[DU.D_DONE] = 1


# -- drain-vs-link (R6) ---------------------------------------------------------------------------
def _run_b_drain_link(vcpu, duel) -> None:
    """drain-vs-link (R6, 70ccddb14a). Set up, one step at a time: queue Q holds x with the
    guest's local head on it and Xen's HEAD still naming h, which has since been moved to the
    lower-priority queue Q2 and linked there (h -> z); w waits on Q3 between them. Then the
    guest drains while the sender links y after x. Xen sets READY only for a new HEAD; if it
    also set READY for y, a guest that took y through LINK, emptied Q and then saw READY reads
    the stale HEAD h and walks Q2's events as if they were Q's: h and z are delivered before
    w. Checked: x, w, h, z are delivered in that order (y may come anywhere).

    Aimed iterations: the guest waits until it sees LINK(x) == y (the sender is between its
    link and any READY it sets), takes x and y one event per handler run, and drains the rest
    only once the send returned: a READY set for the link is then seen after Q was emptied."""
    g = _Guest(vcpu, duel)
    dom0 = g.dom0
    x, y, w, h, z = g.ports
    X, _Y, W, H, Z = range(5)
    dm = vcpu.env.host._dm(0)
    word_x = dm.layout.event_word(x) // 4
    link_mask = (1 << dm.link_bits) - 1
    u32 = dm.u32
    drain(vcpu)
    want = [x, w, h, z]
    k = 0
    while DU.more(duel, k):
        k += 1
        dom0.set_priority(h, PRIO_Q)
        g.send(H)
        g.send(X)
        g.consume(1)  # takes h; the local head is now x
        dom0.set_priority(h, PRIO_Q2)
        g.send(H)  # h -> Q2 (new HEAD there)
        g.send(Z)  # h -> z
        g.send(W)  # w on Q3
        duel[DU.D_BFLAG] = k
        if not DU.spin(duel, DU.D_AFLAG, k):
            break
        if DU.aimed(k):
            g.aims += 1
            DU.spin_until(lambda k=k: (u32[word_x] & link_mask) == y or duel[DU.D_ADONE] == k, duel)
            got = g.consume(1) + g.consume(1)  # x, then y through LINK: Q is empty
            if not DU.spin(duel, DU.D_ADONE, k):
                break
            got += g.consume()
        else:
            for _ in range(g.delay[k & 4095]):
                pass
            got = g.consume()
            if not DU.spin(duel, DU.D_ADONE, k):
                break
        seen = [p for p in got if p in (x, w, h, z)]
        if seen != want:
            g.hit(DU.V_DUEL_ORDER, next((a for a, b in zip(seen, want) if a != b), x), k)
        drain(vcpu)
    g.finish(k)
    drain(vcpu)


# -- relink-old-tail (R7) -------------------------------------------------------------------------
def _run_b_old_tail(vcpu, duel) -> None:
    """relink-old-tail (R7, e33d4257fc). Set up: t is sent on queue Q and consumed, so Xen's
    tail of Q still names t although t is no longer LINKED (an "old tail"). Then A relinks t
    while C links u on Q. In iterations k with k & 1, t was moved to the lower-priority queue
    Q2 first. Xen forgets an old tail when it relinks it; if it kept it, t linking on Q would
    link onto itself (a cycle, no HEAD, no READY: both events lost), and t moved to Q2 would
    make u's link land after t on Q2 (u served after t, at Q2's priority). Checked: t and u
    are each delivered exactly once, u first when t was moved. With k & 2, C waits until A's
    send returned (t relinked first, the order both bugs need); else they race freely."""
    g = _Guest(vcpu, duel)
    dom0 = g.dom0
    t, u = g.ports[0], g.ports[1]
    drain(vcpu)
    k = 0
    while DU.more(duel, k):
        k += 1
        dom0.set_priority(t, PRIO_Q)
        g.send(0)
        g.consume()  # t delivered: Q's tail still names it
        if k & 1:
            dom0.set_priority(t, PRIO_Q2)
        g.aims += bool(k & 2)
        duel[DU.D_BFLAG] = k
        if not (DU.spin(duel, DU.D_ADONE, k) and DU.spin(duel, DU.D_CFLAG, k)):
            break
        g.sent += 1
        if duel[DU.D_CEDGES]:
            g.edges[u] += int(duel[DU.D_CEDGES])
            duel[DU.D_CEDGES] = 0
        got = g.consume()
        bad = None
        if got.count(t) != 1:
            bad = t
        elif got.count(u) != 1:
            bad = u
        elif k & 1 and got.index(u) > got.index(t):
            bad = u
        if bad is not None:
            g.hit(DU.V_DUEL_OLD_TAIL, bad, k)
        drain(vcpu)
    g.finish(k)
    drain(vcpu)


def _run_c_old_tail(vcpu, duel) -> None:
    """Side C of relink-old-tail: link u on Q while A relinks t (after A, when k & 2)."""
    k_ = vcpu.env.host._k
    sdom = int(duel[DU.D_LPORT_A])
    lu = int(duel[DU.D_PORTS + 5 + 1])
    delay = DU.delays(np.random.default_rng(int(duel[DU.D_END_NS]) + 1), int(duel[DU.D_JITTER]))
    k = 0
    while True:
        if not DU.spin(duel, DU.D_BFLAG, k + 1, DU.D_DONE):
            break
        k += 1
        if k & 2:
            if not DU.spin(duel, DU.D_ADONE, k, DU.D_DONE):
                break
        else:
            for _ in range(delay[k & 4095]):
                pass
        duel[DU.D_CEDGES] = max(0, k_.send(sdom, lu))
        duel[DU.D_CFLAG] = k


# -- poll-vs-relink (R9) --------------------------------------------------------------------------
def _poll_port(duel, k: int) -> int:
    """The dom0 port raced in iteration k: the two ports alternate, so Xen's HEAD, which the
    guest never clears, names the other port when the race starts."""
    return int(duel[DU.D_PORTS + (k & 1)])


def polling(dm, v: int) -> bool:
    return int(dm.u32[(dm.layout.xen_vcpu(v) + L.X_POLL) // 4]) == L.POLL_ACTIVE


def _run_c_poll(vcpu, duel) -> None:
    """Side C of poll-vs-relink (another vCPU of dom0): EVTCHNOP_unmask on the (unmasked) port
    over and over until A's send is done. Xen relinks a pending, unlinked event on unmask, so
    C and A both run set_pending on the port: the race R9 is about."""
    k_ = vcpu.env.host._k
    k = 0
    while True:
        if not DU.spin(duel, DU.D_BFLAG, k + 1, DU.D_DONE):
            break
        k += 1
        dport = _poll_port(duel, k)
        made = 0
        t_end = time.monotonic_ns() + DU.SPIN_LIMIT_NS
        while duel[DU.D_ADONE] != k and time.monotonic_ns() < t_end:
            made += max(0, k_.hyp_unmask(0, dport))
        made += max(0, k_.hyp_unmask(0, dport))
        duel[DU.D_CEDGES] = made
        duel[DU.D_CFLAG] = k


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


def _run_b_poll(vcpu, duel) -> None:
    """Side B of poll-vs-relink (R9, 71ac522909): vCPU v, with its queue drained, polls port p
    (SCHEDOP_poll) while A sends p and C unmasks p. Xen calls the pollers only after the event
    is queued and its queue unlocked, so when the poll returns because p's PENDING 0 -> 1 woke
    it, p must be on v's queue. With R9 put back, the sender that set PENDING sees LINKED set
    by C's relink, which has not written HEAD yet, and wakes the poller at once: the guest
    finds nothing, and a guest that then sleeps again with p still pending never wakes."""
    g = _Guest(vcpu, duel)
    k_ = g.k_
    dm = vcpu.env.host._dm(0)
    v = g.v
    checked = k = 0
    arr = np.zeros(1, np.uint32)
    while DU.more(duel, k):
        dport = _poll_port(duel, k + 1)
        drain(vcpu, dport)
        k += 1
        arr[0] = dport
        duel[DU.D_BFLAG] = k
        reason, woke = k_.poll(0, v, arr, DU.POLL_TIMEOUT_S)
        woken = reason == L.POLL_EVENT and woke == dport
        checked += woken
        # (a masked port is legitimately PENDING without being queued; the duel never masks)
        if woken and not k_.is_masked(0, dport) and not reachable(dm, v, PRIO_POLL, dport):
            g.hit(DU.V_DUEL_EARLY_WAKE, dport, k)
        if not (DU.spin(duel, DU.D_ADONE, k) and DU.spin(duel, DU.D_CFLAG, k)):
            break
        if duel[DU.D_CEDGES]:
            g.edges[dport] += int(duel[DU.D_CEDGES])
            duel[DU.D_CEDGES] = 0
    duel[DU.D_CHECKED] = checked
    g.finish(k)
    drain(vcpu, int(duel[DU.D_PORTS]))
    drain(vcpu, int(duel[DU.D_PORTS + 1]))


# -- the plan -------------------------------------------------------------------------------------
def plan_fifo(env, mine: np.ndarray, sender: int) -> list[dict]:
    """drain-vs-link on five ports of one vCPU v, poll-vs-relink on two of them (C: vCPU
    v + 1), relink-old-tail on two ports of another vCPU if there is one (else two more of v)."""
    st = env.stats
    if not len(mine):
        return []
    vcs = st.ch_vcpu[mine].astype(np.int64)
    counts = np.bincount(vcs)
    v = int(np.argmax(counts))
    if counts[v] < 5:
        return []
    ours = mine[vcs == v]
    nv = env.cfg.vcpus

    def duel(kind, vcpu, chans, prios, **extra):
        return dict(
            kind=kind,
            vcpu=vcpu,
            sender=sender,
            ports=[int(p) for p in st.ch_dport[chans]],
            lports=[int(p) for p in st.ch_lport[chans]],
            channels=[int(c) for c in chans],
            prios=list(prios),
            pa=int(st.ch_dport[chans[0]]),
            pb=0,
            **extra,
        )

    five = ours[:5]
    plans = [duel(DU.DUEL_DRAIN_LINK, v, five, (PRIO_Q, PRIO_Q, PRIO_Q3, PRIO_Q, PRIO_Q2))]
    if nv < 2:  # side C is another vCPU's worker
        return plans
    plans.append(duel(DU.DUEL_POLL_RELINK, v, five[:2], (PRIO_POLL,) * 2, c_vcpu=(v + 1) % nv))
    counts[v] = 0
    v7 = int(np.argmax(counts))
    if counts[v7] >= 2:
        two = mine[vcs == v7][:2]
    elif len(ours) >= 7:
        v7, two = v, ours[5:7]
    else:
        return plans
    plans.append(duel(DU.DUEL_OLD_TAIL, v7, two, (PRIO_Q, PRIO_Q), c_vcpu=(v7 + 1) % nv))
    return plans
