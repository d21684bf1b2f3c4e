"""Event alignment: each statistic against a direct computation (plain loops, hand-worked numbers)."""

from __future__ import annotations

from pathlib import Path

import normtrace_analysis as na
import numpy as np
import polars as pl
import pytest
from alignment_traces import modules_trace, noise, series, syncs
from normtrace_analysis import alignment
from normtrace_analysis.stats import clopper_pearson, permutation_p
from tracegen import synthetic_dqn, write_trace


def _followed_by_loops(onsets: list[int], positions: np.ndarray, window: int) -> int:
    count = 0
    for x in positions:
        if any(x < o <= x + window for o in onsets):
            count += 1
    return count


# ---------------------------------------------------------------------------------------------------------
# The numpy core against loops


def test_null_counts_match_plain_loops_on_jittered_trains() -> None:
    rng = np.random.default_rng(3)
    events = np.array([12, 40, 41, 90, 150, 160])
    onsets = [np.array([15, 44, 95, 96, 152]), np.array([], dtype=np.int64), np.array([1, 161, 199])]
    trains = alignment.jitter_trains(events, -1, 198, exclude=8, permutations=200, rng=rng)
    counts = alignment.null_counts(onsets, trains, window=5)
    for s, on in enumerate(onsets):
        want = [_followed_by_loops(list(on), row, 5) for row in trains]
        assert counts[s].tolist() == want
    observed = alignment.null_counts(onsets, events[None, :], 5)[:, 0]
    assert observed.tolist() == [_followed_by_loops(list(on), events, 5) for on in onsets]
    p = permutation_p(observed, counts)
    for s in range(len(onsets)):
        assert p[s] == (1 + sum(c >= observed[s] for c in counts[s])) / (len(trains) + 1)


def test_jittered_events_move_between_the_exclusion_and_a_few_local_gaps() -> None:
    events = np.array([100, 200, 260, 900])
    lo, hi, exclude = 0, 1000, 30
    trains = alignment.jitter_trains(
        events, lo, hi, exclude=exclude, permutations=2000, rng=np.random.default_rng(0)
    )
    assert trains.shape == (2000, 4)
    assert trains.min() >= lo and trains.max() <= hi
    # Reach: JITTER_GAPS times the mean of an event's gaps to its neighbours, at least 2 * exclude, at
    # most the distance to the farther end of the span.
    local = [100, (100 + 60) / 2, (60 + 640) / 2, 640]
    reach = [
        min(max(np.ceil(alignment.JITTER_GAPS * g), 2 * exclude), max(q - lo, hi - q))
        for g, q in zip(local, events, strict=True)
    ]
    moved = np.abs(trains - events)
    for j in range(4):
        assert moved[:, j].min() >= exclude and moved[:, j].max() <= reach[j]  # mirrored, never clipped
        assert moved[:, j].max() > 0.95 * reach[j]
    # Event 1 has room on both sides: as many moves left as right. Events 0 and 2 reach past 0 on the
    # left, and those moves are mirrored to the right; event 3's reach past 1000 to the left.
    assert (trains[:, 1] > events[1]).mean() == pytest.approx(0.5, abs=0.05)
    assert (trains[:, 0] > events[0]).mean() > 0.6 and (trains[:, 2] > events[2]).mean() > 0.6
    assert (trains[:, 3] > events[3]).mean() < 0.4
    # Avoided neighbourhoods are avoided.
    avoid = np.array([150, 500])
    kept = alignment.jitter_trains(
        events,
        lo,
        hi,
        exclude=exclude,
        permutations=500,
        rng=np.random.default_rng(1),
        avoid=avoid,
        avoid_radius=20,
    )
    assert not any(abs(int(x) - a) <= 20 for x in kept.ravel() for a in avoid)


