"""The report, charts and command line on the signals table (trace format 2), and on a v1 trace beside it.

The planted trace (``tracegen.synthetic_signals``) has exploding gradients in net.4, an update ratio of
1e-1 in net.2, a dying net.0 and gradient spikes in net.2 three passes after each target sync.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import normtrace_analysis as na
import numpy as np
import polars as pl
import pytest
from normtrace_analysis import charts
from normtrace_analysis.cli import main
from normtrace_analysis.report import export_charts, report
from reportgen import open_report, specs
from tracegen import synthetic_signals, write_trace

SIGNAL_SLUGS = [
    "signal-grad_norm",
    "signal-output_grad_norm",
    "signal-update_ratio",
    "signal-dead_fraction",
    "signal-active_rate",
]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    s = synthetic_signals(explode="net.4", high_update="net.2", dying="net.0", spiky="net.2")
    return write_trace(
        tmp_path_factory.mktemp("signals") / "planted", outputs=s.outputs, events=s.events, signals=s.signals
    )


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    s = synthetic_signals()
    return write_trace(
        tmp_path_factory.mktemp("signals") / "clean", outputs=s.outputs, events=s.events, signals=s.signals
    )


def _section(text: str, slug: str) -> str:
    """The HTML of a family's section (its findings, then its charts' containers and specs)."""
    match = re.search(rf'<section id="signals-{slug}">(.*?)</section>', text, re.S)
    assert match, slug
    return match.group(1)


def _findings(text: str, slug: str) -> str:
    """The sentences of a family's findings list, one per line (empty when there is no list)."""
    match = re.search(r'<ul class="findings">(.*?)</ul>', _section(text, slug), re.S)
    return "" if match is None else "\n".join(re.findall(r"<li>(.*?)</li>", match.group(1), re.S))


def test_report_has_a_section_per_signal_family_with_findings_and_charts(
    planted: Path, tmp_path: Path
) -> None:
    text = report(planted, tmp_path / "report.html").read_text()
    gradients, updates, units = (_findings(text, s) for s in ("gradients", "updates", "units"))
    assert "net.4.weight grew" in gradients and "the gradients explode" in gradients
    assert "orders of magnitude" in gradients
    assert "gradient spikes follow target_update" in gradients
    assert "start within 5 passes of an output-norm excursion" in gradients
    assert "net.2.weight: update ratio" in updates and "too high" in updates
    assert "net.0.weight" not in updates  # at 1e-3: inside the band
    assert "net.0: 8" in units and "dead" in units  # 0.02 + 0.88 t over the last tenth: about 86%
    assert "Nothing stands out" not in text
    embedded = specs(text)
    assert [s for s in embedded if s.startswith("signal-")] == SIGNAL_SLUGS
    for slug in SIGNAL_SLUGS:  # each chart in its family's section, not again under Charts
        assert text.count(f'data-chart="{slug}"') == 1


def test_report_of_a_clean_trace_says_what_was_checked(clean: Path, tmp_path: Path) -> None:
    text = report(clean, tmp_path / "clean.html").read_text()
    for slug in ("gradients", "updates", "units"):
        section = _section(text, slug)
        assert "Nothing stands out" in section
        assert '<ul class="findings">' not in section


def test_report_of_a_v1_trace_has_no_signal_sections(planted: Path, tmp_path: Path) -> None:
    s = synthetic_signals(n_epochs=10)
    v1 = write_trace(tmp_path / "v1", outputs=s.outputs, events=s.events)
    text = report(v1, tmp_path / "v1.html").read_text()
    assert 'id="signals-' not in text and "signal-" not in text
    assert "Findings: what follows target_update" in text


