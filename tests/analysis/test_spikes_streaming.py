"""The streaming spike detector against the per-series pandas detector, over many baseline windows and
piece sizes: every spike, baseline and score equal, whatever the window and wherever the pieces cut.

The detector scores each series in stretches whose bounds (look-back, the blocks of the scale, the
medians carried over gaps) derive from the window; the default windows and piece sizes of
``test_analysis_pieces.py`` leave most of those bounds untested. Here the series are built to put flags,
gaps and changes of scale near every kind of boundary: runs of missing values shorter and longer than a
window (one at a series' start, one at its end), infinities, flat stretches, a tenfold change of noise,
runs of consecutive spikes, series shorter than a window. Only flagged points show their score, so a
second trace flags a quarter of all points (isolated outliers): a baseline or scale off anywhere, even by
one block of the rolling MAD, changes a score the test compares. The reference is
``examples/distributed_spikes.py``, which shares no code with the package.
"""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import normtrace_analysis as na
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from normtrace_analysis import series as series_module
from normtrace_analysis import spikes as spikes_module
from spikeref import assert_same_spikes, reference_spikes
from tracegen import write_trace

EPOCH_PASSES = 7  # short epochs: level "epoch" gets long series too


def _series(rng: np.random.Generator, n: int, level: float) -> np.ndarray:
    """Noise on a drifting level whose spread grows tenfold midway, with planted spikes (alone and in
    runs), missing values, infinities and a flat stretch."""
    drift = level + np.cumsum(rng.standard_normal(n)) * 0.02 * level / np.sqrt(n)
    spread = np.where(np.arange(n) < n // 2, 0.01, 0.1) * level
    v = drift + spread * rng.standard_normal(n)
    for at in rng.choice(n, max(1, n // 60), replace=False):
        width = int(rng.integers(1, 4))
        v[at : at + width] += rng.choice([-1, 1]) * rng.uniform(0.3, 3.0) * level
    for _ in range(max(1, n // 300)):  # gaps of every length
        at, length = int(rng.integers(0, n)), int(rng.choice([1, 2, 5, 17, 60, 140]))
        v[at : at + length] = np.nan
    v[rng.choice(n, max(1, n // 400), replace=False)] = rng.choice([np.inf, -np.inf])
    flat = int(rng.integers(0, n))
    v[flat : flat + 30] = level
    return v


def _dense(rng: np.random.Generator, n: int, level: float) -> np.ndarray:
    """Noise on a wave (a window cut short has another median than a whole one) whose spread changes
    along the series, with an outlier at about every fourth point (never two side by side: each is a
    spike of its own, reported with its own score)."""
    spread = level * 0.01 * np.exp(np.cumsum(rng.standard_normal(n)) * 0.1)
    v = level * (1 + 0.05 * np.sin(2 * np.pi * np.arange(n) / 37)) + spread * rng.standard_normal(n)
    at = np.flatnonzero(rng.random(n) < 0.25)
    at = at[np.concatenate([[True], np.diff(at) > 1])]
    v[at] += rng.choice([-1, 1], len(at)) * rng.uniform(0.5, 1.5, len(at)) * level
    v[n // 3 : n // 3 + 40] = np.nan
    return v


def _write(
    path: Path,
    series: dict[str, np.ndarray],
    epoch_passes: int = EPOCH_PASSES,
    rank: int = 0,
    shards: int = 40,
) -> Path:
    """The series as the recorder lays them out: pass by pass, every module of a pass together (so the
    reader streams them in pieces; series written one after the other would be read whole)."""
    modules, passes, values = [], [], []
    for name, v in series.items():
        modules.append(np.full(len(v), name))
        passes.append(np.arange(len(v)))
        values.append(v)
    p, module = np.concatenate(passes), np.concatenate(modules)
    order = np.lexsort((module, p))
    outputs = {
        "pass": p[order],
        "epoch": (p[order] // epoch_passes).astype(np.int32),
        "module": module[order].tolist(),
        "norm": np.concatenate(values)[order].astype(np.float32),
    }
    return write_trace(path, outputs=outputs, shards=shards, rank=rank)


def _planted(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = [1500, 900, 640, 333, 120, 45, 9, 1200]
    series = {f"m{i}": _series(rng, n, 10.0 * (i + 1)) for i, n in enumerate(lengths)}
    series["m0"][:90] = np.nan  # a series that starts with a long run of missing values
    series["m1"][-70:] = np.nan  # and one that ends with one
    series["m7"][500:1100] = np.nan  # a gap spanning many pieces,
    series["m7"][[800, 950]] = 80.0  # with values alone in it: the runs after them start in stretches
    # that hold no median of their own, so their baseline is the one carried in from the stretch before
    return series


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("streaming") / "r", _planted(7))


@pytest.fixture(scope="module")
def long_epochs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Epochs of 150 passes: the epoch summary read on the side keeps an unfinished epoch, more of each
    series than a short window's look-back, so the detector is fed frames that start before its stretch."""
    return _write(tmp_path_factory.mktemp("streaming") / "long", _planted(9), epoch_passes=150)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(8)
    series = {f"d{i}": _dense(rng, n, 5.0 * (i + 1)) for i, n in enumerate([1100, 700, 260])}
    return _write(tmp_path_factory.mktemp("streaming") / "d", series)


def _rows(run: Path) -> pl.DataFrame:
    return na.load(run).outputs.collect().select("run", "rank", "module", "split", "pass", "epoch", "value")


@pytest.fixture(scope="module")
def rows(run: Path) -> pl.DataFrame:
    return _rows(run)


def _spikes(run: Path, **options: object) -> pl.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # gaps and infinities: no numpy warning shown
        warnings.simplefilter("ignore", na.ShortSeriesWarning)  # m6 is shorter than most windows
        return na.load(run).spikes(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize("window", [3, 4, 5, 8, 13, 20, 51])
@pytest.mark.parametrize("threshold", [6.0, 2.5])
def test_every_window_and_piece_size_gives_the_reference_spikes(
    run: Path, rows: pl.DataFrame, monkeypatch: pytest.MonkeyPatch, window: int, threshold: float
) -> None:
    want = reference_spikes(rows, "pass", window, threshold)
    assert want.height >= 20 and (want["points"] > 1).any()  # runs of flags, not only single points
    for piece_rows in (10**6, 331, 61, 23):
        monkeypatch.setattr(series_module, "CHUNK_ROWS", piece_rows)
        got = _spikes(run, baseline_window=window, threshold=threshold)
        assert_same_spikes(got, want, f"window {window}, pieces of {piece_rows} rows")


@pytest.mark.parametrize("window", [3, 8, 20])
def test_frames_holding_more_than_the_detector_keeps_give_the_reference_spikes(
    long_epochs: Path, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    want = reference_spikes(_rows(long_epochs), "pass", window, 2.5)
    starts: list[bool] = []
    feed = spikes_module._Detector.feed

    def noted(self: spikes_module._Detector, frame: series_module.Frame) -> np.ndarray:
        known = frame.sids < len(self.s)  # series met before this frame
        starts.append(bool((frame.start[known] < self.s[frame.sids[known]]).any()))
        return feed(self, frame)

    monkeypatch.setattr(spikes_module._Detector, "feed", noted)
    for piece_rows in (331, 61):
        monkeypatch.setattr(series_module, "CHUNK_ROWS", piece_rows)
        starts.clear()
        got = _spikes(long_epochs, baseline_window=window, threshold=2.5)  # the summary read on the side
        assert sum(starts) > 3  # frames that start before the detector's stretch
        assert_same_spikes(got, want, f"window {window}, pieces of {piece_rows} rows")


@pytest.mark.parametrize("window", [3, 8])
def test_a_frame_of_series_the_detector_has_finished_gives_the_reference_spikes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    """Rank 0 is read whole in the first piece, so its series end there and the detector scores them to
    the end; rank 1's first shards hold no rows (a trace rewritten by another tool), so no epoch of the
    run is complete and the summary read on the side keeps all of rank 0. The next pieces, rank 1's
    empty shards, make frames that hold only series the detector is done with."""
    rng = np.random.default_rng(11)
    run = _write(tmp_path / "r", {"a": _series(rng, 300, 10.0), "b": _series(rng, 200, 3.0)}, shards=1)
    _write(run, {"a": _series(rng, 400, 10.0), "b": _series(rng, 400, 3.0)}, rank=1, shards=4)
    folder = run / "outputs"
    for seq in range(4, 0, -1):  # rank 1's shards move two places on; two empty shards go first
        (folder / f"rank1-{seq:06d}.arrow").rename(folder / f"rank1-{seq + 2:06d}.arrow")
    empty = pa.ipc.open_file(folder / "rank1-000003.arrow").schema.empty_table()
    for seq in (1, 2):
        with pa.ipc.new_file(folder / f"rank1-{seq:06d}.arrow", empty.schema) as writer:
            writer.write_table(empty)
    want = reference_spikes(_rows(run), "pass", window, 2.5)
    assert set(want["rank"].to_list()) == {0, 1}  # spikes on both ranks
    finished: list[bool] = []
    feed = spikes_module._Detector.feed

    def noted(self: spikes_module._Detector, frame: series_module.Frame) -> np.ndarray:
        known = frame.sids < len(self.s)
        finished.append(bool(known.all() and (frame.end <= self.s[frame.sids]).all()))
        return feed(self, frame)

    monkeypatch.setattr(spikes_module._Detector, "feed", noted)
    monkeypatch.setattr(series_module, "CHUNK_ROWS", 50)
    got = _spikes(run, baseline_window=window, threshold=2.5)  # the summary read on the side
    assert any(finished)  # a frame of finished series was fed
    assert_same_spikes(got, want, f"window {window}")


@pytest.mark.parametrize("window", [3, 4, 7, 12, 25, 51])
def test_every_score_of_a_quarter_of_the_points_equals_the_reference(
    dense: Path, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    want = reference_spikes(_rows(dense), "pass", window, 6.0)
    assert (want["points"] == 1).sum() > 200  # the outliers, each alone
    for piece_rows in (10**6, 157, 29):
        monkeypatch.setattr(series_module, "CHUNK_ROWS", piece_rows)
        assert_same_spikes(
            _spikes(dense, baseline_window=window), want, f"window {window}, pieces of {piece_rows}"
        )


@pytest.mark.parametrize("window", [3, 6, 11])
def test_epoch_level_gives_the_reference_spikes(run: Path, rows: pl.DataFrame, window: int) -> None:
    want = reference_spikes(rows, "epoch", window, 3.0)
    assert want.height >= 10
    assert_same_spikes(
        _spikes(run, level="epoch", baseline_window=window, threshold=3.0), want, f"window {window}"
    )


@pytest.mark.parametrize("window", [4, 13, 51])
def test_parallel_parts_give_the_reference_spikes(
    run: Path, rows: pl.DataFrame, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    pools: list[int] = []
    parts: list[int] = []  # per frame fed: the parts scored
    scorers: set[str] = set()  # the names of the threads that scored a part

    class Counted(ThreadPoolExecutor):
        def __init__(self, workers: int, prefix: str) -> None:
            pools.append(workers)
            super().__init__(workers, prefix)

    feed, score = spikes_module._Detector.feed, spikes_module._Detector._score

    def counted_feed(self: spikes_module._Detector, frame: object) -> object:
        parts.append(0)
        return feed(self, frame)

    def counted_score(self: spikes_module._Detector, *job: object) -> object:
        parts[-1] += 1
        scorers.add(threading.current_thread().name)
        return score(self, *job)

    monkeypatch.setattr(spikes_module, "PART_ROWS", 300)
    monkeypatch.setattr(spikes_module.pl, "thread_pool_size", lambda: 3)
    monkeypatch.setattr(spikes_module, "ThreadPoolExecutor", Counted)
    monkeypatch.setattr(spikes_module._Detector, "feed", counted_feed)
    monkeypatch.setattr(spikes_module._Detector, "_score", counted_score)
    for piece_rows in (10**6, 997):
        monkeypatch.setattr(series_module, "CHUNK_ROWS", piece_rows)
        pools.clear()
        parts.clear()
        scorers.clear()
        got = _spikes(run, baseline_window=window, threshold=4.0)
        # frames cut into parts between series, one per thread: this one and two helpers made once,
        # named for what they do (a thread dump of a slow analysis says whose they are)
        assert max(parts) == 3 and pools == [2]
        assert {n.rsplit("_", 1)[0] for n in scorers - {threading.current_thread().name}} == {
            "normtrace-spikes"
        }
        assert not [t for t in threading.enumerate() if t.name.startswith("normtrace-spikes")]  # ended
        assert_same_spikes(
            got, reference_spikes(rows, "pass", window, 4.0), f"window {window}, pieces of {piece_rows}"
        )


def _gappy(rng: np.random.Generator, n: int, level: float, window: int) -> np.ndarray:
    """``_dense``'s outliers on a wave, cut by gaps of a window or a little more after every run of
    ``2 * window + k`` values, ``k`` cycling: gaps start and end at every offset from the pieces' bounds,
    so some stretch starts inside a gap and has its first own median one, two or more points on."""
    v = _dense(rng, n, level)
    at, k = 0, 0
    while (at := at + 2 * window + k) + window + 2 < n:
        v[at : at + window + k % 3] = np.nan
        at += window + k % 3
        k = (k + 1) % (window + 1)
    return v


@pytest.mark.parametrize("window", [5, 8, 13])
def test_gaps_ending_at_every_offset_from_the_pieces_carry_the_reference_medians(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    """What a stretch carries in from the one before (the last baseline and block MAD before its first
    own ones) is read at the right point: with gaps ending at every offset from a piece's start, scores
    in pieces of every size equal the reference's, point for point."""
    rng = np.random.default_rng(window)
    run = _write(
        tmp_path / "r", {f"g{i}": _gappy(rng, n, 3.0 * (i + 1), window) for i, n in enumerate([1300, 800])}
    )
    want = reference_spikes(_rows(run), "pass", window, 6.0)
    assert want.height > 200
    for piece_rows in (23, 29, 61):
        monkeypatch.setattr(series_module, "CHUNK_ROWS", piece_rows)
        assert_same_spikes(
            _spikes(run, baseline_window=window), want, f"window {window}, pieces of {piece_rows}"
        )


@pytest.fixture(scope="module")
def flat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Series whose MAD is 0 somewhere (quantised values, exact zeros, a flat stretch amid noise) and
    series too short for a rolling MAD, each with deviations for the scale to size."""
    rng = np.random.default_rng(21)
    dead = np.where(rng.random(900) < 0.01, 1 / 32, 0.0)
    dead[300:305] = 3 / 32
    sign = np.where(rng.random(700) < 0.02, -1.0, 1.0)  # the gradient cosine of a one-element bias
    zeros = np.zeros(500)
    zeros[[50, 260, 261]] = [1.0, 0.5, 2.0]
    zeros[[70, 71, 300]] = np.nan  # values missing where the scale is the RMS deviation
    mixed = 5.0 + 0.1 * rng.standard_normal(800)
    mixed[200:500] = 5.0  # noise, then exactly flat, then noise
    mixed[[350, 420]] = [5.2, 4.7]
    gapped = np.zeros(900)
    gapped[[100, 700]] = [1.0, 3.0]
    gapped[250:600] = np.nan  # longer than the scale's span: windows with no value at all
    series = {"dead": dead, "sign": sign, "zeros": zeros, "mixed": mixed, "gapped": gapped}
    for n in (14, 27, 40, 75, 110):
        short = 3.0 + 0.05 * rng.standard_normal(n)
        short[n // 2] += 1.0
        series[f"short{n}"] = short
    return _write(tmp_path_factory.mktemp("streaming") / "flat", series)


@pytest.mark.parametrize("window", [3, 11, 51])
def test_a_mad_of_zero_and_series_too_short_for_it_give_the_reference_spikes(
    flat: Path, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    want = reference_spikes(_rows(flat), "pass", window, 6.0)
    # (at a window of 3 the scale spans 13 points, in which no deviation is six RMS deviations)
    assert ({"mixed"} if window == 3 else {"dead", "zeros", "mixed"}) <= set(want["module"].to_list())
    for piece_rows in (10**6, 97, 23):
        monkeypatch.setattr(series_module, "CHUNK_ROWS", piece_rows)
        assert_same_spikes(
            _spikes(flat, baseline_window=window), want, f"window {window}, pieces of {piece_rows}"
        )
