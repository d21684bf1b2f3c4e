"""Every module's series read in pieces of bounded size, in pass order: the input of summaries and spikes.

A long run is hundreds of millions of output rows, more than a laptop holds as one table, so no analysis
holds a table. The recorder writes each rank's shards in pass order, so reading a rank's shards in
sequence meets every series in time order: :func:`scan` reads about ``chunk_rows`` rows at a time (the
ranks of a run side by side, so that an epoch is complete on every rank at about the same time), numbers
the series (``sid``), regroups the piece so that each series is contiguous, and hands it, after the tail
of the series kept from earlier pieces, to the *consumers* (an epoch summary, the spike detector), each of
which says how much of each tail it needs next time: the detector a few baseline windows, the summary the
epoch not yet complete. Memory is one piece plus those tails, whatever the length of the run.

Regrouping is cheap in the recorder's layout: it writes every pass's modules in the same order, so a
piece is a strided permutation of its first pass (no sort, no string hashing). A piece that is not
periodic is regrouped by a join on the keys. A trace whose rows are not in pass order within a series
(rows shuffled, shards out of order) cannot be read that way: :func:`scan` notices and starts again with
whole series, a group of modules at a time (one read of the table per group: slower, same results).

Every scan also records what the event tests need to know of each series (:class:`SeriesInfo`: span,
length, epochs, the pass where each epoch starts), memoised on the Trace.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar, cast

import numpy as np
import polars as pl

from .errors import EmptySelectionError
from .names import SERIES_COLUMNS, SERIES_KEYS
from .progress import detail
from .trace import listing, module_filter

if TYPE_CHECKING:
    from .trace import RunPath, Trace

__all__ = [
    "CHUNK_ROWS",
    "SERIES_KEYS",
    "Consumer",
    "Frame",
    "Registry",
    "Series",
    "SeriesInfo",
    "complete_series",
    "epoch_means",
    "epoch_series",
    "points",
    "scan",
    "series_info",
    "settled_bounds",
    "settled_rows",
]

CHUNK_ROWS = 1_000_000
"""Rows read and regrouped at once (the analysis' memory is a few hundred bytes times this, plus the
tails the consumers keep: a few hundred rows and an epoch per series)."""

GROUP_ROWS = 2_000_000
"""Rows of the groups of whole series :func:`complete_series` hands over (each group costs one read of
its run's shards, so fewer, larger groups than the scan's pieces: a few hundred MiB each)."""

NEVER = np.iinfo(np.int64).max
"""An epoch bound meaning "every epoch of this series is complete"."""

_COLUMNS = ["pass", "epoch", "value"]
_READ = [pl.col("pass"), pl.col("epoch"), pl.col("value").cast(pl.Float64)]
"""How the columns of a point are read: ``value`` as float64 (the signals table stores float32)."""


def points(trace: Trace, table: str, modules: Sequence[str] | str | None) -> pl.LazyFrame:
    """The table's rows (the Trace's filters applied) restricted to ``modules``; the table must exist."""
    trace.require(table)
    lf = trace.table(table)
    return lf if modules is None else lf.filter(module_filter(modules))


def _modules_key(modules: Sequence[str] | str | None) -> tuple[str, ...] | str | None:
    return modules if modules is None or isinstance(modules, str) else tuple(modules)


# ----------------------------------------------------------------------------------------------------------
# Series numbers and pieces


SeriesKey = tuple[object, ...]
"""A series' key as a :class:`Registry` holds it: (run, rank, then the values of the table's other key
columns as Polars reads them: strings, booleans, nulls), or the same without the rank for a group."""


class Registry:
    """The series met so far: ``sid`` -> (run, rank, then the table's other key columns: module and
    grad_enabled for outputs, module and param for params, kind, module and param for signals), and
    each series' summary group (the same without the rank: the ranks pooled)."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.columns = SERIES_COLUMNS[table]
        """The stored columns read to number a row's series (rank first)."""
        self.keys: list[SeriesKey] = []
        self.group: list[int] = []
        self.by_rank: dict[tuple[str, int], list[int]] = {}
        self.runs: list[str] = []
        self.run_of: list[int] = []
        self._run_index: dict[str, int] = {}
        self._sid: dict[SeriesKey, int] = {}
        self._group: dict[SeriesKey, int] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def sid(self, run: str, rank: int, *rest: object) -> int:
        """The number of the series (run, rank, *rest), ``rest`` the values of ``columns[1:]``."""
        key = (run, int(rank), *rest)
        sid = self._sid.get(key)
        if sid is None:
            sid = self._sid[key] = len(self.keys)
            self.keys.append(key)
            self.group.append(self._group.setdefault((run, *rest), len(self._group)))
            self.by_rank.setdefault((run, int(rank)), []).append(sid)
            if run not in self._run_index:
                self._run_index[run] = len(self.runs)
                self.runs.append(run)
            self.run_of.append(self._run_index[run])
        return sid

    def frame(self) -> pl.DataFrame:
        """One row per sid: sid, then the series keys (``SERIES_KEYS[table]``: run, rank, module, split
        for outputs; run, rank, module, param for params; run, rank, kind, module, param for signals)."""
        names = ["run", *self.columns]
        values = [list(c) for c in zip(*self.keys, strict=True)] if self.keys else [[] for _ in names]
        columns = {"sid": pl.Series(range(len(self.keys)), dtype=pl.UInt32)}
        for name, column in zip(names, values, strict=True):
            if name == "grad_enabled":
                columns["split"] = pl.Series(["train" if g else "no_grad" for g in column], dtype=pl.String)
            else:
                columns[name] = pl.Series(column, dtype=pl.Int32 if name == "rank" else pl.String)
        return pl.DataFrame(columns)


