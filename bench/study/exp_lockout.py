"""Experiment 4, lock-out: "clusters of events can lock out others based on where they are or
the number of them" (the 2013 thread). A victim port is raised at random intervals (a send on
its channel, made by the consumer's own CPU between two events) while K hot ports are kept
pending by a racing sender process; the victim's delay is measured in ns and in deliveries of
other ports between its send and its delivery (a count the OS scheduler cannot blur).
Placements (probe.py): hot ports below the victim, above it, or in the victim's own word.
Consumers (consumers.py): Linux's current handler for every variant, and for 2l also the
historical handler that scans from port 0 (before the resume-where-it-stopped fix).
"""

from __future__ import annotations

import numpy as np

from evtchn import Host

from . import consumers as CS
from . import probe as PB
from . import variants as V
from .experiments import Config, Summary, by_config
from .stats import estimate, fmt

NAME = "lockout"
TITLE = "4. Lock-out"
DETERMINISTIC = False
KS = (1, 32, 512)
QUICK_KS = (32,)
DECIDING_K = 32  # fits every variant and placement (2l-32's word holds 31 others)
GAP_US = 30.0
FIX_LABEL = {
    "linux": "2l-64, scan resumes where it stopped (current Linux)",
    "scan-from-0": "2l-64, scan from port 0 (historical Linux)",
}
PLACE_TEXT = {"below": "below it", "above": "above it", "same": "in its word"}
CONSUMERS = [(v, "linux") for v in V.ALL] + [("2l-32", "scan-from-0"), ("2l-64", "scan-from-0")]


def label(variant: str, consumer: str) -> str:
    return variant if consumer == "linux" else f"{variant} {consumer}"


def _ks(variant: str, placement: str, ks) -> list[int]:
    w = PB.word_bits(variant)
    limit = V.port_limit(variant)
    out = []
    for k in ks:
        lay = PB.layout(placement, k, w)
        if lay is not None and max([lay[0]] + lay[1]) < limit:
            out.append(k)
    return out


def configs(opts) -> list[Config]:
    """One configuration per consumer: every placement and K in one run (one host, one hot
    sender process), so that the per-process start-up is paid once."""
    ks = QUICK_KS if opts.quick else KS
    dur = 0.1 if opts.quick else 0.4
    out = []
    for v, c in CONSUMERS:
        plan = [[pl, k] for pl in PB.PLACEMENTS for k in _ks(v, pl, ks)]
        out.append(
            Config(
                label(v, c).replace(" ", "-"),
                {
                    "variant": v,
                    "consumer": c,
                    "plan": plan,
                    "dur": dur,
                    "gap_us": GAP_US,
                    "storm": True,
                },
                timeout=600,
            )
        )
    return out


def run(params: dict, seed: int) -> dict:
    v = params["variant"]
    w = PB.word_bits(v)
    lays = [(pl, k, *PB.layout(pl, k, w)) for pl, k in params["plan"]]
    nports = max(max([vic] + hot) for _, _, vic, hot in lays)
    consumer = CS.SCAN_FROM_0 if params["consumer"] == "scan-from-0" else CS.LINUX
    rounds = []
    with Host() as host:
        rig = PB.Rig(host, v, nports, timer=False)
        try:
            for i, (pl, k, victim, hot) in enumerate(lays):
                r = rig.round(
                    consumer,
                    hot,
                    victim,
                    CS.PROBE_SEND,
                    params["dur"],
                    params["gap_us"],
                    seed * 1000 + i,
                    storm=params.get("storm", False),
                )
                rounds.append({"placement": pl, "k": k, "victim": victim, **summary(r)})
        finally:
            rig.close()
    return {
        "variant": v,
        "consumer": params["consumer"],
        "setup_s": round(rig.setup_s, 4),
        "channels": nports,
        "rounds": rounds,
    }


def _handled(rounds) -> str:
    n = sum(x["probes_handled"] for x in rounds)
    return f"{n}" if n else "none: locked out"


def summary(r: dict) -> dict:
    """Per round: the probe delays (handled ones, plus a censored one still waiting at the
    end, whose wait so far is a lower bound)."""
    ns = list(r["delay_ns"]) + [c[0] for c in r["censored"]]
    dv = list(r["others_before"]) + [c[1] for c in r["censored"]]
    out = {k: r[k] for k in ("probes_raised", "probes_handled", "deliveries", "edges")}
    out["censored"] = len(r["censored"])
    for name, xs in (("ns", ns), ("others", dv)):
        a = np.asarray(xs, np.float64)
        out[f"{name}_mean"] = float(a.mean()) if len(a) else None
        out[f"{name}_p50"] = float(np.percentile(a, 50)) if len(a) else None
        out[f"{name}_p99"] = float(np.percentile(a, 99)) if len(a) else None
        out[f"{name}_max"] = float(a.max()) if len(a) else None
    return out


