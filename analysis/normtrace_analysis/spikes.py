"""Spike detection on each module's norm series (whether spikes follow an event is :mod:`.alignment`).

Detector (a Hampel filter): for every series (run, rank, module, split for outputs; run, rank, module,
param for params), ordered by pass, the baseline is the centred rolling median of ``baseline_window``
points, and the scale a rolling MAD (median absolute deviation from the baseline, times 1.4826 so that it
estimates a standard deviation for Gaussian noise) over ``SCALE_SPAN`` times as many points, computed at
block resolution: the median of the blocks' MADs, blocks of ``baseline_window // 4`` points (where that
MAD is 0, the root mean square deviation over the same blocks; a series of no more blocks than half a
span takes the median of all its blocks' MADs). A point is flagged when ``|value - baseline| / scale >
threshold``; NaN and ±Inf values are always flagged (score ±inf) and left out of every baseline.
Consecutive flagged points form one spike, reported at its peak (largest ``|score|``) with ``points`` =
how many points it spans. Because the window is centred, a level shift is absorbed into the baseline
within half a window: it yields at most one short spike, never a spike per point; an excursion shorter
than half a window is a spike.

Signals (run, rank, kind, module, param) of the kinds in :data:`.names.LOG_KINDS` (gradient norms,
update ratios) are scored on ``log10(value)``: they span orders of magnitude and their noise is
multiplicative, so a robust SD of the logs is a relative one, the same for a layer whose gradient is 1e-6
as for one whose gradient is 10. Their spikes' ``value`` and ``baseline`` are given back in the signal's
own units, ``score`` in robust SDs of log10; a zero (``log10`` is -inf) is flagged as a non-finite value
is. Other kinds are scored on their values.

Event timing: events are recorded between passes with the last pass started, so at level "pass" an event
precedes a spike when ``spike.pass > event.pass``; at level "epoch" an event of epoch ``e`` (a DQN's
target sync right after ``tick_epoch``) precedes the spikes of epoch ``e`` and later.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, cast

import numpy as np
import polars as pl
from numpy.lib.stride_tricks import sliding_window_view

from .errors import ShortSeriesWarning, caller_stacklevel
from .names import BASELINE_WINDOW, LOG_KINDS, SERIES_KEYS, SUMMARY_KEYS, THRESHOLD, Level, Table
from .series import Frame, Registry, epoch_series, scan
from .summary import Summary, summary_key

if TYPE_CHECKING:
    from .trace import Trace

__all__ = ["check_detector", "check_threshold", "spikes"]

SCALE_SPAN = 4
"""The scale (rolling MAD) spans this many baseline windows: noise levels change slowly, and a MAD of
only one window's points is so variable that on 1e5-point series it would flag pure noise."""

MAD_TO_SIGMA = 1.4826
"""Scales a median absolute deviation to a standard deviation for Gaussian noise."""

