"""Experiment 7, cost per event: CPU nanoseconds per send and per delivery.

Per variant, one host with a receiving domain (1 vCPU) and a sending domain, CHANNELS
interdomain channels between them.

kernels alone  one process: send_many over every channel (each send a new edge, since the
               previous batch was consumed), then consume_into until drained; the CPU time
               of each call (CLOCK_PROCESS_CPUTIME_ID) is summed per side and divided by the
               events it handled. No other process touches the memory.
in the stream  the benchmark's stream case (bench/workers.py): a sender process and a vCPU
               process racing, with at most CHANNELS events in flight; their CPU time
               (/proc/PID/schedstat) over the run divided by the edges sent / events delivered.
Both check that every new edge was delivered once and nothing is left pending.
"""

from __future__ import annotations

import time

import numpy as np

from bench import workers as BW
from bench.cases import _Worker
from evtchn import Host

from . import procs as P
from . import variants as V
from .child import Failed
from .experiments import Config, Summary, by_config, config_state
from .stats import estimate, fmt

NAME = "cost"
TITLE = "7. Cost per event"
DETERMINISTIC = False
CHANNELS = 1000  # fits every variant (2l-32 addresses 1023 ports)
BATCH = 250


def configs(opts) -> list[Config]:
    d = 0.3 if opts.quick else 1.5
    return [Config(v, {"variant": v, "duration": d}, timeout=240) for v in V.ALL]


def run(params: dict, seed: int) -> dict:
    variant, duration = params["variant"], params["duration"]
    with Host() as host:
        rx = V.create(host, variant)
        tx = V.create(host, variant)
        t0 = time.perf_counter()
        rports, sports = V.bind_channels(rx, tx, CHANNELS)
        setup_s = time.perf_counter() - t0
        rx.consume(0)
        out = {"variant": variant, "channels": CHANNELS, "setup_s": round(setup_s, 4)}
        out["kernels"] = _kernels(rx, tx, sports, duration)
        out["stream"] = _stream(host, rx, tx, sports, rports, duration)
    for side in ("kernels", "stream"):
        r = out[side]
        if r["delivered"] != r["edges"] or r["left_pending"]:
            raise Failed(
                f"{side}: {r['edges']} edges sent, {r['delivered']} delivered, "
                f"{r['left_pending']} left pending",
                out,
            )
    return out


def _kernels(rx, tx, sports, duration) -> dict:
    chunks = [np.ascontiguousarray(sports[i : i + BATCH]) for i in range(0, len(sports), BATCH)]
    edges = np.zeros(BATCH, np.uint8)
    buf = np.empty(4096, np.uint32)
    cpu = time.process_time_ns
    send_ns = cons_ns = nedges = delivered = 0
    tx.send_many(chunks[0], edges)  # first touches, untimed
    while rx.consume_into(0, buf):
        pass
    end = time.monotonic() + duration
    while time.monotonic() < end:
        for ch in chunks:
            t0 = cpu()
            tx.send_many(ch, edges)
            t1 = cpu()
            send_ns += t1 - t0
            nedges += int(np.count_nonzero(edges[: len(ch)]))
        t1 = cpu()
        while True:
            n = rx.consume_into(0, buf)
            delivered += n
            if n < len(buf):
                break
        cons_ns += cpu() - t1
    return {
        "edges": nedges,
        "delivered": delivered,
        "left_pending": int(sum(rx.is_pending(int(p)) for p in range(1, CHANNELS + 1))),
        "send_ns_per_event": send_ns / max(1, nedges),
        "deliver_ns_per_event": cons_ns / max(1, delivered),
    }


