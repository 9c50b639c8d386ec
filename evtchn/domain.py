"""Domain: the hypercalls one domain makes (EVTCHNOP_*) and its guest kernel's event code.

Hypercalls follow xen/common/event_channel.c (checks, errnos, locking order); the guest side
follows Linux drivers/xen/events (a bound port is enabled, i.e. unmasked, as after
request_irq; bind_vcpu is xen_rebind_evtchn_to_cpu: mask, EVTCHNOP_bind_vcpu, move the
per-CPU binding, unmask; close is unbind_from_irqhandler: mask, EVTCHNOP_close).

Every lock taken here is scoped by evtchn.locks.Held: released on every way out, also on
KeyboardInterrupt. Every call on a Domain of a closed Host raises EvtchnError(EBADF): the
argument checks that each call makes first look at the host's closed flag.
"""

from __future__ import annotations

import errno as E
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import numpy.typing as npt

from . import layout as L
from .errors import EvtchnError
from .errors import as_int as _int
from .locks import Held
from .results import PollResult, PortStatus

if TYPE_CHECKING:
    from .host import Host
    from .memory import DomainMemory

Region = tuple[str, int, int]
"""Where a guest-visible region lies: (segment name in /dev/shm, byte offset, size)."""

_CONSUME_CHUNK = 65536
_NO_PORTS = np.empty(0, np.uint32)  # what consume() returns when nothing was delivered
_NO_PORTS.flags.writeable = False
_U32 = np.dtype(np.uint32)


def _port_array(ports: Any) -> npt.NDArray[np.uint32]:
    """send_many's ports as a contiguous uint32 array, or EvtchnError(EINVAL) naming what is
    wrong: only integers are ports."""
    if isinstance(ports, np.ndarray):
        arr = ports
    else:
        if isinstance(ports, (str, bytes)):
            raise EvtchnError(E.EINVAL, f"send_many takes a sequence of ports, not {ports!r}")
        arr = np.asarray(ports)
        if arr.dtype.kind in "iu" and any(isinstance(p, (bool, np.bool_)) for p in ports):
            raise EvtchnError(E.EINVAL, "send_many takes integer ports, not bools")
    if arr.dtype.kind not in "iu":
        raise EvtchnError(
            E.EINVAL,
            f"send_many takes integer ports, not {arr.dtype} "
            f"({'bools' if arr.dtype.kind == 'b' else 'non-integers'} would be truncated)",
        )
    if arr.ndim != 1:
        raise EvtchnError(E.EINVAL, f"send_many takes a 1-D array of ports, not shape {arr.shape}")
    if arr.dtype != np.uint32:
        if arr.size and (arr.min() < 0 or arr.max() >= 1 << 32):
            bad = int(arr[(arr < 0) | (arr >= 1 << 32)][0])
            raise EvtchnError(E.EINVAL, f"port {bad} is not a valid port number")
        arr = arr.astype(np.uint32)
    return np.ascontiguousarray(arr)


