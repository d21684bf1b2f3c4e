"""Synthetic norm series with no relation to their events: the null families the event test is calibrated on.

Every family draws a whole batch at once (``n`` series of ``length`` passes, a numpy array) from a
seeded generator; event trains are drawn separately and independently of the series, so any alignment
a test reports on them is a false positive. ``benchmarks/calibration.py`` prints the rates over hundreds
of series per family; ``tests/analysis/test_analysis_calibration.py`` checks a reduced set.

Families (what real training runs do that breaks a test treating spikes as independent):

* ``isolated``: a flat level with Student-t (4 d.o.f.) noise: isolated heavy-tailed spikes.
* ``trend_garch``: a slow trend times GARCH(1,1) volatility (t shocks): spikes cluster where
  volatility rises.
* ``bursts``: Gaussian noise plus rare ringing excursions, each detected as several spikes.
* ``warmup``: bursts that are dense early and rare later, on a level that moves fast early, like a
  network's first thousand passes.

Event trains: ``random`` (uniform), ``regular`` (a fixed period, random phase) and ``growing`` (gaps
growing over the run: short episodes early, as in CartPole).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import polars as pl
from normtrace_analysis import alignment
from normtrace_analysis.names import BASELINE_WINDOW, THRESHOLD
from normtrace_analysis.series import Series
from normtrace_analysis.spikes import _detect
from normtrace_analysis.stats import permutation_p

WINDOW = 20
BASELINE = BASELINE_WINDOW["pass"]
EXCLUDE = alignment.exclusion(WINDOW, BASELINE)
GAP = alignment.merge_gap(WINDOW, BASELINE)

FAMILIES = ("isolated", "trend_garch", "bursts", "warmup")
TRAINS = ("random", "regular", "growing")

T4_ROBUST_SD = 1.4826 * 0.7406968
"""Robust SD (1.4826 × MAD) of a Student-t variable with 4 degrees of freedom (MAD = its 0.75 quantile)."""

T5_ROBUST_PER_SD = 1.4826 * 0.7266868 / np.sqrt(5 / 3)
"""Robust SD of a Student-t variable with 5 degrees of freedom scaled to unit variance."""


def family(name: str, n: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(values, sigma): ``n`` series of ``length`` passes, and each point's noise robust SD."""
    t = np.arange(length) / length
    if name == "isolated":
        sigma = np.full((n, length), 0.1 * T4_ROBUST_SD)
        return 10.0 + 0.1 * rng.standard_t(4, (n, length)), sigma
    if name == "trend_garch":
        eps = _garch(n, length, rng)
        level = 10.0 * (1.0 + t + 0.2 * np.sin(2 * np.pi * 3 * t + rng.uniform(0, 2 * np.pi, (n, 1))))
        return level * (1.0 + 0.01 * eps[0]), level * 0.01 * eps[1]
    if name == "bursts":
        sigma = np.full((n, length), 0.1)
        values = 10.0 + 0.1 * rng.standard_normal((n, length))
        return values + _excursions(n, length, rng, np.full(length, 1 / 1500), 0.1), sigma
    if name == "warmup":
        rate = (1 + 30 * np.exp(-t / 0.08)) / 3000
        level = 10.0 * (1.0 + 0.5 * t - 0.4 * np.exp(-t / 0.05))
        sigma = np.broadcast_to(0.01 * level, (n, length)).copy()
        values = level * (1.0 + 0.01 * rng.standard_normal((n, length)))
        return values + _excursions(n, length, rng, rate, sigma), sigma
    raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")


