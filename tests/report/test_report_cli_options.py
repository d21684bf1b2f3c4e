"""`normtrace report`: where it writes by default, and that its options reach the page and the charts.

The run is known by construction (three modules, a ``target_update`` every 7 epochs and three
``lr_drop`` events added by hand), so every expectation is read off the run, not off the analysis.
"""

from __future__ import annotations

from pathlib import Path

import normtrace_analysis as na
import normtrace_analysis.progress as progress_module
import numpy as np
import pytest
from normtrace_analysis.cli import main
from reportgen import long_run
from tracegen import write_trace

LR_DROPS = [100, 200, 300]


@pytest.fixture(scope="module")
def two_event_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = long_run(tmp_path_factory.mktemp("runs") / "two-events", 40)
    write_trace(
        run,
        events={
            "epoch": np.array(LR_DROPS, dtype=np.int32) // 10,
            "pass": np.array(LR_DROPS),
            "name": ["lr_drop"] * len(LR_DROPS),
        },
        write_meta=False,
    )
    return run


@pytest.fixture
def shown_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress lines from the first moment (not after a second), so a test can see them."""
    monkeypatch.setattr(progress_module, "DELAY_S", 0.0)


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_report_without_output_writes_report_html_in_the_working_folder(
    two_event_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli(capsys, "report", two_event_run)
    assert (code, out) == (0, "report.html\n")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]
    assert (tmp_path / "report.html").read_text().lstrip().lower().startswith("<!doctype html>")


@pytest.mark.usefixtures("shown_at_once")
def test_report_options_reach_the_page(
    two_event_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "page.html"
    code, out, err = cli(
        capsys, "report", two_event_run, "-o", page, "--event", "lr_drop", "--log", "--max-rows", "200"
    )
    assert (code, out) == (0, f"{page}\n")
    text = page.read_text()
    # --event: the findings are about lr_drop alone (by default the most frequent, target_update, first)
    assert "Findings: what follows lr_drop" in text and "Findings: what follows target_update" not in text
    assert '"scale":{"type":"log"}' in text  # --log: the norm charts' y scales
    # progress: one plain line per step (stderr is not a terminal here), each named for the command
    assert "report: spikes (0 s)" in err.splitlines() and all(
        line.startswith("report") for line in err.splitlines()
    )


def test_the_default_report_is_about_the_most_frequent_event_on_linear_scales(
    two_event_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The counterpart of the test above: without the options, neither shows."""
    page = tmp_path / "page.html"
    code, _, _ = cli(capsys, "report", two_event_run, "-o", page)
    text = page.read_text()
    assert code == 0 and text.index("Findings: what follows target_update") < text.index(
        "Findings: what follows lr_drop"
    )
    assert '"scale":{"type":"log"}' not in text


@pytest.mark.usefixtures("shown_at_once")
def test_static_charts_take_the_format_event_and_progress_asked_for(
    two_event_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "charts"
    code, out, err = cli(
        capsys, "report", two_event_run, "--format", "png", "-o", folder, "--event", "lr_drop"
    )
    assert code == 0
    files = [Path(line) for line in out.splitlines()]
    # one event-triggered average (lr_drop's), not one per recorded event
    assert sorted(f.name for f in files) == [
        "event-profile.png",
        "metrics.png",
        "output-norms.png",
        "output-share.png",
    ]
    assert all(f.parent == folder and f.read_bytes().startswith(b"\x89PNG") for f in files)
    assert "export png: spikes (0 s)" in err.splitlines()
    code, out, _ = cli(capsys, "report", two_event_run, "--format", "svg", "-o", tmp_path / "all", "--log")
    profiles = sorted(Path(line).name for line in out.splitlines() if "event-profile" in line)
    assert (code, profiles) == (0, ["event-profile-2.svg", "event-profile.svg"])
    # --log reaches the static charts too (vl-convert's SVG describes each axis for screen readers)
    assert (
        "Y-axis titled 'output norm (L2)' for a log scale"
        in (tmp_path / "all" / "output-norms.svg").read_text()
    )


def test_charts_into_a_folder_that_holds_some_need_force(
    two_event_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "charts"
    folder.mkdir()
    for name in ("b-old.svg", "a-old.svg"):
        (folder / name).write_text("<svg/>")
    code, _, err = cli(capsys, "report", two_event_run, "--format", "svg", "-o", folder)
    assert code == 2 and f"{folder} already holds svg files (a-old.svg, …); pass --force" in err
    assert sorted(p.name for p in folder.iterdir()) == ["a-old.svg", "b-old.svg"]
    code, out, _ = cli(capsys, "report", two_event_run, "--format", "svg", "-o", folder, "--force")
    assert code == 0 and all(Path(line).parent == folder for line in out.splitlines())
    assert "Y-axis titled 'output norm (L2)' for a linear scale" in (folder / "output-norms.svg").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, _ = cli(capsys, "report", two_event_run, "--format", "svg", "-o", empty)
    assert code == 0  # an existing folder without charts is no reason to refuse


def test_a_run_with_nothing_to_chart_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = write_trace(
        tmp_path / "events-only",
        events={"epoch": np.array([1], dtype=np.int32), "pass": np.array([10]), "name": ["target_update"]},
    )
    code, out, err = cli(capsys, "report", run, "--format", "svg", "-o", tmp_path / "charts")
    assert (code, out) == (2, "")
    assert err == "normtrace: error: no chart could be exported: the trace has no rows to chart\n"


def test_the_fixture_run_is_what_the_tests_assume(two_event_run: Path) -> None:
    """Guards the expectations above: two event names, target_update the more frequent."""
    counts = dict(na.load(two_event_run).events.collect()["name"].value_counts().iter_rows())
    assert counts == {"target_update": 5, "lr_drop": 3}
