"""Small models and trace readers shared by the recorder tests."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pyarrow as pa
import torch
from torch import nn

SEED_OUTPUT_MODULES = ["net.relu1", "net.relu2", "net.relu3", "net.relu4", "net.output"]


class QNetwork(nn.Module):
    """The seed notebook's 4x128 Q-network with an Identity output module."""

    def __init__(self, state_dim: int = 4, action_dim: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            OrderedDict(
                [
                    ("lin1", nn.Linear(state_dim, 128)),
                    ("relu1", nn.ReLU()),
                    ("lin2", nn.Linear(128, 128)),
                    ("relu2", nn.ReLU()),
                    ("lin3", nn.Linear(128, 128)),
                    ("relu3", nn.ReLU()),
                    ("lin4", nn.Linear(128, 128)),
                    ("relu4", nn.ReLU()),
                    ("lin_out", nn.Linear(128, action_dim)),
                    ("output", nn.Identity()),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


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
