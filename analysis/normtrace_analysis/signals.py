"""Findings about the signals table (trace format 2): do gradients explode or vanish, do units die, is a
layer's update ratio far from the usual 1e-3, and do gradient spikes go with output spikes and events?

Each finding is computed from the data with a fixed, documented threshold (docs/analysis.md, "Signals")
and written as a sentence that names the layer and the figures, so a report can list them as they are.
Levels are medians over a *part* of the run, the first or the last ``tail`` of its steps (a tenth by
default): a median of a few hundred steps is not moved by a spike, and "the last tenth" is where a
diagnosis of the trained network belongs; "the first tenth" is what growth or decay is measured from.
Ranks are pooled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from .alignment import TOLERANCE, check_event, spike_clusters

if TYPE_CHECKING:
    from .trace import Trace

__all__ = [
    "DEAD_HIGH",
    "DEAD_RISE",
    "GROWTH_ORDERS",
    "SIGNIFICANT",
    "SPREAD_ORDERS",
    "TAIL",
    "UPDATE_BAND",
    "UPDATE_TYPICAL",
    "signal_findings",
]

TAIL = 0.1
"""Share of a run's steps (its first and its last) over which levels are medians."""

GROWTH_ORDERS = 2.0
"""A gradient norm whose last-tenth median is at least 10**2 times its first-tenth median explodes (at
most 10**-2 times: vanishes). Gradient norms drift by a factor of a few in healthy training (they fall as
the loss falls, grow as a DQN's targets grow); a hundredfold is beyond drift."""

SPREAD_ORDERS = 3.0
"""Layers' gradient norms at the same step spanning at least 10**3 (the median over the last tenth of the
steps of max/min across layers, each layer the root-sum-square of its parameters' norms): layers of one
network differ by their size and place, by one or two orders; three orders means that one end of the
network learns while the other is frozen or blowing up."""

DEAD_HIGH = 0.5
"""A layer whose median dead fraction over the last tenth of the steps is at least this has lost at
least half of its units: they output zero on every sample of a batch, so they no longer learn."""

DEAD_RISE = 0.25
"""A layer whose dead fraction rose by at least this (last tenth minus first tenth) is dying, even when
fewer than half of its units are dead yet."""

UPDATE_TYPICAL = 1e-3
"""The rule of thumb for ‖Δθ‖/‖θ‖ per step (Karpathy's "about 1e-3"): each step moves a weight by a
thousandth of itself."""

UPDATE_BAND = (1e-4, 1e-2)
"""An order of magnitude either side of :data:`UPDATE_TYPICAL`. A median update ratio over the last
tenth of the steps outside it says the learning rate is far too high (above: a layer rewritten every
hundred steps) or far too low (below: it barely moves) for that layer."""

SIGNIFICANT = 0.05
"""The q-value below which gradient spikes count as following an event."""

_SCHEMA = pl.Schema(
    {
        "run": pl.String(),
        "finding": pl.String(),
        "kind": pl.String(),
        "module": pl.String(),
        "param": pl.String(),
        "value": pl.Float64(),
        "sentence": pl.String(),
    }
)


def signal_findings(
    trace: Trace, *, event: str | Sequence[str] | None = None, tail: float = TAIL
) -> pl.DataFrame:
    """The findings about the trace's signals, one row each, strongest kinds first.

    Args:
        trace: the loaded runs (its filters apply); it must have a signals table.
        event: an event name (e.g. ``"target_update"``), or several, whose alignment with gradient-norm
            spikes is tested (:func:`.alignment.event_alignment` on the signals, ``grad_norm`` only); an
            event no run recorded raises :class:`MissingEventError`, as the alignment does; None: none.
        tail: share of each run's steps whose median is a level (first and last part of the run).

    Returns:
        Columns ``run``, ``finding`` ("explode", "vanish", "spread", "dead", "update_high",
        "update_low", "spikes_with_outputs", "spikes_after_event"), the series' ``kind``, ``module``,
        ``param`` (null where a finding is about a layer or the model), ``value`` (the figure: growth
        factor, orders of magnitude, dead fraction, median ratio, share of excursions; for an event, the
        q-value) and ``sentence``. Empty when nothing is found. Memoised per Trace.

    Example:
        ``for s in trace.signal_findings(event="target_update")["sentence"]: print(s)``
    """
    if not 0 < tail <= 0.5:
        raise ValueError(f"tail must be in (0, 0.5], got {tail}")
    trace.require("signals")  # the missing table first: it is why no event could be tested
    events = () if event is None else (event,) if isinstance(event, str) else tuple(dict.fromkeys(event))
    for name in events:
        check_event(trace, name)
    return trace.cached(("signal_findings", events, tail), lambda: _findings(trace, events, tail))


