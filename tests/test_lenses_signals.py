"""The gradient, update and activation lenses, checked against values computed directly with torch."""

from __future__ import annotations

import json
import threading
import warnings
from collections import defaultdict
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from dist_worker import ddp_gradient_worker
from optional import need
from recorder_models import QNetwork, read_table
from torch import nn

import normtrace as nt
from normtrace.compat import (
    OutputActivation,
    OutputGradientGeometry,
    ParameterGradientGeometry,
    ParameterUpdateGeometry,
)

PARAMS = [
    (m, p)
    for m in ("net.lin1", "net.lin2", "net.lin3", "net.lin4", "net.lin_out")
    for p in ("weight", "bias")
]


def signals(run_dir: Any, kind: str | None = None) -> list[dict[str, Any]]:
    rows = read_table(run_dir, "signals").to_pylist()
    return [r for r in rows if kind is None or r["kind"] == kind]


def by_step(rows: list[dict[str, Any]]) -> dict[int, dict[tuple[str, str | None], float]]:
    out: dict[int, dict[tuple[str, str | None], float]] = defaultdict(dict)
    for r in rows:
        out[r["step"]][(r["module"], r["param"])] = r["value"]
    return dict(out)


def grads_of(model: nn.Module) -> dict[tuple[str, str], torch.Tensor]:
    return {
        (name.rsplit(".", 1)[0], name.rsplit(".", 1)[1]): p.grad.detach().clone()
        for name, p in model.named_parameters()
        if p.grad is not None
    }


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def train(model, opt, steps, *, accumulate=1, batch=8, seed=0, before_step=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for _ in range(accumulate):
            x = torch.randn(batch, 4, generator=gen)
            model(x).pow(2).mean().backward()
        if before_step is not None:
            before_step()
        opt.step()


def test_gradient_norms_and_cosines_at_each_step_match_torch(tmp_path):
    """With gradient accumulation (3 backwards per step) the norm is of the accumulated grad at step()."""
    torch.manual_seed(0)
    model = QNetwork()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    seen: list[dict[tuple[str, str], torch.Tensor]] = []
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(cosine=True)]) as rec:
        rec.attach(model, optimizer=opt)
        train(model, opt, 4, accumulate=3, before_step=lambda: seen.append(grads_of(model)))
    norms, cosines = by_step(signals(tmp_path, "grad_norm")), by_step(signals(tmp_path, "grad_cosine"))
    assert sorted(norms) == [0, 1, 2, 3] and sorted(cosines) == [1, 2, 3]
    for step, grads in enumerate(seen):
        assert sorted(norms[step]) == sorted(PARAMS)
        for key, g in grads.items():
            assert norms[step][key] == pytest.approx(torch.linalg.vector_norm(g).item(), rel=1e-5)
            if step:
                assert cosines[step][key] == pytest.approx(cosine(g, seen[step - 1][key]), abs=1e-4)
    passes = {r["pass"] for r in signals(tmp_path, "grad_norm")}
    assert passes == {2, 5, 8, 11}  # the last pass before each step


def test_update_ratios_and_cosines_match_parameter_copies(tmp_path):
    torch.manual_seed(1)
    model = QNetwork()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    befores, afters = [], []
    with nt.Recorder(tmp_path, lenses=[nt.UpdateRatio(cosine=True)]) as rec:
        rec.attach(model, optimizer=opt)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4, generator=gen)).pow(2).mean().backward()
            befores.append({k: p.detach().clone() for k, p in model.named_parameters()})
            opt.step()
            afters.append({k: p.detach().clone() for k, p in model.named_parameters()})
    ratios, cosines = by_step(signals(tmp_path, "update_ratio")), by_step(signals(tmp_path, "update_cosine"))
    assert sorted(ratios) == [0, 1, 2] and sorted(cosines) == [1, 2]
    for step in range(3):
        for name, before in befores[step].items():
            key = tuple(name.rsplit(".", 1))
            delta = afters[step][name] - before
            want = (torch.linalg.vector_norm(delta) / torch.linalg.vector_norm(before)).item()
            assert ratios[step][key] == pytest.approx(want, rel=1e-4)
            if step:
                previous = afters[step - 1][name] - befores[step - 1][name]
                assert cosines[step][key] == pytest.approx(cosine(delta, previous), abs=1e-3)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["steps"] == 3 and meta["optimizer"] == "AdamW"