def summarize(entries, opts) -> Summary:
    res = by_config(entries)
    s = Summary()
    rows = []
    curves = {pl: {} for pl in PB.PLACEMENTS}
    worst_d, worst_ns, fix = {}, {}, {}
    for v, c in CONSUMERS:
        lab = label(v, c)
        rs = res.get(lab.replace(" ", "-"))
        if not rs:
            rows.append([lab, "-", "-", "failed or not run", "", "", "", ""])
            continue
        per_seed_d, per_seed_ns = {}, {}
        for i, rd in enumerate(rs[0]["rounds"]):
            pl, k = rd["placement"], rd["k"]
            got = [r["rounds"][i] for r in rs]
            ds = [x["others_mean"] for x in got]
            nss = [x["ns_mean"] for x in got]
            cens = sum(x["censored"] for x in got)
            rows.append(
                [
                    lab,
                    pl,
                    str(k),
                    fmt(estimate(ds)),
                    fmt(estimate(nss), " ns"),
                    fmt(estimate([x["others_max"] for x in got])),
                    _handled(got),
                    str(cens),
                ]
            )
            curves[pl].setdefault(lab, {})[k] = ds
            if k == DECIDING_K:
                for j, x in enumerate(got):
                    per_seed_d[j] = max(per_seed_d.get(j, 0.0), x["others_max"] or 0.0)
                    per_seed_ns[j] = max(per_seed_ns.get(j, 0.0), x["ns_mean"] or 0.0)
        if per_seed_d:
            if c == "linux":
                worst_d[v] = list(per_seed_d.values())
                worst_ns[v] = list(per_seed_ns.values())
            if v == "2l-64":
                fix[FIX_LABEL[c]] = list(per_seed_d.values())
    s.tables.append(
        (
            "Victim delay: deliveries of other ports between its send and its delivery, and ns",
            [
                "consumer",
                "hot ports",
                "K",
                "others before (mean)",
                "delay (mean)",
                "others before (max)",
                "victims handled",
                "victims still waiting at the end",
            ],
            rows,
            "A victim still waiting when the round ended counts with its wait so far (a lower "
            "bound). Means are over the victims of a round; ± is the 95% interval over seeds.",
        )
    )
    s.metrics["lockout_worst_deliveries"] = worst_d
    s.metrics["lockout_mean_ns"] = worst_ns
    s.metrics["lockout_fix"] = fix
    for pl, series in curves.items():
        s.curves.append(
            {
                "name": f"lockout_{pl}",
                "title": f"Victim's wait, hot ports {PLACE_TEXT[pl]}",
                "xlabel": "K hot ports",
                "ylabel": "other deliveries before the victim",
                "logx": True,
                "logy": True,
                "series": series,
            }
        )
    s.notes.append(
        f"The decision takes, per variant (Linux's handler), the longest wait of any victim "
        f"(in other deliveries; its mean over seeds) in the worst placement at K = "
        f"{DECIDING_K}, and the worst placement's mean wait in ns; and for 2l-64 the same "
        f"longest wait with the historical scan beside the current one (what the fix changed)."
    )
    s.notes.append(
        "Stated (the 2013 thread): 'clusters of events can lock out others based on where "
        "they are or the number of them'; FIFO promised 'improved fairness in event latency' "
        "(Linux bf2bbe07f138)."
    )
    return s


def describe(opts) -> str:
    ks = QUICK_KS if opts.quick else KS
    dur = 0.1 if opts.quick else 0.4
    return (
        f"dom0 with one vCPU; K = {', '.join(map(str, ks))} hot ports kept pending by a sender "
        f"process (send_many in a loop) and by their own handlers (each hot port is raised "
        f"again as soon as it is handled: a storm the OS scheduler cannot thin out), placed "
        f"below, above or in the same word as the victim; "
        f"the consumer (this configuration's main process, @njit, one event per call) raises "
        f"the victim {GAP_US:g} us (randomised x0.5-1.5) after the previous one was handled; "
        f"{dur:g} s per K. Consumers: Linux's current handler for every variant; for 2l also "
        f"the handler that scans from port 0 (Linux drivers/xen/events.c "
        f"__xen_evtchn_do_upcall before the round-robin scan; see bench/study/consumers.py)."
    )
