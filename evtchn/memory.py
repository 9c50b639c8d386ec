"""Shared-memory segments and typed access to one domain's memory (no policy, no locking).

Segments are files in /dev/shm opened with os.open + mmap rather than
multiprocessing.shared_memory: on Python < 3.13 every attach of the latter registers the segment
with a resource tracker that unlinks it when an unrelated attaching process exits (CPython
gh-82300). Here only the creating process ever unlinks.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from . import layout as L
from .errors import EvtchnError, HostGoneError

SHM_DIR = "/dev/shm"


class Segment:
    """One mapped POSIX shared-memory segment, with uint8/16/32/64 views of all of it."""

    def __init__(self, name: str, size: int | None = None):
        self.name = name
        path = os.path.join(SHM_DIR, name)
        try:
            if size is None:
                fd = os.open(path, os.O_RDWR)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileNotFoundError:
            raise HostGoneError(2, f"no evtchn shared-memory segment named {name!r}") from None
        try:
            if size is not None:
                os.ftruncate(fd, size)  # sparse: tmpfs backs only the pages touched
            self.size = os.fstat(fd).st_size
            if self.size == 0:
                raise HostGoneError(22, f"segment {name!r} is empty: not an evtchn segment")
            self.mm = mmap.mmap(fd, self.size)  # dups fd: EMFILE at the fd limit
        except BaseException:
            if size is not None:  # we made it: a half-made segment must not stay
                os.unlink(path)
            raise
        finally:
            os.close(fd)
        self.u8 = np.frombuffer(self.mm, np.uint8)  # frombuffer pins the mapping
        self.u16 = self.u8.view(np.uint16)
        self.u32 = self.u8.view(np.uint32)
        self.u64 = self.u8.view(np.uint64)
        self.address = self.u8.ctypes.data

    def unlink(self) -> None:
        try:
            os.unlink(os.path.join(SHM_DIR, self.name))
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Unmap when nothing else holds a view; otherwise the mapping lives until exit."""
        del self.u8, self.u16, self.u32, self.u64
        try:
            self.mm.close()
        except BufferError:
            pass


