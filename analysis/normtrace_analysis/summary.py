"""Per-epoch statistics of each module's ``value`` (raw L2 norm or RMS view, as the Trace was loaded)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import polars as pl

if TYPE_CHECKING:
    from .trace import Trace

SUMMARY_KEYS: dict[str, list[str]] = {
    "outputs": ["run", "epoch", "module", "split"],
    "params": ["run", "epoch", "module", "param"],
}
"""Group keys of :func:`epoch_summary` per table (ranks are pooled: filter the Trace for one rank)."""


def epoch_summary(trace: Trace, table: Literal["outputs", "params"] = "outputs") -> pl.DataFrame:
    """One row per (run, epoch, module, split) for outputs or (run, epoch, module, param) for params.

    Columns: the keys, then ``count`` (rows), ``mean``, ``std`` (sample, ddof=1; null for one row),
    ``min``, ``max``, ``p05``, ``p50``, ``p95`` (linear interpolation, as ``numpy.percentile``) of
    ``value`` over the epoch's rows, and ``nonfinite`` (NaN/Inf rows, which make mean and std NaN).
    For outputs the mean is the mean over the epoch's recorded passes of the batch-mean norm.
    """
    if table not in SUMMARY_KEYS:
        raise ValueError(f"epoch_summary works on 'outputs' or 'params', not {table!r}")
    trace.require(table)
    keys = SUMMARY_KEYS[table]
    v = pl.col("value")
    return (
        trace.table(table)
        .group_by(keys)
        .agg(
            pl.len().alias("count"),
            v.mean().alias("mean"),
            v.std(ddof=1).alias("std"),
            v.min().alias("min"),
            v.max().alias("max"),
            v.quantile(0.05, "linear").alias("p05"),
            v.quantile(0.50, "linear").alias("p50"),
            v.quantile(0.95, "linear").alias("p95"),
            (~v.is_finite()).sum().alias("nonfinite"),
        )
        .with_columns(pl.col("count").cast(pl.Int64), pl.col("nonfinite").cast(pl.Int64))
        .sort([k for k in keys if k != "epoch"] + ["epoch"])
        .collect()
    )
