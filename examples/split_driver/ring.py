"""The shared ring of a split driver, laid out and driven as Xen's xen/include/public/io/ring.h.

One page in its own POSIX shared-memory segment (the page a frontend grants its backend):

    offset 0   req_prod, req_event, rsp_prod, rsp_event   (RING_IDX: uint32, free-running)
    offset 16  pvt[4], __pad[44]                           (zero)
    offset 64  RING_SIZE entries of 16 bytes, each a request or, once answered, its response

As in ring.h, one entry array carries both directions: the backend writes the response to a
request into the slot at its rsp_prod_pvt, which never overtakes the requests it consumed
(1-for-1, the frontend keeps at most RING_SIZE requests outstanding). The private indices
(req_prod_pvt and rsp_cons of the front, req_cons and rsp_prod_pvt of the back) live in the
process that owns them, as FRONT_RING/BACK_RING keep them out of the shared page.

Notification hold-off is ring.h's: a producer notifies only when the index it publishes
passes the consumer's *_event (RING_PUSH_*_AND_CHECK_NOTIFY), and a consumer about to sleep
first sets *_event = cons + 1, issues a full barrier and looks again (RING_FINAL_CHECK_FOR_*):
with both barriers, a producer either sees the new *_event (and notifies) or the consumer
sees the new *_prod (and does not sleep); no wake-up is lost.

Barriers: xen_mb() orders a store before a later load, which x86 does not do by itself (the
store buffer), so mb() is a real seq_cst fence, compiled once by numba. wmb()/rmb() are the
same fence here: cheap next to an interpreted loop, and right on weakly ordered CPUs too.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import numpy as np
import numpy.typing as npt
from numba import njit, types
from numba.extending import intrinsic

SHM_DIR = "/dev/shm"
PAGE_SIZE = 4096
HEADER_BYTES = 64  # 4 indices + pvt[4] + __pad[44], as struct __name##_sring
ENTRY_WORDS = 4  # one entry: 4 x uint32 (16 bytes)

# Index words of the shared header (uint32 each).
REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT = 0, 1, 2, 3

# A request: (id, op, arg, 0); its response, in the same slot: (id, status, result, 0).
F_ID, F_OP, F_ARG = 0, 1, 2
F_STATUS, F_RESULT = 1, 2
OP_WORK = 1  # answer with work(arg)
OP_DISCONNECT = 2  # the frontend is done: answer, then leave the loop
STATUS_OK = 0
STATUS_BAD_OP = 0xFFFFFFFF  # -1 as a uint32, as BLKIF_RSP_ERROR


def ring_size(nbytes: int) -> int:
    """__RING_SIZE: the entries that fit after the header, rounded down to a power of two."""
    fit = (nbytes - HEADER_BYTES) // (ENTRY_WORDS * 4)
    return 1 << (fit.bit_length() - 1)


RING_SIZE = ring_size(PAGE_SIZE)  # 252 entries fit: 128


def work(arg: int) -> int:
    """What the backend does with a request (a stand-in for a disk or network operation);
    the frontend checks every result against it."""
    return (arg * 40503 + 12345) & 0xFFFFFFFF  # < 2**48: no int64 overflow in @njit


def _fence_typer(typingctx: Any) -> tuple[Any, Any]:
    """numba's typing of the intrinsic: no arguments, no result; the code is one fence."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


# Jitted code calls it with no argument (numba passes typingctx to the typer itself).
_seq_cst_fence: Any = intrinsic(_fence_typer)


@njit(cache=True)
def mb() -> None:
    """xen_mb(): a full (seq_cst) fence; also wmb()/rmb() here. Callable from Python and from
    @njit code (where LLVM keeps the ring's loads and stores on their side of it)."""
    _seq_cst_fence()


