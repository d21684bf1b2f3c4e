"""Exceptions raised by the recorder; each names the file, module or argument at fault."""

from __future__ import annotations

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
