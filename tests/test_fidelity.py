"""Where the model followed its own idea instead of Xen's or Linux's code (issue 9, items
8-11). Each expectation comes from the code named in the test: xen/common/event_channel.c and
event_fifo.c, Linux drivers/xen/events/events_base.c."""

from __future__ import annotations

import errno

import pytest

import evtchn
from evtchn import EvtchnError
from evtchn import layout as L


def test_bind_interdomain_allocates_the_local_port_before_checking_the_remote(backend):
    """evtchn_bind_interdomain: evtchn_get_port(ld, lport) (get_free_port) runs before
    _evtchn_from_port(rd, rport) is checked. A 32-bit 2-level domain with all 1023 ports in
    use binding to a bad remote port gets ENOSPC, not EINVAL."""
    with evtchn.Host(backend) as host:
        full = host.create_domain("2l", word_bits=32)
        peer = host.create_domain("2l", word_bits=32)
        for _ in range(1023):
            full.alloc_unbound(peer.domid)
        with pytest.raises(EvtchnError) as exc:
            full.bind_interdomain(peer.domid, 4000)
        assert exc.value.errno == errno.ENOSPC
        with pytest.raises(EvtchnError) as exc:  # a free port: then the remote is checked
            peer.bind_interdomain(full.domid, 4000)
        assert exc.value.errno == errno.EINVAL


def test_a_refused_bind_still_grows_the_port_buckets(backend):
    """get_free_port -> evtchn_allocate_port allocates the bucket holding the new port and
    raises valid_evtchns before evtchn_bind_interdomain looks at the remote port; the refusal
    that follows does not shrink it (XSA-338: valid_evtchns never shrinks)."""
    with evtchn.Host(backend) as host:
        d = host.create_domain("fifo")
        peer = host.create_domain("fifo")
        for _ in range(L.EVTCHNS_PER_BUCKET - 1):  # ports 1..63: the first bucket is full
            d.alloc_unbound(peer.domid)
        assert d.valid_ports == L.EVTCHNS_PER_BUCKET
        with pytest.raises(EvtchnError) as exc:
            d.bind_interdomain(peer.domid, 1)  # peer's port 1 is not unbound for d
        assert exc.value.errno == errno.EINVAL
        assert d.valid_ports == 2 * L.EVTCHNS_PER_BUCKET
        assert d.status(L.EVTCHNS_PER_BUCKET).state == "closed"
        assert d.alloc_unbound(peer.domid) == L.EVTCHNS_PER_BUCKET  # still the lowest free


@pytest.mark.parametrize("remote", [L.DOMID_FIRST_RESERVED + 5, 500, 0xFFFF])
def test_alloc_unbound_stores_the_remote_domid_unchecked(backend, remote):
    """evtchn_alloc_unbound: chn->u.unbound.remote_domid = alloc->remote_dom, checked by
    nothing but XSM's view of the local domain; DOMID_SELF alone is replaced (by the
    caller's id)."""
    with evtchn.Host(backend) as host:
        d = host.create_domain("fifo")
        p = d.alloc_unbound(remote)
        assert d.status(p).state == "unbound" and d.status(p).remote_domid == remote
        q = d.alloc_unbound(L.DOMID_SELF)
        assert d.status(q).remote_domid == d.domid
        with pytest.raises(EvtchnError) as exc:  # not a domid_t: the hypercall cannot carry it
            d.alloc_unbound(0x10000)
        assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize("abi", ["fifo", "2l", "3l"])
def test_close_leaves_the_port_masked_as_linux_unbinding_does(backend, abi):
    """unbind_from_irqhandler: free_irq -> irq_shutdown -> disable_dynirq -> mask_evtchn,
    then unbind_from_irq -> xen_evtchn_close (EVTCHNOP_close); nothing unmasks the port
    after. Binding it again enables (unmasks) it as request_irq does."""
    with evtchn.Host(backend) as host:
        d = host.create_domain(abi)
        peer = host.create_domain(abi)
        p = d.alloc_unbound(peer.domid)
        assert not d.is_masked(p)
        d.close(p)
        assert d.is_masked(p)
        assert d.alloc_unbound(peer.domid) == p and not d.is_masked(p)


def test_reset_closes_without_the_guest_mask(backend):
    """evtchn_reset closes every port with evtchn_close alone: no guest is involved, so a
    2-level port's mask bit stays as the guest left it."""
    with evtchn.Host(backend) as host:
        d = host.create_domain("2l")
        p = d.bind_ipi(0)
        d.reset()
        assert d.status(p).state == "closed" and not d.is_masked(p)


def test_fifo_priority_of_ports_never_bound(backend):
    """evtchn_fifo_init_control's setup_ports gives priority 7 to every port valid when the
    domain switches to FIFO (ports 1..63, the first bucket; port 0 is skipped); a bucket
    allocated later comes zeroed (alloc_evtchn_bucket: xzalloc_array), so its ports read 0
    until evtchn_fifo_init sets 7 when one is bound; evtchn_free leaves the priority alone."""
    with evtchn.Host(backend) as host:
        d = host.create_domain("fifo")
        peer = host.create_domain("fifo")
        assert d.status(5).state == "closed" and d.status(5).priority == 7
        assert d.status(0).priority == 0
        for _ in range(L.EVTCHNS_PER_BUCKET):  # ports 1..64: a second bucket
            last = d.alloc_unbound(peer.domid)
        assert d.valid_ports == 2 * L.EVTCHNS_PER_BUCKET
        assert d.status(last).priority == 7  # bound: evtchn_fifo_init
        assert d.status(last + 1).priority == 0  # never bound, in the new bucket
        d.set_priority(last, 3)
        d.close(last)
        assert d.status(last).priority == 3
        d.reset()  # back to 2-level, and the guest's init_control runs setup_ports again
        assert d.status(last).priority == 7 and d.status(last + 1).priority == 7
