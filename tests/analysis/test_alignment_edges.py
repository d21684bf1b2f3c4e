"""Event alignment at its edges: epoch level, events at a series' ends, runs and ranks kept apart, findings
worded for exact steps. Every expectation is computed here with numpy or known by construction."""

from __future__ import annotations

import warnings
from pathlib import Path

import normtrace_analysis as na
import numpy as np
import polars as pl
import pytest
from alignment_traces import layer_signal, modules_trace, noise, series, syncs
from normtrace_analysis import alignment
from tracegen import write_trace


def _robust_noise(values: np.ndarray) -> float:
    d = np.diff(values)
    return 1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2)


# ---------------------------------------------------------------------------------------------------------
# spike_clusters and spike_groups: arguments reach the detector and the merge gap


def test_module_functions_default_to_the_outputs_at_pass_level(tmp_path: Path) -> None:
    trace = na.load(modules_trace(tmp_path / "r", {"a": [300, 1000], "b": [302, 2000]}))
    assert alignment.spike_clusters(trace).equals(trace.spike_clusters("outputs", level="pass"))
    assert alignment.spike_groups(trace).equals(trace.spike_groups("outputs", level="pass"))
    assert alignment.spike_clusters(trace)["onset"].to_list() == [300, 1000, 302, 2000]


def test_the_merge_gap_follows_the_event_window_and_the_baseline_window(tmp_path: Path) -> None:
    # Spikes 10 and 50 passes apart: the default gap max(20, 51 // 2) = 25 merges the first two only;
    # window=80 gives a gap of 80, baseline_window=201 one of max(20, 100) = 100: both merge all three.
    at = [300, 310, 360, 1000]
    trace = na.load(modules_trace(tmp_path / "r", {"a": at, "b": [p + 1 for p in at]}))
    a = pl.col("module") == "a"
    assert trace.spike_clusters().filter(a)["onset"].to_list() == [300, 360, 1000]
    assert trace.spike_clusters(window=80).filter(a)["onset"].to_list() == [300, 1000]
    assert trace.spike_clusters(baseline_window=201).filter(a)["onset"].to_list() == [300, 1000]
    assert trace.spike_clusters(baseline_window=201).filter(a)["spikes"].to_list() == [3, 1]
    assert trace.spike_groups()["clusters"].to_list() == [3, 3]
    assert trace.spike_groups(window=80)["clusters"].to_list() == [2, 2]
    assert trace.spike_groups(baseline_window=201)["clusters"].to_list() == [2, 2]


# ---------------------------------------------------------------------------------------------------------
# spike_groups: which series are linked, and their order


def test_the_share_is_taken_from_the_series_with_fewer_clusters_whichever_comes_first(tmp_path: Path) -> None:
    # "a" (first) has five clusters, "b" two, both at clusters of "a": 2 of b's 2 (linked), 2 of a's 5.
    shared = [400, 900, 1500, 2200, 3100]
    groups = na.load(modules_trace(tmp_path / "r", {"a": shared, "b": [902, 2201]})).spike_groups()
    assert groups.select("module", "group", "size", "clusters").rows() == [("a", 0, 2, 5), ("b", 0, 2, 2)]
    assert groups["shared"].to_list() == pytest.approx([2 / 5, 1.0])


def test_half_the_clusters_shared_is_enough_to_link(tmp_path: Path) -> None:
    # "a" has two clusters, one of them at a cluster of "b": exactly half (COINCIDENCE) links them.
    groups = na.load(
        modules_trace(tmp_path / "r", {"a": [400, 1500], "b": [402, 2500, 3000, 3500]})
    ).spike_groups()
    assert alignment.COINCIDENCE == 0.5
    assert groups.select("module", "group", "size").rows() == [("a", 0, 2), ("b", 0, 2)]
    assert groups["shared"].to_list() == pytest.approx([0.5, 0.25])


def test_with_equal_cluster_counts_the_first_series_share_decides(tmp_path: Path) -> None:
    # A wide tolerance (150) lets two of a's clusters (400, 600) fall near one of b's (500): 2 of a's 3
    # clusters are shared, 1 of b's 3. With equal counts the share of the first series is used: linked.
    trace = na.load(modules_trace(tmp_path / "r", {"a": [400, 600, 2400], "b": [500, 3000, 3600]}))
    groups = trace.spike_groups(tolerance=150)
    assert groups.select("module", "group", "size").rows() == [("a", 0, 2), ("b", 0, 2)]
    assert groups["shared"].to_list() == pytest.approx([2 / 3, 1 / 3])


