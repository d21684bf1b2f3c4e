"""Charts: the data they embed matches the trace computed independently, and stays small at any length.

Embedded values keep charts.DIGITS (6) significant digits, hence the 1e-5 relative tolerance.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import altair as alt
import normtrace_analysis as na
import numpy as np
import polars as pl
import pytest
from normtrace_analysis import charts
from reportgen import MODULES, PARAMS, long_run, param_norm, read_table
from tracegen import write_trace


def datasets(chart: alt.TopLevelMixin) -> dict[str, list[dict[str, Any]]]:
    """The rows a chart embeds, by dataset name; no chart may embed data anywhere else."""
    spec = chart.to_dict()
    assert '"values"' not in str({k: v for k, v in spec.items() if k != "datasets"}).replace("'", '"')
    return spec.get("datasets", {})


def rows_with(chart: alt.TopLevelMixin, column: str) -> list[dict[str, Any]]:
    """Rows of the datasets that have ``column`` (curves: "n", event rules: "count", spikes: "score")."""
    return [row for rows in datasets(chart).values() for row in rows if column in row]


def units(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every single-mark view of a (possibly layered or concatenated) spec."""
    if "mark" in spec:
        yield spec
    for key in ("layer", "concat", "hconcat", "vconcat"):
        for child in spec.get(key, []):
            yield from units(child)


def test_epoch_curves_are_means_and_percentiles_of_each_epoch(run_a: Path) -> None:
    out = read_table(run_a, "outputs")
    chart = charts.norms(na.load(run_a), spikes=False)
    curves = {(r["series"], r["x"]): r for r in rows_with(chart, "n")}
    assert len(curves) == len(MODULES) * 2 * 40  # every module x split x epoch, nothing binned
    for module in MODULES:
        for grad, split in ((True, "train"), (False, "no_grad")):
            for epoch in (0, 17, 39):
                sel = (out["module"] == module) & (out["grad_enabled"] == grad) & (out["epoch"] == epoch)
                values = out["norm"][sel].astype(np.float64)
                row = curves[(f"{module} (Linear) [{split}]", float(epoch))]  # reportgen's meta: Linear
                assert row["n"] == sel.sum() == 20
                assert row["y"] == pytest.approx(values.mean(), rel=1e-5)
                assert row["lo"] == pytest.approx(np.percentile(values, 5), rel=1e-5)
                assert row["hi"] == pytest.approx(np.percentile(values, 95), rel=1e-5)


def test_min_max_band_and_pass_level(run_a: Path) -> None:
    out = read_table(run_a, "outputs")
    chart = charts.norms(na.load(run_a).filter(split="train"), level="pass", band="min-max", spikes=False)
    curves = rows_with(chart, "n")
    width = curves[1]["x_lo"] - curves[0]["x_lo"]  # one bin of passes; 4 series x 800 passes > budget
    assert width > 1 and all(r["x_hi"] - r["x_lo"] < width for r in curves)
    first = next(r for r in curves if r["series"] == "net.2 (Linear)" and r["n"] > 1)
    start = first["x_lo"]  # the bin holds passes [start, start + width)
    inside = (out["pass"] >= start) & (out["pass"] < start + width)
    sel = (out["module"] == "net.2") & out["grad_enabled"] & inside
    assert first["n"] == sel.sum()
    assert first["y"] == pytest.approx(out["norm"][sel].astype(np.float64).mean(), rel=1e-5)
    assert (first["lo"], first["hi"]) == pytest.approx(
        (out["norm"][sel].min(), out["norm"][sel].max()), rel=1e-5
    )


