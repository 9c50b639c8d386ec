"""evtchn.numba: the Numba kernels, called directly from your own ``@njit`` code.

A simulator written in Numba can send, consume, mask and unmask inside its jitted loop, without
a Python call per event. ``views(domain)`` packs what a kernel needs into a ``Views`` tuple
(the domain table of every domain of the host, this domain's id, the calling thread's lock owner
id); pass it to
your jitted function and call the kernels below on it. They are the same kernels as
``Host(backend="numba")`` runs, on the same shared memory, so they interoperate with every
other process and backend attached to the host.

>>> import numpy as np
>>> from numba import njit
>>> import evtchn, evtchn.numba as en
>>> @njit
... def ping(tx, rx, port, rounds, out):
...     got = 0
...     for _ in range(rounds):
...         en.send(tx, port)                  # domu raises its interdomain port
...         got += en.consume(rx, 0, out)      # dom0's vCPU 0 runs its upcall handler
...     return got
>>> with evtchn.Host(backend="numba") as host:
...     dom0 = host.create_domain("fifo")
...     domu = host.create_domain("fifo")
...     port = dom0.alloc_unbound(domu.domid)
...     local = domu.bind_interdomain(dom0.domid, port)
...     _ = domu.consume(0)                   # the bind set the new port pending
...     ping(en.views(domu), en.views(dom0), local, 1000, np.empty(16, np.uint32))
1000

Calling convention (every function is ``@njit(cache=True)``; call it from jitted code or from
Python). ``v`` is a ``Views``; ports, vCPUs and VIRQs are integers; arrays are contiguous::

    send(v, port) -> int            EVTCHNOP_send on v's domain: 1 new edge (PENDING 0 -> 1),
                                    0 coalesced or dropped (unbound), -errno when refused
    send_many(v, ports, edges) -> (n, errno)
                                    send() each uint32 port; edges (uint8, as long as ports, or
                                    empty to skip) gets 1 per new edge; stops at the first
                                    refusal: n sends took effect, errno names the refusal
    consume(v, vcpu, out) -> int    the vCPU's upcall handler: fills the uint32 array out with
                                    the delivered ports (acknowledged) and returns how many;
                                    when out fills up the rest stays for the next call
    wait(v, vcpu, timeout_ns) -> bool
                                    sleep (futex, no spinning) until the vCPU has an upcall
                                    pending; False after timeout_ns (< 0: no limit) or when a
                                    signal arrives. Called from a function without nogil=True
                                    it holds the GIL while it sleeps: keep timeout_ns short.
                                    It first frees the waiter slots of waiters that died
                                    blocked, then takes one (a kick wakes registered waiters)
    upcall_pending(v, vcpu) -> bool
    mask(v, port)                   the guest's mask
    unmask(v, port) -> int          the guest's unmask; a pending port is re-raised by Xen's
                                    unmask, which returns 1 in the rare case it set PENDING
                                    itself (FIFO: an ack raced it; count it as an edge)
    is_pending(v, port), is_masked(v, port), is_linked(v, port) -> bool
    set_pending(v, vcpu, port) -> int    Xen's set_pending on v's domain (no send checks)
    raise_virq(v, virq, vcpu) -> int     Xen raising a VIRQ of v's domain

Errors are not raised inside jitted code: send returns -errno (``errno.EINVAL`` for an invalid
or wrongly bound port, ``errno.ESRCH`` for a peer domain the table does not hold); a port
beyond the domain's limit or a vCPU it does not have makes the other functions do nothing and
return 0 / False (is_masked: True), where the Python Domain methods would raise EvtchnError.

Rules:

- Build views in the thread that uses them (they hold raw addresses and the owner id of the
  thread that takes the locks: two threads sharing one Views would be one lock owner), after the
  domains you reach exist: a domain created later, by any process, is not in the table until you
  call ``views()`` again.
- The views keep the host mapped while they live; ``host.close()`` by the creator unlinks the
  shared memory, after which no other process can attach, but existing mappings stay valid.
- Numba compiles your function including these kernels; with ``@njit(cache=True)`` on your
  side too, worker processes start without compiling. Numba does not see through to a change
  of evtchn in your function's cache entry: clear your cache when you upgrade evtchn.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import numpy.typing as npt
from numba import njit

from . import numba_kernels as _k
from ._numba_cache import refresh_cache_guard
from .owner import owner_id

if TYPE_CHECKING:
    from .domain import Domain

__all__ = [
    "Views",
    "views",
    "send",
    "send_many",
    "consume",
    "wait",
    "upcall_pending",
    "mask",
    "unmask",
    "is_pending",
    "is_masked",
    "is_linked",
    "set_pending",
    "raise_virq",
]


class Views(NamedTuple):
    """What a kernel needs to act as one domain: the host's domain table (int64, one row per
    domain), this domain's id, and the owner id of the thread that takes the locks
    (evtchn.owner.owner_id of the thread that built the views)."""

    table: npt.NDArray[np.int64]
    domid: int
    owner: int


_KEEP: dict[int, object] = {}  # id(table) -> host: the mapping outlives the table


def views(domain: Domain) -> Views:
    """Views of `domain` (an evtchn.Domain on any backend) for use inside @njit code."""
    host = domain.host
    host._check_open()
    host._sync()  # every domain of the host, so sends reach any peer
    ndom = host.ndomains
    table = np.zeros((max(ndom, domain.domid + 1), _k.NCOLS), np.int64)
    for domid in range(ndom):
        table[domid] = _k.table_row(host._dm(domid))
    key = id(table)
    _KEEP[key] = host
    weakref.finalize(table, _KEEP.pop, key, None)
    return Views(table, int(domain.domid), owner_id())


# The wrappers are inlined into the caller (inline="always"): the Views tuple is unpacked in
# the user's function and only integers reach the kernels, so no call passes an array.
# The annotations are for the type checker (numba's Dispatcher keeps the signature); numba
# ignores them and types each call from its arguments.


@njit(inline="always", cache=True)
def _tb(v: Views) -> np.int64:
    return np.int64(v.table.ctypes.data)


@njit(inline="always", cache=True)
def send(v: Views, port: int) -> int:
    """EVTCHNOP_send on v's domain: 1 for a new edge (PENDING 0 -> 1), 0 coalesced or
    dropped (unbound), -errno refused."""
    return _k._send(_tb(v), v.table.shape[0], v.domid, port, v.owner)


@njit(inline="always", cache=True)
def send_many(
    v: Views, ports: npt.NDArray[np.uint32], edges: npt.NDArray[np.uint8]
) -> tuple[int, int]:
    """send() each uint32 port; edges (uint8, as long as ports, or empty) gets 1 per new
    edge. Returns (n sent, errno of the refusal that stopped it or 0)."""
    return _k._send_many(
        _tb(v),
        v.table.shape[0],
        v.domid,
        np.int64(ports.ctypes.data),
        ports.shape[0],
        np.int64(edges.ctypes.data),
        edges.shape[0],
        v.owner,
    )


@njit(inline="always", cache=True)
def consume(v: Views, vcpu: int, out: npt.NDArray[np.uint32]) -> int:
    """The vCPU's upcall handler: fills out with the delivered ports and returns how many."""
    if not _k._vcpu_ok(_tb(v), v.domid, vcpu):
        return np.int64(0)
    return _k._consume(_tb(v), v.domid, vcpu, np.int64(out.ctypes.data), out.shape[0], v.owner)


