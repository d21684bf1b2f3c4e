"""Do spikes, or steps, follow an event more often than chance? Tests counted in events and calibrated.

Why not the binomial test of "the share of spikes inside the event windows": it treats every spike as an
independent trial, and spikes are not independent. One excursion is detected as several spikes, and the
spike rate and the event rate often drift together (a DQN's episodes are short early in training, when its
norms move fast and its target syncs come often). On null series with events placed independently of
them, that test gave p < 0.01 in up to a quarter of the series. So:

* **Units.** A series' spikes less than ``max(W, baseline_window // 2)`` apart are one cluster (an
  excursion, timed at its first spike). The statistic is T = the number of events followed by a cluster
  onset within the window W: ``e < onset <= e + W`` in passes at level "pass" (an event carries the last
  pass started before it), ``e <= onset < e + W`` in epochs at level "epoch". Reported as "k of E events".
* **Null: local jitter of the event train.** Each of B resampled trains moves every event by its own
  displacement d with ``X <= |d| <= J``. ``X = W + baseline_window // 2`` so that a moved event cannot be
  followed by the excursion that followed it; ``J`` = :data:`JITTER_GAPS` local inter-event gaps (at least
  2X), so that a moved event stays where the event rate and the spike rate were. A move leaving the
  recorded span is mirrored (d -> -d). The draws are seeded and shared by every series of a (run, rank).
  ``p = (1 + #{T_b >= T}) / (B + 1)``, whose floor is ``1 / (B + 1)``. The circular shift of the whole
  train is not used: it is anti-conservative when the two rates drift together, and for a regular train
  the shifts near a multiple of the period reproduce the alignment. docs/analysis.md has the calibration
  (``benchmarks/calibration.py``).
* **Chance and enrichment.** Chance is the mean of T_b / E, the share of moved events followed by an
  onset: a local chance, measured where spikes can occur. Enrichment is (k / E) / chance, with the
  Clopper–Pearson 95% interval of k / E divided by chance (chance's own Monte Carlo error is ignored).
* **Multiple testing.** Benjamini–Hochberg q-values across the series of one call that have a spike
  and an event. Layers of one network are positively dependent; BH holds under that (PRDS).
* **Placebo.** At level "pass", the epoch boundaries (the pass before each epoch's first pass) that are
  not within W of a real event are tested the same way; their moved copies avoid the real events' W
  neighbourhoods too. A real effect of the event, not of the boundary, shows as a small p beside a large
  placebo p.
* **Steps.** The detector cannot see a level shift (its centred median absorbs it). ``event_steps``
  compares the median of the W passes after each event with the median of the W before, in units of the
  series' robust noise, and tests the median over events with the same jitter, two-sided.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from .errors import MissingEventError
from .names import (
    EVENT_WINDOW,
    PERMUTATIONS,
    SERIES_KEYS,
    Level,
    Table,
)
from .series import Series, SeriesInfo, complete_series, epoch_means, series_info
from .spikes import check_detector, check_threshold, spikes
from .stats import bh_qvalues, clopper_pearson, permutation_p

if TYPE_CHECKING:
    from .trace import Trace

__all__ = [
    "check_event",
    "cluster_spikes",
    "event_alignment",
    "event_profile",
    "event_steps",
    "jitter_test",
    "jitter_trains",
    "null_counts",
    "recorded_events",
    "spike_clusters",
    "spike_groups",
]

JITTER_GAPS = 2.0
"""Largest displacement of a jittered event, in local inter-event gaps (the mean of its two gaps).
Calibration (docs/analysis.md) chose it: wider moves carry an event into where rates differ."""

REDRAWS = 20
"""Rounds of redrawing the placebo's moved events that landed next to a real event."""

COINCIDENCE = 0.5
"""Two series are one group when at least this share of the clusters of the one with fewer clusters
start within the tolerance of a cluster of the other."""

TOLERANCE: dict[str, int] = {"pass": 5, "epoch": 0}
"""How far apart two clusters' onsets may be and still be one excursion seen in two layers."""

PLACEBO = "epoch boundaries"


def recorded_events(trace: Trace) -> pl.DataFrame:
    """The event names the loaded runs recorded (filters applied), most frequent first: name, count."""
    return (
        trace.events.group_by("name")
        .agg(pl.len().cast(pl.Int64).alias("count"))
        .sort("count", "name", descending=[True, False])
        .collect()
    )


def check_event(trace: Trace, event: str) -> None:
    """Refuse an event that no loaded run recorded, listing those that were: a typo (``target_updates``)
    must not read as "no events", nor a DQN's default as the finding of a run that has none."""
    names = recorded_events(trace)
    if event in names["name"].to_list():
        return
    have = ", ".join(f"{n} ({c})" for n, c in names.iter_rows())
    listing = (
        f"events recorded: {have}"
        if have
        else "no events were recorded (mark them with Recorder.event(name), or track_target(module))"
    )
    where = ", ".join(trace.runs)
    raise MissingEventError(f"no {event!r} events in {where}; {listing}", next(iter(trace.paths.values())))


