"""Load one or more run directories lazily: validate shard footers with pyarrow, scan them with Polars.

Nothing but ``meta.json`` files and shard footers is read at load time, so a run of many shards and tens
of millions of rows loads in milliseconds; rows are read when a query collects.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar, cast

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from .errors import (
    CorruptShardError,
    EmptyRunError,
    EmptySelectionError,
    MetaError,
    MissingTableError,
    RunNotFoundError,
    SchemaVersionError,
    SkippedShardsWarning,
    StrayFilesWarning,
)
from .names import PERMUTATIONS, SPLITS, Level, Table
from .runs import KILLED, writer_gone
from .schema import (
    META_FILE,
    REQUIRED_COLUMNS,
    SCHEMA_VERSION,
    SHARD_NAME,
    SHARD_SUFFIX,
    TABLES,
    check_table,
    live_shards,
    shard_span,
)
from .storage import ObjectPath, StorageOptions, is_url, parallel_map
from .storage import expand as expand_url

PathLike = str | os.PathLike[str]
RunPath: TypeAlias = Path | ObjectPath
"""Where a run's folders and files are: a local path, or one on object storage (see :mod:`.storage`)."""
T = TypeVar("T")
V = TypeVar("V")

_META_RANK = re.compile(r"^meta\.rank(\d+)\.json$")

MODULE_TABLES: tuple[str, ...] = ("outputs", "params", "signals")
"""The tables with a ``module`` column, to which the ``modules`` filter applies."""


@dataclass(frozen=True)
class _Run:
    """One run directory as found at load: its name, metadata and the shards that passed validation."""

    name: str
    path: RunPath
    meta: dict[str, Any]
    rank_metas: dict[int, dict[str, Any]]
    shards: dict[str, list[tuple[RunPath, pl.Schema]]]
    status: Any
    """``meta["status"]``, or :data:`.runs.KILLED` for a run that says "running" whose writer is gone."""
    storage_options: dict[str, Any] | None = None
    """Polars' options for scanning a run on object storage (None for a local run)."""


@dataclass(frozen=True)
class _Filters:
    """Row filters of a Trace; ``None`` (or no module spec) means no restriction; module specs all apply."""

    modules: tuple[tuple[str, ...] | str, ...] = ()
    split: tuple[str, ...] | None = None
    epochs: tuple[int | None, int | None] | None = None
    passes: tuple[int | None, int | None] | None = None
    ranks: tuple[int, ...] | None = None
    runs: tuple[str, ...] | None = None
    kinds: tuple[str, ...] | None = None


