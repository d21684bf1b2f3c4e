"""Spike detection on each module's norm series (whether spikes follow an event is :mod:`.alignment`).

Detector (a Hampel filter): for every series (run, rank, module, split for outputs; run, rank, module,
param for params), ordered by pass, the baseline is the centred rolling median of ``baseline_window``
points, and the scale a rolling MAD (median absolute deviation from the baseline, times 1.4826 so that it
estimates a standard deviation for Gaussian noise) over ``SCALE_SPAN`` times as many points, computed at
block resolution: the median of the blocks' MADs, blocks of ``baseline_window // 4`` points. A point is
flagged when ``|value - baseline| / scale > threshold``; NaN and ±Inf values are always flagged (score
±inf) and left out of every baseline. Consecutive flagged points form one spike, reported at its peak
(largest ``|score|``) with ``points`` = how many points it spans. Because the window is centred, a level
shift is absorbed into the baseline within half a window: it yields at most one short spike, never a
spike per point; an excursion shorter than half a window is a spike.

Event timing: events are recorded between passes with the last pass started, so at level "pass" an event
precedes a spike when ``spike.pass > event.pass``; at level "epoch" an event of epoch ``e`` (a DQN's
target sync right after ``tick_epoch``) precedes the spikes of epoch ``e`` and later.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import polars as pl

from .errors import ShortSeriesWarning, caller_stacklevel
from .names import BASELINE_WINDOW, SERIES_KEYS, THRESHOLD, Level, Table
from .series import epoch_series, pass_series

if TYPE_CHECKING:
    from .trace import Trace

__all__ = ["check_detector", "spikes"]

SCALE_SPAN = 4
"""The scale (rolling MAD) spans this many baseline windows: noise levels change slowly, and a MAD of
only one window's points is so variable that on 1e5-point series it would flag pure noise."""

MAD_TO_SIGMA = 1.4826
"""Scales a median absolute deviation to a standard deviation for Gaussian noise."""

SCALE_FLOOR = 1e-4
"""Smallest scale relative to the baseline, so a flat series (MAD 0) does not flag float rounding."""


def spikes(
    trace: Trace,
    table: Table = "outputs",
    *,
    level: Level = "pass",
    modules: Sequence[str] | str | None = None,
    threshold: float | None = None,
    baseline_window: int | None = None,
) -> pl.DataFrame:
    """Detected spikes, one row each, with the nearest preceding event (of any name).

    Args:
        trace: the loaded runs (its filters apply).
        table: "outputs" (one series per run, rank, module and split) or "params" (per run, rank,
            module and parameter).
        level: "pass" scores every recorded point; "epoch" the per-epoch means.
        modules: exact module names, or a regex searched in the name; None for all.
        threshold: robust z-score above which a point is flagged (default :data:`THRESHOLD`).
        baseline_window: points in the rolling median (default :data:`BASELINE_WINDOW` of the level).

    Returns:
        Columns: the series keys (``run``, ``rank``, ``module``, ``split`` or ``param``), ``pass``
        (level "pass" only), ``epoch``, ``value``, ``baseline``, ``score`` (signed, in robust SDs; ±inf
        for NaN/Inf), ``points`` (consecutive flagged points merged into this spike), ``event``,
        ``event_pass``, ``event_epoch``, ``lag_passes`` (null at level "epoch"), ``lag_epochs`` (all
        null when no event precedes). Memoised per Trace.

    Example:
        ``na.load("runs/cartpole").spikes("outputs", level="pass", threshold=8)``
    """
    threshold = THRESHOLD if threshold is None else float(threshold)
    window = check_detector(table, level, baseline_window)
    key = ("spikes", table, level, _modules_key(modules), threshold, window)
    return trace.cached(key, lambda: _spikes(trace, table, level, modules, threshold, window))


def _spikes(
    trace: Trace, table: str, level: str, modules: Sequence[str] | str | None, threshold: float, window: int
) -> pl.DataFrame:
    series = pass_series(trace, table, modules)
    frame = series.data if level == "pass" else epoch_series(series)
    _warn_if_too_short(frame, level, window)
    found = _detect(frame, level, threshold, window).join(series.keys.drop("start", "length"), on="sid")
    return _attach_nearest_event(found, trace.events, table, level)


def _warn_if_too_short(frame: pl.DataFrame, level: str, window: int) -> None:
    """Say so when series have fewer points than the baseline window: their rolling median is their
    whole length, so a spike among a handful of epochs is not told from noise, and "0 spikes" would
    read as "nothing happened"."""
    lengths = frame.group_by("sid").len()["len"]
    short = int((lengths < window).sum())
    if short:
        unit = "epochs" if level == "epoch" else "points"
        hint = "use level='pass' (CLI: --level pass)" if level == "epoch" else "use a smaller baseline_window"
        warnings.warn(
            f"{short} of {lengths.len()} series have fewer {unit} ({int(lengths.min())} at least) than the "
            f"spike detector's baseline window of {window}: too few to tell a spike from noise; {hint}",
            ShortSeriesWarning,
            stacklevel=caller_stacklevel(),
        )


def check_detector(table: str, level: str, baseline_window: int | None) -> int:
    """Validate the detector's arguments; return the baseline window to use."""
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


