"""The trace format: the one definition of every table's Arrow schema and of the run-directory layout.

This module is the contract between the recorder and ``normtrace_analysis``; ``docs/trace-format.md``
describes it in prose and a test checks that the two agree. Bump ``SCHEMA_VERSION`` on any change that
an older reader could misread.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

SCHEMA_VERSION = 1
"""Integer version of the trace format; readers refuse a version newer than they know."""

META_FILE = "meta.json"
"""Run metadata, written by rank 0 (other ranks write ``meta.rank{r}.json``)."""

SHARD_SUFFIX = ".arrow"

OUTPUTS = pa.schema(
    [
        pa.field("pass", pa.int64(), nullable=False),
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("module", pa.string(), nullable=False),
        pa.field("norm", pa.float32(), nullable=False),
        pa.field("numel", pa.int64(), nullable=False),
        pa.field("batch", pa.int32(), nullable=False),
        pa.field("grad_enabled", pa.bool_(), nullable=False),
        pa.field("training", pa.bool_(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
    ]
)
"""One row per hooked module per recorded forward pass: the batch mean of per-sample L2 norms."""

PARAMS = pa.schema(
    [
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("pass", pa.int64(), nullable=False),
        pa.field("module", pa.string(), nullable=False),
        pa.field("param", pa.string(), nullable=False),
        pa.field("norm", pa.float32(), nullable=False),
        pa.field("numel", pa.int64(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("time", pa.float64(), nullable=False),
    ]
)
"""One row per tracked parameter per ``tick_epoch()``/``collect()``: its whole-tensor L2 norm."""

METRICS = pa.schema(
    [
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("pass", pa.int64(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=False),
        pa.field("split", pa.string(), nullable=True),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("time", pa.float64(), nullable=False),
    ]
)
"""One row per loss value (hooked) or user metric (``push_metric``/``push_loss``)."""

EVENTS = pa.schema(
    [
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("pass", pa.int64(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("time", pa.float64(), nullable=False),
    ]
)
"""One row per event: ``target_update`` from ``track_target`` or any name given to ``event()``."""

TABLES: dict[str, pa.Schema] = {
    "outputs": OUTPUTS,
    "params": PARAMS,
    "metrics": METRICS,
    "events": EVENTS,
}


def shard_name(rank: int, seq: int) -> str:
    """File name of the ``seq``-th shard a rank writes for a table: ``rank{r}-{seq:06d}.arrow``."""
    return f"rank{rank}-{seq:06d}{SHARD_SUFFIX}"


def shard_dir(run_dir: str | Path, table: str) -> Path:
    """Folder holding one table's shards: ``RUN/<table>/``."""
    if table not in TABLES:
        raise ValueError(f"unknown trace table {table!r}; expected one of {sorted(TABLES)}")
    return Path(run_dir) / table


def meta_name(rank: int) -> str:
    """Metadata file of a rank: ``meta.json`` for rank 0, ``meta.rank{r}.json`` otherwise."""
    return META_FILE if rank == 0 else f"meta.rank{rank}.json"


def lock_name(rank: int) -> str:
    """The lock file a rank's writer holds while it writes the run: ``.lock-rank{r}`` (readers ignore it)."""
    return f".lock-rank{rank}"
