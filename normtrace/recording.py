"""The lens protocol, and the small handle through which a lens records: ``Lens``, ``Target``, ``Recording``.

A lens is any object with two methods (as optax's transformations are two functions): ``config()``, its
JSON-ready description for ``meta.json``, and ``attach(target, recording)``, which installs whatever
observers it needs on the model or optimizer in ``target`` and returns their handles. The ``Recorder``
keeps a list of lenses and loops over it; it never asks which lens it holds, and lenses never touch the
recorder: they record through ``Recording``, which offers the counters (this thread's pass, the epoch,
the optimizer step), one append function per table, notes, and callbacks at ``tick_epoch()``/``collect()``.
normtrace's own lenses are written exactly as a user's would be.

The hot path reads ``recording.local.state`` directly (one attribute read, see ``Recording.local``);
everything else here runs once per step or less and may cost a method call.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from normtrace.lifecycle import critical
from normtrace.observe import Handle, Removable

in_transform = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
"""True inside ``torch.func`` transforms (vmap, grad, jvp, jacrev), whose tensors are batched or wrapped:
their norms cannot be read once the transform returns. (It reads the dispatch-key set; the obvious
``torch._C._functorch.maybe_current_level()`` creates functorch's thread-local state, which every later
``backward()`` then deep-copies: +8k instructions per W2 step, measured.)"""

if TYPE_CHECKING:
    from normtrace.recorder import _Run

ROOT_NAME = "(root)"
"""The name the attached root module has in every table (``named_modules()`` calls it ``""``)."""

PassState = tuple[int, int, "dict[str, int] | None"]
"""What a thread's hooks record under: (pass, epoch at its start, calls of each module so far in it, or
None when the pass records nothing)."""


@dataclass(frozen=True)
class Target:
    """What a lens attaches to: the model, its modules by name, and the optimizer if one was given.

    Attributes:
        model: the root module whose forward calls count as passes (inside any ``torch.compile`` or
            ``DistributedDataParallel`` wrapper).
        modules: ``(name, module)`` for every module of ``model``, the root named ``"(root)"``.
        optimizer: the ``torch.optim.Optimizer`` given to ``Recorder.attach(..., optimizer=...)``, or None.
    """

    model: nn.Module
    modules: Sequence[tuple[str, nn.Module]]
    optimizer: torch.optim.Optimizer | None = None


@runtime_checkable
class Lens(Protocol):
    """What the ``Recorder`` needs of a lens (see the module docstring and docs/recorder.md)."""

    def config(self) -> dict[str, Any]:
        """JSON-ready description for ``meta.json["lenses"]``; by convention ``{"type": <class name>, ...}``."""
        ...

    def attach(self, target: Target, recording: Recording) -> list[Removable]:
        """Install observers on ``target`` that record through ``recording``; return their handles, which
        ``Recorder.detach()``/``close()`` remove."""
        ...


class Recording:
    """The public handle lenses record through: counters, append functions per table, notes, callbacks.

    Created by the ``Recorder``; one per recorder. Every append takes effect at the next flush; device
    tensors stay on their device until the writer thread moves them (never call ``.item()`` in a hook).
    """

    def __init__(
        self,
        run: _Run,
        local: threading.local,
        rank: int,
        outside_root: Callable[[nn.Module], PassState | None] = lambda module: None,
    ) -> None:
        buffer = run.buffer
        self._run = run
        self._outside_root = outside_root
        self.local = local
        """``local.state`` is the calling thread's ``PassState`` ``(pass, epoch, calls)`` while it runs a
        pass (set when the pass starts, moved to ``local.last`` when the root's forward returns); it raises
        ``AttributeError`` outside one (call ``outside_pass(module)`` then). ``calls`` is None in a pass
        that records nothing (a forked child, a ``torch.func`` transform): record nothing then. Hot hooks
        read this directly."""
        self.rank = rank
        self.extend_outputs = buffer.outputs.extend
        """``extend_outputs((module, pass, epoch, grad_enabled, training, numel, batch, per-sample norms))``:
        one ``outputs`` row (see ``buffer.OutputRecord``); one call keeps the record and its norm together.
        Then, when ``len(pending_outputs) >= COMPACT_VALUES``, call ``compact_outputs()``."""
        self.pending_outputs: list[Any] = buffer.outputs
        """The list ``extend_outputs`` extends (read its length only)."""
        self.append_param = buffer.params.append
        """``append_param((epoch, pass, time, [(module, param, numel)], [norms tensors]))``: ``params`` rows."""
        self.append_metric = buffer.metrics.append
        """``append_metric((epoch, pass, name, value, split, time))``: one ``metrics`` row."""
        self.append_event = buffer.events.append
        """``append_event((epoch, pass, name, time))``: one ``events`` row."""
        self._append_signal = buffer.signals.append
        self._on_collect: list[Callable[[], None]] = []

    def compact_outputs(self) -> None:
        """Reduce the pending output norms to batch means on their device now (see ``buffer.COMPACT_EVERY``:
        the tensors die young instead of waiting for the next pass)."""
        with critical():
            self._run.buffer.compact()

    @property
    def step(self) -> int:
        """Optimizer steps completed: ``optimizer.step()`` calls that ran (0 without an optimizer)."""
        return self._run.step

    @property
    def epoch(self) -> int:
        """``tick_epoch()`` calls so far."""
        return self._run.epoch

    def outside_pass(self, module: nn.Module | None = None) -> PassState:
        """The ``PassState`` for a hook that finds no ``local.state``: its thread is not inside a forward of
        the root. Given the hook's ``module`` (a module of the model called without the root, as a
        Lightning ``training_step`` calling ``self.net(x)`` does), that call starts a pass: passes are then
        counted at the root's children (``Recorder._outside_root``, with one warning). Otherwise (a row
        recorded after the forward: the loss, a gradient) it is the thread's last pass, or in a thread that
        ran none (a ``DataParallel`` worker, a thread that only pushes metrics) the last pass any thread
        started, counted for this thread."""
        if module is not None and (fresh := self._outside_root(module)) is not None:
            return fresh
        last: PassState | None = getattr(self.local, "last", None)
        if last is not None:
            return last
        run = self._run
        state: PassState | None = getattr(self.local, "outside", None)
        if state is None or state[0] != run.last_pass:
            state = self.local.outside = (run.last_pass, run.epoch, None if run.inert else {})
        if in_transform():
            return (state[0], state[1], None)
        return state

    def pass_state(self) -> PassState:
        """The calling thread's ``(pass, epoch, calls)``: its current pass, else the last it ran, else
        ``outside_pass()``."""
        state: PassState | None = self.local.__dict__.get("state")
        return self.outside_pass() if state is None else state

    def current_pass(self) -> int:
        """The pass a row recorded now belongs to (see ``pass_state``)."""
        return self.pass_state()[0]

    def add_signals(
        self,
        kinds: Sequence[str],
        keys: Sequence[tuple[str, str | None]],
        values: Tensor | Sequence[float],
        *,
        step: int | None = None,
        pass_: int | None = None,
    ) -> None:
        """Record ``signals`` rows: one per ``(kind, (module, param), value)``, at the current optimizer
        step, pass and epoch (or the ``step``/``pass_`` given, e.g. those of the forward a backward
        belongs to). ``values`` is a 1-d tensor (left on its device) or plain floats, one per row."""
        if self._run.inert:
            return  # a forked child's copy: the run is the parent's
        if pass_ is None:
            pass_ = self.current_pass()
        self._append_signal((self.step if step is None else step, pass_, self.epoch, kinds, keys, values))

    def signal(self, kind: str, module: str, value: float | Tensor, *, param: str | None = None) -> None:
        """Record one ``signals`` row now: a convenience for user lenses (a one-element tensor stays on
        its device)."""
        values = value.detach().reshape(1) if isinstance(value, Tensor) else [float(value)]
        self.add_signals((kind,), ((module, param),), values)

    def push_metric(self, name: str, value: float | Tensor, split: str | None = None) -> None:
        """Record a ``metrics`` row now (a one-element tensor stays on its device)."""
        if isinstance(value, Tensor):
            value = value.detach().reshape(())
        self.append_metric((self.epoch, self.current_pass(), name, value, split, time.time()))

    def event(self, name: str) -> None:
        """Record an ``events`` row now."""
        self.append_event((self.epoch, self.current_pass(), name, time.time()))

    def note(self, module: str, kind: str, detail: str) -> None:
        """Say once, in ``meta.json["notes"]``, that something about ``module`` could not be recorded."""
        self._run.note(module, kind, detail)

    def warn(self, kind: str, detail: str, *, stacklevel: int = 4) -> None:
        """A ``UserWarning`` now (meant for ``attach``: it points at the user's ``Recorder.attach`` call;
        one more ``stacklevel`` per function between ``attach`` and this call) and a note on the root: for a
        lens that selects nothing, or an input it cannot record."""
        warnings.warn(detail, stacklevel=stacklevel)
        self._run.note(ROOT_NAME, kind, detail)

    def describe(self, path: str, value: Any) -> None:
        """Set a ``meta.json`` entry: ``"metrics"`` is a top-level key, ``"modules.outputs"`` a key inside
        ``modules`` (what a lens hooked, documented in docs/trace-format.md)."""
        *sections, key = path.split(".")
        target = self._run.meta
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = value

    def on_collect(self, fn: Callable[[], None]) -> Removable:
        """Call ``fn()`` at every ``tick_epoch()`` (before the epoch advances) and ``collect()``."""
        self._on_collect.append(fn)
        return Handle(lambda: self._on_collect.remove(fn) if fn in self._on_collect else None)

    def collect(self) -> None:
        """Run the ``on_collect`` callbacks (the Recorder's ``tick_epoch``/``collect`` call this)."""
        for fn in self._on_collect:
            fn()
