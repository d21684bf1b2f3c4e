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

from normtrace.flat import Flat, Layout
from normtrace.lenses import (
    _ACCUMULATE,
    batch_first,
    graph_task_id,
    is_data_parallel_replica,
    main_batch_dim,
    sample_norms,
)
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


def _groups(chosen: Sequence[tuple[ParamKey, nn.Parameter]]) -> list[_Group]:
    """``chosen`` grouped by (device, dtype), each group ordered by size (one kernel per size, see ``flat``)."""
    by: dict[tuple[torch.device, torch.dtype], list[tuple[ParamKey, nn.Parameter]]] = {}
    for key, p in chosen:
        by.setdefault((p.device, p.dtype), []).append((key, p))
    return [_Group(sorted(members, key=lambda m: m[1].numel())) for members in by.values()]


def _norms(tensors: list[Tensor]) -> Tensor:
    """1-d float32 tensor of the L2 norms of ``tensors`` (one device and dtype), half accumulated in float32."""
    acc = _ACCUMULATE.get(tensors[0].dtype)
    norms = torch.stack(torch._foreach_norm(tensors, 2, dtype=acc))
    return norms if norms.dtype == torch.float32 else norms.to(torch.float32)


def _cosines(a: list[Tensor], b: list[Tensor], a_norms: Tensor, b_norms: Tensor) -> Tensor:
    """Cosine similarity of each pair ``a[i]``, ``b[i]`` (one device and dtype) from their dot products and
    the norms already taken; 0 when either is zero. (For a step where only some parameters of a group
    have a gradient; the full steps take one dot per run of equal sizes, see ``flat``.)"""
    acc = _ACCUMULATE.get(a[0].dtype)
    if acc is None:
        dots = torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b, strict=True)])
    else:  # half precision: products summed in float32
        dots = torch.stack(
            [torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc)) for x, y in zip(a, b, strict=True)]
        )
    return (dots.to(torch.float32) / (a_norms * b_norms)).nan_to_num_(0.0, 0.0, 0.0).clamp_(-1.0, 1.0)