@pytest.mark.parametrize("hub", ["h", "z"])
def test_a_series_linked_to_two_others_counts_the_clusters_shared_with_either(
    tmp_path: Path, hub: str
) -> None:
    # The hub's first two clusters are shared with one series, its last two with another: all four are
    # shared. The hub comes first ("h") or last ("z") of the three series.
    shared = [400, 900, 1500, 2200]
    spikes = {hub: shared, "x": [402, 902], "y": [1502, 2202]}
    groups = na.load(modules_trace(tmp_path / "r", dict(sorted(spikes.items())))).spike_groups()
    rows = {r["module"]: r for r in groups.iter_rows(named=True)}
    assert {r["size"] for r in rows.values()} == {3}
    assert rows[hub]["shared"] == 1.0 and rows["x"]["shared"] == 1.0 and rows["y"]["shared"] == 1.0


def test_eight_series_with_spikes_are_eight_rows_numbered_in_module_order(tmp_path: Path) -> None:
    # As many rows as columns (8), no series linked: each is its own group, numbered by module (the tie
    # rule: the group of the first member first).
    names = [f"m{i}" for i in range(8)]
    spikes = {name: [300 + 400 * i] for i, name in enumerate(names)}
    groups = na.load(modules_trace(tmp_path / "r", spikes)).spike_groups()
    assert groups.width == 8
    assert groups.select("module", "group", "size", "clusters", "shared").rows() == [
        (name, i, 1, 1, 0.0) for i, name in enumerate(names)
    ]


def test_series_of_different_runs_are_never_grouped(tmp_path: Path) -> None:
    # Run r2's "a" has its clusters where run r1's "b" has them: same passes, different runs, no link.
    r1 = {"a": [400, 900, 1500], "b": [700, 1800, 2600]}
    r2 = {"a": [701, 1801, 2602], "b": [3000, 3300, 3600]}
    modules_trace(tmp_path / "r1", r1)
    modules_trace(tmp_path / "r2", r2, seed=30)
    groups = na.load([tmp_path / "r1", tmp_path / "r2"]).spike_groups()
    assert groups.select("run", "module", "group", "size").rows() == [
        ("r1", "a", 0, 1),
        ("r1", "b", 1, 1),
        ("r2", "a", 0, 1),
        ("r2", "b", 1, 1),
    ]


def test_series_of_different_ranks_are_never_grouped(tmp_path: Path) -> None:
    modules_trace(tmp_path / "r", {"a": [400, 900, 1500], "b": [700, 1800, 2600]})
    modules_trace(tmp_path / "r", {"a": [701, 1801, 2602], "b": [3000, 3300, 3600]}, seed=30, rank=1)
    groups = na.load(tmp_path / "r").spike_groups()
    assert groups.select("rank", "module", "group", "size").rows() == [
        (0, "a", 0, 1),
        (0, "b", 1, 1),
        (1, "a", 0, 1),
        (1, "b", 1, 1),
    ]


# ---------------------------------------------------------------------------------------------------------
# event_steps and event_profile at epoch level


def _epoch_trace(path: Path, per_epoch: int = 10, epochs: int = 300) -> tuple[Path, np.ndarray, list[int]]:
    """Noise with a step of +0.2 (about six epoch-mean SDs) after every 30th epoch boundary; returns the
    run, the epoch means (as recorded: float32 values) and the events' positions (the epoch before the
    one each opens)."""
    values = noise(per_epoch * epochs, seed=31)
    opened = list(range(30, epochs, 30))
    for k in opened:
        values[k * per_epoch :] += 0.2
    run = write_trace(
        path, **series(values, syncs([k * per_epoch - 1 for k in opened], per_epoch), per_epoch)
    )
    means = values.astype(np.float32).astype(np.float64).reshape(epochs, per_epoch).mean(axis=1)
    return run, means, [k - 1 for k in opened]


def test_steps_at_epoch_level_compare_epoch_means(tmp_path: Path) -> None:
    run, m, positions = _epoch_trace(tmp_path / "r")
    w = 3
    row = na.load(run).event_steps(level="epoch", window=w, permutations=199).row(0, named=True)
    before = np.array([np.median(m[x - w + 1 : x + 1]) for x in positions])
    after = np.array([np.median(m[x + 1 : x + w + 1]) for x in positions])
    assert row["events"] == len(positions) and row["steps_up"] == len(positions)
    assert row["step"] == pytest.approx(np.median(after - before) / _robust_noise(m), rel=1e-6)
    assert row["step_change"] == pytest.approx(np.median(after / before) - 1, rel=1e-6)
    assert row["finding"].startswith("m: the median level in the 3 epochs after a target_update is ")


