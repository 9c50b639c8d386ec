"""The subprocess that runs one configuration: ``python -m bench.study.child RESULT.json``.

It reads the task spec (JSON) on stdin, records itself in the ledger, runs the experiment's
``run(params, seed)`` and writes ``{"status", "result" | "reason"}`` to RESULT.json. It runs in
its own session, so its racing workers share its process group; a watchdog thread kills that
whole group if the worker process that started it dies (the group's segments are then swept
from the ledger, see ledger.py).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback

from . import ledger

WATCH_S = 0.25


class Failed(Exception):
    """A configuration that ran but must be reported failed (a violation, an unexpected
    ENOSPC, a dead racing process); `partial` keeps what was measured."""

    def __init__(self, reason: str, partial: dict | None = None):
        super().__init__(reason)
        self.partial = partial or {}


def _watch_parent(ppid: int) -> None:
    while True:
        time.sleep(WATCH_S)
        if os.getppid() != ppid:
            try:
                os.killpg(os.getpgrp(), signal.SIGKILL)
            finally:
                os._exit(137)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out_path = argv[0]
    spec = json.loads(sys.stdin.read())
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    ledger.enter()
    from .experiments import module

    t0 = time.perf_counter()
    try:
        result = module(spec["experiment"]).run(dict(spec["params"]), int(spec["seed"]))
        doc = {"status": "ok", "result": result}
    except Failed as exc:
        doc = {"status": "failed", "reason": str(exc), "result": exc.partial}
    except Exception as exc:  # reported, not raised: the study goes on
        tb = traceback.format_exc(limit=8)
        doc = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "traceback": tb}
    doc["elapsed_s"] = round(time.perf_counter() - t0, 3)
    doc["pid"] = os.getpid()
    leftover = _unlink_own_segments()
    if leftover:
        doc["leaked_segments_removed"] = leftover
    with open(out_path, "w") as f:
        json.dump(doc, f)
    ledger.leave()
    return 0


def _unlink_own_segments() -> list[str]:
    """Every host of the run is closed by now; a segment still named after this process was
    leaked (e.g. a domain whose mapping failed half-way): remove it, and say so."""
    names = ledger.segments_of(os.getpid())
    for n in names:
        try:
            os.unlink(os.path.join(ledger.SHM, n))
        except FileNotFoundError:
            pass
    return names


if __name__ == "__main__":
    sys.exit(main())
