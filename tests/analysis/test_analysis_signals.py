"""The signals table (trace format 2): loading, filters, summaries, spikes, alignment and findings.

Traces come from ``tracegen.synthetic_signals``, whose planted behaviour is known by construction: the
expectations below are computed from the generator's own arrays and parameters, never by the analysis.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import normtrace_analysis as na
import numpy as np
import polars as pl
import pytest
from tracegen import SyntheticSignals, synthetic_signals, write_trace

PLANTED = {"explode": "net.4", "high_update": "net.2", "dying": "net.0", "spiky": "net.2"}


def _write(path: Path, synthetic: SyntheticSignals, **options: object) -> Path:
    return write_trace(
        path, outputs=synthetic.outputs, events=synthetic.events, signals=synthetic.signals, **options
    )


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticSignals]:
    synthetic = synthetic_signals(**PLANTED)
    return _write(tmp_path_factory.mktemp("signals") / "planted", synthetic), synthetic


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(tmp_path_factory.mktemp("signals") / "clean", synthetic_signals())


def _series(synthetic: SyntheticSignals, kind: str, module: str, param: str | None) -> np.ndarray:
    """The generator's values of one series, in pass order (as float64 of the stored float32)."""
    s = synthetic.signals
    params = np.array(s["param"].to_pylist(), dtype=object)
    mask = (s["kind"] == kind) & (s["module"] == module) & (params == param)
    return s["value"][mask].astype(np.float64)


def test_signals_load_with_their_columns_and_a_v1_trace_has_none(planted, tmp_path: Path) -> None:
    run, synthetic = planted
    trace = na.load(run)
    assert trace.has_signals
    frame = trace.signals.collect()
    assert frame.height == len(synthetic.signals["value"])
    for column, dtype in na.REQUIRED_COLUMNS["signals"].items():
        assert frame.schema[column] == dtype, column
    assert frame["param"].null_count() == frame.height * 3 // 7  # 3 of the 7 series per layer: module-level
    assert trace.signal_kinds() == sorted(
        ["grad_norm", "update_ratio", "output_grad_norm", "dead_fraction", "active_rate"]
    )

    v1 = write_trace(
        tmp_path / "v1", outputs=synthetic.outputs, events=synthetic.events, meta={"schema_version": 1}
    )
    old = na.load(v1)
    assert old.meta["schema_version"] == 1 and not old.has_signals
    assert old.signals.collect().is_empty()
    assert old.signal_kinds() == []
    with pytest.raises(na.MissingTableError, match="no signals shards"):
        old.filter(kinds="grad_norm")
    with pytest.raises(na.MissingTableError):
        old.signal_findings()
    assert "signals" not in repr(old)  # a v1 trace does not list a table it cannot have


def test_kind_and_module_filters_narrow_the_signals(planted) -> None:
    trace = na.load(planted[0])
    grads = trace.filter(kinds="grad_norm").signals.collect()
    assert set(grads["kind"]) == {"grad_norm"}
    assert grads.height == 2 * 3 * 3000  # weight and bias of three layers, every pass
    both = trace.filter(kinds=["grad_norm", "dead_fraction"], modules=["net.0"]).signals.collect()
    assert set(both["kind"]) == {"grad_norm", "dead_fraction"} and set(both["module"]) == {"net.0"}
    with pytest.raises(na.EmptySelectionError, match=r"'grad_norms'.*dead_fraction, grad_norm"):
        trace.filter(kinds="grad_norms")
    assert trace.filter(kinds="grad_norm").outputs.collect().height == 9000  # other tables unchanged


def test_epoch_summary_of_signals_is_per_kind_module_and_param(planted) -> None:
    run, synthetic = planted
    summary = na.load(run).epoch_summary("signals")
    assert summary.columns[:5] == ["run", "epoch", "kind", "module", "param"]
    assert summary.height == 60 * 3 * 7  # epochs x layers x series per layer
    for kind, module, param in (("grad_norm", "net.4", "weight"), ("dead_fraction", "net.0", None)):
        values = _series(synthetic, kind, module, param).reshape(60, 50)  # 50 passes an epoch
        mine = summary.filter(
            (pl.col("kind") == kind) & (pl.col("module") == module) & pl.col("param").eq_missing(param)
        ).sort("epoch")
        np.testing.assert_allclose(mine["mean"].to_numpy(), values.mean(axis=1), rtol=1e-12)
        np.testing.assert_allclose(mine["p50"].to_numpy(), np.median(values, axis=1), rtol=1e-12)
        assert (mine["count"] == 50).all()


