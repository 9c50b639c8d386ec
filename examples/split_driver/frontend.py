"""The frontend (domU): creates the shared ring, offers an event channel to the backend, then
issues N requests and checks that each is answered exactly once, as netfront/blkfront do.

Its event handler is Linux's for a lateeoi channel (drivers/xen/events, XSA-332): the upcall
acknowledges the port (consume clears PENDING), the port is masked while the handler runs
(lateeoi_ack_dynirq) and unmasked when it is done (xen_irq_lateeoi), which re-raises an event
that came in meanwhile.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import numpy.typing as npt

import evtchn

from . import ring as R
from .xenbus import POLL_S, PeerGone, ProtocolError, check_connected, message

# No response for this long, requests outstanding and the backend still connected: a lost
# request or a lost wake-up. Reported as an error rather than waited on forever.
STALL_S = 30.0


def request_arg(req_id: int) -> int:
    """The argument of request `req_id` (varied, so a response cannot match by accident)."""
    return (req_id * 7919 + 1) & 0xFFFFFFFF


class Frontend:
    """One frontend driver: its ring half, its port and its counters."""

    def __init__(
        self, domu: evtchn.Domain, port: int, page: R.RingPage, requests: int, in_flight: int
    ):
        self.domu, self.port, self.requests = domu, port, requests
        self.in_flight = min(in_flight, R.RING_SIZE)  # requests outstanding at most
        self.front = R.FrontRing(page)
        self.answered: npt.NDArray[np.uint8] = np.zeros(requests, np.uint8)
        self.next_id = 0  # the next request to issue
        self.done = 0  # responses taken
        self.disconnect_sent = self.disconnected = False
        self.sends = self.wakeups = self.events = self.timeouts = 0
        # consume_into a buffer made once: consume() without one allocates per call
        self.delivered: npt.NDArray[np.uint32] = np.empty(64, np.uint32)

    # -- submitting (the block layer's part: not interrupt-driven) ----------------------------
    def submit(self) -> None:
        """Put as many requests as fit; after the last answer, the disconnect request."""
        front = self.front
        outstanding = R.RING_SIZE - front.free_requests()
        k = min(self.in_flight - outstanding, self.requests - self.next_id)
        for req_id in range(self.next_id, self.next_id + k):
            front.put_request(req_id, R.OP_WORK, request_arg(req_id))
        self.next_id += k
        if self.done == self.requests and not self.disconnect_sent:
            front.put_request(self.requests, R.OP_DISCONNECT, 0)
            self.disconnect_sent, k = True, 1
        if k and front.push_requests_and_check_notify():
            self.domu.send(self.port)  # notify_remote_via_irq
            self.sends += 1

    # -- the interrupt handler: take responses until the final check finds none --------------
    def handle_responses(self) -> None:
        front, ent = self.front, self.front.page.ent
        while True:
            rp = int(front.page.idx[R.RSP_PROD])
            R.mb()  # rmb: the responses are read after the index that published them
            if R.u32(rp - front.rsp_cons) > R.u32(front.req_prod_pvt - front.rsp_cons):
                raise ProtocolError(f"rsp_prod {rp} overtakes the requests issued")
            while front.rsp_cons != rp:
                row = ent[front.rsp_cons & (R.RING_SIZE - 1)]
                self.take(int(row[R.F_ID]), int(row[R.F_STATUS]), int(row[R.F_RESULT]))
                front.rsp_cons = R.u32(front.rsp_cons + 1)
            if not front.final_check_for_responses():
                return

    def take(self, req_id: int, status: int, result: int) -> None:
        if req_id == self.requests and self.disconnect_sent:
            self.disconnected = True
            return
        if not 0 <= req_id < self.requests or status != R.STATUS_OK:
            raise ProtocolError(f"response to unknown request {req_id} (status {status})")
        if self.answered[req_id]:
            raise ProtocolError(f"request {req_id} answered twice")
        if result != R.work(request_arg(req_id)):
            raise ProtocolError(f"request {req_id}: result {result:#x} is wrong")
        self.answered[req_id] = 1
        self.done += 1

    # -- the main loop ------------------------------------------------------------------------
    def run(self) -> float:
        """Issue every request, take every answer, disconnect; returns the seconds it took."""
        domu, port = self.domu, self.port
        t0 = time.perf_counter()
        done, since = 0, time.monotonic()  # responses taken, and since when no more came
        while not self.disconnected:
            self.submit()
            if not domu.wait(0, POLL_S):  # halted until the upcall (or a look at the peer)
                self.timeouts += 1
                check_connected(domu, port, "backend", self.progress())
                if self.done != done:  # progress since the last look
                    done, since = self.done, time.monotonic()
                self.check_stall(since)
                continue
            self.wakeups += 1
            n = domu.consume_into(0, self.delivered)  # the upcall: ports delivered, acked
            self.events += n
            for p in self.delivered[:n].tolist():
                domu.mask(p)  # lateeoi_ack_dynirq: masked while handled
                if p == port:
                    self.handle_responses()
                domu.unmask(p)  # xen_irq_lateeoi: re-raises what came meanwhile
        return time.perf_counter() - t0

    def check_stall(self, since: float) -> None:
        """ProtocolError if no response came since `since`, STALL_S seconds ago or more,
        while requests are out."""
        outstanding = R.RING_SIZE - self.front.free_requests()
        if outstanding and time.monotonic() - since > STALL_S:
            raise ProtocolError(
                f"no response for {STALL_S:.0f} s with {outstanding} requests outstanding and "
                f"the backend connected (a lost request or a lost wake-up); {self.progress()}"
            )

    def progress(self) -> str:
        return f"{self.requests - self.done} of {self.requests} requests unanswered"


def main(
    host_name: str, domid: int, back_domid: int, ring_name: str, n: int, in_flight: int, xs: Any
) -> None:
    """Process entry: the frontend driver of domain `domid` (spawned by the toolstack)."""
    try:
        sys.exit(_run(host_name, domid, back_domid, ring_name, n, in_flight, xs))
    except KeyboardInterrupt:
        sys.exit(130)


def _run(
    host_name: str, domid: int, back_domid: int, ring_name: str, n: int, in_flight: int, xs: Any
) -> int:
    R.mb()  # load the compiled fence now, not inside the timed loop
    host = evtchn.Host.attach(host_name)
    domu = host.domain(domid)
    page = R.RingPage(ring_name, create=True)  # the page a frontend grants (SHARED_RING_INIT)
    try:
        port = domu.alloc_unbound(back_domid)  # EVTCHNOP_alloc_unbound for the backend
        xs.send(("ring", ring_name, port))  # xenstore: ring-ref, event-channel
        message(xs, "connected")  # the backend bound its end (XenbusStateConnected)
        drv = Frontend(domu, port, page, n, in_flight)
        try:
            elapsed = drv.run()
        except (PeerGone, ProtocolError) as exc:
            print(f"split_driver frontend: error: {exc}", file=sys.stderr, flush=True)
            return 1
        answered_once = int(np.count_nonzero(drv.answered == 1))
        xs.send(
            (
                "stats",
                dict(
                    answered_once=answered_once,
                    seconds=elapsed,
                    sends=drv.sends,
                    wakeups=drv.wakeups,
                    events=drv.events,
                    timeouts=drv.timeouts,
                ),
            )
        )
        domu.close(port)  # unbind: the backend's end goes back to unbound
        return 0 if answered_once == n else 1
    finally:
        page.unlink()  # the creator removes the ring; our mapping stays valid until exit
