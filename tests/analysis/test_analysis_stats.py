"""The statistics helpers against direct computations: exact binomial sums, closed forms, loops, a
hand-worked Benjamini–Hochberg example."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from normtrace_analysis.stats import bh_qvalues, binom_sf, clopper_pearson, permutation_p


def _exact_sf(k: int, n: int, p: Fraction) -> float:
    """P(X >= k) in exact rational arithmetic, rounded once at the end."""
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(max(k, 0), n + 1)))


@pytest.mark.parametrize("n", [0, 1, 2, 5, 12, 30])
@pytest.mark.parametrize("p", [Fraction(1, 100), Fraction(1, 5), Fraction(1, 2), Fraction(9, 10)])
def test_small_n_matches_brute_force(n: int, p: Fraction) -> None:
    for k in range(-1, n + 2):
        assert binom_sf(k, n, float(p)) == pytest.approx(_exact_sf(k, n, p), rel=1e-12, abs=1e-300)


@pytest.mark.parametrize(
    ("k", "n", "p"),
    [
        (40, 200, Fraction(1, 5)),
        (120, 200, Fraction(1, 5)),
        (1, 500, Fraction(1, 1000)),
        (300, 2000, Fraction(1, 10)),
    ],
)
def test_large_n_and_tiny_tails_keep_relative_precision(k: int, n: int, p: Fraction) -> None:
    assert binom_sf(k, n, float(p)) == pytest.approx(_exact_sf(k, n, p), rel=1e-9)


def test_closed_forms() -> None:
    assert binom_sf(10, 10, 0.3) == pytest.approx(0.3**10, rel=1e-12)
    assert binom_sf(1, 10, 0.3) == pytest.approx(1 - 0.7**10, rel=1e-12)
    assert binom_sf(3, 10, 0.0) == 0.0 and binom_sf(3, 10, 1.0) == 1.0 and binom_sf(0, 10, 0.0) == 1.0
    # Symmetry of Binomial(n, 1/2): P(X >= n/2 + 1) = (1 - P(X = n/2)) / 2.
    n = 100_000
    middle = math.exp(math.lgamma(n + 1) - 2 * math.lgamma(n // 2 + 1) - n * math.log(2))
    assert binom_sf(n // 2 + 1, n, 0.5) == pytest.approx((1 - middle) / 2, rel=1e-9)


def test_rejects_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        binom_sf(1, 5, 1.5)
    with pytest.raises(ValueError):
        binom_sf(1, -1, 0.5)


# ---------------------------------------------------------------------------------------------------------
# Clopper–Pearson, permutation p-values, Benjamini–Hochberg


def test_clopper_pearson_closed_forms_and_definition() -> None:
    # k = 0 and k = n have closed forms: (0, 1 - (a/2)^(1/n)) and ((a/2)^(1/n), 1).
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.025 ** (1 / 10)), abs=1e-9)
    assert clopper_pearson(18, 18) == pytest.approx((0.025 ** (1 / 18), 1.0), abs=1e-9)
    # A textbook value (3 of 10: 0.0667–0.6525), and the defining tail equations.
    lo, hi = clopper_pearson(3, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.0667, 0.6525)
    for k, n in [(3, 10), (1, 73), (17, 60), (59, 60)]:
        lo, hi = clopper_pearson(k, n, 0.9)
        assert binom_sf(k, n, lo) == pytest.approx(0.05, abs=1e-9)
        assert 1 - binom_sf(k + 1, n, hi) == pytest.approx(0.05, abs=1e-9)
    with pytest.raises(ValueError):
        clopper_pearson(3, 2)


def test_permutation_p_counts_the_observed_as_one_arrangement() -> None:
    rng = np.random.default_rng(0)
    null = rng.integers(0, 6, (4, 99)).astype(float)
    observed = np.array([0.0, 3.0, 5.0, 9.0])
    p = permutation_p(observed, null)
    two = permutation_p(observed, null, "two-sided")
    for i in range(4):
        up = (1 + sum(1 for t in null[i] if t >= observed[i])) / 100
        down = (1 + sum(1 for t in null[i] if t <= observed[i])) / 100
        assert p[i] == pytest.approx(up)
        assert two[i] == pytest.approx(min(1.0, 2 * min(up, down)))
    assert p[3] == pytest.approx(1 / 100)  # the floor: no resample does as well
    assert np.isnan(permutation_p(np.nan, null[0]))


def test_bh_q_values_by_hand() -> None:
    # Sorted: 0.005, 0.01, 0.03, 0.04 (m = 4) -> 0.02, 0.02, 0.04, 0.04, then the running minimum
    # from the top; NaN is no test and does not count in m.
    q = bh_qvalues([0.01, 0.04, 0.03, 0.005, np.nan])
    assert q[:4] == pytest.approx([0.02, 0.04, 0.04, 0.02]) and np.isnan(q[4])
    assert bh_qvalues([0.2, 0.8]) == pytest.approx([0.4, 0.8])
    assert bh_qvalues([0.9, 0.95, 0.99]) == pytest.approx([0.99, 0.99, 0.99])  # monotone, capped at 1
    assert bh_qvalues([]).size == 0
