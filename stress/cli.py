"""python -m stress: the command line (argparse; a bad argument is one line and exit 2).

Exit codes: 0 every check passed, 1 a violation was found, 2 bad arguments, 3 a worker died
or hung, 130 interrupted (Ctrl-C or SIGTERM; the partial figures are still printed).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time

from evtchn import BACKENDS
from evtchn import layout as L

from . import config as CF
from . import shm as S

EXIT_PASS, EXIT_VIOLATION, EXIT_USAGE, EXIT_WORKER, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEFAULT_PORTS = 8192

DESCRIPTION = """\
Race real processes on evtchn's event channels and check every invariant.

One host: dom0 with the chosen ABI and --vcpus vCPU processes (each blocks until its upcall is
pending, then runs the guest handler in batches); --ports interdomain channels bound from
--senders sender domains, each a process raising events with send_many (the hypervisor path
runs in the sender's process). Chaos workers mask/unmask, move (bind_vcpu, set_priority) and
close/rebind ports while events are in flight. Every --check-interval seconds, and at the end,
the run is brought to a quiescent point and checked: no lost event, no phantom delivery,
queues well formed, masks honoured, FIFO and priority order (in a dedicated ordered phase).

Also: `python -m stress cleanup` removes /dev/shm/evtchn-* segments left by killed runs."""

EPILOG = """\
exit codes: 0 pass, 1 violation, 2 bad arguments, 3 a worker died or hung, 130 interrupted.
example: python -m stress --abi fifo --ports 131072 --vcpus 64"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line, not usage + traceback
        raise CF.ConfigError(message)


def _positive_int(what):
    def conv(text):
        try:
            v = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, not {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{what} must be at least 1, not {v}")
        return v

    return conv


def _positive_float(what):
    def conv(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, not {text!r}") from None
        if not v > 0 or v == float("inf"):
            raise argparse.ArgumentTypeError(f"{what} must be a positive number, not {text}")
        return v

    return conv


def _seed(text):
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an integer, not {text!r}") from None
    if not 0 <= v < 2**63:
        raise argparse.ArgumentTypeError(f"--seed must be from 0 to 2**63-1, not {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m stress",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--abi",
        choices=CF.ABIS + ("all",),
        default=None,
        help="event channel ABI of dom0, or 'all' to run each on the same workload "
        "(default fifo, or the ABI of --inject)",
    )
    p.add_argument(
        "--ports",
        type=_positive_int("--ports"),
        default=None,
        help="interdomain channels to bind (default 8192, or fewer if the ABI "
        "addresses fewer; at most the ABI's limit: "
        f"fifo {CF.abi_limit('fifo')}, 2l {CF.abi_limit('2l')}, "
        f"3l {CF.abi_limit('3l')}; port 0 is reserved)",
    )
    p.add_argument(
        "--word-bits",
        type=int,
        choices=(32, 64),
        default=64,
        help="xen_ulong_t width for 2l and 3l: 64, or 32 for the x86-32 layout (default 64)",
    )
    p.add_argument(
        "--link-bits",
        type=int,
        default=L.FIFO_LINK_BITS,
        metavar="N",
        help=f"fifo: LINK field width, {L.FIFO_LINK_BITS} (Xen) to {L.FIFO_MAX_LINK_BITS} (the "
        f"design's ceiling); 2^N ports (default {L.FIFO_LINK_BITS})",
    )
    p.add_argument(
        "--vcpus",
        type=_positive_int("--vcpus"),
        default=64,
        help="dom0 vCPUs, one process each (default 64)",
    )
    p.add_argument(
        "--senders",
        type=_positive_int("--senders"),
        default=None,
        help=f"sender domains, one process each (default {CF.default_senders()} on this machine)",
    )
    p.add_argument(
        "--workload",
        choices=CF.WORKLOADS,
        default="uniform",
        help="uniform: random ports; hotspot: a few ports take 90%% of the sends; "
        "bursts: all senders burst 20 ms in every 100 ms; storm: one sender "
        "floods while the others trickle (default uniform)",
    )
    p.add_argument(
        "--chaos",
        default="moderate",
        metavar="LEVEL",
        help="none, low, moderate (default), high, a rate in ops/s for every "
        "kind, or masks=N,moves=N,closes=N",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--duration",
        type=_positive_float("--duration"),
        default=None,
        metavar="SECONDS",
        help="seconds of racing (default 10)",
    )
    g.add_argument(
        "--events",
        type=_positive_int("--events"),
        default=None,
        help="race until this many events were delivered",
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=None,
        help="makes every choice reproducible (default: a random one, printed)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="evtchn kernels (default $EVTCHN_BACKEND or cython); cython runs the "
        "actors as processes, reference interleaves them in one process",
    )
    p.add_argument(
        "--inject",
        choices=sorted(L.INJECTIONS),
        default=None,
        help="run the engine with a known historical bug put back: "
        + ", ".join(sorted(L.INJECTIONS)),
    )
    p.add_argument(
        "--json",
        dest="json_path",
        metavar="PATH",
        default=None,
        help="also write the results, machine and versions as JSON",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (it is shown only when stderr is a terminal)",
    )
    p.add_argument(
        "--batch",
        type=_positive_int("--batch"),
        default=2048,
        help="ports per send_many call (default 2048)",
    )
    p.add_argument(
        "--check-interval",
        type=_positive_float("--check-interval"),
        default=2.0,
        metavar="SECONDS",
        help="seconds of racing between quiescent checks (default 2)",
    )
    p.add_argument(
        "--nap",
        type=float,
        default=8.0,
        metavar="MS",
        help="interrupt moderation: after draining, a vCPU lets events gather this "
        "many milliseconds before it looks again (default 8; 0 = none)",
    )
    p.add_argument(
        "--duel",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="each targeted race of the final phase (consume-vs-send and "
        "unmask-vs-send for 2l/3l, drain-vs-link for fifo) runs this long "
        "(default 1; 0 = none)",
    )
    p.add_argument(
        "--resets",
        type=float,
        default=CF.DEFAULT_RESETS,
        metavar="RATE",
        help="EVTCHNOP_reset calls per second on a resetting domain K (a kexec'ing guest with "
        f"{CF.RESET_CHANNELS} channels from dom0, receiving while it is reset and binds "
        f"again; default {CF.DEFAULT_RESETS:g}; 0 = no such domain)",
    )
    p.add_argument(
        "--resetters",
        type=int,
        choices=(1, 2),
        default=1,
        help="resetter processes of K (default 1; 2: resets race each other, EBUSY, and the "
        "other's re-binds, EAGAIN)",
    )
    p.add_argument(
        "--start-method",
        choices=("forkserver", "spawn"),
        default="forkserver",
        help="how worker processes start (default forkserver)",
    )
    p.add_argument(
        "--accounting",
        choices=("compiled", "numpy"),
        default="compiled",
        help="the workers' per-batch accounting: compiled (stress/_fast.c, built with the "
        "C compiler at the start of the run; numpy when there is none) or numpy "
        "(default compiled; both keep every check)",
    )
    p.add_argument(
        "--beside-c",
        action="store_true",
        help="after each ABI's run, run the headline's C anchor (bench/c/evtchn_ref.c "
        "--headline: the same senders, vCPUs, channels, batch and nap, in C, on a host "
        "bound the same way) for as long as the run raced, and report both rates and "
        "the ratio (needs a C compiler)",
    )
    p.add_argument(
        "--hang-timeout",
        type=_positive_float("--hang-timeout"),
        default=30.0,
        metavar="SECONDS",
        help="a worker silent this long has hung (default 30)",
    )
    return p


def parse(argv: list[str]) -> tuple[list[CF.Config], argparse.Namespace]:
    args = build_parser().parse_args(argv)
    abi = args.abi
    if args.inject:
        bug_abi = CF.INJECT_ABI[args.inject]
        if abi is None:
            abi = bug_abi
        elif abi != bug_abi:
            raise CF.ConfigError(
                f"--inject {args.inject} is a {bug_abi} bug: use --abi "
                f"{bug_abi} (or leave --abi out)"
            )
    abi = abi or "fifo"
    abis = list(CF.ABIS) if abi == "all" else [abi]
    explicit = args.ports is not None
    ports = args.ports if explicit else DEFAULT_PORTS
    if not L.FIFO_LINK_BITS <= args.link_bits <= L.FIFO_MAX_LINK_BITS:
        raise CF.ConfigError(
            f"--link-bits must be from {L.FIFO_LINK_BITS} to {L.FIFO_MAX_LINK_BITS}, "
            f"not {args.link_bits}"
        )
    if args.link_bits != L.FIFO_LINK_BITS and abi not in ("fifo", "all"):
        raise CF.ConfigError(f"--link-bits is a fifo setting; --abi is {abi}")
    if abi != "all" and explicit:
        limit = CF.abi_limit(abi, args.word_bits, args.link_bits)
        if args.ports > limit:
            raise CF.ConfigError(f"--ports {args.ports} is above the {abi} limit of {limit} ports")
    if not 0 <= args.duel <= 3600:
        raise CF.ConfigError(f"--duel must be from 0 to 3600 seconds, not {args.duel:g}")
    if not 0 <= args.resets <= 1000:
        raise CF.ConfigError(f"--resets must be from 0 to 1000 per second, not {args.resets:g}")
    if not 0 <= args.nap <= 1000:
        raise CF.ConfigError(f"--nap must be from 0 to 1000 ms, not {args.nap:g}")
    if args.vcpus > 1024:
        raise CF.ConfigError(f"--vcpus {args.vcpus} is above evtchn's limit of 1024")
    chaos = CF.parse_chaos(args.chaos)
    backend = args.backend or os.environ.get("EVTCHN_BACKEND", "cython")
    if backend not in BACKENDS:
        raise CF.ConfigError(f"EVTCHN_BACKEND={backend!r} is not one of {', '.join(BACKENDS)}")
    _check_backend(backend)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    base = CF.Config(
        ports=ports,
        vcpus=args.vcpus,
        senders=args.senders or CF.default_senders(),
        workload=args.workload,
        chaos=chaos,
        chaos_text=args.chaos,
        duration=args.duration,
        events=args.events,
        seed=seed,
        word_bits=args.word_bits,
        link_bits=args.link_bits,
        backend=backend,
        inject=args.inject,
        batch=args.batch,
        check_interval=args.check_interval,
        nap=args.nap / 1000.0,
        duel_seconds=args.duel,
        start_method=args.start_method,
        hang_timeout=args.hang_timeout,
        resets=args.resets,
        resetters=args.resetters,
        accounting=args.accounting,
        progress=not args.no_progress,
        json_path=args.json_path,
    )
    cfgs = []
    for a in abis:
        cfg = base.for_abi(a)
        cfg.argv_replay = replay_command(cfg)
        cfgs.append(cfg)
    return cfgs, args


def _check_backend(backend: str) -> None:
    try:
        if backend == "cython":
            from evtchn._core import CythonKernels  # noqa: F401
        elif backend == "numba":
            import evtchn.numba_kernels  # noqa: F401
    except ImportError as exc:
        raise CF.ConfigError(
            f"backend {backend} is not available ({exc}); build it with "
            f"`pip install -e . --no-build-isolation` or use --backend "
            f"reference"
        ) from None


def replay_command(cfg: CF.Config) -> str:
    parts = [
        "python",
        "-m",
        "stress",
        "--abi",
        cfg.abi,
        "--ports",
        str(cfg.ports),
        "--vcpus",
        str(cfg.vcpus),
        "--senders",
        str(cfg.senders),
        "--workload",
        cfg.workload,
        "--chaos",
        cfg.chaos_text,
    ]
    if cfg.events is not None:
        parts += ["--events", str(cfg.events)]
    else:
        parts += ["--duration", f"{cfg.duration if cfg.duration is not None else 10:g}"]
    parts += ["--seed", str(cfg.seed), "--backend", cfg.backend]
    if cfg.word_bits != 64:
        parts += ["--word-bits", str(cfg.word_bits)]
    if cfg.link_bits != L.FIFO_LINK_BITS:
        parts += ["--link-bits", str(cfg.link_bits)]
    if cfg.inject:
        parts += ["--inject", cfg.inject]
    if cfg.batch != 2048:
        parts += ["--batch", str(cfg.batch)]
    if cfg.check_interval != 2.0:
        parts += ["--check-interval", f"{cfg.check_interval:g}"]
    if cfg.duel_seconds != 1.0:
        parts += ["--duel", f"{cfg.duel_seconds:g}"]
    if cfg.nap != 0.008:
        parts += ["--nap", f"{cfg.nap * 1000:g}"]
    if cfg.resets != CF.DEFAULT_RESETS:
        parts += ["--resets", f"{cfg.resets:g}"]
    if cfg.resetters != 1:
        parts += ["--resetters", str(cfg.resetters)]
    if cfg.accounting != "compiled":
        parts += ["--accounting", cfg.accounting]
    return " ".join(shlex.quote(x) for x in parts)


# ---------------------------------------------------------------------------------------------
class _Progress:
    """A tqdm bar on stderr fed by the vCPUs' delivered counters (throttled reads)."""

    def __init__(self, cfg, delivered_now):
        from tqdm import tqdm

        self.read = delivered_now
        self.last, self.t = 0, 0.0
        try:
            size = os.get_terminal_size(sys.stderr.fileno())
        except OSError:
            size = os.terminal_size((0, 0))
        sized = size.columns > 0 and size.lines > 0
        # a terminal that reports no size (a bare pty) would get an invisible bar
        self.bar = tqdm(
            total=cfg.events,
            unit="ev",
            unit_scale=True,
            file=sys.stderr,
            desc=f"{cfg.abi} delivered",
            dynamic_ncols=sized,
            ncols=None if sized else 100,
            nrows=None if sized else 24,
            leave=False,
            smoothing=0.3,
        )

    def update(self) -> None:
        now = time.monotonic()
        if now - self.t < 0.2:
            return
        self.t = now
        n = self.read()
        if n > self.last:
            self.bar.update(n - self.last)
            self.last = n

    def close(self) -> None:
        self.bar.close()


def _progress_factory(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return None
    return _Progress


def _on_sigterm(signum, frame):
    from .run import Interrupted

    raise Interrupted("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "cleanup":
        return cleanup(argv[1:])
    try:
        cfgs, args = parse(argv)
    except CF.ConfigError as exc:
        print(f"python -m stress: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from . import run as R

    exe = build_dir = None
    if args.beside_c:  # build first: a missing compiler is a usage error, not a late failure
        import tempfile

        from . import anchor as A

        build_dir = tempfile.TemporaryDirectory(prefix="evtchn-anchor-")
        try:
            exe = A.build(build_dir.name)
        except A.AnchorError as exc:
            build_dir.cleanup()
            print(f"python -m stress: error: --beside-c: {exc}", file=sys.stderr)
            return EXIT_USAGE
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(argv, cfgs, args, exe)
    except (KeyboardInterrupt, R.Interrupted):  # between runs or while printing: each run
        print("\nINTERRUPTED (exit 130)", flush=True)  # released what it had made
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if build_dir is not None:
            build_dir.cleanup()


def _main(argv: list[str], cfgs, args, exe=None) -> int:
    from . import report
    from . import run as R

    results = []
    factory = _progress_factory(cfgs[0].progress)
    for cfg in cfgs:
        if cfg.cap_note:
            print(f"note: {cfg.cap_note}")
        print(
            f"{cfg.abi}: {cfg.channels} channels, {cfg.vcpus} vcpus, {cfg.senders} "
            f"senders, workload {cfg.workload}, chaos {cfg.chaos_text}, backend "
            f"{cfg.backend}{', inject ' + cfg.inject if cfg.inject else ''}, "
            f"seed {cfg.seed}",
            flush=True,
        )
        res = R.run(cfg, factory)
        results.append(res)
        if res.error or res.interrupted:
            break
        if exe is not None:  # the C program of the same shape, on this run's figures
            _beside_c(cfg, exe, res.record)
    records = [r.record for r in results]
    if any(r.interrupted for r in results):
        code = EXIT_INTERRUPTED
    elif any(r.error for r in results):
        code = EXIT_WORKER
    elif any(r.violations.total for r in results):
        code = EXIT_VIOLATION
    else:
        code = EXIT_PASS
    print()
    print(report.table(records))
    for r in records:
        for key in ("note", "accounting_note"):
            if r.get(key):
                print(f"note: {r[key]}")
    text = report.violations_text(records, {c.abi: c.argv_replay for c in cfgs})
    if text:
        print()
        print(text)
    if args.json_path:
        try:
            report.write_json(args.json_path, records, R.machine(), R.versions(), argv, code)
        except OSError as exc:
            print(f"python -m stress: cannot write {args.json_path}: {exc}", file=sys.stderr)
    print()
    print(_verdict(code, results, cfgs))
    return code


def _beside_c(cfg, exe, rec: dict) -> None:
    """The C anchor on this run's configuration, into rec["c_anchor"] (or its error)."""
    from . import anchor as A

    if cfg.abi not in A.ABIS:
        rec["c_anchor_error"] = f"the C anchor implements {' and '.join(A.ABIS)} only"
    elif (cfg.word_bits, cfg.link_bits) != (64, L.FIFO_LINK_BITS):
        rec["c_anchor_error"] = (
            f"the C anchor implements 64-bit words and {L.FIFO_LINK_BITS}-bit links only"
        )
    if "c_anchor_error" in rec:
        print(f"{cfg.abi}: no C anchor ({rec['c_anchor_error']})")
        return
    print(f"{cfg.abi}: C anchor, {rec.get('race_s', 0):.1f} s ...", flush=True)
    try:
        rec["c_anchor"] = A.beside(cfg, exe, rec)
    except A.AnchorError as exc:
        rec["c_anchor_error"] = str(exc)
        print(f"{cfg.abi}: C anchor FAILED: {exc}", file=sys.stderr)


def _verdict(code: int, results, cfgs) -> str:
    if code == EXIT_PASS:
        return f"PASS: every check held ({', '.join(c.abi for c in cfgs)}, seed {cfgs[0].seed})"
    if code == EXIT_VIOLATION:
        n = sum(r.violations.total for r in results)
        return f"FAIL: {n} violation(s); replay with the command(s) above"
    if code == EXIT_WORKER:
        err = next(r.error for r in results if r.error)
        return f"ERROR: {err}; the run was stopped (exit 3)"
    return "INTERRUPTED: the workers were stopped; the figures above are partial (exit 130)"


def cleanup(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(
            "usage: python -m stress cleanup\n\nRemove /dev/shm/evtchn-* segments whose "
            "creating process is gone (left by a killed run)."
        )
        return 0
    if argv:
        print(f"python -m stress cleanup: error: unexpected argument {argv[0]!r}", file=sys.stderr)
        return EXIT_USAGE
    gone = S.leftovers()
    for name, pid in gone:
        S.unlink(name)
        print(f"removed /dev/shm/{name} (creator pid {pid} is gone)")
    print(f"{len(gone)} segment(s) removed")
    return 0
