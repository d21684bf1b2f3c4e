"""The in-memory buffer between hooks and writer, and the conversion of its records to Arrow tables.

Hooks add each record, its plain values and a device tensor of per-sample norms, with one
``list.extend``; every ``COMPACT_EVERY`` records the buffer reduces those norms to batch means on their
device (two kernels, no host sync), so what waits for a flush is one number per record whatever the
batch size. ``Buffer.take`` hands the records to the writer thread, which moves each device's numbers to
the host in one transfer and lays out the Arrow tables.

Several threads may record into one buffer at once (an acting thread beside a learner). Appending needs
no lock: one ``extend`` of one tuple is atomic (under the GIL; in free-threaded CPython, list operations
lock the list), so a record and its norm can never be split or interleaved with another thread's. Taking
is a prefix: ``chunk = rows[:n]; del rows[:n]`` leaves whatever other threads appended meanwhile in
place. Takers (compaction, the hand-over at a flush) hold ``Buffer.lock``, since two of them at once
could take one prefix twice.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast, get_args

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from normtrace import schema

OutputRecord = tuple[str, int, int, bool, bool, int, int, Tensor]
"""(module, pass, epoch, grad_enabled, training, numel per sample, batch, per-sample norms). Hooks
``extend`` the flat ``Buffer.outputs`` list with it rather than appending the tuple: the tuple dies at
once (no object per record kept alive, nothing for the garbage collector to visit), the writer takes each
column with one slice instead of transposing thousands of tuples (measured: hook 95 -> 52 ns per record
in a loop, conversion 1.1 -> 0.6 ms per 5000 records), and the norm travels in the same call as the
values it belongs to, so no other thread's record can come between them."""

OUTPUT_FIELDS = len(get_args(OutputRecord))
"""Values per output record in the flat ``Buffer.outputs`` list."""

NORMS = OUTPUT_FIELDS - 1
"""Index of the per-sample norms in an output record; compaction empties that slot."""

COMPACT_EVERY = 64
"""The pending norm tensors are compacted once this many have accumulated: at the next pass's start, or
by the output hook that adds the one over (a model with more observed modules than this would otherwise
keep a whole pass's tensors alive, and the garbage collector, which tracks tensors, visits them: measured
with 800 observed modules, 5x the young collections and two full ones per 160k records, +7-12 µs a
record, against +0.2-1.9 µs with 50)."""

COMPACT_VALUES = COMPACT_EVERY * OUTPUT_FIELDS
"""Length of ``Buffer.outputs`` at which its norms are compacted."""

NormChunk = tuple[Tensor, int, bool]
"""(values, number of records they cover, reduced): batch means when ``reduced``, else the records'
per-sample norms end to end (batch sizes or devices differed, so the writer takes the means)."""
TakenOutputs = tuple[list[Any], list[NormChunk]]
"""What ``Buffer.take`` hands over for ``outputs``: compacted records' flat values (the norm slots
emptied) and their norms' chunks, in the same order."""
ParamRecord = tuple[int, int, float, list[tuple[str, str, int]], list[Tensor]]
"""(epoch, pass, time, [(module, param, numel)], norms in key order, one tensor per device group)."""
MetricRecord = tuple[int, int, str, "float | Tensor", "str | None", float]
"""(epoch, pass, name, value, split, time)."""
EventRecord = tuple[int, int, str, float]
"""(epoch, pass, name, time)."""
SignalRecord = tuple[
    int, int, int, Sequence[str], Sequence[tuple[str, "str | None"]], "Tensor | Sequence[float]"
]
"""(step, pass, epoch, kind per row, (module, param) per row, one value per row: a 1-d tensor on any
device, or plain floats). Lenses build the kinds and keys once at attach time, so a record of a whole
step's gradient norms is one tuple and one tensor."""


