"""The exact binomial tail against brute-force sums of exact binomial terms."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from normtrace_analysis.stats import binom_sf


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