def _findings(trace: Trace, events: tuple[str, ...], tail: float) -> pl.DataFrame:
    levels = _levels(trace, tail)
    runs = len(trace.runs)  # with several, each sentence names its run
    parts = [
        _growth(levels, tail, runs),
        _spread(trace, tail, runs),
        _dead(levels, tail, runs),
        _updates(levels, tail, runs),
        _with_outputs(trace, runs),
    ]
    parts.extend(_after_event(trace, e) for e in events)
    found = [p.select(list(_SCHEMA)).cast(_SCHEMA) for p in parts if p.height]
    return pl.concat(found) if found else pl.DataFrame(schema=_SCHEMA)


def _parts(lf: pl.LazyFrame, tail: float) -> pl.LazyFrame:
    """Rows tagged ``part`` "first" or "last": in the first or last ``tail`` of their run's steps."""
    lo, hi = pl.col("step").min().over("run"), pl.col("step").max().over("run")
    span = (hi - lo).cast(pl.Float64) * tail
    part = (
        pl.when(pl.col("step") >= hi - span)
        .then(pl.lit("last"))
        .when(pl.col("step") <= lo + span)
        .then(pl.lit("first"))
    )
    return lf.with_columns(part.alias("part")).filter(pl.col("part").is_not_null())


def _levels(trace: Trace, tail: float) -> pl.DataFrame:
    """Per run, kind, module and param: the median of finite values in the first and the last part, the
    count of non-finite values and the first step with one."""
    lf = trace.signals.with_columns(pl.col("value").cast(pl.Float64))
    finite = pl.col("value").is_finite()
    keys = ["run", "kind", "module", "param"]
    medians = (
        _parts(lf, tail)
        .filter(finite)
        .group_by(*keys, "part")
        .agg(pl.col("value").median().alias("median"))
        .collect()
        .pivot("part", index=keys, values="median")
    )
    for part in ("first", "last"):
        if part not in medians.columns:
            medians = medians.with_columns(pl.lit(None, pl.Float64).alias(part))
    bad = (
        lf.filter(~finite)
        .group_by(keys)
        .agg(pl.len().alias("nonfinite"), pl.col("step").min().alias("first_bad"))
        .collect()
    )
    return medians.join(bad, on=keys, how="full", coalesce=True, nulls_equal=True).with_columns(
        pl.col("nonfinite").fill_null(0)
    )


def _where(module: str, param: str | None) -> str:
    """A series' place as a sentence names it: ``net.2.weight``, ``net.2``, or "the whole model"."""
    return ".".join(p for p in (module, param) if p) or "the whole model"


def _run_prefix(run: str, runs: int) -> str:
    """How a sentence starts when several runs are loaded: the run's name."""
    return f"{run}: " if runs > 1 else ""


def _growth(levels: pl.DataFrame, tail: float, runs: int) -> pl.DataFrame:
    """Gradient norms (of parameters and of module outputs) that grow or decay by GROWTH_ORDERS or
    more from the first part to the last, or become non-finite."""
    rows = []
    grads = levels.filter(pl.col("kind").is_in(["grad_norm", "output_grad_norm"]))
    for r in grads.iter_rows(named=True):
        what = "gradient norm" if r["kind"] == "grad_norm" else "output-gradient norm"
        name = f"{_run_prefix(r['run'], runs)}the {what} of {_where(r['module'], r['param'])}"
        first, last = r["first"], r["last"]
        if r["nonfinite"]:
            rows.append(
                (
                    r,
                    "explode",
                    math.inf,
                    f"{name} is not finite (NaN or Inf) at {r['nonfinite']} step(s), "
                    f"the first at step {r['first_bad']}: the gradients exploded",
                )
            )
            continue
        if first is None or last is None or first <= 0 or last <= 0:
            continue
        orders = math.log10(last / first)
        if orders >= GROWTH_ORDERS:
            rows.append(
                (
                    r,
                    "explode",
                    last / first,
                    f"{name} grew {_factor(last / first)} from the first "
                    f"{_share(tail)} of the steps to the last ({_num(first)} to {_num(last)}, medians): the "
                    "gradients explode",
                )
            )
        elif orders <= -GROWTH_ORDERS:
            rows.append(
                (
                    r,
                    "vanish",
                    last / first,
                    f"{name} fell {_factor(first / last)} from the first "
                    f"{_share(tail)} of the steps to the last ({_num(first)} to {_num(last)}, medians): the "
                    "gradients vanish",
                )
            )
    return _frame(rows)


