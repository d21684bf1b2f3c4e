"""The recorder's lenses against norms computed directly with torch."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import warnings
from typing import NamedTuple

import numpy as np
import polars as pl
import pytest
import torch
from recorder_models import (
    SEED_OUTPUT_MODULES,
    QNetwork,
    approx_output_norms,
    expected_output_norms,
    norms_by_module,
    read_table,
)
from torch import nn

import normtrace as nt
from normtrace import schema
from normtrace.recorder import TRANSFORM_NOTE

PLAIN_CLASSES = [type(m) for m in QNetwork().modules()]
"""The seed network's module classes as written, none of normtrace's observing subclasses among them."""


def seed_lenses(loss_fn: nn.Module | None = None) -> list:
    return [
        nt.LossMetrics(loss_fn=loss_fn, metrics=["total_reward", "smoothed_treward"]),
        nt.OutputNorm(include=[nn.Identity], normalize_by_size=True),
        nt.ParameterNorm(normalize_by_size=True),
    ]


def test_output_norms_are_batch_means_of_per_sample_norms(tmp_path):
    torch.manual_seed(0)
    model = QNetwork()
    batches = [torch.randn(32, 4), torch.randn(7, 4), torch.randn(1, 4)]
    with nt.Recorder(tmp_path, lenses=seed_lenses()) as rec:
        rec.attach(model)
        for x in batches:
            model(x)
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert [r["pass"] for r in rows] == [p for p in range(3) for _ in SEED_OUTPUT_MODULES]
    for p, x in enumerate(batches):
        want = expected_output_norms(model, x)
        got = {r["module"]: r for r in rows if r["pass"] == p}
        assert list(got) == SEED_OUTPUT_MODULES
        for name, value in want.items():
            assert got[name]["norm"] == pytest.approx(value, rel=1e-5)
            assert got[name]["batch"] == x.shape[0]
            assert got[name]["numel"] == (2 if name == "net.output" else 128)
            assert got[name]["grad_enabled"] and got[name]["training"]


def test_no_grad_passes_are_skipped_but_counted(tmp_path):
    model = QNetwork()
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm()]) as rec:
        rec.attach(model)
        model(torch.randn(4, 4))
        with torch.no_grad():
            model(torch.randn(4, 4))
        model.eval()
        model(torch.randn(4, 4))
        assert rec.passes == 3
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert sorted({r["pass"] for r in rows}) == [0, 2]
    assert {r["training"] for r in rows if r["pass"] == 2} == {False}


def test_no_grad_passes_recorded_when_asked(tmp_path):
    model = QNetwork()
    x = torch.randn(5, 4)
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(skip_no_grad_pass=False)]) as rec:
        rec.attach(model)
        with torch.no_grad():
            model(x)
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert {r["grad_enabled"] for r in rows} == {False}
    want = approx_output_norms(model, x)
    assert norms_by_module(rows) == {k: v for k, v in want.items() if k != "net.output"}


class SharedActivation(nn.Module):
    """One ReLU instance used after each of three layers, as much model code does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc3(self.act(self.fc2(self.act(self.fc1(x))))))


def test_a_module_called_several_times_in_a_pass_gets_a_row_per_call(tmp_path):
    """One series per call site: ``act`` for the first call of a pass, ``act#1``, ``act#2`` for the next
    ones, so a shared activation never zigzags between layers within one series."""
    model = SharedActivation()
    xs = [torch.randn(5, 4), torch.randn(2, 4)]
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm()]) as rec:
        rec.attach(model)
        for x in xs:
            model(x)
    rows = read_table(tmp_path, "outputs").to_pylist()
    got = [(r["pass"], r["module"], r["norm"], r["numel"]) for r in rows]
    want = []
    for p, x in enumerate(xs):
        with torch.no_grad():
            h1 = torch.relu(model.fc1(x))
            h2 = torch.relu(model.fc2(h1))
            h3 = torch.relu(model.fc3(h2))
        for label, h in (("act", h1), ("act#1", h2), ("act#2", h3)):
            want.append(
                (
                    p,
                    label,
                    pytest.approx(torch.linalg.vector_norm(h, dim=1).mean().item(), rel=1e-5),
                    h.shape[1],
                )
            )
    assert got == want


