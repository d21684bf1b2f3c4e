"""Names every analysis module shares: tables, levels, series keys and default windows.

One definition each, so that a summary, a spike table, an alignment row and a chart agree on what a
series is and which window a default means. Nothing here computes anything.
"""

from __future__ import annotations

from typing import Literal

from . import format as _format

Table = Literal["outputs", "params", "signals"]
"""The tables whose rows are series of ``value``: module output norms per pass, parameter norms per
collection, and the signals (gradient norms, update ratios, activation rates …) per measurement."""

Level = Literal["pass", "epoch"]
"""Time resolution of an analysis: every recorded pass, or per-epoch means."""

LEVELS: tuple[str, ...] = ("pass", "epoch")

SPLITS: tuple[str, ...] = ("train", "no_grad")
"""Values of the derived ``split`` column of ``outputs``: grad-enabled passes vs ``torch.no_grad`` passes."""

SERIES_KEYS: dict[str, list[str]] = {
    "outputs": ["run", "rank", "module", "split"],
    "params": ["run", "rank", "module", "param"],
    "signals": ["run", "rank", "kind", "module", "param"],
}
"""Columns identifying one series (one time-ordered sequence of values) per table. A signal's ``kind``
is part of its key: a layer's gradient norm and its update ratio are two series, and every analysis of
the signals table covers all kinds unless the Trace is filtered (``trace.filter(kinds=...)``). A
module-level signal's ``param`` is null, and null equals null in these keys."""

SERIES_COLUMNS: dict[str, list[str]] = {
    "outputs": ["rank", "module", "grad_enabled"],
    "params": ["rank", "module", "param"],
    "signals": ["rank", "kind", "module", "param"],
}
"""The stored columns that give a row its series within a run: the series keys but ``run``, with the
recorded ``grad_enabled`` in place of the derived ``split``."""

SUMMARY_KEYS: dict[str, list[str]] = {
    "outputs": ["run", "module", "split"],
    "params": ["run", "module", "param"],
    "signals": ["run", "kind", "module", "param"],
}
"""Group keys of ``epoch_summary`` and of the charts' curves besides the x column: ranks are pooled."""

THRESHOLD = 6.0
"""Default spike threshold in robust standard deviations. High because a pass-level series has ~1e5
points: on 10 million points of log-normal noise it flags about one point per million, while the spikes
worth explaining (target syncs, exploding activations) are tens of SDs."""

BASELINE_WINDOW: dict[str, int] = {"pass": 51, "epoch": 11}
"""Default rolling-window length (points) of the spike detector per level. 51 passes: a transient of a
few passes (what a target sync does to a DQN's activations) cannot move the median, while learning
trends over a few episodes are followed. 11 epochs: two sync periods of the seed's DQN (a sync every 5
episodes), so no window's median is set by sync epochs."""

EVENT_WINDOW: dict[str, int] = {"pass": 20, "epoch": 1}
"""Default event window per level: the 20 passes after an event (about 10 environment steps of a DQN
recording an acting and a training pass per step), or the epoch the event opens."""

SENSITIVITY_WINDOWS: dict[str, tuple[int, ...]] = {"pass": (5, 20, 50), "epoch": (1, 2, 3)}
"""Event windows the report tries besides the default, so that no single window is a free choice."""

PERMUTATIONS = 999
"""Default number of jittered event trains per test: p-values have a floor of 1 / (999 + 1) = 0.001."""

SIGNAL_KINDS: tuple[str, ...] = _format.SIGNAL_KINDS
"""The kinds of signal normtrace's own lenses record (the format's list); a user's lens may record others."""

LOG_KINDS: frozenset[str] = frozenset({"grad_norm", "update_ratio", "output_grad_norm"})
"""Signal kinds whose spikes are detected on ``log10(value)``: norms and ratios are positive and span
orders of magnitude (a gradient norm grows tenfold in a few steps of an explosion), so a deviation is
relative, and the noise of a norm is multiplicative. The other kinds (cosines in [-1, 1], rates and
fractions in [0, 1], a user's kinds) are detected on their values."""
