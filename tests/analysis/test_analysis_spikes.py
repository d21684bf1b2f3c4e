"""The spike detector on traces with planted spikes (known ground truth), and its event bookkeeping."""

from __future__ import annotations

import math
from pathlib import Path

import normtrace_analysis as na
import numpy as np
import polars as pl
import pytest
from normtrace_analysis.spikes import _POSITION, _centred_median
from tracegen import synthetic_dqn, write_trace


def _precision_recall(found: set, planted: set) -> tuple[float, float]:
    hits = len(found & planted)
    return hits / max(len(found), 1), hits / len(planted)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pass_level_finds_planted_spikes(tmp_path: Path, seed: int) -> None:
    syn = synthetic_dqn(
        n_epochs=150, passes_per_epoch=60, no_grad=True, n_spikes=15, after_event=0.3, seed=seed
    )
    run = write_trace(
        tmp_path / "r", outputs=syn.outputs, events=syn.events, shards=5, normalize=seed % 2 == 0
    )
    spikes = na.load(run).spikes("outputs")
    train = spikes.filter(pl.col("split") == "train")
    precision, recall = _precision_recall(
        set(zip(train["module"], train["pass"], strict=True)), set(syn.planted)
    )
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    # Nothing was planted in the no-grad series: at most a stray false positive there.
    assert spikes.filter(pl.col("split") == "no_grad").height <= 1


@pytest.mark.parametrize("seed", [0, 1])
def test_epoch_level_finds_planted_spikes(tmp_path: Path, seed: int) -> None:
    syn = synthetic_dqn(
        n_epochs=300, passes_per_epoch=20, level="epoch", n_spikes=12, after_event=0.5, seed=seed
    )
    run = write_trace(tmp_path / "r", outputs=syn.outputs, events=syn.events)
    spikes = na.load(run).spikes("outputs", level="epoch")
    assert "pass" not in spikes.columns and spikes["lag_passes"].is_null().all()
    precision, recall = _precision_recall(
        set(zip(spikes["module"], spikes["epoch"], strict=True)), set(syn.planted)
    )
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)


