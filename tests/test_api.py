"""Hypercall and guest semantics, per ABI, on every available backend (single process)."""

from __future__ import annotations

import errno

import numpy as np
import pytest

import evtchn
from evtchn import EvtchnError
from evtchn import layout as L

ABIS = ["fifo", "2l", "3l"]


def pair(host, abi="fifo", vcpus=1, **kw):
    """dom0 (receiver) and a domU; returns (dom0, domu, dom0_port, domu_port), drained."""
    d0 = host.create_domain(abi, vcpus=vcpus, **kw)
    du = host.create_domain(abi, **kw)
    p0 = d0.alloc_unbound(du.domid)
    pu = du.bind_interdomain(d0.domid, p0)
    du.consume(0)  # the bind always sets the new local port pending
    return d0, du, p0, pu


def raises(code):
    return pytest.raises(EvtchnError, match=errno.errorcode[code])


# -- lifecycle ------------------------------------------------------------------------------
@pytest.mark.parametrize("abi", ABIS)
def test_lowest_free_port_and_port0_reserved(host, abi):
    d = host.create_domain(abi)
    ports = [d.alloc_unbound(0) for _ in range(5)]
    assert ports == [1, 2, 3, 4, 5]
    assert d.status(0).state == "closed"
    d.close(3)
    assert d.alloc_unbound(0) == 3
    assert d.alloc_unbound(0) == 6


@pytest.mark.parametrize("abi", ABIS)
def test_status_fields(host, abi):
    d0, du, p0, pu = pair(host, abi, vcpus=2)
    s = d0.status(p0)
    assert (s.state, s.vcpu, s.remote_domid, s.remote_port) == ("interdomain", 0, du.domid, pu)
    assert s["state"] == "interdomain"
    assert s.priority == (7 if abi == "fifo" else None)
    v = d0.bind_virq(L.VIRQ_TIMER, vcpu=1)
    assert (d0.status(v).state, d0.status(v).virq, d0.status(v).vcpu) == ("virq", 0, 1)
    i = d0.bind_ipi(1)
    assert (d0.status(i).state, d0.status(i).vcpu) == ("ipi", 1)
    u = d0.alloc_unbound(5)
    assert (d0.status(u).state, d0.status(u).remote_domid) == ("unbound", 5)


@pytest.mark.parametrize("abi", ABIS)
def test_close_turns_peer_unbound_and_send_is_dropped(host, abi):
    d0, du, p0, pu = pair(host, abi)
    d0.close(p0)
    s = du.status(pu)
    assert (s.state, s.remote_domid) == ("unbound", d0.domid)
    du.send(pu)  # dropped silently
    assert d0.consume(0).size == 0
    assert d0.status(p0).state == "closed"
    with raises(errno.EINVAL):
        d0.send(p0)
    # the peer can be bound again from the other side
    p0b = d0.bind_interdomain(du.domid, pu)
    assert p0b == p0 and du.status(pu).remote_port == p0b


@pytest.mark.parametrize("abi", ABIS)
def test_loopback_domid_self_and_ipi(host, abi):
    d = host.create_domain(abi, vcpus=2)
    a = d.alloc_unbound(L.DOMID_SELF)
    assert d.status(a).remote_domid == d.domid
    b = d.bind_interdomain(L.DOMID_SELF, a)
    d.consume(0)
    d.send(b)
    assert d.consume(0).tolist() == [a]
    i = d.bind_ipi(1)
    d.send(i)
    assert d.consume(0).size == 0 and d.consume(1).tolist() == [i]


# -- delivery semantics -----------------------------------------------------------------------
@pytest.mark.parametrize("abi", ABIS)
def test_send_consume_and_coalescing(host, abi):
    d0, du, p0, pu = pair(host, abi)
    assert not d0.upcall_pending(0)
    du.send(pu)
    assert d0.upcall_pending(0) and d0.is_pending(p0)
    du.send(pu)
    du.send(pu)
    assert d0.consume(0).tolist() == [p0]  # PENDING is a bit, not a counter
    assert not d0.is_pending(p0)
    assert d0.consume(0).size == 0


@pytest.mark.parametrize("abi", ABIS)
def test_masked_send_and_unmask_reraises(host, abi):
    d0, du, p0, pu = pair(host, abi)
    d0.mask(p0)
    du.send(pu)
    assert d0.is_pending(p0) and d0.is_masked(p0)
    assert not d0.upcall_pending(0)
    assert d0.consume(0).size == 0 and d0.is_pending(p0)
    d0.unmask(p0)
    assert not d0.is_masked(p0) and d0.upcall_pending(0)
    assert d0.consume(0).tolist() == [p0]
    d0.unmask(p0)  # unmask of a non-pending port: nothing
    assert not d0.upcall_pending(0)


