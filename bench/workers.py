"""The evtchn side of a benchmark run: a sender process and a vCPU process (spawned).

Each worker attaches to the host by name, then serves runs until told to stop: the parent sends
a dict of parameters over a Pipe, the worker answers with a dict of counts (or an error).

The two workers and the parent share a small int64 array (a multiprocessing RawArray, one cache
line per slot) that is the benchmark's own bookkeeping, outside evtchn's memory:

    START     CLOCK_MONOTONIC ns at which both workers begin (set by the parent)
    DONE      1 once the sender has made its last send
    PROGRESS  events delivered so far, published by the vCPU after every consume call; the
              sender uses it for flow control (at most `window` events in flight)

The C program (bench/c/evtchn_ref.c) runs exactly these loops.
"""

from __future__ import annotations

import os
import time
import traceback

import numpy as np

SLOT = 8  # int64 slots per cache line
START, DONE, PROGRESS = 0, SLOT, 2 * SLOT
CTL_SIZE = 3 * SLOT


def _serve(conn, setup, run):
    """Attach, report ready, run each request until None arrives; errors go back as text."""
    state = None
    try:
        state = setup()
        conn.send(("ready", None))
        while True:
            params = conn.recv()
            if params is None:
                break
            conn.send(("ok", run(state, params)))
    except Exception:  # reported to the parent, which raises
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
    finally:
        if state is not None:
            state["host"].close()
        conn.close()


def _sleep_until(t_ns: int) -> None:
    left = t_ns - time.monotonic_ns()
    if left > 0:
        time.sleep(left / 1e9)


def _pin(cpu) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


PER_EVENT_GROUP = 64  # batch 1: sends between two looks at the clock and the window


def sender_main(conn, host_name: str, backend: str, domid: int, ports, ctl, cpu=None) -> None:
    """Send on `ports` (the sender domain's local ports) in batches until the deadline."""

    def setup():
        from evtchn import Host

        _pin(cpu)
        host = Host.attach(host_name, backend)
        return {"host": host, "dom": host.domain(domid)}

    def run(state, p):
        dom, batch, window = state["dom"], p["batch"], p["window"]
        relax = os.sched_yield if p.get("yield") else None  # more processes than CPUs
        arr = np.ascontiguousarray(ports, dtype=np.uint32)
        # batch 1: one Domain.send call per event, but the clock and the window are looked
        # at once per PER_EVENT_GROUP sends (each a call of its own), not per event
        group = batch == 1 and len(arr) % PER_EVENT_GROUP == 0
        step = PER_EVENT_GROUP if group and (not window or window >= PER_EVENT_GROUP) else batch
        nb = len(arr) // step
        chunks = [arr[i * step : (i + 1) * step] for i in range(nb)]
        edges = np.zeros(batch, np.uint8)
        send, singles = dom.send, [c.tolist() for c in chunks] if batch == 1 else []
        t0 = p["start_ns"]
        deadline = t0 + int(p["duration"] * 1e9)
        clock = time.monotonic_ns
        sent = nedges = batches = 0
        _sleep_until(t0)
        i = 0
        while clock() < deadline:
            if window:  # flow control: at most `window` edges in flight
                while nedges + step - ctl[PROGRESS] > window and clock() < deadline:
                    if relax:
                        relax()
                if clock() >= deadline:
                    break
            if batch == 1:  # one Domain.send call per event (it returns the edge)
                for port in singles[i]:
                    nedges += send(port)
                batches += step
            else:
                dom.send_many(chunks[i], edges)
                nedges += int(np.count_nonzero(edges))
                batches += 1
            sent += step
            i = i + 1 if i + 1 < nb else 0
        end = clock()
        ctl[DONE] = 1
        return {"sent": sent, "edges": nedges, "batches": batches, "sender_ns": end - t0}

    _serve(conn, setup, run)


def vcpu_main(conn, host_name: str, backend: str, domid: int, vcpu: int, ctl, cpu=None) -> None:
    """The vCPU: consume into a buffer; when a call delivers nothing, poll the upcall flag for
    up to spin_ns, then block in wait(). Ends when the sender is done and all is drained."""

    def setup():
        from evtchn import Host

        _pin(cpu)
        host = Host.attach(host_name, backend)
        return {"host": host, "dom": host.domain(domid)}

    def run(state, p):
        dom = state["dom"]
        cap, spin_ns, timeout = p["cap"], p["spin_ns"], p["wait_timeout"]
        buf = np.empty(cap, np.uint32)
        consume_into, upcall_pending, wait = dom.consume_into, dom.upcall_pending, dom.wait
        clock = time.monotonic_ns
        delivered = calls = nonempty = fulls = waits = 0
        final = False
        t0 = p["start_ns"]
        _sleep_until(t0)
        last = t0
        while True:
            n = consume_into(vcpu, buf)
            calls += 1
            if n:
                delivered += n
                ctl[PROGRESS] = delivered
                nonempty += 1
                last = clock()
                if n == cap:
                    fulls += 1
                    continue
            if final:  # drained after the sender finished
                break
            if n:
                continue
            if ctl[DONE]:
                final = True  # one more pass sees every last event
                continue
            if spin_ns:
                end = clock() + spin_ns
                while not upcall_pending(vcpu) and clock() < end:
                    pass
                if upcall_pending(vcpu):
                    continue
            waits += 1
            wait(vcpu, timeout)
        return {
            "delivered": delivered,
            "consume_calls": calls,
            "nonempty_calls": nonempty,
            "full_calls": fulls,
            "waits": waits,
            "elapsed_ns": last - t0,
            "consumer_ns": clock() - t0,
        }

    _serve(conn, setup, run)
