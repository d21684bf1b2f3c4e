"""The command line's argument types and text helpers, each against values known by construction."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest
from normtrace_analysis.cli import (
    _one_line,
    _option,
    _positive,
    _positive_number,
    _range,
    _spread,
    _text_table,
    _windows,
)

ACCEPTED = [
    (_range, "3", (3, 3)), (_range, "10:", (10, None)), (_range, ":50", (None, 50)), (_range, "2:5", (2, 5)),
    (_range, ":", (None, None)), (_range, "-2:-1", (-2, -1)),
    (_windows, "5,20,50", [5, 20, 50]), (_windows, "5, 20", [5, 20]), (_windows, "5,,20,", [5, 20]),
    (_windows, "1", [1]),
    (_option, "a=b", ("a", "b")), (_option, "a=", ("a", "")), (_option, "k=v=w", ("k", "v=w")),
    (_positive, "1", 1), (_positive, "2", 2), (_positive, "999", 999),
    (_positive_number, "6", 6.0), (_positive_number, "0.5", 0.5), (_positive_number, "1e3", 1000.0),
]  # fmt: skip
"""Each argument type, a text it accepts and the value it gives."""

REFUSED = {
    _range: ("expected LO:HI with integers", ["a:b", "1:x", "x", "1.5", ""]),
    _windows: ("expected positive integers separated by commas", ["0,5", "5,-1", "x", "", ",", "5,x"]),
    _option: ("expected KEY=VALUE", ["=b", "ab", ""]),
    _positive: ("expected a positive integer", ["0", "-3", "x", "1.5", ""]),
    _positive_number: ("expected a positive number", ["0", "-1", "nan", "inf", "x", ""]),
}
"""Each argument type, what its error says, and texts it refuses."""


@pytest.mark.parametrize(("parse", "text", "expected"), ACCEPTED)
def test_argument_types_read_what_they_accept(
    parse: Callable[[str], object], text: str, expected: object
) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("parse", "text"), [(parse, text) for parse, (_, texts) in REFUSED.items() for text in texts]
)
def test_argument_types_refuse_bad_text_naming_it(parse: Callable[[str], object], text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as err:
        parse(text)
    assert str(err.value) == f"{REFUSED[parse][0]}, got {text!r}"


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
