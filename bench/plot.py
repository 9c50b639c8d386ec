"""--plot DIR: PNGs from a bench JSON document (matplotlib, optional).

throughput.png   events/s against processes (N senders + N vCPUs: 2N), one line per ABI
latency_cdf.png  send -> handler latency CDFs, busy and idle vCPU, evtchn per ABI and C
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .cases import BenchError

MISSING = (
    "--plot needs matplotlib, which is not installed here (pip install matplotlib, "
    "or drop --plot); nothing was run"
)


def check() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise BenchError(MISSING)


def plot(doc: dict, out_dir) -> list[Path]:
    """Write the PNGs for what `doc` holds; returns their paths."""
    check()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    machine = doc.get("machine", {})
    cpu, ncpu = machine.get("cpu", "?"), machine.get("cpus", "?")
    note = f"{cpu}, {ncpu} CPUs, {doc.get('git_commit', '')}"

    series = {}  # abi -> {processes: events/s}
    for key, value in doc.items():
        if key.startswith("multi_") and key.endswith("_events_per_s") and value:
            _, abi, procs = key.split("_")[:3]
            series.setdefault(abi, {})[int(procs.rstrip("p"))] = value
    if series:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for abi, pts in sorted(series.items()):
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], marker="o", label=abi)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("processes (N senders + N vCPUs)")
        ax.set_ylabel("events/s (median)")
        ax.set_ylim(bottom=0)
        ax.set_title("evtchn throughput against processes")
        ax.legend()
        ax.grid(True, alpha=0.3)
        fig.text(0.01, 0.01, note, fontsize=7)
        path = out_dir / "throughput.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    samples = doc.get("latency_samples_ns") or {}
    if samples:
        modes = sorted({label.split(" ")[1] for label in samples})
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            for label, lat in sorted(samples.items()):
                if label.split(" ")[1] != mode:
                    continue
                x = np.sort(np.asarray(lat, dtype=float)) / 1000.0
                ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=label.split(" ")[0])
            ax.set_xscale("log")
            ax.set_xlabel("send -> handler latency (us)")
            ax.set_ylabel("fraction of events")
            ax.set_title(f"{mode} vCPU")
            ax.legend()
            ax.grid(True, alpha=0.3)
        fig.text(0.01, 0.01, note, fontsize=7)
        path = out_dir / "latency_cdf.png"
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    if not written:
        raise BenchError("nothing to plot: the JSON has no multi-process or latency figures")
    return written