def test_profile_at_epoch_level_divides_epoch_means_by_the_pre_event_median(tmp_path: Path) -> None:
    run, m, positions = _epoch_trace(tmp_path / "r")
    w = 2
    profile = na.load(run).event_profile(level="epoch", window=w)
    assert set(profile["kind"]) == {"event"}  # the placebo uses epoch boundaries: pass level only
    assert profile["offset"].to_list() == list(range(-w, w + 1))
    for row in profile.iter_rows(named=True):
        ratio = [m[x + row["offset"]] / np.median(m[x - w + 1 : x + 1]) for x in positions]
        assert row["events"] == len(positions)
        assert row["mean"] == pytest.approx(np.mean(ratio), rel=1e-9)


# ---------------------------------------------------------------------------------------------------------
# event_profile at a series' ends, its types and its order


def _profile_by_hand(v: np.ndarray, events: list[int], w: int) -> dict[int, list[float]]:
    """Per offset, the values at event + offset over the median of the w values up to the event (those
    recorded: the series covers passes 0 .. len(v) - 1)."""
    out: dict[int, list[float]] = {}
    for k in range(-w, w + 1):
        out[k] = [v[e + k] / np.median(v[max(0, e - w + 1) : e + 1]) for e in events if 0 <= e + k < len(v)]
    return out


def test_profile_of_events_at_the_first_and_the_last_recorded_pass(tmp_path: Path) -> None:
    # Events at pass 0 (the pre-event median is that one value) and two passes before the end: offsets
    # past either end have no value, so fewer events contribute there.
    v = 10.0 + np.arange(100) % 7  # distinct values, no spike
    events = [0, 50, 97]
    run = write_trace(tmp_path / "r", **series(v, syncs(events), per_epoch=100))
    profile = na.load(run).event_profile(window=5, placebo=False)
    assert profile["offset"].to_list() == list(range(-5, 6))
    vv = v.astype(np.float32).astype(np.float64)
    for (k, ratios), row in zip(
        _profile_by_hand(vv, events, 5).items(), profile.iter_rows(named=True), strict=True
    ):
        assert row["offset"] == k and row["events"] == len(ratios)
        assert row["mean"] == pytest.approx(np.mean(ratios), rel=1e-12)
        assert row["median"] == pytest.approx(np.median(ratios), rel=1e-12)
    assert profile.filter(pl.col("offset") == 0)["events"].item() == 3
    assert profile.filter(pl.col("offset") == 3)["events"].item() == 2  # 97 + 3 is past the last pass


def test_profile_where_one_event_contributes_has_no_interval_and_none_is_null_not_nan(tmp_path: Path) -> None:
    v = 10.0 + np.arange(100) % 7
    run = write_trace(tmp_path / "r", **series(v, syncs([97]), per_epoch=100))
    profile = na.load(run).event_profile(window=5, placebo=False)
    assert profile.schema["events"] == pl.Int64
    assert profile["events"].to_list() == [1] * 8 + [0] * 3
    floats = ["mean", "ci_lo", "ci_hi", "median", "p25", "p75"]
    assert profile.select(pl.col(floats).is_nan().any()).row(0) == (False,) * 6
    one = profile.filter(pl.col("events") == 1)
    assert one["ci_lo"].null_count() == one.height and one["mean"].null_count() == 0
    assert profile.filter(pl.col("events") == 0).select(floats).null_count().row(0) == (3,) * 6


def test_profile_with_no_event_in_the_series_span_is_empty_with_its_columns(tmp_path: Path) -> None:
    run = write_trace(tmp_path / "r", **series(noise(500), syncs([4000])))
    profile = na.load(run).event_profile(window=5, placebo=False)
    assert profile.height == 0
    assert profile.schema == pl.Schema(
        {
            "run": pl.String,
            "rank": pl.Int32,
            "module": pl.String,
            "split": pl.String,
            "kind": pl.String,
            "offset": pl.Int64,
            "events": pl.Int64,
            "mean": pl.Float64,
            "ci_lo": pl.Float64,
            "ci_hi": pl.Float64,
            "median": pl.Float64,
            "p25": pl.Float64,
            "p75": pl.Float64,
        }
    )


