"""The spike detector on traces with planted spikes (known ground truth), and its event bookkeeping.

Whether spikes follow an event (the alignment test) is tested in test_analysis_alignment.py."""

from __future__ import annotations

import math
from pathlib import Path

import normtrace_analysis as na
import numpy as np
import polars as pl
import pytest
from normtrace_analysis.spikes import _centred_median
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
    lengths = np.array([1, 2, 5, 30, 51, 52, 80, 300])
    sid = np.concatenate([np.full(n, i, dtype=np.uint32) for i, n in enumerate(lengths)])
    values = rng.standard_normal(len(sid))
    values[rng.random(len(values)) < 0.2] = np.nan
    # Whole series: each stretch starts its series at position 0 and runs to its end; nothing carried in.
    rows = np.concatenate([[0], np.cumsum(lengths)])
    zero, none = np.zeros(len(lengths), dtype=np.int64), np.full(len(lengths), np.nan)
    frame = pl.DataFrame({"sid": sid, "value": values}).with_columns(pl.col("value").fill_nan(None))
    for window in (3, 4, 11, 51):
        half = window // 2
        got = _centred_median(values, rows, zero, zero, lengths, none, window)
        want = frame.select(
            pl.col("value")
            .rolling_median(window, min_samples=half + 1)
            .shift(-half)
            .forward_fill()
            .over("sid")
        )
        assert np.array_equal(got, want.to_series().fill_null(np.nan).to_numpy(), equal_nan=True), window
    # And the definition itself, by brute force for one long series.
    series = values[sid == 7]
    got = _centred_median(values, rows, zero, zero, lengths, none, 11)[sid == 7]
    for i in range(5, len(series) - 5):
        window = series[i - 5 : i + 6]
        window = window[~np.isnan(window)]
        if len(window) >= 6:
            assert got[i] == pytest.approx(np.median(window))


def test_centred_median_on_short_series_with_gaps_matches_the_definition() -> None:
    # Series shorter than a window and gaps of every length: the carried medians and the heads.
    rng = np.random.default_rng(3)
    for trial in range(200):
        lengths = rng.integers(1, 140, size=rng.integers(1, 6))
        window = int(rng.choice([3, 4, 11, 17, 51]))
        values = rng.standard_normal(lengths.sum())
        if trial % 2:
            values[rng.random(len(values)) < 0.3] = np.nan
        rows = np.concatenate([[0], np.cumsum(lengths)])
        zero, none = np.zeros(len(lengths), dtype=np.int64), np.full(len(lengths), np.nan)
        got = _centred_median(values, rows, zero, zero, lengths, none, window)
        half = window // 2
        frame = pl.DataFrame({"sid": np.repeat(np.arange(len(lengths)), lengths), "value": values})
        want = frame.with_columns(pl.col("value").fill_nan(None)).select(
            pl.col("value")
            .rolling_median(window, min_samples=half + 1)
            .shift(-half)
            .forward_fill()
            .over("sid")
        )
        assert np.array_equal(got, want.to_series().fill_null(np.nan).to_numpy(), equal_nan=True), trial


def test_bad_arguments(tmp_path: Path) -> None:
    run = write_trace(tmp_path / "r", **_single_series(_noise(100)))
    trace = na.load(run)
    with pytest.raises(ValueError, match="level"):
        trace.spikes(level="episode")
    with pytest.raises(ValueError, match="outputs"):
        trace.spikes("metrics")
    with pytest.raises(na.MissingTableError):
        trace.spikes("params")
