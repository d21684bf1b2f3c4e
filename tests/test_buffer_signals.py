"""``signals`` records to Arrow: every row's strings and value where its record put them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normtrace import schema
from normtrace.buffer import signals_table

KINDS = ("grad_norm", "grad_norm", "grad_norm")
KEYS = (("a", "weight"), ("a", "bias"), ("", None))


def rows(records, rank=0):
    table = signals_table(records, rank)
    assert table.schema == schema.SIGNALS
    return table.to_pylist()


def test_records_sharing_kinds_and_keys_objects_give_every_row_in_order():
    records = [
        (3, 10, 1, KINDS, KEYS, torch.tensor([1.0, 2.0, 3.0])),
        (4, 12, 1, ("x",), (("m", None),), [7.5]),  # plain floats between two tensor records
        (5, 14, 2, KINDS, KEYS, torch.tensor([4.0, 5.0, 6.0])),
    ]
    got = rows(records, rank=2)
    want = [
        (3, 10, 1, "grad_norm", "a", "weight", 1.0),
        (3, 10, 1, "grad_norm", "a", "bias", 2.0),
        (3, 10, 1, "grad_norm", "", None, 3.0),
        (4, 12, 1, "x", "m", None, 7.5),
        (5, 14, 2, "grad_norm", "a", "weight", 4.0),
        (5, 14, 2, "grad_norm", "a", "bias", 5.0),
        (5, 14, 2, "grad_norm", "", None, 6.0),
    ]
    assert [
        (r["step"], r["pass"], r["epoch"], r["kind"], r["module"], r["param"], r["value"]) for r in got
    ] == want
    assert {r["rank"] for r in got} == {2}


def test_equal_strings_in_distinct_objects_and_a_string_in_several_columns():
    records = [
        (0, 0, 0, ["w", "w"], [("w", "w"), ("v", None)], [1.0, 2.0]),
        (0, 1, 0, ["w", "v"], [("v", "w"), ("w", "v")], np.array([3.0, 4.0])),
        (0, 2, 0, ("k",), (("", ""),), torch.tensor(5.0)),  # a 0-d tensor for one row
    ]
    got = [(r["kind"], r["module"], r["param"], r["value"]) for r in rows(records)]
    assert got == [
        ("w", "w", "w", 1.0),
        ("w", "v", None, 2.0),
        ("w", "v", "w", 3.0),
        ("v", "w", "v", 4.0),
        ("k", "", "", 5.0),
    ]


def test_only_plain_values_and_no_records():
    assert [r["value"] for r in rows([(1, 1, 0, ("k", "k"), (("m", "p"), ("m", "q")), (0.25, -1.5))])] == [
        0.25,
        -1.5,
    ]
    assert rows([]) == []


@pytest.mark.parametrize(
    "values, message",
    [
        (torch.tensor([1.0, 2.0]), "has 3 keys and 2 values"),
        ([1.0, 2.0, 3.0, 4.0], "has 3 keys and 4 values"),
    ],
)
def test_a_record_whose_values_do_not_match_its_keys_is_refused_naming_its_kinds(values, message):
    good = (0, 0, 0, KINDS, KEYS, torch.tensor([1.0, 2.0, 3.0]))
    bad = (1, 1, 0, KINDS, KEYS, values)
    with pytest.raises(ValueError, match=rf"kinds \['grad_norm'\] {message}"):
        signals_table([good, bad, good], 0)


def test_a_record_with_more_kinds_than_keys_is_refused():
    with pytest.raises(ValueError, match="has 2 kinds and 1 keys"):
        signals_table([(0, 0, 0, ("a", "b"), (("m", None),), [1.0])], 0)


def test_one_values_object_under_two_keys_objects_keeps_each_records_keys():
    """Strings are coded per (kinds, keys) object pair: a lens passing the same tensor for two modules
    (with the same kinds object) must still get each record's own module."""
    kinds, value = ("max",), torch.tensor([2.0])
    records = [(0, 0, 0, kinds, (("a", None),), value), (0, 0, 0, kinds, (("b", None),), value)]
    assert [(r["module"], r["value"]) for r in rows(records)] == [("a", 2.0), ("b", 2.0)]


def test_keys_built_anew_with_equal_contents_and_unhashable_keys_keep_every_rows_strings():
    """Records whose kinds and keys are new objects each time (a user lens building them per call) are
    coded by their contents; keys given as lists of lists (unhashable) are coded as they come. Both are
    interleaved with reused objects, whose rows must stay theirs."""
    records = []
    for i in range(4):
        records.append((i, i, 0, ("out",), ((f"m{i % 2}", None),), torch.tensor([float(i)])))  # new tuples
        records.append((i, i, 0, KINDS, KEYS, torch.tensor([10.0 * i, 10.0 * i + 1, 10.0 * i + 2])))
        records.append((i, i, 0, ["lst", "lst"], [["p", "w"], ["q", None]], [100.0 + i, 200.0 + i]))
    got = [(r["step"], r["kind"], r["module"], r["param"], r["value"]) for r in rows(records)]
    want = []
    for i in range(4):
        want.append((i, "out", f"m{i % 2}", None, float(i)))
        want += [(i, "grad_norm", m, p, 10.0 * i + j) for j, (m, p) in enumerate(KEYS)]
        want += [(i, "lst", "p", "w", 100.0 + i), (i, "lst", "q", None, 200.0 + i)]
    assert got == want


def test_values_of_several_shapes_in_one_flush_keep_their_order():
    """1-d, 2-d (flattened row-major) and 0-d tensor values mixed in one flush: each row gets its value."""
    k2, k4 = ("a", "a"), ("b",) * 4
    keys2, keys4 = (("x", None), ("y", None)), tuple((f"z{j}", None) for j in range(4))
    records = [
        (0, 0, 0, k2, keys2, torch.tensor([1.0, 2.0])),
        (1, 1, 0, k4, keys4, torch.tensor([[3.0, 4.0], [5.0, 6.0]])),
        (2, 2, 0, ("c",), (("w", None),), torch.tensor(7.0)),
        (3, 3, 0, k2, keys2, torch.tensor([8.0, 9.0])),
    ]
    assert [r["value"] for r in rows(records)] == [float(v) for v in range(1, 10)]
    assert [r["module"] for r in rows(records)] == ["x", "y", "z0", "z1", "z2", "z3", "w", "x", "y"]


def test_plain_values_of_two_records_that_are_equal_keep_each_records_keys():
    """Records coded by contents must be keyed by their kinds and keys, never by their values: two
    records with the same kinds object, different keys objects and equal plain values keep their own
    modules."""
    kinds = ("max",)
    records = [(0, 0, 0, kinds, (("a", None),), [2.0]), (0, 0, 0, kinds, (("b", None),), [2.0])]
    assert [(r["module"], r["value"]) for r in rows(records)] == [("a", 2.0), ("b", 2.0)]


def test_plain_values_nested_as_a_matrix_are_flattened_in_row_order():
    keys = tuple((f"m{j}", None) for j in range(4))
    assert [r["value"] for r in rows([(0, 0, 0, ("k",) * 4, keys, [[1.0, 2.0], [3.0, 4.0]])])] == [
        1.0,
        2.0,
        3.0,
        4.0,
    ]