class Odd(nn.Module):
    """Returns every shape the output hook must cope with."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor):
        if self.kind == "tuple":
            return x * 2, {"a": x + 1, "b": "not a tensor"}
        if self.kind == "scalar":
            return x.sum()
        if self.kind == "vector":
            return x.flatten()
        if self.kind == "image":
            return x.reshape(x.shape[0], 2, 2)
        if self.kind == "int":
            return (x > 0).long()
        if self.kind == "bf16":
            return (x * 1000).to(torch.bfloat16)
        if self.kind == "empty":
            return x[:0]
        return None


class OddNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.kinds = ["tuple", "scalar", "vector", "image", "int", "bf16", "empty", "none"]
        self.layers = nn.ModuleDict({k: Odd(k) for k in self.kinds})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            layer(x)
        return x


def test_structured_and_odd_outputs_never_break_training(tmp_path):
    x = torch.randn(3, 4)
    model = OddNet()
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[Odd])]) as rec:
        rec.attach(model)
        model(x)
    got = {r["module"]: r for r in read_table(tmp_path, "outputs").to_pylist()}

    def per_sample_mean(t: torch.Tensor) -> float:
        return torch.linalg.vector_norm(t.double().flatten(1), dim=1).mean().item()

    assert got["layers.tuple.0"]["norm"] == pytest.approx(per_sample_mean(x * 2), rel=1e-5)
    assert got["layers.tuple.1.a"]["norm"] == pytest.approx(per_sample_mean(x + 1), rel=1e-5)
    # 0-d and 1-d outputs are one sample
    assert got["layers.scalar"]["batch"] == 1
    assert got["layers.scalar"]["norm"] == pytest.approx(abs(x.sum().item()), rel=1e-5)
    assert got["layers.vector"]["batch"] == 1 and got["layers.vector"]["numel"] == 12
    assert got["layers.vector"]["norm"] == pytest.approx(torch.linalg.vector_norm(x).item(), rel=1e-5)
    # >2-d outputs are flattened from dim 1
    assert got["layers.image"]["numel"] == 4
    assert got["layers.image"]["norm"] == pytest.approx(per_sample_mean(x), rel=1e-5)
    assert got["layers.int"]["norm"] == pytest.approx(per_sample_mean((x > 0).double()), rel=1e-5)
    # bfloat16 is accumulated in float32: no overflow, error within bfloat16 rounding
    assert got["layers.bf16"]["norm"] == pytest.approx(
        per_sample_mean((x * 1000).to(torch.bfloat16)), rel=1e-3
    )
    assert "layers.empty" not in got and "layers.none" not in got
    notes = {tuple(n.values()) for n in json.loads((tmp_path / "meta.json").read_text())["notes"]}
    # the detail names what the output was instead of a tensor
    assert notes == {
        ("layers.tuple.1.b", "non_tensor_output", "str"),
        ("layers.none", "non_tensor_output", "NoneType"),
    }


class Pair(NamedTuple):
    hidden: torch.Tensor
    cell: torch.Tensor


@dataclasses.dataclass
class Encoded:
    last: torch.Tensor
    states: tuple[torch.Tensor, ...]
    mask: torch.Tensor | None = None


class Structured(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> object:
        if self.kind == "pair":
            return Pair(x * 2, x * 3)
        return Encoded(last=x + 1, states=(x, Pair(x * 4, x * 5)))


class BothStructured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.enc = Structured("pair"), Structured("dataclass")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rnn(x)
        self.enc(x)
        return x


def test_named_tuple_and_dataclass_outputs_are_recorded_per_field(tmp_path):
    """Issue 15: a NamedTuple was recorded by index (``enc.0``), a dataclass dropped with a note."""
    x = torch.randn(3, 4)
    model = BothStructured()
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[Structured])]) as rec:
        rec.attach(model)
        model(x)
    got = {r["module"]: r["norm"] for r in read_table(tmp_path, "outputs").to_pylist()}

    def per_sample_mean(t: torch.Tensor) -> float:
        return torch.linalg.vector_norm(t.double(), dim=1).mean().item()

    expected = {
        "rnn.hidden": x * 2,
        "rnn.cell": x * 3,
        "enc.last": x + 1,
        "enc.states.0": x,
        "enc.states.1.hidden": x * 4,
        "enc.states.1.cell": x * 5,
    }
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name] == pytest.approx(per_sample_mean(tensor), rel=1e-5), name
    notes = json.loads((tmp_path / "meta.json").read_text()).get("notes", [])
    assert [(n["module"], n["kind"]) for n in notes] == [("enc.mask", "non_tensor_output")]


def test_a_failing_norm_leaves_grad_mode_on_and_training_unbroken(tmp_path, monkeypatch):
    """The fast path switches grad mode off around the norm kernel; an error there must restore it."""
    import normtrace.lenses

    def broken(*args, **kwargs):
        raise RuntimeError("norm kernel failed")

    model = QNetwork()
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm()]) as rec:
        rec.attach(model)
        monkeypatch.setattr(normtrace.lenses, "vector_norm", broken)
        out = model(torch.randn(8, 4))
        assert torch.is_grad_enabled() and out.requires_grad
        out.sum().backward()  # the graph is intact
        assert model.net.lin1.weight.grad is not None
    notes = json.loads((tmp_path / schema.meta_name(0)).read_text())["notes"]
    assert {(n["kind"], n["detail"]) for n in notes} == {("hook_error", "RuntimeError: norm kernel failed")}


def test_include_exclude_by_class_and_name():
    model = QNetwork()
    named = list(model.named_modules())
    default = [n for n, m in named if nt.OutputNorm().selects(n, m)]
    assert default == ["net.relu1", "net.relu2", "net.relu3", "net.relu4"]
    lens = nt.OutputNorm(include=[nn.Identity, "net.lin1"], exclude=["net.relu[23]"])
    assert [n for n, m in named if lens.selects(n, m)] == ["net.lin1", "net.relu1", "net.relu4", "net.output"]
    with pytest.raises(TypeError, match="include"):
        nt.OutputNorm(include=[42])


def test_parameter_norms_at_ticks_and_collect(tmp_path):
    torch.manual_seed(1)
    model = QNetwork()
    model.net.lin2.bias = None  # a module without every listed parameter is not tracked
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    snapshots = []
    with nt.Recorder(tmp_path, lenses=[nt.ParameterNorm()]) as rec:
        rec.attach(model)
        for _ in range(3):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            rec.collect()
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
            rec.tick_epoch()
            snapshots.append(snapshots[-1])
    rows = read_table(tmp_path, "params").to_pylist()
    modules = sorted({r["module"] for r in rows})
    assert modules == ["net.lin1", "net.lin3", "net.lin4", "net.lin_out"]
    assert len(rows) == 6 * len(modules) * 2
    for i, snapshot in enumerate(snapshots):
        chunk = rows[i * 8 : (i + 1) * 8]
        assert {r["epoch"] for r in chunk} == {i // 2}
        for r in chunk:
            tensor = snapshot[f"{r['module']}.{r['param']}"]
            assert r["norm"] == pytest.approx(torch.linalg.vector_norm(tensor).item(), rel=1e-5)
            assert r["numel"] == tensor.numel()


def test_foreach_norm_groups_dtypes():
    from normtrace.lenses import parameter_norms

    params = [
        ("a", "weight", torch.randn(3, 3)),
        ("b", "weight", torch.randn(5, dtype=torch.float64)),
        ("c", "weight", (torch.randn(4) * 300).to(torch.float16)),
        ("d", "weight", torch.arange(6)),
    ]
    keys, parts = parameter_norms(params)
    norms = torch.cat(parts)
    by_key = {k[0]: v.item() for k, v in zip(keys, norms, strict=True)}
    for name, _, tensor in params:
        want = torch.linalg.vector_norm(tensor.double()).item()
        assert by_key[name] == pytest.approx(want, rel=1e-3)


def test_losses_metrics_and_events(tmp_path):
    model, target = QNetwork(), QNetwork()
    loss_fn = nn.MSELoss()
    losses = []
    with nt.Recorder(tmp_path, lenses=seed_lenses(loss_fn)) as rec:
        rec.attach(model)
        rec.track_target(target)
        for epoch in range(4):
            y = model(torch.randn(6, 4))
            losses.append(("train", loss_fn(y, torch.zeros_like(y)).item()))
            with torch.no_grad():
                losses.append(("val", loss_fn(y, torch.ones_like(y)).item()))
            rec.push_metric("total_reward", 10.0 * epoch)
            rec.push_metric("not_declared", torch.tensor(epoch + 0.5))
            rec.push_metric("numpy_value", np.float32(2.5), split="val")
            rec.tick_epoch()
            if epoch % 2 == 0:
                target.load_state_dict(model.state_dict())
        rec.event("lr_drop")
        rec.push_loss(3.25, train=False)
    metrics = read_table(tmp_path, "metrics").to_pylist()
    loss_rows = [(r["split"], r["value"]) for r in metrics if r["name"] == "loss"]
    assert loss_rows == [(s, pytest.approx(v, rel=1e-6)) for s, v in losses] + [("val", 3.25)]
    assert [r["value"] for r in metrics if r["name"] == "total_reward"] == [0.0, 10.0, 20.0, 30.0]
    assert [r["split"] for r in metrics if r["name"] == "total_reward"] == [None] * 4
    assert [r["value"] for r in metrics if r["name"] == "not_declared"] == [0.5, 1.5, 2.5, 3.5]
    assert {r["split"] for r in metrics if r["name"] == "numpy_value"} == {"val"}
    events = read_table(tmp_path, "events").to_pylist()
    assert [(e["name"], e["epoch"], e["pass"]) for e in events] == [
        ("target_update", 1, 0),
        ("target_update", 3, 2),
        ("lr_drop", 4, 3),
    ]


def test_bad_metric_values_name_the_metric(tmp_path):
    with nt.Recorder(tmp_path) as rec:
        with pytest.raises(TypeError, match="'reward'"):
            rec.push_metric("reward", "high")
        with pytest.raises(ValueError, match="'q'.*shape"):
            rec.push_metric("q", torch.ones(3))
        with pytest.raises(ValueError, match="push_metric"):
            rec.push_metric("", 1.0)
        rec.push_metric("ok", 1.0)
    assert read_table(tmp_path, "metrics").column("name").to_pylist() == ["ok"]
    with pytest.raises(TypeError, match="plain function"):
        nt.LossMetrics(loss_fn=torch.nn.functional.mse_loss)


def test_detach_and_close_remove_every_hook(tmp_path):
    """Outputs, the pass counter and the loss are observed through per-module subclasses (normtrace/
    observe.py), the target through a load_state_dict hook; detach() must undo all of it."""
    model, target, loss_fn = QNetwork(), QNetwork(), nn.MSELoss()
    modules = [*model.modules(), *target.modules(), loss_fn]
    classes = [type(m) for m in modules]
    rec = nt.Recorder(tmp_path, lenses=seed_lenses(loss_fn))
    rec.attach(model)
    rec.track_target(target)

    def observer_count() -> int:
        count = sum(type(m) is not cls for m, cls in zip(modules, classes, strict=True))
        for module in modules:
            count += len(module._forward_hooks) + len(module._forward_pre_hooks)
            count += len(module._load_state_dict_post_hooks)
        return count

    assert observer_count() == 5 + 1 + 1 + 1  # outputs, root pass counter, loss, target
    assert repr(model) == repr(QNetwork())  # the subclasses keep their classes' names
    rec.detach()
    assert observer_count() == 0
    rec.attach(model)
    assert observer_count() == 5 + 1 + 1
    rec.close()
    assert observer_count() == 0
    assert [type(m) for m in modules] == classes
    with pytest.raises(nt.NormtraceError, match="closed"):
        rec.push_metric("late", 1.0)


def test_a_deepcopy_of_an_attached_model_works_and_records_nothing(tmp_path):
    """``copy.deepcopy`` mid-run (a DQN target copied from the policy, ``AveragedModel``, an EMA teacher)
    must give a working, plain model (the original classes, not normtrace's observing subclasses), and
    nothing it does may land in the trace."""
    model, loss_fn, target = QNetwork(), nn.MSELoss(), QNetwork()
    x = torch.randn(3, 4)
    with nt.Recorder(tmp_path, lenses=seed_lenses(loss_fn)) as rec:
        rec.attach(model).track_target(target)
        model(x)
        clone, loss_clone, target_clone = copy.deepcopy((model, loss_fn, target))
        averaged = torch.optim.swa_utils.AveragedModel(model)  # deep-copies the model inside
        averaged.update_parameters(model)
        loss_clone(clone(x).sum(1), torch.zeros(3)).backward()
        averaged(x)
        target_clone.load_state_dict(model.state_dict())
        assert rec.passes == 1
        assert [type(m) for m in clone.modules()] == PLAIN_CLASSES
        assert type(loss_clone) is nn.MSELoss
        loss_fn(model(x).sum(1), torch.zeros(3))
        target.load_state_dict(model.state_dict())
    outputs = read_table(tmp_path, "outputs").to_pylist()
    assert [r["pass"] for r in outputs] == [0] * 5 + [1] * 5
    assert norms_by_module(outputs, 1) == approx_output_norms(model, x)
    assert read_table(tmp_path, "metrics").column("pass").to_pylist() == [1]  # the one loss_fn call
    assert read_table(tmp_path, "events").column("pass").to_pylist() == [1]  # the one real sync


def test_an_attached_model_saves_and_loads_as_a_plain_model(tmp_path):
    """torch.save(model) mid-run (a checkpoint) pickles the original classes: the file loads without
    normtrace, into a model that computes what the attached one does, and the recording goes on."""
    model, loss_fn = QNetwork(), nn.MSELoss()
    x = torch.randn(3, 4)
    with nt.Recorder(tmp_path / "run", lenses=seed_lenses(loss_fn)) as rec:
        rec.attach(model)
        model(x)
        torch.save({"model": model, "loss": loss_fn}, tmp_path / "ckpt.pt")
        loaded = torch.load(tmp_path / "ckpt.pt", weights_only=False)
        assert [type(m) for m in loaded["model"].modules()] == PLAIN_CLASSES
        assert type(loaded["loss"]) is nn.MSELoss
        assert torch.equal(loaded["model"](x), model(x))
        assert rec.passes == 2  # the loaded model's pass is not the attached one's
    assert read_table(tmp_path / "run", "outputs").column("pass").to_pylist() == [0] * 5 + [1] * 5


def test_a_module_whose_forward_is_replaced_on_the_instance_is_still_recorded(tmp_path):
    """Libraries such as accelerate set ``module.forward`` on the instance, which hides the class's
    forward that normtrace observes through; such a module gets a forward hook instead."""
    model = QNetwork()
    output = model.net.output
    inner = output.forward

    def dispatched(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:  # accelerate's new_forward
        return inner(*args)

    output.forward = functools.partial(dispatched, output)
    x = torch.randn(3, 4)
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])]) as rec:
        rec.attach(model)
        assert len(output._forward_hooks) == 1 and type(output) is nn.Identity
        model(x)
    assert len(output._forward_hooks) == 0
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert norms_by_module(rows) == approx_output_norms(model, x)


class LossOf(nn.Module):
    """A module computing ``loss_fn(model(x).sum(1), 0)``: exporting it traces the loss call too."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model(x).sum(1), torch.zeros(x.shape[0]))


def test_exporting_an_attached_model_records_nothing_and_keeps_the_trace(tmp_path):
    """torch.export runs forward on fake tensors; they used to land in the buffer, and the writer then
    failed the whole flush (`.numpy() is not supported for tensor subclasses`) at close()."""
    model, loss_fn = QNetwork(), nn.MSELoss()
    xs = [torch.randn(3, 4), torch.randn(5, 4)]
    with nt.Recorder(tmp_path, lenses=seed_lenses(loss_fn)) as rec:
        rec.attach(model)
        loss_fn(model(xs[0]).sum(1), torch.zeros(3))
        exported = torch.export.export(model, (xs[0],))
        torch.export.export(LossOf(model, loss_fn), (xs[0],))  # a graph that calls the loss too
        assert rec.passes == 1
        loss_fn(model(xs[1]).sum(1), torch.zeros(5))
    assert torch.allclose(exported.module()(xs[0]), model(xs[0]))
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert [r["pass"] for r in rows] == [0] * 5 + [1] * 5
    for p, x in enumerate(xs):
        assert norms_by_module(rows, p) == approx_output_norms(model, x)
    assert read_table(tmp_path, "metrics").column("pass").to_pylist() == [0, 1]


def test_fx_tracing_an_attached_model_works(tmp_path):
    """torch.fx (torchvision's feature extractors, quantization) reads forward's signature: the observing
    subclass keeps the original's, and the traced module computes what the model does."""
    model = QNetwork()
    x = torch.randn(3, 4)
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])]) as rec:
        rec.attach(model)
        traced = torch.fx.symbolic_trace(model)
        assert torch.equal(traced(x), model(x))
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert norms_by_module(rows, rec.passes - 1) == approx_output_norms(model, x)


