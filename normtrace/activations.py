"""``ActivationRate``: how much of each selected output is non-zero, and which channels are dead, per pass.

Records into ``signals`` through the lens protocol (``recording``). Per observed call, a handful of
kernels on the output's device with grad mode off; the two values stay on the device until the writer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normtrace.gradients import signal_module
from normtrace.lenses import graph_task_id, is_data_parallel_replica
from normtrace.observe import Removable, after_forward
from normtrace.recording import Recording, Target
from normtrace.selection import ModuleSelection

KINDS = ("active_rate", "dead_fraction")

FLOAT_MASK_DEVICES = frozenset({"cpu"})
"""Devices where the mask of non-zero entries is written as float32 ones: a bool mask is three times slower
to write on CPU. Elsewhere it is a bool mask, a quarter of the memory."""


def activation_rates(x: Tensor) -> Tensor | None:
    """``[active_rate, dead_fraction]`` of an output, as a float32 tensor on its device (None if empty).

    ``active_rate``: the fraction of elements that are non-zero. ``dead_fraction``: the fraction of
    channels that are zero for every sample and every position of the batch, a channel being an index of
    dim 1 (the features of a ``(batch, features)`` output, the channels of ``(batch, C, H, W)``); a 0-d or
    1-d output is one sample whose elements are the channels.
    """
    if x.ndim < 2:
        x = x.reshape(1, -1)
    if x.numel() == 0:
        return None
    # per channel, the share of its entries that are non-zero: active_rate is their mean (every channel
    # has as many entries), dead_fraction the share of channels whose share is 0 (exactly: one non-zero
    # entry makes a share > 0). Four small operations after the per-channel reduction, where counting
    # took six (seven on a conv map; benchmarks/activation_kernel.py).
    if x.device.type in FLOAT_MASK_DEVICES:
        nonzero = torch.ne(x, 0, out=torch.empty(x.shape, dtype=torch.float32))
    else:
        nonzero = torch.ne(x, 0)
    share = nonzero.mean(0 if x.ndim == 2 else [0, *range(2, x.ndim)], dtype=torch.float32)
    dead = torch.eq(share, 0, out=torch.empty_like(share))
    return torch.stack((share, dead)).mean(1)


@dataclass
class ActivationRate(ModuleSelection):
    """Per recorded pass and selected module output: ``active_rate`` and ``dead_fraction`` (see
    ``activation_rates``) as ``signals`` rows.

    Selects as ``OutputNorm``: the activation modules, plus ``include``, minus ``exclude``;
    ``skip_no_grad_pass`` skips passes run under ``torch.no_grad``. Outputs that are not a single tensor
    are skipped.
    """

    skip_no_grad_pass: bool = True

    def config(self) -> dict[str, Any]:
        """JSON-ready description for the run metadata."""
        return {**super().config(), "skip_no_grad_pass": self.skip_no_grad_pass}

    def attach(self, target: Target, recording: Recording) -> list[Removable]:
        """Observe the output of every selected module."""
        chosen = self.chosen(target, recording, "no_activation_modules")
        return [after_forward(module, self._hook(recording, name, module)) for name, module in chosen]

    def _hook(
        self, recording: Recording, name: str, owner: nn.Module
    ) -> Callable[[nn.Module, Any, Any], None]:
        skip_no_grad = self.skip_no_grad_pass
        local, outside_pass = recording.local, recording.outside_pass
        module_name = signal_module(name)
        calls: list[Any] = [None, 0]  # (pass, calls in it) of the last call seen, for name#k labels
        # the same keys object every pass: the writer codes a record's strings once per distinct object
        first = ((module_name, None), (module_name, None))
        repeats: dict[int, tuple[tuple[str, None], ...]] = {}  # the k-th call's keys, name#k

        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if module is not owner and not is_data_parallel_replica(module):
                return
            grad = torch.is_grad_enabled()
            if (skip_no_grad and not grad) or type(out) is not Tensor:
                return
            try:
                pass_, _, state = local.state
            except AttributeError:
                pass_, _, state = outside_pass(module)
            if state is None or graph_task_id() != -1:
                return  # a pass that records nothing, or a recomputation in backward (checkpointing)
            if calls[0] == pass_:
                calls[1] += 1
                keys = repeats.get(calls[1])
                if keys is None:
                    label = f"{module_name}#{calls[1]}"
                    keys = repeats[calls[1]] = ((label, None), (label, None))
            else:
                calls[0], calls[1] = pass_, 0
                keys = first
            try:
                with torch.no_grad():
                    values = activation_rates(out)
                if values is not None:
                    recording.add_signals(KINDS, keys, values, pass_=pass_)
            except Exception as exc:  # the training loop must never break
                recording.note(name, "hook_error", f"ActivationRate: {type(exc).__name__}: {exc}")

        return hook
