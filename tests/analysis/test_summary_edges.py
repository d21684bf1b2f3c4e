"""``summary.epoch_summary`` called as a function with its defaults, against numpy (issue 17)."""

from __future__ import annotations

import warnings
from pathlib import Path

import normtrace_analysis as na
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from normtrace_analysis.summary import epoch_summary
from tracegen import _to_table, write_trace


def test_the_default_table_is_outputs(tmp_path: Path) -> None:
    values = np.random.default_rng(3).lognormal(size=30)
    outputs = {
        "pass": np.arange(30),
        "epoch": (np.arange(30) // 10).astype(np.int32),
        "module": ["m"] * 30,
        "norm": values.astype(np.float32),
    }
    params = {
        "epoch": np.arange(3, dtype=np.int32),
        "pass": [9, 19, 29],
        "module": ["m"] * 3,
        "param": ["weight"] * 3,
        "norm": np.array([1.0, 2.0, 3.0], dtype=np.float32),
    }
    table = epoch_summary(na.load(write_trace(tmp_path / "r", outputs=outputs, params=params)))
    assert table["split"].to_list() == ["train"] * 3  # an outputs column: not the params table
    assert table.schema["count"] == pl.Int64 and table.schema["nonfinite"] == pl.Int64
    recorded = values.astype(np.float32).astype(np.float64).reshape(3, 10)
    assert table["mean"].to_list() == pytest.approx(recorded.mean(axis=1).tolist(), rel=1e-6)
    assert table["std"].to_list() == pytest.approx(recorded.std(axis=1, ddof=1).tolist(), rel=1e-6)
    assert table["p95"].to_list() == pytest.approx(np.percentile(recorded, 95, axis=1).tolist(), rel=1e-6)


def test_rows_come_by_module_then_epoch(tmp_path: Path) -> None:
    n = 40
    outputs = {
        "pass": np.tile(np.arange(n // 2), 2),
        "epoch": np.tile(np.arange(n // 2) // 5, 2).astype(np.int32),
        "module": ["b"] * (n // 2) + ["a"] * (n // 2),
        "norm": np.ones(n, dtype=np.float32),
    }
    table = epoch_summary(na.load(write_trace(tmp_path / "r", outputs=outputs)))
    assert table.select("module", "epoch").rows() == [(m, e) for m in ["a", "b"] for e in range(4)]


def _outputs(epochs: list[list[float]], module: str = "m") -> dict[str, object]:
    """One module's rows, epoch k holding the values ``epochs[k]``, passes numbered in order."""
    values = [v for epoch in epochs for v in epoch]
    return {
        "pass": np.arange(len(values)),
        "epoch": np.repeat(np.arange(len(epochs)), [len(e) for e in epochs]).astype(np.int32),
        "module": [module] * len(values),
        "norm": np.asarray(values, dtype=np.float32),
    }


def test_a_table_that_cannot_be_summarised_is_named_with_the_ones_that_can(tmp_path: Path) -> None:
    trace = na.load(write_trace(tmp_path / "r", outputs=_outputs([[1.0, 2.0]])))
    with pytest.raises(ValueError, match=r"^epoch_summary works on 'outputs' or 'params' or 'signals', not 'metrics'$"):  # fmt: skip
        epoch_summary(trace, "metrics")  # type: ignore[arg-type]


def test_each_table_is_summarised_and_memoised_on_its_own(tmp_path: Path) -> None:
    params = {
        "epoch": np.array([0, 0], dtype=np.int32),
        "pass": [0, 1],
        "module": ["m", "m"],
        "param": ["weight", "weight"],
        "norm": np.array([10.0, 30.0], dtype=np.float32),
    }
    trace = na.load(write_trace(tmp_path / "r", outputs=_outputs([[1.0, 2.0, 6.0]]), params=params))
    first = epoch_summary(trace, "outputs")
    second = epoch_summary(trace, "params")  # the same Trace: the outputs' memo must not answer
    assert first["mean"].to_list() == [3.0]
    assert second["mean"].to_list() == [20.0]
    assert "param" in second.columns and "split" in first.columns
    assert epoch_summary(trace, "outputs")["mean"].to_list() == [3.0]


def test_std_is_null_for_one_row_and_the_sample_std_for_two(tmp_path: Path) -> None:
    table = epoch_summary(
        na.load(write_trace(tmp_path / "r", outputs=_outputs([[4.0], [1.0, 4.0], [2.0, 2.0, 8.0]])))
    )
    std = table["std"].to_list()
    assert std[0] is None  # one row: no sample standard deviation
    assert std[1] == pytest.approx(3.0 / np.sqrt(2.0), rel=1e-12)  # |a - b| / sqrt(2)
    assert std[2] == pytest.approx(np.std([2.0, 2.0, 8.0], ddof=1), rel=1e-12)


@pytest.mark.parametrize(
    "sizes",
    [
        [3, 3],  # two groups of three rows: equal sizes, the reshaped fast path
        [1, 40, 2],  # very unequal sizes: Polars' own quantiles, asked for linear interpolation
        [5, 4, 5, 5],  # nearly equal: padded
    ],
)
def test_quantiles_interpolate_linearly_whatever_the_group_sizes(tmp_path: Path, sizes: list[int]) -> None:
    rng = np.random.default_rng(sum(sizes))
    epochs = [rng.lognormal(size=n).astype(np.float32).tolist() for n in sizes]
    table = epoch_summary(na.load(write_trace(tmp_path / "r", outputs=_outputs(epochs))))
    assert table["count"].to_list() == sizes
    for q in (5, 50, 95):
        expected = [np.percentile(np.asarray(e, dtype=np.float64), q) for e in epochs]
        assert table[f"p{q:02d}"].to_list() == pytest.approx(expected, rel=1e-12), q


def test_infinite_norms_give_infinite_quantiles_without_numpy_warnings(tmp_path: Path) -> None:
    finite = np.linspace(1.0, 17.0, 17).tolist()
    epochs = [finite + [np.inf] * 3, finite[:10] + [np.inf] * 10]  # equal sizes: the fast path
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inf - inf between two infinite neighbours must not warn
        table = epoch_summary(na.load(write_trace(tmp_path / "r", outputs=_outputs(epochs))))
    # p95 of 20 values sits between the 19th and 20th smallest (both inf); p50 of the second between
    # the 10th (10.0) and 11th (inf): numpy gives inf too
    assert table["p95"].to_list() == [np.inf, np.inf]
    assert table["p50"].to_list() == [pytest.approx(np.percentile(epochs[0], 50)), np.inf]
    assert table["nonfinite"].to_list() == [3, 10]


def test_a_table_without_rows_gives_an_empty_summary_with_the_documented_columns(tmp_path: Path) -> None:
    params = {
        "epoch": np.array([0], dtype=np.int32),
        "pass": [0],
        "module": ["m"],
        "param": ["weight"],
        "norm": np.array([1.0], dtype=np.float32),
    }
    run = write_trace(tmp_path / "r", params=params)
    empty = _to_table("outputs", {k: v[:0] for k, v in _outputs([[1.0]]).items()}, 0)
    (run / "outputs").mkdir()
    path = str(run / "outputs" / "rank0-000000.arrow")
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, empty.schema) as writer:
        writer.write_table(empty)  # a shard with no rows: a reader must take it
    table = epoch_summary(na.load(run), "outputs")
    assert table.height == 0
    assert table.schema == {
        "run": pl.String,
        "epoch": pl.Int32,
        "module": pl.String,
        "split": pl.String,
        "count": pl.Int64,
        **dict.fromkeys(["mean", "std", "min", "max", "p05", "p50", "p95"], pl.Float64),
        "nonfinite": pl.Int64,
    }


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ([0, 0, 0, 1, 0], [0, 0, 0]),  # the first series goes back at its last row
        ([0, 0, 0], [0, 1, 0]),  # the second goes back right after its first step
    ],
)
def test_an_epoch_met_again_is_one_group_wherever_the_counter_goes_back(
    tmp_path: Path, a: list[int], b: list[int]
) -> None:
    """Restarted epoch counters are read as whole series, side by side in one frame; an epoch met again
    is one group of all its rows, whether the counter goes back at the end of the first series or inside
    the second (the check that lets a frame skip the sort must look at every row of every series)."""
    rng = np.random.default_rng(len(a) + 10 * len(b))
    values = {
        "a": rng.lognormal(size=len(a)).astype(np.float32),
        "b": rng.lognormal(size=len(b)).astype(np.float32),
    }
    outputs = {
        "pass": np.concatenate([np.arange(len(a)), np.arange(len(b))]),
        "epoch": np.array(a + b, dtype=np.int32),
        "module": ["a"] * len(a) + ["b"] * len(b),
        "norm": np.concatenate([values["a"], values["b"]]),
    }
    table = epoch_summary(na.load(write_trace(tmp_path / "r", outputs=outputs)))
    want = []
    for module, epochs in (("a", np.array(a)), ("b", np.array(b))):
        for e in sorted(set(epochs.tolist())):
            rows = values[module][epochs == e].astype(np.float64)
            want.append((module, e, len(rows), pytest.approx(rows.mean(), rel=1e-12)))
    assert table.select("module", "epoch", "count", "mean").rows() == want


def test_groups_summarised_by_polars_keep_their_order_among_many(tmp_path: Path) -> None:
    """A NaN sends a piece's order statistics to Polars (numpy sorts NaN elsewhere): with 300 epochs in
    the piece its groups must still line up with their counts and means, epoch by epoch."""
    rng = np.random.default_rng(8)
    epochs = [rng.lognormal(size=4).astype(np.float32).tolist() for _ in range(300)]
    epochs[7][2] = float("nan")
    table = epoch_summary(na.load(write_trace(tmp_path / "r", outputs=_outputs(epochs))))
    assert table["epoch"].to_list() == list(range(300))
    finite = [k for k in range(300) if k != 7]
    for q in (5, 50, 95):
        expected = [np.percentile(np.asarray(epochs[k], dtype=np.float64), q) for k in finite]
        assert table[f"p{q:02d}"].gather(finite).to_list() == pytest.approx(expected, rel=1e-12), q
    assert table["max"].gather(finite).to_list() == pytest.approx([max(epochs[k]) for k in finite])
