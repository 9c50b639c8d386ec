"""Waiters of a vCPU (issue 9, item 7) and the guest's FIFO unmask against a BUSY bit left by
a killed sender (item 2).

A waiter registers in one of the vCPU's waiter slots (its owner id) and sets the slot's bit in
the bitmap kicks read; a process killed while blocked leaves both behind, which made every
later kick of the vCPU pay a futex system call. The next wait() or poll() repairs them.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import numpy as np
from conftest import join_all

import evtchn
from evtchn import layout as L
from evtchn.owner import _proc_stat, make_owner

SPAWN = mp.get_context("spawn")
JOIN_S = 120


def _pair(host):
    d0 = host.create_domain("fifo")
    du = host.create_domain("fifo")
    p0 = d0.alloc_unbound(du.domid)
    pu = du.bind_interdomain(d0.domid, p0)
    du.consume(0)
    return d0, du, p0, pu


def _kick_count(dom, vcpu):
    return dom._dm.xen_vcpu_u32(vcpu, L.X_KICK)


def _wait_forever(name, backend, ready):
    host = evtchn.Host.attach(name, backend)
    host.warm_up()
    ready.set()
    host.domain(0).wait(0)


def test_a_waiter_killed_in_wait_is_repaired_by_the_next_wait(compiled):
    """SIGKILL a process blocked in wait(): its slot and bit stay, so a kick still bumps the
    kick word and calls futex_wake. The next wait() on the vCPU frees them; from then on a
    kick of the idle vCPU costs no system call (the kick word stays put)."""
    with evtchn.Host(compiled) as host:
        d0, du, p0, pu = _pair(host)
        ready = SPAWN.Event()
        child = SPAWN.Process(target=_wait_forever, args=(host.name, compiled, ready))
        child.start()
        try:
            assert ready.wait(JOIN_S)
            deadline = time.monotonic() + JOIN_S
            while d0._dm.waiters(0)[0] == 0:  # registered: about to sleep in the futex
                assert time.monotonic() < deadline and child.is_alive()
                time.sleep(0.01)
            bitmap, slots = d0._dm.waiters(0)
            assert bitmap == 1 and slots[0] & L.OWNER_TID_MASK == child.pid
        finally:
            child.kill()
            child.join(30)
        assert d0._dm.waiters(0)[0] == 1  # left behind by the dead waiter
        k0 = _kick_count(d0, 0)
        du.send(pu)  # raises the upcall: kicks the vCPU it thinks is blocked
        assert _kick_count(d0, 0) == k0 + 1
        assert d0.consume(0).tolist() == [p0]
        assert d0.wait(0, timeout=0.01) is False  # repairs on entry
        assert d0._dm.waiters(0) == (0, [0] * L.WAITER_SLOTS)
        k1 = _kick_count(d0, 0)
        du.send(pu)
        assert _kick_count(d0, 0) == k1  # nobody registered: no futex_wake
        assert d0.wait(0, timeout=0) is True
        assert d0.consume(0).tolist() == [p0]


def test_poll_repairs_too(compiled):
    """SCHEDOP_poll blocks the vCPU the same way and repairs on entry as wait() does."""
    with evtchn.Host(compiled) as host:
        d0, du, p0, pu = _pair(host)
        x = d0._dm.layout.xen_vcpu(0)
        dead = (1 << 32) | L.OWNER_TID_MASK  # an owner id no thread has
        d0._dm.u64[(x + L.X_WAITER) // 8 + 3] = dead
        d0._dm.u32[(x + L.X_WAITERS) // 4] = 1 << 3
        assert d0.poll(0, p0, timeout=0.01).reason == "timeout"
        assert d0._dm.waiters(0) == (0, [0] * L.WAITER_SLOTS)


def test_live_waiters_are_not_repaired_away(compiled):
    """A slot whose owner is alive (another thread) is left alone by a repair, and a thread
    blocked in wait() is still woken by a send while others come and go."""
    with evtchn.Host(compiled) as host:
        d0, du, p0, pu = _pair(host)
        x = d0._dm.layout.xen_vcpu(0)
        stop = threading.Event()
        holder = threading.Thread(target=stop.wait)
        holder.start()
        try:
            live = make_owner(holder.native_id, _proc_stat(holder.native_id)[1])
            d0._dm.u64[(x + L.X_WAITER) // 8 + 5] = live
            d0._dm.u32[(x + L.X_WAITERS) // 4] = 1 << 5
            assert d0.wait(0, timeout=0.01) is False
            assert d0.poll(0, [p0], timeout=0.01).reason == "timeout"
            assert d0._dm.waiters(0) == (1 << 5, [0] * 5 + [live] + [0] * 10)
        finally:
            stop.set()
            holder.join()
        d0._dm.u64[(x + L.X_WAITER) // 8 + 5] = 0
        d0._dm.u32[(x + L.X_WAITERS) // 4] = 0
        woke = []
        t = threading.Thread(target=lambda: woke.append(d0.wait(0, timeout=JOIN_S)))
        t.start()
        deadline = time.monotonic() + 30
        while d0._dm.waiters(0)[0] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert d0.poll(0, [p0], timeout=0.05).reason == "timeout"  # enters and leaves beside it
        du.send(pu)
        t.join(30)
        assert woke == [True]
        assert d0._dm.waiters(0) == (0, [0] * L.WAITER_SLOTS)


def test_with_every_slot_taken_wait_polls_the_upcall_flag(compiled):
    """WAITER_SLOTS live waiters registered: one more waiter gets no slot, so kicks do not
    know about it; it polls the upcall flag every WAIT_FALLBACK_NS instead, and still sees
    an event and its timeout."""
    with evtchn.Host(compiled) as host:
        d0, du, p0, pu = _pair(host)
        stop = threading.Event()
        holder = threading.Thread(target=stop.wait)  # a live owner for the slots
        holder.start()
        try:
            live = make_owner(holder.native_id, _proc_stat(holder.native_id)[1])
            x = d0._dm.layout.xen_vcpu(0)
            first = (x + L.X_WAITER) // 8
            d0._dm.u64[first : first + L.WAITER_SLOTS] = live
            d0._dm.u32[(x + L.X_WAITERS) // 4] = (1 << L.WAITER_SLOTS) - 1
            t0 = time.monotonic()
            assert d0.wait(0, timeout=0.1) is False
            assert 0.09 <= time.monotonic() - t0 < 30  # upper bound: no hang
            sender = threading.Timer(0.05, du.send, args=(pu,))
            sender.start()
            assert d0.wait(0, timeout=JOIN_S) is True
            sender.join()
            assert d0.consume(0).tolist() == [p0]
            assert d0._dm.waiters(0)[1] == [live] * L.WAITER_SLOTS  # untouched: alive
        finally:
            stop.set()
            holder.join()
            d0._dm.u64[first : first + L.WAITER_SLOTS] = 0
            d0._dm.u32[(x + L.X_WAITERS) // 4] = 0


# --- a BUSY bit left by a sender killed inside set_link (item 2) -------------------------------


def _tail_linked_masked_idle(host):
    """A port that is the tail of queue (vCPU 0, priority 7), LINKED and MASKED, not PENDING:
    the state in which a guest unmask takes the cmpxchg path that waits for BUSY."""
    d0, du, p0, pu = _pair(host)
    du.send(pu)  # linked on (0, 7), its lastq
    d0.mask(p0)
    host._k.clear_pending(d0.domid, p0)  # as EVTCHNOP_close does: LINKED stays
    word = d0._dm.u32[d0._dm.layout.event_word(p0) // 4]
    assert word & (L.FIFO_LINKED | L.FIFO_MASKED | L.FIFO_PENDING) == L.FIFO_LINKED | L.FIFO_MASKED
    return d0, du, p0, pu


def _queue_lock_addr(dom, vcpu, prio):
    return dom._base + dom._dm.queue_lock_off(vcpu, prio)


def _die_inside_set_link(name, backend, port, ready):
    """What evtchn_fifo_set_link does to a tail when its first cmpxchg fails: it holds the
    queue's lock (set_pending took it) and sets BUSY on the tail's word; then this process is
    killed before it clears BUSY."""
    host = evtchn.Host.attach(name, backend)
    d0 = host.domain(0)
    host._k.lock(_queue_lock_addr(d0, 0, L.FIFO_PRIORITY_DEFAULT))
    host._k.set_bit(d0._base + d0._dm.layout.event_word(port), L.FIFO_BUSY_BIT, 32)
    ready.set()
    time.sleep(600)


def _unmask(name, backend, port, done):
    host = evtchn.Host.attach(name, backend)
    host.warm_up()
    t0 = time.monotonic()
    host.domain(0).unmask(port)
    done.put(time.monotonic() - t0)


def test_guest_unmask_recovers_from_a_busy_bit_of_a_killed_sender(compiled):
    """Before issue 9 the guest's unmask spun on its cmpxchg forever. Now it spins, yields,
    then takes the queue lock the BUSY setter held (taking it over from the dead sender),
    clears the stale BUSY and completes the unmask. Run in a child process, so that a hang
    fails the test instead of hanging it."""
    with evtchn.Host(compiled) as host:
        d0, du, p0, pu = _tail_linked_masked_idle(host)
        ready = SPAWN.Event()
        killer = SPAWN.Process(target=_die_inside_set_link, args=(host.name, compiled, p0, ready))
        killer.start()
        try:
            assert ready.wait(JOIN_S)
        finally:
            killer.kill()
            killer.join(30)
        word_at = d0._dm.layout.event_word(p0) // 4
        assert d0._dm.u32[word_at] & L.FIFO_BUSY
        held = d0._dm.lock_words()  # the dead sender still holds the queue lock
        assert list(held) == [f"queue 0/{L.FIFO_PRIORITY_DEFAULT}"]
        assert held[f"queue 0/{L.FIFO_PRIORITY_DEFAULT}"] & L.OWNER_TID_MASK == killer.pid
        done = SPAWN.Queue()
        unmasker = SPAWN.Process(target=_unmask, args=(host.name, compiled, p0, done))
        unmasker.start()
        join_all([unmasker], JOIN_S)
        assert done.get(timeout=5) < 30
        word = int(d0._dm.u32[word_at])
        assert word & (L.FIFO_BUSY | L.FIFO_MASKED | L.FIFO_PENDING) == 0
        assert word & L.FIFO_LINKED  # still the queue's tail: the guest drops it when it reaches it
        assert d0._dm.lock_words() == {}
        du.send(pu)
        assert d0.consume(0).tolist() == [p0]
        assert not d0.is_linked(p0) and not d0.is_pending(p0)


def test_guest_unmask_clears_a_stale_busy_in_every_backend(backend):
    """One process: a BUSY bit nobody is linking under (left by a dead linker) is cleared by
    the unmask in every backend alike (the compiled ones after their bounded spin)."""
    with evtchn.Host(backend) as host:
        d0, du, p0, pu = _tail_linked_masked_idle(host)
        word_at = d0._dm.layout.event_word(p0) // 4
        d0._dm.u32[word_at] |= np.uint32(L.FIFO_BUSY)
        assert d0.unmask(p0) == 0
        assert int(d0._dm.u32[word_at]) == L.FIFO_LINKED
        assert d0._dm.lock_words() == {}