def _spread(trace: Trace, tail: float, runs: int) -> pl.DataFrame:
    """Layers whose gradient norms at the same step span SPREAD_ORDERS or more orders of magnitude."""
    per_layer = (
        _parts(trace.signals.filter((pl.col("kind") == "grad_norm") & (pl.col("module") != "")), tail)
        .filter((pl.col("part") == "last") & pl.col("value").is_finite() & (pl.col("value") > 0))
        .group_by("run", "rank", "step", "module")
        .agg((pl.col("value").cast(pl.Float64) ** 2).sum().sqrt().alias("norm"))
        .collect()
    )
    if per_layer.is_empty():
        return _frame([])
    per_step = (
        per_layer.group_by("run", "rank", "step")
        .agg((pl.col("norm").max() / pl.col("norm").min()).log10().alias("orders"), pl.len().alias("layers"))
        .filter(pl.col("layers") > 1)
        .group_by("run")
        .agg(pl.col("orders").median())
    )
    typical = per_layer.group_by("run", "module").agg(pl.col("norm").median())
    rows = []
    for run, orders in per_step.iter_rows():
        if orders is None or orders < SPREAD_ORDERS:
            continue
        mine = typical.filter(pl.col("run") == run).sort("norm")
        low, high = mine.row(0, named=True), mine.row(-1, named=True)
        sentence = (
            f"{_run_prefix(run, runs)}the layers' gradient norms span {orders:.1f} orders of magnitude at "
            f"the same step (median over the last {_share(tail)} of the steps): {_where(high['module'], None)} "
            f"{_num(high['norm'])}, {_where(low['module'], None)} {_num(low['norm'])}; one end of the "
            "network gets almost no gradient"
        )
        rows.append(
            ({"run": run, "kind": "grad_norm", "module": None, "param": None}, "spread", orders, sentence)
        )
    return _frame(rows)


def _dead(levels: pl.DataFrame, tail: float, runs: int) -> pl.DataFrame:
    """Layers whose dead fraction is high (DEAD_HIGH) or rising (DEAD_RISE)."""
    rows = []
    for r in levels.filter(pl.col("kind") == "dead_fraction").iter_rows(named=True):
        first, last = r["first"], r["last"]
        if last is None:
            continue
        rise = None if first is None else last - first
        if last < DEAD_HIGH and (rise is None or rise < DEAD_RISE):
            continue
        name = f"{_run_prefix(r['run'], runs)}{_where(r['module'], r['param'])}"
        since = (
            f", up from {first:.0%} in the first {_share(tail)}"
            if rise is not None and rise >= DEAD_RISE
            else ""
        )
        verdict = "its units die" if last < DEAD_HIGH else "most of its units are dead"
        rows.append(
            (
                r,
                "dead",
                last,
                f"{name}: {last:.0%} of its units are dead (zero on the whole batch; median "
                f"over the last {_share(tail)} of the steps){since}: {verdict}",
            )
        )
    return _frame(rows)


def _updates(levels: pl.DataFrame, tail: float, runs: int) -> pl.DataFrame:
    """Parameters whose median update ratio over the last part is outside UPDATE_BAND."""
    rows = []
    lo, hi = UPDATE_BAND
    for r in levels.filter(pl.col("kind") == "update_ratio").iter_rows(named=True):
        last = r["last"]
        if last is None or lo <= last <= hi:
            continue
        name = f"{_run_prefix(r['run'], runs)}{_where(r['module'], r['param'])}"
        band = f"the usual {_num(lo)}–{_num(hi)} around {_num(UPDATE_TYPICAL)}"
        if last > hi:
            what, why = (
                "update_high",
                "each step rewrites a large part of it: the learning rate is too high for it",
            )
        elif last > 0:
            what, why = "update_low", "it barely moves: the learning rate is too low for it, or it is frozen"
        else:
            what, why = "update_low", "it does not move at all: frozen, or its gradient is zero"
        rows.append(
            (
                r,
                what,
                last,
                f"{name}: update ratio ‖Δθ‖/‖θ‖ {_num(last)} per step (median over the last "
                f"{_share(tail)} of the steps), outside {band}; {why}",
            )
        )
    return _frame(rows)


