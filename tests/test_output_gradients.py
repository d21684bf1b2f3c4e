"""``OutputGradientNorm``'s hook paths, against gradients captured with plain torch: a module called several
times a pass, backwards that come after later passes, outputs that carry no gradient, a child called
outside the root's forward, recomputation in backward, another instance of the observed class, failures
of the kernel or of ``register_hook``, and a model it selects nothing in."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from recorder_models import Checkpointed, notes, read_table
from torch import nn

import normtrace as nt
import normtrace.gradients


def _rows(run) -> list[tuple[int, str, float]]:
    """(pass, module, value) of every ``output_grad_norm`` row, sorted."""
    rows = read_table(run, "signals").to_pylist()
    assert {r["kind"] for r in rows} <= {"output_grad_norm"} and {r["param"] for r in rows} <= {None}
    return sorted((r["pass"], r["module"], r["value"]) for r in rows)


def _mean_norm(grad: torch.Tensor) -> float:
    return torch.linalg.vector_norm(grad.flatten(1), dim=1).mean().item()


class ThreeCalls(nn.Module):
    """One ReLU called three times a pass."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(self.act(self.lin(self.act(x)))))


def test_each_call_in_a_pass_gets_its_own_label_and_the_gradient_of_its_own_output(tmp_path) -> None:
    torch.manual_seed(0)
    model = ThreeCalls()
    twin = copy.deepcopy(model)
    xs = [torch.randn(4, 3, requires_grad=True) for _ in range(2)]
    want: dict[tuple[int, str], float] = {}
    for p, x in enumerate(xs):  # the same computation in plain torch, each call's output retained
        x = x.detach().requires_grad_()
        outs = []
        h = x
        for k in range(3):
            h = torch.relu(h if k == 0 else twin.lin(h))
            h.retain_grad()
            outs.append(h)
        h.pow(2).sum().backward()
        for k, o in enumerate(outs):
            want[(p, "act" if k == 0 else f"act#{k}")] = _mean_norm(o.grad)
    with nt.Recorder(tmp_path, lenses=[nt.OutputGradientNorm()]) as rec:
        rec.attach(model)
        for x in xs:
            model(x).pow(2).sum().backward()
    rows = _rows(tmp_path)
    assert [(p, m) for p, m, _ in rows] == sorted(want)
    assert {(p, m): v for p, m, v in rows} == pytest.approx(want, rel=1e-6)


def test_a_backward_after_later_passes_carries_the_pass_of_its_forward(tmp_path) -> None:
    """Two forwards, then one backward through both: each row has the pass its output came from."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    xs = [torch.randn(4, 3), 3 * torch.randn(4, 3)]
    outs = []
    with nt.Recorder(tmp_path, lenses=[nt.OutputGradientNorm()]) as rec:
        rec.attach(model)
        for x in xs:
            outs.append(model(x))
            outs[-1].retain_grad()
        (outs[0].pow(2).sum() + outs[1].pow(3).sum()).backward()
    assert _rows(tmp_path) == [
        (p, "1", pytest.approx(_mean_norm(o.grad), rel=1e-6)) for p, o in enumerate(outs)
    ]


class Pair(nn.ReLU):
    """An activation whose output is a tuple (selected by its class)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return torch.relu(x), torch.relu(-x)


def test_outputs_without_a_gradient_are_skipped_without_a_note(tmp_path) -> None:
    """A tuple output, an output that does not require grad (an activation of an input without grad),
    and a pass under no_grad: no row, no note, and training goes on."""
    with nt.Recorder(tmp_path, lenses=[nt.OutputGradientNorm(include=[nn.Identity])]) as rec:
        pair = nn.Sequential(nn.Linear(3, 3), Pair(), nn.Identity())
        rec.attach(pair)
        out = pair(torch.randn(2, 3))
        assert isinstance(out, tuple)
    with nt.Recorder(tmp_path / "b", lenses=[nt.OutputGradientNorm()]) as rec:
        model = nn.Sequential(nn.ReLU(), nn.Linear(3, 3), nn.ReLU())
        rec.attach(model)
        model(torch.randn(2, 3)).sum().backward()  # pass 0: the first ReLU's output needs no gradient
        with torch.no_grad():
            model(torch.randn(2, 3))  # pass 1
        with torch.enable_grad():
            inner = torch.randn(2, 3, requires_grad=True)
            with torch.no_grad():
                model[2](inner)  # grad off: nothing
    assert _rows(tmp_path) == []
    assert [(p, m) for p, m, _ in _rows(tmp_path / "b")] == [(0, "2")]
    for run in (tmp_path, tmp_path / "b"):
        assert [n for n in notes(run) if n[1] == "hook_error"] == []


