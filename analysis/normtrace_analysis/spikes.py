"""Spike detection on each module's norm series, and whether spikes cluster right after an event.

Detector (a Hampel filter): for every series (run, rank, module, split for outputs; run, rank, module,
param for params), ordered by pass, the baseline is the centred rolling median of ``baseline_window``
points and the scale the rolling median of absolute deviations from it (the rolling MAD, times 1.4826
so that it estimates a standard deviation for Gaussian noise). A point is flagged when
``|value - baseline| / scale > threshold``; NaN and ±Inf values are always flagged (score ±inf) and left
out of every baseline. Consecutive flagged points form one spike, reported at its peak (largest
``|score|``) with ``points`` = how many points it spans. Because the window is centred, a level shift is
absorbed into the baseline within half a window: it yields at most one short spike, never a spike per
point; an excursion shorter than half a window is a spike.

Event timing: events are recorded between passes with the last pass started, so at level "pass" an event
precedes a spike when ``spike.pass > event.pass``; at level "epoch" an event of epoch ``e`` (a DQN's
target sync right after ``tick_epoch``) precedes the spikes of epoch ``e`` and later.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import polars as pl

from .stats import binom_sf
from .trace import module_filter

if TYPE_CHECKING:
    from .trace import Trace

Level = Literal["pass", "epoch"]

THRESHOLD = 6.0
"""Default spike threshold in robust standard deviations. High because a pass-level series has ~1e5
points: at 6 MADs Gaussian noise yields ~2e-9 false flags per point, while real spikes (target syncs,
exploding activations) are typically tens of MADs."""

BASELINE_WINDOW: dict[str, int] = {"pass": 51, "epoch": 11}
"""Default rolling-window length (points) per level: about a CartPole episode of training passes, and
two target-sync periods of 5 epochs, so one sync's effect never dominates a window's median."""

EVENT_WINDOW: dict[str, int] = {"pass": 20, "epoch": 1}
"""Default ``event_alignment`` window per level: the 20 passes after an event (about 10 environment steps
of a DQN recording an acting and a training pass per step), or the epoch the event opens."""

MAD_TO_SIGMA = 1.4826
"""Scales a median absolute deviation to a standard deviation for Gaussian noise."""

SCALE_FLOOR = 1e-4
"""Smallest scale relative to the baseline, so a flat series (MAD 0) does not flag float rounding."""

SERIES_KEYS: dict[str, list[str]] = {
    "outputs": ["run", "rank", "module", "split"],
    "params": ["run", "rank", "module", "param"],
}
"""Columns identifying one series per table."""


def spikes(
    trace: Trace,
    table: Literal["outputs", "params"] = "outputs",
    level: Level = "pass",
    modules: Sequence[str] | str | None = None,
    threshold: float | None = None,
    baseline_window: int | None = None,
) -> pl.DataFrame:
    """Detected spikes, one row each, with the nearest preceding event (of any name).

    Columns: the series keys (``run``, ``rank``, ``module``, ``split`` or ``param``), ``pass`` (level
    "pass" only), ``epoch``, ``value``, ``baseline``, ``score`` (signed, in robust SDs; ±inf for NaN/Inf),
    ``points`` (consecutive flagged points merged into this spike), ``event``, ``event_pass``,
    ``event_epoch``, ``lag_passes`` (null at level "epoch"), ``lag_epochs`` (all null when no event
    precedes). ``level="epoch"`` works on per-epoch means. Results are memoised per Trace.
    """
    threshold = THRESHOLD if threshold is None else float(threshold)
    window = _check(table, level, baseline_window)
    key = ("spikes", table, level, _modules_key(modules), threshold, window)
    if key not in trace._cache:
        found = _detect(_series(trace, table, level, modules), table, level, threshold, window)
        trace._cache[key] = _attach_nearest_event(found, trace.events, table, level)
    return trace._cache[key]


def event_alignment(
    trace: Trace,
    event: str = "target_update",
    window: int | None = None,
    level: Level = "pass",
    *,
    table: Literal["outputs", "params"] = "outputs",
    modules: Sequence[str] | str | None = None,
    threshold: float | None = None,
    baseline_window: int | None = None,
) -> pl.DataFrame:
    """Per series, whether spikes fall right after ``event`` more often than chance.

    A spike is near an event when it lies within ``window`` units after one (level "pass": ``1 <=
    spike.pass - event.pass <= window``; level "epoch": ``0 <= spike.epoch - event.epoch < window``).
    ``expected_fraction`` is the share of the series' points inside those windows (what random placement
    would give), ``enrichment`` = observed / expected, ``p_value`` the exact binomial tail
    P(X >= near_event) for X ~ Binomial(spikes, expected_fraction). Columns: the series keys, ``events``,
    ``points``, ``spikes``, ``near_event``, ``observed_fraction``, ``expected_fraction``, ``enrichment``,
    ``p_value``, ``finding`` (one plain sentence). Defaults: :data:`EVENT_WINDOW`.
    """
    window = EVENT_WINDOW[level] if window is None else int(window)
    if window < 1:
        raise ValueError(f"window must be at least 1 {level}, got {window}")
    found = spikes(trace, table, level, modules, threshold, baseline_window)
    keys = SERIES_KEYS[table]
    events = (
        trace.events.filter(pl.col("name") == event)
        .select("run", "rank", "pass", "epoch")
        .collect()
        .sort("run", "rank", level)
    )
    coverage = _coverage(trace, table, level, modules, events, window)
    near = _near_counts(found, events, keys, level, window)
    rows = (
        coverage.join(near, on=keys, how="left", nulls_equal=True)
        .join(events.group_by("run", "rank").len("events"), on=["run", "rank"], how="left")
        .with_columns(pl.col("spikes", "near_event", "events").fill_null(0).cast(pl.Int64))
        .with_columns(
            pl.when(pl.col("spikes") > 0)
            .then(pl.col("near_event") / pl.col("spikes"))
            .alias("observed_fraction"),
            (pl.col("covered") / pl.col("points")).alias("expected_fraction"),
        )
        .with_columns(
            pl.when(pl.col("expected_fraction") > 0, pl.col("spikes") > 0)
            .then(pl.col("observed_fraction") / pl.col("expected_fraction"))
            .alias("enrichment"),
        )
        .sort(keys)
    )
    p_values = [
        binom_sf(k, n, min(max(p, 0.0), 1.0))
        for k, n, p in rows.select("near_event", "spikes", "expected_fraction").iter_rows()
    ]
    rows = rows.with_columns(pl.Series("p_value", p_values, dtype=pl.Float64))
    multi_run = rows["run"].n_unique() > 1
    multi_rank = rows["rank"].n_unique() > 1
    findings = [
        _finding(r, event, window, level, table, multi_run, multi_rank) for r in rows.iter_rows(named=True)
    ]
    return rows.with_columns(pl.Series("finding", findings, dtype=pl.String)).select(
        *keys,
        "events",
        "points",
        "spikes",
        "near_event",
        "observed_fraction",
        "expected_fraction",
        "enrichment",
        "p_value",
        "finding",
    )


def _check(table: str, level: str, baseline_window: int | None) -> int:
    """Validate the arguments shared by both entry points; return the baseline window to use."""
    if table not in SERIES_KEYS:
        raise ValueError(f"spike detection works on 'outputs' or 'params', not {table!r}")
    if level not in BASELINE_WINDOW:
        raise ValueError(f"level must be 'pass' or 'epoch', not {level!r}")
    window = BASELINE_WINDOW[level] if baseline_window is None else int(baseline_window)
    if window < 3:
        raise ValueError(f"baseline_window must be at least 3 points, got {window}")
    return window


def _modules_key(modules: Sequence[str] | str | None) -> tuple[str, ...] | str | None:
    """A hashable form of a module filter, for memoising."""
    return modules if modules is None or isinstance(modules, str) else tuple(modules)


def _points(trace: Trace, table: str, modules: Sequence[str] | str | None) -> pl.LazyFrame:
    """The table's rows restricted to ``modules`` (which must exist as a table in some run)."""
    trace.require(table)
    lf = trace.table(table)
    return lf if modules is None else lf.filter(module_filter(modules))


