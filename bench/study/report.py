"""DIR/report.md (and its PNGs) from a results.json document: reads on its own.

Layout: how it was run (command, machine, versions, wall time, load), the decision section
(decisions.py), then one section per experiment: what was run, the command that reproduces
one configuration, its tables and plots, and its failures.
"""

from __future__ import annotations

import traceback
from pathlib import Path

from . import decisions as D
from . import plots
from .experiments import INTERNAL, ORDER, module


def build(doc: dict, out_dir: Path) -> bool:
    """Write report.md and the plots into out_dir; returns True if anything failed."""
    from .cli import Options

    out_dir = Path(out_dir)
    meta = doc.get("study", {})
    opts = Options.from_dict(meta.get("options") or {})
    entries: dict[str, list] = {}
    for e in doc.get("configs", {}).values():
        entries.setdefault(e["experiment"], []).append(e)
    names = [n for n in ORDER + INTERNAL if n in entries or n in meta.get("experiments", [])]
    summaries, errors, failed_any = {}, {}, False
    for name in names:
        es = entries.get(name, [])
        if any(e.get("status") != "ok" for e in es) or not es:
            failed_any = True
        try:
            summaries[name] = module(name).summarize(es, opts)
        except Exception:
            errors[name] = traceback.format_exc(limit=4)
            failed_any = True
    metrics: dict = {}
    for s in summaries.values():
        metrics.update(s.metrics)
    note = _plot_note(doc)
    lines = _head(doc, meta)
    lines += _decisions(metrics)
    for name in names:
        lines += _section(
            name,
            entries.get(name, []),
            summaries.get(name),
            errors.get(name),
            opts,
            out_dir,
            note,
            meta,
        )
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    return failed_any


def _plot_note(doc) -> str:
    m, v = doc.get("machine", {}), doc.get("versions", {})
    return (
        f"{m.get('cpu_model', '?')}, {m.get('cpus', '?')} CPUs, evtchn {v.get('git_commit', '?')}"
    )


def _head(doc, meta) -> list[str]:
    m, v = doc.get("machine", {}), doc.get("versions", {})
    load = meta.get("load", {})
    cfgs = doc.get("configs", {})
    nfail = sum(1 for e in cfgs.values() if e.get("status") != "ok")
    lines = [
        "# The 2013 event-channel ABI question, measured",
        "",
        "Xen chose between the 3-level and the FIFO event-channel ABIs in 2013 without a "
        "measurement. This report measures every claim of that debate on evtchn (real shared "
        "memory, real racing processes) and derives its decisions from those measurements "
        "by the rules stated below.",
        "",
        f"Produced by: `{meta.get('command', '?')}`",
        "",
        f"- machine: {m.get('cpu_model', '?')}, {m.get('cpus', '?')} CPUs "
        f"({m.get('cpu_affinity', '?')} usable), {int(m.get('mem_total_kib', 0)) // 1024} MiB",
        f"- software: Python {v.get('python')}, numpy {v.get('numpy')}, numba {v.get('numba')}, "
        f"Cython {v.get('cython')}, dask {v.get('dask')}, matplotlib {v.get('matplotlib')}; "
        f"evtchn {v.get('git_commit')}; {v.get('platform')}",
        f"- ran: {meta.get('started', '?')} to {meta.get('finished', '?')}, "
        f"{meta.get('wall_s', '?')} s wall, on {meta.get('where', 'a saved results file')}",
        f"- load (1-minute average while running): min {load.get('loadavg_1min_min', '?')}, "
        f"median {load.get('loadavg_1min_median', '?')}, max {load.get('loadavg_1min_max', '?')} "
        f"on {load.get('cpus', '?')} CPUs - timings from a loaded machine are noisy; the "
        f"intervals below include that noise",
        f"- {len(cfgs)} configuration runs ({meta.get('seeds', '?')} seeds each; counts that no "
        f"seed changes, and feasibility runs, once), {nfail} failed"
        + (
            f"; {meta.get('kept_from_resume')} kept from an earlier run (--resume)"
            if meta.get("kept_from_resume")
            else ""
        ),
        "- every figure is a mean over the seeds with its 95% confidence interval "
        "(Student's t), written `mean ± half-width`",
        "",
    ]
    prev = meta.get("resumed_from")
    if isinstance(prev, dict):
        pl = prev.get("load") or {}
        lines += [
            f"The {meta.get('kept_from_resume')} configuration runs kept (--resume) come from "
            f"`{prev.get('command')}`: {prev.get('started')} to {prev.get('finished')}, "
            f"{prev.get('wall_s')} s wall, load min {pl.get('loadavg_1min_min')}, median "
            f"{pl.get('loadavg_1min_median')}, max {pl.get('loadavg_1min_max')}; this run "
            f"ran the others.",
            "",
        ]
    if meta.get("interrupted"):
        lines += ["**This study was interrupted: the figures are partial.**", ""]
    return lines


