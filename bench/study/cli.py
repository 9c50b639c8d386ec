"""python -m bench study: run the study's experiments as Dask tasks and write the report.

    python -m bench study --report DIR                 # every experiment (minutes on 2 cores)
    python -m bench study --report DIR --quick         # small sizes, under 2 minutes
    python -m bench study --report DIR --only lockout,timer --seeds 5
    python -m bench study --from DIR/results.json      # rebuild the report, run nothing
    python -m bench study --report DIR --resume        # go on from the configurations kept

Exit status: 0 every configuration ran and passed its checks; 1 an experiment failed (a
violation, a dead worker, an unexpected ENOSPC: the report says which and why); 2 bad
arguments (one line) or a missing extra (pip install -e '.[study]').
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import importlib.util
import shlex
import sys
import time
from pathlib import Path

from . import ledger, store
from . import profile as PR
from .experiments import INTERNAL, ORDER, module

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_SEEDS = 3
QUICK_SEEDS = 1


class UsageError(ValueError):
    pass


@dataclasses.dataclass
class Options:
    """What the experiments' configs()/summarize() read (kept in results.json)."""

    quick: bool = False
    profile: PR.Profile = dataclasses.field(default_factory=PR.Profile)

    def as_dict(self) -> dict:
        return {"quick": self.quick, "profile": dataclasses.asdict(self.profile)}

    @classmethod
    def from_dict(cls, d: dict) -> Options:
        return cls(bool(d.get("quick")), PR.Profile(**(d.get("profile") or {})))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _int(what, lo=1):
    def conv(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, not {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{what} must be at least {lo}, not {v}")
        return v

    return conv


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m bench study",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="experiments: " + ", ".join(ORDER),
    )
    p.add_argument("--report", metavar="DIR", help="write results.json, report.md and PNGs here")
    p.add_argument("--quick", action="store_true", help="small sizes (under 2 minutes)")
    p.add_argument("--only", metavar="NAME[,NAME]", help="run these experiments only")
    p.add_argument(
        "--config",
        metavar="PATTERN",
        help="run only the configurations whose name matches (shell pattern, e.g. '2l-64/*')",
    )
    p.add_argument(
        "--seeds",
        type=_int("--seeds"),
        help=f"repetitions of every configuration, for 95%% confidence intervals (default "
        f"{DEFAULT_SEEDS}; --quick {QUICK_SEEDS})",
    )
    p.add_argument(
        "--from", dest="from_", metavar="RESULTS.json", help="rebuild the report only; run nothing"
    )
    p.add_argument(
        "--resume", action="store_true", help="keep the configurations DIR already finished"
    )
    p.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler")
    p.add_argument(
        "--parallel",
        type=_int("--parallel"),
        default=1,
        help="local Dask workers (default 1: configurations never share the CPUs)",
    )
    p.add_argument(
        "--profile",
        metavar="KEY=VALUE[,...]",
        help="dom0 / guest profile of experiment 1: "
        + ", ".join(f"{k} (default {v})" for k, v in dataclasses.asdict(PR.Profile()).items()),
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse(argv) -> argparse.Namespace:
    a = parser().parse_args(argv)
    if a.from_:
        for flag in ("quick", "resume", "scheduler", "only", "config", "seeds", "profile"):
            if getattr(a, flag):
                raise UsageError(f"--from rebuilds a report and runs nothing: drop --{flag}")
        if not Path(a.from_).is_file():
            raise UsageError(f"--from {a.from_}: no such file")
        return a
    if not a.report:
        raise UsageError("--report DIR is required (or --from RESULTS.json)")
    if a.scheduler and a.parallel != 1:
        raise UsageError("--parallel sizes the local cluster: drop it with --scheduler")
    if a.scheduler and "://" not in a.scheduler:
        raise UsageError(
            f"--scheduler needs an address such as tcp://HOST:8786, not {a.scheduler!r}"
        )
    names = [n.strip() for n in (a.only or ",".join(ORDER)).split(",") if n.strip()]
    for n in names:
        if n not in ORDER + INTERNAL:
            raise UsageError(f"--only: unknown experiment {n!r} (choose from {', '.join(ORDER)})")
    a.names = names
    try:
        a.prof = PR.parse(a.profile)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    a.seeds = a.seeds or (QUICK_SEEDS if a.quick else DEFAULT_SEEDS)
    return a


def _missing_extra() -> str | None:
    for mod in ("dask", "distributed", "matplotlib"):
        if importlib.util.find_spec(mod) is None:
            return f"the study needs {mod}, which is not installed: pip install -e '.[study]'"
    return None


def specs_for(names, opts: Options, seeds: int, pattern: str | None) -> list[dict]:
    out = []
    for name in names:
        mod = module(name)
        for cfg in mod.configs(opts):
            if pattern and not fnmatch.fnmatchcase(cfg.name, pattern):
                continue
            reps = cfg.reps or (1 if mod.DETERMINISTIC else seeds)
            for seed in range(reps):
                out.append(
                    {
                        "task_key": f"{name}/{cfg.name}/s{seed}",
                        "experiment": name,
                        "config": cfg.name,
                        "params": cfg.params,
                        "seed": seed,
                        "timeout": cfg.timeout,
                    }
                )
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)
    try:
        a = parse(argv)
        if a.from_:
            return _rebuild(a)
        why = _missing_extra()
        if why:
            raise UsageError(why)
    except UsageError as exc:
        print(f"python -m bench study: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return _study(a, argv)


def _rebuild(a) -> int:
    from . import report

    try:
        doc = store.load(a.from_)
    except (OSError, ValueError) as exc:
        print(f"python -m bench study: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(a.report) if a.report else Path(a.from_).parent
    out.mkdir(parents=True, exist_ok=True)
    failed = report.build(doc, out)
    print(f"wrote {out / 'report.md'}")
    return EXIT_FAILED if failed else EXIT_OK


def _study(a, argv) -> int:
    from . import machine, progress, report
    from .runner import Cluster

    opts = Options(a.quick, a.prof)
    out = Path(a.report)
    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.json"
    specs = specs_for(a.names, opts, a.seeds, a.config)
    if not specs:
        print("python -m bench study: error: no configuration matches", file=sys.stderr)
        return EXIT_USAGE
    meta = {
        "command": "python -m bench study " + shlex.join(argv),
        "options": opts.as_dict(),
        "experiments": a.names,
        "seeds": a.seeds,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    doc = store.empty(meta)
    if a.resume and res_path.is_file():
        old = store.load(res_path)
        doc["configs"] = {
            k: v for k, v in old.get("configs", {}).items() if v.get("status") == "ok"
        }
        prev = old.get("study", {})
        meta["resumed_from"] = {
            k: prev.get(k) for k in ("command", "started", "finished", "wall_s", "load", "where")
        }
    doc["machine"], doc["versions"] = machine.machine(), machine.versions()
    todo = [
        s
        for s in specs
        if not (
            s["task_key"] in doc["configs"]
            and doc["configs"][s["task_key"]].get("params") == s["params"]
        )
    ]
    kept = len(specs) - len(todo)
    store.save(doc, res_path)
    load = machine.LoadSampler()
    bar = progress.Bars(specs, done=[s for s in specs if s not in todo], quiet=a.quiet)
    t0 = time.perf_counter()
    cluster = None
    interrupted = False
    try:
        load.start()
        if todo:
            cluster = Cluster(a.scheduler, a.parallel)
            meta["where"] = cluster.where
            for spec, rec in cluster.run_all(todo):
                doc["configs"][spec["task_key"]] = {
                    **{k: spec[k] for k in ("experiment", "config", "seed", "params")},
                    **rec,
                }
                store.save(doc, res_path)
                bar.done(spec, rec.get("status") == "ok")
            meta["swept_segments"] = cluster.sweep_workers()
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        load.stop()
        if cluster is not None:
            cluster.close()
            meta["swept_segments"] = meta.get("swept_segments", 0) + len(ledger.sweep())
    meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["kept_from_resume"] = kept
    meta["load"] = load.summary()
    meta["interrupted"] = interrupted
    store.save(doc, res_path)
    failed = report.build(doc, out)
    print(f"wrote {out / 'report.md'} and {res_path} ({meta['wall_s']:.0f} s)")
    if interrupted:
        print("interrupted: run again with --resume to go on", file=sys.stderr)
        return 130
    return EXIT_FAILED if failed else EXIT_OK
