"""Module selection (issue 15 item 3): globs whose ``*`` stays within a dotted segment, ``**`` across; the
activation rule that finds other libraries' classes; the warning when a large model is barely observed."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from recorder_models import read_table
from torch import nn

import normtrace as nt
from normtrace.selection import glob_regex, is_activation, matches

NAMES = [
    "encoder",
    "encoder.layer",
    "encoder.layer.0",
    "encoder.layer.0.attn",
    "encoder.layer.0.attn.q",
    "encoder.layer.1.attn",
    "encoder.norm",
    "attn",
    "decoder.attn",
    "head",
]


def _selected(pattern: str) -> list[str]:
    return [n for n in NAMES if matches(n, nn.Identity(), [pattern])]


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("encoder.*", ["encoder.layer", "encoder.norm"]),  # children only: * never crosses a dot
        ("encoder.**", NAMES[1:7]),  # everything below encoder
        ("encoder.layer.*.attn", ["encoder.layer.0.attn", "encoder.layer.1.attn"]),
        ("**.attn", ["encoder.layer.0.attn", "encoder.layer.1.attn", "attn", "decoder.attn"]),
        ("encoder.**.attn", ["encoder.layer.0.attn", "encoder.layer.1.attn"]),
        ("*", ["encoder", "attn", "head"]),  # top-level modules
        ("**", NAMES),
        ("encoder.layer.?", ["encoder.layer.0"]),
        ("encoder.layer.[!0]", []),  # layer 1 has no module of its own in NAMES
        ("encoder.layer.[!0].attn", ["encoder.layer.1.attn"]),
        ("encoder.layer.[01].attn.q", ["encoder.layer.0.attn.q"]),
        ("head", ["head"]),
        ("hea", []),  # a glob matches the whole name
    ],
)
def test_globs_star_within_a_segment_double_star_across(pattern: str, expected: list[str]) -> None:
    assert _selected(pattern) == expected


def test_glob_special_characters_are_literal() -> None:
    assert glob_regex("a+b.(c)").match("a+b.(c)")
    assert not glob_regex("a.b").match("aXb")  # a dot is a dot, not "any character"
    assert glob_regex("x[]]y").match("x]y")  # as fnmatch: a first "]" in a class is literal
    assert glob_regex("x[^a]y").match("x^y") and not glob_regex("x[^a]y").match("xby")


def _class_in(module: str, name: str, base: type[nn.Module] = nn.Module) -> type[nn.Module]:
    """A module class as if defined in the Python module ``module`` (how the rule tells them apart)."""
    return type(name, (base,), {"__module__": module, "forward": lambda self, x: x * 2})


@pytest.mark.parametrize(
    ("where", "found"),
    [
        ("transformers.activations", True),
        ("timm.layers.activations", True),
        ("timm.layers.activations_me", True),
        ("mylib.activation", True),
        ("mylib.activation_checkpointing", False),  # a checkpoint wrapper is not an activation
        ("mylib.layers", False),
        ("activations.blocks", False),  # the module's own name counts, not a package above it
    ],
)
def test_activation_rule_reads_the_defining_module(where: str, found: bool) -> None:
    assert is_activation(_class_in(where, "Act")()) is found
    # a subclass defined elsewhere is still one of them, however deep
    child = _class_in("user.model", "MyAct", _class_in(where, "Act"))
    assert is_activation(child()) is found
    assert is_activation(_class_in("user.other", "Deeper", child)()) is found


def test_torch_activations_and_nothing_else_by_default() -> None:
    assert is_activation(nn.ReLU()) and is_activation(nn.GELU()) and is_activation(nn.Softmax(dim=1))
    assert not is_activation(nn.Linear(2, 2)) and not is_activation(nn.MultiheadAttention(4, 2))


def test_output_norm_records_a_third_party_activation(tmp_path: Path) -> None:
    act = _class_in("somelib.activations", "Swish")
    model = nn.Sequential(nn.Linear(3, 4), act(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with nt.Recorder(tmp_path / "run", lenses=[nt.OutputNorm()]) as rec:
        rec.attach(model)
        model(x)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["modules"]["outputs"] == [{"name": "1", "class": "Swish"}]


class Wide(nn.Module):
    """60 Linear leaves and one ReLU: the default selection sees under 5% of it."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(60))
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.act(x)


