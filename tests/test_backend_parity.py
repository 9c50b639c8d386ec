"""Backend parity: the Cython kernels against the reference oracle, then real processes racing.

Single process: the same scripted scenario (binds, sends, coalescing, mask/unmask, bind_vcpu,
set_priority, consume in small chunks, close while linked, expand_array replay, reset) runs on
a "reference" host and on a "cython" host; every result and every byte of every domain segment
must be identical (lock words are 0 when idle, so whole segments compare).

Several processes (Cython only, spawn): two senders race send_many over 256 ports while two
vCPU processes wait and consume; every PENDING 0 -> 1 edge a sender saw must be delivered
exactly once, and nothing may stay pending or linked after the drain.
"""

from __future__ import annotations

import errno
import multiprocessing as mp
import queue as queue_mod
import time

import numpy as np
import pytest
from conftest import _available

import evtchn
from evtchn import EvtchnError
from evtchn import layout as L
from evtchn.owner import owner_id

BACKENDS = ["reference", "cython"]
CONFIGS = [("fifo", 64), ("2l", 64), ("2l", 32), ("3l", 64), ("3l", 32)]
LINK_BITS = 12  # small FIFO domains: whole-segment compares stay cheap


def need(backend):
    if not _available(backend):
        pytest.skip(f"backend {backend} is not built")


# -- helpers ----------------------------------------------------------------------------------
class Trace:
    """Everything a scenario observed, in order, for comparison across backends."""

    def __init__(self):
        self.items = []

    def __call__(self, label, value):
        if isinstance(value, np.ndarray):
            value = value.tolist()
        self.items.append((label, value))
        return value

    def error(self, label, fn):
        try:
            return self(label, ("ok", fn()))
        except EvtchnError as exc:
            return self(label, ("error", exc.errno))


def probe(d, ports):
    """Guest-visible state of `ports` and of every vCPU's upcall flag."""
    return (
        [(p, d.is_pending(p), d.is_masked(p), d.is_linked(p)) for p in ports],
        [d.upcall_pending(v) for v in range(d.vcpus)],
    )


def drain(d, vcpu, chunk=None, limit=100000):
    """Consume until the handler returns nothing; the chunks, in order."""
    chunks = []
    for _ in range(limit):
        got = d.consume(vcpu, max_events=chunk)
        if got.size == 0:
            return chunks
        chunks.append(got.tolist())
    raise AssertionError("consume never ran dry")


def flat(chunks):
    return [p for c in chunks for p in c]


def make_host(backend, inject=None):
    need(backend)
    return evtchn.Host(backend, inject=inject)


