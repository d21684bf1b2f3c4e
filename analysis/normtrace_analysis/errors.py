"""Errors raised when a trace cannot be read; every message names the offending file or folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # storage imports this module
    from .storage import ObjectPath


class TraceError(Exception):
    """Base class of every error about reading a trace; ``path`` is the file or folder at fault (a
    ``Path``, or for a run on object storage its ``storage.ObjectPath`` or URL string)."""

    path: str | Path | ObjectPath | None

    def __init__(self, message: str, path: str | os.PathLike[str] | ObjectPath | None = None) -> None:
        super().__init__(message)
        if isinstance(path, str) and "://" in path:
            self.path = path  # a URL: Path() would collapse its "//"
        elif isinstance(path, str | os.PathLike):
            self.path = Path(path)
        else:
            self.path = path


class RunNotFoundError(TraceError, FileNotFoundError):
    """A run directory (or a glob meant to match some) does not exist."""


class MetaError(TraceError):
    """``meta.json`` is missing, is not valid JSON, or lacks ``schema_version``."""


class EmptyRunError(TraceError):
    """A run directory holds no readable shard in any table."""


class EmptySelectionError(TraceError, ValueError):
    """A filter (``Trace.filter``, the CLI's ``--modules``/``--epochs``/``--split``) leaves no row; the
    message says what the trace holds instead."""


class MissingEventError(TraceError, LookupError):
    """An event test was asked for an event name that no loaded run recorded; the message lists the names
    that were recorded."""


class CorruptShardError(TraceError):
    """A shard is truncated, unreadable, or lacks a required column (skippable with ``on_error="skip"``)."""


class SchemaVersionError(TraceError):
    """A run was written in a trace-format version newer than this reader understands."""


class MissingTableError(TraceError, LookupError):
    """An analysis needs a table for which no loaded run has any shard."""


class SkippedShardsWarning(UserWarning):
    """Emitted by ``load(..., on_error="skip")`` listing the corrupt shards left out, and (a second one)
    the runs left out for having no shard at all."""


class StrayFilesWarning(UserWarning):
    """Emitted by ``load`` for ``.arrow`` files in a table folder that are not shards (a copy, an export):
    they are left out, never read as part of the run."""


class ShortSeriesWarning(UserWarning):
    """Emitted by the spike detector when series are shorter than its baseline window: "no spikes" then
    means "too few points to tell", not "nothing happened"."""


def caller_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` that points at the first frame outside this package: the
    user's call, however deep inside the package the warning is raised."""
    package = str(Path(__file__).parent)
    frame: FrameType | None = sys._getframe(1)
    level = 1
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level