def compact(norms: list[Tensor]) -> list[NormChunk]:
    """Reduce per-record per-sample norms to one batch mean per record, on their device, without a sync.

    Records of different batch sizes are kept per sample, concatenated; several devices, per record.
    """
    if not norms:
        return []
    try:  # one batch size, one device: the common case
        return [(torch.stack(norms).mean(1), len(norms), True)]
    except Exception:  # this runs in the training loop, which must never break
        pass
    try:
        return [(torch.cat(norms), len(norms), False)]
    except Exception:  # several devices, a tensor subclass: host_concat sorts them out
        return [(n, 1, False) for n in norms]


class Buffer:
    """Rows recorded since the last flush, one list per table; any thread may append to any of them."""

    def __init__(self) -> None:
        self.outputs: list[Any] = []  # OutputRecord values end to end, OUTPUT_FIELDS per record
        # older records, compacted: only takers touch these two, under the lock, so they stay in step
        self.compacted: list[Any] = []
        self.norm_chunks: list[NormChunk] = []
        self._fresh = 0  # chunks at the end of norm_chunks not merged yet (_merge_fresh)
        self.params: list[ParamRecord] = []
        self.metrics: list[MetricRecord] = []
        self.events: list[EventRecord] = []
        self.signals: list[SignalRecord] = []
        self.lock = threading.Lock()
        """Held by whoever takes rows out (compaction, ``take``); appending never takes it."""

    def compact(self) -> None:
        """Compact the pending norm tensors (see ``compact``), on the calling (training) thread.

        Kernels queue on the stream that made the norms, device memory held until a flush stays one
        number per record, and the per-record tensors die young. (Leaving CPU norms for the writer was
        measured slower: thousands of small tensors alive until a flush make the allocator give memory
        back and fault it in again, on the training thread.) When another thread is compacting or taking
        at this moment, this returns at once: that thread takes these records too, or the next one will.
        """
        if self.lock.acquire(blocking=False):
            try:
                self._compact()
            finally:
                self.lock.release()

    def _compact(self) -> None:
        n = len(self.outputs)  # whole records: each one arrived in one extend
        if n:
            flat = self.outputs[:n]
            del self.outputs[:n]  # records appended since the slice stay for the next compaction
            norms = flat[NORMS::OUTPUT_FIELDS]
            flat[NORMS::OUTPUT_FIELDS] = [None] * len(norms)  # the per-record tensors die here
            self.norm_chunks += compact(norms)
            self.compacted += flat
            self._fresh += 1
            if self._fresh >= COMPACT_EVERY:
                self._merge_fresh()

    def _merge_fresh(self) -> None:
        """Concatenate each run of batch-mean chunks added since the last merge into one: a flush of a
        large model (800 modules x 1000 passes) would otherwise keep 12,500 chunk tensors alive, which the
        garbage collector promotes and then sweeps in full collections. Chunks of per-sample norms, and
        runs that cannot be joined (several devices), are left as they are."""
        fresh = self.norm_chunks[-self._fresh :]
        self._fresh = 0
        merged: list[NormChunk] = []
        run: list[NormChunk] = []
        for chunk in [*fresh, (torch.empty(0), 0, False)]:  # a per-sample sentinel ends the last run
            if chunk[2]:
                run.append(chunk)
                continue
            if len(run) > 1:
                with contextlib.suppress(Exception):  # several devices, a tensor subclass: the writer joins
                    run = [(torch.cat([values for values, _, _ in run]), sum(n for _, n, _ in run), True)]
            merged += run
            merged.append(chunk)
            run = []
        self.norm_chunks[-len(fresh) :] = merged[:-1]

    def take(self, into: Callable[[dict[str, list[Any]]], None] | None = None) -> dict[str, list[Any]]:
        """Hand over the non-empty tables' rows (``outputs`` as ``TakenOutputs``), leaving the lists empty
        but the same objects (hooks hold their bound ``append``/``extend``); rows other threads append
        while this runs stay for the next take. ``into`` (the writer's queue) receives them before the
        lock is released, so that batches taken by several threads are queued in the order they were
        taken (two threads flushing at once used to queue them crossed: a pass's rows out of order)."""
        taken: dict[str, Any] = {}
        with self.lock:
            self._compact()
            if self.compacted:
                taken["outputs"] = (self.compacted, self.norm_chunks)
                self.compacted, self.norm_chunks, self._fresh = [], [], 0
            for table in ("params", "metrics", "events", "signals"):
                rows = getattr(self, table)
                n = len(rows)
                if n:
                    taken[table] = rows[:n]
                    del rows[:n]
            if into is not None:
                into(taken)
        return taken


