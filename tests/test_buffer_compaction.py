"""Compaction of the pending norm tensors in a model with more observed modules than ``COMPACT_EVERY``:
by the output hook within a pass, and merging of the compacted chunks within one flush. The values must
come out exactly as recorded, whatever the batch sizes, in the order of the records."""

from __future__ import annotations

import torch
from recorder_models import read_table
from torch import nn

import normtrace as nt
from normtrace.buffer import COMPACT_EVERY, OUTPUT_FIELDS

WIDTH = 100  # observed modules: more than COMPACT_EVERY


class Wide(nn.Module):
    """WIDTH Identity modules, each scaling its input by its index + 1 (so each has its own norm)."""

    def __init__(self) -> None:
        super().__init__()
        self.acts = nn.ModuleList(nn.Identity() for _ in range(WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, act in enumerate(self.acts):
            act(x * (i + 1))
        return x


def _expected(x: torch.Tensor) -> list[float]:
    base = torch.linalg.vector_norm(x.double(), dim=1)
    return [(base * (i + 1)).mean().item() for i in range(WIDTH)]


def test_a_pass_of_many_modules_is_compacted_as_it_goes(tmp_path):
    model = Wide()
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])], flush_every=10**6) as rec:
        rec.attach(model)
        model(torch.randn(3, 5))
        pending = len(rec._buffer.outputs) // OUTPUT_FIELDS
        assert pending < COMPACT_EVERY  # not the whole pass's 100 tensors waiting for the next one


def test_chunks_merged_within_a_flush_keep_every_value_in_order(tmp_path):
    """Enough passes for more than COMPACT_EVERY compactions before the one flush at close; batch sizes
    change every few passes, so some chunks hold per-sample norms and are not merged."""
    model = Wide()
    xs = [torch.randn(2 + (p // 7) % 3, 5) for p in range(120)]
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])], flush_every=10**6) as rec:
        rec.attach(model)
        for x in xs:
            model(x)
            # after every pass, merged chunks have replaced the ones they join: one value per record
            held = sum(count for _, count, _ in rec._buffer.norm_chunks)
            assert held == len(rec._buffer.compacted) // OUTPUT_FIELDS
        chunks = rec._buffer.norm_chunks
        assert any(count > COMPACT_EVERY for _, count, _ in chunks)  # some were merged
        assert len(chunks) < 120 * WIDTH // COMPACT_EVERY  # fewer than one per compaction
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert len(rows) == 120 * WIDTH
    for p, x in enumerate(xs):
        got = [r["norm"] for r in rows[p * WIDTH : (p + 1) * WIDTH]]
        assert [r["pass"] for r in rows[p * WIDTH : (p + 1) * WIDTH]] == [p] * WIDTH
        assert [r["module"] for r in rows[p * WIDTH : (p + 1) * WIDTH]] == [f"acts.{i}" for i in range(WIDTH)]
        expected = _expected(x)
        assert all(abs(g - e) <= 1e-5 * e for g, e in zip(got, expected, strict=True)), p
