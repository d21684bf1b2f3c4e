"""The runs of a trace as a table: one row per run, its status and times, and one column per hyperparameter.

A sweep is many runs that differ in a few settings. ``Recorder(config={...})`` stores those settings in
``meta.json``; this module flattens them (nested mappings become dotted names: ``{"opt": {"lr": 1e-3}}``
is column ``opt.lr``) so runs can be grouped and filtered by them with ordinary Polars expressions, and
picks out the settings that differ between runs, which is what a report of a sweep should show.

A run's status is its ``meta.json``'s, except that a run which says "running" while its writer is gone
(see :func:`writer_gone`) is :data:`KILLED`: a SIGKILL never lets the recorder write its final status.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from .schema import lock_name, lock_owner

RUN_COLUMNS = ("run", "status", "start_time", "end_time", "seconds", "epochs", "passes", "world_size")
"""The fixed columns of :func:`run_table`, before the configuration's."""

KILLED = "killed"
"""The status of a run whose ``meta.json`` says "running" but whose writer is gone without closing it
(SIGKILL, the OOM killer, a machine that went down): it will never say anything else."""


def writer_gone(run: Path) -> bool:
    """Whether rank 0's writer of ``run`` has ended: its lock file ``.lock-rank0`` was written on this host
    and no process holds its ``flock`` (the kernel drops it when the writer dies). False where that cannot
    be told: a lock of another host (file systems do not share locks), no lock file (a copy of a run,
    which may still be running where it was recorded), or no ``fcntl``."""
    try:
        fd = os.open(run / lock_name(0), os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return False
        if lock_owner(fd).get("hostname") != socket.gethostname():
            return False
        try:  # shared: never in a live writer's way for more than this call; closing the file releases it
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:  # held (or a file system without locks): the writer may be alive
            return False
        return True
    finally:
        os.close(fd)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level with dotted keys; lists and scalars stay values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _seconds(meta: Mapping[str, Any]) -> float | None:
    try:
        start = datetime.fromisoformat(str(meta["start_time"]))
        end = datetime.fromisoformat(str(meta["end_time"]))
    except (KeyError, TypeError, ValueError):
        return None
    return (end - start).total_seconds()


def _column(values: list[Any]) -> pl.Series:
    """One configuration key across runs: numbers stay numbers (missing ones null), booleans booleans,
    anything else (strings, lists, values of mixed kinds) becomes text."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pl.Series(values, dtype=pl.Boolean)
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pl.Series(values, dtype=pl.Int64)
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return pl.Series([None if v is None else float(v) for v in values], dtype=pl.Float64)
    return pl.Series([None if v is None else v if isinstance(v, str) else json.dumps(v) for v in values],
                     dtype=pl.String)  # fmt: skip


def run_table(
    metas: Mapping[str, Mapping[str, Any]], *, status: Mapping[str, Any] | None = None
) -> pl.DataFrame:
    """One row per run (in load order): ``RUN_COLUMNS``, then one column per configuration key, named as
    the key (``config.<key>`` where it would collide with a fixed column), null where a run lacks it.
    ``status`` replaces the metadata's status of the runs it names (a killed run's, see :data:`KILLED`)."""
    status = status or {}
    configs = {run: flatten(meta.get("config") or {}) for run, meta in metas.items()}
    keys = list(dict.fromkeys(k for c in configs.values() for k in c))
    fixed: dict[str, pl.Series] = {
        "run": pl.Series(list(metas), dtype=pl.String),
        "status": pl.Series([status.get(r, m.get("status")) for r, m in metas.items()], dtype=pl.String),
        "start_time": pl.Series([m.get("start_time") for m in metas.values()], dtype=pl.String),
        "end_time": pl.Series([m.get("end_time") for m in metas.values()], dtype=pl.String),
        "seconds": pl.Series([_seconds(m) for m in metas.values()], dtype=pl.Float64),
        "epochs": pl.Series([m.get("epochs") for m in metas.values()], dtype=pl.Int64),
        "passes": pl.Series([m.get("passes") for m in metas.values()], dtype=pl.Int64),
        "world_size": pl.Series([m.get("world_size") for m in metas.values()], dtype=pl.Int64),
    }
    columns = dict(fixed)
    for key in keys:
        name = f"config.{key}" if key in fixed else key
        columns[name] = _column([configs[run].get(key) for run in metas]).alias(name)
    return pl.DataFrame([s.alias(name) for name, s in columns.items()])


def differing(table: pl.DataFrame) -> list[str]:
    """The configuration columns of a :func:`run_table` whose values are not the same in every run."""
    out = []
    for name in table.columns[len(RUN_COLUMNS) :]:
        values = table[name].to_list()
        first = values[0]
        if any(not _same(v, first) for v in values[1:]):
            out.append(name)
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)