def test_long_trains_are_jittered_in_chunks_with_the_same_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    events = np.arange(100, 5000, 37)
    onsets = [np.arange(105, 5000, 74), np.array([2000])]
    monkeypatch.setattr(alignment, "CHUNK", 10 * len(events))  # ten trains per chunk
    observed, null = alignment.jitter_test(
        onsets, events, 0, 4999, window=10, exclude=30, permutations=95, rng=np.random.default_rng(5)
    )
    assert null.shape == (2, 95) and observed.tolist() == [
        _followed_by_loops(list(on), events, 10) for on in onsets
    ]
    # The same generator read chunk by chunk: the same trains, so the same counts.
    rng = np.random.default_rng(5)
    parts = [
        alignment.jitter_trains(events, 0, 4999, exclude=30, permutations=n, rng=rng) for n in [10] * 9 + [5]
    ]
    assert (null == alignment.null_counts(onsets, np.concatenate(parts), 10)).all()


def test_same_seed_same_draws_and_different_seed_different_draws() -> None:
    events = np.array([50, 300, 700])
    a = alignment.jitter_trains(events, 0, 999, exclude=10, permutations=50, rng=alignment._rng(0, 0, 0))
    b = alignment.jitter_trains(events, 0, 999, exclude=10, permutations=50, rng=alignment._rng(0, 0, 0))
    c = alignment.jitter_trains(events, 0, 999, exclude=10, permutations=50, rng=alignment._rng(1, 0, 0))
    assert (a == b).all() and not (a == c).all()


# ---------------------------------------------------------------------------------------------------------
# Through a trace


def test_window_edges_lag_w_counts_lag_w_plus_1_and_lag_0_do_not(tmp_path: Path) -> None:
    values = noise(1000)
    events = [100, 300, 500, 700]
    values[[100 + 10, 300 + 11, 500]] += 3.0  # lags 10 (= W), 11 (= W + 1) and 0 (the event's own pass)
    run = write_trace(tmp_path / "r", **series(values, syncs(events)))
    row = na.load(run).event_alignment(window=10).row(0, named=True)
    assert (row["events"], row["events_followed"], row["spikes"], row["clusters"]) == (4, 1, 3, 3)
    assert row["finding"].startswith(
        "m: 1 of 4 target_update events are followed by a spike within 10 passes"
    )


def test_an_event_counts_when_its_window_reaches_a_recorded_pass(tmp_path: Path) -> None:
    """A DQN's first syncs come before its first training pass: an event is tested when its window
    reaches the first recorded pass, and left out of E when the window ends before it."""
    values = noise(1000, seed=3)
    first = 50  # the series is recorded from pass 50 on: values[i] is pass 50 + i
    values[[52 - first, 505 - first]] += 3.0
    outputs = series(values)["outputs"] | {"pass": np.arange(first, first + 1000)}
    run = write_trace(tmp_path / "r", outputs=outputs, events=syncs([20, 45, 500]))
    row = na.load(run).event_alignment(window=10).row(0, named=True)
    # (20, 30] ends before pass 50: not an event of this series. (45, 55] holds pass 52: followed.
    assert (row["events"], row["events_followed"]) == (2, 2)


def test_epoch_level_window_is_the_epoch_the_event_opens_and_the_next_ones(tmp_path: Path) -> None:
    per_epoch = 5
    epochs = 300
    values = np.repeat(noise(epochs, seed=4), per_epoch)  # flat within an epoch: epoch means = values
    sync_epochs = [40, 80, 120, 160, 200]
    for e, lag in zip(sync_epochs, [0, 1, 2, -1, 3], strict=True):  # window 2: lags 0 and 1 count
        values[(e + lag) * per_epoch : (e + lag + 1) * per_epoch] += 3.0
    events = {
        "epoch": sync_epochs,
        "pass": [e * per_epoch - 1 for e in sync_epochs],
        "name": ["target_update"] * 5,
    }
    run = write_trace(tmp_path / "r", **series(values, events, per_epoch=per_epoch))
    row = na.load(run).event_alignment(level="epoch", window=2).row(0, named=True)
    assert (row["events"], row["events_followed"], row["spikes"]) == (5, 2, 5)
    assert row["placebo_events"] is None  # no placebo at epoch level: every epoch is a boundary
    assert "within 2 epochs" in row["finding"]


