"""Loading: lazy frames with the documented and derived columns, multi-run/rank loads, filters, bad input."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import normtrace_analysis as na
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from normtrace_analysis.schema import REQUIRED_COLUMNS
from tracegen import SCHEMA_VERSION, SCHEMAS, every_pass, synthetic_dqn, write_trace


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A small one-rank run with all four tables, outputs in three shards."""
    return write_trace(
        tmp_path / "cartpole",
        outputs=every_pass(grad_every=2),
        params={
            "epoch": [0, 0, 1, 1],
            "pass": [3, 3, 7, 7],
            "module": ["a", "a", "a", "a"],
            "param": ["weight", "bias", "weight", "bias"],
            "norm": [3.0, 1.0, 4.0, 2.0],
            "numel": [9, 1, 9, 1],
        },
        metrics={"epoch": [0, 1], "pass": [3, 7], "name": ["loss", "loss"], "value": [0.5, 0.25]},
        events={"epoch": [1, 2], "pass": [3, 7], "name": ["target_update", "target_update"]},
    )


def test_tables_are_lazy_with_documented_and_derived_columns(run: Path) -> None:
    trace = na.load(run)
    for table, required in REQUIRED_COLUMNS.items():
        lf = trace.table(table)
        assert isinstance(lf, pl.LazyFrame)
        schema = lf.collect_schema()
        for col, dtype in required.items():
            assert schema[col] == dtype, (table, col)
        assert schema["run"] == pl.String
    assert trace.outputs.collect_schema()["value"] == pl.Float64
    assert trace.params.collect_schema()["value"] == pl.Float64
    assert trace.outputs.collect_schema()["split"] == pl.String
    assert trace.runs == ["cartpole"]
    assert trace.meta["run_name"] == "cartpole" and trace.metas == {"cartpole": trace.meta}
    assert len(trace.shards("outputs")) == 3


def test_rows_round_trip_and_split_follows_grad_enabled(run: Path) -> None:
    src = every_pass(grad_every=2)
    df = na.load(run).outputs.sort("pass", "module").collect()
    np.testing.assert_array_equal(df["norm"].to_numpy(), src["norm"])
    np.testing.assert_array_equal(df["pass"].to_numpy(), src["pass"])
    assert df["run"].unique().to_list() == ["cartpole"]
    expected_split = np.where(src["grad_enabled"], "train", "no_grad")
    assert df["split"].to_list() == expected_split.tolist()


@pytest.mark.parametrize(
    ("normalize", "meta_norm", "rms"),
    [(None, True, True), (None, False, False), (False, True, False), (True, False, True)],
)
def test_value_is_raw_or_rms_view(tmp_path: Path, normalize, meta_norm: bool, rms: bool) -> None:
    src = every_pass()
    run = write_trace(tmp_path / "r", outputs=src, normalize=meta_norm)
    df = na.load(run, normalize=normalize).outputs.sort("pass", "module").collect()
    expected = src["norm"].astype(np.float64) / (np.sqrt(src["numel"]) if rms else 1.0)
    np.testing.assert_allclose(df["value"].to_numpy(), expected, rtol=1e-15)
    np.testing.assert_array_equal(df["norm"].to_numpy(), src["norm"])  # the raw column is untouched
    assert na.load(run, normalize=normalize).normalize["r"]["outputs"] is rms


def test_params_value_normalized_by_param_numel(run: Path) -> None:
    df = na.load(run, normalize=True).params.sort("epoch", "param").collect()
    np.testing.assert_allclose(df["value"].to_list(), [1.0, 1.0, 2.0, 4.0 / 3.0])


def test_multi_run_list_glob_and_name_collisions(tmp_path: Path) -> None:
    for parent, n in (("x", 4), ("y", 6)):
        write_trace(tmp_path / parent / "seed", outputs=every_pass(n_pass=n))
    write_trace(tmp_path / "x" / "other", outputs=every_pass(n_pass=2))
    trace = na.load([tmp_path / "x" / "seed", tmp_path / "y" / "seed"])
    assert trace.runs == ["seed", "seed#2"]
    counts = dict(trace.outputs.group_by("run").len().collect().iter_rows())
    assert counts == {"seed": 8, "seed#2": 12}
    globbed = na.load(str(tmp_path / "x" / "*"))
    assert sorted(globbed.runs) == ["other", "seed"]
    assert globbed.filter(runs="other").outputs.collect().height == 4
    # The same run named twice is loaded once.
    assert na.load([tmp_path / "x" / "seed", str(tmp_path / "x" / "seed")]).runs == ["seed"]