def _decisions(metrics) -> list[str]:
    lines = ["## Decisions", ""]
    lines += [
        "Each question is answered from the metrics named beside it: the winner has the best "
        "mean; *by how much* is its ratio to the runner-up; where their 95% intervals overlap "
        "the answer is *inside the noise* and lists every variant that overlaps the winner.",
        "",
        "| question | metric | winner and margin |",
        "|---|---|---|",
    ]
    for q in D.answer_questions(metrics):
        for i, c in enumerate(q["comparisons"]):
            qtext = q["question"].text if i == 0 else ""
            lines.append(
                f"| {qtext} | {c.metric.what} ({c.metric.better} is better) | {c.text()} |"
            )
    lines += ["", "### Recommendations", "", "Rules (applied to the measured numbers above):", ""]
    lines += [f"- {t}" for t in D.rules_text()]
    lines += [""]
    for r in D.recommend(metrics):
        choice = " / ".join(r["choice"]) or "no variant qualifies"
        lines.append(f"**{r['use_case'].name}: {choice}**")
        lines += [f"  - {s}" for s in r["steps"]]
        lines.append("")
    lines += [
        "The 3-level ABI was never merged into Xen (spec section 3): its figures are those of "
        "the design as evtchn models it.",
        "",
    ]
    return lines


def _section(name, es, summary, error, opts, out_dir, note, meta) -> list[str]:
    mod = module(name)
    ok = [e for e in es if e.get("status") == "ok"]
    bad = [e for e in es if e.get("status") != "ok"]
    status = "FAILED" if bad or error or not es else "passed"
    lines = [f"## {mod.TITLE}", ""]
    lines.append(f"Status: **{status}** ({len(ok)} of {len(es)} configuration runs passed).")
    lines += ["", mod.describe(opts), ""]
    if es:
        first = sorted(es, key=lambda e: e["config"])[0]["config"]
        lines += [
            "Reproduce one configuration:",
            "",
            f"    python -m bench study --report /tmp/one --only {name} --config '{first}' "
            f"--seeds 1" + (" --quick" if opts.quick else ""),
            "",
        ]
    if error:
        lines += ["The summary of this experiment failed:", "", "```", error.strip(), "```", ""]
    if summary is not None:
        for title, headers, rows, tnote in summary.tables:
            lines += [f"**{title}**", ""]
            lines += _table(headers, rows)
            if tnote:
                lines += ["", tnote]
            lines.append("")
        for curve in summary.curves:
            try:
                png = plots.draw(curve, out_dir, note)
            except Exception as exc:
                lines += [f"(plot {curve['name']} failed: {exc})", ""]
                continue
            if png:
                lines += [f"![{curve['title']}]({png})", ""]
        lines += [f"- {n}" for n in summary.notes]
        if summary.notes:
            lines.append("")
    if bad:
        lines += ["Failed configuration runs:", ""]
        for e in sorted(bad, key=lambda e: (e["config"], e["seed"])):
            reason = str(e.get("reason", "?")).replace("\n", " ")
            lines.append(f"- `{e['config']}` seed {e['seed']}: {reason}")
        lines.append("")
    return lines


def _table(headers, rows) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        out.append("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |")
    return out
