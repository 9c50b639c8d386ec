"""The decision section: the thread's questions answered from the measured metrics, and the
recommendations per use case, each derived by a stated rule. Nothing here is a figure: every
number comes from an experiment's Summary.metrics ({metric: {variant: [value per seed]}}).

A comparison takes each variant's mean and 95% confidence interval. The winner has the best
mean; the runner-up the next; "by how much" is their ratio. When the winner's interval overlaps
the runner-up's the answer says "inside the noise" and names every variant whose interval
overlaps the winner's.
"""

from __future__ import annotations

import dataclasses

from .stats import Estimate, estimate

HIGHER, LOWER = "higher", "lower"


@dataclasses.dataclass(frozen=True)
class Metric:
    id: str
    what: str
    unit: str
    better: str
    exact: bool = False  # a count no seed changes: equal values tie, no interval needed


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    text: str
    metrics: tuple  # metric ids, the first decides


def _m(*args, **kw) -> Metric:
    return Metric(*args, **kw)


METRICS = {
    m.id: m
    for m in (
        _m("guests_practical", "guests per dom0 (practical, exp. 1)", "guests", HIGHER, True),
        _m("density_held", "share of the 25k-guest host set up (exp. 2)", "", HIGHER, True),
        _m("density_events_per_s", "events/s on the dense host (exp. 2)", "ev/s", HIGHER),
        _m(
            "density_pages_per_guest",
            "pages Xen maps per guest on the dense host (exp. 2)",
            "pages",
            LOWER,
            True,
        ),
        _m("pages_typical_domu", "pages mapped for a typical domU (exp. 3)", "pages", LOWER, True),
        _m("pages_4k_ports", "pages mapped with 4095 ports (exp. 3)", "pages", LOWER, True),
        _m(
            "lockout_worst_deliveries",
            "victim's worst wait, in other deliveries (exp. 4)",
            "deliveries",
            LOWER,
        ),
        _m(
            "lockout_fix",
            "2l victim's worst wait: scan from port 0 vs resume (exp. 4)",
            "deliveries",
            LOWER,
        ),
        _m("lockout_mean_ns", "victim's mean wait, worst placement (exp. 4)", "ns", LOWER),
        _m(
            "timer_deliveries_before",
            "deliveries before the timer, worst storm (exp. 5)",
            "deliveries",
            LOWER,
        ),
        _m("timer_delay_ns", "timer delay, worst storm (exp. 5)", "ns", LOWER),
        _m(
            "throughput_events_per_s", "events/s delivered, stress harness (exp. 6)", "ev/s", HIGHER
        ),
        _m("latency_p50_ns", "send-to-handler latency p50 (exp. 6)", "ns", LOWER),
        _m(
            "cost_kernels_ns",
            "CPU ns per event, send + delivery, kernels alone (exp. 7)",
            "ns",
            LOWER,
        ),
        _m(
            "cost_stream_ns",
            "CPU ns per event, send + delivery, in the stream (exp. 7)",
            "ns",
            LOWER,
        ),
    )
}

QUESTIONS = (
    Question("capacity", "How many guests can one dom0 serve?", ("guests_practical",)),
    Question(
        "density",
        "Can one host run 25,000 unikernels, and how fast do their events flow?",
        ("density_held", "density_events_per_s", "density_pages_per_guest"),
    ),
    Question(
        "memory",
        "How much memory does Xen map per domain?",
        ("pages_typical_domu", "pages_4k_ports"),
    ),
    Question(
        "lockout",
        "Can clusters of events lock out others (where they are, how many)?",
        ("lockout_worst_deliveries", "lockout_mean_ns", "lockout_fix"),
    ),
    Question(
        "timer",
        "Is the timer served promptly under a storm of other events?",
        ("timer_deliveries_before", "timer_delay_ns"),
    ),
    Question(
        "performance",
        "Which one gives better performance? (the thread's own question)",
        ("throughput_events_per_s", "latency_p50_ns"),
    ),
    Question(
        "cost", "What does one event cost in CPU time?", ("cost_kernels_ns", "cost_stream_ns")
    ),
)


@dataclasses.dataclass
class Comparison:
    """The ranking of the variants on one metric.

    tied: the winner and every variant that cannot be told apart from it - equal values for an
    exact metric, overlapping 95% intervals otherwise. noise: they were told apart by nothing
    but noise. unjudged: a timed metric with a single repetition (no interval): the ranking is
    by the means alone."""

    metric: Metric
    estimates: dict  # variant -> Estimate
    winner: str | None = None
    runner_up: str | None = None
    ratio: float | None = None
    tied: tuple = ()
    noise: bool = False
    unjudged: bool = False

    def text(self) -> str:
        if self.winner is None:
            return "no measurement"
        e = self.estimates
        if len(e) == 1:
            return f"{self.winner} ({_v(e[self.winner])}), the only variant measured"
        if len(self.tied) > 1:
            why = "their 95% intervals overlap: inside the noise" if self.noise else "equal"
            head = f"tie between {', '.join(self.tied)} ({_v(e[self.winner])}; {why})"
        else:
            head = f"{self.winner} ({_v(e[self.winner])})"
        if self.runner_up is not None:
            head += (
                f", ahead of {self.runner_up} ({_v(e[self.runner_up])}): "
                f"{_ratio_text(self.ratio, self.metric.better, e, self)}"
            )
        if self.unjudged:
            head += " (one repetition: no interval, the noise is not judged)"
        return head


