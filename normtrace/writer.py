"""The background writer: turns buffered records into Arrow IPC shards off the training thread.

Like torch's ``SummaryWriter`` event writer, it owns a queue and a daemon thread. Every file is written
under a temporary name and renamed into place, so a run killed at any moment leaves only complete shards.
A failure is kept (with the rows it could not write, for a retry at the next flush) and raised to the
user at the next call into the recorder.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa

from normtrace import schema
from normtrace.buffer import CONVERTERS
from normtrace.errors import WriterError

_STOP = object()


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path`` via a temporary file and a rename (readers never see half)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class ShardWriter:
    """Writes one rank's shards and metadata for a run directory on a background thread."""

    def __init__(self, run_dir: Path, rank: int, compression: str | None = "lz4") -> None:
        self.run_dir = run_dir
        self.rank = rank
        self._options = pa.ipc.IpcWriteOptions(compression=compression)
        self._seq = dict.fromkeys(schema.TABLES, 0)
        self._pending: list[tuple[str, pa.Table]] = []  # converted but not yet written (after a failure)
        self._error: WriterError | None = None
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"normtrace-writer-rank{rank}", daemon=True)
        self._thread.start()

    def submit_records(self, taken: dict[str, list[Any]]) -> None:
        """Queue buffered records (from ``Buffer.take``) for conversion and writing; returns at once."""
        if taken:
            self._queue.put(("records", taken))

    def submit_meta(self, meta: dict[str, Any]) -> None:
        """Queue a rewrite of this rank's metadata file, ordered after the records queued before it."""
        self._queue.put(("meta", meta))

    def wait(self) -> None:
        """Block until everything queued so far has been handled."""
        self._queue.join()

    def take_error(self) -> WriterError | None:
        """The first failure since the last call, cleared so it is raised once."""
        err, self._error = self._error, None
        return err

    def close(self) -> None:
        """Write what is queued, retry what failed, and stop the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is _STOP:
                    self._retry_pending()
                    return
                kind, payload = job
                self._retry_pending()
                if kind == "records":
                    for table, records in payload.items():
                        try:
                            data = CONVERTERS[table](records, self.rank)
                        except Exception as exc:  # a bug in one table's conversion costs that table only
                            self._fail(schema.shard_dir(self.run_dir, table), exc)
                            continue
                        self._pending.append((table, data))
                    self._retry_pending()
                else:
                    self._write_meta(payload)
            except Exception as exc:  # a bug in conversion must not kill the thread silently
                self._fail(self.run_dir, exc)
            finally:
                self._queue.task_done()

    def _retry_pending(self) -> None:
        while self._pending:
            table, data = self._pending[0]
            try:
                self._write_shard(table, data)
            except OSError:
                return  # kept for the next flush; _write_shard recorded the error
            self._pending.pop(0)

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
        except OSError as exc:
            self._fail(final, exc)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        self._seq[table] += 1

    def _write_meta(self, meta: dict[str, Any]) -> None:
        path = self.run_dir / schema.meta_name(self.rank)
        try:
            write_json_atomic(path, meta)
        except OSError as exc:
            self._fail(path, exc)

    def _fail(self, path: Path, exc: BaseException) -> None:
        if self._error is None:
            self._error = WriterError(path, exc)
