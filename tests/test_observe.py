"""``observe.py``'s class swap seen from outside: the observed class wears its original's names, pickles
back to the original under every pickle protocol, and a handle removed twice is removed once."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from normtrace.observe import after_forward


@pytest.fixture
def observed() -> tuple[nn.Sequential, list[int]]:
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    calls: list[int] = []
    after_forward(model[1], lambda module, args, out: calls.append(out.numel()))
    return model, calls


def test_the_observed_class_wears_its_originals_names(observed) -> None:
    model, _ = observed
    cls = type(model[1])
    assert cls is not nn.ReLU and issubclass(cls, nn.ReLU)
    assert (cls.__module__, cls.__qualname__, cls.__name__) == ("torch.nn.modules.activation", "ReLU", "ReLU")
    assert repr(cls) == repr(nn.ReLU) and repr(model) == repr(nn.Sequential(nn.Linear(3, 2), nn.ReLU()))


def test_a_nested_class_keeps_its_qualified_name() -> None:
    class Outer:
        class Act(nn.ReLU):
            pass

    module = Outer.Act()
    after_forward(module, lambda m, a, out: None)
    assert type(module) is not Outer.Act and type(module).__qualname__ == Outer.Act.__qualname__
    assert type(module).__qualname__.endswith("<locals>.Outer.Act")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol_gives_back_the_original_class(observed, protocol: int) -> None:
    model, calls = observed
    copy = pickle.loads(pickle.dumps(model, protocol=protocol))
    assert type(copy[1]) is nn.ReLU and type(copy[0]) is nn.Linear
    x = torch.randn(4, 3)
    assert torch.equal(copy(x), model(x))
    assert calls == [8]  # only the observed original ran its observer


def test_a_handle_removed_twice_is_removed_once() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU())
    first: list[int] = []
    second: list[int] = []
    handle = after_forward(model[1], lambda m, a, out: first.append(1))
    after_forward(model[1], lambda m, a, out: second.append(1))
    handle.remove()
    handle.remove()  # as torch's RemovableHandle: a no-op the second time
    model(torch.randn(1, 3))
    assert (first, second) == ([], [1]) and type(model[1]) is not nn.ReLU  # the other observer stays