@pytest.mark.parametrize("abi", ABIS)
def test_bind_vcpu_reraises_on_new_vcpu(host, abi):
    d0, du, p0, pu = pair(host, abi, vcpus=2)
    d0.bind_vcpu(p0, 1)
    assert d0.status(p0).vcpu == 1
    du.send(pu)
    assert d0.consume(0).size == 0
    assert d0.consume(1).tolist() == [p0]


@pytest.mark.parametrize("abi", ["2l", "3l"])
def test_bitmap_bind_vcpu_of_pending_port_moves_it(host, abi):
    d0, du, p0, pu = pair(host, abi, vcpus=2)
    du.send(pu)
    d0.bind_vcpu(p0, 1)  # Linux: mask, rebind, unmask re-raises
    assert d0.consume(0).size == 0
    assert d0.consume(1).tolist() == [p0]


def test_fifo_linked_event_stays_on_old_queue(host):
    d0, du, p0, pu = pair(host, "fifo", vcpus=2)
    du.send(pu)
    assert d0.is_linked(p0)
    d0.bind_vcpu(p0, 1)
    d0.set_priority(p0, 0)
    assert d0.consume(1).size == 0
    assert d0.consume(0).tolist() == [p0]  # in flight: delivered from the old queue
    du.send(pu)
    assert d0.consume(0).size == 0
    assert d0.consume(1).tolist() == [p0]  # the next link uses the new queue


def _fifo_ports(host, n, vcpus=1):
    d0 = host.create_domain("fifo", vcpus=vcpus)
    du = host.create_domain("fifo")
    p0s, pus = [], []
    for _ in range(n):
        p0 = d0.alloc_unbound(du.domid)
        p0s.append(p0)
        pus.append(du.bind_interdomain(d0.domid, p0))
    du.consume(0)
    return d0, du, p0s, pus


def test_fifo_priority_then_fifo_order(host):
    d0, du, p0s, pus = _fifo_ports(host, 8)
    prios = [7, 3, 7, 0, 3, 15, 0, 7]
    for p, prio in zip(p0s, prios):
        d0.set_priority(p, prio)
    order = [5, 2, 7, 0, 1, 6, 3, 4]
    du.send_many(np.array([pus[i] for i in order], np.uint32))
    got = d0.consume(0).tolist()
    want = [p0s[i] for i in sorted(order, key=lambda i: (prios[i], order.index(i)))]
    assert got == want


def test_fifo_higher_priority_preempts_between_events(host):
    """READY is re-read after every event: a new priority-0 event jumps the queue."""
    d0, du, p0s, pus = _fifo_ports(host, 4)
    d0.set_priority(p0s[3], 0)
    du.send_many(np.array(pus[:3], np.uint32))
    first = d0.consume(0, max_events=1).tolist()
    du.send(pus[3])
    rest = d0.consume(0).tolist()
    assert first == [p0s[0]] and rest == [p0s[3], p0s[1], p0s[2]]


def test_fifo_set_priority_errors(host):
    d0, du, p0, pu = pair(host, "fifo")
    with raises(errno.EINVAL):
        d0.set_priority(p0, 16)
    with raises(errno.EINVAL):
        d0.set_priority(p0, -1)
    with raises(errno.EACCES):
        d0.set_priority(10, 1)  # valid but not bound
    with raises(errno.EINVAL):
        d0.set_priority(10_000, 1)  # not a valid port
    d2 = host.create_domain("2l")
    q = d2.alloc_unbound(0)
    with raises(errno.ENOSYS):
        d2.set_priority(q, 1)


@pytest.mark.parametrize("abi", ABIS)
def test_consume_max_events_resumes(host, abi):
    d0 = host.create_domain(abi)
    du = host.create_domain(abi)
    pairs = [
        (p, du.bind_interdomain(d0.domid, p))
        for p in [d0.alloc_unbound(du.domid) for _ in range(10)]
    ]
    du.consume(0)
    du.send_many(np.array([u for _, u in pairs], np.uint32))
    got = []
    while d0.upcall_pending(0):
        got += d0.consume(0, max_events=3).tolist()
    assert sorted(got) == sorted(p for p, _ in pairs)
    out = np.zeros(4, np.uint32)
    assert d0.consume(0, out=out) == 0


