"""Lock owners are threads (issue 9, items 1, 5, 6): a lock held by one thread excludes the
others of its process, a VIRQ raise no longer runs unlocked beside another thread's reader,
Python-level lock waits let Ctrl-C through, a lock the caller holds is EDEADLK, and no way out
of a critical section (an exception, KeyboardInterrupt) leaves a lock owned."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import signal
import threading
import time

import pytest

import evtchn
from evtchn import EvtchnError, HostGoneError
from evtchn import layout as L
from evtchn.domain import Domain
from evtchn.memory import DomainMemory
from evtchn.owner import owner_id

SPAWN = mp.get_context("spawn")


def _pair(host, abi="fifo"):
    d0 = host.create_domain(abi, vcpus=2)
    du = host.create_domain(abi)
    p0 = d0.alloc_unbound(du.domid)
    pu = du.bind_interdomain(d0.domid, p0)
    du.consume(0)
    return d0, du, p0, pu


def _no_locks_held(host):
    return {(d.domid, n): o for d in host.domains() for n, o in d._dm.lock_words().items()}


def test_owner_id_matches_across_backends_and_threads(compiled):
    """The kernels store the owner id evtchn.owner computes; each thread has its own."""
    with evtchn.Host(compiled) as host:
        d = host.create_domain("fifo")
        addr = d._base + L.H_EVENT_LOCK
        ids = []

        def take():
            host._k.lock(addr)
            ids.append(d._dm.lock_words()["event"])
            host._k.unlock(addr)

        t = threading.Thread(target=take)
        t.start()
        t.join()
        take()
        assert ids[1] == owner_id() and ids[0] != ids[1]
        assert ids[0] & L.OWNER_TID_MASK == t.native_id


def test_a_lock_held_by_one_thread_excludes_another(compiled):
    """Another thread of the same process waits (it is another owner), and gets the lock
    once the holder lets go."""
    with evtchn.Host(compiled) as host:
        d = host.create_domain("fifo")
        addr = d._base + L.H_EVENT_LOCK
        host._k.lock(addr)
        got = threading.Event()

        def waiter():
            host._k.lock(addr)
            got.set()
            host._k.unlock(addr)

        t = threading.Thread(target=waiter)
        t.start()
        assert not got.wait(0.3)  # held by this thread: the other one waits
        assert not host._k.trylock(addr)
        host._k.unlock(addr)
        assert got.wait(30)
        t.join(30)
        assert d._dm.lock_words() == {}


def test_taking_a_lock_this_thread_holds_is_edeadlk(compiled):
    with evtchn.Host(compiled) as host:
        d0, du, p0, pu = _pair(host)
        addr = d0._chan_addr(d0.domid, p0)
        host._k.lock(addr, reader=True)
        try:
            for reader in (False, True):
                with pytest.raises(EvtchnError) as exc:
                    host._k.lock(addr, reader=reader)
                assert exc.value.errno == errno.EDEADLK
        finally:
            host._k.unlock(addr)
        with pytest.raises(EvtchnError) as exc:  # a control-plane op inside one of ours
            with d0._domains_locked(d0.domid):
                d0.alloc_unbound(du.domid)
        assert exc.value.errno == errno.EDEADLK
        assert _no_locks_held(host) == {}


def test_virq_raise_waits_for_a_reader_of_another_thread(compiled):
    """evtchn_read_trylock runs beside a reader in Xen; here the channel lock is exclusive,
    so a raise may only run beside a reader that is its own thread. With owners per process
    (before issue 9) a raise on one thread ran, without the lock, beside a reader on another,
    and a close queued behind that reader could free the port while the raise set PENDING.
    Now the raise waits; whichever of it and the close gets the lock first, the port ends
    FREE and not pending, and the raise's event is destroyed by the close or never made."""
    with evtchn.Host(compiled) as host:
        d0 = host.create_domain("fifo")
        p = d0.bind_virq(L.VIRQ_CONSOLE, 0)
        addr = d0._chan_addr(0, p)
        held, release = threading.Event(), threading.Event()
        raised, closed = [], []

        def reader():
            host._k.lock(addr, reader=True)  # as a send or EVTCHNOP_unmask holds it
            held.set()
            release.wait(30)
            host._k.unlock(addr)

        threads = [threading.Thread(target=reader)]
        threads[0].start()
        assert held.wait(30)
        raise_it = lambda: raised.append(host._k.raise_virq(0, L.VIRQ_CONSOLE, 0))  # noqa: E731
        threads.append(threading.Thread(target=raise_it))
        threads[-1].start()
        time.sleep(0.3)
        assert not raised, "raise_virq ran beside another thread's reader"
        threads.append(threading.Thread(target=lambda: closed.append(d0.close(p))))
        threads[-1].start()
        time.sleep(0.1)
        release.set()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert d0.status(p).state == "closed"
        assert not d0.is_pending(p)
        assert d0.consume(0).tolist() == []
        # Exact accounting: the raise's edge (made before the close took the lock) is the event
        # the close destroyed; a raise after the close finds the VIRQ unbound and makes none.
        assert closed == raised
        assert _no_locks_held(host) == {}


