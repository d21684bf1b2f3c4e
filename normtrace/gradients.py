"""Lenses of gradients and updates: ``GradientNorm``, ``UpdateRatio``, ``OutputGradientNorm``.

They record into the ``signals`` table through the lens protocol (``recording``), like any user lens.
Per-parameter values are measured where the optimizer sees them: a step pre-hook reads the gradients
``step()`` is about to use (accumulated over every backward since ``zero_grad``, unscaled by
``GradScaler.step`` before it calls ``step()``), and a step post-hook sees the parameters it changed.
Each measurement is a few grouped ``torch._foreach_*`` kernels per (device, dtype) group whose results
stay on the device; the writer thread moves them to the host. Nothing here reads a value on the host.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from normtrace.lenses import _ACCUMULATE, graph_task_id, is_data_parallel_replica, sample_norms
from normtrace.observe import Removable, after_forward
from normtrace.recording import ROOT_NAME, Recording, Target
from normtrace.selection import ModuleSelection, Selector, check_selectors, matches, selector_names

ParamKey = tuple[str, str]
"""(module, parameter name) as the ``signals`` table spells it: the root module is ``""``."""


def signal_module(name: str) -> str:
    """The ``signals.module`` spelling of a module name: ``""`` for the root (``(root)`` elsewhere)."""
    return "" if name == ROOT_NAME else name


def select_parameters(
    target: Target,
    names: Sequence[str] | None,
    include: Sequence[Selector],
    exclude: Sequence[Selector],
) -> list[tuple[ParamKey, nn.Parameter]]:
    """The trainable parameters a parameter lens records, each once (tied weights under their first name).

    ``names``: parameter names within their module (``"weight"``), None for all; ``include``: the owning
    modules (classes or name globs), empty for all; ``exclude``: modules left out. Frozen parameters
    (``requires_grad=False``) are never selected.
    """
    seen: set[int] = set()
    chosen = []
    for mod_name, module in target.modules:
        if include and not matches(mod_name, module, include):
            continue
        if matches(mod_name, module, exclude):
            continue
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad or (names is not None and p_name not in names):
                continue
            seen.add(id(p))
            chosen.append(((signal_module(mod_name), p_name), p))
    return chosen


def _check_names(lens: str, names: Sequence[str] | None) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{lens}(parameters=...) takes a sequence of parameter names, got {names!r}")
    return tuple(names)


def _groups(params: Sequence[nn.Parameter]) -> list[list[int]]:
    """Indices of ``params`` grouped by (device, dtype), for one ``torch._foreach_*`` call per group."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype), []).append(i)
    return list(groups.values())


def _norms(tensors: list[Tensor]) -> Tensor:
    """1-d float32 tensor of the L2 norms of ``tensors`` (one device and dtype), half accumulated in float32."""
    acc = _ACCUMULATE.get(tensors[0].dtype)
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=acc))
    return norms if norms.dtype == torch.float32 else norms.to(torch.float32)


def _cosines(a: list[Tensor], b: list[Tensor], a_norms: Tensor, b_norms: Tensor) -> Tensor:
    """Cosine similarity of each pair ``a[i]``, ``b[i]`` (one device and dtype) from their dot products and
    the norms already taken; 0 when either is zero. (One dot per pair measured cheaper on CPU than a
    grouped difference and its norms: 71 against 119 µs for the seed's ten parameters.)"""
    acc = _ACCUMULATE.get(a[0].dtype)
    if acc is None:
        dots = torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b, strict=True)])
    else:  # half precision: products summed in float32
        dots = torch.stack(
            [torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc)) for x, y in zip(a, b, strict=True)]
        )
    return (dots.to(torch.float32) / (a_norms * b_norms)).nan_to_num_(0.0, 0.0, 0.0).clamp_(-1.0, 1.0)


def _param_config(lens: Any) -> dict[str, Any]:
    return {
        "type": type(lens).__name__,
        "parameters": None if lens.parameters is None else list(lens.parameters),
        "include": selector_names(lens.include),
        "exclude": selector_names(lens.exclude),
        "cosine": lens.cosine,
    }


def _nothing_selected(lens: Any, target: Target, recording: Recording) -> None:
    recording.warn(
        "no_signal_params",
        f"{type(lens).__name__} selects no trainable parameter of {type(target.model).__name__} (parameters="
        f"{lens.parameters!r}, include={selector_names(lens.include)!r}, exclude="
        f"{selector_names(lens.exclude)!r}; frozen parameters are never selected): it records nothing",
    )