def _series(trace: Trace, table: str, level: str, modules: Sequence[str] | str | None) -> pl.DataFrame:
    """Every series' points (keys, [pass,] epoch, value), contiguous per series and ordered in time.

    A ``sid`` column numbers the series. Epoch level: the mean ``value`` per epoch. Pass level: rows in
    the order the recorder wrote them (pass order within a rank), stably grouped by series.
    """
    keys = SERIES_KEYS[table]
    lf = _points(trace, table, modules)
    if level == "epoch":
        lf = lf.group_by(*keys, "epoch").agg(pl.col("value").mean()).sort(*keys, "epoch")
        return lf.with_columns(pl.struct(keys).rank("dense").alias("sid")).collect()
    run_index = {name: i for i, name in enumerate(trace.runs)}
    # Pack the keys into one integer: run (15 bits) | rank (16) | split (1) | module[+param] code (32).
    name = pl.col("module") if table == "outputs" else pl.concat_str("module", "param", separator="\x00")
    flag = pl.col("grad_enabled") if table == "outputs" else pl.lit(False)
    sid = (
        pl.col("run").replace_strict(run_index, return_dtype=pl.UInt64) * (1 << 49)
        + pl.col("rank").cast(pl.UInt64) * (1 << 33)
        + flag.cast(pl.UInt64) * (1 << 32)
        + name.cast(pl.Categorical).to_physical().cast(pl.UInt64)
    )
    df = (
        lf.select(*keys, "pass", "epoch", "value", sid.alias("sid"))
        .collect()
        .sort("sid", maintain_order=True)
    )
    unordered = df.select(((pl.col("pass").diff() < 0) & (pl.col("sid").diff() == 0)).any()).item()
    return df.sort("sid", "pass", maintain_order=True) if unordered else df


