"""Progress feedback on stderr for slow work: silent for the first second, then a live tqdm line.

A background thread refreshes the line every half second, so a single long step (one big Polars query)
still shows its elapsed time; stdout is never touched, so piped output stays parseable.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

DELAY_S = 1.0
"""Work that finishes sooner than this prints nothing."""


@contextmanager
def progress(desc: str, total: int | None = None, *, enabled: bool = True) -> Iterator[tqdm]:
    """A tqdm bar on stderr for the ``with`` block: ``bar.set_postfix_str(step, refresh=False)``.

    With ``total=None`` the line shows only the description, the current step and the elapsed time.
    """
    layout = "{desc}: {elapsed}{postfix}" if total is None else None
    bar = tqdm(
        total=total, desc=desc, file=sys.stderr, delay=DELAY_S, leave=False, disable=not enabled,
        bar_format=layout, unit="step",
    )  # fmt: skip
    done = threading.Event()

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
