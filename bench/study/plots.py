"""PNG plots (matplotlib, Agg) of an experiment's curves, each point a mean with its 95%
confidence interval as an error bar.

A curve spec (experiments' Summary.curves):
    {"name", "title", "xlabel", "ylabel", "kind": "line" | "bar", "logx", "logy",
     "series": {label: {x: [value per seed]}}}
"line" plots y against numeric x per label; "bar" groups the bars by x (a category).
"""

from __future__ import annotations

from pathlib import Path

from .stats import estimate


def draw(curve: dict, out_dir: Path, note: str = "") -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: v for k, v in curve["series"].items() if any(v.values())}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    if curve.get("kind") == "bar":
        _bars(ax, series)
    else:
        _lines(ax, series)
    if curve.get("logx"):
        ax.set_xscale("log", base=2)
    if curve.get("logy"):
        ax.set_yscale("log")
    ax.set_xlabel(curve.get("xlabel", ""))
    ax.set_ylabel(curve.get("ylabel", ""))
    ax.set_title(curve.get("title", ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if note:
        fig.text(0.01, 0.005, note, fontsize=6, alpha=0.7)
    name = f"{curve['name']}.png"
    fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def _lines(ax, series) -> None:
    for label, pts in series.items():
        xs, ys, lo, hi = [], [], [], []
        for x in sorted(pts, key=float):
            e = estimate(pts[x])
            if e is None:
                continue
            xs.append(float(x))
            ys.append(e.mean)
            lo.append(e.mean - e.lo)
            hi.append(e.hi - e.mean)
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)


def _bars(ax, series) -> None:
    groups = list(series)
    cats = []
    for g in groups:
        for c in series[g]:
            if c not in cats:
                cats.append(c)
    width = 0.8 / max(1, len(groups))
    for i, g in enumerate(groups):
        xs, ys, err = [], [], [[], []]
        for j, c in enumerate(cats):
            e = estimate(series[g].get(c, []))
            if e is None:
                continue
            xs.append(j + (i - (len(groups) - 1) / 2) * width)
            ys.append(e.mean)
            err[0].append(e.mean - e.lo)
            err[1].append(e.hi - e.mean)
        ax.bar(xs, ys, width=width, yerr=err, capsize=3, label=str(g))
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels([str(c) for c in cats], fontsize=8)
