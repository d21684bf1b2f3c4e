"""Per-epoch statistics of each module's ``value`` (raw L2 norm or RMS view, as the Trace was loaded)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl

from .names import SUMMARY_KEYS, Table
from .series import pass_series

if TYPE_CHECKING:
    from .trace import Trace


def epoch_summary(trace: Trace, table: Table = "outputs") -> pl.DataFrame:
    """One row per (run, epoch, module, split) for outputs or (run, epoch, module, param) for params.

    Columns: the keys, then ``count`` (rows), ``mean``, ``std`` (sample, ddof=1; null for one row),
    ``min``, ``max``, ``p05``, ``p50``, ``p95`` (linear interpolation, as ``numpy.percentile``) of
    ``value`` over the epoch's rows, and ``nonfinite`` (NaN/Inf rows, which make mean and std NaN).
    For outputs the mean is the mean over the epoch's recorded passes of the batch-mean norm.
    """
    if table not in SUMMARY_KEYS:
        raise ValueError(f"epoch_summary works on 'outputs' or 'params', not {table!r}")
    keys = SUMMARY_KEYS[table]
    series = pass_series(trace, table, None)
    # One group per summary key: a series, unless several ranks share the key (then they are pooled).
    groups = series.keys.select("sid", *keys).with_columns(
        pl.col("sid").min().over(keys).cast(pl.UInt64).alias("group")
    )
    pooled = groups["group"].n_unique() < groups.height
    group = (
        pl.col("sid").replace_strict(groups["sid"], groups["group"], return_dtype=pl.UInt64)
        if pooled
        else pl.col("sid").cast(pl.UInt64)
    )
    # Epochs never decrease along a series, so (series, epoch) packed in one integer is sorted when each
    # group is one series: Polars then groups contiguous slices instead of hashing.
    packed = series.data.select((group * (1 << 32) + pl.col("epoch").cast(pl.UInt64)).alias("g"), "value")
    if not pooled and packed["g"].is_sorted():
        packed = packed.with_columns(pl.col("g").set_sorted())
    v = pl.col("value")
    stats = (
        packed.lazy()
        .group_by("g")
        .agg(
            pl.len().cast(pl.Int64).alias("count"),
            v.mean().alias("mean"),
            v.std(ddof=1).alias("std"),
            v.min().alias("min"),
            v.max().alias("max"),
            v.quantile(0.05, "linear").alias("p05"),
            v.quantile(0.50, "linear").alias("p50"),
            v.quantile(0.95, "linear").alias("p95"),
            (~v.is_finite()).sum().cast(pl.Int64).alias("nonfinite"),
        )
        .with_columns(
            (pl.col("g") // (1 << 32)).alias("group"), (pl.col("g") % (1 << 32)).cast(pl.Int32).alias("epoch")
        )
        .collect()
    )
    names = groups.unique("group").select("group", *keys).with_columns(pl.col("group").cast(pl.UInt64))
    return (
        stats.join(names, on="group")
        .select(
            *keys[:1],
            "epoch",
            *keys[1:],
            "count",
            "mean",
            "std",
            "min",
            "max",
            "p05",
            "p50",
            "p95",
            "nonfinite",
        )
        .sort(*keys, "epoch")
    )