def test_a_large_model_barely_observed_gets_a_warning(tmp_path: Path) -> None:
    with pytest.warns(
        UserWarning, match=re.escape("OutputNorm selects 1 of the 61 leaf modules of Wide (act)")
    ):
        rec = nt.Recorder(tmp_path / "a", lenses=[nt.OutputNorm()]).attach(Wide())
    rec.close()
    notes = json.loads((tmp_path / "a" / "meta.json").read_text())["notes"]
    assert any("few_output_modules" in json.dumps(n) for n in notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # selecting the layers is enough: no warning
        nt.Recorder(tmp_path / "b", lenses=[nt.OutputNorm(include=["layers.*"])]).attach(Wide()).close()
        small = nn.Sequential(*(nn.Linear(2, 2) for _ in range(10)), nn.ReLU())  # under 50 leaves
        nt.Recorder(tmp_path / "c", lenses=[nt.OutputNorm()]).attach(small).close()


def test_selectors_are_checked_and_named_by_each_lens() -> None:
    with pytest.raises(
        TypeError, match=r"ActivationRate\(exclude=...\) takes nn.Module classes or name globs"
    ):
        nt.ActivationRate(exclude=[3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"^OutputGradientNorm\(include=...\) takes nn.Module classes"):
        nt.OutputGradientNorm(include=[None])  # type: ignore[list-item]
    # a class in exclude removes its instances, even those the default selects
    lens = nt.OutputNorm(include=[nn.Linear], exclude=[nn.ReLU, "skip"])
    assert [
        lens.selects(n, m) for n, m in [("a", nn.Linear(1, 1)), ("b", nn.ReLU()), ("skip", nn.Tanh())]
    ] == [
        True,
        False,
        False,
    ]
    # one class or one glob alone is a selection of one
    assert nt.OutputNorm(include=nn.Linear).include == (nn.Linear,)  # type: ignore[arg-type]
    assert nt.OutputGradientNorm(include="net.*").include == ("net.*",)


HINT = (
    "pass include=[...] with module classes (include=[nn.Linear]) or name globs "
    "(include=['encoder.layer.*.output'])"
)


class Leaves(nn.Module):
    """``linears`` Linear leaves and ``acts`` ReLU leaves named act0, act1, …"""

    def __init__(self, linears: int, acts: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(linears))
        for i in range(acts):
            self.add_module(f"act{i}", nn.ReLU())


def _few_warning(tmp_path: Path, model: nn.Module) -> str | None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nt.Recorder(tmp_path, lenses=[nt.OutputNorm()]).attach(model).close()
    found = [str(w.message) for w in caught if "leaf modules" in str(w.message)]
    assert len(found) <= 1
    return found[0] if found else None


@pytest.mark.parametrize(
    ("linears", "acts", "expected"),
    [
        (49, 1, "OutputNorm selects 1 of the 50 leaf modules of Leaves (act0)"),  # 50 leaves: the threshold
        (48, 1, None),  # 49 leaves: too small a model to judge
        (57, 3, None),  # 3 of 60 is exactly 5%: not under it
        (58, 3, "OutputNorm selects 3 of the 61 leaf modules of Leaves (act0, act1, act2)"),  # no ellipsis
        (96, 4, "OutputNorm selects 4 of the 100 leaf modules of Leaves (act0, act1, act2, …)"),
    ],
)
def test_the_few_modules_warning_at_its_edges(tmp_path, linears, acts, expected) -> None:
    message = _few_warning(tmp_path, Leaves(linears, acts))
    if expected is None:
        assert message is None
    else:
        assert message == (
            f"{expected}: its activations may be functions or classes the default does not know; {HINT}"
        )


def test_the_no_module_warning_says_how_to_select(tmp_path) -> None:
    with pytest.warns(UserWarning) as caught:
        nt.Recorder(tmp_path, lenses=[nt.OutputNorm()]).attach(nn.Linear(2, 2)).close()
    assert [str(w.message) for w in caught] == [
        "OutputNorm selects no module of Linear: it has no activation module (a function call such as "
        f"F.relu cannot be observed) and nothing matches include=...; {HINT}"
    ]


def test_config_spells_classes_by_their_dotted_path(tmp_path) -> None:
    lens = nt.OutputNorm(include=[nn.Linear, "head"], exclude=["x.*", nn.ReLU])
    assert lens.config() == {
        "type": "OutputNorm",
        "include": ["torch.nn.modules.linear.Linear", "head"],
        "exclude": ["x.*", "torch.nn.modules.activation.ReLU"],
        "skip_no_grad_pass": True,
        "normalize_by_size": False,
    }
    assert nt.ActivationRate(include=[nn.Tanh]).config() == {
        "type": "ActivationRate",
        "include": ["torch.nn.modules.activation.Tanh"],
        "exclude": [],
        "skip_no_grad_pass": True,
    }


@pytest.mark.parametrize("few", [False, True], ids=["none selected", "few selected"])
def test_the_selection_warnings_point_at_the_users_attach_call(tmp_path, few: bool) -> None:
    model = Leaves(60, 1) if few else nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="leaf modules" if few else "selects no module") as caught:
        nt.Recorder(tmp_path, lenses=[nt.OutputNorm()]).attach(model).close()
    assert [Path(w.filename).name for w in caught] == ["test_selection.py"]


class Tied(nn.Module):
    """An encoder and a decoder sharing one weight, a LayerNorm, and a frozen bias."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.dec = nn.Linear(3, 4)
        self.head = nn.Linear(4, 1)
        self.head.bias.requires_grad_(False)
        self.dec.weight = self.enc.weight  # tied: (3, 4), used transposed in forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.enc(x))
        return self.head(h @ self.dec.weight + self.dec.bias)


@pytest.mark.parametrize(
    ("options", "want"),
    [
        ({}, {"enc.weight", "enc.bias", "norm.weight", "norm.bias", "dec.bias", "head.weight"}),
        ({"include": [nn.LayerNorm]}, {"norm.weight", "norm.bias"}),
        ({"include": ["*e*"]}, {"enc.weight", "enc.bias", "dec.bias", "head.weight"}),
        ({"exclude": [nn.Linear]}, {"norm.weight", "norm.bias"}),
        ({"exclude": ["enc"]}, {"norm.weight", "norm.bias", "dec.weight", "dec.bias", "head.weight"}),
        ({"parameters": ["bias"], "exclude": ["norm"]}, {"enc.bias", "dec.bias"}),
    ],
    ids=["all", "include class", "include glob", "exclude class", "exclude first module", "names"],
)
def test_parameter_lenses_select_by_class_glob_and_name_and_record_a_tied_weight_once(
    tmp_path, options, want
):
    """Every trainable parameter once, under the first name it is met by (the tied ``dec.weight`` is
    ``enc.weight``; excluding ``enc`` leaves it to ``dec``); a frozen one never; include/exclude by class
    or by glob of the module's name, and modules after an excluded one still selected."""
    model = Tied()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with nt.Recorder(tmp_path, lenses=[nt.GradientNorm(**options)]) as rec:
        rec.attach(model, optimizer=opt)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(5, 4)).sum().backward()
            opt.step()
    rows = read_table(tmp_path, "signals").to_pylist()
    names = [f"{r['module']}.{r['param']}" for r in rows if r["step"] == 0]
    assert sorted(names) == sorted(want)  # each once
    assert len(rows) == 2 * len(want)