# -- scenarios (each returns its Trace; the host's domains are compared afterwards) -----------
def scenario_basic(h, abi, wb):
    """Interdomain, loopback, IPI and VIRQ ports; coalescing; masks; bind_vcpu; priorities;
    chunked consume; errors; close while linked; reset."""
    t = Trace()
    kw = dict(word_bits=wb, link_bits=LINK_BITS)
    d0 = h.create_domain(abi, vcpus=3, **kw)
    du = h.create_domain(abi, vcpus=2, **kw)
    inter = []  # (dom0 port, domU port)
    for _ in range(12):
        p0 = d0.alloc_unbound(du.domid)
        inter.append((p0, du.bind_interdomain(d0.domid, p0)))
    a = d0.alloc_unbound(L.DOMID_SELF)
    loop = (a, d0.bind_interdomain(L.DOMID_SELF, a))
    ipi1 = d0.bind_ipi(1)
    timer0 = d0.bind_virq(L.VIRQ_TIMER, 0)
    timer1 = d0.bind_virq(L.VIRQ_TIMER, 1)
    debug2 = d0.bind_virq(L.VIRQ_DEBUG, 2)
    console = d0.bind_virq(L.VIRQ_CONSOLE, 0)
    t("ports", [inter, loop, ipi1, timer0, timer1, debug2, console])
    ports0 = list(range(1, d0.valid_ports))
    t("bind-pending du", drain(du, 0))  # bind_interdomain set the local ports pending
    t("bind-pending d0", [drain(d0, v) for v in range(3)])
    t("idle", probe(d0, ports0))

    # sends with coalescing, from domU, then the loopback and the IPI
    send = np.array([q for _, q in inter] * 2 + [inter[3][1]] * 3, np.uint32)
    edges = np.zeros(send.size, np.uint8)
    t("send_many", du.send_many(send, edges))
    t("edges", edges)
    assert edges.sum() == len(inter)  # one edge per port, the rest coalesced
    d0.send(loop[1])
    d0.send(ipi1)
    d0.raise_virq(L.VIRQ_TIMER, 0)
    d0.raise_virq(L.VIRQ_TIMER, 1)
    d0.raise_virq(L.VIRQ_DEBUG, 2)
    d0.raise_virq(L.VIRQ_CONSOLE, 2)  # global: goes to the port's notify vCPU (0)
    d0.raise_virq(L.VIRQ_XENOPROF, 1)  # not bound: nothing happens
    t("sent", probe(d0, ports0))
    chunks = [drain(d0, v, chunk=3) for v in range(3)]
    t("consume chunks of 3", chunks)
    got = flat(c for v in chunks for c in v)
    assert sorted(got) == sorted(
        [p for p, _ in inter] + [loop[0], ipi1, timer0, timer1, debug2, console]
    )
    t("after", probe(d0, ports0))

    # masked send: PENDING but no upcall; unmask re-raises
    p = inter[5][0]
    d0.mask(p)
    du.send(inter[5][1])
    t("masked send", probe(d0, [p]))
    t("masked consume", d0.consume(0))
    d0.unmask(p)
    t("unmasked", probe(d0, [p]))
    t("unmasked consume", d0.consume(0))
    d0.unmask(p)  # not masked: nothing
    t("unmask twice", probe(d0, [p]))

    # bind_vcpu of a pending port: delivered on the new vCPU
    p = inter[6][0]
    d0.mask(p)
    du.send(inter[6][1])
    d0.bind_vcpu(p, 2)
    d0.unmask(p)
    t("rebound", probe(d0, [p]))
    t("rebound consume", [d0.consume(v).tolist() for v in range(3)])
    t("status", [d0.status(p)])

    # priorities (FIFO; others refuse)
    for i, (p, _) in enumerate(inter[:8]):
        t.error(f"set_priority {p}", lambda p=p, i=i: d0.set_priority(p, 15 - 2 * i))
    t.error("set_priority bad", lambda: d0.set_priority(inter[0][0], 16))
    edges = np.zeros(8, np.uint8)
    t("send 8", du.send_many(np.array([q for _, q in inter[:8]][::-1], np.uint32), edges))
    t("edges 8", edges)
    d0.raise_virq(L.VIRQ_TIMER, 0)
    t("prio consume", drain(d0, 0, chunk=2))

    # a linked event moved to another priority/vCPU stays on its old queue; next goes new
    p, q = inter[0]
    du.send(q)
    t.error("set_priority linked", lambda: d0.set_priority(p, 0))
    d0.bind_vcpu(p, 1)
    t("moved", probe(d0, [p]))
    t("moved consume", [d0.consume(v).tolist() for v in range(3)])
    du.send(q)
    t("moved again", [d0.consume(v).tolist() for v in range(3)])

    # errors: send_many stops at a refused port; the sends before it stand
    bad = np.array([inter[1][1], 4000, inter[2][1]], np.uint32)
    edges = np.zeros(3, np.uint8)
    t.error("send_many bad", lambda: du.send_many(bad, edges))
    t("edges bad", edges)
    t.error("send virq port", lambda: d0.send(timer0))
    t.error("send port 0", lambda: d0.send(0))
    t("error consume", drain(d0, 0))

    # close while linked (FIFO: stays LINKED, not reused until the guest drains it)
    p, q = inter[9]
    du.send(q)
    t("before close", probe(d0, [p]))
    d0.close(p)
    t("closed linked", probe(d0, [p]))
    newp = d0.alloc_unbound(du.domid)
    t("new port", newp)
    if abi == "fifo":
        assert newp != p
    t("closed consume", [drain(d0, v) for v in range(3)])
    t("closed drained", probe(d0, [p, newp]))
    t("reuse", d0.alloc_unbound(du.domid))
    du.send(inter[10][1])  # left pending for the reset below
    t("status all", [d0.status(x) for x in ports0[:40]])
    t.error("reset", d0.reset)
    t("after reset", probe(d0, ports0))
    t("after reset status", [d0.status(x).state for x in ports0])
    t("du after reset", probe(du, list(range(1, du.valid_ports))))
    t("du drain", drain(du, 0))
    return t