def test_a_forward_replaced_after_another_recorder_attached_gets_a_hook(tmp_path):
    """The instance forward is checked before an existing observing subclass is reused: a forward set on
    the instance after the first attach() hides the subclass's, so the second recorder must hook."""
    model = QNetwork()
    first = nt.Recorder(tmp_path / "a", lenses=[nt.OutputNorm(include=[nn.Identity])]).attach(model)
    output = model.net.output
    output.forward = functools.partial(nn.Identity.forward, output)  # bypasses the subclass's forward
    x = torch.randn(3, 4)
    with nt.Recorder(tmp_path / "b", lenses=[nt.OutputNorm(include=[nn.Identity])]) as second:
        second.attach(model)
        model(x)
    first.close()
    rows = read_table(tmp_path / "b", "outputs").to_pylist()
    assert norms_by_module(rows) == approx_output_norms(model, x)


class Sealed(nn.Identity):
    """A class that refuses subclasses, as some frameworks' registries do."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        raise RuntimeError("Sealed cannot be subclassed")


def test_a_module_whose_class_refuses_subclasses_is_still_recorded(tmp_path):
    model = QNetwork()
    model.net.output = Sealed()
    x = torch.randn(3, 4)
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])]) as rec:
        rec.attach(model)
        assert type(model.net.output) is Sealed and len(model.net.output._forward_hooks) == 1
        model(x)
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert norms_by_module(rows) == approx_output_norms(model, x)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_torchscript_model_is_refused_by_name(tmp_path):
    with nt.Recorder(tmp_path) as rec, pytest.raises(TypeError, match="TorchScript.*eager model"):
        rec.attach(torch.jit.script(QNetwork()))


def test_two_recorders_on_one_model_record_independently(tmp_path):
    """Each recorder observes the model on its own; closing one leaves the other recording, and the
    model gets its own classes back when the last one goes."""
    model = QNetwork()
    xs = [torch.randn(3, 4), torch.randn(5, 4)]
    first = nt.Recorder(tmp_path / "a", lenses=[nt.OutputNorm(include=[nn.Identity])]).attach(model)
    second = nt.Recorder(tmp_path / "b", lenses=[nt.OutputNorm(include=[nn.Identity])]).attach(model)
    model(xs[0])
    first.close()
    model(xs[1])
    assert [type(m) for m in model.modules()] != PLAIN_CLASSES
    second.close()
    assert [type(m) for m in model.modules()] == PLAIN_CLASSES
    for run, passes in (("a", [0]), ("b", [0, 1])):
        rows = read_table(tmp_path / run, "outputs").to_pylist()
        assert sorted({r["pass"] for r in rows}) == passes
        for p in passes:
            assert norms_by_module(rows, p) == approx_output_norms(model, xs[p])


def test_data_parallel_replicas_are_recorded_as_their_original(tmp_path):
    """nn.DataParallel runs shallow replicas that share the original's hooks: unlike a deepcopy they are
    the attached model, on another device (replicated by hand here, as DataParallel does, on the CPU)."""
    model = QNetwork()
    x = torch.randn(3, 4)
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])]) as rec:
        rec.attach(model)

        def replicate(module: nn.Module) -> nn.Module:
            replica = module._replicate_for_data_parallel()
            replica._parameters = dict(module._parameters)  # DataParallel broadcasts them to a device
            replica._modules = {k: replicate(child) for k, child in module._modules.items()}
            return replica

        replicate(model)(x)
        assert rec.passes == 1
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert norms_by_module(rows) == approx_output_norms(model, x)


class FunctionalRelu(nn.Module):
    """Activations as function calls: nothing for OutputNorm's default selection to hook."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 8, bias=False), nn.Linear(8, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.relu(self.l1(x)))


