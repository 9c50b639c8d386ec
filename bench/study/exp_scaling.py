"""Experiment 6, throughput and latency scaling, from the stress harness with every check on.

Each configuration is one `python -m stress` run (stress/run.py: dom0 with --vcpus vCPU
processes, --senders sender processes, chaos workers masking, moving and closing ports while
events fly, quiescent checks with exact per-port accounting, the ordered phase and the duels).
Three sweeps from a base of 4 vCPUs and 2 senders: bound ports, dom0 vCPUs, sender processes.
Delivered events/s is the racing phase's rate; latency is stress's send-to-handler time of
every event of a sample of ports (p50, p99). vCPUs do not nap between drains (--nap 0), so the
latency is the engine's and the scheduler's, not an interrupt-moderation delay.
"""

from __future__ import annotations

from . import stressrun as SRN
from . import variants as V
from .experiments import Config, Summary, by_config
from .stats import estimate, fmt

NAME = "scaling"
TITLE = "6. Throughput and latency scaling"
DETERMINISTIC = False
BASE = {"vcpus": 4, "senders": 2, "ports": 1024}
SWEEPS = {
    "ports": (1024, 8192, 131072),
    "vcpus": (1, 64),
    "senders": (1, 4),
}
# The vCPU and sender sweeps run the 64-bit variants and fifo; the 32-bit layouts differ in
# the ports they address, which the ports sweep shows.
SWEEP_VARIANTS = {
    "ports": V.ALL,
    "vcpus": ("2l-64", "3l-64", "fifo"),
    "senders": ("2l-64", "3l-64", "fifo"),
}
QUICK = {"ports": (256,), "vcpus": (), "senders": ()}
QUICK_BASE = {"vcpus": 2, "senders": 1, "ports": 256}


def _params(opts) -> list[tuple[str, dict]]:
    base = QUICK_BASE if opts.quick else BASE
    sweeps = QUICK if opts.quick else SWEEPS
    seen, out = set(), []
    for v in V.ALL:
        for axis, values in sweeps.items():
            if v not in SWEEP_VARIANTS[axis]:
                continue
            for x in values:
                p = dict(base, **{axis: x})
                p["ports"] = SRN.capped_ports(v, p["ports"])
                key = (v, p["ports"], p["vcpus"], p["senders"])
                if key in seen:
                    continue
                seen.add(key)
                out.append(
                    (f"{v}/p{p['ports']}-v{p['vcpus']}-s{p['senders']}", {"variant": v, **p})
                )
    return out


def configs(opts) -> list[Config]:
    dur, duel = (0.4, 0.05) if opts.quick else (1.0, 0.1)
    return [
        Config(name, {**p, "duration": dur, "duel": duel}, timeout=300 if opts.quick else 900)
        for name, p in _params(opts)
    ]


def run(params: dict, seed: int) -> dict:
    args = SRN.argv(
        params["variant"],
        seed,
        ports=params["ports"],
        vcpus=params["vcpus"],
        senders=params["senders"],
        duration=params["duration"],
        duel=params["duel"],
        nap=0,
        check_interval=1.0,
    )
    rec = SRN.run(args)
    lat = rec.get("latency_ns", {})
    return {
        "variant": params["variant"],
        "events_per_s": rec["delivered_per_s"],
        "latency_p50_ns": lat.get("p50"),
        "latency_p99_ns": lat.get("p99"),
        "delivered": rec["delivered"],
        "edges": rec["edges"],
        "channels": rec["ports"],
        "setup_s": rec.get("setup_s"),
        "wall_s": rec.get("wall_s"),
        "replay": rec["replay"],
        "verdict": rec["verdict"],
    }


