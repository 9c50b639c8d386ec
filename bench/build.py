"""Build the C yardstick (bench/c/evtchn_ref.c) against a layout.h generated from evtchn.layout."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
from pathlib import Path

C_DIR = Path(__file__).resolve().parent / "c"
SOURCE = C_DIR / "evtchn_ref.c"
CFLAGS = ["-O2", "-Wall", "-Wextra"]


class BuildError(RuntimeError):
    pass


def compiler(cc: str | None = None) -> str:
    """The C compiler: `cc`, else $CC, else cc; BuildError if it is not installed."""
    cc = cc or os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise BuildError(f"no C compiler {cc!r} on PATH (set CC or pass --cc)")
    return cc


def build(build_dir, cc: str | None = None) -> Path:
    """Write build_dir/layout.h and compile build_dir/evtchn_ref; returns the executable."""
    cc = compiler(cc)
    build_dir = Path(build_dir)
    runpy.run_path(str(C_DIR / "gen_layout.py"))["write_layout_h"](build_dir)
    exe = build_dir / "evtchn_ref"
    cmd = [cc, *CFLAGS, "-I", str(build_dir), "-o", str(exe), str(SOURCE)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return exe


def compiler_version(cc: str | None = None) -> str:
    try:
        out = subprocess.run(
            [compiler(cc), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
    except (BuildError, OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"
