"""Running the stress harness (python -m stress) inside a configuration, every check on, and
turning its verdict into the configuration's: a violation or a dead worker fails it."""

from __future__ import annotations

from stress import cli as SC
from stress import config as SCF
from stress import run as SR

from . import variants as V
from .child import Failed


def capped_ports(variant: str, ports: int, link_bits: int = 17) -> int:
    """The channels stress can bind for `variant`: below the ABI's limit, minus port 0 and the
    free ports its closers keep (one in SCF.SPARE_EVERY)."""
    limit = V.port_limit(variant, link_bits)
    return min(ports, limit - 1 - SCF.spare_ports(limit))


def argv(variant: str, seed: int, **kw) -> list[str]:
    abi, wb = V.VARIANTS[variant]
    out = ["--abi", abi, "--seed", str(seed), "--no-progress"]
    if abi != "fifo" and wb != 64:
        out += ["--word-bits", str(wb)]
    for key, val in kw.items():
        if val is not None:
            out += [f"--{key.replace('_', '-')}", str(val)]
    return out


def run(args: list[str]) -> dict:
    """One stress run; returns its record (plus the replay command). Raises Failed with the
    record when the run found a violation or lost a worker."""
    cfgs, _ = SC.parse(args)
    cfg = cfgs[0]
    cfg.argv_replay = SC.replay_command(cfg)
    res = SR.run(cfg, None)
    rec = dict(res.record)
    rec["replay"] = cfg.argv_replay
    if res.error:
        raise Failed(f"stress: a worker died or hung: {res.error}", rec)
    if res.interrupted:
        raise Failed("stress run interrupted", rec)
    if res.violations.total:
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(res.violations.counts.items()))
        raise Failed(f"stress found violations ({kinds}); replay: {cfg.argv_replay}", rec)
    return rec
