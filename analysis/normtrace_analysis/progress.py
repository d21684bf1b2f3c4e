"""Progress feedback on stderr for slow work: silent for the first second, then the current step.

On a terminal it is a live tqdm line, refreshed every half second by a background thread so that a single
long step (one big Polars query) still shows its elapsed time. When stderr is not a terminal (a pipe, a
log file, CI) a redrawn line would leave carriage returns in the text, so each new step is one plain line
instead. stdout is never touched, so piped output stays parseable.
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


class _Lines:
    """Steps as plain lines on a non-terminal stderr: ``desc: step (12 s)`` once per step, after the delay."""

    def __init__(self, desc: str) -> None:
        self.desc = desc
        self.start = time.monotonic()
        self.step = ""
        self.shown = ""  # the last step printed
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
        try:
            yield lines if enabled else _Silent()
        finally:
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
    try:
        yield bar
    finally:
        done.set()
        if enabled:
            ticker.join()
        bar.close()


class _Silent:
    """Progress switched off."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Ignore the step."""