def test_output_gradient_norms_per_backward_match_torch(tmp_path):
    torch.manual_seed(2)
    model = QNetwork()
    captured: dict[str, list[torch.Tensor]] = defaultdict(list)
    for name in ("relu1", "relu4"):
        getattr(model.net, name).register_full_backward_hook(
            lambda m, gi, go, name=name: captured[f"net.{name}"].append(go[0].detach().clone())
        )
    with nt.Recorder(tmp_path, lenses=[nt.OutputGradientNorm()]) as rec:
        rec.attach(model)
        for _ in range(3):
            model(torch.randn(6, 4)).pow(2).sum().backward()
    rows = signals(tmp_path, "output_grad_norm")
    for module, grads in captured.items():
        got = [r["value"] for r in sorted(rows, key=lambda r: r["pass"]) if r["module"] == module]
        want = [torch.linalg.vector_norm(g, dim=1).mean().item() for g in grads]
        assert got == pytest.approx(want, rel=1e-5)
    assert {r["pass"] for r in rows} == {0, 1, 2} and {r["param"] for r in rows} == {None}


def test_activation_rates_and_dead_channels_match_the_output(tmp_path):
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        conv[0].bias[1] = -100.0  # channel 1 is dead on any small input
    outputs = []
    conv[1].register_forward_hook(lambda m, a, out: outputs.append(out.detach().clone()))
    with nt.Recorder(tmp_path, lenses=[nt.ActivationRate()]) as rec:
        rec.attach(conv)
        for _ in range(2):
            conv(torch.randn(3, 2, 5, 5))
    rows = signals(tmp_path)
    for p, out in enumerate(outputs):
        got = {r["kind"]: r["value"] for r in rows if r["pass"] == p}
        assert got["active_rate"] == pytest.approx((out != 0).float().mean().item())
        dead = (out != 0).sum(dim=(0, 2, 3)).eq(0).float().mean().item()
        assert got["dead_fraction"] == pytest.approx(dead) and dead >= 0.25
    assert {r["module"] for r in rows} == {"1"}


def test_zero_grad_set_to_none_frozen_and_gradless_params_get_no_rows(tmp_path):
    torch.manual_seed(3)
    model = QNetwork()
    model.net.lin1.weight.requires_grad_(False)  # frozen: never selected
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(), nt.UpdateRatio()]) as rec:
        rec.attach(model, optimizer=opt)
        train(model, opt, 1)
        opt.zero_grad(set_to_none=True)
        model.net.lin_out(torch.randn(2, 128)).sum().backward()  # only lin_out gets a grad this step
        opt.step()
    for kind in ("grad_norm", "update_ratio"):
        steps = by_step(signals(tmp_path, kind))
        assert ("net.lin1", "weight") not in steps[0] and len(steps[0]) == 9
        assert sorted(steps[1]) == [("net.lin_out", "bias"), ("net.lin_out", "weight")]


def test_without_an_optimizer_gradient_norms_are_taken_per_backward(tmp_path):
    model = nn.Linear(3, 2)
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm()]) as rec:
        rec.attach(model)
        x = torch.randn(4, 3)
        model(x).sum().backward()
        first = model.weight.grad.clone()
        model(x).sum().backward()  # accumulates: the second row is of the accumulated grad
    rows = [r for r in signals(tmp_path) if r["param"] == "weight"]
    assert [r["value"] for r in rows] == pytest.approx(
        [torch.linalg.vector_norm(first).item(), torch.linalg.vector_norm(2 * first).item()], rel=1e-5
    )
    assert {r["module"] for r in rows} == {""} and {r["step"] for r in rows} == {0}  # the root is ""


def test_grad_scaler_records_unscaled_gradients_and_skipped_steps_record_nothing(tmp_path):
    torch.manual_seed(4)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    unscaled = []
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(), nt.UpdateRatio()]) as rec:
        rec.attach(model, optimizer=opt)
        for poison in (False, True, False):
            opt.zero_grad()
            scaler.scale(model(torch.randn(8, 4)).pow(2).mean()).backward()
            if poison:
                model.weight.grad[0, 0] = float("inf")
            scaler.unscale_(opt)
            unscaled.append(torch.linalg.vector_norm(model.weight.grad).item())
            scaler.step(opt)
            scaler.update()
    norms = by_step(signals(tmp_path, "grad_norm"))
    assert sorted(norms) == [0, 1]  # the skipped step ran no step(): no row, not counted
    assert norms[0][("", "weight")] == pytest.approx(unscaled[0], rel=1e-5)
    assert norms[1][("", "weight")] == pytest.approx(unscaled[2], rel=1e-5)
    assert json.loads((tmp_path / "meta.json").read_text())["steps"] == 2