def test_profile_rows_are_ordered_by_series_then_kind_then_offset(tmp_path: Path) -> None:
    run = write_trace(
        tmp_path / "r", **series(noise(3000, seed=5), syncs([499, 1199, 1999]), modules=("b", "a"))
    )
    profile = na.load(run).event_profile(window=3)
    offsets = list(range(-3, 4))
    assert profile.select("module", "kind", "offset").rows() == [
        (m, kind, k) for m in ("a", "b") for kind in ("event", "placebo") for k in offsets
    ]


# ---------------------------------------------------------------------------------------------------------
# event_steps: a series with a single point, and findings for exact steps


def test_a_series_recorded_once_has_too_few_points_for_a_step(tmp_path: Path) -> None:
    s = series(noise(1000, 1), syncs([199, 499, 799]))
    out = s["outputs"]
    out = {k: np.append(out[k], 500).astype(out[k].dtype) for k in ("pass", "epoch", "norm")}
    out["module"] = np.append(s["outputs"]["module"], "once")
    run = write_trace(tmp_path / "r", outputs=out, events=s["events"])
    rows = {
        r["module"]: r for r in na.load(run).event_steps(window=20, permutations=99).iter_rows(named=True)
    }
    assert rows["m"]["p_value"] is not None
    assert rows["once"]["p_value"] is None and rows["once"]["step"] is None
    assert rows["once"]["finding"] == "once: too few points around the target_update events to compare levels"


def _steps_trace(path: Path, before: float, after: float, **kw) -> Path:
    """A noiseless level ``before`` that is ``after`` for 40 passes after each of ten events."""
    v = np.full(4000, before)
    events = list(range(299, 3000, 300))
    for e in events:
        v[e + 1 : e + 41] = after
    return write_trace(path, **series(v, syncs(events)), **kw)


@pytest.mark.parametrize(
    ("before", "after", "said"),
    [
        (10.0, 20.0, " robust SD higher, 2× as high as in the 20 before"),  # doubled: change exactly 1
        (10.0, 25.0, " robust SD higher, 2.5× as high as in the 20 before"),  # change 1.5
        (10.0, 18.0, " robust SD, 80% higher than in the 20 before"),
        (10.0, 5.0, " robust SD, 50% lower than in the 20 before"),
        (0.0, 1.0, " robust SD higher than in the 20 before"),  # no ratio from a level of 0
        (10.0, 10.0, "is the same as in the 20 before"),  # no step at all: no direction
    ],
)
def test_the_finding_words_an_exact_step(tmp_path: Path, before: float, after: float, said: str) -> None:
    row = na.load(_steps_trace(tmp_path / "r", before, after)).event_steps(window=20).row(0, named=True)
    assert row["steps_up"] == (10 if after > before else 0)
    change = None if before == 0 else after / before - 1
    assert row["step_change"] == (None if change is None else pytest.approx(change, rel=1e-12))
    assert said in row["finding"]
    assert ("%" in row["finding"]) == (change is not None and 0 < abs(change) < 1)


def test_levels_of_zero_give_no_numpy_warnings(tmp_path: Path) -> None:
    # A level of 0 before the events: after / before divides by zero; a level of 0 throughout gives
    # 0 / 0. Those are NaN or None in the results, never a RuntimeWarning for the user.
    for name, after in (("up", 1.0), ("flat", 0.0)):
        trace = na.load(_steps_trace(tmp_path / name, 0.0, after))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            steps = trace.event_steps(window=20)
            profile = trace.event_profile(window=5)
        assert steps["step_change"].item() is None
        assert profile.filter(pl.col("kind") == "event")["events"].max() == 0  # every base is 0: no ratio


def test_a_window_of_one_pass_is_said_in_the_singular(tmp_path: Path) -> None:
    row = na.load(_steps_trace(tmp_path / "r", 10.0, 20.0)).event_steps(window=1).row(0, named=True)
    assert "the median level in the 1 pass after a target_update is " in row["finding"]
    assert " in the 1 before (median over 10 events; 10 up)" in row["finding"]


def test_step_findings_name_the_split_the_rank_and_the_run(tmp_path: Path) -> None:
    for name in ("r1", "r2"):
        for rank in (0, 1):
            s = series(noise(2000, seed=rank), syncs([299, 899, 1499]))
            s["outputs"]["grad_enabled"] = np.zeros(2000, dtype=bool)  # passes under no_grad
            write_trace(tmp_path / name, rank=rank, **s)
    findings = na.load([tmp_path / "r1", tmp_path / "r2"]).event_steps(window=20, permutations=99)["finding"]
    assert [f.split(": the median")[0] for f in findings] == [
        f"{run}: m (no_grad passes) on rank {rank}" for run in ("r1", "r2") for rank in (0, 1)
    ]