@pytest.mark.parametrize("abi", ["2l", "3l"])
def test_bitmap_scan_resumes_after_last_port(host, abi):
    """Linux's fair scan: the next upcall starts right after the last port handled."""
    d0 = host.create_domain(abi)
    du = host.create_domain(abi)
    ports = [d0.alloc_unbound(du.domid) for _ in range(6)]
    remote = [du.bind_interdomain(d0.domid, p) for p in ports]
    du.consume(0)
    du.send_many(np.array(remote, np.uint32))
    assert d0.consume(0, max_events=2).tolist() == ports[:2]
    du.send(remote[0])  # a low port raised again
    assert d0.consume(0).tolist() == ports[2:] + ports[:1]


@pytest.mark.parametrize("abi", ["2l", "3l"])
def test_timer_virq_is_served_first(host, abi):
    d0, du, p0, pu = pair(host, abi)
    t = d0.bind_virq(L.VIRQ_TIMER)
    assert t > p0
    du.send(pu)
    d0.raise_virq(L.VIRQ_TIMER)
    assert d0.consume(0).tolist() == [t, p0]


@pytest.mark.parametrize("abi", ABIS)
def test_virq_rules(host, abi):
    d0 = host.create_domain(abi, vcpus=2)
    du = host.create_domain(abi, vcpus=2)
    t1 = d0.bind_virq(L.VIRQ_TIMER, 1)
    with raises(errno.EEXIST):
        d0.bind_virq(L.VIRQ_TIMER, 1)
    d0.bind_virq(L.VIRQ_TIMER, 0)  # per-vCPU: one per vCPU
    with raises(errno.EINVAL):
        d0.bind_virq(L.VIRQ_CONSOLE, 1)  # global VIRQs bind on vCPU 0 only
    with raises(errno.EINVAL):
        d0.bind_virq(24)
    with raises(errno.ENOENT):
        d0.bind_virq(L.VIRQ_TIMER, 2)
    with raises(errno.EBUSY):
        du.bind_virq(L.VIRQ_CONSOLE)  # global VIRQs belong to dom0
    c = d0.bind_virq(L.VIRQ_CONSOLE)
    with raises(errno.EINVAL):
        d0.bind_vcpu(t1, 0)  # per-vCPU VIRQ: fixed
    d0.bind_vcpu(c, 1)  # a global one can move
    d0.raise_virq(L.VIRQ_CONSOLE)
    assert d0.consume(1).tolist() == [c]
    d0.raise_virq(L.VIRQ_TIMER, 1)
    assert d0.consume(1).tolist() == [t1]
    with raises(errno.EINVAL):
        d0.send(t1)  # VIRQ ports cannot be sent on
    d0.close(t1)
    assert d0.bind_virq(L.VIRQ_TIMER, 1) == t1  # unbinding freed the VIRQ


@pytest.mark.parametrize("abi", ABIS)
def test_ipi_bind_vcpu_refused(host, abi):
    d = host.create_domain(abi, vcpus=2)
    i = d.bind_ipi(1)
    with raises(errno.EINVAL):
        d.bind_vcpu(i, 0)
    with raises(errno.ENOENT):
        d.bind_ipi(2)


# -- FIFO specifics -----------------------------------------------------------------------------
def test_fifo_closed_linked_port_not_reused_until_unlinked(host):
    d0, du, p0, pu = pair(host, "fifo")
    du.send(pu)
    assert d0.is_linked(p0)
    d0.close(p0)
    assert not d0.is_pending(p0) and d0.is_linked(p0)
    q = d0.alloc_unbound(du.domid)
    assert q != p0  # busy: still LINKED (78e24c269b)
    assert d0.consume(0).size == 0  # the guest drops it: not pending
    assert not d0.is_linked(p0)
    assert d0.alloc_unbound(du.domid) == p0


def test_fifo_send_before_array_page_is_replayed(host):
    d0 = host.create_domain("fifo", auto_expand=False)
    du = host.create_domain("fifo")
    d0.expand_array()
    for _ in range(1030):  # ports up to 1030: the second page is missing
        p0 = d0.alloc_unbound(du.domid)
    pu = du.bind_interdomain(d0.domid, p0)
    du.consume(0)
    assert p0 >= 1024
    du.send(pu)
    assert not d0.is_pending(p0) and d0.is_masked(p0)  # no word yet
    assert d0.consume(0).size == 0
    d0.expand_array()  # Linux fills the page MASKED; Xen replays
    assert d0.is_pending(p0)
    d0.unmask(p0)
    assert d0.consume(0).tolist() == [p0]


