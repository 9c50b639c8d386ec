"""Host and Domain: thin handles over the shared memory, and the hypercalls' control plane.

The control plane (alloc, bind, close, status, bind_vcpu, set_priority, reset) runs in Python
under the locks Xen takes (per-domain event_lock, per-channel lock), on the same memory the
kernels use; every backend shares it. The data plane (set_pending, send, unmask, consume, wait)
is the backend's kernels: evtchn.reference, evtchn._core (Cython) or evtchn.numba_kernels.
"""

from __future__ import annotations

import contextlib
import errno as E
import os
import secrets
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from . import layout as L
from .domain import Domain, fifo_setup_ports
from .errors import EvtchnError, HostGoneError, as_int
from .locks import Held
from .memory import SHM_DIR, DomainMemory, Segment, check_name
from .owner import pid_namespace
from .results import PollResult, PortStatus  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    from ._kernels import Kernels

BACKENDS: tuple[str, ...] = ("cython", "numba", "reference")
DEFAULT_BACKEND = os.environ.get("EVTCHN_BACKEND", "cython")
MAX_VCPUS = 1024
DEFAULT_WAIT_SPIN_NS = int(os.environ.get("EVTCHN_WAIT_SPIN_NS", L.WAIT_SPIN_NS))


def _make_kernels(backend: str) -> Kernels:
    if backend == "reference":
        from .reference import ReferenceKernels

        return ReferenceKernels()
    if backend == "cython":
        try:
            from ._core import CythonKernels
        except ImportError as exc:
            raise ImportError(
                "the Cython backend is not built: run `pip install -e .` "
                f"(or use backend='reference'): {exc}"
            ) from exc
        return CythonKernels()
    if backend == "numba":
        from .numba_kernels import NumbaKernels

        return NumbaKernels()
    raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")