def summarize(entries, opts) -> Summary:
    res = by_config(entries)
    s = Summary()
    base = QUICK_BASE if opts.quick else BASE
    sweeps = QUICK if opts.quick else SWEEPS
    rows = []
    curves = {axis: {"rate": {}, "p50": {}} for axis in ("ports", "vcpus", "senders")}
    for name, p in _params(opts):
        rs = res.get(name)
        v = p["variant"]
        if rs:
            rate = [r["events_per_s"] for r in rs]
            p50 = [r["latency_p50_ns"] for r in rs]
            rows.append(
                [
                    v,
                    str(p["ports"]),
                    str(p["vcpus"]),
                    str(p["senders"]),
                    fmt(estimate(rate), " ev/s"),
                    fmt(estimate(p50), " ns"),
                    fmt(estimate([r["latency_p99_ns"] for r in rs]), " ns"),
                    fmt(estimate([r["setup_s"] for r in rs]), " s"),
                ]
            )
        else:
            rows.append(
                [
                    v,
                    str(p["ports"]),
                    str(p["vcpus"]),
                    str(p["senders"]),
                    "failed or not run",
                    "",
                    "",
                    "",
                ]
            )
            continue
        for axis in curves:
            others = [a for a in ("vcpus", "senders") if a != axis]
            if all(p[a] == base[a] for a in others) and (
                axis == "ports" or p["ports"] == SRN.capped_ports(v, base["ports"])
            ):
                x = p[axis]
                curves[axis]["rate"].setdefault(v, {})[x] = rate
                curves[axis]["p50"].setdefault(v, {})[x] = p50
    s.tables.append(
        (
            "Delivered events/s and send-to-handler latency (stress, chaos moderate, every check)",
            [
                "variant",
                "channels",
                "dom0 vCPUs",
                "senders",
                "delivered/s",
                "latency p50",
                "latency p99",
                "setup (bind)",
            ],
            rows,
            "channels are capped below each ABI's limit (port 0 and one port in 256 stay free "
            "for the closers). Every run passed every stress check, or it is listed as failed.",
        )
    )
    for axis, c in curves.items():
        if axis != "ports" and not sweeps[axis]:
            continue
        s.curves.append(
            {
                "name": f"scaling_rate_{axis}",
                "title": f"Delivered events/s against {axis}",
                "xlabel": axis,
                "ylabel": "events/s",
                "logx": True,
                "series": c["rate"],
            }
        )
        s.curves.append(
            {
                "name": f"scaling_latency_{axis}",
                "title": f"Latency p50 against {axis}",
                "xlabel": axis,
                "ylabel": "ns",
                "logx": True,
                "logy": True,
                "series": c["p50"],
            }
        )
    # the deciding figures: the base configuration (same channels for every variant)
    s.metrics["throughput_events_per_s"] = {}
    s.metrics["latency_p50_ns"] = {}
    for name, p in _params(opts):
        if (
            (p["vcpus"], p["senders"]) == (base["vcpus"], base["senders"])
            and p["ports"] == SRN.capped_ports(p["variant"], base["ports"])
            and name in res
        ):
            s.metrics["throughput_events_per_s"][p["variant"]] = [
                r["events_per_s"] for r in res[name]
            ]
            s.metrics["latency_p50_ns"][p["variant"]] = [r["latency_p50_ns"] for r in res[name]]
    one = next((r[0]["replay"] for r in res.values() if r), None)
    if one:
        s.notes.append(f"Each configuration is a stress run; for example: `{one}`")
    s.notes.append(
        f"The decision compares the base configuration: {base['vcpus']} vCPUs, "
        f"{base['senders']} senders, {base['ports']} channels (2l-32: as many as it addresses)."
    )
    return s


def describe(opts) -> str:
    base = QUICK_BASE if opts.quick else BASE
    sweeps = QUICK if opts.quick else SWEEPS
    parts = [f"{a} {', '.join(map(str, xs))}" for a, xs in sweeps.items() if xs]
    return (
        f"`python -m stress` per configuration (chaos moderate, every check, no nap), base "
        f"{base['vcpus']} vCPUs / {base['senders']} senders / {base['ports']} channels; sweeps: "
        f"{'; '.join(parts)}."
    )
