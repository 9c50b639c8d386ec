"""Batch binding: alloc_unbound and bind_interdomain for many ports in one call.

Xen has no batch hypercall: each element here has exactly the checks, errnos and effects of
the single op (Domain.alloc_unbound, Domain.bind_interdomain, which follow event_channel.c's
evtchn_alloc_unbound and evtchn_bind_interdomain). What the batch changes is the cost: the
event locks are taken once for the whole batch, the free ports are found in one scan of the
port table, and the port records are written with one vectorised store per field.

Atomicity: a batch binds all its elements or none. Every check is made first, under the event
locks (of this domain, and for bind_interdomain of the remote one, in domid order), and nothing
else changes a port's state without those locks, so once the checks pass no element can fail;
if one fails, the batch raises BatchError naming the first failing element (`.index`) with the
errno the single op would have returned there, and has changed nothing (the single op's
get_free_port grows valid_evtchns even for a bind it then refuses; a refused batch does not).
The writes are then made under the channel locks of every port they touch (taken in (domid,
port) order, the order of every control-plane path that holds several), and a KeyboardInterrupt
that lands among them is held until the batch is complete: a channel is never left half-bound.
"""

from __future__ import annotations

import errno as E
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from . import layout as L
from .errors import BatchError, EvtchnError
from .errors import as_int as _int
from .locks import Held

if TYPE_CHECKING:
    from .domain import Domain
    from .memory import DomainMemory

Ports = npt.NDArray[np.uint32]


