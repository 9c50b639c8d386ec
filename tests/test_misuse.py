"""Misuse gets a clear error (issue 9, items 13-15): calls on a closed host, send_many with
ports that are not integers, and unpickled Domains sharing one attachment per process."""

from __future__ import annotations

import errno
import multiprocessing as mp
import pickle

import numpy as np
import pytest
from conftest import join_all

import evtchn
from evtchn import EvtchnError
from evtchn import layout as L
from evtchn.host import attached_host


def _pair(host):
    d0 = host.create_domain("fifo", vcpus=2)
    du = host.create_domain("fifo")
    p0 = d0.alloc_unbound(du.domid)
    pu = du.bind_interdomain(d0.domid, p0)
    return d0, du, p0, pu


DOMAIN_CALLS = {
    "send": lambda d, p: d.send(p),
    "send_many": lambda d, p: d.send_many([p]),
    "alloc_unbound": lambda d, p: d.alloc_unbound(0),
    "bind_interdomain": lambda d, p: d.bind_interdomain(0, 1),
    "bind_ipi": lambda d, p: d.bind_ipi(0),
    "bind_virq": lambda d, p: d.bind_virq(L.VIRQ_TIMER, 0),
    "close": lambda d, p: d.close(p),
    "status": lambda d, p: d.status(p),
    "bind_vcpu": lambda d, p: d.bind_vcpu(p, 0),
    "set_priority": lambda d, p: d.set_priority(p, 3),
    "hyp_unmask": lambda d, p: d.hyp_unmask(p),
    "expand_array": lambda d, p: d.expand_array(),
    "reset": lambda d, p: d.reset(),
    "raise_virq": lambda d, p: d.raise_virq(L.VIRQ_TIMER, 0),
    "mask": lambda d, p: d.mask(p),
    "unmask": lambda d, p: d.unmask(p),
    "is_pending": lambda d, p: d.is_pending(p),
    "is_masked": lambda d, p: d.is_masked(p),
    "is_linked": lambda d, p: d.is_linked(p),
    "upcall_pending": lambda d, p: d.upcall_pending(0),
    "set_upcall_mask": lambda d, p: d.set_upcall_mask(0, True),
    "consume": lambda d, p: d.consume(0),
    "consume_one": lambda d, p: d.consume_one(0),
    "alloc_unbound_many": lambda d, p: d.alloc_unbound_many(0, 2),
    "bind_interdomain_many": lambda d, p: d.bind_interdomain_many(0, [1]),
    "consume_into": lambda d, p: d.consume_into(0, np.empty(4, np.uint32)),
    "wait": lambda d, p: d.wait(0, 0),
    "poll": lambda d, p: d.poll(0, p, 0),
    "valid_ports": lambda d, p: d.valid_ports,
    "mapped_pages": lambda d, p: d.mapped_pages(),
    "layout": lambda d, p: d.layout(),
}
HOST_CALLS = {
    "create_domain": lambda h: h.create_domain("fifo"),
    "domain": lambda h: h.domain(0),
    "domains": lambda h: h.domains(),
    "ndomains": lambda h: h.ndomains,
    "warm_up": lambda h: h.warm_up(),
}


@pytest.mark.parametrize("call", sorted(DOMAIN_CALLS))
def test_every_domain_call_after_host_close_is_ebadf(backend, call):
    """Before issue 9, Domain handles kept working on the creator's unlinked memory."""
    host = evtchn.Host(backend)
    d0, du, p0, pu = _pair(host)
    host.close()
    with pytest.raises(EvtchnError, match="is closed") as exc:
        DOMAIN_CALLS[call](d0, p0)
    assert exc.value.errno == errno.EBADF


@pytest.mark.parametrize("call", sorted(HOST_CALLS))
def test_every_host_call_after_close_is_ebadf(backend, call):
    host = evtchn.Host(backend)
    host.create_domain("fifo")
    host.close()
    with pytest.raises(EvtchnError) as exc:
        HOST_CALLS[call](host)
    assert exc.value.errno == errno.EBADF
    assert "closed" in repr(host)


def test_closing_an_attachment_leaves_the_creator_working(backend):
    with evtchn.Host(backend) as host:
        d0, du, p0, pu = _pair(host)
        other = evtchn.Host.attach(host.name, backend)
        d0_there = other.domain(d0.domid)
        other.close()
        with pytest.raises(EvtchnError):
            d0_there.consume(0)
        du.send(pu)
        assert p0 in d0.consume(0).tolist()


NOT_PORTS = {
    "float list": lambda p: [p + 0.9],
    "float array": lambda p: np.array([p], np.float64),
    "bool array": lambda p: np.array([True]),
    "bools among ints": lambda p: [p, True],
    "numpy bool among ints": lambda p: [p, np.bool_(True)],
    "objects": lambda p: np.array([p, None], dtype=object),
    "strings": lambda p: ["1"],
    "a string": lambda p: "1",
    "two-dimensional": lambda p: np.array([[p]], np.uint32),
}


@pytest.mark.parametrize("kind", sorted(NOT_PORTS))
def test_send_many_refuses_anything_but_integer_ports(backend, kind):
    """Before issue 9, send_many([port + 0.9]) sent on `port` (numpy truncates)."""
    with evtchn.Host(backend) as host:
        d0, du, p0, pu = _pair(host)
        du.consume(0)
        with pytest.raises(EvtchnError) as exc:
            du.send_many(NOT_PORTS[kind](pu))
        assert exc.value.errno == errno.EINVAL
        assert not d0.is_pending(p0)  # nothing was sent
        ints = ([pu], (pu,), np.array([pu], np.int64), np.array([pu], np.uint16), range(pu, pu + 1))
        for ok in ints:
            assert du.send_many(ok) == 1
        assert d0.consume(0).tolist() == [p0]


def test_unpickled_domains_share_the_hosts_of_this_process(backend):
    """Unpickling (the creator's own Domain here) gives a Domain on the Host this process
    already has, not a second attachment; a closed Host is replaced by a new one."""
    with evtchn.Host(backend) as host:
        d0, du, p0, pu = _pair(host)
        a, b = pickle.loads(pickle.dumps([d0, du]))
        assert a.host is host and b.host is host
        other = evtchn.Host.attach(host.name, backend)
        other.close()
        c = pickle.loads(pickle.dumps(d0))
        assert c.host is host
        assert attached_host(host.name, backend) is host


def _unpickle_in_child(blob, backend, results):
    a, b = pickle.loads(blob)
    c = pickle.loads(blob)[0]
    results.put(
        (a.host is b.host is c.host, a.host.is_owner, len(a.host._doms), a.host.backend == backend)
    )
    a.host.close()
    d = pickle.loads(blob)[0]
    results.put((d.host is not a.host, d.consume(0).tolist() == []))


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_unpickled_domains_in_a_child_share_one_attachment(backend, method):
    """Each process maps a host once, however many Domains it unpickles; a forked child does
    not reuse its parent's Host objects (its cache starts empty)."""
    with evtchn.Host(backend) as host:
        d0, du, p0, pu = _pair(host)
        d0.consume(0)
        ctx = mp.get_context(method)
        results = ctx.Queue()
        child = ctx.Process(
            target=_unpickle_in_child, args=(pickle.dumps([d0, du]), backend, results)
        )
        child.start()
        join_all([child], 120)
        shared, owner, mapped, same_backend = results.get(timeout=5)
        assert shared and not owner and same_backend and mapped == 2
        assert results.get(timeout=5) == (True, True)
