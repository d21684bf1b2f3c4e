"""What the framework callbacks share: the Recorder's life cycle, deferred epoch ticks, learning-rate events.

Both frameworks evaluate and save checkpoints *after* the hook that ends a training epoch (Hugging Face:
``on_epoch_end`` comes before the epoch's evaluation and save; Lightning: metrics logged in
``LightningModule.on_train_epoch_end`` reach ``trainer.logged_metrics`` after the callbacks' hook). So
the epoch is closed (``Recorder.tick_epoch``) at the next epoch's start or at the end of training: the
evaluation, the checkpoint and the epoch's metrics of epoch ``k`` all carry ``epoch == k``, and the
parameter norms are those at the end of epoch ``k`` (nothing trains in between).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from normtrace.lenses import Lens, default_lenses
from normtrace.recorder import Recorder

LR_STEP = "lr_step"
"""Event marked when the learning rate starts to change (see :class:`LearningRates`)."""
CHECKPOINT = "checkpoint"
"""Event marked when the framework saves a checkpoint."""
VALIDATION = "validation"
"""Event marked when the framework finishes an evaluation of the validation set."""


def missing(framework: str, extra: str, exc: ImportError) -> ImportError:
    """The ImportError raised when a framework callback is imported without its framework."""
    return ImportError(
        f"normtrace.integrations.{extra} needs {framework}, which is not installed ({exc}); "
        f"install it with: pip install 'normtrace[{extra}]'"
    )


def scalar(value: Any) -> float | torch.Tensor | None:
    """A logged value as the Recorder takes it (a number, or a one-element tensor kept on its device),
    or None for anything else (strings, lists, dicts), which is not recorded."""
    if isinstance(value, torch.Tensor):
        return value if value.numel() == 1 and not value.is_complex() else None
    if isinstance(value, numbers.Real):
        return float(value)
    return None


class LearningRates:
    """Follows an optimizer's learning rates between checks.

    ``check()`` returns whether they changed (record them as the ``lr`` metric) and whether the change
    is an ``lr_step`` event: a change after at least one check without change. A step schedule
    (``StepLR``, ``MultiStepLR``, ``ReduceLROnPlateau``) therefore marks every drop, and a schedule that
    changes the rate at every step (linear, cosine) marks only where it starts moving — an event per
    step would cover every pass and mean nothing. The rates themselves are in the ``lr`` metric.
    """

    def __init__(self) -> None:
        self._last: tuple[float, ...] | None = None
        self._moving = False

    def check(self, rates: Sequence[float]) -> tuple[bool, bool]:
        """``(changed, event)`` for the current rates (the first check is a change, not an event)."""
        current = tuple(float(r) for r in rates)
        if current == self._last:
            self._moving = False
            return False, False
        event = self._last is not None and not self._moving and len(current) == len(self._last)
        self._moving = self._last is not None
        self._last = current
        return True, event


def optimizer_rates(optimizers: Iterable[Any]) -> list[float]:
    """The learning rate of every parameter group of ``optimizers`` (numbers only), in order."""
    rates = []
    for opt in optimizers:
        for group in getattr(opt, "param_groups", ()):
            lr = group.get("lr")
            if isinstance(lr, torch.Tensor) and lr.numel() == 1:
                lr = lr.item()  # a tensor lr (capturable optimizers) is read once per check
            if isinstance(lr, numbers.Real) and math.isfinite(lr):
                rates.append(float(lr))
    return rates


def json_values(config: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``config`` with string keys and JSON values (a framework's hyperparameters may hold
    objects: a loss module, a callable; those are left out rather than failing the run)."""
    out = {}
    for key, value in config.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        if isinstance(key, str):
            out[key] = value
    return out


class Session:
    """One training run's Recorder, created at fit start and closed at the end (or on an error)."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None,
        lenses: Sequence[Lens] | None,
        lr_events: bool,
        recorder_options: Mapping[str, Any],
    ) -> None:
        self.run_dir = run_dir
        self.lenses = tuple(default_lenses() if lenses is None else lenses)
        self.lr_events = lr_events
        self.recorder_options = dict(recorder_options)
        self.recorder: Recorder | None = None
        self._rates = LearningRates()
        self._epoch_ended = False

    def start(self, model: nn.Module, config: Mapping[str, Any] | None = None) -> Recorder:
        """Create the Recorder (in the process's final rank: the framework has set up distribution by
        now) and attach it to ``model``. A recorder left open by a run that raised is closed first.
        ``config``, the framework's hyperparameters, becomes the run's ``config`` (its JSON values only)
        unless the user passed ``config=`` to the callback."""
        self.close("failed")
        self._rates = LearningRates()
        self._epoch_ended = False
        options = dict(self.recorder_options)
        if config is not None and "config" not in options:
            options["config"] = json_values(config)
        self.recorder = Recorder(self.run_dir, self.lenses, **options)
        self.recorder.attach(model)
        return self.recorder

    @property
    def epoch_ended(self) -> bool:
        """Whether a training epoch has ended and is not closed yet."""
        return self._epoch_ended

    def end_epoch(self) -> None:
        """The training epoch's last batch is done; the epoch is closed by :meth:`open_epoch`."""
        self._epoch_ended = self.recorder is not None

    def open_epoch(self) -> bool:
        """Close the previous epoch if it ended (``tick_epoch``); True when it did."""
        if not (self._epoch_ended and self.recorder is not None):
            return False
        self._epoch_ended = False
        self.recorder.tick_epoch()
        return True

    def learning_rates(self, rates: Sequence[float]) -> None:
        """Record the rates (metric ``lr``, ``lr/1``, … per group) when they change, and ``lr_step``."""
        if self.recorder is None or not self.lr_events or not rates:
            return
        changed, event = self._rates.check(rates)
        if event:
            self.recorder.event(LR_STEP)
        if changed:
            for i, lr in enumerate(rates):
                self.recorder.push_metric("lr" if i == 0 else f"lr/{i}", lr, split="train")

    def event(self, name: str) -> None:
        if self.recorder is not None:
            self.recorder.event(name)

    def metric(self, name: str, value: Any, split: str | None) -> bool:
        """Push one logged value if it is a number; False when it is not (and nothing was recorded)."""
        value = scalar(value)
        if self.recorder is None or value is None:
            return False
        self.recorder.push_metric(name, value, split=split)
        return True

    def loss(self, value: Any, *, train: bool) -> None:
        value = scalar(value)
        if self.recorder is not None and value is not None:
            self.recorder.push_loss(value, train=train)

    def close(self, status: str = "closed") -> None:
        """Close the epoch if one ended, then the Recorder (``status`` "failed" after an exception)."""
        rec, self.recorder = self.recorder, None
        if rec is None:
            return
        try:
            if self._epoch_ended and status == "closed":
                rec.tick_epoch()
        finally:
            self._epoch_ended = False
            rec.close(status)