def test_ranks_pool_in_the_summary_and_stay_apart_in_spikes(tmp_path: Path) -> None:
    synthetic = synthetic_signals(n_epochs=10, spiky="net.2")
    run = _write(tmp_path / "two-ranks", synthetic)
    _write(run, synthetic, rank=1)
    trace = na.load(run)
    assert (trace.epoch_summary("signals")["count"] == 100).all()  # 50 passes x 2 ranks
    found = trace.filter(kinds="grad_norm").spikes("signals")
    assert sorted(set(found["rank"])) == [0, 1]


def test_spikes_of_signals_find_the_planted_gradient_spikes_and_nothing_else(planted) -> None:
    run, synthetic = planted
    found = na.load(run).spikes("signals")
    grads = found.filter(pl.col("kind") == "grad_norm")
    for param in ("weight", "bias"):
        mine = grads.filter((pl.col("module") == "net.2") & (pl.col("param") == param)).sort("pass")
        assert mine["pass"].to_list() == synthetic.spike_passes
        expected = _series(synthetic, "grad_norm", "net.2", param)[synthetic.spike_passes]
        np.testing.assert_allclose(mine["value"].to_numpy(), expected, rtol=1e-9)  # the signal's own units
        assert (mine["baseline"] < mine["value"] / 5).all()  # the baseline is the level, not the spike
        assert (mine["lag_passes"] == 3).all() and (mine["event"] == "target_update").all()
    # The exploding layer's smooth 10**4 growth and the dying layer's rise are trends, not spikes.
    assert set(zip(found["kind"], found["module"], strict=True)) == {("grad_norm", "net.2")}


def test_norms_and_ratios_are_scored_on_log10_other_kinds_on_their_values(tmp_path: Path) -> None:
    n = 400
    rng = np.random.default_rng(3)
    grad = 0.1 * np.exp(0.05 * rng.standard_normal(n))
    mine = 0.5 + 0.01 * rng.standard_normal(n)
    grad[200] = mine[200] = 0.0
    passes = np.repeat(np.arange(n), 2)
    run = write_trace(
        tmp_path / "zeros",
        signals={
            "pass": passes,
            "epoch": np.zeros(2 * n, dtype=np.int32),
            "kind": np.tile(np.array(["grad_norm", "my_kind"], dtype=object), n),
            "module": np.full(2 * n, "layer", dtype=object),
            "value": np.stack([grad, mine], axis=1).ravel().astype(np.float32),
        },
    )
    with warnings.catch_warnings():  # a zero gradient is a finding, not numpy's log10 warning
        warnings.simplefilter("error", RuntimeWarning)
        found = na.load(run).spikes("signals")
    assert found["pass"].to_list() == [200, 200]
    by_kind = {row["kind"]: row for row in found.iter_rows(named=True)}
    assert by_kind["grad_norm"]["score"] == -math.inf  # log10(0): a zero gradient is flagged as non-finite is
    assert by_kind["grad_norm"]["value"] == 0.0
    assert math.isfinite(by_kind["my_kind"]["score"]) and by_kind["my_kind"]["score"] < -6
    assert by_kind["my_kind"]["param"] is None  # a module-level series keeps its null param


def test_event_alignment_on_signals_finds_spikes_after_the_syncs(planted) -> None:
    run, synthetic = planted
    aligned = na.load(run).filter(kinds="grad_norm").event_alignment("target_update", table="signals")
    assert aligned.height == 6  # weight and bias of three layers
    spiky = aligned.filter(pl.col("module") == "net.2")
    assert (spiky["events"] == len(synthetic.events["pass"])).all()
    assert (spiky["events_followed"] == len(synthetic.spike_passes)).all()
    assert (spiky["p_value"] <= 0.001 + 1e-12).all()
    assert spiky["finding"].str.starts_with("grad_norm of net.2.").all()
    assert aligned.filter(pl.col("module") != "net.2")["p_value"].is_null().all()  # no spikes: untested


