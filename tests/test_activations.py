"""``ActivationRate`` and its kernel on every output shape, against counts done with numpy, and its hook's
paths: passes under ``no_grad``, modules called several times a pass, outputs that are not a tensor,
recomputation in backward, a module that is not the one observed, and a failing kernel."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from recorder_models import Checkpointed, notes, read_table
from torch import nn

import normtrace as nt
import normtrace.activations
from normtrace.activations import activation_rates


def _expected(x: np.ndarray) -> tuple[float, float]:
    """active_rate and dead_fraction counted with numpy: channels are dim 1 of a batch; a 0-d or 1-d
    output is one sample whose elements are the channels."""
    batch = x.reshape(1, -1) if x.ndim < 2 else x
    channels = np.moveaxis(batch, 1, 0).reshape(batch.shape[1], -1)  # (channel, every other entry)
    return float((batch != 0).mean()), float((~channels.any(axis=1)).mean())


@pytest.fixture(params=["float mask", "bool mask"])
def mask(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both masks of non-zero entries on this CPU: float32 ones (CPU's) and bool (other devices')."""
    if request.param == "bool mask":
        monkeypatch.setattr(normtrace.activations, "FLOAT_MASK_DEVICES", frozenset())
    return str(request.param)


@pytest.mark.parametrize(
    "shape",
    [(), (7,), (1, 7), (5, 7), (4, 3, 6), (2, 4, 3, 3), (1, 1)],
    ids=lambda s: "x".join(map(str, s)) or "scalar",
)
def test_rates_of_every_shape_match_counts(shape: tuple[int, ...], mask: str) -> None:
    gen = torch.Generator().manual_seed(len(shape))
    x = torch.relu(torch.randn(shape, generator=gen))
    if len(shape) >= 2 and shape[1] > 2:
        x[:, 1] = 0.0  # a dead channel over the whole batch
        x[0, 2] = 0.0  # a channel zero for one sample only: alive
    got = activation_rates(x)
    assert got is not None and got.dtype == torch.float32
    assert got.tolist() == pytest.approx(_expected(x.numpy()), rel=1e-6)


def test_a_channel_is_dead_only_when_zero_in_every_sample() -> None:
    """(batch, features): a feature is dead when it is zero in every sample — not per element."""
    x = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])  # feature 2 dead; 0 and 1 each alive once
    assert activation_rates(x).tolist() == pytest.approx([2 / 6, 1 / 3])
    y = torch.tensor([[[0.0, 3.0], [0.0, 0.0]]])  # (1, 2 channels, 2 positions): channel 1 dead
    assert activation_rates(y).tolist() == pytest.approx([1 / 4, 1 / 2])