def _detect(series: pl.DataFrame, table: str, level: str, threshold: float, window: int) -> pl.DataFrame:
    """Flag points off the rolling median by more than ``threshold`` rolling MADs; merge runs of flags."""
    keys = SERIES_KEYS[table]
    half = window // 2
    finite = pl.col("value").is_finite()

    def centred_median(x: pl.Expr) -> pl.Expr:
        # A trailing median shifted back by half a window is the centred one (and much cheaper in Polars);
        # the last half-window of a series keeps the last full window's median.
        return x.rolling_median(window, min_samples=half + 1).shift(-half).forward_fill().over("sid")

    scored = (
        series.lazy()
        .with_columns(centred_median(pl.when(finite).then(pl.col("value"))).alias("baseline"))
        .with_columns(
            centred_median(pl.when(finite).then((pl.col("value") - pl.col("baseline")).abs())).alias("mad")
        )
        .with_columns(
            pl.when(~finite)
            .then(pl.when(pl.col("value") < 0).then(-math.inf).otherwise(math.inf))
            .otherwise(
                (pl.col("value") - pl.col("baseline"))
                / pl.max_horizontal(
                    MAD_TO_SIGMA * pl.col("mad"), SCALE_FLOOR * pl.col("baseline").abs(), pl.lit(1e-300)
                )
            )
            .alias("score")
        )
        .with_columns(flag=(~finite | (pl.col("score").abs() > threshold)).fill_null(False))
        .with_columns(
            start=pl.col("flag")
            & (~pl.col("flag").shift(1, fill_value=False) | (pl.col("sid") != pl.col("sid").shift(1)))
        )
        .with_columns(spike=pl.col("start").cum_sum())
        .filter("flag")
    )
    position = [*keys, "pass", "epoch"] if level == "pass" else [*keys, "epoch"]
    peak = pl.col("score").abs().arg_max()
    return (
        scored.group_by("spike")
        .agg(
            *[pl.col(c).get(peak) for c in [*position, "value", "baseline", "score"]],
            pl.len().alias("points"),
        )
        .drop("spike")
        .with_columns(pl.col("points").cast(pl.Int64))
        .collect()
    )


def _attach_nearest_event(found: pl.DataFrame, events: pl.LazyFrame, table: str, level: str) -> pl.DataFrame:
    """Add the nearest preceding event of any name, and the lags to it, to every spike."""
    on = level
    ev = (
        events.select("run", "rank", "pass", "epoch", "name")
        .collect()
        .rename({"name": "event", "pass": "event_pass", "epoch": "event_epoch"})
        .with_columns(pl.col(f"event_{on}").alias("_at"))
        .sort("_at")
    )
    joined = found.with_columns(pl.col(on).cast(ev["_at"].dtype).alias("_at")).sort("_at")
    joined = joined.join_asof(
        ev,
        on="_at",
        by=["run", "rank"],
        strategy="backward",
        allow_exact_matches=level == "epoch",
        check_sortedness=False,
    ).drop("_at")
    lag_passes = (
        (pl.col("pass") - pl.col("event_pass")) if level == "pass" else pl.lit(None, dtype=pl.Int64)
    ).alias("lag_passes")
    lag_epochs = (pl.col("epoch").cast(pl.Int64) - pl.col("event_epoch")).alias("lag_epochs")
    position = ["pass", "epoch"] if level == "pass" else ["epoch"]
    return (
        joined.with_columns(lag_passes, lag_epochs)
        .select(
            *SERIES_KEYS[table],
            *position,
            "value",
            "baseline",
            "score",
            "points",
            "event",
            "event_pass",
            "event_epoch",
            "lag_passes",
            "lag_epochs",
        )
        .sort(*SERIES_KEYS[table], on)
    )


