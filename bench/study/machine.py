"""The machine and the software a study ran on, and the load while it ran."""

from __future__ import annotations

import importlib
import os
import statistics
import subprocess
import threading
import time
from pathlib import Path

from stress import run as stress_run

REPO = Path(__file__).resolve().parents[2]


def machine() -> dict:
    m = stress_run.machine()  # cpu_model, cpus, mem_total_kib, loadavg, node
    try:
        m["cpu_affinity"] = len(os.sched_getaffinity(0))
    except OSError:
        pass
    return m


def versions() -> dict:
    v = stress_run.versions()
    for mod in ("numba", "dask", "distributed", "matplotlib"):
        try:
            v[mod] = importlib.import_module(mod).__version__
        except ImportError:
            v[mod] = None
    v["git_commit"] = _git()
    return v


def _git() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "evtchn", "bench", "stress"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        return (head or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class LoadSampler:
    """The 1-minute load average every few seconds while the study runs (other users of the
    machine show up here: the report quotes it beside the timings)."""

    EVERY = 5.0

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append(round(os.getloadavg()[0], 2))
            self._stop.wait(self.EVERY)

    def start(self):
        self._t.start()

    def stop(self):
        self._stop.set()
        if self._t.is_alive():
            self._t.join(2)

    def summary(self) -> dict:
        s = self.samples or [round(os.getloadavg()[0], 2)]
        return {
            "loadavg_1min_min": min(s),
            "loadavg_1min_median": statistics.median(s),
            "loadavg_1min_max": max(s),
            "samples": len(s),
            "every_s": self.EVERY,
            "cpus": os.cpu_count(),
        }


def now() -> float:
    return time.time()
