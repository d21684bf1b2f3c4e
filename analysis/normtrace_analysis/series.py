"""Every module's series gathered contiguously, in pass order: the shared input of summaries and spikes.

Grouping ten million rows by string keys is what costs in Polars; this reads the needed columns once,
numbers the series (``sid``), and permutes the rows so that each series is one contiguous slice in
pass order. The recorder writes every pass's modules in the same order, so the permutation is usually a
strided one computed from the first pass (no sort); any other layout falls back to a stable sort. The
result is memoised on the Trace (one slot), so ``epoch_summary``, ``spikes`` and ``event_alignment``
read the shards once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl

from .names import SERIES_KEYS
from .trace import module_filter

if TYPE_CHECKING:
    from .trace import Trace

__all__ = ["SERIES_KEYS", "Series", "epoch_series", "pass_series", "points"]


_DATA_SCHEMA = {"sid": pl.UInt32, "pass": pl.Int64, "epoch": pl.Int32, "value": pl.Float64}


@dataclass(frozen=True)
class Series:
    """``data``: sid (u32), pass, epoch, value, contiguous per sid and in pass order within it.

    ``keys``: one row per sid with the table's series keys, ``start`` (first row in ``data``) and
    ``length``, sorted by sid.
    """

    data: pl.DataFrame
    keys: pl.DataFrame


def points(trace: Trace, table: str, modules: Sequence[str] | str | None) -> pl.LazyFrame:
    """The table's rows (the Trace's filters applied) restricted to ``modules``; the table must exist."""
    trace.require(table)
    lf = trace.table(table)
    return lf if modules is None else lf.filter(module_filter(modules))


def pass_series(trace: Trace, table: str, modules: Sequence[str] | str | None) -> Series:
    """The table's series at pass resolution (memoised on the Trace for the last table/modules asked)."""
    memo_key = ("series", table, modules if modules is None or isinstance(modules, str) else tuple(modules))
    return trace.cached(memo_key, lambda: _collect_series(trace, table, modules), slot="series")


def _collect_series(trace: Trace, table: str, modules: Sequence[str] | str | None) -> Series:
    """Read and regroup the table's rows (the uncached work behind :func:`pass_series`), one run at a
    time, each from its own shards (``trace.filter(runs=...)`` scans only those)."""
    parts = [_run_series(points(trace.filter(runs=run), table, modules), table, run) for run in trace.runs]
    parts = [p for p in parts if p.keys.height]
    if not parts:
        return Series(pl.DataFrame(schema=_DATA_SCHEMA), _empty_keys(table))
    offsets = [0]
    rows = [0]
    for p in parts[:-1]:
        offsets.append(offsets[-1] + p.keys.height)
        rows.append(rows[-1] + p.data.height)
    data = pl.concat(
        [p.data.with_columns(pl.col("sid") + off) for p, off in zip(parts, offsets, strict=True)]
    )
    keys = pl.concat(
        [
            p.keys.with_columns(pl.col("sid") + off, pl.col("start") + row)
            for p, off, row in zip(parts, offsets, rows, strict=True)
        ]
    )
    return Series(data, keys)


def epoch_series(series: Series) -> pl.DataFrame:
    """Per sid and epoch, the mean value (NaN if any value is NaN): sid, epoch, value, sorted."""
    return (
        series.data.lazy().group_by("sid", "epoch").agg(pl.col("value").mean()).sort("sid", "epoch").collect()
    )


def _empty_keys(table: str) -> pl.DataFrame:
    """A keys frame with no series."""
    schema = {"sid": pl.UInt32, "run": pl.String, "rank": pl.Int32, "module": pl.String}
    schema |= {"split": pl.String} if table == "outputs" else {"param": pl.String}
    return pl.DataFrame(schema=schema | {"start": pl.UInt32, "length": pl.UInt32})


