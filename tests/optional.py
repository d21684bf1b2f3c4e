"""Optional dependencies of the tests (frameworks, servers): one that is not installed skips its test loudly
here, and fails it under CI=true, where the ``test`` extra installs every one of them."""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import pytest


def need(module: str, extra: str = "test") -> ModuleType:
    """Import ``module``, or skip (locally, with a warning) / fail (under CI=true) saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = f"{module} is not installed ({exc}); pip install -e '.[{extra}]'"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        warnings.warn(message, stacklevel=2)
        pytest.skip(f"SKIPPED LOUDLY — {message}")
