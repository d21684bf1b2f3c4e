"""Per-epoch statistics of each module's ``value`` (raw L2 norm or RMS view, as the Trace was loaded).

Computed as the series are read (:func:`.series.scan`): an epoch is summarised once it is complete on
every rank (the ranks of a run are read side by side), so what is held is the epoch under way. Memoised
per Trace; the spike detector's scan of all modules computes it on the side, since the summary costs a
fraction of the reading it would otherwise repeat.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from .names import SUMMARY_KEYS, Table
from .series import Frame, Registry, scan, settled_bounds

if TYPE_CHECKING:
    from .trace import Trace

STATS = ["count", "mean", "std", "min", "max", "p05", "p50", "p95", "nonfinite"]
QUANTILES = (0.05, 0.50, 0.95)


def epoch_summary(trace: Trace, table: Table = "outputs") -> pl.DataFrame:
    """One row per (run, epoch, module, split) for outputs, (run, epoch, module, param) for params, or
    (run, epoch, kind, module, param) for signals (every kind; filter the Trace with ``kinds=`` for some).

    Columns: the keys, then ``count`` (rows), ``mean``, ``std`` (sample, ddof=1; null for one row),
    ``min``, ``max``, ``p05``, ``p50``, ``p95`` (linear interpolation, as ``numpy.percentile``) of
    ``value`` over the epoch's rows, and ``nonfinite`` (NaN/Inf rows, which make mean and std NaN).
    For outputs the mean is the mean over the epoch's recorded passes of the batch-mean norm.
    """
    if table not in SUMMARY_KEYS:
        raise ValueError(f"epoch_summary works on {' or '.join(map(repr, SUMMARY_KEYS))}, not {table!r}")

    def compute() -> pl.DataFrame:
        (summary,), _ = scan(trace, table, None, lambda registry: [Summary(registry)])
        return summary.result(SUMMARY_KEYS[table])

    return trace.cached(summary_key(table), compute)


def summary_key(table: str) -> tuple[str, str]:
    """The key under which a Trace memoises ``epoch_summary(table)`` (a scan of the table's series for
    something else may compute it on the side: see :func:`.spikes.spikes`)."""
    return ("epoch_summary", table)


class Summary:
    """Consumer: the statistics of every complete epoch of every summary group (a module's series of all
    ranks pooled), rows of a pooled group in rank order, each rank's in pass order."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.done = np.zeros(0, dtype=np.int64)  # per sid: first pos not summarised
        self.parts: list[pl.DataFrame] = []

    def feed(self, frame: Frame) -> np.ndarray:
        if len(self.registry) > len(self.done):
            grow = len(self.registry) - len(self.done)
            self.done = np.concatenate([self.done, np.zeros(grow, dtype=np.int64)])
        lo, hi, need = settled_bounds(frame, self.done[frame.sids])
        self.done[frame.sids] = need
        if (hi > lo).any():
            self.parts.append(self._stats(frame, lo, hi))
        return need

    def _stats(self, frame: Frame, lo: np.ndarray, hi: np.ndarray) -> pl.DataFrame:
        """The statistics of the groups in rows ``lo:hi`` of each segment (whole epochs)."""
        seg = np.flatnonzero(hi > lo)
        lo, hi = lo[seg], hi[seg]
        group = np.asarray(self.registry.group, dtype=np.uint64)[frame.sids[seg]]
        values, epochs = (
            np.concatenate([column[a:b] for a, b in zip(lo, hi, strict=True)])
            for column in (frame.cols["value"], frame.cols["epoch"])
        )
        seg_start = np.concatenate([[0], np.cumsum(hi - lo)])
        back = epochs[1:] < epochs[:-1]
        back[seg_start[1:-1] - 1] = False  # from one segment to the next
        if len(np.unique(group)) == len(group) and not back.any():
            # One series per group, epochs in order: a group's rows are a run of its segment, in place.
            new = np.empty(len(values), dtype=bool)
            np.not_equal(epochs[1:], epochs[:-1], out=new[1:])
            new[seg_start[:-1]] = True  # row 0 among them
            starts = np.flatnonzero(new)
            of = np.searchsorted(seg_start, starts, "right") - 1
            g = (group[of] << np.uint64(32)) + epochs[starts].astype(np.uint64)
        else:
            # Pooled ranks (or an epoch met again on the out-of-order path, whole series): each group's
            # rows brought together, in rank order, each rank's in pass order.
            rank = np.array([self.registry.keys[s][1] for s in frame.sids[seg]], dtype=np.int32)
            segment = np.repeat(np.arange(len(seg)), hi - lo)
            rows = pl.DataFrame(
                {
                    "g": (group[segment] << np.uint64(32)) + epochs.astype(np.uint64),
                    "rank": rank[segment],
                    "value": values,
                }
            ).sort("g", "rank", maintain_order=True)
            per_row, values = rows["g"].to_numpy(), rows["value"].to_numpy()
            starts = np.flatnonzero(np.concatenate([[True], per_row[1:] != per_row[:-1]]))
            g = per_row[starts]
        sizes = np.diff(np.append(starts, len(values)))
        moments = _moments(values, starts, sizes)
        sized = _order_statistics(values, starts, sizes)
        if sized is None:  # groups of very unequal size, or NaN: Polars sorts each group
            v = pl.col("value")
            order = (
                pl.DataFrame({"g": np.repeat(g, sizes), "value": values})
                .with_columns(pl.col("g").set_sorted())
                .group_by("g", maintain_order=True)
                .agg(
                    v.min().alias("min"),
                    v.max().alias("max"),
                    *(v.quantile(q, "linear").alias(f"p{round(100 * q):02d}") for q in QUANTILES),
                )
                .drop("g")
            )
        else:
            order = pl.DataFrame(sized)
        stats = pl.concat([pl.DataFrame({"g": g, **moments}), order], how="horizontal").select("g", *STATS)
        return stats.with_columns(pl.when(pl.col("count") > 1).then("std").alias("std"))  # one row: null

    def finish(self) -> None:
        """The statistics are read by :meth:`result`."""

    def result(self, keys: list[str]) -> pl.DataFrame:
        names = (
            self.registry.frame()
            .with_columns(pl.Series("group", self.registry.group, dtype=pl.UInt64))
            .unique("group", keep="first", maintain_order=True)
            .select("group", *keys)
        )
        schema = {"g": pl.UInt64, "count": pl.Int64, **dict.fromkeys(STATS[1:-1], pl.Float64)}
        stats = (
            pl.concat(self.parts) if self.parts else pl.DataFrame(schema={**schema, "nonfinite": pl.Int64})
        )
        return (
            stats.with_columns(
                (pl.col("g") // (1 << 32)).alias("group"),
                (pl.col("g") % (1 << 32)).cast(pl.Int32).alias("epoch"),
            )
            .join(names, on="group")
            .select(*keys[:1], "epoch", *keys[1:], *STATS)
            .sort(*keys, "epoch")
        )


def _moments(values: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> dict[str, np.ndarray]:
    """count, mean, std (sample, two passes as numpy's; NaN for one row) and nonfinite of every group of
    rows (``starts``, ``sizes``): numpy sums over each group's own rows, so that a group's figures do not
    depend on where it lies in the piece or what else the piece holds."""
    count = sizes.astype(np.int64)
    with np.errstate(invalid="ignore"):  # inf - inf, and 0 / 0 for one row: NaN, as numpy gives
        mean = np.add.reduceat(values, starts) / count
        if (sizes == sizes[0]).all():  # groups of one size (whole epochs): the means broadcast
            deviation = (values.reshape(len(sizes), -1) - mean[:, None]).reshape(-1)
        else:
            deviation = values - np.repeat(mean, sizes)
        np.multiply(deviation, deviation, out=deviation)
        std = np.sqrt(np.add.reduceat(deviation, starts) / (count - 1))
    bad = np.flatnonzero(~np.isfinite(values))  # rare: counted where they are
    nonfinite = np.bincount(np.searchsorted(starts, bad, "right") - 1, minlength=len(starts)).astype(np.int64)
    return {"count": count, "mean": mean, "std": std, "nonfinite": nonfinite}


def _order_statistics(
    values: np.ndarray, starts: np.ndarray, sizes: np.ndarray
) -> dict[str, np.ndarray] | None:
    """min, max and the quantiles of every group of rows (``starts``, ``sizes``), from one numpy sort of
    the groups padded into rows of equal length: what Polars gives (min and max leave NaN out; a quantile
    interpolates linearly, ``lo + (hi - lo) * frac`` with ``frac`` from ``(n - 1) * q``), several times
    faster than its per-group sorts. None when a value is NaN (Polars sorts NaN last among the values,
    numpy after the padding) or the groups are so unequal that padding would cost more than it saves."""
    width = int(sizes.max())
    if np.isnan(values).any() or width * len(sizes) > 2 * len(values):
        return None
    padded = np.full((len(sizes), width), np.inf)
    if (sizes == width).all():
        padded[:] = values.reshape(-1, width)
    else:
        within = np.arange(len(values)) - np.repeat(starts, sizes)
        padded.reshape(-1)[np.repeat(np.arange(len(sizes)) * width, sizes) + within] = values
    padded.sort(axis=1)  # the padding (+inf) after the values, equal +inf values alike
    k = np.arange(len(sizes))
    out = {"min": padded[:, 0].copy(), "max": padded[k, sizes - 1]}
    with np.errstate(invalid="ignore"):  # inf - inf where both neighbours are inf: taken as is below
        for q in QUANTILES:
            at = (sizes - 1) * q
            lo = np.floor(at).astype(np.int64)
            hi = np.ceil(at).astype(np.int64)
            a, b = padded[k, lo], padded[k, hi]
            out[f"p{round(100 * q):02d}"] = np.where(a == b, a, (at - lo) * (b - a) + a)
    return out
