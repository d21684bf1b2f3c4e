"""TensorBoard export, read back with TensorBoard's own event reader and compared with the shards."""

from __future__ import annotations

import math
from pathlib import Path

import normtrace_analysis as na
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from normtrace_analysis.cli import main
from optional import need
from tracegen import synthetic_dqn, write_trace

need("tensorboard")
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402


def _read(folder: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every tag in ``folder``'s event files: (step, value, wall time) in order."""
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return {
        tag: [
            (e.step, float(tensor_util.make_ndarray(e.tensor_proto)), e.wall_time) for e in acc.Tensors(tag)
        ]
        for tag in acc.Tags()["tensors"]
    }


def _shards(run: Path, table: str) -> pa.Table:
    return pa.concat_tables(ipc.open_file(str(p)).read_all() for p in sorted((run / table).glob("*.arrow")))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    s = synthetic_dqn(n_epochs=12, passes_per_epoch=50, no_grad=True, seed=3)
    n = 12
    return write_trace(
        tmp_path_factory.mktemp("tb") / "dqn",
        outputs=s.outputs,
        events=s.events,
        params={
            "epoch": np.repeat(np.arange(n, dtype=np.int32), 2),
            "pass": np.repeat(np.arange(n) * 100 + 99, 2),
            "module": ["net.0"] * (2 * n),
            "param": ["weight", "bias"] * n,
            "norm": np.linspace(1, 3, 2 * n).astype(np.float32),
        },
        metrics={
            "epoch": np.arange(n, dtype=np.int32),
            "pass": np.arange(n) * 100 + 99,
            "name": ["loss"] * n,
            "value": np.linspace(2.0, 0.5, n),
            "split": ["train"] * n,
        },
    )


def test_every_value_of_every_series_reads_back_at_its_pass(run: Path, tmp_path: Path) -> None:
    (folder,) = na.to_tensorboard(na.load(run), tmp_path / "tb", max_points=10_000)
    assert folder == tmp_path / "tb" / "dqn"
    tags = _read(folder)
    assert sorted(tags) == [
        "events/target_update",
        "metrics/loss/train",
        "outputs/net.0",
        "outputs/net.0/no_grad",
        "outputs/net.2",
        "outputs/net.2/no_grad",
        "outputs/net.4",
        "outputs/net.4/no_grad",
        "params/net.0.bias",
        "params/net.0.weight",
    ]
    outputs = _shards(run, "outputs").to_pydict()
    for module in ("net.0", "net.4"):
        for grad, tag in ((True, f"outputs/{module}"), (False, f"outputs/{module}/no_grad")):
            rows = [
                (p, v)
                for p, m, v, g in zip(
                    outputs["pass"], outputs["module"], outputs["norm"], outputs["grad_enabled"], strict=True
                )
                if m == module and g == grad
            ]
            assert [(s, v) for s, v, _ in tags[tag]] == rows  # float32 norms are exact in TensorBoard
    metrics = _shards(run, "metrics").to_pydict()
    assert [s for s, _, _ in tags["metrics/loss/train"]] == metrics["pass"]
    assert [v for _, v, _ in tags["metrics/loss/train"]] == pytest.approx(metrics["value"], rel=1e-7)
    assert [w for _, _, w in tags["metrics/loss/train"]] == metrics["time"]
    events = _shards(run, "events").to_pydict()
    assert tags["events/target_update"] == [
        (p, 1.0, t) for p, t in zip(events["pass"], events["time"], strict=True)
    ]
    weight = [v for _, v, _ in tags["params/net.0.weight"]]
    assert weight == pytest.approx(np.linspace(1, 3, 24)[::2], rel=1e-6)
    # outputs carry no time: theirs are interpolated from the other tables', so they increase with pass
    walls = [w for _, _, w in tags["outputs/net.0"]]
    assert walls == sorted(walls) and walls[0] >= 1.7e9


def test_long_series_are_binned_to_max_points_means(run: Path, tmp_path: Path) -> None:
    (folder,) = na.to_tensorboard(na.load(run, normalize=True), tmp_path / "tb", max_points=50)
    tags = _read(folder)
    assert all(len(points) <= 50 for points in tags.values())
    outputs = _shards(run, "outputs").to_pydict()
    passes = np.array(outputs["pass"])
    keep = (np.array(outputs["module"]) == "net.2") & np.array(outputs["grad_enabled"])
    rms = np.array(outputs["norm"], dtype=float)[keep] / np.sqrt(
        np.array(outputs["numel"], dtype=float)[keep]
    )
    lo, hi = passes[keep].min(), passes[keep].max()
    width = math.ceil((hi - lo + 1) / 50)
    bins = lo + (passes[keep] - lo) // width * width
    expected = [(int(b), rms[bins == b].mean()) for b in np.unique(bins)]
    got = [(s, v) for s, v, _ in tags["outputs/net.2"]]
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)


