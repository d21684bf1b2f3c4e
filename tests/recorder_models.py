"""Small models and trace readers shared by the recorder tests."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch
from qnetwork import QNetwork  # examples/qnetwork.py, on pytest's pythonpath

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


def read_table(run_dir: Path, table: str) -> pa.Table:
    """Every shard of one table, concatenated in file order (pyarrow only, like any reader could)."""
    files = sorted((Path(run_dir) / table).glob("*.arrow"))
    if not files:
        return pa.table({})
    return pa.concat_tables(pa.ipc.open_file(f).read_all() for f in files)
