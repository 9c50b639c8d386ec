"""Experiment 1, capacity: how many guests one dom0 serves before it runs out of ports.

dom0 (profile.dom0_vcpus vCPUs) first binds its own channels from the stated Linux profile
(profile.py; none in the "theoretical" mode), then guests are created one by one, each binding
profile.guest_ports() interdomain channels to dom0 (xenstore, console, net, disk; HVM guests
also the device model's ioreq channels), until dom0's EVTCHNOP_alloc_unbound fails with ENOSPC
or Xen's domid space (DOMID_FIRST_RESERVED = 0x7FF0) is exhausted. Guests are created with
xl's default max_event_channels = 1023 (ports 0..1023).
"""

from __future__ import annotations

import errno
import time

from evtchn import EvtchnError, Host
from evtchn import layout as L

from . import profile as PR
from . import variants as V
from .experiments import Config, Summary, by_config, config_state
from .stats import estimate, fmt

NAME = "capacity"
TITLE = "1. Capacity: guests per dom0"
DETERMINISTIC = True
XL_DEFAULT_PORTS = 1024  # xl.cfg max_event_channels = 1023: ports 0..1023
QUICK_CAP = 1100  # --quick stops adding guests here (the count is then a lower bound)
SLICE = 12_500  # guests per builder process
MODES = ("theoretical", "practical")
STATED = {  # the 2013 thread (spec section 6): 32-bit dom0 with 2-level channels
    ("2l-32", "theoretical"): ("256", "xenproject.org 2013-03-27: 1024 ports / 4 per guest"),
    ("2l-32", "practical"): ("about 180", "xenproject.org 2013-03-27: 'in practice more like 180'"),
    ("2l-64", "theoretical"): ("1024", "4096 ports / 4 per guest"),
    ("2l-64", "practical"): ("fewer than 1024", "xenproject.org 2013-03-27"),
}


def configs(opts) -> list[Config]:
    prof = PR.dataclasses.asdict(opts.profile)
    cap = QUICK_CAP if opts.quick else None
    out = []
    for v in V.ALL:
        p = {"variant": v, "profile": prof, "cap": cap}
        if V.guest_variant(v) != v:  # 3l guests are 2l guests (V.GUEST_OF)
            p["guest_variant"] = V.guest_variant(v)
        out.append(Config(v, p, timeout=300 if opts.quick else 1200))
    return out


def run(params: dict, seed: int) -> dict:
    """Both modes, one host each, one after the other."""
    prof = PR.Profile(**params["profile"])
    out = {"variant": params["variant"], "xl_domu_ports": _xl_domu_ports(params["variant"])}
    gv = params.get("guest_variant", params["variant"])
    for mode in MODES:
        out[mode] = _fill(params["variant"], gv, mode, prof, params["cap"])
    return out


def _fill(variant: str, gv: str, mode: str, prof: PR.Profile, cap) -> dict:
    """dom0 (with its own channels in practical mode), then guests until ENOSPC. The guests
    are made by builder processes of at most SLICE guests each, in turn: one process cannot
    map more than about 20,000 domains here (RLIMIT_NOFILE; see exp_density)."""
    out = {"mode": mode, "guest_ports": prof.guest_ports(), "guest_variant": gv}
    with Host() as host:
        t0 = time.perf_counter()
        dom0 = V.create(host, variant, vcpus=prof.dom0_vcpus)
        out["dom0_ports"] = PR.bind(dom0, prof) if mode == "practical" else 0
        out["dom0_setup_s"] = round(time.perf_counter() - t0, 4)
        guests, stop, t1 = 0, None, time.perf_counter()
        while stop is None and (cap is None or guests < cap):
            want = SLICE if cap is None else min(SLICE, cap - guests)
            made, stop = _spawn_builder(host.name, gv, prof, want)
            guests += made
        out["guests_setup_s"] = round(time.perf_counter() - t1, 4)
        out["guests"] = guests
        out["stopped_by"] = stop or "cap"
        out["dom0_port_limit"] = dom0.max_ports
        out["dom0_ports_in_use"] = _in_use(dom0)
        out["domains"] = host.ndomains
    return out


def _spawn_builder(host_name, variant, prof, count) -> tuple[int, str | None]:
    from .densehost import _spawn_and_wait_all

    r = _spawn_and_wait_all(_builder, [(host_name, variant, prof, count)], 3600)[0]
    return r["made"], r["stop"]


def _builder(conn, host_name, variant, prof, count):
    """Create up to `count` guests, each binding prof.guest_ports() channels to dom0; stop at
    ENOSPC (dom0's ports, or the domid space). Answers {"made", "stop"}."""
    import traceback

    from . import procs as P

    P.die_with_parent()
    try:
        host = Host.attach(host_name)
        dom0 = host.domain(0)
        made, stop = 0, None
        while made < count:
            try:
                g = V.create(host, variant, vcpus=prof.guest_vcpus, max_ports=_guest_ports(variant))
            except EvtchnError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                stop = "domid space exhausted (DOMID_FIRST_RESERVED = 0x7FF0)"
                break
            try:
                V.bind_channels(dom0, g, prof.guest_ports())
            except EvtchnError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                stop = "dom0 ENOSPC"
                break
            made += 1
        conn.send({"made": made, "stop": stop})
    except Exception:
        conn.send({"error": traceback.format_exc(limit=4)})