def _reads_shards(method: Callable[..., T]) -> Callable[..., T]:
    """Run a Trace method inside :meth:`Trace.reading`, so a damaged shard is named, not a codec error."""

    @functools.wraps(method)
    def wrapper(self: Trace, *args: Any, **kwargs: Any) -> T:
        with self.reading():
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class Trace:
    """A lazily loaded set of runs; every table is a ``polars.LazyFrame`` with a ``run`` column.

    ``outputs`` and ``params`` also carry ``value`` (float64: ``norm``, or ``norm / sqrt(numel)`` where
    normalized) and ``outputs`` a ``split`` column ("train" when grad was enabled, else "no_grad");
    ``signals`` (trace format 2) has its own ``value`` (float32, as recorded).
    Build one with :func:`load`; :meth:`filter` returns a narrower Trace, the original is unchanged.
    """

    _runs: list[_Run]
    _normalize: dict[str, dict[str, bool]]
    _base: dict[str, pl.LazyFrame]
    skipped: list[RunPath]
    """What ``load(..., on_error="skip")`` left out: corrupt shards, then the folders of runs without one."""
    _filters: _Filters = field(default_factory=_Filters)
    _cache: dict[Hashable, Any] = field(init=False, repr=False, compare=False)
    _by_run: dict[str, dict[str, pl.LazyFrame]] = field(default_factory=dict, repr=False, compare=False)
    """Per table, each run's own scan: a Trace filtered to some runs scans only their shards (a filter on
    the ``run`` column of the concatenation would read every run's shards, 100x the work over 100 runs)."""

    def __post_init__(self) -> None:
        # Memoised analysis results, per Trace: a filtered Trace starts with its own (see ``cached``).
        self._cache = {}

    def cached(self, key: Hashable, compute: Callable[[], T], *, slot: str | None = None) -> T:
        """``compute()``, memoised on this Trace under ``key`` (the analyses' one way to memoise).

        Results are kept for the Trace's lifetime; a filtered Trace starts empty, since its rows differ.
        With ``slot``, the slot holds one result only and a new ``key`` replaces the old one: for large
        intermediates (the regrouped series of a table) of which one at a time is worth its memory.
        ``key`` must name everything the result depends on (table, level, options).

        Example: ``trace.cached(("my-stat", window), lambda: expensive(trace, window))``.
        """
        if slot is None:
            if key not in self._cache:
                self._cache[key] = compute()
            return cast("T", self._cache[key])  # what compute() returned for this key
        held = self._cache.get(slot)
        if held is None or held[0] != key:
            self._cache[slot] = None  # free the old result before computing the new one
            held = self._cache[slot] = (key, compute())
        return cast("T", held[1])  # what compute() returned for this key

    def is_cached(self, key: Hashable) -> bool:
        """Whether :meth:`cached` holds a result under ``key`` (so a scan computing it on the side can
        leave it out)."""
        return key in self._cache

    def __repr__(self) -> str:
        """A few lines (runs, rows per table from the shards' metadata, filters): see :mod:`.notebook`."""
        from .notebook import trace_repr

        return trace_repr(self)

    def _repr_html_(self) -> str:
        """A small table of the runs for notebooks: see :mod:`.notebook`."""
        from .notebook import trace_html

        return trace_html(self)

    @property
    def runs(self) -> list[str]:
        """Names of the loaded runs (directory names, suffixed ``#2``, ``#3`` … where two collide) that the
        Trace's filters keep."""
        return [r.name for r in self._selected_runs()]

    def _selected_runs(self) -> list[_Run]:
        keep = self._filters.runs
        return [r for r in self._runs if keep is None or r.name in keep]

    @property
    def run_table(self) -> pl.DataFrame:
        """One row per run: status ("killed" where meta.json says "running" but the writer is gone: see
        :data:`.runs.KILLED`), start and end, seconds, epochs, passes, world size, and one column per
        ``Recorder(config=...)`` setting (nested ones dotted), to group or filter a sweep by, e.g.
        ``trace.filter(runs=trace.run_table.filter(pl.col("lr") < 1e-3)["run"].to_list())``."""
        from .runs import run_table

        return run_table(self.metas, status={r.name: r.status for r in self._selected_runs()})

    @property
    def meta(self) -> dict[str, Any]:
        """The first run's ``meta.json`` (rank 0's metadata)."""
        return self._runs[0].meta

    @property
    def metas(self) -> dict[str, dict[str, Any]]:
        """Every selected run's ``meta.json``, by run name."""
        return {r.name: r.meta for r in self._selected_runs()}

    @property
    def rank_metas(self) -> dict[str, dict[int, dict[str, Any]]]:
        """Per selected run, the metadata of every rank that wrote one (rank 0 is ``meta.json``)."""
        return {r.name: r.rank_metas for r in self._selected_runs()}

    @property
    def paths(self) -> dict[str, RunPath]:
        """Each run's directory, by run name (an :class:`~.storage.ObjectPath` for a run on object storage)."""
        return {r.name: r.path for r in self._runs}

    @property
    def normalize(self) -> dict[str, dict[str, bool]]:
        """Per run, whether ``value`` is ``norm / sqrt(numel)`` (True) or the raw norm, for outputs and params."""
        return self._normalize

    @property
    def outputs(self) -> pl.LazyFrame:
        """Per-module output norms, one row per module per recorded pass (filters applied)."""
        return self.table("outputs")

    @property
    def params(self) -> pl.LazyFrame:
        """Parameter norms, one row per parameter per collection (filters applied)."""
        return self.table("params")

    @property
    def metrics(self) -> pl.LazyFrame:
        """Losses and pushed metrics (filters on epochs, passes, ranks and runs applied)."""
        return self.table("metrics")

    @property
    def events(self) -> pl.LazyFrame:
        """Events such as ``target_update`` (filters on epochs, passes, ranks and runs applied)."""
        return self.table("events")

    @property
    def signals(self) -> pl.LazyFrame:
        """Gradient norms, update ratios, activation rates … one row per kind, module and parameter per
        measurement (filters on modules, kinds, epochs, passes, ranks and runs applied); an empty frame
        for a version-1 trace, which has no such table."""
        return self.table("signals")

    @property
    def has_signals(self) -> bool:
        """Whether any loaded run recorded the signals table (a version-1 trace never does)."""
        return bool(self.shards("signals"))

    def shards(self, table: str) -> list[RunPath]:
        """The validated shard files of ``table`` across all runs (empty when no run recorded it)."""
        check_table(table)
        return [p for r in self._runs for p, _ in r.shards[table]]

    def require(self, table: str) -> None:
        """Raise :class:`MissingTableError` naming the folders searched when no run has ``table`` shards."""
        if not self.shards(table):
            where = ", ".join(str(r.path / table) for r in self._runs)
            raise MissingTableError(
                f"no {table} shards in {where}: the run recorded no {table} (is the lens attached?)",
                self._runs[0].path / table,
            )

    def table(self, name: str) -> pl.LazyFrame:
        """Any table by name (:data:`.schema.TABLES`), with this Trace's filters applied."""
        check_table(name)
        lf = self._base[name]
        if self._filters.runs is not None:  # never empty: filter() refuses a run not selected
            lf = pl.concat([self._by_run[name][r] for r in self.runs], how="diagonal")
        conds = self._row_conditions(name)
        return lf.filter(*conds) if conds else lf

    def _row_conditions(self, name: str) -> list[pl.Expr]:
        """This Trace's filters on the rows of table ``name``, but for the choice of runs."""
        f = self._filters
        conds: list[pl.Expr] = []
        if f.ranks is not None:
            conds.append(pl.col("rank").is_in(list(f.ranks)))
        for col, bounds in (("epoch", f.epochs), ("pass", f.passes)):
            if bounds is not None:
                lo, hi = bounds
                if lo is not None:
                    conds.append(pl.col(col) >= lo)
                if hi is not None:
                    conds.append(pl.col(col) <= hi)
        if name in MODULE_TABLES:
            for spec in f.modules:
                conds.append(module_filter(spec))
        if name == "signals" and f.kinds is not None:
            conds.append(pl.col("kind").is_in(list(f.kinds)))
        if name == "outputs" and f.split is not None:
            conds.append(pl.col("split").is_in(list(f.split)))
        return conds

    def shards_by_rank(self, name: str) -> dict[str, dict[int, list[tuple[RunPath, int]]]]:
        """Per selected run, per rank (from the shard names), its shards of table ``name`` in sequence
        order with their sizes in bytes: the order the rows were written in. Ranks the Trace's filters
        leave out are left out."""
        check_table(name)
        ranks = self._filters.ranks
        out: dict[str, dict[int, list[tuple[RunPath, int]]]] = {}
        for run in self._runs:
            if self._filters.runs is not None and run.name not in self._filters.runs:
                continue
            by_rank: dict[int, list[tuple[RunPath, int]]] = {}
            for path, _ in run.shards[name]:
                rank = _rank_of(path)
                if ranks is None or rank in ranks:
                    by_rank.setdefault(rank, []).append((path, path.stat().st_size))
            out[run.name] = by_rank
        return out

    def scan_shards(self, name: str, run: str, paths: Sequence[RunPath]) -> pl.LazyFrame:
        """Table ``name`` of one run as :meth:`table` gives it (derived columns, filters), read from the
        shards ``paths`` only (some of those :meth:`shards_by_rank` lists), in that order."""
        found = next(r for r in self._runs if r.name == run)
        schemas = dict(found.shards[name])
        chosen = [(p, schemas[p]) for p in paths]
        part = replace(found, shards={**found.shards, name: chosen})
        lf = _scan(part, name, {t: self._normalize[run].get(t, False) for t in TABLES})
        conds = self._row_conditions(name)
        return lf.filter(*conds) if conds else lf

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Inside the block, a failure to read rows (a shard whose footer is intact but whose body is
        damaged) becomes a :class:`CorruptShardError` naming the shard; other errors pass unchanged."""
        try:
            yield
        except (pl.exceptions.PolarsError, OSError, pa.ArrowException) as exc:
            damaged = self._damaged_shard()
            if damaged is None:
                raise
            path, why = damaged
            if why is None:
                raise CorruptShardError(
                    f"shard {path} is gone since the trace was loaded: a run being written merges its shards "
                    "as it goes (and deletes them a minute later), or the file was deleted; load the trace "
                    "again",
                    path,
                ) from exc
            raise CorruptShardError(
                f"corrupt shard {path}: {why}; load with on_error='skip' (CLI: --skip-corrupt) to leave "
                "it out",
                path,
            ) from exc

    def _damaged_shard(self) -> tuple[RunPath, str | None] | None:
        """The first shard of any loaded table whose rows cannot be read and why (``why`` None: the file is
        gone); None when every shard reads."""
        for run in self._runs:
            for table in TABLES:
                for path, _ in run.shards[table]:
                    try:
                        _validate_shard(path, table, body=True)
                    except CorruptShardError as exc:
                        if isinstance(exc.__cause__, FileNotFoundError):  # gone, not damaged
                            return path, None
                        return path, str(exc.__cause__ or exc)
        return None

    def filter(
        self,
        modules: Sequence[str] | str | None = None,
        split: str | Sequence[str] | None = None,
        epochs: int | tuple[int | None, int | None] | None = None,
        passes: int | tuple[int | None, int | None] | None = None,
        ranks: int | Sequence[int] | None = None,
        runs: str | Sequence[str] | None = None,
        kinds: str | Sequence[str] | None = None,
    ) -> Trace:
        """A new Trace restricted to some rows; filters combine with this Trace's own (logical and).

        ``modules``: a list of exact names, or a regex string (searched, so anchor it with ``^…$`` for an
        exact match); applies to outputs, params and signals. ``split``: "train" (grad-enabled passes) or
        "no_grad", applies to outputs. ``epochs``/``passes``: an int or an inclusive ``(lo, hi)`` range,
        either end may be None; with ``ranks`` and ``runs`` they apply to every table. ``kinds``: signal
        kinds (``"grad_norm"``, ``"update_ratio"`` …, exact names), applies to signals; a kind no run
        recorded is refused, naming the recorded ones.
        """
        f = self._filters
        if modules is not None:
            if isinstance(modules, str):
                _check_regex(modules)
            f = replace(f, modules=(*f.modules, modules if isinstance(modules, str) else tuple(modules)))
        if split is not None:
            splits = (split,) if isinstance(split, str) else tuple(split)
            bad = [s for s in splits if s not in SPLITS]
            if bad:
                raise ValueError(f"unknown split {bad[0]!r}; outputs splits are {list(SPLITS)}")
            f = replace(f, split=_intersect(f.split, splits))
        if epochs is not None:
            f = replace(f, epochs=_narrow(f.epochs, epochs))
        if passes is not None:
            f = replace(f, passes=_narrow(f.passes, passes))
        if ranks is not None:
            f = replace(f, ranks=_intersect(f.ranks, (ranks,) if isinstance(ranks, int) else tuple(ranks)))
        if runs is not None:
            names = (runs,) if isinstance(runs, str) else tuple(runs)
            unknown = [r for r in names if r not in self.runs]
            if unknown:
                raise ValueError(f"unknown run {unknown[0]!r}; loaded runs are {self.runs}")
            f = replace(f, runs=_intersect(f.runs, names))
        if kinds is not None:
            wanted = (kinds,) if isinstance(kinds, str) else tuple(kinds)
            self._check_kinds(wanted)
            f = replace(f, kinds=_intersect(f.kinds, wanted))
        narrower = replace(self, _filters=f)
        narrower._check_selects_rows(
            modules=modules, epochs=epochs, passes=passes, split=split, kinds=kinds, ranks=ranks
        )
        return narrower

    def signal_kinds(self) -> list[str]:
        """The signal kinds recorded in the selected rows, sorted (empty without a signals table)."""
        if not self.has_signals:
            return []

        def read() -> list[str]:
            with self.reading():
                return sorted(self.signals.select(pl.col("kind").unique()).collect()["kind"].to_list())

        return list(self.cached(("signal_kinds",), read))

    def of_kind(self, kind: str) -> Trace:
        """This Trace filtered to one signal kind, kept on this Trace: the analyses of one kind (its
        spikes, its alignment, its chart) then share one filtered Trace and its memoised results."""
        return self.cached(("of_kind", kind), lambda: self.filter(kinds=kind))

    def _check_kinds(self, kinds: tuple[str, ...]) -> None:
        """Refuse signal kinds that no loaded run recorded, listing those recorded (a typo such as
        ``grad_norms`` must not read as "no spikes")."""
        self.require("signals")
        whole = replace(self, _filters=_Filters(runs=self._filters.runs))
        recorded = whole.signal_kinds()
        unknown = [k for k in kinds if k not in recorded]
        if unknown:
            raise EmptySelectionError(
                f"no signals of kind {unknown[0]!r}; the trace records kinds: {listing(recorded)}",
                self._runs[0].path,
            )

    def _check_selects_rows(self, **asked: Any) -> None:
        """Raise :class:`EmptySelectionError` when the filters ``asked`` for leave no row in the tables they
        apply to, naming them and what the trace holds instead (a typo must not read as "no spikes")."""
        if all(value is None for value in asked.values()):
            return  # runs only: each named run exists (checked), so rows are not in question
        applies: tuple[str, ...] = TABLES
        if asked.get("modules") is not None:
            applies = tuple(t for t in applies if t in MODULE_TABLES)
        if asked.get("kinds") is not None:
            applies = tuple(t for t in applies if t == "signals")
        if asked.get("split") is not None:
            applies = tuple(t for t in applies if t == "outputs")
        tables = [t for t in applies if self.shards(t)]
        probes = [self.table(t).head(1).select(pl.len()) for t in tables]
        if any(frame.item() for frame in pl.collect_all(probes)):
            return
        given = ", ".join(f"{k}={v!r}" for k, v in asked.items() if v is not None)
        if not tables:  # e.g. modules= on a run that recorded only losses
            raise EmptySelectionError(
                f"no row matches {given}: the trace has no {' or '.join(applies)} rows, the tables it "
                "applies to",
                self._runs[0].path,
            )
        whole = replace(self, _filters=_Filters(runs=self._filters.runs))
        found = []
        if asked.get("modules") is not None:
            names = (
                pl.concat([whole.table(t).select("module").unique() for t in tables])
                .unique()
                .sort("module")
                .collect()["module"]
            )
            found.append(f"modules: {listing(names.to_list())}")
        if asked.get("split") is not None:
            splits = whole.outputs.select(pl.col("split").unique().sort()).collect()["split"]
            found.append(f"splits: {listing(splits.to_list())}")
        if asked.get("ranks") is not None:
            ranks = sorted(
                {_rank_of(p) for r in whole._selected_runs() for t in tables for p, _ in r.shards[t]}
            )
            found.append(f"ranks: {listing([str(r) for r in ranks])}")
        for column, plural in (("epoch", "epochs"), ("pass", "passes")):
            if asked.get(plural) is not None:
                bounds = pl.concat([whole.table(t).select(column) for t in tables], how="vertical_relaxed")
                lo_hi = bounds.select(lo=pl.col(column).min(), hi=pl.col(column).max()).collect()
                found.append(f"{plural} {lo_hi['lo'].item()}..{lo_hi['hi'].item()}")
        holds = f"; the trace holds {' and '.join(found)}" if found else ""
        raise EmptySelectionError(f"no row matches {given}{holds}", self._runs[0].path)

    # Analyses: one calling style. The first argument is what is analysed (a table or an event name),
    # every option is keyword-only, and each method delegates to its module's function of the same name.

    @_reads_shards
    def epoch_summary(self, table: Table = "outputs") -> pl.DataFrame:
        """Per-epoch statistics of ``value`` per module (and param / split); see :func:`.summary.epoch_summary`."""
        from .summary import epoch_summary

        return epoch_summary(self, table)

    @_reads_shards
    def spikes(
        self,
        table: Table = "outputs",
        *,
        level: Level = "pass",
        modules: Sequence[str] | str | None = None,
        threshold: float | None = None,
        baseline_window: int | None = None,
    ) -> pl.DataFrame:
        """Spikes of each module's series with the nearest preceding event; see :func:`.spikes.spikes`."""
        from .spikes import spikes

        return spikes(
            self, table, level=level, modules=modules, threshold=threshold, baseline_window=baseline_window
        )

    @_reads_shards
    def spike_clusters(
        self,
        table: Table = "outputs",
        *,
        level: Level = "pass",
        modules: Sequence[str] | str | None = None,
        threshold: float | None = None,
        baseline_window: int | None = None,
        window: int | None = None,
    ) -> pl.DataFrame:
        """Each series' spikes merged into excursions; see :func:`.alignment.spike_clusters`."""
        from .alignment import spike_clusters

        return spike_clusters(
            self,
            table,
            level=level,
            modules=modules,
            threshold=threshold,
            baseline_window=baseline_window,
            window=window,
        )

    @_reads_shards
    def spike_groups(
        self,
        table: Table = "outputs",
        *,
        level: Level = "pass",
        modules: Sequence[str] | str | None = None,
        threshold: float | None = None,
        baseline_window: int | None = None,
        window: int | None = None,
        tolerance: int | None = None,
    ) -> pl.DataFrame:
        """Series whose spikes are the same excursions, grouped; see :func:`.alignment.spike_groups`."""
        from .alignment import spike_groups

        return spike_groups(
            self,
            table,
            level=level,
            modules=modules,
            threshold=threshold,
            baseline_window=baseline_window,
            window=window,
            tolerance=tolerance,
        )

    def event_alignment(
        self,
        event: str = "target_update",
        *,
        window: int | Sequence[int] | None = None,
        level: Level = "pass",
        table: Table = "outputs",
        modules: Sequence[str] | str | None = None,
        threshold: float | None = None,
        baseline_window: int | None = None,
        placebo: bool = True,
        permutations: int = PERMUTATIONS,
        seed: int = 0,
    ) -> pl.DataFrame:
        """Do spikes follow ``event``? k of E events, local chance, permutation p, BH q, placebo; one row
        per series (and window); see :func:`.alignment.event_alignment`."""
        from .alignment import event_alignment

        return event_alignment(
            self,
            event,
            window=window,
            level=level,
            table=table,
            modules=modules,
            threshold=threshold,
            baseline_window=baseline_window,
            placebo=placebo,
            permutations=permutations,
            seed=seed,
        )

    @_reads_shards
    def signal_findings(self, *, event: str | Sequence[str] | None = None, tail: float = 0.1) -> pl.DataFrame:
        """Exploding or vanishing gradients, dead units, update ratios far from 1e-3, gradient spikes
        with output spikes and after ``event``: one sentence each; see :func:`.signals.signal_findings`.
        An ``event`` no run recorded raises :class:`MissingEventError`, as in :meth:`event_alignment`."""
        from .signals import signal_findings

        return signal_findings(self, event=event, tail=tail)

    @_reads_shards
    def event_steps(
        self,
        event: str = "target_update",
        *,
        window: int | None = None,
        level: Level = "pass",
        table: Table = "outputs",
        modules: Sequence[str] | str | None = None,
        baseline_window: int | None = None,
        permutations: int = PERMUTATIONS,
        seed: int = 0,
    ) -> pl.DataFrame:
        """Does the level step at ``event``? Median after vs before, permutation p; see
        :func:`.alignment.event_steps`."""
        from .alignment import event_steps

        return event_steps(
            self,
            event,
            window=window,
            level=level,
            table=table,
            modules=modules,
            baseline_window=baseline_window,
            permutations=permutations,
            seed=seed,
        )

    @_reads_shards
    def event_profile(
        self,
        event: str = "target_update",
        *,
        window: int | None = None,
        level: Level = "pass",
        table: Table = "outputs",
        modules: Sequence[str] | str | None = None,
        placebo: bool = True,
    ) -> pl.DataFrame:
        """The event-triggered average of every series, −W … +W around ``event``; see
        :func:`.alignment.event_profile`."""
        from .alignment import event_profile

        return event_profile(
            self, event, window=window, level=level, table=table, modules=modules, placebo=placebo
        )


