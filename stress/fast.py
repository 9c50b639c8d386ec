"""The harness's compiled accounting (stress/_fast.c): built with the C compiler when a run
starts, loaded with ctypes by every worker; not part of evtchn's wheel (only evtchn/ is).

Why compiled: a vCPU's handler accounts each consume batch (a few hundred ports) on every
wake-up, and the numpy code needed a dozen calls of 1-5 us each for it, which with 64 vCPU
processes waking 125 times a second each was most of the vCPUs' CPU. One ctypes call does the
same work in a few microseconds. Why not numba: importing it costs ~0.5 s per process, 64
processes per run. Without a compiler the numpy code of stress/workers.py runs instead, with
the same results (tests/test_stress.py checks that both give the same tallies).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).resolve().parent / "_fast.c"
MAX_BAD = 8  # _fast.c's MAX_BAD
_I64_DT, _U32_DT = np.dtype(np.int64), np.dtype(np.uint32)


class FastUnavailable(RuntimeError):
    pass


def build(build_dir=None, cc: str | None = None) -> Path:
    """Compile _fast.c into build_dir (default: a new temporary directory) as a shared library;
    FastUnavailable if there is no compiler or it fails."""
    cc = cc or os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise FastUnavailable(f"no C compiler {cc!r} on PATH")
    out_dir = Path(build_dir or tempfile.mkdtemp(prefix="evtchn-stress-fast-"))
    lib = out_dir / "_fast.so"
    cmd = [cc, "-O2", "-shared", "-fPIC", "-Wall", "-o", str(lib), str(SOURCE), "-lm"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        raise FastUnavailable(f"{' '.join(cmd)}: {exc}") from None
    if r.returncode != 0:
        raise FastUnavailable(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return lib


def remove(lib) -> None:
    """Remove a library build() made, with its directory."""
    if lib:
        shutil.rmtree(Path(lib).parent, ignore_errors=True)


_P = ctypes.c_void_p
_I32, _I64 = ctypes.c_int32, ctypes.c_int64


class VcpuCtx(ctypes.Structure):
    _fields_ = (
        [
            (name, _P)
            for name in (
                "buf delivered port_tag sampled stamp lat_sum lat_cnt hist active hdr moved bad"
            ).split()
        ]
        + [("nports", _I64)]
        + [
            (name, _I32)
            for name in (
                "v tag tag_any tag_dead hist_sub hist_buckets "
                "h_delivered h_overlaps h_lat_max h_lat_max_port"
            ).split()
        ]
    )


class SenderCtx(ctypes.Structure):
    _fields_ = [(name, _P) for name in "lp dp sampled stamp edges_row edges".split()]


_libs: dict[str, ctypes.CDLL] = {}


def load(path) -> ctypes.CDLL:
    path = str(path)
    lib = _libs.get(path)
    if lib is None:
        lib = ctypes.CDLL(path)
        lib.vcpu_account.argtypes = [_P, _I64]
        lib.vcpu_account.restype = _I64
        lib.sender_pick.argtypes = [_P, _P, _I64, _P, _P, _I64]
        lib.sender_pick.restype = None
        lib.sender_tally.argtypes = [_P, _I64]
        lib.sender_tally.restype = _I64
        _libs[path] = lib
    return lib


def _addr(a) -> int | None:
    return None if a is None else a.ctypes.data


class VcpuAccount:
    """vcpu_account bound to one vCPU's arrays: ``account(n)`` accounts buf[:n] and returns
    the number of violations; ``bad()`` lists the first (port, tag) pairs of them."""

    def __init__(self, lib, *, buf, delivered, port_tag, sampled, stamp, lat_sum, lat_cnt, hist,
                 active, hdr, v, tag, tag_any, tag_dead, hist_sub, h):  # fmt: skip
        self._keep = [buf, delivered, port_tag, sampled, stamp, lat_sum, lat_cnt, hist, active]
        self.moved = np.zeros(len(buf), np.uint32)
        self.bad_buf = np.zeros(2 * MAX_BAD, np.uint32)
        self.hdr = hdr
        c = self.ctx = VcpuCtx()
        c.buf, c.delivered, c.port_tag = _addr(buf), _addr(delivered), _addr(port_tag)
        c.sampled, c.stamp = _addr(sampled), _addr(stamp)
        c.lat_sum, c.lat_cnt, c.hist = _addr(lat_sum), _addr(lat_cnt), _addr(hist)
        c.active, c.hdr, c.moved, c.bad = (
            _addr(active),
            _addr(hdr),
            _addr(self.moved),
            _addr(self.bad_buf),
        )
        c.nports = len(port_tag)
        c.v, c.tag, c.tag_any, c.tag_dead = v, tag, tag_any, tag_dead
        c.hist_sub, c.hist_buckets = hist_sub, len(hist)
        c.h_delivered, c.h_overlaps, c.h_lat_max, c.h_lat_max_port = h
        self._fn = lib.vcpu_account
        self._ref = ctypes.addressof(c)

    def __call__(self, n: int) -> int:
        return self._fn(self._ref, n)

    def bad(self, nbad: int):
        k = min(nbad, MAX_BAD)
        pairs = self.bad_buf[: 2 * k].reshape(k, 2)
        return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


class SenderAccount:
    """sender_pick / sender_tally bound to one sender's arrays and buffers."""

    def __init__(self, lib, *, k_max: int, sampled, stamp, edges_row, edges):
        self.lp = np.zeros(k_max, np.uint32)
        self.dp = np.zeros(k_max, np.uint32)
        self._keep = [sampled, stamp, edges_row, edges]
        c = self.ctx = SenderCtx()
        c.lp, c.dp, c.sampled, c.stamp = (
            _addr(self.lp),
            _addr(self.dp),
            _addr(sampled),
            _addr(stamp),
        )
        c.edges_row, c.edges = _addr(edges_row), _addr(edges)
        self._pick, self._tally = lib.sender_pick, lib.sender_tally
        self._ref = ctypes.addressof(c)

    def pick(self, pos: np.ndarray, lport: np.ndarray, dport: np.ndarray, t0: int) -> None:
        """lp[:k], dp[:k] = lport[pos], dport[pos]; stamp the sampled fresh dom0 ports. pos is
        contiguous int64 and lport, dport contiguous uint32 (the Sender's own arrays)."""
        # C indexes with these: a wrong dtype or a strided view must not reach it
        if pos.dtype != _I64_DT or not pos.flags.c_contiguous:
            pos = np.ascontiguousarray(pos, np.int64)
        if len(pos) > len(self.lp):
            raise ValueError(f"{len(pos)} picks, the buffers hold {len(self.lp)}")
        for a in (lport, dport):
            if a.dtype != _U32_DT or not a.flags.c_contiguous:
                raise ValueError("lport and dport must be contiguous uint32 arrays")
        self._pick(self._ref, pos.ctypes.data, len(pos), lport.ctypes.data, dport.ctypes.data, t0)

    def tally(self, k: int) -> int:
        """After send_many(lp[:k], edges[:k]): tally its new edges; returns their number."""
        if k > len(self.dp):
            raise ValueError(f"{k} sends, the buffers hold {len(self.dp)}")
        return self._tally(self._ref, k)
