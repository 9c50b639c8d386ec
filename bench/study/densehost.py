"""Experiment 2's host: guests created and bound by builder processes, one slice of guests
each (see exp_density's module doc for why no process maps every domain)."""

from __future__ import annotations

import errno
import os
import time

import numpy as np

from evtchn import EvtchnError, Host
from evtchn import layout as L

from . import procs as P
from . import variants as V
from .denserace import _expect, race, warm_up_here

SLICE = 12_500  # guests per builder / sender / guest-consumer process
DOM0_VCPUS = 4


def max_map_count() -> int | None:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def one_process(n: int) -> dict:
    """Can one process create and map n domains? (It cannot here: see the module doc.)"""
    out = {
        "domains_wanted": n,
        "fd_limit": P.raise_fd_limit(n + 1024),
        "max_map_count": max_map_count(),
    }
    t0 = time.perf_counter()
    with Host() as host:
        made, error = 0, None
        try:
            for _ in range(n):
                V.create(host, "2l-32", max_ports=1024)  # the smallest domain segment
                made += 1
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
    out.update(domains_made=made, error=error, seconds=round(time.perf_counter() - t0, 3))
    return out


def slices(n: int) -> list[range]:
    """Guests 1..n in slices of at most SLICE: one builder, sender and guest consumer process
    per slice, so that no process maps more than SLICE + 1 domains (see the module doc)."""
    k = max(1, -(-n // SLICE))
    bounds = np.linspace(0, n, k + 1).astype(int)
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _spawn_and_wait_all(target, arglist, timeout) -> list:
    """Run target(conn, *args) in one process per args, side by side; their answers."""
    procs, conns = [], []
    try:
        for args in arglist:
            a, b = P.CTX.Pipe()
            pr = P.CTX.Process(target=target, args=(b, *args), daemon=True)
            pr.start()
            b.close()
            procs.append(pr)
            conns.append(a)
        return [_expect(a, pr, timeout) for a, pr in zip(conns, procs)]
    finally:
        P.join_or_kill(procs, 30)


def _build_slice(conn, host_name, v, gv, count):
    """A builder process: create `count` guests on the host and bind their channels, one
    guest at a time, until done or dom0 (or the domid space) says ENOSPC. It maps dom0 and
    its own guests only."""
    import traceback

    P.die_with_parent()
    try:
        host = Host.attach(host_name)
        t = V.Timer()
        dom0 = host.domain(0)
        guests, chans, stop = _build(host, dom0, v, gv, count, t)
        with t("drain the bind edges"):
            for g in guests:
                g.consume(0)
        conn.send(
            {
                "guests": [g.domid for g in guests],
                "chans": {k: x.tolist() for k, x in chans.items()},
                "stopped_by": stop,
                "spent": t.spent,
                "mapped_pages": sum(g.mapped_pages() for g in guests),
            }
        )
    except Exception:
        conn.send({"error": traceback.format_exc(limit=4)})


def _build(host, dom0, v, gv, target, t):
    """Create the guests (of variant gv) and bind their channels to dom0 (of variant v); stops
    at dom0's ENOSPC (or the domid space). Returns (guest domains, channel table, what
    stopped it)."""
    rdom, rport, sdom, sport = [], [], [], []
    guests, stop = [], None
    per_vcpu = (lambda p: p % DOM0_VCPUS) if v == "fifo" else (lambda p: (p // 64) % DOM0_VCPUS)
    max_ports = min(1024, V.port_limit(gv))
    for i in range(target):
        try:
            with t("create guests"):
                g = V.create(host, gv, max_ports=max_ports)
            with t("bind guest-dom0 channels"):
                b, f = V.bind_channels(dom0, g, 2, vcpu=per_vcpu)
        except EvtchnError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            stop = str(exc)
            break
        guests.append(g)
        for j in range(2):
            rdom.append(0)
            rport.append(int(b[j]))
            sdom.append(g.domid)
            sport.append(int(f[j]))
        if i % 2 == 1:  # vchan between guests 2j and 2j+1: the first offers, the second binds
            a = guests[-2]
            with t("bind vchan channels"):
                pa, pb = V.bind_channels(a, g, 1)
            rdom += [a.domid, g.domid]
            rport += [int(pa[0]), int(pb[0])]
            sdom += [g.domid, a.domid]
            sport += [int(pb[0]), int(pa[0])]
    chans = {
        k: np.asarray(x, np.int64)
        for k, x in (("rdom", rdom), ("rport", rport), ("sdom", sdom), ("sport", sport))
    }
    return guests, chans, stop


def _shm_bytes(host) -> int:
    total = 0
    names = [host.name] + [L.domain_segment_name(host.name, d) for d in range(host.ndomains)]
    for n in names:
        try:
            total += os.stat(os.path.join("/dev/shm", n)).st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def run_dense(params: dict) -> dict:
    v, target = params["variant"], params["guests"]
    gv = params.get("guest_variant", v)
    t = V.Timer()
    inner = V.Timer()  # the builders' own steps, summed over builders working side by side
    out = {
        "variant": v,
        "target_guests": target,
        "max_map_count": max_map_count(),
        "fd_limit": P.raise_fd_limit(SLICE + 4096),
    }
    with Host() as host:
        with t("create dom0"):
            dom0 = V.create(host, v, vcpus=DOM0_VCPUS)
        with t("create guests and bind their channels (builder processes, side by side)"):
            parts = _spawn_and_wait_all(
                _build_slice, [(host.name, v, gv, len(sl)) for sl in slices(target)], 3600
            )
        stop = next((b["stopped_by"] for b in parts if b["stopped_by"]), None)
        chans = {
            k: np.concatenate([np.asarray(b["chans"][k], np.int64) for b in parts])
            for k in ("rdom", "rport", "sdom", "sport")
        }
        guests = [np.asarray(b["guests"], np.int64) for b in parts]
        for b in parts:
            for k, x in b["spent"].items():
                inner.spent[k] = round(inner.spent.get(k, 0.0) + x, 4)
        n = int(sum(len(g) for g in guests))
        out.update(
            guests=n,
            held=n == target,
            stopped_by=stop,
            channels=len(chans["rdom"]),
            slices=len(parts),
        )
        out["mapped_pages_total"] = dom0.mapped_pages() + sum(b["mapped_pages"] for b in parts)
        out["shm_bytes"] = _shm_bytes(host)
        out["segments"] = host.ndomains + 1
        with t("compile or load the @njit loops (numba's cache; once per machine)"):
            warm_up_here(dom0)
        out.update(race(host, dom0, guests, chans, params["duration"], t))
        out["setup_s"] = t.spent
        out["builder_steps_s"] = inner.spent
        out["guest_variant"] = gv
    return out
