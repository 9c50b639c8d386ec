"""The backend (dom0): binds the frontend's event channel, maps its ring and answers every
request, as netback/blkback do. The handler loop runs on evtchn's Python handles here, or
compiled end to end with @njit through evtchn.numba (njit_backend.py, ``--njit``).

Handler shape (Linux, lateeoi channel): wait for the upcall, consume (acknowledges), mask the
port, do the ring work until RING_FINAL_CHECK_FOR_REQUESTS finds nothing, unmask.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import numpy.typing as npt

import evtchn

from . import ring as R
from .xenbus import POLL_S, PeerGone, ProtocolError, check_connected, message


class Backend:
    """One backend driver on evtchn's Python handles."""

    def __init__(self, dom0: evtchn.Domain, port: int, page: R.RingPage):
        self.dom0, self.port = dom0, port
        self.back = R.BackRing(page)
        self.handled = self.sends = self.wakeups = self.events = self.idle_handlers = 0
        self.timeouts = 0
        self.delivered: npt.NDArray[np.uint32] = np.empty(64, np.uint32)

    def handle_requests(self) -> bool:
        """Answer what the ring holds until the final check finds nothing; True once the
        frontend asked to disconnect."""
        back, idx, ent = self.back, self.back.page.idx, self.back.page.ent
        disconnect, handled = False, self.handled
        while True:
            rp = int(idx[R.REQ_PROD])
            R.mb()  # rmb: read the requests after the index that published them
            if R.u32(rp - back.rsp_prod_pvt) > R.RING_SIZE:  # RING_REQUEST_PROD_OVERFLOW
                raise ProtocolError(f"req_prod {rp} overtakes the ring")
            while back.req_cons != rp:
                row = ent[back.req_cons & (R.RING_SIZE - 1)]
                req_id, op, arg = int(row[R.F_ID]), int(row[R.F_OP]), int(row[R.F_ARG])
                back.req_cons = R.u32(back.req_cons + 1)
                out = ent[back.rsp_prod_pvt & (R.RING_SIZE - 1)]  # never ahead of req_cons
                if op == R.OP_WORK:
                    out[R.F_ID], out[R.F_STATUS], out[R.F_RESULT] = req_id, R.STATUS_OK, R.work(arg)
                    self.handled += 1
                elif op == R.OP_DISCONNECT:
                    out[R.F_ID], out[R.F_STATUS], out[R.F_RESULT] = req_id, R.STATUS_OK, 0
                    disconnect = True
                else:
                    out[R.F_ID], out[R.F_STATUS], out[R.F_RESULT] = req_id, R.STATUS_BAD_OP, 0
                back.rsp_prod_pvt = R.u32(back.rsp_prod_pvt + 1)
            if back.push_responses_and_check_notify():
                self.dom0.send(self.port)  # notify_remote_via_irq
                self.sends += 1
            if disconnect:
                break
            if not back.final_check_for_requests():
                break
        if self.handled == handled and not disconnect:
            self.idle_handlers += 1  # woken with nothing new (the bind's event, or a re-raise)
        return disconnect

    def run(self) -> None:
        """Serve until the frontend disconnects (or goes away: PeerGone)."""
        dom0, port = self.dom0, self.port
        while True:
            if not dom0.wait(0, POLL_S):
                self.timeouts += 1
                check_connected(dom0, port, "frontend", f"{self.handled} requests answered")
                continue
            self.wakeups += 1
            n = dom0.consume_into(0, self.delivered)
            self.events += n
            for p in self.delivered[:n].tolist():
                dom0.mask(p)  # lateeoi_ack_dynirq
                done = p == port and self.handle_requests()
                dom0.unmask(p)  # xen_irq_lateeoi
                if done:
                    return

    def stats(self) -> dict[str, int]:
        return dict(
            handled=self.handled,
            sends=self.sends,
            wakeups=self.wakeups,
            events=self.events,
            idle_handlers=self.idle_handlers,
            timeouts=self.timeouts,
        )


def main(host_name: str, domid: int, front_domid: int, use_njit: bool, xs: Any) -> None:
    """Process entry: the backend driver of domain `domid` (spawned by the toolstack)."""
    try:
        sys.exit(_run(host_name, domid, front_domid, use_njit, xs))
    except KeyboardInterrupt:
        sys.exit(130)


def _run(host_name: str, domid: int, front_domid: int, use_njit: bool, xs: Any) -> int:
    R.mb()  # load the compiled fence now, not while serving
    host = evtchn.Host.attach(host_name)
    dom0 = host.domain(domid)
    if use_njit:
        from . import njit_backend

        njit_backend.compile_now(dom0)  # before we connect: compiling is not serving
    _, ring_name, remote_port = message(xs, "ring")  # xenstore: ring-ref, event-channel
    page = R.RingPage(ring_name)  # map the granted page
    port = dom0.bind_interdomain(front_domid, remote_port)  # EVTCHNOP_bind_interdomain
    xs.send(("connected", port))
    try:
        if use_njit:
            stats = njit_backend.serve(dom0, port, page)
        else:
            drv = Backend(dom0, port, page)
            drv.run()
            stats = drv.stats()
    except (PeerGone, ProtocolError) as exc:
        print(f"split_driver backend: error: {exc}", file=sys.stderr, flush=True)
        return 1
    dom0.close(port)  # unbind (the frontend may have closed its end first: that is fine)
    xs.send(("stats", stats))
    return 0