def test_p_value_is_the_brute_force_permutation_count(tmp_path: Path) -> None:
    values = noise(3000, seed=5)
    events = [199, 499, 799, 1099, 1399, 1699, 1999, 2299, 2599]
    for e, lag in zip(events, [3, 5, 2, 8, 4, 40, 60, 90, 3], strict=True):
        values[e + lag] += 3.0
    values[[1000, 2700]] += 3.0
    run = write_trace(tmp_path / "r", **series(values, syncs(events)))
    b = 199
    row = na.load(run).event_alignment(window=10, permutations=b, placebo=False).row(0, named=True)
    onsets = sorted(
        {e + lag for e, lag in zip(events, [3, 5, 2, 8, 4, 40, 60, 90, 3], strict=True)} | {1000, 2700}
    )
    k = _followed_by_loops(onsets, np.array(events), 10)
    x = alignment.exclusion(10, 51)
    trains = alignment.jitter_trains(
        np.array(events), -10, 2998, exclude=x, permutations=b, rng=alignment._rng(0, 0, 0)
    )
    null = [_followed_by_loops(onsets, t, 10) for t in trains]
    assert row["events_followed"] == k == 6
    assert row["p_value"] == pytest.approx((1 + sum(t >= k for t in null)) / (b + 1))
    assert row["p_floor"] == pytest.approx(1 / (b + 1))
    assert row["chance"] == pytest.approx(np.mean(null) / len(events))
    assert row["enrichment"] == pytest.approx(k / len(events) / row["chance"])
    lo, hi = clopper_pearson(k, len(events))
    assert (row["enrichment_lo"], row["enrichment_hi"]) == pytest.approx(
        (lo / row["chance"], hi / row["chance"])
    )


def test_alignment_detects_clustering_after_target_updates(tmp_path: Path) -> None:
    syn = synthetic_dqn(n_epochs=200, passes_per_epoch=50, n_spikes=20, after_event=0.7, event_lag=3, seed=11)
    run = write_trace(tmp_path / "r", outputs=syn.outputs, events=syn.events)
    table = na.load(run).event_alignment("target_update", window=10)
    assert table.height == 3
    n_events = len(syn.events["pass"])
    for row in table.iter_rows(named=True):
        planted_near = sum(1 for m, _ in syn.after_event if m == row["module"])
        assert row["events"] == n_events and row["points"] == 200 * 50
        assert row["spikes"] == row["clusters"] == 20  # the planted spikes are isolated
        assert row["events_followed"] == planted_near == 14
        assert row["p_value"] == row["p_floor"] == pytest.approx(1 / 1000)  # the floor: no jitter does it
        assert row["q_value"] == pytest.approx(1 / 1000)
        assert row["chance"] < 0.05 and row["enrichment_lo"] > 5
        assert row["finding"].startswith(
            f"{row['module']}: 14 of {n_events} target_update events are followed by a spike within 10 passes"
        )
        assert "p ≤ 0.001 (permutation floor), q = 0.001; its 20 spikes form 20 clusters" in row["finding"]


def test_alignment_without_clustering_is_not_significant(tmp_path: Path) -> None:
    syn = synthetic_dqn(n_epochs=200, passes_per_epoch=50, n_spikes=20, after_event=0.0, seed=12)
    run = write_trace(tmp_path / "r", outputs=syn.outputs, events=syn.events)
    table = na.load(run).event_alignment("target_update", window=10)
    assert (table["p_value"] > 0.05).all() and (table["q_value"] > 0.05).all()


def test_several_windows_give_one_block_each_with_their_own_q(tmp_path: Path) -> None:
    syn = synthetic_dqn(
        n_epochs=100, passes_per_epoch=50, n_spikes=10, after_event=0.8, event_lag=30, seed=14
    )
    run = write_trace(tmp_path / "r", outputs=syn.outputs, events=syn.events)
    trace = na.load(run)
    table = trace.event_alignment(window=(5, 20, 50))
    assert table["window"].to_list() == [5] * 3 + [20] * 3 + [50] * 3
    by_window = {w: part for (w,), part in table.group_by("window")}
    assert (by_window[5]["events_followed"] == 0).all()  # the planted lag (30) is outside 5 and 20 ...
    assert (by_window[50]["events_followed"] >= 8).all()  # ... and inside 50
    assert (by_window[50]["p_value"] < 0.01).all()
    single = trace.event_alignment(window=50)
    assert single.drop("window").equals(by_window[50].drop("window"))


