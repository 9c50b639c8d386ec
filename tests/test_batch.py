"""Batch binding (Domain.alloc_unbound_many, bind_interdomain_many) against the single ops.

Each batch must leave every byte of both domains' segments as the same single ops made in a
row would (lock words are 0 when idle, so whole segments compare), return the same ports, and
do so on every backend; a refused batch raises BatchError naming the element and the errno the
single op gives there, and changes nothing. Then processes race: a batch bind against closes
and sends on the same ports, after which no channel may be half-bound.
"""

from __future__ import annotations

import errno
import multiprocessing as mp

import pytest
from conftest import _available, join_all

import evtchn
from evtchn import BatchError, EvtchnError
from evtchn import layout as L

ABIS = ["fifo", "2l", "3l"]
LINK_BITS = 12  # small FIFO domains: whole-segment compares stay cheap


def segments(host):
    return [bytes(host._dm(d).seg.u8) for d in range(host.ndomains)]


def scarred(host, abi):
    """dom0 and domU with history: holes of closed ports, an unbound port for another domain,
    and (fifo) a closed port still LINKED, which get_free_port must skip."""
    kw = {"link_bits": LINK_BITS} if abi == "fifo" else {}
    d0 = host.create_domain(abi, vcpus=2, **kw)
    du = host.create_domain(abi, vcpus=1, **kw)
    ports = [d0.alloc_unbound(du.domid) for _ in range(70)]
    for p in ports[3:9] + ports[40:44]:
        d0.close(p)
    d0.alloc_unbound(9)
    if abi == "fifo":
        lp = du.bind_interdomain(d0.domid, ports[20])
        du.send(lp)
        d0.close(ports[20])  # still LINKED on vCPU 0's queue
    return d0, du


def alloc_then_bind(host, abi, batch, n):
    d0, du = scarred(host, abi)
    if batch:
        r = d0.alloc_unbound_many(du.domid, n).tolist()
        local = du.bind_interdomain_many(d0.domid, r).tolist()
    else:
        r = [d0.alloc_unbound(du.domid) for _ in range(n)]
        local = [du.bind_interdomain(d0.domid, p) for p in r]
    return r, local, segments(host)


@pytest.mark.parametrize("abi", ABIS)
def test_batch_is_the_single_ops_in_a_row(backend, abi):
    n = 150  # crosses bucket (64) boundaries; fifo: the LINKED port is skipped
    with evtchn.Host(backend) as h1, evtchn.Host(backend) as h2:
        single = alloc_then_bind(h1, abi, False, n)
        batch = alloc_then_bind(h2, abi, True, n)
    assert batch[:2] == single[:2]
    assert batch[2] == single[2]


@pytest.mark.parametrize("abi", ["fifo", "2l"])
def test_batch_bytes_agree_across_backends(abi):
    backends = [b for b in evtchn.BACKENDS if _available(b)]
    results = []
    for b in backends:
        with evtchn.Host(b) as h:
            results.append(alloc_then_bind(h, abi, True, 100))
    for b, r in zip(backends[1:], results[1:]):
        assert r == results[0], f"{b} differs from {backends[0]}"


def test_batch_loopback_and_zero(host):
    d = host.create_domain("fifo", link_bits=LINK_BITS)
    r = d.alloc_unbound_many(L.DOMID_SELF, 5)
    local = d.bind_interdomain_many(L.DOMID_SELF, r)
    assert r.tolist() == [1, 2, 3, 4, 5] and local.tolist() == [6, 7, 8, 9, 10]
    for p, q in zip(r.tolist(), local.tolist()):
        assert d.status(p).remote_port == q and d.status(q).remote_port == p
    assert d.alloc_unbound_many(0, 0).size == 0
    assert d.bind_interdomain_many(0, []).size == 0


def refused(host, fn, code, index):
    before = segments(host)
    with pytest.raises(BatchError, match=errno.errorcode[code]) as info:
        fn()
    assert info.value.errno == code and info.value.index == index
    assert segments(host) == before, "a refused batch changed the domains"


def test_alloc_unbound_many_enospc_allocates_none(host):
    d = host.create_domain("2l", max_ports=100)
    d.alloc_unbound(1)
    refused(host, lambda: d.alloc_unbound_many(1, 99), errno.ENOSPC, 98)
    assert d.alloc_unbound_many(1, 98).size == 98


def test_bind_interdomain_many_refusals_bind_none(host):
    d0 = host.create_domain("fifo", link_bits=LINK_BITS)
    du = host.create_domain("fifo", link_bits=LINK_BITS, max_ports=8)
    other = host.create_domain("fifo", link_bits=LINK_BITS)
    r = d0.alloc_unbound_many(du.domid, 10).tolist()
    foreign = d0.alloc_unbound(other.domid)
    ipi = d0.bind_ipi()
    refused(host, lambda: du.bind_interdomain_many(d0.domid, [r[0], 999]), errno.EINVAL, 1)
    refused(host, lambda: du.bind_interdomain_many(d0.domid, [r[0], -1]), errno.EINVAL, 1)
    refused(host, lambda: du.bind_interdomain_many(d0.domid, r[:2] + [foreign]), errno.EINVAL, 2)
    refused(host, lambda: du.bind_interdomain_many(d0.domid, [ipi]), errno.EINVAL, 0)
    refused(host, lambda: du.bind_interdomain_many(d0.domid, [r[1], r[2], r[1]]), errno.EINVAL, 2)
    # du has 7 usable ports: element 7 finds none (ENOSPC comes before its remote-port check,
    # as in the single op; an earlier bad remote port is refused first).
    refused(host, lambda: du.bind_interdomain_many(d0.domid, r[:8]), errno.ENOSPC, 7)
    refused(host, lambda: du.bind_interdomain_many(d0.domid, r[:7] + [999]), errno.ENOSPC, 7)
    refused(host, lambda: du.bind_interdomain_many(d0.domid, [999] + r[:8]), errno.EINVAL, 0)
    with pytest.raises(EvtchnError, match="ESRCH"):
        du.bind_interdomain_many(77, r[:1])
    with pytest.raises(EvtchnError, match="EINVAL"):
        du.bind_interdomain_many(d0.domid, [1.5])
    with pytest.raises(EvtchnError, match="EINVAL"):
        d0.alloc_unbound_many(du.domid, -1)
    assert du.bind_interdomain_many(d0.domid, r[:7]).tolist() == list(range(1, 8))


