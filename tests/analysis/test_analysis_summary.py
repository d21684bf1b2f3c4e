"""epoch_summary against numpy on the very rows written, for every layout the reader handles."""

from __future__ import annotations

from pathlib import Path

import normtrace_analysis as na
import numpy as np
import polars as pl
import pytest
from tracegen import synthetic_dqn, write_trace

STATS = ("count", "mean", "std", "min", "max", "p05", "p50", "p95")


def _numpy_stats(values: np.ndarray) -> dict[str, float]:
    """The documented statistics, computed independently."""
    return {
        "count": len(values),
        "mean": values.mean(),
        "std": values.std(ddof=1) if len(values) > 1 else np.nan,
        "min": values.min(),
        "max": values.max(),
        "p05": np.percentile(values, 5),
        "p50": np.percentile(values, 50),
        "p95": np.percentile(values, 95),
    }


def _check(summary: pl.DataFrame, groups: dict[tuple, np.ndarray], keys: list[str]) -> None:
    """Every expected group appears once with numpy's statistics, and no other group does."""
    assert summary.height == len(groups)
    rows = {tuple(r[k] for k in keys): r for r in summary.iter_rows(named=True)}
    for group, values in groups.items():
        row = rows[group]
        for stat, expected in _numpy_stats(values).items():
            if stat == "std" and np.isnan(expected):
                assert row["std"] is None
            else:
                assert row[stat] == pytest.approx(expected, rel=1e-12, abs=1e-15), (group, stat)


def _expected(outputs: dict, value: np.ndarray, mask: np.ndarray | None = None) -> dict[tuple, np.ndarray]:
    """Rows grouped by (epoch, module, split) with numpy."""
    split = np.where(outputs["grad_enabled"], "train", "no_grad")
    keep = np.ones(len(value), bool) if mask is None else mask
    groups: dict[tuple, list] = {}
    for e, m, s, v in zip(
        outputs["epoch"][keep], outputs["module"][keep], split[keep], value[keep], strict=True
    ):
        groups.setdefault((int(e), str(m), str(s)), []).append(v)
    return {k: np.array(v) for k, v in groups.items()}


@pytest.mark.parametrize("normalize", [False, True])
def test_outputs_summary_equals_numpy(tmp_path: Path, normalize: bool) -> None:
    syn = synthetic_dqn(n_epochs=12, passes_per_epoch=9, no_grad=True, seed=3)
    run = write_trace(tmp_path / "r", outputs=syn.outputs, shards=4, normalize=normalize)
    summary = na.load(run).epoch_summary("outputs")
    assert summary.columns == ["run", "epoch", "module", "split", *STATS, "nonfinite"]
    norm = syn.outputs["norm"].astype(np.float64)
    value = norm / np.sqrt(syn.outputs["numel"]) if normalize else norm
    _check(summary, _expected(syn.outputs, value), ["epoch", "module", "split"])
    assert summary["run"].unique().to_list() == ["r"]
    assert summary["nonfinite"].sum() == 0


def test_default_mean_is_the_mean_of_the_recorded_batch_norms(tmp_path: Path) -> None:
    # The seed's lens records raw norms of grad-enabled passes: the epoch mean is the plain mean of `norm`.
    syn = synthetic_dqn(n_epochs=6, passes_per_epoch=7, seed=4)
    run = write_trace(tmp_path / "r", outputs=syn.outputs)
    summary = na.load(run).epoch_summary()
    out = syn.outputs
    for row in summary.iter_rows(named=True):
        rows = (out["epoch"] == row["epoch"]) & (out["module"] == row["module"])
        assert row["count"] == rows.sum() == 7
        assert row["mean"] == pytest.approx(out["norm"][rows].astype(np.float64).mean(), rel=1e-14)


