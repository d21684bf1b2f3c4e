"""Export a trace to TensorBoard event files, written with TensorBoard's own writer.

Needs the ``tensorboard`` package (``pip install 'normtrace-analysis[tensorboard]'``); no TensorFlow or
torch. Every series becomes a scalar tag, one TensorBoard run per normtrace run (and rank):

- ``outputs/<module>`` (grad-enabled passes) and ``outputs/<module>/no_grad``: ``value`` (the view the
  trace was loaded with: raw L2 or RMS);
- ``params/<module>.<param>``;
- ``metrics/<name>`` and ``metrics/<name>/<split>`` when the row has a split (``loss/train``,
  ``loss/val``);
- ``events/<name>``: how many such events fall at that step (1 for a single event), so events show as
  spikes on their own chart.
- ``signals/<kind>/<module>.<param>`` (``signals/<kind>/<module>`` for a module-level signal), from a
  trace-format-2 run.

The step is the pass (``level="pass"``) or the epoch (``level="epoch"``). The volume is bounded: a
series with more than ``max_points`` points is cut into at most ``max_points`` bins of consecutive
steps, each written at its first step as the mean of its rows (the count, for events) — TensorBoard
itself keeps 1000 points per scalar tag when it loads, so more would only be dropped there. Rows with
NaN or ±Inf stay in the means (TensorBoard shows what the trace holds). Wall times are the rows' own
``time``; ``outputs`` and ``signals`` rows have none, so theirs are interpolated by pass from the run's
other tables. Signals are tagged ``signals/<kind>/<module>.<param>`` (``signals/<kind>/<module>`` for a
module-level one).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import polars as pl

from .schema import TABLES
from .trace import PathLike, Trace, load

MAX_POINTS = 1000
"""Default bound on the points written per tag (TensorBoard's own default sample per scalar tag)."""

_TAG_KEYS = {"outputs": ["module", "split"], "params": ["module", "param"], "metrics": ["name", "split"],
             "events": ["name"], "signals": ["kind", "module", "param"]}  # fmt: skip

_UNTIMED = ("outputs", "signals")
"""Tables whose rows carry no wall time: theirs are interpolated by pass from the other tables."""


def to_tensorboard(
    source: Trace | PathLike | Sequence[PathLike],
    directory: str | os.PathLike[str],
    *,
    level: Literal["pass", "epoch"] = "pass",
    max_points: int = MAX_POINTS,
    tables: Sequence[str] = TABLES,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``source`` (a Trace, or what :func:`~normtrace_analysis.load` takes) as TensorBoard runs.

    Parameters
    ----------
    source:
        A loaded Trace (its filters apply) or run directories.
    directory:
        The TensorBoard log directory: each run is written to ``directory/<run>`` (``/rank<r>`` below
        it when the run has several ranks). Point ``tensorboard --logdir`` at it.
    level:
        ``"pass"``: the step is the pass; ``"epoch"``: the step is the epoch, one point per epoch (mean).
    max_points:
        Most points written per tag; longer series are binned (means of consecutive steps).
    tables:
        Which tables to write.
    overwrite:
        Replace event files already in a run's folder; by default such a folder is refused, because
        TensorBoard would read old and new files as one series.

    Returns
    -------
    The folders written, one per run and rank.

    Example
    -------
    >>> to_tensorboard(na.load("runs/*"), "tb")   # then: tensorboard --logdir tb   # doctest: +SKIP
    """
    writer_class = _writer_class()
    trace = source if isinstance(source, Trace) else load(source)
    if level not in ("pass", "epoch"):
        raise ValueError(f"level must be 'pass' or 'epoch', not {level!r}")
    if int(max_points) < 1:
        raise ValueError(f"max_points must be at least 1, got {max_points!r}")
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise ValueError(f"unknown trace table {unknown[0]!r}; expected some of {list(TABLES)}")
    root = Path(directory)
    frames = {t: _points(trace, t, level, int(max_points)) for t in tables}
    targets = _targets(trace, frames, root)
    for folder in targets.values():
        old = sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []
        if old and not overwrite:
            raise ValueError(
                f"{folder} already holds TensorBoard event files ({old[0].name}); pass overwrite=True (--force on the command line)"
            )
        for f in old:
            f.unlink()
    for (run, rank), folder in targets.items():
        folder.mkdir(parents=True, exist_ok=True)
        writer = writer_class(str(folder))
        try:
            clock = _clock(trace, run, rank, level)
            for table, frame in frames.items():
                part = frame.filter(pl.col("run") == run, pl.col("rank") == rank)
                _write(writer, table, part, level, clock)
        finally:
            writer.close()
    return list(targets.values())


class _ScalarWriter(Protocol):
    """The part of ``tensorboard.summary.Writer`` used here (tensorboard ships no type information)."""

    def add_scalar(
        self,
        tag: str,
        data: float,
        step: int,
        *,
        wall_time: float | None = None,
        description: str | None = None,
    ) -> None: ...

    def close(self) -> None: ...


def _writer_class() -> Callable[[str], _ScalarWriter]:
    """TensorBoard's event-file writer: called with a folder."""
    try:
        from tensorboard.summary import Writer
    except ImportError as exc:
        raise ImportError(
            f"TensorBoard export needs the tensorboard package ({exc}); "
            "pip install 'normtrace-analysis[tensorboard]'"
        ) from exc
    writer_class: Callable[[str], _ScalarWriter] = Writer  # untyped (Any) as mypy sees it
    return writer_class


def _points(trace: Trace, table: str, level: str, max_points: int) -> pl.DataFrame:
    """The table's rows reduced to at most ``max_points`` per tag: run, rank, tag, step, value, time."""
    lf = trace.table(table)
    keys = ["run", "rank", *_TAG_KEYS[table]]
    x = pl.col(level).cast(pl.Int64)
    value = pl.len().cast(pl.Float64) if table == "events" else pl.col("value").cast(pl.Float64).mean()
    if table == "events":
        lf = lf.with_columns(pl.lit(1.0).alias("value"))
    time = pl.col("time").mean() if table not in _UNTIMED else pl.lit(None, pl.Float64)
    if level == "epoch" or table == "events":  # one point per step (several rows of a step: one point)
        lf = lf.group_by(*keys, x.alias("step")).agg(value.alias("value"), time.alias("time"))
    else:
        lf = lf.select(
            *keys,
            x.alias("step"),
            pl.col("value").cast(pl.Float64),
            *([pl.col("time")] if table not in _UNTIMED else [pl.lit(None, pl.Float64).alias("time")]),
        )
    spans = lf.group_by(keys).agg(n=pl.len(), lo=pl.col("step").min(), hi=pl.col("step").max())
    width = (
        pl.when(pl.col("n") > max_points)
        .then(((pl.col("hi") - pl.col("lo") + 1) / max_points).ceil().cast(pl.Int64))
        .otherwise(0)
    )
    joined = lf.join(spans.with_columns(width.alias("_w")), on=keys, how="left", nulls_equal=True)
    binned = (
        joined.filter(pl.col("_w") > 0)
        .with_columns(step=pl.col("lo") + (pl.col("step") - pl.col("lo")) // pl.col("_w") * pl.col("_w"))
        .group_by(*keys, "step")
        .agg((pl.col("value").sum() if table == "events" else pl.col("value").mean()), pl.col("time").mean())
    )
    kept = joined.filter(pl.col("_w") == 0).select(*keys, "step", "value", "time")
    out = pl.concat([kept, binned.select(*keys, "step", "value", "time")])
    tag = _tag_expr(table)
    with trace.reading():
        return (
            out.with_columns(tag.alias("tag"))
            .select("run", "rank", "tag", "step", "value", "time")
            .sort("run", "rank", "tag", "step", maintain_order=True)
            .collect()
        )


def _tag_expr(table: str) -> pl.Expr:
    if table == "outputs":
        suffix = pl.when(pl.col("split") == "train").then(pl.lit("")).otherwise("/" + pl.col("split"))
        return pl.concat_str([pl.lit("outputs/"), pl.col("module"), suffix])
    if table == "params":
        return pl.concat_str([pl.lit("params/"), pl.col("module"), pl.lit("."), pl.col("param")])
    if table == "metrics":
        suffix = pl.when(pl.col("split").is_null()).then(pl.lit("")).otherwise("/" + pl.col("split"))
        return pl.concat_str([pl.lit("metrics/"), pl.col("name"), suffix])
    if table == "signals":  # signals/grad_norm/net.0.weight; a module-level one has no param
        where = pl.concat_str([pl.col("module"), pl.lit("."), pl.col("param")]).fill_null(pl.col("module"))
        return pl.concat_str([pl.lit("signals/"), pl.col("kind"), pl.lit("/"), where])
    return pl.concat_str([pl.lit("events/"), pl.col("name")])


_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


def _targets(trace: Trace, frames: dict[str, pl.DataFrame], root: Path) -> dict[tuple[str, int], Path]:
    """The folder of each (run, rank) that has rows: ``root/<run>`` or ``root/<run>/rank<r>``."""
    pairs = sorted({(r, k) for f in frames.values() for r, k in f.select("run", "rank").unique().iter_rows()})
    ranks: dict[str, int] = {}
    for run, _ in pairs:
        ranks[run] = ranks.get(run, 0) + 1
    targets = {}
    for run, rank in pairs:
        name = _UNSAFE.sub("_", run).strip(".") or "run"
        targets[(run, rank)] = root / name / f"rank{rank}" if ranks[run] > 1 else root / name
    return targets


def _clock(trace: Trace, run: str, rank: int, level: str) -> tuple[np.ndarray, np.ndarray]:
    """Known (pass or epoch, wall time) pairs of one run and rank, from the tables that record times."""
    parts = [
        trace.filter(runs=run)
        .table(t)
        .filter(pl.col("rank") == rank)
        .select(pl.col(level).cast(pl.Int64), "time")
        for t in ("params", "metrics", "events")
    ]
    with trace.reading():
        known = pl.concat([p.collect() for p in parts]).group_by(level).agg(pl.col("time").max()).sort(level)
    if known.height:
        return known[level].to_numpy().astype(float), known["time"].to_numpy()
    start = trace.metas.get(run, {}).get("start_time")
    try:
        t0 = dt.datetime.fromisoformat(str(start).replace("Z", "+00:00")).timestamp()
    except ValueError:
        t0 = 0.0
    return np.array([0.0]), np.array([t0])


def _write(
    writer: _ScalarWriter, table: str, frame: pl.DataFrame, level: str, clock: tuple[np.ndarray, np.ndarray]
) -> None:
    """Every point of one run and rank's ``table`` as ``add_scalar`` calls."""
    if frame.is_empty():
        return
    times = frame["time"].to_numpy()
    if table in _UNTIMED or np.isnan(times.astype(float)).any():
        fill = np.interp(frame["step"].to_numpy().astype(float), *clock)
        times = np.where(np.isnan(times.astype(float)), fill, times)
    unit = "pass" if level == "pass" else "epoch"
    described: set[str] = set()
    for tag, step, value, wall in zip(frame["tag"], frame["step"], frame["value"], times, strict=True):
        description = None
        if tag not in described:
            described.add(tag)
            description = f"normtrace {table} per {unit}; binned means where a series has more points than the export keeps"
        writer.add_scalar(
            tag,
            value if value is not None else math.nan,
            int(step),
            wall_time=float(wall),
            description=description,
        )
