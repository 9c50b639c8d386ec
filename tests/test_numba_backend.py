"""The Numba backend: user @njit code calling evtchn.numba, processes on "numba" and "cython"
driving one host, the kernel cache across processes, and the injections against the oracle."""

from __future__ import annotations

import doctest
import multiprocessing
import os
import queue
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("numba")

from conftest import _available, join_all  # noqa: E402
from numba import njit  # noqa: E402

import evtchn  # noqa: E402
import evtchn.numba as en  # noqa: E402
from evtchn import layout as L  # noqa: E402

SPAWN = multiprocessing.get_context("spawn")
JOIN_TIMEOUT = 300.0  # children may compile their kernels on a cold cache first
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(evtchn.__file__)))


def _cython_kernels() -> bool:
    return _available("cython")


def _join_all(procs, timeout=JOIN_TIMEOUT):
    join_all(procs, timeout)


def _kill_all(procs):
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)


def _pair(host, abi, vcpus=1):
    d0 = host.create_domain(abi, vcpus=vcpus)
    du = host.create_domain(abi)
    p0 = d0.alloc_unbound(du.domid)
    pu = du.bind_interdomain(d0.domid, p0)
    du.consume(0)
    return d0, du, p0, pu


# --- user @njit code ---------------------------------------------------------------------------


@njit
def _user_loop(tx, rx, ports, rounds, out, delivered):
    """A user's jitted simulation loop: send on every port, run the receiver's handler."""
    edges = 0
    for _ in range(rounds):
        for i in range(ports.shape[0]):
            edges += en.send(tx, ports[i])
        n = en.consume(rx, 0, out)
        for i in range(n):
            delivered[out[i]] += 1
    return edges


@pytest.mark.parametrize("abi", ["fifo", "2l", "3l"])
def test_user_njit_loop_calls_send_and_consume(abi):
    with evtchn.Host(backend="numba") as host:
        d0 = host.create_domain(abi)
        du = host.create_domain(abi)
        remote = [d0.alloc_unbound(du.domid) for _ in range(40)]
        local = np.array([du.bind_interdomain(d0.domid, p) for p in remote], np.uint32)
        du.consume(0)
        out = np.empty(64, np.uint32)
        delivered = np.zeros(d0.valid_ports, np.int64)
        edges = _user_loop(en.views(du), en.views(d0), local, 50, out, delivered)
        assert edges == 50 * 40  # drained every round: no coalescing
        assert (delivered[remote] == 50).all() and delivered.sum() == 50 * 40
        assert not any(d0.is_pending(p) or d0.is_linked(p) for p in remote)
        assert not d0.upcall_pending(0)


@njit
def _user_misc(v0, vu, port, local, out):
    """mask/unmask/is_*/send_many/upcall_pending/wait from jitted code."""
    en.mask(v0, port)
    masked = en.is_masked(v0, port)
    r1 = en.send(vu, local)
    pend = en.is_pending(v0, port)
    up_masked = en.upcall_pending(v0, 0)
    en.unmask(v0, port)
    up = en.upcall_pending(v0, 0)
    woke = en.wait(v0, 0, 0)
    n1 = en.consume(v0, 0, out)
    ports = np.full(3, local, np.uint32)
    edges = np.zeros(3, np.uint8)
    n, err = en.send_many(vu, ports, edges)
    n2 = en.consume(v0, 0, out)
    bad = en.send(vu, 100000)
    return (
        masked,
        r1,
        pend,
        up_masked,
        up,
        woke,
        n1,
        n,
        err,
        edges[0],
        edges[1],
        edges[2],
        n2,
        bad,
        en.wait(v0, 0, 1000000),
    )


@pytest.mark.parametrize("abi", ["fifo", "2l"])
def test_user_njit_mask_unmask_send_many_wait(abi):
    with evtchn.Host(backend="numba") as host:
        d0, du, p0, pu = _pair(host, abi)
        out = np.empty(8, np.uint32)
        r = _user_misc(en.views(d0), en.views(du), p0, pu, out)
        assert r == (True, 1, True, False, True, True, 1, 3, 0, 1, 0, 0, 1, -22, False)
        assert not d0.is_pending(p0) and not d0.is_masked(p0)