def test_findings_name_every_planted_behaviour(planted) -> None:
    run, _ = planted
    found = na.load(run).signal_findings(event="target_update")
    by = {(r["finding"], r["module"], r["param"]): r for r in found.iter_rows(named=True)}
    # Exploding: net.4's norms are 10**(4t) times their level; the medians of the first and last tenth
    # sit near t = 0.05 and 0.95, so the growth is about 10**3.6.
    for param in ("weight", "bias"):
        growth = by[("explode", "net.4", param)]
        assert growth["value"] == pytest.approx(10**3.6, rel=0.15)
        assert "net.4." + param in growth["sentence"] and "explode" in growth["sentence"]
    # Spread across layers: at t ~ 0.95, net.4's root-sum-square norm is 0.1 * 1.4 * sqrt(1.25) *
    # 10**3.8 against net.0's 0.1 * sqrt(1.25): log10(1.4) + 3.8 orders.
    spread = by[("spread", None, None)]
    assert spread["value"] == pytest.approx(math.log10(1.4) + 3.8, abs=0.05)
    assert "net.4" in spread["sentence"] and "net.0" in spread["sentence"]
    # Dying: net.0's dead fraction is 0.02 + 0.88 t, so about 0.856 over the last tenth.
    dead = by[("dead", "net.0", None)]
    assert dead["value"] == pytest.approx(0.02 + 0.88 * 0.95, abs=0.01)
    assert "net.0" in dead["sentence"] and "dead" in dead["sentence"]
    for param in ("weight", "bias"):
        high = by[("update_high", "net.2", param)]
        assert high["value"] == pytest.approx(0.1, rel=0.02)
        assert by[("spikes_with_outputs", "net.2", param)]["value"] == 1.0  # every excursion coupled
        assert "target_update" in by[("spikes_after_event", "net.2", param)]["sentence"]
    kinds = {k[0] for k in by}
    assert kinds == {"explode", "spread", "dead", "update_high", "spikes_with_outputs", "spikes_after_event"}
    assert {k[1] for k in by if k[0] == "update_high"} == {"net.2"}  # the other layers are at 1e-3


def test_findings_say_when_gradients_vanish(tmp_path: Path) -> None:
    run = _write(tmp_path / "vanishing", synthetic_signals(vanish="net.0"))
    found = na.load(run).signal_findings()
    vanish = found.filter(pl.col("finding") == "vanish")
    assert sorted(vanish["param"].to_list()) == ["bias", "weight"] and set(vanish["module"]) == {"net.0"}
    assert (vanish["value"] - 10**-3.6).abs().max() < 0.15 * 10**-3.6
    assert set(found["finding"]) == {"vanish", "spread"}  # net.0 at 10**-3.8 of its start: 3.8 orders


def test_findings_do_not_fire_on_a_clean_trace(clean) -> None:
    found = na.load(clean).signal_findings(event="target_update")
    assert found.is_empty()
    assert found.columns == ["run", "finding", "kind", "module", "param", "value", "sentence"]


def test_findings_refuse_a_bad_tail(planted) -> None:
    with pytest.raises(ValueError, match="tail"):
        na.load(planted[0]).signal_findings(tail=0.9)


def test_a_non_finite_gradient_norm_is_an_explosion_named_with_its_first_step(tmp_path: Path) -> None:
    synthetic = synthetic_signals(n_epochs=10)
    values = synthetic.signals["value"]
    params = np.array(synthetic.signals["param"].to_pylist(), dtype=object)
    mine = np.flatnonzero(
        (synthetic.signals["kind"] == "grad_norm")
        & (synthetic.signals["module"] == "net.2")
        & (params == "bias")
    )
    values[mine[[300, 301, 420]]] = [np.inf, np.nan, np.inf]  # passes 300, 301 and 420: steps 301, 302, 421
    found = na.load(_write(tmp_path / "nan", synthetic)).signal_findings()
    # the non-finite values are spikes too, with no output-norm excursion beside them
    assert found["finding"].to_list() == ["explode", "spikes_with_outputs"]
    assert found.filter(pl.col("finding") == "spikes_with_outputs")["value"].to_list() == [0.0]
    row = found.row(0, named=True)
    assert (row["module"], row["param"], row["value"]) == ("net.2", "bias", math.inf)
    assert "at 3 step(s), the first at step 301" in row["sentence"]


def test_findings_of_several_runs_name_their_run(planted, clean) -> None:
    found = na.load([planted[0], clean]).signal_findings()
    assert set(found["run"]) == {"planted"}  # the clean run has none
    assert found["sentence"].str.starts_with("planted: ").all()


