"""The CartPole examples: recording must not change training, and the trace must say what happened.

A few episodes of the real configuration (batch 256, so optimisation starts after 257 environment
steps) are trained twice with the same seed, once recorded and once without a recorder; every per-step
loss must be identical. The recorded trace is then checked against what ``train`` itself returned.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EPISODES = 16  # seed 42 plays ~500 steps in 16 episodes: ~250 optimisation steps
SEED = 42


@pytest.fixture(scope="module")
def examples() -> ModuleType:
    """``examples/cartpole_dqn.py`` imported as a module (examples/ is not a package)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module("cartpole_dqn")
    finally:
        sys.path.remove(str(EXAMPLES))


def read_table(run: Path, table: str) -> pa.Table:
    """All shards of ``table`` in ``run``, in shard order, read with pyarrow's IPC file reader."""
    shards = sorted((run / table).glob("rank0-*.arrow"))
    return pa.concat_tables([ipc.open_file(pa.memory_map(str(s))).read_all() for s in shards])


@pytest.fixture(scope="module")
def paired(examples: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object, Path]:
    """The same seed trained twice: (recorded result, unrecorded result, run dir)."""
    run = tmp_path_factory.mktemp("cartpole") / "run"
    recorded = examples.train(EPISODES, run, sync_every=3, seed=SEED, progress=False)
    plain = examples.train(EPISODES, None, sync_every=3, seed=SEED, progress=False)
    return recorded, plain, run


@pytest.mark.slow
def test_recorder_does_not_change_training(paired: tuple[object, object, Path]) -> None:
    """Same seed, same per-step losses (exactly) and rewards, with and without the recorder."""
    recorded, plain, _ = paired
    assert len(plain.losses) > 100, "too few optimisation steps for the comparison to mean anything"
    assert recorded.losses == plain.losses
    assert recorded.rewards == plain.rewards
    assert recorded.steps == plain.steps == sum(plain.rewards)


@pytest.mark.slow
def test_trace_holds_what_train_returned(paired: tuple[object, object, Path]) -> None:
    """Loss rows are the returned losses in order; rewards and syncs per episode are in the trace."""
    recorded, _, run = paired
    metrics = read_table(run, "metrics").to_pylist()
    losses = [r["value"] for r in sorted(metrics, key=lambda r: r["pass"]) if r["name"] == "loss"]
    assert losses == recorded.losses
    rewards = sorted((r["epoch"], r["value"]) for r in metrics if r["name"] == "total_reward")
    assert rewards == list(enumerate(recorded.rewards))
    smoothed = sorted((r["epoch"], r["value"]) for r in metrics if r["name"] == "smoothed_treward")
    assert [v for _, v in smoothed] == recorded.smoothed

    events = read_table(run, "events").to_pylist()
    assert recorded.sync_episodes == [e for e in range(EPISODES) if e % 3 == 0]
    assert sorted(r["epoch"] for r in events) == [e + 1 for e in recorded.sync_episodes]
    assert {r["name"] for r in events} == {"target_update"}
    meta = json.loads((run / "meta.json").read_text())
    assert (meta["status"], meta["epochs"]) == ("closed", EPISODES)


@pytest.mark.slow
def test_soft_updates_log_only_the_schedule_marker(
    examples: ModuleType, paired: tuple[object, object, Path], tmp_path: Path
) -> None:
    """Soft updates never call load_state_dict (no target_update); the placebo marker follows the
    hard-sync schedule; and training matches the hard run up to the first soft update, then departs."""
    run = tmp_path / "soft"
    soft = examples.train(
        EPISODES, run, sync_every=3, seed=SEED, progress=False, target="soft", schedule_event="sync_schedule"
    )
    events = read_table(run, "events").to_pylist()
    assert soft.sync_episodes == []
    assert [r["name"] for r in events] == ["sync_schedule"] * len(range(0, EPISODES, 3))
    assert [r["epoch"] for r in events] == [e + 1 for e in range(0, EPISODES, 3)]
    _, hard, _ = paired  # same seed; its syncs before the first optimisation step copy an unchanged policy
    assert soft.losses[0] == hard.losses[0]  # both targets are still the initial copy
    assert soft.losses[1] != hard.losses[1]  # the soft target has moved by tau towards the policy


def test_soft_update_is_polyak_averaging(examples: ModuleType) -> None:
    """target <- (1 - tau) target + tau policy, for every parameter."""
    import torch

    torch.manual_seed(0)
    policy, target = examples.QNetwork(4, 2), examples.QNetwork(4, 2)
    before = [p.detach().clone() for p in target.parameters()]
    examples.soft_update(target, policy, 0.25)
    for old, new, pol in zip(before, target.parameters(), policy.parameters(), strict=True):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * pol, rtol=1e-6, atol=1e-7)


