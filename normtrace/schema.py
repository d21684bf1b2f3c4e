"""The trace format: the one definition of every table's Arrow schema, the run-directory layout and the
``meta.json`` keys, shared by the recorder and ``normtrace_analysis``.

It imports only the standard library and pyarrow, so the analysis package, which runs without torch,
uses this very file: ``analysis/normtrace_analysis/format.py`` is a git symlink to it (a wheel or sdist
of the analysis package holds a copy). ``docs/trace-format.md`` describes it in prose and
``tests/test_trace_format.py`` checks that the two agree. Bump ``SCHEMA_VERSION`` on any change that an
older reader could misread.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, TypeAlias

import pyarrow as pa
import pyarrow.ipc as ipc

SCHEMA_VERSION = 2
"""Integer version of the trace format; readers refuse a version newer than they know. Version 2 added
the ``signals`` table and the ``optimizer``/``steps`` metadata keys; a version-1 trace reads as one
whose ``signals`` table is empty."""

META_FILE = "meta.json"
"""Run metadata, written by rank 0 (other ranks write ``meta.rank{r}.json``)."""

SHARD_SUFFIX = ".arrow"
"""Shards end in this (temporary ``.arrow.tmp`` files are ignored)."""

SHARD_NAME = re.compile(r"^rank(\d+)-(\d+)(?:-(\d+))?\.arrow\Z")
"""A shard's file name: ``rank{r}-{seq}.arrow`` as the writer names its ``seq``-th shard, or
``rank{r}-{first}-{last}.arrow`` for the shards ``first`` to ``last`` merged into one (``compact``). Any
other ``.arrow`` file in a table folder (a copy, an export) is not part of the run."""

COMPACT_ROWS = 1_000_000
"""``compact`` merges consecutive shards into files of about this many rows at most: few enough files for
object stores and Spark, small enough pieces for a reader that reads a run a piece at a time."""


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
    "config",
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


def merged_name(rank: int, first: int, last: int) -> str:
    """File name of shards ``first`` to ``last`` of a rank merged into one: ``rank{r}-{first}-{last}.arrow``."""
    return f"rank{rank}-{first:06d}-{last:06d}{SHARD_SUFFIX}"


def shard_span(name: str) -> tuple[int, int, int] | None:
    """(rank, first, last) sequence numbers a shard file name covers (first == last for a written shard);
    None for any other name."""
    m = SHARD_NAME.match(name)
    if m is None:
        return None
    first = int(m.group(2))
    return int(m.group(1)), first, first if m.group(3) is None else int(m.group(3))


def live_shards(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """The shard names a reader reads, in write order (by rank, then sequence), and the names it must not.

    A merged shard replaces the shards of its span: ``compact`` renames it into place before deleting
    them, so a merge interrupted in between leaves both, and the merged file wins (its span's shards are
    left out silently: they are the same rows). Names that cannot be told apart (two names for one span,
    ``rank0-3.arrow`` beside ``rank0-000003.arrow``) or spans that overlap without one containing the
    other (no writer makes them) would read rows twice: they come back as the second list, not read.
    """
    spans: dict[tuple[int, int, int], list[str]] = {}
    for name in names:
        span = shard_span(name)
        if span is not None:
            spans.setdefault(span, []).append(name)
    live: list[str] = []
    conflicting = sorted(n for group in spans.values() if len(group) > 1 for n in group)
    covered: dict[int, int] = {}  # per rank, the last sequence number a kept shard covers
    for rank, first, last in sorted(
        (k for k, v in spans.items() if len(v) == 1), key=lambda k: (k[0], k[1], -k[2])
    ):
        (name,) = spans[(rank, first, last)]
        end = covered.get(rank, -1)
        if last <= end:
            continue  # inside a merged shard already kept
        if first <= end:
            conflicting.append(name)
            continue
        live.append(name)
        covered[rank] = last
    return live, conflicting


_READ = ipc.IpcReadOptions(use_threads=False)
"""``compact`` reads and writes on the calling thread (a recorder's writer, beside training): pyarrow's
pool would take another core, and its wake-ups cost more CPU than the (de)compression of small shards."""

Compression: TypeAlias = Literal["lz4", "zstd"] | None
"""The IPC body compressions a shard may use (None: uncompressed)."""

COMPACT_COMPRESSION: Compression = "zstd"
"""Merged files are compressed with zstd: a third smaller than the writer's LZ4 (7.3 against 11.0 bytes
per output row on ``benchmarks/analysis.py``'s trace) for ~7% more CPU when the analysis reads them; the
writer keeps LZ4, which costs the training process less while it runs."""


def compact(
    folder: str | Path,
    rank: int,
    *,
    max_rows: int = COMPACT_ROWS,
    compression: Compression = COMPACT_COMPRESSION,
    last: bool = True,
    delete: bool = True,
) -> list[Path]:
    """Merge one rank's consecutive shards in a table ``folder`` into files of at most ``max_rows`` rows
    (a shard larger than that stays as it is); return the merged files written.

    Each merged file is written under a temporary name and renamed into place, then the shards it holds
    are deleted (``delete=False``: left for ``drop_covered``, which a writer calls once readers that
    listed them have had time to read them): a reader at any moment, or after a kill at any moment, reads
    every row once (``live_shards``). ``last=False`` leaves the last group alone, as a writer still adding
    shards to it does. Rows, their order and the schema are unchanged; shards whose schemas differ are
    left as they are. Only the shards of groups being merged are read; the others' rows are counted from
    their files' metadata.
    """
    folder = Path(folder)
    live, _ = live_shards(p.name for p in folder.iterdir()) if folder.is_dir() else ([], [])
    spans = {n: span for n in live if (span := shard_span(n)) is not None and span[0] == rank}
    options = ipc.IpcWriteOptions(compression=compression, use_threads=False)
    groups = _consecutive(folder, spans, max_rows)
    written = []
    for group in groups if last else groups[:-1]:
        if len(group) > 1 and (final := _merge(folder, rank, group, spans, options, delete)) is not None:
            written.append(final)
    return written


def drop_covered(folder: str | Path, rank: int) -> None:
    """Delete one rank's shards in a table ``folder`` whose rows a merged file holds (what ``compact(...,
    delete=False)`` left). Readers already leave them out (``live_shards``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    names = [p.name for p in folder.iterdir()]
    live, conflicting = live_shards(names)
    keep = set(live) | set(conflicting)
    for name in names:
        span = shard_span(name)
        if span is not None and span[0] == rank and name not in keep:
            (folder / name).unlink(missing_ok=True)  # (gone already: nothing to do)


def _rows(path: Path) -> int:
    """Rows in an IPC file, from its record batches' metadata (no data read or decompressed)."""
    with pa.memory_map(str(path)) as source:
        reader = ipc.open_file(source)
        count = getattr(reader, "count_rows", None)  # pyarrow since mid-2026; older ones read the data
        return int(count()) if count is not None else reader.read_all().num_rows


def _consecutive(folder: Path, names: Iterable[str], max_rows: int) -> list[list[str]]:
    """The shards ``names`` in order, in runs of at most ``max_rows`` rows (a shard larger than that alone)."""
    groups: list[list[str]] = []
    rows = 0
    for name in names:
        count = _rows(folder / name)
        if not groups or rows + count > max_rows:
            groups.append([])
            rows = 0
        groups[-1].append(name)
        rows += count
    return groups


def _merge(
    folder: Path,
    rank: int,
    names: list[str],
    spans: dict[str, tuple[int, int, int]],
    options: Any,
    delete: bool,
) -> Path | None:
    """Write the shards ``names`` as one merged file, then delete them (when ``delete``); None when their
    schemas differ (they stay as they are)."""
    tables = [ipc.open_file(pa.memory_map(str(folder / n)), options=_READ).read_all() for n in names]
    try:
        data = pa.concat_tables(tables).unify_dictionaries()
    except pa.ArrowInvalid:
        return None  # shards of different schemas (extra columns written by hand): left as they are
    final = folder / merged_name(rank, spans[names[0]][1], spans[names[-1]][2])
    tmp = folder / f".{final.name}.tmp"
    try:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, data.schema, options=options) as w:
            w.write_table(data)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    if delete:
        for n in names:
            (folder / n).unlink()
    return final


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


def lock_owner(fd: int) -> dict[str, Any]:
    """What a lock file (open as ``fd``) says about the process writing its rank: ``pid``, ``hostname``,
    ``start_time``; {} when empty or unreadable (its writer signs it just after taking the lock)."""
    try:
        owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}
