"""The HTML report: complete, self-contained (no network of any kind), and every chart drawn by Chromium."""

from __future__ import annotations

import html
import importlib
import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import altair as alt
import normtrace_analysis as na
import numpy as np
import polars as pl
import pytest
from normtrace_analysis import charts
from normtrace_analysis.report import ChartSection, chart_sections, export_charts, report
from reportgen import MODULES, open_report, read_table, specs
from tracegen import write_trace

SLUGS = ["output-norms", "parameter-norms", "metrics", "output-share", "parameter-share", "event-profile"]
_SCRIPT = re.compile(r"<script\b([^>]*)>(.*?)</script>", re.S | re.I)


def test_report_is_self_contained(run_a: Path, tmp_path: Path) -> None:
    text = report(run_a, tmp_path / "report.html").read_text()
    scripts = _SCRIPT.findall(text)
    assert scripts and all("src" not in attrs.lower() for attrs, _ in scripts)  # everything inlined
    markup = _SCRIPT.sub("", text)
    assert not re.search(r"https?:|//[\w.-]+\.\w", markup)  # no URL outside the scripts' code
    assert not re.search(r"<(link|img|iframe|object|embed)\b", markup, re.I)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "vegaEmbed" in scripts[-1][1] and len(scripts[-2][1]) > 100_000  # the bundled Vega libraries


def test_report_shows_metadata_summary_findings_and_spikes(run_a: Path, tmp_path: Path) -> None:
    trace = na.load(run_a)
    text = report(trace, tmp_path / "report.html", level="pass").read_text()  # the planted spikes' level
    assert 'class="error"' not in text  # every section built
    assert ">run-a<" in text and ">synthetic<" in text  # run name and hostname from meta.json
    assert "net.3: non-tensor — returned None" in text  # the recorder's note
    summary = text[text.index('id="summary"') : text.index('id="charts"')]
    for module in MODULES:  # in the model's order, named with the class reportgen's meta gives
        assert f"<td>{html.escape(module)} (Linear)</td>" in summary
    assert [summary.index(f"<td>{html.escape(m)} (Linear)</td>") for m in MODULES] == sorted(
        summary.index(f"<td>{html.escape(m)} (Linear)</td>") for m in MODULES
    )
    aligned = trace.event_alignment("target_update", level="pass")
    assert aligned.height > 0
    for finding in aligned.filter(pl.col("spikes") > 0)["finding"]:
        assert f"<li>{html.escape(finding)}</li>" in text
    quiet = aligned.filter(pl.col("spikes") == 0)  # one line for all of them, not one each
    assert quiet.height > 1 and text.count("No spikes, so nothing to align, in: ") == 1
    for module, split in quiet.select("module", "split").iter_rows():
        assert html.escape(module + ("" if split == "train" else f" [{split}]")) in text
    found_q = aligned.filter(pl.col("q_value") < 0.05).height
    assert f"Spikes follow target_update in {found_q} of {aligned.height} output series" in text
    # How to read p and q, the windows, the steps, and the layers that are one finding.
    findings = text[text.index('id="alignment"') : text.index('id="metadata"')]
    assert "Benjamini–Hochberg q-value across the" in findings and "(PRDS)" in findings
    assert "The same for windows of 5, 20, 50 passes" in findings
    assert "Steps: the level after each target_update against the level before it" in findings
    for finding in trace.event_steps("target_update").drop_nulls("p_value")["finding"]:
        assert html.escape(finding) in findings
    if trace.spike_groups().filter(pl.col("size") > 1).height:
        assert "Layers whose spikes are the same excursions" in findings
    found = trace.spikes(level="pass")
    assert f"{found.height} spikes" in text
    embedded = specs(text)
    assert list(embedded) == SLUGS
    marks = [r for rows in embedded["output-norms"]["datasets"].values() for r in rows if "score" in r]
    assert len(marks) == min(found.filter(pl.col("value").is_finite()).height, charts.MAX_SPIKES) > 0


