"""Export one table of many runs as a Parquet dataset partitioned by run, for engines beyond Polars.

``DIR/run=<name>/part-0.parquet`` is the Hive layout that DuckDB (``read_parquet('DIR/**/*.parquet',
hive_partitioning = true)``), Spark (``spark.read.parquet('DIR')``), Dask (``dd.read_parquet('DIR')``) and
Polars (``pl.scan_parquet('DIR/**/*.parquet', hive_partitioning=True)``) read with a ``run`` column
restored from the folder names. Names are percent-encoded in the folder name (``lr[0.1]`` becomes
``run=lr%5B0.1%5D``), as Hive and pyarrow do; every reader above decodes them.
"""

from __future__ import annotations

import os
import shutil
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from .schema import check_table
from .trace import PathLike, Trace, load

ParquetCompression = Literal["lz4", "uncompressed", "snappy", "gzip", "brotli", "zstd"]
"""The Parquet codecs Polars writes."""


def partition_name(run: str) -> str:
    """The folder of a run in the dataset: ``run=<percent-encoded name>``."""
    return f"run={urllib.parse.quote(run, safe='')}"


def to_parquet(
    source: Trace | PathLike | Sequence[PathLike],
    directory: str | os.PathLike[str],
    *,
    table: str = "outputs",
    overwrite: bool = False,
    compression: ParquetCompression = "zstd",
) -> list[Path]:
    """Write ``table`` of every run of ``source`` to ``directory/run=<name>/part-0.parquet``.

    Parameters
    ----------
    source:
        A loaded Trace (its filters and value view apply) or what :func:`~normtrace_analysis.load` takes,
        e.g. ``"runs/*"``.
    directory:
        The dataset's folder. Runs are added to what it holds, so new runs can be exported as they
        finish; a run it already holds is refused unless ``overwrite``, which replaces that run's
        folder (and only that one).
    table:
        One of the tables (:data:`.schema.TABLES`). The files hold its columns, with ``value`` (and ``split`` for outputs)
        as the Trace derives them, less ``run``, which the folder names carry.
    compression:
        Parquet codec.

    Returns
    -------
    The files written, one per run (runs without rows in ``table`` are left out).

    Example
    -------
    >>> to_parquet("runs/*", "export/outputs")  # then duckdb: read_parquet('export/outputs/**/*.parquet', hive_partitioning = true)  # doctest: +SKIP
    """
    check_table(table)
    trace = source if isinstance(source, Trace) else load(source)
    root = Path(directory)
    folders = {run: root / partition_name(run) for run in trace.runs}
    existing = [f for f in folders.values() if f.exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{root} already holds run {existing[0].name} ({len(existing)} of the {len(folders)} runs exported); "
            "pass overwrite=True (--force on the command line) to replace them"
        )
    for folder in existing:
        shutil.rmtree(folder)
    written = []
    with trace.reading():
        for run in trace.runs:
            rows = trace.filter(runs=run).table(table).drop("run")
            if rows.head(1).collect().is_empty():
                continue
            folder = folders[run]
            folder.mkdir(parents=True, exist_ok=True)
            final = folder / "part-0.parquet"
            tmp = folder / ".part-0.parquet.tmp"
            rows.sink_parquet(tmp, compression=compression)
            os.replace(tmp, final)  # a reader never sees a half-written file
            written.append(final)
    return written