def test_ranks_and_rank_metadata(tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    write_trace(run, outputs=every_pass(), rank=0)
    write_trace(run, outputs=every_pass(), rank=1, meta={"world_size": 2})
    trace = na.load(run)
    assert sorted(trace.rank_metas["ddp"]) == [0, 1]
    assert trace.meta["rank"] == 0
    assert sorted(trace.outputs.select("rank").unique().collect()["rank"].to_list()) == [0, 1]
    assert trace.filter(ranks=1).outputs.collect()["rank"].unique().to_list() == [1]
    assert trace.filter(ranks=[0, 1]).outputs.collect().height == 2 * 24


def test_filters(run: Path) -> None:
    trace = na.load(run)
    src = every_pass(grad_every=2)

    def count(t: na.Trace) -> int:
        return t.outputs.collect().height

    assert count(trace.filter(modules=["a"])) == int((src["module"] == "a").sum())
    assert count(trace.filter(modules=r"^b\.")) == int((src["module"] == "b.0").sum())
    assert count(trace.filter(split="no_grad")) == int((~src["grad_enabled"]).sum())
    assert count(trace.filter(epochs=(1, 2))) == int(((src["epoch"] >= 1) & (src["epoch"] <= 2)).sum())
    assert count(trace.filter(passes=(None, 4))) == int((src["pass"] <= 4).sum())
    assert count(trace.filter(epochs=1)) == int((src["epoch"] == 1).sum())
    # Filters chain (logical and) and leave the original Trace untouched.
    narrow = trace.filter(modules=["a", "b.0"]).filter(modules="0$", epochs=(0, 1)).filter(epochs=(1, None))
    expected = (src["module"] == "b.0") & (src["epoch"] == 1)
    assert count(narrow) == int(expected.sum())
    assert count(trace) == len(src["pass"])
    # Module/split filters leave the other tables alone; epoch filters apply to all of them.
    only_b = trace.filter(modules=["b.0"])  # b.0 has outputs but no params; events stay whole
    assert only_b.events.collect().height == 2 and only_b.params.collect().height == 0
    assert trace.filter(epochs=(2, 2)).events.collect()["pass"].to_list() == [7]
    assert trace.filter(modules=["a"]).params.collect().height == 4
    with pytest.raises(ValueError, match="split"):
        trace.filter(split="val")
    with pytest.raises(ValueError, match="unknown run"):
        trace.filter(runs="nope")


def test_tmp_files_and_extra_columns_are_tolerated(tmp_path: Path) -> None:
    src = every_pass()
    run = write_trace(
        tmp_path / "r", outputs={**src, "device": np.array(["cpu"] * len(src["pass"]))}, shards=2
    )
    write_trace(run, outputs=src, shards=1)  # a later shard without the extra column
    (run / "outputs" / ".rank0-000009.arrow.tmp").write_bytes(b"half a file")
    df = na.load(run).outputs.collect()
    assert df.height == 2 * len(src["pass"])
    assert df["device"].null_count() == len(src["pass"])


def test_table_without_shards_is_empty_with_schema(run: Path, tmp_path: Path) -> None:
    only_outputs = write_trace(tmp_path / "o", outputs=every_pass())
    trace = na.load(only_outputs)
    params = trace.params.collect()
    assert params.height == 0
    assert params.schema["module"] == pl.String and params.schema["value"] == pl.Float64
    with pytest.raises(na.MissingTableError, match=r"params") as err:
        trace.epoch_summary("params")
    assert err.value.path == only_outputs / "params"


def test_missing_directory_and_unmatched_glob(tmp_path: Path) -> None:
    with pytest.raises(na.RunNotFoundError, match="nope"):
        na.load(tmp_path / "nope")
    with pytest.raises(na.RunNotFoundError, match=r"runs-\*"):
        na.load(str(tmp_path / "runs-*"))
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for generic handlers
        na.load(tmp_path / "nope")


def test_missing_meta_points_at_nested_runs(tmp_path: Path) -> None:
    write_trace(tmp_path / "runs" / "a", outputs=every_pass())
    with pytest.raises(na.MetaError, match=r"meta\.json.*runs/\*"):
        na.load(tmp_path / "runs")
    bad = write_trace(tmp_path / "bad", outputs=every_pass())
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(na.MetaError, match=str(bad / "meta.json")):
        na.load(bad)


def test_empty_run(tmp_path: Path) -> None:
    run = write_trace(tmp_path / "empty")
    (run / "outputs").mkdir()
    with pytest.raises(na.EmptyRunError, match=str(run)):
        na.load(run)


def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    run = write_trace(
        tmp_path / "future", outputs=every_pass(), meta={"schema_version": na.SCHEMA_VERSION + 1}
    )
    with pytest.raises(na.SchemaVersionError, match=rf"meta\.json.*version {na.SCHEMA_VERSION + 1}"):
        na.load(run)
    ok = write_trace(tmp_path / "rank1future", outputs=every_pass())
    write_trace(ok, outputs=every_pass(), rank=1, meta={"schema_version": 99})
    with pytest.raises(na.SchemaVersionError, match=r"meta\.rank1\.json"):
        na.load(ok)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_shard_raises_or_is_skipped(tmp_path: Path, damage: str) -> None:
    src = every_pass(n_pass=30)
    run = write_trace(tmp_path / "r", outputs=src, shards=3)
    shard = sorted((run / "outputs").glob("*.arrow"))[1]
    data = shard.read_bytes()
    shard.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"x" * 100, "empty": b""}[damage])
    with pytest.raises(na.CorruptShardError, match=shard.name) as err:
        na.load(run)
    assert err.value.path == shard
    with pytest.warns(na.SkippedShardsWarning, match=shard.name):
        trace = na.load(run, on_error="skip")
    assert trace.skipped == [shard]
    intact = [p for p in sorted((run / "outputs").glob("*.arrow")) if p != shard]
    expected_rows = sum(pa.ipc.open_file(str(p)).read_all().num_rows for p in intact)
    assert trace.outputs.collect().height == expected_rows > 0


