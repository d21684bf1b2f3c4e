"""``normtrace.compat``: the seed library's lens names, each argument mapped to what normtrace records.

The per-step values against monitorch itself are in ``test_lenses_signals.py``; here every argument of
the four names reaches the lens (selection, cosine, parameters, no-grad passes, the run metadata), and
arguments normtrace cannot honour are refused or warned about, naming the lens."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from recorder_models import read_table
from torch import nn

import normtrace as nt
from normtrace.compat import (
    OutputActivation,
    OutputGradientGeometry,
    ParameterGradientGeometry,
    ParameterUpdateGeometry,
)


class Net(nn.Module):
    """Two linears, a ReLU, a Tanh, a dropout and a LayerNorm: one module of each kind a lens may pick."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.relu, self.drop = nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.0)
        self.norm, self.tanh, self.lin2 = nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.tanh(self.norm(self.drop(self.relu(self.lin1(x))))))


def _record(tmp_path, lens, *, steps: int = 2, no_grad_pass: bool = False) -> tuple[list[dict], dict]:
    """Train ``Net`` for ``steps`` SGD steps under ``lens`` (a no-grad pass first if asked): the signals
    rows and the lens's entry in meta.json."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a lens selecting few modules says so; not what is tested here
        with nt.Recorder(tmp_path, lenses=[lens]) as rec:
            rec.attach(model, optimizer=opt)
            if no_grad_pass:
                with torch.no_grad():
                    model(torch.randn(5, 3))
            for _ in range(steps):
                opt.zero_grad()
                model(torch.randn(5, 3)).pow(2).mean().backward()
                opt.step()
    meta = json.loads((tmp_path / "meta.json").read_text())
    (config,) = meta["lenses"]
    return read_table(tmp_path, "signals").to_pylist(), config


def _modules(rows: list[dict], kind: str) -> set[str]:
    return {r["module"] for r in rows if r["kind"] == kind}


def _params(rows: list[dict], kind: str) -> set[tuple[str, str]]:
    return {(r["module"], r["param"]) for r in rows if r["kind"] == kind}


@pytest.mark.parametrize("parameters", ["weight", ("weight", "bias"), ["bias"]])
def test_parameter_gradient_geometry_records_the_parameters_named(tmp_path, parameters) -> None:
    """A single name is one parameter (not its letters); the default is weight and bias."""
    rows, config = _record(tmp_path, ParameterGradientGeometry(parameters=parameters))
    names = (parameters,) if isinstance(parameters, str) else tuple(parameters)
    # LayerNorm has a weight and a bias too
    assert _params(rows, "grad_norm") == {(m, p) for m in ("lin1", "norm", "lin2") for p in names}
    assert config["type"] == "ParameterGradientGeometry"


def test_parameter_lenses_default_to_weight_and_bias_with_correlation(tmp_path) -> None:
    rows, _ = _record(tmp_path, ParameterGradientGeometry())
    want = {(m, p) for m in ("lin1", "norm", "lin2") for p in ("weight", "bias")}
    assert _params(rows, "grad_norm") == want and _params(rows, "grad_cosine") == want
    rows, _ = _record(tmp_path / "u", ParameterUpdateGeometry())
    assert _params(rows, "update_ratio") == want and _params(rows, "update_cosine") == want


@pytest.mark.parametrize("lens", [ParameterGradientGeometry, ParameterUpdateGeometry])
def test_compute_correlation_false_records_no_cosine(tmp_path, lens) -> None:
    rows, _ = _record(tmp_path, lens(compute_correlation=False, parameters="bias"))
    kinds = {r["kind"] for r in rows}
    assert kinds == ({"grad_norm"} if lens is ParameterGradientGeometry else {"update_ratio"})


def test_parameter_update_geometry_takes_only_an_optimizer(tmp_path) -> None:
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert ParameterUpdateGeometry(opt).parameters == ("weight", "bias")  # the seed's positional optimizer
    assert ParameterUpdateGeometry(parameters="weight").parameters == ("weight",)
    with pytest.raises(TypeError, match=r"ParameterUpdateGeometry\(optimizer=...\).*got list"):
        ParameterUpdateGeometry([opt])


def test_output_gradient_geometry_selects_leaves_and_activations_only_when_asked(tmp_path) -> None:
    rows, config = _record(tmp_path, OutputGradientGeometry())
    # dropout is a leaf and not an activation: the seed's selection takes it
    assert _modules(rows, "output_grad_norm") == {"lin1", "drop", "norm", "lin2"}
    assert config["skip_activation"] is True
    rows, config = _record(tmp_path / "all", OutputGradientGeometry(skip_activation=False))
    assert _modules(rows, "output_grad_norm") == {"lin1", "relu", "drop", "norm", "tanh", "lin2"}
    assert config["skip_activation"] is False
    assert not OutputGradientGeometry().selects("net", Net())  # a container is never a leaf


@pytest.mark.parametrize(
    ("options", "modules"),
    [
        ({}, {"relu", "drop", "tanh"}),
        ({"activation": False}, {"drop"}),
        ({"dropout": False}, {"relu", "tanh"}),
        ({"activation": False, "dropout": False}, set()),
        ({"activation": False, "dropout": False, "include": (nn.LayerNorm,)}, {"norm"}),
        ({"include": ["lin*"], "exclude": (nn.Tanh, "drop")}, {"lin1", "lin2", "relu"}),
        ({"dropout": False, "exclude": ["relu"]}, {"tanh"}),
    ],
    ids=["default", "no activations", "no dropout", "nothing", "include only", "include, exclude",
         "exclude by name"],
)  # fmt: skip
def test_output_activation_follows_the_seeds_selection_flags(tmp_path, options, modules) -> None:
    rows, config = _record(tmp_path, OutputActivation(**options))
    assert _modules(rows, "active_rate") == modules
    assert config["activation"] is options.get("activation", True)
    assert config["dropout"] is options.get("dropout", True)


@pytest.mark.parametrize("record_eval", [None, False, True], ids=["default", "False", "True"])
def test_output_activation_records_no_grad_passes_only_with_record_eval(tmp_path, record_eval) -> None:
    lens = OutputActivation() if record_eval is None else OutputActivation(record_eval=record_eval)
    rows, config = _record(tmp_path, lens, no_grad_pass=True)
    passes = {r["pass"] for r in rows}
    assert passes == ({0, 1, 2} if record_eval else {1, 2})
    assert config["skip_no_grad_pass"] is (not record_eval)


def test_output_activation_refuses_channel_last() -> None:
    with pytest.raises(ValueError) as info:
        OutputActivation(channel_last=True)
    assert str(info.value) == (
        "OutputActivation(channel_last=True) is not supported: normtrace's channels are dim 1"
    )


@pytest.mark.parametrize(
    "lens", [ParameterGradientGeometry, ParameterUpdateGeometry, OutputGradientGeometry, OutputActivation]
)
def test_presentation_options_are_accepted_and_others_refused_naming_the_lens(lens) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lens(inplace=False, log_scale=True, line_aggregation="mean", range_aggregation=("std",))
    with pytest.raises(TypeError) as info:
        lens(colour="red", inplace=True)
    assert str(info.value) == f"{lens.__name__}() got unexpected keyword argument(s) ['colour']"


@pytest.mark.parametrize(
    ("lens", "recorded"),
    [
        (ParameterGradientGeometry, "the raw L2 norm (its RMS is norm / sqrt(numel))"),
        (ParameterUpdateGeometry, "the update ratio |Δθ|/|θ|, free of size"),
        (OutputGradientGeometry, "the batch mean of per-sample L2 norms"),
    ],
)
def test_normalize_by_size_is_warned_about_not_silently_ignored(lens, recorded: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lens()  # the default, False, is what normtrace records
        lens(normalize_by_size=False)
    with pytest.warns(UserWarning, match=rf"^{lens.__name__}\(normalize_by_size=True\) is ignored") as got:
        lens(normalize_by_size=True)
    assert (
        str(got[0].message)
        == f"{lens.__name__}(normalize_by_size=True) is ignored: normtrace records {recorded}"
    )
    assert got[0].filename == __file__  # it points at the user's line