# -- racing processes ------------------------------------------------------------------------
def _closer(name, backend, domid, ports, go):
    host = evtchn.Host.attach(name, backend)
    d = host.domain(domid)
    go.wait()
    for p in ports:
        try:
            d.close(p)
        except EvtchnError as exc:
            assert exc.errno == errno.EINVAL
    host.close()


def _sender(name, backend, domid, ports, go):
    host = evtchn.Host.attach(name, backend)
    d = host.domain(domid)
    go.wait()
    for _ in range(20):
        for p in ports:
            try:
                d.send(p)  # unbound: dropped; interdomain: raised on the binder
            except EvtchnError as exc:
                assert exc.errno == errno.EINVAL  # closed meanwhile
    host.close()


def whole_channels(d0, du, ports0):
    """Every port of dom0 named in ports0 is unbound for du, or interdomain with a domU port
    that points back at it; every interdomain port of du points at such a dom0 port."""
    for p in ports0:
        s = d0.status(p)
        if s.state == "interdomain":
            back = du.status(s.remote_port)
            assert (back.state, back.remote_domid, back.remote_port) == ("interdomain", 0, p)
        else:
            assert s.state in ("unbound", "closed")
    for q in range(1, du.valid_ports):
        s = du.status(q)
        if s.state == "interdomain":
            back = d0.status(s.remote_port)
            assert (back.state, back.remote_port) == ("interdomain", q)


@pytest.mark.parametrize("abi", ["fifo", "2l"])
def test_batch_bind_races_closes_and_sends(host, compiled, abi):
    """A batch bind of 512 ports while another process closes them and a third sends on
    them: either the bind came first (all bound; the closes unbind some) or a close did
    (EINVAL, none bound). Never a half-bound channel; every event raised arrives once."""
    ctx = mp.get_context("spawn")
    d0 = host.create_domain(abi, vcpus=1)
    du = host.create_domain(abi, vcpus=1)
    ports0 = d0.alloc_unbound_many(du.domid, 512).tolist()
    go = ctx.Event()
    procs = [
        ctx.Process(target=_closer, args=(host.name, compiled, 0, ports0[::-7], go)),
        ctx.Process(target=_sender, args=(host.name, compiled, 0, ports0[::3], go)),
    ]
    for p in procs:
        p.start()
    go.set()
    try:
        local = du.bind_interdomain_many(d0.domid, ports0).tolist()
    except BatchError as exc:
        assert exc.errno == errno.EINVAL
        local = []
    join_all(procs, 120)
    whole_channels(d0, du, ports0)
    assert host._dm(0).lock_words() == {} and host._dm(1).lock_words() == {}
    got = du.consume(0).tolist()
    assert len(got) == len(set(got)) and set(got) == set(local)  # each bind set one pending


@pytest.mark.parametrize("batch", [False, True])
def test_no_port_beyond_max_ports(host, batch):
    """A bucket reaches past a max_ports that is not a multiple of 64: get_free_port still
    stops at the limit (Xen: port > max_evtchn_port is ENOSPC)."""
    d = host.create_domain("fifo", link_bits=LINK_BITS, max_ports=8)
    if batch:
        assert d.alloc_unbound_many(0, 7).tolist() == list(range(1, 8))
        with pytest.raises(BatchError, match="ENOSPC"):
            d.alloc_unbound_many(0, 1)
    else:
        assert [d.alloc_unbound(0) for _ in range(7)] == list(range(1, 8))
    with pytest.raises(EvtchnError, match="ENOSPC"):
        d.alloc_unbound(0)


def test_alloc_unbound_many_with_a_remote_domid_per_element(backend):
    remotes = [1, L.DOMID_SELF, 2, 1, 0xFFFF, 2] * 20
    with evtchn.Host(backend) as h1, evtchn.Host(backend) as h2:
        d1, d2 = scarred(h1, "2l")[0], scarred(h2, "2l")[0]
        single = [d1.alloc_unbound(r) for r in remotes]
        batch = d2.alloc_unbound_many(remotes).tolist()
        assert batch == single and segments(h1) == segments(h2)
        refused(h2, lambda: d2.alloc_unbound_many([1, 2, 0x10000, 1]), errno.EINVAL, 2)
        refused(h2, lambda: d2.alloc_unbound_many([1, -1]), errno.EINVAL, 1)
        with pytest.raises(EvtchnError, match="EINVAL"):
            d2.alloc_unbound_many([1.0, 2.0])
        assert d2.alloc_unbound_many([]).size == 0