def test_shard_with_wrong_columns_is_corrupt(tmp_path: Path) -> None:
    run = write_trace(tmp_path / "r", outputs=every_pass(), shards=1)
    table = pa.table(
        {"pass": pa.array([0], pa.int64()), "module": ["a"], "norm": pa.array([1.0], pa.float64())}
    )
    with pa.ipc.new_file(str(run / "outputs" / "rank0-000002.arrow"), table.schema) as w:
        w.write_table(table)
    with pytest.raises(na.CorruptShardError, match=r"rank0-000002\.arrow.*(epoch|norm)"):
        na.load(run)


def test_all_shards_skipped_is_an_empty_run(tmp_path: Path) -> None:
    run = write_trace(tmp_path / "r", outputs=every_pass(), shards=1)
    next((run / "outputs").glob("*.arrow")).write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", na.SkippedShardsWarning)
        with pytest.raises(na.EmptyRunError, match="skipped"):
            na.load(run, on_error="skip")


def test_tracegen_writes_the_documented_layout(tmp_path: Path) -> None:
    syn = synthetic_dqn(n_epochs=4, passes_per_epoch=5, target_every=3)
    run = write_trace(tmp_path / "g", outputs=syn.outputs, events=syn.events, shards=2)
    names = sorted(p.name for p in (run / "outputs").iterdir())
    assert names == ["rank0-000001.arrow", "rank0-000002.arrow"]
    for table in ("outputs", "events"):
        reader = pa.ipc.open_file(str(run / table / "rank0-000001.arrow"))
        assert reader.schema.equals(SCHEMAS[table])
        assert reader.get_batch(0).num_rows > 0
    assert json.loads((run / "meta.json").read_text())["schema_version"] == SCHEMA_VERSION == 2


@pytest.mark.parametrize(
    ("filters", "named", "holds"),
    [
        ({"modules": "rleu"}, "modules='rleu'", "modules: a, b.0"),
        ({"modules": ["relu"]}, "modules=['relu']", "modules: a, b.0"),
        ({"epochs": (100, 200)}, "epochs=(100, 200)", "epochs 0..2"),
        ({"epochs": 7}, "epochs=7", "epochs 0..2"),
        ({"passes": (50, None)}, "passes=(50, None)", "passes 0..11"),
    ],
)
def test_a_filter_that_selects_nothing_says_what_the_trace_holds(
    run: Path, filters: dict, named: str, holds: str
) -> None:
    with pytest.raises(na.EmptySelectionError, match=re.escape(named)) as err:
        na.load(run).filter(**filters)
    assert holds in str(err.value)
    assert isinstance(err.value, ValueError)  # also a ValueError for generic handlers


def test_filters_that_select_rows_in_some_table_are_fine(run: Path) -> None:
    trace = na.load(run)
    assert trace.filter(modules="^a$").outputs.collect()["module"].unique().to_list() == ["a"]
    assert trace.filter(epochs=(2, 9)).outputs.collect()["epoch"].unique().to_list() == [2]
    with pytest.raises(na.EmptySelectionError):  # each filter fine alone, nothing together
        trace.filter(modules="^b").filter(split="no_grad", passes=0)  # pass 0 is a grad pass


def test_a_pattern_polars_cannot_compile_is_named(run: Path) -> None:
    for pattern, why in (("(", "unclosed group"), ("(?=a)", "look-around")):
        with pytest.raises(ValueError, match=re.escape(f"modules={pattern!r}") + f".*{why}"):
            na.load(run).filter(modules=pattern)