def _single_series(values: np.ndarray, events: dict | None = None) -> dict:
    """One module, one training pass per row, epochs of 10 passes."""
    n = len(values)
    outputs = {
        "pass": np.arange(n),
        "epoch": (np.arange(n) // 10).astype(np.int32),
        "module": np.array(["m"] * n),
        "norm": values.astype(np.float32),
    }
    return {"outputs": outputs, "events": events}


def _noise(n: int, seed: int = 0) -> np.ndarray:
    return 10.0 + 0.1 * np.random.default_rng(seed).standard_normal(n)


def test_nan_and_inf_are_always_spikes(tmp_path: Path) -> None:
    values = _noise(2000)
    values[[300, 301, 302]] = np.nan  # one run of NaNs: one spike spanning 3 points
    values[900] = np.inf
    values[1500] = -np.inf
    run = write_trace(tmp_path / "r", **_single_series(values))
    spikes = na.load(run).spikes()
    by_pass = {r["pass"]: r for r in spikes.iter_rows(named=True)}
    assert set(by_pass) == {300, 900, 1500}
    assert (
        math.isnan(by_pass[300]["value"])
        and by_pass[300]["points"] == 3
        and by_pass[300]["score"] == math.inf
    )
    assert by_pass[900]["score"] == math.inf and by_pass[1500]["score"] == -math.inf
    # The baselines around them are not poisoned.
    assert all(abs(r["baseline"] - 10.0) < 0.05 for r in by_pass.values())


def test_consecutive_flags_are_one_spike_at_the_peak(tmp_path: Path) -> None:
    values = _noise(3000)
    values[1000:1004] += np.array([3.0, 5.0, 4.0, 2.0])  # a 4-pass burst, peak at 1001
    run = write_trace(tmp_path / "r", **_single_series(values))
    spikes = na.load(run).spikes()
    assert spikes.height == 1
    row = spikes.row(0, named=True)
    assert (row["pass"], row["points"]) == (1001, 4)
    assert row["value"] == pytest.approx(values[1001], rel=1e-6)
    assert row["score"] > 30


def test_level_shift_is_not_a_train_of_spikes(tmp_path: Path) -> None:
    values = _noise(4000)
    values[2000:] += 2.0  # a permanent step of 20 noise SDs
    run = write_trace(tmp_path / "r", **_single_series(values))
    spikes = na.load(run).spikes()
    assert spikes.height <= 1
    assert spikes["points"].sum() <= 5


def test_flat_series_flags_nothing_but_real_jumps(tmp_path: Path) -> None:
    values = np.full(500, 3.0)
    values[250] = 3.5
    run = write_trace(tmp_path / "r", **_single_series(values))
    assert na.load(run).spikes()["pass"].to_list() == [250]


def test_nearest_preceding_event_and_lags(tmp_path: Path) -> None:
    values = _noise(1000)
    values[[50, 405, 700]] += 3.0
    # Events recorded between passes: `pass` is the last pass started before them.
    events = {"epoch": [40, 70], "pass": [399, 700], "name": ["target_update", "reset"]}
    run = write_trace(tmp_path / "r", **_single_series(values, events))
    spikes = na.load(run).spikes().sort("pass")
    first, second, third = spikes.iter_rows(named=True)
    assert first["event"] is None and first["lag_passes"] is None and first["lag_epochs"] is None
    assert (second["event"], second["event_pass"], second["lag_passes"], second["lag_epochs"]) == (
        "target_update",
        399,
        6,
        0,
    )
    # A spike on the event's own pass started before the event: the preceding event is the earlier one.
    assert (third["event"], third["lag_passes"]) == ("target_update", 301)


def test_epoch_level_event_opens_its_epoch(tmp_path: Path) -> None:
    syn = synthetic_dqn(n_epochs=300, passes_per_epoch=10, level="epoch", n_spikes=6, after_event=1.0, seed=3)
    run = write_trace(tmp_path / "r", outputs=syn.outputs, events=syn.events)
    spikes = na.load(run).spikes(level="epoch", modules=["net.0"])
    planted = {e for m, e in syn.after_event if m == "net.0"}
    aligned = spikes.filter(pl.col("epoch").is_in(list(planted)))
    assert aligned.height == len(planted) > 0
    assert (aligned["lag_epochs"] == 0).all() and (aligned["event_epoch"] == aligned["epoch"]).all()


def test_alignment_detects_clustering_after_target_updates(tmp_path: Path) -> None:
    syn = synthetic_dqn(n_epochs=200, passes_per_epoch=50, n_spikes=20, after_event=0.7, event_lag=3, seed=11)
    run = write_trace(tmp_path / "r", outputs=syn.outputs, events=syn.events)
    trace = na.load(run)
    table = trace.event_alignment("target_update", window=10)
    assert table.height == 3
    n_events = len(syn.events["pass"])
    # Expected fraction, independently: training passes p with 1 <= p - e <= 10 for some event pass e.
    passes = np.arange(200 * 50)
    covered = np.zeros(len(passes), bool)
    for e in syn.events["pass"]:
        covered |= (passes - e >= 1) & (passes - e <= 10)
    for row in table.iter_rows(named=True):
        planted_near = sum(1 for m, _ in syn.after_event if m == row["module"])
        assert row["events"] == n_events and row["points"] == len(passes)
        assert row["expected_fraction"] == pytest.approx(covered.mean())
        assert row["spikes"] == 20 and row["near_event"] == planted_near == 14
        assert row["observed_fraction"] == pytest.approx(0.7)
        assert row["enrichment"] == pytest.approx(0.7 / covered.mean())
        assert row["p_value"] < 1e-9
        assert row["finding"].startswith(
            f"{row['module']}: 70% of spikes (14 of 20) fall within 10 passes after"
        )
        assert "× chance, p < 0.001" in row["finding"]


def test_alignment_without_clustering_is_not_significant(tmp_path: Path) -> None:
    syn = synthetic_dqn(n_epochs=200, passes_per_epoch=50, n_spikes=20, after_event=0.0, seed=12)
    run = write_trace(tmp_path / "r", outputs=syn.outputs, events=syn.events)
    table = na.load(run).event_alignment("target_update", window=10)
    assert (table["p_value"] > 0.01).all()
    assert (table["enrichment"].fill_null(0) < 3).all()


def test_epoch_level_alignment_finding(tmp_path: Path) -> None:
    syn = synthetic_dqn(
        n_epochs=200, passes_per_epoch=10, level="epoch", n_spikes=10, after_event=0.8, seed=13
    )
    run = write_trace(tmp_path / "r", outputs=syn.outputs, events=syn.events)
    table = na.load(run).event_alignment("target_update", level="epoch")
    row = table.filter(pl.col("module") == "net.0").row(0, named=True)
    # Syncs open every 5th epoch: a 1-epoch window covers a fifth of the epochs.
    assert row["expected_fraction"] == pytest.approx(39 / 200)
    assert row["near_event"] >= 8
    assert "fall within 1 epoch after a target_update" in row["finding"]


def test_alignment_handles_no_spikes_and_no_events(tmp_path: Path) -> None:
    quiet = write_trace(
        tmp_path / "quiet", **_single_series(_noise(800), {"epoch": [5], "pass": [49], "name": ["x"]})
    )
    table = na.load(quiet).event_alignment("target_update")
    row = table.row(0, named=True)
    assert (row["spikes"], row["near_event"], row["events"], row["p_value"]) == (0, 0, 0, 1.0)
    assert row["observed_fraction"] is None and row["enrichment"] is None
    assert "no spikes" in row["finding"]
    values = _noise(800)
    values[400] += 5
    spiky = write_trace(tmp_path / "spiky", **_single_series(values))
    row = na.load(spiky).event_alignment("target_update").row(0, named=True)
    assert row["spikes"] == 1 and row["events"] == 0 and row["enrichment"] is None
    assert "no target_update events" in row["finding"]


def test_multi_run_alignment_names_the_run(tmp_path: Path) -> None:
    for name, seed in (("a", 21), ("b", 22)):
        syn = synthetic_dqn(n_epochs=60, passes_per_epoch=20, modules=("net.0",), after_event=0.5, seed=seed)
        write_trace(tmp_path / name, outputs=syn.outputs, events=syn.events)
    table = na.load(str(tmp_path / "*")).event_alignment()
    assert table["run"].to_list() == ["a", "b"]
    assert [f.split(":")[0] for f in table["finding"]] == ["a", "b"]


def test_params_spikes_at_epoch_level(tmp_path: Path) -> None:
    n = 120
    norm = 5.0 + 0.01 * np.random.default_rng(5).standard_normal(n)
    norm[70] += 1.0
    params = {
        "epoch": np.arange(n, dtype=np.int32),
        "pass": np.arange(n) * 10 + 9,
        "module": ["fc"] * n,
        "param": ["weight"] * n,
        "norm": norm.astype(np.float32),
    }
    events = {"epoch": [70], "pass": [699], "name": ["target_update"]}
    run = write_trace(tmp_path / "r", params=params, events=events)
    spikes = na.load(run).spikes("params", level="epoch")
    assert spikes.select("module", "param", "epoch", "lag_epochs").rows() == [("fc", "weight", 70, 0)]


def test_centred_median_matches_the_per_series_definition() -> None:
    rng = np.random.default_rng(1)
    lengths = [1, 2, 5, 30, 51, 52, 80, 300]
    sid = np.concatenate([np.full(n, i, dtype=np.uint32) for i, n in enumerate(lengths)])
    values = rng.standard_normal(len(sid))
    values[rng.random(len(values)) < 0.2] = np.nan
    frame = pl.DataFrame({"sid": sid, "value": values}).with_columns(_POSITION)
    x = pl.when(pl.col("value").is_finite()).then(pl.col("value"))
    for window in (3, 4, 11, 51):
        half = window // 2
        got = _centred_median(frame, x, window)
        want = frame.select(
            x.rolling_median(window, min_samples=half + 1).shift(-half).forward_fill().over("sid")
        )
        assert got.equals(want.to_series(), check_names=False), window
    # And the definition itself, by brute force for one long series.
    series = values[sid == 7]
    got = _centred_median(frame, x, 11).to_numpy()[sid == 7]
    for i in range(5, len(series) - 5):
        window = series[i - 5 : i + 6]
        window = window[~np.isnan(window)]
        if len(window) >= 6:
            assert got[i] == pytest.approx(np.median(window))


def test_bad_arguments(tmp_path: Path) -> None:
    run = write_trace(tmp_path / "r", **_single_series(_noise(100)))
    trace = na.load(run)
    with pytest.raises(ValueError, match="level"):
        trace.spikes(level="episode")
    with pytest.raises(ValueError, match="outputs"):
        trace.spikes("metrics")
    with pytest.raises(ValueError, match="window"):
        trace.event_alignment(window=0)
    with pytest.raises(na.MissingTableError):
        trace.spikes("params")


def test_ranks_are_separate_series_with_their_own_events(tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    spiky = _noise(1000, seed=1)
    spiky[[205, 505]] += 3.0
    write_trace(
        run, **_single_series(spiky, {"epoch": [20, 50], "pass": [199, 499], "name": ["target_update"] * 2})
    )
    write_trace(
        run,
        rank=1,
        **_single_series(_noise(1000, seed=2), {"epoch": [30], "pass": [299], "name": ["target_update"]}),
    )
    table = na.load(run).event_alignment(window=10)
    assert table.select("rank", "events", "spikes", "near_event").rows() == [(0, 2, 2, 2), (1, 1, 0, 0)]
    assert table["expected_fraction"].to_list() == pytest.approx([20 / 1000, 10 / 1000])
    assert table["finding"][0].startswith("m on rank 0: 100% of spikes (2 of 2) fall within 10 passes")