class _ParamLens:
    """The selection options shared by ``GradientNorm`` and ``UpdateRatio``."""

    parameters: Sequence[str] | None
    include: Sequence[Selector]
    exclude: Sequence[Selector]
    cosine: bool

    def _check(self) -> None:
        lens = type(self).__name__
        self.parameters = _check_names(lens, self.parameters)
        self.include = check_selectors(lens, "include", self.include)
        self.exclude = check_selectors(lens, "exclude", self.exclude)
        self.cosine = bool(self.cosine)

    def config(self) -> dict[str, Any]:
        """JSON-ready description for the run metadata."""
        return _param_config(self)


@dataclass
class GradientNorm(_ParamLens):
    """L2 norm of each selected parameter's gradient at every optimizer step (kind ``grad_norm``), and
    with ``cosine=True`` its cosine similarity with the gradient of the previous step it had one
    (``grad_cosine``), which keeps one copy of the selected gradients between steps.

    With ``Recorder.attach(model, optimizer=opt)`` it measures in a step pre-hook the gradient ``step()``
    uses: accumulated over every backward of the step, unscaled under ``GradScaler``, after the
    all-reduce under ``DistributedDataParallel``. Without an optimizer it measures after every backward
    (a post-accumulate-grad hook per parameter): the accumulated ``.grad`` then, scaled under AMP.

    Args:
        parameters: parameter names within their module (``["weight"]``); None for every one.
        include: modules whose parameters are selected (classes or name globs); empty for all.
        exclude: modules whose parameters are left out.
        cosine: also record ``grad_cosine``.
    """

    parameters: Sequence[str] | None = None
    include: Sequence[Selector] = ()
    exclude: Sequence[Selector] = ()
    cosine: bool = False

    def __post_init__(self) -> None:
        self._check()

    def attach(self, target: Target, recording: Recording) -> list[Removable]:
        """Observe ``target.optimizer``'s steps, or else each selected parameter's gradient accumulation."""
        chosen = select_parameters(target, self.parameters, self.include, self.exclude)
        if not chosen:
            _nothing_selected(self, target, recording)
            return []
        if target.optimizer is None:
            return [
                p.register_post_accumulate_grad_hook(self._on_grad(recording, key))  # type: ignore[no-untyped-call]
                for key, p in chosen
            ]
        return [target.optimizer.register_step_pre_hook(self._on_step(recording, chosen))]

    def _on_step(
        self, recording: Recording, chosen: list[tuple[ParamKey, nn.Parameter]]
    ) -> Callable[[Any, Any, Any], None]:
        keys = [key for key, _ in chosen]
        params = [p for _, p in chosen]
        groups = _groups(params)
        cosine = self.cosine
        prev: list[Tensor | None] = [None] * len(params)  # the last gradient recorded, for the cosine
        prev_norm: list[Tensor | None] = [None] * len(params)
        kinds = {n: ("grad_norm",) * n for n in range(len(params) + 1)}
        sparse_noted: set[ParamKey] = set()

        def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
            try:
                step = recording.step
                for group in groups:
                    idx = []
                    for i in group:  # no row for a parameter without a gradient this step
                        g = params[i].grad
                        if g is not None:
                            if g.is_sparse:
                                if keys[i] not in sparse_noted:
                                    sparse_noted.add(keys[i])
                                    recording.note(keys[i][0], "sparse_grad", f"{keys[i][1]}: {SPARSE_NOTE}")
                                continue
                            idx.append(i)
                    if not idx:
                        continue
                    with torch.no_grad():  # (a .grad needs no detach: it has no history)
                        grads = [g for i in idx if (g := params[i].grad) is not None]  # idx: grads not None
                        norms = _norms(grads)
                    recording.add_signals(kinds[len(idx)], [keys[i] for i in idx], norms, step=step)
                    if cosine:
                        _record_cosines(
                            recording, "grad_cosine", idx, grads, norms, prev, prev_norm, keys, step
                        )
            except Exception as exc:  # the training loop must never break
                recording.note(ROOT_NAME, "hook_error", f"GradientNorm: {type(exc).__name__}: {exc}")

        return hook

    def _on_grad(self, recording: Recording, key: ParamKey) -> Callable[[Tensor], None]:
        cosine = self.cosine
        prev: list[Tensor | None] = [None]
        prev_norm: list[Tensor | None] = [None]
        kind = ("grad_norm",)

        def hook(p: Tensor) -> None:
            try:
                g = p.grad
                if g is None:
                    return
                if g.is_sparse:
                    recording.note(key[0], "sparse_grad", f"{key[1]}: {SPARSE_NOTE}")
                    return
                grads = [g.detach()]
                norms = _norms(grads)
                recording.add_signals(kind, (key,), norms)
                if cosine:
                    _record_cosines(recording, "grad_cosine", [0], grads, norms, prev, prev_norm, [key], None)
            except Exception as exc:
                recording.note(key[0], "hook_error", f"GradientNorm: {type(exc).__name__}: {exc}")

        return hook


