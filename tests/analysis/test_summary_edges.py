"""``summary.epoch_summary`` called as a function with its defaults, against numpy (issue 17)."""

from __future__ import annotations

from pathlib import Path

import normtrace_analysis as na
import numpy as np
import pytest
from normtrace_analysis.summary import epoch_summary
from tracegen import write_trace


def test_the_default_table_is_outputs(tmp_path: Path) -> None:
    values = np.random.default_rng(3).lognormal(size=30)
    outputs = {
        "pass": np.arange(30),
        "epoch": (np.arange(30) // 10).astype(np.int32),
        "module": ["m"] * 30,
        "norm": values.astype(np.float32),
    }
    params = {
        "epoch": np.arange(3, dtype=np.int32),
        "pass": [9, 19, 29],
        "module": ["m"] * 3,
        "param": ["weight"] * 3,
        "norm": np.array([1.0, 2.0, 3.0], dtype=np.float32),
    }
    table = epoch_summary(na.load(write_trace(tmp_path / "r", outputs=outputs, params=params)))
    assert table["split"].to_list() == ["train"] * 3  # an outputs column: not the params table
    recorded = values.astype(np.float32).astype(np.float64).reshape(3, 10)
    assert table["mean"].to_list() == pytest.approx(recorded.mean(axis=1).tolist(), rel=1e-6)
    assert table["std"].to_list() == pytest.approx(recorded.std(axis=1, ddof=1).tolist(), rel=1e-6)
    assert table["p95"].to_list() == pytest.approx(np.percentile(recorded, 95, axis=1).tolist(), rel=1e-6)


def test_rows_come_by_module_then_epoch(tmp_path: Path) -> None:
    n = 40
    outputs = {
        "pass": np.tile(np.arange(n // 2), 2),
        "epoch": np.tile(np.arange(n // 2) // 5, 2).astype(np.int32),
        "module": ["b"] * (n // 2) + ["a"] * (n // 2),
        "norm": np.ones(n, dtype=np.float32),
    }
    table = epoch_summary(na.load(write_trace(tmp_path / "r", outputs=outputs)))
    assert table.select("module", "epoch").rows() == [(m, e) for m in ["a", "b"] for e in range(4)]
