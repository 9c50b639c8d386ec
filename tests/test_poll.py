"""SCHEDOP_poll (xen/common/sched/core.c do_poll) and evtchn_check_pollers, on every backend;
wake-ups from another process on the compiled ones (conformance scenario C10)."""

from __future__ import annotations

import errno
import multiprocessing as mp
import time

import pytest
from conftest import join_all

import evtchn
from evtchn import EvtchnError
from evtchn import layout as L

ABIS = ["fifo", "2l", "3l"]


def pair(host, abi, nports=1, vcpus=1):
    """dom0 with `nports` ports bound from a domU; returns (dom0, domu, [(dom0 port, local)])."""
    d0 = host.create_domain(abi, vcpus=vcpus)
    du = host.create_domain(abi)
    chans = []
    for _ in range(nports):
        p0 = d0.alloc_unbound(du.domid)
        chans.append((p0, du.bind_interdomain(d0.domid, p0)))
    du.consume(0)
    return d0, du, chans


def pollers(dom) -> int:
    return dom._dm.hdr(L.H_POLLERS)


@pytest.mark.parametrize("abi", ABIS)
def test_times_out_when_nothing_is_pending(host, abi):
    d0, _, [(p0, _)] = pair(host, abi)
    t0 = time.monotonic()
    r = d0.poll(0, [p0], timeout=0.05)
    assert r == evtchn.PollResult("timeout", 0) and not r
    assert time.monotonic() - t0 >= 0.045
    assert pollers(d0) == 0  # the poll_mask bit is cleared again


@pytest.mark.parametrize("abi", ABIS)
def test_returns_at_once_for_a_pending_port_even_masked(host, abi):
    d0, du, [(p0, pu), (p1, _)] = pair(host, abi, 2)
    d0.mask(p0)
    du.send(pu)
    assert not d0.upcall_pending(0)
    r = d0.poll(0, [p1, p0], timeout=5)  # masked and pending: poll returns anyway
    assert r == evtchn.PollResult("pending", p0) and r
    assert d0.is_pending(p0)  # poll does not consume the event
    r = d0.poll(0, p0, timeout=5)  # a single port as an int
    assert r.reason == "pending"


@pytest.mark.parametrize("abi", ABIS)
def test_unmasked_upcall_pending_returns_at_once(host, abi):
    """local_events_need_delivery() is tested before the ports: an upcall the vCPU could
    take ends the poll, whichever port raised it."""
    d0, du, [(p0, pu), (p1, _)] = pair(host, abi, 2)
    du.send(pu)
    assert d0.upcall_pending(0)
    assert d0.poll(0, [p1], timeout=5).reason == "upcall"
    d0.set_upcall_mask(0, True)  # events masked: the upcall does not count
    assert d0.poll(0, [p1], timeout=0.01).reason == "timeout"
    assert d0.poll(0, [p0], timeout=0.01).reason == "pending"


@pytest.mark.parametrize("abi", ABIS)
def test_errors(host, abi):
    d0, _, [(p0, _)] = pair(host, abi)
    with pytest.raises(EvtchnError) as e:
        d0.poll(0, [p0, d0.valid_ports], timeout=0)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(EvtchnError) as e:
        d0.poll(0, [p0] * (L.SCHED_POLL_MAX_PORTS + 1), timeout=0)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(EvtchnError) as e:
        d0.poll(0, [-1], timeout=0)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(EvtchnError) as e:
        d0.poll(1, [p0], timeout=0)  # no such vCPU
    assert e.value.errno == errno.ENOENT
    with pytest.raises(ValueError):
        d0.poll(0, [p0], timeout=-1)
    assert d0.poll(0, [p0] * L.SCHED_POLL_MAX_PORTS, timeout=0).reason == "timeout"
    for unusable in (0, d0.alloc_unbound(d0.domid) + 1):  # reserved port 0, a free port
        with pytest.raises(EvtchnError) as e:  # (d4bfa0c78f)
            d0.poll(0, [p0, unusable], timeout=0)
        assert e.value.errno == errno.EINVAL and "not in use" in str(e.value)
    closed = d0.alloc_unbound(d0.domid)
    d0.close(closed)
    with pytest.raises(EvtchnError):
        d0.poll(0, [closed], timeout=0)
    assert pollers(d0) == 0


# -- wake-ups from another process ---------------------------------------------------------------
def _send_later(name, backend, domid, port, delay):
    host = evtchn.Host.attach(name, backend)
    try:
        time.sleep(delay)
        host.domain(domid).send(port)
    finally:
        host.close()