class Host:
    """The shared memory of one simulated machine.

    ``Host()`` creates it (and is the only process that ever unlinks it); ``Host.attach(name)``
    opens it from any other process. Use it as a context manager, or call ``close()``.
    """

    def __init__(
        self, backend: str | None = None, *, inject: str | None = None, _attach: str | None = None
    ):
        backend = backend or DEFAULT_BACKEND
        if inject is not None and inject not in L.INJECTIONS:
            raise ValueError(
                f"unknown injection {inject!r}: choose one of {', '.join(L.INJECTIONS)}"
            )
        #: The kernels this handle runs: "cython", "numba" or "reference".
        self.backend = backend
        self._k = _make_kernels(backend)
        self._pid = os.getpid()
        self._doms: dict[int, DomainMemory] = {}
        self._closed = False
        #: How long Domain.wait spins on the upcall flag before it blocks, when its call does
        #: not say (ns; a process-local setting, initially $EVTCHN_WAIT_SPIN_NS if set, else
        #: layout.WAIT_SPIN_NS).
        self.wait_spin_ns: int = DEFAULT_WAIT_SPIN_NS
        if _attach is None:
            self._owner = True
            self._hseg = Segment(
                f"{L.SEGMENT_PREFIX}{self._pid}-{secrets.token_hex(4)}", L.HOST_SIZE
            )
            u32 = self._hseg.u32
            u32[L.HH_VERSION // 4] = L.LAYOUT_VERSION
            u32[L.HH_CREATOR // 4] = self._pid
            u32[L.HH_INJECT // 4] = L.INJECTIONS[inject] if inject else 0
            self._hseg.u64[L.HH_PIDNS // 8] = pid_namespace()
            self._hseg.u64[L.HH_MAGIC // 8] = L.HOST_MAGIC
            # Runs on close(), on garbage collection and at interpreter exit; only in this pid
            # (a forked child inherits the object but must not unlink its parent's memory).
            self._finalizer = weakref.finalize(self, _unlink_host, self._hseg.name, self._pid)
        else:
            self._owner = False
            self._hseg = Segment(check_name(_attach))
            self._check_host_header()
        _remember(self)

    @classmethod
    def attach(cls, name: str, backend: str | None = None) -> Host:
        """Open the host `name` created by another process; never unlinks it."""
        return cls(backend, _attach=name)

    def _check_host_header(self) -> None:
        seg = self._hseg
        if seg.size < L.HOST_SIZE or int(seg.u64[L.HH_MAGIC // 8]) != L.HOST_MAGIC:
            raise HostGoneError(E.EINVAL, f"{seg.name!r} is not an evtchn host")
        version = int(seg.u32[L.HH_VERSION // 4])
        if version != L.LAYOUT_VERSION:
            raise HostGoneError(
                E.EINVAL,
                f"host {seg.name!r} has layout version {version}; "
                f"this evtchn reads version {L.LAYOUT_VERSION}",
            )
        theirs, ours = int(seg.u64[L.HH_PIDNS // 8]), pid_namespace()
        if theirs != ours:
            raise HostGoneError(
                E.EXDEV,
                f"host {seg.name!r} was created in another pid namespace (inode {theirs}; this "
                f"process's is {ours}): its lock owners are thread ids of that namespace, "
                f"which mean nothing here, so a live owner would look dead and lose its lock",
            )

    def __reduce__(self) -> tuple[Callable[[str, str | None], Host], tuple[str, str]]:
        return (Host.attach, (self.name, self.backend))

    @property
    def inject(self) -> str | None:
        """The historical bug this host runs with (stress --inject), or None."""
        code = int(self._hseg.u32[L.HH_INJECT // 4])
        return next((n for n, c in L.INJECTIONS.items() if c == code), None)

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The host segment's name in /dev/shm: what ``Host.attach`` takes."""
        return self._hseg.name

    @property
    def is_owner(self) -> bool:
        """True in the process that created the host (the only one that unlinks it)."""
        return self._owner

    def warm_up(self) -> None:
        """Make the backend ready to run every operation at full speed: numba loads (or
        compiles) all its kernels now rather than on their first call; a no-op otherwise."""
        self._check_open()
        warm = getattr(self._k, "warm_up", None)
        if warm is not None:
            warm()

    def close(self) -> None:
        """Release this process's handle; the creator also unlinks every segment. Every later
        call through this Host or a Domain of it raises EvtchnError(EBADF)."""
        if self._closed:
            return
        self._closed = True
        if self._owner:
            self._finalizer()

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _closed_error(self) -> EvtchnError:
        return EvtchnError(
            E.EBADF,
            f"host {self.name!r} is closed: its Domain handles cannot be used any more"
            + (" (its shared memory is unlinked)" if self._owner else ""),
        )

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    # -- domains ------------------------------------------------------------------------------
    @property
    def ndomains(self) -> int:
        """Domains created on this host so far, by any process (domids 0 .. ndomains-1)."""
        self._check_open()
        return int(self._hseg.u32[L.HH_NDOMAINS // 4])

    def create_domain(
        self,
        abi: str = "fifo",
        vcpus: int = 1,
        word_bits: int = 64,
        link_bits: int = L.FIFO_LINK_BITS,
        max_ports: int | None = None,
        auto_expand: bool = True,
    ) -> Domain:
        """A new domain using `abi` ("fifo", "2l" or "3l") with `vcpus` vCPUs.

        word_bits is xen_ulong_t's width (64, or 32 for the x86-32 compat layout); link_bits
        the FIFO LINK width (17 as in Xen, up to 28 as the design allows); max_ports an extra
        limit below the ABI's (Xen's max_evtchn_port + 1). With auto_expand the guest adds
        FIFO event-array pages when it binds a port, as Linux does.
        """
        self._check_open()
        code, lay = _domain_layout(abi, vcpus, word_bits, link_bits, max_ports)
        with Held(self._k, [self._hseg.address + L.HH_LOCK]):
            domid = self.ndomains
            if domid >= L.MAX_DOMAINS:
                raise EvtchnError(
                    E.ENOSPC,
                    f"host {self.name!r} has {domid} domains, the most Xen's domid space allows",
                )
            name = L.domain_segment_name(self.name, domid)
            # A creator killed between making the segment and publishing ndomains left it
            # behind (we took its lock over); nobody maps an unpublished domid: remove it.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, name))
            seg = Segment(name, lay.size)
            try:
                DomainMemory.initialise(seg, lay, domid, auto_expand)
                seg.u32[L.H_INJECT // 4] = self._hseg.u32[L.HH_INJECT // 4]
                dm = DomainMemory(seg)
                _init_domain_state(dm)
                self._doms[domid] = dm
                self._k.map_domain(dm)
            except BaseException:  # unpublished: unlink it, or the next create finds it
                self._doms.pop(domid, None)
                seg.unlink()
                raise
            self._hseg.u32[L.HH_NDOMAINS // 4] = domid + 1  # publish after the init
        return Domain(self, domid)

    def domain(self, domid: int) -> Domain:
        """A handle on domain `domid`, created by this or any other process."""
        self._check_open()
        self._dm(domid)
        return Domain(self, domid)

    def domains(self) -> list[Domain]:
        """Handles on every domain of the host."""
        return [self.domain(d) for d in range(self.ndomains)]

    def _dm(self, domid: int) -> DomainMemory:
        dm = self._doms.get(domid)
        if dm is not None:
            return dm
        self._check_open()
        domid = as_int(domid, "domid")
        if not 0 <= domid < self.ndomains:
            raise EvtchnError(
                E.ESRCH,
                f"no domain {domid} on host {self.name!r} (domains 0..{self.ndomains - 1} exist)",
            )
        dm = DomainMemory(Segment(L.domain_segment_name(self.name, domid)))
        self._doms[domid] = dm
        self._k.map_domain(dm)
        return dm

    def _sync(self) -> None:
        """Map domains created by other processes, so a send can reach any peer (and refuse
        a closed host: send and send_many come through here)."""
        if self._closed:
            raise self._closed_error()
        if len(self._doms) != int(self._hseg.u32[L.HH_NDOMAINS // 4]):
            for domid in range(self.ndomains):
                self._dm(domid)

    def __repr__(self) -> str:
        if self._closed:
            return f"<evtchn.Host {self.name} backend={self.backend} closed>"
        return f"<evtchn.Host {self.name} backend={self.backend} domains={self.ndomains}>"


def _unlink_host(name: str, creator: int) -> None:
    """Unlink the host segment and every domain segment; safe to call twice."""
    if os.getpid() != creator:
        return
    try:
        seg = Segment(name)
        ndom = int(seg.u32[L.HH_NDOMAINS // 4])
        seg.release()
    except (EvtchnError, OSError, ValueError):
        ndom = L.MAX_DOMAINS
    for domid in range(ndom):
        path = os.path.join("/dev/shm", L.domain_segment_name(name, domid))
        try:
            os.unlink(path)
        except FileNotFoundError:
            if ndom == L.MAX_DOMAINS:
                break
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:
        pass


def _domain_layout(
    abi: str, vcpus: int, word_bits: int, link_bits: int, max_ports: int | None
) -> tuple[int, L.DomainLayout]:
    if abi not in L.ABI_NAMES:
        raise ValueError(f"unknown ABI {abi!r}: choose one of {', '.join(L.ABI_NAMES)}")
    code = L.ABI_NAMES[abi]
    if not isinstance(vcpus, int) or not 1 <= vcpus <= MAX_VCPUS:
        raise ValueError(f"vcpus must be an integer from 1 to {MAX_VCPUS}, not {vcpus!r}")
    if word_bits not in (32, 64):
        raise ValueError(f"word_bits must be 32 or 64 (xen_ulong_t), not {word_bits!r}")
    if not isinstance(link_bits, int) or not 10 <= link_bits <= L.FIFO_MAX_LINK_BITS:
        raise ValueError(
            f"link_bits must be an integer from 10 to {L.FIFO_MAX_LINK_BITS} "
            f"(4 flag bits leave 28 in a 32-bit event word), not {link_bits!r}"
        )
    limit = L.abi_max_ports(code, word_bits, link_bits)
    if max_ports is None:
        max_ports = limit
    elif not isinstance(max_ports, int) or not 2 <= max_ports <= limit:
        raise ValueError(
            f"max_ports must be an integer from 2 to {limit} (the {abi} limit "
            f"with word_bits={word_bits}, link_bits={link_bits}), "
            f"not {max_ports!r}"
        )
    return code, L.domain_layout(code, vcpus, word_bits, link_bits, max_ports)


def _init_domain_state(dm: DomainMemory) -> None:
    """What Xen's evtchn_init and a Linux guest's event init leave in a fresh domain: port 0
    reserved, one bucket of ports; a FIFO guest switches to FIFO first thing
    (evtchn_fifo_init_control, whose setup_ports gives the ports valid then priority 7); a
    2l/3l guest masks every port and binds them all to vCPU 0."""
    lay = dm.layout
    dm.set_hdr(L.H_VALID, min(L.EVTCHNS_PER_BUCKET, _bucket_round(dm.max_ports)))
    dm.set_hdr(L.H_ALLOC_HINT, 1)
    dm.set_port_u8(0, L.P_STATE, L.ECS_RESERVED)  # port 0 is never handed out
    if dm.abi == L.ABI_FIFO:
        fifo_setup_ports(dm, dm.word_bits**2)  # max_evtchns of the 2-level domain it was
        return
    wbytes = dm.word_bits // 8
    if dm.abi == L.ABI_2L:
        start = (lay.offsets["shared_info"] + L.si_mask(dm.word_bits)) // wbytes
        count = dm.word_bits
    else:
        start, count = lay.offsets["l3_mask"] // wbytes, dm.word_bits**2
    dm.words[start : start + count] = ~np.zeros(1, dm.words.dtype)[0]  # Linux masks all ports
    cpu0 = lay.cpumask(0) // wbytes  # ... and binds them all to vCPU 0
    dm.words[cpu0 : cpu0 + lay.cpumask_bytes // wbytes] = ~np.zeros(1, dm.words.dtype)[0]


def _bucket_round(n: int) -> int:
    return -(-n // L.EVTCHNS_PER_BUCKET) * L.EVTCHNS_PER_BUCKET


# -- one attachment per host per process (unpickled Domains share it) ---------------------------
_hosts: dict[tuple[str, str], weakref.ref[Host]] = {}
_hosts_lock = threading.RLock()


def _remember(host: Host) -> None:
    """Make `host` the one unpickling uses, unless an open one is known already."""
    key = (host.name, host.backend)
    with _hosts_lock:
        ref = _hosts.get(key)
        known = ref() if ref is not None else None
        if known is None or known._closed:
            _hosts[key] = weakref.ref(host)


def attached_host(name: str, backend: str) -> Host:
    """This process's Host for `name` on `backend`: the one it created or attached before if
    it is still open and alive (held weakly: it goes when its last Domain does), else a new
    attachment. Unpickled Domains come through here, so a process maps each host once."""
    with _hosts_lock:  # re-entrant: Host.attach remembers itself under it
        ref = _hosts.get((name, backend))
        host = ref() if ref is not None else None
        if host is None or host._closed:
            host = Host.attach(name, backend)
        return host


def _forget_hosts_in_child() -> None:
    """A forked child starts with no attachment of its own (and a fresh lock: the parent's
    may have been held by another thread at the fork)."""
    global _hosts_lock
    _hosts.clear()
    _hosts_lock = threading.RLock()


os.register_at_fork(after_in_child=_forget_hosts_in_child)
