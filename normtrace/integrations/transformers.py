"""Record a Hugging Face ``Trainer`` with one line: ``Trainer(..., callbacks=[NormtraceCallback("runs/x")])``.

Needs ``pip install 'normtrace[transformers]'`` (``transformers`` and ``accelerate``, which its
``Trainer`` requires).

What is recorded, per the Recorder's lenses (default: ``OutputNorm()`` and ``ParameterNorm()``; the
default ``OutputNorm()`` finds transformers' own activation classes such as ``GELUActivation``, see
``normtrace.selection.is_activation``; pass ``OutputNorm(include=[...])`` with classes or name globs to
add layers):

- every log the Trainer makes (``on_log``, every ``logging_steps``): ``loss`` as the training loss
  (split ``train``), ``eval_loss`` as the validation loss (``loss``, split ``val``), every other number
  under its own name (``learning_rate``, ``grad_norm``, ``eval_runtime``, ``train_runtime``, …; the
  fractional ``epoch`` is left out: it is the row's ``epoch`` column);
- the learning rates (``lr``, ``lr/1``, … per parameter group) when they change, and events:
  ``lr_step`` when they start to change, ``checkpoint`` at each save, ``validation`` after each
  evaluation during training;
- epochs: the epoch is closed (parameter norms, ``tick_epoch``) when the next one starts or training
  ends, so the evaluation and checkpoint the Trainer makes at an epoch's end carry that epoch's number.

The Recorder is created at ``on_train_begin`` and attached to the Trainer's (unwrapped) model, so under
DDP every rank records its own shards in the same run directory; it is closed at ``on_train_end``. The
Trainer has no hook for an exception: a ``train()`` that raises leaves the Recorder open until the
interpreter exits (status ``exited``) or the next ``train()`` with this callback (status ``failed``);
call ``callback.close("failed")`` in your ``except`` block to close it at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from normtrace.integrations._common import CHECKPOINT, VALIDATION, Session, missing, optimizer_rates
from normtrace.lenses import Lens
from normtrace.recorder import Recorder

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only where transformers is absent
    raise missing("transformers", "transformers", exc) from exc

__all__ = ["NormtraceCallback"]

_NOT_METRICS = frozenset({"epoch", "step", "total_flos"})
"""Log keys that are counters, not measurements (the epoch and step are the row's own columns)."""


class NormtraceCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` that owns a :class:`~normtrace.Recorder` for each ``train()``.

    Parameters
    ----------
    run_dir:
        The run directory (local; default ``runs/<date>-<time>_<host>``). A second ``train()`` with the
        same callback needs a new directory or ``overwrite=True``.
    lenses:
        The Recorder's lenses; None for ``(OutputNorm(), ParameterNorm())``.
    lr_events:
        Record the learning rates and mark ``lr_step`` events (see ``LearningRates``).
    recorder_options:
        Passed to :class:`~normtrace.Recorder` (``run_name``, ``flush_every``, ``overwrite``, …).

    Example
    -------
    >>> trainer = Trainer(model, args, train_dataset=ds,
    ...                   callbacks=[NormtraceCallback("runs/bert", [OutputNorm(include=[nn.Linear])])])  # doctest: +SKIP
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        lenses: Sequence[Lens] | None = None,
        *,
        lr_events: bool = True,
        **recorder_options: Any,
    ) -> None:
        self._session = Session(run_dir, lenses, lr_events, recorder_options)

    @property
    def recorder(self) -> Recorder | None:
        """The Recorder of the current ``train()`` (None before it starts and after it ends)."""
        return self._session.recorder

    def close(self, status: str = "closed") -> None:
        """Close the Recorder now (``"failed"`` after a ``train()`` that raised); safe to call twice."""
        self._session.close(status)

    # ------------------------------------------------------------------ TrainerCallback events

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("NormtraceCallback: the Trainer passed no model to on_train_begin")
        self._session.start(model, args.to_dict() if hasattr(args, "to_dict") else None)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._session.open_epoch()

    def on_step_begin(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        if optimizer is not None:
            self._session.learning_rates(optimizer_rates([optimizer]))

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        for name, value in (logs or {}).items():
            if name == "loss":
                self._session.loss(value, train=True)
            elif name == "eval_loss":
                self._session.loss(value, train=False)
            elif name not in _NOT_METRICS:
                self._session.metric(name, value, "val" if name.startswith("eval_") else "train")

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._session.event(VALIDATION)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._session.event(CHECKPOINT)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._session.end_epoch()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._session.close("closed")
