"""Compaction: a closed run's shards merged into few files, the same rows read once at every moment.

A run flushing every few passes writes many small shards; ``close()`` merges each table's shards per rank
(``schema.compact``), and ``normtrace compact`` does it for a run that was never closed. The expectations
are the rows as written (a run recorded with ``compact=False``) and the rows the analysis read before.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import normtrace_analysis as na
import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch
from damage import damage_body
from normtrace_analysis.cli import main as cli
from torch import nn

import normtrace as nt
from normtrace import schema

PASSES, FLUSH = 60, 4


def record(run: Path, *, compact: bool = True, close: bool = True) -> nt.Recorder:
    """A small model, a flush every ``FLUSH`` passes: 15 shards per table, 2 epochs, events and metrics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2), nn.Tanh())
    rec = nt.Recorder(run, [nt.OutputNorm(), nt.ParameterNorm()], flush_every=FLUSH, compact=compact)
    rec.attach(model)
    x = torch.randn(5, 3)
    for i in range(PASSES):
        model(x * (1 + i / PASSES))
        rec.push_metric("i", i)
        if i % 20 == 19:
            rec.event("mark")
            rec.tick_epoch()
    if close:
        rec.close()
    return rec


def files(run: Path, table: str) -> list[str]:
    return sorted(p.name for p in (run / table).glob("*.arrow"))


def rows(run: Path, table: str) -> pa.Table:
    """Every row of ``table``, read with pyarrow from the files the format says are live, in order."""
    live, conflicting = schema.live_shards(files(run, table))
    assert not conflicting
    return pa.concat_tables([ipc.open_file(pa.memory_map(str(run / table / n))).read_all() for n in live])


def without_time(t: pa.Table) -> pa.Table:
    return t.drop_columns([c for c in ("time",) if c in t.column_names])


def test_closing_merges_each_table_into_one_file_with_the_same_rows(tmp_path: Path) -> None:
    merged, plain = tmp_path / "merged", tmp_path / "plain"
    record(merged)
    record(plain, compact=False)
    assert len(files(plain, "outputs")) == PASSES // FLUSH  # what the flushes wrote
    for table in ("outputs", "params", "metrics", "events"):
        names = files(merged, table)
        span = schema.shard_span(names[0])
        assert len(names) == 1 and span is not None, (table, names)
        written = files(plain, table)
        assert span == (0, 1, len(written)) or len(written) == 1, (table, span, written)
        assert without_time(rows(merged, table)).equals(without_time(rows(plain, table))), table


