"""The spike detector at its edges, against planted ground truth: a dip's peak, flags at the boundary
between two series, and the parallel path (frames cut into parts at series boundaries)."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import normtrace_analysis as na
import normtrace_analysis.errors as errors_module
import normtrace_analysis.spikes as spikes_module
import numpy as np
import polars as pl
import pytest
from normtrace_analysis import charts
from normtrace_analysis.summary import summary_key
from polars.testing import assert_frame_equal
from tracegen import write_trace


def _outputs(series: dict[str, np.ndarray]) -> dict:
    """One training-pass series per module, passes 0..n-1 each, epochs of 100 passes."""
    modules, passes, values = [], [], []
    for name, v in series.items():
        modules += [name] * len(v)
        passes.append(np.arange(len(v)))
        values.append(v)
    p = np.concatenate(passes)
    return {
        "pass": p,
        "epoch": (p // 100).astype(np.int32),
        "module": modules,
        "norm": np.concatenate(values).astype(np.float32),
    }


def _noise(n: int, seed: int) -> np.ndarray:
    values = 10.0 + 0.1 * np.random.default_rng(seed).standard_normal(n)
    assert np.abs(values - 10.0).max() < 0.55  # no point of the noise alone is a spike
    return values


def test_a_dip_is_reported_at_its_deepest_point(tmp_path: Path) -> None:
    """Scores -30, -50, -20 SDs: the peak is the largest |score| (pass 1001), not the largest signed
    score (pass 1002, the shallowest)."""
    values = _noise(3000, seed=1)
    values[1000:1003] -= np.array([3.0, 5.0, 2.0])
    run = write_trace(tmp_path / "r", outputs=_outputs({"m": values}))
    rows = na.load(run).spikes().rows(named=True)
    assert [(r["pass"], r["points"]) for r in rows] == [(1001, 3)]
    assert rows[0]["value"] == pytest.approx(values[1001], rel=1e-6)
    assert rows[0]["score"] < -30
    # the module-level function's own defaults: outputs, at level "pass"
    assert spikes_module.spikes(na.load(run)).select("pass", "points").rows() == [(1001, 3)]


def test_flags_on_either_side_of_a_series_boundary_are_separate_spikes(tmp_path: Path) -> None:
    """Each series' first and last points are spikes: where one series ends and the next begins in the
    detector's frame, two flagged rows are adjacent but belong to different series."""
    series = {}
    for i, name in enumerate(["a", "b", "c"]):
        v = _noise(600, seed=10 + i)
        v[[0, -1]] += 3.0
        series[name] = v
    run = write_trace(tmp_path / "r", outputs=_outputs(series))
    trace = na.load(run)
    found = trace.spikes().sort("module", "pass")
    assert found.select("module", "pass", "points").rows() == [
        (m, p, 1) for m in ["a", "b", "c"] for p in [0, 599]
    ]
    # memoised per module filter: one filter's answer is not another's
    assert trace.spikes(modules=["b"]).select("module", "pass").rows() == [("b", 0), ("b", 599)]
    assert trace.spikes(modules="c").select("module", "pass").rows() == [("c", 0), ("c", 599)]


def test_series_shorter_than_the_window_are_counted_in_a_warning(tmp_path: Path) -> None:
    """Window 51: a series of 50 points is short, one of 51 is not; the warning counts the short ones
    among all and gives the shortest length, in points at level "pass", in epochs at level "epoch"."""
    series = {"a": _noise(50, seed=30), "b": _noise(51, seed=31), "c": _noise(500, seed=32)}
    trace_dir = write_trace(tmp_path / "r", outputs=_outputs(series))
    trace = na.load(trace_dir)
    with pytest.warns(na.ShortSeriesWarning) as caught:
        trace.spikes()
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(
        "1 of 3 series have fewer points (50 at least) than the spike detector's baseline window of 51"
    )
    assert message.endswith("use a smaller baseline_window")
    # pointed at the caller's line, not inside the package (the caller is this file, or mutmut's
    # trampoline when mutmut runs this test). Unless mutmut is mutating errors.py itself: its trampoline
    # then sits between caller_stacklevel and the frames it counts, so no stacklevel can be right.
    if not hasattr(errors_module, "x_caller_stacklevel__mutmut_orig"):
        assert "normtrace_analysis" not in Path(caught[0].filename).parts, caught[0].filename
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a window of 11 points: no series is short
        na.load(trace_dir).spikes(baseline_window=11)  # a fresh Trace: nothing memoised
    with pytest.warns(na.ShortSeriesWarning) as caught:
        trace.spikes(level="epoch")  # 1, 1 and 5 epochs of 100 passes, window 11: all three short
    (message,) = [str(w.message) for w in caught]
    assert message.startswith("3 of 3 series have fewer epochs (1 at least) than the spike detector's")
    assert message.endswith("use level='pass' (CLI: --level pass)")