def test_a_child_called_outside_the_roots_forward_is_recorded_under_a_pass_of_its_own(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with nt.Recorder(tmp_path, lenses=[nt.OutputGradientNorm()]) as rec:
        rec.attach(model)
        model(torch.randn(2, 3)).sum().backward()  # pass 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "ran outside Sequential.forward": tested in test_recorder
            x = torch.randn(2, 3, requires_grad=True)
            out = model[1](x)  # pass 1, counted at the child
        out.retain_grad()
        out.pow(2).sum().backward()
    rows = _rows(tmp_path)
    assert [(p, m) for p, m, _ in rows] == [(0, "1"), (1, "1")]
    assert rows[1][2] == pytest.approx(_mean_norm(out.grad), rel=1e-6)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_recomputation_in_backward_records_nothing_more(tmp_path, reentrant: bool) -> None:
    """Checkpointing runs the block's forward again during backward: still one row per pass. With
    ``use_reentrant=True`` the block's forward runs under no_grad (its output has no gradient) and only
    the recomputation, inside backward, has one: nothing is recorded (docs/recorder.md, "Activation
    checkpointing")."""
    root = Checkpointed(reentrant)
    with nt.Recorder(tmp_path, lenses=[nt.OutputGradientNorm()]) as rec:
        rec.attach(root)
        for _ in range(2):
            root(torch.randn(4, 3)).pow(2).sum().backward()
        assert root.model[0].weight.grad is not None
    want = [] if reentrant else [(0, "model.1.1"), (1, "model.1.1")]
    assert [(p, m) for p, m, _ in _rows(tmp_path)] == want


def test_another_instance_of_an_observed_class_is_not_recorded(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with nt.Recorder(tmp_path, lenses=[nt.OutputGradientNorm()]) as rec:
        rec.attach(model)
        stray = object.__new__(type(model[1]))
        stray.__dict__.update(model[1].__dict__)
        for _ in range(2):
            model(torch.randn(2, 3)).sum().backward()  # passes 0 and 1
            stray(torch.randn(2, 3, requires_grad=True)).sum().backward()
    assert [(p, m) for p, m, _ in _rows(tmp_path)] == [(0, "1"), (1, "1")]


def test_a_failing_kernel_is_a_note_naming_the_module_and_training_goes_on(tmp_path, monkeypatch) -> None:
    def fail(x: torch.Tensor, batch_dim: int | None = 0) -> torch.Tensor:
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(normtrace.gradients, "sample_norms", fail)
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with nt.Recorder(tmp_path, lenses=[nt.OutputGradientNorm()]) as rec:
        rec.attach(model)
        for _ in range(3):
            model(torch.randn(2, 3)).sum().backward()
        assert model[0].weight.grad is not None
    assert notes(tmp_path) == [("1", "hook_error", "OutputGradientNorm: RuntimeError: kernel failed")]


def test_a_failing_register_hook_is_a_note_naming_the_module(tmp_path, monkeypatch) -> None:
    def refuse(self: torch.Tensor, hook) -> None:
        raise RuntimeError("no hooks here")

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with nt.Recorder(tmp_path, lenses=[nt.OutputGradientNorm()]) as rec:
        rec.attach(model)
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "register_hook", refuse)
            out = model(torch.randn(2, 3))
        out.sum().backward()
    assert notes(tmp_path) == [("1", "hook_error", "OutputGradientNorm: RuntimeError: no hooks here")]
    assert _rows(tmp_path) == []


def test_a_model_it_selects_nothing_in_is_warned_about_by_name(tmp_path) -> None:
    with pytest.warns(UserWarning, match=r"^OutputGradientNorm selects no module of Linear") as caught:
        nt.Recorder(tmp_path, lenses=[nt.OutputGradientNorm()]).attach(nn.Linear(2, 2)).close()
    assert len(caught) == 1  # and meta.json keeps the same words, under the root
    assert notes(tmp_path) == [("(root)", "no_output_grad_modules", str(caught[0].message))]


def test_a_parameter_lens_selecting_nothing_is_noted_by_kind(tmp_path) -> None:
    model = nn.Linear(2, 2)
    with pytest.warns(UserWarning, match=r"GradientNorm selects no trainable parameter of Linear"):
        nt.Recorder(tmp_path, lenses=[nt.GradientNorm(parameters=["scale"])]).attach(model).close()
    assert [n[:2] for n in notes(tmp_path)] == [("(root)", "no_signal_params")]
