"""What the reader requires of a trace: the schema version it understands and each table's columns.

This mirrors ``docs/trace-format.md`` (schema version 2) without importing the recorder, so the analysis
package runs where torch is not installed; a contract test checks the two agree.
"""

from __future__ import annotations

import re

import polars as pl

SCHEMA_VERSION = 2
"""Newest trace-format version this reader understands; newer traces are refused. Version 2 added the
``signals`` table; version-1 traces (without it) load as runs that recorded no signals."""

META_FILE = "meta.json"
"""Rank 0's run metadata; rank r > 0 writes ``meta.rank{r}.json``."""

SHARD_SUFFIX = ".arrow"
"""Shards end in this (temporary ``.arrow.tmp`` files are ignored)."""

SHARD_NAME = re.compile(r"^rank(\d+)-(\d+)\.arrow\Z")
"""A shard's file name, ``rank{r}-{seq}.arrow``: rank and sequence number. Any other ``.arrow`` file in a
table folder (a copy, an export) is not part of the run and is left out with a warning."""

REQUIRED_COLUMNS: dict[str, dict[str, pl.DataType]] = {
    "outputs": {
        "pass": pl.Int64(),
        "epoch": pl.Int32(),
        "module": pl.String(),
        "norm": pl.Float32(),
        "numel": pl.Int64(),
        "batch": pl.Int32(),
        "grad_enabled": pl.Boolean(),
        "training": pl.Boolean(),
        "rank": pl.Int32(),
    },
    "params": {
        "epoch": pl.Int32(),
        "pass": pl.Int64(),
        "module": pl.String(),
        "param": pl.String(),
        "norm": pl.Float32(),
        "numel": pl.Int64(),
        "rank": pl.Int32(),
        "time": pl.Float64(),
    },
    "metrics": {
        "epoch": pl.Int32(),
        "pass": pl.Int64(),
        "name": pl.String(),
        "value": pl.Float64(),
        "split": pl.String(),
        "rank": pl.Int32(),
        "time": pl.Float64(),
    },
    "events": {
        "epoch": pl.Int32(),
        "pass": pl.Int64(),
        "name": pl.String(),
        "rank": pl.Int32(),
        "time": pl.Float64(),
    },
    "signals": {
        "step": pl.Int64(),
        "pass": pl.Int64(),
        "epoch": pl.Int32(),
        "kind": pl.String(),
        "module": pl.String(),
        "param": pl.String(),
        "value": pl.Float32(),
        "rank": pl.Int32(),
    },
}
"""Per table, the columns (name -> Polars dtype) every shard must have; extra columns are allowed."""

TABLES: tuple[str, ...] = tuple(REQUIRED_COLUMNS)
"""The trace tables, each a folder of shards under the run directory (a table without shards, such as
``signals`` in a version-1 trace, is an empty frame)."""


def check_table(table: str) -> None:
    """Raise ``ValueError`` naming the valid tables when ``table`` is not one of them."""
    if table not in REQUIRED_COLUMNS:
        raise ValueError(f"unknown trace table {table!r}; expected one of {list(TABLES)}")