@pytest.mark.parametrize("level", ["epoch", "pass"])
def test_embedded_rows_are_bounded_whatever_the_trace_length(tmp_path: Path, level: str) -> None:
    budget = 600
    sizes = {}
    for n_epochs in (50, 5000):
        trace = na.load(long_run(tmp_path / f"run{n_epochs}", n_epochs))
        built = {
            "norms": charts.norms(trace, level=level, spikes=False, max_rows=budget),
            "metrics": charts.metrics(trace, level=level, max_rows=budget),
            "share": charts.share(trace, max_rows=budget),
        }
        for name, chart in built.items():
            curves = rows_with(chart, "n") or rows_with(chart, "share")
            rules = rows_with(chart, "count")
            assert len(curves) <= budget, (n_epochs, name)
            assert len(rules) <= budget  # one rule per x bin at most
            total = sum(len(rows) for rows in datasets(chart).values())
            assert total == len(curves) + len(rules)
            sizes[(n_epochs, name)] = total
    # 50 epochs x 3 modules fit the budget unbinned; 100x the rows still embeds no more than the budget
    assert len(rows_with(charts.norms(na.load(tmp_path / "run50"), spikes=False), "n")) == 150
    assert sizes[(5000, "norms")] <= budget + budget // 3 + 1


def test_events_are_rules_on_every_panel(run_a: Path, run_b: Path) -> None:
    trace = na.load([run_a, run_b])
    events = read_table(run_a, "events")
    built = [
        charts.norms(trace, spikes=False),
        charts.metrics(trace),
        charts.share(trace),
        charts.norms(trace, "params", spikes=False),
    ]
    for chart in built:
        spec = chart.to_dict()
        panels = [
            u for u in units(spec) if u["mark"]["type"] in ("line", "area") and "y2" not in u["encoding"]
        ]
        rules = [u for u in units(spec) if u["mark"]["type"] == "rule"]
        assert len(rules) == len(panels) > 1
        rows = spec["datasets"][rules[0]["data"]["name"]]
        assert sorted(r["x"] for r in rows if r["run"] == "run-a") == sorted(events["epoch"].astype(float))


def test_spikes_are_marked_highest_scores_first(run_a: Path) -> None:
    trace = na.load(run_a)
    n = charts.MAX_SPIKES + 50
    found = pl.DataFrame(
        {
            "run": ["run-a"] * n,
            "module": ["net.2"] * n,
            "split": ["train"] * n,
            "epoch": np.arange(n) % 40,
            "pass": np.arange(n),
            "value": np.linspace(1.0, 2.0, n),
            "score": np.arange(n, dtype=float),
        }
    )
    marks = rows_with(charts.norms(trace, spikes=found), "score")
    assert len(marks) == charts.MAX_SPIKES
    assert min(m["score"] for m in marks) == n - charts.MAX_SPIKES
    top = max(marks, key=lambda m: m["score"])
    assert (top["series"], top["x"], top["y"]) == ("net.2 (Linear) [train]", float((n - 1) % 40), 2.0)


def test_share_is_each_leaf_modules_fraction_per_epoch(run_a: Path) -> None:
    out = read_table(run_a, "outputs")
    rows = rows_with(charts.share(na.load(run_a)), "share")
    # the root repeats its children; labels carry the class from reportgen's meta (Linear)
    assert {r["module"] for r in rows} == {"net.0 (Linear)", "net.2 (Linear)", "net.4 (Linear)"}
    for epoch in (0, 21):
        means = {m: out["norm"][(out["module"] == m) & (out["epoch"] == epoch)].astype(float).mean()
                 for m in ("net.0", "net.2", "net.4")}  # fmt: skip
        got = {r["module"].removesuffix(" (Linear)"): r["share"] for r in rows if r["x"] == epoch}
        assert sum(got.values()) == pytest.approx(1.0)
        for module, mean in means.items():
            assert got[module] == pytest.approx(mean / sum(means.values()), rel=1e-5)


def test_parameter_norms_and_log_scale(run_a: Path) -> None:
    chart = charts.norms(na.load(run_a), "params", log=True, spikes=False)
    curves = {(r["series"], r["x"]): r["y"] for r in rows_with(chart, "n")}
    for module, param in PARAMS:
        for epoch in (1, 30):
            expected = param_norm(module, param, np.array(epoch))
            assert curves[(f"{module}.{param}", float(epoch))] == pytest.approx(expected, rel=1e-6)
    assert curves[("net.0.bias", 0.0)] is None  # a zero norm has no place on a log axis
    scales = [
        u["encoding"]["y"].get("scale", {}) for u in units(chart.to_dict()) if u["mark"]["type"] == "line"
    ]
    assert scales and all(s.get("type") == "log" for s in scales)


