"""Fixtures of the report tests: two synthetic runs and a headless Chromium (Playwright)."""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from reportgen import dqn_run

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="session")
def run_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dqn_run(tmp_path_factory.mktemp("runs") / "run-a")


@pytest.fixture(scope="session")
def run_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dqn_run(tmp_path_factory.mktemp("runs") / "run-b", n_epochs=30, seed=1)


def _chromium() -> tuple[str | None, str]:
    """A Chromium/Chrome executable ($NORMTRACE_CHROMIUM, else the first on PATH), or why there is none."""
    explicit = os.environ.get("NORMTRACE_CHROMIUM")
    if explicit:
        return (
            (explicit, "")
            if Path(explicit).exists()
            else (None, f"NORMTRACE_CHROMIUM={explicit} does not exist")
        )
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found, ""
    return None, "no chromium executable on PATH (apt-get install chromium, or set NORMTRACE_CHROMIUM)"


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    """Headless Chromium through Playwright; under CI=true a missing browser fails instead of skipping."""
    executable, why = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        executable, why = None, "the playwright package is not installed"
    if executable is None:
        message = f"cannot check the HTML report in a browser: {why}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        warnings.warn(message, stacklevel=1)
        pytest.skip(f"SKIPPED LOUDLY — {message}")
    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield instance
        instance.close()