def test_the_smallest_baseline_window_is_3(tmp_path: Path) -> None:
    values = _noise(200, seed=3)
    values[100] += (
        2.0  # 20 SDs (a window of 3 flags noise too: a point is its own median a third of the time)
    )
    trace = na.load(write_trace(tmp_path / "r", outputs=_outputs({"m": values})))
    assert 100 in trace.spikes(baseline_window=3)["pass"].to_list()
    with pytest.raises(ValueError, match=r"^baseline_window must be at least 3 points, got 2$"):
        trace.spikes(baseline_window=2)


def _rms_score(deviation: float, window_deviations: list[float], points: int = 204) -> float:
    """The score of ``deviation`` where the MAD is 0: over the root mean square deviation of the scale's
    span (17 blocks of 12 points at the default window of 51)."""
    return deviation / np.sqrt(sum(d * d for d in window_deviations) / points)


@pytest.mark.parametrize("threshold", [0.0, -1.0, float("nan"), float("inf")])
def test_a_threshold_that_flags_every_point_or_none_is_refused(tmp_path: Path, threshold: float) -> None:
    """At 0 or below every point is a spike, at NaN or infinity none: refused, in the spikes and in the
    alignment built on them."""
    trace = na.load(write_trace(tmp_path / "r", outputs=_outputs({"m": _noise(100, seed=1)})))
    message = rf"^threshold must be a positive number of robust SDs, got {threshold!r}$"
    with pytest.raises(ValueError, match=message):
        trace.spikes(threshold=threshold)
    with pytest.raises(ValueError, match=message):
        trace.event_alignment("sync", threshold=threshold)


def test_a_flat_series_does_not_flag_rounding_but_flags_a_jump(tmp_path: Path) -> None:
    """MAD 0 (every block's median deviation is 0): the scale is the root mean square deviation, but
    never under 1e-4 of the baseline (0.01 at 100), so a deviation of 1e-5 relative (score ~0.1) is not a
    spike while a jump to 150 is, scored against the deviations of the 204 points around it (blocks 33-49:
    the jump and three points of 100.001)."""
    values = np.full(1000, 100.0)
    values[::50] = 100.001  # one point in 50: every block's median deviation stays 0
    values[500] = 150.0
    found = na.load(write_trace(tmp_path / "r", outputs=_outputs({"m": values}))).spikes()
    assert found.select("pass", "points").rows() == [(500, 1)]
    small = float(np.float32(100.001)) - 100.0  # as the trace holds it
    assert found["score"][0] == pytest.approx(_rms_score(50.0, [50.0] + [small] * 3), rel=1e-6)


def test_an_all_zero_series_gives_a_finite_score_to_a_jump(tmp_path: Path) -> None:
    """Baseline 0 and MAD 0: the scale is the root mean square deviation of the 204 points around the
    jump, so its score is finite (sqrt(204)) and says how rare it is; ±inf is for NaN and Inf only."""
    values = np.zeros(300)
    values[100] = 1.0
    found = na.load(write_trace(tmp_path / "r", outputs=_outputs({"m": values}))).spikes()
    assert found["pass"].to_list() == [100]
    assert found["score"][0] == pytest.approx(_rms_score(1.0, [1.0]), rel=1e-12)


def test_missing_values_are_left_out_of_the_rms_deviation(tmp_path: Path) -> None:
    """Where the MAD is 0, the root mean square deviation counts the values there are: a gap of 30 NaN
    values (each a spike of its own) in the span of the jump leaves 174 of its 204 points."""
    values = np.zeros(300)
    values[100] = 1.0
    values[140:170] = np.nan
    found = na.load(write_trace(tmp_path / "r", outputs=_outputs({"m": values}))).spikes()
    jump = found.filter(pl.col("pass") == 100)
    assert jump["score"].to_list() == pytest.approx([_rms_score(1.0, [1.0], points=174)], rel=1e-12)
    assert found.filter(pl.col("pass") != 100)["points"].to_list() == [30]  # the gap, one run of flags


