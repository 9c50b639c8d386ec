"""Shared memory that a killed task leaves behind, swept on the machine that ran it.

evtchn names every segment ``evtchn-<creator pid>-...`` and only its creator unlinks it, so a
configuration's segments are exactly those of its child process (the task's subprocess creates
every host; its racing workers only attach). The child writes its pid into this machine's
ledger before it creates anything and removes the entry once it has released everything. A
child that dies (killed on a timeout, or taking its worker down, or killed with it) leaves its
entry; ``sweep()`` - run before and after every task on the worker, and by the runner on every
worker at the end of a study - unlinks the segments of each entry whose process is gone. Only
pids in the ledger are touched: other programs' segments on the machine never are.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from stress.shm import pid_alive

SHM = "/dev/shm"
ENV = "EVTCHN_STUDY_LEDGER"


def directory() -> Path:
    d = Path(os.environ.get(ENV) or Path(tempfile.gettempdir()) / "evtchn-study-ledger")
    d.mkdir(parents=True, exist_ok=True)
    return d


def enter(pid: int | None = None) -> Path:
    """Record `pid` (default: this process) as a segment creator of a running task."""
    pid = pid or os.getpid()
    path = directory() / str(pid)
    path.write_text(f"{pid}\n")
    return path


def leave(pid: int | None = None) -> None:
    try:
        (directory() / str(pid or os.getpid())).unlink()
    except FileNotFoundError:
        pass


def segments_of(pid: int) -> list[str]:
    prefix = f"evtchn-{pid}-"
    try:
        return sorted(n for n in os.listdir(SHM) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def sweep() -> list[str]:
    """Unlink the segments of every ledger entry whose process is gone; returns their names."""
    removed = []
    d = directory()
    for entry in sorted(d.iterdir()):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid_alive(pid):
            continue
        for name in segments_of(pid):
            try:
                os.unlink(os.path.join(SHM, name))
                removed.append(name)
            except FileNotFoundError:
                pass
        try:
            entry.unlink()
        except FileNotFoundError:
            pass
    return removed
