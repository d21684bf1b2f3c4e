"""``series.scan`` and what is built on it, against the rows as written (issue 17's mutation survivors).

Every expectation here is computed from the rows the test writes (plain Python over lists), never from
the package: the rows each series holds and their order, where a frame starts and what it keeps, which
epochs are complete when, the series' lengths, spans and epoch starts, whole series in groups, and
per-epoch means. Layouts: whole passes per shard, shards cut mid-pass, no-grad passes, a module that
starts late (and first in its pass), two ranks of unequal shards, rows dropped, rows shuffled, two runs.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import normtrace_analysis as na
import numpy as np
import polars as pl
import pytest
from normtrace_analysis import series
from normtrace_analysis.errors import MissingTableError
from tracegen import write_trace

NEVER = np.iinfo(np.int64).max
LOWEST = np.iinfo(np.int64).min


def _rows(
    passes: int, per_epoch: int, modules: list[str], *, no_grad: bool = False, late: dict | None = None
):
    """Rows as the recorder writes them: pass by pass, the modules in order within a pass (a module of
    ``late`` from that pass on, first in its pass); with ``no_grad``, a no-grad row after each training
    row of the pass. Values distinct everywhere (exact in float32)."""
    late = late or {}
    rows = []
    for p in range(passes):
        names = [m for m in late if p >= late[m]] + modules
        for grad in (True, False) if no_grad else (True,):
            for m in names:
                rows.append({"pass": p, "epoch": p // per_epoch, "module": m, "grad": grad})
    for i, r in enumerate(rows):
        r["value"] = float(np.float32(1.0 + i / 8))
    return rows


def _write(
    run: Path, rows: list[dict], *, shards: int, rank: int = 0, rank_column: int | None = None
) -> None:
    outputs = {
        "pass": np.array([r["pass"] for r in rows], dtype=np.int64),
        "epoch": np.array([r["epoch"] for r in rows], dtype=np.int32),
        "module": [r["module"] for r in rows],
        "grad_enabled": np.array([r["grad"] for r in rows], dtype=bool),
        "norm": np.array([r["value"] for r in rows], dtype=np.float32),
    }
    if rank_column is not None:  # a rank column that differs from the shard names' rank
        outputs["rank"] = np.full(len(rows), rank_column, dtype=np.int32)
    write_trace(run, outputs=outputs, shards=shards, rank=rank)


def _layouts(root: Path) -> dict[str, tuple[list[Path], list[dict]]]:
    """name -> (run folders, every row as written with its run and rank, in writing order per rank)."""
    out: dict[str, tuple[list[Path], list[dict]]] = {}

    def one(name: str, rows: list[dict], shards: int) -> None:
        _write(root / name, rows, shards=shards)
        out[name] = ([root / name], [{**r, "run": name, "rank": 0} for r in rows])

    one("whole-passes", _rows(60, 10, ["a", "b", "c"]), 4)  # 45 rows a shard: 15 whole passes
    one("cut-passes", _rows(60, 10, ["a", "b", "c"]), 7)
    one("no-grad", _rows(40, 8, ["a", "b"], no_grad=True), 5)
    one("late-module", _rows(60, 10, ["a", "b"], late={"z": 25}), 6)
    rng = np.random.default_rng(5)
    rows = _rows(50, 10, ["a", "b", "c"])
    one("dropped", [r for r, keep in zip(rows, rng.random(len(rows)) > 0.15, strict=True) if keep], 5)
    rows = _rows(40, 10, ["a", "b", "c", "d"])
    one("shuffled", [rows[i] for i in rng.permutation(len(rows))], 3)
    rows = _rows(30, 10, ["m"])
    one("shuffled-one-module", [rows[i] for i in rng.permutation(len(rows))], 2)
    # modules b and d recorded once each (series of one row), c twice
    rows = [{"pass": p, "epoch": p // 5, "module": "a", "grad": True} for p in range(10)]
    rows[3:3] = [{"pass": 3, "epoch": 0, "module": m, "grad": True} for m in ("b", "d")]
    rows[8:8] = [
        {"pass": p, "epoch": p // 5, "module": "c", "grad": True} for p in (4, 5)
    ]  # epoch 1 at pos 1
    for i, r in enumerate(rows):
        r["value"] = 100.0 + i
    one("singletons", rows, 2)
    # one pass a shard: no key repeats within a piece
    one("one-pass-shards", _rows(4, 2, ["a", "b", "c"]), 4)
    # a alone for 10 passes, then b first in each pass: whole passes whose numbers run backwards
    rows = [r for r in _rows(40, 10, ["b", "a"]) if r["module"] == "a" or r["pass"] >= 10]
    one("reversed", rows, 4)
    # one epoch, the later passes' shard written first: passes go back between pieces only
    swapped = _rows(40, 100, ["a", "b"])
    _write(root / "swapped", swapped[40:], shards=1)
    _write(root / "swapped", swapped[:40], shards=1)
    out["swapped"] = ([root / "swapped"], [{**r, "run": "swapped", "rank": 0} for r in swapped])
    # shards named rank 0 holding rows of rank 3: the reader cannot end those series after its shards
    _write(root / "renamed", _rows(30, 10, ["a", "b"]), shards=3, rank_column=3)
    out["renamed"] = (
        [root / "renamed"],
        [{**r, "run": "renamed", "rank": 3} for r in _rows(30, 10, ["a", "b"])],
    )
    # one series out of pass order within each epoch, the others in order (epochs never go back)
    rows = _rows(40, 10, ["a", "b", "c"])
    at = [i for i, r in enumerate(rows) if r["module"] == "c"]
    moved = [at[e * 10 + j] for e in range(4) for j in np.random.default_rng(e).permutation(10)]
    for i, j in zip(at, [rows[k] for k in moved], strict=True):
        rows[i] = j
    one("one-unordered", rows, 1)
    # two ranks: unequal shards, rank 1 slower per piece; each with a module starting late, first in
    # its pass (rank 0's later: its series numbered after rank 1's, so pieces of both are regrouped)
    ddp = root / "ddp"
    r0, r1 = _rows(60, 10, ["a", "b"], late={"x": 45}), _rows(60, 10, ["a", "b"], late={"y": 5})
    _write(ddp, r0, shards=3, rank=0)
    _write(ddp, r1, shards=11, rank=1)
    out["two-ranks"] = (
        [ddp],
        [{**r, "run": "ddp", "rank": 0} for r in r0] + [{**r, "run": "ddp", "rank": 1} for r in r1],
    )
    # two ranks with no-grad passes, shuffled: whole series numbered by module, rank, split
    mixed = root / "mixed"
    m0, m1 = _rows(20, 5, ["b", "a"], no_grad=True), _rows(20, 5, ["b", "a"], no_grad=True)
    _write(mixed, [m0[i] for i in rng.permutation(len(m0))], shards=2, rank=0)
    _write(mixed, [m1[i] for i in rng.permutation(len(m1))], shards=3, rank=1)
    out["shuffled-two-ranks"] = (
        [mixed],
        [{**r, "run": "mixed", "rank": 0} for r in m0] + [{**r, "run": "mixed", "rank": 1} for r in m1],
    )
    out["two-runs-shuffled"] = (
        [root / "shuffled", root / "shuffled-one-module"],
        out["shuffled"][1] + out["shuffled-one-module"][1],
    )
    out["two-runs"] = (
        [root / "cut-passes", root / "late-module"],
        out["cut-passes"][1] + out["late-module"][1],
    )
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[Path], list[dict]]]:
    return _layouts(tmp_path_factory.mktemp("series"))


LAYOUTS = [
    "whole-passes",
    "cut-passes",
    "no-grad",
    "late-module",
    "dropped",
    "shuffled",
    "shuffled-one-module",
    "singletons",
    "one-pass-shards",
    "reversed",
    "swapped",
    "one-unordered",
    "renamed",
    "two-ranks",
    "shuffled-two-ranks",
    "two-runs",
    "two-runs-shuffled",
]


def _key(r: dict) -> tuple:
    return (r["run"], r["rank"], r["module"], r["grad"])


def _expected_series(rows: list[dict]) -> dict[tuple, list[tuple[int, int, float]]]:
    """Per series key (run, rank, module, grad_enabled): its (pass, epoch, value) rows in pass order."""
    out: dict[tuple, list[tuple[int, int, float]]] = defaultdict(list)
    for r in rows:
        out[_key(r)].append((r["pass"], r["epoch"], r["value"]))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in out.items()}


class _Recorder:
    """A consumer that checks every frame's bookkeeping against what it saw before and keeps, per
    ``keep``: nothing (None), the last ``keep`` rows of each series, or everything (-1)."""

    def __init__(self, registry: series.Registry, keep: int | None) -> None:
        self.registry = registry
        self.keep = keep
        self.rows: dict[int, list[tuple[int, int, float]]] = defaultdict(list)
        self.end: dict[int, int] = {}
        self.next_start: dict[int, int] = {}
        self.ended: set[int] = set()
        self.ended_at: dict[int, int] = {}  # sid -> the frame (its index) that ended it
        self.frames: list[dict[int, tuple[int, int]]] = []  # per frame: sid -> (settled, rows delivered)
        self.finished = 0

    def feed(self, frame: series.Frame) -> np.ndarray:
        cols = frame.cols
        assert (
            len(frame.rows) == len(frame.sids) + 1
            and frame.rows[0] == 0
            and frame.rows[-1] == len(cols["sid"])
        )
        assert frame.data.height == len(cols["sid"])
        seen: dict[int, tuple[int, int]] = {}
        need = []
        for i, sid in enumerate(int(s) for s in frame.sids):
            r0, r1 = int(frame.rows[i]), int(frame.rows[i + 1])
            start, fresh, end = int(frame.start[i]), int(frame.fresh[i]), int(frame.end[i])
            assert (cols["sid"][r0:r1] == sid).all()
            assert [cols[c].dtype for c in ("sid", "pass", "epoch", "value", "pos")] == [
                np.uint32,
                np.int64,
                np.int32,
                np.float64,
                np.int64,
            ]
            assert cols["pos"][r0:r1].tolist() == list(range(start, end))
            assert fresh == self.end.get(sid, 0)  # the first new row follows the last one seen
            assert start == self.next_start.get(sid, fresh)  # the rows kept last time, and no more
            assert frame.lengths[i] == r1 - r0
            assert (frame.segment[r0:r1] == i).all()
            got = list(
                zip(
                    cols["pass"][r0:r1].tolist(),
                    cols["epoch"][r0:r1].tolist(),
                    cols["value"][r0:r1].tolist(),
                    strict=True,
                )
            )
            assert got[: fresh - start] == self.rows[sid][start:fresh]  # kept rows come back unchanged
            if sid in self.ended:
                assert fresh == end  # nothing new after a series ended
            self.rows[sid].extend(got[fresh - start :])
            self.end[sid] = end
            if frame.ended[i]:
                self.ended.add(sid)
                self.ended_at.setdefault(sid, len(self.frames))
            seen[sid] = (int(frame.settled[i]), end)
            keep_from = end if self.keep is None else 0 if self.keep < 0 else max(end - self.keep, 0)
            self.next_start[sid] = min(max(keep_from, start), end)
            need.append(keep_from)
        self.frames.append(seen)
        return np.array(need, dtype=np.int64)

    def finish(self) -> None:
        self.finished += 1


def _scan(
    paths: list[Path], keep: int | None, chunk_rows: int | None, modules=None
) -> tuple[_Recorder, series.SeriesInfo]:
    trace = na.load(paths)
    (rec,), info = series.scan(
        trace, "outputs", modules, lambda reg: [_Recorder(reg, keep)], chunk_rows=chunk_rows
    )
    return rec, info


def _by_key(rec: _Recorder) -> dict[tuple, list[tuple[int, int, float]]]:
    return {(k[0], k[1], k[2], k[3]): rec.rows[sid] for sid, k in enumerate(rec.registry.keys)}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("keep", "chunk_rows"), [(None, None), (None, 7), (3, 20), (-1, 50), (5, 1)])
def test_every_series_arrives_whole_once_and_in_pass_order(layouts, layout: str, keep, chunk_rows) -> None:
    paths, rows = layouts[layout]
    rec, _ = _scan(paths, keep, chunk_rows)
    assert rec.finished == 1
    assert _by_key(rec) == _expected_series(rows)
    if keep == -1:  # kept whole, every series is in every frame after its first: all end in one
        assert rec.ended == set(range(len(rec.registry)))


def _settled_expected(rec: _Recorder, rows: list[dict]) -> list[dict[int, int]]:
    """Per frame and series, the epoch bound below which every epoch of the series' run is complete, as
    the reader promises it: NEVER once the run is read, else the smallest over the ranks not fully
    read of the largest epoch read of the rank (every rank's rows are in epoch order), and the lowest
    integer while a rank of the run has none read."""
    total = defaultdict(int)  # (run, rank) -> rows written
    for r in rows:
        total[r["run"], r["rank"]] += 1
    keys = rec.registry.keys
    delivered: dict[int, int] = defaultdict(int)
    top: dict[tuple, int] = {}
    out = []
    for frame in rec.frames:
        for sid, (_, end) in frame.items():
            run, rank = keys[sid][0], keys[sid][1]
            new = rec.rows[sid][delivered[sid] : end]
            if new:
                top[run, rank] = max(top.get((run, rank), LOWEST), max(e for _, e, _ in new))
            delivered[sid] = max(delivered[sid], end)
        done: dict[tuple, int] = defaultdict(int)
        for sid, n in delivered.items():
            done[keys[sid][0], keys[sid][1]] += n
        want = {}
        for sid in frame:
            run = keys[sid][0]
            open_ranks = [rk for (rn, rk) in total if rn == run and done[rn, rk] < total[rn, rk]]
            want[sid] = NEVER if not open_ranks else min(top.get((run, rk), LOWEST) for rk in open_ranks)
        out.append(want)
    return out


@pytest.mark.parametrize("layout", ["whole-passes", "cut-passes", "late-module", "two-ranks", "two-runs"])
@pytest.mark.parametrize("chunk_rows", [1, 17, 60])
def test_settled_is_the_lowest_epoch_still_being_read(layouts, layout: str, chunk_rows: int) -> None:
    paths, rows = layouts[layout]
    rec, _ = _scan(paths, -1, chunk_rows)
    want = _settled_expected(rec, rows)
    got = [{sid: settled for sid, (settled, _) in frame.items()} for frame in rec.frames]
    assert got == want
    _assert_settled_holds(rec)


def _assert_settled_holds(rec: _Recorder) -> None:
    """The settled bound's promise: no row delivered after a frame, in the same group of series (the
    ranks pooled), has an epoch below the bound that frame gave."""
    keys = rec.registry.keys
    for f, frame in enumerate(rec.frames):
        for sid, (settled, _end) in frame.items():
            group = (keys[sid][0], *keys[sid][2:])
            later = [
                e
                for s, k in enumerate(keys)
                if (k[0], *k[2:]) == group
                for _, e, _ in rec.rows[s][rec.frames[f].get(s, (0, 0))[1] :]
            ]
            assert not later or settled == NEVER or min(later) >= settled


def test_a_rank_whose_later_shard_goes_back_in_epochs_is_read_as_whole_series(tmp_path: Path) -> None:
    """A module first met in a rank's later shard with epochs below those the rank's earlier shards
    reached (each series in order by itself) means the rank's shards are out of order; another rank
    records the same module, whose frames have already been told those epochs are complete. The reader
    reads whole series instead: every row arrives and the settled bounds hold."""
    a = _rows(100, 10, ["a"])
    b = [{**r, "module": "b", "value": r["value"] + 1000.0} for r in a[:50]]  # epochs 0-4
    rank0 = a[50:] + b  # shard 1: a, epochs 5-9; shard 2: b, epochs 0-4
    rank1 = [{**r, "value": r["value"] + 2000.0} for r in _rows(100, 10, ["b"])]
    run = tmp_path / "run"
    _write(run, rank0, shards=2, rank=0)
    _write(run, rank1, shards=10, rank=1)
    rows = [{**r, "run": "run", "rank": 0} for r in rank0] + [{**r, "run": "run", "rank": 1} for r in rank1]
    rec, _ = _scan([run], -1, 20)
    assert _by_key(rec) == _expected_series(rows)
    _assert_settled_holds(rec)


def test_shuffled_rows_are_read_as_whole_series_with_every_epoch_settled(layouts) -> None:
    paths, rows = layouts["shuffled"]
    rec, _ = _scan(paths, None, 30)
    assert _by_key(rec) == _expected_series(rows)
    assert all(settled == NEVER for frame in rec.frames for settled, _ in frame.values())
    assert all(len(frame) <= 2 for frame in rec.frames[:-1])  # a group of modules (here one) at a time


def _expected_info(rows: list[dict]) -> tuple[dict[tuple, tuple], set[tuple]]:
    per = _expected_series(rows)
    keys = {}
    for k, v in per.items():
        passes, epochs = [p for p, _, _ in v], [e for _, e, _ in v]
        keys[k[0], k[1], k[2], "train" if k[3] else "no_grad"] = (
            len(v),
            passes[0],
            passes[-1],
            epochs[0],
            epochs[-1],
            len(set(epochs)),
        )
    starts: dict[tuple, int] = {}
    for (run, rank, _, _), v in per.items():
        for (_, e0, _), (p1, e1, _) in zip(v, v[1:], strict=False):
            if e1 != e0:
                starts[run, rank, e1] = min(starts.get((run, rank, e1), p1), p1)
    return keys, {(*k, p) for k, p in starts.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chunk_rows", [None, 13])
def test_series_info_equals_the_rows_as_written(layouts, layout: str, chunk_rows) -> None:
    paths, rows = layouts[layout]
    _, info = _scan(paths, None, chunk_rows)
    keys, starts = _expected_info(rows)
    k = info.keys
    assert k["sid"].to_list() == list(range(k.height))
    assert k.schema["rank"] == pl.Int32 and k.schema["sid"] == pl.UInt32
    got = {
        (r["run"], r["rank"], r["module"], r["split"]): (
            r["length"],
            r["first_pass"],
            r["last_pass"],
            r["first_epoch"],
            r["last_epoch"],
            r["epochs"],
        )
        for r in k.iter_rows(named=True)
    }
    assert got == keys
    assert set(info.epoch_starts.iter_rows()) == starts
    assert info.epoch_starts.columns == ["run", "rank", "epoch", "first"]
    assert info.epoch_starts.select("run", "rank", "epoch").rows() == sorted(
        info.epoch_starts.select("run", "rank", "epoch").rows()
    )


def test_series_info_is_memoised_per_module_selection(layouts) -> None:
    paths, rows = layouts["cut-passes"]
    trace = na.load(paths)
    for modules in (["a"], ["b", "c"], "^c$", None):
        info = series.series_info(trace, "outputs", modules)
        if modules is None:
            want = {"a", "b", "c"}
        elif isinstance(modules, str):
            want = {"c"}
        else:
            want = set(modules)
        assert set(info.keys["module"]) == want
        assert info.keys["length"].sum() == sum(r["module"] in want for r in rows)
    # a list and a tuple of the same names are the same selection
    assert series.series_info(trace, "outputs", ("b", "c")) is series.series_info(
        trace, "outputs", ["b", "c"]
    )
    with pytest.raises(MissingTableError):
        series.series_info(trace, "params", None)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chunk_rows", [None, 1, 45, 80, 120])
def test_complete_series_are_whole_series_in_greedy_groups(layouts, layout: str, chunk_rows) -> None:
    paths, rows = layouts[layout]
    trace = na.load(paths)
    info = series.series_info(trace, "outputs", None)
    expected = _expected_series(rows)
    limit = series.GROUP_ROWS if chunk_rows is None else chunk_rows
    groups = list(series.complete_series(trace, "outputs", None, chunk_rows=chunk_rows))
    # greedy groups of consecutive sids of one run: a series joins the group unless it would pass the limit
    want_groups: list[list[int]] = []
    for _, per_run in info.keys.group_by("run", maintain_order=True):
        current: list[int] = []
        size = 0
        for sid, n in per_run.select("sid", "length").iter_rows():
            if current and size + n > limit:
                want_groups.append(current)
                current, size = [], 0
            current.append(sid)
            size += n
        want_groups.append(current)
    assert [g.keys["sid"].to_list() for g in groups] == want_groups
    seen = set()
    for g in groups:
        assert g.keys.columns == [c for c in info.keys.columns if c != "length"]
        assert g.keys.equals(info.keys.filter(pl.col("sid").is_in(g.keys["sid"].to_list())).drop("length"))
        assert g.data.columns == ["sid", "pass", "epoch", "value"]
        for (sid,), part in g.data.group_by("sid", maintain_order=True):
            r = info.keys.row(sid, named=True)
            key = (r["run"], r["rank"], r["module"], r["split"] == "train")
            assert part.select("pass", "epoch", "value").rows() == expected[key]
            seen.add(sid)
        assert g.data["sid"].to_list() == sorted(g.data["sid"].to_list())  # contiguous per sid
    assert seen == set(range(info.keys.height))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_epoch_series_are_the_means_of_the_rows_as_written(layouts, layout: str, monkeypatch) -> None:
    paths, rows = layouts[layout]
    sums: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        sums[(*_key(r), r["epoch"])].append(r["value"])
    for chunk in (None, 11):
        if chunk:
            monkeypatch.setattr(series, "CHUNK_ROWS", chunk)
        s = series.epoch_series(na.load(paths), "outputs", None)
        keys = s.keys.rows(named=True)
        got = {}
        for sid, epoch, value in s.data.iter_rows():
            k = keys[sid]
            got[k["run"], k["rank"], k["module"], k["split"] == "train", epoch] = value
        assert got.keys() == sums.keys()
        for k, values in sums.items():
            assert got[k] == pytest.approx(sum(values) / len(values), rel=1e-12)
        assert s.data.select("sid", "epoch").rows() == sorted(s.data.select("sid", "epoch").rows())
        assert s.data.schema == pl.Schema({"sid": pl.UInt32, "epoch": pl.Int32, "value": pl.Float64})


def test_epoch_means_of_whole_series_and_a_nan(tmp_path: Path) -> None:
    data = pl.DataFrame(
        {
            "sid": pl.Series([1, 1, 1, 0, 0, 3], dtype=pl.UInt32),
            "pass": [0, 1, 2, 0, 1, 7],
            "epoch": pl.Series([4, 4, 5, 2, 9, 1], dtype=pl.Int32),
            "value": [1.0, 2.0, 7.0, float("nan"), 3.0, 0.5],
        }
    )
    got = series.epoch_means(series.Series(data, pl.DataFrame({"sid": [0, 1, 3]})))
    assert got.schema == pl.Schema({"sid": pl.UInt32, "epoch": pl.Int32, "value": pl.Float64})
    rows = got.rows()
    assert [r[:2] for r in rows] == [(0, 2), (0, 9), (1, 4), (1, 5), (3, 1)]
    assert np.isnan(rows[0][2])
    assert [r[2] for r in rows[1:]] == [3.0, 1.5, 7.0, 0.5]


def test_an_epoch_met_again_later_in_a_series_is_one_mean(tmp_path: Path) -> None:
    """A series whose epoch goes back (0, 0, 1, 1, 0, 0: a restarted counter) is read as whole series;
    its per-epoch means are one per epoch, as the summary's are. The packed (sid, epoch) keys are
    unsigned: a check of their order by ``np.diff`` wrapped around and never saw them unsorted."""
    outputs = {
        "pass": np.arange(6),
        "epoch": np.array([0, 0, 1, 1, 0, 0], dtype=np.int32),
        "module": ["m"] * 6,
        "norm": np.arange(6, dtype=np.float32),
    }
    trace = na.load(write_trace(tmp_path / "r", outputs=outputs))
    assert series.epoch_series(trace, "outputs", None).data.rows() == [(0, 0, 2.5), (0, 1, 2.5)]
    assert trace.epoch_summary().select("epoch", "mean").rows() == [(0, 2.5), (1, 2.5)]
    assert series.series_info(trace, "outputs", None).keys["epochs"].to_list() == [2]  # distinct epochs


@pytest.mark.parametrize(
    ("chunk_rows", "groups"),
    [(79, [["a"], ["b"], ["c"], ["d"]]), (80, [["a", "b"], ["c", "d"]]), (1000, [["a", "b", "c", "d"]])],
)
def test_shuffled_rows_are_read_a_group_of_modules_at_a_time(layouts, chunk_rows: int, groups) -> None:
    """40 rows a module: modules join a piece while its rows stay within ``chunk_rows`` (80: two, in
    the first piece and in the second)."""
    paths, _ = layouts["shuffled"]
    rec, _ = _scan(paths, None, chunk_rows)
    got = [sorted({rec.registry.keys[sid][2] for sid in frame}) for frame in rec.frames]
    assert got == groups


def test_whole_series_are_numbered_by_module_rank_and_split(layouts) -> None:
    paths, rows = layouts["shuffled-two-ranks"]
    rec, info = _scan(paths, None, 50)
    want = sorted({(r["module"], r["rank"], r["grad"]) for r in rows})
    assert [(k[2], k[1], k[3]) for k in rec.registry.keys] == want
    assert info.keys.select("module", "rank", "split").rows() == [
        (m, rk, "train" if g else "no_grad") for m, rk, g in want
    ]


@pytest.mark.parametrize("layout", ["cut-passes", "shuffled", "two-runs-shuffled", "shuffled-two-ranks"])
@pytest.mark.parametrize("modules", [["a"], "^(b|m)$"])
def test_a_module_selection_reads_those_modules_only(layouts, layout: str, modules) -> None:
    paths, rows = layouts[layout]
    chosen = [r for r in rows if r["module"] in (["a"] if modules == ["a"] else ["b", "m"])]
    rec, info = _scan(paths, None, 23, modules=modules)
    assert _by_key(rec) == _expected_series(chosen)
    trace = na.load(paths)
    data = pl.concat([s.data for s in series.complete_series(trace, "outputs", modules, chunk_rows=30)])
    assert data.height == len(chosen)
    keys, _ = _expected_info(chosen)
    assert (
        series.series_info(trace, "outputs", modules).keys["length"].sum()
        == len(chosen)
        == sum(v[0] for v in keys.values())
    )


def _signals(rows: list[dict]) -> dict:
    return {
        "pass": np.array([r["pass"] for r in rows], dtype=np.int64),
        "epoch": np.array([r["epoch"] for r in rows], dtype=np.int32),
        "kind": [r["kind"] for r in rows],
        "module": [r["module"] for r in rows],
        "param": pa_strings([r["param"] for r in rows]),
        "value": np.array([r["value"] for r in rows], dtype=np.float32),
    }


def pa_strings(values: list) -> object:
    import pyarrow as pa

    return pa.array(values, type=pa.string())


@pytest.mark.parametrize("order", ["written", "dropped", "shuffled"])
def test_signals_with_a_null_param_are_series_of_their_own(tmp_path: Path, order: str) -> None:
    """Signals' keys hold nulls (a module-level signal has no param): a null matches a null when rows
    are numbered, in whole series and in groups of whole series as in pieces."""
    rows = []
    for p in range(30):
        for kind, module, param in [
            ("grad_norm", "l1", "weight"),
            ("grad_norm", "l1", None),
            ("active_rate", "l1", None),
            ("grad_norm", "l2", None),
        ]:
            rows.append({"pass": p, "epoch": p // 10, "kind": kind, "module": module, "param": param})
    for i, r in enumerate(rows):
        r["value"] = float(np.float32(0.5 + i / 4))
    if order == "shuffled":
        rows = [rows[i] for i in np.random.default_rng(2).permutation(len(rows))]
    elif order == "dropped":  # no fixed layout per pass: numbered by a join on the keys
        rows = [
            r for r, keep in zip(rows, np.random.default_rng(3).random(len(rows)) > 0.2, strict=True) if keep
        ]
    run = write_trace(tmp_path / "r", signals=_signals(rows), shards=3)
    want: dict[tuple, list] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r["pass"]):
        want[r["kind"], r["module"], r["param"]].append((r["pass"], r["epoch"], r["value"]))
    trace = na.load(run)
    (rec,), info = series.scan(trace, "signals", None, lambda reg: [_Recorder(reg, None)], chunk_rows=17)
    assert {k[2:]: rec.rows[sid] for sid, k in enumerate(rec.registry.keys)} == want
    lengths = info.keys.select("kind", "module", "param", "length").rows()
    assert sorted(lengths, key=str) == sorted([(*k, len(v)) for k, v in want.items()], key=str)
    got = {}
    for s in series.complete_series(na.load(run), "signals", None, chunk_rows=40):
        for (sid,), part in s.data.group_by("sid", maintain_order=True):
            k = s.keys.filter(pl.col("sid") == sid).row(0, named=True)
            got[k["kind"], k["module"], k["param"]] = part.select("pass", "epoch", "value").rows()
    assert got == want


def test_progress_names_the_piece_the_group_and_the_percentage(layouts, monkeypatch) -> None:
    said: list[str] = []
    monkeypatch.setattr(series, "detail", said.append)
    _scan(layouts["cut-passes"][0], None, 50)
    assert said[-1] == "outputs 100%"
    percents = [int(t.split()[1].rstrip("%")) for t in said]
    assert percents == sorted(set(percents)) and len(percents) > 2  # each said once, rising
    said.clear()
    _scan(layouts["shuffled"][0], None, 80)
    assert said == ["outputs shuffled: modules 1 of 2", "outputs shuffled: modules 2 of 2"]
    said.clear()
    trace = na.load(layouts["cut-passes"][0])
    series.series_info(trace, "outputs", None)
    said.clear()
    list(series.complete_series(trace, "outputs", None, chunk_rows=120))
    assert said == ["outputs cut-passes: series group 1 of 2", "outputs cut-passes: series group 2 of 2"]
    said.clear()
    list(series.complete_series(trace, "outputs", None))
    assert said == []  # one group: nothing to count


def test_series_info_is_the_one_an_analysis_scan_recorded(layouts, monkeypatch) -> None:
    trace = na.load(layouts["cut-passes"][0])
    trace.spikes()
    monkeypatch.setattr(series, "scan", None)  # a second scan would fail
    info = series.series_info(trace, "outputs", None)
    assert info.keys["length"].to_list() == [60, 60, 60]


def test_an_empty_selection_is_refused_and_no_series_give_empty_epoch_means_with_their_schema(
    layouts,
) -> None:
    with pytest.raises(
        na.EmptySelectionError, match="^modules='\\^nothing\\$' matches no module of the outputs"
    ):
        series.epoch_series(na.load(layouts["cut-passes"][0]), "outputs", "^nothing$")
    s = series._EpochMeans(series.Registry("outputs")).result()  # a consumer fed no frame
    assert s.data.height == 0
    assert s.keys.schema == pl.Schema(
        {"sid": pl.UInt32, "run": pl.String, "rank": pl.Int32, "module": pl.String, "split": pl.String}
    )
    assert s.data.schema == pl.Schema({"sid": pl.UInt32, "epoch": pl.Int32, "value": pl.Float64})


def test_rows_of_one_pass_keep_their_order_when_read_as_whole_series(tmp_path: Path) -> None:
    """A module called twice in a pass records two rows with one pass number: reading whole series
    sorts by pass stably, so the two keep the order they were written in (here shuffled)."""
    rows = [{"pass": p, "epoch": p // 10, "module": "m", "grad": True} for p in range(40) for _ in (0, 1)]
    rows += [{"pass": p, "epoch": p // 10, "module": "n", "grad": True} for p in range(40)]
    for i, r in enumerate(rows):
        r["value"] = float(i)
    rows = [rows[i] for i in np.random.default_rng(4).permutation(len(rows))]
    _write(tmp_path / "r", rows, shards=2)
    written = [{**r, "run": "r", "rank": 0} for r in rows]
    for chunk in (None, 50):
        rec, _ = _scan([tmp_path / "r"], None, chunk)
        assert _by_key(rec) == _expected_series(written)  # Python's sort is stable
    data = pl.concat([s.data for s in series.complete_series(na.load(tmp_path / "r"), "outputs", None)])
    per = _expected_series(written)
    assert data.filter(pl.col("sid") == 0).select("pass", "epoch", "value").rows() == per["r", 0, "m", True]


def _frame(segments: list[tuple[int, list[int], int]]) -> series.Frame:
    """A frame by hand: per segment (start pos, epochs of its rows, settled bound)."""
    lengths = [len(e) for _, e, _ in segments]
    rows = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    start = np.array([s for s, _, _ in segments], dtype=np.int64)
    end = start + np.array(lengths, dtype=np.int64)
    cols = {
        "sid": np.repeat(np.arange(len(segments)), lengths).astype(np.uint32),
        "pos": np.concatenate([np.arange(s, s + n) for s, n in zip(start, lengths, strict=True)]),
        "pass": np.arange(rows[-1], dtype=np.int64),
        "epoch": np.concatenate([np.array(e, dtype=np.int32) for _, e, _ in segments]),
        "value": np.zeros(rows[-1]),
    }
    settled = np.array([b for _, _, b in segments], dtype=np.int64)
    n = len(segments)
    return series.Frame(cols, np.arange(n), rows, start, start, end, np.zeros(n, bool), settled, None)


def _settled_by_hand(
    segments: list[tuple[int, list[int], int]], done: list[int]
) -> tuple[list[bool], list[int]]:
    take, need = [], []
    for (start, epochs, bound), d in zip(segments, done, strict=True):
        take += [start + j >= d and e < bound for j, e in enumerate(epochs)]
        first_open = next((start + j for j, e in enumerate(epochs) if e >= bound), start + len(epochs))
        need.append(max(first_open, min(max(d, start), start + len(epochs))))
    return take, need


BIG = 2**31 - 1


@pytest.mark.parametrize(
    ("segments", "done"),
    [
        (  # settled bounds of every kind side by side: an epoch, none yet, all (another run read)
            [
                (10, [3, 3, 4, 4, 5, 5], 5),
                (0, [-2, -1, 0, 0], NEVER),
                (5, [7, 7, 8], LOWEST),
                (2, [1, 1, 1, 2, 2], 2),
                (0, [0, BIG - 1, BIG], BIG),
                (4, [0, 1], 1),
                (0, [-(2**31), -5, 6], -4),
            ],
            [12, 0, 5, 9, 0, 1, 0],
        ),
        ([(3, [0, 1, 1], NEVER), (0, [4], NEVER), (7, [2, 2, 3, 3], NEVER)], [4, 0, 9]),  # all settled
    ],
)
def test_settled_rows_are_the_complete_epochs_not_yet_consumed(segments, done) -> None:
    frame = _frame(segments)
    take, need = series.settled_rows(frame, np.array(done, dtype=np.int64))
    want_take, want_need = _settled_by_hand(segments, done)
    assert take.tolist() == want_take
    assert need.tolist() == want_need
    assert frame.per_row(np.array([10 * i for i in range(len(segments))])).tolist() == [
        10 * i for i, (_, e, _) in enumerate(segments) for _ in e
    ]


def test_epoch_series_are_memoised_per_module_selection(layouts) -> None:
    paths, rows = layouts["cut-passes"]
    trace = na.load(paths)
    for modules, want in ((["a"], {"a"}), ("^(b|c)$", {"b", "c"}), (None, {"a", "b", "c"})):
        s = series.epoch_series(trace, "outputs", modules)
        assert set(s.keys["module"]) == want
        assert s.data.height == len({(r["module"], r["epoch"]) for r in rows if r["module"] in want})
    assert series.epoch_series(trace, "outputs", ("a",)) is series.epoch_series(trace, "outputs", ["a"])


@pytest.mark.parametrize("layout", ["cut-passes", "shuffled", "two-ranks"])
def test_complete_series_of_a_selection_are_numbered_as_its_series_info(layouts, layout: str) -> None:
    trace = na.load(layouts[layout][0])
    info = series.series_info(trace, "outputs", ["b"])
    groups = list(series.complete_series(trace, "outputs", ["b"], chunk_rows=30))
    assert pl.concat([g.keys for g in groups]).equals(info.keys.drop("length"))
    assert set(pl.concat([g.data for g in groups])["sid"]) == set(info.keys["sid"])


@pytest.mark.parametrize("chunk_rows", [None, 9, 40])
def test_late_modules_of_two_ranks_selected_alone(layouts, chunk_rows) -> None:
    """Modules x (rank 0, from pass 45) and y (rank 1, from pass 5) alone: y is numbered first, and
    pieces holding one rank's rows only (the others filtered out) still give each series whole."""
    paths, rows = layouts["two-ranks"]
    rec, _ = _scan(paths, None, chunk_rows, modules=["x", "y"])
    assert [k[1:3] for k in rec.registry.keys] == [(1, "y"), (0, "x")]
    assert _by_key(rec) == _expected_series([r for r in rows if r["module"] in ("x", "y")])


