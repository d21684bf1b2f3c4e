"""A lens written by a user, with normtrace's public API only (the example in docs/recorder.md)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from recorder_models import QNetwork, read_table
from torch import nn

import normtrace as nt


class MaxAbsActivation:
    """Largest absolute value of each ``nn.Linear`` output, per forward pass (kind ``max_abs``)."""

    def config(self) -> dict[str, Any]:
        return {"type": "MaxAbsActivation"}

    def attach(self, target: nt.Target, recording: nt.Recording) -> list[Any]:
        handles = []
        for name, module in target.modules:
            if isinstance(module, nn.Linear):

                def hook(module: nn.Module, args: Any, out: torch.Tensor, name: str = name) -> None:
                    recording.signal("max_abs", name, out.detach().abs().amax())  # stays on the device

                handles.append(module.register_forward_hook(hook))
        return handles


class StepCounterPerEpoch:
    """Pushes, at every epoch tick, how many optimizer steps ran so far (``Recording.on_collect``)."""

    def config(self) -> dict[str, Any]:
        return {"type": "StepCounterPerEpoch"}

    def attach(self, target: nt.Target, recording: nt.Recording) -> list[Any]:
        return [recording.on_collect(lambda: recording.push_metric("steps_so_far", recording.step))]


def test_a_user_lens_records_signals_with_public_api_only(tmp_path):
    torch.manual_seed(0)
    model = QNetwork()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    maxima: list[dict[str, float]] = []
    with nt.Recorder(tmp_path, lenses=[MaxAbsActivation(), StepCounterPerEpoch()]) as rec:
        rec.attach(model, optimizer=opt)
        for _ in range(3):
            x = torch.randn(5, 4)
            with torch.no_grad():  # layer by layer without calling the modules (their hooks would record)
                h, seen = x, {}
                for name, layer in model.net.named_children():
                    if isinstance(layer, nn.Linear):
                        h = nn.functional.linear(h, layer.weight, layer.bias)
                        seen[f"net.{name}"] = h.abs().max().item()
                    elif isinstance(layer, nn.ReLU):
                        h = h.relu()
                maxima.append(seen)
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
            rec.tick_epoch()
        rec.detach()
        model(torch.randn(5, 4))  # detached: the user's hooks are gone too
    rows = read_table(tmp_path, "signals").to_pylist()
    assert len(rows) == 3 * 5
    for r in rows:
        assert r["kind"] == "max_abs" and r["param"] is None
        assert r["value"] == pytest.approx(maxima[r["pass"]][r["module"]], rel=1e-6)
        assert r["step"] == r["pass"]  # measured in pass p, after p optimizer steps
    metrics = read_table(tmp_path, "metrics").to_pylist()
    assert [(m["name"], m["value"], m["epoch"]) for m in metrics] == [
        ("steps_so_far", s, s - 1) for s in (1, 2, 3)
    ]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert [lens["type"] for lens in meta["lenses"]] == ["MaxAbsActivation", "StepCounterPerEpoch"]


def test_an_object_that_is_not_a_lens_is_refused_naming_the_protocol(tmp_path):
    class Half:
        def config(self) -> dict[str, Any]:
            return {}

    with pytest.raises(TypeError, match=r"config\(\) and attach\(target, recording\)"):
        nt.Recorder(tmp_path, lenses=[Half()])


def test_builtin_lenses_follow_the_same_protocol():
    for lens in (
        nt.OutputNorm(),
        nt.ParameterNorm(),
        nt.LossMetrics(),
        nt.GradientNorm(),
        nt.ActivationRate(),
    ):
        assert isinstance(lens, nt.Lens)
        assert lens.config()["type"] == type(lens).__name__


class Scales:
    """Records the output's largest entry as a device tensor and the pass's scale as a float, and pushes
    the weight's norm (a one-element tensor of shape (1, 1)) as a metric at every collect()."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def config(self) -> dict[str, Any]:
        return {"type": "Scales"}

    def attach(self, target: nt.Target, recording: nt.Recording) -> list[Any]:
        layer = target.model

        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            recording.signal("max", "", out.detach().amax())
            recording.signal("scale", "", self.scale, param="weight")

        def collect() -> None:
            recording.push_metric("weight_norm", layer.weight.detach().norm().reshape(1, 1), split="val")

        return [layer.register_forward_hook(hook), recording.on_collect(collect)]