def alloc_unbound_many(dom: Domain, remote_domid: Any, n: int | None) -> Ports:
    """`n` alloc_unbound(remote_domid) calls in a row, as one batch (see the module doc); with
    n None, remote_domid is a sequence and element i is alloc_unbound(remote_domid[i])."""
    if dom.host._closed:
        raise dom.host._closed_error()
    if n is None:
        rds = _int_list(remote_domid, "remote domids")
        n = len(rds)
    else:
        n = _count(n)
        rds = np.full(n, _int(remote_domid, "remote domid"), np.int64)
    bad_rd = np.flatnonzero((rds < 0) | (rds > 0xFFFF))
    first_bad = int(bad_rd[0]) if bad_rd.size else n
    rds = np.where(rds == L.DOMID_SELF, dom.domid, rds)
    with dom._domains_locked(dom.domid):
        ports, hint = _free_ports(dom, min(n, first_bad))
        if first_bad < n and len(ports) >= first_bad:  # the single op checks the domid first
            rd = int(rds[first_bad])
            raise BatchError(
                E.EINVAL, f"element {first_bad}: remote domid {rd} is not a domid_t", first_bad
            )
        if len(ports) < n:
            raise BatchError(E.ENOSPC, _no_space(dom, len(ports)), len(ports))
        offs = _claim(dom._dm, ports, hint)

        def commit() -> None:
            dm = dom._dm
            dm.u16[(offs + L.P_REMOTE_DOM) // 2] = rds
            dm.u32[(offs + L.P_REMOTE_PORT) // 4] = 0
            _init_ports(dm, offs, L.ECS_UNBOUND)

        with Held(dom._k, _chan_addrs([(dom._dm, ports)])):
            _uninterrupted([commit], lambda f: f())
        _affinity(dom, ports)
    _guest_bind(dom, ports)
    return ports


def bind_interdomain_many(dom: Domain, remote_domid: int, remote_ports: Any) -> Ports:
    """bind_interdomain(remote_domid, p) for each p of `remote_ports` in order, as one batch
    (see the module doc); returns the local ports, element by element."""
    rdom = dom._remote(remote_domid)
    rdm = dom.host._dm(rdom)
    rports = _port_list(remote_ports)
    n = len(rports)
    with dom._domains_locked(dom.domid, rdom):
        ports, hint = _free_ports(dom, n)
        bad, why = _first_bad_remote(dom, rdm, rports)
        if len(ports) < n and len(ports) <= bad:  # the single op looks for a port first
            raise BatchError(E.ENOSPC, _no_space(dom, len(ports)), len(ports))
        if bad < n:
            raise BatchError(E.EINVAL, f"element {bad}: {why}", bad)
        offs = _claim(dom._dm, ports, hint)
        roffs = rdm.layout.port(0) + L.PORT_SIZE * rports.astype(np.int64)
        k, domid = dom._k, dom.domid

        def write_ports() -> None:
            dm = dom._dm
            dm.u16[(offs + L.P_REMOTE_DOM) // 2] = rdom
            dm.u32[(offs + L.P_REMOTE_PORT) // 4] = rports
            _init_ports(dm, offs, L.ECS_INTERDOMAIN)
            rdm.u16[(roffs + L.P_REMOTE_DOM) // 2] = domid
            rdm.u32[(roffs + L.P_REMOTE_PORT) // 4] = ports
            rdm.u8[roffs + L.P_STATE] = L.ECS_INTERDOMAIN

        with Held(k, _chan_addrs([(dom._dm, ports), (rdm, rports)])):
            _uninterrupted([write_ports], lambda f: f())
            # The new local port is always set pending (covers sends made while unbound).
            _uninterrupted(ports.tolist(), lambda p: k.set_pending(domid, 0, p))
        _affinity(dom, ports)
    _guest_bind(dom, ports)
    return ports


# -- the steps -------------------------------------------------------------------------------
def _count(n: Any) -> int:
    count = _int(n, "count")
    if count < 0:
        raise EvtchnError(E.EINVAL, f"cannot allocate {count} ports")
    return count


def _port_list(ports: Any) -> npt.NDArray[np.int64]:
    """The remote ports as int64 (values beyond a port number stay, to be refused in order
    with EINVAL as the single op refuses them); only integers are ports."""
    return _int_list(ports, "remote ports")


def _int_list(values: Any, what: str) -> npt.NDArray[np.int64]:
    """A 1-D sequence of integers as int64 (out-of-range values kept, to be refused in order
    as the single op refuses them); floats, bools, strings are EINVAL."""
    if isinstance(values, (str, bytes)) or np.ndim(values) != 1:
        raise EvtchnError(E.EINVAL, f"{what} must be a 1-D sequence of integers, not {values!r}")
    arr = np.asarray(values)
    if arr.size == 0:
        return np.empty(0, np.int64)
    if arr.dtype.kind == "O":
        arr = np.asarray([_int(p, what) for p in values], np.int64)
    if arr.dtype.kind not in "iu":
        raise EvtchnError(E.EINVAL, f"{what} must be a 1-D sequence of integers, not {arr.dtype}")
    if arr.size and (arr.dtype == np.uint64 and int(arr.max()) >= 1 << 63):
        arr = np.minimum(arr, np.uint64(1 << 62))  # refused anyway; keep it an int64
    return arr.astype(np.int64)


def _free_ports(dom: Domain, n: int) -> tuple[Ports, int]:
    """The ports `n` successive get_free_port calls would hand out (each taken before the
    next looks), and the allocation hint they would leave (Domain._get_free_port); fewer than
    `n` if the domain runs out. The caller holds the event lock."""
    dm, k = dom._dm, dom._k
    start, valid = dm.hdr(L.H_ALLOC_HINT), min(dm.hdr(L.H_VALID), dm.max_ports)
    base = dm.layout.port(0) + L.P_STATE
    lo = min(start, valid)
    states = dm.u8[base + lo * L.PORT_SIZE : base + valid * L.PORT_SIZE : L.PORT_SIZE]
    got: list[int] = []
    skipped: int | None = None  # the lowest FREE but LINKED port: the hint stays there
    for p in (lo + np.flatnonzero(states == L.ECS_FREE)).tolist():
        if len(got) == n:
            break
        if k.is_linked(dom.domid, p):
            skipped = p if skipped is None else skipped
        else:
            got.append(p)
    beyond = max(start, valid)
    more = min(n - len(got), dm.max_ports - beyond)
    ports = np.concatenate([np.array(got, np.uint32), np.arange(beyond, beyond + max(0, more))])
    ports = ports.astype(np.uint32)
    hint = start if not len(ports) else int(ports[-1]) + 1
    if skipped is not None:
        hint = min(hint, skipped)
    return ports, hint


def _no_space(dom: Domain, bound: int) -> str:
    dm = dom._dm
    return (
        f"element {bound}: no free port in domain {dom.domid}: all {dm.max_ports - 1} usable "
        f"ports of its {dom.abi} limit ({dm.max_ports}) would be in use"
    )


def _first_bad_remote(
    dom: Domain, rdm: DomainMemory, rports: npt.NDArray[np.int64]
) -> tuple[int, str]:
    """(index of the first remote port the single op would refuse with EINVAL, why); index
    len(rports) if none. A port named twice is refused the second time: the first bind made
    it interdomain. The caller holds both event locks."""
    rvalid = rdm.hdr(L.H_VALID)
    inrange = (rports >= 0) & (rports < rvalid)
    safe = np.where(inrange, rports, 0)
    offs = rdm.layout.port(0) + L.PORT_SIZE * safe
    state = rdm.u8[offs + L.P_STATE]
    allowed = rdm.u16[(offs + L.P_REMOTE_DOM) // 2]
    first = np.zeros(len(rports), bool)
    first[np.unique(rports, return_index=True)[1]] = True
    ok = inrange & (state == L.ECS_UNBOUND) & (allowed == dom.domid) & first
    bad = np.flatnonzero(~ok)
    if not bad.size:
        return len(rports), ""
    i = int(bad[0])
    rport, rdom = int(rports[i]), rdm.domid
    if not inrange[i]:
        return i, f"remote port {rport} is not valid in domain {rdom}"
    if not first[i]:
        return i, f"remote port {rport} of domain {rdom} is interdomain (an earlier element)"
    if state[i] != L.ECS_UNBOUND:
        return i, f"remote port {rport} of domain {rdom} is {L.STATUS_NAMES[int(state[i])]}"
    return i, (
        f"remote port {rport} of domain {rdom} accepts a bind from domain {int(allowed[i])} only"
    )


def _claim(dm: DomainMemory, ports: Ports, hint: int) -> npt.NDArray[np.int64]:
    """What get_free_port leaves for the ports: valid_evtchns grown by buckets to cover them
    (published before any is bound), the allocation hint; returns the ports' record offsets."""
    if len(ports):
        top = int(ports.max())
        if top >= dm.hdr(L.H_VALID):
            bucket = L.EVTCHNS_PER_BUCKET
            dm.set_hdr(L.H_VALID, (top // bucket + 1) * bucket)
        dm.set_hdr(L.H_ALLOC_HINT, hint)
    return dm.layout.port(0) + L.PORT_SIZE * ports.astype(np.int64)


def _init_ports(dm: DomainMemory, offs: npt.NDArray[np.int64], state: int) -> None:
    """evtchn_port_init for each port (notify vCPU 0, FIFO priority 7), then its state. The
    caller holds the ports' channel locks."""
    dm.u16[(offs + L.P_NOTIFY_VCPU) // 2] = 0
    dm.u8[offs + L.P_PRIORITY] = L.FIFO_PRIORITY_DEFAULT
    dm.u8[offs + L.P_STATE] = state


def _chan_addrs(groups: list[tuple[DomainMemory, Any]]) -> list[int]:
    """The channel-lock addresses of every (domain, ports) group, in (domid, port) order."""
    by_dom: dict[int, tuple[DomainMemory, list[Any]]] = {}
    for dm, ports in groups:
        by_dom.setdefault(dm.domid, (dm, []))[1].append(np.asarray(ports, np.int64))
    addrs: list[int] = []
    for domid in sorted(by_dom):
        dm, parts = by_dom[domid]
        ports = np.unique(np.concatenate(parts))  # sorted
        base = dm.seg.address + dm.layout.port(0) + L.P_LOCK
        addrs += (base + L.PORT_SIZE * ports).tolist()
    return addrs


def _affinity(dom: Domain, ports: Ports) -> None:
    """Linux binds each port to vCPU 0 (bind_evtchn_to_cpu); 2l/3l only. Under the event
    lock, as in the single op."""
    if dom._dm.abi != L.ABI_FIFO:
        _uninterrupted(ports.tolist(), lambda p: dom._set_affinity(p, 0))


def _guest_bind(dom: Domain, ports: Ports) -> None:
    """The guest's side, as after each single bind: grow the FIFO event array to cover the
    ports, then enable (unmask) each."""
    if not len(ports):
        return
    dm = dom._dm
    if dm.abi == L.ABI_FIFO and dm.hdr(L.H_AUTO_EXPAND):
        dom._expand_to(int(ports.max()))
    k, domid = dom._k, dom.domid
    _uninterrupted(ports.tolist(), lambda p: k.guest_unmask(domid, p))


def _uninterrupted(items: list[Any], step: Callable[[Any], object]) -> None:
    """step(item) for every item, in order, even when a KeyboardInterrupt lands in between:
    the rest are done, then it is raised. The item in flight when it landed is done again
    (every step here is idempotent, except set_pending, which can then raise one more event
    on a port that was consumed meanwhile, as one more send would)."""
    i, caught = 0, None
    while i < len(items):
        try:
            while i < len(items):
                step(items[i])
                i += 1
        except KeyboardInterrupt as exc:
            caught = caught or exc
    if caught is not None:
        raise caught
