"""The per-event cost of the handler loop: one event through send -> wait (returns at once:
the upcall is pending) -> consume -> mask -> unmask, both ends in one process so nothing
sleeps; on evtchn's Python handles and from @njit code through evtchn.numba."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
from numba import njit

import evtchn
import evtchn.numba as en


def _python_rounds(tx: evtchn.Domain, rx: evtchn.Domain, port: int, rounds: int) -> int:
    got, out = 0, np.empty(16, np.uint32)
    for _ in range(rounds):
        tx.send(port)
        if rx.wait(0, 0):
            n = rx.consume_into(0, out)
            for p in out[:n].tolist():
                rx.mask(p)
                rx.unmask(p)
            got += n
    return got


@njit(cache=True)
def _njit_rounds(
    tx: en.Views, rx: en.Views, port: int, rounds: int, out: npt.NDArray[np.uint32]
) -> int:
    got = 0
    for _ in range(rounds):
        en.send(tx, port)
        if en.wait(rx, 0, 0):
            n = en.consume(rx, 0, out)
            for i in range(n):
                en.mask(rx, out[i])
                en.unmask(rx, out[i])
            got += n
    return got


def per_event_ns(
    back: evtchn.Domain, front: evtchn.Domain, rounds: int, repeats: int, use_njit: bool
) -> float:
    """Median ns per event over `repeats` runs of `rounds` events on a fresh channel from
    `front` to `back` (closed again afterwards)."""
    remote = back.alloc_unbound(front.domid)
    port = front.bind_interdomain(back.domid, remote)
    back.consume(0)  # the bind set the new port pending (Xen's bind_interdomain)
    try:
        run: Callable[[], int]
        if use_njit:
            tx, rx, out = en.views(front), en.views(back), np.empty(16, np.uint32)
            _njit_rounds(tx, rx, port, 1, out)  # compile or load before timing

            def run() -> int:
                return int(_njit_rounds(tx, rx, port, rounds, out))
        else:

            def run() -> int:
                return _python_rounds(front, back, port, rounds)

        times = []
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            got = run()
            times.append((time.perf_counter_ns() - t0) / rounds)
            if got != rounds:
                raise RuntimeError(f"{got} of {rounds} events were delivered")
        return statistics.median(times)
    finally:
        front.close(port)
        back.close(remote)
