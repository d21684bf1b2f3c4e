"""``normtrace spikes`` and ``summary`` as read in a terminal, on planted ground truth: module a's train and
no_grad passes and module b all jump by 30 noise SDs one to six passes after each of three ``sync``
events, so the three series share their excursions and each event is followed at a window of 20 (not
at 5 in the series whose jumps come six passes late)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from normtrace_analysis.cli import main
from tracegen import write_trace

N = 2000
EVENTS = [395, 995, 1595]
JUMPS = [p + d for p in EVENTS for d in (5, 6)]  # a's train passes are even (400), its no_grad ones odd (401)


def _run(path: Path, seed: int = 5) -> Path:
    passes = np.repeat(np.arange(N), 2)
    module = np.tile(["a", "b"], N)
    norm = 10.0 + 0.1 * np.random.default_rng(seed).standard_normal(2 * N)
    norm[np.isin(passes, JUMPS)] += 3.0
    outputs = {
        "pass": passes,
        "epoch": (passes // 100).astype(np.int32),
        "module": module,
        "norm": norm.astype(np.float32),
        "grad_enabled": ~((module == "a") & (passes % 2 == 1)),
    }
    events = {"epoch": [p // 100 for p in EVENTS], "pass": EVENTS, "name": ["sync"] * 3}
    params = {"epoch": np.arange(20, dtype=np.int32), "pass": np.arange(20) * 100 + 99,
              "module": ["p"] * 20, "param": ["weight"] * 20, "norm": np.linspace(1.0, 2.0, 20)}  # fmt: skip
    return write_trace(path, outputs=outputs, events=events, params=params)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory.mktemp("text") / "r")


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def _table(text: str, first_header: str, holding: str = "followed") -> list[list[str]]:
    """The rows of the text table whose header line starts with ``first_header`` and names ``holding``
    (default: the alignment table's ``followed``, not the spike table above it, which starts alike)."""
    lines = text.splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.split()[:1] == [first_header] and holding in line.split()
    )
    rows = []
    for line in lines[start:]:
        if not line.strip() or line.startswith("p: "):  # a blank line or the table's footnote ends it
            break
        rows.append(line.split())
    return rows


def test_series_sharing_their_excursions_are_named_as_one_finding(run: Path, capsys) -> None:
    text = _cli(capsys, "spikes", str(run), "--permutations", "9")
    assert "the same excursions (one finding, not 3): a (no_grad), a, b" in text.splitlines()


def test_the_alignment_table_shows_every_window_with_counts_chance_and_placebo(run: Path, capsys) -> None:
    options = ["--permutations", "9", "--window", "20", "--windows", "5"]
    text = _cli(capsys, "spikes", str(run), *options)
    doc = json.loads(_cli(capsys, "spikes", str(run), "--json", *options))
    header, _, *rows = _table(text, "module")
    assert header == ["module", "split", "window", "followed", "chance", "%", "enrichment", "p_value", "q_value",
                      "clusters", "placebo", "placebo_p"]  # fmt: skip
    # the main window is tested beside the one asked for: 5 and 20 for each of the three series
    assert sorted((r[0], r[1], int(r[2])) for r in rows) == sorted(
        (m, s, w) for m, s in (("a", "train"), ("a", "no_grad"), ("b", "train")) for w in (5, 20)
    )
    followed = {(r[0], r[1], int(r[2])): r[3] for r in rows}
    # known by construction: every event followed within 20; within 5 only by a's train jumps (lag 5)
    assert followed == {
        key: ("3/3" if key[2] == 20 or key[:2] == ("a", "train") else "0/3") for key in followed
    }
    # --windows' table is computed with the other options too: the floor of 9 permutations
    assert {r["p_floor"] for r in doc["alignment"]} == {1 / 10}
    for row, record in zip(rows, doc["alignment"], strict=True):
        assert (row[0], row[1], int(row[2])) == (record["module"], record["split"], record["window"])
        assert row[4] == f"{round(record['chance'] * 100, 2):.4g}"  # a share shown as a percentage
        assert row[9] == f"{record['placebo_followed']}/{record['placebo_events']}"


def test_the_run_column_is_shown_only_for_several_runs(run: Path, tmp_path: Path, capsys) -> None:
    one = _table(_cli(capsys, "spikes", str(run), "--permutations", "9"), "module")
    assert one[0][0] == "module"
    other = _run(tmp_path / "s", seed=6)
    two = _table(_cli(capsys, "spikes", str(run), str(other), "--permutations", "9"), "run")
    two = [row for row in two if row[0] in ("run", "r", "s")]
    assert two[0][:3] == ["run", "module", "split"] and {row[0] for row in two[1:]} == {"r", "s"}


def test_the_window_threshold_and_level_reach_every_analysis(run: Path, capsys) -> None:
    doc = json.loads(_cli(capsys, "spikes", str(run), "--json", "--permutations", "9", "--window", "7"))
    assert {r["window"] for r in doc["alignment"]} == {r["window"] for r in doc["steps"]} == {7}
    assert doc["event"] == "sync" and len(doc["groups"]) == 3
    quiet = json.loads(
        _cli(capsys, "spikes", str(run), "--json", "--permutations", "9", "--threshold", "1000")
    )
    assert quiet["spikes"] == [] and all(g["size"] <= 1 for g in quiet["groups"])
    epochs = json.loads(_cli(capsys, "spikes", str(run), "--json", "--permutations", "9", "--level", "epoch"))
    assert {r["window"] for r in epochs["steps"]} == {1}  # the epoch level's default window


def test_spikes_of_parameters_are_searched_in_the_parameters(run: Path, capsys) -> None:
    doc = json.loads(_cli(capsys, "spikes", str(run), "--json", "--permutations", "9", "--table", "params",
                          "--level", "epoch"))  # fmt: skip
    assert all(s["module"] == "p" and s["param"] == "weight" for s in doc["spikes"])
    assert all(r["module"] == "p" and r["param"] == "weight" for r in doc["steps"] + doc["groups"])
    assert doc["steps"]  # the parameter's series was tested


def test_summary_shows_each_run_in_name_order_and_says_when_epochs_are_left_out(
    run: Path, tmp_path: Path, capsys
) -> None:
    other = _run(tmp_path / "s", seed=6)
    text = _cli(capsys, "summary", str(other), str(run), "--columns", "20")
    titles = [line for line in text.splitlines() if "per epoch" in line]
    assert titles == [f"{name} · outputs: mean of the output norm (L2) per epoch" for name in ("r", "s")]
    cut = _cli(capsys, "summary", str(run), "--columns", "3").splitlines()[0]
    assert cut.endswith("per epoch (3 of 20 epochs shown; --csv for all)")