def test_signal_charts_use_a_log_scale_for_norms_and_show_the_update_band(planted: Path) -> None:
    trace = na.load(planted)
    grads = charts.signals(trace, "grad_norm").to_dict()
    text = json.dumps(grads)
    assert '"type": "log"' in text and "gradient norm" in text and '"title": "step"' in text
    dead = json.dumps(charts.signals(trace, "dead_fraction").to_dict())
    assert '"type": "log"' not in dead
    ratio = charts.signals(trace, "update_ratio").to_dict()
    layers = ratio["vconcat"][0]["layer"]
    rect = next(layer for layer in layers if layer["mark"]["type"] == "rect")
    rule = next(
        layer for layer in layers if layer["mark"]["type"] == "rule" and "strokeDash" in layer["mark"]
    )
    datasets = ratio["datasets"]
    assert datasets[rect["data"]["name"]] == [{"lo": 1e-4, "hi": 1e-2}]
    assert datasets[rule["data"]["name"]] == [{"y": 1e-3}]
    with pytest.raises(ValueError, match=r"'grad_norms'.*active_rate, dead_fraction, grad_norm"):
        charts.signals(trace, "grad_norms")


def test_signal_charts_lump_the_series_beyond_max_series(tmp_path: Path) -> None:
    modules = [f"layer.{i}" for i in range(15)]  # 30 gradient-norm series: weight and bias each
    s = synthetic_signals(modules=modules, n_epochs=4)
    run = write_trace(tmp_path / "wide", signals=s.signals, events=s.events)
    spec = charts.signals(na.load(run), "grad_norm", spikes=False).to_dict()
    assert f"{charts.MAX_SERIES} of 30 series shown" in spec["title"]
    assert "the other 10 series together" in json.dumps(spec)


def test_static_export_includes_the_signal_charts(planted: Path, tmp_path: Path) -> None:
    files = export_charts(planted, tmp_path / "svg", "svg")
    assert [f.stem for f in files if f.stem.startswith("signal-")] == SIGNAL_SLUGS


def test_cli_summary_and_spikes_of_signals(planted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["summary", str(planted), "--table", "signals", "--kind", "dead_fraction", "--csv"])
    assert code == 0
    frame = pl.read_csv(capsys.readouterr().out.encode())
    assert set(frame["kind"]) == {"dead_fraction"} and frame["param"].null_count() == frame.height
    dying = frame.filter(pl.col("module") == "net.0").sort("epoch")["mean"].to_numpy()
    t_mid = (np.arange(60) * 50 + 24.5) / 2999  # each epoch's mean of t = pass / 2999
    np.testing.assert_allclose(dying, 0.02 + 0.88 * t_mid, atol=0.003)  # noise 0.005 / sqrt(50)

    code = main(["spikes", str(planted), "--table", "signals", "--kind", "grad_norm", "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    passes = sorted({row["pass"] for row in doc["spikes"]})
    assert passes == [250 * k - 1 + 3 for k in range(1, 12)]  # a sync every 5 epochs of 50 passes, lag 3
    assert {row["module"] for row in doc["spikes"]} == {"net.2"}
    assert {row["kind"] for row in doc["alignment"]} == {"grad_norm"}

    code = main(["spikes", str(planted), "--table", "signals", "--kind", "grad_normz"])
    assert code == 2 and "the trace records kinds: active_rate" in capsys.readouterr().err


@pytest.mark.browser
def test_signal_charts_render_offline_in_chromium(browser: Any, planted: Path, tmp_path: Path) -> None:
    path = report(planted, tmp_path / "report.html")
    seen = open_report(browser, path)
    assert seen["errors"] == []
    assert seen["requests"] == [path.as_uri()]
    drawn = {c["slug"]: c for c in seen["charts"]}
    for slug in SIGNAL_SLUGS:
        chart = drawn[slug]
        assert chart["state"] == "rendered" and chart["marks"] > 0, chart
        assert chart["axes"] >= 2 and chart["untitled"] == 0, chart
    assert drawn["signal-grad_norm"]["lines"] >= 6  # weight and bias of three layers


def test_the_norm_charts_and_the_event_profile_refuse_signals(planted: Path) -> None:
    trace = na.load(planted)
    for draw in (charts.norms, charts.share):
        with pytest.raises(ValueError, match=r"charts\.signals\(trace, kind\)"):
            draw(trace, "signals")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="event_steps or event_alignment"):
        charts.event_profile(trace, table="signals")