def test_several_runs_get_a_panel_per_series_coloured_by_run(run_a: Path, run_b: Path) -> None:
    chart = charts.norms(na.load([run_a, run_b]).filter(split="train"), spikes=False)
    lines = [u for u in units(chart.to_dict()) if u["mark"]["type"] == "line"]
    assert len(lines) == len(MODULES)
    assert all(u["encoding"]["color"]["field"] == "run" for u in lines)
    assert {r["run"] for r in rows_with(chart, "n")} == {"run-a", "run-b"}


def test_metrics_get_one_panel_each_sharing_the_x_range(run_a: Path) -> None:
    chart = charts.metrics(na.load(run_a), domain=(0, 50))
    spec = chart.to_dict()
    titles = [v["title"] for v in spec["vconcat"]]
    assert titles == ["loss", "total_reward"]
    domains = {tuple(u["encoding"]["x"]["scale"]["domain"]) for u in units(spec) if "x" in u["encoding"]}
    assert domains == {(0, 50)}
    reward = {r["x"]: r["y"] for r in rows_with(chart, "n") if r["name"] == "total_reward"}
    assert reward[12.0] == pytest.approx(10.0 + 2.0 * 12)


def test_filters_carry_through_and_bad_options_are_refused(run_a: Path) -> None:
    trace = na.load(run_a).filter(modules=["net.0"], split="train")
    assert {r["series"] for r in rows_with(charts.norms(trace, spikes=False), "n")} == {"net.0 (Linear)"}
    with pytest.raises(ValueError, match="level"):
        charts.norms(trace, level="batch", spikes=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="band"):
        charts.norms(trace, band="iqr", spikes=False)  # type: ignore[arg-type]
    with pytest.raises(na.EmptySelectionError, match=r"epochs=\(500, 600\).*epochs 0\.\.39"):
        trace.filter(epochs=(500, 600))  # refused at the filter, before any chart says "no rows"


def test_non_finite_and_all_zero_norms_never_reach_a_chart(tmp_path: Path) -> None:
    nan, inf = float("nan"), float("inf")
    run = write_trace(
        tmp_path / "odd",
        outputs={
            "pass": np.repeat(np.arange(6), 2),
            "epoch": np.repeat([0, 0, 1, 1, 2, 2], 2).astype(np.int32),
            "module": ["a", "b"] * 6,
            "norm": np.array([1, 3, 1, 3, 0, 0, 0, 0, nan, inf, 2, 2], dtype=np.float32),
        },
    )
    trace = na.load(run)
    built = [
        charts.norms(trace, spikes=False),
        charts.norms(trace, spikes=False, log=True),
        charts.share(trace),
    ]
    for chart in built:
        json.dumps(chart.to_dict(), allow_nan=False)  # what the report embeds must be strict JSON
    curves = {(r["series"], r["x"]): r for r in rows_with(built[0], "n")}
    assert (curves[("a", 2.0)]["y"], curves[("a", 2.0)]["n"]) == (2.0, 1)  # the NaN row is left out
    assert curves[("b", 2.0)]["n"] == 1
    assert {r["y"] for r in rows_with(built[1], "n") if r["x"] == 1.0} == {None}  # zeros: off a log axis
    shares = {(r["module"], r["x"]): r["share"] for r in rows_with(built[2], "share")}
    assert shares[("a", 0.0)] == pytest.approx(0.25)
    assert shares[("a", 1.0)] is None and shares[("b", 1.0)] is None  # 0 of 0 is no share
    assert shares[("a", 2.0)] == pytest.approx(0.5)