def scenario_spread(h, abi, wb):
    """Many ports (past W*W for 3l: every selector level), sends interleaved with consumes
    in small chunks on two vCPUs, so the scans resume mid-word and wrap."""
    t = Trace()
    d = h.create_domain(abi, vcpus=2, word_bits=wb, link_bits=LINK_BITS)
    n = {"fifo": 1100, "2l": min(wb * wb - 1, 1100), "3l": wb * wb + 100}[abi]
    ports = [d.bind_ipi(i % 2) for i in range(n)]
    t("ports", [ports[0], ports[-1], d.valid_ports, d.mapped_pages()])
    rng = np.random.default_rng(1234)
    edges_total = np.zeros(ports[-1] + 1, np.int64)
    delivered = np.zeros(ports[-1] + 1, np.int64)
    for rnd in range(6):
        sel = rng.choice(ports, size=300, replace=True).astype(np.uint32)
        edges = np.zeros(sel.size, np.uint8)
        t("send_many", d.send_many(sel, edges))
        t("edges", edges)
        np.add.at(edges_total, sel, edges)
        for v in (0, 1):
            got = d.consume(v, max_events=int(rng.integers(1, 40)))
            t(f"consume {rnd} {v}", got)
            np.add.at(delivered, got, 1)
        if rnd == 3:  # masks on a few pending ports, then unmask
            for p in ports[::97]:
                d.mask(p)
            t("masked", probe(d, ports[::97]))
            for p in ports[::97]:
                d.unmask(p)
    for v in (0, 1):
        got = flat(drain(d, v, chunk=17))
        t(f"drain {v}", got)
        np.add.at(delivered, got, 1)
    assert np.array_equal(delivered, edges_total)
    t("end", probe(d, ports[::13]))
    return t


def scenario_expand(h, abi, wb):
    """FIFO without auto-expand: sends to ports with no event-array page are recorded by Xen
    and replayed by expand_array (917c123029); the new page starts MASKED, unmask links it."""
    t = Trace()
    d0 = h.create_domain(abi, vcpus=2, word_bits=wb, link_bits=LINK_BITS, auto_expand=False)
    du = h.create_domain(abi, word_bits=wb, link_bits=LINK_BITS)
    pairs = []
    for _ in range(5):
        p0 = d0.alloc_unbound(du.domid)
        pairs.append((p0, du.bind_interdomain(d0.domid, p0)))
    ipi = d0.bind_ipi(1)
    for _, q in pairs[:3]:
        du.send(q)
    d0.send(ipi)
    ports = [p for p, _ in pairs] + [ipi]
    t("before expand", (probe(d0, ports), d0.mapped_pages()))
    t("consume before", [d0.consume(v).tolist() for v in range(2)])
    t.error("expand", d0.expand_array)
    t("after expand", probe(d0, ports))
    for p in ports:
        d0.unmask(p)
    t("after unmask", probe(d0, ports))
    t("consume after", [drain(d0, v) for v in range(2)])
    for _, q in pairs:
        du.send(q)
    t("consume again", [drain(d0, v) for v in range(2)])
    while True:  # up to the link_bits limit: then ENOSPC
        r = t.error("expand more", d0.expand_array)
        if r[0] == "error":
            assert r[1] == errno.ENOSPC
            break
    t("pages", d0.mapped_pages())
    return t


SCENARIOS = {"basic": scenario_basic, "spread": scenario_spread, "expand": scenario_expand}


def cases():
    for name in SCENARIOS:
        for abi, wb in CONFIGS:
            if name == "expand" and abi != "fifo":
                continue
            yield name, abi, wb


def segments(h):
    return [(d.domid, d._dm.seg, d._dm.layout) for d in h.domains()]


def assert_same_memory(ha, hb):
    sa, sb = segments(ha), segments(hb)
    assert len(sa) == len(sb)
    for (domid, a, lay), (_, b, _) in zip(sa, sb):
        assert a.size == b.size
        if np.array_equal(a.u8, b.u8):
            continue
        diff = np.flatnonzero(a.u8 != b.u8)
        off = int(diff[0])
        region = (
            "header"
            if off < L.PAGE_SIZE
            else max((o, n) for n, o in lay.offsets.items() if o <= off)[1]
        )
        raise AssertionError(
            f"domain {domid}: {diff.size} bytes differ, first at {off} "
            f"({region} + {off - lay.offsets.get(region, 0)}): "
            f"{int(a.u8[off])} vs {int(b.u8[off])}"
        )


# -- single process: each backend on its own, then the two compared -----------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,abi,wb", list(cases()))
def test_scenario_runs(backend, name, abi, wb):
    """The scenario's own assertions (every edge delivered once, ...) hold on each backend."""
    with make_host(backend) as h:
        SCENARIOS[name](h, abi, wb)
        assert all(lock == 0 for lock in locks_of(h))


