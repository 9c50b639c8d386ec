"""The headline's C anchor: bench/c/evtchn_ref.c --headline on a host bound like a stress run.

A stress run's data path, written in plain C (N sender processes sending batches of random
ports of their own channels and tallying edges per port, V vCPU processes blocking in the
kick futex, draining with consume, tallying deliveries per port and napping between drains),
runs on the same kind of host: `cfg.channels` interdomain channels from `cfg.senders` sender
domains (1..N) to dom0, each dom0 port bound to the vCPU and (fifo) priority a stress run would
give it. No chaos classes and no masks: the C program delivers every edge, and checks that it
did (per port, nothing left pending), so its rate cannot come from lost events.

Used by `python -m stress --beside-c` (after each ABI's run) and by bench's headline case.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np

from evtchn import Host
from evtchn import layout as L

from .workers import WAIT_TIMEOUT  # the vCPUs' wait slice: the C program's too

ABIS = ("fifo", "2l")  # what the C program implements
RUN_MARGIN = 60.0  # s a C run may take beyond its duration (start-up, drain, checks)


class AnchorError(RuntimeError):
    """The C program could not be built or run, or its accounting failed."""


def build(build_dir) -> Path:
    """Build the C program (bench/build.py) into build_dir (the caller removes it)."""
    from bench import build as B  # the repository's bench/: stress runs from the repo root

    try:
        return B.build(build_dir)
    except B.BuildError as exc:
        raise AnchorError(str(exc)) from None


def vcpu_for(port: int, abi: str, vcpus: int, nwords: int) -> int:
    """stress.run.vcpu_for: whole bitmap words per vCPU for 2l/3l when there are enough."""
    if abi != "fifo" and nwords >= vcpus:
        return (port // 64) % vcpus
    return port % vcpus


class AnchorHost:
    """An evtchn host bound like a stress run of `cfg` (its channels, senders, vCPUs and
    priorities), kept for several C runs; close() releases its memory."""

    def __init__(self, cfg, backend: str | None = None):
        self.cfg = cfg
        self.host = Host(backend or cfg.backend)
        try:
            t0 = time.perf_counter()
            self._bind()
            self.setup_s = time.perf_counter() - t0
        except BaseException:
            self.host.close()
            raise

    def _bind(self) -> None:
        cfg, host = self.cfg, self.host
        dom0 = host.create_domain(cfg.abi, vcpus=cfg.vcpus)
        sdoms = [host.create_domain(cfg.abi, vcpus=1) for _ in range(cfg.senders)]
        n = cfg.channels
        prios = np.random.default_rng(cfg.seed).integers(0, L.FIFO_MAX_QUEUES, n)
        nwords = (n + 1 + 63) // 64
        fifo = cfg.abi == "fifo"
        for c in range(n):
            sd = sdoms[c % cfg.senders]
            p = dom0.alloc_unbound(sd.domid)
            sd.bind_interdomain(0, p)
            v = vcpu_for(p, cfg.abi, cfg.vcpus, nwords)
            if v:
                dom0.bind_vcpu(p, v)
            if fifo and int(prios[c]) != L.FIFO_PRIORITY_DEFAULT:
                dom0.set_priority(p, int(prios[c]))
        for sd in sdoms:  # the bind edges landed on the senders' own ports
            sd.consume(0)
        dom0.consume(0)

    def command(self, exe, duration: float, seed: int = 1) -> list[str]:
        cfg = self.cfg
        return [
            str(exe),
            "--headline",
            "--host",
            self.host.name,
            "--senders",
            str(cfg.senders),
            "--vcpus",
            str(cfg.vcpus),
            "--batch",
            str(cfg.batch),
            "--cap",
            str(cfg.consume_batch),
            "--nap-us",
            f"{cfg.nap * 1e6:g}",
            "--wait-timeout",
            f"{WAIT_TIMEOUT:g}",
            "--duration",
            f"{duration:g}",
            "--seed",
            str(seed),
        ]

    def run(self, exe, duration: float, seed: int = 1) -> dict:
        """One C run of `duration` seconds; its JSON record, whose "ok" says whether its
        accounting held. AnchorError if it did not run to the end."""
        cmd = self.command(exe, duration, seed)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + RUN_MARGIN)
        except subprocess.TimeoutExpired:
            raise AnchorError(f"the C anchor overran {duration + RUN_MARGIN:.0f} s") from None
        try:
            rec = json.loads(r.stdout)
        except json.JSONDecodeError:
            raise AnchorError(
                f"the C anchor failed ({r.returncode}):\n{r.stderr.strip()}"
            ) from None
        rec["ok"] = bool(rec.get("ok")) and r.returncode == 0
        rec["cpu_per_s"] = {k: v / rec["race_s"] for k, v in rec["cpu_s"].items()}
        return rec

    def close(self) -> None:
        self.host.close()


def beside(cfg, exe, python_rec: dict, duration: float | None = None) -> dict:
    """The C anchor on `cfg`'s configuration for as long as the Python run raced; the figures
    to put beside the Python record (rates, ratio, CPU per second of racing)."""
    duration = duration or python_rec.get("race_s") or cfg.duration or 10.0
    ah = AnchorHost(cfg, "cython" if cfg.backend == "numba" else cfg.backend)
    try:
        rec = ah.run(exe, duration, seed=cfg.seed)
    finally:
        ah.close()
    if not rec["ok"]:
        raise AnchorError(
            f"its accounting failed: {rec['lost']} lost, {rec['phantom']} phantom, "
            f"{rec['left_pending']} left pending, {rec['refused']} refused"
        )
    py = python_rec.get("delivered_per_s") or 0.0
    c = rec["delivered_per_s"]
    return {
        "delivered_per_s": c,
        "python_over_c": py / c if c else None,
        "cpu_per_s": rec["cpu_per_s"],
        "setup_s": round(ah.setup_s, 3),
        "record": rec,
    }