class RingPage:
    """The shared page, mapped from /dev/shm/<name> (os.open + mmap rather than
    multiprocessing.shared_memory, whose resource tracker on Python < 3.13 unlinks a segment
    when any process that attached it exits: CPython gh-82300). Only the creator unlinks."""

    def __init__(self, name: str, create: bool = False):
        self.name = name
        self.path = os.path.join(SHM_DIR, name)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, PAGE_SIZE)
            self._mm = mmap.mmap(fd, PAGE_SIZE)
        finally:
            os.close(fd)
        words = np.frombuffer(self._mm, np.uint32)
        #: The four shared indices: req_prod, req_event, rsp_prod, rsp_event.
        self.idx: npt.NDArray[np.uint32] = words[: HEADER_BYTES // 4]
        #: The entries, one row each: (id, op or status, arg or result, 0).
        self.ent: npt.NDArray[np.uint32] = words[HEADER_BYTES // 4 :][
            : RING_SIZE * ENTRY_WORDS
        ].reshape(RING_SIZE, ENTRY_WORDS)
        if create:
            self.init()

    def init(self) -> None:
        """SHARED_RING_INIT: producers at 0, both *_event at 1 (the first message notifies)."""
        self.idx[:] = 0
        self.idx[REQ_EVENT] = 1
        self.idx[RSP_EVENT] = 1

    def unlink(self) -> None:
        """Remove the segment's name (the creator's job); the mappings stay valid."""
        unlink_ring(self.name)


def unlink_ring(name: str) -> bool:
    """Unlink /dev/shm/<name>; False if it was already gone."""
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        return False
    return True


def u32(x: int) -> int:
    """RING_IDX arithmetic: indices run freely and wrap at 2**32."""
    return x & 0xFFFFFFFF


class FrontRing:
    """The frontend's half (struct __name##_front_ring): pushes requests, takes responses."""

    def __init__(self, page: RingPage):
        self.page = page
        self.req_prod_pvt = 0
        self.rsp_cons = 0

    def free_requests(self) -> int:
        """RING_FREE_REQUESTS."""
        return RING_SIZE - u32(self.req_prod_pvt - self.rsp_cons)

    def put_request(self, req_id: int, op: int, arg: int) -> None:
        """Fill the slot at req_prod_pvt (RING_GET_REQUEST); not visible until pushed."""
        row = self.page.ent[self.req_prod_pvt & (RING_SIZE - 1)]
        row[F_ID], row[F_OP], row[F_ARG] = req_id, op, arg
        self.req_prod_pvt = u32(self.req_prod_pvt + 1)

    def push_requests_and_check_notify(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: publish req_prod; True if the backend asked
        to be told (req_event lies in (old, new])."""
        idx = self.page.idx
        old, new = int(idx[REQ_PROD]), self.req_prod_pvt
        mb()  # wmb: the backend sees the requests before the index
        idx[REQ_PROD] = new
        mb()  # the backend sees the new index before we read req_event
        return u32(new - int(idx[REQ_EVENT])) < u32(new - old)

    def unconsumed_responses(self) -> int:
        """RING_HAS_UNCONSUMED_RESPONSES."""
        return u32(int(self.page.idx[RSP_PROD]) - self.rsp_cons)

    def final_check_for_responses(self) -> bool:
        """RING_FINAL_CHECK_FOR_RESPONSES: True if responses wait; else ask to be notified of
        the next one (rsp_event = rsp_cons + 1) and look once more after a full barrier."""
        if self.unconsumed_responses():
            return True
        self.page.idx[RSP_EVENT] = u32(self.rsp_cons + 1)
        mb()
        return self.unconsumed_responses() > 0


class BackRing:
    """The backend's half (struct __name##_back_ring): takes requests, pushes responses."""

    def __init__(self, page: RingPage):
        self.page = page
        self.req_cons = 0
        self.rsp_prod_pvt = 0

    def unconsumed_requests(self) -> int:
        """RING_HAS_UNCONSUMED_REQUESTS: what req_prod offers, but never more than the slots
        whose responses are out (a frontend cannot make us overwrite an unread response)."""
        req = u32(int(self.page.idx[REQ_PROD]) - self.req_cons)
        rsp = RING_SIZE - u32(self.req_cons - self.rsp_prod_pvt)
        return min(req, rsp)

    def push_responses_and_check_notify(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY."""
        idx = self.page.idx
        old, new = int(idx[RSP_PROD]), self.rsp_prod_pvt
        mb()  # wmb: the frontend sees the responses before the index
        idx[RSP_PROD] = new
        mb()  # the frontend sees the new index before we read rsp_event
        return u32(new - int(idx[RSP_EVENT])) < u32(new - old)

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: as final_check_for_responses, on req_event."""
        if self.unconsumed_requests():
            return True
        self.page.idx[REQ_EVENT] = u32(self.req_cons + 1)
        mb()
        return self.unconsumed_requests() > 0
