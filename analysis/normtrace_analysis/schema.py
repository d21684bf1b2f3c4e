"""What the reader requires of a trace: the schema version it understands and each table's columns.

The definitions are the recorder's own: ``format`` is ``normtrace/schema.py`` (a symlink in the source
tree, a copy in a built wheel), which imports only pyarrow, so this package still runs where torch is not
installed. This module gives them as Polars dtypes, the form the reader checks shards against.
"""

from __future__ import annotations

from typing import cast

import polars as pl

from . import format as _format

SCHEMA_VERSION: int = _format.SCHEMA_VERSION
"""Newest trace-format version this reader understands; newer traces are refused (older ones load: a
version-1 trace has no ``signals`` table, which then reads as empty)."""

META_FILE: str = _format.META_FILE
"""Rank 0's run metadata; rank r > 0 writes ``meta.rank{r}.json``."""

SHARD_SUFFIX: str = _format.SHARD_SUFFIX
"""Shards end in this (temporary ``.arrow.tmp`` files are ignored)."""

SHARD_NAME = _format.SHARD_NAME
"""A shard's file name, ``rank{r}-{seq}.arrow`` or, merged, ``rank{r}-{first}-{last}.arrow``. Any other
``.arrow`` file in a table folder (a copy, an export) is not part of the run and is left out with a warning."""

shard_span = _format.shard_span
"""(rank, first, last) sequence numbers a shard's file name covers; None for any other name."""

live_shards = _format.live_shards
"""The shard names a reader reads (a merged shard replaces those of its span) and the conflicting ones."""

compact = _format.compact
"""Merge one rank's shards of a table folder (``normtrace compact``)."""

drop_covered = _format.drop_covered
"""Delete one rank's shards that merged files hold (a killed run's writer may have left them)."""

COMPACT_ROWS: int = _format.COMPACT_ROWS
"""Rows per merged file at most, by default."""

lock_name = _format.lock_name
"""The lock file a rank's writer holds on its run directory while it writes."""

lock_owner = _format.lock_owner
"""What a lock file says about its writer (pid, hostname, start time)."""

META_KEYS: tuple[str, ...] = _format.META_KEYS
"""The keys of every ``meta.json`` (``docs/trace-format.md``)."""

SIGNAL_KINDS: tuple[str, ...] = _format.SIGNAL_KINDS
"""The ``signals.kind`` values normtrace's own lenses write; user lenses may write others."""


def _polars_columns(table: str) -> dict[str, pl.DataType]:
    frame = cast(pl.DataFrame, pl.from_arrow(_format.empty_table(table)))
    return dict(frame.schema)


REQUIRED_COLUMNS: dict[str, dict[str, pl.DataType]] = {t: _polars_columns(t) for t in _format.TABLES}
"""Per table, the columns (name -> Polars dtype) every shard must have; extra columns are allowed."""

TABLES: tuple[str, ...] = tuple(REQUIRED_COLUMNS)
"""The trace tables, each a folder of shards under the run directory."""


def check_table(table: str) -> None:
    """Raise ``ValueError`` naming the valid tables when ``table`` is not one of them."""
    if table not in REQUIRED_COLUMNS:
        raise ValueError(f"unknown trace table {table!r}; expected one of {list(TABLES)}")
