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
from .series import Frame, Registry, scan, settled_rows

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
        take, need = settled_rows(frame, self.done[frame.sids])
        self.done[frame.sids] = need
        if take.any():
            self.parts.append(self._stats(frame, take))
        return need

    def _stats(self, frame: Frame, take: np.ndarray) -> pl.DataFrame:
        group = np.asarray(self.registry.group, dtype=np.uint64)[frame.sids]
        rank = np.array([self.registry.keys[s][1] for s in frame.sids], dtype=np.int32)
        segment = frame.segment[take]
        g = (group[segment] << np.uint64(32)) + frame.cols["epoch"][take].astype(np.uint64)
        rows = pl.DataFrame({"g": g, "rank": rank[segment], "value": frame.cols["value"][take]})
        # Epochs never decrease along a series, so (group, epoch) packed in one integer is sorted when
        # each group is one series: Polars then groups contiguous slices instead of hashing. Pooled
        # ranks are brought together, in rank order.
        if not rows["g"].is_sorted():
            rows = rows.sort("g", "rank", maintain_order=True)
        v = pl.col("value")
        moments = [
            pl.len().cast(pl.Int64).alias("count"),
            v.mean().alias("mean"),
            # two passes, as numpy does: Polars' own std of a group varies in the last bit with the
            # group's place in memory, which would make the result depend on the piece size
            pl.when(pl.len() > 1).then(((v - v.mean()).pow(2).sum() / (pl.len() - 1)).sqrt()).alias("std"),
            (~v.is_finite()).sum().cast(pl.Int64).alias("nonfinite"),
        ]
        order = [
            v.min().alias("min"),
            v.max().alias("max"),
            *(v.quantile(q, "linear").alias(f"p{round(100 * q):02d}") for q in QUANTILES),
        ]
        rows = rows.with_columns(pl.col("g").set_sorted())
        values = rows["value"].to_numpy()
        sized = _order_statistics(rows["g"].to_numpy(), values)
        if sized is None:  # groups of very unequal size, or NaN: Polars sorts each group
            return rows.lazy().group_by("g").agg(*moments, *order).collect().select("g", *STATS)
        stats = rows.lazy().group_by("g", maintain_order=True).agg(*moments).collect()
        return stats.with_columns(pl.Series(k, v) for k, v in sized.items()).select("g", *STATS)

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


def _order_statistics(g: np.ndarray, values: np.ndarray) -> dict[str, np.ndarray] | None:
    """min, max and the quantiles of every group of rows (``g`` sorted), from one numpy sort of the
    groups padded into rows of equal length: what Polars gives (min and max leave NaN out; a quantile
    interpolates linearly, ``lo + (hi - lo) * frac`` with ``frac`` from ``(n - 1) * q``), several times
    faster than its per-group sorts. None when a value is NaN (Polars sorts NaN last among the values,
    numpy after the padding) or the groups are so unequal that padding would cost more than it saves."""
    starts = np.flatnonzero(np.concatenate([[True], g[1:] != g[:-1]]))
    sizes = np.diff(np.concatenate([starts, [len(g)]]))
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
