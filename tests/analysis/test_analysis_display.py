"""How a Trace shows itself: a short repr and a small HTML table, with row counts from shard metadata."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import normtrace_analysis as na
import numpy as np
from tracegen import write_trace


def _runs(root: Path, n: int) -> Path:
    for i in range(n):
        passes = np.repeat(np.arange(40), 2)
        write_trace(
            root / f"run{i:02d}",
            outputs={"pass": passes, "epoch": (passes // 10).astype(np.int32), "module": ["a", "b"] * 40,
                     "norm": np.ones(80, dtype=np.float32)},
            events={"epoch": [1], "pass": [9], "name": ["sync"]},
            shards=2,
        )  # fmt: skip
    return root


def test_repr_is_a_few_lines_whatever_the_number_of_runs(tmp_path: Path) -> None:
    trace = na.load(_runs(tmp_path, 30) / "*")
    text = repr(trace)
    assert (
        text.splitlines()
        == [
            "<normtrace Trace: 30 runs (run00, run01, run02, run03, run04, … (25 more))",
            "  outputs 2,400 rows/60 shards · params – · metrics – · events 30 rows/30 shards>",  # no signals recorded
        ]
    )
    narrowed = repr(trace.filter(modules="a", epochs=(1, 2)))
    assert "filtered: modules=['a'], epochs=(1, 2) (row counts are before filters)" in narrowed


def test_the_html_summary_lists_runs_with_their_rows(tmp_path: Path) -> None:
    trace = na.load(_runs(tmp_path, 22) / "*")
    page = trace._repr_html_()
    assert page.count("<tr><td>run") == 20
    assert "… and 2 more runs" in page
    assert "<td>run00</td><td>closed</td>" in page and "<td>80</td>" in page


def test_offline_charts_can_be_static_svg() -> None:
    before = alt.renderers.active
    try:
        na.enable_offline_charts(static=True)
        assert alt.renderers.active == "svg"
        na.enable_offline_charts()
        assert alt.renderers.active == "normtrace"
    finally:
        alt.renderers.enable(before)


def test_a_shard_that_cannot_be_counted_shows_a_question_mark(tmp_path: Path) -> None:
    run = _runs(tmp_path, 1) / "run00"
    trace = na.load(run)
    shard = sorted((run / "outputs").glob("*.arrow"))[0]
    shard.write_bytes(b"garbage")  # damaged after the load: counting it fails, the repr does not
    assert "outputs ? rows/2 shards" in repr(trace)
    assert "<td>?</td>" in trace._repr_html_()
