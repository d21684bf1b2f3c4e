"""The sentences of event alignment: numbers, units and p-values as a finding writes them, and whole findings
built from rows whose every value is chosen here, so each expected sentence is known by construction."""

from __future__ import annotations

from typing import Any

import pytest
from normtrace_analysis import alignment


@pytest.mark.parametrize(
    ("x", "text"),
    [
        (0.0, "0"),
        (1.0, "1"),
        (0.31, "0.31"),
        (0.012345, "0.012"),
        (0.001, "0.001"),
        (1e-4, "0.0001"),  # the smallest written out
        (2.345e-5, "2.3e-05"),
        (123.4, "120"),
    ],
)
def test_numbers_have_two_significant_digits_written_out_down_to_1e_4(x: float, text: str) -> None:
    assert alignment._num(x) == text


@pytest.mark.parametrize(("x", "text"), [(2.46, "2.5×"), (9.94, "9.9×"), (123.4, "123×")])
def test_factors_have_two_significant_digits_below_10_and_none_after_the_point_above(
    x: float, text: str
) -> None:
    assert alignment._times(x) == text


@pytest.mark.parametrize(("x", "text"), [(0.0512, "5.1%"), (0.05, "5%"), (0.5, "50%")])
def test_shares_are_percentages_with_two_significant_digits(x: float, text: str) -> None:
    assert alignment._pct(x) == text


@pytest.mark.parametrize(
    ("window", "level", "unit"),
    [(1, "pass", "pass"), (2, "pass", "passes"), (1, "epoch", "epoch"), (3, "epoch", "epochs")],
)
def test_units_are_singular_for_a_window_of_one(window: int, level: str, unit: str) -> None:
    assert alignment._unit(window, level) == unit


@pytest.mark.parametrize(
    ("p", "text"),
    [
        (0.01, "p ≤ 0.01 (permutation floor)"),
        (0.01 * (1 + 1e-12), "p ≤ 0.01 (permutation floor)"),  # the floor, up to rounding
        (0.015, "p = 0.015"),
        (0.019, "p = 0.019"),  # under twice the floor: not the floor
    ],
)
def test_a_p_value_at_its_floor_names_the_floor(p: float, text: str) -> None:
    assert alignment.format_p(p, 0.01) == text


def _setup(level: str = "pass", permutations: int = 999) -> alignment._Setup:
    return alignment._setup("outputs", level, None, None, None, permutations)  # type: ignore[arg-type]


def _row(**values: Any) -> dict[str, Any]:
    """An event_alignment row: one series "net.0" of a single run and rank, with the given values."""
    row: dict[str, Any] = {
        "run": "r",
        "rank": 0,
        "module": "net.0",
        "split": "train",
        "window": 20,
        "spikes": 12,
        "clusters": 5,
        "events": 40,
        "events_followed": 9,
        "chance": 0.0512,
        "enrichment": 4.39,
        "enrichment_lo": 2.11,
        "enrichment_hi": 7.86,
        "p_value": 0.0011,
        "p_floor": 0.001,
        "q_value": 0.0034,
        "placebo_events": 30,
        "placebo_followed": 2,
        "placebo_chance": 0.05,
        "placebo_p": 0.4,
    }
    return row | values


def _finding(row: dict[str, Any], placebo: bool = True, level: str = "pass") -> str:
    return alignment._finding(row, "target_update", _setup(level), False, False, placebo)


def test_a_finding_with_chance_enrichment_interval_q_and_placebo() -> None:
    assert _finding(_row()) == (
        "net.0: 9 of 40 target_update events are followed by a spike within 20 passes "
        "(chance 5.1%, 4.4× [2.1×–7.9×]), p = 0.0011, q = 0.0034; its 12 spikes form 5 clusters. "
        "Placebo, the other epoch boundaries: 2 of 30 followed (chance 5%, p = 0.4)"
    )


def test_a_finding_without_an_interval_q_or_placebo() -> None:
    row = _row(enrichment_lo=None, enrichment_hi=None, q_value=None, placebo_events=0)
    assert _finding(row) == (
        "net.0: 9 of 40 target_update events are followed by a spike within 20 passes "
        "(chance 5.1%, 4.4×), p = 0.0011; its 12 spikes form 5 clusters"
    )
    assert _finding(_row(), placebo=False).endswith("its 12 spikes form 5 clusters")


def test_a_finding_where_no_jittered_train_was_followed() -> None:
    row = _row(
        window=1,
        spikes=1,
        clusters=1,
        events=10,
        events_followed=1,
        chance=0.0,
        enrichment=None,
        enrichment_lo=None,
        enrichment_hi=None,
        p_value=0.002,
        p_floor=0.002,
        placebo_chance=0.0,
        placebo_p=0.002,
        placebo_followed=0,
    )
    assert _finding(row) == (
        "net.0: 1 of 10 target_update events are followed by a spike within 1 pass "
        "(chance ≈ 0 in 999 jittered trains), p ≤ 0.002 (permutation floor), q = 0.0034; its 1 spike forms "
        "1 cluster. Placebo, the other epoch boundaries: 0 of 30 followed (p ≤ 0.002 (permutation floor))"
    )


def test_findings_without_spikes_or_without_events() -> None:
    assert _finding(_row(spikes=0)) == "net.0: no spikes detected, so nothing to align with target_update"
    assert _finding(_row(spikes=1, events=0)) == (
        "net.0: 1 spike, but no target_update events were recorded in its span"
    )
    assert _finding(_row(spikes=2, events=0)) == (
        "net.0: 2 spikes, but no target_update events were recorded in its span"
    )
    assert _finding(_row(spikes=2, clusters=2)).endswith(
        "its 2 spikes form 2 clusters. "
        + ("Placebo, the other epoch boundaries: 2 of 30 followed (chance 5%, p = 0.4)")
    )


def test_a_finding_names_the_split_and_the_epoch_unit() -> None:
    text = _finding(_row(split="no_grad", window=2), level="epoch")
    assert text.startswith(
        "net.0 (no_grad passes): 9 of 40 target_update events are followed by a spike within 2 epochs "
    )


@pytest.mark.parametrize(
    ("table", "row", "name"),
    [
        ("outputs", {"module": "net.0"}, "net.0"),
        ("params", {"module": "net.0", "param": "weight"}, "net.0.weight"),
        ("signals", {"kind": "grad_norm", "module": "net.0", "param": "weight"}, "grad_norm of net.0.weight"),
        ("signals", {"kind": "dead_units", "module": "net.1", "param": None}, "dead_units of net.1"),
        ("signals", {"kind": "loss_scale", "module": "", "param": None}, "loss_scale of the model"),
    ],
)
def test_series_are_named_as_sentences_name_them(table: str, row: dict[str, Any], name: str) -> None:
    assert alignment.series_name(row, table) == name


def test_labels_add_the_split_the_rank_and_the_run() -> None:
    row = {"run": "r1", "rank": 1, "module": "net.0", "param": "weight", "split": "no_grad"}
    assert alignment._label(row, "outputs", False, False) == "net.0 (no_grad passes)"
    assert alignment._label(row | {"split": "train"}, "outputs", False, False) == "net.0"
    assert alignment._label(row, "outputs", True, True) == "r1: net.0 (no_grad passes) on rank 1"
    params = {k: v for k, v in row.items() if k != "split"}  # params have no split
    assert alignment._label(params, "params", True, False) == "r1: net.0.weight"