SCALE_FLOOR = 1e-4
"""Smallest scale relative to the baseline, so a flat series does not flag float rounding."""


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
        table: "outputs" (one series per run, rank, module and split), "params" (per run, rank,
            module and parameter) or "signals" (per run, rank, kind, module and parameter; the kinds of
            :data:`.names.LOG_KINDS` are scored on log10, see the module docstring).
        level: "pass" scores every recorded point; "epoch" the per-epoch means.
        modules: exact module names, or a regex searched in the name; None for all.
        threshold: robust z-score above which a point is flagged (default :data:`THRESHOLD`).
        baseline_window: points in the rolling median (default :data:`BASELINE_WINDOW` of the level).

    Returns:
        Columns: the series keys (``run``, ``rank``, [``kind``,] ``module``, ``split`` or ``param``), ``pass``
        (level "pass" only), ``epoch``, ``value``, ``baseline``, ``score`` (signed, in robust SDs; ±inf
        for NaN/Inf), ``points`` (consecutive flagged points merged into this spike), ``event``,
        ``event_pass``, ``event_epoch``, ``lag_passes`` (null at level "epoch"), ``lag_epochs`` (all
        null when no event precedes). Memoised per Trace.

    Example:
        ``na.load("runs/cartpole").spikes("outputs", level="pass", threshold=8)``
    """
    threshold = check_threshold(threshold)
    window = check_detector(table, level, baseline_window)
    key = ("spikes", table, level, _modules_key(modules), threshold, window)
    return trace.cached(key, lambda: _spikes(trace, table, level, modules, threshold, window))


def _spikes(
    trace: Trace, table: str, level: str, modules: Sequence[str] | str | None, threshold: float, window: int
) -> pl.DataFrame:
    if level == "pass":
        # The epoch summary of all modules costs a fraction of the reading it would repeat: compute it
        # on the side when the scan covers all modules and no summary is held yet.
        side = modules is None and not trace.is_cached(summary_key(table))

        def make(registry: Registry) -> list[_Detector | Summary]:
            log = _LogScale(lambda sid: registry.keys[sid][2]) if table == "signals" else None
            detector = _Detector(level, threshold, window, log)
            return [detector, Summary(registry)] if side else [detector]

        (detector, *summary), info = scan(trace, table, modules, make)
        assert isinstance(detector, _Detector)  # as make built them
        if summary:
            side_summary = summary[0]
            assert isinstance(side_summary, Summary)
            trace.cached(summary_key(table), lambda: side_summary.result(SUMMARY_KEYS[table]))
        keys = info.keys.select("sid", *SERIES_KEYS[table])
        lengths = info.keys["length"]
        found = detector.result()
    else:
        series = epoch_series(trace, table, modules)
        keys = series.keys
        lengths = series.data.group_by("sid").len()["len"]
        log = None
        if table == "signals":
            kind_of = dict(zip(keys["sid"].to_list(), keys["kind"].to_list(), strict=True))
            log = _LogScale(kind_of.__getitem__)
        found = _detect(series.data, level, threshold, window, log)
    _warn_if_too_short(lengths, level, window)
    found = found.join(keys, on="sid")
    return _attach_nearest_event(found, trace.events, table, level)


def _warn_if_too_short(lengths: pl.Series, level: str, window: int) -> None:
    """Say so when series have fewer points than the baseline window: their rolling median is their
    whole length, so a spike among a handful of epochs is not told from noise, and "0 spikes" would
    read as "nothing happened"."""
    lengths = lengths.filter(lengths > 0)
    short = int((lengths < window).sum())
    if short:
        unit = "epochs" if level == "epoch" else "points"
        hint = "use level='pass' (CLI: --level pass)" if level == "epoch" else "use a smaller baseline_window"
        least = int(cast(int, lengths.min()))  # an integer column with rows (short > 0)
        warnings.warn(
            f"{short} of {lengths.len()} series have fewer {unit} ({least} at least) than the "
            f"spike detector's baseline window of {window}: too few to tell a spike from noise; {hint}",
            ShortSeriesWarning,
            stacklevel=caller_stacklevel(),
        )


def check_detector(table: str, level: str, baseline_window: int | None) -> int:
    """Validate the detector's arguments; return the baseline window to use."""
    if table not in SERIES_KEYS:
        raise ValueError(f"spike detection works on {' or '.join(map(repr, SERIES_KEYS))}, not {table!r}")
    if level not in BASELINE_WINDOW:
        raise ValueError(f"level must be 'pass' or 'epoch', not {level!r}")
    window = BASELINE_WINDOW[level] if baseline_window is None else int(baseline_window)
    if window < 3:
        raise ValueError(f"baseline_window must be at least 3 points, got {window}")
    return window


def check_threshold(threshold: float | None) -> float:
    """The detector's threshold (:data:`THRESHOLD` for None), refused unless a positive finite number: at 0
    or below every point is a spike, and NaN flags none."""
    value = THRESHOLD if threshold is None else float(threshold)
    if not 0 < value < math.inf:
        raise ValueError(f"threshold must be a positive number of robust SDs, got {threshold!r}")
    return value


def _modules_key(modules: Sequence[str] | str | None) -> tuple[str, ...] | str | None:
    """A hashable form of a module filter, for memoising."""
    return modules if modules is None or isinstance(modules, str) else tuple(modules)


class _LogScale:
    """Which series are scored on log10 (signals of :data:`.names.LOG_KINDS`), by sid; ``kind_of`` names
    a sid's kind (the registry grows as a scan meets series, so flags are added as sids are asked for)."""

    def __init__(self, kind_of: Callable[[int], object]) -> None:
        self.kind_of = kind_of
        self.flags = np.zeros(0, dtype=bool)

    def __call__(self, sids: np.ndarray) -> np.ndarray:
        n = int(sids.max()) + 1 if len(sids) else 0
        if n > len(self.flags):
            new = [self.kind_of(i) in LOG_KINDS for i in range(len(self.flags), n)]
            self.flags = np.concatenate([self.flags, np.array(new, dtype=bool)])
        return cast(np.ndarray, self.flags[sids])  # numpy's stubs: an index array of unknown dtype gives Any


