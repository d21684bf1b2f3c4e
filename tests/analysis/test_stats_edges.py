"""Edges of the statistics helpers that survived mutation testing (issue 17): binom_sf's domain and its
cap at 1, Benjamini–Hochberg with a single test and with missing p-values. Expectations are exact
binomial sums in fractions and hand-worked q-values."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from normtrace_analysis.stats import bh_qvalues, binom_sf, permutation_p


def _exact_sf(k: int, n: int, p: Fraction) -> Fraction:
    return sum((math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)), Fraction(0))


@pytest.mark.parametrize("p", [-0.1, 1.5, 2.0])
def test_binom_sf_refuses_a_probability_outside_0_1(p: float) -> None:
    with pytest.raises(ValueError, match=rf"^binom_sf needs n >= 0 and 0 <= p <= 1, got n=5, p={p}$"):
        binom_sf(2, 5, p)


def test_binom_sf_is_never_above_1() -> None:
    """At p = 0.99 the terms summed in floating point exceed 1 by a few ulps (k = 1, n = 9: the exact
    tail is 1 - 1e-18); a probability is capped at 1."""
    for n in range(1, 40):
        for k in range(1, n + 1):
            got = binom_sf(k, n, 0.99)
            assert got <= 1.0
            assert got == pytest.approx(float(_exact_sf(k, n, Fraction(99, 100))), rel=1e-12)


def test_bh_with_a_single_test_is_its_p_value() -> None:
    assert bh_qvalues([0.03]).tolist() == [0.03]
    q = bh_qvalues([np.nan, 0.2, np.nan])
    assert np.isnan(q[[0, 2]]).all() and q[1] == 0.2


def test_bh_treats_missing_p_values_as_no_test() -> None:
    """None (a null from a Polars column's to_list) is NaN: m = 2, q = (0.01 x 2 / 1, 0.04 x 2 / 2)."""
    q = bh_qvalues([0.01, None, 0.04])
    assert q[0] == pytest.approx(0.02) and np.isnan(q[1]) and q[2] == pytest.approx(0.04)


def test_permutation_p_gives_nan_for_a_missing_observation_and_names_a_bad_alternative() -> None:
    null = np.array([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    p = permutation_p([2, None], null)  # None: a null from a Polars column's to_list
    assert p[0] == pytest.approx((1 + 2) / 5) and np.isnan(p[1])
    with pytest.raises(ValueError, match=r"^alternative must be 'greater' or 'two-sided', not 'less'$"):
        permutation_p([2.0, 1.0], null, alternative="less")