def load(
    path: PathLike | Iterable[PathLike],
    *,
    normalize: bool | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    storage_options: StorageOptions | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> Trace:
    """Open run directories lazily: a path, a list of paths, or a glob such as ``"runs/*"``.

    A path may be a URL of object storage (``"s3://bucket/runs/*"``): ``storage_options`` are passed to
    Polars' scans (its keys, e.g. ``aws_endpoint_url``, ``aws_region``) and, for S3, configure the
    pyarrow client that lists the runs and reads their footers; ``filesystem`` (a
    ``pyarrow.fs.FileSystem``) replaces that client for any scheme. See :mod:`.storage`.

    ``normalize=None`` follows each run's ``meta["normalize"]`` (what the lenses asked for); True/False
    forces the RMS (``norm / sqrt(numel)``) or raw L2 view of ``value``. ``on_error="skip"`` reads every
    shard through once and leaves out corrupt or truncated ones with a :class:`SkippedShardsWarning`
    instead of raising, and runs with no shard (:class:`EmptyRunError`) with another, unless every run
    is empty; by default only footers are read, so a shard whose body alone is damaged raises a
    :class:`CorruptShardError` naming it when an analysis first reads it. ``.arrow`` files that are not
    shards by name (copies, exports) are left out with a :class:`StrayFilesWarning`.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    dirs = _expand(path, storage_options, filesystem)
    skipped: list[RunPath] = []
    stray: list[RunPath] = []
    named: list[tuple[RunPath, str]] = []
    taken: set[str] = set()
    for d in dirs:
        name = d.name or str(d)
        unique, i = name, 1
        while unique in taken:
            i += 1
            unique = f"{name}#{i}"
        taken.add(unique)
        named.append((d, unique))
    options = dict(storage_options) if storage_options is not None else None
    local = [(d, n) for d, n in named if not isinstance(d, ObjectPath)]
    remote = [(d, n) for d, n in named if isinstance(d, ObjectPath)]
    empty: list[tuple[RunPath, EmptyRunError]] = []
    opened = {n: _open_kept(d, n, on_error, skipped, stray, empty) for d, n in local}
    # remote runs: their listings and footers are requests, made together
    found = parallel_map(
        lambda dn: _open_kept(dn[0], dn[1], on_error, skipped, stray, empty, options), remote
    )
    opened.update(zip((n for _, n in remote), found, strict=True))
    runs = [run for _, n in named if (run := opened[n]) is not None]
    if not runs:  # every run is empty: there are no others to leave them out for
        if len(empty) == 1:
            raise empty[0][1]
        each = "; ".join(str(e) for _, e in empty)
        raise EmptyRunError(f"none of the {len(empty)} runs has a shard: {each}", empty[0][0])
    if stray:
        listing = "\n  ".join(str(p) for p in stray)
        warnings.warn(
            f"left out {len(stray)} .arrow file(s) that are not shards (a shard is rank<r>-<seq>.arrow, or "
            f"rank<r>-<first>-<last>.arrow once merged, one per rank and span of sequence numbers):\n  {listing}",
            StrayFilesWarning,
            stacklevel=2,
        )
    if skipped:
        listing = "\n  ".join(str(p) for p in skipped)
        warnings.warn(
            f"skipped {len(skipped)} unreadable shard(s):\n  {listing}", SkippedShardsWarning, stacklevel=2
        )
    if empty:
        listing = "\n  ".join(
            f"{d}{' (every shard unreadable)' if any(_inside(p, d) for p in skipped) else ''}"
            for d, _ in empty
        )
        warnings.warn(
            f"left out {len(empty)} run(s) with no shard in any table:\n  {listing}",
            SkippedShardsWarning,
            stacklevel=2,
        )
        skipped.extend(d for d, _ in empty)
    norm = {
        r.name: {t: bool(normalize if normalize is not None else _meta_normalize(r.meta, t)) for t in TABLES}
        for r in runs
    }
    by_run = {t: {r.name: _scan(r, t, norm[r.name]) for r in runs} for t in TABLES}
    base = {t: pl.concat(list(by_run[t].values()), how="diagonal") for t in TABLES}
    normalize_views = {r: {t: v[t] for t in ("outputs", "params")} for r, v in norm.items()}
    return Trace(runs, normalize_views, base, skipped, _by_run=by_run)


def refuse_inside_tables(trace: Trace, path: PathLike) -> None:
    """Refuse to write ``path`` anywhere inside a loaded run's table folders (``RUN/outputs/…``), where the
    next load would find it beside the shards; the error names the run and the folder."""
    where = Path(path).resolve()
    for run, folder in trace.paths.items():
        if not isinstance(folder, Path):
            continue  # a run on object storage: a local output cannot land in it
        for table in TABLES:
            if where.is_relative_to((folder / table).resolve()):
                raise ValueError(
                    f"{path} is inside the {table}/ folder of run {run!r}; write it somewhere else"
                )


def _expand(
    path: PathLike | Iterable[PathLike],
    storage_options: StorageOptions | None = None,
    filesystem: pafs.FileSystem | None = None,
) -> list[RunPath]:
    """Run directories named by a path, a glob, or an iterable of either; duplicates are dropped.

    URLs (``s3://…``) name runs on object storage (:mod:`.storage`), never local folders."""
    items = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not items:
        raise RunNotFoundError("no run directory given", None)
    dirs: list[RunPath] = []
    for item in items:
        if is_url(item):
            dirs.extend(expand_url(item, storage_options, filesystem))
            continue
        s = os.fspath(item)
        if not os.path.exists(s) and any(c in s for c in "*?["):
            matches = sorted(p for p in glob.glob(s) if os.path.isdir(p))
            if not matches:
                raise RunNotFoundError(f"no run directory matches {s!r}", s)
            dirs.extend(Path(m) for m in matches)
        elif not os.path.isdir(s):
            raise RunNotFoundError(f"run directory not found: {s}", s)
        else:
            dirs.append(Path(s))
    return list({d.resolve(): d for d in dirs}.values())


def _read_meta(path: RunPath) -> dict[str, Any]:
    """Parse one metadata file and refuse a schema version newer than :data:`SCHEMA_VERSION`."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MetaError(f"cannot read run metadata {path}: {exc}", path) from exc
    except RecursionError:  # a document nested thousands deep: not ours, and not worth a traceback
        raise MetaError(f"cannot read run metadata {path}: nested too deeply", path) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("schema_version"), int):
        raise MetaError(f"{path} is not normtrace metadata: no integer 'schema_version'", path)
    if meta["schema_version"] > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{path} has trace schema version {meta['schema_version']}, newer than the {SCHEMA_VERSION} "
            "this normtrace_analysis understands: upgrade normtrace-analysis",
            path,
        )
    return meta


def _open_kept(
    d: RunPath,
    name: str,
    on_error: str,
    skipped: list[RunPath],
    stray: list[RunPath],
    empty: list[tuple[RunPath, EmptyRunError]],
    storage_options: dict[str, Any] | None = None,
) -> _Run | None:
    """:func:`_open_run`, but with ``on_error="skip"`` a run without a shard goes to ``empty`` (None):
    one empty run, a sweep's run that crashed before its first flush, must not block the others."""
    try:
        return _open_run(d, name, on_error, skipped, stray, storage_options)
    except EmptyRunError as exc:
        if on_error == "raise":
            raise
        empty.append((d, exc))
        return None


def _open_run(
    d: RunPath,
    name: str,
    on_error: str,
    skipped: list[RunPath],
    stray: list[RunPath],
    storage_options: dict[str, Any] | None = None,
) -> _Run:
    """Read a run's metadata and validate every shard's footer and columns (and, when corrupt shards are
    to be skipped, its body: a damaged body is otherwise found only when a query reads it)."""
    meta_path = d / META_FILE
    if not meta_path.is_file():
        nested = sorted(p.parent.name for p in d.glob(f"*/{META_FILE}"))
        hint = f" (it holds runs {nested[:5]}: pass '{d}/*' to load them)" if nested else ""
        raise MetaError(f"{d} is not a normtrace run: no {META_FILE}{hint}", meta_path)
    meta = _read_meta(meta_path)
    rank_metas = {0: meta}
    for p in d.iterdir():
        m = _META_RANK.match(p.name)
        if m:
            rank_metas[int(m.group(1))] = _read_meta(p)
    shards: dict[str, list[tuple[RunPath, pl.Schema]]] = {}
    body = on_error == "skip"
    for table in TABLES:
        files = _shard_files(d / table, stray)
        if isinstance(d, ObjectPath):  # a footer is a request: make them together, report in order
            checked = parallel_map(functools.partial(_try_validate, table=table, body=body), files)
        else:
            checked = [_try_validate(f, table, body) for f in files]
        good: list[tuple[RunPath, pl.Schema]] = []
        for f, result in zip(files, checked, strict=True):
            if isinstance(result, CorruptShardError):
                if on_error == "raise":
                    raise result
                skipped.append(f)
            else:
                good.append((f, result))
        shards[table] = good
    if not any(shards.values()):
        why = " (every shard was unreadable and skipped)" if any(_inside(p, d) for p in skipped) else ""
        raise EmptyRunError(f"run {d} has no shards in any of {'/, '.join(TABLES)}/{why}", d)
    status = meta.get("status")
    if status == "running" and isinstance(d, Path) and writer_gone(d):
        status = _read_meta(meta_path).get("status")  # a close since the first read removed the lock
        status = KILLED if status == "running" else status
    return _Run(name, d, meta, dict(sorted(rank_metas.items())), shards, status, storage_options)


def _inside(path: RunPath, folder: RunPath) -> bool:
    """Whether ``path`` lies in ``folder``; a local path never lies in a folder on object storage, nor the
    reverse (``skipped`` gathers both kinds when local and remote runs load together)."""
    if isinstance(path, ObjectPath):
        return path.is_relative_to(folder)
    return isinstance(folder, Path) and path.is_relative_to(folder)


def _try_validate(path: RunPath, table: str, body: bool) -> pl.Schema | CorruptShardError:
    """:func:`_validate_shard`'s schema, or the error it raised (so checks can run side by side)."""
    try:
        return _validate_shard(path, table, body=body)
    except CorruptShardError as exc:
        return exc


def _shard_files(folder: RunPath, stray: list[RunPath]) -> list[RunPath]:
    """A table folder's shards in (rank, sequence) order; other ``.arrow`` files go to ``stray``.

    Only the recorder's names count, so a copy (``rank0-000003 copy.arrow``) or an export written into
    the folder is never read as part of the run. A merged shard replaces the shards of its span (a merge
    interrupted before it deleted them leaves both); names that would read rows twice (two names for
    one span) are stray too (``format.live_shards``).
    """
    if not folder.is_dir():
        return []
    by_name: dict[str, RunPath] = {}
    for f in folder.iterdir():
        if not f.name.endswith(SHARD_SUFFIX):
            continue  # temporary .arrow.tmp files of a writer, anything else
        if SHARD_NAME.match(f.name) is None:
            stray.append(f)
        else:
            by_name[f.name] = f
    live, conflicting = live_shards(by_name)
    stray.extend(by_name[n] for n in conflicting)
    return [by_name[n] for n in live]


_SCHEMAS: list[tuple[pa.Schema, pl.Schema]] = []
"""Arrow schemas seen in shard footers and their Polars form (a run's shards nearly all share one, and
``Schema.equals`` is far cheaper than hashing one)."""

_SMALL_SHARD = 1 << 20
"""Shards up to this size are read into memory to open their footer (cheaper than a memory map)."""


def _validate_shard(path: RunPath, table: str, *, body: bool = False) -> pl.Schema:
    """Open a shard's footer (no rows read unless ``body``) and check its required columns and types."""
    try:
        if body or path.stat().st_size <= _SMALL_SHARD:
            reader = ipc.open_file(pa.py_buffer(path.read_bytes()))
            if body:
                reader.read_all()  # decompresses every batch
        elif isinstance(path, ObjectPath):  # range requests for the footer only
            with path.open_input_file() as source:
                reader = ipc.open_file(source)
        else:
            with pa.memory_map(str(path)) as source:
                reader = ipc.open_file(source)
        arrow_schema = reader.schema
    except (OSError, pa.ArrowException) as exc:
        raise CorruptShardError(f"corrupt or truncated shard {path}: {exc}", path) from exc
    schema = next((pl_schema for known, pl_schema in _SCHEMAS if known.equals(arrow_schema)), None)
    if schema is None:
        # a Table converts to a DataFrame (from_arrow returns a Series only for an Array)
        schema = cast(pl.DataFrame, pl.from_arrow(arrow_schema.empty_table())).schema
        _SCHEMAS.append((arrow_schema, schema))
    for col, dtype in REQUIRED_COLUMNS[table].items():
        if col not in schema:
            raise CorruptShardError(f"shard {path} lacks the required {table} column {col!r}", path)
        if schema[col] != dtype:
            raise CorruptShardError(
                f"shard {path}: column {col!r} is {schema[col]}, the trace format says {dtype}", path
            )
    return schema


def _rank_of(path: RunPath) -> int:
    """The rank a shard's name gives (only shard names are kept at load)."""
    span = shard_span(path.name)
    assert span is not None
    return span[0]


def _meta_normalize(meta: dict[str, Any], table: str) -> bool:
    """What the recorder's lens asked for: ``meta["normalize"][table]`` (False when absent)."""
    norm = meta.get("normalize") or {}
    return bool(norm.get(table, False)) if isinstance(norm, dict) else False


def _scan(run: _Run, table: str, normalize: dict[str, bool]) -> pl.LazyFrame:
    """Lazy scan of one run's table (one scan per distinct shard schema) with the derived columns."""
    groups: dict[int, list[str]] = {}  # by schema object: _validate_shard gives equal schemas one object
    for path, schema in run.shards[table]:
        groups.setdefault(id(schema), []).append(str(path))
    if groups:
        # glob=False: a run directory named like a pattern (a sweep's "lr[0.1]") must not read other runs
        scans = [
            pl.scan_ipc(files, glob=False, hive_partitioning=False, storage_options=run.storage_options)
            for files in groups.values()
        ]
        lf = pl.concat(scans, how="diagonal")
    else:
        lf = pl.LazyFrame(schema=REQUIRED_COLUMNS[table])
    derived = [pl.lit(run.name, dtype=pl.String).alias("run")]
    if table in ("outputs", "params"):
        value = pl.col("norm").cast(pl.Float64)
        if normalize[table]:
            value = value / pl.col("numel").cast(pl.Float64).sqrt()
        derived.append(value.alias("value"))
    if table == "outputs":
        derived.append(
            pl.when(pl.col("grad_enabled")).then(pl.lit("train")).otherwise(pl.lit("no_grad")).alias("split")
        )
    return lf.with_columns(derived)


def _check_regex(pattern: str) -> None:
    """Refuse, naming it, a ``modules`` pattern that Polars' regex engine (Rust's syntax) cannot compile."""
    try:
        pl.select(pl.lit("").str.contains(pattern)).item()
    except pl.exceptions.ComputeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        why = next((line.removeprefix("error: ") for line in lines if line.startswith("error: ")), lines[0])
        raise ValueError(f"modules={pattern!r} is not a valid regular expression: {why}") from None


def listing(names: list[str], at_most: int = 12) -> str:
    """Names for a message: all of them, or the first ``at_most`` and how many more."""
    shown = ", ".join(names[:at_most])
    return shown + (f" … ({len(names) - at_most} more)" if len(names) > at_most else "")


def _intersect(old: tuple[V, ...] | None, new: tuple[V, ...]) -> tuple[V, ...]:
    """Values allowed by both an existing filter (None = all) and a new one."""
    return new if old is None else tuple(v for v in old if v in new)


def _narrow(
    old: tuple[int | None, int | None] | None, new: int | tuple[int | None, int | None]
) -> tuple[int | None, int | None]:
    """Intersection of two inclusive ranges whose ends may be None (unbounded)."""
    lo, hi = (new, new) if isinstance(new, int) else new
    if old is None:
        return lo, hi
    olo, ohi = old
    lo = olo if lo is None else (lo if olo is None else max(lo, olo))
    hi = ohi if hi is None else (hi if ohi is None else min(hi, ohi))
    return lo, hi


def module_filter(spec: Sequence[str] | str) -> pl.Expr:
    """Polars predicate on ``module``: a regex string is searched, a sequence of names matched exactly."""
    if isinstance(spec, str):
        return pl.col("module").str.contains(spec)
    return pl.col("module").is_in(list(spec))