LOG_SCALE_FLOOR = SCALE_FLOOR / math.log(10)
"""The scale floor on log10 values: the same relative size, ``SCALE_FLOOR``, as a change of log10."""


def _detect(
    frame: pl.DataFrame, level: str, threshold: float, window: int, log: _LogScale | None = None
) -> pl.DataFrame:
    """Spikes of every series in ``frame`` (sid, [pass,] epoch, value; whole series, contiguous per sid,
    in time order): sid, [pass,] epoch, value, baseline, score, points."""
    sid = frame["sid"].to_numpy()
    heads = np.flatnonzero(np.concatenate([[True], sid[1:] != sid[:-1]])) if len(sid) else np.zeros(0, int)
    rows = np.concatenate([heads, [len(sid)]]).astype(np.int64)
    lengths = np.diff(rows)
    cols = {c: frame[c].to_numpy() for c in frame.columns}
    cols["pos"] = np.arange(len(sid)) - np.repeat(rows[:-1], lengths)
    none = np.zeros(len(heads), dtype=np.int64)
    whole = Frame(
        cols, sid[heads].astype(np.int64), rows, none, none, lengths, np.ones(len(heads), bool), none, None
    )
    detector = _Detector(level, threshold, window, log)
    detector.feed(whole)
    detector.finish()
    return detector.result()


PART_ROWS = 200_000
"""Frames of more rows than this are scored in parts (cut between series), one per Polars thread."""