class _Group:
    """The parameters of one (device, dtype) a parameter lens records, and what it keeps of the values
    it recorded last (for cosines): one flat copy (``kept``, valid where ``have``) and their norms."""

    def __init__(self, members: Sequence[tuple[ParamKey, nn.Parameter]]) -> None:
        self.keys = tuple(key for key, _ in members)
        self.params = [p for _, p in members]
        self.layout = Layout(self.params)
        self.kept: Flat | None = None
        self.have = [False] * len(self.params)
        self.kept_norms: Tensor | None = None  # 1-d float32, valid where ``have``
        self._every: dict[str, tuple[str, ...]] = {}

    def every(self, kind: str) -> tuple[str, ...]:
        """``kind`` once per parameter: the kinds of a row for each (built once)."""
        kinds = self._every.get(kind)
        if kinds is None:
            kinds = self._every[kind] = (kind,) * len(self.keys)
        return kinds

    def refresh(self) -> None:
        """Lay the group out again, forgetting what was kept, if a parameter changed shape or dtype since
        (``p.data = ...``). (A gradient always has its parameter's shape and dtype: torch enforces it.)"""
        if not self.layout.fits(self.params):
            self.layout = Layout(self.params)
            self.kept, self.kept_norms, self.have = None, None, [False] * len(self.params)

    def cosines(
        self,
        recording: Recording,
        kind: str,
        idx: Sequence[int],
        now: Flat | list[Tensor],
        norms: Tensor,
        step: int | None,
    ) -> None:
        """Record the cosine of each value ``now`` holds (of parameter ``idx[j]``, norm ``norms[j]``) with
        that parameter's kept value, where there is one: from one dot product per run of equal sizes when
        ``now`` holds every parameter and all are kept, else one per tensor."""
        kept, kept_norms = self.kept, self.kept_norms
        if kept is None or kept_norms is None:
            return
        if isinstance(now, Flat) and all(self.have):
            cos = (now.dots(kept) / (norms * kept_norms)).nan_to_num_(0.0, 0.0, 0.0).clamp_(-1.0, 1.0)
            recording.add_signals(self.every(kind), self.keys, cos, step=step)
            return
        tensors = now.views if isinstance(now, Flat) else now
        have = [j for j, i in enumerate(idx) if self.have[i]]
        if have:
            new, old = norms.unbind(), kept_norms.unbind()
            cos = _cosines(
                [tensors[j] for j in have],
                [kept.views[idx[j]] for j in have],
                torch.stack([new[j] for j in have]),
                torch.stack([old[idx[j]] for j in have]),
            )
            recording.add_signals((kind,) * len(have), [self.keys[idx[j]] for j in have], cos, step=step)

    def keep(self, idx: Sequence[int], now: list[Tensor], norms: Tensor) -> None:
        """Keep ``now[j]`` (norm ``norms[j]``) as parameter ``idx[j]``'s last value: a copy per tensor, for
        steps where only some parameters have one."""
        if self.kept is None:
            self.kept = self.layout.new()
        views = self.kept.views
        torch._foreach_copy_([views[i] for i in idx], now)
        new = norms.unbind()
        kept = list(self.kept_norms.unbind()) if self.kept_norms is not None else [new[0]] * len(self.have)
        for j, i in enumerate(idx):  # (the filler where nothing is kept is never read: ``have`` guards it)
            kept[i] = new[j]
            self.have[i] = True
        self.kept_norms = torch.stack(kept)

    def keep_all(self, now: Flat, norms: Tensor) -> None:
        """Keep ``now`` (every parameter's value, ``norms`` their norms) as the last values: no copy."""
        self.kept, self.kept_norms = now, norms
        self.have = [True] * len(self.have)


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
        stacklevel=5,  # the user's attach call, past the lens's attach and this function
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
                p.register_post_accumulate_grad_hook(self._on_grad(recording, _Group([(key, p)])))  # type: ignore[no-untyped-call]
                for key, p in chosen
            ]
        return [target.optimizer.register_step_pre_hook(self._on_step(recording, _groups(chosen)))]

    def _on_step(self, recording: Recording, groups: list[_Group]) -> Callable[[Any, Any, Any], None]:
        sparse_noted: set[ParamKey] = set()

        def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
            try:
                step = recording.step
                for group in groups:
                    self._measure(recording, group, step, sparse_noted)
            except Exception as exc:  # the training loop must never break
                recording.note(ROOT_NAME, "hook_error", f"GradientNorm: {type(exc).__name__}: {exc}")

        return hook

    def _on_grad(self, recording: Recording, group: _Group) -> Callable[[Tensor], None]:
        sparse_noted: set[ParamKey] = set()

        def hook(p: Tensor) -> None:
            try:
                self._measure(recording, group, None, sparse_noted)
            except Exception as exc:
                recording.note(group.keys[0][0], "hook_error", f"GradientNorm: {type(exc).__name__}: {exc}")

        return hook

    def _measure(
        self, recording: Recording, group: _Group, step: int | None, sparse_noted: set[ParamKey]
    ) -> None:
        """Record the norms (and cosines) of ``group``'s gradients now: no row for a parameter without one."""
        if self.cosine:  # (without cosines nothing is laid out: the norms are taken from the gradients)
            group.refresh()
        grads = [p.grad for p in group.params]
        with torch.no_grad():  # (a .grad needs no detach: it has no history)
            if all(g is not None and not g.is_sparse for g in grads):
                if not self.cosine:
                    recording.add_signals(group.every("grad_norm"), group.keys, _norms(grads), step=step)  # type: ignore[arg-type]
                    return
                now = group.layout.flatten(grads)  # type: ignore[arg-type]  # (kept after this step: the last copy is freed)
                norms = now.norms()
                recording.add_signals(group.every("grad_norm"), group.keys, norms, step=step)
                group.cosines(recording, "grad_cosine", range(len(grads)), now, norms, step)
                group.keep_all(now, norms)
                return
            idx = []
            for i, g in enumerate(grads):
                if g is None:
                    continue
                if g.is_sparse:
                    key = group.keys[i]
                    if key not in sparse_noted:
                        sparse_noted.add(key)
                        recording.note(key[0], "sparse_grad", f"{key[1]}: {SPARSE_NOTE}")
                    continue
                idx.append(i)
            if not idx:
                return
            some: list[Tensor] = [grads[i] for i in idx]  # type: ignore[misc]
            norms = _norms(some)
            recording.add_signals(("grad_norm",) * len(idx), [group.keys[i] for i in idx], norms, step=step)
            if self.cosine:
                group.cosines(recording, "grad_cosine", idx, some, norms, step)
                group.keep(idx, some, norms)


