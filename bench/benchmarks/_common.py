"""Shared set-up for the asv benchmarks: the repository root on sys.path (asv imports this
directory, not the repository), so bench.* (the `python -m bench` machinery) is importable here
and in the processes it spawns (spawn passes sys.path on)."""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

BACKEND = os.environ.get("EVTCHN_BENCH_BACKEND", "cython")