def test_same_draws_for_every_series_of_a_run_and_deterministic(tmp_path: Path) -> None:
    values = noise(3000, seed=6)
    events = list(range(149, 2900, 300))
    values[[e + 4 for e in events[:6]]] += 3.0
    values[[1000, 2000]] += 3.0
    run = write_trace(tmp_path / "r", **series(values, syncs(events), modules=("a", "b")))
    first = na.load(run).event_alignment(window=10)
    again = na.load(run).event_alignment(window=10)
    assert first.equals(again)
    a, b = first.iter_rows(named=True)
    assert {k: v for k, v in a.items() if k not in ("module", "finding")} == {
        k: v for k, v in b.items() if k not in ("module", "finding")
    }
    other = na.load(run).event_alignment(window=10, seed=1)
    assert other["chance"].to_list() != first["chance"].to_list()


def test_placebo_separates_the_event_from_the_epoch_boundaries(tmp_path: Path) -> None:
    per_epoch, epochs = 50, 120
    sync_epochs = list(range(5, epochs, 5))
    boundaries = [e * per_epoch - 1 for e in range(1, epochs)]
    sync_passes = [e * per_epoch - 1 for e in sync_epochs]
    others = [b for b in boundaries if b not in sync_passes]
    events = {"epoch": sync_epochs, "pass": sync_passes, "name": ["target_update"] * len(sync_passes)}
    after_syncs = noise(epochs * per_epoch, seed=7)
    after_syncs[[p + 3 for p in sync_passes]] += 3.0
    after_others = noise(epochs * per_epoch, seed=8)
    after_others[[p + 3 for p in others[::3]]] += 3.0
    for name, values in (("syncs", after_syncs), ("others", after_others)):
        write_trace(tmp_path / name, **series(values, events, per_epoch=per_epoch))
    table = na.load([tmp_path / "syncs", tmp_path / "others"]).event_alignment(window=10)
    syncs_row, others_row = (table.filter(pl.col("run") == r).row(0, named=True) for r in ("syncs", "others"))
    assert syncs_row["placebo_events"] == len(others) == others_row["placebo_events"]
    assert syncs_row["events_followed"] == len(sync_passes) and syncs_row["p_value"] < 0.01
    assert syncs_row["placebo_followed"] == 0 and syncs_row["placebo_p"] > 0.5
    assert others_row["events_followed"] == 0 and others_row["p_value"] > 0.5
    assert others_row["placebo_followed"] == len(others[::3]) and others_row["placebo_p"] < 0.01
    assert f"Placebo, the other epoch boundaries: 0 of {len(others)} followed" in syncs_row["finding"]
    # enrichment: the fraction of (placebo) events followed over the chance of one being followed
    # (null where that chance is 0: no jittered placebo was followed)
    for row in (syncs_row, others_row):
        if row["placebo_chance"] > 0:
            placebo = row["placebo_followed"] / row["placebo_events"] / row["placebo_chance"]
            assert row["placebo_enrichment"] == pytest.approx(placebo, rel=1e-12)
        else:
            assert row["placebo_enrichment"] is None
    assert 0 < others_row["placebo_chance"] < 0.1 and others_row["placebo_enrichment"] > 3


def test_alignment_handles_no_spikes_and_no_events(tmp_path: Path) -> None:
    quiet = write_trace(tmp_path / "quiet", **series(noise(800), {"epoch": [5], "pass": [49], "name": ["x"]}))
    row = na.load(quiet).event_alignment("x").row(0, named=True)
    assert (row["spikes"], row["clusters"], row["events"]) == (0, 0, 1)
    assert row["p_value"] is None and row["q_value"] is None and row["enrichment"] is None
    assert "no spikes" in row["finding"]
    values = noise(800)
    values[400] += 5
    spiky = write_trace(tmp_path / "spiky", **series(values, {"epoch": [500], "pass": [5000], "name": ["x"]}))
    row = na.load(spiky).event_alignment("x").row(0, named=True)  # its one event lies after the series
    assert row["spikes"] == 1 and row["events"] == 0 and row["p_value"] is None
    assert "no x events were recorded in its span" in row["finding"]


