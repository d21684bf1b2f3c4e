"""Small models and trace readers shared by the recorder tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import torch
from qnetwork import QNetwork  # examples/qnetwork.py, on pytest's pythonpath
from torch import nn
from torch.utils.checkpoint import checkpoint

SEED_OUTPUT_MODULES = ["net.relu1", "net.relu2", "net.relu3", "net.relu4", "net.output"]


def expected_output_norms(model: QNetwork, x: torch.Tensor) -> dict[str, float]:
    """Batch mean of per-sample L2 norms of each hooked module, computed layer by layer without hooks."""
    out: dict[str, float] = {}
    h = x
    with torch.no_grad():
        for name, layer in model.net.named_children():
            h = layer(h)
            if name.startswith("relu") or name == "output":
                out[f"net.{name}"] = torch.linalg.vector_norm(h.flatten(1), dim=1).mean().item()
    return out


def approx_output_norms(model: QNetwork, x: torch.Tensor) -> dict[str, Any]:
    """``expected_output_norms`` as ``pytest.approx`` values (relative 1e-5), to compare recorded rows to."""
    return {k: pytest.approx(v, rel=1e-5) for k, v in expected_output_norms(model, x).items()}


def norms_by_module(rows: list[dict[str, Any]], pass_: int | None = None) -> dict[str, float]:
    """Module name -> recorded norm of ``outputs`` rows, those of pass ``pass_`` only when given."""
    return {r["module"]: r["norm"] for r in rows if pass_ is None or r["pass"] == pass_}


def read_table(run_dir: Path, table: str) -> pa.Table:
    """Every shard of one table, concatenated in file order (pyarrow only, like any reader could)."""
    files = sorted((Path(run_dir) / table).glob("*.arrow"))
    if not files:
        return pa.table({})
    return pa.concat_tables(pa.ipc.open_file(f).read_all() for f in files)


def meta_of(run_dir: Path) -> dict[str, Any]:
    """Rank 0's ``meta.json`` as written now."""
    return json.loads((Path(run_dir) / "meta.json").read_text())


def notes(run_dir: Path) -> list[tuple[str, str, str]]:
    """The run's notes (rank 0's ``meta.json``) as (module, kind, detail), in the order recorded."""
    return [(n["module"], n["kind"], n["detail"]) for n in meta_of(run_dir)["notes"]]


class Checkpointed(nn.Module):
    """``model = Sequential(Linear, Sequential(Linear, ReLU))`` whose inner block runs under
    ``torch.utils.checkpoint``: recomputed during backward (``model.1.1`` is the ReLU)."""

    def __init__(self, reentrant: bool = False) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.model[1], self.model[0](x), use_reentrant=self.reentrant)
