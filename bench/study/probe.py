"""A probe round (experiments 4 and 5): K hot ports kept pending by a racing sender process
and, in a storm, by their own handlers (each hot port raised again as soon as it is handled,
so that it is pending whatever the OS scheduler does with the sender) while the consumer
(this process, consumers.probe_round) handles events one at a time and raises a probe - the
victim port, or the timer VIRQ - at randomised intervals.

Layout of dom0's ports for the placements (W = the variant's word width; 64 for fifo, where
words do not exist and the placements only change port numbers):
    below  the victim is bit 0 of its word; the K hot ports are the K ports just below it
    above  the victim is the last bit of word 0; the K hot ports follow it, in higher words
    same   the victim is the last bit of word 1; the hot ports are bits 0..K-1 of that word
    timer  (experiment 5) the K hot ports are ports 1..K; the timer VIRQ is bound after them
Exact accounting: the sender and the handlers count the new edges their sends make per port,
the consumer every delivery; after the round the sender stops, the consumer drains, and for
every port delivered == edges and nothing is left pending, or the configuration fails.
"""

from __future__ import annotations

import time

import numpy as np

import evtchn.numba as en
from evtchn import Host
from evtchn import layout as L

from . import consumers as CS
from . import procs as P
from . import variants as V
from .child import Failed

PLACEMENTS = ("below", "above", "same")
STOP, READY, GO = 0, 8, 16
CTL = 24


def word_bits(variant: str) -> int:
    return V.VARIANTS[variant][1]


