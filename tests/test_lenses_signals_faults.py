"""The parameter lenses when something goes wrong: a failing kernel is a note and training goes on;
sparse gradients without an optimizer; selections the optimizer does not hold; the messages' words."""

from __future__ import annotations

import json

import pytest
import torch
from recorder_models import notes, read_table
from torch import nn

import normtrace as nt
import normtrace.flat


def train(model: nn.Module, opt: torch.optim.Optimizer | None, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        if opt is not None:
            opt.zero_grad()
        loss = model(torch.ones(4, 3)).pow(2).mean()
        loss.backward()
        if opt is not None:
            opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "lens, broken, module, detail",
    [
        (nt.GradientNorm(cosine=True), "norms", "(root)", "GradientNorm: RuntimeError: kernel failed"),
        (nt.UpdateRatio(), "norms", "(root)", "UpdateRatio: RuntimeError: kernel failed"),
        (nt.UpdateRatio(), "flatten", "(root)", "UpdateRatio: RuntimeError: kernel failed"),
    ],
)
def test_a_failing_kernel_in_a_step_hook_is_a_note_and_training_goes_on(
    tmp_path, monkeypatch, lens, broken, module, detail
):
    def fail(*args, **kwargs):
        raise RuntimeError("kernel failed")

    target = normtrace.flat.Flat if broken == "norms" else normtrace.flat.Layout
    monkeypatch.setattr(target, broken, fail)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nt.Recorder(tmp_path, lenses=[lens]) as rec:
        rec.attach(model, optimizer=opt)
        losses = train(model, opt, 3)
    assert losses[-1] < losses[0]  # the steps ran
    assert notes(tmp_path) == [(module, "hook_error", detail)]  # once, however many steps failed
    assert json.loads((tmp_path / "meta.json").read_text())["steps"] == 3


def test_a_failing_kernel_after_a_backward_names_the_parameters_module(tmp_path, monkeypatch):
    """Without an optimizer the lens measures per parameter after each backward: the note names the
    parameter's module."""

    def fail(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(normtrace.flat.Flat, "norms", fail)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1, bias=False))
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(cosine=True, include=["1"])]) as rec:
        rec.attach(model)
        train(model, None, 2)
    assert notes(tmp_path) == [("1", "hook_error", "GradientNorm: RuntimeError: kernel failed")]


def test_sparse_gradients_without_an_optimizer_are_noted_once_and_the_rest_recorded(tmp_path):
    model = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Linear(3, 1))
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(cosine=True)]) as rec:
        rec.attach(model)
        for _ in range(3):
            model(torch.tensor([1, 2, 3])).sum().backward()
    rows = read_table(tmp_path, "signals").to_pylist()
    assert {(r["module"], r["param"]) for r in rows} == {("1", "weight"), ("1", "bias")}
    assert sum(r["kind"] == "grad_norm" for r in rows) == 6
    assert [(m, k) for m, k, _ in notes(tmp_path)] == [("0", "sparse_grad")]


def test_update_ratio_of_parameters_the_optimizer_does_not_hold_warns_naming_the_lens(tmp_path):
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)  # the second layer is not optimised
    with (
        pytest.warns(UserWarning, match=r"^UpdateRatio selects no trainable parameter of Sequential"),
        nt.Recorder(tmp_path, lenses=[nt.UpdateRatio(include=["1"])]) as rec,
    ):
        rec.attach(model, optimizer=opt)
        train(model, opt, 1)
    assert read_table(tmp_path, "signals").num_rows == 0


def test_update_ratio_without_an_optimizer_says_how_to_give_one(tmp_path):
    with nt.Recorder(tmp_path, lenses=[nt.UpdateRatio()]) as rec, pytest.raises(ValueError) as info:
        rec.attach(nn.Linear(2, 2))
    assert str(info.value) == (
        "UpdateRatio measures optimizer updates: pass the optimizer to Recorder.attach(model, optimizer=opt)"
    )
    assert info.value.__notes__ == ["normtrace: UpdateRatio.attach failed; nothing is attached"]