def test_irregular_layout_and_unordered_rows_give_the_same_summary(tmp_path: Path) -> None:
    # Drop a random tenth of the rows (no fixed per-pass layout) and shuffle within shards (not in pass
    # order): the reader must fall back to sorting and still agree with numpy.
    syn = synthetic_dqn(n_epochs=10, passes_per_epoch=8, no_grad=True, seed=5)
    rng = np.random.default_rng(0)
    keep = rng.random(len(syn.outputs["pass"])) > 0.1
    order = rng.permutation(int(keep.sum()))
    outputs = {k: v[keep][order] for k, v in syn.outputs.items()}
    run = write_trace(tmp_path / "r", outputs=outputs, shards=3)
    summary = na.load(run).epoch_summary()
    _check(summary, _expected(outputs, outputs["norm"].astype(np.float64)), ["epoch", "module", "split"])


def test_ranks_are_pooled_and_filters_apply(tmp_path: Path) -> None:
    syn0 = synthetic_dqn(n_epochs=5, passes_per_epoch=6, seed=6)
    syn1 = synthetic_dqn(n_epochs=5, passes_per_epoch=6, seed=7)
    run = tmp_path / "ddp"
    write_trace(run, outputs=syn0.outputs, rank=0)
    write_trace(run, outputs=syn1.outputs, rank=1)
    trace = na.load(run)
    both = {k: np.concatenate([syn0.outputs[k], syn1.outputs[k]]) for k in syn0.outputs}
    _check(
        trace.epoch_summary(), _expected(both, both["norm"].astype(np.float64)), ["epoch", "module", "split"]
    )
    one = trace.filter(ranks=1, epochs=(1, 3), modules=["net.2"]).epoch_summary()
    mask = (syn1.outputs["epoch"] >= 1) & (syn1.outputs["epoch"] <= 3) & (syn1.outputs["module"] == "net.2")
    _check(
        one,
        _expected(syn1.outputs, syn1.outputs["norm"].astype(np.float64), mask),
        ["epoch", "module", "split"],
    )


def test_params_summary_per_module_and_param(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    n = 60
    params = {
        "epoch": np.repeat(np.arange(5), 12).astype(np.int32),
        "pass": np.repeat(np.arange(5) * 10 + 9, 12),
        "module": np.tile(np.repeat(["fc1", "fc2"], 6), 5),
        "param": np.tile(["weight", "bias"] * 6, 5),
        "norm": rng.uniform(1, 2, n).astype(np.float32),
        "numel": np.tile(np.repeat([64, 8], 6), 5),
    }
    run = write_trace(tmp_path / "r", params=params, normalize=True)
    summary = na.load(run).epoch_summary("params")
    assert summary.columns == ["run", "epoch", "module", "param", *STATS, "nonfinite"]
    value = params["norm"].astype(np.float64) / np.sqrt(params["numel"])
    groups: dict[tuple, list] = {}
    for e, m, p, v in zip(params["epoch"], params["module"], params["param"], value, strict=True):
        groups.setdefault((int(e), str(m), str(p)), []).append(v)
    _check(summary, {k: np.array(v) for k, v in groups.items()}, ["epoch", "module", "param"])


def test_nonfinite_values_are_counted(tmp_path: Path) -> None:
    syn = synthetic_dqn(n_epochs=3, passes_per_epoch=5, modules=("m",), seed=9)
    syn.outputs["norm"][[2, 3, 7]] = [np.nan, np.inf, np.nan]
    run = write_trace(tmp_path / "r", outputs=syn.outputs)
    summary = na.load(run).epoch_summary()
    assert summary["nonfinite"].to_list() == [2, 1, 0]
    assert np.isnan(summary["mean"][0]) and not np.isnan(summary["mean"][2])


def test_unknown_table_is_rejected(tmp_path: Path) -> None:
    run = write_trace(tmp_path / "r", outputs=synthetic_dqn(n_epochs=2, passes_per_epoch=2).outputs)
    with pytest.raises(ValueError, match="outputs"):
        na.load(run).epoch_summary("metrics")
