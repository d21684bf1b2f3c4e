"""The analyses read series in pieces of bounded size: results equal straightforward computations on whole
tables, whatever the piece size, on every layout the reader meets.

Summaries are checked against numpy on the rows as written; spikes against the detector written per
series with pandas (``examples/distributed_spikes.py``, which shares no code with the package); and every
analysis against itself read in pieces so small that each series is cut dozens of times.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import normtrace_analysis as na
import numpy as np
import polars as pl
import pytest
from normtrace_analysis import series
from spikeref import assert_same_spikes, reference_spikes
from tracegen import synthetic_dqn, write_trace

STATS = ("count", "mean", "std", "min", "max", "p05", "p50", "p95")


def _dqn(seed: int, **options) -> dict:
    syn = synthetic_dqn(n_epochs=40, passes_per_epoch=40, n_spikes=8, after_event=0.5, seed=seed, **options)
    return {"outputs": syn.outputs, "events": syn.events}


def _with_nonfinite(tables: dict, rng: np.random.Generator) -> dict:
    """NaN, +Inf and -Inf here and there, and a run of NaN longer than a baseline window (the detector
    carries its last median over it, across pieces too)."""
    norm = tables["outputs"]["norm"].copy()
    n = len(norm)
    norm[rng.choice(n, 12, replace=False)] = np.nan
    norm[rng.choice(n, 4, replace=False)] = np.inf
    norm[rng.choice(n, 2, replace=False)] = -np.inf
    mask = tables["outputs"]["module"] == "net.2"
    norm[np.flatnonzero(mask)[600:780]] = np.nan
    return {**tables, "outputs": {**tables["outputs"], "norm": norm}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Traces of every layout: one rank; two ranks of unequal shards; rows shuffled within shards; rows
    dropped (no fixed per-pass layout); no-grad passes between training passes; and two runs at once."""
    root = tmp_path_factory.mktemp("pieces")
    rng = np.random.default_rng(0)
    out: dict[str, list[Path]] = {}
    one = _with_nonfinite(_dqn(1), rng)
    out["one rank"] = [write_trace(root / "one", shards=7, **one)]
    ddp = root / "ddp"
    write_trace(ddp, shards=4, rank=0, **_with_nonfinite(_dqn(2), rng))
    write_trace(ddp, shards=9, rank=1, **_with_nonfinite(_dqn(3), rng))
    out["two ranks"] = [ddp]
    n = len(one["outputs"]["pass"])
    order = rng.permutation(n)
    shuffled = {k: v[order] for k, v in one["outputs"].items()}
    out["shuffled"] = [write_trace(root / "shuffled", outputs=shuffled, events=one["events"], shards=3)]
    keep = rng.random(n) > 0.1
    dropped = {k: v[keep] for k, v in one["outputs"].items()}
    out["dropped"] = [write_trace(root / "dropped", outputs=dropped, events=one["events"], shards=5)]
    no_grad = _with_nonfinite(_dqn(4, no_grad=True), rng)
    out["no-grad passes"] = [write_trace(root / "nograd", shards=6, normalize=True, **no_grad)]
    out["two runs"] = [root / "one", root / "nograd"]
    return out


LAYOUTS = ["one rank", "two ranks", "shuffled", "dropped", "no-grad passes", "two runs"]


def _rows(paths: list[Path]) -> pl.DataFrame:
    """Every output row as written, with the run and the value the Trace derives."""
    trace = na.load(paths)
    return trace.outputs.collect()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_summary_equals_numpy_on_the_rows_as_written(runs, layout: str) -> None:
    rows = _rows(runs[layout])
    summary = na.load(runs[layout]).epoch_summary()
    keys = ["run", "epoch", "module", "split"]
    groups = rows.group_by(keys).agg(pl.col("value")).sort(keys)  # grouping only; statistics in numpy
    assert summary.height == groups.height
    got = {tuple(r[k] for k in keys): r for r in summary.iter_rows(named=True)}
    for key_values in groups.iter_rows():
        *key, values = key_values
        v = np.asarray(values, dtype=np.float64)
        row = got[tuple(key)]
        with np.errstate(invalid="ignore"):  # NaN and Inf rows: NaN statistics
            mean, std = v.mean(), (v.std(ddof=1) if len(v) > 1 else None)
        assert row["count"] == len(v)
        assert row["nonfinite"] == int((~np.isfinite(v)).sum())
        want = {
            "mean": mean,
            "std": std,
            "min": np.nanmin(v) if np.isfinite(v).any() else v.min(),
            "max": np.nanmax(v) if not np.isnan(v).all() else np.nan,
        }
        if np.isfinite(v).all():  # quantiles of rows with NaN: Polars sorts NaN last, numpy refuses
            want |= {f"p{q:02d}": np.percentile(v, q) for q in (5, 50, 95)}
        for stat, expected in want.items():
            if expected is None:
                assert row[stat] is None
            elif np.isnan(expected):
                assert np.isnan(row[stat]), (key, stat)
            else:
                assert row[stat] == pytest.approx(expected, rel=1e-12, abs=1e-300), (key, stat)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("level", ["pass", "epoch"])