SPARSE_NOTE = "its gradient is sparse (nn.Embedding(sparse=True)): not recorded"


def _record_cosines(
    recording: Recording,
    kind: str,
    idx: list[int],
    now: list[Tensor],
    norms: Tensor,
    prev: list[Tensor | None],
    prev_norm: list[Tensor | None],
    keys: Sequence[ParamKey],
    step: int | None,
) -> None:
    """Record the cosine of ``now[j]`` with ``prev[idx[j]]`` where there is one, then keep ``now`` as the
    previous values (copied into the kept buffers: one copy of the selected tensors, no more)."""
    have = [j for j, i in enumerate(idx) if prev[i] is not None and prev[i].shape == now[j].shape]  # type: ignore[union-attr]
    if have:
        cos = _cosines(
            [now[j] for j in have],
            [prev[idx[j]] for j in have],  # type: ignore[misc]
            norms[have] if len(have) < len(idx) else norms,
            torch.stack([prev_norm[idx[j]] for j in have]),  # type: ignore[misc]
        )
        recording.add_signals((kind,) * len(have), [keys[idx[j]] for j in have], cos, step=step)
    with torch.no_grad():
        if all(prev[i] is not None and prev[i].shape == now[j].shape for j, i in enumerate(idx)):  # type: ignore[union-attr]
            torch._foreach_copy_([prev[i] for i in idx], now)  # type: ignore[misc]
        else:
            for j, i in enumerate(idx):
                kept = prev[i]
                if kept is None or kept.shape != now[j].shape:
                    prev[i] = now[j].detach().clone()
                else:
                    kept.copy_(now[j])
        for j, i in enumerate(idx):
            prev_norm[i] = norms[j]


@dataclass
class UpdateRatio(_ParamLens):
    """Size of each optimizer update relative to its parameter, ‖θ_after − θ_before‖ / ‖θ_before‖, at
    every step (kind ``update_ratio``); with ``cosine=True`` also the cosine similarity of successive
    updates of a parameter (``update_cosine``).

    Needs the optimizer: ``Recorder.attach(model, optimizer=opt)``. Only parameters the optimizer holds
    and that have a gradient at the step are recorded. Memory: a copy of the selected parameters exists
    during each ``step()`` (taken in a pre-hook, freed in the post-hook); ``cosine=True`` keeps one more
    copy, of the last update, between steps.

    Args:
        parameters: parameter names within their module (``["weight"]``); None for every one.
        include: modules whose parameters are selected (classes or name globs); empty for all.
        exclude: modules whose parameters are left out.
        cosine: also record ``update_cosine``.
    """

    parameters: Sequence[str] | None = None
    include: Sequence[Selector] = ()
    exclude: Sequence[Selector] = ()
    cosine: bool = False

    def __post_init__(self) -> None:
        self._check()

    def attach(self, target: Target, recording: Recording) -> list[Removable]:
        """Observe ``target.optimizer``'s steps (before: copy; after: difference and norms)."""
        if target.optimizer is None:
            raise ValueError(
                f"{type(self).__name__} measures optimizer updates: pass the optimizer to "
                "Recorder.attach(model, optimizer=opt)"
            )
        held = {id(p) for group in target.optimizer.param_groups for p in group["params"]}
        chosen = [
            (key, p)
            for key, p in select_parameters(target, self.parameters, self.include, self.exclude)
            if id(p) in held
        ]
        if not chosen:
            _nothing_selected(self, target, recording)
            return []
        pre, post = self._hooks(recording, chosen)
        return [target.optimizer.register_step_pre_hook(pre), target.optimizer.register_step_post_hook(post)]

    def _hooks(
        self, recording: Recording, chosen: list[tuple[ParamKey, nn.Parameter]]
    ) -> tuple[Callable[[Any, Any, Any], None], Callable[[Any, Any, Any], None]]:
        keys = [key for key, _ in chosen]
        params = [p for _, p in chosen]
        groups = _groups(params)
        cosine = self.cosine
        prev: list[Tensor | None] = [None] * len(params)  # the last update (negated), for the cosine
        prev_norm: list[Tensor | None] = [None] * len(params)
        pending: list[tuple[int, list[list[int]], list[list[Tensor]]]] = []  # (step, idx, copies) per group

        def before(optimizer: Any, args: Any, kwargs: Any) -> None:
            pending.clear()
            try:
                with torch.no_grad():
                    taken_idx: list[list[int]] = []
                    taken: list[list[Tensor]] = []
                    for group in groups:
                        idx = [i for i in group if params[i].grad is not None]
                        if idx:
                            taken_idx.append(idx)
                            taken.append(list(torch._foreach_mul([params[i] for i in idx], 1.0)))
                    pending.append((recording.step, taken_idx, taken))
            except Exception as exc:
                recording.note(ROOT_NAME, "hook_error", f"UpdateRatio: {type(exc).__name__}: {exc}")

        def after(optimizer: Any, args: Any, kwargs: Any) -> None:
            if not pending:
                return
            step, taken_idx, taken = pending.pop()
            try:
                with torch.no_grad():
                    for idx, copies in zip(taken_idx, taken, strict=True):
                        before_norms = _norms(copies)
                        torch._foreach_sub_(copies, [params[i] for i in idx])  # now −Δθ
                        deltas = _norms(copies)
                        ratio = deltas / before_norms
                        recording.add_signals(
                            ("update_ratio",) * len(idx), [keys[i] for i in idx], ratio, step=step
                        )
                        if cosine:
                            _record_cosines(
                                recording, "update_cosine", idx, copies, deltas, prev, prev_norm, keys, step
                            )
            except Exception as exc:
                recording.note(ROOT_NAME, "hook_error", f"UpdateRatio: {type(exc).__name__}: {exc}")

        return before, after