def test_fifo_expand_array_limit(host):
    d = host.create_domain("fifo", link_bits=11)
    d.expand_array()
    d.expand_array()
    with raises(errno.ENOSPC):
        d.expand_array()
    d2 = host.create_domain("2l")
    with raises(errno.EOPNOTSUPP):
        d2.expand_array()


# -- limits -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "abi,word_bits,link_bits,limit",
    [
        ("2l", 64, 17, 4096),
        ("2l", 32, 17, 1024),
        ("fifo", 64, 10, 1024),
        ("fifo", 64, 12, 4096),
    ],
)
def test_port_limits(host, abi, word_bits, link_bits, limit):
    d = host.create_domain(abi, word_bits=word_bits, link_bits=link_bits)
    assert d.max_ports == limit
    ports = [d.alloc_unbound(0) for _ in range(limit - 1)]
    assert ports[-1] == limit - 1
    with raises(errno.ENOSPC):
        d.alloc_unbound(0)


def test_abi_limits_reported():
    with evtchn.Host("reference") as h:
        assert h.create_domain("3l").max_ports == 262144
        assert h.create_domain("3l", word_bits=32).max_ports == 32768
        assert h.create_domain("fifo").max_ports == 131072
        assert h.create_domain("fifo", link_bits=28).max_ports == 1 << 28
        assert h.create_domain("fifo", max_ports=1024).max_ports == 1024


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(abi="4l"),
        dict(vcpus=0),
        dict(vcpus=-1),
        dict(vcpus="2"),
        dict(word_bits=48),
        dict(link_bits=29),
        dict(link_bits=9),
        dict(abi="2l", max_ports=4097),
        dict(max_ports=1),
    ],
)
def test_bad_domain_parameters(kwargs):
    with evtchn.Host("reference") as h:
        with pytest.raises(ValueError):
            h.create_domain(**kwargs)


def test_bad_ports_vcpus_domids(host):
    d0, du, p0, pu = pair(host, "fifo", vcpus=2)
    for bad in (-1, 64, 1 << 40):
        with raises(errno.EINVAL):
            d0.send(bad)
        with raises(errno.EINVAL):
            d0.close(bad)
        with raises(errno.EINVAL):
            d0.status(bad)
        with raises(errno.EINVAL):
            d0.hyp_unmask(bad)
    with raises(errno.EINVAL):
        d0.send("1")
    with raises(errno.EINVAL):
        d0.mask(1 << 17)
    with raises(errno.EINVAL):
        d0.close(0)  # reserved
    with raises(errno.EINVAL):
        d0.close(40)  # valid but free
    with raises(errno.ENOENT):
        d0.consume(2)
    with raises(errno.ENOENT):
        d0.wait(-1, 0)
    with raises(errno.ENOENT):
        d0.bind_vcpu(p0, 5)
    with raises(errno.ESRCH):
        d0.bind_interdomain(99, 1)
    with raises(errno.ESRCH):
        host.domain(99)
    with raises(errno.EINVAL):
        du.bind_interdomain(d0.domid, p0)  # not unbound any more
    other = host.create_domain("fifo")
    q = d0.alloc_unbound(du.domid)
    with raises(errno.EINVAL):
        other.bind_interdomain(d0.domid, q)  # reserved for du, not for `other`
    with pytest.raises(EvtchnError) as info:
        du.send_many(np.array([pu, pu, 12345], np.uint32))
    assert "index 2" in str(info.value) and d0.is_pending(p0)


def test_error_is_oserror_with_errno(host):
    d = host.create_domain("2l")
    with pytest.raises(OSError) as info:
        d.close(5)
    assert info.value.errno == errno.EINVAL and "port 5" in str(info.value)


# -- reset --------------------------------------------------------------------------------------
@pytest.mark.parametrize("abi", ABIS)
def test_reset_closes_everything(host, abi):
    d0, du, p0, pu = pair(host, abi, vcpus=2)
    d0.bind_ipi(1)
    d0.bind_virq(L.VIRQ_TIMER, 1)
    du.send(pu)
    d0.reset()
    for p in range(1, d0.valid_ports):
        assert d0.status(p).state == "closed"
    assert du.status(pu).state == "unbound"
    assert d0.consume(0).size == 0 and d0.consume(1).size == 0
    p = d0.bind_interdomain(du.domid, pu)  # usable again afterwards
    d0.consume(0)
    du.send(pu)
    assert d0.consume(0).tolist() == [p]