def test_epsilon_schedule_is_the_seeds(examples: ModuleType) -> None:
    """1.0 at step 0, 0.05 + 0.95/e at step 1000, approaching 0.05."""
    cfg = examples.Config()
    assert examples.epsilon(0, cfg) == pytest.approx(1.0)
    assert examples.epsilon(1000, cfg) == pytest.approx(0.05 + 0.95 / np.e)
    assert examples.epsilon(100_000, cfg) == pytest.approx(0.05)


def test_cli_refuses_to_overwrite_without_the_flag(examples: ModuleType, tmp_path: Path) -> None:
    """A second run into the same directory stops with a hint; --overwrite replaces the trace."""
    run = tmp_path / "run"
    args = ["--episodes", "2", "--run-dir", str(run), "--no-progress", "--no-report"]
    assert examples.main(args) == 0
    first = json.loads((run / "meta.json").read_text())
    with pytest.raises(SystemExit, match="--overwrite"):
        examples.main(args)
    assert examples.main([*args, "--overwrite"]) == 0
    assert first["epochs"] == json.loads((run / "meta.json").read_text())["epochs"] == 2
    rewards = [r for r in read_table(run, "metrics").to_pylist() if r["name"] == "total_reward"]
    assert [r["epoch"] for r in rewards] == [0, 1]  # the first run's rows are gone, not appended to


def test_no_record_writes_nothing(
    examples: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--no-record trains without creating the run directory."""
    monkeypatch.chdir(tmp_path)
    assert examples.main(["--episodes", "2", "--no-record", "--no-progress"]) == 0
    assert not (tmp_path / "runs").exists()


def test_report_without_analysis_package_explains(
    examples: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without normtrace_analysis the run still succeeds and says how to install it and what to run."""
    monkeypatch.setitem(sys.modules, "normtrace_analysis", None)  # makes the import raise ImportError
    run = tmp_path / "run"
    assert examples.main(["--episodes", "1", "--run-dir", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "pip install -e ./analysis" in err
    assert f"normtrace report {run} --level pass -o {run / 'report.html'}" in err
    assert (run / "meta.json").exists() and not (run / "report.html").exists()


@pytest.mark.slow
def test_report_is_written_when_the_analysis_package_is_there(
    examples: ModuleType, paired: tuple[object, object, Path]
) -> None:
    """With normtrace_analysis installed, the report lands where asked and names the run and its event."""
    _, _, run = paired
    out = run / "report.html"
    assert examples.write_report([run], out) == out
    page = out.read_text(encoding="utf-8")
    assert page.lstrip().lower().startswith("<!doctype html")
    assert "target_update" in page and run.name in page


def test_torch_threads_is_scoped(examples: ModuleType) -> None:
    """The thread setting applies inside the block only; None leaves it alone."""
    import torch

    before = torch.get_num_threads()
    with examples.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with examples.torch_threads(None):
        assert torch.get_num_threads() == before


@pytest.mark.slow
def test_main_prints_the_findings(
    examples: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The main job ends with the analysis' verdict, one sentence per hooked module, not only a picture."""
    run = tmp_path / "run"
    assert examples.main(["--episodes", "16", "--run-dir", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    lines = out.split("findings (output-norm spikes after target_update, per pass):\n", 1)[1].splitlines()
    modules = sorted(line.strip().split(":", 1)[0] for line in lines if line.startswith("  "))
    assert modules == ["net.output", "net.relu1", "net.relu2", "net.relu3", "net.relu4"]
    assert (run / "report.html").is_file()


@pytest.mark.slow
def test_analysis_finds_the_seeds_jagged_norms_after_target_syncs(
    examples: ModuleType, tmp_path: Path
) -> None:
    """The seed's claim on a real (short) CartPole run: output-norm spikes cluster right after syncs.

    40 episodes with the seed's sync every 5 episodes: well above chance for the output layer and the
    deeper ReLUs, and the first ReLU (the seed saw the effect dominated by the output) has no spikes.
    """
    import normtrace_analysis as na
    import polars as pl

    run = tmp_path / "run"
    result = examples.train(40, run, sync_every=5, seed=SEED, progress=False)
    trace = na.load(run)
    aligned = trace.event_alignment("target_update", level="pass")
    rows = {r["module"]: r for r in aligned.iter_rows(named=True)}
    # A sync counts when its 20-pass window reaches the first training pass (the first syncs come before
    # the replay buffer holds a batch, when nothing is recorded).
    first = trace.outputs.select(pl.col("pass").min()).collect().item()
    syncs = trace.events.filter(pl.col("name") == "target_update").collect()["pass"]
    assert len(syncs) == len(result.sync_episodes) == 8
    assert rows["net.output"]["events"] == int((syncs >= first - 20).sum()) >= 5
    for module in ("net.output", "net.relu4", "net.relu3"):
        row = rows[module]
        assert row["spikes"] >= 5, module
        # Counted in events, against jittered syncs: most syncs are followed by a spike, far above the
        # local chance, and no jittered train of the 999 does as well or nearly so.
        assert row["events_followed"] >= 6 and row["enrichment_lo"] > 2, module
        assert row["p_value"] < 0.01, module
    assert rows["net.relu1"]["spikes"] == 0