def test_a_lens_that_selects_nothing_says_so(tmp_path):
    """An OutputNorm or ParameterNorm that finds no module would leave its table silently empty."""
    model = FunctionalRelu()
    with (
        pytest.warns(UserWarning) as caught,
        nt.Recorder(tmp_path, lenses=[nt.OutputNorm(), nt.ParameterNorm()]) as rec,
    ):
        rec.attach(model)
        model(torch.randn(2, 4))
    messages = [str(w.message) for w in caught]
    assert any("OutputNorm" in m and "FunctionalRelu" in m and "include=" in m for m in messages), messages
    assert any("ParameterNorm" in m and "'bias'" in m and "parameters=" in m for m in messages), messages
    notes = {n["kind"] for n in json.loads((tmp_path / schema.meta_name(0)).read_text())["notes"]}
    assert {"no_output_modules", "no_param_modules"} <= notes
    # and a lens that does select something stays quiet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nt.Recorder(
            tmp_path / "ok",
            lenses=[nt.OutputNorm(include=[nn.Linear]), nt.ParameterNorm(parameters=["weight"])],
        ).attach(model).close()


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")  # the pass hook's clock, once
def test_a_compiled_model_is_recorded_under_its_own_names(tmp_path):
    """attach(torch.compile(model)) hooks the model inside the wrapper: the same module names (no
    ``_orig_mod.`` prefix) and root as an eager run, so the two traces compare side by side."""
    model = QNetwork()
    compiled = torch.compile(model, backend="eager")  # dynamo without a C++ toolchain: fast and portable
    xs = [torch.randn(3, 4) for _ in range(3)]
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])]) as rec:
        rec.attach(compiled)
        for x in xs:
            compiled(x)
        with torch.no_grad():
            compiled(xs[0])
        assert rec.passes == 4
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert json.loads((tmp_path / schema.meta_name(0)).read_text())["root"] == "QNetwork"
    for p, x in enumerate(xs):
        assert norms_by_module(rows, p) == approx_output_norms(model, x)
    assert sorted({r["pass"] for r in rows}) == [0, 1, 2]


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")
def test_a_ddp_wrapped_model_is_recorded_under_its_own_names(tmp_path):
    """attach(DistributedDataParallel(model)) hooks the model inside: names without ``module.``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = QNetwork()
        wrapped = nn.parallel.DistributedDataParallel(torch.compile(model, backend="eager"))
        x = torch.randn(3, 4)
        with nt.Recorder(tmp_path / "run", lenses=[nt.OutputNorm(include=[nn.Identity])]) as rec:
            rec.attach(wrapped)
            wrapped(x)
            assert rec.passes == 1
    finally:
        dist.destroy_process_group()
    rows = read_table(tmp_path / "run", "outputs").to_pylist()
    assert norms_by_module(rows) == approx_output_norms(model, x)
    assert json.loads((tmp_path / "run" / schema.meta_name(0)).read_text())["root"] == "QNetwork"


def test_flush_every_n_passes_hands_exact_blocks_to_the_writer(tmp_path):
    model = QNetwork()
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm()], flush_every=10, flush_secs=3600) as rec:
        rec.attach(model)
        for _ in range(35):
            model(torch.randn(2, 4))
        rec._writer.wait()
        shards = sorted((tmp_path / "outputs").glob("*.arrow"))
        assert [s.name for s in shards] == [schema.shard_name(0, i) for i in (1, 2, 3)]
        passes = read_table(tmp_path, "outputs").column("pass").to_pylist()
        assert sorted(set(passes)) == list(range(30))
    assert sorted(set(read_table(tmp_path, "outputs").column("pass").to_pylist())) == list(range(35))


def test_shards_match_the_schema_and_scan_with_polars(tmp_path):
    model, loss_fn = QNetwork(), nn.MSELoss()
    lenses = [*seed_lenses(loss_fn), nt.ActivationRate()]
    with nt.Recorder(tmp_path, lenses=lenses, flush_every=3) as rec:
        rec.attach(model)
        rec.track_target(QNetwork())
        for _ in range(2):
            for _ in range(7):
                y = model(torch.randn(4, 4))
                loss_fn(y, y.detach() + 1)
            rec.push_metric("total_reward", 1.0)
            rec.event("marker")
            rec.tick_epoch()
    for table, expected in schema.TABLES.items():
        files = sorted((tmp_path / table).glob("*.arrow"))
        assert files, table
        for f in files:
            assert pa_schema(f).equals(expected), f
        frame = pl.scan_ipc(str(tmp_path / table / "*.arrow")).collect()
        assert frame.columns == expected.names
    outputs = pl.scan_ipc(str(tmp_path / "outputs" / "*.arrow")).collect()
    assert outputs.height == 14 * 5
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["schema_version"] == schema.SCHEMA_VERSION
    assert meta["status"] == "closed" and meta["epochs"] == 2 and meta["passes"] == 14
    assert meta["normalize"] == {"outputs": True, "params": True}
    assert [m["name"] for m in meta["modules"]["outputs"]] == SEED_OUTPUT_MODULES


def pa_schema(path):
    import pyarrow as pa

    return pa.ipc.open_file(path).schema


def test_existing_trace_is_not_overwritten_by_accident(tmp_path):
    with nt.Recorder(tmp_path) as rec:
        rec.push_metric("x", 1.0)
    with pytest.raises(nt.RunDirError, match=str(tmp_path)):
        nt.Recorder(tmp_path)
    assert read_table(tmp_path, "metrics").num_rows == 1
    with nt.Recorder(tmp_path, overwrite=True) as rec:
        rec.push_metric("y", 2.0)
    assert read_table(tmp_path, "metrics").column("name").to_pylist() == ["y"]
    (tmp_path / "file").write_text("")
    with pytest.raises(nt.RunDirError, match="not a directory"):
        nt.Recorder(tmp_path / "file")


def test_overwriting_a_run_dir_an_open_recorder_writes_to_closes_that_recorder(tmp_path):
    """Re-running a notebook cell with overwrite=True: the old recorder, still open and attached, must
    stop (its hooks off the model, its writer done) before the new one takes the directory, or both
    would write shards of the same names into it."""
    model = QNetwork()
    x = torch.randn(2, 4)
    old = nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])], flush_every=1).attach(model)
    for _ in range(3):
        model(x)
    new = nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])], overwrite=True)
    with pytest.raises(nt.NormtraceError, match="closed"):
        old.push_metric("late", 1.0)
    assert [type(m) for m in model.modules()] == PLAIN_CLASSES
    new.attach(model)
    for _ in range(2):
        model(x)
    new.close()
    outputs = read_table(tmp_path, "outputs")
    assert outputs.num_rows == 2 * 5
    assert sorted(set(outputs.column("pass").to_pylist())) == [0, 1]
    assert json.loads((tmp_path / schema.meta_name(0)).read_text())["status"] == "closed"


def test_an_open_recorders_run_dir_is_refused_without_overwrite(tmp_path):
    with nt.Recorder(tmp_path), pytest.raises(nt.RunDirError, match="open Recorder"):
        nt.Recorder(tmp_path)


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="flush_every"):
        nt.Recorder(tmp_path, flush_every=0)
    with pytest.raises(TypeError, match="lenses"):
        nt.Recorder(tmp_path, lenses=["OutputNorm"])
    with pytest.raises(ValueError, match="more than one OutputNorm"):
        nt.Recorder(tmp_path, lenses=[nt.OutputNorm(), nt.OutputNorm()])
    with nt.Recorder(tmp_path) as rec:
        with pytest.raises(TypeError, match="attach"):
            rec.attach("model")
        rec.attach(QNetwork())
        with pytest.raises(nt.NormtraceError, match="already attached"):
            rec.attach(QNetwork())


def test_writer_failure_surfaces_with_the_path_and_loses_nothing(tmp_path):
    model = QNetwork()
    (tmp_path / "outputs").write_text("a file where the outputs folder should be")
    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm()], epoch_flush_secs=0)
    rec.attach(model)
    for _ in range(3):
        model(torch.randn(2, 4))
    rec.tick_epoch()
    rec._writer.wait()
    with pytest.raises(nt.WriterError, match=r"outputs.rank0-000001\.arrow") as info:
        rec.push_metric("after", 1.0)
    assert info.value.path.parent == tmp_path / "outputs"
    (tmp_path / "outputs").unlink()  # the user fixes the disk; the kept rows are retried
    for _ in range(2):
        model(torch.randn(2, 4))
    rec.close()
    passes = read_table(tmp_path, "outputs").column("pass").to_pylist()
    assert sorted(set(passes)) == list(range(5))
    # the call that reported the error recorded its own value first
    assert read_table(tmp_path, "metrics").column("name").to_pylist() == ["after"]


@pytest.mark.parametrize("call", ["push_metric", "event", "tick_epoch"])
def test_the_call_that_reports_a_writer_error_still_does_its_work(tmp_path, call):
    """push_metric, event and tick_epoch used to raise a pending writer error before doing anything: the
    value was dropped, and tick_epoch neither advanced the epoch nor took the parameter norms."""
    model = QNetwork()
    (tmp_path / "outputs").write_text("a file where the outputs folder should be")
    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm(), nt.ParameterNorm()], epoch_flush_secs=3600)
    rec.attach(model)
    model(torch.randn(2, 4))
    with pytest.raises(nt.WriterError):
        rec.flush()  # the outputs shard fails; the error is raised here, by the call that waited for it
    model(torch.randn(2, 4))
    rec._flush()
    rec._writer.wait()  # a second failure is pending now
    with pytest.raises(nt.WriterError, match="outputs"):
        {
            "push_metric": lambda: rec.push_metric("m", 2.5),
            "event": lambda: rec.event("e"),
            "tick_epoch": rec.tick_epoch,
        }[call]()
    (tmp_path / "outputs").unlink()
    rec.close()
    assert sorted(set(read_table(tmp_path, "outputs").column("pass").to_pylist())) == [0, 1]
    if call == "push_metric":
        assert read_table(tmp_path, "metrics").to_pylist()[0] | {"time": 0} == {
            "epoch": 0,
            "pass": 1,
            "name": "m",
            "value": 2.5,
            "split": None,
            "rank": 0,
            "time": 0,
        }
    elif call == "event":
        assert [(e["name"], e["pass"]) for e in read_table(tmp_path, "events").to_pylist()] == [("e", 1)]
    else:
        assert rec.epoch == 1
        params = read_table(tmp_path, "params").to_pylist()
        assert len(params) == 10 and {r["epoch"] for r in params} == {0}
        for r in params:
            tensor = model.get_submodule(r["module"]).get_parameter(r["param"])
            assert r["norm"] == pytest.approx(torch.linalg.vector_norm(tensor).item(), rel=1e-6)
        meta = json.loads((tmp_path / "meta.json").read_text())
        assert meta["epochs"] == 1


def test_nan_and_inf_outputs_are_recorded_not_dropped(tmp_path):
    model = nn.Sequential(nn.ReLU())
    x = torch.tensor([[1.0, float("nan")], [float("inf"), 1.0], [3.0, 4.0]])
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm()]) as rec:
        rec.attach(model)
        model(x)
        model(x[2:])
    norms = read_table(tmp_path, "outputs").column("norm").to_pylist()
    assert math.isnan(norms[0]) and norms[1] == pytest.approx(5.0)


def test_default_run_dir_and_close_returns_it(tmp_path, monkeypatch):
    """Like SummaryWriter: no run_dir means runs/<date>-<time>_<host> under the working directory."""
    import re
    import socket

    monkeypatch.chdir(tmp_path)
    rec = nt.Recorder(lenses=[nt.OutputNorm()])
    assert rec.run_dir.parent == type(rec.run_dir)("runs")
    assert re.fullmatch(rf"\d{{8}}-\d{{6}}_{re.escape(socket.gethostname())}", rec.run_dir.name)
    rec.push_metric("m", 1.0)
    assert rec.close() == rec.run_dir
    assert rec.close() == rec.run_dir  # idempotent
    assert read_table(tmp_path / rec.run_dir, "metrics").num_rows == 1


def test_mixed_output_shapes_stay_aligned_across_compactions(tmp_path):
    """Fast-path (2-d) and general-path (3-d, 1-d, tuple) records interleave over many compactions."""
    model = OddNet()
    xs = [torch.randn(2 + i % 5, 4) for i in range(40)]  # 40 passes x 7 records: several compactions
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[Odd])], flush_every=10_000) as rec:
        rec.attach(model)
        for x in xs:
            model(x)
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert len(rows) == 40 * 7
    for r in rows:
        x = xs[r["pass"]]
        t = {
            "layers.tuple.0": x * 2,
            "layers.tuple.1.a": x + 1,
            "layers.scalar": x.sum().reshape(1, 1),
            "layers.vector": x.reshape(1, -1),
            "layers.image": x,
            "layers.int": (x > 0).double(),
            "layers.bf16": (x * 1000).to(torch.bfloat16).double(),
        }[r["module"]]
        want = torch.linalg.vector_norm(t.double().flatten(1), dim=1).mean().item()
        assert r["norm"] == pytest.approx(want, rel=1e-3 if r["module"] == "layers.bf16" else 1e-5)
        assert r["batch"] == t.shape[0]


def test_compacted_chunks_of_both_kinds_line_up_with_their_records():
    """Runs of equal batches reduce to one batch mean per record; a chunk mixing batch sizes stays per
    sample. ``batch_means`` must give every record its own mean, whichever kinds a flush holds."""
    from normtrace.buffer import batch_means, compact

    torch.manual_seed(1)
    sizes = [16] * 64 + [3, 16, 5] * 20 + [16] * 64 + [1]
    norms = [torch.linalg.vector_norm(torch.randn(n, 6), dim=1) for n in sizes]
    chunks = compact(norms[:64]) + compact(norms[64:124]) + compact(norms[124:188]) + compact(norms[188:])
    assert (
        [(values.numel(), count, reduced) for values, count, reduced in chunks]
        == [
            (64, 64, True),  # one number per record, not 16
            (sum(sizes[64:124]), 60, False),
            (64, 64, True),
            (1, 1, True),
        ]
    )
    got = batch_means(chunks, np.asarray(sizes))
    want = [n.double().mean().item() for n in norms]
    assert got.tolist() == pytest.approx(want, rel=1e-6)


def test_values_the_host_cannot_read_become_nan_and_spare_the_rest():
    """A tensor subclass without local values (a DTensor shard, a fake tensor) in a flush used to fail
    the whole flush, every retry too; now its values are NaN, with a warning, and the others are kept."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from normtrace.buffer import compact, host_concat

    with FakeTensorMode():
        fake = torch.empty(3)
    real = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    # the message names the error (torch raises a RuntimeError for .numpy() of a tensor subclass)
    want = r"^normtrace: 3 recorded value\(s\) held in a FakeTensor cannot be read on the host \(RuntimeError: .+\); they are stored as NaN$"
    with pytest.warns(RuntimeWarning, match=want):
        got = host_concat([real[0], fake, real[1]])
    assert np.array_equal(got, [1.0, 2.0, np.nan, np.nan, np.nan, 3.0], equal_nan=True)
    chunks = compact([torch.ones(3), fake])  # compaction, in the training loop, must not raise either
    assert [count for _, count, _ in chunks] == [1, 1]
    # an unreadable device group (meta tensors hold no values) spares the groups after it
    with pytest.warns(RuntimeWarning, match="held in a Tensor cannot be read on the host"):
        got = host_concat([torch.empty(2, device="meta"), real[0]])
    assert np.array_equal(got, [np.nan, np.nan, 1.0, 2.0], equal_nan=True)


