"""The ``normtrace`` command's options checked against planted ground truth, not against the analysis
functions the command calls: one series of known noise with four spikes of known size at known passes,
and two events at known lags before two of them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from normtrace_analysis.cli import main
from tracegen import write_trace

# pass -> planted excursion in units of the noise's standard deviation (0.1): |score| ~ these
PLANTED = {310: 10.0, 810: 40.0, 1310: -20.0, 1710: 8.0}
STRONGEST_FIRST = [810, 1310, 310, 1710]
EVENTS = {805: 5, 1300: 10}  # event pass -> lag of the spike that follows it (810 - 805, 1310 - 1300)
PASSES_PER_EPOCH = 100


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    n = 2000
    values = 10.0 + 0.1 * np.random.default_rng(7).standard_normal(n)
    assert np.abs(values - 10.0).max() < 0.45  # no stray point anywhere near the smallest spike (8 SDs)
    for p, sds in PLANTED.items():
        values[p] += 0.1 * sds
    outputs = {
        "pass": np.arange(n),
        "epoch": (np.arange(n) // PASSES_PER_EPOCH).astype(np.int32),
        "module": ["m"] * n,
        "norm": values.astype(np.float32),
    }
    events = {
        "epoch": [p // PASSES_PER_EPOCH for p in EVENTS],
        "pass": list(EVENTS),
        "name": ["target_update"] * len(EVENTS),
    }
    return write_trace(tmp_path_factory.mktemp("cli") / "r", outputs=outputs, events=events)


def _spikes_json(capsys: pytest.CaptureFixture[str], run: Path, *options: str) -> dict:
    code = main(["spikes", str(run), "--json", "--permutations", "9", *options])
    out, _ = capsys.readouterr()
    assert code == 0
    return json.loads(out)


def test_spikes_finds_the_planted_spikes_with_their_signs_and_lags(run, capsys):
    doc = _spikes_json(capsys, run)
    found = {s["pass"]: s for s in doc["spikes"]}
    assert sorted(found) == sorted(PLANTED)
    for p, sds in PLANTED.items():
        assert found[p]["score"] == pytest.approx(sds, rel=0.35), p  # the MAD estimates the SD within ~1/3
    assert found[810]["lag_passes"] == 5 and found[1310]["lag_passes"] == 10
    assert found[310]["event"] is None  # before the first event


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [("15", [810, 1310]), ("30", [810]), ("100", [])],
)
def test_threshold_keeps_only_the_spikes_above_it(run, capsys, threshold, expected):
    doc = _spikes_json(capsys, run, "--threshold", threshold)
    assert sorted(s["pass"] for s in doc["spikes"]) == expected
    # the alignment is computed on the same spikes: an event counts only if a kept spike follows it
    (row,) = doc["alignment"]
    assert row["events_followed"] == len([p for p in expected if p in (810, 1310)])


@pytest.mark.parametrize(("window", "followed"), [("4", 0), ("5", 1), ("9", 1), ("10", 2)])
def test_window_sets_which_events_count_as_followed(run, capsys, window, followed):
    """Lags are 5 and 10: window 5 counts the first event (lag = window), 4 neither, 10 both."""
    doc = _spikes_json(capsys, run, "--window", window)
    (row,) = doc["alignment"]
    assert (row["window"], row["events"], row["events_followed"]) == (int(window), 2, followed)


def test_epochs_n_is_that_epoch_only(run, capsys):
    doc = _spikes_json(capsys, run, "--epochs", "13")  # passes 1300..1399
    assert [s["pass"] for s in doc["spikes"]] == [1310]
    doc = _spikes_json(capsys, run, "--epochs", "3:8")  # passes 300..899
    assert sorted(s["pass"] for s in doc["spikes"]) == [310, 810]


def test_text_view_lists_the_strongest_spikes_first(run, capsys):
    assert main(["spikes", str(run), "--permutations", "9", "--limit", "3"]) == 0
    out, _ = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "4 spikes in outputs (per pass), the 3 strongest shown"
    header = lines[1].split()
    rows = [line.split() for line in lines[3:6]]
    passes = [int(r[header.index("pass")]) for r in rows]
    assert passes == STRONGEST_FIRST[:3]
    assert lines[6] == ""  # exactly three rows


@pytest.mark.parametrize(
    "argv",
    [
        ["spikes", "--limit", "0"],
        ["spikes", "--window", "0"],
        ["spikes", "--permutations", "0"],
        ["summary", "--columns", "0"],
    ],
)
def test_zero_is_refused_where_a_count_is_expected(run, capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main([argv[0], str(run), *argv[1:]])
    assert exit_info.value.code == 2
    assert "expected a positive integer, got '0'" in capsys.readouterr().err


def test_one_is_accepted_where_a_count_is_expected(run, capsys):
    assert main(["spikes", str(run), "--limit", "1", "--window", "1", "--permutations", "1"]) == 0
    assert "the 1 strongest shown" in capsys.readouterr().out
    assert main(["summary", str(run), "--columns", "1"]) == 0


def test_an_export_that_writes_nothing_exits_2(run, tmp_path, capsys):
    code = main(["export", str(run), "--table", "params", "--format", "parquet", "-o", str(tmp_path / "ds")])
    assert code == 2
    assert "nothing written: no run has params rows" in capsys.readouterr().err


class _ClosedPipe:
    """A stdout whose reader is gone (``normtrace spikes RUN --csv | head -0``): every write raises
    BrokenPipeError, and its descriptor is a real pipe's, for the command to redirect."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self.fd


@pytest.mark.parametrize("argv", [["summary", "--csv"], ["spikes", "--csv", "--permutations", "9"]])
def test_a_closed_pipe_ends_quietly_with_exit_code_0(run, monkeypatch, argv):
    read_end, write_end = os.pipe()
    os.close(read_end)
    stdout = _ClosedPipe(write_end)
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        code = main([argv[0], str(run), *argv[1:]])
        # what is left to flush at exit goes nowhere: the descriptor now points at /dev/null
        os.write(write_end, b"flushed at exit")
    finally:
        os.close(write_end)
    assert stdout.writes == 1 and code == 0
