"""Numba's on-disk cache keys a function on its own source file only: drop a module's cache
when a file whose constants or code are baked into it (evtchn/layout.py, the atomics) changes."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def refresh_cache_guard(
    namespace: dict[str, Any], stamp_name: str, deps: Iterable[str | os.PathLike[str]]
) -> bool:
    """Drop the cache of every dispatcher in `namespace` when one of `deps` (baked-in
    constants, inlined callees) changed since the stamp beside that cache was written.
    Returns True if it flushed."""
    dispatchers = [
        obj
        for obj in namespace.values()
        if hasattr(obj, "py_func") and hasattr(getattr(obj, "_cache", None), "flush")
    ]
    cache_path = next((getattr(d._cache, "cache_path", None) for d in dispatchers), None)
    if not cache_path:
        return False
    digest = hashlib.sha256()
    for path in deps:
        try:
            digest.update(Path(path).read_bytes())
        except OSError:
            return False
    want = digest.hexdigest()
    stamp = Path(cache_path) / stamp_name
    try:
        if stamp.read_text() == want:
            return False
    except OSError:
        pass
    try:  # where numba cannot write, it caches nothing either
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_name(f"{stamp_name}.{os.getpid()}.tmp")
        tmp.write_text(want)
    except OSError:
        return False
    for disp in dispatchers:
        try:
            disp._cache.flush()
        except OSError:
            pass
    os.replace(tmp, stamp)
    return True
