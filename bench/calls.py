"""Per-call costs in one process, each beside its yardstick, and the setup of many channels.

    send      Domain.send(port) on an interdomain port, beside the backend's kernel call
              (Host._k.send) on the same port; the receiver's queue is drained between reps
    consume   Domain.consume(vcpu), consume_one(vcpu) and consume_into(vcpu, buf) with nothing
              pending, beside the kernel call (Host._k.consume into a 4096-port buffer)
    setup     SETUP_CHANNELS interdomain channels between two fresh fifo domains:
              alloc_unbound_many + bind_interdomain_many, beside the single ops
              (alloc_unbound + bind_interdomain per channel, timed on SINGLE_SAMPLE channels
              and scaled: the whole run would take tens of seconds)

Each figure is the median over reps; within a rep the calls and their yardstick alternate, so
load drift hits both alike. Figures: calls_*_ns (per call), setup_*_ns; the ratios
(calls_send_over_kernel, ...) are what the issue's targets are stated in.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from evtchn import Host

SETUP_CHANNELS = 131_071  # a 17-bit FIFO domain's usable ports (port 0 is reserved)
LINK_BITS = 18  # room for SETUP_CHANNELS + 1 ports, as the headline's 131,072
SINGLE_SAMPLE = 2048
CALLS = 20_000  # calls per timed loop
QUICK_CALLS = 2_000
QUICK_SETUP = 8_192
TARGETS = {  # figure: (ratio key, target, "at most"/"at least")
    "send": ("calls_send_over_kernel", 2.0),
    "consume": ("calls_consume_empty_over_kernel", 3.0),
}


def _loop_ns(fn: Callable[[], object], n: int) -> float:
    clock = time.perf_counter_ns
    t0 = clock()
    for _ in range(n):
        fn()
    return (clock() - t0) / n


def _pair(host: Host, n: int, link_bits: int = 17):
    d0 = host.create_domain("fifo", vcpus=1, link_bits=link_bits)
    du = host.create_domain("fifo", vcpus=1, link_bits=link_bits)
    r = d0.alloc_unbound_many(du.domid, n)
    local = du.bind_interdomain_many(d0.domid, r)
    du.consume(0)
    return d0, du, r, local


def measure_calls(backend: str, reps: int, quick: bool = False) -> dict:
    """Per-call ns of the handle calls and their kernel yardsticks (medians over reps)."""
    n = QUICK_CALLS if quick else CALLS
    out: dict[str, list[float]] = {}
    with Host(backend) as host:
        host.warm_up()
        d0, du, _r, local = _pair(host, 1)
        k, port, buf = host._k, int(local[0]), np.empty(4096, np.uint32)
        tx, rx = du.domid, d0.domid
        cases = {
            "calls_send_kernel_ns": lambda: k.send(tx, port),
            "calls_send_domain_ns": lambda: du.send(port),
            "calls_consume_empty_kernel_ns": lambda: k.consume(rx, 0, buf),
            "calls_consume_empty_domain_ns": lambda: d0.consume(0),
            "calls_consume_one_empty_ns": lambda: d0.consume_one(0),
            "calls_consume_into_empty_ns": lambda: d0.consume_into(0, buf),
        }
        for fn in cases.values():  # untimed: first calls, a JIT backend's compiles
            fn()
        for _ in range(reps):
            for key, fn in cases.items():
                out.setdefault(key, []).append(_loop_ns(fn, n))
                d0.consume(0)  # the sends' one pending event
    fig = {key: statistics.median(v) for key, v in out.items()}
    fig["calls_send_over_kernel"] = fig["calls_send_domain_ns"] / fig["calls_send_kernel_ns"]
    kernel = fig["calls_consume_empty_kernel_ns"]
    fig["calls_consume_empty_over_kernel"] = fig["calls_consume_empty_domain_ns"] / kernel
    fig["calls_consume_one_empty_over_kernel"] = fig["calls_consume_one_empty_ns"] / kernel
    fig["calls_consume_into_empty_over_kernel"] = fig["calls_consume_into_empty_ns"] / kernel
    return fig


def _setup_batch(backend: str, n: int) -> float:
    with Host(backend) as host:
        d0 = host.create_domain("fifo", vcpus=1, link_bits=LINK_BITS)
        du = host.create_domain("fifo", vcpus=1, link_bits=LINK_BITS)
        t0 = time.perf_counter_ns()
        du.bind_interdomain_many(d0.domid, d0.alloc_unbound_many(du.domid, n))
        return float(time.perf_counter_ns() - t0)


def _setup_single_per_channel(backend: str, n: int) -> float:
    with Host(backend) as host:
        d0 = host.create_domain("fifo", vcpus=1, link_bits=LINK_BITS)
        du = host.create_domain("fifo", vcpus=1, link_bits=LINK_BITS)
        t0 = time.perf_counter_ns()
        for _ in range(n):
            du.bind_interdomain(d0.domid, d0.alloc_unbound(du.domid))
        return (time.perf_counter_ns() - t0) / n


def measure_setup(backend: str, reps: int, quick: bool = False) -> dict:
    """Setting up SETUP_CHANNELS channels with the batch calls, beside the single ops."""
    n = QUICK_SETUP if quick else SETUP_CHANNELS
    batch, single = [], []
    _setup_batch(backend, 64)  # untimed: first calls
    for _ in range(reps):
        batch.append(_setup_batch(backend, n))
        single.append(_setup_single_per_channel(backend, min(n, SINGLE_SAMPLE)))
    b, s = statistics.median(batch), statistics.median(single)
    return {
        "setup_channels": n,
        "setup_batch_ns": b,
        "setup_batch_per_channel_ns": b / n,
        "setup_single_per_channel_ns": s,
        "setup_single_projected_ns": s * n,
        "setup_single_over_batch": s * n / b,
    }


def report(fig: dict, backend: str) -> list[str]:
    """The table's lines."""
    lines = [
        "",
        f"per-call cost, {backend}, one process, median ns per call (yardstick beside it)",
        f"  Domain.send               {fig['calls_send_domain_ns']:8.0f}   kernel send "
        f"{fig['calls_send_kernel_ns']:6.0f}   ratio {fig['calls_send_over_kernel']:.2f}",
    ]
    kernel = fig["calls_consume_empty_kernel_ns"]
    for label, key in (
        ("Domain.consume, none", "calls_consume_empty_domain_ns"),
        ("Domain.consume_one, none", "calls_consume_one_empty_ns"),
        ("Domain.consume_into, none", "calls_consume_into_empty_ns"),
    ):
        lines.append(
            f"  {label:<25} {fig[key]:8.0f}   kernel consume {kernel:6.0f}   ratio "
            f"{fig[key] / kernel:.2f}"
        )
    for name, (key, target) in TARGETS.items():
        ratio = fig[key]
        lines.append(
            f"target: {name} at most {target:g}x the kernel call: measured {ratio:.2f}x, "
            + ("met" if ratio <= target else "NOT met")
        )
    if "setup_batch_ns" in fig:
        n = fig["setup_channels"]
        lines.append(
            f"setup of {n} fifo channels: batch {fig['setup_batch_ns'] / 1e9:.3f} s "
            f"({fig['setup_batch_per_channel_ns']:.0f} ns/channel); single ops "
            f"{fig['setup_single_per_channel_ns']:.0f} ns/channel, "
            f"{fig['setup_single_projected_ns'] / 1e9:.1f} s projected; "
            f"{fig['setup_single_over_batch']:.1f}x"
        )
        if n == SETUP_CHANNELS:
            took = fig["setup_batch_ns"] / 1e9
            lines.append(
                f"target: setup of {n} channels at most 1 s: measured {took:.3f} s, "
                + ("met" if took <= 1.0 else "NOT met")
            )
    return lines
