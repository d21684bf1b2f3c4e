"""Errors raised when a trace cannot be read; every message names the offending file or folder."""

from __future__ import annotations

from pathlib import Path


class TraceError(Exception):
    """Base class of every error about reading a trace; ``path`` is the file or folder at fault."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


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
    """Emitted by ``load(..., on_error="skip")`` listing the corrupt shards left out."""


class StrayFilesWarning(UserWarning):
    """Emitted by ``load`` for ``.arrow`` files in a table folder that are not shards (a copy, an export):
    they are left out, never read as part of the run."""