SPARSE_NOTE = "its gradient is sparse (nn.Embedding(sparse=True)): not recorded"


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
        pre, post = self._hooks(recording, _groups(chosen))
        return [target.optimizer.register_step_pre_hook(pre), target.optimizer.register_step_post_hook(post)]

    def _hooks(
        self, recording: Recording, groups: list[_Group]
    ) -> tuple[Callable[[Any, Any, Any], None], Callable[[Any, Any, Any], None]]:
        cosine = self.cosine
        # per group with a gradient this step: (group, the indices copied, their copies; a Flat when all were)
        pending: list[tuple[_Group, Sequence[int], list[Tensor], Flat | None]] = []
        steps: list[int] = []

        def before(optimizer: Any, args: Any, kwargs: Any) -> None:
            pending.clear()
            steps[:] = [recording.step]
            try:
                with torch.no_grad():
                    for group in groups:
                        group.refresh()
                        params = group.params
                        if all(p.grad is not None for p in params):
                            copy = group.layout.flatten(params)
                            pending.append((group, range(len(params)), copy.views, copy))
                        elif idx := [i for i, p in enumerate(params) if p.grad is not None]:
                            pending.append(
                                (group, idx, list(torch._foreach_mul([params[i] for i in idx], 1.0)), None)
                            )
            except Exception as exc:
                recording.note(ROOT_NAME, "hook_error", f"UpdateRatio: {type(exc).__name__}: {exc}")

        def after(optimizer: Any, args: Any, kwargs: Any) -> None:
            if not steps:
                return
            step = steps.pop()
            try:
                with torch.no_grad():
                    for group, idx, copies, flat in pending:
                        params: list[Tensor] = [group.params[i] for i in idx]
                        before_norms = flat.norms() if flat is not None else _norms(copies)
                        torch._foreach_sub_(copies, params)  # now −Δθ
                        deltas = flat.norms() if flat is not None else _norms(copies)
                        full = len(idx) == len(group.params)
                        keys = group.keys if full else [group.keys[i] for i in idx]
                        kinds = group.every("update_ratio") if full else ("update_ratio",) * len(idx)
                        recording.add_signals(kinds, keys, deltas / before_norms, step=step)
                        if cosine:
                            group.cosines(
                                recording,
                                "update_cosine",
                                idx,
                                flat if flat is not None else copies,
                                deltas,
                                step,
                            )
                            if flat is not None:
                                group.keep_all(flat, deltas)  # −Δθ, as every kept update: no copy
                            else:
                                group.keep(idx, copies, deltas)
            except Exception as exc:
                recording.note(ROOT_NAME, "hook_error", f"UpdateRatio: {type(exc).__name__}: {exc}")
            finally:
                pending.clear()

        return before, after


@dataclass
class OutputGradientNorm(ModuleSelection):
    """Norm of the gradient arriving at each selected module's output, per backward (kind
    ``output_grad_norm``): the batch mean of per-sample L2 norms, as ``OutputNorm`` takes of the output
    (samples in dim 1 of a transformer's output run sequence first).

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
        first = ((module_name, None),)
        repeats: dict[int, tuple[tuple[str, None]]] = {}  # the k-th call's keys, name#k: built once, so
        # the writer codes each distinct keys object once per flush (buffer.signals_table)
        layout = batch_first(owner)  # a transformer run sequence first holds its samples in dim 1

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
                keys = repeats.get(calls[1])
                if keys is None:
                    keys = repeats[calls[1]] = ((f"{module_name}#{calls[1]}", None),)
            else:
                calls[0], calls[1] = pass_, 0
                keys = first

            def on_grad(grad: Tensor) -> None:
                try:
                    norms = sample_norms(grad, main_batch_dim(layout, grad))
                    if norms is not None:
                        recording.add_signals(kind, keys, norms.mean().reshape(1).float(), pass_=pass_)
                except Exception as exc:
                    recording.note(name, "hook_error", f"OutputGradientNorm: {type(exc).__name__}: {exc}")

            try:
                out.register_hook(on_grad)  # type: ignore[no-untyped-call]
            except Exception as exc:
                recording.note(name, "hook_error", f"OutputGradientNorm: {type(exc).__name__}: {exc}")

        return hook
