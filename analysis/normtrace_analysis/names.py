"""Names every analysis module shares: tables, levels, series keys and default windows.

One definition each, so that a summary, a spike table, an alignment row and a chart agree on what a
series is and which window a default means. Nothing here computes anything.
"""

from __future__ import annotations

from typing import Literal

Table = Literal["outputs", "params"]
"""The tables whose rows are norms (``value``): module outputs per pass, parameters per collection."""

Level = Literal["pass", "epoch"]
"""Time resolution of an analysis: every recorded pass, or per-epoch means."""

LEVELS: tuple[str, ...] = ("pass", "epoch")

SPLITS: tuple[str, ...] = ("train", "no_grad")
"""Values of the derived ``split`` column of ``outputs``: grad-enabled passes vs ``torch.no_grad`` passes."""

SERIES_KEYS: dict[str, list[str]] = {
    "outputs": ["run", "rank", "module", "split"],
    "params": ["run", "rank", "module", "param"],
}
"""Columns identifying one series (one time-ordered sequence of values) per table."""

SUMMARY_KEYS: dict[str, list[str]] = {
    "outputs": ["run", "module", "split"],
    "params": ["run", "module", "param"],
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