def test_compact_false_keeps_the_shards_as_flushed(tmp_path: Path) -> None:
    record(tmp_path / "run", compact=False)
    assert files(tmp_path / "run", "outputs") == [
        schema.shard_name(0, s) for s in range(1, PASSES // FLUSH + 1)
    ]


def test_merged_files_hold_at_most_max_rows(tmp_path: Path) -> None:
    run = tmp_path / "run"
    record(run, compact=False)
    before = rows(run, "outputs")
    per_shard = before.num_rows // (PASSES // FLUSH)
    written = schema.compact(run / "outputs", 0, max_rows=3 * per_shard)
    assert len(written) == 5  # 15 shards, 3 per merged file
    assert [schema.shard_span(p.name) for p in written] == [(0, 1 + 3 * k, 3 + 3 * k) for k in range(5)]
    assert rows(run, "outputs").equals(before)


@pytest.mark.parametrize("state", ["tmp written", "renamed", "half deleted"])
def test_a_merge_interrupted_at_any_step_reads_every_row_once(tmp_path: Path, state: str) -> None:
    """The three states a kill can leave: the merged file still temporary; renamed into place beside the
    shards it holds; some of those deleted. The reader must see each row once in each."""
    run, scratch = tmp_path / "run", tmp_path / "scratch"
    record(run, compact=False)
    expected = na.load(run).outputs.collect()
    shutil.copytree(run / "outputs", scratch)
    (merged,) = schema.compact(scratch, 0)
    folder = run / "outputs"
    if state == "tmp written":
        (folder / f".{merged.name}.tmp").write_bytes(merged.read_bytes()[:1000])
    else:
        shutil.copy(merged, folder / merged.name)
    if state == "half deleted":
        for name in files(run, "outputs")[:7]:
            if name != merged.name:
                (folder / name).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray-file warning: superseded shards are not strays
        got = na.load(run).outputs.collect()
    assert got.equals(expected)


def test_two_names_for_one_span_are_both_left_out_with_a_warning(tmp_path: Path) -> None:
    run = tmp_path / "run"
    record(run, compact=False)
    folder = run / "outputs"
    total = rows(run, "outputs").num_rows
    third = ipc.open_file(pa.memory_map(str(folder / schema.shard_name(0, 3)))).read_all().num_rows
    shutil.copy(folder / schema.shard_name(0, 3), folder / "rank0-3.arrow")  # same rank and sequence
    with pytest.warns(na.StrayFilesWarning, match="rank0-3.arrow"):
        trace = na.load(run)
    assert trace.outputs.select(pl.len()).collect().item() == total - third


def test_the_analysis_gives_the_same_answers_after_compaction(tmp_path: Path) -> None:
    run = tmp_path / "run"
    record(run, compact=False)
    before = na.load(run)
    summary, params = before.epoch_summary(), before.epoch_summary("params")
    assert cli(["compact", str(run)]) == 0
    after = na.load(run)
    assert len(files(run, "outputs")) == 1
    assert after.epoch_summary().equals(summary) and after.epoch_summary("params").equals(params)


def test_normtrace_compact_merges_a_killed_run_and_refuses_a_live_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live = record(tmp_path / "live", close=False)  # an open recorder holds the run's writer lock
    live._writer.wait()  # its flushes written (on a loaded machine the writer lagged: flaky)
    try:
        assert cli(["compact", str(tmp_path / "live")]) == 2
        assert "being written by a live recorder" in capsys.readouterr().err
        assert len(files(tmp_path / "live", "outputs")) > 1  # nothing merged under the writer
    finally:
        live.close()
    assert len(files(tmp_path / "live", "outputs")) == 1  # closing merged it
    killed = tmp_path / "killed"
    record(killed, compact=False)
    (killed / schema.lock_name(0)).write_text("{}")  # a killed writer's lock file, held by nobody
    before = sum(len(files(killed, t)) for t in ("outputs", "params", "metrics", "events"))
    assert cli(["compact", str(killed)]) == 0
    assert f"killed: {before} shard files -> 4 " in capsys.readouterr().out
    assert [len(files(killed, t)) for t in ("outputs", "params", "metrics", "events")] == [1, 1, 1, 1]


def test_groups_fill_up_to_max_rows_and_odd_shards_stay_as_they_are(tmp_path: Path) -> None:
    """Shards of 2, 2, 5, 1, 1 (another schema), 1, 1, 3, 1 rows with ``max_rows=4``: files are filled up
    to exactly 4 rows in order, the 5-row shard (larger than a file) stays alone, and a group holding
    another schema stays as it was, whole."""
    folder = tmp_path / "events"
    folder.mkdir()
    sizes = [2, 2, 5, 1, None, 1, 1, 3, 1]
    tables = {}
    for seq, size in enumerate(sizes, start=1):
        if size is None:
            table = pa.table({"other": [1.5]})
        else:
            table = pa.table({"x": pa.array(range(100 * seq, 100 * seq + size), pa.int64())})
        tables[schema.shard_name(0, seq)] = table
        with (
            pa.OSFile(str(folder / schema.shard_name(0, seq)), "wb") as sink,
            ipc.new_file(sink, table.schema) as w,
        ):
            w.write_table(table)
    written = schema.compact(folder, 0, max_rows=4)
    assert [p.name for p in written] == [schema.merged_name(0, 1, 2), schema.merged_name(0, 8, 9)]
    kept = [schema.shard_name(0, seq) for seq in range(3, 8)]
    assert files(tmp_path, "events") == sorted([p.name for p in written] + kept)
    read = {n: ipc.open_file(pa.memory_map(str(folder / n))).read_all() for n in files(tmp_path, "events")}
    shards = list(tables.values())
    assert read[schema.merged_name(0, 1, 2)].equals(pa.concat_tables(shards[:2]))
    assert read[schema.merged_name(0, 8, 9)].equals(pa.concat_tables(shards[7:]))
    assert all(read[n].equals(tables[n]) for n in kept)


def test_merged_files_merged_again_are_named_for_the_whole_span(tmp_path: Path) -> None:
    """``normtrace compact`` over a run merged with a smaller ``max_rows``: merged files are merged
    again, and the new file's name spans from the first shard of the first to the last of the last."""
    run = tmp_path / "run"
    record(run, compact=False)
    before = rows(run, "outputs")
    per_shard = before.num_rows // (PASSES // FLUSH)
    schema.compact(run / "outputs", 0, max_rows=3 * per_shard)  # 1-3, 4-6, ..., 13-15
    written = schema.compact(run / "outputs", 0, max_rows=6 * per_shard)  # 1-6, 7-12; 13-15 alone
    assert [p.name for p in written] == [schema.merged_name(0, 1, 6), schema.merged_name(0, 7, 12)]
    assert files(run, "outputs") == [p.name for p in written] + [schema.merged_name(0, 13, 15)]
    assert rows(run, "outputs").equals(before)


def test_merged_files_are_compressed_with_zstd(tmp_path: Path) -> None:
    """``compact`` writes zstd (``COMPACT_COMPRESSION``): the merged file of repeated rows is several
    times smaller than the same rows written uncompressed."""
    run = tmp_path / "run"
    rec = nt.Recorder(run, compact=False, flush_every=1)
    for i in range(2000):
        rec.push_metric("constant", 1.0)
        if i % 500 == 499:
            rec.flush()
    rec.close()
    merged = schema.compact(run / "metrics", 0, max_rows=1000)  # one file closed in the loop, one at the end
    assert len(merged) == 2
    for path in merged:
        table = ipc.open_file(pa.memory_map(str(path))).read_all()
        sink = pa.BufferOutputStream()
        with ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        assert table.num_rows == 1000 and path.stat().st_size * 3 < sink.getvalue().size


def test_compact_merges_only_the_given_ranks_shards(tmp_path: Path) -> None:
    folder = tmp_path / "events"
    folder.mkdir()
    for rank in (0, 1):
        for seq in (1, 2):
            table = pa.table({"x": pa.array([rank * 10 + seq], pa.int64())})
            with (
                pa.OSFile(str(folder / schema.shard_name(rank, seq)), "wb") as sink,
                ipc.new_file(sink, table.schema) as w,
            ):
                w.write_table(table)
    written = schema.compact(folder, 0)
    assert [p.name for p in written] == [schema.merged_name(0, 1, 2)]
    assert files(tmp_path, "events") == sorted(
        [schema.merged_name(0, 1, 2), schema.shard_name(1, 1), schema.shard_name(1, 2)]
    )


def shard_spans(run: Path, table: str) -> list[tuple[int, int, int] | None]:
    return [schema.shard_span(n) for n in files(run, table)]


@pytest.mark.parametrize(
    ("every", "merged", "tail", "at_close"),
    [
        # 8 output rows a shard (2 modules x 4 passes). A merge once 24 rows were written since the last:
        # at shards 3 (one group so far: nothing), 6 (1-3), 9 (4-6), 12 (7-9); 10-14 wait
        (24, [(1, 3), (4, 6), (7, 9)], 10, [(1, 3), (4, 6), (7, 9), (10, 12), (13, 15)]),
        # every 16 rows, exactly two shards: at 2 (nothing), 4 (1-2), 6 (3-4), ..., 14 (11-12)
        (
            16,
            [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)],
            13,
            [*((a, a + 1) for a in range(1, 15, 2)), (15, 15)],
        ),
        # every 17 rows: 16 do not reach it, so at 3 (1-2), 6 (3-4), 9 (5-6, 7-8), 12 (9-10); 11-14 wait
        (
            17,
            [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10)],
            11,
            [*((a, a + 1) for a in range(1, 15, 2)), (15, 15)],
        ),
    ],
)
def test_the_writer_merges_as_the_run_goes_and_close_merges_only_the_tail(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    every: int,
    merged: list[tuple[int, int]],
    tail: int,
    at_close: list[tuple[int, int]],
) -> None:
    """The 14 shards flushed before close() are merged as they come, each group once the next is full,
    the rest left to grow; the merged shards stay on disk during the grace period (readers skip them),
    and close() merges the tail: the same files and rows as merging everything at close."""
    from normtrace import writer

    monkeypatch.setattr(schema, "COMPACT_ROWS", every)
    monkeypatch.setattr(writer, "MERGE_GRACE_SECS", 3600.0)
    plain, run = tmp_path / "plain", tmp_path / "run"
    record(plain, compact=False)
    rec = record(run, close=False)
    rec._writer.wait()
    names = [schema.merged_name(0, a, b) for a, b in merged]
    assert files(run, "outputs") == sorted(names + [schema.shard_name(0, s) for s in range(1, 15)])
    assert schema.live_shards(files(run, "outputs"))[0] == names + [
        schema.shard_name(0, s) for s in range(tail, 15)
    ]
    for table in schema.TABLES:  # read mid-run: every row once, in order (the 15th shard comes at close)
        if files(plain, table):
            got = without_time(rows(run, table))
            assert got.equals(without_time(rows(plain, table)).slice(0, got.num_rows)), table
    rec.close()
    schema.compact(plain / "outputs", 0, max_rows=every)
    assert files(run, "outputs") == files(plain, "outputs")
    assert shard_spans(run, "outputs") == [(0, a, b) for a, b in at_close]
    for table in schema.TABLES:
        if files(plain, table):
            assert without_time(rows(run, table)).equals(without_time(rows(plain, table))), table