def test_epoch_level_spikes_of_a_norm_are_scored_on_log10_and_reported_in_its_units(tmp_path: Path) -> None:
    # 60 epochs of 5 passes; a gradient norm and a user kind holding log10 of the same values: scored on
    # log10, the norm must give the user kind's epoch, score and (in its own units) value and baseline.
    epochs, per = 60, 5
    rng = np.random.default_rng(7)
    logs = -1.0 + 0.05 * rng.standard_normal(epochs * per)
    logs[32 * per : 33 * per] += 1.0  # epoch 32: ten times larger
    n = epochs * per
    run = write_trace(
        tmp_path / "r",
        signals={
            "pass": np.repeat(np.arange(n), 2),
            "epoch": np.repeat(np.arange(n) // per, 2).astype(np.int32),
            "kind": np.tile(np.array(["grad_norm", "my_kind"], dtype=object), n),
            "module": np.full(2 * n, "layer", dtype=object),
            "value": np.stack([10.0**logs, logs], axis=1).ravel().astype(np.float64),
        },
    )
    with warnings.catch_warnings():  # negative values of other kinds beside log-scaled ones: no warning
        warnings.simplefilter("error", RuntimeWarning)
        found = na.load(run).spikes("signals", level="epoch")
    by_kind = {row["kind"]: row for row in found.iter_rows(named=True)}
    assert set(by_kind) == {"grad_norm", "my_kind"}
    norm, mine = by_kind["grad_norm"], by_kind["my_kind"]
    assert norm["epoch"] == mine["epoch"] == 32
    # an epoch's value is the mean of its rows: the norm's mean is not 10**(mean of logs), so compare
    # with the independent log10 of the norm's own epoch means
    stored = {
        k: v.astype(np.float32).astype(np.float64) for k, v in {"norm": 10.0**logs, "log": logs}.items()
    }
    assert norm["value"] == pytest.approx(stored["norm"].reshape(epochs, per).mean(axis=1)[32], rel=1e-6)
    assert mine["value"] == pytest.approx(stored["log"].reshape(epochs, per).mean(axis=1)[32], rel=1e-6)
    assert norm["baseline"] == pytest.approx(0.1, rel=0.1)  # in the norm's units, not log10's
    # on log10 the jump is one unit against the same noise for both: the same size of score (scored on
    # its values, the norm's score would be several times the user kind's)
    assert mine["score"] > 10 and norm["score"] == pytest.approx(mine["score"], rel=0.25)


@pytest.mark.parametrize("piece_rows", [150, 400])
def test_log_scaling_follows_series_first_met_in_later_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece_rows: int
) -> None:
    # A user kind from pass 0, a gradient norm from pass 500: read in pieces, the scan meets the norm's
    # series pieces after the other, and its log10 scoring must still follow it (as read whole).
    from normtrace_analysis import series as series_module

    rng = np.random.default_rng(11)
    mine = 0.5 + 0.01 * rng.standard_normal(1000)
    grad = 0.1 * np.exp(0.05 * rng.standard_normal(500))
    mine[300] = 0.8
    grad[200] = 2.0  # pass 700
    passes = np.concatenate([np.arange(500), np.repeat(np.arange(500, 1000), 2)])
    kinds = ["my_kind"] * 500 + ["my_kind", "grad_norm"] * 500
    values = np.concatenate([mine[:500], np.stack([mine[500:], grad], axis=1).ravel()])
    run = write_trace(
        tmp_path / "r",
        signals={
            "pass": passes,
            "epoch": (passes // 100).astype(np.int32),
            "kind": np.array(kinds, dtype=object),
            "module": np.full(len(passes), "layer", dtype=object),
            "value": values.astype(np.float32),
        },
        shards=30,
    )
    whole = na.load(run).spikes("signals")
    monkeypatch.setattr(series_module, "CHUNK_ROWS", piece_rows)
    pieces = na.load(run).spikes("signals")
    assert pieces.equals(whole)
    norm = whole.filter(pl.col("kind") == "grad_norm").row(0, named=True)
    assert norm["pass"] == 700 and norm["baseline"] == pytest.approx(0.1, rel=0.1)
    # on log10: the jump is log10(20) over a noise of ~0.05 / ln 10, a score near 60, not the hundreds
    # that the same jump gets on the values
    assert 20 < norm["score"] < 120


def test_a_flat_log_scaled_signal_near_one_flags_a_relative_jump_and_not_rounding(tmp_path: Path) -> None:
    """A gradient norm flat at 1 is 0 on log10, where the linear floor (1e-4 of the baseline) would be 0
    and float32 rounding would flag: the log scale has its own floor, the same relative size (1e-4 / ln 10
    of log10). So a step to 1.001 scores ln(1.001) / 1e-4 ≈ 10 floors, one float32 ulp above 1 (one point
    in 50, so every block's deviation stays 0) about 0.001."""
    n = 1000
    values = np.ones(n, dtype=np.float32)
    values[::50] = np.nextafter(np.float32(1), np.float32(2))
    values[500] = 1.001
    run = write_trace(
        tmp_path / "flat",
        signals={
            "pass": np.arange(n),
            "epoch": np.zeros(n, dtype=np.int32),
            "kind": np.full(n, "grad_norm", dtype=object),
            "module": np.full(n, "layer", dtype=object),
            "value": values,
        },
    )
    found = na.load(run).spikes("signals")
    assert found["pass"].to_list() == [500]
    expected = math.log(float(np.float32(1.001))) / 1e-4
    assert found["score"][0] == pytest.approx(expected, rel=1e-6)
    assert found["baseline"][0] == pytest.approx(1.0, rel=1e-12)  # reported in the signal's units