def test_empty_outputs_have_no_rates_and_a_single_value_has_them() -> None:
    assert activation_rates(torch.zeros(0, 4)) is None and activation_rates(torch.zeros(3, 0)) is None
    assert activation_rates(torch.tensor(0.0)).tolist() == [0.0, 1.0]
    assert activation_rates(torch.tensor([5.0])).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_nan_and_negative_entries_count_as_active_in_every_dtype(dtype: torch.dtype, mask: str) -> None:
    """Non-zero means ``!= 0``: a negative or NaN entry is active, so a channel holding one is alive
    (a kernel counting ``x > 0``, or ones that NaN turns into NaN, would say otherwise)."""
    x = torch.tensor([[0.0, -2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    if dtype.is_floating_point:
        x[2, 2] = float("nan")
    x = x.to(dtype)
    expected = (3 / 12, 1 / 4) if dtype.is_floating_point else (2 / 12, 2 / 4)
    assert activation_rates(x).tolist() == pytest.approx(expected, rel=1e-6)


def test_counts_past_what_half_precision_holds_stay_exact(mask: str) -> None:
    """3,001 of 4,096 entries of one channel non-zero in float16: counted in float32, not in the
    input's precision (float16 holds integers exactly only up to 2,048)."""
    x = torch.zeros(4096, 2, dtype=torch.float16)
    x[:3001, 0] = 1.0
    assert activation_rates(x).tolist() == pytest.approx([3001 / 8192, 1 / 2], rel=1e-7)


def _signals(run) -> list[tuple[int, str, str, float]]:
    return sorted(
        (r["pass"], r["module"], r["kind"], r["value"]) for r in read_table(run, "signals").to_pylist()
    )


@pytest.mark.parametrize("skip", [True, False])
def test_no_grad_passes_are_recorded_only_when_asked(tmp_path, skip: bool) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with nt.Recorder(tmp_path, lenses=[nt.ActivationRate(skip_no_grad_pass=skip)]) as rec:
        rec.attach(model)
        model(torch.randn(2, 3))  # pass 0, grad on
        with torch.no_grad():
            model(torch.randn(2, 3))  # pass 1
    passes = {p for p, *_ in _signals(tmp_path)}
    assert passes == ({0} if skip else {0, 1})


class ThreeCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.lin(self.act(self.lin(self.act(x)))))


def test_each_call_of_a_module_in_a_pass_gets_its_own_label(tmp_path) -> None:
    model = ThreeCalls()
    xs = [torch.randn(4, 3) for _ in range(2)]
    with nt.Recorder(tmp_path, lenses=[nt.ActivationRate()]) as rec:
        rec.attach(model)
        for x in xs:
            model(x)
    rows = [(p, m, v) for p, m, kind, v in _signals(tmp_path) if kind == "active_rate"]
    assert sorted((p, m) for p, m, _ in rows) == [(p, m) for p in (0, 1) for m in ("act", "act#1", "act#2")]
    first = (xs[1] > 0).float().mean().item()  # the first call of pass 1 sees the input itself
    assert next(v for p, m, v in rows if (p, m) == (1, "act")) == pytest.approx(first)


class Act(nn.ReLU):
    """An activation whose output is a tuple (selected by its class)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return torch.relu(x), torch.relu(-x)


def test_outputs_that_are_not_one_tensor_are_skipped_without_a_note(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(3, 3), Act())
    with nt.Recorder(tmp_path, lenses=[nt.ActivationRate()]) as rec:
        rec.attach(model)
        model(torch.randn(2, 3))
    assert _signals(tmp_path) == []  # no row (read_table gives an empty table when no shard was written)
    assert [n for n in notes(tmp_path) if n[1] == "hook_error"] == []


def test_a_recomputation_in_backward_records_nothing(tmp_path) -> None:
    """Checkpointing runs the module's forward again during backward: that is not a pass."""
    root = Checkpointed()
    with nt.Recorder(tmp_path, lenses=[nt.ActivationRate()]) as rec:
        rec.attach(root)
        for _ in range(2):
            root(torch.randn(4, 3)).sum().backward()
    rows = _signals(tmp_path)
    assert sorted((p, m, k) for p, m, k, _ in rows) == [
        (p, "model.1.1", k) for p in (0, 1) for k in ("active_rate", "dead_fraction")
    ]


def test_another_instance_of_an_observed_class_is_not_recorded(tmp_path) -> None:
    """``copy.copy`` and ``deepcopy`` give the plain class back; an instance made another way (as
    ``nn.DataParallel``'s replicas are, without being one) keeps the observed class, and its calls are not
    the observed module's."""
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with nt.Recorder(tmp_path, lenses=[nt.ActivationRate()]) as rec:
        rec.attach(model)
        assert type(copy.copy(model[1])) is nn.ReLU
        stray = object.__new__(type(model[1]))
        stray.__dict__.update(model[1].__dict__)
        for _ in range(2):
            model(torch.randn(2, 3))  # passes 0 and 1
            stray(torch.randn(2, 3))
    assert {(p, m) for p, m, *_ in _signals(tmp_path)} == {(0, "1"), (1, "1")}


def test_a_failing_kernel_is_a_note_naming_the_module_and_training_goes_on(tmp_path, monkeypatch) -> None:
    def fail(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(normtrace.activations, "activation_rates", fail)
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with nt.Recorder(tmp_path, lenses=[nt.ActivationRate()]) as rec:
        rec.attach(model)
        out = [model(torch.randn(2, 3)) for _ in range(3)]
    assert len(out) == 3
    assert notes(tmp_path) == [("1", "hook_error", "ActivationRate: RuntimeError: kernel failed")]


def test_a_model_without_activations_is_warned_about_by_name(tmp_path) -> None:
    with pytest.warns(UserWarning, match=r"ActivationRate selects no module of Linear") as caught:
        nt.Recorder(tmp_path, lenses=[nt.ActivationRate()]).attach(nn.Linear(2, 2)).close()
    assert len(caught) == 1
    assert [n[1] for n in notes(tmp_path)] == ["no_activation_modules"]


def test_a_pass_under_a_torch_func_transform_records_nothing(tmp_path) -> None:
    """Under ``torch.func.vmap`` the outputs are batched tensors: the pass is counted, nothing recorded."""
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with nt.Recorder(tmp_path, lenses=[nt.ActivationRate()]) as rec:
        rec.attach(model)
        torch.func.vmap(model)(torch.randn(5, 2, 3))  # pass 0
        model(torch.randn(2, 3))  # pass 1
    assert {p for p, *_ in _signals(tmp_path)} == {1}
    assert [n[1] for n in notes(tmp_path)] == ["torch_func_transform"]


def test_a_child_called_outside_the_roots_forward_is_recorded_under_a_pass_of_its_own(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    x = torch.tensor([[1.0, -1.0, 0.0]])
    with nt.Recorder(tmp_path, lenses=[nt.ActivationRate()]) as rec:
        rec.attach(model)
        model(torch.randn(2, 3))  # pass 0
        with pytest.warns(UserWarning, match="ran outside Sequential.forward"):
            model[1](x)  # pass 1, counted at the child
    rows = [(p, m, k, v) for p, m, k, v in _signals(tmp_path) if p == 1]
    assert rows == [
        (1, "1", "active_rate", pytest.approx(1 / 3)),
        (1, "1", "dead_fraction", pytest.approx(2 / 3)),
    ]
