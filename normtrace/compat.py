"""The seed library's (monitorch 0.1.0.7) lens names, mapped to normtrace's equivalents, so code written
for it ports by changing its imports: ``from normtrace.compat import ParameterGradientGeometry``.

Only the arguments that change what is measured are honoured; the seed's presentation options
(``inplace``, ``log_scale``, ``line_aggregation``, ``range_aggregation``, ``warning_plot``,
``*_aggregation``) are accepted and ignored, since normtrace records every value and the analysis
aggregates. Where the definitions differ, docs/recorder.md ("The seed library's lens names") says how.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from normtrace.activations import ActivationRate
from normtrace.gradients import GradientNorm, OutputGradientNorm, UpdateRatio
from normtrace.lenses import LossMetrics, OutputNorm, ParameterNorm
from normtrace.selection import is_activation, matches

PRESENTATION = frozenset(
    {
        "inplace",
        "log_scale",
        "line_aggregation",
        "range_aggregation",
        "warning_plot",
        "activation_aggregation",
        "death_aggregation",
        "comparison_plot",
        "comparison_aggregation",
    }
)
"""The seed's options that shape its plots, not its values."""


def _presentation_only(lens: str, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - PRESENTATION)
    if unknown:
        raise TypeError(f"{lens}() got unexpected keyword argument(s) {unknown}")


def _raw_norms_only(lens: str, normalize_by_size: bool, recorded: str) -> None:
    """The seed's ``normalize_by_size=True`` divides by sqrt(numel); normtrace records raw values: say so
    rather than record something else than asked without a word."""
    if normalize_by_size:
        warnings.warn(
            f"{lens}(normalize_by_size=True) is ignored: normtrace records {recorded}",
            UserWarning,
            stacklevel=3,
        )


def _names(parameters: str | Iterable[str]) -> tuple[str, ...]:
    return (parameters,) if isinstance(parameters, str) else tuple(parameters)


class ParameterGradientGeometry(GradientNorm):
    """``GradientNorm`` under the seed's name: ``compute_correlation`` is ``cosine`` (on by default, as
    there), ``parameters`` the parameter names (default weight and bias)."""

    def __init__(
        self,
        *,
        compute_correlation: bool = True,
        parameters: str | Iterable[str] = ("weight", "bias"),
        normalize_by_size: bool = False,
        **presentation: Any,
    ) -> None:
        _presentation_only(type(self).__name__, presentation)
        _raw_norms_only(
            type(self).__name__, normalize_by_size, "the raw L2 norm (its RMS is norm / sqrt(numel))"
        )
        super().__init__(parameters=_names(parameters), cosine=compute_correlation)


class ParameterUpdateGeometry(UpdateRatio):
    """``UpdateRatio`` under the seed's name. The optimizer is passed to ``Recorder.attach(model,
    optimizer=opt)``; passing it here too is accepted (it must be that one)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        compute_correlation: bool = True,
        parameters: str | Iterable[str] = ("weight", "bias"),
        normalize_by_size: bool = False,
        **presentation: Any,
    ) -> None:
        _presentation_only(type(self).__name__, presentation)
        _raw_norms_only(type(self).__name__, normalize_by_size, "the update ratio |Δθ|/|θ|, free of size")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"ParameterUpdateGeometry(optimizer=...): expected a torch.optim.Optimizer, got "
                f"{type(optimizer).__name__}"
            )
        super().__init__(parameters=_names(parameters), cosine=compute_correlation)


class OutputGradientGeometry(OutputGradientNorm):
    """``OutputGradientNorm`` over the seed's selection: every leaf module, activations too unless
    ``skip_activation`` (the default)."""

    def __init__(
        self,
        *,
        skip_activation: bool = True,
        compute_correlation: bool = True,
        normalize_by_size: bool = False,
        **presentation: Any,
    ) -> None:
        _presentation_only(type(self).__name__, presentation)
        _raw_norms_only(type(self).__name__, normalize_by_size, "the batch mean of per-sample L2 norms")
        super().__init__()
        self.skip_activation = skip_activation

    def selects(self, name: str, module: nn.Module) -> bool:
        """Leaf modules, but activations when ``skip_activation``."""
        leaf = next(module.children(), None) is None
        return leaf and not (self.skip_activation and is_activation(module))

    def config(self) -> dict[str, Any]:
        """JSON-ready description for the run metadata."""
        return {**super().config(), "skip_activation": self.skip_activation}


class OutputActivation(ActivationRate):
    """``ActivationRate`` under the seed's name: activations (``activation=True``), dropout
    (``dropout=True``) and ``include`` classes, minus ``exclude``; ``record_eval`` records ``no_grad``
    passes too."""

    def __init__(
        self,
        *,
        record_eval: bool = False,
        activation: bool = True,
        dropout: bool = True,
        include: Sequence[type[nn.Module]] = (),
        exclude: Sequence[type[nn.Module]] = (),
        evaluation_from_grad: bool = False,
        channel_last: bool = False,
        **presentation: Any,
    ) -> None:
        _presentation_only(type(self).__name__, presentation)
        if channel_last:
            raise ValueError(
                "OutputActivation(channel_last=True) is not supported: normtrace's channels are dim 1"
            )
        super().__init__(include=tuple(include), exclude=tuple(exclude), skip_no_grad_pass=not record_eval)
        self.activation, self.dropout = activation, dropout

    def selects(self, name: str, module: nn.Module) -> bool:
        """The seed's selection: activations and dropout as asked, plus ``include``, minus ``exclude``."""
        dropout = isinstance(module, nn.modules.dropout._DropoutNd)
        chosen = (
            (self.activation and is_activation(module))
            or (self.dropout and dropout)
            or matches(name, module, self.include)
        )
        return chosen and not matches(name, module, self.exclude)

    def config(self) -> dict[str, Any]:
        """JSON-ready description for the run metadata."""
        return {**super().config(), "activation": self.activation, "dropout": self.dropout}


__all__ = [
    "LossMetrics",
    "OutputActivation",
    "OutputGradientGeometry",
    "OutputNorm",
    "ParameterGradientGeometry",
    "ParameterNorm",
    "ParameterUpdateGeometry",
]