def row_count(table: str, records: Any) -> int:
    """Rows that ``records`` (a ``take()`` entry of ``table``) become in the table."""
    if table == "outputs":
        return len(records[0]) // OUTPUT_FIELDS
    if table == "params":
        return sum(len(keys) for _, _, _, keys, _ in records)
    if table == "signals":
        return sum(len(keys) for _, _, _, _, keys, _ in records)
    return len(records)


def host_concat(tensors: list[Tensor]) -> np.ndarray:
    """Concatenate 1-d/0-d tensors (possibly on several devices) into one float64 host array, in order.

    One concatenation and one transfer per device; runs on the writer thread, so a transfer that waits
    for the device blocks only the writer. A tensor whose values cannot be read on the host (a tensor
    subclass such as a ``DTensor``) becomes NaN, with a warning, so the rest of the flush is kept.
    """
    try:  # the common cases, all 1-d or all 0-d on one device: no per-tensor Python work
        joined = torch.stack(tensors) if tensors[0].ndim == 0 else torch.cat(tensors)
        return joined.to("cpu", torch.float64).numpy()
    except Exception:  # 0-d and 1-d mixed, several devices, or a tensor subclass (its own errors)
        pass
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    parts: list[np.ndarray] = [np.empty(0)] * len(tensors)
    for idx in by_device.values():
        try:
            host = torch.cat([tensors[i].reshape(-1) for i in idx]).to("cpu", torch.float64).numpy()
        except Exception:  # one unreadable tensor must not cost the others
            for i in idx:
                parts[i] = _to_host(tensors[i])
            continue
        sizes = [tensors[i].numel() for i in idx]
        for i, part in zip(idx, np.split(host, np.cumsum(sizes)[:-1]), strict=True):
            parts[i] = part
    return np.concatenate(parts)


