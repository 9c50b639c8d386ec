"""Experiment 2's race: a sender and a consumer process per slice of guests, one consumer
for dom0, the njit loops of dense.py, and the exact per-channel accounting."""

from __future__ import annotations

import os
import time

import numpy as np

from evtchn import Host

from . import dense as DN
from . import procs as P
from .child import Failed

DOM0_VCPUS = 4


def race(host, dom0, guests, chans, duration, t) -> dict:
    """Senders and consumers per slice (and one consumer for dom0) race for `duration`."""
    nch = len(chans["rdom"])
    edges = P.CTX.RawArray("q", max(1, nch))
    delivered = P.CTX.RawArray("q", max(1, nch))
    ctl = P.CTX.RawArray("q", 8)
    ndom = host.ndomains
    dom0_chan = np.full(dom0.max_ports, -1, np.int64)
    guest_chan = np.full(ndom * DN.PORT_SLOTS, -1, np.int64)
    for c in range(nch):
        d, p = int(chans["rdom"][c]), int(chans["rport"][c])
        if d == 0:
            dom0_chan[p] = c
        else:
            guest_chan[d * DN.PORT_SLOTS + p] = c
    senders, consumers = [], []
    for gs in guests:
        mine = np.flatnonzero(np.isin(chans["sdom"], gs))
        senders.append(
            ("send", np.concatenate([[0], gs]), (chans["sdom"][mine], chans["sport"][mine], mine))
        )
        recv = np.flatnonzero(np.isin(chans["rdom"], gs))
        consumers.append(
            (
                "consume",
                gs,
                (gs, np.zeros(len(gs), np.int64), chans["rdom"][recv], chans["rport"][recv]),
            )
        )
    recv0 = np.flatnonzero(chans["rdom"] == 0)
    consumers.append(
        (
            "consume",
            np.zeros(1, np.int64),
            (
                np.zeros(DOM0_VCPUS, np.int64),
                np.arange(DOM0_VCPUS),
                chans["rdom"][recv0],
                chans["rport"][recv0],
            ),
        )
    )
    procs, conns = [], []
    with t("start racing processes (each maps its own domains)"):
        for kind, maps, arrays in senders + consumers:
            a, b = P.CTX.Pipe()
            pr = P.CTX.Process(
                target=worker_main,
                daemon=True,
                args=(
                    b,
                    host.name,
                    kind,
                    maps,
                    arrays,
                    dom0_chan,
                    guest_chan,
                    edges,
                    delivered,
                    ctl,
                ),
            )
            pr.start()
            b.close()
            procs.append(pr)
            conns.append(a)
        ready = [_expect(c, pr, 600) for c, pr in zip(conns, procs)]
    for c in conns:
        c.send("go")
    ns = len(senders)
    t0 = time.perf_counter()
    time.sleep(duration)
    ctl[DN.STOP] = 1
    results = [_expect(c, pr, 120) for c, pr in zip(conns[:ns], procs[:ns])]
    race_s = time.perf_counter() - t0
    ctl[DN.STOP] = 2
    results += [_expect(c, pr, 120) for c, pr in zip(conns[ns:], procs[ns:])]
    P.join_or_kill(procs, 30)
    e = np.frombuffer(edges, np.int64)[:nch]
    dl = np.frombuffer(delivered, np.int64)[:nch]
    out = {
        "race_s": round(race_s, 3),
        "edges": int(e.sum()),
        "delivered": int(dl.sum()),
        "events_per_s": float(dl.sum() / race_s) if race_s else 0.0,
        "processes": len(procs),
        "mappings_per_process": max(r["mappings"] for r in ready),
        "fds_per_process": max(r["fds"] for r in ready),
    }
    errs = [r for r in results if r.get("errno")]
    bad = int(sum(r.get("bad", 0) for r in results))
    left = int(sum(r.get("left_pending", 0) for r in results))
    wrong = np.flatnonzero(e != dl)
    if errs or bad or left or len(wrong):
        c = int(wrong[0]) if len(wrong) else 0
        raise Failed(
            f"accounting: {len(wrong)} channel(s) with deliveries != edges (channel {c}: "
            f"{int(dl[c])} of {int(e[c])}), {left} left pending, {bad} deliveries on ports "
            f"of no channel, refused sends: {errs}",
            out,
        )
    return out


def _expect(conn, proc, timeout):
    if not conn.poll(timeout):
        raise Failed(f"a racing process did not answer in {timeout} s (alive: {proc.is_alive()})")
    try:
        msg = conn.recv()
    except EOFError:
        raise Failed(f"a racing process died (exit code {proc.exitcode})") from None
    if isinstance(msg, dict) and msg.get("error"):
        raise Failed(f"a racing process failed: {msg['error']}")
    return msg


def views_table(host, domids) -> np.ndarray:
    """The numba domain table with only `domids` mapped in this process (evtchn.numba.views
    maps every domain of the host, which a process cannot do for 25,000 domains: see the
    module doc). Rows of domains not mapped stay 0: a send to them is refused (-ESRCH)."""
    from evtchn import numba_kernels as K

    domids = [int(d) for d in domids]
    table = np.zeros((host.ndomains, K.NCOLS), np.int64)
    for d in domids:
        table[d] = K.table_row(host._dm(d))
    return table


def worker_main(conn, host_name, kind, maps, arrays, dom0_chan, guest_chan, edges, delivered, ctl):
    """A sender or consumer process: map its domains, warm up, report ready, race, report."""
    import traceback

    P.die_with_parent()
    try:
        host = Host.attach(host_name)
        table = views_table(host, maps)
        pid = os.getpid()
        with open(f"/proc/{pid}/maps") as f:
            mappings = sum(1 for _ in f)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        _warm_up(table, pid, dom0_chan, guest_chan)
        conn.send({"mappings": mappings, "fds": fds})
        conn.recv()
        ctl_addr = np.frombuffer(ctl, np.int64).ctypes.data
        if kind == "send":
            sdoms, sports, chans = arrays
            e = np.frombuffer(edges, np.int64)
            r = DN.send_loop(table, pid, sdoms, sports, chans, e, ctl_addr)
            conn.send({"errno": int(r)})
        else:
            doms, vcpus, rdoms, rports = arrays
            dl = np.frombuffer(delivered, np.int64)
            bad = np.zeros(1, np.int64)
            n = DN.consume_loop(table, pid, doms, vcpus, dom0_chan, guest_chan, dl, ctl_addr, bad)
            left = sum(
                1 for d, p in zip(rdoms.tolist(), rports.tolist()) if host.domain(d).is_pending(p)
            )
            conn.send({"delivered": int(n), "bad": int(bad[0]), "left_pending": left})
    except Exception:
        conn.send({"error": traceback.format_exc(limit=3)})


def warm_up_here(dom0) -> None:
    """Compile (or load) the race's loops in this process first, so that the racing
    processes load them from numba's cache instead of each compiling them."""
    host = dom0.host
    table = views_table(host, [dom0.domid])
    chans = np.full(1, -1, np.int64)
    _warm_up(table, os.getpid(), chans, chans)


def _warm_up(table, pid, dom0_chan, guest_chan) -> None:
    """Load (or compile) both loops before reporting ready, so that the race's clock does
    not run while numba works: each returns at once on a control word already at 'stop'."""
    stop = np.full(1, 2, np.int64)
    none = np.zeros(0, np.int64)
    DN.send_loop(table, pid, none, none, none, none, stop.ctypes.data)
    DN.consume_loop(
        table, pid, none, none, dom0_chan, guest_chan, none, stop.ctypes.data, np.zeros(1, np.int64)
    )