def _v(e: Estimate) -> str:
    from .stats import fmt

    return fmt(e)


def _ratio_text(ratio, better, ests, c) -> str:
    """winner / runner-up as 'N.NNx higher' (or lower, for lower-is-better metrics), with the
    difference itself when the ratio rounds to 1.00x."""
    if ratio is None:
        return f"{_v(ests[c.winner])} against {_v(ests[c.runner_up])}"
    if ratio <= 0:
        return "the winner's figure is 0"
    s = f"{ratio:.2f}x higher" if better == HIGHER else f"{1 / ratio:.2f}x lower"
    if round(ratio, 2) == 1.0 or round(1 / ratio, 2) == 1.0:
        diff = abs(ests[c.winner].mean - ests[c.runner_up].mean)
        s += f" (a difference of {diff:.4g} {c.metric.unit})".replace(" )", ")")
    return s


def compare(metric: Metric, values: dict) -> Comparison:
    ests = {v: e for v, e in ((v, estimate(xs)) for v, xs in values.items()) if e is not None}
    c = Comparison(metric, ests)
    if not ests:
        return c
    sign = 1 if metric.better == HIGHER else -1
    order = sorted(ests, key=lambda v: (-sign * ests[v].mean, v))
    c.winner = order[0]
    w = ests[c.winner]
    if metric.exact:
        c.tied = tuple(v for v in order if ests[v].mean == w.mean)
    else:
        c.unjudged = any(e.n < 2 for e in ests.values())
        c.tied = (
            tuple(v for v in order if ests[v].overlaps(w))
            if not c.unjudged
            else (tuple(v for v in order if ests[v].mean == w.mean))
        )
        c.noise = len(c.tied) > 1 and not c.unjudged
    rest = [v for v in order if v not in c.tied]
    if rest:
        c.runner_up = rest[0]
        r = ests[c.runner_up].mean
        c.ratio = (w.mean / r) if r else None
    return c


def answer_questions(metrics: dict) -> list[dict]:
    out = []
    for q in QUESTIONS:
        comps = [compare(METRICS[m], metrics.get(m, {})) for m in q.metrics]
        out.append({"question": q, "comparisons": comps})
    return out


# --- recommendations ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UseCase:
    id: str
    name: str
    require: tuple  # (metric id, op, threshold, text)
    prefer: tuple  # metric ids, in order: the next breaks a tie (overlapping CIs) in the last


USE_CASES = (
    UseCase(
        "vdi",
        "A VDI dom0 with 500+ guests",
        (("guests_practical", ">=", 500, "serve at least 500 guests (exp. 1, practical)"),),
        ("throughput_events_per_s", "lockout_worst_deliveries", "cost_kernels_ns"),
    ),
    UseCase(
        "unikernels",
        "25,000 unikernels on one host",
        (("density_held", ">=", 1.0, "set up the whole 25k-guest host in every run (exp. 2)"),),
        ("density_events_per_s", "density_pages_per_guest", "cost_kernels_ns"),
    ),
    UseCase(
        "domu",
        "A typical domU",
        (),
        ("pages_typical_domu", "cost_kernels_ns", "timer_deliveries_before"),
    ),
)


def recommend(metrics: dict) -> list[dict]:
    out = []
    for uc in USE_CASES:
        steps = []
        cands = None
        for mid, op, thr, text in uc.require:
            vals = metrics.get(mid, {})
            ok = []
            for v, xs in vals.items():
                e = estimate(xs)
                if e is not None and (min(xs) >= thr if op == ">=" else max(xs) <= thr):
                    ok.append(v)
            cands = set(ok) if cands is None else cands & set(ok)
            steps.append(f"must {text}: {', '.join(sorted(ok)) or 'none'}")
        for mid in uc.prefer:
            vals = metrics.get(mid, {})
            pool = {v: xs for v, xs in vals.items() if cands is None or v in cands}
            c = compare(METRICS[mid], pool)
            if c.winner is None:
                steps.append(f"{METRICS[mid].what}: not measured for the candidates, skipped")
                continue
            steps.append(f"prefer {METRICS[mid].better} {METRICS[mid].what}: {c.text()}")
            cands = set(c.tied)
            if len(cands) == 1:
                break
        choice = sorted(cands) if cands else []
        out.append({"use_case": uc, "choice": choice, "steps": steps})
    return out


def rules_text() -> list[str]:
    lines = []
    for uc in USE_CASES:
        req = "; ".join(t for _, _, _, t in uc.require)
        keep = f"keep the variants that {req}" if req else "every variant qualifies"
        pref = " then ".join(f"{METRICS[m].better} {METRICS[m].what}" for m in uc.prefer)
        lines.append(
            f"**{uc.name}**: {keep}; among them prefer {pref}. A "
            f"preference decides only where the best variant's 95% interval overlaps no "
            f"other's; otherwise the overlapping ones go on to the next preference."
        )
    return lines