def _to_host(t: Tensor) -> np.ndarray:
    """One tensor's values as a flat float64 host array, or NaNs (and a warning) if they cannot be read."""
    try:
        return t.detach().reshape(-1).to("cpu", torch.float64).numpy()
    except Exception as exc:  # a tensor subclass without local values (DTensor, FakeTensor)
        warnings.warn(
            f"normtrace: {t.numel()} recorded value(s) held in a {type(t).__name__} cannot be read on the "
            f"host ({type(exc).__name__}: {exc}); they are stored as NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        return np.full(t.numel(), np.nan)


def batch_means(chunks: Sequence[NormChunk], batch: np.ndarray) -> np.ndarray:
    """One mean norm per record from compacted chunks; ``batch`` holds the records' batch sizes, in order."""
    host = host_concat([values for values, _, _ in chunks])
    means = np.empty(len(batch), dtype=np.float64)
    pos = first = 0
    for values, count, reduced in chunks:
        size = values.numel()
        if reduced:
            means[first : first + count] = host[pos : pos + count]
        else:
            sizes = batch[first : first + count]
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            means[first : first + count] = np.add.reduceat(host[pos : pos + size], starts) / sizes
        pos += size
        first += count
    if first != len(batch):
        raise RuntimeError(f"norm chunks cover {first} records, the buffer holds {len(batch)}")
    return means


def outputs_table(taken: TakenOutputs, rank: int) -> pa.Table:
    """Lay the flat records (``OUTPUT_FIELDS`` values each) and their batch-mean norms out as rows."""
    flat, norm_chunks = taken
    if len(flat) % OUTPUT_FIELDS:
        raise RuntimeError(f"{len(flat)} output values do not make records of {OUTPUT_FIELDS}")

    def column(i: int) -> list[Any]:
        return flat[i::OUTPUT_FIELDS]

    batch = np.asarray(column(6), dtype=np.int64)
    means = batch_means(norm_chunks, batch)
    columns = {
        "pass": np.asarray(column(1), dtype=np.int64),
        "epoch": np.asarray(column(2), dtype=np.int32),
        "module": column(0),
        "norm": means.astype(np.float32),
        "numel": np.asarray(column(5), dtype=np.int64),
        "batch": batch.astype(np.int32),
        "grad_enabled": np.asarray(column(3), dtype=bool),
        "training": np.asarray(column(4), dtype=bool),
        "rank": np.full(len(batch), rank, dtype=np.int32),
    }
    return pa.table(columns, schema=schema.OUTPUTS)


def params_table(records: list[ParamRecord], rank: int) -> pa.Table:
    """One ``params`` row per (collection, parameter)."""
    counts = [len(keys) for _, _, _, keys, _ in records]
    keys = [k for _, _, _, ks, _ in records for k in ks]
    norms = host_concat([t for *_, parts in records for t in parts])
    columns = {
        "epoch": np.repeat([r[0] for r in records], counts).astype(np.int32),
        "pass": np.repeat([r[1] for r in records], counts).astype(np.int64),
        "module": [k[0] for k in keys],
        "param": [k[1] for k in keys],
        "norm": norms.astype(np.float32),
        "numel": np.asarray([k[2] for k in keys], dtype=np.int64),
        "rank": np.full(len(keys), rank, dtype=np.int32),
        "time": np.repeat([r[2] for r in records], counts).astype(np.float64),
    }
    return pa.table(columns, schema=schema.PARAMS)


def metrics_table(records: list[MetricRecord], rank: int) -> pa.Table:
    """One ``metrics`` row per record; tensor values are moved to the host together."""
    epochs, passes, names, values, splits, times = zip(*records, strict=True)
    host = np.asarray([v if not isinstance(v, Tensor) else np.nan for v in values], dtype=np.float64)
    on_device = [i for i, v in enumerate(values) if isinstance(v, Tensor)]
    if on_device:
        host[on_device] = host_concat([values[i] for i in on_device])
    columns = {
        "epoch": np.asarray(epochs, dtype=np.int32),
        "pass": np.asarray(passes, dtype=np.int64),
        "name": names,
        "value": host,
        "split": splits,
        "rank": np.full(len(records), rank, dtype=np.int32),
        "time": np.asarray(times, dtype=np.float64),
    }
    return pa.table(columns, schema=schema.METRICS)


def events_table(records: list[EventRecord], rank: int) -> pa.Table:
    """One ``events`` row per record."""
    epochs, passes, names, times = zip(*records, strict=True)
    columns = {
        "epoch": np.asarray(epochs, dtype=np.int32),
        "pass": np.asarray(passes, dtype=np.int64),
        "name": names,
        "rank": np.full(len(records), rank, dtype=np.int32),
        "time": np.asarray(times, dtype=np.float64),
    }
    return pa.table(columns, schema=schema.EVENTS)


def signals_table(records: list[SignalRecord], rank: int) -> pa.Table:
    """One ``signals`` row per (kind, key, value) of every record; device values in one transfer each.

    Lenses reuse their kinds and keys objects from step to step, so the strings of each distinct pair
    are coded once per flush and the string columns are built by ``take`` from the few distinct
    strings (measured: 0.13 µs a row, against 0.15 as Python lists of strings; a profiler had made
    the lists look ten times slower)."""
    counts = np.fromiter((len(r[4]) for r in records), np.int64, len(records))
    codes: dict[str | None, int] = {}  # every distinct string (or None) of the three columns
    distinct: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # the code columns of each distinct pair
    coded: dict[tuple[int, int], int] = {}  # index in ``distinct`` by id(kinds), id(keys)
    by_value: dict[tuple[Any, Any], int] = {}  # the same by contents, for keys built anew at every call
    which = []
    for r in records:
        pair = (id(r[3]), id(r[4]))  # (the records hold both objects: no id is reused meanwhile)
        d = coded.get(pair)
        if d is None:
            if len(r[3]) != len(r[4]):
                raise ValueError(f"a signals record has {len(r[3])} kinds and {len(r[4])} keys")
            try:
                content: tuple[Any, Any] | None = (tuple(r[3]), tuple(r[4]))
                d = by_value.get(content)  # type: ignore[arg-type]
            except TypeError:  # unhashable keys (lists): coded as they come
                content = None
            if d is None:
                d = len(distinct)
                distinct.append(
                    (
                        np.fromiter((codes.setdefault(k, len(codes)) for k in r[3]), np.int32, len(r[3])),
                        np.fromiter((codes.setdefault(m, len(codes)) for m, _ in r[4]), np.int32, len(r[4])),
                        np.fromiter((codes.setdefault(p, len(codes)) for _, p in r[4]), np.int32, len(r[4])),
                    )
                )
                if content is not None:
                    by_value[content] = d
            coded[pair] = d
        which.append(d)
    strings = pa.array(list(codes), pa.string())
    total = int(counts.sum())
    # each row's place in the distinct pairs' columns laid end to end: one gather, no per-record concatenation
    sizes = np.fromiter((len(c[0]) for c in distinct), np.int64, len(distinct))
    w = np.asarray(which, np.int64)
    firsts = np.cumsum(counts) - counts
    rows = np.repeat((np.cumsum(sizes) - sizes)[w] - firsts, counts) + np.arange(total)
    text = [
        strings.take(pa.array(np.concatenate([c[k] for c in distinct])[rows] if distinct else [], pa.int32()))
        for k in range(3)
    ]
    return pa.table(
        {
            "step": np.repeat(np.fromiter((r[0] for r in records), np.int64, len(records)), counts),
            "pass": np.repeat(np.fromiter((r[1] for r in records), np.int64, len(records)), counts),
            "epoch": np.repeat(np.fromiter((r[2] for r in records), np.int32, len(records)), counts),
            "kind": text[0],
            "module": text[1],
            "param": text[2],
            "value": _signal_values(records, counts).astype(np.float32),
            "rank": np.full(total, rank, dtype=np.int32),
        },
        schema=schema.SIGNALS,
    )


def _signal_values(records: list[SignalRecord], counts: np.ndarray) -> np.ndarray:
    """Every record's values end to end (float64): device tensors moved in one transfer per device."""
    values = np.empty(int(counts.sum()), np.float64)
    ends = np.cumsum(counts)
    tensors = [i for i, r in enumerate(records) if isinstance(r[5], Tensor)]
    if tensors:
        got = cast(list[Tensor], [records[i][5] for i in tensors])
        sizes = np.fromiter((t.numel() for t in got), np.int64, len(got))
        wrong = np.flatnonzero(sizes != counts[tensors])
        if len(wrong):
            _wrong_count(records[tensors[wrong[0]]], int(sizes[wrong[0]]))
        host = host_concat(got)  # (which flattens 2-d values and any mix of shapes)
        if len(tensors) == len(records):
            return host
        mask = np.zeros(len(values), bool)
        for i in tensors:
            mask[ends[i] - counts[i] : ends[i]] = True
        values[mask] = host
    for i, r in enumerate(records):
        if not isinstance(r[5], Tensor):
            plain = np.asarray(r[5], dtype=np.float64).reshape(-1)
            if len(plain) != counts[i]:
                _wrong_count(r, len(plain))
            values[ends[i] - counts[i] : ends[i]] = plain
    return values


def _wrong_count(record: SignalRecord, values: int) -> None:
    raise ValueError(
        f"a signals record of kinds {sorted(set(record[3]))} has {len(record[4])} keys and {values} values"
    )


CONVERTERS: dict[str, Callable[[Any, int], pa.Table]] = {
    "outputs": outputs_table,
    "params": params_table,
    "metrics": metrics_table,
    "events": events_table,
    "signals": signals_table,
}
"""Table name -> function turning that table's buffered records into an Arrow table."""
