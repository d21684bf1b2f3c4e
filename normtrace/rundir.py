"""Owning a run directory: one writer per rank at a time, across processes and hosts.

A recorder takes ``RUN/.lock-rank{r}`` before it touches anything in the directory, and keeps it until
its writer has written the last file. The lock is an exclusive ``flock`` on that file, held for the
recorder's life: the kernel drops it when the process ends, however it ends (SIGKILL too), so on one host
a lock nobody holds is stale by definition, and no process id is guessed at. The file's content (pid,
host, start time) names the owner in the error another process gets, and covers what ``flock`` cannot
see: a file system that does not share locks between hosts. A lock file written on another host is
refused unless ``overwrite=True``, since whether that process still runs cannot be told from here.

A live owner is refused even with ``overwrite=True``: overwriting means replacing a finished or dead run,
never mixing two live ones. Where ``fcntl`` is missing (Windows) the file is created exclusively instead,
and any existing lock file is treated like another host's.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from normtrace import schema
from normtrace.errors import RunDirError, warn_user

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


class RunDirLock:
    """A held ``.lock-rank{r}``; ``release()`` removes it (once), ``forget()`` lets go in a forked child."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def sign(self) -> None:
        """Write this process's name into the file (for the error another process gets)."""
        if self._fd is not None:
            mine = {"pid": os.getpid(), "hostname": socket.gethostname(), "start_time": _utcnow()}
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, (json.dumps(mine) + "\n").encode(), 0)

    def release(self) -> None:
        """Remove the lock file, then let go of it (in this order, so nobody locks a file about to go)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.forget()

    def forget(self) -> None:
        """Close this process's descriptor without removing the file: in a forked child, whose copy of
        the descriptor must not keep the parent's lock held after the parent is gone."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def claim(run_dir: Path, rank: int, overwrite: bool) -> RunDirLock:
    """Create ``run_dir`` if needed, take this rank's lock, and clear the rank's old trace when
    ``overwrite`` (else refuse a directory that holds one). Raises ``RunDirError`` naming the cause."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} exists and is not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create run directory {run_dir}: {exc}") from exc
    lock, taken_from = _lock(run_dir, rank, overwrite)
    try:
        _clear_old_trace(run_dir, rank, overwrite)
    except BaseException:  # leave the directory as it was: a stale lock file stays, a new one goes
        if taken_from:
            lock.forget()
        else:
            lock.release()
        raise
    lock.sign()
    if taken_from:  # said only now: a refused recorder has taken nothing
        warn_user(f"normtrace: {taken_from}")  # at the line that made the Recorder, however deep
    return lock


def _clear_old_trace(run_dir: Path, rank: int, overwrite: bool) -> None:
    meta = run_dir / schema.meta_name(rank)
    mine = [meta] if meta.exists() else []
    for table in schema.TABLES:
        mine += sorted(schema.shard_dir(run_dir, table).glob(f"rank{rank}-*{schema.SHARD_SUFFIX}"))
    if mine and not overwrite:
        raise RunDirError(
            f"run directory {run_dir} already holds a trace for rank {rank} ({mine[0]}); "
            "choose a new directory or pass overwrite=True"
        )
    for path in mine:
        path.unlink()


def _lock(run_dir: Path, rank: int, overwrite: bool) -> tuple[RunDirLock, str]:
    """The rank's lock, and what to say about a previous owner it was taken from ("" when none)."""
    path = run_dir / schema.lock_name(rank)
    fd = _open_locked(path, run_dir)
    previous = schema.lock_owner(fd)
    taken_from = ""
    if previous:
        if previous.get("hostname") == socket.gethostname() and fcntl is not None:
            # the kernel let us lock it, so its process is gone
            taken_from = f"took over {path} from {_describe(previous)}, which is no longer running"
        elif not overwrite:
            os.close(fd)
            raise RunDirError(
                f"run directory {run_dir} is locked by {_describe(previous)} ({path}), which cannot be "
                "checked from this host; if that process has ended, pass overwrite=True, else choose "
                "another directory"
            )
        else:
            taken_from = f"overwrite=True took {path} from {_describe(previous)}; make sure it has ended"
    return RunDirLock(path, fd), taken_from


def _open_locked(path: Path, run_dir: Path) -> int:
    """A descriptor of ``path`` holding its lock; raises ``RunDirError`` when a live process holds it."""
    if fcntl is None:  # pragma: no cover - Windows: exclusive creation, any leftover file is a foreign lock
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return os.open(path, os.O_RDWR)
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise RunDirError(
                    f"cannot lock {path} ({exc}); the file system may not support locks"
                ) from exc
            owner = _live_owner(fd)
            os.close(fd)
            this = " (this process: another Recorder)" if owner.get("pid") == os.getpid() else ""
            raise RunDirError(
                f"run directory {run_dir} is being written by {_describe(owner)}{this} ({path}); a run has "
                "one writer at a time, even with overwrite=True: choose another directory, or stop that "
                "process first"
            ) from None
        try:  # the previous owner may have removed the file between our open and our lock
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise RunDirError(f"cannot lock {path}: it keeps being replaced")


def _live_owner(fd: int, patience: float = 2.0) -> dict[str, Any]:
    """The owner a held lock file names, once it names a live one: the holder signs it just after taking
    the lock and checking the directory (over a dead owner's name, when it takes a stale lock over), so
    a file that is empty or names a process gone from this host is read again for a moment."""
    deadline = time.monotonic() + patience
    while True:
        owner = schema.lock_owner(fd)
        if (owner and not _gone(owner)) or time.monotonic() > deadline:
            return owner
        time.sleep(0.005)


def _gone(owner: dict[str, Any]) -> bool:
    """Whether ``owner`` names a process of this host that no longer runs."""
    pid = owner.get("pid")
    if owner.get("hostname") != socket.gethostname() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _describe(owner: dict[str, Any]) -> str:
    if not owner:
        return "another process (its lock file is empty)"
    since = f" since {owner['start_time']}" if owner.get("start_time") else ""
    return f"process {owner.get('pid', '?')} on {owner.get('hostname', '?')}{since}"


def _utcnow() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
