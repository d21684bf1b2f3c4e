"""Record a ``lightning.pytorch`` training with one line: ``Trainer(callbacks=[NormtraceCallback("runs/x")])``.

Needs ``pip install 'normtrace[lightning]'`` (the ``lightning`` package; the older standalone
``pytorch_lightning`` package has its own ``Callback`` class, which this one is not).

What is recorded, per the Recorder's lenses (default: ``OutputNorm()`` and ``ParameterNorm()``):

- the training loss of every batch (``loss``, split ``train``): the ``loss`` that ``training_step``
  returns, read from the hook's ``outputs`` and kept on its device (no host sync);
- every value logged with ``self.log``: step values after each training batch, epoch values when the
  epoch closes (split ``train``), validation values after each validation run (split ``val``), under the
  names Lightning gives them (``train_loss_step``, ``train_loss_epoch``, ``val_loss``);
- the learning rates (``lr``, ``lr/1``, … per parameter group) when they change, and events:
  ``lr_step`` when they start to change, ``checkpoint`` at each save, ``validation`` after each
  validation run (not the sanity check);
- epochs: the epoch is closed (parameter norms, ``tick_epoch``) when the next one starts or training
  ends, so the epoch's validation, checkpoint and epoch-level metrics carry its number.

The Recorder is created at ``on_fit_start``, after Lightning has set up the processes, so under DDP
every rank records its own shards in the same run directory (``rank{r}-…``), and is closed at the end
of ``fit`` (status ``closed``) or when it raises (``failed``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from normtrace.integrations._common import CHECKPOINT, VALIDATION, Session, missing, optimizer_rates
from normtrace.lenses import Lens
from normtrace.recorder import Recorder

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as exc:  # pragma: no cover - exercised only where lightning is absent
    raise missing("lightning", "lightning", exc) from exc

__all__ = ["NormtraceCallback"]


class NormtraceCallback(Callback):
    """A Lightning callback that owns a :class:`~normtrace.Recorder` for each ``fit``.

    Parameters
    ----------
    run_dir:
        The run directory (local; default ``runs/<date>-<time>_<host>``). A second ``fit`` with the same
        callback needs a new directory or ``overwrite=True``.
    lenses:
        The Recorder's lenses; None for ``(OutputNorm(), ParameterNorm())``. A ``LossMetrics`` lens with
        a ``loss_fn`` would record the loss a second time: leave ``loss_fn`` out.
    module:
        Dotted attribute path of the submodule to attach (``"model"`` for ``self.model``) when
        ``training_step`` calls that rather than ``self(...)``: passes are counted on the attached
        module's forward. Default: the LightningModule itself (a ``training_step`` calling
        ``self.model(x)`` then still counts one pass per call, with a warning that suggests this).
    lr_events:
        Record the learning rates and mark ``lr_step`` events (see ``LearningRates``).
    recorder_options:
        Passed to :class:`~normtrace.Recorder` (``run_name``, ``flush_every``, ``overwrite``, …).

    Example
    -------
    >>> trainer = L.Trainer(max_epochs=10, callbacks=[NormtraceCallback("runs/mnist")])  # doctest: +SKIP
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        lenses: Sequence[Lens] | None = None,
        *,
        module: str | None = None,
        lr_events: bool = True,
        **recorder_options: Any,
    ) -> None:
        super().__init__()
        self._session = Session(run_dir, lenses, lr_events, recorder_options)
        self.module = module
        self._seen: dict[str, Any] = {}  # metric name -> the value object last seen
        self._step_names: set[str] = set()

    @property
    def recorder(self) -> Recorder | None:
        """The Recorder of the current ``fit`` (None before it starts and after it ends)."""
        return self._session.recorder

    # ------------------------------------------------------------------ life cycle

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._seen, self._step_names = {}, set()
        self._session.start(self._target(pl_module), dict(getattr(pl_module, "hparams", None) or {}))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._session.open_epoch()
        self._logged(trainer, "train")
        self._session.close("closed")

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._session.close("failed")

    # ------------------------------------------------------------------ training

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._close_epoch(trainer)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._session.learning_rates(optimizer_rates(trainer.optimizers))

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self._session.loss(loss, train=True)
        self._logged(trainer, "train", step=True)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._session.end_epoch()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close_epoch(trainer)

    # ------------------------------------------------------------------ validation, checkpoints

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or self.recorder is None:
            return
        self._logged(trainer, "val")
        self._session.event(VALIDATION)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self._session.event(CHECKPOINT)

    # ------------------------------------------------------------------ internals

    def _close_epoch(self, trainer: Any) -> None:
        """Push the ended epoch's logged values, then close it (see ``_common``)."""
        if self._session.epoch_ended:
            self._logged(trainer, "train")
        self._session.open_epoch()

    def _logged(self, trainer: Any, split: str, *, step: bool = False) -> None:
        """Push the values of ``trainer.logged_metrics`` logged since the last look.

        Lightning gives a metric a new tensor whenever it is logged (each step for step values, at each
        epoch or validation end for epoch values), so a value object not seen before is a new value. It
        also re-creates the last step values when a loop ends, so the names first seen after a training
        batch (step values) are pushed only after training batches.
        """
        if self.recorder is None:
            return
        for name, value in trainer.logged_metrics.items():
            if self._seen.get(name) is value:
                continue
            self._seen[name] = value
            if step:
                self._step_names.add(name)
            elif name in self._step_names:
                continue
            self._session.metric(name, value, split)

    def _target(self, pl_module: nn.Module) -> nn.Module:
        if self.module is None:
            return pl_module
        target: Any = pl_module
        for part in self.module.split("."):
            target = getattr(target, part, None)
            if target is None:
                break
        if not isinstance(target, nn.Module):
            raise ValueError(
                f"NormtraceCallback(module={self.module!r}): {type(pl_module).__name__} has no submodule "
                "at that attribute path"
            )
        return target
