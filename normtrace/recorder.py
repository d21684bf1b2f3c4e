"""The Recorder: attaches lenses to a model, keeps the pass/epoch counters, and feeds the writer.

``Recorder`` is what the user holds; ``_Run`` is what must be finished however the recording ends
(``lifecycle``): the buffer, the writer, the metadata and the counters that go into it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import json
import os
import platform
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from normtrace import __version__, lifecycle, rundir, schema
from normtrace.buffer import COMPACT_VALUES, Buffer
from normtrace.errors import NormtraceError, RunDirError, WriterError, warn_user
from normtrace.lenses import default_lenses, graph_task_id, is_data_parallel_replica
from normtrace.lifecycle import critical
from normtrace.observe import Removable, after_forward, before_forward
from normtrace.recording import ROOT_NAME, Lens, PassState, Recording, Target, in_transform
from normtrace.writer import ShardWriter, write_json_atomic

TRANSFORM_NOTE = (
    "passes run under torch.func transforms (vmap, grad, jacrev) are counted but not recorded: their "
    "outputs are batched or wrapped tensors, whose norms cannot be read once the transform returns"
)


def default_run_dir() -> Path:
    """``runs/<YYYYmmdd-HHMMSS>_<hostname>`` under the working directory, like ``SummaryWriter``'s default."""
    return Path("runs") / f"{_dt.datetime.now():%Y%m%d-%H%M%S}_{socket.gethostname()}"


