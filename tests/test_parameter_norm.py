"""``ParameterNorm``'s description of itself and of what it records (meta.json's ``lenses``, ``modules``
and ``normalize`` entries, which the analysis reads), and its refusals, each naming the argument."""

from __future__ import annotations

import json

import pytest
from torch import nn

import normtrace as nt


class Custom(nn.Module):
    """A module with a weight of its own and no bias, holding a Linear (which has both)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(nn.init.ones_(nn.Linear(2, 2).weight.detach().clone()))
        self.inner = nn.Linear(2, 2)


@pytest.mark.parametrize("normalize", [False, True])
def test_meta_json_lists_the_modules_whose_parameters_are_recorded(tmp_path, normalize: bool) -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.LayerNorm(3), Custom())
    with nt.Recorder(tmp_path, lenses=[nt.ParameterNorm(normalize_by_size=normalize)]) as rec:
        rec.attach(model)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["lenses"] == [
        {"type": "ParameterNorm", "parameters": ["weight", "bias"], "normalize_by_size": normalize}
    ]
    # Custom has a weight but no bias of its own: only its inner Linear has both
    assert meta["modules"]["params"] == [
        {"name": "0", "class": "Linear", "params": ["weight", "bias"]},
        {"name": "2", "class": "LayerNorm", "params": ["weight", "bias"]},
        {"name": "3.inner", "class": "Linear", "params": ["weight", "bias"]},
    ]
    assert meta["normalize"]["params"] is normalize


def test_parameters_must_be_a_sequence_of_names() -> None:
    for bad in ("weight", ["weight", 3]):
        with pytest.raises(TypeError) as info:
            nt.ParameterNorm(parameters=bad)  # type: ignore[arg-type]
        assert str(info.value) == f"ParameterNorm(parameters=...) takes a sequence of names, got {bad!r}"


def test_a_model_without_the_parameters_asked_is_warned_about_by_name(tmp_path) -> None:
    with pytest.warns(UserWarning) as caught:
        nt.Recorder(tmp_path, lenses=[nt.ParameterNorm(parameters=["weight", "scale"])]).attach(
            nn.Sequential(nn.Linear(2, 2))
        ).close()
    assert [str(w.message) for w in caught] == [
        "ParameterNorm finds no module of Sequential that has all of 'weight', 'scale'; pass "
        "parameters=['weight'] for layers without a bias"
    ]