# ---------------------------------------------------------------------------------------------------------
# event_steps: its p-value by brute force, its arguments and its memo


def _trailing_median(v: np.ndarray, at: int, w: int) -> float:
    return float(np.median(v[max(0, at - w + 1) : at + 1]))


def _median_step(v: np.ndarray, positions: np.ndarray, w: int, scale: float) -> float:
    """The median over positions x of (median over (x, x + w] - median over (x - w, x]) / scale, where the
    later median is read at the last pass at or before x + w; positions with no pass after them skipped."""
    steps = []
    for x in positions:
        if 0 <= x < len(v) - 1:
            after = _trailing_median(v, min(x + w, len(v) - 1), w)
            steps.append((after - _trailing_median(v, x, w)) / scale)
    return float(np.median(steps)) if steps else np.nan


@pytest.mark.parametrize(
    ("kwargs", "seed", "baseline"), [({}, 0, 51), ({"seed": 3, "baseline_window": 401}, 3, 401)]
)
def test_step_p_value_is_the_brute_force_two_sided_count(
    tmp_path: Path, kwargs: dict, seed: int, baseline: int
) -> None:
    values = noise(3000, seed=40)
    events = np.arange(299, 2800, 300)
    for e in events:
        values[e + 1 :] += 0.02  # a fifth of a noise SD after every event: p in mid range
    run = write_trace(tmp_path / "r", **series(values, syncs(events.tolist())))
    w, b = 20, 199
    row = alignment.event_steps(na.load(run), window=w, permutations=b, **kwargs).row(0, named=True)
    v = values.astype(np.float32).astype(np.float64)
    scale = _robust_noise(v)
    trains = alignment.jitter_trains(
        events,
        -w,
        2998,
        exclude=alignment.exclusion(w, baseline),
        permutations=b,
        rng=alignment._rng(seed, 0, 0),
    )
    observed = _median_step(v, events, w, scale)
    null = np.array([_median_step(v, t, w, scale) for t in trains])
    upper = (1 + np.sum(null >= observed)) / (b + 1)
    lower = (1 + np.sum(null <= observed)) / (b + 1)
    assert row["step"] == pytest.approx(observed, rel=1e-5)
    assert row["p_value"] == pytest.approx(min(1.0, 2 * min(upper, lower)))
    assert 0.02 < row["p_value"] < 1  # not at the floor: the draws matter


def test_steps_follow_the_window_asked_for_and_memoise_per_window(tmp_path: Path) -> None:
    trace = na.load(write_trace(tmp_path / "r", **series(noise(2000, seed=41), syncs([499, 999, 1499]))))
    five = trace.event_steps(window=5, permutations=99)
    assert five.schema["window"] == pl.Int64 and five["window"].item() == 5
    assert trace.event_steps(window=20, permutations=99)["window"].item() == 20
    assert "in the 5 passes after a target_update" in five["finding"].item()


def test_steps_of_a_series_whose_span_holds_no_event(tmp_path: Path) -> None:
    run = write_trace(tmp_path / "r", **series(noise(500), syncs([4000])))
    row = na.load(run).event_steps(window=20).row(0, named=True)
    assert row["events"] == 0 and row["p_value"] is None and row["step"] is None
    assert row["finding"] == "m: no target_update events were recorded in its span"


def test_profile_memoises_with_and_without_placebo_apart(tmp_path: Path) -> None:
    trace = na.load(write_trace(tmp_path / "r", **series(noise(3000, seed=5), syncs([499, 1199, 1999]))))
    assert set(trace.event_profile(window=3, placebo=False)["kind"]) == {"event"}
    assert set(trace.event_profile(window=3)["kind"]) == {"event", "placebo"}
    assert set(alignment.event_profile(trace, window=3)["kind"]) == {"event", "placebo"}  # the default


def test_profile_refuses_the_signals_table(tmp_path: Path) -> None:
    trace = na.load(write_trace(tmp_path / "r", **series(noise(300), syncs([99]))))
    with pytest.raises(ValueError) as caught:
        trace.event_profile(table="signals")
    assert str(caught.value) == (
        "event_profile does not take the signals table: its 'kind' column (event or placebo) is also a "
        "signal's key; use event_steps or event_alignment with table='signals'"
    )