# -- memory -------------------------------------------------------------------------------------
def test_mapped_pages_per_abi():
    with evtchn.Host("reference") as h:
        assert h.create_domain("2l").mapped_pages() == 1
        assert h.create_domain("3l").mapped_pages() == 1 + 16 + 1
        assert h.create_domain("3l", word_bits=32).mapped_pages() == 1 + 2 + 1
        f = h.create_domain("fifo", vcpus=4)
        assert f.mapped_pages() == 4
        f.alloc_unbound(0)
        assert f.mapped_pages() == 5
        for _ in range(1024):
            f.alloc_unbound(0)
        assert f.mapped_pages() == 6


def test_layout_regions_and_xen_offsets(host):
    d0, du, p0, pu = pair(host, "2l", vcpus=34)
    lay = d0.layout()
    seg, off, size = lay["shared_info"]
    assert size == 4096 and "vcpu_info_vcpu33" in lay and "vcpu_info_vcpu31" not in lay
    raw = np.memmap(f"/dev/shm/{seg}", np.uint8, mode="r")
    du.send(pu)
    pending = raw[off + 2048 : off + 2560].view(np.uint64)
    assert int(pending[p0 // 64]) >> (p0 % 64) & 1
    assert raw[off + 0] == 1  # vcpu_info[0].evtchn_upcall_pending
    sel = raw[off + 8 : off + 16].view(np.uint64)[0]
    assert int(sel) >> (p0 // 64) & 1
    mask = raw[off + 2560 : off + 3072].view(np.uint64)
    assert not int(mask[p0 // 64]) >> (p0 % 64) & 1 and int(mask[99 // 64]) >> (99 % 64) & 1
    del raw


def test_layout_32bit_compat(host):
    d0, du, p0, pu = pair(host, "2l", word_bits=32)
    seg, off, _ = d0.layout()["shared_info"]
    raw = np.memmap(f"/dev/shm/{seg}", np.uint8, mode="r")
    du.send(pu)
    assert int(raw[off + 2048 : off + 2176].view(np.uint32)[p0 // 32]) >> (p0 % 32) & 1
    assert int(raw[off + 4 : off + 8].view(np.uint32)[0]) >> (p0 // 32) & 1
    assert int(raw[off + 2176 : off + 2304].view(np.uint32)[0]) >> 20 & 1  # masked
    del raw


def test_layout_fifo_event_words_and_control_block(host):
    d0, du, p0, pu = pair(host, "fifo", vcpus=2)
    lay = d0.layout()
    seg, ea, size = lay["event_array"]
    _, cb, cbsize = lay["control_block_vcpu1"]
    assert size == 4096 and cbsize == 72
    d0.bind_vcpu(p0, 1)
    d0.set_priority(p0, 4)
    du.send(pu)
    raw = np.memmap(f"/dev/shm/{seg}", np.uint8, mode="r")
    word = int(raw[ea + 4 * p0 : ea + 4 * p0 + 4].view(np.uint32)[0])
    assert word & (1 << 31) and word & (1 << 29) and not word & (1 << 30)
    ctl = raw[cb : cb + 72].view(np.uint32)
    assert int(ctl[0]) == 1 << 4 and int(ctl[2 + 4]) == p0
    del raw


def test_3l_layout(host):
    d0, du, p0, pu = pair(host, "3l", vcpus=2)
    lay = d0.layout()
    assert lay["3l_pending"][2] == 32768 and lay["3l_mask"][2] == 32768
    assert lay["3l_l2_selector_vcpu1"][2] == 512


def test_sparse_memory_for_huge_link_bits(host):
    import os

    d = host.create_domain("fifo", link_bits=28)
    for _ in range(10):
        d.alloc_unbound(0)
    seg = d.layout()["event_array"][0]
    st = os.stat(f"/dev/shm/{seg}")
    assert st.st_blocks * 512 < 1 << 20  # kilobytes backed, not a GiB
    assert d.mapped_pages() == 2


# -- hosts ----------------------------------------------------------------------------------
def test_attach_missing_and_bad_names():
    with pytest.raises(evtchn.HostGoneError):
        evtchn.Host.attach("evtchn-0-doesnotexist", "reference")
    with pytest.raises(EvtchnError):
        evtchn.Host.attach("../etc/passwd", "reference")


def test_attach_wrong_version(tmp_path):
    with evtchn.Host("reference") as h:
        h._hseg.u32[L.HH_VERSION // 4] = 99
        with pytest.raises(evtchn.HostGoneError, match="version"):
            evtchn.Host.attach(h.name, "reference")


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        evtchn.Host("fortran")
