"""Small statistics helpers in pure Python and numpy (no scipy): the binomial tail, the Clopper–Pearson
interval, permutation p-values and Benjamini–Hochberg q-values. Each is checked in the tests against a
direct computation (exact rational sums, hand-worked examples, brute-force loops)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the one-sided p-value of seeing ``k`` or more hits in ``n``.

    Summed term by term in log space from ``k`` upwards (each term from the previous by the ratio
    ``(n - i) / (i + 1) * p / (1 - p)``), stopping once the decreasing terms no longer change the sum,
    so tiny p-values keep full relative precision and large ``n`` stays cheap.
    """
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"binom_sf needs n >= 0 and 0 <= p <= 1, got n={n}, p={p}")
    if k <= 0:
        return 1.0
    if k > n or p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    log_term = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q
    log_ratio_pq = log_p - log_q
    mode = math.floor((n + 1) * p)
    top, total = log_term, 1.0  # running sum scaled by exp(-top)
    for i in range(k, n):
        log_term += math.log(n - i) - math.log(i + 1) + log_ratio_pq
        if log_term > top:
            total = total * math.exp(top - log_term) + 1.0
            top = log_term
        else:
            contribution = math.exp(log_term - top)
            total += contribution
            if i >= mode and contribution < 1e-17 * total:
                break
    return min(1.0, math.exp(top + math.log(total)))


@functools.lru_cache(maxsize=4096)
def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """The exact (Clopper–Pearson) interval of a binomial proportion ``k / n`` at confidence ``level``.

    The lower end is the ``p`` with P(X >= k) = (1 - level) / 2, the upper end the ``p`` with
    P(X <= k) = (1 - level) / 2 (0 and 1 when ``k`` is 0 or ``n``), found by bisection on
    :func:`binom_sf` to 1e-12: no scipy needed, and n is small (events in a run). Memoised: the series
    of a run share their ``n`` and often their ``k``.
    """
    if n < 1 or not 0 <= k <= n or not 0.0 < level < 1.0:
        raise ValueError(f"clopper_pearson needs 0 <= k <= n, n >= 1, 0 < level < 1; got {k}, {n}, {level}")
    tail = (1.0 - level) / 2
    lower = 0.0 if k == 0 else _bisect(lambda p: binom_sf(k, n, p) - tail)
    upper = 1.0 if k == n else _bisect(lambda p: tail - (1.0 - binom_sf(k + 1, n, p)))
    return lower, upper


def _bisect(f: Callable[[float], float]) -> float:
    """The root in [0, 1] of a function increasing from negative to positive."""
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-12:
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def permutation_p(
    observed: np.ndarray | float,
    null: np.ndarray,
    alternative: Literal["greater", "two-sided"] = "greater",
) -> np.ndarray:
    """Monte Carlo permutation p-values, ``(1 + #{null >= observed}) / (B + 1)`` per row.

    ``null`` has the B statistics of the resampled data along its last axis, ``observed`` one value per
    row. Counting the observed arrangement as one of the B + 1 makes the p-value valid (never below the
    rate it promises) for any B; its floor is ``1 / (B + 1)``. "two-sided" doubles the smaller tail
    (``(1 + #{null <= observed}) / (B + 1)`` is the lower one), capped at 1: the floor is then
    ``2 / (B + 1)``. NaN observations give NaN.
    """
    null = np.asarray(null, dtype=float)
    obs = np.asarray(observed, dtype=float)[..., None]
    b = null.shape[-1]
    upper = (1 + (null >= obs).sum(axis=-1)) / (b + 1)
    if alternative == "greater":
        p = upper
    elif alternative == "two-sided":
        lower = (1 + (null <= obs).sum(axis=-1)) / (b + 1)
        p = np.minimum(1.0, 2 * np.minimum(upper, lower))
    else:
        raise ValueError(f"alternative must be 'greater' or 'two-sided', not {alternative!r}")
    return np.where(np.isnan(obs[..., 0]), np.nan, p)


def bh_qvalues(p: np.ndarray | Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values) of a family of tests; NaN entries are not tests.

    ``q_(i) = min over j >= i of p_(j) * m / j`` for the p-values sorted ascending, capped at 1, with m
    the number of non-NaN entries. Rejecting ``q <= alpha`` controls the false discovery rate at alpha
    for independent tests and for positively dependent ones (PRDS, Benjamini & Yekutieli 2001), which is
    what the layers of one network tested against one event train are.
    """
    p = np.asarray(p, dtype=float)
    q = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = tested.size
    if m == 0:
        return q
    order = tested[np.argsort(p[tested], kind="stable")]
    scaled = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return q