def test_alignment_of_a_series_whose_span_holds_no_event_counts_none_followed(tmp_path: Path) -> None:
    values = noise(800)
    values[400] += 5
    run = write_trace(tmp_path / "r", **series(values, syncs([5000])))
    row = na.load(run).event_alignment(window=10).row(0, named=True)
    assert (row["events"], row["events_followed"], row["chance"], row["p_value"]) == (0, 0, None, None)


def test_alignment_of_a_module_level_signal(tmp_path: Path) -> None:
    # A signal without a parameter (its param is null) is one series; its spikes after the syncs count.
    n = 3000
    v = 0.5 + 0.01 * np.random.default_rng(42).standard_normal(n)
    events = list(range(199, 2800, 300))
    v[[e + 3 for e in events[:5]]] += 0.5
    run = write_trace(tmp_path / "r", signals=layer_signal(v), events=syncs(events))
    row = na.load(run).event_alignment(table="signals", window=10).row(0, named=True)
    assert row["param"] is None and row["spikes"] == 5 and row["clusters"] == 5
    assert (row["events"], row["events_followed"]) == (len(events), 5)


# ---------------------------------------------------------------------------------------------------------
# cluster_spikes


def test_clusters_are_numbered_per_series_split_at_exactly_the_gap_and_keep_the_signed_peak(
    tmp_path: Path,
) -> None:
    # Default gap 25: 300 and 325 are 25 apart, two clusters; 600 and 610 one, whose peak is the dip.
    values = {"b": noise(2000, seed=43), "a": noise(2000, seed=44)}
    values["b"][[100, 900]] += 3.0
    values["a"][[300, 325, 600]] += 3.0
    values["a"][610] -= 5.0
    outputs = {
        "pass": np.tile(np.arange(2000), 2),
        "epoch": np.tile(np.arange(2000) // 10, 2).astype(np.int32),
        "module": np.repeat(np.array(["b", "a"]), 2000),
        "norm": np.concatenate([values["b"], values["a"]]).astype(np.float32),
    }
    trace = na.load(write_trace(tmp_path / "r", outputs=outputs))
    clusters = trace.spike_clusters()
    assert clusters.select("module", "cluster", "onset", "end", "spikes").rows() == [
        ("a", 0, 300, 300, 1),
        ("a", 1, 325, 325, 1),
        ("a", 2, 600, 610, 2),
        ("b", 0, 100, 100, 1),
        ("b", 1, 900, 900, 1),
    ]
    scores = dict(
        zip(
            trace.spikes().filter(pl.col("module") == "a")["pass"],
            trace.spikes().filter(pl.col("module") == "a")["score"],
            strict=True,
        )
    )
    assert clusters["peak_score"][2] == scores[610] < 0 and abs(scores[610]) > abs(scores[600])
    assert clusters["peak_score"][0] == scores[300]


def test_cluster_spikes_sorts_the_spikes_it_is_given(tmp_path: Path) -> None:
    # cluster_spikes is public (alignment.__all__) and may be given any spikes frame: rows in any order
    # give the clusters of the rows sorted by series and pass.
    found = pl.DataFrame(
        {
            "module": ["b", "a", "a", "b", "a", "a"],
            "pass": [900, 610, 300, 100, 600, 325],
            "score": [7.0, -9.0, 8.0, 7.5, 8.5, 6.5],
        }
    )
    clusters = alignment.cluster_spikes(found, ["module"], "pass", 25)
    assert clusters.rows() == [
        ("a", 0, 300, 300, 1, 8.0),
        ("a", 1, 325, 325, 1, 6.5),
        ("a", 2, 600, 610, 2, -9.0),
        ("b", 0, 100, 100, 1, 7.5),
        ("b", 1, 900, 900, 1, 7.0),
    ]


# ---------------------------------------------------------------------------------------------------------
# event_alignment: arguments, edges of the span, the events' listing


def test_events_at_the_edges_of_a_series_span(tmp_path: Path) -> None:
    """Passes 50 .. 1049 recorded, window 10: an event counts when (e, e + 10] holds a recorded pass, so
    40 and 1048 count, 39 and 1049 do not."""
    outputs = series(noise(1000, seed=45))["outputs"] | {"pass": np.arange(50, 1050)}
    run = write_trace(tmp_path / "r", outputs=outputs, events=syncs([39, 40, 1048, 1049]))
    trace = na.load(run)
    assert trace.event_alignment(window=10)["events"].item() == 2
    assert trace.event_steps(window=10)["events"].item() == 2


def test_alignment_defaults_and_arguments(tmp_path: Path) -> None:
    values = noise(3000, seed=46)
    events = list(range(199, 2800, 300))
    values[[e + 3 for e in events[:6]]] += 3.0
    run = write_trace(tmp_path / "r", **series(values, syncs(events)))
    trace = na.load(run)
    default = alignment.event_alignment(trace)
    assert default.equals(
        trace.event_alignment("target_update", window=20, level="pass", table="outputs", placebo=True, seed=0)
    )
    assert default["placebo_events"].item() > 0 and default.schema["window"] == pl.Int64
    assert trace.event_alignment(placebo=False)["placebo_events"].item() is None  # memoised apart
    assert trace.event_alignment(threshold=1e6)["spikes"].item() == 0
    one = trace.event_alignment(permutations=1, placebo=False).row(0, named=True)
    assert one["p_floor"] == 0.5 and one["p_value"] in (0.5, 1.0)
    with pytest.raises(ValueError, match="^permutations must be at least 1, got 0$"):
        trace.event_alignment(permutations=0)
    with pytest.raises(ValueError, match="^window must be an int or a non-empty sequence of ints$"):
        trace.event_alignment(window=[])


def test_alignment_keeps_spikes_of_the_modules_asked_for_and_their_baseline(tmp_path: Path) -> None:
    # "a" has one planted spike and "b" three; baseline_window 401 gives a merge gap of 200 (one cluster
    # for b's spikes 100 apart) where the default (51: gap 25) gives three.
    trace = na.load(
        modules_trace(tmp_path / "r", {"a": [1000], "b": [500, 600, 700]}, events=syncs([497, 2000]))
    )
    rows = {r["module"]: r for r in trace.event_alignment().iter_rows(named=True)}
    assert (rows["a"]["spikes"], rows["b"]["spikes"], rows["b"]["clusters"]) == (1, 3, 3)
    assert trace.event_alignment(modules="b")["spikes"].to_list() == [3]
    assert trace.event_alignment(baseline_window=401, modules="b")["clusters"].to_list() == [1]


def test_alignment_rows_are_ordered_by_series_whatever_the_order_written(tmp_path: Path) -> None:
    # Written pass by pass as the recorder does, m9 first in every pass: the reader numbers the series
    # in the order met (m9 first). As many series as the row tuples have fields (10).
    names = [f"m{i}" for i in range(10)][::-1]
    n = 1000
    outputs = {
        "pass": np.repeat(np.arange(n), 10),
        "epoch": np.repeat(np.arange(n) // 10, 10).astype(np.int32),
        "module": np.tile(np.array(names), n),
        "norm": np.tile(noise(n, seed=47), 10).astype(np.float32),
    }
    table = na.load(write_trace(tmp_path / "r", outputs=outputs, events=syncs([199, 599]))).event_alignment(
        window=10
    )
    assert table["module"].to_list() == sorted(names)
    assert (table["events"] == 2).all() and (table["points"] == n).all()


def test_alignment_at_epoch_level_counts_epochs(tmp_path: Path) -> None:
    # The event opening epoch 300 comes after the last of the series' 100 epochs: not in its span.
    run = write_trace(tmp_path / "r", **series(noise(1000, seed=48), syncs([199, 599, 2999])))
    row = na.load(run).event_alignment(level="epoch", window=1).row(0, named=True)
    assert row["points"] == 100 and row["events"] == 2 and row["placebo_events"] is None


def test_events_are_listed_most_frequent_first_then_by_name(tmp_path: Path) -> None:
    names = ["x", "f", "b", "a", "x", "e", "c", "a", "d"]
    events = {"epoch": list(range(1, 10)), "pass": list(range(9, 90, 10)), "name": names}
    run = write_trace(tmp_path / "r", **series(noise(100), events))
    listed = [("a", 2), ("x", 2), ("b", 1), ("c", 1), ("d", 1), ("e", 1), ("f", 1)]
    assert alignment.recorded_events(na.load(run)).rows() == listed


def test_an_unrecorded_event_is_refused_naming_every_run_and_the_first_run_path(tmp_path: Path) -> None:
    for name in ("r1", "r2"):
        write_trace(tmp_path / name, **series(noise(100), {"epoch": [1], "pass": [9], "name": ["x"]}))
    with pytest.raises(na.MissingEventError) as caught:
        na.load([tmp_path / "r1", tmp_path / "r2"]).event_steps("y")
    assert str(caught.value) == "no 'y' events in r1, r2; events recorded: x (2)"
    assert caught.value.path == tmp_path / "r1"
    bare = write_trace(tmp_path / "bare", **series(noise(100)))
    with pytest.raises(na.MissingEventError) as caught:
        na.load(bare).event_steps("y")
    assert str(caught.value) == (
        "no 'y' events in bare; no events were recorded (mark them with Recorder.event(name), or "
        "track_target(module))"
    )


def test_a_filter_leaving_a_table_no_series_gives_empty_frames_of_the_usual_columns(tmp_path: Path) -> None:
    # The Trace's module filter matches the outputs' "m" but none of the signals' modules.
    n = 3000
    v = 0.5 + 0.01 * np.random.default_rng(49).standard_normal(n)
    v[[1000, 2000]] += 0.5
    run = write_trace(tmp_path / "r", signals=layer_signal(v), **series(noise(n), syncs([997, 1997])))
    whole, only_m = na.load(run), na.load(run).filter(modules="m")
    for name in ("event_alignment", "event_steps", "spike_groups", "spike_clusters"):
        kwargs = {"table": "signals"} if name.startswith("event") else {}
        args = () if kwargs else ("signals",)
        full = getattr(whole, name)(*args, **kwargs)
        empty = getattr(only_m, name)(*args, **kwargs)
        assert full.height > 0 and empty.height == 0, name
        assert empty.schema == full.schema, name


def test_clusters_and_spike_counts_use_the_baseline_window_asked_for(tmp_path: Path) -> None:
    # A plateau of +3 (30 noise SDs) for 60 passes: the detector's baseline median over 201 passes stays
    # below it (one spike, its run's peak); over the default 51 it follows the plateau (no spike).
    values = noise(4000, seed=50)
    values[1000:1060] += 3.0
    trace = na.load(write_trace(tmp_path / "r", **series(values, syncs([997, 2997]))))
    assert trace.spikes(baseline_window=201).height == 1 and trace.spikes().height == 0
    assert trace.spike_clusters(baseline_window=201)["spikes"].to_list() == [1]
    assert trace.spike_groups(baseline_window=201)["clusters"].to_list() == [1]
    assert trace.event_alignment(baseline_window=201)["spikes"].item() == 1


def test_clusters_at_epoch_level_are_of_epoch_means(tmp_path: Path) -> None:
    # Epoch 50 raised by 3 pass-noise SDs (under the threshold of 6 at pass level, about 9.5 SDs of the
    # epoch means); pass 1505 raised by 8 SDs (0.8 SDs of its epoch's mean).
    values = noise(2000, seed=51)
    values[500:510] += 0.3
    values[1505] += 0.8
    trace = na.load(write_trace(tmp_path / "r", **series(values, syncs([497]))))
    assert trace.spike_clusters(level="epoch").select("onset", "end", "spikes").rows() == [(50, 50, 1)]
    assert trace.spike_clusters().select("onset", "end", "spikes").rows() == [(1505, 1505, 1)]


def test_placebo_positions_are_the_last_pass_of_each_epoch(tmp_path: Path) -> None:
    # Every epoch's first pass is twice the level: one pass after each epoch boundary (offset 1).
    v = np.full(3000, 10.0)
    v[::10] = 20.0
    run = write_trace(tmp_path / "r", **series(v, syncs([1499])))
    placebo = na.load(run).event_profile(window=3).filter(pl.col("kind") == "placebo")
    means = dict(zip(placebo["offset"], placebo["mean"], strict=True))
    assert means == {-3: 1.0, -2: 1.0, -1: 1.0, 0: 1.0, 1: 2.0, 2: 1.0, 3: 1.0}
    # 299 boundaries in passes 0 .. 2999 (after passes 9, 19, ..., 2989), less those within 3 of 1499
    assert placebo["events"].max() == 299 - 1


def test_an_epoch_boundary_at_the_first_pass_is_a_placebo_position(tmp_path: Path) -> None:
    # Epoch 0 is pass 0 alone, then epochs of 10 passes: boundaries after passes 0, 10, ..., 990 (100),
    # the first one at the series' first pass; the event (505) is more than the window from all of them.
    n = 1001
    epochs = np.concatenate([[0], 1 + (np.arange(1, n) - 1) // 10]).astype(np.int32)
    outputs = {
        "pass": np.arange(n),
        "epoch": epochs,
        "module": np.full(n, "m"),
        "norm": noise(n).astype(np.float32),
    }
    events = {"epoch": [51], "pass": [505], "name": ["target_update"]}
    row = na.load(write_trace(tmp_path / "r", outputs=outputs, events=events)).event_alignment(window=3)
    assert row["placebo_events"].item() == 100
