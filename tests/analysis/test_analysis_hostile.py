"""Loading what the real world leaves in run folders: sweep names that look like globs, copies of shards,
shards whose body (not footer) is damaged, metadata built to break a parser. Nothing is read from the wrong
run, nothing is counted twice, and every failure names the file at fault."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import normtrace_analysis as na
import numpy as np
import pyarrow as pa
import pytest
from damage import damage_body
from normtrace_analysis.cli import main
from tracegen import write_trace


def _outputs(value: float, n_pass: int = 40) -> dict:
    """One module; every norm equals ``value``, so rows read from another run are told apart at once."""
    return {
        "pass": np.arange(n_pass),
        "epoch": (np.arange(n_pass) // 10).astype(np.int32),
        "module": np.array(["m"] * n_pass),
        "norm": np.full(n_pass, value, dtype=np.float32),
    }


@pytest.mark.parametrize(
    ("name", "neighbours"),
    [("lr[0.1]", ["lr0", "lr1", "lr.", "lr[0.1]x"]), ("a*b", ["aXb", "ab"]), ("q?z", ["qXz", "q"])],
)
def test_a_run_named_like_a_glob_reads_only_its_own_shards(
    tmp_path: Path, name: str, neighbours: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    for i, other in enumerate(neighbours):
        write_trace(tmp_path / other, outputs=_outputs(100.0 + i), shards=2)
    run = write_trace(tmp_path / name, outputs=_outputs(7.0), shards=3)
    trace = na.load(run)
    df = trace.outputs.collect()
    assert df.height == 40 and set(df["norm"].to_list()) == {7.0}
    summary = trace.epoch_summary("outputs")
    assert summary["count"].to_list() == [10, 10, 10, 10] and set(summary["mean"].to_list()) == {7.0}
    assert main(["summary", str(run), "--csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 1 + 4 and all(",7.0," in r for r in rows[1:]), rows


def test_copies_and_exports_in_a_table_folder_are_left_out_loudly(tmp_path: Path) -> None:
    run = write_trace(tmp_path / "r", outputs=_outputs(3.0), shards=2)
    folder = run / "outputs"
    first = folder / "rank0-000001.arrow"
    (folder / "rank0-000001 copy.arrow").write_bytes(first.read_bytes())  # a file manager's copy
    (folder / "exported.arrow").write_bytes(first.read_bytes())  # `normtrace export ... -o RUN/outputs/`
    with pytest.warns(na.StrayFilesWarning, match=r"rank0-000001 copy\.arrow") as record:
        df = na.load(run).outputs.collect()
    assert "exported.arrow" in str(record[0].message)
    assert df.height == 40  # each row once


def test_two_names_for_one_shard_are_both_left_out(tmp_path: Path) -> None:
    run = write_trace(tmp_path / "r", outputs=_outputs(3.0), shards=2)
    folder = run / "outputs"
    (folder / "rank0-1.arrow").write_bytes((folder / "rank0-000001.arrow").read_bytes())
    with pytest.warns(na.StrayFilesWarning, match=r"rank0-1\.arrow") as record:
        trace = na.load(run)
    assert "rank0-000001.arrow" in str(record[0].message)
    assert [p.name for p in trace.shards("outputs")] == ["rank0-000002.arrow"]


@pytest.fixture
def damaged_run(tmp_path: Path) -> tuple[Path, Path]:
    n = 3000
    rng = np.random.default_rng(0)
    run = write_trace(
        tmp_path / "r",
        outputs={
            "pass": np.arange(n),
            "epoch": (np.arange(n) // 100).astype(np.int32),
            "module": np.array(["m"] * n),
            "norm": rng.random(n).astype(np.float32),
        },
        shards=3,
    )
    shard = run / "outputs" / "rank0-000002.arrow"
    damage_body(shard)
    return run, shard


def test_a_damaged_shard_body_is_named_when_first_read(damaged_run: tuple[Path, Path]) -> None:
    run, shard = damaged_run
    trace = na.load(run)  # lazy: only footers are read
    for analysis in (
        lambda: trace.epoch_summary("outputs"),
        lambda: trace.spikes("outputs"),
        lambda: na.report(trace, run.parent / "report.html"),
    ):
        with pytest.raises(na.CorruptShardError, match=r"rank0-000002\.arrow.*on_error='skip'") as err:
            analysis()
        assert err.value.path == shard


def test_a_shard_gone_since_loading_is_named_and_told_apart_from_a_damaged_one(tmp_path: Path) -> None:
    """A live run's writer merges its shards and deletes them a minute later: a trace loaded before that
    and read after names the shard as gone and says to load again (not "corrupt ... skip it")."""
    run = write_trace(tmp_path / "r", outputs=_outputs(7.0), shards=3)
    trace = na.load(run)
    shard = run / "outputs" / "rank0-000002.arrow"
    shard.unlink()
    with pytest.raises(na.CorruptShardError, match="is gone since the trace was loaded") as err:
        trace.epoch_summary("outputs")
    assert err.value.path == shard and "load the trace again" in str(err.value)
    assert "corrupt" not in str(err.value)
    assert na.load(run).outputs.collect()["norm"].to_list() == [7.0] * (40 - 40 // 3)  # what is left reads


def test_a_damaged_shard_is_named_with_the_readers_own_reason(damaged_run: tuple[Path, Path]) -> None:
    run, shard = damaged_run
    with pytest.raises((OSError, pa.ArrowException)) as direct:  # what pyarrow itself says of the shard
        pa.ipc.open_file(pa.py_buffer(shard.read_bytes())).read_all()
    with pytest.raises(na.CorruptShardError) as err:
        na.load(run).epoch_summary("outputs")
    assert str(err.value) == (
        f"corrupt shard {shard}: {direct.value}; load with on_error='skip' (CLI: --skip-corrupt) to leave it out"
    )


def test_a_damaged_shard_body_is_skipped_when_asked(damaged_run: tuple[Path, Path]) -> None:
    run, shard = damaged_run
    with pytest.warns(na.SkippedShardsWarning, match=shard.name):
        trace = na.load(run, on_error="skip")
    assert trace.skipped == [shard]
    summary = trace.epoch_summary("outputs")
    assert summary["count"].sum() == 2000  # the two intact shards' rows, each once


def test_the_cli_names_a_damaged_shard_and_skips_it_when_asked(
    damaged_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, shard = damaged_run
    assert main(["summary", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(shard) in err and "--skip-corrupt" in err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", na.SkippedShardsWarning)
        assert main(["summary", str(run), "--csv", "--skip-corrupt"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1 + 20  # the 20 epochs of the intact shards


def test_deeply_nested_metadata_is_a_meta_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_trace(tmp_path / "r", outputs=_outputs(1.0))
    (run / "meta.json").write_text('{"schema_version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(na.MetaError, match=r"meta\.json.*nested"):
        na.load(run)
    assert main(["summary", str(run)]) == 2
    assert "meta.json" in capsys.readouterr().err


def test_metadata_that_is_not_an_object_is_a_meta_error(tmp_path: Path) -> None:
    run = write_trace(tmp_path / "r", outputs=_outputs(1.0))
    (run / "meta.json").write_text(json.dumps([1, 2, 3]))
    with pytest.raises(na.MetaError, match=r"schema_version"):
        na.load(run)
