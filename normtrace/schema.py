"""The trace format: the one definition of every table's Arrow schema, the run-directory layout and the
``meta.json`` keys, shared by the recorder and ``normtrace_analysis``.

It imports only the standard library and pyarrow, so the analysis package, which runs without torch,
uses this very file: ``analysis/normtrace_analysis/format.py`` is a git symlink to it (a wheel or sdist
of the analysis package holds a copy). ``docs/trace-format.md`` describes it in prose and
``tests/test_trace_format.py`` checks that the two agree. Bump ``SCHEMA_VERSION`` on any change that an
older reader could misread.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 2
"""Integer version of the trace format; readers refuse a version newer than they know. Version 2 added
the ``signals`` table and the ``optimizer``/``steps`` metadata keys; a version-1 trace reads as one
whose ``signals`` table is empty."""

META_FILE = "meta.json"
"""Run metadata, written by rank 0 (other ranks write ``meta.rank{r}.json``)."""

SHARD_SUFFIX = ".arrow"
"""Shards end in this (temporary ``.arrow.tmp`` files are ignored)."""

SHARD_NAME = re.compile(r"^rank(\d+)-(\d+)\.arrow\Z")
"""A shard's file name, ``rank{r}-{seq}.arrow``: rank and sequence number. Any other ``.arrow`` file in a
table folder (a copy, an export) is not part of the run."""


def _schema(*fields: pa.Field[Any]) -> pa.Schema:
    """A schema of ``fields`` (spelled out so type checkers see a list of fields, not of objects)."""
    return pa.schema(list(fields))


OUTPUTS = _schema(
    pa.field("pass", pa.int64(), nullable=False),
    pa.field("epoch", pa.int32(), nullable=False),
    pa.field("module", pa.string(), nullable=False),
    pa.field("norm", pa.float32(), nullable=False),
    pa.field("numel", pa.int64(), nullable=False),
    pa.field("batch", pa.int32(), nullable=False),
    pa.field("grad_enabled", pa.bool_(), nullable=False),
    pa.field("training", pa.bool_(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
)
"""One row per hooked module per recorded forward pass: the batch mean of per-sample L2 norms."""

PARAMS = _schema(
    pa.field("epoch", pa.int32(), nullable=False),
    pa.field("pass", pa.int64(), nullable=False),
    pa.field("module", pa.string(), nullable=False),
    pa.field("param", pa.string(), nullable=False),
    pa.field("norm", pa.float32(), nullable=False),
    pa.field("numel", pa.int64(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("time", pa.float64(), nullable=False),
)
"""One row per tracked parameter per ``tick_epoch()``/``collect()``: its whole-tensor L2 norm."""

METRICS = _schema(
    pa.field("epoch", pa.int32(), nullable=False),
    pa.field("pass", pa.int64(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("value", pa.float64(), nullable=False),
    pa.field("split", pa.string(), nullable=True),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("time", pa.float64(), nullable=False),
)
"""One row per loss value (hooked) or user metric (``push_metric``/``push_loss``)."""

EVENTS = _schema(
    pa.field("epoch", pa.int32(), nullable=False),
    pa.field("pass", pa.int64(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("time", pa.float64(), nullable=False),
)
"""One row per event: ``target_update`` from ``track_target`` or any name given to ``event()``."""

SIGNALS = _schema(
    pa.field("step", pa.int64(), nullable=False),
    pa.field("pass", pa.int64(), nullable=False),
    pa.field("epoch", pa.int32(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("module", pa.string(), nullable=False),
    pa.field("param", pa.string(), nullable=True),
    pa.field("value", pa.float32(), nullable=False),
    pa.field("rank", pa.int32(), nullable=False),
)
"""One row per (signal kind, module, parameter) per measurement: gradient norms, update ratios, output
gradients, activation rates, and user lenses' own kinds (``SIGNAL_KINDS``)."""

SIGNAL_KINDS: tuple[str, ...] = (
    "grad_norm",
    "grad_cosine",
    "update_ratio",
    "update_cosine",
    "output_grad_norm",
    "active_rate",
    "dead_fraction",
)
"""The ``kind`` values normtrace's own lenses write; a user lens may write others."""

TABLES: dict[str, pa.Schema] = {
    "outputs": OUTPUTS,
    "params": PARAMS,
    "metrics": METRICS,
    "events": EVENTS,
    "signals": SIGNALS,
}

META_KEYS: tuple[str, ...] = (
    "schema_version",
    "normtrace_version",
    "torch_version",
    "python_version",
    "run_name",
    "start_time",
    "end_time",
    "status",
    "rank",
    "world_size",
    "hostname",
    "pid",
    "lenses",
    "normalize",
    "root",
    "optimizer",
    "modules",
    "targets",
    "metrics",
    "flush",
    "notes",
)
"""The keys of every ``meta.json`` from its first write (``docs/trace-format.md`` says what each means)."""

META_END_KEYS: tuple[str, ...] = ("epochs", "passes", "steps")
"""The keys a run's metadata gains when it ends (closed, exited, terminated, abandoned)."""


def empty_table(table: str) -> pa.Table:
    """A table of no rows with ``table``'s schema: what a reader sees of a table without shards."""
    return TABLES[_known(table)].empty_table()


def shard_name(rank: int, seq: int) -> str:
    """File name of the ``seq``-th shard a rank writes for a table: ``rank{r}-{seq:06d}.arrow``."""
    return f"rank{rank}-{seq:06d}{SHARD_SUFFIX}"


def shard_dir(run_dir: str | Path, table: str) -> Path:
    """Folder holding one table's shards: ``RUN/<table>/``."""
    return Path(run_dir) / _known(table)


def _known(table: str) -> str:
    if table not in TABLES:
        raise ValueError(f"unknown trace table {table!r}; expected one of {list(TABLES)}")
    return table


def meta_name(rank: int) -> str:
    """Metadata file of a rank: ``meta.json`` for rank 0, ``meta.rank{r}.json`` otherwise."""
    return META_FILE if rank == 0 else f"meta.rank{rank}.json"


def lock_name(rank: int) -> str:
    """The lock file a rank's writer holds while it writes the run: ``.lock-rank{r}`` (readers ignore it)."""
    return f".lock-rank{rank}"
