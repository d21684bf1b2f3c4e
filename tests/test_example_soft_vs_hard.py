"""``examples/soft_vs_hard_target.py``: two runs, the same placebo-controlled marker in both."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def example() -> Iterator[ModuleType]:
    """The example imported as a module, with examples/ on sys.path for its ``cartpole_dqn`` import."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        yield importlib.import_module("soft_vs_hard_target")
    finally:
        sys.path.remove(str(EXAMPLES))


def events(run: Path) -> list[tuple[int, str]]:
    """(epoch, name) of every event row of ``run``, sorted."""
    shards = sorted((run / "events").glob("rank0-*.arrow"))
    rows = pa.concat_tables([ipc.open_file(pa.memory_map(str(s))).read_all() for s in shards]).to_pylist()
    return sorted((r["epoch"], r["name"]) for r in rows)


def test_both_runs_carry_the_marker_and_only_hard_syncs(example: ModuleType, tmp_path: Path) -> None:
    """Hard: a target_update and a marker after episodes 0 and 2; soft: the markers alone."""
    out = tmp_path / "cmp"
    code = example.main(
        ["--episodes", "4", "--sync-every", "2", "--out-dir", str(out), "--no-progress", "--no-report"]
    )
    assert code == 0
    marker = example.MARKER
    assert events(out / "hard") == [(1, marker), (1, "target_update"), (3, marker), (3, "target_update")]
    assert events(out / "soft") == [(1, marker), (3, marker)]
    for name in ("hard", "soft"):
        meta = json.loads((out / name / "meta.json").read_text())
        assert (meta["status"], meta["epochs"]) == ("closed", 4)


def test_rejects_a_tau_outside_0_1(example: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="tau"):
        example.main(["--tau", "1.5", "--out-dir", str(tmp_path), "--no-report"])
