"""python -m bench: evtchn against the C yardstick, interleaved, medians and ratios.

    python -m bench                        # fifo and 2l, 5 repetitions of 1 s each
    python -m bench --quick --json out.json
    python -m bench --abi fifo --reps 9 --duration 2 -v

Cases (bench/cases.py): stream1x1, a sender process and a vCPU process racing (the headline
figure), and isolated, the same kernels in one process with nothing racing (a diagnostic).
For every ABI the runs alternate (evtchn, C, evtchn, C, ...) on the same host and ports, and
the table reports the median rate of each and the ratio evtchn / C. The C program is built
from bench/c/ into a temporary directory on every run. Exit status: 0; 1 when a run lost or
left events (a correctness failure, reported after the table); 2 on a usage or environment
error (no compiler, backend not built).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from . import build as B
from .cases import BenchError, Stream, StreamConfig

STREAM, ISOLATED = Stream.name, "isolated"

ABIS = ("fifo", "2l")
REPO = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    d = StreamConfig()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--abi", action="append", choices=ABIS,
                   help="ABI to run (repeatable; default: fifo and 2l)")
    p.add_argument("--backend", default="cython", choices=("cython", "numba"),
                   help="evtchn backend measured against C")
    p.add_argument("--only", choices=("evtchn", "c"), help="run one side only")
    p.add_argument("--reps", type=int, default=5, help="runs of each side per ABI")
    p.add_argument("--duration", type=float, default=d.duration, help="seconds per run")
    p.add_argument("--ports", type=int, default=d.ports, help="interdomain ports")
    p.add_argument("--batch", type=int, default=d.batch, help="ports per send_many call")
    p.add_argument("--window", type=int, default=d.window,
                   help="most events in flight (sent, not yet delivered); 0 = no limit")
    p.add_argument("--cap", type=int, default=d.cap, help="consume buffer, in ports")
    p.add_argument("--spin-us", type=float, default=d.spin_us,
                   help="microseconds an idle vCPU polls its upcall flag before wait()")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin the sender and the vCPU to two distinct CPUs")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 repetition of 0.25 s per side and ABI")
    p.add_argument("--json", metavar="PATH", help="write figures and metadata here")
    p.add_argument("--build-dir", metavar="DIR",
                   help="where to build the C program (default: a temporary directory)")
    p.add_argument("--cc", help="C compiler (default: $CC or cc)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every run")
    return p


def _check_backend(backend: str) -> None:
    from evtchn import Host
    try:
        Host(backend).close()
    except ImportError as exc:
        raise BenchError(f"evtchn backend {backend!r} is not available: {exc}") from None


def _git_commit() -> str:
    try:
        r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                           text=True, timeout=30)
        commit = r.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "evtchn", "bench"], capture_output=True, text=True, timeout=30)
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _machine(cc) -> dict:
    import numpy
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f
                        if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"machine": {"arch": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(),
                        "system": f"{platform.system()} {platform.release()}",
                        "cc": B.compiler_version(cc)},
            "python": platform.python_version(), "numpy": numpy.__version__,
            "git_commit": _git_commit()}


def _fmt(rate) -> str:
    if rate is None:
        return "-"
    return f"{rate / 1e6:.2f}M" if rate >= 1e6 else f"{rate / 1e3:.0f}k"


def _median(runs, impl, key):
    vals = [r[key] for r in runs if r["impl"] == impl]
    return statistics.median(vals) if vals else None


def run(args) -> int:
    cfg = StreamConfig(ports=args.ports, batch=args.batch, window=args.window, cap=args.cap,
                       spin_us=args.spin_us, duration=args.duration)
    cpus = sorted(os.sched_getaffinity(0))
    if not args.no_pin and len(cpus) >= 2:
        cfg.pin = (cpus[0], cpus[1])
    reps = args.reps
    if args.quick:
        cfg.duration, reps = 0.25, 1
    if reps < 1:
        raise BenchError("--reps must be at least 1")
    cfg.check()
    do_evtchn, do_c = args.only != "c", args.only != "evtchn"
    backend = args.backend if do_evtchn else None
    if do_evtchn:
        _check_backend(backend)
    abis = args.abi or list(ABIS)
    runs = []

    def record(rec, case, abi, rep):
        rec.update(case=case, abi=abi, rep=rep)
        runs.append(rec)
        if args.verbose:
            print(_describe(rec), flush=True)

    with tempfile.TemporaryDirectory(prefix="evtchn-bench-") as tmp:
        exe = B.build(args.build_dir or tmp, args.cc) if do_c else None
        for abi in abis:
            case = Stream(abi, backend, cfg)
            try:
                if do_evtchn:
                    case.warm_up()
                for rep in range(reps):              # A B A B ...: drift hits both alike
                    if do_evtchn:
                        record(case.run_evtchn(), STREAM, abi, rep)
                    if do_c:
                        record(case.run_c(exe), STREAM, abi, rep)
                for rep in range(reps):
                    if do_evtchn:
                        record(case.run_isolated_evtchn(), ISOLATED, abi, rep)
                    if do_c:
                        record(case.run_isolated_c(exe), ISOLATED, abi, rep)
            finally:
                case.close()
    impls = ([backend] if do_evtchn else []) + (["c"] if do_c else [])
    figures, ok = _report(runs, abis, impls, backend)
    if args.json:
        doc = {**figures, **_machine(args.cc), "config": {**dataclasses.asdict(cfg),
               "reps": reps, "backend": backend, "abis": abis}, "runs": runs}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0 if ok else 1


def _describe(r) -> str:
    head = f"  {r['case']:<9} {r['abi']:>4} {r['impl']:>6} rep {r['rep']}: "
    if r["case"] == ISOLATED:
        body = (f"send {_fmt(r['send_events_per_s'])} ev/s, consume "
                f"{_fmt(r['consume_events_per_s'])} ev/s, {r['delivered']} events")
    else:
        body = (f"{_fmt(r['events_per_s'])} ev/s, delivered {r['delivered']} of {r['edges']} "
                f"edges ({r['sent']} sends), {r['events_per_call']:.1f} ev/call, "
                f"{r['waits']} waits, {r['kicks']} kicks")
    return head + body + ("" if r["ok"] else "  FAILED CHECK")


def _report(runs, abis, impls, backend):
    """Print the tables; returns (figures for the JSON, whether every run passed its checks)."""
    figures = {}
    both = len(impls) == 2
    names = {i: "C" if i == "c" else f"evtchn-{i}" for i in impls}

    def row(label, key, abi, case, metric):
        rs = [r for r in runs if r["abi"] == abi and r["case"] == case]
        rates = {}
        line = f"{label:<22} {abi:<5}"
        for impl in impls:
            rates[impl] = _median(rs, impl, key)
            figures[f"{case}_{abi}_{impl}_{metric}_per_s"] = rates[impl]
            line += f" {_fmt(rates[impl]):>16}"
        if both:
            ratio = rates[backend] / rates["c"] if rates[backend] and rates["c"] else None
            figures[f"{case}_{abi}_{backend}_over_c" + ("" if metric == "events"
                                                         else f"_{metric}")] = ratio
            line += f" {ratio:>7.2f}" if ratio is not None else f" {'-':>7}"
        return line, rs

    head = (f"{'case':<22} {'abi':<5}" + "".join(f" {names[i] + ' ev/s':>16}" for i in impls)
            + (f" {'ratio':>7}" if both else ""))
    print(f"median of {max(r['rep'] for r in runs) + 1} interleaved runs; ratio = evtchn / C")
    print(head)
    for abi in abis:
        line, rs = row(STREAM, "events_per_s", abi, STREAM, "events")
        detail = "; ".join(
            f"{names[i]}: {_median(rs, i, 'events_per_call'):.0f} ev/call, "
            f"{_median(rs, i, 'waits'):.0f} waits, {_median(rs, i, 'kicks'):.0f} kicks"
            for i in impls)
        print(f"{line}   {detail}")
    for abi in abis:
        print(row(f"{ISOLATED} send", "send_events_per_s", abi, ISOLATED, "send_events")[0])
        print(row(f"{ISOLATED} consume", "consume_events_per_s", abi, ISOLATED,
                  "consume_events")[0])
    ok = True
    for r in runs:
        if not r["ok"]:
            ok = False
            print(f"CHECK FAILED: {r['case']} {r['abi']} {r['impl']} rep {r['rep']}: "
                  f"lost {r['lost']}, left pending {r['left_pending']}, "
                  f"drained after {r['drained_after']}")
    return figures, ok


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except (BenchError, B.BuildError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