def local_run_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir`` as a local path, refusing a URL (``s3://…``, also one that pathlib has already turned
    into ``s3:/…``): the recorder writes local files only (see docs/recorder.md, "Object storage")."""
    text = os.fspath(run_dir)
    path = Path(text)
    scheme = text.partition("://")[0] if "://" in text else ""
    if not scheme and not path.is_absolute() and path.parts and path.parts[0].endswith(":"):
        scheme = path.parts[0][:-1]  # Path("s3://b/r") is s3:/b/r
    if (
        len(scheme) > 1
        and scheme.isascii()
        and scheme.replace("+", "").replace(".", "").replace("-", "").isalnum()
    ):
        raise RunDirError(
            f"run directory {text!r} is a URL: the recorder writes to a local directory only (a shard is "
            "renamed into place when complete, and a killed run keeps every flush). Record to a local "
            f"directory and copy it when the run ends (or while it runs), e.g. "
            f"pyarrow.fs.copy_files('runs/x', '{scheme}://bucket/runs/x'); normtrace_analysis loads it "
            "from there"
        )
    return path


def _utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _pass_counter() -> Callable[[], int]:
    """A function returning 0, 1, 2, ... to any number of threads, each number once.

    ``itertools.count``'s ``__next__`` is one C call, atomic under the GIL (~40 ns, against ~250 ns for a
    ``with lock:``, measured in the pass observer); a free-threaded interpreter gets a locked counter.
    """
    if getattr(sys, "_is_gil_enabled", lambda: True)():
        return itertools.count().__next__
    lock, count = threading.Lock(), itertools.count()

    def next_pass() -> int:
        with lock:
            return next(count)

    return next_pass


def _dist_rank() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Run:
    """What must be finished however a recording ends: the buffer, the writer, the metadata, the counters.

    It holds nothing of the ``Recorder``'s (no model, no hooks), so a Recorder nobody holds is collected,
    and the finalizer that then calls ``finish`` finds everything here.
    """

    def __init__(
        self,
        key: tuple[str, int],
        buffer: Buffer,
        writer: ShardWriter,
        meta: dict[str, Any],
        lock: rundir.RunDirLock,
    ) -> None:
        self.key = key  # (resolved run directory, rank)
        self.buffer, self.writer, self.meta, self.lock = buffer, writer, meta, lock
        self.epoch = 0
        self.step = 0  # optimizer steps completed (Recorder.attach(..., optimizer=...))
        self.next_pass = _pass_counter()
        self.last_pass = -1  # the last pass started (exact but for a pass another thread starts meanwhile)
        self.pid = os.getpid()  # a forked child's copy is not this run's owner
        self.signalled: int | None = None  # a SIGTERM/SIGHUP seen while open
        self.finishing = False  # finish() has told the writer to stop
        self.inert = False  # a forked child's copy: its hooks record nothing
        self.notes: dict[tuple[str, str], str] = {}
        self.notes_lock = threading.Lock()
        self.compact = True  # merge the shards when the user closes the run (Recorder(compact=...))

    def count_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """After each ``optimizer.step()`` that ran (a ``GradScaler`` skipping a step never calls it)."""
        self.step += 1

    def note(self, module: str, kind: str, detail: str) -> None:
        """Remember, once, that something about ``module`` could not be recorded; lands in meta.json."""
        with self.notes_lock:  # hooks of several threads may note at once
            if (module, kind) in self.notes:
                return
            self.notes[(module, kind)] = detail
            self.meta["notes"] = [{"module": m, "kind": k, "detail": d} for (m, k), d in self.notes.items()]
        self.write_meta()

    def hand_over(self, wait_for_room: bool = True) -> None:
        """Give the buffered rows to the writer; with ``wait_for_room``, first wait while it lags too far
        behind (``ShardWriter.wait_for_room``)."""
        with critical():  # a signal waits too: its handler joins a writer that needs the lock the wait holds
            if wait_for_room:
                self.writer.wait_for_room()
            self.buffer.take(self.writer.submit_records)

    def write_meta(self) -> None:
        """Queue a rewrite of the metadata file with the current ``meta``."""
        with critical():
            self.writer.submit_meta(dict(self.meta))

    def finish(self, status: str, *, wait: bool = True) -> WriterError | None:
        """Hand over what is left, write the final metadata with ``status`` and stop the writer.

        Safe from any thread, a signal handler or a finalizer: nothing but the final wait blocks. A
        second call only waits. Returns the writer's pending error when it waits. In a forked child it
        does nothing: the run directory and the writer are the parent's.
        """
        if os.getpid() != self.pid:
            return None
        with critical():
            if not self.finishing:
                self.finishing = True
                if self.signalled is not None and status in ("failed", "exited"):
                    status = "terminated"  # an exception or exit that the signal's handler caused
                self.last_pass = self.next_pass() - 1  # exact: the next number is the count so far
                self.buffer.take(self.writer.submit_records)
                self.meta.update(
                    status=status,
                    end_time=_utcnow(),
                    epochs=self.epoch,
                    passes=self.last_pass + 1,
                    steps=self.step,
                )
                self.writer.submit_meta(dict(self.meta))
                # the directory is free once all is written (and merged, at a close the user asked for)
                self.writer.close(
                    then=self.lock.release, compact=self.compact and status in ("closed", "failed")
                )
        if not wait:
            return None
        self.writer.join()
        return self.writer.take_error()


class Recorder:
    """Records what the lenses see into Arrow IPC shards under ``run_dir``, off the training thread.

    ``run_dir`` defaults to ``runs/<date>-<time>_<host>`` (as torch's ``SummaryWriter`` does), so code
    written for the seed's ``PyTorchInspector(lenses=[...])`` runs unchanged. ``lenses`` not given are
    ``OutputNorm()`` and ``ParameterNorm()`` (``lenses.default_lenses``, the framework callbacks' too), so
    a recorder attached with no more said records something; ``lenses=[]`` records only passes, epochs,
    events and the metrics pushed.

    ``flush_every`` passes or ``flush_secs`` seconds (whichever comes first), at ``tick_epoch()`` once at
    least ``epoch_flush_secs`` have passed since the last flush (0: at every tick), and at ``close()``,
    the buffered rows go to the writer thread; a killed run keeps every earlier flush. Use as a context
    manager or call ``close()``; a recorder still open at interpreter exit is closed then, one collected
    without ``close()`` is finished then, and one open when the process gets SIGTERM or SIGHUP is written
    before the signal goes on (``handle_signals=False``: not). When more than ``max_queued_rows`` rows
    wait for the writer, flushes wait for it (see ``ShardWriter.wait_for_room``). When the run is
    closed (``close()``, the end of its ``with`` block), each table's shards are merged into files of about
    a million rows (``schema.compact``; ``compact=False``: not), which costs one more read and write of
    the trace. The writer merges as the run goes on, each time a table has another million rows, so
    ``close()`` merges only the last of them; a run that ends any other way keeps the shards it wrote
    since, and ``normtrace compact RUN`` merges them.
    ``config`` (a mapping of JSON values: learning rate, seed, ...) is stored in meta.json, where the
    analysis groups runs by it.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        lenses: Sequence[Lens] | None = None,
        *,
        run_name: str | None = None,
        flush_every: int = 1000,
        flush_secs: float = 10.0,
        epoch_flush_secs: float = 1.0,
        overwrite: bool = False,
        compression: schema.Compression = "lz4",
        handle_signals: bool = True,
        max_queued_rows: int = 1_000_000,
        compact: bool = True,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = run_config(config)
        if int(flush_every) < 1:
            raise ValueError(f"Recorder(flush_every=...) must be at least 1 pass, got {flush_every!r}")
        if not float(flush_secs) > 0:
            raise ValueError(f"Recorder(flush_secs=...) must be positive, got {flush_secs!r}")
        if int(max_queued_rows) < 1:
            raise ValueError(f"Recorder(max_queued_rows=...) must be at least 1, got {max_queued_rows!r}")
        if lenses is None:
            lenses = default_lenses()
        elif isinstance(lenses, Lens) or not isinstance(lenses, Iterable):
            name = type(lenses).__name__
            hint = f": write lenses=[{name}(...)]" if isinstance(lenses, Lens) else ""
            raise TypeError(f"Recorder(lenses=...) takes a list of lenses, got {name}{hint}")
        seen: set[type] = set()
        for lens in lenses:
            if isinstance(lens, type):
                raise TypeError(
                    f"Recorder(lenses=...): {lens.__name__} is a class; pass a lens, {lens.__name__}()"
                )
            if not isinstance(lens, Lens):
                raise TypeError(
                    f"Recorder(lenses=...): {lens!r} is not a lens: a lens has config() and "
                    "attach(target, recording) methods (see normtrace.recording.Lens)"
                )
            if type(lens) in seen:
                raise ValueError(f"Recorder(lenses=...): more than one {type(lens).__name__} lens")
            seen.add(type(lens))
        self.lenses = tuple(lenses)

        self.run_dir = local_run_dir(run_dir) if run_dir is not None else default_run_dir()
        self.rank, self.world_size = _dist_rank()
        self.flush_every = int(flush_every)
        self.flush_secs = float(flush_secs)
        if not float(epoch_flush_secs) >= 0:
            raise ValueError(f"Recorder(epoch_flush_secs=...) must be 0 or more, got {epoch_flush_secs!r}")
        self.epoch_flush_secs = float(epoch_flush_secs)
        self.max_queued_rows = int(max_queued_rows)
        self.compact = bool(compact)
        self._key = (str(self.run_dir.resolve()), self.rank)
        self._wait_for_other_writers(overwrite)
        lock = rundir.claim(self.run_dir, self.rank, overwrite)
        try:
            self._start(run_name, lock, compression, handle_signals)
        except BaseException:
            lock.release()
            raise

    def _start(
        self,
        run_name: str | None,
        lock: rundir.RunDirLock,
        compression: schema.Compression,
        handle_signals: bool,
    ) -> None:
        """The rest of ``__init__``, once the run directory is this recorder's (``rundir.claim``)."""
        self._buffer = Buffer()
        self._local = threading.local()  # .state: this thread's PassState, set at each pass it starts
        self._last_flush_time = time.monotonic()
        self._flush_at_pass = self.flush_every  # the pass whose start hands over the buffer
        self._flush_deadline = self._last_flush_time + self.flush_secs
        self._root: nn.Module | None = None
        self._model: weakref.ref[nn.Module] | None = None  # the one model this run records
        self._handles: list[Removable] = []
        self._entries: list[str] | None = None  # the root's children that count passes (_outside_root)
        self._entry_lock = threading.Lock()
        self._closed = False
        self._inert = False  # a forked child's copy: records nothing, refuses every call
        self.handle_signals = bool(handle_signals)
        self._meta = self._initial_meta(run_name)
        try:
            write_json_atomic(self.run_dir / schema.meta_name(self.rank), self._meta)
        except OSError as exc:
            raise RunDirError(f"cannot write the run metadata in {self.run_dir}: {exc}") from exc
        self._writer = ShardWriter(
            self.run_dir,
            self.rank,
            compression,
            self.max_queued_rows,
            merge_rows=schema.COMPACT_ROWS if self.compact else None,
        )
        self._run = _Run(self._key, self._buffer, self._writer, self._meta, lock)
        self._run.compact = self.compact
        # the lenses' handle: it refers to the run, never to this recorder (hooks kept alive by the model
        # must not keep the recorder alive: one dropped by its last reference is finished at once)
        outside_root = weakref.WeakMethod(self._outside_root)
        self._recording = Recording(
            self._run, self._local, self.rank, lambda m: (f := outside_root()) and f(m)
        )
        # collected without close(): finish the run (lifecycle); at exit the exit handler closes instead
        self._finalizer = weakref.finalize(self, lifecycle.abandon, self._run)
        self._finalizer.atexit = False
        lifecycle.register(self, self._run)

    # ------------------------------------------------------------------ attaching

    def attach(self, model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None) -> Recorder:
        """Hook ``model`` (the root whose forward calls count as passes) with the configured lenses.

        Args:
            model: the root module. A ``torch.compile`` or ``DistributedDataParallel`` wrapper is looked
                through: the model inside is hooked, under its own names.
            optimizer: the ``torch.optim.Optimizer`` that trains it. Its ``step()`` calls are counted (the
                ``step`` column of ``signals``), and the lenses that measure at an optimizer step
                (``GradientNorm``, ``UpdateRatio``) observe it.

        Example: ``rec.attach(model, optimizer=opt)``.
        """
        self._check_open()
        if not isinstance(model, nn.Module):
            raise TypeError(f"Recorder.attach(model): expected an nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "Recorder.attach(optimizer=...): expected a torch.optim.Optimizer, got "
                f"{type(optimizer).__name__}; a wrapper (a LightningOptimizer, an accelerate "
                "AcceleratedOptimizer) holds the torch optimizer as .optimizer: pass that"
            )
        if isinstance(model, torch.jit.ScriptModule):
            raise TypeError(
                "Recorder.attach(model): a TorchScript module runs without Python, so nothing can observe "
                "its layers; attach the eager model (before torch.jit.script), or use torch.compile"
            )
        if self._root is not None:
            raise NormtraceError(
                f"Recorder for {self.run_dir} is already attached to a {type(self._root).__name__}; "
                "call detach() first"
            )
        model = _unwrap(model)
        if self._model is not None and self._model() is not model:
            raise NormtraceError(
                f"Recorder for {self.run_dir} recorded another model before; a run records one model, "
                "whose series another model's would merge into under the same names: record it with a "
                "new Recorder (its own run directory)"
            )
        self._model = weakref.ref(model)
        target = Target(
            model, [(name or ROOT_NAME, module) for name, module in model.named_modules()], optimizer
        )
        self._root = model
        self._handles.append(before_forward(model, self._on_pass))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(self._run.count_step))
        self._meta["root"] = type(model).__name__
        self._meta["optimizer"] = None if optimizer is None else type(optimizer).__name__
        for lens in self.lenses:
            try:
                self._handles += lens.attach(target, self._recording)
            except BaseException as exc:
                self.detach()  # all or nothing: no half-attached model recording into this run
                add_note = getattr(exc, "add_note", None)  # Python 3.11+
                if add_note is not None:
                    add_note(f"normtrace: {type(lens).__name__}.attach failed; nothing is attached")
                raise
        # last: a lens observing the root itself (a one-layer model) records its output inside the pass;
        # observed after the pass ended, it would start a pass of its own (_outside_root)
        self._handles.append(after_forward(model, self._after_pass))
        self._run.write_meta()
        self._raise_writer_error()
        return self

    def track_target(self, module: nn.Module, event: str = "target_update") -> Recorder:
        """Log an ``event`` row every time ``load_state_dict`` loads into ``module`` (a DQN's target net)."""
        self._check_open()
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"Recorder.track_target(module): expected an nn.Module, got {type(module).__name__}"
            )
        self._check_name("track_target(event=...)", event)

        def hook(mod: nn.Module, incompatible_keys: Any) -> None:
            if mod is not module or self._inert:  # a deepcopy of the target net carries the hook
                return
            self._buffer.events.append((self._run.epoch, self._current_pass(), event, time.time()))

        self._handles.append(module.register_load_state_dict_post_hook(hook))  # type: ignore[no-untyped-call]
        self._meta["targets"].append({"class": type(module).__name__, "event": event})
        self._run.write_meta()
        self._raise_writer_error()
        return self

    def detach(self) -> None:
        """Remove every hook this recorder registered (outputs, root, loss, targets)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._root = None
        self._entries = None
        # a pass counted at the root's children never ends (no root forward returns): without a fresh
        # thread-local, calls after the next attach would record under that old pass as name#k
        self._local = self._recording.local = threading.local()

    # ------------------------------------------------------------------ recording

    def push_metric(
        self, name: str, value: float | int | Tensor | np.number, *, split: str | None = None
    ) -> None:
        """Record a named value (e.g. an episode's total reward); a tensor stays on its device until flush.

        Like every recording call, it records first and then raises a ``WriterError`` the writer met since
        the last call, so the value that reports the error is not lost with it.
        """
        self._check_open()
        self._check_name("push_metric(name)", name)
        self._buffer.metrics.append(
            (self._run.epoch, self._current_pass(), name, self._metric_value(name, value), split, time.time())
        )
        self._maybe_flush()
        self._raise_writer_error()

    def push_loss(self, value: float | Tensor, *, train: bool | None = None) -> None:
        """Record a loss value computed outside a hooked ``loss_fn``; ``train`` defaults to grad mode."""
        self._check_open()
        train = torch.is_grad_enabled() if train is None else train
        value = self._metric_value("loss", value)
        self._buffer.metrics.append(
            (self._run.epoch, self._current_pass(), "loss", value, "train" if train else "val", time.time())
        )
        self._maybe_flush()
        self._raise_writer_error()

    def event(self, name: str) -> None:
        """Mark an event (a learning-rate drop, a curriculum step) at the current pass and epoch."""
        self._check_open()
        self._check_name("event(name)", name)
        self._buffer.events.append((self._run.epoch, self._current_pass(), name, time.time()))
        self._maybe_flush()
        self._raise_writer_error()

    def collect(self) -> None:
        """Take the measurements lenses take at epoch ticks (``ParameterNorm``'s norms) now, in addition."""
        self._check_open()
        self._collect()
        self._raise_writer_error()

    def _collect(self) -> None:
        self._recording.collect()

    def tick_epoch(self) -> None:
        """Close the current epoch: record parameter norms, advance the epoch counter, flush.

        The flush is skipped when the last one is less than ``epoch_flush_secs`` old: a short episode
        (a few ms of CartPole) would otherwise cost three tiny files each, and the writer's work competes
        with training for the GIL. Nothing is dropped; the rows go with the next flush. A pending
        ``WriterError`` is raised after all of this: the epoch has advanced and its norms are recorded.
        """
        self._check_open()
        self._collect()
        self._run.epoch += 1
        if time.monotonic() - self._last_flush_time >= self.epoch_flush_secs:
            self._flush()
        self._raise_writer_error()

    def flush(self) -> None:
        """Hand everything buffered to the writer and wait until it is on disk."""
        self._check_open()
        self._flush()
        self._writer.wait()
        self._raise_writer_error()

    def close(self, status: str = "closed") -> Path:
        """Detach, write everything, finish the metadata and stop the writer; returns the run directory.

        Safe to call twice. Returning the directory makes ``na.report(rec.close(), "report.html")`` a line.
        A long backlog is drained with a log line every few seconds saying how many rows are left. In a
        forked child it only detaches: the run belongs to the parent.
        """
        if self._closed:
            return self.run_dir
        with critical():  # a signal arriving now waits until the writer has been told to stop
            self._closed = True
            self._finalizer.detach()
            self.detach()
            if self._inert:
                return self.run_dir
            lifecycle.unregister(self)
            self._run.finish(status, wait=False)
        err = self._run.finish(status)
        if err is not None:
            raise err
        return self.run_dir

    def __deepcopy__(self, memo: dict[int, Any]) -> Recorder:
        """The recorder itself: a writer thread and a run directory are not copied.

        ``copy.deepcopy(model)`` on an attached model (a DQN target net, ``AveragedModel``, an EMA
        teacher) gives plain modules (``observe``), but copies PyTorch's hook dicts where normtrace fell
        back to hooks, and with them a bound pass hook; it then refers to this recorder, and every hook
        ignores modules other than the ones it was attached to.
        """
        return self

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close("failed" if exc_type is not None else "closed")

    @property
    def epoch(self) -> int:
        """Number of ``tick_epoch()`` calls so far."""
        return self._run.epoch

    @property
    def passes(self) -> int:
        """Number of forward calls of the attached root so far (all threads)."""
        return self._run.last_pass + 1

    # ------------------------------------------------------------------ internals

    def _on_pass(self, module: nn.Module, args: Any) -> None:
        """Runs before each forward of the root, once per pass: numbers it, compacts and flushes when due.

        A pass belongs to the thread that runs it: it takes the next number, and the hooks this thread
        runs until its next pass record under it (``_local.state``), whatever other threads do meanwhile.
        """
        if module is not self._root and not is_data_parallel_replica(module):
            return  # a deepcopy of the attached model: its passes are not ours
        if torch.compiler.is_exporting():
            return  # torch.export traces forward on fake tensors: not a pass
        if graph_task_id() != -1:
            return  # backward recomputing a checkpointed forward (torch.utils.checkpoint): not a pass
        self._local.inside = True
        self._begin_pass()

    def _after_pass(self, module: nn.Module, args: Any, out: Any) -> None:
        """Runs after each forward of the root: the pass's state becomes the thread's last (``local.last``,
        for the rows recorded after it: the loss, gradients), so that a module this thread runs next is
        seen to run outside the root's forward (``Recording.outside_pass``)."""
        if module is self._root or is_data_parallel_replica(module):
            local = self._local
            local.inside = False
            state = local.__dict__.pop("state", None)
            if state is not None:
                local.last = state

    def _begin_pass(self) -> PassState:
        """Start a pass in this thread (the root's forward, or a child called without it): take its number,
        compact the buffer and flush when due; returns the thread's new ``PassState``."""
        run = self._run
        p = run.last_pass = run.next_pass()
        if not in_transform():
            state: PassState = (p, run.epoch, {})
        else:  # vmap/grad: a pass (the model ran), but its outputs are batched or wrapped tensors
            state = (p, run.epoch, None)
            self._note(ROOT_NAME, "torch_func_transform", TRANSFORM_NOTE)
        self._local.state = state
        if len(self._buffer.outputs) >= COMPACT_VALUES:
            with critical():
                self._buffer.compact()
        if p >= self._flush_at_pass or time.monotonic() > self._flush_deadline:
            self._flush(p)  # hands over every pass before this one that this thread ran
        return state

    def _outside_root(self, module: nn.Module) -> PassState | None:
        """A hook's module ran while this thread runs no pass (``Recording.outside_pass``: the root's
        forward has returned, or the thread never ran it), as a Lightning ``training_step`` calling
        ``self.net(x)`` does: from now on a pass is counted at each call of one of the root's children made
        outside the root's forward (``_on_entry``), and this call starts one. Returns the new
        ``PassState``, or None when this is no pass (a ``DataParallel`` worker's replica, whose wrapper
        counts; ``torch.export``; a forward recomputed in backward; a forked child; a detached recorder)."""
        root = self._root
        if (
            root is None
            or self._inert
            or is_data_parallel_replica(module)
            or torch.compiler.is_exporting()
            or graph_task_id() != -1
        ):
            return None
        with self._entry_lock:
            if self._entries is None:
                self._entries = self._observe_entries(root, module)
        return self._begin_pass()

    def _observe_entries(self, root: nn.Module, ran: nn.Module) -> list[str]:
        """Observe the forward of each child of ``root``, to start a pass when one is called outside the
        root's forward; warn once, naming ``ran`` (the module that ran outside) and the children."""
        children = list(root.named_children())
        for _, child in children:
            self._handles.append(before_forward(child, self._on_entry(child)))
        names = [name for name, _ in children]
        ran_name = next((n for n, m in root.named_modules() if m is ran), type(ran).__name__)
        shown = ", ".join(names[:5]) + (", …" if len(names) > 5 else "")
        root_name = type(root).__name__
        detail = (
            f"{ran_name!r} ran outside {root_name}.forward (a Lightning training_step calling self.net(x) "
            f"instead of self(x)?): from now on each call of a child of {root_name} ({shown}) made outside "
            f"its forward counts as a pass. To count passes at the module you call, attach that one "
            "(Recorder.attach(model.net), or NormtraceCallback(module='net'))"
        )
        warn_user(f"normtrace: {detail}")
        self._note(ROOT_NAME, "passes_from_children", detail)
        return names

    def _on_entry(self, child: nn.Module) -> Callable[[nn.Module, Any], None]:
        """The observer of one child of the root (see ``_outside_root``)."""
        local = self._local

        def on_entry(module: nn.Module, args: Any) -> None:
            if module is not child:
                return  # a copy, or a DataParallel replica (run by its wrapper's pass): no pass of its own
            if getattr(local, "inside", False) or graph_task_id() != -1 or torch.compiler.is_exporting():
                return  # called by the root's forward (already a pass), or recomputed in backward
            self._begin_pass()

        return on_entry

    def _current_pass(self) -> int:
        """The pass a row recorded now belongs to: the calling thread's last, else any thread's last."""
        local = self._local
        state: PassState | None = getattr(local, "state", None) or getattr(local, "last", None)
        return self._run.last_pass if state is None else state[0]

    def _maybe_flush(self) -> None:
        if time.monotonic() > self._flush_deadline:
            self._flush()

    def _flush(self, next_pass: int | None = None) -> None:
        if next_pass is None:
            next_pass = self._run.last_pass + 1
        self._flush_at_pass = next_pass + self.flush_every
        self._last_flush_time = now = time.monotonic()
        self._flush_deadline = now + self.flush_secs
        self._run.hand_over()

    def _terminated(self, signum: int) -> None:
        """SIGTERM/SIGHUP with a handler of the user's to hand it to: write everything and say so in the
        metadata, but stay open (that handler may let training go on; ``close()`` then says ``closed``)."""
        run = self._run
        run.signalled = signum
        run.hand_over(wait_for_room=False)
        run.meta.update(
            status="terminated",
            end_time=_utcnow(),
            epochs=run.epoch,
            passes=run.last_pass + 1,
            steps=run.step,
        )
        run.write_meta()
        self._writer.wait()

    def _forked(self) -> None:
        """In a forked child: record nothing more (hooks see a pass that records nothing), refuse calls."""
        self._inert = self._run.inert = True
        self._root = None  # no pass observer call counts a pass any more
        self._local.state = (self._run.last_pass, self._run.epoch, None)
        self._run.lock.forget()  # the child's copy of the descriptor must not hold the parent's lock

    def _note(self, module: str, kind: str, detail: str) -> None:
        """Remember, once, that something about ``module`` could not be recorded (``_Run.note``)."""
        self._run.note(module, kind, detail)

    def _check_open(self) -> None:
        """Refuse a call on a closed recorder, or on a forked child's copy; every public call starts here."""
        if self._inert:
            raise NormtraceError(
                f"this Recorder of {self.run_dir} belongs to process {self._run.pid}; in this process "
                f"({os.getpid()}), a fork() of it, it records nothing and cannot write, since fork does not "
                "copy its writer thread: create a Recorder with its own run directory in the child"
            )
        if self._closed:
            raise NormtraceError(f"Recorder for {self.run_dir} is closed")

    def _raise_writer_error(self) -> None:
        """Raise, once, what the writer failed at since the last call; every public call ends here, after
        doing its work, so the call that reports an error loses nothing of its own."""
        err = self._writer.take_error()
        if err is not None:
            raise err

    @staticmethod
    def _check_name(what: str, name: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"Recorder.{what}: expected a non-empty string, got {name!r}")

    @staticmethod
    def _metric_value(name: str, value: Any) -> float | Tensor:
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"metric {name!r}: expected a single value, got a tensor of shape {tuple(value.shape)}"
                )
            return value.detach().reshape(())
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.reshape(())[()]
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"metric {name!r}: expected a number or a one-element tensor, got {value!r}"
            ) from None

    def _stop_other_writer(self, overwrite: bool) -> None:
        """Refuse, or with ``overwrite`` close, another open recorder of this process on this directory.

        Re-running a notebook cell leaves the previous recorder open and attached; both writing one
        directory would give two shards the same name.
        """
        other = lifecycle.OPEN.get(self._key)
        if other is None or other._closed or other._inert:
            return
        if not overwrite:
            raise RunDirError(
                f"run directory {self.run_dir} is being written by an open Recorder in this process; "
                "close that one, choose a new directory, or pass overwrite=True to close it and start over"
            )
        with contextlib.suppress(WriterError):  # its trace is about to be overwritten anyway
            other.close(status="replaced")

    def _wait_for_other_writers(self, overwrite: bool) -> None:
        """Deal with this process's other writers of this directory before claiming it (``rundir``)."""
        self._stop_other_writer(overwrite)
        lifecycle.wait_for_finishing(self._key)

    def _initial_meta(self, run_name: str | None) -> dict[str, Any]:
        return {
            "schema_version": schema.SCHEMA_VERSION,
            "normtrace_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "run_name": run_name or self.run_dir.resolve().name,
            "start_time": _utcnow(),
            "end_time": None,
            "status": "running",
            "rank": self.rank,
            "world_size": self.world_size,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "lenses": [lens.config() for lens in self.lenses],
            "normalize": {"outputs": False, "params": False},
            "root": None,
            "optimizer": None,
            "modules": {"outputs": [], "params": []},
            "targets": [],
            "metrics": [],
            "flush": {
                "every_passes": self.flush_every,
                "every_secs": self.flush_secs,
                "epoch_min_secs": self.epoch_flush_secs,
                "max_queued_rows": self.max_queued_rows,
            },
            "notes": [],
            "config": self.config,
        }


