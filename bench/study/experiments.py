"""The experiments of the study, in report order, and what each module provides.

An experiment module has:
    NAME, TITLE           short name (--only) and heading
    DETERMINISTIC         True if its figures are counts that no seed changes (run once)
    configs(opts)         -> [Config]: what to run at opts.quick / full size
    run(params, seed)     -> dict of plain results (in the task's subprocess; raises
                          child.Failed to mark the configuration failed with a reason)
    summarize(entries, opts) -> Summary from every entry (finished or failed) of it
    describe(opts)        -> markdown: what was run and how
"""

from __future__ import annotations

import dataclasses
import importlib

ORDER = ("capacity", "density", "memory", "lockout", "timer", "scaling", "cost")
INTERNAL = ("selftest",)  # used by the test suite only (runner behaviour)
MODULES = {name: f"bench.study.exp_{name}" for name in ORDER + INTERNAL}


def module(name: str):
    return importlib.import_module(MODULES[name])


@dataclasses.dataclass
class Config:
    name: str  # unique within the experiment, e.g. "2l-64/practical"
    params: dict
    timeout: float = 600.0  # seconds before the task is killed and reported failed
    reps: int | None = None  # repetitions whatever --seeds says (a feasibility run: 1)


@dataclasses.dataclass
class Summary:
    """What the report shows for one experiment and what the decisions read from it."""

    tables: list = dataclasses.field(default_factory=list)  # (title, headers, rows, note)
    curves: list = dataclasses.field(default_factory=list)  # plot specs (plots.py)
    metrics: dict = dataclasses.field(default_factory=dict)  # id -> {variant: [values]}
    notes: list = dataclasses.field(default_factory=list)


def by_config(entries) -> dict:
    """{config name: [result of each finished seed]} for entries with status ok."""
    out: dict = {}
    for e in entries:
        if e.get("status") == "ok":
            out.setdefault(e["config"], []).append(e["result"])
    return out


def config_state(entries, name: str) -> str:
    """'ok' if some seed of configuration `name` finished, 'failed' if all that ran failed,
    'not run' if none ran (filtered out with --config, or still to come)."""
    states = [e.get("status") for e in entries if e["config"] == name]
    if not states:
        return "not run"
    return "ok" if "ok" in states else "failed"
