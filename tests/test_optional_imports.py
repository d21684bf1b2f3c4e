"""Optional dependencies stay optional: the core imports no framework, and a missing one is named with
the extra that installs it."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest


def test_importing_normtrace_imports_no_framework() -> None:
    code = (
        "import sys, normtrace, normtrace.integrations; "
        "print(sorted(m for m in ('lightning', 'transformers', 'polars', 'tensorboard') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("normtrace.integrations.lightning", "lightning.pytorch.callbacks", "normtrace[lightning]"),
        ("normtrace.integrations.transformers", "transformers", "normtrace[transformers]"),
    ],
)
def test_a_callback_without_its_framework_names_the_extra(
    module: str, blocked: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)  # import of it raises ImportError
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"pip install '{re.escape(extra)}'"):
        importlib.import_module(module)


def test_tensorboard_export_without_tensorboard_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import normtrace_analysis as na

    monkeypatch.setitem(sys.modules, "tensorboard.summary", None)
    with pytest.raises(ImportError, match=r"pip install 'normtrace-analysis\[tensorboard\]'"):
        na.to_tensorboard(tmp_path / "no-run", tmp_path / "tb")