def _run_series(lf: pl.LazyFrame, table: str, run: str) -> Series:
    """One run's series: collect, number by (rank, split, name), permute to contiguous pass order."""
    if table == "outputs":
        name, flag = pl.col("module"), pl.col("grad_enabled")
    else:
        name, flag = pl.concat_str("module", "param", separator="\x00"), pl.lit(False)
    name = name.cast(pl.Categorical)
    key = (
        pl.col("rank").cast(pl.UInt64) * (1 << 33)
        + flag.cast(pl.UInt64) * (1 << 32)
        + name.to_physical().cast(pl.UInt64)
    )
    # One column at a time, so that the rows exist about once in memory: read it (the shards are
    # column-oriented: a column costs what it weighs), make it one chunk (gathers across the hundreds of
    # chunks that one chunk per shard gives are many times slower), permute it.
    keys_first = lf.select(key.alias("key"), name.alias("name")).collect(engine="streaming").rechunk()
    if keys_first.height == 0:
        return Series(pl.DataFrame(schema=_DATA_SCHEMA), _empty_keys(table))
    names = keys_first.filter(pl.col("key").is_first_distinct()).with_columns(pl.col("name").cast(pl.String))
    order = _strided_order(keys_first["key"])
    if order is None:
        order = keys_first.select(pl.int_range(pl.len(), dtype=pl.UInt32).sort_by("key", maintain_order=True))
        order = order.to_series()
    key = keys_first["key"].gather(order)
    del keys_first
    data = pl.DataFrame(
        [
            lf.select(c).collect(engine="streaming").to_series().rechunk().gather(order)
            for c in ("pass", "epoch", "value")
        ]
    )
    del order
    runs = key.rle().struct.unnest()
    bounds = runs.select(
        pl.int_range(pl.len(), dtype=pl.UInt32).alias("sid"),
        pl.col("value").alias("key"),
        pl.col("len").cast(pl.UInt32).alias("length"),
    ).with_columns((pl.col("length").cum_sum() - pl.col("length")).alias("start"))
    del key, runs
    sid = pl.int_range(bounds.height, dtype=pl.UInt32, eager=True).repeat_by(bounds["length"]).explode()
    data = data.insert_column(0, sid.alias("sid"))
    # Rows within a rank are in pass order as the recorder writes them; sort if a trace says otherwise.
    if data.select(((pl.col("pass").diff() < 0) & (pl.col("sid").diff() == 0)).any()).item():
        data = data.sort("sid", "pass", maintain_order=True)
    names = bounds.join(names, on="key", how="left", maintain_order="left")["name"]
    if table == "outputs":
        split = (
            pl.when((pl.col("key") // (1 << 32)) % 2 == 1).then(pl.lit("train")).otherwise(pl.lit("no_grad"))
        )
        labels = [names.alias("module"), split.alias("split")]
    else:
        parts = names.str.split_exact("\x00", 1)
        labels = [parts.struct.field("field_0").alias("module"), parts.struct.field("field_1").alias("param")]
    rank = (pl.col("key") // (1 << 33)).cast(pl.Int32).alias("rank")
    keys = bounds.select("sid", pl.lit(run).alias("run"), rank, *labels, "start", "length")
    return Series(data, keys)


def _strided_order(key: pl.Series) -> pl.Series | None:
    """Row order making each key contiguous when keys repeat with a fixed period and once per period.

    The recorder writes one row per hooked module per pass in a fixed order, so the key sequence of a
    rank is periodic; then the rows of the key at offset ``j`` of a period are ``j, j + K, j + 2K, …``.
    Returns None when the sequence is not periodic that way (a sort is needed).
    """
    n = key.len()
    repeats = (key == key[0]).arg_true()
    period = int(repeats[1]) if repeats.len() > 1 else n
    cycle = key.slice(0, period)
    if cycle.n_unique() != period:
        return None
    if period < n and not (key.slice(period) == key.slice(0, n - period)).all():
        return None
    offsets = pl.DataFrame({"j": pl.int_range(period, dtype=pl.UInt32, eager=True), "key": cycle}).sort("key")
    return offsets.select(pl.int_ranges("j", n, period, dtype=pl.UInt32).explode()).to_series()
