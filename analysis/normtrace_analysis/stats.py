"""Exact binomial tail probability in pure Python (log-space sums; no scipy)."""

from __future__ import annotations

import math


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
