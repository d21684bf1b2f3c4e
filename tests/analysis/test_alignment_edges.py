"""The event tests' helpers at their edges, against values known by construction (issue 17)."""

from __future__ import annotations

from pathlib import Path

import normtrace_analysis as na
import numpy as np
import pytest
from normtrace_analysis.alignment import exclusion, merge_gap
from tracegen import write_trace


def test_cluster_gap_and_jitter_exclusion_follow_their_documented_formulas() -> None:
    # merge_gap: max(event window, half the baseline window, rounded down); exclusion: window + that half
    assert merge_gap(5, 21) == 10 and merge_gap(12, 21) == 12 and merge_gap(3, 7) == 3
    assert exclusion(5, 21) == 15 and exclusion(5, 20) == 15 and exclusion(1, 3) == 2


def test_steps_of_a_noiseless_series_are_measured_in_a_millionth_of_its_level(tmp_path: Path) -> None:
    # Levels 10, 11, 12, 13, 14 then flat: the first four of six events raise the level by 1 (three
    # passes after the event, inside its window), the last two change nothing. Without noise the robust
    # SD is 1e-6 x the median |value|, so the median step over events (1) is 1 / (1e-6 x that median).
    events = [100, 200, 300, 400, 500, 600]
    level = np.full(700, 10.0)
    for k, at in enumerate(events[:4]):
        level[at + 3 :] = 11.0 + k
    outputs = {
        "pass": np.arange(700),
        "epoch": (np.arange(700) // 100).astype(np.int32),
        "module": ["m"] * 700,
        "norm": level.astype(np.float32),
    }
    ev = {"pass": events, "epoch": np.array([e // 100 for e in events], dtype=np.int32), "name": ["sync"] * 6}
    steps = na.load(write_trace(tmp_path / "r", outputs=outputs, events=ev)).event_steps("sync", window=20)
    row = steps.row(0, named=True)
    assert row["events"] == 6
    assert row["steps_up"] == 4  # the two flat events are not steps up
    assert row["step"] == pytest.approx(1.0 / (1e-6 * np.median(level)), rel=1e-9)
    ratios = sorted([11 / 10, 12 / 11, 13 / 12, 14 / 13, 1.0, 1.0])
    assert row["step_change"] == pytest.approx((ratios[2] + ratios[3]) / 2 - 1, rel=1e-9)


def test_a_series_with_a_single_spike_cluster_is_tested(tmp_path: Path) -> None:
    # One spike, three passes after the third of ten syncs: one cluster, one event followed. A single
    # cluster is evidence (weak: p is large) and must get a p-value, not be left untested.
    values = 10.0 + 0.1 * np.random.default_rng(4).standard_normal(2000)
    syncs = list(range(150, 2000, 200))
    values[syncs[2] + 3] = 30.0
    events = {"epoch": [(p + 1) // 10 for p in syncs], "pass": syncs, "name": ["target_update"] * len(syncs)}
    outputs = {
        "pass": np.arange(2000),
        "epoch": (np.arange(2000) // 10).astype(np.int32),
        "module": ["m"] * 2000,
        "norm": values.astype(np.float32),
    }
    row = (
        na.load(write_trace(tmp_path / "r", outputs=outputs, events=events))
        .event_alignment(window=10)
        .row(0, named=True)
    )
    assert row["clusters"] == 1 and row["events_followed"] == 1 and row["events"] == len(syncs)
    assert row["p_value"] is not None and 0 < row["p_value"] <= 1
