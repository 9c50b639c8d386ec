"""Helpers for the racing processes of a configuration: CPU time of a process, spawned workers
that die with their parent, and a common start."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import time

CTX = multiprocessing.get_context("spawn")
PR_SET_PDEATHSIG = 1


def cpu_ns(pid: int) -> int:
    """CPU time the process (its main thread) has used, in ns (/proc/PID/schedstat)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * (1_000_000_000 // os.sysconf("SC_CLK_TCK"))


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the one that started it exits (a killed
    configuration must not leave racing processes behind)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def raise_fd_limit(needed: int) -> dict:
    """Every mapped evtchn segment holds a file descriptor (CPython's mmap keeps a dup of the
    one it mapped, before Python 3.13), so a process that maps N domains needs RLIMIT_NOFILE
    above N. Raise the soft limit to `needed` (and the hard one where this process may: root).
    Children inherit it. Returns what was before and what is now."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out = {"before": [soft, hard], "needed": needed}
    if soft < needed:
        new_hard = hard if hard == resource.RLIM_INFINITY or hard >= needed else needed
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, new_hard))
        except (ValueError, OSError) as exc:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            except (ValueError, OSError):
                pass
            out["error"] = str(exc)
    out["after"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
    return out


def wait_until(t_ns: int) -> None:
    left = t_ns - time.monotonic_ns()
    if left > 0:
        time.sleep(left / 1e9)


def join_or_kill(procs, timeout: float) -> list:
    """Join every process within one deadline; kill the rest. Returns the exit codes."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    return [p.exitcode for p in procs]