class DomainMemory:
    """Named access to the fields of one domain's segment (offsets from evtchn.layout)."""

    def __init__(self, seg: Segment, expect_domid: int | None = None):
        self.seg = seg
        u32, u64 = seg.u32, seg.u64
        if int(u64[L.H_MAGIC // 8]) != L.DOMAIN_MAGIC:
            raise HostGoneError(22, f"segment {seg.name!r} is not an evtchn domain")
        if int(u32[L.H_VERSION // 4]) != L.LAYOUT_VERSION:
            raise HostGoneError(
                22,
                f"segment {seg.name!r} has layout version "
                f"{int(u32[L.H_VERSION // 4])}, this evtchn reads "
                f"version {L.LAYOUT_VERSION}",
            )
        self.domid = int(u32[L.H_DOMID // 4])
        self.abi = int(u32[L.H_ABI // 4])
        vcpus, wb = int(u32[L.H_VCPUS // 4]), int(u32[L.H_WORD_BITS // 4])
        lb, mp = int(u32[L.H_LINK_BITS // 4]), int(u32[L.H_MAX_PORTS // 4])
        self.layout = L.domain_layout(self.abi, vcpus, wb, lb, mp)
        self.vcpus, self.word_bits, self.link_bits, self.max_ports = vcpus, wb, lb, mp
        self.u8, self.u16, self.u32, self.u64 = seg.u8, seg.u16, seg.u32, seg.u64
        self.words = seg.u64 if wb == 64 else seg.u32  # xen_ulong_t view for bitmaps

    @staticmethod
    def initialise(seg: Segment, lay: L.DomainLayout, domid: int, auto_expand: bool) -> None:
        """Write the header of a fresh (zeroed) segment; magic last, so readers see it whole."""
        u32, u64 = seg.u32, seg.u64
        for off, val in (
            (L.H_VERSION, L.LAYOUT_VERSION),
            (L.H_DOMID, domid),
            (L.H_ABI, lay.abi),
            (L.H_VCPUS, lay.vcpus),
            (L.H_WORD_BITS, lay.word_bits),
            (L.H_LINK_BITS, lay.link_bits),
            (L.H_MAX_PORTS, lay.max_ports),
            (L.H_AUTO_EXPAND, int(auto_expand)),
        ):
            u32[off // 4] = val
        for name, off in L.H_REGION.items():
            u64[off // 8] = lay.offsets[name]
        u64[L.H_CPUMASK_BYTES // 8] = lay.cpumask_bytes
        u64[L.H_SEGMENT_SIZE // 8] = lay.size
        u64[L.H_MAGIC // 8] = L.DOMAIN_MAGIC

    # -- header scalars ----------------------------------------------------------------------
    def hdr(self, off: int) -> int:
        return int(self.u32[off // 4])

    def set_hdr(self, off: int, val: int) -> None:
        self.u32[off // 4] = val

    # -- struct evtchn (hypervisor-private, one per port) -------------------------------------
    def port_u8(self, port: int, field: int) -> int:
        return int(self.u8[self.layout.port(port) + field])

    def set_port_u8(self, port: int, field: int, val: int) -> None:
        self.u8[self.layout.port(port) + field] = val

    def port_u16(self, port: int, field: int) -> int:
        return int(self.u16[(self.layout.port(port) + field) // 2])

    def set_port_u16(self, port: int, field: int, val: int) -> None:
        self.u16[(self.layout.port(port) + field) // 2] = val

    def port_u32(self, port: int, field: int) -> int:
        return int(self.u32[(self.layout.port(port) + field) // 4])

    def set_port_u32(self, port: int, field: int, val: int) -> None:
        self.u32[(self.layout.port(port) + field) // 4] = val

    def state(self, port: int) -> int:
        return self.port_u8(port, L.P_STATE)

    def notify_vcpu(self, port: int) -> int:
        return self.port_u16(port, L.P_NOTIFY_VCPU)

    # -- per-vCPU ------------------------------------------------------------------------------
    def xen_vcpu_u32(self, vcpu: int, field: int) -> int:
        return int(self.u32[(self.layout.xen_vcpu(vcpu) + field) // 4])

    def set_xen_vcpu_u32(self, vcpu: int, field: int, val: int) -> None:
        self.u32[(self.layout.xen_vcpu(vcpu) + field) // 4] = val

    def guest_u32(self, vcpu: int, field: int) -> int:
        return int(self.u32[(self.layout.guest_vcpu(vcpu) + field) // 4])

    def set_guest_u32(self, vcpu: int, field: int, val: int) -> None:
        self.u32[(self.layout.guest_vcpu(vcpu) + field) // 4] = val

    def virq_port(self, vcpu: int, virq: int) -> int:
        return self.xen_vcpu_u32(vcpu, L.X_VIRQ + 4 * virq)

    def set_virq_port(self, vcpu: int, virq: int, port: int) -> None:
        self.set_xen_vcpu_u32(vcpu, L.X_VIRQ + 4 * virq, port)

    def queue_tail_off(self, vcpu: int, priority: int) -> int:
        return self.layout.xen_vcpu(vcpu) + L.X_QUEUES + L.QUEUE_SIZE * priority + L.Q_TAIL

    def queue_lock_off(self, vcpu: int, priority: int) -> int:
        return self.layout.xen_vcpu(vcpu) + L.X_QUEUES + L.QUEUE_SIZE * priority + L.Q_LOCK

    def u64_at(self, off: int) -> int:
        return int(self.u64[off // 8])

    def lock_words(self) -> dict[str, int]:
        """Every lock word of the domain that is held (owner id != 0), by name: the event and
        reset locks, the channel locks of the valid ports, the vCPUs' queue and handler locks.
        An empty dict when nothing is held (what tests check after an operation)."""
        lay, held = self.layout, {}
        for name, off in (("event", L.H_EVENT_LOCK), ("reset", L.H_RESET_LOCK)):
            held[name] = self.u64_at(off)
        stride = L.PORT_SIZE // 8
        first = (lay.port(0) + L.P_LOCK) // 8
        chans = self.u64[first : first + stride * self.hdr(L.H_VALID) : stride]
        for port in map(int, chans.nonzero()[0]):
            held[f"channel {port}"] = int(chans[port])
        for v in range(self.vcpus):
            held[f"handler {v}"] = self.u64_at(lay.guest_vcpu(v) + L.G_HANDLER_LOCK)
            for q in range(L.FIFO_MAX_QUEUES):
                held[f"queue {v}/{q}"] = self.u64_at(self.queue_lock_off(v, q))
        return {name: owner for name, owner in held.items() if owner}

    def waiters(self, vcpu: int) -> tuple[int, list[int]]:
        """(bitmap, slot owner ids) of the vCPU's registered waiters (X_WAITERS, X_WAITER)."""
        x = self.layout.xen_vcpu(vcpu)
        slots = self.u64[(x + L.X_WAITER) // 8 : (x + L.X_WAITER) // 8 + L.WAITER_SLOTS]
        return self.xen_vcpu_u32(vcpu, L.X_WAITERS), [int(o) for o in slots]

    def cpumask_word_index(self, vcpu: int, word: int) -> int:
        """Index into self.words of word `word` of vCPU's cpu_evtchn_mask."""
        return (self.layout.cpumask(vcpu)) // (self.word_bits // 8) + word

    def array_pages(self) -> int:
        return self.hdr(L.H_ARRAY_PAGES)

    def mapped_pages(self) -> int:
        """Pages Xen maps for this domain's event state (see Domain.mapped_pages)."""
        lay = self.layout
        if self.abi == L.ABI_2L:
            return 1
        if self.abi == L.ABI_3L:
            l2 = -(-self.vcpus * lay.l2_selector_bytes // L.PAGE_SIZE)
            return 1 + 2 * (lay.l3_bitmap_bytes // L.PAGE_SIZE) + l2
        return self.array_pages() + self.vcpus


def check_name(name: object) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\0" in name:
        raise EvtchnError(22, f"invalid host name {name!r}")
    return name