def _wide_run(
    path: Path, n_modules: int, spiking: tuple[int, ...] = ()
) -> tuple[Path, dict[str, np.ndarray]]:
    """``n_modules`` series of 300 passes; module ``m{i:04d}`` sits at level ``i + 1`` (so a larger index
    means a larger mean) with a smooth 1% wave (no spike by construction), and the modules in
    ``spiking`` get three huge spikes each."""
    passes = 300
    wave = 1 + 0.01 * np.sin(np.arange(passes) / 7)
    values = {}
    for i in range(n_modules):
        v = (i + 1.0) * wave
        if i in spiking:
            v[[60, 150, 240]] *= 50
        values[f"m{i:04d}"] = v
    names = np.array(list(values))
    run = write_trace(
        path,
        outputs={
            "pass": np.repeat(np.arange(passes), n_modules),
            "epoch": np.repeat(np.arange(passes) // 30, n_modules).astype(np.int32),
            "module": np.tile(names, passes),
            "norm": np.stack(list(values.values()), axis=1).reshape(-1).astype(np.float32),
        },
    )
    return run, values


def test_a_chart_draws_at_most_max_series_curves_and_lumps_the_rest(tmp_path: Path) -> None:
    n = 2600  # more series than Altair's 5,000-row limit allows at two bins each
    run, values = _wide_run(tmp_path / "wide", n, spiking=(3, 7))
    trace = na.load(run)
    chart = charts.norms(trace, level="pass", max_rows=3000)
    curves = rows_with(chart, "n")
    assert len(curves) <= 3000
    drawn = {r["series"] for r in curves}
    top = [f"m{i:04d}" for i in range(n - (charts.MAX_SERIES - 2), n)]  # the largest means
    lumped = f"the other {n - charts.MAX_SERIES} modules together"
    assert drawn == {"m0003", "m0007", *top, lumped}  # the spiking ones first, then the largest
    assert f"{charts.MAX_SERIES} of {n} series shown" in chart.to_dict()["title"]
    # the lumped curve is the mean over every row of the other modules in its bin
    others = np.stack([v for k, v in values.items() if k not in drawn])
    row = next(r for r in curves if r["series"] == lumped)
    lo, hi = int(row["x_lo"]), int(row["x_hi"])
    assert row["y"] == pytest.approx(others[:, lo : hi + 1].astype(np.float32).mean(), rel=1e-5)
    assert row["n"] == others[:, lo : hi + 1].size
    assert {r["series"] for r in rows_with(chart, "score")} == {"m0003", "m0007"}  # spikes of drawn only


def test_share_and_metrics_stay_bounded_with_many_series(tmp_path: Path) -> None:
    n = 60
    run, values = _wide_run(tmp_path / "wide", n)
    metrics = {"pass": np.repeat(np.arange(10), 30), "epoch": np.zeros(300, np.int32),
               "name": np.tile([f"metric{i:02d}" for i in range(30)], 10), "value": np.ones(300)}  # fmt: skip
    write_trace(run, metrics=metrics, write_meta=False)
    trace = na.load(run)
    share = charts.share(trace)
    areas = rows_with(share, "share")
    kept = [f"m{i:04d}" for i in range(n - charts.MAX_SERIES + 1, n)]  # the largest shares
    rest = f"the other {n - len(kept)} modules together"
    assert {r["module"] for r in areas} == {*kept, rest}
    means = np.array([v[:30].mean() for v in values.values()])  # epoch 0: passes 0..29
    first = {r["module"]: r["share"] for r in areas if r["x"] == 0}
    expected_rest = means[: n - len(kept)].sum() / means.sum()
    assert first[rest] == pytest.approx(expected_rest, rel=1e-4)
    assert sum(first.values()) == pytest.approx(1.0, rel=1e-5)
    panel_titles = [view.get("title") for view in charts.metrics(trace).to_dict()["vconcat"]]
    assert panel_titles == [f"metric{i:02d}" for i in range(charts.MAX_SERIES)]


def test_leaf_modules_are_those_no_other_module_is_inside() -> None:
    rng = np.random.default_rng(0)
    parts = ["a", "b", "a.b", "0", "x!y", "a.", ""]
    for _ in range(200):
        names = {".".join(rng.choice(parts, rng.integers(1, 4))) for _ in range(rng.integers(1, 25))}
        names = sorted(names | ({"(root)"} if rng.random() < 0.3 else set()))
        named = [m for m in names if m != "(root)"]
        expected = sorted(m for m in named if not any(o != m and o.startswith(m + ".") for o in named))
        assert charts._leaf_modules(names) == (expected or names), names


def test_event_profile_draws_the_profile_frame_and_keeps_the_panels_that_move(run_a: Path) -> None:
    trace = na.load(run_a)
    frame = trace.event_profile("target_update", window=10)
    chart = charts.event_profile(trace, "target_update", window=10, panels=3)
    drawn = rows_with(chart, "p25")
    kinds = {"target_update": "event", "other epoch boundaries": "placebo"}  # legend labels are data
    assert {r["kind"] for r in drawn} == set(kinds)
    assert all(r["events"] > 0 for r in drawn)  # offsets without a point are left out, not drawn as gaps
    titles = [panel["title"] for panel in chart.to_dict()["concat"]]
    assert len(titles) == 3
    # The three panels are the series whose median after the event strays farthest from 1.
    stray = (
        frame.filter((pl.col("kind") == "event") & (pl.col("offset") > 0))
        .group_by("module", "split")
        .agg((pl.col("median") - 1).abs().max().alias("stray"))
        .sort("stray", descending=True)
        .head(3)
    )
    assert sorted(titles) == sorted(f"{m} [{s}]" for m, s in stray.select("module", "split").iter_rows())
    for row in drawn:
        want = frame.filter(
            (pl.col("module") + " [" + pl.col("split") + "]" == row["series"])
            & (pl.col("kind") == kinds[row["kind"]])
            & (pl.col("offset") == row["offset"])
        ).row(0, named=True)
        for stat in ("median", "p25", "p75", "mean"):
            assert row[stat] == pytest.approx(want[stat], rel=1e-5)
    with pytest.raises(na.MissingEventError, match=r"no 'lr_drop' events.*target_update \(7\)"):
        charts.event_profile(trace, "lr_drop")


def _sequential_run(path: Path, *, with_classes: bool) -> Path:
    """A Sequential's activations ("2", "5", "11": text order would put 11 first) over 30 passes."""
    modules = ["net.11", "net.2", "net.5"]  # written in text order, as a careless writer might
    n = 30
    meta = {"modules": {"outputs": [{"name": m, "class": c} for m, c in
                                    (("net.2", "ReLU"), ("net.5", "GELU"), ("net.11", "Tanh"))],
                        "params": []}} if with_classes else {}  # fmt: skip
    return write_trace(
        path,
        outputs={"pass": np.repeat(np.arange(n), 3), "epoch": np.repeat(np.arange(n) // 10, 3).astype(np.int32),
                 "module": np.tile(modules, n), "norm": np.tile([1.0, 2.0, 3.0], n).astype(np.float32)},
        meta=meta,
    )  # fmt: skip


def test_series_are_named_with_their_class_in_the_models_order(tmp_path: Path) -> None:
    for with_classes, expected in (
        (True, ["net.2 (ReLU)", "net.5 (GELU)", "net.11 (Tanh)"]),  # the recorder's named_modules order
        (False, ["net.2", "net.5", "net.11"]),  # no metadata: numbers read as numbers
    ):
        trace = na.load(_sequential_run(tmp_path / str(with_classes), with_classes=with_classes))
        spec = charts.norms(trace, spikes=False).to_dict()
        assert [panel["title"] for panel in spec["concat"]] == expected
        for panel in spec["concat"]:  # every panel has a title, named axes and its own curve
            encodings = [view["encoding"] for view in units(panel) if "encoding" in view]
            assert all(e["x"].get("title") and e["y"].get("title", "") != "" for e in encodings if "y" in e)
        share = charts.share(trace).to_dict()
        colour = next(u["encoding"]["color"] for u in units(share["hconcat"][0]) if "color" in u["encoding"])
        assert colour["scale"]["domain"] == expected and colour["sort"] == expected


def test_overlay_keeps_one_view_and_colours_spikes_by_series(run_a: Path) -> None:
    spec = charts.norms(na.load(run_a).filter(split="train"), level="pass", layout="overlay").to_dict()
    assert "concat" not in spec and "layer" in spec
    points = [u for u in units(spec) if u["mark"]["type"] == "point"]
    assert points and points[0]["encoding"]["color"]["field"] == "series"
    with pytest.raises(ValueError, match="layout"):
        charts.norms(na.load(run_a), layout="grid")  # type: ignore[arg-type]
