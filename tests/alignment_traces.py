"""Small traces for the event-alignment tests: noise series, spikes and syncs planted at known passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tracegen import write_trace


def series(values: np.ndarray, events: dict | None = None, per_epoch: int = 10, modules=("m",)) -> dict:
    """Modules with the same values, one training pass per row, epochs of ``per_epoch`` passes."""
    n = len(values)
    outputs = {
        "pass": np.tile(np.arange(n), len(modules)),
        "epoch": np.tile((np.arange(n) // per_epoch).astype(np.int32), len(modules)),
        "module": np.repeat(np.array(modules), n),
        "norm": np.tile(values.astype(np.float32), len(modules)),
    }
    return {"outputs": outputs, "events": events}


def noise(n: int, seed: int = 0) -> np.ndarray:
    """Level 10 with Gaussian noise of SD 0.1."""
    return 10.0 + 0.1 * np.random.default_rng(seed).standard_normal(n)


def syncs(passes: list[int], per_epoch: int = 10) -> dict:
    """``target_update`` events recorded with the given passes (and the epoch each one opens)."""
    return {
        "epoch": [(p + 1) // per_epoch for p in passes],
        "pass": passes,
        "name": ["target_update"] * len(passes),
    }


def layer_signal(values: np.ndarray) -> dict:
    """A module-level signal (kind "my_kind" of module "layer", its param null), one value per pass,
    epochs of 10 passes: the ``signals`` columns of :func:`tracegen.write_trace`."""
    n = len(values)
    return {
        "pass": np.arange(n),
        "epoch": (np.arange(n) // 10).astype(np.int32),
        "kind": np.full(n, "my_kind", dtype=object),
        "module": np.full(n, "layer", dtype=object),
        "value": values.astype(np.float32),
    }


def modules_trace(
    path: Path,
    spikes: dict[str, list[int]],
    n: int = 4000,
    seed: int = 20,
    events: dict | None = None,
    rank: int = 0,
) -> Path:
    """One noise series per module (seeds ``seed``, ``seed + 1``, ...), +3 (30 noise SDs) at the given
    passes, epochs of 10 passes; written as ``rank`` of the run at ``path``."""
    values = []
    for i, at in enumerate(spikes.values()):
        v = noise(n, seed + i)
        v[at] += 3.0
        values.append(v)
    k = len(spikes)
    outputs = {
        "pass": np.tile(np.arange(n), k),
        "epoch": np.tile(np.arange(n) // 10, k).astype(np.int32),
        "module": np.repeat(np.array(list(spikes)), n),
        "norm": np.concatenate(values).astype(np.float32),
    }
    return write_trace(path, outputs=outputs, events=events, rank=rank)
