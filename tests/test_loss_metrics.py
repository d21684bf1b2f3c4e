"""``LossMetrics``' hook on the loss function: the metrics it declares in meta.json, a loss computed in a
thread that ran no forward pass, and losses it cannot record (not a tensor, empty), each noted while
training goes on."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from recorder_models import notes, read_table
from torch import nn

import normtrace as nt


def _losses(run) -> list[tuple[int, str, float]]:
    rows = read_table(run, "metrics").to_pylist()
    return [(r["pass"], r["split"], r["value"]) for r in rows if r["name"] == "loss"]


def test_the_declared_metrics_are_listed_in_meta_json(tmp_path) -> None:
    with nt.Recorder(tmp_path, lenses=[nt.LossMetrics(metrics=("reward", "length"))]) as rec:
        rec.attach(nn.Linear(2, 2))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["metrics"] == ["reward", "length"]
    assert meta["lenses"] == [{"type": "LossMetrics", "loss_fn": None, "metrics": ["reward", "length"]}]
    assert nt.LossMetrics(loss_fn=nn.SmoothL1Loss()).config()["loss_fn"] == "SmoothL1Loss"


def test_a_loss_function_that_is_not_a_module_is_refused_naming_its_type() -> None:
    def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).pow(2).mean()

    with pytest.raises(TypeError) as info:
        nt.LossMetrics(loss_fn=mse)  # type: ignore[arg-type]
    assert str(info.value) == (
        "LossMetrics(loss_fn=...) needs an nn.Module to hook (e.g. nn.MSELoss()), got function; for a "
        "plain function call Recorder.push_loss(value)"
    )


class Shaped(nn.Module):
    """A loss returned as a tensor of the given shape: every element the same squared error."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        base = (out - target).pow(2).mean().to(torch.float64) + 1e-10  # not a float32 value
        return base.expand(self.shape) * torch.arange(
            1, 1 + base.expand(self.shape).numel(), dtype=torch.float64
        ).reshape(self.shape)


@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (2,), (3, 2)])
def test_a_loss_of_any_shape_is_one_value_per_call(tmp_path, shape: tuple[int, ...]) -> None:
    """A 0-d or one-element loss is its value (a float64 loss keeps its precision); a loss of several
    elements (``reduction="none"``) is their mean, not their sum nor the first."""
    model, loss_fn = nn.Linear(3, 1), Shaped(shape)
    with nt.Recorder(tmp_path, lenses=[nt.LossMetrics(loss_fn=loss_fn)]) as rec:
        rec.attach(model)
        out = model(torch.randn(4, 3))
        value = loss_fn(out, torch.zeros_like(out))
    n = value.numel()
    base = value.reshape(-1)[0].item()
    # one element: exactly its float64 value; several: their mean (base * 1..n), taken in float32
    want = base if n == 1 else pytest.approx(base * (n + 1) / 2, rel=1e-6)
    assert _losses(tmp_path) == [(0, "train", want)]


def test_a_loss_computed_in_a_thread_that_ran_no_pass_takes_the_last_pass_started(tmp_path) -> None:
    """A learner thread computing the loss of outputs an acting thread produced: its row carries the last
    pass any thread started (docs/recorder.md, "Threads")."""
    model, loss_fn = nn.Linear(3, 1), nn.MSELoss()
    with nt.Recorder(tmp_path, lenses=[nt.LossMetrics(loss_fn=loss_fn)]) as rec:
        rec.attach(model)
        outs = [model(torch.randn(4, 3)) for _ in range(2)]  # passes 0 and 1, in the main thread
        want = loss_fn(outs[1], torch.zeros_like(outs[1])).item()  # a row of pass 1, from this thread
        errors: list[BaseException] = []

        def learner() -> None:
            try:
                loss_fn(outs[1], torch.zeros_like(outs[1]))
            except BaseException as exc:  # noqa: BLE001 (reported below, in the test's thread)
                errors.append(exc)

        thread = threading.Thread(target=learner)
        thread.start()
        thread.join()
    assert errors == []
    assert _losses(tmp_path) == [(1, "train", pytest.approx(want)), (1, "train", pytest.approx(want))]


class Pair(nn.Module):
    """A loss function returning a (loss, count) tuple."""

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
        return (out - target).pow(2).mean(), out.numel()


class Empty(nn.Module):
    """A loss function returning an empty tensor (no sample in the batch)."""

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (out - target).pow(2).flatten()[:0]


@pytest.mark.parametrize(("loss_fn", "detail"), [(Pair(), "tuple"), (Empty(), "Tensor")])
def test_a_loss_it_cannot_record_is_noted_and_training_goes_on(tmp_path, loss_fn, detail: str) -> None:
    model = nn.Linear(3, 1)
    with nt.Recorder(tmp_path, lenses=[nt.LossMetrics(loss_fn=loss_fn)]) as rec:
        rec.attach(model)
        for _ in range(2):
            out = model(torch.randn(4, 3))
            loss_fn(out, torch.zeros_like(out))
    assert _losses(tmp_path) == []
    assert notes(tmp_path) == [("loss", "non_tensor_output", detail)]


def test_the_loss_of_a_pass_under_a_torch_func_transform_is_not_recorded(tmp_path) -> None:
    """A pass run under ``torch.func.vmap`` records nothing, its loss included, even when the loss is
    computed after the transform returned (docs/recorder.md: "`torch.func` transforms"); the next pass's
    loss is recorded again."""
    model, loss_fn = nn.Linear(3, 1), nn.MSELoss()
    with nt.Recorder(tmp_path, lenses=[nt.LossMetrics(loss_fn=loss_fn)]) as rec:
        rec.attach(model)
        out = torch.func.vmap(model)(torch.randn(5, 4, 3))  # pass 0
        loss_fn(out, torch.zeros_like(out))
        out = model(torch.randn(4, 3))  # pass 1
        want = loss_fn(out, torch.zeros_like(out)).item()
    assert _losses(tmp_path) == [(1, "train", pytest.approx(want))]
