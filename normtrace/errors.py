"""Exceptions raised by the recorder, each naming the file, module or argument at fault, and the helper
that points a warning at the user's own line."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path


class NormtraceError(Exception):
    """Base class of every error the recorder raises on purpose."""


class RunDirError(NormtraceError):
    """The run directory cannot be used (already holds a trace, not writable, not a folder)."""


class WriterError(NormtraceError):
    """The background writer could not write a shard or the metadata; ``path`` is the file at fault.

    The rows it was writing are kept in memory and retried at the next flush, so nothing recorded is lost
    if the cause (a full disk, a permission) is fixed.
    """

    def __init__(self, path: Path, cause: BaseException) -> None:
        super().__init__(f"normtrace could not write {path}: {type(cause).__name__}: {cause}")
        self.path = path


_NOT_USER = ("normtrace.", "torch.", "mutmut.")
"""Modules whose frames a warning skips: ours, torch's ``Module.__call__``, and the trampolines of the
mutation tool (``nox -s mutate``), which wrap every function of a mutated module."""


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn(message, category)`` pointing at the first frame outside normtrace and torch: the
    user's line that called the module or the recorder, however many of normtrace's frames lie between."""
    frame, level = sys._getframe(), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(_NOT_USER):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