class Domain:
    """A handle on domain `domid` of a host; cheap, pickles by (host name, domid)."""

    def __init__(self, host: Host, domid: int):
        #: The Host this domain lives on.
        self.host = host
        #: The domain's id: 0 .. host.ndomains-1, in creation order.
        self.domid = domid
        self._dm = host._dm(domid)
        self._k = host._k
        self._base = self._dm.seg.address
        self._nvcpus = self._dm.vcpus
        # consume()'s per-vCPU buffers: a call pops the vCPU's (so a concurrent call in
        # another thread makes its own) and puts it back; consume_one's are one port long.
        self._bufs: dict[int, npt.NDArray[np.uint32]] = {}
        self._ones: dict[int, npt.NDArray[np.uint32]] = {}

    def __reduce__(self) -> tuple[Callable[[str, str, int], Domain], tuple[str, str, int]]:
        return (_attach_domain, (self.host.name, self.host.backend, self.domid))

    def __repr__(self) -> str:
        return (
            f"<evtchn.Domain {self.domid} abi={self.abi} vcpus={self.vcpus} "
            f"max_ports={self.max_ports} on {self.host.name}>"
        )

    # -- configuration -------------------------------------------------------------------------
    @property
    def abi(self) -> str:
        """The event-channel ABI: "fifo", "2l" or "3l"."""
        return L.ABI_BY_CODE[self._dm.abi]

    @property
    def vcpus(self) -> int:
        """The number of vCPUs (0 .. vcpus-1)."""
        return self._dm.vcpus

    @property
    def word_bits(self) -> int:
        """xen_ulong_t's width: 64, or 32 for the x86-32 compat layout."""
        return self._dm.word_bits

    @property
    def link_bits(self) -> int:
        """FIFO: the width of an event word's LINK field (17 as in Xen)."""
        return self._dm.link_bits

    @property
    def max_ports(self) -> int:
        """The effective port limit: ports 1 .. max_ports-1 can be allocated."""
        return self._dm.max_ports

    @property
    def valid_ports(self) -> int:
        """Xen's valid_evtchns: grows by buckets of 64 as ports are allocated, never shrinks."""
        if self.host._closed:
            raise self.host._closed_error()
        return self._dm.hdr(L.H_VALID)

    # -- argument checks (each first refuses a closed host: one flag read) ---------------------
    def _vcpu(self, vcpu: int) -> int:
        if self.host._closed:
            raise self.host._closed_error()
        v = _int(vcpu, "vcpu")
        if not 0 <= v < self.vcpus:
            raise EvtchnError(
                E.ENOENT, f"domain {self.domid} has no vcpu {v} (vcpus 0..{self.vcpus - 1})"
            )
        return v

    def _valid_port(self, port: int) -> int:
        """port_is_valid(): below valid_evtchns, else EINVAL."""
        if self.host._closed:
            raise self.host._closed_error()
        p = _int(port, "port")
        valid = self.valid_ports
        if not 0 <= p < valid:
            raise EvtchnError(
                E.EINVAL,
                f"port {p} is not valid in domain {self.domid} "
                f"(ports below {valid} are; the {self.abi} limit is "
                f"{self.max_ports})",
            )
        return p

    def _guest_port(self, port: int) -> int:
        """A port the guest may address in its shared bitmaps or event array."""
        if self.host._closed:
            raise self.host._closed_error()
        p = _int(port, "port")
        if not 0 <= p < self.max_ports:
            raise EvtchnError(
                E.EINVAL,
                f"port {p} is beyond domain {self.domid}'s limit of "
                f"{self.max_ports} ports ({self.abi})",
            )
        return p

    def _remote(self, remote_domid: int) -> int:
        if self.host._closed:
            raise self.host._closed_error()
        d = _int(remote_domid, "domid")
        if d == L.DOMID_SELF:
            return self.domid
        if not 0 <= d < self.host.ndomains:
            raise EvtchnError(E.ESRCH, f"no domain {d} on host {self.host.name!r}")
        return d

    # -- locks (Xen: event_lock per domain, a lock per channel) --------------------------------
    def _domains_locked(self, *domids: int) -> Held:
        """The event locks of `domids`, in domid order (Xen: the lower domain first)."""
        return Held(
            self._k, [self.host._dm(d).seg.address + L.H_EVENT_LOCK for d in sorted(set(domids))]
        )

    def _chan_addr(self, domid: int, port: int) -> int:
        dm = self.host._dm(domid)
        return dm.seg.address + dm.layout.port(port) + L.P_LOCK

    def _chans_locked(self, *chans: tuple[int, int], reader: bool = False) -> Held:
        """The channel locks of the (domid, port) pairs `chans`, in that order (writer, or
        read-type with `reader`)."""
        return Held(self._k, [self._chan_addr(*c) for c in sorted(set(chans))], reader)

    # -- port allocation (get_free_port) -------------------------------------------------------
    def _get_free_port(self) -> int:
        """The lowest FREE port that is not still LINKED (get_free_port); the caller holds the
        event lock. Buckets up to it are allocated (valid_evtchns grows) even if the caller
        then fails and leaves it FREE, as in Xen. H_ALLOC_HINT: no FREE port lies below it, so
        the scan starts there; it moves past the port once the port is taken (_init_port)."""
        dm = self._dm
        hint, port = None, None
        for p in self._free_ports_from(dm.hdr(L.H_ALLOC_HINT)):
            if hint is None:
                hint = p
            if p >= dm.hdr(L.H_VALID) or not self._k.is_linked(self.domid, p):
                port = p
                break
        if port is None:
            raise EvtchnError(
                E.ENOSPC,
                f"no free port in domain {self.domid}: all "
                f"{dm.max_ports - 1} usable ports of its "
                f"{self.abi} limit ({dm.max_ports}) are in use",
            )
        assert hint is not None  # port was found, so a FREE port was seen
        dm.set_hdr(L.H_ALLOC_HINT, hint)  # the lowest FREE port seen
        valid = dm.hdr(L.H_VALID)
        if port >= valid:  # allocate buckets; publish the size last
            bucket = L.EVTCHNS_PER_BUCKET
            dm.set_hdr(L.H_VALID, (port // bucket + 1) * bucket)
        return port

    def _free_ports_from(self, start: int) -> Iterator[int]:
        """FREE ports >= start in increasing order (ports beyond valid_evtchns are free);
        vectorised over the port table, one chunk at a time."""
        dm = self._dm
        stride, chunk = L.PORT_SIZE, 4096
        base = dm.layout.port(0) + L.P_STATE
        # A bucket may reach past max_ports (not a multiple of 64): those ports are never
        # handed out (Xen's get_free_port: port > max_evtchn_port is ENOSPC).
        valid = min(dm.hdr(L.H_VALID), dm.max_ports)
        for lo in range(start, valid, chunk):
            hi = min(lo + chunk, valid)
            states = dm.u8[base + lo * stride : base + hi * stride : stride]
            yield from (lo + int(i) for i in np.flatnonzero(states == L.ECS_FREE))
        yield from range(max(start, valid), dm.max_ports)

    def _free_port(self, port: int) -> int:
        """evtchn_free: clear PENDING, state FREE, notify vCPU 0 (mask, LINKED untouched)."""
        dm = self._dm
        destroyed = self._k.clear_pending(self.domid, port)
        dm.set_port_u8(port, L.P_STATE, L.ECS_FREE)
        dm.set_port_u16(port, L.P_NOTIFY_VCPU, 0)
        if port < dm.hdr(L.H_ALLOC_HINT):
            dm.set_hdr(L.H_ALLOC_HINT, port)
        return destroyed

    def _init_port(self, port: int, state: int, vcpu: int = 0) -> None:
        """Bind the port: evtchn_port_init (FIFO: evtchn_fifo_init sets priority 7) and its
        state; the allocation hint moves past it."""
        dm = self._dm
        dm.set_port_u16(port, L.P_NOTIFY_VCPU, vcpu)
        dm.set_port_u8(port, L.P_PRIORITY, L.FIFO_PRIORITY_DEFAULT)
        dm.set_port_u8(port, L.P_STATE, state)
        if dm.hdr(L.H_ALLOC_HINT) == port:
            dm.set_hdr(L.H_ALLOC_HINT, port + 1)

    def _alloc(self, state: int, vcpu: int = 0, fill: Callable[[int], None] | None = None) -> int:
        with self._domains_locked(self.domid):
            port = self._get_free_port()
            with self._chans_locked((self.domid, port)):
                if fill:
                    fill(port)
                self._init_port(port, state, vcpu)
            self._set_affinity(port, vcpu)
        return port

    # -- the guest's side of binding (Linux) ---------------------------------------------------
    def _guest_bind(self, port: int) -> None:
        """Expand the FIFO array to cover the port, then enable (unmask) it. (The port was
        bound to its vCPU's cpu_evtchn_mask under the event lock, at allocation.)"""
        dm = self._dm
        if dm.abi == L.ABI_FIFO and dm.hdr(L.H_AUTO_EXPAND):
            self._expand_to(port)
        self.unmask(port)

    def _expand_to(self, port: int) -> None:
        """Add event-array pages until `port` has a word; under the event lock, so two
        binders never both add a page for the same port."""
        dm = self._dm
        with self._domains_locked(self.domid):
            while dm.array_pages() * L.FIFO_WORDS_PER_PAGE <= port:
                r = self._k.expand_array(self.domid)
                if r < 0:
                    raise EvtchnError(
                        -r, f"the event array of domain {self.domid} cannot grow to port {port}"
                    )

    def _set_affinity(self, port: int, vcpu: int) -> None:
        """Linux bind_evtchn_to_cpu: the port's bit moves to `vcpu`'s cpu_evtchn_mask.
        Callers hold the event lock (Linux: irq_mapping_update_lock), so two rebinds or a
        close and a re-bind of the same port cannot interleave their updates."""
        dm, w = self._dm, self._dm.word_bits
        if dm.abi == L.ABI_FIFO:
            return
        bit = port % w
        for v in range(dm.vcpus):  # atomics: other ports share these words
            idx = dm.cpumask_word_index(v, port // w)
            address = self._base + idx * (w // 8)
            if v == vcpu:
                self._k.set_bit(address, bit, w)
            elif int(dm.words[idx]) >> bit & 1:
                self._k.clear_bit(address, bit, w)

    # -- EVTCHNOP_alloc_unbound, bind_interdomain, bind_virq, bind_ipi -------------------------
    def alloc_unbound(self, remote_domid: int) -> int:
        """A port waiting for `remote_domid` (DOMID_SELF: this domain) to bind to it. As Xen's
        evtchn_alloc_unbound, the remote domid is stored unchecked: any domid_t, also one no
        domain has (then nobody can bind the port)."""
        if self.host._closed:
            raise self.host._closed_error()
        rd = _int(remote_domid, "remote domid")
        if not 0 <= rd <= 0xFFFF:
            raise EvtchnError(E.EINVAL, f"remote domid {rd} is not a domid_t (16 bits)")
        if rd == L.DOMID_SELF:
            rd = self.domid

        def fill(port: int) -> None:
            self._dm.set_port_u16(port, L.P_REMOTE_DOM, rd)
            self._dm.set_port_u32(port, L.P_REMOTE_PORT, 0)

        port = self._alloc(L.ECS_UNBOUND, 0, fill)
        self._guest_bind(port)
        return port

    def bind_interdomain(self, remote_domid: int, remote_port: int) -> int:
        """Connect a fresh local port to `remote_port`, which `remote_domid` allocated for us.
        The new local port is always set pending (covers sends made while it was unbound).
        As Xen's evtchn_bind_interdomain, the local port is allocated (get_free_port, which
        grows the port buckets) before the remote port is checked: with no port free that is
        ENOSPC even for a bad remote port, and a refused bind still grows valid_evtchns."""
        rdom = self._remote(remote_domid)
        rdm = self.host._dm(rdom)
        rport = _int(remote_port, "remote port")
        with self._domains_locked(self.domid, rdom):
            lport = self._get_free_port()
            if not 0 <= rport < rdm.hdr(L.H_VALID):
                raise EvtchnError(E.EINVAL, f"remote port {rport} is not valid in domain {rdom}")
            if rdm.state(rport) != L.ECS_UNBOUND:
                raise EvtchnError(
                    E.EINVAL,
                    f"remote port {rport} of domain {rdom} is "
                    f"{L.STATUS_NAMES[rdm.state(rport)]}, not unbound",
                )
            allowed = rdm.port_u16(rport, L.P_REMOTE_DOM)
            if allowed != self.domid:
                raise EvtchnError(
                    E.EINVAL,
                    f"remote port {rport} of domain {rdom} accepts a "
                    f"bind from domain {allowed} only",
                )
            with self._chans_locked((self.domid, lport), (rdom, rport)):
                self._dm.set_port_u16(lport, L.P_REMOTE_DOM, rdom)
                self._dm.set_port_u32(lport, L.P_REMOTE_PORT, rport)
                self._init_port(lport, L.ECS_INTERDOMAIN, 0)
                rdm.set_port_u16(rport, L.P_REMOTE_DOM, self.domid)
                rdm.set_port_u32(rport, L.P_REMOTE_PORT, lport)
                rdm.set_port_u8(rport, L.P_STATE, L.ECS_INTERDOMAIN)
                self._k.set_pending(self.domid, 0, lport)
            self._set_affinity(lport, 0)
        self._guest_bind(lport)
        return lport

    def alloc_unbound_many(
        self, remote_domid: int | npt.ArrayLike, n: int | None = None
    ) -> npt.NDArray[np.uint32]:
        """`n` alloc_unbound(remote_domid) calls in one: the ports, in the order the calls
        would have returned them; with `n` None, `remote_domid` is a sequence and element i
        is alloc_unbound(remote_domid[i]). All or none: if the domain has fewer than `n` free
        ports, BatchError(ENOSPC) with ``.index`` the first element that found none (EINVAL
        for a remote domid that is not a domid_t), and no port is allocated. Takes this
        domain's event lock once for the batch (evtchn.batch)."""
        from .batch import alloc_unbound_many

        return alloc_unbound_many(self, remote_domid, n)

    def bind_interdomain_many(
        self, remote_domid: int, remote_ports: npt.ArrayLike
    ) -> npt.NDArray[np.uint32]:
        """bind_interdomain(remote_domid, p) for each p of `remote_ports`, in one call: the
        local ports, element by element. All or none: the first element the single op would
        refuse (ENOSPC, EINVAL; ESRCH for the domain) raises BatchError with that errno and
        ``.index``, and nothing is bound. Takes both domains' event locks once for the batch,
        in domid order (evtchn.batch)."""
        from .batch import bind_interdomain_many

        return bind_interdomain_many(self, remote_domid, remote_ports)

    def bind_virq(self, virq: int, vcpu: int = 0) -> int:
        """Bind VIRQ `virq` (per-vCPU ones on `vcpu`; others on vCPU 0 only)."""
        if self.host._closed:
            raise self.host._closed_error()
        v_ = _int(virq, "virq")
        if not 0 <= v_ < L.NR_VIRQS:
            raise EvtchnError(E.EINVAL, f"virq {v_} is out of range (0..{L.NR_VIRQS - 1})")
        vc = _int(vcpu, "vcpu")
        if v_ not in L.VIRQ_PER_VCPU and vc != 0:
            raise EvtchnError(E.EINVAL, f"virq {v_} is not per-vCPU: bind it on vcpu 0, not {vc}")
        vc = self._vcpu(vc)
        global_virq = v_ not in L.VIRQ_PER_VCPU and v_ not in L.VIRQ_PER_DOMAIN
        if global_virq and self.domid != L.HARDWARE_DOMID:
            raise EvtchnError(
                E.EBUSY,
                f"global virq {v_} is handled by domain {L.HARDWARE_DOMID}, not {self.domid}",
            )
        with self._domains_locked(self.domid):
            if self._dm.virq_port(vc, v_):
                raise EvtchnError(
                    E.EEXIST,
                    f"virq {v_} is already bound on vcpu {vc} (port {self._dm.virq_port(vc, v_)})",
                )
            port = self._get_free_port()
            with self._chans_locked((self.domid, port)):
                self._dm.set_port_u32(port, L.P_REMOTE_PORT, v_)
                self._init_port(port, L.ECS_VIRQ, vc)
            self._dm.set_virq_port(vc, v_, port)
            self._set_affinity(port, vc)
        self._guest_bind(port)
        return port

    def bind_ipi(self, vcpu: int = 0) -> int:
        """A port that this domain's send() raises on `vcpu` of this same domain."""
        vc = self._vcpu(vcpu)
        port = self._alloc(L.ECS_IPI, vc)
        self._guest_bind(port)
        return port

    # -- EVTCHNOP_close ------------------------------------------------------------------------
    def close(self, port: int) -> int:
        """Close `port` as a Linux guest unbinds it (unbind_from_irqhandler): free_irq shuts the
        IRQ down, which masks the port (irq_shutdown -> disable_dynirq -> mask_evtchn), then
        EVTCHNOP_close; the mask stays set. An interdomain peer goes back to unbound, waiting
        for us. Returns 1 if the port was pending (Xen clears it: that event is never
        delivered), else 0."""
        p = self._valid_port(port)
        if self._dm.state(p) > L.ECS_RESERVED:  # Linux only unbinds what it bound
            self.mask(p)
        return self._close_port(p)

    def _close_port(self, p: int) -> int:
        """EVTCHNOP_close itself (__evtchn_close): under this domain's event lock, and for an
        interdomain port its peer's too, retaken in domid order (the port may change
        meanwhile: then look again)."""
        dm = self._dm
        while True:
            with self._domains_locked(self.domid):
                state = dm.state(p)
                rdom = self.domid
                if state == L.ECS_INTERDOMAIN:
                    rdom = dm.port_u16(p, L.P_REMOTE_DOM)
                if rdom == self.domid:
                    return self._close_locked(p, state)
            with self._domains_locked(self.domid, rdom):
                if dm.state(p) == L.ECS_INTERDOMAIN and dm.port_u16(p, L.P_REMOTE_DOM) == rdom:
                    return self._close_locked(p, L.ECS_INTERDOMAIN)

    def _close_locked(self, p: int, state: int) -> int:
        dm = self._dm
        if state in (L.ECS_FREE, L.ECS_RESERVED):
            raise EvtchnError(E.EINVAL, f"port {p} of domain {self.domid} is not bound")
        chans = [(self.domid, p)]
        if state == L.ECS_INTERDOMAIN:
            rdom, rport = dm.port_u16(p, L.P_REMOTE_DOM), dm.port_u32(p, L.P_REMOTE_PORT)
            chans.append((rdom, rport))
        with self._chans_locked(*chans):
            if state == L.ECS_VIRQ:
                virq = dm.port_u32(p, L.P_REMOTE_PORT)
                vc = dm.notify_vcpu(p) if virq in L.VIRQ_PER_VCPU else 0
                if dm.virq_port(vc, virq) == p:
                    dm.set_virq_port(vc, virq, 0)
            elif state == L.ECS_INTERDOMAIN:
                rdm = self.host._dm(rdom)
                rdm.set_port_u16(rport, L.P_REMOTE_DOM, self.domid)
                rdm.set_port_u8(rport, L.P_STATE, L.ECS_UNBOUND)
            destroyed = self._free_port(p)
        self._set_affinity(p, 0)  # Linux resets the affinity (R4)
        return destroyed

    # -- EVTCHNOP_send and friends -------------------------------------------------------------
    def send(self, port: int) -> int:
        """Raise the event: on the peer of an interdomain port, or on this IPI port.
        A send on an unbound port is dropped silently, as Xen does. Returns 1 if the send
        set PENDING 0 -> 1 (a new event), 0 if it coalesced or was dropped."""
        if self.host._closed or type(port) is not int:  # the checks only when needed
            self._check_open()
            port = _int(port, "port")
        r: int = self._k.send(self.domid, port)
        return r if r >= 0 else self._send_refused(port, r)

    def _send_refused(self, port: int, r: int) -> int:
        """A peer this process has not mapped yet (the kernel's -ESRCH: a domain created by
        another process since): map the host's domains and send again; else the error."""
        if r == -E.ESRCH:
            self.host._sync()
            r = self._k.send(self.domid, port)
            if r >= 0:
                return r
        raise self._send_error(port, -r)

    def _check_open(self) -> None:
        if self.host._closed:
            raise self.host._closed_error()

    def send_many(self, ports: npt.ArrayLike, edges: npt.NDArray[np.uint8] | None = None) -> int:
        """send() each port in order without a Python call per event. `edges`, if given, is a
        uint8 array that receives 1 where that send set PENDING 0 -> 1 (a new event) and 0
        where it coalesced or was dropped. On a refused port, the sends before it stand and
        EvtchnError names the index. `ports` is an integer numpy array or a sequence of ints:
        floats, bools and other objects are refused (numpy would make port 4.9 port 4)."""
        arr = _port_array(ports)
        if edges is not None and (edges.dtype != np.uint8 or len(edges) < len(arr)):
            raise ValueError("edges must be a uint8 array at least as long as ports")
        self._check_open()
        n, err = self._k.send_many(self.domid, arr, edges)
        if err == E.ESRCH:  # a peer not mapped here yet: map, then go on from the refused one
            self.host._sync()
            m, err = self._k.send_many(self.domid, arr[n:], None if edges is None else edges[n:])
            n += m
        if err:
            exc = self._send_error(int(arr[n]), err)
            raise EvtchnError(
                err,
                f"send_many stopped at index {n} (the {n} sends before it "
                f"took effect): {str(exc.strerror).split(': ', 1)[-1]}",
            )
        return n

    def _send_error(self, port: int, code: int) -> EvtchnError:
        if not 0 <= port < self.valid_ports:
            return EvtchnError(
                code,
                f"port {port} is not valid in domain {self.domid} "
                f"(ports below {self.valid_ports} are)",
            )
        state = L.STATUS_NAMES[self._dm.state(port)]
        return EvtchnError(
            code,
            f"cannot send on port {port} of domain {self.domid}: it is "
            f"{state} (send needs an interdomain, ipi or unbound port)",
        )

    def raise_virq(self, virq: int, vcpu: int = 0) -> None:
        """What Xen does when VIRQ `virq` fires (send_guest_vcpu_virq / _domain_virq): a
        no-op when nothing is bound to it."""
        if self.host._closed:
            raise self.host._closed_error()
        v_ = _int(virq, "virq")
        if not 0 <= v_ < L.NR_VIRQS:
            raise EvtchnError(E.EINVAL, f"virq {v_} is out of range (0..{L.NR_VIRQS - 1})")
        self._k.raise_virq(self.domid, v_, self._vcpu(vcpu))

    # -- EVTCHNOP_status, bind_vcpu, set_priority, unmask, reset, expand_array ---------------
    def status(self, port: int) -> PortStatus:
        """EVTCHNOP_status: the port's state, notify vCPU, peer or VIRQ, FIFO priority."""
        p = self._valid_port(port)
        dm = self._dm
        state = dm.state(p)
        name = L.STATUS_NAMES[state]
        prio = dm.port_u8(p, L.P_PRIORITY) if dm.abi == L.ABI_FIFO else None
        fields: dict[str, Any] = dict(state=name, vcpu=dm.notify_vcpu(p), priority=prio)
        if state == L.ECS_UNBOUND:
            fields["remote_domid"] = dm.port_u16(p, L.P_REMOTE_DOM)
        elif state == L.ECS_INTERDOMAIN:
            fields["remote_domid"] = dm.port_u16(p, L.P_REMOTE_DOM)
            fields["remote_port"] = dm.port_u32(p, L.P_REMOTE_PORT)
        elif state == L.ECS_VIRQ:
            fields["virq"] = dm.port_u32(p, L.P_REMOTE_PORT)
        return PortStatus(**fields)

    def bind_vcpu(self, port: int, vcpu: int) -> int:
        """Deliver `port` to `vcpu` from now on (Linux xen_rebind_evtchn_to_cpu: mask,
        EVTCHNOP_bind_vcpu, move the binding, unmask, which re-raises a pending event there).
        An event already on a FIFO queue is still delivered from that queue. Returns what
        the final unmask returns (1 if it made a new event, see unmask)."""
        vc = self._vcpu(vcpu)
        p = self._valid_port(port)
        dm = self._dm
        with self._domains_locked(self.domid):
            state = dm.state(p)
            fixed = state == L.ECS_IPI or (
                state == L.ECS_VIRQ and dm.port_u32(p, L.P_REMOTE_PORT) in L.VIRQ_PER_VCPU
            )
            if fixed or state not in (L.ECS_UNBOUND, L.ECS_INTERDOMAIN, L.ECS_VIRQ):
                raise EvtchnError(
                    E.EINVAL,
                    f"port {p} of domain {self.domid} is "
                    f"{L.STATUS_NAMES[state]}"
                    f"{' (bound to its vcpu)' if fixed else ''}: "
                    f"its vcpu cannot change",
                )
            was_masked = self.is_masked(p)
            self.mask(p)
            # Under the port's channel lock and its peer's: a sender holds the latter while it
            # reads the notify vCPU and raises it, so it has either finished (the unmask below
            # re-raises on the new vCPU) or will see the new one. Read-type: Xen takes no
            # channel lock here, so a VIRQ raised meanwhile must wait, not be dropped.
            chans = [(self.domid, p)]
            if state == L.ECS_INTERDOMAIN:
                chans.append((dm.port_u16(p, L.P_REMOTE_DOM), dm.port_u32(p, L.P_REMOTE_PORT)))
            with self._chans_locked(*chans, reader=True):
                dm.set_port_u16(p, L.P_NOTIFY_VCPU, vc)
            self._set_affinity(p, vc)
        return 0 if was_masked else self.unmask(p)

    def set_priority(self, port: int, priority: int) -> None:
        """FIFO: the queue used from the port's next link on (an event already LINKED stays)."""
        p = self._valid_port(port)
        if self._dm.abi != L.ABI_FIFO:
            raise EvtchnError(
                E.ENOSYS, f"set_priority needs the fifo ABI; domain {self.domid} uses {self.abi}"
            )
        if self._dm.state(p) <= L.ECS_RESERVED:
            raise EvtchnError(E.EACCES, f"port {p} of domain {self.domid} is not bound")
        prio = _int(priority, "priority")
        if not L.FIFO_PRIORITY_MAX <= prio <= L.FIFO_PRIORITY_MIN:
            raise EvtchnError(
                E.EINVAL,
                f"priority {prio} is out of range "
                f"({L.FIFO_PRIORITY_MAX} highest .. "
                f"{L.FIFO_PRIORITY_MIN} lowest)",
            )
        self._dm.set_port_u8(p, L.P_PRIORITY, prio)

    def hyp_unmask(self, port: int) -> int:
        """EVTCHNOP_unmask itself: clear the mask and re-raise a pending event. Returns 1 if
        that set PENDING 0 -> 1 (see unmask)."""
        return self._k.hyp_unmask(self.domid, self._valid_port(port))

    def expand_array(self) -> None:
        """EVTCHNOP_expand_array: add the next event-array page (the guest fills it with
        MASKED first); events sent to its ports while it was missing are raised now."""
        if self.host._closed:
            raise self.host._closed_error()
        if self._dm.abi != L.ABI_FIFO:
            raise EvtchnError(E.EOPNOTSUPP, f"domain {self.domid} uses {self.abi}, not fifo")
        with self._domains_locked(self.domid):
            r = self._k.expand_array(self.domid)
        if r < 0:
            raise EvtchnError(
                -r,
                f"the event array of domain {self.domid} already has all "
                f"{self._dm.array_pages()} pages (link_bits={self.link_bits})",
            )

    def reset(self) -> None:
        """EVTCHNOP_reset on this domain, as Xen's evtchn_reset: close every port, then under
        the event lock check that none is open; if a port was (re)opened meanwhile, EAGAIN and
        the domain's ABI state is left alone (8d385b247b, XSA-343), else the FIFO state is torn
        down. Xen then returns the domain to 2-level; the guest here re-initialises FIFO at
        once (as Linux does after kexec), with an empty event array. EBUSY while another reset
        of the domain runs; the reset lock of one that died is taken over."""
        if self.host._closed:
            raise self.host._closed_error()
        busy = f"a reset of domain {self.domid} is in progress"
        with Held(self._k, [self._base + L.H_RESET_LOCK], busy=busy):
            p = self._next_open_port(1)
            while p:
                try:
                    self._close_port(p)  # evtchn_close(d, i, 1): no guest mask
                except EvtchnError as exc:  # closed concurrently by someone else
                    if exc.errno != E.EINVAL:
                        raise
                p = self._next_open_port(p + 1)
            with self._domains_locked(self.domid):
                reopened = self._next_open_port(1)
                if reopened:
                    raise EvtchnError(
                        E.EAGAIN,
                        f"reset of domain {self.domid}: port {reopened} was opened while the "
                        f"reset closed the others; the ports it closed stay closed, retry",
                    )
                if self._dm.abi == L.ABI_FIFO:
                    self._fifo_reinit()

    def _next_open_port(self, start: int) -> int:
        """The lowest port >= start that is in use (not FREE or RESERVED), or 0; vectorised
        over the port table, one chunk at a time, up to valid_evtchns as it is now."""
        dm = self._dm
        stride, chunk = L.PORT_SIZE, 4096
        base = dm.layout.port(0) + L.P_STATE
        lo = start
        while lo < dm.hdr(L.H_VALID):
            hi = min(lo + chunk, dm.hdr(L.H_VALID))
            states = dm.u8[base + lo * stride : base + hi * stride : stride]
            used = np.flatnonzero(states > L.ECS_RESERVED)
            if used.size:
                return lo + int(used[0])
            lo = hi
        return 0

    def _fifo_reinit(self) -> None:
        """The FIFO teardown of evtchn_reset (evtchn_fifo_destroy) and the guest's FIFO
        re-initialisation right after it: no control blocks, queues or local heads, an empty
        event array, and setup_ports' priority 7 for every port below the 2-level limit
        (evtchn_fifo_init_control: prev_evtchns = max_evtchns(d) of the 2-level domain). The
        caller holds the event lock and has checked that no port is open: every bind takes
        that lock, so no channel can be left bound without its event-array page. The vCPUs'
        handler locks keep the upcall handlers out meanwhile."""
        dm, lay = self._dm, self._dm.layout
        handlers = [self._base + lay.guest_vcpu(v) + L.G_HANDLER_LOCK for v in range(dm.vcpus)]
        with Held(self._k, handlers):
            words = dm.array_pages() * L.FIFO_WORDS_PER_PAGE
            dm.set_hdr(L.H_ARRAY_PAGES, 0)  # unpublish the array before clearing it
            for v in range(dm.vcpus):
                cb = lay.control_block(v)
                dm.u8[cb : cb + L.CONTROL_BLOCK_SIZE] = 0
                x = lay.xen_vcpu(v) + L.X_QUEUES
                for q in range(L.FIFO_MAX_QUEUES):
                    dm.u32[(x + q * L.QUEUE_SIZE + L.Q_TAIL) // 4] = 0
                g = lay.guest_vcpu(v)
                dm.u32[(g + L.G_LOCAL_READY) // 4 : (g + L.G_LOCAL_HEAD + 64) // 4] = 0
            ports = lay.port(0) // 4
            stride = L.PORT_SIZE // 4
            end = ports + stride * self.valid_ports
            dm.u32[ports + L.P_LASTQ // 4 : end : stride] = 0
            ea = lay.event_word(0) // 4
            dm.u32[ea : ea + words] = 0
            fifo_setup_ports(dm, dm.word_bits**2)

    # -- guest side: mask, unmask, tests ------------------------------------------------------
    def mask(self, port: int) -> None:
        """As a Linux guest masks: set the port's mask bit (FIFO: MASKED) in shared memory."""
        self._k.guest_mask(self.domid, self._guest_port(port))

    def unmask(self, port: int) -> int:
        """As a Linux guest unmasks: clear the mask locally; when the port is pending, Xen
        unmasks it (EVTCHNOP_unmask), which re-raises it on its vCPU.

        Returns 1 in the rare case that made a new event: FIFO, when the guest acked the
        port between Xen's test of PENDING and its set_pending (as in Xen), else 0. A harness
        that counts events exactly adds these to the senders' count."""
        return self._k.guest_unmask(self.domid, self._guest_port(port))

    def is_pending(self, port: int) -> bool:
        """The port's PENDING bit, as the guest reads it."""
        return self._k.is_pending(self.domid, self._guest_port(port))

    def is_masked(self, port: int) -> bool:
        """The port's mask bit (FIFO: MASKED), as the guest reads it."""
        return self._k.is_masked(self.domid, self._guest_port(port))

    def is_linked(self, port: int) -> bool:
        """FIFO: the event is on a queue (Xen's is_busy); always False for 2l and 3l."""
        return self._k.is_linked(self.domid, self._guest_port(port))

    def upcall_pending(self, vcpu: int) -> bool:
        """vcpu_info.evtchn_upcall_pending: Xen has raised the vCPU's upcall."""
        return self._k.upcall_pending(self.domid, self._vcpu(vcpu))

    def set_upcall_mask(self, vcpu: int, masked: bool) -> bool:
        """vcpu_info.evtchn_upcall_mask, as the guest's local_irq_disable/enable write it:
        while set, Xen delivers no upcall to the vCPU, and an upcall already pending does not
        end SCHEDOP_poll at once (a new one still kicks the vCPU out of it). Returns the
        previous value."""
        off = self._dm.layout.vcpu_info(self._vcpu(vcpu)) + L.VI_UPCALL_MASK
        old = bool(self._dm.u8[off] & 1)
        self._dm.u8[off] = 1 if masked else 0
        return old

    # -- guest side: the upcall handler --------------------------------------------------------
    @overload
    def consume(
        self, vcpu: int, max_events: int | None = None, out: None = None
    ) -> npt.NDArray[np.uint32]: ...
    @overload
    def consume(
        self, vcpu: int, max_events: int | None = None, *, out: npt.NDArray[np.uint32]
    ) -> int: ...
    @overload
    def consume(self, vcpu: int, max_events: int | None, out: npt.NDArray[np.uint32]) -> int: ...
    def consume(
        self,
        vcpu: int,
        max_events: int | None = None,
        out: npt.NDArray[np.uint32] | None = None,
    ) -> npt.NDArray[np.uint32] | int:
        """Run `vcpu`'s upcall handler once, as Linux does: deliver every deliverable event
        in the ABI's order, acknowledging each (clearing PENDING).

        Returns the delivered ports as a uint32 array; with `out` (a uint32 array) fills it
        and returns the count. `max_events` bounds the events taken; the rest stay for the
        next call (the upcall stays pending).
        """
        if type(vcpu) is int and 0 <= vcpu < self._nvcpus and not self.host._closed:
            vc = vcpu  # the common call: no conversion
        else:
            vc = self._vcpu(vcpu)
        if max_events is not None:
            max_events = _int(max_events, "max_events")
            if max_events < 0:
                raise ValueError(f"max_events must be >= 0, not {max_events}")
        if out is not None:
            return self.consume_into(vc, out if max_events is None else out[:max_events])
        if max_events is not None:
            buf = np.empty(max_events, np.uint32)
            got: npt.NDArray[np.uint32] = buf[: self._k.consume(self.domid, vc, buf)].copy()
            return got
        mine = self._bufs.pop(vc, None)  # this vCPU's buffer, for this call only
        if mine is None:
            mine = np.empty(min(_CONSUME_CHUNK, 4 * self.max_ports), np.uint32)
        try:
            n = self._k.consume(self.domid, vc, mine)
            if n == 0:
                return _NO_PORTS
            taken: npt.NDArray[np.uint32] = mine[:n].copy()
            return taken if n < len(mine) else self._consume_storm(vc, taken)
        finally:
            self._bufs[vc] = mine

    def _consume_storm(self, vc: int, first: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
        """consume() after a full buffer: call the handler on until it leaves room, but take
        at most 4 * max_ports events in all (a storm cannot keep us here forever)."""
        chunks, limit = [first], 4 * self.max_ports
        total = len(first)
        while total < limit:
            buf = np.empty(min(_CONSUME_CHUNK, limit - total), np.uint32)
            n = self._k.consume(self.domid, vc, buf)
            chunks.append(buf[:n])
            total += n
            if n < len(buf):
                break
        return np.concatenate(chunks)

    def consume_one(self, vcpu: int) -> int:
        """Run `vcpu`'s upcall handler for at most one event, for handler loops that take
        one event at a time: the port delivered (acknowledged), or 0 if none was pending
        (port 0 is never an event port). As consume(vcpu, max_events=1), without the array."""
        if type(vcpu) is int and 0 <= vcpu < self._nvcpus and not self.host._closed:
            vc = vcpu
        else:
            vc = self._vcpu(vcpu)
        buf = self._ones.pop(vc, None)
        if buf is None:
            buf = np.empty(1, np.uint32)
        try:
            return int(buf[0]) if self._k.consume(self.domid, vc, buf) else 0
        finally:
            self._ones[vc] = buf

    def consume_into(self, vcpu: int, out: npt.NDArray[np.uint32]) -> int:
        """consume() into the caller's uint32 array; returns how many ports it holds."""
        if type(vcpu) is int and 0 <= vcpu < self._nvcpus and not self.host._closed:
            vc = vcpu
        else:
            vc = self._vcpu(vcpu)
        if type(out) is not np.ndarray or out.dtype is not _U32 or not out.flags.c_contiguous:
            if not isinstance(out, np.ndarray) or out.dtype != np.uint32 or out.ndim != 1:
                raise ValueError("out must be a 1-D numpy uint32 array")
            if not out.flags.c_contiguous:
                raise ValueError("out must be contiguous")
        elif out.ndim != 1:
            raise ValueError("out must be a 1-D numpy uint32 array")
        return self._k.consume(self.domid, vc, out)

    def wait(self, vcpu: int, timeout: float | None = None, spin_ns: int | None = None) -> bool:
        """Block until `vcpu` has an upcall pending (a halted vCPU waiting for its
        interrupt). Returns False if `timeout` seconds passed first.

        It first spins on the upcall flag for up to `spin_ns` nanoseconds (None: the host's
        ``wait_spin_ns``), as KVM's halt-polling does, without registering as a waiter: an
        event sent meanwhile is seen without a wake-up, and its sender pays no system call.
        Only then does it register and sleep on the futex, which a sender's kick wakes."""
        vc = self._vcpu(vcpu)
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 or None, not {timeout}")
        if spin_ns is None:
            spin_ns = self.host.wait_spin_ns
        elif type(spin_ns) is not int or spin_ns < 0:
            spin_ns = _int(spin_ns, "spin_ns")
            if spin_ns < 0:
                raise ValueError(f"spin_ns must be >= 0 or None, not {spin_ns}")
        # the kernels add it to a signed 64-bit clock: 2^62 ns (146 years) is "until timeout"
        return self._k.wait(self.domid, vc, timeout, min(spin_ns, 1 << 62))

    def poll(
        self, vcpu: int, ports: int | Iterable[int], timeout: float | None = None
    ) -> PollResult:
        """SCHEDOP_poll made by `vcpu`: return at once if one of `ports` (a port or a list of
        at most 128) is pending, masked or not, or if the vCPU has an unmasked upcall
        pending; else block until a send sets one of them pending (any port, when several
        are polled, as Xen wakes those pollers too), the vCPU is kicked by an upcall, or
        `timeout` seconds pass (None: no timeout; Xen's timeout is an absolute time, 0 for
        none). A port at or beyond valid_evtchns or not in use (free, port 0) is EINVAL, as
        is a list of more than 128."""
        vc = self._vcpu(vcpu)
        plist = [ports] if isinstance(ports, (int, np.integer)) else list(ports)
        if len(plist) > L.SCHED_POLL_MAX_PORTS:
            raise EvtchnError(
                E.EINVAL,
                f"SCHEDOP_poll takes at most {L.SCHED_POLL_MAX_PORTS} ports, not {len(plist)}",
            )
        arr = np.empty(len(plist), np.uint32)
        for i, p in enumerate(plist):
            p = _int(p, "port")
            if not 0 <= p <= 0xFFFFFFFF:
                raise EvtchnError(E.EINVAL, f"port {p} is not valid in domain {self.domid}")
            arr[i] = p
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be >= 0 or None, not {timeout}")
        reason, port = self._k.poll(self.domid, vc, arr, timeout)
        if reason < 0:
            self._valid_port(port)  # raises EINVAL, naming the port
            raise EvtchnError(
                -reason, f"SCHEDOP_poll: port {port} of domain {self.domid} is not in use"
            )
        return PollResult(L.POLL_REASONS[reason], int(port))

    # -- memory --------------------------------------------------------------------------------
    def mapped_pages(self) -> int:
        """Pages Xen maps for this domain's event state: 2l the shared_info page; 3l also the
        2 or 16 bitmap pages and the L2 selector pages; fifo one page per 1024 ports of the
        event array added so far plus one control-block page per vCPU."""
        if self.host._closed:
            raise self.host._closed_error()
        return self._dm.mapped_pages()

    def layout(self) -> dict[str, Region]:
        """Region name -> (segment name, offset, size) for every guest-visible region; the
        segment is /dev/shm/<segment name>."""
        if self.host._closed:
            raise self.host._closed_error()
        dm, lay, seg = self._dm, self._dm.layout, self._dm.seg.name
        regions = {"shared_info": (seg, lay.offsets["shared_info"], L.PAGE_SIZE)}
        for v in range(L.LEGACY_MAX_VCPUS, dm.vcpus):
            regions[f"vcpu_info_vcpu{v}"] = (seg, lay.vcpu_info(v), L.VCPU_INFO_SIZE)
        if dm.abi == L.ABI_FIFO:
            regions["event_array"] = (
                seg,
                lay.offsets["event_array"],
                dm.array_pages() * L.PAGE_SIZE,
            )
            for v in range(dm.vcpus):
                regions[f"control_block_vcpu{v}"] = (
                    seg,
                    lay.control_block(v),
                    L.CONTROL_BLOCK_SIZE,
                )
        elif dm.abi == L.ABI_3L:
            regions["3l_pending"] = (seg, lay.offsets["l3_pending"], lay.l3_bitmap_bytes)
            regions["3l_mask"] = (seg, lay.offsets["l3_mask"], lay.l3_bitmap_bytes)
            for v in range(dm.vcpus):
                regions[f"3l_l2_selector_vcpu{v}"] = (
                    seg,
                    lay.l2_selector(v),
                    lay.l2_selector_bytes,
                )
        return regions


def fifo_setup_ports(dm: DomainMemory, prev_evtchns: int) -> None:
    """evtchn_fifo_init_control's setup_ports: ports 1 .. prev_evtchns - 1 that are valid get
    the default priority 7. Ports of buckets allocated later stay at the 0 of a fresh bucket
    (alloc_evtchn_bucket zeroes it) until they are bound (evtchn_fifo_init)."""
    stride = L.PORT_SIZE
    first = dm.layout.port(1) + L.P_PRIORITY
    n = min(dm.hdr(L.H_VALID), prev_evtchns) - 1
    if n > 0:
        dm.u8[first : first + n * stride : stride] = L.FIFO_PRIORITY_DEFAULT


def _attach_domain(name: str, backend: str, domid: int) -> Domain:
    """Unpickle a Domain: on this process's one attachment of the host (evtchn.host)."""
    from .host import attached_host

    return attached_host(name, backend).domain(domid)
