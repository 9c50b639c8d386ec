"""The upcall handlers a probe round runs, as @njit code on the shared memory.

LINUX = 0       evtchn's own consumer (evtchn.numba.consume, one event per call): Linux's
                current handlers - 2l: the timer first, then the scan that resumes after the
                last port handled (drivers/xen/events/events_2l.c); 3l: the same with one more
                selector level (the design); fifo: highest-priority ready queue first, READY
                re-read after every event (events_fifo.c).
SCAN_FROM_0 = 1 the historical 2-level handler: Linux's __xen_evtchn_do_upcall in
                drivers/xen/events.c before the round-robin rework (read at torvalds/linux
                010b8f4e264b, a 2.6.3x-era tree: irq_data, set_irq_msi; the rotating scan with
                per-CPU current_word_idx / current_bit_idx is there by Linux 3.6, the release
                that brought it was not pinned down here): clear upcall_pending, xchg
                the selector, then for each selector bit from the lowest: while the word has
                active ports, handle its lowest one (re-reading the word every time). A word
                whose ports keep being raised keeps the handler there, and every upcall starts
                again from word 0. The mask/unmask Linux did around each port's handler is
                left out: it does not change which port the scan takes next. It reads and
                writes the domain's shared_info with the same atomics as the engine (one vCPU:
                every port is bound to it, so the per-CPU binding mask is all ones).

``probe_round`` is the whole measurement loop of a probe round (probe.py): it raises the
probe (a send on the victim's channel, or Xen raising VIRQ_TIMER) whenever the previous one was
handled and a randomised gap has passed, runs the handler one event at a time, and for each
probe records its delay in ns and in deliveries of other ports.
"""

from __future__ import annotations

import numpy as np
from numba import njit

import evtchn.numba as en
from evtchn._numba_atomics import (
    fetch_and_u32,
    fetch_and_u64,
    load_u8,
    load_u32,
    load_u64,
    monotonic_ns,
    store_u8,
    xchg_u32,
    xchg_u64,
)

LINUX, SCAN_FROM_0 = 0, 1
PROBE_SEND, PROBE_VIRQ = 0, 1
VIRQ_TIMER = 0
# hist state slots (int64): pending_words taken by the last xchg, word being scanned (-1: none)
H_WORDS, H_WORD = 0, 1


@njit(cache=True)
def _ffs(x):
    b = 0
    while (x >> np.uint64(b)) & np.uint64(1) == 0:
        b += 1
    return b


@njit(cache=True)
def _wload(addr, wb):
    if wb == 64:
        return load_u64(addr)
    return np.uint64(load_u32(addr))


@njit(cache=True)
def _test_and_clear(addr, wb, bit):
    if wb == 64:
        m = np.uint64(1) << np.uint64(bit)
        return (fetch_and_u64(addr, ~m) & m) != 0
    m32 = np.uint32(1) << np.uint32(bit)
    return (fetch_and_u32(addr, ~m32) & m32) != 0


@njit(cache=True)
def hist_next(si, wb, st):
    """The next port the scan-from-0 handler delivers (its PENDING cleared), or -1 when no
    upcall is pending and the scan is done. `si` is shared_info's address, st the state."""
    pend = si + 2048  # evtchn_pending
    mask = pend + wb * wb // 8  # evtchn_mask
    flag = si  # vcpu_info[0].evtchn_upcall_pending
    sel = si + (8 if wb == 64 else 4)  # vcpu_info[0].evtchn_pending_sel
    wbytes = wb // 8
    while True:
        word = st[H_WORD]
        if word >= 0:
            bits = _wload(pend + word * wbytes, wb) & ~_wload(mask + word * wbytes, wb)
            if bits != 0:
                b = _ffs(bits)
                if _test_and_clear(pend + word * wbytes, wb, b):
                    return word * wb + b
                continue
            st[H_WORD] = -1
        words = np.uint64(st[H_WORDS])
        if words != 0:
            w = _ffs(words)
            st[H_WORDS] = np.int64(words & ~(np.uint64(1) << np.uint64(w)))
            st[H_WORD] = w
            continue
        if load_u8(flag) & 1 == 0:
            return -1
        store_u8(flag, 0)  # the master flag, then the selector
        if wb == 64:
            st[H_WORDS] = np.int64(xchg_u64(sel, np.uint64(0)))
        else:
            st[H_WORDS] = np.int64(xchg_u32(sel, np.uint32(0)))


@njit(cache=True)
def next_event(rx, consumer, si, wb, st, buf):
    if consumer == SCAN_FROM_0:
        return hist_next(si, wb, st)
    if en.consume(rx, 0, buf) == 1:
        return np.int64(buf[0])
    return np.int64(-1)


@njit(cache=True)
def probe_round(
    rx,
    tx,
    consumer,
    probe_kind,
    probe_lport,
    probe_port,
    si,
    wb,
    st,
    dur_ns,
    gap_ns,
    seed,
    delivered,
    out,
    reraise,
    own_edges,
):
    """Run for dur_ns; returns (probes raised, probes handled, probe edges, total deliveries).
    out[i] = (delay ns, other deliveries before it, 0) per handled probe; the last row may be
    a probe still waiting at the end: (its wait so far, others so far, 1) = censored.
    reraise[p] = the sender's local port of hot port p (0: not hot): its handler raises it
    again at once (a device that has more work as soon as it is serviced: a storm), counting
    the new edges in own_edges[p]."""
    np.random.seed(seed)
    buf = np.zeros(1, np.uint32)
    t_end = monotonic_ns() + dur_ns
    waiting = False
    t_sent = np.int64(0)
    c_sent = np.int64(0)
    total = np.int64(0)
    raised = handled = edges = 0
    next_at = monotonic_ns() + np.int64(gap_ns * (0.5 + np.random.random()))
    nrec = 0
    while True:
        now = monotonic_ns()
        if now >= t_end:
            break
        if not waiting and now >= next_at and nrec < out.shape[0] - 1:
            if probe_kind == PROBE_SEND:
                r = en.send(tx, probe_lport)
            else:
                r = en.raise_virq(rx, VIRQ_TIMER, 0)
            edges += r
            raised += 1
            waiting = True
            t_sent = monotonic_ns()
            c_sent = total
        p = next_event(rx, consumer, si, wb, st, buf)
        if p < 0:
            continue
        delivered[p] += 1
        if reraise[p] != 0:
            own_edges[p] += en.send(tx, reraise[p])
        if p == probe_port and waiting:
            t = monotonic_ns()
            out[nrec, 0] = t - t_sent
            out[nrec, 1] = total - c_sent
            out[nrec, 2] = 0
            nrec += 1
            handled += 1
            waiting = False
            next_at = t + np.int64(gap_ns * (0.5 + np.random.random()))
        total += 1
    if waiting:
        out[nrec, 0] = monotonic_ns() - t_sent
        out[nrec, 1] = total - c_sent
        out[nrec, 2] = 1
    return raised, handled, edges, total


@njit(cache=True)
def drain(rx, consumer, si, wb, st, delivered, limit):
    """Handle everything left (after the senders stopped); returns how many."""
    buf = np.zeros(1, np.uint32)
    n = 0
    idle = 0
    while n < limit and idle < 1000:
        p = next_event(rx, consumer, si, wb, st, buf)
        if p < 0:
            idle += 1
            continue
        idle = 0
        delivered[p] += 1
        n += 1
    return n
