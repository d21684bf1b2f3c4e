"""A notebook executed headless (nbclient, an ipykernel of this interpreter): the Trace's HTML summary and
an Altair chart whose output carries its own Vega code, so it draws with no internet."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import normtrace_analysis as na
import pytest
from optional import need
from tracegen import synthetic_dqn, write_trace

nbformat = need("nbformat")
nbclient = need("nbclient")
need("ipykernel")


@pytest.fixture
def run(tmp_path: Path) -> Path:
    s = synthetic_dqn(n_epochs=10, passes_per_epoch=20, seed=2)
    return write_trace(tmp_path / "dqn", outputs=s.outputs, events=s.events)


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec running this interpreter (where normtrace_analysis is installed), found first."""
    spec = tmp_path / "jupyter" / "kernels" / "normtrace-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "test", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "normtrace-test"


def test_a_notebook_shows_the_trace_summary_and_offline_charts(
    run: Path, tmp_path: Path, kernel: str
) -> None:
    cells = [
        "import normtrace_analysis as na\nna.enable_offline_charts()",
        f"trace = na.load({str(run)!r})\ntrace",
        "na.charts.norms(trace, level='pass')",
        "na.charts.share(trace)",
        "print(repr(trace))",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(
        nb, timeout=120, kernel_name=kernel, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [cell.outputs for cell in nb.cells]
    assert all(o.output_type != "error" for cell in outputs for o in cell)

    summary = outputs[1][0].data
    assert "normtrace Trace" in summary["text/html"] and "<td>dqn</td>" in summary["text/html"]
    assert summary["text/plain"].startswith("<normtrace Trace: 1 run (dqn)")
    assert len(summary["text/plain"]) < 300

    for cell in (outputs[2], outputs[3]):
        page = cell[0].data["text/html"]
        assert "window.vegaEmbed" in page and "vega-lite" in page
        assert not re.search(r"<script[^>]*\ssrc=", page)  # nothing to fetch: no script src at all
        assert len(page) > 500_000  # the Vega bundle is inlined
    assert outputs[2][0].data["text/html"] != outputs[3][0].data["text/html"]

    printed = outputs[4][0].text
    assert printed == repr(na.load(run)) + "\n"