@pytest.mark.parametrize("lens", ["GradientNorm", "UpdateRatio", "ParameterNorm"])
def test_a_parameter_lens_selecting_nothing_warns_at_the_users_attach_call(tmp_path, lens: str) -> None:
    """The warning names the user's line, not normtrace's (GradientNorm's and UpdateRatio's pointed at
    recorder.py: one helper more between them and the warning than the stack level allowed for)."""
    model = nn.Linear(2, 2)
    chosen = getattr(nt, lens)(parameters=["scale"])
    with pytest.warns(UserWarning, match=f"^{lens} (selects|finds) no") as caught:
        nt.Recorder(tmp_path, lenses=[chosen]).attach(
            model, optimizer=torch.optim.SGD(model.parameters())
        ).close()
    assert [Path(w.filename).name for w in caught] == ["test_selection.py"]


def test_parameter_lenses_describe_their_selection_in_meta_json(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lenses = [
        nt.GradientNorm(parameters=["weight"], include=[nn.Linear], exclude=["1"], cosine=True),
        nt.UpdateRatio(),
    ]
    with nt.Recorder(tmp_path, lenses=lenses) as rec:
        rec.attach(model, optimizer=opt)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["lenses"] == [
        {
            "type": "GradientNorm",
            "parameters": ["weight"],
            "include": ["torch.nn.modules.linear.Linear"],
            "exclude": ["1"],
            "cosine": True,
        },
        {"type": "UpdateRatio", "parameters": None, "include": [], "exclude": [], "cosine": False},
    ]


@pytest.mark.parametrize("lens", ["GradientNorm", "UpdateRatio"])
@pytest.mark.parametrize("arg", ["include", "exclude"])
def test_a_parameter_lens_refuses_a_bad_selector_naming_itself_and_the_argument(lens: str, arg: str) -> None:
    with pytest.raises(TypeError, match=rf"^{lens}\({arg}=\.\.\.\) takes nn\.Module classes"):
        getattr(nt, lens)(**{arg: [None]})