@pytest.mark.parametrize("epoch_flush_secs", [0.0, 3600.0])
def test_tick_epoch_flushes_unless_the_last_flush_is_recent(tmp_path, epoch_flush_secs):
    model = QNetwork()
    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm()], flush_secs=3600, epoch_flush_secs=epoch_flush_secs)
    rec.attach(model)
    for _ in range(3):
        model(torch.randn(2, 4))
        rec.tick_epoch()
    rec._writer.wait()
    shards = len(list((tmp_path / "outputs").glob("*.arrow")))
    assert shards == (3 if epoch_flush_secs == 0 else 0)
    rec.close()
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert [(r["pass"], r["epoch"]) for r in rows[::4]] == [(0, 0), (1, 1), (2, 2)]


def test_a_table_that_fails_to_convert_costs_only_that_table(tmp_path, monkeypatch):
    """A conversion error (a bug, an unreadable value) in one table used to drop the whole flush, every
    table's rows; now the other tables are written and the error names the table that failed."""
    import normtrace.buffer

    def broken(records, rank):
        raise ValueError("cannot lay out params")

    monkeypatch.setitem(normtrace.buffer.CONVERTERS, "params", broken)
    model = QNetwork()
    x = torch.randn(3, 4)
    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity]), nt.ParameterNorm()])
    rec.attach(model)
    model(x)
    rec.push_metric("reward", 1.5)
    rec.event("sync")
    rec.collect()
    with pytest.raises(nt.WriterError, match=r"params.*ValueError: cannot lay out params"):
        rec.close()
    assert norms_by_module(read_table(tmp_path, "outputs").to_pylist()) == approx_output_norms(model, x)
    assert read_table(tmp_path, "metrics").column("value").to_pylist() == [1.5]
    assert read_table(tmp_path, "events").column("name").to_pylist() == ["sync"]
    assert not (tmp_path / "params").exists()