@pytest.mark.parametrize("name,abi,wb", list(cases()))
def test_parity(name, abi, wb):
    """Same results, and byte-identical domain memory, on the reference and Cython backends."""
    with make_host("reference") as ha, make_host("cython") as hb:
        ta = SCENARIOS[name](ha, abi, wb)
        tb = SCENARIOS[name](hb, abi, wb)
        for (la, va), (lb, vb) in zip(ta.items, tb.items):
            assert (la, va) == (lb, vb), f"{name}/{abi}/{wb}: step {la!r} differs"
        assert len(ta.items) == len(tb.items)
        assert_same_memory(ha, hb)


@pytest.mark.parametrize("inject", sorted(L.INJECTIONS))
@pytest.mark.parametrize("abi,wb", [("fifo", 64), ("2l", 64), ("3l", 32)])
def test_parity_with_injection(inject, abi, wb):
    """A historical bug put back changes nothing a single process can tell apart from the
    oracle's version of it: same results, same memory."""
    with make_host("reference", inject) as ha, make_host("cython", inject) as hb:
        ta, tb = scenario_basic(ha, abi, wb), scenario_basic(hb, abi, wb)
        assert ta.items == tb.items
        assert_same_memory(ha, hb)


def locks_of(h):
    """Every held lock word of every domain: event, reset, channel, queue and handler locks."""
    return {(d.domid, n): owner for d in h.domains() for n, owner in d._dm.lock_words().items()}


def test_compiled_module_is_what_runs():
    need("cython")
    from evtchn import _core

    with evtchn.Host("cython") as h:
        assert type(h._k) is _core.CythonKernels
        assert (h._k.name, h._k.multiprocess) == ("cython", True)


def test_cython_wait_timeout_and_wakeup():
    need("cython")
    with evtchn.Host("cython") as h:
        d = h.create_domain("fifo", vcpus=2)
        p = d.bind_ipi(1)
        t0 = time.monotonic()
        assert d.wait(1, timeout=0.12) is False
        assert 0.1 <= time.monotonic() - t0 < 30  # upper bound: no hang
        assert d.wait(1, timeout=0) is False
        d.send(p)
        assert d.wait(1, timeout=None) is True
        assert d.consume(1).tolist() == [p]
        assert d._dm.waiters(1) == (0, [0] * L.WAITER_SLOTS)


def test_cython_lock_helpers_and_bad_addresses():
    need("cython")
    with evtchn.Host("cython") as h:
        d = h.create_domain("2l")
        k = h._k
        addr = d._base + L.H_EVENT_LOCK
        assert k.trylock(addr) is True
        assert k.trylock(addr) is False
        assert d._dm.lock_words() == {"event": owner_id()}
        k.unlock(addr)
        k.lock(addr)
        k.unlock(addr)
        assert d._dm.lock_words() == {}
        with pytest.raises(ValueError):
            k.set_bit(8, 0, 64)  # in no mapped domain
        with pytest.raises(ValueError):
            k.set_bit(d._base + 4, 0, 64)  # misaligned
        with pytest.raises(KeyError):
            k.is_pending(7, 1)


# -- several processes --------------------------------------------------------------------------
SENDERS, VCPUS, NPORTS = 2, 2, 256
PER_SENDER, BATCH = 200_000, 256  # batches of 1..BATCH sends: more interleavings
JOIN_S = 180


def _sender(name, domid, ports, total, seed, go, results):
    h = evtchn.Host.attach(name, "cython")
    try:
        d = h.domain(domid)
        ports = np.asarray(ports, np.uint32)
        rng = np.random.default_rng(seed)
        counts = np.zeros(len(ports), np.int64)
        edges = np.zeros(BATCH, np.uint8)
        sent = 0
        results.put(("ready", "sender", seed))
        if not go.wait(JOIN_S):
            raise TimeoutError("never told to start")
        while sent < total:
            k = min(int(rng.integers(1, BATCH + 1)), total - sent)
            idx = rng.integers(0, len(ports), k)
            assert d.send_many(ports[idx], edges[:k]) == k
            np.add.at(counts, idx, edges[:k])
            sent += k
        results.put(("sender", seed, counts.tolist()))
    except BaseException as exc:  # report instead of hanging the parent
        results.put(("error", seed, repr(exc)))
    finally:
        h.close()