def layout(placement: str, k: int, w: int) -> tuple[int, list[int]] | None:
    """(victim port, hot ports) for a placement, or None where it cannot hold K hot ports."""
    if placement == "below":
        victim = -(-(k + 1) // w) * w
        return victim, list(range(victim - k, victim))
    if placement == "above":
        return w - 1, list(range(w, w + k))
    if placement == "same":
        if k > w - 1:
            return None
        return 2 * w - 1, list(range(w, w + k))
    raise ValueError(placement)


def sender_main(conn, host_name, domid, ctl):
    """The hot sender: for each round the parent sends the ports; it sends_many over them
    until told to stop, then answers with the new edges its sends made, per port."""
    P.die_with_parent()
    host = Host.attach(host_name)
    try:
        dom = host.domain(domid)
        while True:
            lports = conn.recv()
            if lports is None:
                return
            arr = np.asarray(lports, np.uint32)
            edges = np.zeros(len(arr), np.uint8)
            acc = np.zeros(len(arr), np.int64)
            ctl[READY] = 1
            while not ctl[GO]:
                time.sleep(0.0002)
            while not ctl[STOP]:
                dom.send_many(arr, edges)
                acc += edges
            conn.send(acc)
    finally:
        host.close()


class Rig:
    """dom0 (1 vCPU) of `variant`, a sender domain, `nports` channels bound between them."""

    def __init__(self, host, variant: str, nports: int, timer: bool, timer_priority=None):
        self.host, self.variant = host, variant
        self.dom0 = V.create(host, variant)
        self.tx = V.create(host, variant)
        t0 = time.perf_counter()
        self.rports, self.lports = V.bind_channels(self.dom0, self.tx, nports)
        self.timer_port = self.dom0.bind_virq(L.VIRQ_TIMER, 0) if timer else None
        if timer and timer_priority is not None and variant == "fifo":
            self.dom0.set_priority(self.timer_port, timer_priority)
        self.setup_s = time.perf_counter() - t0
        self.lport_of = {int(r): int(s) for r, s in zip(self.rports, self.lports)}
        self.dom0.consume(0)
        self.tx.consume(0)  # the bind edges on the sender's own ports
        seg, off, _ = self.dom0.layout()["shared_info"]
        self._mm = np.memmap(f"/dev/shm/{seg}", np.uint8, mode="r+")
        self.si = int(self._mm.ctypes.data) + off
        self.wb = word_bits(variant)
        self.rx_v = en.views(self.dom0)
        self.tx_v = en.views(self.tx)

    def start_sender(self) -> None:
        self.ctl = P.CTX.RawArray("q", CTL)
        self.conn, child = P.CTX.Pipe()
        self.proc = P.CTX.Process(
            target=sender_main, daemon=True, args=(child, self.host.name, self.tx.domid, self.ctl)
        )
        self.proc.start()
        child.close()

    def close(self) -> None:
        if getattr(self, "proc", None) is not None:
            self.ctl[STOP] = 1
            try:
                self.conn.send(None)
            except OSError:
                pass
            P.join_or_kill([self.proc], 10)
            self.proc = None

    def round(
        self,
        consumer: int,
        hot: list[int],
        probe: int,
        kind: int,
        dur_s: float,
        gap_us: float,
        seed: int,
        storm: bool = True,
    ) -> dict:
        """One probe round; returns its figures, checked (Failed on a violation)."""
        if getattr(self, "proc", None) is None:
            self.start_sender()
        ctl = self.ctl
        ctl[STOP] = ctl[READY] = ctl[GO] = 0
        self.conn.send([self.lport_of[p] for p in hot])
        deadline = time.monotonic() + 60
        while not ctl[READY]:
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise Failed(f"the hot sender did not start (exit code {self.proc.exitcode})")
            time.sleep(0.002)
        delivered = np.zeros(self.dom0.max_ports, np.int64)
        own_edges = np.zeros(self.dom0.max_ports, np.int64)
        reraise = np.zeros(self.dom0.max_ports, np.int64)
        if storm:
            for p in hot:
                reraise[p] = self.lport_of[p]
        out = np.zeros((200_000, 3), np.int64)
        st = np.array([0, -1], np.int64)
        ctl[GO] = 1
        time.sleep(0.02)  # the hot ports fill up first
        raised, handled, pedges, total = CS.probe_round(
            self.rx_v,
            self.tx_v,
            consumer,
            kind,
            self.lport_of.get(probe, 0),
            probe,
            self.si,
            self.wb,
            st,
            int(dur_s * 1e9),
            int(gap_us * 1000),
            seed,
            delivered,
            out,
            reraise,
            own_edges,
        )
        ctl[STOP] = 1
        if not self.conn.poll(30):
            raise Failed(f"the hot sender did not stop (alive: {self.proc.is_alive()})")
        try:
            counts = self.conn.recv()
        except EOFError:
            raise Failed(f"the hot sender died (exit code {self.proc.exitcode})") from None
        drained = CS.drain(self.rx_v, consumer, self.si, self.wb, st, delivered, 10**8)
        edges = np.zeros_like(delivered)
        edges[np.asarray(hot, np.int64)] = counts
        edges[probe] += pedges
        edges += own_edges
        return self._check(edges, delivered, out, raised, handled, total, drained)

    def _check(self, edges, delivered, out, raised, handled, total, drained) -> dict:
        bad = np.flatnonzero(edges != delivered)
        left = [
            p
            for p in range(1, self.dom0.max_ports)
            if p < self.dom0.valid_ports and self.dom0.is_pending(p)
        ]
        rows = out[: handled + (1 if raised > handled else 0)]
        res = {
            "probes_raised": int(raised),
            "probes_handled": int(handled),
            "deliveries": int(total),
            "drained_after": int(drained),
            "edges": int(edges.sum()),
            "delay_ns": rows[rows[:, 2] == 0, 0].tolist(),
            "others_before": rows[rows[:, 2] == 0, 1].tolist(),
            "censored": rows[rows[:, 2] == 1, :2].tolist(),
        }
        if len(bad) or left:
            p = int(bad[0]) if len(bad) else left[0]
            raise Failed(
                f"accounting: {len(bad)} port(s) with deliveries != edges (port {p}: "
                f"{int(delivered[p])} delivered, {int(edges[p])} edges), {len(left)} left "
                f"pending",
                res,
            )
        return res