def _stream(host, rx, tx, sports, rports, duration) -> dict:
    ctl = P.CTX.RawArray("q", BW.CTL_SIZE)
    sender = _Worker(
        BW.sender_main,
        (host.name, host.backend, tx.domid, list(map(int, sports)), ctl, None),
        "cost sender",
    )
    vcpu = _Worker(BW.vcpu_main, (host.name, host.backend, rx.domid, 0, ctl, None), "cost vcpu")
    try:
        sender.expect(60)
        vcpu.expect(60)
        params = {
            "start_ns": time.monotonic_ns() + 50_000_000,
            "duration": duration,
            "batch": BATCH,
            "window": CHANNELS,
            "cap": 4096,
            "spin_ns": 50_000,
            "wait_timeout": 0.01,
        }
        c0 = {w: P.cpu_ns(w.proc.pid) for w in (sender, vcpu)}
        for w in (sender, vcpu):
            w.conn.send(params)
        s = sender.expect(duration + 60)
        v = vcpu.expect(duration + 60)
        c1 = {w: P.cpu_ns(w.proc.pid) for w in (sender, vcpu)}
    finally:
        sender.stop()
        vcpu.stop()
    left = sum(1 for p in rports if rx.is_pending(int(p)))
    extra = len(rx.consume(0))
    return {
        "edges": s["edges"],
        "delivered": v["delivered"] + extra,
        "left_pending": left,
        "events_per_s": v["delivered"] / (v["elapsed_ns"] / 1e9) if v["elapsed_ns"] else 0.0,
        "send_ns_per_event": (c1[sender] - c0[sender]) / max(1, s["edges"]),
        "deliver_ns_per_event": (c1[vcpu] - c0[vcpu]) / max(1, v["delivered"]),
        "waits": v["waits"],
    }


def summarize(entries, opts) -> Summary:
    res = by_config(entries)
    s = Summary()
    rows = []
    kern, strm = {}, {}
    series = {"kernels alone": {}, "in the stream": {}}
    for v in V.ALL:
        rs = res.get(v)
        if not rs:
            rows.append([v, config_state(entries, v)] + [""] * 5)
            continue
        k = [r["kernels"]["send_ns_per_event"] + r["kernels"]["deliver_ns_per_event"] for r in rs]
        st = [r["stream"]["send_ns_per_event"] + r["stream"]["deliver_ns_per_event"] for r in rs]
        kern[v], strm[v] = k, st
        series["kernels alone"][v] = k
        series["in the stream"][v] = st
        rows.append(
            [
                v,
                fmt(estimate([r["kernels"]["send_ns_per_event"] for r in rs]), " ns"),
                fmt(estimate([r["kernels"]["deliver_ns_per_event"] for r in rs]), " ns"),
                fmt(estimate([r["stream"]["send_ns_per_event"] for r in rs]), " ns"),
                fmt(estimate([r["stream"]["deliver_ns_per_event"] for r in rs]), " ns"),
                fmt(estimate([r["stream"]["events_per_s"] for r in rs]), " ev/s"),
                fmt(estimate([r["setup_s"] for r in rs]), " s"),
            ]
        )
    s.tables.append(
        (
            f"CPU ns per event ({CHANNELS} channels, batches of {BATCH})",
            [
                "variant",
                "send, kernels",
                "delivery, kernels",
                "send, stream",
                "delivery, stream",
                "stream rate",
                f"bind {CHANNELS} channels",
            ],
            rows,
            "Stream CPU time includes each process's waiting (spinning up to 50 us before it "
            "blocks), as a real vCPU's would.",
        )
    )
    s.metrics["cost_kernels_ns"] = kern
    s.metrics["cost_stream_ns"] = strm
    s.curves.append(
        {
            "name": "cost_per_event",
            "title": "CPU ns per event (send + delivery)",
            "kind": "bar",
            "xlabel": "variant",
            "ylabel": "ns",
            "series": series,
        }
    )
    return s


def describe(opts) -> str:
    d = 0.3 if opts.quick else 1.5
    return (
        f"Per variant: {CHANNELS} interdomain channels; {d:g} s of the kernels alone in one "
        f"process, then {d:g} s of the stream (a sender process and a vCPU process). CPU time "
        f"per side divided by the events it handled; every edge must be delivered exactly once."
    )