def test_shards_merged_as_the_run_goes_are_deleted_after_the_grace_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from normtrace import writer

    monkeypatch.setattr(schema, "COMPACT_ROWS", 24)
    monkeypatch.setattr(writer, "MERGE_GRACE_SECS", 0.0)
    run = tmp_path / "run"
    rec = record(run, close=False)
    try:
        rec.flush()  # one more job, after the last merge: the writer deletes what it merged
        rec._writer.wait()
        assert shard_spans(run, "outputs")[:3] == [(0, 1, 3), (0, 4, 6), (0, 7, 9)]
        assert files(run, "outputs") == schema.live_shards(files(run, "outputs"))[0]
    finally:
        rec.close()


def test_no_merging_as_the_run_goes_with_compact_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema, "COMPACT_ROWS", 24)
    record(tmp_path / "run", compact=False)
    assert files(tmp_path / "run", "outputs") == [schema.shard_name(0, s) for s in range(1, 16)]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("merge bug")])
def test_a_merge_failing_as_the_run_goes_is_logged_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: Exception
) -> None:
    """A full disk or a bug in a merge while the run goes on is logged, never raised into training; every
    row stays in its shard and close() merges them."""
    monkeypatch.setattr(schema, "COMPACT_ROWS", 24)
    real = schema.compact

    def full(folder: Path, rank: int, **kwargs: object) -> list[Path]:
        if kwargs.get("last") is False:
            raise error
        return real(folder, rank, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(schema, "compact", full)
    plain, run = tmp_path / "plain", tmp_path / "run"
    record(plain, compact=False)
    with caplog.at_level("WARNING", logger="normtrace"):
        record(run)  # close() would raise a WriterError had the writer kept the error
    assert f"normtrace: could not merge the shards of {run / 'outputs'} (they stay as written): {error}" in [
        r.getMessage() for r in caplog.records if r.name == "normtrace"
    ]
    assert without_time(rows(run, "outputs")).equals(without_time(rows(plain, "outputs")))
    assert shard_spans(run, "outputs") == [(0, a, a + 2) for a in range(1, 16, 3)]  # close() merged them


def test_compact_counts_rows_without_count_rows_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a pyarrow whose file reader lacks ``count_rows``, groups are the same (rows read instead)."""
    run = tmp_path / "run"
    record(run, compact=False)
    before = rows(run, "outputs")
    per_shard = before.num_rows // (PASSES // FLUSH)

    class OldReader:
        def __init__(self, source: object, options: ipc.IpcReadOptions | None = None) -> None:
            self._reader = ipc.RecordBatchFileReader(source, options=options)

        def read_all(self) -> pa.Table:
            return self._reader.read_all()

    monkeypatch.setattr(schema.ipc, "open_file", OldReader)
    written = schema.compact(run / "outputs", 0, max_rows=3 * per_shard)
    assert [schema.shard_span(p.name) for p in written] == [(0, 1 + 3 * k, 3 + 3 * k) for k in range(5)]
    monkeypatch.undo()
    assert rows(run, "outputs").equals(before)


def test_normtrace_compact_deletes_shards_a_killed_writer_merged_but_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A writer killed within the grace period leaves shards beside the merged file holding them: readers
    read each row once, and ``normtrace compact`` merges the rest and deletes them."""
    from normtrace import writer

    monkeypatch.setattr(schema, "COMPACT_ROWS", 24)
    monkeypatch.setattr(writer, "MERGE_GRACE_SECS", 3600.0)
    plain, run = tmp_path / "plain", tmp_path / "run"
    record(plain, compact=False)
    rec = record(run, close=False)
    rec._writer.wait()
    killed = tmp_path / "killed"
    shutil.copytree(run, killed)  # the run as a SIGKILL would leave it now
    rec.close()
    (killed / schema.lock_name(0)).unlink(missing_ok=True)
    assert len(files(killed, "outputs")) == 3 + 14
    expected = without_time(rows(plain, "outputs")).slice(0, 14 * 8)
    assert without_time(rows(killed, "outputs")).equals(expected)
    assert cli(["compact", "--max-rows", "24", str(killed)]) == 0
    assert shard_spans(killed, "outputs") == [(0, 1, 3), (0, 4, 6), (0, 7, 9), (0, 10, 12), (0, 13, 14)]
    assert without_time(rows(killed, "outputs")).equals(expected)


@pytest.mark.skipif(
    not hasattr(ipc.RecordBatchFileReader, "count_rows"),
    reason="this pyarrow has no RecordBatchFileReader.count_rows: compact reads files to count their rows",
)
def test_compact_counts_files_it_leaves_alone_without_reading_their_rows(tmp_path: Path) -> None:
    """A merged file that stays alone is counted from its batch headers, not read: a second compact with
    the same ``max_rows`` merges nothing and never touches the rows of the files made by the first (here,
    damaged so that reading them fails)."""
    run = tmp_path / "run"
    record(run, compact=False)
    per_shard = rows(run, "outputs").num_rows // (PASSES // FLUSH)
    first = schema.compact(run / "outputs", 0, max_rows=3 * per_shard)
    for path in first:
        damage_body(path, keep_row_counts=True)
    assert schema.compact(run / "outputs", 0, max_rows=3 * per_shard) == []
    assert files(run, "outputs") == sorted(p.name for p in first)


def test_closing_a_run_with_tables_it_never_wrote_logs_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The merge at close goes over every table; one without a folder (this run has no signals) is not
    an error to log."""
    with caplog.at_level("WARNING", logger="normtrace"):
        record(tmp_path / "run")
    assert not (tmp_path / "run" / "signals").exists()
    assert [r.getMessage() for r in caplog.records if r.name == "normtrace"] == []


def test_merged_shards_the_disk_will_not_delete_are_logged_and_read_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Deleting the shards a merge holds failing (a read-only folder) costs nothing but disk: logged per
    table, close() returns, and readers read every row once (they skip the covered shards)."""
    from normtrace import writer

    monkeypatch.setattr(schema, "COMPACT_ROWS", 24)
    monkeypatch.setattr(writer, "MERGE_GRACE_SECS", 0.0)

    def refused(folder: Path, rank: int) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(schema, "drop_covered", refused)
    plain, run = tmp_path / "plain", tmp_path / "run"
    record(plain, compact=False)
    with caplog.at_level("WARNING", logger="normtrace"):
        record(run)
    logged = [r.getMessage() for r in caplog.records if r.name == "normtrace"]
    assert (
        f"normtrace: could not delete merged shards of {run / 'outputs'}: [Errno 13] Permission denied"
        in logged
    )
    assert len(files(run, "outputs")) > len(schema.live_shards(files(run, "outputs"))[0])  # left behind
    assert without_time(rows(run, "outputs")).equals(without_time(rows(plain, "outputs")))