def merge_gap(window: int, baseline_window: int) -> int:
    """Spikes less than this far apart are one cluster: within an event window of each other (an event
    inside an excursion is not followed by a new one), or within half the detector's baseline window
    (its ringing can cross the threshold again as long as the centred median is still absorbing it)."""
    return max(window, baseline_window // 2)


def exclusion(window: int, baseline_window: int) -> int:
    """Smallest displacement of a jittered event: past its own window and an excursion's length."""
    return window + baseline_window // 2


@dataclass(frozen=True)
class _Setup:
    """The arguments shared by the alignment functions, validated and with defaults filled in."""

    table: Table
    level: Level
    modules: Sequence[str] | str | None
    threshold: float
    baseline: int
    permutations: int
    seed: int

    @property
    def keys(self) -> list[str]:
        return SERIES_KEYS[self.table]


def _setup(
    table: Table,
    level: Level,
    modules: Sequence[str] | str | None,
    threshold: float | None,
    baseline_window: int | None,
    permutations: int = PERMUTATIONS,
    seed: int = 0,
) -> _Setup:
    baseline = check_detector(table, level, baseline_window)
    if int(permutations) < 1:
        raise ValueError(f"permutations must be at least 1, got {permutations}")
    mods = modules if modules is None or isinstance(modules, str) else tuple(modules)
    threshold = check_threshold(threshold)
    return _Setup(table, level, mods, threshold, baseline, int(permutations), int(seed))


def _windows(window: int | Sequence[int] | None, level: str) -> list[int]:
    """The event windows asked for (one int or several), validated."""
    if window is None:
        return [EVENT_WINDOW[level]]
    windows = [int(window)] if isinstance(window, int | np.integer) else [int(w) for w in window]
    if not windows:
        raise ValueError("window must be an int or a non-empty sequence of ints")
    for w in windows:
        if w < 1:
            raise ValueError(f"window must be at least 1 {level}, got {w}")
    return list(dict.fromkeys(windows))


# ----------------------------------------------------------------------------------------------------------
# Public functions (the Trace methods delegate here).


def spike_clusters(
    trace: Trace,
    table: Table = "outputs",
    *,
    level: Level = "pass",
    modules: Sequence[str] | str | None = None,
    threshold: float | None = None,
    baseline_window: int | None = None,
    window: int | None = None,
) -> pl.DataFrame:
    """Each series' spikes merged into clusters: spikes less than :func:`merge_gap` apart are one.

    Args:
        trace: the loaded runs.
        table, level, modules, threshold, baseline_window: as in :func:`.spikes.spikes`.
        window: the event window the clusters serve (default :data:`EVENT_WINDOW`); the merge gap is
            ``max(window, baseline_window // 2)``.

    Returns:
        One row per cluster: the series keys, ``cluster`` (0, 1, … per series), ``onset`` and ``end``
        (pass, or epoch at level "epoch", of its first and last spike), ``spikes``, ``peak_score``
        (the largest ``|score|``, signed).

    Example:
        ``trace.spike_clusters("outputs").group_by("module").len()``
    """
    s = _setup(table, level, modules, threshold, baseline_window)
    (w,) = _windows(window, level)
    return _clusters(trace, s, merge_gap(w, s.baseline))


def event_alignment(
    trace: Trace,
    event: str = "target_update",
    *,
    window: int | Sequence[int] | None = None,
    level: Level = "pass",
    table: Table = "outputs",
    modules: Sequence[str] | str | None = None,
    threshold: float | None = None,
    baseline_window: int | None = None,
    placebo: bool = True,
    permutations: int = PERMUTATIONS,
    seed: int = 0,
) -> pl.DataFrame:
    """Per series, whether spike clusters start right after ``event`` more often than chance.

    Args:
        trace: the loaded runs.
        event: the event name (``trace.events["name"]``).
        window: passes (or epochs) after an event that count as following it; several windows (e.g.
            ``(5, 20, 50)``) give one block of rows each, with q-values within each block. Default
            :data:`EVENT_WINDOW`.
        level: "pass" (every recorded point) or "epoch" (per-epoch means).
        table, modules, threshold, baseline_window: what to search for spikes (:func:`.spikes.spikes`).
        placebo: also test the epoch boundaries away from every ``event`` (level "pass" only).
        permutations: jittered event trains per test (B); p-values have a floor of 1 / (B + 1).
        seed: seeds the jitter; the same seed gives the same table.

    Returns:
        One row per series and window: the series keys, ``window``, ``events`` (E, within the series'
        span), ``events_followed`` (k), ``chance`` (share of jittered events followed), ``enrichment``
        ((k/E) / chance) with ``enrichment_lo``/``enrichment_hi`` (95%), ``p_value`` (permutation,
        null when nothing was tested), ``p_floor``, ``q_value`` (Benjamini–Hochberg), ``spikes``,
        ``clusters``, ``points``; ``placebo_events``, ``placebo_followed``, ``placebo_chance``,
        ``placebo_enrichment``, ``placebo_p``, ``placebo_q`` (null at level "epoch" or without
        ``placebo``); and ``finding``, one sentence.

    Example:
        ``trace.event_alignment("target_update", window=(5, 20, 50))``
    """
    s = _setup(table, level, modules, threshold, baseline_window, permutations, seed)
    windows = _windows(window, level)
    check_event(trace, event)
    key = ("event_alignment", event, tuple(windows), s, bool(placebo))
    return trace.cached(key, lambda: _alignment(trace, event, windows, s, placebo and level == "pass"))


def event_steps(
    trace: Trace,
    event: str = "target_update",
    *,
    window: int | None = None,
    level: Level = "pass",
    table: Table = "outputs",
    modules: Sequence[str] | str | None = None,
    baseline_window: int | None = None,
    permutations: int = PERMUTATIONS,
    seed: int = 0,
) -> pl.DataFrame:
    """Per series, whether the level after ``event`` differs from the level before it (a step).

    For each event, the step is the median of the values in the W passes after it minus the median of
    the W passes up to it, divided by the series' robust noise (1.4826 × MAD of first differences / √2,
    which trends and steps hardly move). The statistic is the median step over events, tested two-sided
    against the same jittered event trains as :func:`event_alignment` (same seed, same draws).

    Args:
        trace, event, level, table, modules, permutations, seed: as in :func:`event_alignment`.
        window: passes (epochs) on each side (default :data:`EVENT_WINDOW`).
        baseline_window: sets the jitter's smallest move, as in :func:`event_alignment`.

    Returns:
        One row per series: the keys, ``window``, ``events``, ``step`` (median over events, in robust
        SDs), ``step_change`` (median over events of after / before − 1), ``steps_up`` (events whose step
        is positive), ``p_value`` (two-sided; floor ``2 / (B + 1)``), ``p_floor``, ``q_value``,
        ``finding``.

    Example:
        ``trace.event_steps("target_update", window=50)``
    """
    s = _setup(table, level, modules, None, baseline_window, permutations, seed)
    (w,) = _windows(window, level)
    check_event(trace, event)
    key = ("event_steps", event, w, s)
    return trace.cached(key, lambda: _steps(trace, event, w, s))


def event_profile(
    trace: Trace,
    event: str = "target_update",
    *,
    window: int | None = None,
    level: Level = "pass",
    table: Table = "outputs",
    modules: Sequence[str] | str | None = None,
    placebo: bool = True,
) -> pl.DataFrame:
    """The event-triggered average: each series from W before to W after every event, averaged.

    Every value is divided by its event's pre-event level (the median of the W passes up to the event),
    so events late and early in a run weigh alike and 1.0 means "as before the event".

    Args:
        trace, event, level, table, modules: as in :func:`event_alignment`.
        window: W, passes (epochs) on each side (default :data:`EVENT_WINDOW`).
        placebo: also profile the epoch boundaries away from every event (``kind`` "placebo").

    Returns:
        One row per series, ``kind`` ("event" or "placebo") and ``offset`` (−W … W; offset 0 is the
        event's own pass, the last one before it): ``events`` (how many contribute), ``mean`` with a
        95% interval ``ci_lo``/``ci_hi`` (normal, mean ± 1.96 SE), ``median``, ``p25``, ``p75``.

    Example:
        ``na.charts.event_profile(trace.event_profile("target_update", window=50))``
    """
    if table == "signals":
        # its ``kind`` column (event or placebo) would clash with the signals' own ``kind`` key
        raise ValueError(
            "event_profile does not take the signals table: its 'kind' column (event or placebo) is "
            "also a signal's key; use event_steps or event_alignment with table='signals'"
        )
    s = _setup(table, level, modules, None, None)
    (w,) = _windows(window, level)
    check_event(trace, event)
    key = ("event_profile", event, w, s, bool(placebo))
    return trace.cached(key, lambda: _profile(trace, event, w, s, placebo and level == "pass"))


def spike_groups(
    trace: Trace,
    table: Table = "outputs",
    *,
    level: Level = "pass",
    modules: Sequence[str] | str | None = None,
    threshold: float | None = None,
    baseline_window: int | None = None,
    window: int | None = None,
    tolerance: int | None = None,
) -> pl.DataFrame:
    """Series whose spike clusters are the same excursions, grouped (per run and rank).

    Two series are linked when at least half (:data:`COINCIDENCE`) of the clusters of the one with fewer
    clusters start within ``tolerance`` (default :data:`TOLERANCE`) of a cluster of the other; a group is
    a connected set of links. Such layers are one finding, not several: their tests are strongly
    correlated.

    Returns:
        One row per series with a spike: the keys, ``group`` (numbered per run and rank from 0, largest
        groups first), ``size`` (series in the group), ``clusters``, ``shared`` (share of its clusters
        that start within the tolerance of a cluster of another member).

    Example:
        ``trace.spike_groups().filter(pl.col("size") > 1)``
    """
    s = _setup(table, level, modules, threshold, baseline_window)
    (w,) = _windows(window, level)
    tol = TOLERANCE[level] if tolerance is None else int(tolerance)
    return _groups(_clusters(trace, s, merge_gap(w, s.baseline)), s, tol)


# ----------------------------------------------------------------------------------------------------------
# The numpy core: jittered trains and counts of followed events. Public for the calibration benchmark.


def jitter_trains(
    events: np.ndarray,
    lo: int,
    hi: int,
    *,
    exclude: int,
    permutations: int,
    rng: np.random.Generator,
    gaps: float = JITTER_GAPS,
    avoid: np.ndarray | None = None,
    avoid_radius: int = 0,
) -> np.ndarray:
    """B jittered copies of a sorted event train: an int64 array of shape (permutations, len(events)).

    Event j moves by ``±(exclude + floor(u * (reach_j - exclude + 1)))``, u uniform, sign fair, where
    ``reach_j = max(ceil(gaps * local gap_j), 2 * exclude)``, capped at the distance to the farther end of
    ``[lo, hi]``; a move leaving the span is mirrored to the other side (clipped only in a span shorter
    than the exclusion). ``avoid``: positions (sorted) that moved
    events must not come within ``avoid_radius`` of (redrawn up to :data:`REDRAWS` times).
    """
    q = np.asarray(events, dtype=np.int64)
    e = q.size
    if e == 0:
        return np.zeros((permutations, 0), dtype=np.int64)
    reach = _reach(q, lo, hi, exclude, gaps)
    u = rng.random((permutations, e))
    up = rng.random((permutations, e)) < 0.5
    x = _place(q, u, up, exclude, reach, lo, hi)
    if avoid is not None and len(avoid):
        qq = np.broadcast_to(q, x.shape)
        rr = np.broadcast_to(reach, x.shape)
        for _ in range(REDRAWS):
            bad = _near(x, np.asarray(avoid, dtype=np.int64), avoid_radius)
            n = int(bad.sum())
            if n == 0:
                break
            x[bad] = _place(qq[bad], rng.random(n), rng.random(n) < 0.5, exclude, rr[bad], lo, hi)
    return x


def null_counts(onsets: Sequence[np.ndarray], trains: np.ndarray, window: int) -> np.ndarray:
    """For every series (its sorted cluster onsets) and every train (a row of ``trains``), how many of
    the train's positions x are followed by an onset o with ``x < o <= x + window``: shape (S, B).

    Positions followed by an onset form the intervals ``[o - window, o - 1]``; the trains' positions are
    sorted once and every series counts those inside its intervals, so the work is one sort plus one
    binary search per interval, whatever the number of series.
    """
    b, e = trains.shape
    out = np.zeros((len(onsets), b), dtype=np.int64)
    if e == 0 or b == 0:
        return out
    flat = trains.ravel()
    order = np.argsort(flat, kind="stable")
    ordered = flat[order]
    row = order // e
    for s, on in enumerate(onsets):
        if len(on) == 0:
            continue
        starts, ends = _intervals(np.asarray(on, dtype=np.int64), window)
        i0 = np.searchsorted(ordered, starts, "left")
        i1 = np.searchsorted(ordered, ends, "right")
        n = i1 - i0
        total = int(n.sum())
        if total:
            idx = np.repeat(i0 - (np.cumsum(n) - n), n) + np.arange(total)
            out[s] = np.bincount(row[idx], minlength=b)
    return out


def _intervals(onsets: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """The union of ``[o - window, o - 1]`` over sorted onsets, as disjoint (starts, ends)."""
    starts, ends = onsets - window, onsets - 1
    new = np.ones(len(onsets), dtype=bool)
    new[1:] = starts[1:] > ends[:-1] + 1
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, len(onsets) - 1)
    return starts[first], ends[last]


def _reach(q: np.ndarray, lo: int, hi: int, exclude: int, gaps: float) -> np.ndarray:
    """Per event, the largest displacement: ``gaps`` local inter-event gaps, at least 2 × exclude."""
    span = max(hi - lo, 1)
    if q.size == 1:
        local = np.array([span / 2.0])
    else:
        d = np.diff(q).astype(float)
        left = np.concatenate([[np.nan], d])
        right = np.concatenate([d, [np.nan]])
        local = np.nanmean(np.stack([left, right]), axis=0)
    reach = np.maximum(np.ceil(gaps * local), 2 * exclude)
    # No farther than the farther end of the span: a move past one end is then mirrored inside.
    # an array, though numpy's stubs type this expression as Any
    bounded: np.ndarray = np.maximum(np.minimum(reach, np.maximum(q - lo, hi - q)), exclude).astype(np.int64)
    return bounded


def _place(
    q: np.ndarray, u: np.ndarray, up: np.ndarray, exclude: int, reach: np.ndarray, lo: int, hi: int
) -> np.ndarray:
    size = exclude + np.floor(u * (np.maximum(reach, exclude) - exclude + 1)).astype(np.int64)
    d = np.where(up, size, -size)
    x = q + d
    x = np.where((x < lo) | (x > hi), q - d, x)
    # an array, though numpy's stubs type this expression as Any
    placed: np.ndarray = np.clip(x, lo, hi)
    return placed


def _near(x: np.ndarray, sorted_points: np.ndarray, radius: int) -> np.ndarray:
    """Whether each x lies within ``radius`` of one of ``sorted_points``."""
    i = np.searchsorted(sorted_points, x - radius, "left")
    ok = i < len(sorted_points)
    return ok & (sorted_points[np.minimum(i, len(sorted_points) - 1)] <= x + radius)


def _rng(seed: int, rank: int, stream: int) -> np.random.Generator:
    """The jitter's generator for one (run, rank) and stream (0: the event, 1: its placebo)."""
    return np.random.default_rng([int(seed), int(rank), int(stream)])


# ----------------------------------------------------------------------------------------------------------
# Gathering what a test needs from a Trace.


@dataclass(frozen=True)
class _Group:
    """One (run, rank): its series ids (in keys order), the first and last recorded position (pass, or
    epoch at level "epoch") over them, its events and epoch boundaries (sorted positions)."""

    rank: int
    sids: np.ndarray
    first: int
    last: int
    all_events: np.ndarray
    boundaries: np.ndarray

    def span(self, window: int) -> tuple[int, int]:
        """Positions whose window ``(x, x + window]`` holds a recorded point: ``[first - window, last - 1]``."""
        return self.first - window, self.last - 1

    def events(self, window: int) -> np.ndarray:
        """The events inside :meth:`span`: an event whose window ends before the first recorded point
        (a sync before any training pass) or starts after the last cannot be followed, nor moved."""
        lo, hi = self.span(window)
        return self.all_events[(self.all_events >= lo) & (self.all_events <= hi)]


def _positions(level: str) -> pl.Expr:
    """An event's position: its pass, or at level "epoch" the epoch before the one it opens."""
    return pl.col("pass") if level == "pass" else pl.col("epoch").cast(pl.Int64) - 1


def _groups_of(trace: Trace, info: SeriesInfo, event: str, s: _Setup, boundaries: bool) -> list[_Group]:
    """The (run, rank) groups of the series with their events (and epoch boundaries when asked)."""
    keys = info.keys
    if keys.height == 0:
        return []
    col = "pass" if s.level == "pass" else "epoch"
    ends = keys.select(
        "sid", "run", "rank", pl.col(f"first_{col}").alias("first"), pl.col(f"last_{col}").alias("last")
    )
    spans = ends.group_by("run", "rank", maintain_order=True).agg(
        pl.col("sid"), pl.col("first").min(), pl.col("last").max()
    )
    events = (
        trace.events.filter(pl.col("name") == event)
        .select("run", "rank", _positions(s.level).cast(pl.Int64).alias("at"))
        .collect()
    )
    starts = info.epoch_starts if boundaries else None
    out = []
    for run, rank, sids, first, last in spans.iter_rows():
        at = np.sort(events.filter((pl.col("run") == run) & (pl.col("rank") == rank))["at"].to_numpy())
        bounds = np.zeros(0, dtype=np.int64)
        if starts is not None:
            b = starts.filter((pl.col("run") == run) & (pl.col("rank") == rank))["first"].to_numpy() - 1
            bounds = np.sort(b[(b >= first) & (b < last)]).astype(np.int64)
        out.append(_Group(int(rank), np.asarray(sids), int(first), int(last), at.astype(np.int64), bounds))
    return out


def _placebo_positions(group: _Group, window: int) -> np.ndarray:
    """Epoch boundaries not within ``window`` of a real event."""
    if group.boundaries.size == 0 or group.all_events.size == 0:
        return group.boundaries
    # an array, though numpy's stubs type this expression as Any
    away: np.ndarray = group.boundaries[~_near(group.boundaries, group.all_events, window)]
    return away


def _clusters(trace: Trace, s: _Setup, gap: int) -> pl.DataFrame:
    """Every series' spikes merged into clusters (spikes less than ``gap`` apart), one row each."""
    found = spikes(
        trace, s.table, level=s.level, modules=s.modules, threshold=s.threshold, baseline_window=s.baseline
    )
    return cluster_spikes(found, s.keys, "pass" if s.level == "pass" else "epoch", gap)


def cluster_spikes(found: pl.DataFrame, keys: list[str], at: str, gap: int) -> pl.DataFrame:
    """Spikes (a frame with ``keys``, position column ``at`` and ``score``) merged per series: a spike
    less than ``gap`` after the previous one joins its cluster. One row per cluster: the keys,
    ``cluster``, ``onset``, ``end``, ``spikes``, ``peak_score``."""
    pos = pl.col(at).cast(pl.Int64)
    new = ((pos - pos.shift(1)).over(keys) >= gap).fill_null(True)
    return (
        found.sort(*keys, at)
        .with_columns(new.alias("_new"))
        .with_columns((pl.col("_new").cum_sum().over(keys) - 1).cast(pl.Int64).alias("cluster"))
        .group_by(*keys, "cluster", maintain_order=True)
        .agg(
            pos.first().alias("onset"),
            pos.last().alias("end"),
            pl.len().cast(pl.Int64).alias("spikes"),
            pl.col("score").get(pl.col("score").abs().arg_max()).alias("peak_score"),
        )
    )


def _onsets_by_sid(clusters: pl.DataFrame, info: SeriesInfo, keys: list[str]) -> dict[int, np.ndarray]:
    """Sorted cluster onsets per series id."""
    if clusters.height == 0:
        return {}
    joined = (
        clusters.join(info.keys.select("sid", *keys), on=keys, nulls_equal=True)
        .group_by("sid")
        .agg(pl.col("onset").sort())
    )
    return {int(sid): np.asarray(on, dtype=np.int64) for sid, on in joined.iter_rows()}


# ----------------------------------------------------------------------------------------------------------
# event_alignment


def _alignment(trace: Trace, event: str, windows: list[int], s: _Setup, placebo: bool) -> pl.DataFrame:
    info = series_info(trace, s.table, s.modules)
    groups = _groups_of(trace, info, event, s, placebo)
    counts = (
        spikes(
            trace,
            s.table,
            level=s.level,
            modules=s.modules,
            threshold=s.threshold,
            baseline_window=s.baseline,
        )
        .group_by(s.keys)
        .agg(pl.len().cast(pl.Int64).alias("spikes"))
    )
    points = info.keys.select("sid", pl.col("length" if s.level == "pass" else "epochs").alias("points"))
    blocks = []
    for w in windows:
        clusters = _clusters(trace, s, merge_gap(w, s.baseline))
        onsets = _onsets_by_sid(clusters, info, s.keys)
        rows = []
        for g in groups:
            rows.extend(_test_group(g, onsets, w, s, placebo))
        block = pl.DataFrame(rows, schema=_ROW_SCHEMA, orient="row")
        block = (
            info.keys.select("sid", *s.keys)
            .join(block, on="sid", how="left")
            .join(points, on="sid", how="left")
            .join(counts, on=s.keys, how="left", nulls_equal=True)
            .join(
                clusters.group_by(s.keys).agg(pl.len().cast(pl.Int64).alias("clusters")),
                on=s.keys,
                how="left",
                nulls_equal=True,
            )
            .with_columns(
                pl.col("spikes", "clusters", "points").fill_null(0), pl.lit(w, pl.Int64).alias("window")
            )
        )
        blocks.append(_with_q(block))
    table = pl.concat(blocks) if blocks else pl.DataFrame()
    if table.height == 0:
        return _empty_alignment(s)
    multi_run = table["run"].n_unique() > 1
    multi_rank = table["rank"].n_unique() > 1
    findings = [_finding(r, event, s, multi_run, multi_rank, placebo) for r in table.iter_rows(named=True)]
    return (
        table.with_columns(pl.Series("finding", findings, dtype=pl.String))
        .select(*s.keys, *_COLUMNS)
        .sort("window", *s.keys)
    )


_ROW_SCHEMA = {
    "sid": pl.UInt32,
    "events": pl.Int64,
    "events_followed": pl.Int64,
    "chance": pl.Float64,
    "p_value": pl.Float64,
    "p_floor": pl.Float64,
    "placebo_events": pl.Int64,
    "placebo_followed": pl.Int64,
    "placebo_chance": pl.Float64,
    "placebo_p": pl.Float64,
}

_COLUMNS = [
    "window",
    "events",
    "events_followed",
    "chance",
    "enrichment",
    "enrichment_lo",
    "enrichment_hi",
    "p_value",
    "p_floor",
    "q_value",
    "spikes",
    "clusters",
    "points",
    "placebo_events",
    "placebo_followed",
    "placebo_chance",
    "placebo_enrichment",
    "placebo_p",
    "placebo_q",
    "finding",
]


_TestResult = tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[None, None, None]
"""What :func:`_permutation_test` returns: per series observed counts, chance and p (None without events)."""

_AlignmentRow = tuple[
    int,
    int,
    int | None,
    float | None,
    float | None,
    float,
    int | None,
    int | None,
    float | None,
    float | None,
]
"""sid, events, followed, chance, p; the p floor; placebo events, followed, chance, p."""


def _test_group(
    g: _Group, onsets: dict[int, np.ndarray], window: int, s: _Setup, placebo: bool
) -> list[_AlignmentRow]:
    """The alignment rows of one (run, rank): the real event and, when asked, the placebo."""
    ons = [onsets.get(int(sid), np.zeros(0, dtype=np.int64)) for sid in g.sids]
    x = exclusion(window, s.baseline)
    events = g.events(window)
    real = _permutation_test(ons, events, g, window, x, s, stream=0)
    fake: _TestResult | None = None
    placebo_events = None
    if placebo:
        positions = _placebo_positions(g, window)
        placebo_events = positions.size
        fake = _permutation_test(ons, positions, g, window, x, s, stream=1, avoid=g.all_events)
    rows: list[_AlignmentRow] = []
    floor = 1.0 / (s.permutations + 1)
    for i, sid in enumerate(g.sids):
        tested = ons[i].size > 0
        r_k, r_chance, r_p = _pick(real, i, tested)
        p_k, p_chance, p_p = _pick(fake, i, tested) if fake is not None else (None, None, None)
        rows.append((int(sid), events.size, r_k, r_chance, r_p, floor, placebo_events, p_k, p_chance, p_p))
    return rows


def _permutation_test(
    onsets: list[np.ndarray],
    positions: np.ndarray,
    g: _Group,
    window: int,
    exclude: int,
    s: _Setup,
    *,
    stream: int,
    avoid: np.ndarray | None = None,
) -> _TestResult:
    """Observed counts, chance and p-values of one event train for every series of a group."""
    e = positions.size
    if e == 0:
        return None, None, None
    lo, hi = g.span(window)
    observed, null = jitter_test(
        onsets,
        positions,
        lo,
        hi,
        window=window,
        exclude=exclude,
        permutations=s.permutations,
        rng=_rng(s.seed, g.rank, stream),
        avoid=avoid,
    )
    return observed, null.mean(axis=1) / e, permutation_p(observed, null)


def jitter_test(
    onsets: Sequence[np.ndarray],
    events: np.ndarray,
    lo: int,
    hi: int,
    *,
    window: int,
    exclude: int,
    permutations: int,
    rng: np.random.Generator,
    gaps: float = JITTER_GAPS,
    avoid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The event test of several series sharing one event train: (observed T per series, shape (S,);
    T of each of the jittered trains, shape (S, B)). ``events`` sorted, within ``[lo, hi]``;
    ``avoid``: positions (sorted) whose ``window`` neighbourhood the jittered events must avoid."""
    events = np.asarray(events, dtype=np.int64)
    observed = null_counts(onsets, events[None, :], window)[:, 0]
    null = np.zeros((len(onsets), permutations), dtype=np.int64)
    # At most CHUNK positions exist at once (a run of thousands of short epochs has thousands of
    # placebo boundaries). The chunk size depends on E alone, so the draws stay deterministic.
    step = max(1, CHUNK // max(events.size, 1))
    for b0 in range(0, permutations, step):
        b1 = min(permutations, b0 + step)
        trains = jitter_trains(
            events,
            lo,
            hi,
            exclude=exclude,
            permutations=b1 - b0,
            rng=rng,
            gaps=gaps,
            avoid=avoid,
            avoid_radius=window,
        )
        null[:, b0:b1] = null_counts(onsets, trains, window)
    return observed, null


CHUNK = 4_000_000
"""Jittered event positions drawn and counted at once (about 100 MB of working memory)."""


def _pick(result: _TestResult, i: int, tested: bool) -> tuple[int | None, float | None, float | None]:
    if result[0] is None:  # no event in the span: none followed, nothing tested
        return 0, None, None
    observed, chance, p = result
    return int(observed[i]), float(chance[i]), (float(p[i]) if tested else None)


def _with_q(block: pl.DataFrame) -> pl.DataFrame:
    """Enrichment with its interval, and BH q-values for the real and the placebo tests of one block."""
    lo: list[float | None] = []
    hi: list[float | None] = []
    for k, e, chance in block.select("events_followed", "events", "chance").iter_rows():
        if k is None or not e or not chance:
            lo.append(None)
            hi.append(None)
            continue
        a, b = clopper_pearson(k, e)
        lo.append(a / chance)
        hi.append(b / chance)
    q = bh_qvalues(block["p_value"].fill_null(np.nan).to_numpy())
    q_placebo = bh_qvalues(block["placebo_p"].fill_null(np.nan).to_numpy())
    ratio = pl.when(pl.col("chance") > 0).then(
        pl.col("events_followed") / pl.col("events") / pl.col("chance")
    )
    placebo_ratio = pl.when(pl.col("placebo_chance") > 0).then(
        pl.col("placebo_followed") / pl.col("placebo_events") / pl.col("placebo_chance")
    )
    return block.with_columns(
        ratio.alias("enrichment"),
        pl.Series("enrichment_lo", lo, dtype=pl.Float64),
        pl.Series("enrichment_hi", hi, dtype=pl.Float64),
        pl.Series("q_value", q).fill_nan(None),
        placebo_ratio.alias("placebo_enrichment"),
        pl.Series("placebo_q", q_placebo).fill_nan(None),
    )


def _empty_alignment(s: _Setup) -> pl.DataFrame:
    schema: dict[str, type[pl.DataType]] = {k: (pl.Int32 if k == "rank" else pl.String) for k in s.keys}
    for c in _COLUMNS:
        schema[c] = (
            pl.String
            if c == "finding"
            else pl.Int64
            if c
            in (
                "window",
                "events",
                "events_followed",
                "spikes",
                "clusters",
                "points",
                "placebo_events",
                "placebo_followed",
            )
            else pl.Float64
        )
    return pl.DataFrame(schema=schema)


# ----------------------------------------------------------------------------------------------------------
# Sentences


def _label(row: dict[str, Any], table: str, multi_run: bool, multi_rank: bool) -> str:
    label = series_name(row, table)
    if table == "outputs" and row["split"] != "train":
        label += f" ({row['split']} passes)"
    if multi_rank:
        label += f" on rank {row['rank']}"
    if multi_run:
        label = f"{row['run']}: {label}"
    return label


def series_name(row: dict[str, Any], table: str) -> str:
    """A series as a sentence names it: ``module`` (outputs), ``module.param`` (params), ``kind of
    module[.param]`` (signals; the whole model, module "", is "the model")."""
    if table == "signals":
        where = ".".join(p for p in (row["module"], row["param"]) if p) or "the model"
        return f"{row['kind']} of {where}"
    return str(row["module"]) + (f".{row['param']}" if table == "params" else "")


def format_p(p: float, floor: float) -> str:
    """A p-value as the finding writes it: the floor named when reached, two significant digits else."""
    if p <= floor * (1 + 1e-9):
        return f"p ≤ {_num(floor)} (permutation floor)"
    return f"p = {_num(p)}"


def _num(x: float) -> str:
    """Two significant digits, written out (0.001, 0.012, 0.31, 1) down to 1e-4, as 2.3e-05 below."""
    if abs(x) < 1e-4 and x != 0:
        return f"{x:.2g}"
    return np.format_float_positional(x, precision=2, unique=True, fractional=False, trim="-")


def _times(x: float) -> str:
    return f"{x:.2g}×" if x < 10 else f"{x:.0f}×"


def _unit(window: int, level: str) -> str:
    if level == "pass":
        return "pass" if window == 1 else "passes"
    return "epoch" if window == 1 else "epochs"


def _finding(
    row: dict[str, Any], event: str, s: _Setup, multi_run: bool, multi_rank: bool, placebo: bool
) -> str:
    """One plain sentence: k of E events followed, local chance, enrichment, p, q, clusters, placebo."""
    label = _label(row, s.table, multi_run, multi_rank)
    n, c, e, k = row["spikes"], row["clusters"], row["events"], row["events_followed"]
    w = row["window"]
    if n == 0:
        return f"{label}: no spikes detected, so nothing to align with {event}"
    plural = "s" * (n != 1)
    if e == 0:
        return f"{label}: {n} spike{plural}, but no {event} events were recorded in its span"
    clusters = f"its {n} spike{plural} form{'s' * (n == 1)} {c} cluster{'s' * (c != 1)}"
    head = f"{label}: {k} of {e} {event} events are followed by a spike within {w} {_unit(w, s.level)}"
    chance = row["chance"]
    if not chance:
        stats = (
            f"(chance ≈ 0 in {s.permutations} jittered trains), {format_p(row['p_value'], row['p_floor'])}"
        )
    else:
        interval = ""
        if row["enrichment_lo"] is not None:
            interval = f" [{_times(row['enrichment_lo'])}–{_times(row['enrichment_hi'])}]"
        stats = (
            f"(chance {_pct(chance)}, {_times(row['enrichment'])}{interval}), "
            f"{format_p(row['p_value'], row['p_floor'])}"
        )
    q = f", q = {_num(row['q_value'])}" if row["q_value"] is not None else ""
    text = f"{head} {stats}{q}; {clusters}"
    if placebo and row["placebo_events"]:
        pk, pe = row["placebo_followed"], row["placebo_events"]
        pp = row["placebo_p"]
        pc = row["placebo_chance"]
        placebo_stats = (
            f"chance {_pct(pc)}, {format_p(pp, row['p_floor'])}" if pc else format_p(pp, row["p_floor"])
        )
        text += f". Placebo, the other {PLACEBO}: {pk} of {pe} followed ({placebo_stats})"
    return text


def _pct(x: float) -> str:
    return f"{100 * x:.2g}%"


# ----------------------------------------------------------------------------------------------------------
# event_steps and event_profile


@dataclass(frozen=True)
class _Levels:
    """One series at the analysis level: positions, values, the trailing median over (x - W, x], scale."""

    at: np.ndarray
    value: np.ndarray
    before: np.ndarray
    scale: float

    def locate(self, x: np.ndarray) -> np.ndarray:
        """Index of the last point at or before each position (-1 before the first)."""
        return np.searchsorted(self.at, x, "right") - 1

    def step(self, x: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
        """(after - before) / scale and after / before at positions x; NaN where a side has no point."""
        i = self.locate(x)
        j = self.locate(x + window)
        ok = (i >= 0) & (j > i)
        b = np.where(ok, self.before[np.maximum(i, 0)], np.nan)
        a = np.where(ok, self.before[np.maximum(j, 0)], np.nan)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (a - b) / self.scale, a / b


def _levels(series: Series, level: str, window: int) -> dict[int, _Levels]:
    """Every series at the level, with its trailing medians over ``window`` and its robust noise."""
    col = "pass" if level == "pass" else "epoch"
    frame = series.data if level == "pass" else epoch_means(series)
    finite = pl.when(pl.col("value").is_finite()).then(pl.col("value"))
    frame = frame.select(
        "sid",
        pl.col(col).cast(pl.Int64).alias("at"),
        finite.alias("value"),
    ).with_columns(
        pl.col("value").rolling_median_by("at", window_size=f"{window}i").over("sid").alias("before"),
    )
    out = {}
    for (sid,), part in frame.partition_by("sid", as_dict=True, maintain_order=True).items():
        value = part["value"].fill_null(np.nan).to_numpy()
        out[int(sid)] = _Levels(
            part["at"].to_numpy(), value, part["before"].fill_null(np.nan).to_numpy(), _noise(value)
        )
    return out


def _noise(value: np.ndarray) -> float:
    """The robust SD of a series' noise: 1.4826 x the MAD of its first differences / sqrt(2) (NaN values
    left out); computed per series with numpy, so that it does not depend on which other series are
    analysed with it. A series without noise gets a millionth of its level instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: no difference, no level
        d = np.diff(value)
        sc = float(np.nanmedian(np.abs(d - np.nanmedian(d))) * 1.4826 / math.sqrt(2)) if d.size else math.nan
        level = float(np.nanmedian(np.abs(value))) if value.size else math.nan
    if sc > 0:
        return sc
    return max(1e-12, 1e-6 * (0.0 if math.isnan(level) else level)) or 1e-12


def _steps(trace: Trace, event: str, window: int, s: _Setup) -> pl.DataFrame:
    info = series_info(trace, s.table, s.modules)
    groups = _groups_of(trace, info, event, s, boundaries=False)
    x = exclusion(window, s.baseline)
    tests: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}  # per sid: its events, jittered trains
    for g in groups:
        events = g.events(window)
        lo, hi = g.span(window)
        trains = None
        if events.size:
            trains = jitter_trains(
                events, lo, hi, exclude=x, permutations=s.permutations, rng=_rng(s.seed, g.rank, 0)
            )
        for sid in g.sids:
            tests[int(sid)] = (events, trains)
    results: dict[int, tuple[float | None, float | None, int, float | None]] = {}
    for series in complete_series(trace, s.table, s.modules):  # a group of whole series at a time
        for sid, lv in _levels(series, s.level, window).items():
            events, trains = tests[sid]
            if trains is not None:
                results[sid] = step_test(lv, events, trains, window)
    rows: list[tuple[int, int, float | None, float | None, int | None, float | None]] = []
    for g in groups:
        for sid in g.sids:
            events, _ = tests[int(sid)]
            found = results.get(int(sid))
            rows.append((int(sid), events.size, *(found or (None, None, None, None))))
    schema = {
        "sid": pl.UInt32,
        "events": pl.Int64,
        "step": pl.Float64,
        "step_change": pl.Float64,
        "steps_up": pl.Int64,
        "p_value": pl.Float64,
    }
    table = (
        info.keys.select("sid", *s.keys)
        .join(pl.DataFrame(rows, schema=schema, orient="row"), on="sid", how="left")
        .with_columns(
            pl.lit(window, pl.Int64).alias("window"),
            pl.lit(2.0 / (s.permutations + 1)).alias("p_floor"),
            pl.col("events").fill_null(0),
        )
    )
    table = table.with_columns(
        pl.Series("q_value", bh_qvalues(table["p_value"].fill_null(np.nan).to_numpy())).fill_nan(None)
    )
    multi_run = table["run"].n_unique() > 1
    multi_rank = table["rank"].n_unique() > 1
    findings = [_step_finding(r, event, s, multi_run, multi_rank) for r in table.iter_rows(named=True)]
    return (
        table.with_columns(pl.Series("finding", findings, dtype=pl.String))
        .select(
            *s.keys,
            "window",
            "events",
            "step",
            "step_change",
            "steps_up",
            "p_value",
            "p_floor",
            "q_value",
            "finding",
        )
        .sort(*s.keys)
    )


