"""Lock owners: one id per thread, that survives pid reuse (see evtchn.layout, "Lock words").

An owner id is ``(start_time << 32) | tid``: the thread's id (gettid) and its start time in
clock ticks since boot (field 22 of /proc/<tid>/stat), so that a tid reused by a later thread or
process never looks like the owner that died. The Cython kernels compute the same value in C
(evtchn._atomics, evtchn_self); the Numba backend passes this module's value to its kernels.
"""

from __future__ import annotations

import errno
import os
import threading

from . import layout as L

_local = threading.local()


def _proc_stat(tid: int) -> tuple[str, int] | None:
    """(state letter, start time in ticks) of /proc/<tid>/stat; None when the task is gone.
    Fields after the last ')' (comm may hold any character): state is field 3, start 22."""
    try:
        with open(f"/proc/{tid}/stat", "rb") as f:
            text = f.read()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESRCH):
            return None
        raise
    fields = text[text.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def make_owner(tid: int, start: int) -> int:
    return ((start & L.OWNER_START_MASK) << 32) | (tid & L.OWNER_TID_MASK)


def owner_id() -> int:
    """The calling thread's owner id (cached per thread; a forked child computes its own)."""
    oid = getattr(_local, "oid", 0)
    if not oid:
        tid = threading.get_native_id()
        stat = _proc_stat(tid)
        oid = make_owner(tid, stat[1] if stat else 0)
        _local.oid = oid
    return oid


def owner_alive(owner: int) -> bool:
    """False if the owner's thread is gone, a zombie, or its tid now names another thread
    (another start time). CHANNEL_LOCK_READER in the owner word is ignored. A start time of
    0 is unknown (the owner could not read /proc, see evtchn._atomics): only existence counts."""
    tid = owner & L.OWNER_TID_MASK
    if tid == 0:
        return False
    stat = _proc_stat(tid)
    if stat is None or stat[0] in ("Z", "X", "x"):
        return False
    return owner >> 32 == 0 or (stat[1] & L.OWNER_START_MASK) == owner >> 32


def same_owner(word: int, owner: int) -> bool:
    """The lock word `word` is held by `owner`, read-type or not."""
    return (word & ~L.CHANNEL_LOCK_READER) == (owner & ~L.CHANNEL_LOCK_READER)


def pid_namespace() -> int:
    """Inode of this process's pid namespace: owner ids are tids in it."""
    return os.stat("/proc/self/ns/pid").st_ino


def _after_fork_in_child() -> None:
    global _local
    _local = threading.local()


os.register_at_fork(after_in_child=_after_fork_in_child)
