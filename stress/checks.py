"""The invariants, checked on dom0's memory and the harness's tallies (spec sections 0, 5, 7).

Two kinds of quiescent moment are inspected:

* held: senders and chaos workers paused (no hypercall in flight), vCPUs not consuming, so the
  queues are full. FIFO: every queue walked from the guest's position (its local head, else
  Xen's HEAD) along LINK is acyclic, holds each port once, is all LINKED and ends at Xen's
  tail; every LINKED port is on a queue; a non-empty queue is READY; READY implies an upcall;
  a pending unmasked port is LINKED. 2l/3l: a pending unmasked port has its selector bit(s) on
  the vCPU it is bound to; a selector bit implies an upcall (R1, R2, R3).
* drained: then the vCPUs ran until no upcall was pending. Per port, exactly:
  delivered == edges - destroyed-by-close - (1 if still pending else 0); nothing pending and
  unmasked; nothing LINKED; no selector bit and no READY bit left.

Plus what the workers check on the spot (stress.workers): a port masked for the whole run, a
closed port, or a port delivered on a vCPU it is not bound to. The last one is also how "a port
is never handled on two vCPUs at once" is enforced: a port nobody moves may only be delivered
on its own vCPU. A moved port may legitimately be in two handlers at once (the old vCPU still
had it queued, R5: Linux needed its per-IRQ is_active flag for that); such overlaps are counted
(moved_port_overlaps), and every edge is still delivered exactly once (the drained check).
Then a deterministic ordered phase and the duels (stress.duels).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from evtchn import layout as L

from . import duels as DU
from . import resetter as RS
from . import shm as S
from . import workers as W

MAX_PER_KIND = 8  # violations listed per kind and check; the rest are counted

KINDS = {
    "lost": "an event was never delivered",
    "phantom": "a port was delivered more often than it was sent",
    "stuck-pending": "a pending unmasked port that no upcall will ever reach",
    "still-linked": "a port LINKED after the queues were drained",
    "selector-no-upcall": "a selector bit with no upcall pending (R1)",
    "stale-selector": "a selector bit with no pending port below it",
    "ready-no-upcall": "a FIFO READY bit with no upcall pending",
    "queue-malformed": "a FIFO queue that is cyclic, broken or disagrees with its tail (R6/R7)",
    "orphan-linked": "a LINKED port on no queue (R6/R7)",
    "not-ready": "a non-empty FIFO queue whose READY bit is clear",
    "order": "FIFO delivery out of link order",
    "priority": "a lower-priority event served before a ready higher-priority one",
    "scan-order": "2l/3l delivery out of the rotating scan order",
    "perma-delivered": "a port masked for the whole run was delivered",
    "wrong-vcpu": "a port delivered on a vCPU it is not bound to",
    "linked-reuse": "a closed port handed out again while still LINKED (R12)",
    "engine-error": "the engine refused an operation that must succeed",
    "close-stuck": "no port came free for a rebind: closed ports stayed LINKED (R20)",
    "left-masked": "a port left masked that nobody masked",
    "dead-delivered": "a port that is not a live channel's was delivered",
    "early-wake": "a poller woken by a port's event before the event was queued (R9)",
    "old-tail": "an event relinked while its queue's tail still named it broke the queue (R7)",
    **RS.DESCRIPTIONS,
}
WORKER_KINDS = {
    W.V_PERMA_DELIVERED: "perma-delivered",
    W.V_WRONG_VCPU: "wrong-vcpu",
    W.V_LINKED_REUSE: "linked-reuse",
    W.V_ENGINE_ERROR: "engine-error",
    W.V_CLOSE_STUCK: "close-stuck",
    W.V_DEAD_DELIVERED: "dead-delivered",
    DU.V_DUEL_SELECTOR_NO_UPCALL: "selector-no-upcall",
    DU.V_DUEL_STUCK: "stuck-pending",
    DU.V_DUEL_ORDER: "priority",
    DU.V_DUEL_EARLY_WAKE: "early-wake",
    DU.V_DUEL_OLD_TAIL: "old-tail",
}


@dataclasses.dataclass
class Violation:
    kind: str
    port: int | None
    vcpu: int | None
    detail: str
    phase: str = ""

    def line(self) -> str:
        where = []
        if self.port is not None:
            where.append(f"port {self.port}")
        if self.vcpu is not None:
            where.append(f"vcpu {self.vcpu}")
        at = f" [{self.phase}]" if self.phase else ""
        return f"{self.kind}: {', '.join(where) or '-'}: {self.detail}{at}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Collector:
    """Violations of one run, at most MAX_PER_KIND listed per kind and phase."""

    def __init__(self):
        self.items: list[Violation] = []
        self.counts: dict[str, int] = {}
        self._per: dict[tuple[str, str], int] = {}

    def add(self, v: Violation) -> None:
        self.counts[v.kind] = self.counts.get(v.kind, 0) + 1
        key = (v.kind, v.phase.split(" ", 1)[0])
        n = self._per.get(key, 0)
        self._per[key] = n + 1
        if n < MAX_PER_KIND:
            self.items.append(v)

    def extend(self, vs) -> None:
        for v in vs:
            self.add(v)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# ---------------------------------------------------------------------------------------------
class Snapshot:
    """dom0's guest-visible and Xen-private event state, copied at a quiescent moment."""

    def __init__(self, host, nports: int, domid: int = 0):
        dm = host._dm(domid)
        self.dm, lay = dm, dm.layout
        self.abi, self.vcpus, self.nports = dm.abi, dm.vcpus, nports
        self.wb = dm.word_bits
        self.upcall = np.array(
            [dm.u8[lay.vcpu_info(v) + L.VI_UPCALL_PENDING] & 1 for v in range(dm.vcpus)], bool
        )
        if dm.abi == L.ABI_FIFO:
            self._fifo(dm, lay)
        else:
            self._bitmap(dm, lay)

    def _fifo(self, dm, lay) -> None:
        n = min(dm.array_pages() * L.FIFO_WORDS_PER_PAGE, self.nports)
        base = lay.offsets["event_array"] // 4
        words = np.full(self.nports, L.FIFO_MASKED, np.uint32)  # no word: reads as masked
        words[:n] = dm.u32[base : base + n]
        self.words = words
        self.pending = (words & L.FIFO_PENDING) != 0
        self.masked = (words & L.FIFO_MASKED) != 0
        self.linked = (words & L.FIFO_LINKED) != 0
        self.link = words & np.uint32((1 << dm.link_bits) - 1)
        V, Q = dm.vcpus, L.FIFO_MAX_QUEUES
        self.ready = np.zeros(V, np.uint32)
        self.local_ready = np.zeros(V, np.uint32)
        self.heads = np.zeros((V, Q), np.uint32)
        self.local_heads = np.zeros((V, Q), np.uint32)
        self.tails = np.zeros((V, Q), np.uint32)
        for v in range(V):
            cb = lay.control_block(v) // 4
            self.ready[v] = dm.u32[cb + L.CB_READY // 4]
            self.heads[v] = dm.u32[cb + L.CB_HEAD // 4 : cb + L.CB_HEAD // 4 + Q]
            self.local_ready[v] = dm.guest_u32(v, L.G_LOCAL_READY)
            g = (lay.guest_vcpu(v) + L.G_LOCAL_HEAD) // 4
            self.local_heads[v] = dm.u32[g : g + Q]
            for q in range(Q):
                self.tails[v, q] = dm.u32[dm.queue_tail_off(v, q) // 4]

    def _bitmap(self, dm, lay) -> None:
        w = self.wb
        wbytes = w // 8
        words = dm.words
        if dm.abi == L.ABI_3L:
            nwords = w * w
            pend0 = lay.offsets["l3_pending"] // wbytes
            mask0 = lay.offsets["l3_mask"] // wbytes
        else:
            nwords = w
            si = lay.offsets["shared_info"]
            pend0 = (si + L.SI_PENDING) // wbytes
            mask0 = (si + L.si_mask(w)) // wbytes

        def bits(a):
            return np.unpackbits(np.ascontiguousarray(a).view(np.uint8), bitorder="little").astype(
                bool
            )

        self.pending = bits(words[pend0 : pend0 + nwords])[: self.nports]
        self.masked = bits(words[mask0 : mask0 + nwords])[: self.nports]
        self.linked = np.zeros(self.nports, bool)
        V = dm.vcpus
        cm_words = lay.cpumask_bytes // wbytes
        self.cpumask = np.zeros((V, self.nports), bool)
        self.sel = np.zeros((V, w), bool)
        self.l2 = np.zeros((V, w * w), bool) if dm.abi == L.ABI_3L else None
        for v in range(V):
            c0 = lay.cpumask(v) // wbytes
            self.cpumask[v] = bits(words[c0 : c0 + cm_words])[: self.nports]
            si_ = (lay.vcpu_info(v) + L.vi_pending_sel(w)) // wbytes
            self.sel[v] = bits(words[si_ : si_ + 1])
            if self.l2 is not None:
                l2 = lay.l2_selector(v) // wbytes
                self.l2[v] = bits(words[l2 : l2 + w])


# ---------------------------------------------------------------------------------------------
def held_checks(snap: Snapshot, phase: str) -> list[Violation]:
    """Senders and chaos paused, vCPUs between two handler runs: the queue and selector state
    must promise a delivery for every pending unmasked port."""
    if snap.abi == L.ABI_FIFO:
        return _fifo_held(snap, phase)
    return _bitmap_held(snap, phase)


def _fifo_held(s: Snapshot, phase: str) -> list[Violation]:
    out: list[Violation] = []
    linked = s.linked
    link = s.link.tolist()
    lk = linked.tolist()
    owner: dict[int, tuple[int, int]] = {}
    for v in range(s.vcpus):
        ready_any = int(s.ready[v]) | int(s.local_ready[v])
        if ready_any and not s.upcall[v]:
            q0 = (ready_any & -ready_any).bit_length() - 1
            head = int(s.local_heads[v, q0]) or int(s.heads[v, q0])
            out.append(
                Violation(
                    "ready-no-upcall",
                    head or None,
                    v,
                    f"READY {int(s.ready[v]):#x} (local {int(s.local_ready[v]):#x})"
                    f" but no upcall pending: those queues are never consumed",
                    phase,
                )
            )
        for q in range(L.FIFO_MAX_QUEUES):
            tail = int(s.tails[v, q])
            lh, hd = int(s.local_heads[v, q]), int(s.heads[v, q])
            tail_linked = 0 < tail < s.nports and lk[tail]
            start = lh if lh else (hd if tail_linked else 0)
            chain, port, bad = [], start, None
            while port:
                if port >= s.nports:
                    bad = f"LINK leads to port {port}, beyond the event array"
                    break
                if port in owner:
                    ov, oq = owner[port]
                    bad = (
                        f"port {port} is reached twice (cycle)"
                        if (ov, oq) == (v, q)
                        else f"port {port} is also on queue vcpu {ov} prio {oq}"
                    )
                    break
                if not lk[port]:
                    bad = f"port {port} is on the queue but not LINKED"
                    break
                owner[port] = (v, q)
                chain.append(port)
                port = link[port]
            where = f"queue vcpu {v} prio {q} (HEAD {hd}, local head {lh}, tail {tail})"
            if bad:
                out.append(Violation("queue-malformed", port, v, f"{where}: {bad}", phase))
                continue
            if chain:
                if not tail_linked:
                    out.append(
                        Violation(
                            "queue-malformed",
                            chain[-1],
                            v,
                            f"{where}: {len(chain)} LINKED events but Xen's tail "
                            f"{tail} is not LINKED (Xen thinks it empty)",
                            phase,
                        )
                    )
                elif chain[-1] != tail:
                    out.append(
                        Violation(
                            "queue-malformed",
                            chain[-1],
                            v,
                            f"{where}: the chain ends at {chain[-1]}, not at Xen's tail {tail}",
                            phase,
                        )
                    )
                if not (ready_any >> q) & 1:
                    out.append(
                        Violation(
                            "not-ready",
                            chain[0],
                            v,
                            f"{where}: {len(chain)} events queued but READY bit "
                            f"{q} is clear: never consumed",
                            phase,
                        )
                    )
            elif tail_linked:
                out.append(
                    Violation(
                        "queue-malformed",
                        tail,
                        v,
                        f"{where}: Xen's tail is LINKED but the queue is empty "
                        f"from the guest's side",
                        phase,
                    )
                )
    orphans = np.flatnonzero(linked)
    if len(owner) != len(orphans):
        lost = [int(p) for p in orphans if int(p) not in owner]
        for p in lost[:MAX_PER_KIND]:
            out.append(
                Violation(
                    "orphan-linked",
                    p,
                    None,
                    f"LINKED (LINK {link[p]}) but on no queue of any vCPU ({len(lost)} such ports)",
                    phase,
                )
            )
    unq = np.flatnonzero(s.pending & ~s.masked & ~linked)
    for p in unq[:MAX_PER_KIND]:
        out.append(
            Violation(
                "stuck-pending",
                int(p),
                None,
                f"pending and unmasked but on no queue ({len(unq)} such ports)",
                phase,
            )
        )
    return out


def _bitmap_held(s: Snapshot, phase: str) -> list[Violation]:
    out: list[Violation] = []
    w = s.wb
    active = s.pending & ~s.masked
    for v in range(s.vcpus):
        mine = np.flatnonzero(active & s.cpumask[v])
        if s.l2 is None:
            raised = s.sel[v][mine // w]
        else:
            raised = s.l2[v][mine // w] & s.sel[v][mine // (w * w)]
        for p in mine[~raised][:MAX_PER_KIND]:
            out.append(
                Violation(
                    "stuck-pending",
                    int(p),
                    v,
                    f"pending and unmasked, bound to vcpu {v}, but its selector "
                    f"bit is clear: the scan will never reach it "
                    f"({int((~raised).sum())} such ports)",
                    phase,
                )
            )
        if s.sel[v].any() and not s.upcall[v]:
            bits_ = np.flatnonzero(s.sel[v])
            span = w if s.l2 is None else w * w
            waiting = [
                int(p)
                for j in bits_
                for p in np.flatnonzero(
                    active[j * span : (j + 1) * span] & s.cpumask[v][j * span : (j + 1) * span]
                )
                + j * span
            ]
            out.append(
                Violation(
                    "selector-no-upcall",
                    waiting[0] if waiting else None,
                    v,
                    f"selector bits {bits_[:8].tolist()} set but no upcall "
                    f"pending: {len(waiting)} pending port(s) in those words "
                    f"wait for an unrelated event",
                    phase,
                )
            )
    return out


def drained_checks(
    snap: Snapshot,
    stats: S.Stats,
    phase: str,
    final: bool,
    perma: np.ndarray,
    held_masked: set | None = None,
) -> list[Violation]:
    """After the drain: exact per-port accounting and an empty event state."""
    out: list[Violation] = []
    E = stats.edges.sum(axis=0, dtype=np.int64) + stats.extra.sum(axis=0, dtype=np.int64)
    X = stats.destroyed.sum(axis=0, dtype=np.int64)
    D = stats.delivered.sum(axis=0, dtype=np.int64)
    M = stats.maybe.sum(axis=0, dtype=np.int64)
    pend = snap.pending.astype(np.int64)
    outstanding = E - X - D
    phantom = np.flatnonzero(outstanding + M < 0)
    for p in phantom[:MAX_PER_KIND]:
        extra = f", {M[p]} unmasks that may have re-raised it" if M[p] else ""
        out.append(
            Violation(
                "phantom",
                int(p),
                _vcpu_of(snap, p),
                f"delivered {D[p]} times for {E[p]} new events ({X[p]} destroyed "
                f"by close{extra}) ({len(phantom)} such ports)",
                phase,
            )
        )
    lost = np.flatnonzero(outstanding > pend)
    for p in lost[:MAX_PER_KIND]:
        out.append(
            Violation(
                "lost",
                int(p),
                _vcpu_of(snap, p),
                f"{E[p]} new events, {D[p]} delivered, {X[p]} destroyed by close, "
                f"{'pending' if pend[p] else 'not pending'} "
                f"({len(lost)} ports lost {int((outstanding - pend)[lost].sum())} "
                f"events)",
                phase,
            )
        )
    out += drained_state_checks(snap, phase)
    if final:
        odd = np.flatnonzero(snap.masked[: len(perma)] & ~perma)
        if held_masked:
            odd = np.array([p for p in odd if int(p) not in held_masked], np.int64)
        live = stats.port_class[: len(perma)] & S.CL_LIVE
        odd = np.array([p for p in odd if live[p]], np.int64)
        for p in odd[:MAX_PER_KIND]:
            out.append(
                Violation(
                    "left-masked",
                    int(p),
                    _vcpu_of(snap, p),
                    f"masked at the end but no one holds it masked ({len(odd)} such ports)",
                    phase,
                )
            )
    return out


def drained_state_checks(snap: Snapshot, phase: str) -> list[Violation]:
    """After the drain, an empty event state: nothing pending and unmasked, nothing LINKED,
    no READY bit or selector bit left."""
    out: list[Violation] = []
    stuck = np.flatnonzero(snap.pending & ~snap.masked)
    for p in stuck[:MAX_PER_KIND]:
        out.append(
            Violation(
                "stuck-pending",
                int(p),
                _vcpu_of(snap, p),
                f"still pending and unmasked after the drain "
                f"({len(stuck)} such ports){_where(snap, int(p))}",
                phase,
            )
        )
    linked = np.flatnonzero(snap.linked)
    for p in linked[:MAX_PER_KIND]:
        out.append(
            Violation(
                "still-linked",
                int(p),
                _vcpu_of(snap, p),
                f"LINKED after the drain ({len(linked)} such ports)",
                phase,
            )
        )
    if snap.abi == L.ABI_FIFO:
        for v in np.flatnonzero((snap.ready | snap.local_ready) != 0)[:MAX_PER_KIND]:
            out.append(
                Violation(
                    "ready-no-upcall",
                    None,
                    int(v),
                    f"READY {int(snap.ready[v]):#x} left after the drain with no upcall pending",
                    phase,
                )
            )
    else:
        w = snap.wb
        for v in range(snap.vcpus):
            sel = np.flatnonzero(snap.sel[v])
            if not len(sel):
                continue
            below = [
                int(j)
                for j in sel
                if snap.pending[
                    j * w * (w if snap.l2 is not None else 1) : (j + 1)
                    * w
                    * (w if snap.l2 is not None else 1)
                ].any()
            ]
            kind = "selector-no-upcall" if below else "stale-selector"
            out.append(
                Violation(
                    kind,
                    None,
                    v,
                    f"selector bits {sel[:8].tolist()} left after the drain "
                    f"(words with a pending port: {below[:8]})",
                    phase,
                )
            )
    return out


def _where(snap: Snapshot, p: int) -> str:
    """Where a 2l/3l port could be found: the vCPUs whose binding bitmap has it and whether
    their selector bit for it is set; for FIFO whether it is LINKED."""
    if snap.abi == L.ABI_FIFO:
        return f"; LINKED {bool(snap.linked[p])}"
    w = snap.wb
    owners = np.flatnonzero(snap.cpumask[:, p]).tolist()
    sel = [bool(snap.sel[v][p // w if snap.l2 is None else p // (w * w)]) for v in owners]
    return (
        f"; bound (cpu_evtchn_mask) on vcpus {owners[:4]}, their selector bit "
        f"{sel[:4]}, upcall {[bool(snap.upcall[v]) for v in owners[:4]]}"
    )


def _vcpu_of(snap: Snapshot, port) -> int | None:
    p = int(port)
    if 0 < p < snap.nports:
        return snap.dm.notify_vcpu(p)
    return None


def worker_violations(stats: S.Stats, names: list[str]) -> list[Violation]:
    """The violations the workers recorded while racing, with the worker's name."""
    out = []
    for slot in range(stats.shape.workers):
        n = int(stats.hdr[slot, S.H_NVIOL])
        for i in range(min(n, S.VIOL_SLOTS)):
            kind, port, vcpu, a, b, t = (int(x) for x in stats.viol[slot, i])
            name = WORKER_KINDS.get(kind, f"worker-{kind}")
            detail = {
                "perma-delivered": "delivered although masked since setup",
                "wrong-vcpu": f"delivered on vcpu {vcpu}, bound to vcpu {a}",
                "linked-reuse": f"alloc_unbound handed it out (closing port {a}) while LINKED",
                "engine-error": f"send_many failed with errno {a}",
                "close-stuck": "no free port for 5 s after closing it",
                "dead-delivered": f"delivered on vcpu {vcpu} but it is closed or unbound",
            }.get(name, f"a={a} b={b}")
            if kind == DU.V_DUEL_ORDER:
                detail = (
                    f"duel {DU.NAMES.get(a, a)}, iteration {b}: events of a lower-"
                    f"priority queue were served before a ready higher-priority one "
                    f"(the guest followed a stale HEAD into another queue, R6)"
                )
            if kind == DU.V_DUEL_EARLY_WAKE:
                detail = (
                    f"duel {DU.NAMES.get(a, a)}, iteration {b}: SCHEDOP_poll returned "
                    f"because the port's PENDING went 0 -> 1, but the event was on no "
                    f"queue of the vCPU: the sender woke the poller before the event "
                    f"was queued (R9)"
                )
            if kind == DU.V_DUEL_OLD_TAIL:
                moved = ("moved to a lower-priority queue", ", or after that queue's event")
                how, order = moved if b & 1 else ("on its own queue", "")
                detail = (
                    f"duel {DU.NAMES.get(a, a)}, iteration {b}: the queue's last-consumed "
                    f"tail was relinked ({how}) while another event was linked on the queue: "
                    f"this port was not delivered exactly once{order} (R7)"
                )
            if kind in (DU.V_DUEL_SELECTOR_NO_UPCALL, DU.V_DUEL_STUCK):
                detail = f"duel {DU.NAMES.get(a, a)}, iteration {b}: pending and unmasked " + (
                    "with its selector bit set but no upcall pending"
                    if kind == DU.V_DUEL_SELECTOR_NO_UPCALL
                    else "with no selector bit: no scan will reach it"
                )
            phase = "duel" if kind >= DU.V_DUEL_SELECTOR_NO_UPCALL else "race"
            if kind in RS.KINDS:
                name, detail, phase = RS.KINDS[kind], _k_detail(kind, port, a, b, stats), "reset"
            out.append(
                Violation(
                    name,
                    port if name != "engine-error" and (port or phase != "reset") else None,
                    vcpu if name not in ("engine-error",) else None,
                    f"{detail} (seen by {names[slot]})",
                    phase,
                )
            )
        if n > S.VIOL_SLOTS:
            last = out[-1].kind
            out.append(
                Violation(
                    last,
                    None,
                    None,
                    f"{names[slot]} recorded {n - S.VIOL_SLOTS} more violations "
                    f"than it could store",
                    "race",
                )
            )
    return out


def _k_detail(kind: int, port: int, a: int, b: int, stats: S.Stats) -> str:
    """What a violation found by K's processes (stress.resetter) means; `port` is K's."""
    k = f"port {port} of the resetting domain K (domid {stats.shape.senders + 1})"
    if kind in (RS.V_K_LOST, RS.V_K_PHANTOM):
        x = 1 + a - b
        what = f"{x - 1} event(s) lost" if x > 1 else f"{-x} phantom deliveries"
        return (
            f"the binding of {k} ended (closed by a reset) with {a} send edges + 1 bind "
            f"event, {b} delivered: {what} (a close destroys at most the one pending event)"
        )
    if kind == RS.V_K_PARKED:
        why = "has no event-array word" if b == RS.PARKED_NO_WORD else "is masked"
        return (
            f"{k} is bound (to dom0 port {a}) but {why}: its events are parked for ever "
            f"(bound while a reset wiped K's event state, R14)"
        )
    if kind == RS.V_K_OPEN:
        return f"{k} is {L.STATUS_NAMES.get(a, a)} after EVTCHNOP_reset returned success (R14)"
    if kind == RS.V_K_ERROR:
        if b == RS.WHERE_DOM0:
            return (
                f"dom0's end of the channel of {k} is {L.STATUS_NAMES.get(a, a)}: neither "
                f"bound nor waiting for K (a reset must leave it unbound)"
            )
        where = {RS.WHERE_RESET: "EVTCHNOP_reset", RS.WHERE_SEND: "K's sender's send_many"}
        return f"{where.get(b, 'bind_interdomain')} failed with errno {a}" + (
            f" ({k})" if port else ""
        )
    return f"{k} was delivered but its binding names no channel of K (R14)"


def k_checks(env, phase: str, held: bool) -> list[Violation]:
    """The resetting domain K at a quiescent point (K's sender and resetters paused, between
    two rounds; K's vCPU held, or drained): K's queues and selectors (held) or an empty event
    state and the accounting of every live binding (drained), no binding parked for ever."""
    kdom, st = env.kdom, env.stats
    snap = Snapshot(env.host, kdom.max_ports, kdom.domid)
    where = f"domain K (domid {kdom.domid}), {phase}"
    out = held_checks(snap, where) if held else drained_state_checks(snap, where)
    for kp, d, why in RS.parked(env, st):
        detail = _k_detail(RS.V_K_PARKED, kp, d, why, st)
        out.append(Violation("reset-parked", kp, 0, detail, phase))
    if held:
        return out
    dm0 = env.dom0._dm
    for i in range(env.cfg.kchans):
        d = int(st.kch_dport[i])
        e = int(st.kedges[i]) - int(st.kbase_e[i])
        n = int(st.kdeliv[i]) - int(st.kbase_d[i])
        x = 1 + e - n
        live = dm0.state(d) == L.ECS_INTERDOMAIN
        kp = dm0.port_u32(d, L.P_REMOTE_PORT) if live else int(st.kch_kport[i])
        if (live and x == 0) or (not live and 0 <= x <= 1):
            continue
        kind = "reset-phantom" if x < 0 else "reset-lost"
        if live:
            detail = (
                f"the live binding of port {kp} of the resetting domain K (domid "
                f"{kdom.domid}, dom0 port {d}): {e} send edges + 1 bind event, {n} delivered "
                f"after the drain: {abs(x)} {'phantom deliveries' if x < 0 else 'lost'}"
            )
        else:
            code = RS.V_K_PHANTOM if x < 0 else RS.V_K_LOST
            detail = _k_detail(code, kp, e, n, st) + " [not bound again yet]"
        out.append(Violation(kind, kp, 0, detail, phase))
    return out


# ---------------------------------------------------------------------------------------------
def ordered_phase(env, rng: np.random.Generator, plain_channels: np.ndarray) -> list[Violation]:
    """Deterministic order checks on vCPU 0, run by the parent while every vCPU is held and
    every sender stopped: FIFO order within a queue, priority order across queues (also when a
    higher priority arrives mid-handler), and for 2l/3l the rotating scan order."""
    st, dom0 = env.stats, env.dom0
    k = min(48, len(plain_channels))
    if k < 4:
        return []
    chans = rng.choice(plain_channels, size=k, replace=False)
    dports = st.ch_dport[chans].astype(np.int64)
    if any(dom0.is_pending(int(p)) for p in dports):
        return [
            Violation(
                "lost",
                None,
                None,
                "ordered phase: a plain port is still pending after the drain",
                "ordered",
            )
        ]
    saved_v = st.ch_vcpu[chans].copy()
    saved_p = st.ch_prio[chans].copy()
    for p in dports:
        dom0.bind_vcpu(int(p), 0)
    out: list[Violation] = []
    try:
        if env.fifo:
            out += _fifo_order(env, rng, chans, dports)
        else:
            out += _scan_order(env, rng, chans, dports)
    finally:
        for p, v, pr in zip(dports, saved_v, saved_p):
            dom0.bind_vcpu(int(p), int(v))
            if env.fifo:
                dom0.set_priority(int(p), int(pr))
    return out


def _send(env, chan: int) -> None:
    st = env.stats
    env.sdoms[int(st.ch_sender[chan])].send(int(st.ch_lport[chan]))
    env.extra_sent += 1


def _note_sent(env, chans, dports) -> None:
    """The ordered phase's events count like any others in the final tallies."""
    st = env.stats
    for c, p in zip(chans, dports):
        st.edges[int(st.ch_sender[c]), int(p)] += 1


def _note_delivered(env, ports) -> None:
    st = env.stats
    for p in ports:
        st.delivered[0, int(p)] += 1


def _fifo_order(env, rng, chans, dports) -> list[Violation]:
    dom0 = env.dom0
    out = []
    prios = rng.choice([2, 7, 12], size=len(chans))
    for p, pr in zip(dports, prios):
        dom0.set_priority(int(p), int(pr))
    # 1. one batch: priority order, then send order within a priority
    order = rng.permutation(len(chans))
    for i in order:
        _send(env, chans[i])
    _note_sent(env, chans, dports)
    got = [int(x) for x in dom0.consume(0)]
    _note_delivered(env, got)
    rank = {int(dports[i]): (int(prios[i]), n) for n, i in enumerate(order)}
    want = sorted(rank, key=rank.get)
    if got != want:
        i = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        port = got[i] if i < len(got) else None
        prev = got[i - 1] if 0 < i <= len(got) else None
        kind = "order"
        if (
            port is not None
            and prev is not None
            and port in rank
            and prev in rank
            and rank[port][0] != rank[prev][0]
        ):
            kind = "priority"
        out.append(
            Violation(
                kind,
                port,
                0,
                f"ordered phase: delivered {got[:12]}... expected {want[:12]}... "
                f"(first difference at position {i}; priorities "
                f"{[rank.get(p, (None,))[0] for p in got[:12]]})",
                "ordered",
            )
        )
    # 2. a higher priority arriving while a lower queue is being served preempts it
    low = [i for i in range(len(chans)) if prios[i] == 12][:6]
    high = [i for i in range(len(chans)) if prios[i] == 2][:2]
    if len(low) >= 3 and high:
        for i in low:
            _send(env, chans[i])
        _note_sent(env, chans[low], dports[low])
        first = [int(x) for x in dom0.consume(0, max_events=1)]
        _note_delivered(env, first)
        for i in high:
            _send(env, chans[i])
        _note_sent(env, chans[high], dports[high])
        rest = [int(x) for x in dom0.consume(0)]
        _note_delivered(env, rest)
        want = [int(dports[i]) for i in high] + [int(dports[i]) for i in low[1:]]
        if first != [int(dports[low[0]])] or rest != want:
            out.append(
                Violation(
                    "priority",
                    rest[0] if rest else None,
                    0,
                    f"ordered phase: after {first} (prio 12) the vCPU served "
                    f"{rest}, expected the prio-2 events {want[: len(high)]} "
                    f"before the rest {want[len(high) :]}",
                    "ordered",
                )
            )
    return out


def _scan_order(env, rng, chans, dports) -> list[Violation]:
    dom0 = env.dom0
    dm = env.host._dm(0)
    w = dm.word_bits
    order = rng.permutation(len(chans))
    word = dm.guest_u32(0, L.G_RESUME_WORD)
    bit = dm.guest_u32(0, L.G_RESUME_BIT)
    start = word * w + bit
    for i in order:
        _send(env, chans[i])
    _note_sent(env, chans, dports)
    got = [int(x) for x in dom0.consume(0)]
    _note_delivered(env, got)
    limit = dm.max_ports
    want = sorted((int(p) for p in dports), key=lambda p: (p - start) % limit)
    if got != want:
        return [
            Violation(
                "scan-order",
                got[0] if got else None,
                0,
                f"ordered phase: from resume position {start} the scan delivered "
                f"{got[:12]}..., expected {want[:12]}...",
                "ordered",
            )
        ]
    return []