class _Failing:
    """A consumer that fails on its second frame."""

    def __init__(self) -> None:
        self.frames = 0

    def feed(self, frame: series.Frame) -> np.ndarray:
        self.frames += 1
        if self.frames == 2:
            raise RuntimeError("consumer failed")
        return frame.end.copy()

    def finish(self) -> None:
        pass


def test_a_failing_consumer_fails_the_scan(layouts) -> None:
    """The error raised in the consumer's thread reaches the caller, pieces still being read ahead."""
    with pytest.raises(RuntimeError, match="consumer failed"):
        _scan_with(layouts["cut-passes"][0], _Failing(), chunk_rows=1)


def _scan_with(paths: list[Path], consumer, chunk_rows: int) -> None:
    series.scan(na.load(paths), "outputs", None, lambda reg: [consumer], chunk_rows=chunk_rows)


class _NewRows:
    """A consumer that keeps nothing and counts the rows new in each frame."""

    def __init__(self, registry: series.Registry) -> None:
        self.counts: list[int] = []

    def feed(self, frame: series.Frame) -> np.ndarray:
        self.counts.append(int((frame.end - frame.fresh).sum()))
        return frame.end.copy()

    def finish(self) -> None:
        pass


@pytest.mark.parametrize(("chunk_rows", "pieces"), [(100, [45, 90, 45]), (150, [45, 135]), (10, [45] * 4)])
def test_pieces_take_as_many_whole_shards_as_fit_in_the_chunk(
    layouts, chunk_rows: int, pieces: list[int]
) -> None:
    """Four shards of 45 rows (of about the same size in bytes): the first piece reads one shard and
    learns the bytes per row; the next ones take shards while they fit in ``chunk_rows`` rows' bytes,
    and at least one."""
    trace = na.load(layouts["whole-passes"][0])
    sizes = [size for _, size in trace.shards_by_rank("outputs")["whole-passes"][0]]
    assert max(sizes) < 1.1 * min(sizes)  # so that 100 rows hold two shards and not three
    (counter,), _ = series.scan(trace, "outputs", None, lambda reg: [_NewRows(reg)], chunk_rows=chunk_rows)
    assert counter.counts == pieces