@pytest.mark.parametrize("table", ["outputs", "signals"])
def test_rows_of_a_table_that_fails_to_convert_no_longer_count_as_queued(tmp_path, monkeypatch, table):
    """Back-pressure counts the rows handed to the writer until they are written; a table that fails to
    convert is dropped, so its rows must stop counting too, or training would wait for rows never written."""
    import normtrace.buffer

    def broken(records, rank):
        raise ValueError("cannot convert")

    monkeypatch.setitem(normtrace.buffer.CONVERTERS, table, broken)
    model = QNetwork()
    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity]), nt.ActivationRate()])
    rec.attach(model)
    for _ in range(3):
        model(torch.randn(4, 4))
    with pytest.raises(nt.WriterError, match=rf"{table}.*ValueError: cannot convert"):
        rec.flush()  # hands the rows over, waits for the writer, reports the failure
    assert rec._writer.queued_rows == 0
    rec.close()


def test_a_pass_under_vmap_or_grad_transforms_is_counted_and_records_nothing(tmp_path):
    """vmap over an attached model used to store NaN rows (its outputs are batched tensors the writer
    cannot read), which the analysis then called spikes; per-sample gradients (vmap(grad(...)) over
    functional_call) ran the loss hook on wrapped tensors too."""
    model, loss_fn = QNetwork(), nn.MSELoss()
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_of(p, xi, yi):
        return loss_fn(torch.func.functional_call(model, p, (xi[None],)), yi[None])

    with nt.Recorder(tmp_path, lenses=[nt.LossMetrics(loss_fn), nt.OutputNorm(include=[nn.Identity])]) as rec:
        rec.attach(model)
        loss_fn(model(x), y)
        torch.vmap(model)(x)
        torch.vmap(torch.func.grad(loss_of), in_dims=(None, 0, 0))(params, x, y)
        loss_fn(model(x), y)
        assert rec.passes == 4
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert [r["pass"] for r in rows] == [0] * 5 + [3] * 5
    for p in (0, 3):
        assert norms_by_module(rows, p) == approx_output_norms(model, x)
    want_loss = pytest.approx(loss_fn(model(x), y).item(), rel=1e-6)
    assert [(r["pass"], r["value"]) for r in read_table(tmp_path, "metrics").to_pylist()] == [
        (0, want_loss),
        (3, want_loss),
    ]
    notes = json.loads((tmp_path / "meta.json").read_text())["notes"]
    assert {"module": "(root)", "kind": "torch_func_transform", "detail": TRANSFORM_NOTE} in notes
    assert "torch.func transforms" in TRANSFORM_NOTE