@njit(inline="always", cache=True)
def wait(v: Views, vcpu: int, timeout_ns: int) -> bool:
    """Sleep on a futex until the vCPU has an upcall pending; False after timeout_ns (< 0: none)."""
    if not _k._vcpu_ok(_tb(v), v.domid, vcpu):
        return False
    return _k._wait(_tb(v), v.domid, vcpu, timeout_ns, v.owner, True)


@njit(inline="always", cache=True)
def upcall_pending(v: Views, vcpu: int) -> bool:
    """vcpu_info.evtchn_upcall_pending of the vCPU."""
    if not _k._vcpu_ok(_tb(v), v.domid, vcpu):
        return False
    return _k._upcall_pending(_tb(v), v.domid, vcpu)


@njit(inline="always", cache=True)
def mask(v: Views, port: int) -> None:
    """The guest's mask of `port`."""
    if _k._port_ok(_tb(v), v.domid, port):
        _k._guest_mask(_tb(v), v.domid, port)


@njit(inline="always", cache=True)
def unmask(v: Views, port: int) -> int:
    """The guest's unmask; 1 in the rare case Xen's unmask set PENDING itself (count it
    as an edge)."""
    if not _k._port_ok(_tb(v), v.domid, port):
        return np.int64(0)
    return _k._guest_unmask(_tb(v), v.domid, port, v.owner)


@njit(inline="always", cache=True)
def is_pending(v: Views, port: int) -> bool:
    """The port's PENDING bit (False beyond the domain's limit)."""
    return _k._port_ok(_tb(v), v.domid, port) and _k._is_pending(_tb(v), v.domid, port)


@njit(inline="always", cache=True)
def is_masked(v: Views, port: int) -> bool:
    """The port's mask (True beyond the domain's limit)."""
    return not _k._port_ok(_tb(v), v.domid, port) or _k._is_masked(_tb(v), v.domid, port)


@njit(inline="always", cache=True)
def is_linked(v: Views, port: int) -> bool:
    """FIFO: the event is on a queue (False for 2l and 3l)."""
    return _k._port_ok(_tb(v), v.domid, port) and _k._is_linked(_tb(v), v.domid, port)


@njit(inline="always", cache=True)
def set_pending(v: Views, vcpu: int, port: int) -> int:
    """Xen's set_pending on v's domain, without send's checks: 1 for a new edge."""
    if not (_k._vcpu_ok(_tb(v), v.domid, vcpu) and _k._port_ok(_tb(v), v.domid, port)):
        return np.int64(0)
    return _k._set_pending(_tb(v), v.domid, vcpu, port, v.owner)


@njit(inline="always", cache=True)
def raise_virq(v: Views, virq: int, vcpu: int) -> int:
    """Xen raising VIRQ `virq` of v's domain: 1 for a new edge, 0 if unbound or coalesced."""
    if not (_k._vcpu_ok(_tb(v), v.domid, vcpu) and 0 <= virq < _k.NR_VIRQS):
        return np.int64(0)
    return _k._raise_virq(_tb(v), v.domid, virq, vcpu, v.owner)


refresh_cache_guard(globals(), "numba.deps", _k.CACHE_DEPS)