@pytest.mark.parametrize(("chunk_rows", "pieces"), [(200, [90, 180, 90]), (300, [90, 270])])
def test_ranks_read_together_share_the_chunk(tmp_path: Path, chunk_rows: int, pieces: list[int]) -> None:
    """Two ranks of four 45-row shards each, in step: the first piece reads a shard of each (90 rows,
    which give the bytes per row); the next take half of ``chunk_rows`` from each rank."""
    rows = _rows(60, 10, ["a", "b", "c"])
    for rank in (0, 1):
        _write(tmp_path / "ddp", rows, shards=4, rank=rank)
    trace = na.load(tmp_path / "ddp")
    (counter,), _ = series.scan(trace, "outputs", None, lambda reg: [_NewRows(reg)], chunk_rows=chunk_rows)
    assert counter.counts == pieces


@pytest.mark.parametrize("chunks", [[6, 4], [3, 3], [10], [2, 2, 6], [4, 1, 3]])
@pytest.mark.parametrize("rows", [None, [1, 0]])
def test_a_transposition_reads_each_chunk_in_place_whether_or_not_a_chunk_cuts_a_pass(chunks, rows) -> None:
    """Rows of period 2 in chunks as files give them (a chunk of 3 cuts a pass): the same series-major
    copy as numpy's transpose of the whole column, in the order ``rows`` asks."""
    values = np.arange(float(sum(chunks)))
    bounds = np.cumsum([0, *chunks])
    column = pl.concat(
        [pl.Series(values[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)], rechunk=False
    )
    assert len(column.get_chunks()) == len(chunks)
    order = None if rows is None else np.array(rows)
    want = values.reshape(-1, 2).T[[0, 1] if rows is None else rows].ravel()
    assert series._transpose(column, 2, order).tolist() == want.tolist()


def test_a_transposition_of_many_modules_copies_every_band_of_passes() -> None:
    """2,048 modules make a band 16 passes long: 40 passes in chunks of 36 and 4 are three bands and
    one, the last of each short, each copied into place."""
    period, passes = 2048, 40
    values = np.random.default_rng(4).standard_normal(period * passes)
    column = pl.concat([pl.Series(values[: 36 * period]), pl.Series(values[36 * period :])], rechunk=False)
    assert len(column.get_chunks()) == 2
    assert np.array_equal(series._transpose(column, period, None), values.reshape(passes, period).T.ravel())


def test_a_frame_numbers_positions_when_first_asked_and_names_a_missing_column() -> None:
    """``pos`` (each row's index within its series: the segment's start pos, then one more per row) is
    computed on first access when the frame was built without it; any other missing column is a
    KeyError naming that column."""
    whole = _frame([(3, [0, 0, 1], 9), (0, [2], 9), (10, [4, 4], 9)])
    cols = {k: v for k, v in whole.cols.items() if k != "pos"}
    frame = series.Frame(
        cols, whole.sids, whole.rows, whole.start, whole.start, whole.end, whole.ended, whole.settled, None
    )
    assert "pos" not in frame.cols
    assert frame.cols["pos"].tolist() == [3, 4, 5, 0, 10, 11]
    assert frame.cols["pos"] is frame.cols["pos"]  # numbered once
    with pytest.raises(KeyError, match="'norm'"):
        frame.cols["norm"]


def test_an_epoch_starting_on_a_series_second_row_in_the_next_piece_is_counted(tmp_path: Path) -> None:
    """A series whose first piece holds only its first row (epoch 0) and whose next piece starts with
    epoch 1: the scan keeps nothing between them, and epoch 1's start (pass 1) is found against the
    epoch read before, not lost at the piece boundary."""
    outputs = {
        "pass": [0, 1, 2],
        "epoch": np.array([0, 1, 1], dtype=np.int32),
        "module": ["m"] * 3,
        "norm": np.ones(3, np.float32),
    }
    trace = na.load(write_trace(tmp_path / "r", outputs=outputs, shards=3))
    info = series.series_info(trace, "outputs", None)
    assert info.keys["epochs"].to_list() == [2]
    assert info.epoch_starts.select("epoch", "first").rows() == [(1, 1)]  # changes of epoch only


@pytest.mark.parametrize(
    ("layout", "partial"),
    [(["a", "b", "b"], False), (["a", "b", "b"], True), (["a", "b", "c"], False), (["a", "b", "c"], True)],
)
def test_a_key_met_twice_a_pass_keeps_its_rows_in_write_order(layout: list[str], partial: bool) -> None:
    """Numbering a part: every row gets its series' number, rows sorted by series and, within a series, in
    the order written, whether the part repeats a fixed layout (a b c) or one key comes twice a pass
    (a b b: a trace written by hand, without the recorder's name#k labels), whole passes or not."""
    passes = 4
    modules = layout * passes + (layout[:2] if partial else [])
    n = len(modules)
    raw = pl.DataFrame(
        {
            "rank": pl.Series([0] * n, dtype=pl.Int32),
            "module": modules,
            "grad_enabled": [True] * n,
            "pass": [i // len(layout) for i in range(n)],
            "epoch": pl.Series([0] * n, dtype=pl.Int32),
            "value": [float(i) for i in range(n)],
        }
    )
    registry = series.Registry("outputs")
    got = series._number(raw, "run", registry)
    first_seen = list(dict.fromkeys(modules))  # series numbered in the order they are first met
    want = sorted(range(n), key=lambda i: first_seen.index(modules[i]))  # stable: write order kept
    assert got["value"].tolist() == [float(i) for i in want]
    assert got["sid"].tolist() == [first_seen.index(modules[i]) for i in want]
    assert got["pass"].tolist() == [i // len(layout) for i in want]
    assert [registry.keys[s][2] for s in range(len(first_seen))] == first_seen


def test_a_piece_takes_each_lagging_ranks_files_up_to_its_byte_budget_and_counts_them() -> None:
    """Choosing a piece's files (``series._take``): the first piece (no bytes per row learned yet) takes
    one file per rank; later ones take files from the ranks furthest behind in epochs (a rank with no
    epoch read yet is furthest) while their bytes stay within ``chunk_rows`` x bytes per row, split
    between those ranks, a file meeting the budget exactly included; the bytes returned are the files'."""
    from collections import deque

    def queue(*sizes: int, rank: int) -> deque[tuple[Path, int]]:
        return deque((Path(f"r{rank}-{i}.arrow"), size) for i, size in enumerate(sizes))

    queues = {0: queue(40, 60, 1, rank=0), 1: queue(30, 30, rank=1)}
    taken, nbytes = series._take(queues, {0: None, 1: None}, chunk_rows=10, bytes_per_row=None)
    assert taken == [(0, [Path("r0-0.arrow")]), (1, [Path("r1-0.arrow")])]
    assert nbytes == 40 + 30

    queues = {0: queue(40, 60, 1, rank=0), 1: queue(30, 30, rank=1)}
    taken, nbytes = series._take(queues, {0: None, 1: 0}, chunk_rows=10, bytes_per_row=10.0)
    assert taken == [(0, [Path("r0-0.arrow"), Path("r0-1.arrow")])]  # 40 + 60 = the budget, 100
    assert nbytes == 100
    assert list(queues[0]) == [(Path("r0-2.arrow"), 1)] and len(queues[1]) == 2

    queues = {0: queue(40, 60, 1, rank=0), 1: queue(30, 30, rank=1)}
    taken, nbytes = series._take(queues, {0: 3, 1: 3}, chunk_rows=10, bytes_per_row=12.0)
    assert taken == [(0, [Path("r0-0.arrow")]), (1, [Path("r1-0.arrow"), Path("r1-1.arrow")])]  # 60 each
    assert nbytes == 40 + 60


def test_the_series_of_a_rank_whose_shards_are_all_read_end_before_the_other_ranks_do(
    tmp_path: Path,
) -> None:
    """A rank read to its last shard has no more rows: its series end in that piece's frame (so that
    consumers finish them and drop what they keep), while a longer rank is still being read."""
    run = tmp_path / "run"
    _write(run, _rows(10, 5, ["a", "b"]), shards=1, rank=0)  # one piece
    _write(run, _rows(100, 5, ["a", "b"]), shards=10, rank=1)
    rec, _ = _scan([run], None, 20)
    keys = rec.registry.keys
    short = {sid for sid, k in enumerate(keys) if k[1] == 0}
    assert len(short) == 2 and rec.ended == set(range(len(keys)))
    assert max(rec.ended_at[sid] for sid in short) < len(rec.frames) - 3
    assert all(rec.ended_at[sid] == len(rec.frames) - 1 for sid in set(range(len(keys))) - short)


@pytest.mark.parametrize("order", ["without first", "without last"])
def test_a_run_without_the_table_adds_no_series_to_the_others(tmp_path: Path, order: str) -> None:
    """Runs loaded together where one recorded no params (only OutputNorm): the params table is the other
    run's series, whichever run comes first (reading the run without shards used to raise ``min() arg is
    an empty sequence``)."""
    outputs = {"pass": np.arange(4), "epoch": np.zeros(4, dtype=np.int32), "module": ["m"] * 4,
               "norm": np.arange(4, dtype=np.float32)}  # fmt: skip
    params = {"pass": np.array([0, 1, 2]), "epoch": np.array([0, 1, 2], dtype=np.int32), "module": ["m"] * 3,
              "param": ["weight"] * 3, "norm": np.array([1.0, 2.0, 4.0], dtype=np.float32)}  # fmt: skip
    bare = write_trace(tmp_path / "bare", outputs=outputs)
    full = write_trace(tmp_path / "full", outputs=outputs, params=params)
    trace = na.load([bare, full] if order == "without first" else [full, bare])
    summary = trace.epoch_summary("params")
    assert summary["run"].unique().to_list() == ["full"]
    assert summary.sort("epoch")["mean"].to_list() == [1.0, 2.0, 4.0]
    assert trace.spikes("params", level="epoch", baseline_window=3).height == 0  # read, nothing flagged