def _guest_ports(variant: str) -> int:
    return min(XL_DEFAULT_PORTS, V.port_limit(variant))


def _in_use(dom) -> int:
    dm = dom._dm
    return sum(1 for p in range(1, dom.valid_ports) if dm.state(p) > L.ECS_RESERVED)


def _xl_domu_ports(variant: str) -> int:
    """Ports a domU created with xl's default (max_event_channels = 1023) gets before ENOSPC."""
    with Host() as other:  # its own host: this domU takes no domid from the guests
        d = V.create(other, variant, max_ports=_guest_ports(variant))
        n = 0
        while True:
            try:
                d.alloc_unbound(L.DOMID_SELF)
            except EvtchnError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return n
            n += 1


def formula(variant: str, mode: str, prof: PR.Profile) -> int:
    """Guests from arithmetic alone (what the thread computed): usable ports / per guest."""
    abi = V.ABI_OF[variant]
    usable = V.port_limit(variant) - 1 - (prof.dom0_ports(abi) if mode == "practical" else 0)
    return min(usable // prof.guest_ports(), L.MAX_DOMAINS - 1)


def summarize(entries, opts) -> Summary:
    res = by_config(entries)
    s = Summary()
    rows, practical = [], {}
    prof = opts.profile
    for mode in MODES:
        for v in V.ALL:
            rs = [r[mode] for r in res.get(v, [])]
            if not rs:
                rows.append([v, mode, config_state(entries, v), "", "", "", "", ""])
                continue
            g = estimate([r["guests"] for r in rs])
            capped = any(r["stopped_by"] == "cap" for r in rs)
            guests = f"{g.mean:.0f}" + (" (capped: at least)" if capped else "")
            stated = STATED.get((v, mode), ("-", ""))[0]
            rows.append(
                [
                    v,
                    mode,
                    guests,
                    f"{rs[0]['dom0_ports']}",
                    rs[0]["stopped_by"],
                    fmt(estimate([r["dom0_setup_s"] + r["guests_setup_s"] for r in rs]), " s"),
                    f"{formula(v, mode, prof)}",
                    stated,
                ]
            )
            if mode == "practical":
                practical[v] = [r["guests"] for r in rs]
    s.tables.append(
        (
            f"Guests per dom0 (each guest {prof.guest_ports()} dom0 ports; dom0 "
            f"{prof.dom0_vcpus} vCPUs, {prof.dom0_pirqs} physical IRQs)",
            [
                "variant",
                "mode",
                "guests (measured)",
                "dom0's own ports",
                "stopped by",
                "setup",
                "formula",
                "thread says",
            ],
            rows,
            "formula = (ABI limit - 1 - dom0's own ports) // ports per guest, at most 32751 "
            "domids; computed, not measured, for comparison only.",
        )
    )
    s.metrics["guests_practical"] = practical
    prows = [[what, str(n), src] for what, n, _, src in prof.items("2l")]
    s.tables.append(
        (
            "dom0 profile (Linux x86 PV dom0; the fifo dom0 skips VIRQ_DEBUG)",
            ["channel", "count", "source"],
            prows,
            "",
        )
    )
    xl = [[v, str(res[v][0]["xl_domu_ports"])] for v in V.ALL if res.get(v)]
    s.tables.append(
        (
            "A domU created with xl's default max_event_channels = 1023",
            ["variant", "ports bound before ENOSPC"],
            xl,
            "xl.cfg(5): the default limits every domU to ports 0..1023, whatever its ABI "
            "could address.",
        )
    )
    s.curves.append(
        {
            "name": "capacity_guests",
            "title": "Guests per dom0 before ENOSPC",
            "kind": "bar",
            "xlabel": "variant",
            "ylabel": "guests",
            "series": {
                mode: {v: [r[mode]["guests"] for r in res.get(v, [])] for v in V.ALL}
                for mode in MODES
            },
        }
    )
    return s


def describe(opts) -> str:
    p = opts.profile
    return (
        f"For each variant, dom0 ({p.dom0_vcpus} vCPUs) binds its own channels (mode "
        f"*practical*; none in mode *theoretical*), then guests ({p.guest_type}, "
        f"{p.guest_vcpus} vCPU) are created one at a time, each binding {p.guest_ports()} "
        f"interdomain channels to dom0, until dom0's alloc_unbound fails with ENOSPC or the "
        f"domid space runs out. Real domains and real bindings on one host; nothing is "
        f"computed. Guests use xl's default max_event_channels = 1023; a 3l dom0's guests "
        f"use 2l (the 3-level series enabled it for dom0 and driver domains only)."
        + (f" --quick stops at {QUICK_CAP} guests." if opts.quick else "")
    )
