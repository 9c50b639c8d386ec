"""--compare OLD.json: the change of every figure two bench JSON files have in common.

Figures are the top-level numeric keys ending `_per_s` (a rate: higher is better) or `_ns`
(a time: lower is better); each is already a median of interleaved runs, so the noise is
what the medians leave, and the threshold (percent) is the margin for it. A figure got worse
by p percent when a rate fell to (100 - p)% of its old value or a time rose to (100 + p)%.
"""

from __future__ import annotations

import json
from pathlib import Path

from .cases import BenchError

DEFAULT_THRESHOLD = 15.0


def figures(doc: dict) -> dict:
    """The comparable figures of a bench JSON document: name -> value (numbers only)."""
    return {
        k: float(v)
        for k, v in doc.items()
        if (k.endswith("_per_s") or k.endswith("_ns"))
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and v is not None
    }


def load(path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise BenchError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BenchError(f"{path} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BenchError(f"{path} is not a bench JSON object")
    return doc


def worse_by(key: str, old: float, new: float) -> float:
    """Percent by which `new` is worse than `old` (negative: better)."""
    if old == 0:
        return 0.0 if new == old else (float("inf") if key.endswith("_ns") else -float("inf"))
    change = (new - old) / abs(old) * 100.0
    return change if key.endswith("_ns") else -change


def compare(old_doc: dict, new_doc: dict, threshold: float = DEFAULT_THRESHOLD, out=print) -> list:
    """Print one line per common figure; returns the names that got worse than `threshold`."""
    old, new = figures(old_doc), figures(new_doc)
    common = sorted(set(old) & set(new))
    only_old, only_new = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    out(
        f"compare: {len(common)} common figures; worse by more than {threshold:g}% fails "
        f"(_per_s: higher is better, _ns: lower is better)"
    )
    if old_doc.get("git_commit") or new_doc.get("git_commit"):
        out(f"  old {old_doc.get('git_commit', '?')}  new {new_doc.get('git_commit', '?')}")
    width = max((len(k) for k in common), default=10)
    bad = []
    for k in common:
        w = worse_by(k, old[k], new[k])
        change = (new[k] - old[k]) / abs(old[k]) * 100.0 if old[k] else float("nan")
        verdict = (
            "REGRESSION" if w > threshold else ("worse" if w > 0 else "better" if w < 0 else "same")
        )
        if w > threshold:
            bad.append(k)
        out(f"  {k:<{width}} {old[k]:>14.6g} -> {new[k]:>14.6g}  {change:+7.1f}%  {verdict}")
    for k in only_old:
        out(f"  {k}: only in the old file")
    for k in only_new:
        out(f"  {k}: only in the new file")
    if bad:
        out(f"compare: {len(bad)} figure(s) worse by more than {threshold:g}%: " + ", ".join(bad))
    else:
        out("compare: no figure worse by more than the threshold")
    return bad


def main_compare(old_path, new_doc: dict, threshold: float) -> int:
    """Exit status for the gate: 1 if a figure regressed beyond the threshold, else 0."""
    if threshold < 0:
        raise BenchError("--threshold must be >= 0")
    return 1 if compare(load(old_path), new_doc, threshold) else 0
