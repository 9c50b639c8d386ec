"""The racing part of experiment 2: sender and consumer processes over thousands of domains,
as @njit loops on evtchn.numba (a Python call per guest would measure Python).

Channels are numbered 0..C-1. A sender process owns a set of channels (the guests' ends: it
raises them with send) and counts the new edges per channel; a consumer process owns a set of
(domain, vCPU) pairs, runs their upcall handlers whenever an upcall is pending and counts the
deliveries per channel (chan_of maps a receiving (domain, port) to its channel). Control words
(shared int64): STOP 1 = senders stop, 2 = consumers drain and leave; each process raises its
DONE flag when it has left.
"""

from __future__ import annotations

import numpy as np
from numba import njit

import evtchn.numba as en
from evtchn._numba_atomics import load_u64

STOP = 0
PORT_SLOTS = 8  # guests' receiving ports are below this (xenstore, console, vchan, ...)


@njit(cache=True)
def send_loop(table, pid, sdoms, sports, chans, edges, ctl_addr):
    """Raise every owned channel in turn until STOP; new edges counted per channel."""
    rounds = 0
    while load_u64(ctl_addr) == 0:
        for i in range(sdoms.shape[0]):
            r = en.send(en.Views(table, sdoms[i], pid), sports[i])
            if r == 1:
                edges[chans[i]] += 1
            elif r < 0:
                return -r  # an errno: a refused send is a failure
        rounds += 1
    return 0


@njit(cache=True)
def _chan(dom, port, dom0_chan, guest_chan):
    if dom == 0:
        return dom0_chan[port]
    return guest_chan[dom * PORT_SLOTS + port]


@njit(cache=True)
def consume_loop(table, pid, doms, vcpus, dom0_chan, guest_chan, delivered, ctl_addr, bad):
    """Handle every owned (domain, vCPU) with an upcall pending, until told to drain and a few
    sweeps find nothing. Returns the deliveries; bad[0] counts ports with no channel."""
    buf = np.zeros(256, np.uint32)
    idle = 0
    total = 0
    while True:
        got = 0
        for i in range(doms.shape[0]):
            v = en.Views(table, doms[i], pid)
            if not en.upcall_pending(v, vcpus[i]):
                continue
            while True:
                n = en.consume(v, vcpus[i], buf)
                for j in range(n):
                    c = _chan(doms[i], np.int64(buf[j]), dom0_chan, guest_chan)
                    if c < 0:
                        bad[0] += 1
                    else:
                        delivered[c] += 1
                got += n
                if n < buf.shape[0]:
                    break
        total += got
        if load_u64(ctl_addr) >= 2:
            idle = idle + 1 if got == 0 else 0
            if idle >= 3:
                return total
