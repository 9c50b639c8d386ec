"""The ABI variants a study compares, and the one place where channels get bound.

A variant is an ABI plus, where the ABI depends on it, the width of xen_ulong_t: 2l and 3l on a
64-bit or a 32-bit (x86-32 compat) guest; FIFO's event words are 32-bit for every guest.
"""

from __future__ import annotations

import time

import numpy as np

from evtchn import layout as L

VARIANTS = {
    "2l-32": ("2l", 32),
    "2l-64": ("2l", 64),
    "3l-32": ("3l", 32),
    "3l-64": ("3l", 64),
    "fifo": ("fifo", 64),
}
ALL = tuple(VARIANTS)
# The 3-level series enabled 3-level event channels for dom0 (and driver domains) only; guests
# kept the 2-level ABI (spec section 3: the V2 and V5 cover letters). Where a study needs
# guests of a variant, a 3l variant's guests are 2l guests of the same word size.
GUEST_OF = {"3l-32": "2l-32", "3l-64": "2l-64"}


def guest_variant(variant: str) -> str:
    return GUEST_OF.get(variant, variant)


ABI_OF = {v: abi for v, (abi, _) in VARIANTS.items()}


def create(host, variant: str, vcpus: int = 1, **kw):
    """A domain of `variant` on `host` (kw: link_bits, max_ports, ... as Host.create_domain)."""
    abi, wb = VARIANTS[variant]
    return host.create_domain(abi, vcpus=vcpus, word_bits=wb, **kw)


def port_limit(variant: str, link_bits: int = L.FIFO_LINK_BITS) -> int:
    abi, wb = VARIANTS[variant]
    return L.abi_max_ports(L.ABI_NAMES[abi], wb, link_bits)


def bind_channels(back, front, n: int, vcpu=None) -> tuple[np.ndarray, np.ndarray]:
    """Bind n interdomain channels: `back` allocates an unbound port for `front`, which binds
    it (EVTCHNOP_alloc_unbound + EVTCHNOP_bind_interdomain, as a backend and its frontend
    do), with the batch calls (Domain.alloc_unbound_many, bind_interdomain_many: all or
    none). Returns (back ports, front ports) as uint32 arrays; raises (ENOSPC included,
    BatchError) with nothing bound. `vcpu`, if given, is the back end's notify vCPU (an int,
    or a callable port -> vcpu).

    This is the one place the study binds channels."""
    bports = back.alloc_unbound_many(front.domid, n)
    fports = front.bind_interdomain_many(back.domid, bports)
    if vcpu is not None:
        for p in bports.tolist():
            v = vcpu(p) if callable(vcpu) else vcpu
            if v:
                back.bind_vcpu(p, v)
    return bports, fports


class Timer:
    """Seconds spent in named setup steps (reported with every configuration)."""

    def __init__(self):
        self.spent: dict[str, float] = {}

    def __call__(self, name: str):
        return _Span(self, name)


class _Span:
    def __init__(self, timer: Timer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        t = self.timer.spent
        t[self.name] = round(t.get(self.name, 0.0) + time.perf_counter() - self.t0, 4)