def _consumer(name, domid, vcpu, nslots, stop, results):
    h = evtchn.Host.attach(name, "cython")
    try:
        d = h.domain(domid)
        buf = np.empty(97, np.uint32)  # small: the handler often stops early
        counts = np.zeros(nslots, np.int64)
        wakeups = 0
        results.put(("ready", "consumer", vcpu))
        while not stop.is_set():
            if d.wait(vcpu, timeout=0.05):
                wakeups += 1
                n = d.consume_into(vcpu, buf)
                np.add.at(counts, buf[:n], 1)
        results.put(("consumer", vcpu, counts.tolist(), wakeups))
    except BaseException as exc:
        results.put(("error", vcpu, repr(exc)))
    finally:
        h.close()


def _get(results, deadline, procs):
    """The next report; fails fast if a worker died without one, or at the deadline."""
    while time.monotonic() < deadline:
        try:
            return results.get(timeout=0.5)
        except queue_mod.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise AssertionError(
                    f"{dead[0].name} died with exit code {dead[0].exitcode}"
                ) from None
    raise AssertionError("a worker process did not report in time")


@pytest.mark.parametrize("abi,wb", CONFIGS)
def test_multiprocess_every_edge_delivered_once(abi, wb):
    need("cython")
    ctx = mp.get_context("spawn")
    host = evtchn.Host("cython")
    procs = []
    stop, go = ctx.Event(), ctx.Event()
    try:
        ds = host.create_domain(abi, vcpus=1, word_bits=wb)
        dr = host.create_domain(abi, vcpus=VCPUS, word_bits=wb)
        # 3l: spread the ports past W*W, so that every selector level has several words
        spread = -(-(wb * wb + NPORTS) // NPORTS) if abi == "3l" else 1
        pairs = []
        for _ in range(NPORTS * spread):
            rp = dr.alloc_unbound(ds.domid)
            pairs.append((ds.bind_interdomain(dr.domid, rp), rp))
        pairs = pairs[::spread]
        for i, (_, rp) in enumerate(pairs):
            if i % 2:
                dr.bind_vcpu(rp, 1)
            if abi == "fifo":
                dr.set_priority(rp, i % 16)
        assert all(not dr.is_pending(rp) for _, rp in pairs)
        lports = [lp for lp, _ in pairs]
        nslots = max(rp for _, rp in pairs) + 1

        results = ctx.Queue()
        for v in range(VCPUS):
            procs.append(
                ctx.Process(target=_consumer, args=(host.name, dr.domid, v, nslots, stop, results))
            )
        for s in range(SENDERS):
            procs.append(
                ctx.Process(
                    target=_sender, args=(host.name, ds.domid, lports, PER_SENDER, s, go, results)
                )
            )
        for p in procs:
            p.start()
        deadline = time.monotonic() + JOIN_S
        for _ in procs:  # everyone attached and looping: start
            r = _get(results, deadline, procs)
            assert r[0] == "ready", r
        go.set()
        t0 = time.monotonic()
        edges = np.zeros(NPORTS, np.int64)
        for _ in range(SENDERS):
            r = _get(results, deadline, procs)
            assert r[0] == "sender", r
            edges += np.asarray(r[2])
        send_s = time.monotonic() - t0
        stop.set()
        delivered = np.zeros(nslots, np.int64)
        wakeups = []
        for _ in range(VCPUS):
            r = _get(results, deadline, procs)
            assert r[0] == "consumer", r
            delivered += np.asarray(r[2])
            wakeups.append(r[3])
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
            assert p.exitcode == 0, f"{p.name} exit code {p.exitcode}"

        late = 0
        for v in range(VCPUS):  # what the consumers left behind
            got = flat(drain(dr, v))
            late += len(got)
            np.add.at(delivered, got, 1)
        for _, rp in pairs:
            assert not dr.is_pending(rp), rp
            assert not dr.is_linked(rp), rp
            assert not dr.is_masked(rp), rp
        assert not any(dr.upcall_pending(v) for v in range(VCPUS))
        want = np.zeros(nslots, np.int64)
        want[[rp for _, rp in pairs]] = edges
        bad = np.flatnonzero(delivered != want)
        assert bad.size == 0, (
            f"{bad.size} ports differ, e.g. port {bad[0]}: delivered "
            f"{delivered[bad[0]]}, edges {want[bad[0]]}"
        )
        print(
            f"{abi}/{wb}: {SENDERS * PER_SENDER} sends in {send_s:.2f} s, "
            f"{int(edges.sum())} edges, wakeups per vCPU {wakeups}, {late} left to drain"
        )
        assert edges.sum() > 0 and all(wakeups), (edges.sum(), wakeups, late, send_s)
        assert locks_of(host) == {}
    finally:
        stop.set()
        go.set()
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                p.join(5)
            if p.exitcode is None and p.pid is not None:
                p.kill()
                p.join(5)
        host.close()