def step_test(
    lv: _Levels, events: np.ndarray, trains: np.ndarray, window: int
) -> tuple[float | None, float | None, int, float | None]:
    """(median step over events, median after/before − 1, events stepping up, two-sided p) of one
    series against jittered trains (shape (B, E)); None where no event has points on both sides."""
    step, ratio = lv.step(events, window)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no event had both sides
        observed = np.nanmedian(step)
        null = np.nanmedian(lv.step(trains, window)[0], axis=1)
        change = np.nanmedian(ratio) - 1
    null = null[~np.isnan(null)]
    p = float(permutation_p(observed, null, "two-sided")) if null.size and not np.isnan(observed) else None
    return _finite(observed), _finite(change), int(np.sum(step > 0)), p


def _finite(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _step_finding(row: dict[str, Any], event: str, s: _Setup, multi_run: bool, multi_rank: bool) -> str:
    label = _label(row, s.table, multi_run, multi_rank)
    w = row["window"]
    if not row["events"]:
        return f"{label}: no {event} events were recorded in its span"
    if row["p_value"] is None:
        return f"{label}: too few points around the {event} events to compare levels"
    direction = "higher" if row["step"] > 0 else "lower"
    change = row["step_change"]
    sd = f"{abs(row['step']):.2g} robust SD"
    if row["step"] == 0:  # "0 robust SD, 0% lower than" would claim a direction there is none of
        level = "the same as"
    elif change is not None and change >= 1:  # at least doubled: a factor reads better than "5.3e+02%"
        level = f"{sd} {direction}, {1 + change:.2g}× as high as"
    elif change is not None:
        level = f"{sd}, {abs(100 * change):.2g}% {direction} than"
    else:
        level = f"{sd} {direction} than"
    q = f", q = {_num(row['q_value'])}" if row["q_value"] is not None else ""
    return (
        f"{label}: the median level in the {w} {_unit(w, s.level)} after a {event} is {level} "
        f"in the {w} before (median over {row['events']} events; {row['steps_up']} up), "
        f"{format_p(row['p_value'], row['p_floor'])}{q}"
    )


def _profile(trace: Trace, event: str, window: int, s: _Setup, placebo: bool) -> pl.DataFrame:
    info = series_info(trace, s.table, s.modules)
    groups = _groups_of(trace, info, event, s, boundaries=placebo)
    offsets = np.arange(-window, window + 1)
    positions = {}  # per sid: its group's (kind, event positions)
    for g in groups:
        kinds = [("event", g.events(window))]
        if placebo:
            kinds.append(("placebo", _placebo_positions(g, window)))
        for sid in g.sids:
            positions[int(sid)] = [(kind, at) for kind, at in kinds if at.size]
    parts = []
    for series in complete_series(trace, s.table, s.modules):  # a group of whole series at a time
        for sid, lv in _levels(series, s.level, window).items():
            for kind, at in positions[sid]:
                parts.append(_profile_rows(lv, at, offsets, sid, kind))
    schema = {
        "sid": pl.UInt32,
        "kind": pl.String,
        "offset": pl.Int64,
        "events": pl.Int64,
        "mean": pl.Float64,
        "ci_lo": pl.Float64,
        "ci_hi": pl.Float64,
        "median": pl.Float64,
        "p25": pl.Float64,
        "p75": pl.Float64,
    }
    frame = pl.concat(parts) if parts else pl.DataFrame(schema=schema)
    return (
        info.keys.select("sid", *s.keys)
        .join(frame, on="sid", how="inner")
        .drop("sid")
        .sort(*s.keys, "kind", "offset")
    )


def _profile_rows(lv: _Levels, at: np.ndarray, offsets: np.ndarray, sid: int, kind: str) -> pl.DataFrame:
    """Per offset, statistics over events of the value there divided by the event's pre-event median."""
    x = at[:, None] + offsets[None, :]
    i = np.clip(np.searchsorted(lv.at, x, "left"), 0, len(lv.at) - 1)
    hit = lv.at[i] == x
    base = lv.before[np.clip(lv.locate(at), 0, None)]
    base = np.where(lv.locate(at) >= 0, base, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(hit, lv.value[i], np.nan) / base[:, None]
    v[~np.isfinite(v)] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        n = (~np.isnan(v)).sum(axis=0)
        mean = np.nanmean(v, axis=0)
        sd = np.nanstd(v, axis=0, ddof=1)
        half = 1.96 * sd / np.sqrt(np.maximum(n, 1))
        q25, q50, q75 = np.nanpercentile(v, [25, 50, 75], axis=0)
    return pl.DataFrame(
        {
            "sid": np.full(len(offsets), sid, dtype=np.uint32),
            "kind": [kind] * len(offsets),
            "offset": offsets.astype(np.int64),
            "events": n.astype(np.int64),
            "mean": mean,
            "ci_lo": mean - half,
            "ci_hi": mean + half,
            "median": q50,
            "p25": q25,
            "p75": q75,
        }
    ).with_columns(pl.col(pl.Float64).fill_nan(None))


# ----------------------------------------------------------------------------------------------------------
# spike_groups


def _groups(clusters: pl.DataFrame, s: _Setup, tolerance: int) -> pl.DataFrame:
    """Connected components of the 'same excursions' relation within each (run, rank)."""
    keys = s.keys
    schema: dict[str, pl.DataType | type[pl.DataType]] = {
        **{k: clusters.schema[k] for k in keys},
        "group": pl.Int64,
        "size": pl.Int64,
        "clusters": pl.Int64,
        "shared": pl.Float64,
    }
    per_series = clusters.group_by(keys, maintain_order=True).agg(pl.col("onset").sort())
    rows = []
    for _, part in per_series.group_by("run", "rank", maintain_order=True):
        labels = part.select(keys).rows()
        onsets = [np.asarray(o, dtype=np.int64) for o in part["onset"]]
        n = len(onsets)
        matched = [np.zeros(len(o), dtype=bool) for o in onsets]
        links = []
        for a in range(n):
            for b in range(a + 1, n):
                in_b = _near(onsets[a], onsets[b], tolerance)
                in_a = _near(onsets[b], onsets[a], tolerance)
                if (in_b if len(onsets[a]) <= len(onsets[b]) else in_a).mean() >= COINCIDENCE:
                    links.append((a, b))
                    matched[a] |= in_b
                    matched[b] |= in_a
        group = _components(n, links)
        sizes = np.bincount(group)
        for a in range(n):
            rows.append(
                (*labels[a], group[a], int(sizes[group[a]]), len(onsets[a]), float(matched[a].mean()))
            )
    return pl.DataFrame(rows, schema=schema, orient="row").sort("run", "rank", "group", *keys[2:])


def _components(n: int, links: list[tuple[int, int]]) -> list[int]:
    """Connected components of ``n`` nodes, numbered largest first (ties: by first member)."""
    parent = list(range(n))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in links:
        parent[root(a)] = root(b)
    roots = [root(a) for a in range(n)]
    order = sorted(set(roots), key=lambda r: (-roots.count(r), roots.index(r)))
    number = {r: i for i, r in enumerate(order)}
    return [number[r] for r in roots]