@dataclass
class OutputGradientNorm(ModuleSelection):
    """Norm of the gradient arriving at each selected module's output, per backward (kind
    ``output_grad_norm``): the batch mean of per-sample L2 norms, as ``OutputNorm`` takes of the output.

    Selects modules as ``OutputNorm`` does: the activation modules, plus ``include``, minus ``exclude``.
    Only outputs of grad-enabled passes that require grad get a (tensor) hook; the row carries the pass of
    that forward and the optimizer step at the backward.
    """

    def attach(self, target: Target, recording: Recording) -> list[Removable]:
        """Observe each selected module's forward, to hook the gradient of its output."""
        chosen = self.chosen(target, recording, "no_output_grad_modules")
        return [after_forward(module, self._hook(recording, name, module)) for name, module in chosen]

    def _hook(
        self, recording: Recording, name: str, owner: nn.Module
    ) -> Callable[[nn.Module, Any, Any], None]:
        local, outside_pass = recording.local, recording.outside_pass
        module_name = signal_module(name)
        kind = ("output_grad_norm",)
        calls: list[Any] = [None, 0]  # (pass, calls in it) of the last forward seen, for name#k labels

        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if module is not owner and not is_data_parallel_replica(module):
                return
            if type(out) is not Tensor or not out.requires_grad or not torch.is_grad_enabled():
                return
            try:
                pass_, _, state = local.state
            except AttributeError:
                pass_, _, state = outside_pass(module)
            if state is None or graph_task_id() != -1:
                return  # a pass that records nothing, or a recomputation in backward (checkpointing)
            if calls[0] == pass_:
                calls[1] += 1
                keys = ((f"{module_name}#{calls[1]}", None),)
            else:
                calls[0], calls[1] = pass_, 0
                keys = ((module_name, None),)

            def on_grad(grad: Tensor) -> None:
                try:
                    norms = sample_norms(grad)
                    if norms is not None:
                        recording.add_signals(kind, keys, norms.mean().reshape(1).float(), pass_=pass_)
                except Exception as exc:
                    recording.note(name, "hook_error", f"OutputGradientNorm: {type(exc).__name__}: {exc}")

            try:
                out.register_hook(on_grad)  # type: ignore[no-untyped-call]
            except Exception as exc:
                recording.note(name, "hook_error", f"OutputGradientNorm: {type(exc).__name__}: {exc}")

        return hook