def test_report_embeds_little_data_and_shares_the_x_range(run_a: Path, tmp_path: Path) -> None:
    text = report(run_a, tmp_path / "report.html", level="epoch", max_rows=500).read_text()
    embedded = specs(text)
    for slug in ("output-norms", "parameter-norms", "metrics"):
        spec = embedded[slug]
        rows = sum(len(v) for v in spec["datasets"].values())
        assert rows <= 500 + 500 + charts.MAX_SPIKES, slug  # curves + rules per bin + spike marks
        assert '"domain":[0,39]' in json.dumps(spec, separators=(",", ":")), slug


def test_a_failing_chart_leaves_the_rest_of_the_report(
    run_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> alt.Chart:
        raise RuntimeError("metrics exploded")

    monkeypatch.setattr(charts, "metrics", broken)
    with pytest.warns(UserWarning, match="metrics exploded"):
        text = report(run_a, tmp_path / "report.html").read_text()
    assert "This chart could not be built: metrics exploded" in text
    assert list(specs(text)) == [s for s in SLUGS if s != "metrics"]


def test_charts_without_data_say_so(tmp_path: Path) -> None:
    from tracegen import write_trace

    run = write_trace(
        tmp_path / "bare", outputs={"pass": [0, 1], "epoch": [0, 0], "module": ["a", "a"], "norm": [1.0, 2.0]}
    )
    text = report(run, tmp_path / "report.html").read_text()
    assert list(specs(text)) == ["output-norms", "output-share"]
    assert "The trace has no params rows." in text and "The trace has no metrics rows." in text
    assert "The runs recorded no events." in text  # the profile chart's place says why it is absent
    assert "<h2>Findings: spikes</h2>" in text and "Recorder.event(name)" in text  # not a DQN's heading


def test_static_export_writes_one_file_per_chart(run_a: Path, tmp_path: Path) -> None:
    svgs = export_charts(run_a, tmp_path / "svg", "svg")
    assert [p.name for p in svgs] == [f"{s}.svg" for s in SLUGS]
    for path in svgs:
        root = ET.parse(path).getroot()
        assert root.tag.endswith("svg") and len(list(root.iter())) > 50  # drawn, not an empty frame
    pngs = export_charts(na.load(run_a).filter(modules=["net.0"]), tmp_path / "png", "png", scale=1.0)
    assert [p.name for p in pngs] == [f"{s}.png" for s in SLUGS]
    assert all(p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    with pytest.raises(ValueError, match="format"):
        export_charts(run_a, tmp_path, "pdf")  # type: ignore[arg-type]


@pytest.mark.browser
def test_report_renders_every_chart_offline_in_chromium(
    browser: Any, run_a: Path, run_b: Path, tmp_path: Path
) -> None:
    for name, runs in (("one", [run_a]), ("two", [run_a, run_b])):
        path = report(na.load(runs), tmp_path / f"{name}.html")
        seen = open_report(browser, path)
        assert seen["errors"] == [], name
        assert seen["requests"] == [path.as_uri()], name  # the file itself and nothing else
        assert [c["slug"] for c in seen["charts"]] == SLUGS
        trace = na.load(runs)
        series = trace.outputs.select("run", "module", "split").unique().collect().height
        for chart in seen["charts"]:
            assert chart["state"] == "rendered", (name, chart)
            assert chart["views"] == 1 and chart["marks"] > 0, (name, chart)
            assert chart["title"].strip(), (name, chart)  # every chart says what it shows
            assert chart["axes"] >= 2 and chart["untitled"] == 0, (name, chart)  # every axis labelled
        norms = next(c for c in seen["charts"] if c["slug"] == "output-norms")
        assert norms["lines"] >= series  # a curve for every selected module (and split, and run)


@pytest.mark.browser
def test_a_chart_failing_in_the_browser_does_not_blank_the_others(
    browser: Any, run_a: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Unrenderable:
        def to_dict(self) -> dict[str, Any]:
            return {"mark": "no-such-mark", "data": {"values": [{"a": 1}]}}

    report_module = importlib.import_module("normtrace_analysis.report")  # the package exports a function too

    def sections(trace: na.Trace, **options: Any) -> list[ChartSection]:
        real = chart_sections(trace, **options)
        return [*real[:2], ChartSection("broken", "Broken", lambda: Unrenderable()), *real[2:]]  # type: ignore[arg-type, return-value]

    monkeypatch.setattr(report_module, "chart_sections", sections)
    seen = open_report(browser, report(run_a, tmp_path / "report.html"))
    states = {c["slug"]: c["state"] for c in seen["charts"]}
    assert states == {**dict.fromkeys(SLUGS, "rendered"), "broken": "error"}
    assert len(seen["errors"]) == 1 and "chart-broken" in seen["errors"][0]


HOSTILE = ["a\nb", "c\u2028d\u2029e", "f\\g", "h'i\"j", "</script><b>k</b>", "l\x00m", "n\ro\tp"]
"""Names a user's code can produce; each must be drawn as text, never break a chart or the page."""


def hostile_run(path: Path) -> Path:
    n = 120
    names = np.array(HOSTILE, dtype=object)
    k = len(HOSTILE)
    rng = np.random.default_rng(0)
    norm = 1 + 0.05 * rng.standard_normal(n * k)
    norm[k * 60] = 30.0  # one spike, so a spike mark is drawn too
    return write_trace(
        path,
        outputs={"pass": np.repeat(np.arange(n), k), "epoch": np.repeat(np.arange(n) // 12, k).astype(np.int32),
                 "module": np.tile(names, n), "norm": norm.astype(np.float32)},
        metrics={"pass": np.repeat(np.arange(n), k), "epoch": np.repeat(np.arange(n) // 12, k).astype(np.int32),
                 "name": np.tile(names, n), "value": rng.random(n * k)},
        events={"pass": np.array([30, 50, 70, 90]), "epoch": np.array([2, 4, 5, 7], dtype=np.int32),
                "name": np.array([HOSTILE[0], HOSTILE[3], HOSTILE[3], HOSTILE[2]], dtype=object)},
    )  # fmt: skip


def test_hostile_names_export_as_static_charts(tmp_path: Path) -> None:
    written = export_charts(hostile_run(tmp_path / "r"), tmp_path / "svg", "svg")
    profiles = ["event-profile", "event-profile-2", "event-profile-3"]  # one per event, names hostile too
    assert [p.stem for p in written] == ["output-norms", "metrics", "output-share", *profiles]
    assert "l\\x00m" in written[0].read_text()  # NUL shown as an escape (vl-convert aborts on a raw NUL)


@pytest.mark.browser
def test_hostile_names_render_in_chromium(browser: Any, tmp_path: Path) -> None:
    runs = [hostile_run(tmp_path / "run\nA"), hostile_run(tmp_path / "run\\B'\"<i>")]
    for name, chosen in (("one", runs[:1]), ("two", runs)):
        path = report(na.load(chosen), tmp_path / f"{name}.html", event=HOSTILE[3])  # quotes in the event
        seen = open_report(browser, path)
        assert seen["errors"] == [], name
        assert "event-profile" in [c["slug"] for c in seen["charts"]]
        for chart in seen["charts"]:
            assert chart["state"] == "rendered" and chart["marks"] > 0, (name, chart)


def test_the_findings_are_about_the_events_the_run_recorded(run_a: Path, tmp_path: Path) -> None:
    renamed = Path(shutil.copytree(run_a, tmp_path / "cnn"))
    events = read_table(renamed, "events")
    for shard in (renamed / "events").glob("*.arrow"):
        shard.unlink()
    names = ["lr_drop"] * (len(events["pass"]) - 2) + ["checkpoint"] * 2
    write_trace(renamed, events={**events, "name": names}, write_meta=False)
    text = report(renamed, tmp_path / "cnn.html").read_text()
    headings = re.findall(r"<h2>Findings: ([^<]*)</h2>", text)
    assert headings == ["what follows lr_drop", "what follows checkpoint"]  # most frequent first
    assert "target_update" not in text[text.index('id="alignment"') : text.index('id="metadata"')]
    with pytest.raises(na.MissingEventError, match=r"'target_update'.*lr_drop \(5\), checkpoint \(2\)"):
        report(renamed, tmp_path / "dqn.html", event="target_update")
    only = report(renamed, tmp_path / "one.html", event="checkpoint").read_text()
    assert re.findall(r"<h2>Findings: ([^<]*)</h2>", only) == ["what follows checkpoint"]
