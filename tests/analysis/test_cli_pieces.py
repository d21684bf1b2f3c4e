"""The command line's argument types and text helpers, each against values known by construction."""

from __future__ import annotations

import argparse

import pytest
from normtrace_analysis.cli import _one_line, _option, _positive, _range, _spread, _text_table, _windows


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3", (3, 3)), ("10:", (10, None)), (":50", (None, 50)), ("2:5", (2, 5)), (":", (None, None)),
     ("-2:-1", (-2, -1))],
)  # fmt: skip
def test_epoch_ranges(text: str, expected: tuple[int | None, int | None]) -> None:
    assert _range(text) == expected


@pytest.mark.parametrize("text", ["a:b", "1:x", "x", "1.5", ""])
def test_epoch_ranges_that_are_not_integers_are_refused_by_name(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as err:
        _range(text)
    assert str(err.value) == f"expected LO:HI with integers, got {text!r}"


@pytest.mark.parametrize(
    ("text", "expected"), [("5,20,50", [5, 20, 50]), ("5, 20", [5, 20]), ("5,,20,", [5, 20]), ("1", [1])]
)
def test_windows(text: str, expected: list[int]) -> None:
    assert _windows(text) == expected


@pytest.mark.parametrize("text", ["0,5", "5,-1", "x", "", ",", "5,x"])
def test_windows_that_are_not_positive_integers_are_refused_by_name(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as err:
        _windows(text)
    assert str(err.value) == f"expected positive integers separated by commas, got {text!r}"


@pytest.mark.parametrize(
    ("text", "expected"), [("a=b", ("a", "b")), ("a=", ("a", "")), ("k=v=w", ("k", "v=w"))]
)
def test_storage_options(text: str, expected: tuple[str, str]) -> None:
    assert _option(text) == expected


@pytest.mark.parametrize("text", ["=b", "ab", ""])
def test_storage_options_without_a_key_are_refused_by_name(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as err:
        _option(text)
    assert str(err.value) == f"expected KEY=VALUE, got {text!r}"


@pytest.mark.parametrize(("text", "expected"), [("1", 1), ("2", 2), ("999", 999)])
def test_positive_integers(text: str, expected: int) -> None:
    assert _positive(text) == expected


@pytest.mark.parametrize("text", ["0", "-3", "x", "1.5", ""])
def test_counts_below_one_or_not_integers_are_refused_by_name(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as err:
        _positive(text)
    assert str(err.value) == f"expected a positive integer, got {text!r}"


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 40, 101])
@pytest.mark.parametrize("at_most", [1, 2, 3, 8])
def test_spread_keeps_the_ends_and_spaces_the_rest_evenly(n: int, at_most: int) -> None:
    values = [10 * i for i in range(n)]
    shown = _spread(values, at_most)
    if n <= at_most:
        assert shown == values
        return
    assert len(shown) == at_most and shown == sorted(set(shown)) and set(shown) <= set(values)
    assert shown[0] == values[0]
    if at_most > 1:
        assert shown[-1] == values[-1]
        gaps = [(b - a) // 10 for a, b in zip(shown, shown[1:], strict=False)]
        exact = (n - 1) / (at_most - 1)
        assert all(abs(g - exact) <= 1 for g in gaps), gaps  # evenly, to within rounding


def test_one_line_joins_the_first_lines_of_a_message() -> None:
    assert _one_line("a\n\n  b  \nc", 4) == "a; b; c"
    assert _one_line("a\nb\nc\nd\ne", 2) == "a; b …"
    assert _one_line("a\nb\nc", 3) == "a; b; c"  # exactly keep lines: no ellipsis
    assert _one_line("left out 2 files:\n  x.arrow\n  y.arrow", 4) == "left out 2 files: x.arrow; y.arrow"
    assert _one_line(KeyError(), 4) == "KeyError"  # nothing to say: the type's name
    assert _one_line(" \n ", 1) == "str"


def test_text_tables_align_text_left_and_numbers_right() -> None:
    text = _text_table(["name", "n", "x"], [("a", 1, 0.123456), ("longer", 12345, None), ("b", None, 2.5)])
    assert text.splitlines() == [
        "name        n       x",
        "------  -----  ------",
        "a           1  0.1235",
        "longer  12345       –",
        "b           –     2.5",
    ]


def test_text_tables_leave_no_space_at_the_end_of_a_line() -> None:
    assert _text_table(["n", "name"], [(1, "a"), (12345, "longer")]).splitlines() == [
        "    n  name",
        "-----  ------",
        "    1  a",
        "12345  longer",
    ]