def test_spikes_equal_the_per_series_pandas_detector(runs, layout: str, level: str) -> None:
    want = reference_spikes(
        _rows(runs[layout]).select("run", "rank", "module", "split", "pass", "epoch", "value"), level
    )
    assert want.height >= 8
    assert_same_spikes(na.load(runs[layout]).spikes(level=level), want)


def _everything(paths: list[Path]) -> list[pl.DataFrame]:
    trace = na.load(paths)
    return [
        trace.epoch_summary(),
        trace.spikes(),
        trace.spikes(level="epoch"),
        trace.event_alignment("target_update", window=(5, 20)),
        trace.event_alignment("target_update", level="epoch"),
        trace.event_steps("target_update"),
        trace.event_profile("target_update", window=10),
    ]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_result_is_the_same_in_tiny_pieces(runs, layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = _everything(runs[layout])
    for rows in (997, 150):  # each series cut into dozens of pieces, the tails kept across them
        monkeypatch.setattr(series, "CHUNK_ROWS", rows)
        for got, want in zip(_everything(runs[layout]), whole, strict=True):
            assert got.equals(want)


class _Largest:
    """A consumer that needs nothing and notes the largest frame it was fed."""

    def __init__(self) -> None:
        self.rows = 0

    def feed(self, frame: series.Frame) -> np.ndarray:
        self.rows = max(self.rows, int(frame.rows[-1]))
        return frame.end.copy()

    def finish(self) -> None:
        pass


def test_frames_stay_within_the_piece_size_plus_the_tails(runs) -> None:
    """What a scan holds at once does not grow with the run: one piece (at least one shard per rank)
    plus what the consumers keep of each series; here the detector's and the summary's tails."""
    from normtrace_analysis.spikes import _Detector
    from normtrace_analysis.summary import Summary

    trace = na.load(runs["two ranks"])
    shard = max(pl.scan_ipc(p).select(pl.len()).collect().item() for p in trace.shards("outputs"))
    largest = _Largest()
    detector = _Detector("pass", 6.0, 51)
    series.scan(trace, "outputs", None, lambda reg: [largest, detector, Summary(reg)], chunk_rows=300)
    n_series = 6  # 3 modules x 2 ranks
    tail = detector.lookback + 2 * detector.window + 40  # the detector's lookback and look-ahead, an epoch
    assert largest.rows <= 2 * shard + 300 + n_series * tail
    total = trace.outputs.select(pl.len()).collect().item()
    assert largest.rows < total / 2  # and far from the whole table


class _Failing:
    """A consumer that fails on the ``at``-th frame it is fed (never if None), counting frames."""

    def __init__(self, at: int | None = 2, wait: float = 0.0) -> None:
        self.at = at
        self.wait = wait  # seconds before failing: the read-ahead thread gets ahead meanwhile
        self.frames = 0

    def feed(self, frame: series.Frame) -> np.ndarray:
        self.frames += 1
        if self.frames == self.at:
            time.sleep(self.wait)
            raise RuntimeError("consumer failed")
        return frame.end.copy()

    def finish(self) -> None:
        pass


def test_a_failing_consumer_stops_the_reading_threads_at_once(runs) -> None:
    """The read-ahead thread and Polars' reading thread have ended by the time a consumer's error reaches
    the caller (the error and its traceback still held): neither waits to be collected."""
    trace = na.load(runs["two ranks"])
    with pytest.raises(RuntimeError, match="consumer failed") as failed:
        series.scan(trace, "outputs", None, lambda reg: [_Failing()], chunk_rows=300)
    assert failed.tb is not None  # held
    assert not [t.name for t in threading.enumerate() if t.name.startswith("normtrace-read")]


@pytest.mark.parametrize("from_last", [1, 2, 3])
def test_a_consumer_failing_near_the_end_does_not_hang_the_scan(runs, from_last: int) -> None:
    """A consumer that raises while the read-ahead thread has read everything (the last piece waiting in
    the box, the end-of-pieces mark or an error behind it): the scan raises, within seconds, instead of
    joining a reader that waits for room in the box for ever (as a Ctrl-C during an analysis would)."""
    trace = na.load(runs["two ranks"])
    counter = _Failing(None)
    series.scan(trace, "outputs", None, lambda reg: [counter], chunk_rows=300)
    assert counter.frames > 3
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            series.scan(
                trace,
                "outputs",
                None,
                lambda reg: [_Failing(counter.frames - from_last, wait=0.5)],
                chunk_rows=300,
            )
        except BaseException as exc:  # noqa: BLE001 - the outcome under test
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the scan hung after its consumer failed"
    assert [str(e) for e in outcome] == ["consumer failed"]


def test_a_slow_consumer_gets_every_piece_and_a_failed_one_stops_the_reading(runs, monkeypatch) -> None:
    """The read-ahead thread waits while its box is full (a slow consumer gets every frame, and the scan
    ends), and stops reading once the consumer has failed (it does not read the rest of the run)."""
    trace = na.load(runs["two ranks"])
    counter = _Failing(None)
    series.scan(trace, "outputs", None, lambda reg: [counter], chunk_rows=300)
    frames = counter.frames
    assert frames > 5

    class Slow(_Failing):
        def feed(self, frame: series.Frame) -> np.ndarray:
            time.sleep(0.2)  # the reader finds the box full
            return super().feed(frame)

    slow = Slow(None)
    worker = threading.Thread(
        target=lambda: series.scan(trace, "outputs", None, lambda reg: [slow], chunk_rows=300), daemon=True
    )
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive() and slow.frames == frames

    numbered = []
    number = series._number
    monkeypatch.setattr(series, "_number", lambda *a: numbered.append(1) or number(*a))
    with pytest.raises(RuntimeError, match="consumer failed"):
        series.scan(trace, "outputs", None, lambda reg: [Slow(2)], chunk_rows=300)
    numbered_when_failing = len(numbered)  # parts numbered (one per rank and piece) before it stopped
    numbered.clear()
    series.scan(trace, "outputs", None, lambda reg: [_Failing(None)], chunk_rows=300)
    assert numbered_when_failing < len(numbered) / 2, (numbered_when_failing, len(numbered))


def test_rows_out_of_pass_order_are_read_as_whole_series(runs, monkeypatch) -> None:
    calls = []
    whole_series = series._whole_series

    def spy(*args, **kwargs):
        calls.append(1)
        return whole_series(*args, **kwargs)

    monkeypatch.setattr(series, "_whole_series", spy)
    na.load(runs["one rank"]).spikes()
    assert not calls
    na.load(runs["shuffled"]).spikes()
    assert calls


def test_long_scans_say_how_far_they_are(runs, monkeypatch, capsys) -> None:
    from normtrace_analysis import progress as progress_module

    monkeypatch.setattr(progress_module, "DELAY_S", 0.0)
    monkeypatch.setattr(series, "CHUNK_ROWS", 500)
    with progress_module.progress("spikes") as bar:
        bar.set_postfix_str("detecting", refresh=False)
        na.load(runs["one rank"]).spikes()
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("spikes: detecting: outputs ") and "%" in line for line in lines), lines
    na.load(runs["one rank"]).spikes()  # no progress block open: nothing said
    assert capsys.readouterr().err == ""


def test_the_read_ahead_thread_is_named_while_a_scan_runs(runs) -> None:
    """The reading thread carries the name the end-of-scan checks above look for (and a user sees in a
    thread dump): were it renamed, those checks would pass without looking at it."""
    seen: list[list[str]] = []

    class Looking(_Failing):
        def feed(self, frame: series.Frame) -> np.ndarray:
            seen.append([t.name for t in threading.enumerate()])
            return frame.end.copy()

    series.scan(na.load(runs["two ranks"]), "outputs", None, lambda reg: [Looking(None)], chunk_rows=300)
    assert len(seen) > 3 and all("normtrace-read-ahead" in names for names in seen[:-1])
    assert "normtrace-read-ahead" not in [t.name for t in threading.enumerate()]
