"""Samples of torch.nn's sequence modules: an RNN, LSTM, GRU, attention or transformer run sequence first
(``batch_first=False``, their default) holds its batch in dim 1, an RNN's hidden states always do, and an
unbatched input is one sample. The recorded norms are batch means of per-sample norms taken directly with
torch over the right dims, whatever the layout."""

from __future__ import annotations

import copy

import pytest
import torch
from recorder_models import read_table
from torch import Tensor, nn

import normtrace as nt


class Wrapped(nn.Module):
    """One sequence module under a root, so that its records are named ``seq``, ``seq.0``, ``seq.1.0``..."""

    def __init__(self, seq: nn.Module) -> None:
        super().__init__()
        self.seq = seq

    def forward(self, *args: Tensor) -> object:
        return self.seq(*args)


def _per_sample(x: Tensor, dim: int | None) -> tuple[float, int, int]:
    """(batch mean of per-sample L2 norms, samples, elements per sample), samples along ``dim`` (None: one
    sample), taken sample by sample."""
    samples = [x] if dim is None else list(x.unbind(dim))
    norms = [torch.linalg.vector_norm(s.double()).item() for s in samples]
    return sum(norms) / len(norms), len(samples), samples[0].numel()


def _check(rows: dict[str, dict], name: str, x: Tensor, dim: int | None) -> None:
    norm, batch, numel = _per_sample(x, dim)
    assert rows[name]["norm"] == pytest.approx(norm, rel=1e-5), name
    assert (rows[name]["batch"], rows[name]["numel"]) == (batch, numel), name


def _run(tmp_path, seq: nn.Module, *inputs: Tensor) -> tuple[dict[str, dict], object]:
    """Record one pass of ``seq`` under a root; return its rows and the output of an untraced copy."""
    twin = copy.deepcopy(seq)
    model = Wrapped(seq)
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[type(seq)])]) as rec:
        rec.attach(model)
        model(*inputs)
    with torch.no_grad():
        out = twin(*inputs)
    return {r["module"]: r for r in read_table(tmp_path, "outputs").to_pylist()}, out


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("first", [False, True])
def test_rnn_outputs_hold_the_batch_where_batch_first_says_and_hidden_states_in_dim_1(
    tmp_path, cls: type[nn.RNNBase], first: bool
) -> None:
    torch.manual_seed(1)
    rnn = cls(3, 5, num_layers=2, batch_first=first)
    x = torch.randn(4, 6, 3) if first else torch.randn(6, 4, 3)  # 4 sequences of 6 steps
    rows, (out, hidden) = _run(tmp_path, rnn, x)
    _check(rows, "seq.0", out, 0 if first else 1)
    states = hidden if isinstance(hidden, tuple) else (hidden,)
    names = ["seq.1.0", "seq.1.1"] if isinstance(hidden, tuple) else ["seq.1"]
    assert sorted(rows) == sorted(["seq.0", *names])
    for name, state in zip(names, states, strict=True):
        _check(rows, name, state, 1)  # (layers, batch, hidden)
    assert {r["batch"] for r in rows.values()} == {4}


def test_an_unbatched_sequence_is_one_sample(tmp_path) -> None:
    torch.manual_seed(2)
    lstm = nn.LSTM(3, 5, num_layers=2)
    x = torch.randn(6, 3)  # one sequence of 6 steps, no batch dim
    rows, (out, (h, c)) = _run(tmp_path, lstm, x)
    for name, tensor in (("seq.0", out), ("seq.1.0", h), ("seq.1.1", c)):
        _check(rows, name, tensor, None)
        assert rows[name]["batch"] == 1


@pytest.mark.parametrize("first", [False, True])
def test_attention_output_and_weights(tmp_path, first: bool) -> None:
    torch.manual_seed(3)
    attention = nn.MultiheadAttention(8, 2, batch_first=first)
    q = torch.randn(3, 5, 8) if first else torch.randn(5, 3, 8)  # 3 sequences of 5
    rows, (out, weights) = _run(tmp_path, attention, q, q, q)
    _check(rows, "seq.0", out, 0 if first else 1)
    _check(rows, "seq.1", weights, 0)  # (batch, target, source), whatever batch_first says
    assert rows["seq.0"]["batch"] == rows["seq.1"]["batch"] == 3


@pytest.mark.parametrize("first", [False, True])
def test_transformer_layers_and_stacks(tmp_path, first: bool) -> None:
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=first)
    x = torch.randn(3, 5, 8) if first else torch.randn(5, 3, 8)
    rows, out = _run(tmp_path / "layer", layer, x)
    _check(rows, "seq", out, 0 if first else 1)
    stack = nn.TransformerEncoder(copy.deepcopy(layer), 2, enable_nested_tensor=False)
    rows, out = _run(tmp_path / "stack", stack, x)
    _check(rows, "seq", out, 0 if first else 1)
    assert rows["seq"]["batch"] == 3


def test_a_sequence_first_transformers_output_gradient_holds_the_batch_in_dim_1(tmp_path) -> None:
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)  # sequence first, the default
    x = torch.randn(5, 3, 8)
    twin = copy.deepcopy(layer)
    model = Wrapped(layer)
    with nt.Recorder(tmp_path, lenses=[nt.OutputGradientNorm(include=[nn.TransformerEncoderLayer])]) as rec:
        rec.attach(model)
        model(x).pow(2).sum().backward()
    with torch.no_grad():
        want, _, _ = _per_sample(2 * twin(x), 1)  # the gradient of sum(out²) is 2·out
    (row,) = read_table(tmp_path, "signals").to_pylist()
    assert (row["kind"], row["module"]) == ("output_grad_norm", "seq")
    assert row["value"] == pytest.approx(want, rel=1e-5)


def test_other_modules_keep_dim_0_for_three_d_outputs(tmp_path) -> None:
    """A module that is not one of torch.nn's sequence modules: dim 0 is the batch, as before."""
    torch.manual_seed(6)
    x = torch.randn(4, 6, 3)
    rows, out = _run(tmp_path, nn.Linear(3, 5), x)
    _check(rows, "seq", out, 0)