def test_an_infinite_norm_is_noted_with_its_cause(tmp_path):
    """Norms of float32 outputs are accumulated in float32 (float64 would copy every output: +80% per
    norm kernel, measured): elements beyond ~1.8e19 overflow the sum of squares. Such a row is stored as
    inf, as is an output holding inf, and the run says which modules and why, in a warning and a note."""
    model = nn.Sequential(nn.ReLU())
    with (
        pytest.warns(RuntimeWarning, match=r"module '0'.*inf.*1\.8e19"),
        nt.Recorder(tmp_path, lenses=[nt.OutputNorm()]) as rec,
    ):
        rec.attach(model)
        model(torch.full((2, 4), 1e20))
        model(torch.ones(2, 4))
    assert read_table(tmp_path, "outputs").column("norm").to_pylist() == [math.inf, 2.0]
    notes = json.loads((tmp_path / "meta.json").read_text())["notes"]
    assert [(n["module"], n["kind"]) for n in notes] == [("0", "inf_norm")]


def test_the_writers_notes_join_the_recorders_notes_in_meta_json(tmp_path):
    """An infinite norm is noted by the writer (it sees the values); notes of the recorder (here: a lens
    that selects nothing) stay beside it in meta.json, at every rewrite."""
    model = nn.Sequential(nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both say so in a warning too (tested above and elsewhere)
        with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(), nt.GradientNorm()]) as rec:
            rec.attach(model)
            model(torch.full((2, 4), 1e20))
            rec.flush()
            mid = json.loads((tmp_path / "meta.json").read_text())["notes"]
    end = json.loads((tmp_path / "meta.json").read_text())["notes"]
    for notes in (mid, end):
        assert sorted((n["module"], n["kind"]) for n in notes) == [
            ("(root)", "no_signal_params"),
            ("0", "inf_norm"),
        ]


