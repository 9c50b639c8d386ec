"""Means with 95% confidence intervals over repetitions (seeds), and the overlap test the
decisions use ("inside the noise")."""

from __future__ import annotations

import dataclasses
import math

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal 1.96).
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t95(df: int) -> float:
    return _T95[df - 1] if df <= len(_T95) else 1.96


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Mean of n repetitions with its 95% confidence interval [lo, hi] (Student's t; with one
    repetition there is no interval: lo = hi = mean and n says so)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half(self) -> float:
        return (self.hi - self.lo) / 2

    def overlaps(self, other: Estimate) -> bool:
        return self.lo <= other.hi and other.lo <= self.hi

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.lo, self.hi], "n": self.n}


def estimate(values) -> Estimate | None:
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None
    n = len(xs)
    m = sum(xs) / n
    if n == 1:
        return Estimate(m, m, m, 1)
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    h = t95(n - 1) * math.sqrt(var / n)
    return Estimate(m, m - h, m + h, n)


def fmt(e: Estimate | None, unit: str = "", digits: int = 3) -> str:
    """'12.3k ± 0.4k' style text for a table cell; '-' for no value."""
    if e is None:
        return "-"
    s = f"{_num(e.mean, digits)}{unit}"
    if e.n > 1 and e.half > 0:
        s += f" ± {_num(e.half, 2)}"
    return s


def _num(x: float, digits: int) -> str:
    """3 significant digits with a k/M/G suffix: 1.05k, 12.3M, 0.5."""
    ax = abs(x)
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if ax >= div:
            return f"{_sig(x / div, digits)}{suffix}"
    if ax == int(ax):
        return f"{int(x)}"
    return _sig(x, digits)


def _sig(x: float, digits: int) -> str:
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:.{decimals}f}"