def test_an_event_no_run_recorded_is_refused_with_the_events_that_were(tmp_path: Path) -> None:
    quiet = write_trace(
        tmp_path / "quiet",
        **series(noise(800), {"epoch": [5, 6, 7], "pass": [49, 59, 69], "name": ["x", "y", "y"]}),
    )
    trace = na.load(quiet)
    for analysis in (trace.event_alignment, trace.event_steps, trace.event_profile):
        with pytest.raises(
            na.MissingEventError,
            match=r"no 'target_update' events in quiet; events recorded: y \(2\), x \(1\)",
        ):
            analysis("target_update")
    bare = write_trace(tmp_path / "bare", **series(noise(800)))
    with pytest.raises(na.MissingEventError, match="no events were recorded.*track_target"):
        na.load(bare).event_alignment("target_update")


def test_multi_run_alignment_names_the_run(tmp_path: Path) -> None:
    for name, seed in (("a", 21), ("b", 22)):
        syn = synthetic_dqn(n_epochs=60, passes_per_epoch=20, modules=("net.0",), after_event=0.5, seed=seed)
        write_trace(tmp_path / name, outputs=syn.outputs, events=syn.events)
    table = na.load(str(tmp_path / "*")).event_alignment()
    assert table["run"].to_list() == ["a", "b"]
    assert [f.split(":")[0] for f in table["finding"]] == ["a", "b"]


def test_ranks_are_separate_series_with_their_own_events(tmp_path: Path) -> None:
    run = tmp_path / "ddp"
    spiky = noise(1000, seed=1)
    spiky[[205, 505]] += 3.0
    write_trace(run, **series(spiky, syncs([199, 499])))
    write_trace(run, rank=1, **series(noise(1000, seed=2), syncs([299])))
    table = na.load(run).event_alignment(window=10)
    assert table.select("rank", "events", "events_followed", "spikes").rows() == [
        (0, 2, 2, 2),
        (1, 1, 0, 0),
    ]
    assert table["p_value"].to_list()[1] is None  # no spike: nothing was tested
    assert table["finding"][0].startswith("m on rank 0: 2 of 2 target_update events are followed")


def test_bad_arguments(tmp_path: Path) -> None:
    trace = na.load(write_trace(tmp_path / "r", **series(noise(100))))
    with pytest.raises(ValueError, match="window"):
        trace.event_alignment(window=0)
    with pytest.raises(ValueError, match="permutations"):
        trace.event_alignment(permutations=0)
    with pytest.raises(TypeError):
        trace.event_alignment("target_update", 20)  # options are keyword-only


# ---------------------------------------------------------------------------------------------------------
# Clusters and groups


def test_spikes_closer_than_the_merge_gap_are_one_cluster(tmp_path: Path) -> None:
    values = noise(2000, seed=9)
    values[[300, 310, 324, 400, 700]] += 3.0  # gaps 10, 14 (< 25: one cluster), 76, 300
    run = write_trace(tmp_path / "r", **series(values))
    clusters = na.load(run).spike_clusters(window=20)  # merge gap max(20, 51 // 2) = 25
    assert clusters.select("onset", "end", "spikes").rows() == [(300, 324, 3), (400, 400, 1), (700, 700, 1)]
    assert na.load(run).spike_clusters(window=80).select("onset", "spikes").rows() == [(300, 4), (700, 1)]


def test_layers_whose_clusters_coincide_are_one_group(tmp_path: Path) -> None:
    shared = [400, 900, 1500, 2200, 3100]
    spikes = {
        "a": shared,
        "b": [p + 2 for p in shared[:4]] + [3500],  # four of its five clusters within 5 passes of a's
        "c": [700, 1800, 2600],
    }
    groups = na.load(modules_trace(tmp_path / "r", spikes, seed=10)).spike_groups()
    rows = {r["module"]: r for r in groups.iter_rows(named=True)}
    assert rows["a"]["group"] == rows["b"]["group"] == 0 and rows["a"]["size"] == 2
    assert rows["c"]["group"] == 1 and rows["c"]["size"] == 1 and rows["c"]["shared"] == 0
    assert rows["a"]["shared"] == pytest.approx(4 / 5) and rows["b"]["shared"] == pytest.approx(4 / 5)


