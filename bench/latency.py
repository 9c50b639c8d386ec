"""Latency from send to handler, one event at a time, for a busy and for an idle vCPU.

evtchn: one interdomain port from a sender domain to dom0 vCPU 0, a spawned sender process and
a spawned vCPU process pinned to two CPUs (as the stream case). For each event the sender waits
until the vCPU has handled the previous one, waits `gap` more, stores a time.perf_counter_ns()
timestamp (CLOCK_MONOTONIC on Linux) in shared memory and calls send(port); the vCPU's
handler, when consume_into returns the port, takes its own timestamp and records the difference.

    busy  the vCPU is running: it spins on its upcall flag in wait(vcpu, spin_ns=BUSY_SPIN_NS)
          (the spin runs in the kernel, unregistered: no kick) and runs the handler
          (consume_one) as soon as the flag is set, as a running vCPU takes the upcall
    idle  the vCPU is halted: it blocks in wait(vcpu, spin_ns=0) (a futex sleep) and the
          sender's send kicks it; the sender sends only after the vCPU said it was going to
          block, plus `gap`, so it is asleep

The bookkeeping (timestamp, acknowledgements) is a RawArray outside evtchn's memory; only the
event itself goes through evtchn. The C program's --handoff mode measures the floor under these
figures on the same CPUs: a store plus a spinning reader (busy), a store plus FUTEX_WAKE of a
FUTEX_WAIT sleeper (idle), with nothing of evtchn in between.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import traceback

import numpy as np

from evtchn import Host

from .cases import CTX, JOIN_TIMEOUT, RUN_MARGIN, BenchError

SLOT = 8
T_SEND, ACK, SLEEPING, READY_S, READY_V, FAILED, GO = (i * SLOT for i in range(7))
CTL_SIZE = 7 * SLOT
WARM = 20  # first events of a run, not counted (first calls, page faults)
MODES = ("busy", "idle")
GAP_NS = 100_000  # between the previous event's handling and the next send
TARGETS = {"busy": 3.0, "idle": 1.2}  # median / C's (issue 10)
BUSY_SPIN_NS = 10**9  # the busy vCPU's spin: longer than any gap, so it never blocks


def _pin(cpu) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _sleep_ns(ns: int) -> None:
    time.sleep(ns / 1e9)


def sender_main(host_name, backend, domid, port, mode, count, gap_ns, ctl, cpu):
    host = None
    try:
        _pin(cpu)
        host = Host.attach(host_name, backend)
        send = host.domain(domid).send
        ctl[READY_S] = 1
        while not ctl[GO]:
            time.sleep(0.001)
        clock = time.perf_counter_ns
        limit = time.monotonic() + RUN_MARGIN
        idle = mode == "idle"
        for i in range(count):
            while ctl[ACK] != i or (idle and not ctl[SLEEPING]):
                if time.monotonic() > limit:
                    raise BenchError("the vCPU stopped handling events")
            _sleep_ns(gap_ns)
            ctl[T_SEND] = clock()
            send(port)
    except BaseException:
        ctl[FAILED] = 1
        traceback.print_exc()
        raise
    finally:
        if host is not None:
            host.close()


def vcpu_main(host_name, backend, domid, vcpu, mode, count, lat, ctl, cpu):
    host = None
    try:
        _pin(cpu)
        host = Host.attach(host_name, backend)
        dom = host.domain(domid)
        consume_one, wait = dom.consume_one, dom.wait
        clock = time.perf_counter_ns
        ctl[READY_V] = 1
        idle = mode == "idle"
        for i in range(count):
            while True:
                if idle:
                    ctl[SLEEPING] = 1
                    wait(vcpu, 1.0, 0)
                else:
                    wait(vcpu, None, BUSY_SPIN_NS)
                if consume_one(vcpu):
                    break
            t = clock()
            ctl[SLEEPING] = 0
            lat[i] = t - ctl[T_SEND]
            ctl[ACK] = i + 1
    except BaseException:
        ctl[FAILED] = 1
        traceback.print_exc()
        raise
    finally:
        if host is not None:
            host.close()


def run_evtchn(abi: str, backend: str, mode: str, count: int, pin, gap_ns: int = GAP_NS):
    """Latencies (ns, one per event) of `count` events on a fresh host."""
    host = Host(backend)
    procs = []
    try:
        dom0 = host.create_domain(abi=abi, vcpus=1)
        domu = host.create_domain(abi=abi, vcpus=1)
        rport = dom0.alloc_unbound(domu.domid)
        sport = domu.bind_interdomain(dom0.domid, rport)
        ctl = CTX.RawArray("q", CTL_SIZE)
        lat = CTX.RawArray("q", count + WARM)
        s_cpu, v_cpu = pin or (None, None)
        procs = [
            CTX.Process(
                target=vcpu_main,
                args=(host.name, backend, dom0.domid, 0, mode, count + WARM, lat, ctl, v_cpu),
                daemon=True,
            ),
            CTX.Process(
                target=sender_main,
                args=(
                    host.name,
                    backend,
                    domu.domid,
                    sport,
                    mode,
                    count + WARM,
                    gap_ns,
                    ctl,
                    s_cpu,
                ),
                daemon=True,
            ),
        ]
        for p in procs:
            p.start()
        limit = time.monotonic() + RUN_MARGIN
        while not (ctl[READY_S] and ctl[READY_V]):
            if time.monotonic() > limit or ctl[FAILED] or not all(p.is_alive() for p in procs):
                raise BenchError(f"latency {abi} {mode}: a worker did not start")
            time.sleep(0.002)
        ctl[GO] = 1
        for p in procs:
            p.join(max(0.0, limit + RUN_MARGIN - time.monotonic()))
        if ctl[FAILED] or any(p.exitcode != 0 for p in procs):
            raise BenchError(
                f"latency {abi} {mode} failed (exit codes {[p.exitcode for p in procs]})"
            )
        if ctl[ACK] != count + WARM:
            raise BenchError(f"latency {abi} {mode}: {ctl[ACK]} of {count + WARM} events handled")
        return list(lat)[WARM:]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(JOIN_TIMEOUT)
        host.close()


def run_c(exe, mode: str, count: int, pin, gap_ns: int = GAP_NS):
    cmd = [str(exe), "--handoff", mode, "--count", str(count + WARM), "--gap-ns", str(gap_ns)]
    if pin:
        cmd += ["--pin", f"{pin[0]},{pin[1]}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_MARGIN)
    except subprocess.TimeoutExpired:
        raise BenchError(f"the C hand-off overran {RUN_MARGIN:.0f} s") from None
    if r.returncode != 0:
        raise BenchError(f"the C hand-off failed ({r.returncode}):\n{r.stderr}")
    return json.loads(r.stdout)["latency_ns"][WARM:]


def summary(lat) -> dict:
    a = np.sort(np.asarray(lat, dtype=np.int64))
    return {
        "p50_ns": float(np.percentile(a, 50)),
        "p99_ns": float(np.percentile(a, 99)),
        "min_ns": float(a[0]),
        "max_ns": float(a[-1]),
        "count": int(len(a)),
    }


def measure(abis, backend, exe, count: int, pin, out=print) -> tuple[dict, dict]:
    """Run every (abi, mode) for evtchn and every mode for C; print the table.
    Returns (figures for the JSON, raw samples by label for plots)."""
    samples = {}
    for mode in MODES:
        for abi in abis:
            samples[f"evtchn-{abi} {mode}"] = run_evtchn(abi, backend, mode, count, pin)
        if exe is not None:
            samples[f"C {mode}"] = run_c(exe, mode, count, pin)
    figures = {}
    out("")
    out(
        f"send -> handler latency, one event at a time, {count} events each, sender and vCPU "
        f"pinned to two CPUs ({GAP_NS // 1000} us between events)"
    )
    out(
        "busy: the vCPU polls its upcall flag; idle: it is blocked in wait() and kicked; "
        "C: shared-memory store + spinning reader (busy), FUTEX_WAKE of a FUTEX_WAIT (idle)"
    )
    out(f"{'what':<18} {'median':>10} {'p99':>10} {'min':>10} {'max':>10}")
    for label, lat in samples.items():
        s = summary(lat)
        who, mode = label.split(" ")
        key = f"latency_{mode}_{who.replace('evtchn-', '').replace('C', 'c')}"
        figures[key + "_p50_ns"] = s["p50_ns"]
        figures[key + "_p99_ns"] = s["p99_ns"]
        out(
            f"{label:<18} {_us(s['p50_ns']):>10} {_us(s['p99_ns']):>10} {_us(s['min_ns']):>10} "
            f"{_us(s['max_ns']):>10}"
        )
    for mode, target in TARGETS.items():
        c = figures.get(f"latency_{mode}_c_p50_ns")
        for abi in abis:
            mine = figures.get(f"latency_{mode}_{abi}_p50_ns")
            if c and mine:
                ratio = figures[f"latency_{mode}_{abi}_over_c"] = mine / c
                out(
                    f"target: {mode} {abi} median at most {target:g}x C's: measured "
                    f"{ratio:.1f}x, " + ("met" if ratio <= target else "NOT met")
                )
    return figures, samples


def _us(ns: float) -> str:
    return f"{ns / 1000:.1f} us" if ns >= 1000 else f"{ns:.0f} ns"
