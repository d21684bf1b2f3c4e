"""The background writer: turns buffered records into Arrow IPC shards off the training thread.

Like torch's ``SummaryWriter`` event writer, it owns a queue and a daemon thread. Every file is written
under a temporary name and renamed into place, so a run killed at any moment leaves only complete shards.
A failure is kept (with the rows it could not write, for a retry at the next flush) and raised to the
user at the next call into the recorder.

The queue is a ``queue.SimpleQueue``, whose ``put`` is reentrant: a recording may be finished from a
signal handler or a garbage-collector finalizer, which can interrupt any code, this queue's too. The
backlog is bounded: a flush waits (``wait_for_room``) while more than ``max_queued_rows`` rows are queued
and unwritten, warning once, so a writer slower than training costs time, not unbounded memory. Rows the
writer could not write (a full disk) never make training wait: that error is raised to the user instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from normtrace import schema
from normtrace.buffer import CONVERTERS, row_count
from normtrace.errors import WriterError, warn_user

log = logging.getLogger("normtrace")

PROGRESS_SECS = 5.0
"""While ``join`` waits for a backlog, it logs how many rows are left this often."""

MERGE_GRACE_SECS = 60.0
"""Shards merged while the run goes on are deleted this long after the merge (or at close), so a reader
that listed them just before can still read them."""

_STOP, _RECORDS, _META, _SYNC = "stop", "records", "meta", "sync"

INF_NORM = (
    "an output norm is inf: the output held inf, or float32 elements beyond ~1.8e19, whose squares "
    "overflow the float32 sum of squares (norms are accumulated in the output's precision, float32 for "
    "float32 outputs, since a float64 copy of every output would cost more than the norm itself)"
)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path`` via a temporary file and a rename (readers never see half)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class ShardWriter:
    """Writes one rank's shards and metadata for a run directory on a background thread."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        compression: schema.Compression,
        max_queued_rows: int,
        merge_rows: int | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.rank = rank
        self.max_queued_rows = max_queued_rows
        self.merge_rows = merge_rows
        """Merge a table's shards while the run goes on once this many rows of them are unmerged (None:
        not while it goes; ``close(compact=True)`` still merges)."""
        self._unmerged = dict.fromkeys(schema.TABLES, 0)  # rows written since the table's last merge
        self._merged_at: dict[str, float] = {}  # tables whose merged shards wait for deletion: last merge
        # use_threads=False: compressed on this thread; the default hands each buffer to pyarrow's pool,
        # whose wake-ups cost more CPU than compressing a shard's small buffers (measured)
        self._options = pa.ipc.IpcWriteOptions(compression=compression, use_threads=False)
        self._seq = dict.fromkeys(schema.TABLES, 0)
        self._pending: list[tuple[str, pa.Table, int]] = []  # converted, not yet written (after a failure)
        self._error: WriterError | None = None
        self._jobs: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        # reentrant: a signal handler or finalizer may submit while this thread is inside it already
        self._room = threading.Condition(threading.RLock())
        self.queued_rows = 0
        """Rows submitted and not yet written (or dropped by a failed conversion)."""
        self.stalls = 0
        """How many flushes waited for room."""
        self._failing = False  # the last write failed: waiting for room could wait forever
        self._notes: list[dict[str, str]] = []  # what the writer found in the data, merged into the metadata
        self._last_meta: dict[str, Any] | None = None
        self._warned = False
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=f"normtrace-writer-rank{rank}:{run_dir}", daemon=True
        )
        self._thread.start()

    @property
    def alive(self) -> bool:
        """Whether the writer thread runs (it stops after ``close``; a forked child has none)."""
        return self._thread.is_alive()

    def wait_for_room(self) -> None:
        """Block while more than ``max_queued_rows`` rows are queued, unless the writer is failing or
        stopped; the first wait warns, naming the run and the setting."""
        if self.queued_rows <= self.max_queued_rows:
            return
        with self._room:
            if self.queued_rows <= self.max_queued_rows or self._failing or not self.alive:
                return
            self.stalls += 1
            if not self._warned:
                self._warned = True
                warn_user(  # at the training loop's line, whichever recorder call flushed
                    f"normtrace: the writer of {self.run_dir} is {self.queued_rows} rows behind "
                    f"(max_queued_rows={self.max_queued_rows}); training waits for it to catch up. The disk "
                    "is slower than what is recorded: record fewer modules (OutputNorm(exclude=...)), or "
                    "raise max_queued_rows to buy memory for speed",
                    RuntimeWarning,
                )
            while self.queued_rows > self.max_queued_rows and not self._failing and self.alive:
                self._room.wait(timeout=1.0)

    def submit_records(self, taken: dict[str, list[Any]]) -> None:
        """Queue buffered records (from ``Buffer.take``) for conversion and writing; returns at once."""
        if taken:
            rows = sum(row_count(table, records) for table, records in taken.items())
            with self._room:
                self.queued_rows += rows
            self._jobs.put((_RECORDS, taken))

    def submit_meta(self, meta: dict[str, Any]) -> None:
        """Queue a rewrite of this rank's metadata file, ordered after the records queued before it."""
        self._jobs.put((_META, meta))

    def wait(self) -> None:
        """Block until everything queued so far has been handled."""
        done = threading.Event()
        self._jobs.put((_SYNC, done))
        while not done.wait(timeout=0.5):
            if not self.alive:
                return

    def take_error(self) -> WriterError | None:
        """The first failure since the last call, cleared so it is raised once."""
        err, self._error = self._error, None
        return err

    def close(self, then: Callable[[], None] | None = None, *, compact: bool = False) -> None:
        """Queue the end: write what is queued, retry what failed, merge the shards when ``compact`` and
        all is written (``schema.compact``), call ``then``, and stop the thread. Returns at once; ``join``
        waits. Safe to call again (later calls do nothing)."""
        if not self._stopping:
            self._stopping = True
            self._jobs.put((_STOP, (then, compact)))

    def join(self) -> None:
        """Wait for the thread to stop (after ``close``), logging progress while a backlog drains."""
        if threading.current_thread() is self._thread:
            return
        start = time.monotonic()
        while self.alive:
            self._thread.join(timeout=PROGRESS_SECS)
            if self.alive:
                log.warning(
                    "normtrace: still writing %s: %d rows left (%.0f s so far)",
                    self.run_dir,
                    self.queued_rows,
                    time.monotonic() - start,
                )

    def _run(self) -> None:
        # pyarrow imports numpy.ma at its first conversion of a numpy array (~11 ms, once per process):
        # here, while training starts, rather than inside the first flush
        import numpy.ma  # noqa: F401

        while True:
            kind, payload = self._jobs.get()
            try:
                if kind == _STOP:
                    self._stop(*payload)
                    return
                if kind == _SYNC:
                    payload.set()
                    continue
                self._retry_pending()
                if kind == _RECORDS:
                    for table, records in payload.items():
                        try:
                            data = CONVERTERS[table](records, self.rank)
                        except Exception as exc:  # a bug in one table's conversion costs that table only
                            self._fail(schema.shard_dir(self.run_dir, table), exc)
                            self._written(row_count(table, records))
                            continue
                        self._pending.append((table, data, data.num_rows))
                        if table == "outputs":
                            self._note_infinite_norms(data)
                    self._retry_pending()
                else:
                    self._write_meta(payload)
                self._drop_merged(time.monotonic() - MERGE_GRACE_SECS)
            except Exception as exc:  # a bug must not kill the thread silently
                self._fail(self.run_dir, exc)

    def _stop(self, then: Callable[[], None] | None, compact: bool) -> None:
        """The last job: write what is left, merge, call ``then``. Whatever fails is kept as the error to
        raise; the thread stops regardless (``close`` waits for it: it used to wait forever when a shard
        failed with anything but an ``OSError`` here)."""
        try:
            self._retry_pending()
            if compact and not self._pending and self._error is None:
                self._compact()
            self._drop_merged(float("inf"))
        except Exception as exc:
            self._fail(self.run_dir, exc)
        finally:
            if then is not None:
                try:
                    then()
                except Exception as exc:
                    self._fail(self.run_dir, exc)

    def _written(self, rows: int, failing: bool = False) -> None:
        with self._room:
            self.queued_rows -= rows
            self._failing = failing
            self._room.notify_all()

    def _retry_pending(self) -> None:
        while self._pending:
            table, data, rows = self._pending[0]
            try:
                self._write_shard(table, data)
            except OSError:
                self._written(0, failing=True)
                return  # kept for the next flush; _write_shard recorded the error
            except Exception:  # not the disk (pyarrow refused the data): a retry would fail alike and hold
                pass  # back every later shard, so it is dropped; _write_shard kept the error to raise
            self._pending.pop(0)
            self._written(rows)
            self._merge_as_we_go(table, rows)

    def _write_shard(self, table: str, data: pa.Table) -> None:
        folder = schema.shard_dir(self.run_dir, table)
        final = folder / schema.shard_name(self.rank, self._seq[table] + 1)
        tmp = folder / f".{final.name}.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with (
                pa.OSFile(str(tmp), "wb") as sink,
                pa.ipc.new_file(sink, data.schema, options=self._options) as w,
            ):
                w.write_table(data)
            os.replace(tmp, final)
        except Exception as exc:
            self._fail(final, exc)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        self._seq[table] += 1

    def _merge_as_we_go(self, table: str, rows: int) -> None:
        """Merge ``table``'s shards but the last group once ``merge_rows`` rows were written since the last
        merge, so that a long run's close() merges only its tail and a killed run is mostly merged. The
        shards merged stay until ``_drop_merged`` (readers skip them). A failure is logged, not raised:
        nothing is lost, and training must not stop for a merge."""
        if self.merge_rows is None:
            return
        self._unmerged[table] += rows
        if self._unmerged[table] < self.merge_rows:
            return
        self._unmerged[table] = 0
        folder = schema.shard_dir(self.run_dir, table)
        try:
            if schema.compact(folder, self.rank, max_rows=self.merge_rows, last=False, delete=False):
                self._merged_at[table] = time.monotonic()
        except Exception as exc:  # a full disk, or a bug: every row is still in its shard; close() retries
            log.warning("normtrace: could not merge the shards of %s (they stay as written): %s", folder, exc)

    def _drop_merged(self, before: float) -> None:
        """Delete the shards merged as the run went on, of each table last merged before ``before``
        (monotonic seconds). A failure is logged: the shards are only left behind, readers skip them."""
        for table, merged in list(self._merged_at.items()):
            if merged < before:
                del self._merged_at[table]
                folder = schema.shard_dir(self.run_dir, table)
                try:
                    schema.drop_covered(folder, self.rank)
                except OSError as exc:
                    log.warning("normtrace: could not delete merged shards of %s: %s", folder, exc)

    def _compact(self) -> None:
        """Merge this rank's shards of every table (``schema.compact``). A failure loses nothing (every
        row stays in its shard) and is logged, not raised."""
        for table in schema.TABLES:
            folder = schema.shard_dir(self.run_dir, table)
            try:
                schema.compact(folder, self.rank, max_rows=self.merge_rows or schema.COMPACT_ROWS)
            except OSError as exc:
                log.warning(
                    "normtrace: could not merge the shards of %s (they stay as written): %s", folder, exc
                )

    def _note_infinite_norms(self, data: pa.Table) -> None:
        """Say once per module, in a warning and a metadata note, that some of its norms are inf."""
        infinite = pc.is_inf(data.column("norm"))
        if not pc.any(infinite).as_py():
            return
        noted = {n["module"] for n in self._notes}
        modules = [
            m for m in pc.unique(pc.filter(data.column("module"), infinite)).to_pylist() if m not in noted
        ]
        for module in modules:
            self._notes.append({"module": str(module), "kind": "inf_norm", "detail": INF_NORM})
            warnings.warn(
                f"normtrace: module {module!r} in {self.run_dir}: {INF_NORM}", RuntimeWarning, stacklevel=2
            )
        if modules and self._last_meta is not None:
            self._write_meta(self._last_meta)

    def _write_meta(self, meta: dict[str, Any]) -> None:
        self._last_meta = meta
        if self._notes:
            meta = {**meta, "notes": [*meta.get("notes", []), *self._notes]}
        path = self.run_dir / schema.meta_name(self.rank)
        try:
            write_json_atomic(path, meta)
        except OSError as exc:
            self._fail(path, exc)

    def _fail(self, path: Path, exc: BaseException) -> None:
        if self._error is None:
            self._error = WriterError(path, exc)