# ---------------------------------------------------------------------------------------------------------
# Steps and the event-triggered average


def _robust_noise(values: np.ndarray) -> float:
    d = np.diff(values)
    return 1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2)


def test_step_statistic_against_medians_computed_directly(tmp_path: Path) -> None:
    values = noise(4000, seed=13)
    events = list(range(299, 3900, 300))
    for e in events:
        values[e + 1 :] += 0.5  # a staircase: +5 noise SDs after every event
    run = write_trace(tmp_path / "r", **series(values, syncs(events)))
    row = na.load(run).event_steps(window=20, permutations=199).row(0, named=True)
    v = values.astype(np.float32).astype(np.float64)
    steps = [np.median(v[e + 1 : e + 21]) - np.median(v[e - 19 : e + 1]) for e in events]
    ratios = [np.median(v[e + 1 : e + 21]) / np.median(v[e - 19 : e + 1]) for e in events]
    assert row["step"] == pytest.approx(np.median(steps) / _robust_noise(v), rel=1e-6)
    assert row["step_change"] == pytest.approx(np.median(ratios) - 1, rel=1e-6)
    assert row["steps_up"] == len(events) and row["events"] == len(events)
    assert row["p_value"] == pytest.approx(2 / 200) and row["p_floor"] == pytest.approx(2 / 200)
    assert "higher than in the 20 before" in row["finding"]


def test_a_step_of_several_times_the_level_is_said_as_a_factor(tmp_path: Path) -> None:
    values = 10 + noise(4000, seed=15)
    events = list(range(299, 3900, 300))
    for e in events:
        values[e + 1 : e + 41] *= 6  # the level six times as high for 40 passes after every event
    run = write_trace(tmp_path / "r", **series(values, syncs(events)))
    row = na.load(run).event_steps(window=20, permutations=199).row(0, named=True)
    v = values.astype(np.float32).astype(np.float64)
    factor = np.median([np.median(v[e + 1 : e + 21]) / np.median(v[e - 19 : e + 1]) for e in events])
    assert factor == pytest.approx(6, rel=0.05)
    assert f"higher, {factor:.2g}× as high as in the 20 before" in row["finding"]


def test_no_step_where_there_is_none(tmp_path: Path) -> None:
    values = noise(4000, seed=14)
    run = write_trace(tmp_path / "r", **series(values, syncs(list(range(299, 3900, 300)))))
    assert na.load(run).event_steps(window=20)["p_value"][0] > 0.05


def test_event_profile_is_the_average_of_values_over_their_pre_event_median(tmp_path: Path) -> None:
    values = noise(3000, seed=15)
    events = [499, 1199, 1999, 2499]
    for e in events:
        values[e + 2] += 1.0
    run = write_trace(tmp_path / "r", **series(values, syncs(events), per_epoch=100))
    profile = na.load(run).event_profile(window=5)
    v = values.astype(np.float32).astype(np.float64)
    base = np.array([np.median(v[e - 4 : e + 1]) for e in events])
    real = profile.filter(pl.col("kind") == "event")
    assert real["offset"].to_list() == list(range(-5, 6))
    for row in real.iter_rows(named=True):
        ratio = np.array([v[e + row["offset"]] for e in events]) / base
        assert row["events"] == 4
        assert row["mean"] == pytest.approx(ratio.mean(), rel=1e-9)
        assert row["median"] == pytest.approx(np.median(ratio), rel=1e-9)
        assert (row["p25"], row["p75"]) == pytest.approx(tuple(np.percentile(ratio, [25, 75])), rel=1e-9)
        half = 1.96 * ratio.std(ddof=1) / 2
        assert (row["ci_lo"], row["ci_hi"]) == pytest.approx(
            (ratio.mean() - half, ratio.mean() + half), rel=1e-9
        )
    peak = real.filter(pl.col("offset") == 2).row(0, named=True)
    assert peak["mean"] > 1.05
    placebo = profile.filter(pl.col("kind") == "placebo")
    assert placebo["events"].max() == 29 - 4  # 29 epoch boundaries, 4 of them the events