def test_signal_and_push_metric_take_device_tensors_without_a_sync_and_plain_floats(tmp_path, monkeypatch):
    """``Recording.signal`` keeps a tensor on its device (no ``item()``/``float()`` in the training
    thread) and takes a Python float as it is; ``push_metric`` takes any one-element tensor."""
    model = nn.Linear(3, 2)
    xs = [torch.randn(4, 3) for _ in range(3)]
    with nt.Recorder(tmp_path, lenses=[Scales(0.25)]) as rec:
        rec.attach(model)
        with monkeypatch.context() as patch:
            for name in ("item", "__float__", "tolist"):

                def refuse(self: torch.Tensor, *args: Any, name: str = name) -> Any:
                    raise AssertionError(f"Tensor.{name} called in training")

                patch.setattr(torch.Tensor, name, refuse)
            for x in xs:
                model(x)
                rec.collect()
    rows = read_table(tmp_path, "signals").to_pylist()
    got = {(r["pass"], r["kind"], r["param"]): r["value"] for r in rows}
    with torch.no_grad():
        want = {(p, "max", None): model(x).amax().item() for p, x in enumerate(xs)}
    want |= {(p, "scale", "weight"): 0.25 for p in range(3)}
    assert got == pytest.approx(want, rel=1e-6)
    metrics = read_table(tmp_path, "metrics").to_pylist()
    norm = model.weight.detach().norm().item()
    assert [(m["name"], m["pass"], m["split"]) for m in metrics] == [
        ("weight_norm", p, "val") for p in range(3)
    ]
    assert [m["value"] for m in metrics] == pytest.approx([norm] * 3, rel=1e-6)


def test_removing_an_on_collect_handle_stops_the_calls_and_twice_is_harmless(tmp_path):
    calls: list[str] = []

    class Two:
        def config(self) -> dict[str, Any]:
            return {"type": "Two"}

        def attach(self, target: nt.Target, recording: nt.Recording) -> list[Any]:
            self.first = recording.on_collect(lambda: calls.append("first"))
            self.second = recording.on_collect(lambda: calls.append("second"))
            return []

    lens = Two()
    with nt.Recorder(tmp_path, lenses=[lens]) as rec:
        rec.attach(nn.Linear(2, 2))
        rec.collect()
        lens.first.remove()
        lens.first.remove()
        rec.collect()
    assert calls == ["first", "second", "second"]


def test_describe_sets_a_key_of_meta_json_at_any_depth(tmp_path):
    """A lens's own settings under a section of its own, which the recorder does not create."""

    class Described:
        def config(self) -> dict[str, Any]:
            return {"type": "Described"}

        def attach(self, target: nt.Target, recording: nt.Recording) -> list[Any]:
            recording.describe("described.window.size", 8)
            recording.describe("described.kind", "max")
            return []

    with nt.Recorder(tmp_path, lenses=[Described()]) as rec:
        rec.attach(nn.Linear(2, 2))
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["described"] == {"window": {"size": 8}, "kind": "max"}


def test_a_lens_appending_rows_itself_reaches_the_tables_with_its_processs_rank(tmp_path):
    """The raw append functions of ``Recording`` (one row each, the counters read by the lens itself),
    and ``rank``, the process's rank (0 without torch.distributed), for a lens that names things by it."""

    class Marker:
        def config(self) -> dict[str, Any]:
            return {"type": "Marker"}

        def attach(self, target: nt.Target, recording: nt.Recording) -> list[Any]:
            def collect() -> None:
                at = (recording.epoch, recording.current_pass())
                recording.append_event((*at, f"tick@rank{recording.rank}", 123.0))
                recording.append_metric((*at, "ticks", float(recording.epoch + 1), "train", 124.0))

            return [recording.on_collect(collect)]

    model = QNetwork()
    with nt.Recorder(tmp_path, lenses=[Marker()]) as rec:
        rec.attach(model)
        for _ in range(2):
            model(torch.randn(3, 4))
            model(torch.randn(3, 4))
            rec.tick_epoch()
    events = read_table(tmp_path, "events").to_pylist()
    assert [(e["epoch"], e["pass"], e["name"], e["time"]) for e in events] == [
        (0, 1, "tick@rank0", 123.0),
        (1, 3, "tick@rank0", 123.0),
    ]
    metrics = read_table(tmp_path, "metrics").to_pylist()
    assert [(m["epoch"], m["pass"], m["name"], m["value"], m["split"], m["time"]) for m in metrics] == [
        (0, 1, "ticks", 1.0, "train", 124.0),
        (1, 3, "ticks", 2.0, "train", 124.0),
    ]