class _Columns(dict[str, np.ndarray]):
    """A frame's columns, ``pos`` numbered when first asked for (the summary and the info never read it)."""

    def __init__(self, cols: dict[str, np.ndarray], rows: np.ndarray, start: np.ndarray) -> None:
        super().__init__(cols)
        self._rows = rows
        self._start = start

    def __missing__(self, key: str) -> np.ndarray:
        if key != "pos":
            raise KeyError(key)
        pos = np.arange(self._rows[-1], dtype=np.int64)
        pos += np.repeat(self._start - self._rows[:-1], np.diff(self._rows))
        self["pos"] = pos
        return pos


class Frame:
    """What consumers see of one piece: for every series with rows in it, a contiguous stretch of the
    series in pass order: the tail kept from earlier pieces, then the rows new in this piece.

    ``cols``: numpy arrays ``sid`` (u32), ``pos`` (the row's index within its series), ``pass``,
    ``epoch``, ``value``; one segment per series, in ``sids`` order (``data`` is the same as a Polars
    frame, sharing the memory). Per segment: ``rows`` (its first row; one more entry at the end),
    ``start`` and ``end`` (pos of its first row and one past its last), ``fresh`` (pos of its first new
    row), ``ended`` (no row of the series comes later; an ended series stays in later frames while a
    consumer keeps some of it) and ``settled`` (every epoch below it is complete: no later row of the
    series, nor of the series of other ranks pooled with it, has it).
    """

    def __init__(
        self,
        cols: dict[str, np.ndarray],
        sids: np.ndarray,
        rows: np.ndarray,
        start: np.ndarray,
        fresh: np.ndarray,
        end: np.ndarray,
        ended: np.ndarray,
        settled: np.ndarray,
        registry: Registry | None,
    ) -> None:
        self.cols = _Columns(cols, rows, start)
        self.sids = sids
        self.rows = rows
        self.start = start
        self.fresh = fresh
        self.end = end
        self.ended = ended
        self.settled = settled
        self.registry = registry
        self._data: pl.DataFrame | None = None
        self._segment: np.ndarray | None = None

    @property
    def data(self) -> pl.DataFrame:
        if self._data is None:
            self._data = pl.DataFrame({**self.cols, "pos": self.cols["pos"]})
        return self._data

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.rows)

    def per_row(self, per_segment: np.ndarray) -> np.ndarray:
        """A per-segment array repeated over each segment's rows."""
        return np.repeat(per_segment, self.lengths)

    @property
    def segment(self) -> np.ndarray:
        """Each row's segment (index into ``sids``)."""
        if self._segment is None:
            self._segment = np.repeat(np.arange(len(self.sids), dtype=np.int64), self.lengths)
        return self._segment

    def between(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """A row mask: per segment, rows ``lo[i] <= row < hi[i]`` (frame rows, within the segment)."""
        rows = self.rows
        runs = np.stack([lo - rows[:-1], hi - lo, rows[1:] - hi], axis=1).ravel()
        return np.repeat(np.tile(np.array([False, True, False]), len(lo)), runs)


class Consumer(Protocol):
    """What :func:`scan` feeds: ``feed`` returns, per segment, the first pos of the series it still needs
    (the scan keeps the rows from there on for the next frame); ``finish`` is called after the last."""

    def feed(self, frame: Frame) -> np.ndarray: ...

    def finish(self) -> None: ...


C = TypeVar("C", bound=Consumer)
"""The consumers of one :func:`scan`, as its caller built them (their results differ: each reads its own)."""


def settled_rows(frame: Frame, done: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of complete epochs not yet consumed (``pos >= done`` per segment, ``epoch < settled``), as a
    row mask, and per segment the pos of its first row of an epoch not yet complete (its end when there
    is none): :func:`settled_bounds` as a mask."""
    lo, hi, need = settled_bounds(frame, done)
    return frame.between(lo, hi), need


def settled_bounds(frame: Frame, done: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per segment, the frame rows ``lo:hi`` of complete epochs not yet consumed (``pos >= done``,
    ``epoch < settled``), and the pos of its first row of an epoch not yet complete (its end when there
    is none).

    Epochs never decrease along a series read in pieces, so each segment's rows to take are one run,
    found by a binary search of all segments at once (a few steps on per-segment arrays, whatever the
    rows); whole series (the out-of-order path) have every epoch settled."""
    rows, lengths = frame.rows, frame.lengths
    lo = rows[:-1] + np.clip(done - frame.start, 0, lengths)
    hi = rows[1:].copy()
    if not (frame.settled == NEVER).all():
        epochs, bound = frame.cols["epoch"], frame.settled
        # per segment, the first row with epoch >= bound lies in first..last
        first, last = rows[:-1].copy(), rows[1:].copy()
        while (open_ := first < last).any():
            mid = (first + last) // 2
            below = open_ & (epochs[np.where(open_, mid, 0)] < bound)
            first = np.where(below, mid + 1, first)
            last = np.where(open_ & ~below, mid, last)
        hi = np.maximum(first, lo)
    need = frame.start + (hi - rows[:-1])
    return lo, hi, need


# ----------------------------------------------------------------------------------------------------------
# The scan


class _Unordered(Exception):
    """Rows of a series are not in pass order across pieces (or epochs go back): read whole series."""


_DTYPES = {"sid": np.uint32, "pass": np.int64, "epoch": np.int32, "value": np.float64}


def _no_rows() -> dict[str, np.ndarray]:
    return {k: np.zeros(0, dtype=t) for k, t in _DTYPES.items()}


@dataclass
class _Piece:
    """New rows from the reader, sorted by sid (stably): numpy ``cols`` sid, pass, epoch, value;
    ``ended`` sids with no later rows; ``settled`` per run: epochs below it are complete."""

    cols: dict[str, np.ndarray]
    ended: list[int]
    settled: dict[str, int]
    progress: str = ""


def scan(
    trace: Trace,
    table: str,
    modules: Sequence[str] | str | None,
    make: Callable[[Registry], list[C]],
    *,
    chunk_rows: int | None = None,
) -> tuple[list[C], SeriesInfo]:
    """Feed every series of ``table`` (the Trace's filters and ``modules`` applied) to the consumers that
    ``make`` builds, in pieces of about ``chunk_rows`` rows; return them (finished) and the series' info
    (also memoised on the Trace). Rows out of pass order make it start again on whole series."""
    trace.require(table)
    chunk = CHUNK_ROWS if chunk_rows is None else max(1, int(chunk_rows))
    registry = Registry(table)
    consumers = make(registry)
    info = _Info(registry)
    try:
        _drive(_ordered_pieces(trace, table, modules, chunk, registry), registry, [info, *consumers])
    except _Unordered:
        registry = Registry(table)
        consumers = make(registry)
        info = _Info(registry)
        _drive(_whole_series(trace, table, modules, chunk, registry), registry, [info, *consumers])
    for c in consumers:
        c.finish()
    result = info.result()
    if modules is not None and not result.keys.height:
        _refuse_modules(trace, table, modules)
    trace.cached(("series-info", table, _modules_key(modules)), lambda: result)  # kept if none yet
    return consumers, result


def _refuse_modules(trace: Trace, table: str, modules: Sequence[str] | str) -> None:
    """Raise :class:`.EmptySelectionError` when ``modules`` selects no series of a table that has some,
    naming the modules it holds: a typo such as ``modules="encodr"`` must not read as "no spikes"."""
    names = trace.table(table).select(pl.col("module").unique().sort()).collect()["module"].to_list()
    if names:
        raise EmptySelectionError(
            f"modules={modules!r} matches no module of the {table} table; it holds: {listing(names)}",
            next(iter(trace.paths.values())),
        )


def _drive(pieces: Iterator[_Piece], registry: Registry, consumers: list[Consumer]) -> None:
    """Assemble each piece with the tails kept from earlier ones into a frame; feed it; keep what the
    consumers still need. At the end, end every series not ended yet (the reader ends a rank's series
    after its last shard; one whose rank column differs from its file name's ends here)."""
    assembly = _Assembly(registry)
    # closed at once when a consumer fails: its reading threads stop now, not when the traceback goes
    with closing(_ahead(pieces)) as ahead:
        for piece in ahead:
            assembly.feed(piece, consumers)
    still = np.flatnonzero(~assembly.ended[: len(registry)])
    if still.size:
        assembly.feed(_Piece(_no_rows(), [int(s) for s in still], {}), consumers)


def _ahead(pieces: Iterator[_Piece]) -> Generator[_Piece, None, None]:
    """The pieces, each read while the consumers work on the one before (reading, decompression and
    regrouping overlap the analysis on a second core; one piece more is held)."""
    box: queue.Queue[_Piece | BaseException | None] = queue.Queue(maxsize=1)  # None: the last piece was read
    stop = threading.Event()

    def offer(item: _Piece | BaseException | None) -> bool:
        """Put ``item`` in the box once there is room; False if the consumer stopped first (it takes
        nothing more: a put that waited for it would wait for ever, and the consumer's join with it)."""
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read() -> None:
        try:
            for piece in pieces:
                if not offer(piece):
                    return
            offer(None)
        except BaseException as exc:  # handed to the consumer's thread, raised there
            offer(exc)
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:  # a generator left early: let it end (and its reading thread) here
                close()

    reader = threading.Thread(target=read, name="normtrace-read-ahead", daemon=True)
    reader.start()
    try:
        while (item := box.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join()


class _Assembly:
    """Per series: rows met so far, whether it ended, and the rows kept for the next frame."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.end = np.zeros(0, dtype=np.int64)
        self.ended = np.zeros(0, dtype=bool)
        self.carry_start = np.zeros(0, dtype=np.int64)  # pos of the first kept row
        self.carry = _no_rows()
        self.shown = ""

    def feed(self, piece: _Piece, consumers: list[Consumer]) -> None:
        registry, carry = self.registry, self.carry
        n = len(registry)
        if n > len(self.end):
            grow = n - len(self.end)
            self.end = np.concatenate([self.end, np.zeros(grow, dtype=np.int64)])
            self.ended = np.concatenate([self.ended, np.zeros(grow, dtype=bool)])
            self.carry_start = np.concatenate([self.carry_start, np.zeros(grow, dtype=np.int64)])
        new = piece.cols
        n_carry = np.bincount(carry["sid"], minlength=n)
        n_new = np.bincount(new["sid"], minlength=n)
        if (n_new[self.ended] > 0).any():
            raise _Unordered  # rows of a series after its rank's last shard: rank names and columns differ
        self.ended[piece.ended] = True
        sids = np.flatnonzero(n_carry + n_new)
        lengths = n_carry[sids] + n_new[sids]
        rows = np.concatenate([[0], np.cumsum(lengths)])
        if carry["sid"].size == 0:
            cols = dict(new)
        else:  # each series' kept rows, then its new rows: block copies
            c_from = np.concatenate([[0], np.cumsum(n_carry)])[sids]
            n_from = np.concatenate([[0], np.cumsum(n_new)])[sids]
            blocks = [
                (c0, c0 + c, n0, n0 + m)
                for c0, c, n0, m in zip(c_from, n_carry[sids], n_from, n_new[sids], strict=True)
            ]
            cols = {
                name: np.concatenate(
                    [part for c0, c1, n0, n1 in blocks for part in (carry[name][c0:c1], new[name][n0:n1])]
                )
                for name in _DTYPES
            }
        fresh = self.end[sids].copy()
        start = np.where(n_carry[sids] > 0, self.carry_start[sids], fresh)
        self.end[sids] += n_new[sids]
        # An ended series' last epochs wait too: other ranks' rows of them may come later.
        bound = np.array([piece.settled.get(run, NEVER) for run in registry.runs], dtype=np.int64)
        settled = bound[np.asarray(registry.run_of, dtype=np.int64)[sids]]
        frame = Frame(
            cols, sids, rows, start, fresh, self.end[sids].copy(), self.ended[sids].copy(), settled, registry
        )
        need = np.full(len(sids), NEVER, dtype=np.int64)
        for c in consumers if len(sids) else ():
            need = np.minimum(need, c.feed(frame))
        keep_from = np.clip(need, frame.start, frame.end)
        mask = frame.between(rows[:-1] + (keep_from - frame.start), rows[1:])
        self.carry = {name: cols[name][mask] for name in _DTYPES}
        self.carry_start[sids] = keep_from
        if piece.progress and piece.progress != self.shown:
            detail(piece.progress)
            self.shown = piece.progress


def _ordered_pieces(
    trace: Trace, table: str, modules: Sequence[str] | str | None, chunk_rows: int, registry: Registry
) -> Iterator[_Piece]:
    """Each run's shards in order, the ranks side by side, about ``chunk_rows`` rows at a time. Polars
    reads the next piece's files on a thread of its own while this piece is numbered (reading and
    numbering each cost about what the consumers do with a piece; one more piece is held)."""
    select = [*registry.columns, *_READ]
    runs = trace.shards_by_rank(table)
    total = sum(size for by_rank in runs.values() for files in by_rank.values() for _, size in files)
    done = 0
    last_pass = np.zeros(0, dtype=np.int64)
    last_epoch = np.zeros(0, dtype=np.int64)
    bytes_per_row: float | None = None

    def read(run: str, taken: list[tuple[int, list[RunPath]]]) -> Future[list[pl.DataFrame]]:
        scans = []
        for _, files in taken:
            lf = trace.scan_shards(table, run, files)
            if modules is not None:
                lf = lf.filter(module_filter(modules))
            scans.append(lf.select(select))
        return pool.submit(pl.collect_all, scans)

    with ThreadPoolExecutor(1, thread_name_prefix="normtrace-read") as pool:
        for run, by_rank in runs.items():
            queues = {rank: deque(files) for rank, files in sorted(by_rank.items())}
            if not queues:
                continue  # a run that did not record this table (another run of the trace did)
            top_epoch: dict[int, int | None] = dict.fromkeys(queues)  # per rank: largest epoch read
            taken, piece_bytes = _take(queues, top_epoch, chunk_rows, bytes_per_row)
            reading: Future[list[pl.DataFrame]] | None = read(run, taken)
            while reading is not None:
                raws = reading.result()
                before = dict(top_epoch)  # what this piece's rows are checked against
                rows_read = 0
                for (rank, _), raw in zip(taken, raws, strict=True):
                    rows_read += raw.height
                    if raw.height:
                        high = int(cast(int, raw["epoch"].max()))
                        top_epoch[rank] = high if (top := before[rank]) is None else max(top, high)
                if bytes_per_row is None and rows_read:
                    bytes_per_row = max(piece_bytes / rows_read, 1e-3)
                done += piece_bytes
                exhausted = [rank for rank, _ in taken if not queues[rank]]
                for rank in exhausted:
                    del queues[rank]
                bounds = [top for r in queues if (top := top_epoch[r]) is not None]
                unread = len(bounds) < len(queues)  # a rank with no epoch read yet
                settled = NEVER if not queues else (np.iinfo(np.int64).min if unread else min(bounds))
                percent = f"{table} {100 * done // max(total, 1)}%"
                current = taken
                reading = None
                if queues:  # the next piece, planned from the epochs just read, read while this is numbered
                    taken, piece_bytes = _take(queues, top_epoch, chunk_rows, bytes_per_row)
                    reading = read(run, taken)
                parts = []
                for (rank, _), raw in zip(current, raws, strict=True):
                    if raw.height == 0:
                        continue
                    cols = _number(raw, run, registry)
                    if len(registry) > len(last_pass):
                        grow = len(registry) - len(last_pass)
                        last_pass = np.concatenate([last_pass, np.full(grow, np.iinfo(np.int64).min)])
                        last_epoch = np.concatenate([last_epoch, np.full(grow, np.iinfo(np.int64).min)])
                    _check_order(cols, last_pass, last_epoch, before[rank])
                    parts.append(cols)
                ended = [sid for rank in exhausted for sid in registry.by_rank.get((run, rank), [])]
                yield _Piece(_merge(parts), ended, {run: int(settled)}, percent)


def _take(
    queues: dict[int, deque[tuple[RunPath, int]]],
    top_epoch: dict[int, int | None],
    chunk_rows: int,
    bytes_per_row: float | None,
) -> tuple[list[tuple[int, list[RunPath]]], int]:
    """The files of the next piece of a run, taken from ``queues``, and their bytes. The first piece
    takes one shard per rank (and learns the bytes per row); then about ``chunk_rows`` rows from the
    ranks furthest behind (in epochs), so that the ranks of a run progress together and an epoch is
    complete on all of them soon after it is read."""
    behind = min(-1 if (top := top_epoch[r]) is None else top for r in queues)
    lagging = [r for r in queues if (-1 if (top := top_epoch[r]) is None else top) == behind]
    budget = None if bytes_per_row is None else chunk_rows * bytes_per_row / len(lagging)
    taken: list[tuple[int, list[RunPath]]] = []
    piece_bytes = 0
    for rank in lagging:
        queue = queues[rank]
        files: list[RunPath] = []
        size = 0
        while queue and (not files or (budget is not None and size + queue[0][1] <= budget)):
            path, nbytes = queue.popleft()
            files.append(path)
            size += nbytes
        piece_bytes += size
        taken.append((rank, files))
    return taken, piece_bytes


def _number(raw: pl.DataFrame, run: str, registry: Registry) -> dict[str, np.ndarray]:
    """Number the series of a part (rows of one rank as read): its sid, pass, epoch and value columns
    as numpy arrays, sorted by sid (stably).

    The recorder's layout repeats the same sequence of keys every pass: then the first repetition of
    the first key gives the period K, the sids of the first K rows give every row's, and sorting is a
    transposition (no hashing of names). Anything else is numbered by a join on the keys and sorted."""
    columns = registry.columns
    n = raw.height
    r0 = raw.row(0, named=True)
    same = pl.all_horizontal(pl.col(c).eq_missing(r0[c]) for c in columns)  # a null param equals null
    period = n
    for look in (min(n, 4096), n):  # the period is usually short: look at the first rows first
        repeats = raw.head(look).select(pl.arg_where(same).head(2)).to_series()
        if repeats.len() > 1:
            period = int(repeats[1])
            break
    cycle = raw.head(period).select(columns)
    periodic = cycle.n_unique() == period
    if periodic and period < n:
        head, tail = raw.slice(0, n - period), raw.slice(period)
        cheap_first = sorted(columns, key=lambda c: c == "module")  # numbers and short names first
        periodic = all(tail[c].eq_missing(head[c]).all() for c in cheap_first)
    if periodic:
        ids = np.array([registry.sid(run, *row) for row in cycle.iter_rows()], dtype=np.int64)
        by_sid = np.argsort(ids, kind="stable")
        counts = (n - by_sid + period - 1) // period
        if n % period == 0:  # whole passes: a transposition
            in_order = bool((np.diff(by_sid) == 1).all())
            sorted_ = {c: _transpose(raw[c], period, None if in_order else by_sid) for c in _COLUMNS}
        else:
            starts = np.concatenate([[0], np.cumsum(counts)])[:-1]
            order = np.repeat(by_sid, counts) + period * (np.arange(n) - np.repeat(starts, counts))
            sorted_ = {c: raw[c].to_numpy()[order] for c in _COLUMNS}
        sorted_["sid"] = np.repeat(ids[by_sid].astype(np.uint32), counts)
        return sorted_
    keys = raw.select(columns)
    unique = keys.unique(maintain_order=True)
    numbers = [registry.sid(run, *row) for row in unique.iter_rows()]
    mapping = unique.with_columns(pl.Series("sid", numbers, dtype=pl.UInt32))
    joined = keys.join(mapping, on=columns, how="left", maintain_order="left", nulls_equal=True)
    sid = joined["sid"].to_numpy()
    order = np.argsort(sid, kind="stable")
    sorted_ = {c: raw[c].to_numpy()[order] for c in _COLUMNS}
    sorted_["sid"] = sid[order]
    return sorted_


def _transpose(column: pl.Series, period: int, rows: np.ndarray | None) -> np.ndarray:
    """``column`` seen as (passes, period) transposed to (period, passes), flattened; in the order
    ``rows`` of the period's offsets when given. Copied from each chunk (one per file read) in place,
    without joining the chunks first, a band of passes at a time: several times faster than numpy's copy
    of the whole transposed view, which walks memory with a large stride."""
    chunks = [chunk.to_numpy() for chunk in column.get_chunks()]
    if any(len(chunk) % period for chunk in chunks):  # a chunk cuts a pass: join them first
        chunks = [np.concatenate(chunks)]
    out = np.empty((period, len(column) // period), dtype=chunks[0].dtype)
    band = max(16, (1 << 15) // period)
    at = 0
    for chunk in chunks:
        table = chunk.reshape(-1, period)
        for b0 in range(0, len(table), band):
            b1 = min(b0 + band, len(table))
            out[:, at + b0 : at + b1] = table[b0:b1].T
        at += len(table)
    return (out if rows is None else out[rows]).ravel()


def _check_order(
    cols: dict[str, np.ndarray], last_pass: np.ndarray, last_epoch: np.ndarray, top: int | None
) -> None:
    """Raise :class:`_Unordered` unless each series' passes and epochs go on from where they stopped and
    never decrease, and no row of the rank has an epoch below ``top`` (the largest read earlier); update
    the last pass and epoch per sid."""
    sid, passes, epochs = cols["sid"], cols["pass"], cols["epoch"]
    if top is not None and int(epochs.min()) < top:
        raise _Unordered
    same = sid[1:] == sid[:-1]
    if (same & (passes[1:] < passes[:-1])).any() or (same & (epochs[1:] < epochs[:-1])).any():
        raise _Unordered
    first = np.flatnonzero(np.concatenate([[True], ~same]))
    last = np.concatenate([first[1:] - 1, [len(sid) - 1]])
    s = sid[first]
    if (passes[first] < last_pass[s]).any() or (epochs[first] < last_epoch[s]).any():
        raise _Unordered
    last_pass[s] = passes[last]
    last_epoch[s] = epochs[last]


def _merge(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Parts (one per rank, disjoint sids, each sorted by sid) as one piece sorted by sid."""
    if not parts:
        return _no_rows()
    if len(parts) == 1:
        return parts[0]
    cols = {c: np.concatenate([p[c] for p in parts]) for c in _DTYPES}
    sid = cols["sid"]
    heads = np.flatnonzero(np.concatenate([[True], sid[1:] != sid[:-1]]))
    by_sid = np.argsort(sid[heads], kind="stable")
    if (np.diff(by_sid) == 1).all():
        return cols
    lengths = np.diff(np.concatenate([heads, [len(sid)]]))[by_sid]
    starts = np.concatenate([[0], np.cumsum(lengths)])[:-1]
    regroup = np.repeat(heads[by_sid], lengths) + (np.arange(len(sid)) - np.repeat(starts, lengths))
    return {c: v[regroup] for c, v in cols.items()}


def _whole_series(
    trace: Trace, table: str, modules: Sequence[str] | str | None, chunk_rows: int, registry: Registry
) -> Iterator[_Piece]:
    """Whole series, a group of modules (every rank and split) at a time, each group about ``chunk_rows``
    rows, each series sorted by pass (stably): for traces whose rows are not in pass order."""
    key = registry.columns
    others = [c for c in key if c != "module"]
    for run in trace.runs:
        lf = points(trace.filter(runs=run), table, modules)
        counts = lf.group_by(key).agg(pl.len().alias("n")).sort("module", *others).collect()
        for row in counts.select(key).iter_rows():
            registry.sid(run, *row)
        per_module = counts.group_by("module", maintain_order=True).agg(pl.col("n").sum())
        groups: list[list[str]] = [[]]
        size = 0
        for module, n in per_module.iter_rows():
            if groups[-1] and size + n > chunk_rows:
                groups.append([])
                size = 0
            groups[-1].append(module)
            size += n
        for i, names in enumerate(g for g in groups if g):
            raw = lf.filter(pl.col("module").is_in(names)).select(*key, *_READ).collect()
            mapping = counts.filter(pl.col("module").is_in(names)).select(key)
            ids = [registry.sid(run, *r) for r in mapping.iter_rows()]
            mapping = mapping.with_columns(pl.Series("sid", ids, dtype=pl.UInt32))
            joined = raw.join(mapping, on=key, how="left", maintain_order="left", nulls_equal=True)
            ordered = joined.select("sid", *_COLUMNS).sort("sid", "pass", maintain_order=True)
            yield _Piece(
                {c: ordered[c].to_numpy() for c in _DTYPES},
                ids,
                {run: NEVER},
                f"{table} {run}: modules {i + 1} of {len(groups)}",
            )


# ----------------------------------------------------------------------------------------------------------
# What the event tests need of each series


@dataclass(frozen=True)
class SeriesInfo:
    """What is known of each series after a scan, small whatever the run's length.

    ``keys``: one row per sid: the series keys (run, rank, module, split or param), ``length`` (rows),
    ``first_pass``, ``last_pass``, ``first_epoch``, ``last_epoch``, ``epochs`` (distinct epochs).
    ``epoch_starts``: per run, rank and epoch (but a series' first): the first pass of the epoch over
    all the rank's series (``first``), from the passes where some series' epoch changes.
    """

    keys: pl.DataFrame
    epoch_starts: pl.DataFrame


class _Info:
    """The consumer behind :class:`SeriesInfo` (every scan runs it)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.length = np.zeros(0, dtype=np.int64)
        self.first = np.zeros((0, 2), dtype=np.int64)
        self.last = np.zeros((0, 2), dtype=np.int64)
        self.epochs = np.zeros(0, dtype=np.int64)
        self.starts: list[pl.DataFrame] = []

    def feed(self, frame: Frame) -> np.ndarray:
        n = len(self.registry)
        if n > len(self.length):
            grow = n - len(self.length)
            self.length = np.concatenate([self.length, np.zeros(grow, dtype=np.int64)])
            self.first = np.concatenate([self.first, np.zeros((grow, 2), dtype=np.int64)])
            self.last = np.concatenate([self.last, np.zeros((grow, 2), dtype=np.int64)])
            self.epochs = np.concatenate([self.epochs, np.zeros(grow, dtype=np.int64)])
        sids = frame.sids
        new = frame.end > frame.fresh
        if not new.any():
            return frame.end.copy()
        before = self.last[sids, 1].copy()  # each series' last epoch before this frame
        passes = frame.cols["pass"]
        epochs = frame.cols["epoch"]
        head = frame.rows[:-1] + (frame.fresh - frame.start)  # first new row of each segment
        tail = frame.rows[1:] - 1
        born = new & (frame.fresh == 0)
        self.first[sids[born]] = np.stack([passes[head[born]], epochs[head[born]]], axis=1)
        self.last[sids[new]] = np.stack([passes[tail[new]], epochs[tail[new]]], axis=1)
        # The new rows whose epoch differs from the row before in their series (not a series' first
        # row): within a segment, from its first new row on; at a segment's start, against the series'
        # last epoch read before (when that row is new and not the series' first).
        rows = frame.rows
        inner = np.flatnonzero(epochs[1:] != epochs[:-1]) + 1
        of = np.searchsorted(rows, inner, "right") - 1
        inner = inner[(inner != rows[of]) & (inner >= head[of])]
        first_rows = rows[:-1]
        at_start = first_rows[
            (head == first_rows) & (new & (frame.fresh > 0)) & (epochs[first_rows] != before)
        ]
        at = np.sort(np.concatenate([inner, at_start])) if at_start.size else inner
        self.length[sids] = frame.end
        whole = (frame.start == 0) & frame.ended
        if whole.all():  # whole series (the out-of-order path): count distinct epochs
            distinct = (
                frame.data.group_by("sid", maintain_order=True)
                .agg(pl.col("epoch").n_unique())["epoch"]
                .to_numpy()
            )
            self.epochs[sids] = distinct
        else:
            self.epochs[sids] += (
                np.bincount(np.searchsorted(rows, at, "right") - 1, minlength=len(sids)) + born
            )
        if at.size:
            self.starts.append(
                pl.DataFrame({"sid": frame.cols["sid"][at], "epoch": epochs[at], "pass": passes[at]})
            )
        return frame.end.copy()

    def finish(self) -> None:
        """Nothing to flush: the info is read by :meth:`result`."""

    def result(self) -> SeriesInfo:
        keys = self.registry.frame().with_columns(
            pl.Series("length", self.length[: len(self.registry)], dtype=pl.Int64),
            pl.Series("first_pass", self.first[:, 0], dtype=pl.Int64),
            pl.Series("last_pass", self.last[:, 0], dtype=pl.Int64),
            pl.Series("first_epoch", self.first[:, 1], dtype=pl.Int64),
            pl.Series("last_epoch", self.last[:, 1], dtype=pl.Int64),
            pl.Series("epochs", self.epochs, dtype=pl.Int64),
        )
        schema = {"sid": pl.UInt32, "epoch": pl.Int32, "pass": pl.Int64}
        changes = pl.concat(self.starts) if self.starts else pl.DataFrame(schema=schema)
        starts = (
            changes.join(keys.select("sid", "run", "rank"), on="sid")
            .group_by("run", "rank", "epoch")
            .agg(pl.col("pass").min().alias("first"))
            .sort("run", "rank", "epoch")
        )
        return SeriesInfo(keys, starts)


def series_info(trace: Trace, table: str, modules: Sequence[str] | str | None) -> SeriesInfo:
    """The table's :class:`SeriesInfo` (memoised; one scan that keeps nothing but it, if no analysis of
    the same table and modules has run yet)."""
    key = ("series-info", table, _modules_key(modules))
    return trace.cached(key, lambda: scan(trace, table, modules, lambda _: [])[1])


# ----------------------------------------------------------------------------------------------------------
# Per-epoch means, and whole series for the analyses that need a series at once


@dataclass(frozen=True)
class Series:
    """``data``: sid (u32), pass, epoch, value (or sid, epoch, value for epoch means), contiguous per sid
    and in time order within it. ``keys``: one row per sid with the series keys (at least ``sid``)."""

    data: pl.DataFrame
    keys: pl.DataFrame


class _EpochMeans:
    """Consumer: per series and complete epoch, the mean value (NaN if any value is NaN)."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.done = np.zeros(0, dtype=np.int64)
        self.parts: list[pl.DataFrame] = []

    def feed(self, frame: Frame) -> np.ndarray:
        if len(self.registry) > len(self.done):
            self.done = np.concatenate([self.done, np.zeros(len(self.registry) - len(self.done), np.int64)])
        take, need = settled_rows(frame, self.done[frame.sids])
        if take.any():
            self.parts.append(_means(*(frame.cols[c][take] for c in ("sid", "epoch", "value"))))
        self.done[frame.sids] = need
        return need

    def finish(self) -> None:
        """The means are read by :meth:`result`."""

    def result(self) -> Series:
        schema = {"sid": pl.UInt32, "epoch": pl.Int32, "value": pl.Float64}
        data = pl.concat(self.parts).sort("sid", "epoch") if self.parts else pl.DataFrame(schema=schema)
        return Series(data, self.registry.frame())


def epoch_series(trace: Trace, table: str, modules: Sequence[str] | str | None) -> Series:
    """Per series and epoch, the mean value: data sid, epoch, value sorted; keys the registry's
    (memoised on the Trace)."""
    key = ("epoch-series", table, _modules_key(modules))

    def compute() -> Series:
        consumers, _ = scan(trace, table, modules, lambda reg: [_EpochMeans(reg)])
        return consumers[0].result()

    return trace.cached(key, compute)


def epoch_means(series: Series) -> pl.DataFrame:
    """Per sid and epoch of whole series in memory, the mean value: sid, epoch, value, sorted."""
    d = series.data
    return _means(d["sid"].to_numpy(), d["epoch"].to_numpy(), d["value"].to_numpy())


def _means(sid: np.ndarray, epoch: np.ndarray, value: np.ndarray) -> pl.DataFrame:
    """Per (sid, epoch), the mean value (NaN if any is NaN): sid, epoch, value, sorted. Grouped as
    contiguous slices of the key (sid, epoch) packed in one integer, so that each mean sums its rows in
    order whatever else is in the frame (a hash group-by's sums vary in the last bit with the frame)."""
    key = (sid.astype(np.uint64) << np.uint64(32)) + epoch.astype(np.int64).astype(np.uint64)
    rows = pl.DataFrame({"g": key, "value": value})
    rows = (
        rows.with_columns(pl.col("g").set_sorted())
        if (key[1:] >= key[:-1]).all()  # not np.diff: on unsigned keys it wraps, never negative
        else rows.sort("g", maintain_order=True)
    )
    means = rows.group_by("g", maintain_order=True).agg(pl.col("value").mean())
    g = means["g"].to_numpy()
    return pl.DataFrame(
        {
            "sid": (g >> np.uint64(32)).astype(np.uint32),
            "epoch": (g & np.uint64(0xFFFFFFFF)).astype(np.int32),
            "value": means["value"],
        }
    )


def complete_series(
    trace: Trace,
    table: str,
    modules: Sequence[str] | str | None,
    *,
    chunk_rows: int | None = None,
) -> Iterator[Series]:
    """Whole series, numbered as :func:`series_info` numbers them, a group at a time: as many whole
    series as fit in about ``chunk_rows`` rows (default :data:`GROUP_ROWS`; a longer series alone). For analyses that need a series
    at once (a median over all of it); each group costs one read of the run's shards of its ranks."""
    info = series_info(trace, table, modules)
    chunk = GROUP_ROWS if chunk_rows is None else max(1, int(chunk_rows))
    keys = info.keys
    columns = SERIES_COLUMNS[table]
    stored = [(pl.col("split") == "train").alias(c) if c == "grad_enabled" else pl.col(c) for c in columns]
    for (run,), per_run in keys.group_by("run", maintain_order=True):
        lf = points(trace.filter(runs=run), table, modules)
        groups: list[list[int]] = [[]]
        size = 0
        for i, n in enumerate(per_run["length"]):
            if groups[-1] and size + n > chunk:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += n
        total = len(groups)
        for g, members in enumerate(groups):
            if not members:
                continue
            chosen = per_run[members]
            mapping = chosen.select(*stored, "sid")
            want = pl.col("module").is_in(chosen["module"].unique().to_list()) & pl.col("rank").is_in(
                chosen["rank"].unique().to_list()
            )
            raw = lf.filter(want).select(*columns, *_READ).collect()
            data = (
                raw.join(mapping, on=columns, how="inner", maintain_order="left", nulls_equal=True)
                .select("sid", *_COLUMNS)
                .sort("sid", maintain_order=True)
            )
            if data.select(((pl.col("pass").diff() < 0) & (pl.col("sid").diff() == 0)).any()).item():
                data = data.sort("sid", "pass", maintain_order=True)
            if total > 1:
                detail(f"{table} {run}: series group {g + 1} of {total}")
            yield Series(data, chosen.drop("length"))
