"""The PPO example on Acrobot: recording must not change training, and the trace must hold what happened.

A few short iterations (rollouts of 96 steps, minibatches of 32, two epochs) are trained twice with the
same seed, once recorded and once not; every minibatch loss must be identical. The trace's row and event
counts are then checked against the loop's own arithmetic, and the report is written.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

ITERATIONS, ROLLOUT, MINIBATCH, EPOCHS = 3, 96, 32, 2
OBSERVED = ["actor.act1", "actor.act2", "actor.out", "critic.act1", "critic.act2", "critic.out"]


def read_table(run: Path, table: str) -> pl.DataFrame:
    """All shards of ``table`` in ``run``, read with pyarrow's IPC file reader."""
    shards = sorted((run / table).glob("rank0-*.arrow"))
    return pl.from_arrow(pa.concat_tables([ipc.open_file(pa.memory_map(str(s))).read_all() for s in shards]))


@pytest.fixture(scope="module")
def ppo() -> ModuleType:
    """``examples/acrobot_ppo.py`` (examples/ is on pytest's pythonpath)."""
    return importlib.import_module("acrobot_ppo")


@pytest.fixture(scope="module")
def paired(ppo: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object, Path]:
    """The same seed trained twice: (recorded result, unrecorded result, run dir)."""
    cfg = ppo.Config(rollout=ROLLOUT, minibatch=MINIBATCH, epochs=EPOCHS)
    run = tmp_path_factory.mktemp("acrobot") / "run"
    recorded = ppo.train(ITERATIONS, run, seed=3, config=cfg, progress=False)
    plain = ppo.train(ITERATIONS, None, seed=3, config=cfg, progress=False)
    return recorded, plain, run


def test_recording_does_not_change_ppo_training(paired: tuple[object, object, Path]) -> None:
    recorded, plain, _ = paired
    assert len(plain.losses) == ITERATIONS * EPOCHS * ROLLOUT // MINIBATCH
    assert recorded.losses == plain.losses
    assert recorded.returns == plain.returns


def test_trace_counts_every_pass_event_and_episode(paired: tuple[object, object, Path]) -> None:
    recorded, _, run = paired
    outputs = read_table(run, "outputs")
    per_module = outputs.group_by("module", "grad_enabled").len()
    updates = ITERATIONS * EPOCHS * ROLLOUT // MINIBATCH  # minibatch passes, with grad
    for module in OBSERVED:
        rows = dict(per_module.filter(pl.col("module") == module).select("grad_enabled", "len").iter_rows())
        assert rows[True] == updates, module
        # acting passes (batch 1, no grad), plus one bootstrap value pass per rollout cut mid-episode
        assert ITERATIONS * ROLLOUT <= rows[False] <= ITERATIONS * (ROLLOUT + 1), module
    events = read_table(run, "events")
    counts = dict(events.group_by("name").len().iter_rows())
    assert counts == {"policy_update": ITERATIONS, "ppo_epoch": ITERATIONS * EPOCHS}
    metrics = read_table(run, "metrics")
    returns = metrics.filter(pl.col("name") == "episode_return")["value"].to_list()
    assert returns == recorded.returns
    assert metrics.filter(pl.col("name") == "loss").height == updates
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "closed" and meta["epochs"] == ITERATIONS


def test_report_of_the_ppo_run_speaks_of_its_events(
    ppo: ModuleType, paired: tuple[object, object, Path]
) -> None:
    _, _, run = paired
    out = ppo.write_report(run, run / "report.html")
    html = out.read_text()
    assert "policy_update" in html and "ppo_epoch" in html