def test_epoch_level_and_the_command_line(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["export", str(run), "--tensorboard", str(tmp_path / "tb"), "--level", "epoch"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "tb" / "dqn")]
    tags = _read(tmp_path / "tb" / "dqn")
    assert [s for s, _, _ in tags["outputs/net.0"]] == list(range(12))
    walls = [w for _, _, w in tags["outputs/net.0"]]
    assert walls == sorted(walls) and len(set(walls)) > 1  # interpolated by epoch from the other tables
    assert [s for s, _, _ in tags["events/target_update"]] == [5, 10]
    # a second export into the same folder would double every series in TensorBoard: refused
    assert main(["export", str(run), "--tensorboard", str(tmp_path / "tb")]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(run), "--tensorboard", str(tmp_path / "tb"), "--force"]) == 0
    assert len(list((tmp_path / "tb" / "dqn").glob("events.out.tfevents.*"))) == 1


def test_table_picks_one_table(run: Path, tmp_path: Path) -> None:
    assert main(["export", str(run), "--tensorboard", str(tmp_path / "tb"), "--table", "params"]) == 0
    assert sorted(_read(tmp_path / "tb" / "dqn")) == ["params/net.0.bias", "params/net.0.weight"]


def test_signals_are_tagged_by_kind_module_and_param(tmp_path: Path) -> None:
    from tracegen import synthetic_signals

    s = synthetic_signals(modules=("net.0",), n_epochs=4, passes_per_epoch=25)
    run = write_trace(tmp_path / "sig", outputs=s.outputs, events=s.events, signals=s.signals)
    (folder,) = na.to_tensorboard(na.load(run), tmp_path / "tb", tables=["signals"], max_points=10_000)
    tags = _read(folder)
    assert sorted(tags) == [
        "signals/active_rate/net.0",
        "signals/dead_fraction/net.0",
        "signals/grad_norm/net.0.bias",
        "signals/grad_norm/net.0.weight",
        "signals/output_grad_norm/net.0",
        "signals/update_ratio/net.0.bias",
        "signals/update_ratio/net.0.weight",
    ]
    signals = _shards(run, "signals").to_pydict()
    rows = [
        (p, v)
        for p, k, prm, v in zip(
            signals["pass"], signals["kind"], signals["param"], signals["value"], strict=True
        )
        if k == "grad_norm" and prm == "weight"
    ]
    assert [(step, v) for step, v, _ in tags["signals/grad_norm/net.0.weight"]] == rows  # float32: exact
    walls = [w for _, _, w in tags["signals/dead_fraction/net.0"]]  # no time column: interpolated by pass
    assert walls == sorted(walls) and walls[0] >= 1.7e9


def test_the_command_line_bins_to_max_points_and_says_when_nothing_is_written(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["export", str(run), "--tensorboard", str(tmp_path / "tb"), "--max-points", "5"]) == 0
    capsys.readouterr()
    tags = _read(tmp_path / "tb" / "dqn")
    assert max(len(points) for points in tags.values()) == 5  # the longest series, binned to 5 means
    assert main(["export", str(run), "--tensorboard", str(tmp_path / "none"), "--table", "signals"]) == 2
    assert capsys.readouterr().err == "normtrace: error: nothing written: the trace has no rows to export\n"