def _near_counts(
    found: pl.DataFrame, events: pl.DataFrame, keys: list[str], level: str, window: int
) -> pl.DataFrame:
    """Per series: spikes, and how many of them lie within ``window`` after an event of ``events``."""
    at = found.with_columns(pl.col(level).cast(pl.Int64).alias("_at")).sort("_at")
    ev = events.select(
        "run", "rank", pl.col(level).cast(pl.Int64).alias("_at"), pl.col(level).alias("_ev")
    ).sort("_at")
    lagged = at.join_asof(
        ev, on="_at", by=["run", "rank"], allow_exact_matches=level == "epoch", check_sortedness=False
    )
    lag = pl.col(level).cast(pl.Int64) - pl.col("_ev").cast(pl.Int64)
    near = (lag >= 1) & (lag <= window) if level == "pass" else (lag >= 0) & (lag < window)
    return lagged.group_by(keys).agg(
        pl.len().cast(pl.Int64).alias("spikes"),
        near.fill_null(False).sum().cast(pl.Int64).alias("near_event"),
    )


def _coverage(
    trace: Trace,
    table: str,
    level: str,
    modules: Sequence[str] | str | None,
    events: pl.DataFrame,
    window: int,
) -> pl.DataFrame:
    """Per series: its points, and how many of them lie within ``window`` after an event."""
    keys = SERIES_KEYS[table]
    # The units (passes or epochs) that fall inside some event's window, per run and rank.
    first = 1 if level == "pass" else 0
    covered = (
        events.select(
            "run",
            "rank",
            pl.int_ranges(
                pl.col(level).cast(pl.Int64) + first, pl.col(level).cast(pl.Int64) + first + window
            ).alias("_at"),
        )
        .explode("_at")
        .unique()
        .with_columns(pl.lit(True).alias("_near"))
    )
    lf = _points(trace, table, modules)
    if level == "epoch":
        lf = lf.select(*keys, "epoch").unique()
    points = lf.select(*keys, pl.col(level).cast(pl.Int64).alias("_at")).join(
        covered.lazy(), on=["run", "rank", "_at"], how="left"
    )
    return (
        points.group_by(keys)
        .agg(pl.len().cast(pl.Int64).alias("points"), pl.col("_near").sum().cast(pl.Int64).alias("covered"))
        .collect()
    )


def _finding(
    row: dict, event: str, window: int, level: str, table: str, multi_run: bool, multi_rank: bool
) -> str:
    """One plain-language sentence about a series' spikes and ``event``."""
    label = row["module"] + (f".{row['param']}" if table == "params" else "")
    if table == "outputs" and row["split"] != "train":
        label += f" ({row['split']} passes)"
    if multi_rank:
        label += f" on rank {row['rank']}"
    if multi_run:
        label = f"{row['run']}: {label}"
    unit = level if window == 1 else ("passes" if level == "pass" else "epochs")
    n, k = row["spikes"], row["near_event"]
    if n == 0:
        return f"{label}: no spikes detected, so nothing to align with {event}"
    if row["events"] == 0:
        return f"{label}: {n} spike{'s' * (n != 1)}, but no {event} events were recorded"
    share = f"{100 * k / n:.0f}% of spikes ({k} of {n}) fall within {window} {unit} after a {event}"
    if row["enrichment"] is None:
        return f"{label}: {share}; the event windows cover none of the series, so chance cannot be judged"
    p = row["p_value"]
    p_text = "p < 0.001" if p < 0.001 else f"p = {p:.2g}"
    return f"{label}: {share}, {row['enrichment']:.1f}× chance, {p_text}"