def test_a_virq_runs_beside_a_reader_that_is_its_own_thread(compiled):
    """The calling thread's own read lock nests (Xen: a CPU holding the read lock can
    read_trylock again): the raise neither waits nor drops."""
    with evtchn.Host(compiled) as host:
        d0 = host.create_domain("fifo")
        p = d0.bind_virq(L.VIRQ_TIMER, 0)
        addr = d0._chan_addr(0, p)
        host._k.lock(addr, reader=True)
        try:
            assert host._k.raise_virq(0, L.VIRQ_TIMER, 0) == 1
        finally:
            host._k.unlock(addr)
        assert d0.consume(0).tolist() == [p]


class _Injected(Exception):
    pass


# Something each operation calls inside a critical section, and the operation.
CRITICAL_SECTIONS = {
    "alloc_unbound": (Domain, "_init_port", lambda d0, du, p0: d0.alloc_unbound(du.domid)),
    "bind_interdomain": (
        Domain,
        "_init_port",
        lambda d0, du, p0: du.bind_interdomain(d0.domid, d0.alloc_unbound(du.domid)),
    ),
    "bind_virq": (Domain, "_init_port", lambda d0, du, p0: d0.bind_virq(L.VIRQ_DEBUG, 1)),
    "bind_ipi": (Domain, "_set_affinity", lambda d0, du, p0: d0.bind_ipi(1)),
    "close": (Domain, "_free_port", lambda d0, du, p0: d0.close(p0)),
    "bind_vcpu": (Domain, "_set_affinity", lambda d0, du, p0: d0.bind_vcpu(p0, 1)),
    "bind_vcpu_channels": (DomainMemory, "set_port_u16", lambda d0, du, p0: d0.bind_vcpu(p0, 1)),
    "expand_to": (DomainMemory, "array_pages", lambda d0, du, p0: d0.bind_ipi(0)),
    "reset": (Domain, "_fifo_reinit", lambda d0, du, p0: d0.reset()),
}


@pytest.mark.parametrize("exc", [KeyboardInterrupt, _Injected])
@pytest.mark.parametrize("op", sorted(CRITICAL_SECTIONS))
def test_an_exception_in_a_critical_section_leaves_no_lock_owned(backend, monkeypatch, op, exc):
    """Before issue 9 a KeyboardInterrupt between lock and unlock left the lock owned by a
    live process, and the next send on the channel spun forever. Now every lock is released
    on the way out; the send completes (and delivers, if the channel survived)."""
    cls, helper, call = CRITICAL_SECTIONS[op]
    with evtchn.Host(backend) as host:
        d0, du, p0, pu = _pair(host)

        def boom(*args, **kwargs):
            raise exc()

        monkeypatch.setattr(cls, helper, boom)
        with pytest.raises(exc):
            call(d0, du, p0)
        monkeypatch.undo()
        assert _no_locks_held(host) == {}
        du.send(pu)  # completes: nothing holds the channel
        if d0.status(p0).state == du.status(pu).state == "interdomain":
            d0.unmask(p0)  # bind_vcpu masks first
            assert d0.consume(0).tolist() + d0.consume(1).tolist() == [p0]


def _hold_event_lock(name, backend, ready):
    host = evtchn.Host.attach(name, backend)
    host._k.lock(host.domain(0)._base + L.H_EVENT_LOCK)
    ready.set()
    time.sleep(600)


