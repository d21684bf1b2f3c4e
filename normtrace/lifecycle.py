"""How a recording ends, whichever way it ends: ``close()``, the recorder being garbage-collected,
interpreter exit, SIGTERM/SIGHUP, or a ``fork`` that copies it into a child.

Each ends the same way, through the recorder's ``_Run.finish`` (the buffered rows to the writer, the final
metadata, the writer stopped): what differs is the status written and whether the caller waits.

* ``close()`` — ``closed`` (or ``failed`` from a ``with`` block left by an exception).
* Collected without ``close()`` — ``abandoned``, from a ``weakref.finalize`` on the recorder; it does not
  wait (a finalizer may run on any thread, the writer's too), and the exit handler waits instead.
* Interpreter exit with recorders open — ``exited``, from one ``atexit`` handler, which then waits for
  every writer of this process still running.
* SIGTERM or SIGHUP (what schedulers and ``docker stop`` send) — ``terminated``. The handler is installed
  while a recorder with ``handle_signals=True`` is open, from the main thread only, and only over a
  Python handler or the default action (never over ``SIG_IGN`` or a C handler). It writes every open
  recorder's rows and then hands the signal on: to the handler it replaced, or, when that was the
  default action, by restoring it and re-sending the signal, so the process still dies of it.
* ``fork`` — the child's copies record nothing and refuse every call (the writer thread and the run
  directory stay the parent's).

A Python signal handler runs in the main thread between two bytecodes of whatever it was doing, so it may
interrupt the recorder itself, halfway through taking rows out of the buffer. Such stretches run inside
``critical()``; a signal arriving in one is acted on when it ends (microseconds later).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import weakref
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from normtrace.recorder import Recorder, _Run

SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)
"""The signals a recorder writes its rows on before the process goes: termination requests."""

OPEN: weakref.WeakValueDictionary[tuple[str, int], Recorder] = weakref.WeakValueDictionary()
"""This process's open recorders by (resolved run directory, rank)."""

_RUNS: set[_Run] = set()
"""Runs whose writer may still be running, their recorder open, closing or collected."""

_previous: dict[int, Any] = {}
"""The handler each installed signal had before normtrace's."""


class _Depth(threading.local):
    depth = 0


_local = _Depth()
_deferred: list[tuple[int, FrameType | None]] = []


class _Critical:
    """``with critical():`` marks a stretch a signal handler must not interrupt (see the module doc)."""

    def __enter__(self) -> None:
        _local.depth += 1

    def __exit__(self, *exc: object) -> None:
        _local.depth -= 1
        if not _local.depth and _deferred and threading.current_thread() is threading.main_thread():
            signum, frame = _deferred[0]
            _deferred.clear()
            _terminate(signum, frame)


_CRITICAL = _Critical()


def critical() -> _Critical:
    """The context manager that defers a signal arriving inside it to its end."""
    return _CRITICAL


def register(rec: Recorder, run: _Run) -> None:
    """A new open recorder: remember it for exit and signals, and forget runs whose writer is done."""
    OPEN[rec._key] = rec
    # list(): one atomic copy, while another thread's recorder may be registering
    _RUNS.difference_update([r for r in list(_RUNS) if not r.writer.alive])
    _RUNS.add(run)
    if rec.handle_signals:
        _install()


def unregister(rec: Recorder) -> None:
    """A recorder is closing: forget it, and put the signal handlers back if no open recorder wants them."""
    if OPEN.get(rec._key) is rec:
        OPEN.pop(rec._key, None)  # (another thread closing it too may have been first)
    if not any(r.handle_signals for r in _open_recorders()):
        _uninstall()


def abandon(run: _Run) -> None:
    """The finalizer of a recorder collected without ``close()``: finish its run without waiting (this
    may be any thread, the writer's own too; the exit handler waits), and put the signal handlers back
    if no open recorder wants them."""
    run.finish("abandoned", wait=False)
    if not any(r.handle_signals for r in _open_recorders()):
        _uninstall()


def _open_recorders() -> list[Recorder]:
    """Open recorders of this process (not the parent's, in a forked child)."""
    return [r for r in list(OPEN.values()) if r._run.pid == os.getpid() and not r._closed]


def wait_for_finishing(key: tuple[str, int]) -> None:
    """Wait for this process's writers still finishing a run of ``key`` (a recorder collected or closed a
    moment ago, elsewhere), so that a new recorder finds the directory free."""
    for run in list(_RUNS):
        if run.key == key and run.pid == os.getpid() and run.finishing:
            run.writer.join()


def _join_writers() -> None:
    for run in list(_RUNS):
        if run.pid == os.getpid():
            run.writer.join()
    _RUNS.clear()


@atexit.register
def _at_exit() -> None:
    """Close what is still open (status ``exited``) and wait for every writer still running."""
    for rec in _open_recorders():
        _close_quietly(rec, "exited")
    _join_writers()


def _close_quietly(rec: Recorder, status: str) -> None:
    """Close ``rec`` from exit or a signal, where raising helps nobody: say what failed on stderr."""
    try:
        rec.close(status=status)
    except Exception as exc:
        print(f"normtrace: closing the recorder of {rec.run_dir}: {exc}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ signals


def _install() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal.signal works only there; a recorder made in the main thread installs them
    for sig in SIGNALS:
        current = signal.getsignal(sig)
        if current is _on_signal or current in (signal.SIG_IGN, None):
            continue  # ours already; ignored on purpose; or a C handler we could not call back
        _previous[sig] = current
        signal.signal(sig, _on_signal)


def _uninstall() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in list(_previous):
        if signal.getsignal(sig) is _on_signal:  # the user may have installed theirs over ours
            signal.signal(sig, _previous[sig])
        del _previous[sig]


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if _local.depth:  # the main thread is inside the recorder: finish that stretch first
        _deferred.append((signum, frame))
        return
    _terminate(signum, frame)


def _terminate(signum: int, frame: FrameType | None) -> None:
    """Write every open recorder's rows, then hand the signal on as if normtrace were not there."""
    previous = _previous.get(signum, signal.SIG_DFL)
    recorders = [r for r in _open_recorders() if r.handle_signals]
    if callable(previous):
        # the user's handler decides: it may exit (then close() or the exit handler finish the runs as
        # "terminated") or let training go on (then recording goes on too)
        for rec in recorders:
            with contextlib.suppress(Exception):
                rec._terminated(signum)
        previous(signum, frame)
        return
    for rec in recorders:
        rec._run.signalled = signum
        _close_quietly(rec, "terminated")
    _join_writers()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # only if the signal is blocked in this thread


# ------------------------------------------------------------------------------------------ fork


def _after_fork_in_child() -> None:
    for rec in list(OPEN.values()):
        rec._forked()
    _RUNS.clear()
    _deferred.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