def _poll_while_sending(host, backend, d0, du, poll_ports, send_port, timeout=10.0):
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=_send_later, args=(host.name, backend, du.domid, send_port, 0.2))
    proc.start()
    try:
        t0 = time.monotonic()
        r = d0.poll(0, poll_ports, timeout=timeout)
        took = time.monotonic() - t0
    finally:
        join_all([proc], 60)
    return r, took


@pytest.mark.parametrize("abi", ABIS)
def test_woken_by_the_edge_on_the_polled_port(host, compiled, abi):
    d0, du, [(p0, pu), (p1, pu1)] = pair(host, abi, 2)
    # Upcalls masked and one already pending (from p1): the edge on p0 sets no upcall flag
    # 0 -> 1, so no kick can end the poll first; only the pollers check wakes us.
    d0.set_upcall_mask(0, True)
    du.send(pu1)
    r, took = _poll_while_sending(host, compiled, d0, du, [p0], pu)
    assert r == evtchn.PollResult("event", p0) and took < 9
    assert d0.is_pending(p0) and pollers(d0) == 0


@pytest.mark.parametrize("abi", ABIS)
def test_woken_by_a_masked_port(host, compiled, abi):
    d0, du, [(p0, pu)] = pair(host, abi)
    d0.mask(p0)  # no upcall at all: the pollers check wakes
    r, _ = _poll_while_sending(host, compiled, d0, du, [p0], pu)
    assert r == evtchn.PollResult("event", p0)
    assert not d0.upcall_pending(0)


@pytest.mark.parametrize("abi", ABIS)
def test_other_unmasked_port_interrupts_the_poll(host, compiled, abi):
    """vcpu_kick unblocks a polling vCPU: an event on another port bound to it ends the
    poll (the upcall flag goes 0 -> 1), also with upcalls masked."""
    d0, du, [(p0, _), (p1, pu1)] = pair(host, abi, 2)
    d0.set_upcall_mask(0, True)
    r, took = _poll_while_sending(host, compiled, d0, du, [p0], pu1)
    assert r == evtchn.PollResult("upcall", 0) and took < 9


@pytest.mark.parametrize("abi", ["fifo", "2l"])
def test_other_masked_port_does_not_wake_a_single_port_poll(host, compiled, abi):
    """A single-port poll records the port (poll_evtchn): an edge on a masked port that is
    not polled raises no upcall and wakes nobody."""
    d0, du, [(p0, _), (p1, pu1)] = pair(host, abi, 2)
    d0.mask(p1)
    r, took = _poll_while_sending(host, compiled, d0, du, [p0], pu1, timeout=1.0)
    assert r.reason == "timeout" and took >= 0.95
    assert d0.is_pending(p1)


@pytest.mark.parametrize("abi", ["fifo", "2l"])
def test_several_ports_are_woken_by_any_edge(host, compiled, abi):
    """Polling several ports, poll_evtchn is -1: Xen wakes the vCPU for an edge on any port
    of the domain (potentially interested), so the guest must re-check."""
    d0, du, [(p0, _), (p1, _), (p2, pu2)] = pair(host, abi, 3)
    d0.mask(p2)
    r, _ = _poll_while_sending(host, compiled, d0, du, [p0, p1], pu2)
    assert r == evtchn.PollResult("event", p2)


def _poll_in_child(name, backend, vcpu, port, results, i):
    host = evtchn.Host.attach(name, backend)
    try:
        r = host.domain(0).poll(vcpu, [port], timeout=20)
        results[i] = (r.reason, r.port)
    finally:
        host.close()


@pytest.mark.parametrize("abi", ["fifo", "2l"])
def test_two_pollers_each_woken_by_its_own_port(host, compiled, abi):
    """Two vCPUs poll different masked ports (no upcall can wake them): each edge wakes
    exactly the vCPU polling its port, and the pollers count returns to 0."""
    d0, du, [(p0, pu0), (p1, pu1)] = pair(host, abi, 2, vcpus=2)
    d0.mask(p0)
    d0.mask(p1)
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    procs = [
        ctx.Process(target=_poll_in_child, args=(host.name, compiled, v, p, results, v))
        for v, p in ((0, p0), (1, p1))
    ]
    for pr in procs:
        pr.start()
    deadline = time.monotonic() + 30
    while pollers(d0) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pollers(d0) == 2
    du.send(pu1)
    join_all(procs[1:], 30)
    assert results[1] == ("event", p1) and pollers(d0) == 1  # vCPU 0 still polls
    du.send(pu0)
    join_all(procs[:1], 30)
    assert results[0] == ("event", p0) and pollers(d0) == 0
