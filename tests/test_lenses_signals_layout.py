"""Gradient and update cosines through the flat layout's paths: full steps, steps where only some
parameters have a gradient, a parameter that changes shape, half precision and several dtypes; every
value against one computed in float64 from the tensors themselves."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from recorder_models import read_table
from torch import nn

import normtrace as nt
from normtrace.flat import Layout


def by_step(run_dir: Any, kind: str) -> dict[int, dict[tuple[str, str | None], float]]:
    out: dict[int, dict[tuple[str, str | None], float]] = {}
    for r in read_table(run_dir, "signals").to_pylist():
        if r["kind"] == kind:
            out.setdefault(r["step"], {})[(r["module"], r["param"])] = r["value"]
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def norm(t: torch.Tensor) -> float:
    return t.double().norm().item()


class Three(nn.Module):
    """Parameters of three sizes, two of one size (a run of two in the layout)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, dtype=dtype)
        self.b = nn.Linear(4, 4, dtype=dtype)
        self.c = nn.Linear(4, 2, dtype=dtype)

    def forward(self, x: torch.Tensor, only_c: bool = False) -> torch.Tensor:
        return self.c(x) if only_c else self.c(self.b(self.a(x)).relu())


def keyed(model: nn.Module, fn: Any) -> dict[tuple[str, str], Any]:
    return {tuple(n.split(".")): fn(p) for n, p in model.named_parameters()}