def _detect(frame: pl.DataFrame, level: str, threshold: float, window: int) -> pl.DataFrame:
    """Spikes of every series in ``frame`` (sid, [pass,] epoch, value; contiguous per sid, time-ordered).

    The frame is cut at series boundaries into parts of at most about PART_ROWS rows (and at least one
    per Polars thread), scored in parallel: all cores work, and the scoring's temporary columns exist
    for a few parts at a time only.
    """
    threads = pl.thread_pool_size()
    parts = _split(frame, max(threads, -(-frame.height // PART_ROWS)))
    with ThreadPoolExecutor(min(threads, len(parts))) as pool:
        found = list(pool.map(lambda part: _detect_part(part, level, threshold, window), parts))
    return pl.concat(found)


PART_ROWS = 2_000_000
"""Rows scored at once per thread by the detector (bounds its memory: ~50 bytes per row)."""


def _split(frame: pl.DataFrame, n: int) -> list[pl.DataFrame]:
    """Up to ``n`` slices of about equal rows, cut only where the sid changes."""
    if frame.height < 100_000 or n < 2:
        return [frame]
    starts = frame.select(pl.arg_where(pl.col("sid") != pl.col("sid").shift(1))).to_series()
    cuts = [0]
    for k in range(1, n):
        i = int(starts.search_sorted(k * frame.height // n))
        if i < starts.len() and cuts[-1] < int(starts[i]) < frame.height:
            cuts.append(int(starts[i]))
    cuts.append(frame.height)
    return [frame.slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


_ROW = pl.int_range(pl.len(), dtype=pl.UInt32)
_POSITION = (
    _ROW - pl.when((pl.col("sid") != pl.col("sid").shift(1)).fill_null(True)).then(_ROW).forward_fill()
).alias("_pos")
"""Each row's index within its series (rows contiguous per sid)."""


def _centred_median(frame: pl.DataFrame, x: pl.Expr, window: int) -> pl.Series:
    """Centred rolling median of ``x`` within each sid of ``frame`` (needs ``_pos``, the row's index in
    its series); the last half-window of a series keeps its last full window's median; windows need
    half a window of non-null values, else the last median is carried forward.

    Same as ``x.rolling_median(window).shift(-half).forward_fill().over("sid")`` but cheaper: one
    trailing median over the whole column (shifted back by half a window, which centres it), with the
    first half-window of each series, whose windows would reach into the previous series, recomputed.
    """
    half = window // 2
    med = x.rolling_median(window, min_samples=half + 1)
    inside = (pl.col("sid").shift(-half) == pl.col("sid")) & (pl.col("_pos") >= half)
    centred = frame.select(pl.when(inside.fill_null(False)).then(med.shift(-half)).alias("m")).to_series()
    head = (
        frame.with_row_index("_row")
        .filter(pl.col("_pos") < window)
        .with_columns(med.shift(-half).over("sid").alias("m"))
        .filter(pl.col("_pos") < half)
    )
    centred = centred.scatter(head["_row"], head["m"])
    carried = frame.select(centred.alias("m"), "sid").select(
        pl.when(pl.when(pl.col("m").is_not_null()).then(pl.col("sid")).forward_fill() == pl.col("sid")).then(
            pl.col("m").forward_fill()
        )
    )
    return carried.to_series()


def _detect_part(frame: pl.DataFrame, level: str, threshold: float, window: int) -> pl.DataFrame:
    """Score one part's points, flag them and merge consecutive flags into spikes (at their peak)."""
    finite = pl.col("value").is_finite()
    block = max(1, window // 4)
    df = frame.with_columns(_POSITION)
    df = df.with_columns(_centred_median(df, pl.when(finite).then(pl.col("value")), window).alias("baseline"))
    df = df.with_columns(
        pl.when(finite).then((pl.col("value") - pl.col("baseline")).abs()).alias("_absdev"),
        (pl.col("_pos") % block == 0).cum_sum().alias("_b"),
    ).with_columns(pl.col("_b").set_sorted())
    # Rolling MAD at block resolution: the median absolute deviation of each block of ``block`` points,
    # then the centred rolling median of those over the blocks spanning SCALE_SPAN windows.
    blocks = df.group_by("_b", maintain_order=True).agg(pl.col("sid").first(), pl.col("_absdev").median())
    blocks = blocks.with_columns(_POSITION)
    mad = _centred_median(blocks, pl.col("_absdev"), max(3, (SCALE_SPAN * window // block) | 1))
    df = df.with_columns(mad.gather(df["_b"] - 1).alias("mad"))
    scale = pl.max_horizontal(
        MAD_TO_SIGMA * pl.col("mad"), SCALE_FLOOR * pl.col("baseline").abs(), pl.lit(1e-300)
    )
    signed_inf = pl.when(pl.col("value") < 0).then(-math.inf).otherwise(math.inf)
    score = pl.when(~finite).then(signed_inf).otherwise((pl.col("value") - pl.col("baseline")) / scale)
    flagged = (
        df.lazy()
        .with_columns(score.alias("score"))
        .with_columns(flag=(~finite | (pl.col("score").abs() > threshold)).fill_null(False))
        .with_columns(
            spike=(
                pl.col("flag") & (~pl.col("flag").shift(1, fill_value=False) | (pl.col("_pos") == 0))
            ).cum_sum()
        )
        .filter("flag")
    )
    position = ["sid", "pass", "epoch"] if level == "pass" else ["sid", "epoch"]
    peak = pl.col("score").abs().arg_max()
    return (
        flagged.group_by("spike")
        .agg(
            *[pl.col(c).get(peak) for c in [*position, "value", "baseline", "score"]],
            pl.len().cast(pl.Int64).alias("points"),
        )
        .drop("spike")
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