@pytest.mark.parametrize(
    "embedding, out",
    [
        ((10, 3), 1),  # the embedding (30 values) is ordered after the linear layer's in its group
        ((2, 1), 4),  # the embedding (2 values) comes first: the rows after it must all still be there
    ],
)
def test_sparse_gradients_are_noted_and_the_rest_recorded(tmp_path, embedding, out):
    model = nn.Sequential(nn.Embedding(*embedding, sparse=True), nn.Linear(embedding[1], out))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(cosine=True)]) as rec:
        rec.attach(model, optimizer=opt)
        for _ in range(2):
            opt.zero_grad()
            model(torch.tensor([0, 1])).sum().backward()
            opt.step()
    rows = signals(tmp_path)
    assert {(r["module"], r["param"]) for r in rows} == {("1", "weight"), ("1", "bias")}
    assert sorted((r["kind"], r["step"], r["param"]) for r in rows) == sorted(
        [("grad_norm", s, p) for s in (0, 1) for p in ("weight", "bias")]
        + [("grad_cosine", 1, p) for p in ("weight", "bias")]
    )
    notes = json.loads((tmp_path / "meta.json").read_text())["notes"]
    assert [(n["module"], n["kind"]) for n in notes] == [("0", "sparse_grad")]
    assert "weight" in notes[0]["detail"]


def test_checkpoint_recomputation_adds_no_rows(tmp_path):
    """Backward recomputes a checkpointed forward: the forward-time lenses record the first run only."""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
            self.head = nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(checkpoint(self.block, x, use_reentrant=False))

    model = Checkpointed()
    with nt.Recorder(tmp_path, lenses=[nt.ActivationRate(), nt.OutputGradientNorm()]) as rec:
        rec.attach(model)
        for _ in range(2):
            model(torch.randn(3, 4)).sum().backward()
    rows = signals(tmp_path)
    assert sorted((r["kind"], r["pass"]) for r in rows) == sorted(
        (kind, p) for p in (0, 1) for kind in ("active_rate", "dead_fraction", "output_grad_norm")
    )
    assert {r["module"] for r in rows} == {"block.1"}


def test_bad_input_names_the_thing_at_fault(tmp_path):
    model = QNetwork()
    with nt.Recorder(tmp_path / "a", lenses=[nt.UpdateRatio()]) as rec:
        with pytest.raises(TypeError, match=r"attach\(optimizer=...\).*torch.optim.Optimizer.*list"):
            rec.attach(model, optimizer=[])
        with pytest.raises(ValueError, match=r"UpdateRatio.*attach\(model, optimizer=opt\)"):
            rec.attach(model)
    frozen = nn.Linear(2, 2).requires_grad_(False)  # a model without gradients
    opt = torch.optim.SGD(frozen.parameters(), lr=0.1)
    with (
        pytest.warns(UserWarning, match=r"GradientNorm selects no trainable parameter of Linear"),
        nt.Recorder(tmp_path / "b", lenses=[nt.GradientNorm()]) as rec,
    ):
        rec.attach(frozen, optimizer=opt)
        opt.step()
    with pytest.raises(TypeError, match=r"GradientNorm\(parameters=...\)"):
        nt.GradientNorm(parameters="weight")
    with pytest.raises(TypeError, match=r"ActivationRate\(include=...\)"):
        nt.ActivationRate(include=[3])


def test_backward_twice_per_step_is_accumulation(tmp_path):
    """Two backwards through one graph (retain_graph) before a step: the step's grad is their sum."""
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(), nt.OutputGradientNorm()]) as rec:
        rec.attach(model, optimizer=opt)
        loss = model(torch.randn(4, 3)).sum()
        loss.backward(retain_graph=True)
        loss.backward()
        want = torch.linalg.vector_norm(model[0].weight.grad).item()
        opt.step()
    assert by_step(signals(tmp_path, "grad_norm"))[0][("0", "weight")] == pytest.approx(want, rel=1e-5)
    assert len(signals(tmp_path, "output_grad_norm")) == 2  # one per backward, both of pass 0


