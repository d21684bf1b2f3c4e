"""The lenses of outputs, parameters and losses. Each lens is a small configuration object that follows
the lens protocol (``recording.Lens``): ``attach`` installs its own observers (of a module's forward, see
``observe``; not PyTorch hooks, whose dispatch costs more) that record through a ``Recording``.

The hooks are the hot path. They never synchronise host and device: they launch one norm kernel on the
output with grad mode off and extend the buffer's flat ``outputs`` list with the record's plain values and
the resulting device tensor, in one call; the batch means are taken on the device every few
dozen records (see ``buffer.compact``), the transfer to the host and the Arrow conversion on the writer
thread.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from normtrace.buffer import COMPACT_VALUES
from normtrace.observe import Removable, after_forward
from normtrace.recording import Lens, Recording, Target, in_transform
from normtrace.selection import ACTIVATIONS, ModuleSelection, Selector

_ACCUMULATE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}
_FAST_DTYPES = frozenset({torch.float32, torch.float64})
vector_norm = torch.linalg.vector_norm
is_grad_enabled = torch.is_grad_enabled
set_grad_enabled = torch._C._set_grad_enabled  # what torch.no_grad() calls, without the context manager
is_exporting = torch.compiler.is_exporting
graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)
"""-1 except while autograd runs a backward: a forward then is a recomputation (``torch.utils.checkpoint``)."""


def sample_norms(x: Tensor, batch_dim: int | None = 0) -> Tensor | None:
    """Per-sample L2 norms of ``x``, on its device: samples along ``batch_dim`` (0 or 1), each flattened;
    ``batch_dim=None``, or a 0-d or 1-d tensor, is one sample.

    Returns None for an empty batch. Half precision is accumulated in float32 so large norms don't overflow.
    """
    x = x.detach()
    if batch_dim is None or x.ndim < 2:
        x, batch_dim = x.reshape(1, -1), 0
    if x.shape[batch_dim] == 0:
        return None
    if not (x.is_floating_point() or x.is_complex()):
        x = x.float()
    if batch_dim:  # a sequence-first batch: the norm over every other dim, without a copy
        dims: int | list[int] = [d for d in range(x.ndim) if d != batch_dim]
    else:
        dims = 1
        if x.ndim > 2:
            x = x.flatten(1)
    norms: Tensor = torch.linalg.vector_norm(x, dim=dims, dtype=_ACCUMULATE.get(x.dtype))
    return norms


_SEQUENCE_MODULES = (
    nn.RNNBase,
    nn.MultiheadAttention,
    nn.Transformer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def batch_first(module: nn.Module) -> bool | None:
    """For ``torch.nn``'s sequence modules (RNN, LSTM, GRU, attention, transformer), whether they hold
    the batch first, as their ``batch_first`` says (``False``, sequence first, is their default); None for
    any other module, whose outputs hold samples in dim 0."""
    if not isinstance(module, _SEQUENCE_MODULES):
        return None
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) and len(module.layers):
        module = module.layers[0]
    attention = getattr(module, "self_attn", None)  # a transformer layer: as its attention
    return bool(getattr(module if attention is None else attention, "batch_first", True))


def main_batch_dim(first: bool | None, x: Tensor) -> int | None:
    """The dim of the samples in a module's (main) output ``x``: 0 for any module but a sequence module;
    for one of these, 0 or 1 of a batched (3-d) output as ``first`` says, and None (one sample) for the
    2-d output of an unbatched input."""
    if first is None:
        return 0
    return (0 if first else 1) if x.ndim == 3 else None


def _output_leaves(module: nn.Module, label: str, out: Any) -> Iterator[tuple[str, Any, int | None]]:
    """``(suffixed name, leaf, batch dim)`` for the leaves of ``out`` (``_flatten_output``): dim 0, but
    where a sequence module's outputs say otherwise (``batch_first``): its main output; an RNN's hidden
    states, ``(layers, batch, hidden)`` whatever ``batch_first`` says; attention weights, batch first."""
    first = batch_first(module)
    if first is not None and isinstance(out, Tensor):  # a transformer's
        yield label, out, main_batch_dim(first, out)
        return
    if first is not None and isinstance(out, tuple) and len(out) == 2:  # (output, hidden or weights)
        main, other = out
        if isinstance(main, Tensor):
            yield f"{label}.0", main, main_batch_dim(first, main)
        else:  # an RNN's PackedSequence: its data hold the tokens of all sequences, one per row
            yield from ((name, leaf, 0) for name, leaf in _flatten_output(f"{label}.0", main))
        batched = not isinstance(main, Tensor) or main.ndim == 3
        second = (1 if isinstance(module, nn.RNNBase) else 0) if batched else None
        yield from ((name, leaf, second) for name, leaf in _flatten_output(f"{label}.1", other))
        return
    yield from ((name, leaf, 0) for name, leaf in _flatten_output(label, out))


def is_data_parallel_replica(module: nn.Module) -> bool:
    """Whether ``module`` is one of ``nn.DataParallel``'s per-device replicas, which share their original's
    class and hooks and are recorded as it is (a deepcopy is not: it is another model)."""
    return getattr(module, "_is_replica", False)


def _flatten_output(name: str, out: Any) -> Iterator[tuple[str, Any]]:
    """Yield ``(suffixed name, leaf)`` for the leaves of nested outputs: a NamedTuple's and a dataclass's
    fields by name (``enc.hidden``), a dict's by key (Hugging Face's ``ModelOutput`` is one: its fields that
    are set), a tuple's or list's items by index (``enc.0``); a leaf is itself."""
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        for key, item in zip(out._fields, out, strict=False):
            yield from _flatten_output(f"{name}.{key}", item)
    elif isinstance(out, (tuple, list)):
        for i, item in enumerate(out):
            yield from _flatten_output(f"{name}.{i}", item)
    elif isinstance(out, dict):
        for key, item in out.items():
            yield from _flatten_output(f"{name}.{key}", item)
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        for f in dataclasses.fields(out):
            yield from _flatten_output(f"{name}.{f.name}", getattr(out, f.name))
    else:
        yield name, out


@dataclass
class OutputNorm(ModuleSelection):
    """Norm of module outputs on every forward pass: batch mean of per-sample L2 norms.

    Observes the activation modules (``selection.is_activation``: ``torch.nn``'s, transformers' and
    timm's), plus ``include``, minus ``exclude`` (classes or name globs, see ``selection.Selector``).
    ``skip_no_grad_pass`` skips passes run under ``torch.no_grad`` (e.g. a DQN's acting passes).
    ``normalize_by_size`` is recorded in the run metadata; the raw norm and element count are always stored
    and the analysis divides by sqrt(numel) when asked.
    """

    skip_no_grad_pass: bool = True
    normalize_by_size: bool = False

    def config(self) -> dict[str, Any]:
        """JSON-ready description for the run metadata."""
        return {
            **super().config(),
            "skip_no_grad_pass": self.skip_no_grad_pass,
            "normalize_by_size": self.normalize_by_size,
        }

    def attach(self, target: Target, recording: Recording) -> list[Removable]:
        """Observe the output of every selected module (``observe.after_forward``); returns the handles."""
        chosen = self.chosen(target, recording, "no_output_modules")
        recording.describe("modules.outputs", [{"name": n, "class": type(m).__name__} for n, m in chosen])
        recording.describe("normalize.outputs", self.normalize_by_size)
        return [after_forward(module, self._hook(recording, name, module)) for name, module in chosen]

    def _hook(
        self, recording: Recording, name: str, owner: nn.Module
    ) -> Callable[[nn.Module, Any, Any], None]:
        skip_no_grad = self.skip_no_grad_pass
        extend, local, outside_pass = recording.extend_outputs, recording.local, recording.outside_pass
        note, pending, compact, compact_at = (
            recording.note,
            recording.pending_outputs,
            recording.compact_outputs,
            COMPACT_VALUES,
        )

        sequence = batch_first(owner) is not None  # its outputs do not always hold samples in dim 0

        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if module is not owner and not is_data_parallel_replica(module):
                return  # a copy that kept the observing class or the hook (see observe.py): not ours
            grad = is_grad_enabled()
            if skip_no_grad and not grad:
                return
            try:  # the pass this thread is running (recorder._on_pass), with its call counts
                pass_, epoch, calls = local.state
            except AttributeError:  # outside the root's forward: a child called alone, a DataParallel worker
                pass_, epoch, calls = outside_pass(module)
            if calls is None or graph_task_id() != -1:
                return  # a pass that records nothing (see Recording.local), or a recomputation in backward
            if name in calls:  # called again in the same pass (one activation after every layer)
                k = calls[name] = calls[name] + 1
                label = f"{name}#{k}"
            else:
                calls[name] = 0
                label = name
            try:
                if type(out) is Tensor and out.dtype in _FAST_DTYPES and not sequence:
                    shape = out.shape
                    if len(shape) == 2 and shape[0]:
                        # the common case, a batch of feature vectors: sample_norms without its conversions,
                        # and grad mode switched off instead of a detach() (measured: ~1 us less per call)
                        if grad:
                            set_grad_enabled(False)
                            try:
                                norms = vector_norm(out, 2, 1)
                            finally:
                                set_grad_enabled(True)
                        else:
                            norms = vector_norm(out, 2, 1)
                        # one extend: the record and its norm arrive together, whatever other threads do
                        extend((label, pass_, epoch, grad, module.training, shape[1], shape[0], norms))
                        if len(pending) >= compact_at:  # more modules than COMPACT_EVERY (see buffer.py)
                            compact()
                        return
                if is_exporting():  # torch.export runs forward on fake tensors: not a training pass
                    return
                for leaf_name, leaf, dim in _output_leaves(module, label, out):
                    norms = sample_norms(leaf, dim) if isinstance(leaf, Tensor) else None
                    if norms is not None:
                        batch = norms.shape[0]
                        numel = leaf.numel() // batch
                        extend((leaf_name, pass_, epoch, grad, module.training, numel, batch, norms))
                        if len(pending) >= compact_at:
                            compact()
                    elif not isinstance(leaf, Tensor):
                        note(leaf_name, "non_tensor_output", type(leaf).__name__)
            except Exception as exc:  # the training loop must never break on a shape we cannot handle
                note(label, "hook_error", f"{type(exc).__name__}: {exc}")

        return hook


@dataclass
class ParameterNorm:
    """L2 norm of each listed parameter of every module that has all of them, at each epoch tick.

    ``Recorder.collect()`` takes the same measurement on demand. Norms are computed with grouped
    ``torch._foreach_norm`` calls (one per device and dtype) and stay on the device until the writer runs.
    """

    parameters: Sequence[str] = ("weight", "bias")
    normalize_by_size: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.parameters, str) or not all(isinstance(p, str) for p in self.parameters):
            raise TypeError(
                f"ParameterNorm(parameters=...) takes a sequence of names, got {self.parameters!r}"
            )
        self.parameters = tuple(self.parameters)

    def select(self, named: Sequence[tuple[str, nn.Module]]) -> list[tuple[str, str, nn.Parameter]]:
        """``(module, param, tensor)`` for every module owning all the listed parameters."""
        chosen: list[tuple[str, str, nn.Parameter]] = []
        for name, module in named:
            own = dict(module.named_parameters(recurse=False))
            if all(own.get(p) is not None for p in self.parameters):
                chosen.extend((name, p, own[p]) for p in self.parameters)
        return chosen

    def config(self) -> dict[str, Any]:
        """JSON-ready description for the run metadata."""
        return {
            "type": "ParameterNorm",
            "parameters": list(self.parameters),
            "normalize_by_size": self.normalize_by_size,
        }

    def attach(self, target: Target, recording: Recording) -> list[Removable]:
        """Take the norms at every ``tick_epoch()``/``collect()`` (``Recording.on_collect``)."""
        params = self.select(target.modules)
        classes = dict(target.modules)
        recording.describe(
            "modules.params",
            [
                {"name": n, "class": type(classes[n]).__name__, "params": list(self.parameters)}
                for n in dict.fromkeys(n for n, _, _ in params)
            ],
        )
        recording.describe("normalize.params", self.normalize_by_size)
        if not params:
            wanted = ", ".join(repr(p) for p in self.parameters)
            recording.warn(
                "no_param_modules",
                f"ParameterNorm finds no module of {type(target.model).__name__} that has all of {wanted}; "
                "pass parameters=['weight'] for layers without a bias",
            )
            return []

        def collect() -> None:
            keys, norms = parameter_norms(params)
            recording.append_param((recording.epoch, recording.current_pass(), time.time(), keys, norms))

        return [recording.on_collect(collect)]


def parameter_norms(
    params: Sequence[tuple[str, str, Tensor]],
) -> tuple[list[tuple[str, str, int]], list[Tensor]]:
    """Keys ``(module, param, numel)`` and 1-d tensors of L2 norms in the same order, without a sync.

    Parameters are grouped by (device, dtype) for ``torch._foreach_norm``; norms come back as float32.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, (_, _, p) in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    keys: list[tuple[str, str, int]] = []
    parts: list[Tensor] = []
    with torch.no_grad():
        for (_, dtype), idx in groups.items():
            tensors = [params[i][2].detach() for i in idx]
            if dtype.is_floating_point:
                acc = _ACCUMULATE.get(dtype, dtype)
            else:
                tensors, acc = [t.float() for t in tensors], torch.float32
            norms = torch._foreach_norm(tensors, 2, dtype=acc)
            parts.append(torch.stack(norms).to(torch.float32))
            keys.extend((params[i][0], params[i][1], params[i][2].numel()) for i in idx)
    return keys, parts


@dataclass
class LossMetrics:
    """Every value returned by ``loss_fn`` (hooked; split ``train`` with grad enabled, else ``val``), plus
    the named metrics the user pushes with ``Recorder.push_metric``. Undeclared names are stored too.
    """

    loss_fn: nn.Module | None = None
    metrics: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.loss_fn is not None and not isinstance(self.loss_fn, nn.Module):
            raise TypeError(
                f"LossMetrics(loss_fn=...) needs an nn.Module to hook (e.g. nn.MSELoss()), got "
                f"{type(self.loss_fn).__name__}; for a plain function call Recorder.push_loss(value)"
            )
        self.metrics = tuple(self.metrics or ())

    def config(self) -> dict[str, Any]:
        """JSON-ready description for the run metadata."""
        return {
            "type": "LossMetrics",
            "loss_fn": None if self.loss_fn is None else type(self.loss_fn).__name__,
            "metrics": list(self.metrics),
        }

    def attach(self, target: Target, recording: Recording) -> list[Removable]:
        """Observe ``loss_fn`` so each value it returns becomes a ``loss`` row; returns the handles."""
        recording.describe("metrics", list(self.metrics))
        if self.loss_fn is None:
            return []

        append, loss_fn = recording.append_metric, self.loss_fn
        local, outside_pass = recording.local, recording.outside_pass

        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if module is not loss_fn or is_exporting():  # a copy (see observe.py), or torch.export's trace
                return
            # the pass this thread runs, or (the loss comes after the forward) the last it ran: read
            # without an exception, which would cost ~0.5 us at every call
            found = local.__dict__
            pass_, epoch, calls = found.get("state") or found.get("last") or outside_pass()
            if calls is None or in_transform():
                return  # a pass that records nothing (see Recording.local), or inside torch.func
            if not isinstance(out, Tensor) or out.numel() == 0:
                recording.note("loss", "non_tensor_output", type(out).__name__)
                return
            # .data: the same alias as detach() without a trip through the dispatcher (measured inside
            # the W2 step: the loss hook 12-15 -> 10-11 us); the value is only read, at the flush
            value = out.data
            if value.ndim:  # a reduction="none" loss, or a 1-element tensor: one number per call
                value = value.reshape(()) if value.numel() == 1 else value.float().mean()
            split = "train" if is_grad_enabled() else "val"
            append((epoch, pass_, "loss", value, split, time.time()))

        return [after_forward(self.loss_fn, hook)]


__all__ = [
    "ACTIVATIONS",
    "Lens",
    "LossMetrics",
    "OutputNorm",
    "ParameterNorm",
    "Selector",
    "parameter_norms",
]


def default_lenses() -> tuple[Lens, ...]:
    """The lenses of a ``Recorder`` (and of the framework callbacks) given none: output norms of the
    activation modules, and every weight and bias's norm at each epoch tick."""
    return (OutputNorm(), ParameterNorm())
