"""The per-channel lock across processes: Xen's rwlock modelled as one owner word whose
read-type holders (send, EVTCHNOP_unmask, VIRQ raisers) carry CHANNEL_LOCK_READER."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
from conftest import join_all

import evtchn
from evtchn import layout as L
from evtchn.owner import owner_id


def _hold(name, backend, domid, port, reader, seconds, ready):
    host = evtchn.Host.attach(name, backend)
    try:
        addr = host.domain(domid)._chan_addr(domid, port)
        host._k.lock(addr, reader=reader)
        ready.set()
        time.sleep(seconds)
        host._k.unlock(addr)
    finally:
        host.close()


def _holding(host, backend, domid, port, reader, seconds):
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold, args=(host.name, backend, domid, port, reader, seconds, ready))
    proc.start()
    assert ready.wait(60), "the lock holder did not start"
    return proc


@pytest.mark.parametrize("abi", ["fifo", "2l"])
def test_virq_waits_for_a_reader_and_is_dropped_by_a_writer(host, compiled, abi):
    """evtchn_read_trylock fails only against a writer (close, bind): a VIRQ raised while a
    send or an unmask holds the port is delivered, while a close or bind holds it, dropped."""
    d0 = host.create_domain(abi)
    p = d0.bind_virq(L.VIRQ_TIMER, 0)
    proc = _holding(host, compiled, 0, p, True, 0.3)
    t0 = time.monotonic()
    assert host._k.raise_virq(0, L.VIRQ_TIMER, 0) == 1
    assert time.monotonic() - t0 >= 0.2  # it waited for the reader
    join_all([proc], 60)
    assert d0.consume(0).tolist() == [p]
    proc = _holding(host, compiled, 0, p, False, 0.3)
    assert host._k.raise_virq(0, L.VIRQ_TIMER, 0) == 0
    join_all([proc], 60)
    assert not d0.is_pending(p)


def _hold_forever(name, backend, domid, port, ready):
    host = evtchn.Host.attach(name, backend)
    host._k.lock(host.domain(domid)._chan_addr(domid, port), reader=True)
    ready.set()
    time.sleep(600)


def test_a_killed_reader_does_not_hang_the_port(host, compiled):
    """A process killed while it holds a channel lock read-type (mid-send) is noticed as dead
    and its lock taken over: later sends on the port complete."""
    d0 = host.create_domain("fifo")
    du = host.create_domain("fifo")
    p0 = d0.alloc_unbound(du.domid)
    pu = du.bind_interdomain(d0.domid, p0)
    du.consume(0)
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_forever, args=(host.name, compiled, du.domid, pu, ready))
    proc.start()
    assert ready.wait(60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    t0 = time.monotonic()
    du.send(pu)
    assert time.monotonic() - t0 < 30
    assert d0.consume(0).tolist() == [p0]


def _rebind_loop(name, backend, port, seconds, ready):
    host = evtchn.Host.attach(name, backend)
    try:
        d0 = host.domain(0)
        ready.set()
        end = time.monotonic() + seconds
        v = 0
        while time.monotonic() < end:
            v ^= 1
            d0.bind_vcpu(port, v)
    finally:
        host.close()


def test_bind_vcpu_does_not_drop_a_global_virq(host, compiled):
    """Xen's bind_vcpu takes no channel lock, so a global VIRQ raised while its port is being
    re-bound to another vCPU is never dropped."""
    d0 = host.create_domain("fifo", vcpus=2)
    p = d0.bind_virq(L.VIRQ_CONSOLE, 0)
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_rebind_loop, args=(host.name, compiled, p, 1.5, ready))
    proc.start()
    assert ready.wait(60)
    raised = dropped = 0
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        d0.consume(0)
        d0.consume(1)
        if d0.is_pending(p):
            continue  # masked by the rebind: not deliverable yet
        raised += 1
        # 0 and still not pending: dropped (0 and pending: the rebind's unmask re-raised it)
        if host._k.raise_virq(0, L.VIRQ_CONSOLE, 0) == 0 and not d0.is_pending(p):
            dropped += 1
    join_all([proc], 60)
    assert raised > 100 and dropped == 0


def test_a_virq_takes_over_the_lock_of_a_writer_that_died(host, compiled):
    """A control-plane writer (close, bind) killed while it holds the port's channel lock never
    releases it. Xen's read_trylock fails only against a live writer; a dead one's lock is
    taken over, as every other lock wait does, so the VIRQ is not dropped forever."""
    d0 = host.create_domain("fifo")
    p = d0.bind_virq(L.VIRQ_TIMER, 0)
    addr = d0._chan_addr(0, p)
    word = (addr - d0._dm.seg.address) // 8
    d0._dm.seg.u64[word] = owner_id() + (1 << 32)  # our tid, another start time: dead
    assert host._k.raise_virq(0, L.VIRQ_TIMER, 0) == 1
    assert d0._dm.seg.u64[word] == 0  # taken over, then released
    assert d0.consume(0).tolist() == [p]
