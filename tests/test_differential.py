"""Stateful differential test: every operation applied to the reference oracle and to a
compiled backend; results, errors and the whole shared memory must stay identical."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import _available
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import evtchn
from evtchn import EvtchnError

settings.register_profile(
    "ci",
    max_examples=25,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
settings.register_profile(
    "dev",
    max_examples=100,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
settings.register_profile(
    "long",
    max_examples=2000,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

VCPUS = 3
port_ix = st.integers(0, 40)  # an index into the ports a domain has bound (or a raw port)
vcpu_st = st.integers(-1, VCPUS)  # includes invalid vcpus on purpose


def outcome(fn):
    try:
        r = fn()
    except EvtchnError as exc:
        return ("error", exc.errno)
    if isinstance(r, np.ndarray):
        return ("ok", r.tolist())
    return ("ok", r)


class Differential(RuleBasedStateMachine):
    abi = "fifo"
    word_bits = 64
    other = "cython"

    @initialize()
    def make(self):
        self.hosts = [evtchn.Host("reference"), evtchn.Host(self.other)]
        self.doms = []
        for h in self.hosts:
            d0 = h.create_domain(self.abi, vcpus=VCPUS, word_bits=self.word_bits)
            du = h.create_domain(self.abi, vcpus=2, word_bits=self.word_bits)
            self.doms.append((d0, du))

    def teardown(self):
        for h in getattr(self, "hosts", []):
            h.close()

    def both(self, fn):
        """Apply fn(dom0, domu) on both hosts; the outcomes must match."""
        a, b = (outcome(lambda d=d: fn(*d)) for d in self.doms)
        assert a == b, f"reference {a} != {self.other} {b}"
        return a

    @staticmethod
    def _port(d, i):
        """Map an index onto one of the domain's ports below valid (so most calls are valid)."""
        return i % (d.valid_ports + 2)

    @rule(to_self=st.booleans())
    def alloc_unbound(self, to_self):
        self.both(lambda d0, du: d0.alloc_unbound(d0.domid if to_self else du.domid))

    @rule(i=port_ix)
    def bind_interdomain(self, i):
        self.both(lambda d0, du: du.bind_interdomain(d0.domid, self._port(d0, i)))

    @rule(v=vcpu_st)
    def bind_ipi(self, v):
        self.both(lambda d0, du: d0.bind_ipi(v))

    @rule(virq=st.sampled_from([0, 1, 2, 11, 24]), v=vcpu_st)
    def bind_virq(self, virq, v):
        self.both(lambda d0, du: d0.bind_virq(virq, v))

    @rule(virq=st.sampled_from([0, 1, 2, 11]), v=st.integers(0, VCPUS - 1))
    def raise_virq(self, virq, v):
        self.both(lambda d0, du: d0.raise_virq(virq, v))

    @rule(i=port_ix, which=st.booleans())
    def close(self, i, which):
        self.both(lambda d0, du: (d0 if which else du).close(self._port(d0 if which else du, i)))

    @rule(i=port_ix, which=st.booleans())
    def send(self, i, which):
        self.both(lambda d0, du: (du if which else d0).send(self._port(du if which else d0, i)))

    @rule(idx=st.lists(port_ix, min_size=1, max_size=12))
    def send_many(self, idx):
        def go(d0, du):
            edges = np.zeros(len(idx), np.uint8)
            n = du.send_many(np.array([self._port(du, i) for i in idx], np.uint32), edges)
            return (n, edges.tolist())

        self.both(go)

    @rule(i=port_ix)
    def mask(self, i):
        self.both(lambda d0, du: d0.mask(self._port(d0, i)))

    @rule(i=port_ix)
    def unmask(self, i):
        self.both(lambda d0, du: d0.unmask(self._port(d0, i)))

    @rule(i=port_ix, v=vcpu_st)
    def bind_vcpu(self, i, v):
        self.both(lambda d0, du: d0.bind_vcpu(self._port(d0, i), v))

    @rule(i=port_ix, prio=st.integers(-1, 16))
    def set_priority(self, i, prio):
        self.both(lambda d0, du: d0.set_priority(self._port(d0, i), prio))

    @rule(v=st.integers(0, VCPUS - 1), limit=st.one_of(st.none(), st.integers(0, 4)))
    def consume(self, v, limit):
        self.both(lambda d0, du: d0.consume(v, max_events=limit))

    @rule()
    def consume_domu(self):
        self.both(lambda d0, du: (du.consume(0).tolist(), du.consume(1).tolist()))

    @rule(i=port_ix)
    def queries(self, i):
        self.both(
            lambda d0, du: (
                d0.is_pending(self._port(d0, i)),
                d0.is_masked(self._port(d0, i)),
                d0.is_linked(self._port(d0, i)),
                [d0.upcall_pending(v) for v in range(VCPUS)],
            )
        )

    @rule(idx=st.lists(port_ix, max_size=3), v=vcpu_st, masked=st.booleans())
    def poll(self, idx, v, masked):
        """SCHEDOP_poll that cannot block (timeout 0): the same reason, port or error."""

        def go(d0, du):
            if 0 <= v < VCPUS:
                d0.set_upcall_mask(v, masked)
            return d0.poll(v, [self._port(d0, i) for i in idx], timeout=0)

        self.both(go)

    @rule(i=port_ix)
    def status(self, i):
        self.both(lambda d0, du: d0.status(self._port(d0, i)))

    @rule()
    def reset(self):
        self.both(lambda d0, du: d0.reset())

    @invariant()
    def memory_identical(self):
        if not hasattr(self, "doms"):
            return
        for ref, other in zip(self.doms[0], self.doms[1]):
            ma, mb = ref._dm.seg.u8, other._dm.seg.u8
            if not np.array_equal(ma, mb):
                diff = np.flatnonzero(ma != mb)
                lay = ref._dm.layout.offsets
                region = max((o, n) for n, o in lay.items() if o <= diff[0])[1]
                raise AssertionError(
                    f"domain {ref.domid}: {len(diff)} bytes differ, first at "
                    f"{int(diff[0])} (region {region}): "
                    f"{int(ma[diff[0]])} vs {int(mb[diff[0]])}"
                )


CASES = [
    (abi, wb, other)
    for other in ("cython", "numba")
    for abi, wb in (("fifo", 64), ("2l", 64), ("2l", 32), ("3l", 64), ("3l", 32))
]


@pytest.mark.parametrize("abi,word_bits,other", CASES)
def test_differential(abi, word_bits, other):
    if not _available(other):
        pytest.skip(f"backend {other} is not available")
    machine = type(
        f"Diff_{abi}_{word_bits}_{other}",
        (Differential,),
        dict(abi=abi, word_bits=word_bits, other=other),
    )
    machine.TestCase().runTest()