def run_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``config`` as meta.json stores it: a JSON object with string keys, so that the analysis can group
    and filter runs by their hyperparameters; anything else is refused before the run starts, naming the
    key at fault."""
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise TypeError(
            f"Recorder(config=...) must be a mapping of names to values, got {type(config).__name__}"
        )
    for key, value in config.items():
        if not isinstance(key, str):
            raise TypeError(f"Recorder(config=...) keys must be strings, got {key!r}")
        try:
            json.dumps(value, allow_nan=True, default=_numpy_value)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"Recorder(config=...)[{key!r}] is not a JSON value ({exc}): pass numbers, strings, booleans, "
                "None, lists or mappings"
            ) from None
    parsed: dict[str, Any] = json.loads(json.dumps(dict(config), allow_nan=True, default=_numpy_value))
    return parsed


def _numpy_value(value: Any) -> Any:
    """A NumPy scalar or array in a config (``np.float32(3e-4)``, a seed from ``np.random``) as the
    Python number or list it holds; anything else is not a JSON value."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` (``_orig_mod``) and ``DistributedDataParallel`` (``module``)
    wrappers, however nested, else ``model`` itself.

    Both wrappers call the inner module once per forward, so it is observed and passes count as before,
    and its names carry no ``_orig_mod.``/``module.`` prefix: a compiled, a distributed and an eager run
    of one model have the same series. (``nn.DataParallel`` is not unwrapped: its replicas call the inner
    module once per device, so the wrapper is what counts passes.)
    """
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner
