"""The per-event handle calls: Domain.send maps a peer lazily (on the kernel's -ESRCH), and
consume / consume_one / consume_into reuse their buffers without handing them out."""

from __future__ import annotations

import numpy as np
import pytest

import evtchn
from evtchn import EvtchnError

ABIS = ["fifo", "2l", "3l"]


def test_send_reaches_a_peer_created_after_the_handle(backend):
    """The sender's process maps dom1 only when a send to it is refused (-ESRCH), then
    sends again; send_many goes on from the refused element."""
    with evtchn.Host(backend) as h:
        d0 = h.create_domain("fifo")
        other = evtchn.Host.attach(h.name, backend)
        try:
            d0_there = other.domain(d0.domid)  # this attachment maps dom0 only
            d1 = h.create_domain("fifo")
            p0 = d0.alloc_unbound_many(d1.domid, 3).tolist()
            p1 = d1.bind_interdomain_many(d0.domid, p0).tolist()
            d1.consume(0)
            assert 1 not in other._doms
            d0_there.send(p0[0])
            assert 1 in other._doms
            assert d1.consume(0).tolist() == [p1[0]]
            other2 = evtchn.Host.attach(h.name, backend)
            other2.domain(d0.domid).send_many(p0[1:])
            other2.close()
            assert d1.consume(0).tolist() == p1[1:]
        finally:
            other.close()


@pytest.mark.parametrize("abi", ABIS)
def test_consume_one_takes_the_handlers_order_one_at_a_time(backend, abi):
    with evtchn.Host(backend) as h:
        got = []
        for one in (False, True):
            d0 = h.create_domain(abi, vcpus=1)
            du = h.create_domain(abi)
            r = d0.alloc_unbound_many(du.domid, 70).tolist()
            local = du.bind_interdomain_many(d0.domid, r).tolist()
            if abi == "fifo":
                d0.set_priority(r[50], 2)
            du.send_many(local[::-1][::3])
            if one:
                ports = []
                while p := d0.consume_one(0):
                    ports.append(p)
            else:
                ports = []
                while (c := d0.consume(0, max_events=1)).size:
                    ports.append(int(c[0]))
            assert d0.consume_one(0) == 0 and not d0.upcall_pending(0)
            got.append(ports)
        assert got[0] == got[1] and len(got[0]) == len(local[::3])


def test_consume_results_are_the_callers(host):
    d0 = host.create_domain("fifo")
    du = host.create_domain("fifo")
    r = d0.alloc_unbound_many(du.domid, 4).tolist()
    local = du.bind_interdomain_many(d0.domid, r).tolist()
    du.send_many(local[:2])
    first = d0.consume(0)
    du.send_many(local[2:])
    second = d0.consume(0)
    assert first.tolist() == r[:2] and second.tolist() == r[2:]  # not one reused buffer
    first[0] = 0  # the caller's to keep and change
    none = d0.consume(0)
    assert none.size == 0 and none.dtype == np.uint32
    with pytest.raises(ValueError):
        d0.consume_into(0, np.empty(4, np.uint32)[::2])
    with pytest.raises(ValueError):
        d0.consume_into(0, np.empty((2, 2), np.uint32))
    with pytest.raises(ValueError):
        d0.consume_into(0, np.empty(4, ">u4"))
    with pytest.raises(EvtchnError):
        d0.consume_one(1)
    assert d0.consume_one(np.int64(0)) == 0
