"""The headline: `python -m stress --abi ABI --ports 131072 --vcpus 64` beside its C anchor.

Python side: the real stress run (stress.run.run: setup, worker processes, chaos, a quiescent
check every 2 s, every check on; no duels), whose figure is the delivered/s while racing.
C side: bench/c/evtchn_ref.c --headline (stress/anchor.py) on a host bound the same way
(channels, senders, vCPUs, priorities; no chaos), for the same duration: N sender processes
sending batches of random ports of their own channels with per-port edge tallies, V vCPU
processes blocking in the kick futex, draining with consume, tallying deliveries per port and
napping as stress's do; it checks its own accounting (delivered == edges per port, nothing
pending). Runs alternate (Python, C, Python, C, ...); medians and the ratio Python / C, plus the
CPU-seconds per second of racing of the vCPU processes and of the senders on each side.
"""

from __future__ import annotations

import statistics

from .cases import BenchError

FULL = {"ports": 131072, "vcpus": 64, "senders": 2}
QUICK = {"ports": 4096, "vcpus": 8, "senders": 2}
NAME = "headline"


def configs(abis, shape: dict, duration: float, seed: int, backend: str):
    from stress import config as CF

    base = CF.Config(
        ports=shape["ports"],
        vcpus=shape["vcpus"],
        senders=shape["senders"],
        duration=duration,
        seed=seed,
        backend=backend,
        duel_seconds=0.0,
        progress=False,
    )
    return {abi: base.for_abi(abi) for abi in abis}


def run_stress(cfg, rep: int) -> dict:
    import dataclasses

    from stress import run as R

    res = R.run(dataclasses.replace(cfg, seed=cfg.seed + rep))
    rec = res.record
    if res.error or res.interrupted:
        raise BenchError(f"headline {cfg.abi}: the stress run failed: {res.error or 'interrupted'}")
    cpu = rec.get("race_cpu_per_s") or {}
    return {
        "impl": cfg.backend,
        "delivered_per_s": rec["delivered_per_s"],
        "race_s": rec["race_s"],
        "delivered": rec["delivered"],
        "edges": rec["edges"],
        "vcpu_wakeups": rec["vcpu_wakeups"],
        "cpu_per_s": {"senders": cpu.get("senders"), "vcpus": cpu.get("vcpus")},
        "setup_s": rec.get("setup_s"),
        "verdict": rec["verdict"],
        "violations": sum(rec.get("violation_counts", {}).values()),
        "ok": rec["verdict"] == "pass",
    }


def run_c(ah, exe, cfg, rep: int) -> dict:
    from stress import anchor as A

    try:
        rec = ah.run(exe, cfg.duration, seed=cfg.seed + rep)
    except A.AnchorError as exc:
        raise BenchError(f"headline {cfg.abi}: {exc}") from None
    return {"impl": "c", **rec}


def measure(abis, backend, exe, reps, duration, shape, record, seed=1) -> None:
    """Run the headline for each ABI, Python and C alternately `reps` times; each record goes
    to record(rec, case, abi, rep)."""
    from stress import anchor as A

    abis = [a for a in abis if a in A.ABIS]
    for abi, cfg in configs(abis, shape, duration, seed, backend or "cython").items():
        ah = A.AnchorHost(cfg) if exe else None
        try:
            for rep in range(reps):
                if backend:
                    record(run_stress(cfg, rep), NAME, abi, rep)
                if ah is not None:
                    record(run_c(ah, exe, cfg, rep), NAME, abi, rep)
        finally:
            if ah is not None:
                ah.close()


def _med(rs, impl, get):
    vals = [get(r) for r in rs if r["impl"] == impl and get(r) is not None]
    return statistics.median(vals) if vals else None


def _cpu_text(c) -> str:
    if not c or c["senders"] is None:
        return "-"
    return f"{c['senders']:.2f} / {c['vcpus']:.2f}"


def report(runs, abis, backend, shape, fmt) -> dict:
    """Print the table; returns the figures (rates end in _per_s: the --compare gate and asv
    track them; the ratio and CPU figures do not end in _per_s or _ns)."""
    out = {}
    rs_all = [r for r in runs if r["case"] == NAME]
    if not rs_all:
        return out
    n = max(r["rep"] for r in rs_all) + 1
    print()
    print(
        f"headline: python -m stress --ports {shape['ports']} --vcpus {shape['vcpus']} "
        f"--senders {shape['senders']} (chaos moderate, checks on) beside its C anchor "
        f"(same shape, no chaos); delivered/s while racing, median of {n} alternating runs; "
        f"CPU = CPU-seconds per second of racing, senders / vCPUs"
    )
    print(
        f"{'abi':<5} {'evtchn ev/s':>12} {'C ev/s':>10} {'ratio':>6} "
        f"{'evtchn CPU':>12} {'C CPU':>12}"
    )
    impls = [i for i in (backend, "c") if i]
    for abi in abis:
        rs = [r for r in rs_all if r["abi"] == abi]
        if not rs:
            continue
        rate, cpu = {}, {}
        for impl in impls:
            rate[impl] = _med(rs, impl, lambda r: r["delivered_per_s"])
            out[f"{NAME}_{abi}_{impl}_delivered_per_s"] = rate[impl]
            cpu[impl] = {
                role: _med(rs, impl, lambda r, role=role: r["cpu_per_s"][role])
                for role in ("senders", "vcpus")
            }
            for role, v in cpu[impl].items():
                out[f"{NAME}_{abi}_{impl}_{role}_cpu_s_per_race_s"] = v
        ratio = None
        if backend and rate.get(backend) and rate.get("c"):
            ratio = rate[backend] / rate["c"]
            out[f"{NAME}_{abi}_{backend}_over_c"] = ratio
        print(
            f"{abi:<5} {fmt(rate.get(backend)):>12} {fmt(rate.get('c')):>10} "
            f"{'-' if ratio is None else f'{ratio:.2f}':>6} {_cpu_text(cpu.get(backend)):>12} "
            f"{_cpu_text(cpu.get('c')):>12}"
        )
    return out
