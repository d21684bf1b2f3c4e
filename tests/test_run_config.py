"""Sweeps: hyperparameters stored by the recorder, a table of runs in the analysis, a report that reads.

The recorder writes ``Recorder(config=...)`` into meta.json (refusing what is not JSON, before the run
starts); ``trace.run_table`` gives one row per run and a column per setting; the report of several runs
shows the settings that differ and folds the findings that found nothing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import normtrace_analysis as na
import polars as pl
import pytest
import torch
from normtrace_analysis import report
from torch import nn
from tracegen import synthetic_dqn, write_trace

import normtrace as nt


def record(run: Path, config: dict | None, passes: int = 5) -> Path:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with nt.Recorder(run, [nt.OutputNorm()], config=config) as rec:
        rec.attach(model)
        for _ in range(passes):
            model(torch.randn(2, 3))
        rec.tick_epoch()
    return run


def test_the_config_lands_in_meta_json_as_given(tmp_path: Path) -> None:
    config = {"lr": 1e-3, "seed": 3, "optimizer": {"name": "adam", "betas": [0.9, 0.99]}, "note": None}
    run = record(tmp_path / "run", config)
    meta = json.loads((run / "meta.json").read_text())
    assert meta["config"] == config
    assert json.loads((record(tmp_path / "plain", None) / "meta.json").read_text())["config"] == {}


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"lr": 1e-3, "model": nn.Linear(2, 2)}, "'model'"),
        ({1: "a"}, "keys must be strings, got 1"),
        ([("lr", 1e-3)], "must be a mapping"),
    ],
)
def test_a_config_that_is_not_json_is_refused_before_the_run_starts(
    tmp_path: Path, config: object, named: str
) -> None:
    with pytest.raises(TypeError, match=re.escape(named)):
        nt.Recorder(tmp_path / "run", [nt.OutputNorm()], config=config)  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()  # nothing claimed, nothing half-written


def test_run_table_has_a_row_per_run_and_a_column_per_setting(tmp_path: Path) -> None:
    record(tmp_path / "a", {"lr": 1e-3, "seed": 3, "opt": {"name": "adam"}})
    record(tmp_path / "b", {"lr": 3e-4, "seed": 3, "opt": {"name": "sgd"}}, passes=7)
    record(tmp_path / "c", None)
    trace = na.load(tmp_path / "*")
    table = trace.run_table.sort("run")
    assert table["run"].to_list() == ["a", "b", "c"]
    assert table["status"].to_list() == ["closed"] * 3
    assert table["passes"].to_list() == [5, 7, 5] and table["epochs"].to_list() == [1, 1, 1]
    assert table.schema["lr"] == pl.Float64 and table.schema["seed"] == pl.Int64
    assert table["lr"].to_list() == [1e-3, 3e-4, None]
    assert table["opt.name"].to_list() == ["adam", "sgd", None]
    assert all(s >= 0 for s in table["seconds"].to_list())
    # the documented way to pick runs by a setting
    slow = trace.filter(runs=trace.run_table.filter(pl.col("lr") < 1e-3)["run"].to_list())
    assert slow.runs == ["b"]


def test_a_sweep_report_shows_what_differs_and_what_is_shared(tmp_path: Path) -> None:
    for i, lr in enumerate([1e-3, 3e-4, 1e-4]):
        record(tmp_path / f"lr{i}", {"lr": lr, "seed": 3, "batch": 32}, passes=60)
    html = report(tmp_path / "*", tmp_path / "report.html").read_text()
    runs = html.split('id="metadata"', 1)[1].split("</section>", 1)[0]
    assert "settings that differ between them: lr" in runs
    assert "Same in every run: seed = 3; batch = 32." in runs
    assert runs.count("<tr><td>lr") == 3  # one row per run
    assert "<details><summary>Each run's metadata</summary>" in runs


def _synthetic_sweep(root: Path, aligned: dict[str, float]) -> None:
    for i, (name, share) in enumerate(aligned.items()):
        syn = synthetic_dqn(n_epochs=40, passes_per_epoch=50, n_spikes=6, after_event=share, seed=i * 7)
        write_trace(root / name, outputs=syn.outputs, events=syn.events)


def test_the_verdict_names_one_group_in_one_run_and_counts_the_others(tmp_path: Path) -> None:
    """Groups of layers that spike together are per run: the verdict must not merge runs' groups."""
    _synthetic_sweep(tmp_path, {"a": 0.8, "b": 0.8, "c": 0.0})
    trace = na.load(tmp_path / "*")
    groups = trace.spike_groups().filter(pl.col("size") > 1)
    per_run = groups.group_by("run").agg(pl.col("module").sort()).sort("run")
    assert per_run["run"].to_list() == ["a", "b"]  # the two runs with planted aligned spikes
    html = report(trace, tmp_path / "report.html").read_text()
    verdict = html.split('class="verdict">', 1)[1].split("</p>", 1)[0]
    first = ", ".join(per_run["module"][0])
    assert (
        f"In a, {first} spike together: one finding, not {len(per_run['module'][0])}; 1 more such group below."
        in verdict
    )


def test_many_findings_fold_those_that_found_nothing(tmp_path: Path) -> None:
    _synthetic_sweep(tmp_path, {f"r{i}": (0.8 if i == 0 else 0.0) for i in range(6)})
    trace = na.load(tmp_path / "*")
    aligned = trace.event_alignment("target_update")
    tested = aligned.filter(pl.col("p_value").is_not_null())
    assert tested.height > 12  # more than the report lists one by one
    quiet = tested.filter(pl.col("q_value") >= 0.05).height
    html = report(trace, tmp_path / "report.html").read_text()
    section = html.split('id="alignment"', 1)[1].split("</ul>", 1)[0]
    assert f"{quiet} other series: spikes do not follow target_update more often than chance" in section
    listed = section.split("<li><details>", 1)[0]
    assert listed.count("<li>") == tested.height - quiet  # the significant ones, each on its line
