"""``normtrace spikes`` on the paths the planted-excursion run of ``test_cli_text.py`` does not take: level
steps (and the q < 0.05 cut that reports them), a run without events, shared excursions per run, rank
and group, parameter series, the spike list cut by ``--limit``, and the progress line of each command.
Every expectation is known by construction of the run it reads."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import normtrace_analysis.progress as progress_module
import numpy as np
import pytest
from normtrace_analysis.cli import main
from tracegen import every_pass, write_trace

N = 2000
SYNCS = [300, 700, 1100, 1500]


def _outputs(modules: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every module on every pass, epochs of 100 passes, ``modules[name]`` its norms (length N)."""
    outputs = every_pass(N, tuple(modules), epoch_len=100)
    outputs["norm"] = np.stack(list(modules.values()), axis=1).ravel().astype(np.float32)
    return outputs


def _noise(seed: int, n: int = N) -> np.ndarray:
    return 10.0 + 0.1 * np.random.default_rng(seed).standard_normal(n)


SYNC_EVENTS = {"epoch": [p // 100 for p in SYNCS], "pass": SYNCS, "name": ["sync"] * len(SYNCS)}


@pytest.fixture(scope="module")
def steps_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``up`` rises by 10 noise SDs at every sync and stays there (a staircase); ``flat`` is noise."""
    up = _noise(1) + 1.0 * np.searchsorted(SYNCS, np.arange(N), side="right")
    path = tmp_path_factory.mktemp("steps") / "r"
    return write_trace(path, outputs=_outputs({"flat": _noise(2), "up": up}), events=SYNC_EVENTS)


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two modules, three planted spikes in ``a``, and no events at all."""
    a = _noise(3)
    a[[400, 900, 1400]] += 5.0
    return write_trace(tmp_path_factory.mktemp("quiet") / "r", outputs=_outputs({"a": a, "b": _noise(4)}))


def _cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _spikes_json(capsys: pytest.CaptureFixture[str], *argv: object) -> dict:
    code, out, _ = _cli(capsys, "spikes", *argv, "--json")
    assert code == 0
    return json.loads(out)


# ----------------------------------------------------------------------------------------------------------
# Steps


def test_a_level_step_after_every_event_is_reported_and_noise_is_not(steps_run: Path, capsys) -> None:
    code, out, _ = _cli(capsys, "spikes", steps_run, "--permutations", "99")
    lines = out.splitlines()
    steps = [line for line in lines if "the median level in the 20 passes after a sync" in line]
    assert code == 0 and len(steps) == 1 and steps[0].startswith("up: ")
    assert "higher than in the 20 before (median over 4 events; 4 up)" in steps[0]
    assert not any(line.startswith("flat: the median level") for line in lines)
    assert not any(line.startswith("no step") for line in lines)
    # the alignment's own finding per series comes first: neither has spikes to align
    assert [line for line in lines if "nothing to align with sync" in line] == [
        f"{m}: no spikes detected, so nothing to align with sync" for m in ("flat", "up")
    ]


def test_a_step_at_exactly_q_0_05_is_not_reported(steps_run: Path, capsys) -> None:
    """One series tested with 39 permutations: the two-sided floor 2/40 makes p = q = 0.05 exactly, which
    is not below 0.05."""
    doc = _spikes_json(capsys, steps_run, "--permutations", "39", "--modules", "up")
    assert [(r["module"], r["p_value"], r["q_value"]) for r in doc["steps"]] == [("up", 0.05, 0.05)]
    code, out, _ = _cli(capsys, "spikes", steps_run, "--permutations", "39", "--modules", "up")
    assert code == 0 and out.splitlines()[-1] == (
        "no step: in none of the 1 series does the level after a sync differ from the level before "
        "(smallest p = 0.05; --json for all)"
    )


def test_the_permutations_and_seed_reach_the_step_test(steps_run: Path, capsys) -> None:
    by_seed = {}
    for seed in (1, 2, 1):
        doc = _spikes_json(capsys, steps_run, "--permutations", "99", "--seed", seed)
        p = {r["module"]: r["p_value"] for r in doc["steps"]}
        assert p["up"] == 2 / 100  # the floor of 99 permutations (two-sided), not of the default 999
        assert by_seed.setdefault(seed, p["flat"]) == p["flat"]  # a seed repeats its p-values
    assert by_seed[1] != by_seed[2]  # and another seed jitters the events differently


# ----------------------------------------------------------------------------------------------------------
# A run without events


def test_a_run_without_events_still_lists_its_spikes_and_says_why_nothing_is_aligned(
    quiet_run: Path, capsys
) -> None:
    code, out, _ = _cli(capsys, "spikes", quiet_run)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "3 spikes in outputs (per pass)"
    assert sorted(int(line.split()[3]) for line in lines[3:6]) == [400, 900, 1400]  # run, module, split, pass
    assert lines[-1] == (
        "no events were recorded, so there is nothing to align the spikes with (mark events with "
        "Recorder.event(name), or track_target(module))"
    )
    doc = _spikes_json(capsys, quiet_run)
    assert (doc["event"], doc["alignment"], doc["steps"]) == (None, None, None)
    assert sorted(s["pass"] for s in doc["spikes"]) == [400, 900, 1400]


def test_csv_of_a_run_without_events_gives_the_spikes_and_refuses_the_alignment(
    quiet_run: Path, capsys
) -> None:
    code, out, _ = _cli(capsys, "spikes", quiet_run, "--csv")
    assert code == 0 and len(out.splitlines()) == 1 + 3
    code, out, err = _cli(capsys, "spikes", quiet_run, "--csv", "--alignment")
    assert (code, out) == (2, "")
    assert err == "normtrace: error: --alignment: no events were recorded, so there is nothing to align\n"


def test_the_spike_list_says_when_it_shows_only_the_strongest(quiet_run: Path, capsys) -> None:
    _, out, _ = _cli(capsys, "spikes", quiet_run, "--limit", "2")
    assert out.splitlines()[0] == "3 spikes in outputs (per pass), the 2 strongest shown"
    _, out, _ = _cli(capsys, "spikes", quiet_run, "--limit", "3")
    assert out.splitlines()[0] == "3 spikes in outputs (per pass)"


# ----------------------------------------------------------------------------------------------------------
# Shared excursions


SHARED = {"ab": [250, 650, 1050, 1450], "cd": [450, 850, 1250, 1650], "e": [550, 1350]}


def _shared_modules(seed: int) -> dict[str, np.ndarray]:
    """a and b jump together at SHARED["ab"], c and d at SHARED["cd"], e alone at SHARED["e"]."""
    modules = {}
    for i, name in enumerate("abcde"):
        norm = _noise(seed + i)
        norm[next(v for k, v in SHARED.items() if name in k)] += 5.0
        modules[name] = norm
    return modules


@pytest.fixture(scope="module")
def shared_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Runs r (two ranks) and s (one), each rank with the same two groups of two and a loner."""
    root = tmp_path_factory.mktemp("shared")
    r = write_trace(root / "r", outputs=_outputs(_shared_modules(10)), events=SYNC_EVENTS)
    write_trace(r, outputs=_outputs(_shared_modules(20)), events=SYNC_EVENTS, rank=1)
    s = write_trace(root / "s", outputs=_outputs(_shared_modules(30)), events=SYNC_EVENTS)
    return [r, s]


def test_shared_excursions_are_one_line_per_group_rank_and_run(shared_runs: list[Path], capsys) -> None:
    code, out, _ = _cli(capsys, "spikes", *shared_runs, "--permutations", "9")
    shared = [line for line in out.splitlines() if line.startswith("the same excursions")]
    doc = _spikes_json(capsys, *shared_runs, "--permutations", "9")
    groups: dict[tuple, list[str]] = {}
    for g in sorted(doc["groups"], key=lambda g: (g["run"], g["rank"], g["group"])):
        groups.setdefault((g["run"], g["rank"], g["group"]), []).append(g["module"])
    # one line per group of two or more, in the groups' numbering (run, rank, then largest first)
    assert shared == [
        f"the same excursions (one finding, not {len(m)}): {', '.join(m)}"
        for m in groups.values()
        if len(m) > 1
    ]
    # three ranks in all (r: 0 and 1; s: 0), two groups of two each; e's spikes are its own
    assert code == 0 and len(shared) == 6
    assert sorted(shared) == sorted(
        f"the same excursions (one finding, not 2): {pair}" for pair in ("a, b", "c, d") for _ in range(3)
    )


def test_the_event_window_reaches_the_spike_groups(tmp_path: Path, capsys) -> None:
    """Spikes 30 passes apart are two clusters at the default window (merge gap 25) and one at 40."""
    a = _noise(5)
    a[[500, 530, 1200, 1230]] += 5.0
    run = write_trace(tmp_path / "r", outputs=_outputs({"a": a, "b": _noise(6)}), events=SYNC_EVENTS)
    clusters = {}
    for window in ("20", "40"):
        doc = _spikes_json(capsys, run, "--permutations", "9", "--window", window)
        clusters[window] = [(g["module"], g["clusters"]) for g in doc["groups"]]
    assert clusters == {"20": [("a", 4)], "40": [("a", 2)]}


def test_shared_excursions_of_parameters_are_named_module_dot_param(tmp_path: Path, capsys) -> None:
    """Parameters at the epoch level: the jumps at epochs 60 and 63 (30 passes apart) are one cluster
    there (merge gap 5 epochs), two at the pass level (merge gap 25 passes)."""
    epochs = np.arange(300)
    jumps = [60, 63, 140, 220]
    norms = {}
    for i, param in enumerate(("bias", "weight")):
        norms[param] = _noise(40 + i, len(epochs))
        norms[param][jumps] += 5.0
    run = write_trace(
        tmp_path / "r",
        events={"epoch": [100, 200], "pass": [1009, 2009], "name": ["sync", "sync"]},  # groups need events
        params={
            "epoch": np.tile(epochs, 2).astype(np.int32),
            "pass": np.tile(epochs * 10 + 9, 2),
            "module": ["net.0"] * 600,
            "param": ["bias"] * 300 + ["weight"] * 300,
            "norm": np.concatenate([norms["bias"], norms["weight"]]),
        },
    )
    code, out, _ = _cli(capsys, "spikes", run, "--table", "params", "--level", "epoch")
    assert code == 0
    assert "the same excursions (one finding, not 2): net.0.bias, net.0.weight" in out.splitlines()
    doc = _spikes_json(capsys, run, "--table", "params", "--level", "epoch")
    assert sorted(s["epoch"] for s in doc["spikes"]) == sorted(jumps * 2)
    assert all("pass" not in s for s in doc["spikes"])  # epoch-level spikes have no pass
    assert [(g["param"], g["clusters"]) for g in doc["groups"]] == [("bias", 3), ("weight", 3)]


# ----------------------------------------------------------------------------------------------------------
# Progress and errors


@pytest.mark.parametrize(
    ("command", "label"),
    [
        (["spikes"], "spikes"),
        (["summary"], "summary"),
        (["export", "-o", "{tmp}/out.csv"], "export outputs"),
        (["export", "-o", "{tmp}/dataset", "--format", "parquet"], "export outputs"),
        (["export", "--tensorboard", "{tmp}/tb"], "export tensorboard"),
    ],
)
def test_each_command_names_its_progress(
    quiet_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, command: list[str], label: str
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setattr(progress_module, "DELAY_S", 0.0)  # a terminal's line is drawn from the start
    argv = [command[0], str(quiet_run), *(a.format(tmp=tmp_path) for a in command[1:])]
    assert main(argv) == 0
    assert screen.getvalue().lstrip("\r").startswith(f"{label}: ")


def test_an_error_message_of_several_lines_is_cut_to_its_first(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no such\nrun"
    code, out, err = _cli(capsys, "summary", missing)
    assert (code, out) == (2, "")
    assert err == f"normtrace: error: run directory not found: {tmp_path / 'no such'} …\n"
