"""python -m bench: evtchn against the C yardstick, interleaved, medians and ratios.

    python -m bench                        # fifo and 2l, 5 repetitions of 1 s each
    python -m bench --quick --json out.json
    python -m bench --abi fifo --reps 9 --duration 2 -v
    python -m bench --json today.json --compare yesterday.json [--threshold 15]
    python -m bench --compare old.json --new new.json        # compare two files, no run
    python -m bench --plot DIR [--new run.json]               # PNGs (matplotlib)

Cases (bench/cases.py): stream1x1, a sender process and a vCPU process racing (the headline
figure), and isolated, the same kernels in one process with nothing racing (a diagnostic).
For every ABI the runs alternate (evtchn, C, evtchn, C, ...) on the same host and ports, and
the table reports the median rate of each and the ratio evtchn / C. The C program is built
from bench/c/ into a temporary directory on every run. The same run then measures (each can
be skipped): N senders + N vCPUs, N = 1, 2, 32 (bench/multi.py, --pairs); send-to-handler
latency for a busy and an idle vCPU beside the C program's hand-off (bench/latency.py,
--no-latency); multiprocessing.Queue / Pipe / os.eventfd doing the stream case
(bench/alternatives.py, --no-alternatives); per-call costs of Domain.send / consume beside the
kernel calls and the setup of 131,071 channels, batch beside single ops (bench/calls.py,
--no-calls); mapped pages per ABI at 1k .. 2^20 ports beside
Xen's design formulas (bench/memory.py, --no-memory). See bench/README.md.
Exit status: 0; 1 when a run lost or left events (a correctness failure, reported after the
table) or, with --compare, when a figure got worse than --threshold percent; 2 on a usage or
environment error (no compiler, backend not built, unreadable JSON).
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

from . import alternatives as A
from . import build as B
from . import calls as CL
from . import compare as C
from . import headline as HL
from . import latency as LT
from . import memory as M
from . import multi as MU
from . import plot as P
from .cases import BenchError, Stream, StreamConfig

STREAM, ISOLATED, ALTERNATIVE, MULTI = Stream.name, "isolated", "alternative", "multi"
PER_EVENT = "stream1x1_per_event"  # the stream case with batch 1: a call per event

ABIS = ("fifo", "2l")
REPO = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    d = StreamConfig()
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--abi", action="append", choices=ABIS, help="ABI to run (repeatable; default: fifo and 2l)"
    )
    p.add_argument(
        "--backend",
        default="cython",
        choices=("cython", "numba"),
        help="evtchn backend measured against C",
    )
    p.add_argument(
        "--beside",
        choices=("cython", "numba", "none"),
        default="auto",
        help="a second evtchn backend interleaved in the stream and isolated "
        "cases, with its ratio to --backend (auto: numba beside cython when "
        "it is importable)",
    )
    p.add_argument("--only", choices=("evtchn", "c"), help="run one side only")
    p.add_argument("--reps", type=int, default=5, help="runs of each side per ABI")
    p.add_argument("--duration", type=float, default=d.duration, help="seconds per run")
    p.add_argument("--ports", type=int, default=d.ports, help="interdomain ports")
    p.add_argument("--batch", type=int, default=d.batch, help="ports per send_many call")
    p.add_argument(
        "--window",
        type=int,
        default=d.window,
        help="most events in flight (sent, not yet delivered); 0 = no limit",
    )
    p.add_argument("--cap", type=int, default=d.cap, help="consume buffer, in ports")
    p.add_argument(
        "--spin-us",
        type=float,
        default=d.spin_us,
        help="microseconds an idle vCPU polls its upcall flag before wait()",
    )
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the sender and the vCPU to two distinct CPUs",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 1 repetition of 0.25 s per side and ABI"
    )
    p.add_argument(
        "--no-headline",
        action="store_true",
        help="skip the headline (python -m stress --ports 131072 --vcpus 64 beside its C "
        "anchor, bench/headline.py)",
    )
    p.add_argument(
        "--headline-reps",
        type=int,
        default=3,
        metavar="N",
        help="alternating runs of each side of the headline per ABI (--quick: 1)",
    )
    p.add_argument(
        "--headline-duration",
        type=float,
        default=4.0,
        metavar="S",
        help="seconds of racing per headline run (--quick: 1)",
    )
    p.add_argument(
        "--headline-shape",
        type=int,
        nargs=3,
        metavar=("PORTS", "VCPUS", "SENDERS"),
        help=f"the headline's size (default {HL.FULL['ports']} {HL.FULL['vcpus']} "
        f"{HL.FULL['senders']}; --quick: {HL.QUICK['ports']} {HL.QUICK['vcpus']} "
        f"{HL.QUICK['senders']})",
    )
    p.add_argument(
        "--no-alternatives",
        action="store_true",
        help="skip multiprocessing.Queue / Pipe / os.eventfd (bench/alternatives.py)",
    )
    p.add_argument(
        "--no-memory",
        action="store_true",
        help="skip mapped pages per ABI at 1k..2^20 ports (bench/memory.py)",
    )
    p.add_argument(
        "--no-calls",
        action="store_true",
        help="skip per-call costs beside the kernel calls and the setup of 131,071 channels "
        "(bench/calls.py)",
    )
    p.add_argument(
        "--no-latency",
        action="store_true",
        help="skip send-to-handler latency, busy and idle vCPU (bench/latency.py)",
    )
    p.add_argument(
        "--latency-events",
        type=int,
        default=2000,
        metavar="N",
        help="events per latency run (--quick: 200)",
    )
    p.add_argument(
        "--pairs",
        type=int,
        nargs="+",
        metavar="N",
        help=f"N senders + N vCPUs for the multi-process case (default "
        f"{' '.join(map(str, MU.PAIRS))}; --quick: "
        f"{' '.join(map(str, MU.QUICK_PAIRS))}); 0 skips it",
    )
    p.add_argument("--json", metavar="PATH", help="write figures and metadata here")
    p.add_argument(
        "--compare",
        metavar="OLD.json",
        help="after the run, print the change of every figure common with this "
        "earlier --json file; exit 1 if one got worse by more than --threshold",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=C.DEFAULT_THRESHOLD,
        metavar="PERCENT",
        help="--compare: largest tolerated worsening, in percent",
    )
    p.add_argument(
        "--new",
        metavar="NEW.json",
        help="with --compare and/or --plot: take the figures from this file instead of running",
    )
    p.add_argument(
        "--plot",
        metavar="DIR",
        help="write throughput.png (events/s against processes per ABI) and "
        "latency_cdf.png here (needs matplotlib)",
    )
    p.add_argument(
        "--build-dir",
        metavar="DIR",
        help="where to build the C program (default: a temporary directory)",
    )
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
        r = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        commit = r.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "evtchn", "bench"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _machine(cc) -> dict:
    import numpy

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    return {
        "machine": {
            "arch": platform.machine(),
            "cpu": cpu,
            "cpus": os.cpu_count(),
            "system": f"{platform.system()} {platform.release()}",
            "cc": B.compiler_version(cc),
        },
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "git_commit": _git_commit(),
    }


def _fmt(rate) -> str:
    if rate is None:
        return "-"
    return f"{rate / 1e6:.2f}M" if rate >= 1e6 else f"{rate / 1e3:.0f}k"


def _median(runs, impl, key):
    vals = [r[key] for r in runs if r["impl"] == impl]
    return statistics.median(vals) if vals else None


def run(args) -> tuple[int, dict]:
    cfg = StreamConfig(
        ports=args.ports,
        batch=args.batch,
        window=args.window,
        cap=args.cap,
        spin_us=args.spin_us,
        duration=args.duration,
    )
    cpus = sorted(os.sched_getaffinity(0))
    if not args.no_pin and len(cpus) >= 2:
        cfg.pin = (cpus[0], cpus[1])
    reps = args.reps
    if args.quick:
        cfg.duration, reps = 0.25, 1
    if reps < 1:
        raise BenchError("--reps must be at least 1")
    if args.latency_events < 1:
        raise BenchError("--latency-events must be at least 1")
    hl_reps, hl_duration = args.headline_reps, args.headline_duration
    hl_shape = dict(HL.QUICK if args.quick else HL.FULL)
    if args.headline_shape:
        hl_shape = dict(zip(("ports", "vcpus", "senders"), args.headline_shape))
    if args.quick:
        hl_reps, hl_duration = 1, 1.0
    if hl_reps < 1 or not hl_duration > 0 or min(hl_shape.values()) < 1:
        raise BenchError("--headline-reps, --headline-duration and --headline-shape must be > 0")
    cfg.check()
    do_evtchn, do_c = args.only != "c", args.only != "evtchn"
    backend = args.backend if do_evtchn else None
    if do_evtchn:
        _check_backend(backend)
    beside = _beside(args, backend) if do_evtchn else None
    abis = args.abi or list(ABIS)
    runs = []

    def record(rec, case, abi, rep):
        rec.update(case=case, abi=abi, rep=rep)
        runs.append(rec)
        if args.verbose:
            print(_describe(rec), flush=True)

    samples = {}
    with tempfile.TemporaryDirectory(prefix="evtchn-bench-") as tmp:
        exe = B.build(args.build_dir or tmp, args.cc) if do_c else None
        for abi in abis:
            case = Stream(abi, backend, cfg)
            other = Stream(abi, beside, cfg) if beside else None
            try:
                if do_evtchn:
                    case.warm_up()
                if other:
                    other.warm_up()
                for rep in range(reps):  # A B (C) A B (C) ...: drift hits all alike
                    if do_evtchn:
                        record(case.run_evtchn(), STREAM, abi, rep)
                    if other:
                        record(other.run_evtchn(), STREAM, abi, rep)
                    if do_c:
                        record(case.run_c(exe), STREAM, abi, rep)
                for rep in range(reps):
                    if do_evtchn:
                        record(case.run_isolated_evtchn(), ISOLATED, abi, rep)
                    if other:
                        record(other.run_isolated_evtchn(), ISOLATED, abi, rep)
                    if do_c:
                        record(case.run_isolated_c(exe), ISOLATED, abi, rep)
            finally:
                case.close()
                if other:
                    other.close()
        if not args.no_headline:
            HL.measure(abis, backend, exe, hl_reps, hl_duration, hl_shape, record)
        pairs = args.pairs or (MU.QUICK_PAIRS if args.quick else MU.PAIRS)
        pairs = [] if pairs == [0] or not do_evtchn else pairs
        MU.check_pairs(pairs)
        for abi in abis:
            for n in pairs:
                m = MU.Multi(abi, backend, n)
                try:
                    for rep in range(reps):
                        record(m.run(cfg.duration), MULTI, abi, rep)
                finally:
                    m.close()
        latency_figures, latency_lines = {}, []
        if not args.no_latency:
            count = 200 if args.quick else args.latency_events
            latency_figures, samples = LT.measure(
                abis if do_evtchn else [], backend, exe, count, cfg.pin, out=latency_lines.append
            )
    alts, skipped = [], {}
    if not args.no_alternatives:
        for kind in A.ALL:
            why = A.available(kind)
            if why:
                skipped[kind] = why
            else:
                alts.append(kind)
        per_event = None
        if do_evtchn and "fifo" in abis:  # evtchn with one call per event, too
            per_event = Stream("fifo", backend, dataclasses.replace(cfg, batch=1))
        try:
            if per_event:
                per_event.warm_up()
            for rep in range(reps):  # kinds interleaved within each rep
                if per_event:
                    record(per_event.run_evtchn(), PER_EVENT, "fifo", rep)
                for kind in alts:
                    record(
                        A.run_one(kind, cfg.duration, cfg.batch, cfg.window, cfg.pin),
                        ALTERNATIVE,
                        "-",
                        rep,
                    )
        finally:
            if per_event:
                per_event.close()
    impls = (
        ([backend] if do_evtchn else []) + ([beside] if beside else []) + (["c"] if do_c else [])
    )
    figures, ok = _report(runs, abis, impls, backend)
    figures.update(latency_figures)
    if alts or skipped:
        figures.update(_report_alternatives(runs, abis, alts, skipped, backend, figures, cfg.batch))
    if not args.no_headline:
        figures.update(HL.report(runs, abis, backend, hl_shape, _fmt))
    if pairs:
        figures.update(_report_multi(runs, abis, pairs, backend))
    call_lines = []
    if not args.no_calls and do_evtchn:
        calls = CL.measure_calls(backend, reps, args.quick)
        calls.update(CL.measure_setup(backend, reps, args.quick))
        figures.update(calls)
        call_lines = CL.report(calls, backend)
    if not args.no_memory:
        rows = M.measure(
            M.QUICK_SIZES if args.quick else M.SIZES,
            backend if backend in ("cython", "reference") else "cython",
        )
        figures.update(M.figures(rows))
    for line in latency_lines + call_lines:
        print(line)
    doc = {
        **figures,
        **_machine(args.cc),
        "config": {
            **dataclasses.asdict(cfg),
            "reps": reps,
            "backend": backend,
            "abis": abis,
            "headline": {**hl_shape, "reps": hl_reps, "duration": hl_duration},
        },
        "runs": runs,
        "latency_samples_ns": samples,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return (0 if ok else 1), doc


def _describe(r) -> str:
    head = f"  {r['case']:<9} {r['abi']:>4} {r['impl']:>6} rep {r['rep']}: "
    if r["case"] == MULTI:
        head = f"  {r['case']:<9} {r['abi']:>4} {r['processes']:>3} processes rep {r['rep']}: "
        body = (
            f"{_fmt(r['events_per_s'])} ev/s, delivered {r['delivered']} of {r['edges']} "
            f"edges, {r['waits']} waits"
        )
    elif r["case"] == HL.NAME:
        body = (
            f"{_fmt(r['delivered_per_s'])} ev/s while racing, delivered {r['delivered']} of "
            f"{r['edges']} edges, {r['vcpu_wakeups']} wake-ups, CPU s/s senders "
            f"{r['cpu_per_s']['senders']}, vcpus {r['cpu_per_s']['vcpus']}"
        )
    elif r["case"] == ALTERNATIVE:
        head = f"  {r['case']:<9} {r['impl']:>14} rep {r['rep']}: "
        body = (
            f"{_fmt(r['events_per_s'])} ev/s, received {r['delivered']} of {r['sent']}, "
            f"{r['reads']} reads"
        )
    elif r["case"] == ISOLATED:
        body = (
            f"send {_fmt(r['send_events_per_s'])} ev/s, consume "
            f"{_fmt(r['consume_events_per_s'])} ev/s, {r['delivered']} events"
        )
    else:
        body = (
            f"{_fmt(r['events_per_s'])} ev/s, delivered {r['delivered']} of {r['edges']} "
            f"edges ({r['sent']} sends), {r['events_per_call']:.1f} ev/call, "
            f"{r['waits']} waits, {r['kicks']} kicks"
        )
    return head + body + ("" if r["ok"] else "  FAILED CHECK")


def _beside(args, backend):
    """The second backend for --beside, or None; auto = numba beside cython if importable."""
    choice = args.beside
    if choice == "auto":
        if backend != "cython":
            return None
        try:
            _check_backend("numba")
        except BenchError:
            return None
        return "numba"
    if choice == "none" or choice == backend:
        return None
    _check_backend(choice)
    return choice


def _report(runs, abis, impls, backend):
    """Print the tables; returns (figures for the JSON, whether every run passed its checks)."""
    figures = {}
    both = backend in impls and "c" in impls
    other = next((i for i in impls if i not in (backend, "c")), None)
    names = {i: "C" if i == "c" else f"evtchn-{i}" for i in impls}

    def row(label, key, abi, case, metric):
        rs = [r for r in runs if r["abi"] == abi and r["case"] == case]
        rates = {}
        line = f"{label:<22} {abi:<5}"
        for impl in impls:
            rates[impl] = _median(rs, impl, key)
            figures[f"{case}_{abi}_{impl}_{metric}_per_s"] = rates[impl]
            line += f" {_fmt(rates[impl]):>16}"
        suffix = "" if metric == "events" else f"_{metric}"
        if both:
            ratio = rates[backend] / rates["c"] if rates[backend] and rates["c"] else None
            figures[f"{case}_{abi}_{backend}_over_c{suffix}"] = ratio
            line += f" {ratio:>7.2f}" if ratio is not None else f" {'-':>7}"
        if other:
            ratio = rates[other] / rates[backend] if rates[other] and rates[backend] else None
            figures[f"{case}_{abi}_{other}_over_{backend}{suffix}"] = ratio
            line += f" {ratio:>9.2f}" if ratio is not None else f" {'-':>9}"
        return line, rs

    head = (
        f"{'case':<22} {'abi':<5}"
        + "".join(f" {names[i] + ' ev/s':>16}" for i in impls)
        + (f" {'ratio':>7}" if both else "")
        + (f" {other + '/' + backend:>9}" if other else "")
    )
    print(
        f"median of {max(r['rep'] for r in runs) + 1} interleaved runs; ratio = "
        f"evtchn-{backend} / C"
        + (f"; {other}/{backend} = evtchn-{other} / evtchn-{backend}" if other else "")
    )
    print(head)
    for abi in abis:
        line, rs = row(STREAM, "events_per_s", abi, STREAM, "events")
        detail = "; ".join(
            f"{names[i]}: {_median(rs, i, 'events_per_call'):.0f} ev/call, "
            f"{_median(rs, i, 'waits'):.0f} waits, {_median(rs, i, 'kicks'):.0f} kicks"
            for i in impls
        )
        print(f"{line}   {detail}")
    for abi in abis:
        print(row(f"{ISOLATED} send", "send_events_per_s", abi, ISOLATED, "send_events")[0])
        print(
            row(f"{ISOLATED} consume", "consume_events_per_s", abi, ISOLATED, "consume_events")[0]
        )
    ok = True
    for r in runs:
        if not r["ok"]:
            ok = False
            what = (
                f"received {r['delivered']} of {r['sent']}"
                if r["case"] == ALTERNATIVE
                else f"lost {r['lost']}, phantom {r['phantom']}, left pending "
                f"{r['left_pending']}, refused {r['refused']}"
                if r["case"] == HL.NAME and r["impl"] == "c"
                else f"stress verdict {r.get('verdict')}, {r.get('violations')} violation(s)"
                if r["case"] == HL.NAME
                else f"lost {r['lost']}, left pending {r['left_pending']}, "
                f"drained after {r['drained_after']}"
            )
            print(f"CHECK FAILED: {r['case']} {r['abi']} {r['impl']} rep {r['rep']}: {what}")
    return figures, ok


def _report_multi(runs, abis, pairs, backend) -> dict:
    out = {}
    print()
    print(
        f"N senders + N vCPUs ({backend}), not pinned, {MU.PORTS} ports per pair (fewer when "
        f"2l's 4095 would not hold them); events/s, median of "
        f"{max(r['rep'] for r in runs) + 1} runs"
    )
    print(
        f"{'abi':<5}"
        + "".join(f" {f'N={n} ({2 * n} proc)':>16}" for n in pairs)
        + f" {'ports/pair':>16}"
    )
    for abi in abis:
        line = f"{abi:<5}"
        for n in pairs:
            rs = [r for r in runs if r["case"] == MULTI and r["abi"] == abi and r["pairs"] == n]
            rate = statistics.median(r["events_per_s"] for r in rs)
            out[f"multi_{abi}_{2 * n}p_{backend}_events_per_s"] = rate
            line += f" {_fmt(rate):>16}"
        print(line + f" {'/'.join(str(MU.ports_per_pair(n)) for n in pairs):>16}")
    return out


TARGETS = {"mp_queue": 20.0, "eventfd": 2.0}  # evtchn fifo 1:1 / alternative, at least


def _report_alternatives(runs, abis, alts, skipped, backend, figures, batch) -> dict:
    """The alternatives beside evtchn's stream1x1 medians; returns their figures."""
    out = {}
    evt = {abi: figures.get(f"{STREAM}_{abi}_{backend}_events_per_s") for abi in abis}
    print()
    print(
        f"1 sender -> 1 consumer, same duration and pinning; median of "
        f"{max(r['rep'] for r in runs) + 1} runs; ratio = evtchn stream1x1 / alternative"
    )
    print(
        f"{'alternative':<46} {'ev/s':>9} {'reads/s':>9}"
        + "".join(f" {'evtchn-' + abi + '/alt':>15}" for abi in abis if evt[abi])
        + (f" {'per-event/alt':>15}" if any(r["case"] == PER_EVENT for r in runs) else "")
    )
    for abi in abis:
        if evt[abi]:
            print(
                f"{'evtchn ' + abi + ', send_many of ' + str(batch) + ' ports':<46} "
                f"{_fmt(evt[abi]):>9} {'':>9}"
            )
    pe = [r for r in runs if r["case"] == PER_EVENT]
    pe_rate = statistics.median(r["events_per_s"] for r in pe) if pe else None
    if pe_rate:
        out[f"{PER_EVENT}_fifo_{backend}_events_per_s"] = pe_rate
        print(f"{'evtchn fifo, one send call per event':<46} {_fmt(pe_rate):>9} {'':>9}")
    for kind in alts:
        rs = [r for r in runs if r["case"] == ALTERNATIVE and r["impl"] == kind]
        rate = statistics.median(r["events_per_s"] for r in rs)
        reads = (
            statistics.median(
                r["reads"] / (r["elapsed_ns"] / 1e9) for r in rs if r["elapsed_ns"] > 0
            )
            if rs
            else None
        )
        out[f"alt_{kind}_events_per_s"] = rate
        line = f"{A.DESCRIPTION[kind]:<46} {_fmt(rate):>9} {_fmt(reads):>9}"
        for abi in abis:
            if evt[abi]:
                ratio = evt[abi] / rate if rate else None
                out[f"{STREAM}_{abi}_{backend}_over_{kind}"] = ratio
                line += f" {ratio:>15.1f}" if ratio is not None else f" {'-':>15}"
        if pe_rate and rate:
            out[f"{PER_EVENT}_fifo_{backend}_over_{kind}"] = pe_rate / rate
            line += f" {pe_rate / rate:>15.1f}"
        print(line)
    for kind, why in skipped.items():
        print(f"{A.DESCRIPTION[kind]:<46} skipped: {why}")
    for kind, target in TARGETS.items():
        for case, how in ((STREAM, f"send_many of {batch}"), (PER_EVENT, "a call per event")):
            ratio = out.get(f"{case}_fifo_{backend}_over_{kind}")
            if ratio is not None:
                print(
                    f"target: evtchn fifo 1:1 at least {target:g}x {kind} ({how}): measured "
                    f"{ratio:.1f}x, " + ("met" if ratio >= target else "NOT met")
                )
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "study":  # python -m bench study ...: the ABI study (bench/study)
        from .study.cli import main as study_main

        return study_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.plot:
            P.check()  # fail before a long run, not after it
        if args.new:
            if not (args.compare or args.plot):
                raise BenchError("--new needs --compare OLD.json or --plot DIR")
            doc, status = C.load(args.new), 0
        else:
            if args.compare:
                C.load(args.compare)
            status, doc = run(args)
        if args.compare:
            print()
            status = max(status, C.main_compare(args.compare, doc, args.threshold))
        if args.plot:
            for path in P.plot(doc, args.plot):
                print(f"wrote {path}")
        return status
    except (BenchError, B.BuildError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