def test_views_refresh_sees_new_domains_and_refuses_unknown_peer():
    with evtchn.Host(backend="numba") as host:
        d0 = host.create_domain("fifo")
        v_old = en.views(d0)
        du = host.create_domain("fifo")
        p0 = d0.alloc_unbound(du.domid)
        pu = du.bind_interdomain(d0.domid, p0)
        du.consume(0)
        # the old table of d0 does not hold du: a send from du through it is refused (ESRCH)
        p_back = du.alloc_unbound(d0.domid)
        l_back = d0.bind_interdomain(du.domid, p_back)
        assert en.send(v_old, l_back) == -3
        assert en.send(en.views(d0), l_back) in (0, 1)
        assert en.send(en.views(du), pu) == 1


def test_docstring_example_runs():
    result = doctest.testmod(en, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0, result


# --- wait across processes -----------------------------------------------------------------------


def _send_later(host_name, domid, port, delay):
    host = evtchn.Host.attach(host_name, backend="numba")
    try:
        time.sleep(delay)
        host.domain(domid).send(port)
    finally:
        host.close()


@pytest.mark.parametrize("abi", ["fifo", "2l"])
def test_wait_times_out_then_is_woken_by_another_process(abi):
    with evtchn.Host(backend="numba") as host:
        d0, du, p0, pu = _pair(host, abi)
        t0 = time.monotonic()
        assert d0.wait(0, timeout=0.12) is False
        assert 0.1 <= time.monotonic() - t0 < 30  # upper bound: no hang
        p = SPAWN.Process(target=_send_later, args=(host.name, du.domid, pu, 0.3))
        p.start()
        try:
            assert d0.wait(0, timeout=JOIN_TIMEOUT) is True
            _join_all([p])
        finally:
            _kill_all([p])
        assert list(d0.consume(0)) == [p0]
        assert d0._dm.waiters(0) == (0, [0] * L.WAITER_SLOTS)


# --- interop: processes on different backends drive one host -----------------------------------

SENDS_PER_SENDER = 40_000
BATCH = 256


def _sender(host_name, backend, domid, ports, seed, barrier, results):
    host = evtchn.Host.attach(host_name, backend=backend)
    try:
        host.warm_up()  # compile/load before the barrier, so that the sides race
        d = host.domain(domid)
        rng = np.random.default_rng(seed)
        edges_per_port = np.zeros(max(ports) + 1, np.int64)
        ports = np.asarray(ports, np.uint32)
        barrier.wait(JOIN_TIMEOUT)
        sent = 0
        # Send at least SENDS_PER_SENDER, and on until the vCPUs have consumed while we sent
        # (more edges than ports): on a loaded machine the vCPU processes may not have run yet,
        # and a run where nothing raced checks nothing.
        deadline = time.monotonic() + JOIN_TIMEOUT / 2
        while sent < SENDS_PER_SENDER or (
            edges_per_port.sum() <= len(ports) and time.monotonic() < deadline
        ):
            batch = rng.choice(ports, BATCH)
            edges = np.zeros(BATCH, np.uint8)
            assert d.send_many(batch, edges) == BATCH
            np.add.at(edges_per_port, batch, edges)
            sent += BATCH
        results.put(("sender", backend, edges_per_port.tolist(), None))
    finally:
        host.close()


def _vcpu(host_name, backend, domid, vcpu, toggle, barrier, done, results):
    """A vCPU: run the upcall handler, sleep when idle; mask/unmask one of its own ports now
    and then (the guest racing the senders); drain everything after the senders are done."""
    host = evtchn.Host.attach(host_name, backend=backend)
    try:
        host.warm_up()  # compile/load before the barrier, so that the sides race
        d = host.domain(domid)
        counts = np.zeros(d.valid_ports, np.int64)
        made = np.zeros(d.valid_ports, np.int64)  # edges the unmasks made themselves
        out = np.empty(64, np.uint32)
        barrier.wait(JOIN_TIMEOUT)
        final = False
        calls = 0
        while True:
            n = d.consume_into(vcpu, out)
            np.add.at(counts, out[:n], 1)
            calls += 1
            if toggle and calls % 16 == 0:
                p = toggle[(calls // 16) % len(toggle)]
                d.mask(p)
                made[p] += d.unmask(p)
            if n:
                continue
            if final:
                break
            if done.is_set():
                final = True  # one more pass sees the last events
                continue
            d.wait(vcpu, timeout=0.05)
        results.put(("vcpu", backend, counts.tolist(), made.tolist()))
    finally:
        host.close()


def _collect(results, n, procs, deadline):
    """n results from the children; fails at once if one of them died (no 5-minute hang)."""
    got = []
    while len(got) < n:
        try:
            got.append(results.get(timeout=0.2))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            assert not dead, f"child processes failed: {dead}"
            assert time.monotonic() < deadline, "children did not report in time"
    return got


BACKEND_PAIRS = [("numba", "cython"), ("cython", "numba"), ("numba", "numba")]


@pytest.mark.parametrize("abi", ["fifo", "2l"])
@pytest.mark.parametrize("first,second", BACKEND_PAIRS)
def test_interop_mixed_senders_and_vcpus(abi, first, second):
    """Sender A on `first` and sender B on `second` both send on the same ports of domU;
    dom0's vCPU 0 runs on `first`, vCPU 1 on `second`. Every 0->1 edge a send reports is
    delivered exactly once, on the port's vCPU; at the end nothing is pending or linked."""
    if "cython" in (first, second) and not _cython_kernels():
        pytest.skip("evtchn._core (CythonKernels) is not built")
    nports = 48
    with evtchn.Host(backend="numba") as host:
        d0 = host.create_domain(abi, vcpus=2)
        du = host.create_domain(abi)
        remote = [d0.alloc_unbound(du.domid) for _ in range(nports)]
        local = [du.bind_interdomain(d0.domid, p) for p in remote]
        du.consume(0)
        assert len(d0.consume(0)) == 0
        for i, p in enumerate(remote):
            if i % 2:
                d0.bind_vcpu(p, 1)
            if abi == "fifo" and i % 3 == 0:
                d0.set_priority(p, 3)
        assert not d0.consume(0).size and not d0.consume(1).size
        by_vcpu = {v: [p for i, p in enumerate(remote) if i % 2 == v] for v in (0, 1)}
        barrier = SPAWN.Barrier(4)
        done = SPAWN.Event()
        results = SPAWN.Queue()
        senders = [
            SPAWN.Process(
                target=_sender,
                name=f"sender-{b}-{i}",
                args=(host.name, b, du.domid, local, 1000 + i, barrier, results),
            )
            for i, b in enumerate((first, second))
        ]
        vcpus = [
            SPAWN.Process(
                target=_vcpu,
                name=f"vcpu{v}-{b}",
                args=(host.name, b, d0.domid, v, by_vcpu[v][:4], barrier, done, results),
            )
            for v, b in enumerate((first, second))
        ]
        try:
            for p in senders + vcpus:
                p.start()
            deadline = time.monotonic() + JOIN_TIMEOUT
            got = _collect(results, 2, senders + vcpus, deadline)  # the two senders
            done.set()
            got += _collect(results, 2, senders + vcpus, deadline)  # the two vCPUs
            _join_all(senders + vcpus)
        finally:
            done.set()
            _kill_all(senders + vcpus)

        edges = {}
        delivered = np.zeros(d0.valid_ports, np.int64)
        made = np.zeros(d0.valid_ports, np.int64)
        for role, _backend, data, unmask_edges in got:
            if role == "sender":
                for lp, e in enumerate(data):
                    edges[lp] = edges.get(lp, 0) + e
            else:
                delivered[: len(data)] += np.asarray(data)
                made[: len(unmask_edges)] += np.asarray(unmask_edges)
        # every edge a send or an unmask made is delivered exactly once
        per_port = {rp: edges.get(lp, 0) + int(made[rp]) for rp, lp in zip(remote, local)}
        assert sum(per_port.values()) > nports
        assert {p: int(delivered[p]) for p in remote} == per_port
        assert delivered.sum() == sum(per_port.values())
        for p in remote:
            assert not d0.is_pending(p) and not d0.is_linked(p) and not d0.is_masked(p)
        _assert_quiescent(d0)
        _assert_quiescent(du)


def _assert_quiescent(dom):
    """No upcall pending, nobody blocked, every lock word free."""
    dm = dom._dm
    for v in range(dm.vcpus):
        assert not dom.upcall_pending(v)
        assert dm.waiters(v) == (0, [0] * L.WAITER_SLOTS)
    assert dm.lock_words() == {}


# --- the kernel cache across processes -----------------------------------------------------------

CACHE_PROBE = textwrap.dedent("""
    import sys, time
    t0 = time.perf_counter()
    import numpy as np
    import evtchn
    from evtchn import numba_kernels as NK
    t1 = time.perf_counter()
    with evtchn.Host(backend="numba") as host:
        d0 = host.create_domain(sys.argv[1])
        du = host.create_domain(sys.argv[1])
        p0 = d0.alloc_unbound(du.domid)
        pu = du.bind_interdomain(d0.domid, p0)
        du.consume(0)
        du.send(pu)
        assert list(d0.consume(0)) == [p0]
        edges = np.zeros(2, np.uint8)
        assert du.send_many(np.array([pu, pu], np.uint32), edges) == 2
        assert edges.tolist() == [1, 0] and list(d0.consume(0)) == [p0]
    t2 = time.perf_counter()
    hits = misses = 0
    for obj in vars(NK).values():
        stats = getattr(obj, "stats", None)
        if stats is not None and hasattr(stats, "cache_hits"):
            hits += sum(stats.cache_hits.values())
            misses += sum(stats.cache_misses.values())
    print(hits, misses, round(t1 - t0, 3), round(t2 - t1, 3))
""")


@pytest.mark.parametrize("abi", ["fifo", "2l"])
def test_second_process_loads_kernels_from_cache(tmp_path, abi):
    """The first process may compile (cold cache); a second one loads every kernel it runs
    from the cache: cache misses 0 and a start-up far below a compile."""
    (tmp_path / "probe.py").write_text(CACHE_PROBE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env.pop("NUMBA_CACHE_DIR", None)
    env.pop("NUMBA_DISABLE_JIT", None)

    def run():
        out = subprocess.run(
            [sys.executable, "probe.py", abi],
            cwd=tmp_path,
            env=env,
            timeout=JOIN_TIMEOUT,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stderr
        hits, misses, t_import, t_run = out.stdout.split()
        return int(hits), int(misses), float(t_import), float(t_run)

    run()  # warms the cache if it was cold
    hits, misses, t_import, t_run = run()
    assert misses == 0, f"a warm start recompiled {misses} kernels"
    assert hits > 5
    assert t_run < 10.0, f"warm start took {t_run:.2f} s"


# --- the injections, against the oracle --------------------------------------------------------

INJECTION_CASES = [
    ("fifo", "fifo-ready-every-link"),
    ("fifo", "fifo-old-tail-kept"),
    ("fifo", "fifo-pending-before-lock"),
    ("2l", "2l-selector-before-upcall-clear"),
    ("2l", "2l-unmask-test-before-clear"),
    ("3l", "2l-selector-before-upcall-clear"),
    ("3l", "2l-unmask-test-before-clear"),
]


def _injected_machine(abi, inject):
    from hypothesis import settings
    from hypothesis.stateful import initialize
    from test_differential import VCPUS, Differential

    class Injected(Differential):
        @initialize()
        def make(self):
            self.hosts = [
                evtchn.Host("reference", inject=inject),
                evtchn.Host("numba", inject=inject),
            ]
            self.doms = []
            for h in self.hosts:
                d0 = h.create_domain(self.abi, vcpus=VCPUS, word_bits=self.word_bits)
                du = h.create_domain(self.abi, vcpus=2, word_bits=self.word_bits)
                self.doms.append((d0, du))

    machine = type(f"Inj_{abi}_{inject}", (Injected,), dict(abi=abi, word_bits=64, other="numba"))
    machine.TestCase.settings = settings(max_examples=15, stateful_step_count=40, deadline=None)
    return machine


@pytest.mark.parametrize("abi,inject", INJECTION_CASES)
def test_differential_with_injection(abi, inject):
    """One process cannot race, so an injected bug changes nothing observable here: the numba
    kernels with the injection stay byte-identical with the oracle running it too."""
    _injected_machine(abi, inject).TestCase().runTest()


# --- R9 semantics in one process: the pre-71ac522909 path links like the current one ------------


def test_r9_path_single_process_links_and_relinks():
    with evtchn.Host(backend="numba", inject="fifo-pending-before-lock") as host:
        d0 = host.create_domain("fifo", vcpus=2)
        du = host.create_domain("fifo")
        remote = [d0.alloc_unbound(du.domid) for _ in range(4)]
        local = [du.bind_interdomain(d0.domid, p) for p in remote]
        du.consume(0)
        assert not d0.consume(0).size
        d0.set_priority(remote[1], 2)
        d0.bind_vcpu(remote[2], 1)
        for lp in local:
            du.send(lp)
        assert list(d0.consume(0)) == [remote[1], remote[0], remote[3]]
        assert list(d0.consume(1)) == [remote[2]]
        d0.mask(remote[0])
        du.send(local[0])
        assert d0.is_pending(remote[0]) and not d0.is_linked(remote[0])
        d0.unmask(remote[0])
        assert list(d0.consume(0)) == [remote[0]]
        assert host._k.is_linked(d0.domid, remote[0]) is False


@njit
def _user_out_of_range(v, out):
    return (
        en.mask(v, -1),
        en.unmask(v, 1 << 40),
        en.is_pending(v, 1 << 40),
        en.is_masked(v, -5),
        en.is_linked(v, 1 << 40),
        en.consume(v, 7, out),
        en.upcall_pending(v, -1),
        en.wait(v, 99, 0),
        en.set_pending(v, 0, -1),
        en.raise_virq(v, 99, 0),
        en.raise_virq(v, 0, 99),
        en.send(v, -1),
    )


@pytest.mark.parametrize("abi", ["fifo", "2l", "3l"])
def test_user_njit_out_of_range_arguments_do_nothing(abi):
    with evtchn.Host(backend="numba") as host:
        d0, du, p0, pu = _pair(host, abi)
        before = d0._dm.seg.u8.copy()
        r = _user_out_of_range(en.views(d0), np.empty(4, np.uint32))
        assert r == (None, 0, False, True, False, 0, False, False, 0, 0, 0, -22)
        assert np.array_equal(before, d0._dm.seg.u8)


WAIT_FOREVER = textwrap.dedent("""
    import sys, evtchn
    host = evtchn.Host.attach(sys.argv[1], backend="numba")
    try:
        d = host.domain(int(sys.argv[2]))
        d.wait(0, timeout=0)                      # compiled/loaded before we say ready
        print("ready", flush=True)
        try:
            d.wait(0)                             # no timeout: only Ctrl-C ends it
            print("woken", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    finally:
        host.close()
""")


def test_wait_without_timeout_is_interrupted_by_ctrl_c(tmp_path):
    """wait() sleeps in futex slices of at most 50 ms, so SIGINT ends it promptly and the
    vCPU no longer counts as blocked."""
    (tmp_path / "waiter.py").write_text(WAIT_FOREVER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    with evtchn.Host(backend="numba") as host:
        d0 = host.create_domain("fifo")
        p = subprocess.Popen(
            [sys.executable, "waiter.py", host.name, str(d0.domid)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert p.stdout.readline().strip() == "ready"
            deadline = time.monotonic() + 10
            while d0._dm.waiters(0)[0] == 0:  # it is asleep in the futex
                assert time.monotonic() < deadline, "the waiter never blocked"
                time.sleep(0.01)
            time.sleep(0.2)
            p.send_signal(signal.SIGINT)
            # without its slices the wait would never end; a loaded machine may stall a
            # process for seconds, so the bound only tells ended from hung
            out, _ = p.communicate(timeout=60)
            assert out.strip() == "interrupted" and p.returncode == 0
            assert d0._dm.waiters(0) == (0, [0] * L.WAITER_SLOTS)
        finally:
            if p.poll() is None:
                p.kill()
                p.communicate()


_WARM_UP_CHECK = textwrap.dedent("""
    import numpy as np
    import evtchn, evtchn.numba_kernels as nk
    from evtchn import layout as L
    with evtchn.Host("numba") as host:
        host.warm_up()
        kernels = {n: f for n, f in vars(nk).items()
                   if n.startswith("k_") and hasattr(f, "signatures")}
        before = {n: len(f.signatures) for n, f in kernels.items()}
        assert before["k_send"] == 1 and before["k_poll_end"] == 1, before
        d0, du = host.create_domain("fifo", vcpus=2), host.create_domain("fifo")
        p0 = d0.alloc_unbound(du.domid)
        pu = du.bind_interdomain(d0.domid, p0)
        du.consume(0)
        du.send(pu)
        du.send_many(np.array([pu, pu], np.uint32), np.zeros(2, np.uint8))
        d0.mask(p0); d0.unmask(p0); d0.hyp_unmask(p0); d0.bind_vcpu(p0, 1)
        d0.consume(1); d0.wait(0, timeout=0); d0.poll(0, [p0], timeout=0)
        d0.bind_virq(L.VIRQ_TIMER, 0); d0.raise_virq(L.VIRQ_TIMER, 0)
        d0.is_pending(p0), d0.is_masked(p0), d0.is_linked(p0), d0.upcall_pending(0)
        d0.close(p0)
        grew = {n: len(f.signatures) - before[n] for n, f in kernels.items()
                if len(f.signatures) != before[n]}
        print("GREW", grew)
""")


def test_warm_up_loads_the_signatures_real_calls_use():
    """In a fresh process, after Host.warm_up() the hypercalls and the guest side add no new
    specialisation: the warm-up compiled (or loaded) exactly what they run."""
    r = subprocess.run(
        [sys.executable, "-c", _WARM_UP_CHECK],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "GREW {}" in r.stdout, r.stdout