def test_all_lenses_together_never_synchronise(tmp_path, monkeypatch):
    """Every new lens, patched item/tolist/cpu/float/...: nothing moves a value to the host in training."""
    model, loss_fn = QNetwork(), nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)  # Adam's step calls .item() on CPU
    calls: list[str] = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            moves_to_host = name != "to" or any(str(a) == "cpu" for a in [*args, *kwargs.values()])
            if threading.current_thread() is threading.main_thread() and moves_to_host:
                calls.append(name)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    lenses = [
        nt.LossMetrics(loss_fn=loss_fn),
        nt.OutputNorm(include=[nn.Identity]),
        nt.ParameterNorm(),
        nt.GradientNorm(cosine=True),
        nt.UpdateRatio(cosine=True),
        nt.OutputGradientNorm(include=[nn.Identity]),
        nt.ActivationRate(),
    ]
    with nt.Recorder(tmp_path, lenses=lenses, flush_every=1) as rec:
        rec.attach(model, optimizer=opt)
        xs = [torch.randn(16, 4) for _ in range(5)]
        for name in ["item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "to"]:
            spy(name)
        for x in xs:
            opt.zero_grad()
            q = model(x)
            loss_fn(q, torch.zeros_like(q)).backward()
            opt.step()
            rec.collect()
        rec.tick_epoch()
        assert calls == []
        monkeypatch.undo()
    kinds = defaultdict(int)
    for r in signals(tmp_path):
        kinds[r["kind"]] += 1
    assert kinds == {
        "grad_norm": 50,
        "grad_cosine": 40,
        "update_ratio": 50,
        "update_cosine": 40,
        "output_grad_norm": 25,
        "active_rate": 20,
        "dead_fraction": 20,
    }


def test_under_ddp_every_rank_records_the_all_reduced_gradients(tmp_path):
    """Each rank trains on its own batches; the gradients step() sees are DDP's all-reduced mean, so both
    ranks record the same norms, each under its own rank, with no collective call of normtrace's."""
    run = tmp_path / "run"
    init = f"file://{tmp_path / 'store'}"
    mp.start_processes(
        ddp_gradient_worker, args=(2, init, str(run), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    rows = signals(run, "grad_norm")
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"ddp{rank}.json").read_text())
        got = by_step([r for r in rows if r["rank"] == rank])
        for step, norms in enumerate(seen):
            want = {tuple(name.rsplit(".", 1)): value for name, value in norms.items()}
            assert got[step] == pytest.approx(want, rel=1e-5)
    by_rank = [by_step([r for r in rows if r["rank"] == rank]) for rank in (0, 1)]
    assert sorted(by_rank[0]) == sorted(by_rank[1]) == [0, 1, 2]
    for step, norms in by_rank[0].items():  # all-reduced: the same on both ranks
        assert norms == pytest.approx(by_rank[1][step], rel=1e-5)
    assert {r["rank"] for r in signals(run, "update_ratio")} == {0, 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
def test_every_lens_runs_without_sync_on_cuda(tmp_path):
    model = QNetwork().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    lenses = [
        nt.OutputNorm(include=[nn.Identity]),
        nt.GradientNorm(cosine=True),
        nt.UpdateRatio(cosine=True),
        nt.OutputGradientNorm(include=[nn.Identity]),
        nt.ActivationRate(),
    ]
    with nt.Recorder(tmp_path, lenses=lenses) as rec:
        rec.attach(model, optimizer=opt)
        xs = [torch.randn(32, 4, device="cuda") for _ in range(10)]
        for x in xs[:2]:  # warm-up: the optimizer's first step creates its state
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x in xs[2:]:
                opt.zero_grad()
                model(x).pow(2).mean().backward()
                opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(signals(tmp_path, "grad_norm")) == 10 * 10


def test_seed_library_names_give_the_same_per_step_values(tmp_path):
    """monitorch's lens names port by import; where definitions agree, per-step values are its own."""
    mt = need("monitorch.preprocessor")
    torch.manual_seed(5)
    model = QNetwork()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ref = mt.GradientGeometry(correlation=True, normalize=False, inplace=False)
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p, name=name: ref.process_tensor(name, p.grad))
        for name, p in model.named_parameters()
    ]
    lenses = [
        ParameterGradientGeometry(inplace=False),
        ParameterUpdateGeometry(opt),
        OutputGradientGeometry(),
    ]
    lenses.append(OutputActivation())
    with nt.Recorder(tmp_path, lenses=lenses) as rec:
        rec.attach(model, optimizer=opt)
        train(model, opt, 4)
    for h in hooks:
        h.remove()
    norms = by_step(signals(tmp_path, "grad_norm"))
    cosines = by_step(signals(tmp_path, "grad_cosine"))
    for name, (norm_list, corr_list) in ref.value.items():
        key = tuple(name.rsplit(".", 1))
        assert [norms[s][key] for s in range(4)] == pytest.approx(norm_list, rel=1e-5)
        # the seed's first correlation is with a zero "previous" gradient: 0; normtrace records none.
        # It divides by |a||b| + 1e-8, normtrace by |a||b|: undo that to compare
        products = [norm_list[s - 1] * norm_list[s] for s in range(1, 4)]
        want = [c * (n + 1e-8) / n for c, n in zip(corr_list[1:], products, strict=True)]
        assert [cosines[s][key] for s in range(1, 4)] == pytest.approx(want, abs=2e-5)
    assert {r["kind"] for r in signals(tmp_path)} >= {"update_ratio", "update_cosine", "output_grad_norm"}
    assert {r["module"] for r in signals(tmp_path, "output_grad_norm")} == {
        "net.lin1",
        "net.lin2",
        "net.lin3",
        "net.lin4",
        "net.lin_out",
        "net.output",
    }


def test_compat_names_refuse_unknown_arguments():
    with pytest.raises(TypeError, match="colour"):
        ParameterGradientGeometry(colour="red")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ParameterGradientGeometry(log_scale=True).cosine is True