def test_ctrl_c_gets_through_a_lock_wait(compiled):
    """A lock taken from Python waits in slices without the GIL and looks for signals between
    them: SIGINT interrupts alloc_unbound while another process holds the event lock, and
    leaves nothing owned by this thread."""
    with evtchn.Host(compiled) as host:
        d0 = host.create_domain("fifo")
        ready = SPAWN.Event()
        holder = SPAWN.Process(target=_hold_event_lock, args=(host.name, compiled, ready))
        holder.start()
        old = signal.getsignal(signal.SIGALRM)
        try:
            assert ready.wait(60)

            def interrupt(*_):
                raise KeyboardInterrupt

            signal.signal(signal.SIGALRM, interrupt)
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            t0 = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                d0.alloc_unbound(0)
            assert time.monotonic() - t0 < 30  # interrupted, not hung
            owner = d0._dm.lock_words()["event"]
            assert owner & L.OWNER_TID_MASK == holder.pid  # still the holder's, not ours
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            holder.kill()
            holder.join(30)
        p = d0.alloc_unbound(0)  # the dead holder's lock is taken over
        assert d0.status(p).state == "unbound" and d0._dm.lock_words() == {}


def test_attach_from_another_pid_namespace_is_refused(backend):
    """Owner ids are tids of the creator's pid namespace: Host.attach refuses a host whose
    recorded namespace is not ours (faked here by rewriting the header field)."""
    with evtchn.Host(backend) as host:
        assert int(host._hseg.u64[L.HH_PIDNS // 8]) == os.stat("/proc/self/ns/pid").st_ino
        host._hseg.u64[L.HH_PIDNS // 8] += 1
        with pytest.raises(HostGoneError, match="pid namespace"):
            evtchn.Host.attach(host.name, backend)


def _spin_policy(backend):
    if backend == "cython":
        from evtchn import _core

        return _core.spin_policy()
    from evtchn import numba_kernels

    return numba_kernels.spin_policy()


def test_the_compiled_kernels_share_one_spin_policy(compiled):
    """Issue 9 item 12: every lock wait and bounded spin uses evtchn.layout's constants."""
    want = {name: getattr(L, name) for name in _spin_policy(compiled)}
    assert _spin_policy(compiled) == want


@pytest.mark.parametrize("impl", ["compiled", "python"])
def test_held_takes_and_releases_on_every_way_out(compiled, impl):
    """evtchn.locks.Held (compiled, or the pure-Python fallback used without the Cython
    extension): owned inside the block, free after it, also after an exception; EDEADLK for a
    lock this thread already holds (which stays held); with `busy`, EBUSY against a live
    owner."""
    from evtchn import locks

    held_cls = locks.Held if impl == "compiled" else locks._PyHeld
    if impl == "compiled" and held_cls is locks._PyHeld:
        pytest.skip("the Cython extension is not built")
    with evtchn.Host(compiled) as host:
        d = host.create_domain("fifo")
        addrs = [d._base + L.H_EVENT_LOCK, d._base + L.H_RESET_LOCK]
        with held_cls(host._k, addrs):
            assert set(d._dm.lock_words()) == {"event", "reset"}
        assert d._dm.lock_words() == {}
        with pytest.raises(_Injected):
            with held_cls(host._k, addrs):
                raise _Injected
        assert d._dm.lock_words() == {}
        host._k.lock(addrs[1])
        with pytest.raises(EvtchnError) as exc:
            with held_cls(host._k, addrs):
                pass
        assert exc.value.errno == errno.EDEADLK
        assert set(d._dm.lock_words()) == {"reset"}  # the outer hold is not released
        host._k.unlock(addrs[1])
        other = threading.Thread(target=host._k.lock, args=(addrs[1],))
        other.start()
        other.join()  # a finished thread: its lock is a dead owner's, once its task is gone
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{other.native_id}") and time.monotonic() < deadline:
            time.sleep(0.01)
        with held_cls(host._k, addrs[1:], busy="busy"):  # taken over
            assert set(d._dm.lock_words()) == {"reset"}
        stop = threading.Event()
        holder = threading.Thread(target=lambda: (host._k.lock(addrs[1]), stop.wait(30)))
        holder.start()
        while "reset" not in d._dm.lock_words():
            time.sleep(0.01)
        with pytest.raises(EvtchnError) as exc:
            with held_cls(host._k, addrs, busy="in progress"):
                pass
        assert exc.value.errno == errno.EBUSY and d._dm.lock_words().keys() == {"reset"}
        stop.set()
        holder.join()
