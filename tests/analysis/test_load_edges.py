"""Loading's edges: hive-like folder names, half-stated normalisation, shards opened by memory map, and the
path each error names."""

from __future__ import annotations

import json
from pathlib import Path

import normtrace_analysis as na
import numpy as np
import pyarrow as pa
import pytest
from normtrace_analysis import trace as trace_module
from tracegen import every_pass, write_trace


def _outputs() -> dict[str, np.ndarray]:
    return every_pass(40, ("m",), epoch_len=10)  # norm = 10 * pass + 1, numel 4


def test_a_folder_named_like_a_hive_partition_adds_no_column(tmp_path: Path) -> None:
    """A sweep's run folders are often named ``lr=0.1``: that must not become a column (Polars reads
    ``key=value`` folders as partitions unless told not to)."""
    run = write_trace(tmp_path / "lr=0.1" / "seed=3", outputs=_outputs())
    frame = na.load(run).outputs.collect()
    assert "lr" not in frame.columns and "seed" not in frame.columns
    assert frame["run"].unique().to_list() == ["seed=3"]
    assert frame["norm"].to_list() == _outputs()["norm"].tolist()


@pytest.mark.parametrize(
    ("stated", "outputs_rms", "params_rms"),
    [({"outputs": True}, True, False), ({"params": True}, False, True), ("yes", False, False), (None, False, False)],
)  # fmt: skip
def test_normalisation_not_stated_for_a_table_is_the_raw_norm(
    tmp_path: Path, stated: object, outputs_rms: bool, params_rms: bool
) -> None:
    run = write_trace(
        tmp_path / "r",
        outputs=_outputs(),
        params={"epoch": [0], "pass": [3], "module": ["m"], "param": ["weight"], "norm": [6.0], "numel": [9]},
    )
    meta = json.loads((run / "meta.json").read_text())
    meta["normalize"] = stated
    (run / "meta.json").write_text(json.dumps(meta))
    trace = na.load(run)
    assert trace.normalize["r"] == {"outputs": outputs_rms, "params": params_rms}
    out = trace.outputs.collect()["value"].to_list()
    assert out == [(10.0 * p + 1.0) / (2.0 if outputs_rms else 1.0) for p in range(40)]  # sqrt(numel 4) = 2
    assert trace.params.collect()["value"].item() == (2.0 if params_rms else 6.0)  # sqrt(numel 9) = 3


def test_shards_above_the_small_size_are_opened_by_memory_map(tmp_path: Path, monkeypatch) -> None:
    run = write_trace(tmp_path / "r", outputs=_outputs(), shards=2)
    monkeypatch.setattr(trace_module, "_SMALL_SHARD", 0)  # every shard is "large"
    assert na.load(run).outputs.collect()["norm"].to_list() == _outputs()["norm"].tolist()
    shard = sorted((run / "outputs").glob("*.arrow"))[1]
    shard.write_bytes(shard.read_bytes()[:-20])  # the footer cut short
    with pytest.raises(na.CorruptShardError) as err:
        na.load(run)
    assert err.value.path == shard and str(err.value).startswith(f"corrupt or truncated shard {shard}: ")


def test_on_error_must_be_raise_or_skip() -> None:
    with pytest.raises(ValueError) as err:
        na.load("anywhere", on_error="ignore")  # type: ignore[arg-type]
    assert str(err.value) == "on_error must be 'raise' or 'skip', not 'ignore'"


def test_every_load_error_names_the_file_or_folder_at_fault(tmp_path: Path) -> None:
    run = write_trace(tmp_path / "r", outputs=_outputs())
    meta = run / "meta.json"

    meta.write_text("{not json")
    with pytest.raises(na.MetaError) as err:
        na.load(run)
    assert err.value.path == meta and str(err.value).startswith(f"cannot read run metadata {meta}: ")

    meta.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(na.MetaError) as err:
        na.load(run)
    assert err.value.path == meta and str(err.value) == f"cannot read run metadata {meta}: nested too deeply"

    meta.write_text(json.dumps({"schema_version": "2"}))
    with pytest.raises(na.MetaError) as err:
        na.load(run)
    assert err.value.path == meta and "no integer 'schema_version'" in str(err.value)

    meta.write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(na.SchemaVersionError) as err:
        na.load(run)
    assert err.value.path == meta and str(err.value).endswith(
        "newer than the 2 this normtrace_analysis understands: upgrade normtrace-analysis"
    )

    meta.unlink()
    with pytest.raises(na.MetaError) as err:
        na.load(run)
    assert err.value.path == meta and str(err.value) == f"{run} is not a normtrace run: no meta.json"

    holder = tmp_path / "sweep"
    for i in range(7):
        write_trace(holder / f"run{i}", outputs=_outputs())
    with pytest.raises(na.MetaError) as err:
        na.load(holder)
    assert str(err.value) == (
        f"{holder} is not a normtrace run: no meta.json (it holds runs "
        f"{[f'run{i}' for i in range(5)]}: pass '{holder}/*' to load them)"
    )


