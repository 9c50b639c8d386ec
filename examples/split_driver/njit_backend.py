"""The backend's handler loop compiled end to end: a user's own @njit code calling
evtchn.numba's kernels (wait, consume, mask, unmask, send) on Views of dom0, with the ring
indices read from a numpy view of the ring segment. Only a timeout (to look whether the
frontend is still there) or the disconnect brings it back to Python.

Rules it follows (evtchn.numba): the Views are built in the thread that uses them, after
both domains exist; errors come back as return codes, not exceptions.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numba import njit

import evtchn
import evtchn.numba as en

from . import ring as R
from .xenbus import POLL_S, PeerGone, ProtocolError, check_connected

# Slots of the int64 state array shared between Python and the compiled loop.
S_REQ_CONS, S_RSP_PROD_PVT, S_HANDLED, S_SENDS, S_WAKEUPS, S_EVENTS, S_IDLE = range(7)
NSTATE = 7
# What the loop returns.
R_TIMEOUT, R_DISCONNECT, R_OVERFLOW, R_SEND_ERROR = 0, 1, 2, 3

M32 = 0xFFFFFFFF
MASK = R.RING_SIZE - 1
_work = njit(cache=True)(R.work)


@njit(cache=True)
def _handle(
    v: en.Views,
    port: int,
    idx: npt.NDArray[np.uint32],
    ent: npt.NDArray[np.uint32],
    st: npt.NDArray[np.int64],
) -> int:
    """handle_requests() of backend.py, compiled: answer until the final check finds
    nothing. Returns R_DISCONNECT, R_OVERFLOW, R_SEND_ERROR or R_TIMEOUT (= carry on)."""
    req_cons, rsp_prod_pvt = np.int64(st[S_REQ_CONS]), np.int64(st[S_RSP_PROD_PVT])
    handled0, disconnect, r = st[S_HANDLED], False, R_TIMEOUT
    while True:
        rp = np.int64(idx[R.REQ_PROD])
        R.mb()  # rmb
        if ((rp - rsp_prod_pvt) & M32) > R.RING_SIZE:  # RING_REQUEST_PROD_OVERFLOW
            r = R_OVERFLOW
            break
        while req_cons != rp:
            slot = req_cons & MASK
            req_id, op, arg = ent[slot, R.F_ID], ent[slot, R.F_OP], np.int64(ent[slot, R.F_ARG])
            req_cons = (req_cons + 1) & M32
            out = rsp_prod_pvt & MASK
            ent[out, R.F_ID] = req_id
            if op == R.OP_WORK:
                ent[out, R.F_STATUS] = R.STATUS_OK
                ent[out, R.F_RESULT] = _work(arg)
                st[S_HANDLED] += 1
            elif op == R.OP_DISCONNECT:
                ent[out, R.F_STATUS] = R.STATUS_OK
                ent[out, R.F_RESULT] = 0
                disconnect = True
            else:
                ent[out, R.F_STATUS] = R.STATUS_BAD_OP
                ent[out, R.F_RESULT] = 0
            rsp_prod_pvt = (rsp_prod_pvt + 1) & M32
        # RING_PUSH_RESPONSES_AND_CHECK_NOTIFY
        old = np.int64(idx[R.RSP_PROD])
        R.mb()
        idx[R.RSP_PROD] = rsp_prod_pvt
        R.mb()
        if ((rsp_prod_pvt - np.int64(idx[R.RSP_EVENT])) & M32) < ((rsp_prod_pvt - old) & M32):
            if en.send(v, port) < 0:
                r = R_SEND_ERROR
                break
            st[S_SENDS] += 1
        if disconnect:
            r = R_DISCONNECT
            break
        # RING_FINAL_CHECK_FOR_REQUESTS
        if _unconsumed(idx, req_cons, rsp_prod_pvt) > 0:
            continue
        idx[R.REQ_EVENT] = (req_cons + 1) & M32
        R.mb()
        if _unconsumed(idx, req_cons, rsp_prod_pvt) == 0:
            break
    st[S_REQ_CONS], st[S_RSP_PROD_PVT] = req_cons, rsp_prod_pvt
    if st[S_HANDLED] == handled0 and not disconnect:
        st[S_IDLE] += 1
    return r


@njit(cache=True)
def _unconsumed(idx: npt.NDArray[np.uint32], req_cons: int, rsp_prod_pvt: int) -> int:
    """RING_HAS_UNCONSUMED_REQUESTS."""
    req = (np.int64(idx[R.REQ_PROD]) - req_cons) & M32
    rsp = R.RING_SIZE - ((req_cons - rsp_prod_pvt) & M32)
    return int(min(req, rsp))


@njit(cache=True)
def handler_loop(
    v: en.Views,
    port: int,
    idx: npt.NDArray[np.uint32],
    ent: npt.NDArray[np.uint32],
    st: npt.NDArray[np.int64],
    delivered: npt.NDArray[np.uint32],
    timeout_ns: int,
) -> int:
    """The backend's vCPU 0, compiled: wait for the upcall, consume, mask, ring work, unmask;
    returns to Python only on a timeout or when the ring work ends (disconnect, error)."""
    while True:
        if not en.wait(v, 0, timeout_ns):
            return R_TIMEOUT
        st[S_WAKEUPS] += 1
        n = en.consume(v, 0, delivered)
        st[S_EVENTS] += n
        for i in range(n):
            p = np.int64(delivered[i])
            en.mask(v, p)  # lateeoi_ack_dynirq
            r = R_TIMEOUT
            if p == port:
                r = _handle(v, port, idx, ent, st)
            en.unmask(v, p)  # xen_irq_lateeoi
            if r != R_TIMEOUT:
                return r


def serve(dom0: evtchn.Domain, port: int, page: R.RingPage) -> dict[str, int]:
    """Run the compiled loop until the frontend disconnects; PeerGone if it goes away."""
    v = en.views(dom0)  # in this thread, after both domains exist
    st = np.zeros(NSTATE, np.int64)
    delivered = np.empty(64, np.uint32)
    timeout_ns = int(POLL_S * 1e9)
    timeouts = 0
    while True:
        r = handler_loop(v, port, page.idx, page.ent, st, delivered, timeout_ns)
        if r == R_DISCONNECT:
            break
        timeouts += r == R_TIMEOUT
        if r == R_OVERFLOW:
            raise ProtocolError(f"req_prod {int(page.idx[R.REQ_PROD])} overtakes the ring")
        progress = f"{int(st[S_HANDLED])} requests answered"
        check_connected(dom0, port, "frontend", progress)  # timeout or a refused send
        if r == R_SEND_ERROR:
            raise PeerGone(f"send on port {port} was refused; {progress}")
    return dict(
        handled=int(st[S_HANDLED]),
        sends=int(st[S_SENDS]),
        wakeups=int(st[S_WAKEUPS]),
        events=int(st[S_EVENTS]),
        idle_handlers=int(st[S_IDLE]),
        timeouts=timeouts,
    )


def compile_now(dom0: evtchn.Domain) -> None:
    """Compile (or load from numba's cache) the loop and the evtchn kernels it inlines before
    the channel is bound, so that serving starts at full speed. Nothing is bound on dom0 yet,
    so the zero-timeout wait returns at once and no event is consumed."""
    words = np.zeros(R.PAGE_SIZE // 4, np.uint32)
    idx = words[: R.HEADER_BYTES // 4]
    ent = words[R.HEADER_BYTES // 4 :][: R.RING_SIZE * R.ENTRY_WORDS].reshape(
        R.RING_SIZE, R.ENTRY_WORDS
    )
    st = np.zeros(NSTATE, np.int64)
    handler_loop(en.views(dom0), 0, idx, ent, st, np.empty(1, np.uint32), 0)