def test_a_recorder_records_one_model_even_across_detach(tmp_path):
    """detach() then attach(another model) used to merge both models' series under the same names."""
    first, second = QNetwork(), QNetwork()
    x = torch.randn(3, 4)
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])]) as rec:
        rec.attach(first)
        first(x)
        rec.detach()
        with pytest.raises(nt.NormtraceError, match="another model.*new Recorder"):
            rec.attach(second)
        second(x)
        rec.attach(first)  # the same model again is fine
        first(x)
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert [r["pass"] for r in rows] == [0] * 5 + [1] * 5
    for p in (0, 1):
        assert norms_by_module(rows, p) == approx_output_norms(first, x)


class CheckpointedBody(nn.Module):
    """A model whose body runs under torch.utils.checkpoint: backward runs the body's forward again."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.body, self.reentrant = QNetwork(), reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("whole_model", [False, True], ids=["segment", "whole model"])
def test_checkpoint_recomputation_in_backward_is_not_a_pass_and_records_nothing(tmp_path, whole_model):
    """The recomputed forward used to add a row per module (``name#1``) or, for a checkpointed root, a
    whole extra pass."""
    model = QNetwork() if whole_model else CheckpointedBody(reentrant=False)
    body = model if whole_model else model.body
    xs = [torch.randn(3, 4, requires_grad=True) for _ in range(3)]
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])]) as rec:
        rec.attach(model)
        for x in xs:
            out = (
                torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False) if whole_model else model(x)
            )
            out.sum().backward()
        assert rec.passes == 3
    rows = read_table(tmp_path, "outputs").to_pylist()
    prefix = "" if whole_model else "body."
    for p, x in enumerate(xs):
        want = {prefix + k: v for k, v in approx_output_norms(body, x.detach()).items()}
        assert norms_by_module(rows, p) == want
    assert len(rows) == 3 * 5


def test_a_reentrant_checkpoint_segment_is_recorded_once_when_no_grad_passes_are(tmp_path):
    """use_reentrant=True runs the segment's forward under no_grad: recorded only with
    skip_no_grad_pass=False, and then once (its recomputation in backward is skipped as always)."""
    model = CheckpointedBody(reentrant=True)
    x = torch.randn(3, 4, requires_grad=True)
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity], skip_no_grad_pass=False)]) as rec:
        rec.attach(model)
        model(x).sum().backward()
    rows = read_table(tmp_path, "outputs").to_pylist()
    want = {"body." + k: v for k, v in approx_output_norms(model.body, x.detach()).items()}
    assert norms_by_module(rows) == want and len(rows) == 5
    assert {r["grad_enabled"] for r in rows} == {False}


class ToComplex(nn.Module):
    """Pairs of features as complex numbers: a (batch, 2) complex output from (batch, 4)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_complex(x.reshape(x.shape[0], 2, 2).contiguous())


def test_a_complex_outputs_norm_is_that_of_its_moduli(tmp_path):
    """Casting a complex output to a real dtype would drop its imaginary parts (3i and 4 have modulus
    norm 5; their real parts alone, 4)."""
    model = nn.Sequential(nn.Identity(), ToComplex())
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity, ToComplex])]) as rec:
        rec.attach(model)
        model(torch.tensor([[0.0, 3.0, 4.0, 0.0]]))
    got = {r["module"]: r["norm"] for r in read_table(tmp_path, "outputs").to_pylist()}
    assert got == {"0": pytest.approx(5.0), "1": pytest.approx(5.0)}


def test_infinite_norms_across_flushes_are_noted_once_and_at_once(tmp_path):
    """Each flush holding an inf norm of an already noted module adds no second warning or note; the note
    is in meta.json as soon as its flush is written, not only at close (a killed run keeps it)."""
    from normtrace.writer import INF_NORM

    model = nn.Sequential(nn.ReLU())
    with pytest.warns(RuntimeWarning) as caught:
        rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm()], flush_every=1).attach(model)
        model(torch.full((2, 4), 1e20))
        rec.flush()
        notes = json.loads((tmp_path / "meta.json").read_text())["notes"]
        assert notes == [{"module": "0", "kind": "inf_norm", "detail": INF_NORM}]
        model(torch.full((2, 4), 1e20))
        rec.flush()
        rec.close()
    assert [str(w.message) for w in caught] == [f"normtrace: module '0' in {tmp_path}: {INF_NORM}"]
    assert json.loads((tmp_path / "meta.json").read_text())["notes"] == notes


def test_a_failing_norm_is_a_note_naming_the_module_and_training_goes_on(tmp_path, monkeypatch):
    """An output the norm kernel fails on (here: every 3-d output) costs that module's rows only."""

    import normtrace.lenses

    def fail(x: torch.Tensor, batch_dim: int | None = 0) -> torch.Tensor:
        raise RuntimeError("no norm for this")

    monkeypatch.setattr(normtrace.lenses, "sample_norms", fail)
    model = nn.Sequential(nn.Unflatten(1, (2, 2)), nn.ReLU(), nn.Flatten(), nn.Tanh())
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm()]) as rec:
        rec.attach(model)
        out = [model(torch.randn(3, 4)) for _ in range(2)]
    assert len(out) == 2
    assert {r["module"] for r in read_table(tmp_path, "outputs").to_pylist()} == {"3"}  # the 2-d one
    notes = json.loads((tmp_path / "meta.json").read_text())["notes"]
    assert [tuple(n.values()) for n in notes] == [("1", "hook_error", "RuntimeError: no norm for this")]


def test_host_concat_joins_zero_and_one_dimensional_values_in_order():
    """0-d and 1-d tensors together (a signal's 0-d value beside a lens's vector) cannot be stacked nor
    concatenated as they are: they are joined per device, in the order given."""
    from normtrace.buffer import host_concat

    got = host_concat([torch.tensor(1.0), torch.tensor([2.0, 3.0]), torch.tensor(4.0, dtype=torch.float16)])
    assert got.dtype == np.float64 and got.tolist() == [1.0, 2.0, 3.0, 4.0]
    # the common cases, all 1-d or all 0-d: float64 too, whatever the tensors' dtypes
    got = host_concat([torch.tensor([1.5], dtype=torch.float16), torch.tensor([2.25, 3.0])])
    assert got.dtype == np.float64 and got.tolist() == [1.5, 2.25, 3.0]
    got = host_concat([torch.tensor(0.1), torch.tensor(0.2)])
    assert got.dtype == np.float64 and got.tolist() == [float(np.float32(0.1)), float(np.float32(0.2))]
