"""A deepcopy of a model whose modules fell back to PyTorch hooks records nothing (issue 17, item 3).

Where a module's ``forward`` is set on the instance (accelerate's ``dispatch_model`` does this), normtrace
cannot observe it through its class and registers an ordinary forward (pre-)hook instead. ``copy.deepcopy``
copies a module's hook dicts, so the copy carries the very hooks of the original: only their identity
guards (the hooked module is the one the hook was made for) keep the copy's calls out of the trace."""

from __future__ import annotations

import copy
import functools

import torch
from recorder_models import read_table
from torch import nn

import normtrace as nt


def _dispatched(module: nn.Module) -> nn.Module:
    """Set ``forward`` on the instance as accelerate's ``add_hook_to_module`` does (the old forward kept as
    a bound method on the instance, which a deepcopy rebinds to the copy): normtrace falls back to hooks."""
    module._old_forward = module.forward

    def new_forward(mod: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        return mod._old_forward(*args)

    module.forward = functools.partial(new_forward, module)
    return module


def _model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.Tanh())
    for m in model.modules():  # the root too: its pass hook becomes a forward pre-hook
        _dispatched(m)
    return model


def test_a_deepcopy_of_a_hook_fallback_model_is_not_recorded(tmp_path):
    model, loss_fn, target = _model(), _dispatched(nn.MSELoss()), _model()
    x = torch.randn(5, 4)
    lenses = [nt.OutputNorm(), nt.ParameterNorm(), nt.LossMetrics(loss_fn=loss_fn)]
    with nt.Recorder(tmp_path, lenses=lenses) as rec:
        rec.attach(model).track_target(target)
        # the fallback is in place: PyTorch hooks on the root, the activations and the loss
        assert model._forward_pre_hooks and model[1]._forward_hooks and loss_fn._forward_hooks
        loss_fn(model(x), torch.zeros(5, 2))  # pass 0, one loss
        clone, loss_clone, target_clone = copy.deepcopy((model, loss_fn, target))
        assert clone[1]._forward_hooks  # the copy carries the original's hooks
        for _ in range(3):
            loss_clone(clone(x), torch.zeros(5, 2))
        target_clone.load_state_dict(clone.state_dict())
        assert rec.passes == 1
        target.load_state_dict(model.state_dict())  # the one real sync, after pass 0
    outputs = read_table(tmp_path, "outputs").to_pylist()
    assert sorted((r["module"], r["pass"]) for r in outputs) == [("1", 0), ("3", 0)]
    metrics = read_table(tmp_path, "metrics").to_pylist()
    assert [(m["name"], m["pass"]) for m in metrics] == [("loss", 0)]
    assert read_table(tmp_path, "events").column("name").to_pylist() == ["target_update"]
