"""Shared memory that a killed task leaves behind, swept on the machine that ran it.

evtchn names every segment ``evtchn-<creator pid>-...`` and only its creator unlinks it, so a
configuration's segments are exactly those of its child process (the task's subprocess creates
every host; its racing workers only attach). The child writes its pid into this machine's
ledger before it creates anything and removes the entry once it has released everything. A
child that dies (killed on a timeout, or taking its worker down, or killed with it) leaves its
entry; ``sweep()`` - run before and after every task on the worker, and by the runner on every
worker at the end of a study - unlinks the segments of each entry whose process is gone; an
entry whose worker is gone but whose task process still lives (it is about to kill itself) is
killed first, by its id. Only pids in the ledger are touched: other programs' segments and
processes on the machine never are.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

from stress.shm import pid_alive

SHM = "/dev/shm"
ENV = "EVTCHN_STUDY_LEDGER"


def directory() -> Path:
    d = Path(os.environ.get(ENV) or Path(tempfile.gettempdir()) / "evtchn-study-ledger")
    d.mkdir(parents=True, exist_ok=True)
    return d


def enter(pid: int | None = None, parent: int | None = None) -> Path:
    """Record `pid` (default: this process) as a segment creator of a running task, with the
    worker process that started it (default: this process's parent)."""
    pid = pid or os.getpid()
    parent = parent if parent is not None else (os.getppid() if pid == os.getpid() else 0)
    path = directory() / str(pid)
    path.write_text(f"{pid} {parent}\n")
    return path


def leave(pid: int | None = None) -> None:
    try:
        (directory() / str(pid or os.getpid())).unlink()
    except FileNotFoundError:
        pass


def _orphan(entry: Path, pid: int) -> bool:
    """A task's process whose worker is gone (it kills its own process group within a
    fraction of a second; this does it now, by its id, and waits for it)."""
    try:
        parent = int(entry.read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return False
    if not parent or pid_alive(parent) or not _is_task(pid):
        return False
    try:
        os.killpg(pid, signal.SIGKILL)  # the task runs in its own session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass
    for _ in range(100):
        if not pid_alive(pid):
            return True
        time.sleep(0.01)
    return False


def _is_task(pid: int) -> bool:
    """The pid is still a study task's process (not a reuse of the number)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"bench.study.child" in f.read()
    except OSError:
        return False


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
        if pid_alive(pid) and not _orphan(entry, pid):
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
