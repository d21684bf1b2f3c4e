"""The spike detector's independent reference, shared by the detector tests: the per-series pandas
detector of ``examples/distributed_spikes.py`` (written apart from ``spikes.py``) run on a trace's rows,
and the comparison they make: the same spikes at the same points, the floats to 1e-12."""

from __future__ import annotations

import numpy as np
import polars as pl
from optional import need

FLOATS = ["value", "baseline", "score"]
"""The spike columns compared to a relative tolerance (the rest must be equal)."""


def reference_spikes(
    rows: pl.DataFrame, level: str, window: int | None = None, threshold: float | None = None
) -> pl.DataFrame:
    """The pandas detector's spikes of ``rows`` (run, rank, module, split, pass, epoch, value) at ``level``,
    with its default ``window`` and ``threshold`` where they are not given."""
    need("pandas")
    from distributed_spikes import detect_frame

    options = {k: v for k, v in (("window", window), ("threshold", threshold)) if v is not None}
    found = detect_frame(rows.to_pandas(), level=level, **options)
    return pl.from_pandas(found, nan_to_null=False)


def assert_same_spikes(got: pl.DataFrame, want: pl.DataFrame, what: str = "") -> None:
    """``got`` (``Trace.spikes``) holds ``want``'s spikes (the reference's columns, cast to ``got``'s types),
    row for row once both are sorted by every column but the floats."""
    keys = [c for c in want.columns if c not in FLOATS]
    want = want.cast({c: got.schema[c] for c in want.columns}).sort(keys)
    got = got.select(want.columns).sort(keys)
    assert got.drop(FLOATS).equals(want.drop(FLOATS)), what  # the same spikes, at the same points
    for column in FLOATS:
        np.testing.assert_allclose(got[column].to_numpy(), want[column].to_numpy(), rtol=1e-12, err_msg=what)
