"""Progress feedback on stderr for slow work: silent for the first second, then the current step.

On a terminal it is a live tqdm line, refreshed every half second by a background thread so that a single
long step (one big Polars query) still shows its elapsed time. When stderr is not a terminal (a pipe, a
log file, CI) a redrawn line would leave carriage returns in the text, so each new step is one plain line
instead. stdout is never touched, so piped output stays parseable.

Long inner loops (reading a table of many millions of rows in pieces) call :func:`detail` with how far
they are; it shows in the innermost open ``progress`` block after its step name, and nowhere when no
block is open, so the library stays quiet unless a caller asked for progress.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from tqdm import tqdm

DELAY_S = 1.0
"""Work that finishes sooner than this prints nothing."""


class Steps(Protocol):
    """What ``progress`` yields: name the step under way (a tqdm bar on a terminal)."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Name the step under way."""


_open: list[_Tracked] = []
"""The steps of the ``progress`` blocks now open, innermost last."""


def detail(text: str) -> None:
    """Show ``text`` (e.g. "outputs 40%") after the step under way in the innermost open progress
    block; does nothing when no block is open."""
    if _open:
        _open[-1].detail(text)


class _Tracked:
    """The object a ``progress`` block yields: the step it names, plus a detail from inner loops."""

    def __init__(self, target: Steps) -> None:
        self.target = target
        self.step = ""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.step = s
        self.target.set_postfix_str(s, refresh=refresh)

    def detail(self, text: str) -> None:
        self.target.set_postfix_str(f"{self.step}: {text}" if self.step else text, refresh=False)


class _Lines:
    """Steps as plain lines on a non-terminal stderr: ``desc: step (12 s)`` once per step, after the delay."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.start = time.monotonic()
        self.step = ""
        self.shown: str | None = None  # the last step printed (None: no line yet, not even the bare one)
        self.lock = threading.Lock()

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        with self.lock:
            self.step = s
        if time.monotonic() - self.start >= DELAY_S:
            self.show()

    def show(self) -> None:
        with self.lock:
            if self.step == self.shown:
                return
            self.shown = self.step
            elapsed = time.monotonic() - self.start
            line = (
                f"{self.desc}: {self.step} ({elapsed:.0f} s)"
                if self.step
                else f"{self.desc} ({elapsed:.0f} s)"
            )
        print(line, file=sys.stderr, flush=True)


@contextmanager
def progress(desc: str, total: int | None = None, *, enabled: bool = True) -> Iterator[Steps]:
    """Progress on stderr for the ``with`` block: ``bar.set_postfix_str(step, refresh=False)`` names the
    step under way. With ``total=None`` a terminal line shows the description, the step and the time."""
    done = threading.Event()
    if not sys.stderr.isatty():
        lines = _Lines(desc)

        def announce() -> None:
            if not done.wait(DELAY_S):
                lines.show()

        ticker = threading.Thread(target=announce, daemon=True)
        if enabled:
            ticker.start()
        tracked = _Tracked(lines if enabled else _Silent())
        _open.append(tracked)
        try:
            yield tracked
        finally:
            _open.remove(tracked)
            done.set()
            if enabled:
                ticker.join()
        return
    layout = "{desc}: {elapsed}{postfix}" if total is None else None
    bar = tqdm(
        total=total, desc=desc, file=sys.stderr, delay=DELAY_S, leave=False, disable=not enabled,
        bar_format=layout, unit="step",
    )  # fmt: skip

    def tick() -> None:
        if done.wait(DELAY_S):
            return
        while not done.is_set():
            bar.update(0)  # redraws (elapsed time, current step) and lets close() erase the line
            done.wait(0.5)

    ticker = threading.Thread(target=tick, daemon=True)
    if enabled:
        ticker.start()
    tracked = _Tracked(bar)
    _open.append(tracked)
    try:
        yield tracked
    finally:
        _open.remove(tracked)
        done.set()
        if enabled:
            ticker.join()
        bar.close()


class _Silent:
    """Progress switched off."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Ignore the step."""