def three_steps_of_both_lenses(
    run_dir: Any, model: nn.Module, inputs: Any, lr: float
) -> tuple[list[dict[tuple[str, str], torch.Tensor]], list[dict[tuple[str, str], torch.Tensor]]]:
    """Three SGD steps of ``model`` on ``inputs()`` (loss: the sum of squared outputs) recorded by
    ``GradientNorm`` and ``UpdateRatio`` with cosines: each step's gradients and updates (θ after −
    θ before, in the parameters' dtype), by (module, param)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    grads, deltas = [], []
    with nt.Recorder(run_dir, lenses=[nt.GradientNorm(cosine=True), nt.UpdateRatio(cosine=True)]) as rec:
        rec.attach(model, optimizer=opt)
        for _ in range(3):
            opt.zero_grad()
            model(inputs()).float().pow(2).sum().backward()
            grads.append(keyed(model, lambda p: p.grad.clone()))
            before = keyed(model, lambda p: p.detach().clone())
            opt.step()
            deltas.append({k: p.detach() - before[k] for k, p in keyed(model, lambda p: p).items()})
    return grads, deltas


def test_cosines_follow_each_parameters_last_recorded_gradient_across_partial_steps(tmp_path):
    torch.manual_seed(0)
    model = Three()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads: list[dict[tuple[str, str], torch.Tensor]] = []
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(cosine=True)]) as rec:
        rec.attach(model, optimizer=opt)
        for only_c in (True, False, True, True, False, False):
            opt.zero_grad(set_to_none=True)
            x = torch.randn(8, 4)
            model(x, only_c=only_c).pow(2).sum().backward()
            grads.append(keyed(model, lambda p: None if p.grad is None else p.grad.clone()))
            opt.step()
    norms, cosines = by_step(tmp_path, "grad_norm"), by_step(tmp_path, "grad_cosine")
    last: dict[tuple[str, str], torch.Tensor] = {}
    for step, step_grads in enumerate(grads):
        want_cos = {}
        for key, g in step_grads.items():
            if g is None:
                continue
            if key in last:
                want_cos[key] = cosine(g, last[key])
            last[key] = g
        present = {k: g for k, g in step_grads.items() if g is not None}
        assert norms[step] == pytest.approx({k: norm(g) for k, g in present.items()}, rel=1e-5)
        assert cosines.get(step, {}) == pytest.approx(want_cos, abs=1e-5)
    assert 0 not in cosines
    assert sorted(cosines[1]) == [("c", "bias"), ("c", "weight")]  # a and b had none recorded before
    assert sorted(cosines[2]) == [("c", "bias"), ("c", "weight")]  # a and b have no gradient
    assert len(cosines[4]) == 6  # a and b against step 1's gradients, c against step 3's


def test_update_cosines_across_partial_steps(tmp_path):
    torch.manual_seed(1)
    model = Three()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    deltas: list[dict[tuple[str, str], torch.Tensor | None]] = []
    with nt.Recorder(tmp_path, lenses=[nt.UpdateRatio(cosine=True)]) as rec:
        rec.attach(model, optimizer=opt)
        for only_c in (False, True, False, False):
            opt.zero_grad(set_to_none=True)
            model(torch.randn(8, 4), only_c=only_c).pow(2).sum().backward()
            before = keyed(model, lambda p: p.detach().clone())
            had = keyed(model, lambda p: p.grad is not None)
            opt.step()
            deltas.append(
                {
                    k: (p.detach() - before[k]) if had[k] else None
                    for k, p in keyed(model, lambda p: p).items()
                }
            )
            deltas[-1]["_before"] = before  # type: ignore[assignment]
    ratios, cosines = by_step(tmp_path, "update_ratio"), by_step(tmp_path, "update_cosine")
    last: dict[tuple[str, str], torch.Tensor] = {}
    for step, step_deltas in enumerate(deltas):
        before = step_deltas.pop("_before")  # type: ignore[call-overload]
        want_ratio, want_cos = {}, {}
        for key, d in step_deltas.items():
            if d is None:
                continue
            want_ratio[key] = norm(d) / norm(before[key])
            if key in last:
                want_cos[key] = cosine(d, last[key])
            last[key] = d
        assert ratios[step] == pytest.approx(want_ratio, rel=1e-4)
        assert cosines.get(step, {}) == pytest.approx(want_cos, abs=1e-4)
    assert len(cosines[2]) == 6 and len(cosines[1]) == 2


def test_a_parameter_that_changes_shape_restarts_its_groups_cosines(tmp_path):
    torch.manual_seed(2)
    model = Three()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(cosine=True)]) as rec:
        rec.attach(model, optimizer=opt)
        grads = []
        for step in range(4):
            if step == 2:  # c grows an output: the layout no longer fits
                model.c.weight.data = torch.randn(3, 4)
                model.c.bias.data = torch.randn(3)
            opt.zero_grad(set_to_none=True)
            model(torch.randn(8, 4)).pow(2).sum().backward()
            grads.append(keyed(model, lambda p: p.grad.clone()))
            opt.step()
    norms, cosines = by_step(tmp_path, "grad_norm"), by_step(tmp_path, "grad_cosine")
    assert norms[2] == pytest.approx({k: norm(g) for k, g in grads[2].items()}, rel=1e-5)
    assert 2 not in cosines  # the group was laid out again: nothing kept to compare with
    assert cosines[3] == pytest.approx({k: cosine(g, grads[2][k]) for k, g in grads[3].items()}, abs=1e-5)
    assert sorted(cosines) == [1, 3]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_norms_and_cosines_are_accumulated_in_float32(tmp_path, dtype):
    torch.manual_seed(3)
    grads, _ = three_steps_of_both_lenses(
        tmp_path, Three(dtype), lambda: torch.randn(64, 4, dtype=dtype), 0.01
    )
    norms, cosines = by_step(tmp_path, "grad_norm"), by_step(tmp_path, "grad_cosine")
    update_cos = by_step(tmp_path, "update_cosine")
    for step in range(3):
        # the float64 values of the half-precision elements: a float16 sum would be off by ~1e-3
        assert norms[step] == pytest.approx({k: norm(g) for k, g in grads[step].items()}, rel=1e-5)
        if step:
            want = {k: cosine(g, grads[step - 1][k]) for k, g in grads[step].items()}
            assert cosines[step] == pytest.approx(want, abs=1e-5)
            # Δθ is taken in the parameters' dtype (θ_after − θ_before rounds there), not in float64
            got = update_cos[step]
            assert set(got) == set(want) and all(-1.0 <= v <= 1.0 for v in got.values())


def test_parameters_of_two_dtypes_are_two_groups_each_recorded(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(cosine=True)]) as rec:
        rec.attach(model, optimizer=opt)
        for _ in range(2):
            opt.zero_grad()
            model[1](model[0](torch.randn(5, 3)).double()).sum().backward()
            grads.append(keyed(model, lambda p: p.grad.clone()))
            opt.step()
    norms, cosines = by_step(tmp_path, "grad_norm"), by_step(tmp_path, "grad_cosine")
    assert norms[1] == pytest.approx({k: norm(g) for k, g in grads[1].items()}, rel=1e-6)
    assert cosines[1] == pytest.approx({k: cosine(g, grads[0][k]) for k, g in grads[1].items()}, abs=1e-6)


def test_layout_runs_views_norms_and_dots_against_the_tensors():
    tensors = [torch.randn(3), torch.randn(2, 2), torch.randn(4), torch.randn(()), torch.randn(0, 5)]
    order = sorted(range(len(tensors)), key=lambda i: tensors[i].numel())
    ordered = [tensors[i] for i in order]
    layout = Layout(ordered)
    assert [count for (count, _), _, _ in layout.runs] == [1, 1, 1, 2]  # sizes 0, 1, 3, then 4 and 4
    flat = layout.flatten(ordered)
    assert [v.shape for v in flat.views] == [t.shape for t in ordered]
    assert all(torch.equal(v, t) for v, t in zip(flat.views, ordered, strict=True))
    assert flat.norms().tolist() == pytest.approx([norm(t) for t in ordered], rel=1e-6)
    other = layout.flatten([t * 2 + 1 for t in ordered])
    want = [(t.double() * (t.double() * 2 + 1)).sum().item() for t in ordered]
    assert flat.dots(other).tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert layout.fits(ordered) and not layout.fits([t.double() for t in ordered])
    assert not layout.fits([*ordered[:-1], torch.randn(2, 2, 1)])
    fresh = layout.new()
    torch._foreach_copy_(fresh.views, ordered)
    assert torch.equal(fresh.data, flat.data)
    # sizes 1, 3, 6, 6 at offsets 0, 1, 4, 10: the two 6s form one run (whose offset is not its size)
    sixes = [torch.randn(1), torch.randn(3), torch.randn(2, 3), torch.randn(6)]
    runs = Layout(sixes).runs
    assert [shape for shape, _, _ in runs] == [(1, 1), (1, 3), (2, 6)]
    assert [offset for _, _, offset in runs] == [0, 1, 4]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_group_of_one_parameter_keeps_copies_not_views(tmp_path, set_to_none):
    """One weight alone (no bias): its gradient zeroed in place and its value changed by the step must
    not reach what the lenses kept."""
    torch.manual_seed(5)
    model = nn.Linear(3, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads, deltas = [], []
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(cosine=True), nt.UpdateRatio(cosine=True)]) as rec:
        rec.attach(model, optimizer=opt)
        for _ in range(3):
            opt.zero_grad(set_to_none=set_to_none)
            model(torch.randn(4, 3)).pow(2).sum().backward()
            grads.append(model.weight.grad.clone())
            before = model.weight.detach().clone()
            opt.step()
            deltas.append(model.weight.detach() - before)
    key = ("", "weight")
    ratios, grad_cos = by_step(tmp_path, "update_ratio"), by_step(tmp_path, "grad_cosine")
    update_cos = by_step(tmp_path, "update_cosine")
    for step in range(3):
        assert ratios[step][key] > 0  # a view of the parameter would give Δθ = 0
    for step in (1, 2):
        assert grad_cos[step][key] == pytest.approx(cosine(grads[step], grads[step - 1]), abs=1e-5)
        assert update_cos[step][key] == pytest.approx(cosine(deltas[step], deltas[step - 1]), abs=1e-4)


def test_without_an_optimizer_cosines_are_per_backward(tmp_path):
    torch.manual_seed(6)
    model = nn.Linear(3, 2)
    seen = []
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(cosine=True)]) as rec:
        rec.attach(model)
        for _ in range(3):
            model.zero_grad(set_to_none=False)
            model(torch.randn(4, 3)).pow(2).sum().backward()
            seen.append(model.weight.grad.clone())
    rows = [r for r in read_table(tmp_path, "signals").to_pylist() if r["param"] == "weight"]
    cos = [r["value"] for r in rows if r["kind"] == "grad_cosine"]
    assert cos == pytest.approx([cosine(seen[1], seen[0]), cosine(seen[2], seen[1])], abs=1e-5)


@pytest.mark.parametrize("with_cosine", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_per_tensor_paths_accumulate_in_float32(tmp_path, dtype, with_cosine):
    """Norms without cosines, and norms and cosines of steps where only some parameters have a gradient,
    are taken per tensor (``_norms``, ``_cosines``), not from the flat buffer: in float32 there too."""
    torch.manual_seed(7)
    model = Three(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(cosine=with_cosine)]) as rec:
        rec.attach(model, optimizer=opt)
        for only_c in (False, True, True):
            opt.zero_grad(set_to_none=True)
            model(torch.randn(64, 4, dtype=dtype), only_c=only_c).float().pow(2).sum().backward()
            seen.append(keyed(model, lambda p: None if p.grad is None else p.grad.clone()))
            opt.step()
    norms, cosines = by_step(tmp_path, "grad_norm"), by_step(tmp_path, "grad_cosine")
    for step in range(3):
        present = {k: g for k, g in seen[step].items() if g is not None}
        assert norms[step] == pytest.approx({k: norm(g) for k, g in present.items()}, rel=1e-5)
        if with_cosine and step:
            want = {k: cosine(g, seen[step - 1][k]) for k, g in present.items()}
            assert cosines[step] == pytest.approx(want, abs=1e-5)
    assert bool(cosines) == with_cosine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_without_tokens_take_turns_each_against_its_own_last_gradient(tmp_path, dtype):
    """Two bias-free experts of which one or both get a gradient (a mixture of experts whose router sent
    no token to the other): steps where a single parameter has a gradient, others where both do."""
    torch.manual_seed(8)
    experts = nn.ModuleDict(
        {"e1": nn.Linear(4, 3, bias=False, dtype=dtype), "e2": nn.Linear(4, 3, bias=False, dtype=dtype)}
    )
    opt = torch.optim.SGD(experts.parameters(), lr=0.1)
    seen = []
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(cosine=True)]) as rec:
        rec.attach(experts, optimizer=opt)
        for used in (["e1"], ["e1"], ["e1", "e2"], ["e2"], ["e2"], ["e1", "e2"]):
            opt.zero_grad(set_to_none=True)
            x = torch.randn(16, 4, dtype=dtype)
            sum(experts[name](x).float().pow(2).sum() for name in used).backward()
            seen.append({(name, "weight"): experts[name].weight.grad.clone() for name in used})
            opt.step()
    norms, cosines = by_step(tmp_path, "grad_norm"), by_step(tmp_path, "grad_cosine")
    last: dict[tuple[str, str], torch.Tensor] = {}
    for step, grads in enumerate(seen):
        want = {k: cosine(g, last[k]) for k, g in grads.items() if k in last}
        assert norms[step] == pytest.approx({k: norm(g) for k, g in grads.items()}, rel=1e-5)
        assert cosines.get(step, {}) == pytest.approx(want, abs=1e-5)
        last.update(grads)
    assert sorted(cosines) == [1, 2, 3, 4, 5] and list(cosines[2]) == [("e1", "weight")]


def test_a_zero_gradient_has_cosine_zero_on_full_and_partial_steps(tmp_path):
    """A weight whose input is all zeros gets a zero gradient: its cosine is 0 (the norm is 0), not NaN
    nor 1, whether the step takes every parameter at once or only some."""
    model = nn.ModuleDict({"a": nn.Linear(3, 1), "b": nn.Linear(3, 1)})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(cosine=True)]) as rec:
        rec.attach(model, optimizer=opt)
        for step, used in enumerate((["a", "b"], ["a", "b"], ["a"], ["a"])):
            opt.zero_grad(set_to_none=True)
            x = torch.zeros(4, 3) if step % 2 else torch.ones(4, 3)  # zeros: the weights' gradients are 0
            sum(model[name](x).sum() for name in used).backward()
            opt.step()
    cosines = by_step(tmp_path, "grad_cosine")
    norms = by_step(tmp_path, "grad_norm")
    assert norms[1][("a", "weight")] == 0.0 and norms[3][("a", "weight")] == 0.0
    assert cosines[1][("a", "weight")] == 0.0 and cosines[1][("b", "weight")] == 0.0  # full step
    assert cosines[3][("a", "weight")] == 0.0 and cosines[2][("a", "weight")] == 0.0  # partial steps
    assert cosines[1][("a", "bias")] == pytest.approx(1.0)  # the biases' gradients stay 1 each


def test_convolution_weights_of_three_and_four_dimensions(tmp_path):
    """Views of the flat buffer are made with explicit strides: a 4-d convolution weight and a 3-d one
    must come out as the tensors they copy (and their norms, cosines and ratios with them)."""
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(2, 3), nn.Conv1d(3, 2, 2), nn.Flatten(), nn.Linear(4, 1)
    )
    grads, deltas = three_steps_of_both_lenses(tmp_path, model, lambda: torch.randn(4, 2, 5, 3), 0.1)
    assert any(g.ndim == 4 for g in grads[0].values()) and any(g.ndim == 3 for g in grads[0].values())
    grad_cos, update_cos = by_step(tmp_path, "grad_cosine"), by_step(tmp_path, "update_cosine")
    for step in (1, 2):
        assert grad_cos[step] == pytest.approx(
            {k: cosine(g, grads[step - 1][k]) for k, g in grads[step].items()}, abs=1e-5
        )
        assert update_cos[step] == pytest.approx(
            {k: cosine(d, deltas[step - 1][k]) for k, d in deltas[step].items()}, abs=1e-4
        )


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 0, 3), (3, 1, 2, 2), (), (5,)])
def test_view_strides_are_those_of_a_contiguous_tensor(shape):
    t = torch.randn(shape)
    (view,) = Layout([t]).flatten([t]).views
    assert view.shape == t.shape and view.stride() == t.stride() and torch.equal(view, t)


def test_a_shape_change_then_a_partial_step_keeps_nothing_for_the_parameters_without_a_gradient(tmp_path):
    """After the group is laid out again, a step where only c has a gradient keeps only c's: the next
    full step compares c alone (a and b have nothing kept, not stale or uninitialised values)."""
    torch.manual_seed(10)
    model = Three()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(cosine=True)]) as rec:
        rec.attach(model, optimizer=opt)
        seen = []
        for step, only_c in enumerate((False, True, False)):
            if step == 1:
                model.c.weight.data = torch.randn(3, 4)
                model.c.bias.data = torch.randn(3)
            opt.zero_grad(set_to_none=True)
            model(torch.randn(8, 4), only_c=only_c).pow(2).sum().backward()
            seen.append(keyed(model, lambda p: None if p.grad is None else p.grad.clone()))
            opt.step()
    cosines = by_step(tmp_path, "grad_cosine")
    assert 1 not in cosines
    assert cosines[2] == pytest.approx(
        {k: cosine(seen[2][k], seen[1][k]) for k in (("c", "weight"), ("c", "bias"))}, abs=1e-5
    )


@pytest.mark.parametrize("lens", [nt.GradientNorm, nt.UpdateRatio])
def test_parameters_selects_by_name_within_the_module(tmp_path, lens):
    model = Three()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with nt.Recorder(tmp_path, lenses=[lens(parameters=["bias"])]) as rec:
        rec.attach(model, optimizer=opt)
        opt.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
    keys = {(r["module"], r["param"]) for r in read_table(tmp_path, "signals").to_pylist()}
    assert keys == {("a", "bias"), ("b", "bias"), ("c", "bias")}


class Fixed(nn.Module):
    """Two weights of three entries whose gradients are ``sign * C`` (``w``) and ``C`` (``v``, used on
    the steps asked): ``C`` is a vector whose float32 dot product with itself exceeds the product of its
    float32 norms by one rounding step, so an unclamped cosine of ``C`` with ``±C`` is ``±1.0000001``."""

    C = torch.tensor([1.5409960746765137, -0.293428897857666, -2.1787893772125244])

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.v = nn.Parameter(torch.zeros(3))

    def forward(self, sign: float, use_v: bool) -> torch.Tensor:
        loss = sign * (self.w * self.C).sum()
        return loss + (self.v * self.C).sum() if use_v else loss


def test_cosines_of_equal_and_opposite_gradients_are_exactly_one_and_minus_one(tmp_path):
    """Rounding must not put a cosine outside [-1, 1], on full steps (one dot per run of sizes) and on
    steps where only some parameters have a gradient (one dot per tensor)."""
    assert torch.dot(Fixed.C, Fixed.C) / (Fixed.C.norm() * Fixed.C.norm()) > 1  # the premise holds here
    model = Fixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    plan = [
        (1.0, True),
        (1.0, True),
        (-1.0, True),
        (1.0, False),
        (-1.0, False),
        (-1.0, False),
    ]  # (w's sign, v used)
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(cosine=True)]) as rec:
        rec.attach(model, optimizer=opt)
        for sign, use_v in plan:
            opt.zero_grad(set_to_none=True)
            model(sign, use_v).backward()
            opt.step()
    cosines = by_step(tmp_path, "grad_cosine")
    assert {s: c[("", "w")] for s, c in cosines.items()} == {1: 1.0, 2: -1.0, 3: -1.0, 4: -1.0, 5: 1.0}
    assert {s: c[("", "v")] for s, c in cosines.items() if ("", "v") in c} == {1: 1.0, 2: 1.0}
