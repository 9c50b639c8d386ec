"""The run's table (one column per ABI, side by side), its violations, and the JSON file."""

from __future__ import annotations

import json
import os
import time


def _n(x) -> str:
    return "-" if x is None else f"{int(x):,}"


def _us(ns) -> str:
    if ns is None:
        return "-"
    us = ns / 1000
    return f"{us:,.0f} us" if us >= 100 else f"{us:.1f} us"


def _rate(x) -> str:
    if not x:
        return "-"
    return f"{x / 1e6:.2f} M/s" if x >= 1e5 else f"{x:,.0f}/s"


def _cpu(c) -> str:
    if not c:
        return "-"
    return f"{c['senders']:.2f} / {c['vcpus']:.2f}"


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


ROWS = [
    ("ports (channels)", lambda r: _n(r.get("ports"))),
    ("vcpus", lambda r: _n(r.get("vcpus"))),
    ("senders", lambda r: _n(r.get("senders"))),
    ("workload", lambda r: r.get("workload", "-")),
    ("sent", lambda r: _n(r.get("sent"))),
    ("delivered", lambda r: _n(r.get("delivered"))),
    ("coalesced", lambda r: _n(r.get("coalesced"))),
    ("destroyed by close", lambda r: _n(r.get("destroyed_by_close"))),
    ("delivered/s (racing)", lambda r: _rate(r.get("delivered_per_s"))),
    ("CPU s/s senders/vcpus", lambda r: _cpu(r.get("race_cpu_per_s"))),
    ("C anchor delivered/s", lambda r: _rate((r.get("c_anchor") or {}).get("delivered_per_s"))),
    ("C anchor CPU s/s", lambda r: _cpu((r.get("c_anchor") or {}).get("cpu_per_s"))),
    ("delivered/s / C's", lambda r: _ratio((r.get("c_anchor") or {}).get("python_over_c"))),
    ("latency p50", lambda r: _us(r.get("latency_ns", {}).get("p50"))),
    ("latency p99", lambda r: _us(r.get("latency_ns", {}).get("p99"))),
    ("latency p99.9", lambda r: _us(r.get("latency_ns", {}).get("p99.9"))),
    ("latency max", lambda r: _us(r.get("latency_ns", {}).get("max"))),
    (
        "fairness (Jain)",
        lambda r: "-" if r.get("fairness_jain") is None else f"{r['fairness_jain']:.3f}",
    ),
    (
        "worst wait",
        lambda r: (
            _us(r.get("worst_wait_ns"))
            + (f" (port {r['worst_wait_port']})" if r.get("worst_wait_port") is not None else "")
        ),
    ),
    ("mapped pages", lambda r: _n(r.get("mapped_pages"))),
    (
        "chaos ops",
        lambda r: (
            "-"
            if not r.get("chaos_ops")
            else "{masks} mask, {moves} move, {priority_changes} prio, {closes} close".format(
                **r["chaos_ops"]
            )
        ),
    ),
    (
        "resets (EAGAIN/EBUSY)",
        lambda r: (
            "-"
            if not r.get("resets")
            else "{resets} ({eagain}/{ebusy}), {rebinds} re-binds".format(**r["resets"])
        ),
    ),
    (
        "destroyed by reset",
        lambda r: "-" if not r.get("resets") else _n(r["resets"]["destroyed"]),
    ),
    ("accounting", lambda r: r.get("accounting", "-")),
    ("quiescent checks", lambda r: _n(r.get("epochs"))),
    (
        "setup / race / wall",
        lambda r: (
            f"{r.get('setup_s', 0):.1f} / {r.get('race_s', 0):.1f} / {r.get('wall_s', 0):.1f} s"
        ),
    ),
    ("violations", lambda r: _n(sum(r.get("violation_counts", {}).values()))),
    ("verdict", lambda r: r.get("verdict", "-").upper()),
]


ANCHOR_ROWS = ("C anchor delivered/s", "C anchor CPU s/s", "delivered/s / C's")


def table(records: list[dict]) -> str:
    head = ["abi"] + [r["abi"] for r in records]
    anchor = any(r.get("c_anchor") for r in records)  # --beside-c: its rows too
    rows = [head] + [
        [name] + [fmt(r) for r in records]
        for name, fmt in ROWS
        if anchor or name not in ANCHOR_ROWS
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def violations_text(records: list[dict], replay: dict) -> str:
    out = []
    for r in records:
        vs = r.get("violations", [])
        counts = r.get("violation_counts", {})
        if not vs and not r.get("error"):
            continue
        if r.get("error"):
            out.append(f"[{r['abi']}] worker failure: {r['error']}")
        if vs:
            total = sum(counts.values())
            out.append(
                f"[{r['abi']}] {total} violation(s) "
                f"({', '.join(f'{k} {n}' for k, n in sorted(counts.items()))}), "
                f"seed {r['seed']}:"
            )
            for v in vs:
                where = []
                if v.get("port") is not None:
                    where.append(f"port {v['port']}")
                if v.get("vcpu") is not None:
                    where.append(f"vcpu {v['vcpu']}")
                out.append(
                    f"  {v['kind']}: {', '.join(where) or '-'}, seed {r['seed']}: "
                    f"{v['detail']} [{v['phase']}]"
                )
            shown = len(vs)
            if total > shown:
                out.append(f"  ... and {total - shown} more")
            out.append(f"  replay: {replay[r['abi']]}")
    return "\n".join(out)


def write_json(
    path: str, records: list[dict], machine: dict, versions: dict, argv: list[str], exit_code: int
) -> None:
    doc = {
        "tool": "evtchn stress",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m stress " + " ".join(argv),
        "machine": machine,
        "versions": versions,
        "exit_code": exit_code,
        "runs": records,
    }
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=2, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)


def _jsonable(x):
    try:
        import numpy as np

        if isinstance(x, np.integer):
            return int(x)
        if isinstance(x, np.floating):
            return float(x)
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:
        pass
    if isinstance(x, (set, tuple)):
        return list(x)
    return str(x)