def test_cluster_gap_and_jitter_exclusion_follow_their_documented_formulas() -> None:
    # merge_gap: max(event window, half the baseline window, rounded down); exclusion: window + that half
    assert (
        alignment.merge_gap(5, 21) == 10
        and alignment.merge_gap(12, 21) == 12
        and alignment.merge_gap(3, 7) == 3
    )
    assert (
        alignment.exclusion(5, 21) == 15
        and alignment.exclusion(5, 20) == 15
        and alignment.exclusion(1, 3) == 2
    )


def test_steps_of_a_noiseless_series_are_measured_in_a_millionth_of_its_level(tmp_path: Path) -> None:
    # Levels 10, 11, 12, 13, 14 then flat: the first four of six events raise the level by 1 (three
    # passes after the event, inside its window), the last two change nothing. Without noise the robust
    # SD is 1e-6 x the median |value|, so the median step over events (1) is 1 / (1e-6 x that median).
    events = [100, 200, 300, 400, 500, 600]
    level = np.full(700, 10.0)
    for k, at in enumerate(events[:4]):
        level[at + 3 :] = 11.0 + k
    run = write_trace(tmp_path / "r", **series(level, syncs(events, per_epoch=100), per_epoch=100))
    row = na.load(run).event_steps("target_update", window=20).row(0, named=True)
    assert row["events"] == 6
    assert row["steps_up"] == 4  # the two flat events are not steps up
    assert row["step"] == pytest.approx(1.0 / (1e-6 * np.median(level)), rel=1e-9)
    ratios = sorted([11 / 10, 12 / 11, 13 / 12, 14 / 13, 1.0, 1.0])
    assert row["step_change"] == pytest.approx((ratios[2] + ratios[3]) / 2 - 1, rel=1e-9)


def test_a_series_with_a_single_spike_cluster_is_tested(tmp_path: Path) -> None:
    # One spike, three passes after the third of ten syncs: one cluster, one event followed. A single
    # cluster is evidence (weak: p is large) and must get a p-value, not be left untested.
    values = noise(2000, seed=4)
    at = list(range(150, 2000, 200))
    values[at[2] + 3] = 30.0
    run = write_trace(tmp_path / "r", **series(values, syncs(at)))
    row = na.load(run).event_alignment(window=10).row(0, named=True)
    assert row["clusters"] == 1 and row["events_followed"] == 1 and row["events"] == len(at)
    assert row["p_value"] is not None and 0 < row["p_value"] <= 1


def test_the_coincidence_share_is_that_of_the_series_with_fewer_clusters(tmp_path: Path) -> None:
    """``p``'s two clusters both start at clusters of ``q``, which has six: one excursion seen in two
    layers (2 of 2), though only 2 of ``q``'s 6 are shared."""
    q = [500, 1000, 1600, 2300, 2900, 3400]
    run = modules_trace(tmp_path / "r", {"p": [1000 + 3, 2900 - 4], "q": q})
    groups = na.load(run).spike_groups()
    assert groups.columns == ["run", "rank", "module", "split", "group", "size", "clusters", "shared"]
    assert groups.select("module", "group", "size", "clusters").rows() == [("p", 0, 2, 2), ("q", 0, 2, 6)]
    assert groups["shared"].to_list() == pytest.approx([1.0, 2 / 6])


def test_spike_groups_follow_their_tolerance_and_threshold(tmp_path: Path) -> None:
    shared = [400, 900, 1500, 2200, 3100]
    run = modules_trace(tmp_path / "r", {"a": shared, "b": [p + 2 for p in shared]})
    trace = na.load(run)
    assert trace.spike_groups()["size"].to_list() == [2, 2]  # 2 passes apart: within the default 5
    apart = trace.spike_groups(tolerance=1)
    assert apart.select("module", "group", "size", "shared").rows() == [("a", 0, 1, 0.0), ("b", 1, 1, 0.0)]
    assert trace.spike_groups(threshold=1e6).height == 0
    assert trace.spike_clusters(threshold=1e6).height == 0
    assert trace.spike_clusters().height == 10