def test_an_empty_run_is_named_with_the_tables_searched(tmp_path: Path) -> None:
    run = write_trace(tmp_path / "r", outputs=_outputs())
    for shard in (run / "outputs").glob("*.arrow"):
        shard.unlink()
    with pytest.raises(na.EmptyRunError) as err:
        na.load(run)
    assert err.value.path == run
    assert (
        str(err.value) == f"run {run} has no shards in any of outputs/, params/, metrics/, events/, signals/"
    )


def test_a_shard_with_a_missing_or_mistyped_column_names_the_column(tmp_path: Path) -> None:
    run = write_trace(tmp_path / "r", outputs=_outputs(), shards=1)
    shard = next((run / "outputs").glob("*.arrow"))
    good = pa.ipc.open_file(str(shard)).read_all()
    at = good.schema.get_field_index("numel")
    for table, why in (
        (good.set_column(at, "numel", good["numel"].cast(pa.float64())),
         f"shard {shard}: column 'numel' is Float64, the trace format says Int64"),
        (good.drop_columns(["numel"]), f"shard {shard} lacks the required outputs column 'numel'"),
    ):  # fmt: skip
        with pa.ipc.new_file(str(shard), table.schema) as writer:
            writer.write_table(table)
        with pytest.raises(na.CorruptShardError) as err:
            na.load(run)
        assert err.value.path == shard and str(err.value) == why


def test_run_paths_that_do_not_exist_are_named_as_given(tmp_path: Path) -> None:
    with pytest.raises(na.RunNotFoundError) as err:
        na.load([])
    assert str(err.value) == "no run directory given" and err.value.path is None
    missing = str(tmp_path / "nope")
    with pytest.raises(na.RunNotFoundError) as err:
        na.load(missing)
    assert str(err.value) == f"run directory not found: {missing}" and str(err.value.path) == missing
    pattern = str(tmp_path / "runs-*")
    with pytest.raises(na.RunNotFoundError) as err:
        na.load(pattern)
    assert str(err.value) == f"no run directory matches {pattern!r}" and str(err.value.path) == pattern


def test_load_warnings_point_at_the_callers_line_and_list_every_file(tmp_path: Path) -> None:
    run = write_trace(tmp_path / "r", outputs=_outputs(), shards=3)
    bad = sorted((run / "outputs").glob("*.arrow"))[:2]
    for shard in bad:
        shard.write_bytes(b"not arrow")
    (run / "outputs" / "copy.arrow").write_bytes(b"")
    with pytest.warns(Warning) as caught:
        na.load(run, on_error="skip")
    by_kind = {type(w.message): w for w in caught}
    skipped = by_kind[na.SkippedShardsWarning]
    assert str(skipped.message) == f"skipped 2 unreadable shard(s):\n  {bad[0]}\n  {bad[1]}"
    stray = by_kind[na.StrayFilesWarning]
    assert str(stray.message).endswith(f":\n  {run / 'outputs' / 'copy.arrow'}")
    assert skipped.filename == stray.filename == __file__  # this test's line, not the library's


def test_a_run_whose_every_shard_is_unreadable_says_so(tmp_path: Path) -> None:
    run = write_trace(tmp_path / "r", outputs=_outputs(), shards=2)
    for shard in (run / "outputs").glob("*.arrow"):
        shard.write_bytes(b"not arrow")
    with pytest.raises(na.EmptyRunError) as err:  # raised before any warning is issued
        na.load(run, on_error="skip")
    assert str(err.value) == (
        f"run {run} has no shards in any of outputs/, params/, metrics/, events/, signals/"
        " (every shard was unreadable and skipped)"
    )


def test_runs_with_different_columns_load_together(tmp_path: Path) -> None:
    wide = _outputs()
    wide["note"] = np.arange(40)
    trace = na.load(
        [write_trace(tmp_path / "plain", outputs=_outputs()), write_trace(tmp_path / "wide", outputs=wide)]
    )
    frame = trace.outputs.collect()
    assert frame.height == 80 and frame["note"].null_count() == 40
