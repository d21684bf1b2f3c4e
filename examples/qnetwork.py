"""The seed notebook's Q-network, verbatim: one definition for the examples, the tests and the benchmark.

Module names matter (``net.relu1`` … ``net.output``): they are what the recorder's lenses see.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class QNetwork(nn.Module):
    """The seed's 4x128 ReLU MLP; ``net.output`` is an Identity so OutputNorm can see the Q-values."""

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

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.net(X)