def test_spike_groups_are_numbered_largest_first(tmp_path: Path) -> None:
    shared = [400, 900, 1500, 2200, 3100]
    spikes = {"a": [700, 1800, 2600], "b": shared, "c": [p + 1 for p in shared]}
    groups = na.load(modules_trace(tmp_path / "r", spikes)).spike_groups()
    assert groups.select("module", "group", "size").rows() == [("b", 0, 2), ("c", 0, 2), ("a", 1, 1)]


def test_a_step_needs_a_level_at_or_before_the_position_and_a_later_one_within_the_window() -> None:
    """``_Levels.step`` by construction: trailing medians 1..5 at passes 10, 11, 12, 13, 20, scale 2."""
    lv = alignment._Levels(
        at=np.array([10, 11, 12, 13, 20]), value=np.zeros(5), before=np.arange(1.0, 6.0), scale=2.0
    )
    steps, ratios = lv.step(np.array([5, 10, 12, 13]), 5)
    # 5: no level before it; 10: 1 -> 4 (at 13); 12: 3 -> 4; 13: nothing after it within 5 passes
    np.testing.assert_array_equal(steps, [np.nan, 1.5, 0.5, np.nan])
    np.testing.assert_array_equal(ratios, [np.nan, 4.0, 4 / 3, np.nan])
    steps, ratios = lv.step(np.array([13]), 7)  # 20 is within 7 passes of 13
    np.testing.assert_array_equal(steps, [0.5])


def test_finite_or_none() -> None:
    assert [alignment._finite(x) for x in (None, np.inf, -np.inf, np.nan, 2)] == [None, None, None, None, 2.0]
    assert type(alignment._finite(np.float32(2.5))) is float


def test_a_step_down_is_said_lower_in_a_sentence_naming_the_series_window_and_counts(tmp_path: Path) -> None:
    values = 10 + noise(4000, seed=16)
    events = list(range(299, 3900, 300))
    for e in events:
        values[e + 1 :] -= 0.5  # a staircase down: -5 noise SDs after every event
    run = write_trace(tmp_path / "r", **series(values, syncs(events)))
    row = na.load(run).event_steps(window=20, permutations=199).row(0, named=True)
    assert row["step"] < 0 and row["steps_up"] == 0
    sd, pct = f"{abs(row['step']):.2g}", f"{abs(100 * row['step_change']):.2g}"
    assert row["finding"].startswith(
        f"m: the median level in the 20 passes after a target_update is {sd} robust SD, {pct}% lower than "
        f"in the 20 before (median over {len(events)} events; 0 up), p "
    )
    assert row["q_value"] is not None and row["finding"].count(", q = ") == 1


def test_a_step_up_smaller_than_one_robust_sd_is_still_said_higher(tmp_path: Path) -> None:
    values = 10 + noise(4000, seed=17)
    events = list(range(299, 3900, 300))
    for e in events:
        values[e + 1 :] += 0.05  # half a noise SD after every event
    run = write_trace(tmp_path / "r", **series(values, syncs(events)))
    row = na.load(run).event_steps(window=20, permutations=199).row(0, named=True)
    assert 0 < row["step"] < 1
    assert f"{abs(row['step']):.2g} robust SD, " in row["finding"] and "% higher than" in row["finding"]


def test_event_profile_and_steps_keep_to_the_modules_asked_for(tmp_path: Path) -> None:
    events = [499, 1199, 1999, 2499]
    run = write_trace(tmp_path / "r", **series(noise(3000, seed=18), syncs(events), modules=("a", "b")))
    trace = na.load(run)
    assert set(trace.event_profile(window=5)["module"]) == {"a", "b"}
    profile = trace.event_profile(window=5, modules="b")
    assert set(profile["module"]) == {"b"} and profile.filter(pl.col("kind") == "event").height == 11
    assert trace.event_steps(window=20, permutations=99, modules="a")["module"].to_list() == ["a"]