def _garch(n: int, length: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """GARCH(1,1) innovations with unit long-run variance (alpha 0.15, beta 0.83, Student-t 5 shocks
    scaled to unit variance) and each one's robust SD (the conditional SD times T5_ROBUST_PER_SD)."""
    alpha, beta = 0.15, 0.83
    omega = 1.0 - alpha - beta
    z = rng.standard_t(5, (n, length)) / np.sqrt(5 / 3)
    eps = np.empty((n, length))
    sd = np.empty((n, length))
    var = np.ones(n)
    for i in range(length):
        sd[:, i] = np.sqrt(var)
        eps[:, i] = sd[:, i] * z[:, i]
        var = omega + alpha * eps[:, i] ** 2 + beta * var
    return eps, sd * T5_ROBUST_PER_SD


def _excursions(
    n: int, length: int, rng: np.random.Generator, rate: np.ndarray, sigma: float | np.ndarray
) -> np.ndarray:
    """Ringing excursions starting at rate ``rate[t]`` per pass: a damped oscillation of 8–30 sigma whose
    peaks cross a 6-sigma threshold several times (one excursion, several detected spikes)."""
    out = np.zeros((n, length))
    sig = np.broadcast_to(np.asarray(sigma, dtype=float), (n, length))
    starts = np.argwhere(rng.random((n, length)) < rate[None, :])
    k = np.arange(60)
    for s, p in starts:
        amp = rng.uniform(8, 30) * sig[s, p]
        tau = rng.uniform(4, 15)
        period = rng.uniform(5, 12)
        shape = amp * np.exp(-k / tau) * np.cos(2 * np.pi * k / period)
        m = min(len(k), length - p)
        out[s, p : p + m] += shape[:m]
    return out


def train(kind: str, length: int, rng: np.random.Generator, events: int = 40) -> np.ndarray:
    """One event train (sorted pass positions in ``[100, length - 100]``), independent of any series."""
    lo, hi = 100, length - 100
    if kind == "random":
        return np.unique(rng.integers(lo, hi, events))
    if kind == "regular":
        period = (hi - lo) / events
        return (lo + rng.uniform(0, period) + period * np.arange(events)).astype(np.int64)
    if kind == "growing":
        gaps = np.linspace(0.1, 1.9, events)  # the last gaps are 19 times the first
        gaps *= (hi - lo) / gaps.sum()
        return (lo + rng.uniform(0, gaps[0]) + np.concatenate([[0], np.cumsum(gaps[:-1])])).astype(np.int64)
    raise ValueError(f"unknown event train {kind!r}; expected one of {TRAINS}")


def plant_transients(
    values: np.ndarray, sigma: np.ndarray, events: list[np.ndarray], size: float, rng: np.random.Generator
) -> np.ndarray:
    """A one-pass spike of ``size`` sigma 2–8 passes after every event of each series."""
    out = values.copy()
    for s, ev in enumerate(events):
        at = ev + rng.integers(2, 9, len(ev))
        at = at[at < values.shape[1]]
        out[s, at] += size * sigma[s, at]
    return out


def plant_steps(values: np.ndarray, sigma: np.ndarray, events: list[np.ndarray], size: float) -> np.ndarray:
    """A lasting level shift of ``size`` sigma right after every event (a staircase), per series."""
    out = values.copy()
    for s, ev in enumerate(events):
        for e in ev:
            out[s, e + 1 :] += size * sigma[s, e + 1]
    return out


# ---------------------------------------------------------------------------------------------------------
# The product's detector and tests on batches of series (no trace files: the same functions, faster).


def detect(values: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(spike passes, cluster onsets) of each row of ``values``, by the product's detector."""
    n, length = values.shape
    frame = pl.DataFrame(
        {
            "sid": np.repeat(np.arange(n, dtype=np.uint32), length),
            "pass": np.tile(np.arange(length, dtype=np.int64), n),
            "epoch": np.tile((np.arange(length) // 200).astype(np.int32), n),
            "value": values.ravel(),
        }
    )
    found = _detect(frame, "pass", THRESHOLD, BASELINE)
    clusters = alignment.cluster_spikes(found, ["sid"], "pass", GAP)
    spikes = _per_sid(found, "pass", n)
    onsets = _per_sid(clusters, "onset", n)
    return spikes, onsets


def _per_sid(frame: pl.DataFrame, col: str, n: int) -> list[np.ndarray]:
    out = [np.zeros(0, dtype=np.int64) for _ in range(n)]
    for sid, at in frame.group_by("sid").agg(pl.col(col).sort()).iter_rows():
        out[int(sid)] = np.asarray(at, dtype=np.int64)
    return out


def spike_p(
    onsets: list[np.ndarray],
    events: np.ndarray,
    lo: int,
    hi: int,
    permutations: int,
    rng: np.random.Generator,
    gaps: float = alignment.JITTER_GAPS,
) -> np.ndarray:
    """The event test's p-value per series (all sharing ``events``), as ``event_alignment`` computes it;
    NaN for a series without spikes (not tested)."""
    observed, null = alignment.jitter_test(
        onsets, events, lo, hi, window=WINDOW, exclude=EXCLUDE, permutations=permutations, rng=rng, gaps=gaps
    )
    p = permutation_p(observed, null)
    return np.where([len(o) > 0 for o in onsets], p, np.nan)


def step_p(
    values: np.ndarray, trains_of: Callable[[int], np.ndarray], events: list[np.ndarray]
) -> np.ndarray:
    """The step test's p-value per series (row s with its own events and jittered ``trains_of(s)``), as
    ``event_steps`` runs it."""
    n, length = values.shape
    data = pl.DataFrame(
        {
            "sid": np.repeat(np.arange(n, dtype=np.uint32), length),
            "pass": np.tile(np.arange(length, dtype=np.int64), n),
            "epoch": np.tile((np.arange(length) // 200).astype(np.int32), n),
            "value": values.ravel(),
        }
    )
    levels = alignment._levels(
        Series(data, pl.DataFrame({"sid": np.arange(n, dtype=np.uint32)})), "pass", WINDOW
    )
    out = np.full(n, np.nan)
    for s in range(n):
        p = alignment.step_test(levels[s], events[s], trains_of(s), WINDOW)[3]
        out[s] = np.nan if p is None else p
    return out