class _Detector:
    """The detector as a consumer of :func:`.series.scan`: it scores each piece of the series in turn.

    A point's score depends on the points around it only: its baseline on half a window either side, its
    scale on the blocks within ``SCALE_SPAN / 2`` windows either side, and on the last median before a
    run of non-finite values (carried forward). So each series is scored in stretches: a frame holds the
    series from ``s`` (a few windows before the first point not scored yet, ``a``) to the last point
    read, ``e``; every point whose windows lie inside is scored (up to ``b``, about a window and a half
    before ``e`` unless the series ended), and the carried medians at the start of the next stretch are
    kept. Every score equals the one the whole series would give; a run of flags cut at ``b`` is joined
    again at the end.
    """

    def __init__(self, level: str, threshold: float, window: int, log: _LogScale | None = None) -> None:
        self.log = log  # which series are scored on log10 (None: none)
        self.threshold = threshold
        self.window = window
        self.half = window // 2
        self.lb = window - 1 - self.half  # points before p in the window that gives p's median
        self.block = max(1, window // 4)
        self.span = max(3, (SCALE_SPAN * window // self.block) | 1)
        self.lbs = self.span - 1 - self.span // 2
        self.lookback = self.lb + self.block * (self.lbs + 3)
        self.position = ["pass", "epoch"] if level == "pass" else ["epoch"]
        self.s = np.zeros(0, dtype=np.int64)  # per sid: first point of the stretch kept
        self.a = np.zeros(0, dtype=np.int64)  # per sid: first point not scored yet
        self.seed = np.zeros((0, 2))  # per sid: carried baseline and block MAD at the stretch's start
        self.found: list[pl.DataFrame] = []
        self.pool: ThreadPoolExecutor | None = None

    def feed(self, frame: Frame) -> np.ndarray:
        n = int(frame.sids.max()) + 1 if len(frame.sids) else 0
        if n > len(self.s):
            grow = n - len(self.s)
            self.s = np.concatenate([self.s, np.zeros(grow, dtype=np.int64)])
            self.a = np.concatenate([self.a, np.zeros(grow, dtype=np.int64)])
            self.seed = np.concatenate([self.seed, np.full((grow, 2), np.nan)])
        cols = {c: frame.cols[c] for c in ("pos", "value", *self.position)}
        if self.log is not None:
            on_log = frame.per_row(self.log(frame.sids))
            with np.errstate(divide="ignore", invalid="ignore"):  # log10(0) = -inf: flagged as non-finite
                cols["value"] = np.where(on_log, np.log10(cols["value"]), cols["value"])
            cols["_log"] = on_log
        rows = frame.rows
        s = self.s[frame.sids]
        # Another consumer may keep more of a series (or all that is left of one that this one is done
        # with): start where this one's stretch does.
        if (frame.start < s).any():
            keep = cols["pos"] >= frame.per_row(s)
            cols = {c: v[keep] for c, v in cols.items()}
            live = frame.end > s
            rows = np.concatenate([[0], np.cumsum((frame.end - s)[live])])
        else:
            live = np.ones(len(s), dtype=bool)
        sids, s, end, ended = frame.sids[live], s[live], frame.end[live], frame.ended[live]
        if not len(sids):
            return cast(np.ndarray, self.s[frame.sids].copy())  # as below
        segments = np.arange(len(sids))
        parts = [segments]
        threads = pl.thread_pool_size()
        if rows[-1] > PART_ROWS and threads > 1 and len(sids) > 1:
            cuts = np.searchsorted(rows[1:-1], np.arange(1, threads) * rows[-1] / threads)
            parts = [p for p in np.split(segments, np.unique(cuts)) if len(p)]
        jobs = [
            (
                {c: v[rows[p[0]] : rows[p[-1] + 1]] for c, v in cols.items()},
                rows[p[0] : p[-1] + 2] - rows[p[0]],
                s[p],
                end[p],
                ended[p],
                self.a[sids[p]],
                self.seed[sids[p]],
            )
            for p in parts
        ]
        # The first part on this thread, the others on threads kept for the whole scan: threads made
        # anew for every frame took fresh memory from the system for each part's arrays (page faults:
        # a fifth of the detector's time on the benchmark trace).
        others = [self._helpers().submit(self._score, *job) for job in jobs[1:]]
        results = [self._score(*jobs[0]), *(other.result() for other in others)]
        for p, (found, b, s_next, seed) in zip(parts, results, strict=True):
            if found.height:
                found = found.with_columns(pl.Series("sid", sids[p], dtype=pl.UInt32).gather(found["_seg"]))
                self.found.append(found.drop("_seg"))
            self.a[sids[p]] = b
            self.s[sids[p]] = s_next
            self.seed[sids[p]] = seed
        return cast(np.ndarray, self.s[frame.sids].copy())  # numpy's stubs: Any (an index of unknown dtype)

    def _helpers(self) -> ThreadPoolExecutor:
        """The threads that score the frame's other parts (made on first use, ended by :meth:`finish`;
        a scan that fails ends them when the detector is collected)."""
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max(1, pl.thread_pool_size() - 1), "normtrace-spikes")
        return self.pool

    def finish(self) -> None:
        """The spikes are read by :meth:`result`; the helper threads end here."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def result(self) -> pl.DataFrame:
        """Spikes: sid, [pass,] epoch, value, baseline, score, points (runs of flags cut between
        stretches joined again, at their peak)."""
        schema = pl.Schema(
            {
                "sid": pl.UInt32,
                **dict.fromkeys(self.position, pl.Int64),
                "epoch": pl.Int32,
                "value": pl.Float64,
                "baseline": pl.Float64,
                "score": pl.Float64,
                "points": pl.Int64,
            }
        )
        if not self.found:
            return pl.DataFrame(schema=schema)
        found = pl.concat(self.found, how="vertical_relaxed").sort("sid", "_first")
        joined = (pl.col("sid") != pl.col("sid").shift(1)) | (
            pl.col("_first") != pl.col("_last").shift(1) + 1
        )
        peak = pl.col("score").abs().arg_max()
        out = (
            found.with_columns(joined.fill_null(True).cum_sum().alias("_run"))
            .group_by("_run", maintain_order=True)
            .agg(
                pl.col("sid").first(),
                *[pl.col(c).get(peak) for c in [*self.position, "value", "baseline", "score"]],
                pl.col("points").sum(),
            )
            .drop("_run")
        )
        if self.log is not None:  # back from log10 to the signal's own units
            on_log = pl.Series(self.log(out["sid"].to_numpy().astype(np.int64)))
            out = out.with_columns(
                pl.when(on_log).then(10.0 ** pl.col(c)).otherwise(pl.col(c)).alias(c)
                for c in ("value", "baseline")
            )
        return out.select(list(schema)).cast(schema)

    def _score(
        self,
        cols: dict[str, np.ndarray],
        rows: np.ndarray,
        s: np.ndarray,
        e: np.ndarray,
        ended: np.ndarray,
        a: np.ndarray,
        seed: np.ndarray,
    ) -> tuple[pl.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
        """Score the stretches [s, e) of some series (numpy ``cols``): the spikes among points [a, b),
        b, and the next stretch's start and carried medians. numpy for the arithmetic, Polars for the
        medians; NaN stands for "no value" throughout."""
        half, lb, block, span, lbs = self.half, self.lb, self.block, self.span, self.lbs
        counts = np.diff(rows)
        xm = np.where(s == 0, 0, s + lb)  # first point with its baseline known
        vend = np.where(ended, e, e - half)  # one past the last such point
        nb = -(-e // block)
        bs = -(-xm // block)  # first block whose points all have their baseline
        bve = np.where(ended, nb, vend // block)
        ms = np.where(s == 0, 0, bs + lbs)  # first block with its MAD known
        me = np.where(ended, nb, bve - span // 2)
        b = np.maximum(a, np.where(ended, e, np.minimum(vend, me * block)))
        lo = np.maximum(xm, ms * block)
        if ((a < b) & (a < lo)).any():
            raise AssertionError("the detector's stretch starts too late")  # a bug, not bad data
        s_next = np.where(ended, e, np.maximum(s, np.maximum(b - self.lookback, 0) // block * block))
        if not ((b > a) | (s_next > s)).any():
            return pl.DataFrame(), b, s, seed
        value = cols["value"]
        pos = cols["pos"]
        finite = np.isfinite(value)
        x = value if finite.all() else np.where(finite, value, np.nan)
        baseline = _centred_median(x, rows, s, s, e, seed[:, 0], self.window)
        with np.errstate(invalid="ignore"):
            absdev = np.subtract(x, baseline)
        np.abs(absdev, out=absdev)
        # Rolling MAD at block resolution: the median absolute deviation of each block of ``block``
        # points, then the centred rolling median of those over the blocks spanning SCALE_SPAN windows.
        per_block = nb - s // block
        block_rows = np.concatenate([[0], np.cumsum(per_block)])
        sizes = np.full(int(block_rows[-1]), block, dtype=np.int64)
        sizes[block_rows[1:] - 1] = counts - block * (per_block - 1)  # each stretch's last block
        block_mad = _block_medians(absdev, rows, block_rows, block)
        block_pos = np.repeat(s // block - block_rows[:-1], per_block) + np.arange(len(sizes))
        # Blocks before a stretch's first complete one are never used: give them a number, not NaN
        # (Polars' rolling median takes a much slower path as soon as a column has a null).
        block_mad[block_pos < np.repeat(bs, per_block)] = 0.0
        mad = _centred_median(block_mad, block_rows, s // block, bs, bve, seed[:, 1], span)
        # A whole series of too few blocks for a rolling MAD (no more than half a span: the rolling median
        # needs one more, so every one would be missing) takes the median of all its blocks' MADs.
        for i in np.flatnonzero((s == 0) & ended & (nb <= span // 2)):
            own = block_mad[block_rows[i] : block_rows[i + 1]]
            mad[block_rows[i] : block_rows[i + 1]] = np.nanmedian(own) if (~np.isnan(own)).any() else np.nan
        sigma = mad * MAD_TO_SIGMA
        flat = mad == 0
        if flat.any():  # most points exactly on the baseline: the root mean square deviation there instead
            where = np.unique(np.repeat(np.arange(len(per_block)), per_block)[flat])  # the stretches
            rms = _rms_deviations(absdev, rows, block_rows, block, span, where)
            sigma[flat] = rms[flat]
        scale = np.repeat(sigma, sizes)
        floor = np.abs(baseline)
        np.multiply(floor, SCALE_FLOOR, out=floor)
        if "_log" in cols:
            floor[cols["_log"]] = LOG_SCALE_FLOOR
        np.fmax(scale, floor, out=scale)
        np.fmax(scale, 1e-300, out=scale)
        # |score| = |value - baseline| / scale, in the deviations' place (each point's deviation is not
        # needed again); the signed score only where it is flagged. NaN (no baseline yet) is never flagged.
        with np.errstate(invalid="ignore", divide="ignore"):
            np.divide(absdev, scale, out=absdev)
            flag = absdev > self.threshold
        if not finite.all():
            flag |= ~finite
        at = np.flatnonzero(flag)
        seg = np.searchsorted(rows, at, "right") - 1
        at = at[(pos[at] >= a[seg]) & (pos[at] < b[seg])]  # scored in this stretch
        seg = np.searchsorted(rows, at, "right") - 1
        found = pl.DataFrame()
        if at.size:
            with np.errstate(invalid="ignore", divide="ignore"):
                score = (value[at] - baseline[at]) / scale[at]
            bad = ~finite[at]
            score[bad] = np.where(value[at][bad] < 0, -math.inf, math.inf)
            run = np.concatenate([[True], (at[1:] != at[:-1] + 1) | (pos[at[1:]] == a[seg[1:]])])
            flagged = pl.DataFrame({c: cols[c][at] for c in (*self.position, "value", "pos")}).with_columns(
                pl.Series("_seg", seg, dtype=pl.UInt32),
                pl.Series("baseline", baseline[at]).fill_nan(None),
                pl.Series("score", score),
                pl.Series("_spike", np.cumsum(run)),
            )
            peak = pl.col("score").abs().arg_max()
            found = (
                flagged.group_by("_spike", maintain_order=True)
                .agg(
                    pl.col("_seg").first(),
                    *[pl.col(c).get(peak) for c in [*self.position, "value", "baseline", "score"]],
                    pl.len().cast(pl.Int64).alias("points"),
                    pl.col("pos").first().alias("_first"),
                    pl.col("pos").last().alias("_last"),
                )
                .drop("_spike")
            )
        # What the next stretch, from s_next, carries in: the baseline just before its first known
        # baseline, and the block MAD just before its first known one.
        new_seed = seed.copy()
        moved = np.flatnonzero((s_next > s) & ~ended)
        if moved.size:
            xm_next = s_next[moved] + lb
            new_seed[moved, 0] = baseline[rows[moved] + (xm_next - 1 - s[moved])]
            ms_next = -(-xm_next // block) + lbs
            new_seed[moved, 1] = mad[block_rows[moved] + (ms_next - 1 - s[moved] // block)]
        return found, b, s_next, new_seed


def _rms_deviations(
    absdev: np.ndarray, rows: np.ndarray, block_rows: np.ndarray, block: int, span: int, where: np.ndarray
) -> np.ndarray:
    """Per block of the stretches ``where`` (as in :func:`_block_medians`; NaN elsewhere), the root mean
    square of the known deviations over the ``span`` blocks centred on it, the window cut at the
    stretch's ends. A scored block's window lies within the stretch's blocks whose every point has its
    baseline (as its rolling MAD's does), and is cut only at a series' own ends, so it is the whole
    series' window. Summed window by window: no running sum to lose precision."""
    counts = np.diff(rows)
    block_of = (
        np.repeat(block_rows[:-1], counts) + (np.arange(len(absdev)) - np.repeat(rows[:-1], counts)) // block
    )
    known = ~np.isnan(absdev)
    nblocks = int(block_rows[-1])
    squares = np.bincount(block_of, weights=np.where(known, absdev, 0.0) ** 2, minlength=nblocks)
    found = np.bincount(block_of, weights=known, minlength=nblocks)
    out = np.full(nblocks, np.nan)
    half = span // 2
    for b0, b1 in zip(block_rows[where], block_rows[where + 1], strict=True):
        total = sliding_window_view(np.pad(squares[b0:b1], half), span).sum(axis=1)
        number = sliding_window_view(np.pad(found[b0:b1], half), span).sum(axis=1)
        with np.errstate(invalid="ignore"):  # 0/0 where a window holds no known value: NaN
            out[b0:b1] = np.sqrt(total / number)
    return out


def _block_medians(x: np.ndarray, rows: np.ndarray, block_rows: np.ndarray, block: int) -> np.ndarray:
    """The median of each block of ``block`` consecutive values of each stretch (stretch i in
    ``rows[i]:rows[i+1]``, its blocks ``block_rows[i]:block_rows[i+1]``, the last one shorter), NaN left
    out (NaN where a block has none): Polars' median, the two middle values' midpoint written
    ``lo + (hi - lo) / 2``, over a sort of the values laid into a (blocks, block) array, NaN-padded."""
    padded = np.empty((int(block_rows[-1]), block))
    flat = padded.reshape(-1)
    for r0, r1, b0, b1 in zip(
        rows[:-1], rows[1:], block_rows[:-1] * block, block_rows[1:] * block, strict=True
    ):
        flat[b0 : b0 + r1 - r0] = x[r0:r1]  # a stretch's values, then NaN to its last block's end
        flat[b0 + r1 - r0 : b1] = np.nan
    padded.sort(axis=1)  # NaN last
    c = block - np.isnan(padded).sum(axis=1)
    k = np.arange(len(padded))
    lo = padded[k, np.maximum(c - 1, 0) // 2]
    hi = padded[k, c // 2 - (c == 0)]
    return cast(np.ndarray, lo + (hi - lo) / 2)  # numpy's stubs: Any (arithmetic on arrays of unknown dtype)


def _centred_median(
    x: np.ndarray,
    rows: np.ndarray,
    p0: np.ndarray,
    xs: np.ndarray,
    xe: np.ndarray,
    seed: np.ndarray,
    window: int,
) -> np.ndarray:
    """Centred rolling median of ``x`` within each stretch of a series, carried forward over gaps.

    ``x`` (NaN: no value) holds stretches of series, stretch i in ``rows[i]:rows[i+1]`` at consecutive
    positions (indices in the series) from ``p0[i]`` on; its values are known for positions
    [xs[i], xe[i]) (``xs`` 0 when the stretch starts the series); ``seed[i]`` is the result just
    before the first position the stretch can give (NaN: none). The result at p is the median of the
    values at p - (window - 1 - half) … p + half (a window centred on p; at the start of a series,
    fewer) when at least half a window of them are numbers, else the last such median before p; NaN
    where no median is known yet and before ``xs + window - 1 - half`` (the window would reach before
    ``xs``). From ``xe - half`` on (windows reaching past ``xe``) the last median is carried: right at
    the end of a series, not to be used where the series goes on.

    On whole series this is ``x.rolling_median(window).shift(-half).forward_fill().over("sid")``, but
    cheaper: one trailing median over the whole column (shifted back by half a window, which centres
    it), with the first half-window of each series, whose windows would reach into the previous series,
    recomputed.
    """
    half = window // 2
    n = len(x)
    counts = np.diff(rows)
    gaps = bool(np.isnan(x).any())
    # Without a gap every full window is complete, and the windows shorter than half of one are those
    # reaching before a stretch (not used) or at a series' start (recomputed below): no nulls needed,
    # which keeps Polars on its fast path.
    column = x
    if not gaps and window % 2:
        # Then every median used is that of a full window, an odd number of values: one of them. On
        # values float32 holds exactly (the recorder's norms) Polars finds the same one ~13% faster.
        narrow = x.astype(np.float32)
        if np.array_equal(narrow, x):
            column = narrow
    med = (
        pl.Series(column, nan_to_null=gaps)
        .rolling_median(window, min_samples=half + 1 if gaps else 1)
        .to_numpy()
    )
    m = np.full(n, np.nan)
    m[: max(n - half, 0)] = med[half:]
    first = np.where(xs == 0, 0, xs + window - 1 - half)
    lo = np.clip(np.maximum(first, half) - p0, 0, counts)  # per stretch, its rows with a centred median
    hi = np.clip(xe - half - p0, lo, counts)
    for i in range(len(counts)):
        m[rows[i] : rows[i] + lo[i]] = np.nan
        m[rows[i] + hi[i] : rows[i + 1]] = np.nan
    for j in np.flatnonzero(xs == 0):  # the first half-window of a series: its own partial windows
        r0 = rows[j]
        head = x[r0 : r0 + min(window, counts[j])]
        trailing = pl.Series(head, nan_to_null=True).rolling_median(window, min_samples=half + 1).to_numpy()
        k = np.arange(min(half, len(head)))
        k = k[k + half < min(len(head), xe[j] - p0[j])]
        m[r0 + k] = trailing[k + half]
    start = np.clip(first - p0, 0, counts)  # first row where a value (median or carried) is due
    if gaps or ((xs == 0) & (xe - p0 < window)).any():
        # carry the last median over windows with too few values (a gap, a series shorter than a
        # window), and from the seed
        known = np.where(np.isnan(m), -1, np.arange(n))
        np.maximum.accumulate(known, out=known)
        own = known >= np.repeat(rows[:-1], counts)
        out = np.where(own, m[np.maximum(known, 0)], np.repeat(seed, counts))
        for i in range(len(counts)):
            out[rows[i] : rows[i] + start[i]] = np.nan
        return out
    for i in range(len(counts)):  # every median is known: carry the last one over the stretch's end
        end = rows[i] + max(hi[i], start[i])
        m[end : rows[i + 1]] = m[end - 1] if end > rows[i] + start[i] else seed[i]
    return m


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
