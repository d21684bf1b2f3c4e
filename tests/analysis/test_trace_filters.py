"""Trace filters chained, selections that keep nothing, and the messages that name what the trace holds.

Every expected row set is computed from the columns the test writes, with numpy, not with Polars filters.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import normtrace_analysis as na
import numpy as np
import polars as pl
import pytest
from tracegen import every_pass, write_trace

N_PASS, EPOCH_LEN = 24, 4  # epochs 0..5


def _outputs(modules: tuple[str, ...] = ("a", "b")) -> dict[str, np.ndarray]:
    return every_pass(N_PASS, modules, EPOCH_LEN)  # grad enabled on every pass: no no_grad row anywhere


@pytest.fixture
def two_ranks(tmp_path: Path) -> Path:
    run = tmp_path / "ddp"
    write_trace(run, outputs=_outputs(), rank=0, shards=2)
    write_trace(run, outputs=_outputs(), rank=1, shards=2, meta={"world_size": 2})
    return run


def _passes(trace: na.Trace) -> list[int]:
    return sorted(trace.outputs.select("pass").unique().collect()["pass"].to_list())


@pytest.mark.parametrize(
    ("first", "second", "lo", "hi"),
    [
        ((2, 20), (5, None), 5, 20),  # the later lower bound wins, the earlier upper bound stays
        ((5, None), (2, 20), 5, 20),  # the same, given the other way round
        ((None, 9), (3, 15), 3, 9),
        ((3, 15), (None, 9), 3, 9),
        ((4, 10), 7, 7, 7),
        ((None, None), (None, 6), 0, 6),
        ((None, 6), (None, None), 0, 6),
    ],
)
def test_pass_ranges_narrow_each_other(two_ranks: Path, first, second, lo: int, hi: int) -> None:
    trace = na.load(two_ranks)
    assert _passes(trace.filter(passes=first).filter(passes=second)) == list(range(lo, hi + 1))


def test_epoch_ranges_narrow_on_every_table(two_ranks: Path) -> None:
    narrowed = na.load(two_ranks).filter(epochs=(1, 4)).filter(epochs=(2, None)).filter(epochs=(None, 3))
    epochs = _outputs()["epoch"]
    kept = int(((epochs >= 2) & (epochs <= 3)).sum()) * 2  # both ranks
    frame = narrowed.outputs.collect()
    assert frame.height == kept
    assert sorted(frame["epoch"].unique().to_list()) == [2, 3]


def test_rank_split_and_run_filters_intersect(tmp_path: Path, two_ranks: Path) -> None:
    trace = na.load(two_ranks)
    assert trace.filter(ranks=[0, 1]).filter(ranks=[1]).outputs.collect()["rank"].unique().to_list() == [1]
    assert trace.filter(ranks=1).filter(ranks=[0, 1]).outputs.collect()["rank"].unique().to_list() == [1]
    with pytest.raises(na.EmptySelectionError, match=r"ranks=\[0\]; the trace holds ranks: 0, 1$"):
        trace.filter(ranks=1).filter(ranks=[0])
    other = write_trace(tmp_path / "other", outputs=_outputs(modules=("c",)))
    both = na.load([two_ranks, other])
    only = both.filter(runs=["ddp", "other"]).filter(runs="other")
    assert only.runs == ["other"] and list(only.metas) == ["other"] and list(only.rank_metas) == ["other"]
    assert only.outputs.collect()["module"].unique().to_list() == ["c"]
    with pytest.raises(ValueError, match="unknown run 'ddp'"):  # a run filtered out earlier is not loaded
        both.filter(runs="other").filter(runs="ddp")


def test_a_rank_no_shard_holds_is_an_empty_selection(two_ranks: Path) -> None:
    with pytest.raises(na.EmptySelectionError) as err:
        na.load(two_ranks).filter(ranks=3)
    assert str(err.value) == "no row matches ranks=3; the trace holds ranks: 0, 1"
    assert err.value.path == two_ranks  # names the run


def test_a_split_without_rows_names_the_splits_held(two_ranks: Path) -> None:
    with pytest.raises(na.EmptySelectionError) as err:
        na.load(two_ranks).filter(split="no_grad")
    assert str(err.value) == "no row matches split='no_grad'; the trace holds splits: train"


def test_what_the_trace_holds_is_listed_for_every_filter_asked(two_ranks: Path) -> None:
    trace = na.load(two_ranks)
    with pytest.raises(na.EmptySelectionError) as err:
        trace.filter(modules=["nope"], epochs=(40, 50))
    assert str(err.value) == (
        "no row matches modules=['nope'], epochs=(40, 50); the trace holds modules: a, b and epochs 0..5"
    )


def test_the_modules_held_are_those_of_the_runs_selected(tmp_path: Path, two_ranks: Path) -> None:
    other = write_trace(tmp_path / "other", outputs=_outputs(modules=("zeta", "c")))
    trace = na.load([two_ranks, other])
    with pytest.raises(na.EmptySelectionError, match=r"modules: c, zeta$"):
        trace.filter(runs="other").filter(modules=["a"])  # "a" is in the other run only


@pytest.mark.parametrize(("count", "listed"), [(12, 12), (13, 12), (15, 12)])
def test_long_listings_show_twelve_names_and_how_many_more(tmp_path: Path, count: int, listed: int) -> None:
    names = tuple(f"m{i:02d}" for i in range(count))
    run = write_trace(tmp_path / "wide", outputs=_outputs(modules=names))
    with pytest.raises(na.EmptySelectionError) as err:
        na.load(run).filter(modules=["nope"])
    more = f" … ({count - listed} more)" if count > listed else ""
    assert str(err.value).endswith("modules: " + ", ".join(names[:listed]) + more)


def test_is_cached_says_whether_a_result_is_held(two_ranks: Path) -> None:
    trace = na.load(two_ranks)
    assert not trace.is_cached(("mine", 1))
    assert trace.cached(("mine", 1), lambda: 41 + 1) == 42
    assert trace.is_cached(("mine", 1)) and not trace.is_cached(("mine", 2))


def test_a_pattern_error_is_named_by_polars_own_reason(two_ranks: Path) -> None:
    """Polars names a parse error on a line starting with "error: " (the message keeps its rest); an
    error without such a line (a pattern too large to compile) is named by its first line."""
    trace = na.load(two_ranks)
    with pytest.raises(ValueError) as err:
        trace.filter(modules="(")
    assert str(err.value) == "modules='(' is not a valid regular expression: unclosed group"
    with pytest.raises(ValueError) as err:
        trace.filter(modules="a{1000}{1000}")
    assert str(err.value).startswith(
        "modules='a{1000}{1000}' is not a valid regular expression: regex error: Compiled regex exceeds size limit"
    )


def test_an_empty_run_beside_a_skipped_shard_elsewhere_is_not_called_unreadable(tmp_path: Path) -> None:
    good = write_trace(tmp_path / "good", outputs=_outputs(), shards=2)
    sorted((good / "outputs").glob("*.arrow"))[0].write_bytes(b"not arrow")
    empty = tmp_path / "empty"
    write_trace(empty, outputs=_outputs())
    for shard in (empty / "outputs").glob("*.arrow"):
        shard.unlink()
    with pytest.warns(na.SkippedShardsWarning) as caught:
        trace = na.load([good, empty], on_error="skip")
    assert trace.runs == ["good"]
    (left_out,) = [str(w.message) for w in caught if str(w.message).startswith("left out")]
    assert left_out == f"left out 1 run(s) with no shard in any table:\n  {empty}"  # not "unreadable"


def test_shards_by_rank_lists_the_selected_runs_and_ranks_in_sequence_order(
    tmp_path: Path, two_ranks: Path
) -> None:
    other = write_trace(tmp_path / "other", outputs=_outputs(), shards=3)
    trace = na.load([two_ranks, other])

    def on_disk(run: Path, rank: int) -> list[tuple[Path, int]]:
        files = sorted((run / "outputs").glob(f"rank{rank}-*.arrow"))
        return [(f, f.stat().st_size) for f in files]

    assert trace.shards_by_rank("outputs") == {
        "ddp": {0: on_disk(two_ranks, 0), 1: on_disk(two_ranks, 1)},
        "other": {0: on_disk(other, 0)},
    }
    assert len(on_disk(other, 0)) == 3
    assert trace.filter(ranks=1).shards_by_rank("outputs") == {"ddp": {1: on_disk(two_ranks, 1)}, "other": {}}
    assert trace.filter(runs="other").shards_by_rank("outputs") == {"other": {0: on_disk(other, 0)}}


def test_runs_with_different_columns_are_read_together_when_some_are_selected(tmp_path: Path) -> None:
    plain = write_trace(tmp_path / "plain", outputs=_outputs())
    extra = _outputs()
    extra["note"] = np.arange(extra["pass"].size)  # a column only this run's shards have
    wide = write_trace(tmp_path / "wide", outputs=extra)
    third = write_trace(tmp_path / "third", outputs=_outputs())
    trace = na.load([plain, wide, third]).filter(runs=["plain", "wide"])
    frame = trace.outputs.collect()
    assert frame.height == 2 * extra["pass"].size
    assert frame.filter(pl.col("run") == "plain")["note"].null_count() == extra["pass"].size
    assert frame.filter(pl.col("run") == "wide")["note"].to_list() == extra["note"].tolist()


def test_a_slot_holds_one_result_and_a_new_key_replaces_it(two_ranks: Path) -> None:
    trace = na.load(two_ranks)
    calls: list[str] = []

    def compute(tag: str) -> Callable[[], str]:
        return lambda: calls.append(tag) or f"result {tag}"

    assert trace.cached("k1", compute("1"), slot="big") == "result 1"
    assert trace.cached("k1", compute("again"), slot="big") == "result 1"  # held: not computed again
    assert trace.cached("k2", compute("2"), slot="big") == "result 2"  # a new key replaces the old
    assert trace.cached("k1", compute("3"), slot="big") == "result 3"  # so the old one is computed anew
    assert calls == ["1", "2", "3"]
    assert trace.cached("k1", compute("plain")) == "result plain"  # a slot and a plain key don't mix
    assert trace.is_cached("k1") and not trace.is_cached("k2")


def test_a_missing_table_names_every_folder_searched(tmp_path: Path, two_ranks: Path) -> None:
    other = write_trace(tmp_path / "other", outputs=_outputs())
    with pytest.raises(na.MissingTableError) as err:
        na.load([two_ranks, other]).require("signals")
    assert str(err.value).startswith(f"no signals shards in {two_ranks / 'signals'}, {other / 'signals'}: ")
    assert err.value.path == two_ranks / "signals"


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        (
            {"modules": "x"},
            "no row matches modules='x': the trace has no outputs or params or signals rows, the tables it applies to",
        ),
        (
            {"split": "train"},
            "no row matches split='train': the trace has no outputs rows, the tables it applies to",
        ),
        ({"epochs": 3}, "no row matches epochs=3; the trace holds epochs 0..1"),
    ],
)
def test_filters_on_tables_a_run_never_recorded_say_so(tmp_path: Path, filters: dict, message: str) -> None:
    """A run of losses only: a module or split filter has no table to apply to (this once failed inside
    Polars, concatenating no frames)."""
    run = write_trace(tmp_path / "losses", metrics={"epoch": [0, 1], "pass": [0, 1], "name": ["loss"] * 2,
                                                    "value": [1.0, 2.0]})  # fmt: skip
    with pytest.raises(na.EmptySelectionError) as err:
        na.load(run).filter(**filters)
    assert str(err.value) == message and err.value.path == run


def _with_signals(path: Path, kinds: dict[str, str], passes: range = range(10)) -> Path:
    """A run whose signals hold each kind (key) for one module (value) at ``passes``, beside outputs."""
    rows = [(k, m, p) for k, m in kinds.items() for p in passes]
    signals = {
        "pass": np.array([p for _, _, p in rows]),
        "epoch": np.array([p // EPOCH_LEN for _, _, p in rows], dtype=np.int32),
        "kind": np.array([k for k, _, _ in rows]),
        "module": np.array([m for _, m, _ in rows]),
        "value": np.arange(len(rows), dtype=np.float32) + 1,
    }
    return write_trace(path, outputs=_outputs(), signals=signals)


def test_of_kind_is_the_trace_of_that_kind_alone(tmp_path: Path) -> None:
    trace = na.load(_with_signals(tmp_path / "s", {"grad_norm": "a", "update_ratio": "b"}))
    one = trace.of_kind("update_ratio")
    assert one.signals.collect()["kind"].unique().to_list() == ["update_ratio"]
    assert one.signals.collect().height == 10 and one is trace.of_kind("update_ratio")  # kept on the trace
    assert trace.signal_kinds() == ["grad_norm", "update_ratio"]
    assert trace.of_kind("grad_norm").signals.collect()["kind"].unique().to_list() == ["grad_norm"]  # its own


def test_a_kind_is_checked_against_the_runs_selected_not_the_other_filters(tmp_path: Path) -> None:
    grads = _with_signals(tmp_path / "grads", {"grad_norm": "a"})
    ratios = _with_signals(tmp_path / "ratios", {"update_ratio": "b"})
    trace = na.load([grads, ratios])
    with pytest.raises(na.EmptySelectionError) as err:
        trace.filter(runs="ratios").filter(kinds="grad_norm")
    assert str(err.value) == "no signals of kind 'grad_norm'; the trace records kinds: update_ratio"
    assert err.value.path == grads  # the first run loaded
    # recorded, but not for this module: the selection is empty, not the kind unknown
    with pytest.raises(na.EmptySelectionError) as err:
        trace.filter(modules=["b"]).filter(kinds="grad_norm")
    assert str(err.value) == "no row matches kinds='grad_norm'"  # nothing to list: the kind exists


def test_a_kind_filter_is_checked_on_the_signals_alone(tmp_path: Path) -> None:
    """Outputs exist at passes 20..23, signals do not: signals of that kind at those passes are none."""
    trace = na.load(_with_signals(tmp_path / "s", {"grad_norm": "a"}))
    assert trace.filter(passes=(20, 23)).outputs.collect().height == 8
    with pytest.raises(na.EmptySelectionError) as err:
        trace.filter(passes=(20, 23), kinds="grad_norm")
    assert str(err.value) == "no row matches passes=(20, 23), kinds='grad_norm'; the trace holds passes 0..9"


def test_every_filter_at_once_is_still_checked(tmp_path: Path) -> None:
    trace = na.load(_with_signals(tmp_path / "s", {"grad_norm": "a"}))
    with pytest.raises(na.EmptySelectionError) as err:
        trace.filter(modules=["a"], split="train", epochs=(0, 5), passes=(0, 9), ranks=0, kinds="grad_norm")
    assert str(err.value).startswith(
        "no row matches modules=['a'], epochs=(0, 5), passes=(0, 9), split='train'"
    )


def test_event_alignment_on_the_trace_takes_every_option(tmp_path: Path) -> None:
    n = 400
    values = 10.0 + 0.1 * np.random.default_rng(3).standard_normal(2 * n)
    run = write_trace(
        tmp_path / "r",
        outputs={
            "pass": np.repeat(np.arange(n), 2),
            "epoch": (np.repeat(np.arange(n), 2) // 100).astype(np.int32),
            "module": np.tile(["a", "b"], n),
            "norm": values.astype(np.float32),
        },
        events={"epoch": [0, 1, 2], "pass": [50, 150, 250], "name": ["sync"] * 3},
    )
    trace = na.load(run)
    only_a = trace.event_alignment("sync", modules=["a"], placebo=False, permutations=9)
    assert only_a["module"].unique().to_list() == ["a"]
    assert only_a["placebo_events"].null_count() == only_a.height  # no placebo asked for
    assert trace.event_alignment("sync", permutations=9)["placebo_events"].null_count() == 0
    with pytest.raises(ValueError, match="baseline_window"):
        trace.event_alignment("sync", baseline_window=2, permutations=9)


def test_split_and_kind_filters_given_as_lists_intersect_with_earlier_ones(tmp_path: Path) -> None:
    outputs = _outputs()
    outputs["grad_enabled"] = outputs["pass"] % 2 == 0
    signals = {"pass": np.arange(4), "epoch": np.zeros(4, dtype=np.int32), "kind": ["grad_norm", "update_ratio"] * 2,
               "module": ["a"] * 4, "value": np.ones(4, dtype=np.float32)}  # fmt: skip
    trace = na.load(write_trace(tmp_path / "r", outputs=outputs, signals=signals))
    both = trace.filter(split=["train", "no_grad"])
    assert both.outputs.collect().height == outputs["pass"].size
    train = trace.filter(split="train").filter(split=["train", "no_grad"])
    assert train.outputs.collect()["split"].unique().to_list() == ["train"]
    grads = trace.filter(kinds="grad_norm").filter(kinds=["grad_norm", "update_ratio"])
    assert grads.signals.collect()["kind"].to_list() == ["grad_norm", "grad_norm"]
    with pytest.raises(ValueError) as err:
        trace.filter(split="val")
    assert str(err.value) == "unknown split 'val'; outputs splits are ['train', 'no_grad']"
