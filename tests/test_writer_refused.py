"""A shard that pyarrow refuses to write (not a disk error: retrying cannot help) costs that shard only,
and ``close()`` returns: it used to wait forever, logging "still writing", with the lock held."""

from __future__ import annotations

import contextlib
import json
import logging
import threading

import pyarrow as pa
import pytest
import torch
from recorder_models import QNetwork, approx_output_norms, norms_by_module, read_table
from torch import nn

import normtrace as nt
import normtrace.rundir
import normtrace.writer
from normtrace import schema


@pytest.fixture
def refuse_events(monkeypatch):
    """pyarrow refuses every ``events`` shard; the other tables are written as usual."""
    real = pa.ipc.new_file
    refused = []

    def new_file(sink, file_schema, **kwargs):
        if file_schema.equals(schema.EVENTS):
            refused.append(file_schema)
            raise pa.ArrowInvalid("refused by the test")
        return real(sink, file_schema, **kwargs)

    monkeypatch.setattr(pa.ipc, "new_file", new_file)
    return refused


def close_within(rec: nt.Recorder, seconds: float = 60.0) -> BaseException | None:
    """``rec.close()`` in a thread: the error it raised, or a failure if it has not returned in time."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            rec.close()
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "close() did not return"
    return raised[0] if raised else None


def test_a_refused_shard_at_close_is_reported_and_the_rest_is_written(tmp_path, refuse_events):
    model = QNetwork()
    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])], epoch_flush_secs=3600)
    rec.attach(model)
    x = torch.randn(2, 4)
    model(x)
    rec.event("sync")
    rec.push_metric("reward", 2.0)
    error = close_within(rec)
    assert isinstance(error, nt.WriterError) and "refused by the test" in str(error)
    assert error.path.parent == tmp_path / "events"
    assert read_table(tmp_path, "metrics").column("value").to_pylist() == [2.0]
    assert norms_by_module(read_table(tmp_path, "outputs").to_pylist()) == approx_output_norms(model, x)
    assert not list(tmp_path.rglob("*.tmp"))
    assert not (tmp_path / schema.lock_name(0)).exists()  # released: the run can be opened again
    assert refuse_events  # (the refusal did happen)


def test_a_refused_shard_mid_run_does_not_hold_back_later_shards(tmp_path, refuse_events):
    model = QNetwork()
    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])], epoch_flush_secs=0)
    rec.attach(model)
    rec.event("sync")
    rec.push_metric("reward", 1.0)
    rec.tick_epoch()  # a flush: the events shard is refused, the metrics shard written
    rec._writer.wait()
    with pytest.raises(nt.WriterError, match="refused by the test"):
        rec.push_metric("reward", 3.0)  # the next call reports it, and records its value
    x = torch.randn(2, 4)
    model(x)
    rec.tick_epoch()
    assert close_within(rec) is None  # raised once, already
    assert read_table(tmp_path, "metrics").column("value").to_pylist() == [1.0, 3.0]
    assert norms_by_module(read_table(tmp_path, "outputs").to_pylist()) == approx_output_norms(model, x)
    assert len(refuse_events) == 1  # dropped after the refusal, not retried at every flush


def test_a_merge_that_fails_unexpectedly_at_close_is_reported_and_the_shards_kept(tmp_path, monkeypatch):
    """``close()``'s merge raising something other than an ``OSError`` (a bug, a corrupt shard) used to
    leave the writer waiting for a job that never came: close() must return, raise, and release the run."""

    def broken(folder, rank, **kwargs):
        raise RuntimeError("merge bug")

    monkeypatch.setattr(schema, "compact", broken)
    model = QNetwork()
    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])])
    rec.attach(model)
    x = torch.randn(2, 4)
    model(x)
    error = close_within(rec)
    assert isinstance(error, nt.WriterError) and "merge bug" in str(error)
    assert error.path == tmp_path
    assert norms_by_module(read_table(tmp_path, "outputs").to_pylist()) == approx_output_norms(model, x)
    assert not (tmp_path / schema.lock_name(0)).exists()


def test_shards_are_written_compressed(tmp_path):
    """The writer's shards use LZ4 (``Recorder(compression=...)``'s default): a run of repeated rows is
    several times smaller than the same table written uncompressed."""
    rec = nt.Recorder(tmp_path, compact=False)
    for _ in range(2000):
        rec.push_metric("constant", 1.0)
    rec.close()
    (shard,) = (tmp_path / "metrics").glob("*.arrow")
    table = pa.ipc.open_file(pa.memory_map(str(shard))).read_all()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    assert shard.stat().st_size * 3 < sink.getvalue().size


def test_a_failing_disk_never_makes_training_wait_for_room(tmp_path):
    """A full disk (here: a file where the outputs folder goes) keeps every row queued; the back-pressure
    that makes training wait for the writer must not apply then, or it would wait forever."""
    (tmp_path / "outputs").write_text("not a folder")
    model = QNetwork()
    rec = nt.Recorder(
        tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])], flush_every=1, max_queued_rows=3
    )
    rec.attach(model)
    done = threading.Event()

    def train() -> None:
        for _ in range(30):
            with contextlib.suppress(nt.WriterError):  # (reported by a call after a failed write)
                model(torch.randn(2, 4))
        done.set()

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    assert done.wait(60), "training waited for room the failing writer could never make"
    (tmp_path / "outputs").unlink()  # the disk is fixed: the kept rows are written at the next flush
    with contextlib.suppress(nt.WriterError):  # the last failed write, reported once
        rec.flush()
    rec.flush()
    rec._writer.wait()
    assert rec._writer.queued_rows == 0  # each failed attempt left the count as it was
    close_within(rec)
    assert len({r["pass"] for r in read_table(tmp_path, "outputs").to_pylist()}) == 30


def test_exactly_max_queued_rows_queued_is_room_enough(tmp_path):
    """Training waits only while *more* than ``max_queued_rows`` rows are queued: at exactly that many
    it goes on, without a stall or a warning (the writer is held still by its lock meanwhile)."""
    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm()], max_queued_rows=5)
    writer = rec._writer
    with writer._room:
        writer.queued_rows += 5
    try:
        writer.wait_for_room()  # would wait for a writer that has nothing to write
        assert writer.stalls == 0
    finally:
        with writer._room:
            writer.queued_rows -= 5
        rec.close()


@pytest.mark.parametrize("state", ["failing", "stopped"])
def test_a_failing_or_stopped_writer_never_makes_training_wait(tmp_path, state: str):
    """More rows queued than allowed, but the writer is failing (it keeps them for a retry) or stopped:
    waiting could never end, so training goes on at once, without counting a stall."""
    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm()], max_queued_rows=5)
    writer = rec._writer
    if state == "stopped":
        rec.close()
    with writer._room:
        writer.queued_rows += 6
        writer._failing = state == "failing"
    waited = threading.Thread(target=writer.wait_for_room, daemon=True)
    waited.start()
    waited.join(5)
    try:
        assert not waited.is_alive() and writer.stalls == 0
    finally:
        with writer._room:
            writer.queued_rows -= 6
            writer._failing = False
        rec.close()


def test_a_bug_in_the_writers_loop_is_reported_naming_the_run_and_the_rows_kept(tmp_path, monkeypatch):
    """An unexpected error in the writer thread's own code (here: the check for infinite norms) must not
    kill the thread silently: it is kept and raised by the next call, naming the run directory, and the
    rows already taken in are written."""

    def broken(self, data):
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(normtrace.writer.ShardWriter, "_note_infinite_norms", broken)
    model = QNetwork()
    x = torch.randn(2, 4)
    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])])
    rec.attach(model)
    model(x)
    error = close_within(rec)
    assert isinstance(error, nt.WriterError) and error.path == tmp_path
    assert str(error) == f"normtrace could not write {tmp_path}: RuntimeError: a bug in the writer"
    assert norms_by_module(read_table(tmp_path, "outputs").to_pylist()) == approx_output_norms(model, x)


def test_a_failure_after_the_last_write_is_reported_naming_the_run(tmp_path, monkeypatch):
    """What runs once everything is written (releasing the run directory's lock) failing is reported by
    close(), naming the run directory; the rows are written and the thread stops."""

    def release(self):
        raise RuntimeError("the lock file vanished oddly")

    monkeypatch.setattr(normtrace.rundir.RunDirLock, "release", release)
    rec = nt.Recorder(tmp_path)
    rec.push_metric("m", 1.0)
    error = close_within(rec)
    assert isinstance(error, nt.WriterError) and error.path == tmp_path
    assert str(error) == f"normtrace could not write {tmp_path}: RuntimeError: the lock file vanished oddly"
    assert read_table(tmp_path, "metrics").column("name").to_pylist() == ["m"]
    assert not rec._writer.alive
    monkeypatch.undo()
    rec._run.lock.release()  # (for the test's own cleanup)


def test_metadata_that_cannot_be_written_at_close_is_reported_naming_its_file(tmp_path):
    """The final meta.json failing (something is in its way) is raised by close() naming that file; the
    rows are written all the same."""
    rec = nt.Recorder(tmp_path)
    rec.push_metric("m", 1.0)
    meta = tmp_path / schema.meta_name(0)
    meta.unlink()
    meta.mkdir()
    error = close_within(rec)
    assert isinstance(error, nt.WriterError) and error.path == meta
    assert str(error).startswith(f"normtrace could not write {meta}: IsADirectoryError: ")
    assert read_table(tmp_path, "metrics").column("name").to_pylist() == ["m"]


def test_a_merge_the_disk_refuses_at_close_is_logged_per_table_and_the_shards_kept(
    tmp_path, monkeypatch, caplog
):
    """An ``OSError`` while merging (a full disk) loses nothing: every row stays in its shard, close()
    returns normally, and the log says which table's shards stay as written and why."""

    def full(folder, rank, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(schema, "compact", full)
    with caplog.at_level(logging.WARNING, logger="normtrace"), nt.Recorder(tmp_path) as rec:
        rec.push_metric("m", 1.0)
    assert [r.getMessage() for r in caplog.records if r.name == "normtrace"] == [
        f"normtrace: could not merge the shards of {tmp_path / table} (they stay as written): [Errno 28] "
        "No space left on device"
        for table in schema.TABLES
    ]
    assert read_table(tmp_path, "metrics").column("value").to_pylist() == [1.0]
    assert json.loads((tmp_path / "meta.json").read_text())["status"] == "closed"