def test_quantised_values_flag_rare_changes_not_frequent_ones(tmp_path: Path) -> None:
    """A dead-unit fraction of 32 units: 0 at most passes, so its MAD is 0, and the scale is the root mean
    square deviation, which no more than 1 point in 36 can exceed six times. One unit dead at one pass
    in twenty is how it goes, not a spike; one unit dead at a single pass is rare, and scored against
    that deviation (sqrt(204)), not against a floor of 0 (a score of 1e298)."""
    rng = np.random.default_rng(5)
    often = np.where(rng.random(1000) < 0.05, 1 / 32, 0.0)
    once = np.zeros(1000)
    once[600] = 1 / 32
    trace = na.load(write_trace(tmp_path / "r", outputs=_outputs({"often": often, "once": once})))
    found = trace.spikes()
    assert found.select("module", "pass").rows() == [("once", 600)]
    assert found["score"][0] == pytest.approx(_rms_score(1 / 32, [1 / 32]), rel=1e-6)


@pytest.mark.parametrize(
    ("level", "lengths"), [("pass", [20, 30, 52, 60, 80, 99, 150]), ("epoch", [6, 8, 15, 22, 30])]
)
def test_noise_in_series_too_short_for_a_rolling_scale_is_not_flagged(
    tmp_path: Path, level: str, lengths: list[int]
) -> None:
    """Series shorter than about two baseline windows have too few blocks for a rolling MAD; their scale
    is the median of their blocks' MADs. Noise then gives no spike (the scale used to fall to its floor,
    1e-4 of the baseline, and flag nearly every point), and a point 30 SDs off still does."""
    rng = np.random.default_rng(12)
    per = 1 if level == "pass" else 100  # passes per epoch: epoch means of 100 passes are the points
    series = {f"n{n}": 10.0 + 0.1 * rng.standard_normal(n * per) for n in lengths}
    planted = f"n{lengths[-3]}"  # long enough for a baseline (half a window and one point)
    series[planted + "x"] = series[planted].copy()
    series[planted + "x"][len(series[planted]) // 2] += 3.0 * (1 if per == 1 else per)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", na.ShortSeriesWarning)
        found = na.load(write_trace(tmp_path / "r", outputs=_outputs(series))).spikes(level=level)
    assert found["module"].to_list() == [planted + "x"]
    assert found["points"].to_list() == [1]


def test_a_score_equal_to_the_threshold_is_not_a_spike(tmp_path: Path) -> None:
    """Flagged when |score| > threshold, strictly: at a threshold equal to a spike's own |score| (taken
    from a first search at a lower threshold) that spike is gone and the stronger one stays."""
    values = _noise(2000, seed=41)
    values[[500, 1500]] += [1.5, 3.0]
    run = write_trace(tmp_path / "r", outputs=_outputs({"m": values}))
    first = na.load(run).spikes().sort("pass")
    assert first["pass"].to_list() == [500, 1500]
    weaker = abs(first["score"][0])
    assert na.load(run).spikes(threshold=weaker)["pass"].to_list() == [1500]


def test_a_point_without_a_baseline_is_not_flagged(tmp_path: Path) -> None:
    """10 finite values, then NaN: no window holds the 26 finite points a baseline needs, so the finite
    points get no score and are no spike; the NaN run is one spike at its first point."""
    values = np.full(100, np.nan)
    values[:10] = 10.0 + np.arange(10)
    found = na.load(write_trace(tmp_path / "r", outputs=_outputs({"m": values}))).spikes()
    assert found.select("pass", "points").rows() == [(10, 90)]


def test_events_are_matched_within_their_own_rank_and_rows_come_in_series_order(tmp_path: Path) -> None:
    run = tmp_path / "r"
    for rank, (event_pass, spikes_at) in enumerate([(495, [300, 800]), (None, [600])]):
        series = {}
        for i, name in enumerate(["b", "a"]):
            v = _noise(1000, seed=50 + 2 * rank + i)
            v[spikes_at] += 3.0
            series[name] = v
        events = None
        if event_pass is not None:
            events = {"epoch": [event_pass // 100], "pass": [event_pass], "name": ["target_update"]}
        write_trace(run, outputs=_outputs(series), events=events, rank=rank)
    found = na.load(run).spikes()
    assert found.select("rank", "module", "pass", "event", "lag_passes").rows() == [
        (0, "a", 300, None, None),
        (0, "a", 800, "target_update", 305),
        (0, "b", 300, None, None),
        (0, "b", 800, "target_update", 305),
        (1, "a", 600, None, None),  # rank 1 recorded no event: rank 0's is not its
        (1, "b", 600, None, None),
    ]
    epochs = na.load(run).spikes(level="epoch", baseline_window=3)
    assert epochs.schema["lag_passes"] == pl.Int64 and epochs["lag_passes"].is_null().all()


def _two_modules(tmp_path: Path) -> Path:
    """Modules ``a`` and ``b``, noise around 10 with one spike each, over 3 epochs."""
    a, b = _noise(300, 1), _noise(300, 2)
    a[150], b[220] = 30.0, 25.0
    return write_trace(tmp_path / "r", outputs=_outputs({"a": a, "b": b}))


def test_spikes_of_every_module_leave_the_whole_epoch_summary_memoised(tmp_path: Path) -> None:
    run = _two_modules(tmp_path)
    trace = na.load(run)
    trace.spikes()
    assert trace.is_cached(summary_key("outputs"))  # computed on the side: the report reads the table once
    assert_frame_equal(trace.epoch_summary(), na.load(run).epoch_summary())


def test_spikes_of_some_modules_do_not_memoise_a_summary_of_those_modules_only(tmp_path: Path) -> None:
    run = _two_modules(tmp_path)
    trace = na.load(run)
    found = trace.spikes(modules=["a"])
    assert found["module"].to_list() == ["a"] and found["pass"].to_list() == [150]
    assert trace.epoch_summary()["module"].unique().sort().to_list() == ["a", "b"]
    assert_frame_equal(trace.epoch_summary(), na.load(run).epoch_summary())


def test_an_output_module_named_like_a_log_scaled_signal_kind_is_scored_on_its_values(tmp_path: Path) -> None:
    values = _noise(300, 3)
    values[150] = 30.0
    run = write_trace(tmp_path / "r", outputs=_outputs({"grad_norm": values, "plain": values.copy()}))
    found = na.load(run).spikes().sort("module")
    assert found["module"].to_list() == ["grad_norm", "plain"]
    named, plain = found.row(0, named=True), found.row(1, named=True)
    # the same values give the same score: only signals of LOG_KINDS are scored on log10
    assert named["score"] == plain["score"] and named["baseline"] == plain["baseline"]


@pytest.mark.parametrize("threads", [2, 3])
def test_frames_scored_in_parallel_parts_give_the_planted_spikes_and_the_same_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    planted = {f"m{i}": 40 + 37 * i for i in range(7)}  # one spike per module, at its own pass
    series = {}
    for i, (name, at) in enumerate(planted.items()):
        values = _noise(400 + 50 * i, 10 + i)  # series of different lengths: parts cut unevenly
        values[at] = 40.0
        series[name] = values
    run = write_trace(tmp_path / "r", outputs=_outputs(series), shards=1)  # one piece, one frame
    whole = na.load(run).spikes().sort("module")
    calls: list[int] = []
    score = spikes_module._Detector._score

    def counted(self: object, cols: dict, rows: np.ndarray, *rest: object) -> object:
        calls.append(len(rows) - 1)  # series in this part
        return score(self, cols, rows, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(spikes_module, "PART_ROWS", 500)  # the frame (3,850 rows) is cut into parts
    monkeypatch.setattr(spikes_module.pl, "thread_pool_size", lambda: threads)
    monkeypatch.setattr(spikes_module._Detector, "_score", counted)
    parts = na.load(run).spikes().sort("module")
    assert len(calls) == threads and sum(calls) == len(planted)  # one part per thread, every series once
    assert dict(zip(parts["module"], parts["pass"], strict=True)) == planted
    assert_frame_equal(parts, whole)


@pytest.mark.parametrize("piece_rows", [97, 150, 400])
def test_runs_of_missing_values_across_pieces_carry_the_same_medians(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece_rows: int
) -> None:
    from normtrace_analysis import series as series_module

    a, b = _noise(1200, 21), _noise(900, 22)
    a[300:390] = np.nan  # longer than a window: the median before it is carried over the gap
    a[391] = 30.0  # a spike right after the gap: scored against the carried baseline and scale
    a[700:703] = np.inf
    a[705] = 25.0
    b[100:400] = np.nan  # a gap spanning several pieces
    b[250] = b[330] = 10.0  # ordinary values alone in the gap: not spikes, they cut its run in three
    b[450] = 28.0
    b[899] = 40.0  # the last point of a series
    run = write_trace(tmp_path / "r", outputs=_outputs({"a": a, "b": b}), shards=42)  # 50 rows a shard
    whole = na.load(run).spikes()
    monkeypatch.setattr(series_module, "CHUNK_ROWS", piece_rows)
    pieces = na.load(run).spikes()
    assert_frame_equal(pieces, whole)
    spikes_of = {m: whole.filter(pl.col("module") == m)["pass"].to_list() for m in ("a", "b")}
    assert 391 in spikes_of["a"] and 705 in spikes_of["a"] and 700 in spikes_of["a"]
    assert spikes_of["b"] == [100, 251, 331, 450, 899]
    # a run of missing values is reported with the median carried from before the gap (noise around 10),
    # also where the run starts in a piece that holds no value before it
    gaps = whole.filter((pl.col("module") == "b") & pl.col("pass").is_in([100, 251, 331]))
    assert gaps["baseline"].to_list() == pytest.approx([10.0] * 3, abs=0.1)


@pytest.mark.parametrize("level", ["pass", "epoch"])
def test_a_modules_argument_matching_no_module_is_refused_naming_those_recorded(
    tmp_path: Path, level: str
) -> None:
    """A typo in ``modules=`` must not read as "no spikes": the analyses that take it refuse it."""
    values = _noise(300, 3)
    values[150] = 40.0
    events = {"epoch": [1, 2], "pass": [100, 200], "name": ["sync", "sync"]}
    run = write_trace(
        tmp_path / "r", outputs=_outputs({"net.0": values, "net.2": _noise(300, 4)}), events=events
    )
    trace = na.load(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", na.ShortSeriesWarning)  # 3 epochs
        whole = trace.spikes(level=level)
        assert trace.spikes(level=level, modules="net.0").equals(whole.filter(pl.col("module") == "net.0"))
        for modules in ("encoder", ["net.1"]):
            with pytest.raises(
                na.EmptySelectionError, match=r"no module of the outputs table; it holds: net\.0, net\.2$"
            ) as e:
                trace.spikes(level=level, modules=modules)
            assert str(e.value).startswith(f"modules={modules!r} matches") and e.value.path == run
            for method, args in (
                (trace.event_alignment, ("sync",)),
                (trace.event_steps, ("sync",)),
                (trace.event_profile, ("sync",)),
                (trace.spike_clusters, ()),
                (trace.spike_groups, ()),
                (functools.partial(charts.event_profile, trace), ("sync",)),
            ):
                with pytest.raises(na.EmptySelectionError, match="matches no module"):
                    method(*args, level=level, modules=modules)


def test_a_table_without_series_is_refused_naming_those_with_series(tmp_path: Path) -> None:
    run = write_trace(tmp_path / "r", outputs=_outputs({"a": _noise(100, 5)}))
    with pytest.raises(
        ValueError, match="^spike detection works on 'outputs' or 'params' or 'signals', not 'metrics'$"
    ):
        na.load(run).spikes("metrics")  # type: ignore[arg-type]


@pytest.mark.parametrize("window", [50, 51])
def test_baselines_are_the_medians_of_full_centred_windows_whatever_the_window_parity(window: int) -> None:
    """On values float32 holds exactly (the recorder's norms) the centred rolling median of every full
    window is the middle value (odd window) or the two middle values' midpoint ``lo + (hi - lo) / 2``
    taken in float64 (even window): the float32 fast path must not round an even window's midpoint."""
    x = np.random.default_rng(5).lognormal(size=1000).astype(np.float32).astype(np.float64)
    n, half = len(x), window // 2
    before = window - 1 - half  # points before p in p's window
    one = np.array([0])
    got = spikes_module._centred_median(
        x, np.array([0, n]), one, one, np.array([n]), np.array([np.nan]), window
    )
    windows = np.sort(np.lib.stride_tricks.sliding_window_view(x, window), axis=1)  # row i: p = i + before
    lo, hi = windows[:, (window - 1) // 2], windows[:, window // 2]
    want = lo + (hi - lo) / 2
    full = np.arange(before, n - half)
    assert got[full].tolist() == want[: len(full)].tolist()
    if window % 2 == 0:  # the midpoints are not float32 numbers: a float32 median would round them
        assert (want != want.astype(np.float32)).mean() > 0.25