def _with_outputs(trace: Trace, runs: int) -> pl.DataFrame:
    """Per gradient-norm series with excursions: how many start within TOLERANCE passes of an excursion
    of any output norm of its run and rank, against the chance of that for a random pass."""
    if not trace.shards("outputs"):
        return _frame([])
    grads = spike_clusters(trace.of_kind("grad_norm"), "signals") if _has_kind(trace, "grad_norm") else None
    if grads is None or grads.is_empty():
        return _frame([])
    outs = spike_clusters(trace, "outputs")
    spans = (
        trace.signals.filter(pl.col("kind") == "grad_norm")
        .group_by("run", "rank")
        .agg(pl.col("pass").min().alias("lo"), pl.col("pass").max().alias("hi"))
        .collect()
    )
    tol = TOLERANCE["pass"]
    rows = []
    for (run, rank, kind, module, param), part in grads.group_by(
        "run", "rank", "kind", "module", "param", maintain_order=True
    ):
        onsets = np.sort(
            outs.filter((pl.col("run") == run) & (pl.col("rank") == rank))["onset"]
            .to_numpy()
            .astype(np.int64)
        )
        mine = part["onset"].to_numpy().astype(np.int64)
        near = _near(mine, onsets, tol)
        span = spans.filter((pl.col("run") == run) & (pl.col("rank") == rank))
        lo, hi = int(span["lo"][0]), int(span["hi"][0])
        chance = _coverage(onsets, tol, lo, hi)
        share = float(near.mean())
        name = f"{_run_prefix(str(run), runs)}the gradient norm of {_where(str(module), param)}"
        if not len(onsets):
            sentence = f"{name} has {len(mine)} excursion(s); the output norms have none"
        else:
            verdict = (
                "they go together"
                if share >= 0.5 and share >= 3 * chance
                else "no more than chance"
                if share <= 1.5 * chance
                else "somewhat more than chance"
            )
            sentence = (
                f"{name}: {int(near.sum())} of its {len(mine)} excursion(s) start within {tol} passes of an "
                f"output-norm excursion (chance {chance:.1%}): {verdict}"
            )
        key = {"run": run, "kind": kind, "module": module, "param": param}
        rows.append((key, "spikes_with_outputs", share, sentence))
    return _frame(rows)


def _after_event(trace: Trace, event: str) -> pl.DataFrame:
    """Gradient-norm series whose spikes follow ``event`` (event alignment on the signals, q < 0.05)."""
    if not _has_kind(trace, "grad_norm"):
        return _frame([])
    aligned = trace.of_kind("grad_norm").event_alignment(event, table="signals")
    found = aligned.filter(pl.col("q_value") < SIGNIFICANT).sort("p_value")
    rows = [
        (r, "spikes_after_event", r["q_value"], f"gradient spikes follow {event}: {r['finding']}")
        for r in found.iter_rows(named=True)
    ]
    return _frame(rows)


def _has_kind(trace: Trace, kind: str) -> bool:
    return kind in trace.signal_kinds()


def _near(onsets: np.ndarray, others: np.ndarray, tol: int) -> np.ndarray:
    """Whether each onset has one of the sorted ``others`` within ``tol``."""
    if not len(others):
        return np.zeros(len(onsets), dtype=bool)
    i = np.searchsorted(others, onsets - tol, "left")
    return (i < len(others)) & (others[np.minimum(i, len(others) - 1)] <= onsets + tol)


def _coverage(onsets: np.ndarray, tol: int, lo: int, hi: int) -> float:
    """Share of the passes lo..hi within ``tol`` of one of the sorted ``onsets``: the chance that a pass
    drawn at random is "near an output excursion"."""
    if hi < lo or not len(onsets):
        return 0.0
    covered = np.zeros(hi - lo + 1, dtype=bool)
    for a in onsets:
        covered[max(int(a) - tol - lo, 0) : max(int(a) + tol - lo + 1, 0)] = True
    return float(covered.mean())


def _frame(rows: list[tuple[dict[str, Any], str, float, str]]) -> pl.DataFrame:
    """Findings as rows of the findings frame: (series keys, finding, value, sentence) each."""
    data = [
        (r["run"], finding, r["kind"], r["module"], r["param"], float(value), sentence)
        for r, finding, value, sentence in rows
    ]
    return pl.DataFrame(data, schema=_SCHEMA, orient="row")


def _factor(x: float) -> str:
    """A growth factor as a sentence gives it: ``1,000-fold`` below a million, ``10^7-fold`` above."""
    return f"{x:,.0f}-fold" if x < 1e6 else f"10^{math.log10(x):.0f}-fold"


def _num(x: float) -> str:
    return f"{x:.3g}"


def _share(tail: float) -> str:
    """The part of the run a level is taken over, as a sentence says it: "tenth", or "20%"."""
    return "tenth" if math.isclose(tail, 0.1) else f"{tail:.0%}"
