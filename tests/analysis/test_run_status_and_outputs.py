"""On runs the recorder wrote: empty and killed runs in a sweep, events a finding cannot test, outputs
written where they would harm a run, names that would break the command line's text tables (each found
by a new user's audit, 2026-12-03)."""

from __future__ import annotations

import io
import json
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import normtrace_analysis as na
import polars as pl
import pytest
import torch
from normtrace_analysis.cli import main
from normtrace_analysis.report import export_charts
from recorder_models import read_table
from test_recorder_runtime import EXAMPLES, KILLED_AFTER_FLUSHES, TESTS
from torch import nn

import normtrace as nt

pytestmark = pytest.mark.filterwarnings("ignore::normtrace_analysis.ShortSeriesWarning")  # runs of 40 passes


def _record(
    run: Path, *, names: tuple[str, str] = ("lin", "act"), event: str = "sync", grads: bool = False
) -> Path:
    """A real tiny run: a Linear and a ReLU named ``names``, 40 passes in epochs of 10 with an SGD step
    each, ``event`` at passes 5, 15, 25, 35; with ``grads`` also the gradient norms (signals)."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module(names[0], nn.Linear(4, 4))
    model.add_module(names[1], nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    lenses = [nt.OutputNorm(include=[nn.Linear]), *([nt.GradientNorm()] if grads else [])]
    with nt.Recorder(run, lenses=lenses) as rec:
        rec.attach(model, optimizer=opt)
        for i in range(40):
            opt.zero_grad()
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            if i % 10 == 5:
                rec.event(event)
            if i % 10 == 9:
                rec.tick_epoch()
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _record(tmp_path_factory.mktemp("audit") / "run", grads=True)


def _cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# 1. the command line's outputs


def test_charts_into_a_path_that_is_a_file_are_refused_naming_it(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "rich.html"
    page.write_bytes(b"keep me")
    for force in ([], ["--force"]):  # --force overwrites chart files, never a file with a folder
        code, out, err = _cli(capsys, "report", run, "--format", "png", "-o", page, *force)
        assert (code, out) == (2, "")
        assert (
            err
            == f"normtrace: error: {page} is a file, not a folder for the png charts (a file each): name a folder\n"
        )
        assert page.read_bytes() == b"keep me"


@pytest.mark.parametrize("option", [["--max-points", "5"], ["--level", "epoch"]])
def test_export_to_a_file_refuses_the_tensorboard_options(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: list[str]
) -> None:
    target = tmp_path / "x.parquet"
    code, out, err = _cli(capsys, "export", run, "-o", target, *option)
    assert (code, out) == (2, "")
    assert err == f"normtrace: error: argument {option[0]}: applies to --tensorboard only, not -o\n"
    assert not target.exists()
    assert _cli(capsys, "export", run, "-o", target)[0] == 0  # the same export without it is written
    assert pl.read_parquet(target).height == read_table(run, "outputs").num_rows


# 2. the Python report never writes into a run's table folders


def test_the_python_report_and_charts_refuse_a_runs_table_folders(run: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(run, tmp_path / "copy"))
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    trace = na.load(copy)
    with pytest.raises(ValueError) as err:
        na.report(trace, copy / "outputs" / "r.html")
    assert (
        str(err.value)
        == f"{copy / 'outputs' / 'r.html'} is inside the outputs/ folder of run 'copy'; write it somewhere else"
    )
    with pytest.raises(ValueError, match=r"charts is inside the signals/ folder of run 'copy'"):
        export_charts(trace, copy / "signals" / "charts", "svg")
    with pytest.raises(
        ValueError, match=rf"^{re.escape(str(tmp_path))} is a folder, not a file for the HTML"
    ):
        na.report(trace, tmp_path)
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stray file for the next load to warn about
        assert na.load(copy).runs == ["copy"]


# 3. signal findings about an event no run recorded


def test_signal_findings_refuse_an_event_never_recorded_as_the_alignment_does(run: Path) -> None:
    trace = na.load(run)
    with pytest.raises(na.MissingEventError) as alignment:
        trace.event_alignment("nope")
    for event in ("nope", ["sync", "nope"]):
        with pytest.raises(na.MissingEventError) as err:
            trace.signal_findings(event=event)
        assert str(err.value) == str(alignment.value) == "no 'nope' events in run; events recorded: sync (4)"
        assert err.value.path == run
    trace.signal_findings(event="sync")  # a recorded event is tested, not refused


# 4. an empty run among others


def test_empty_runs_are_left_out_of_a_sweep_with_a_warning_naming_them(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = tmp_path / "runs"
    good = Path(shutil.copytree(run, runs / "good"))
    empty = runs / "empty"
    nt.Recorder(empty).close()  # opened and closed before any pass
    bare = runs / "bare"
    bare.mkdir()
    shutil.copy(good / "meta.json", bare / "meta.json")  # a run folder holding only meta.json
    broken = Path(shutil.copytree(run, runs / "broken"))
    for shard in broken.rglob("*.arrow"):
        shard.write_bytes(b"not arrow")
    with pytest.raises(na.EmptyRunError, match=r"run \S+bare has no shards"):
        na.load(runs / "*")  # without skipping, still an error
    with pytest.warns(na.SkippedShardsWarning) as caught:
        trace = na.load(runs / "*", on_error="skip")
    assert trace.runs == ["good"]
    assert str(caught[-1].message) == (
        f"left out 3 run(s) with no shard in any table:\n  {bare}\n  {broken} (every shard unreadable)\n  {empty}"
    )
    assert trace.skipped[-3:] == [bare, broken, empty]
    code, out, err = _cli(capsys, "summary", runs / "*", "--skip-corrupt")
    assert code == 0 and out.startswith("good · outputs:")
    assert f"normtrace: warning: left out 3 run(s) with no shard in any table: {bare}; {broken}" in err
    with pytest.raises(na.EmptyRunError) as err_all:  # nothing left: still an error, naming each
        na.load([empty, bare], on_error="skip")
    assert str(err_all.value).startswith(f"none of the 2 runs has a shard: run {empty} has no shards")
    assert f"; run {bare} has no shards" in str(err_all.value)


# 5. a run killed without closing


def test_a_run_killed_without_closing_is_killed_and_a_live_one_running(run: Path, tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    script = KILLED_AFTER_FLUSHES.format(tests=str(TESTS), examples=str(EXAMPLES), run=str(killed))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    live = nt.Recorder(tmp_path / "live")
    try:
        live.push_metric("m", 1.0)
        live.flush()
        trace = na.load([killed, tmp_path / "live", run])
        assert trace.run_table["status"].to_list() == ["killed", "running", "closed"]
        assert trace.metas["killed"]["status"] == "running"  # what meta.json says is kept
        cells = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td>", trace._repr_html_())  # a notebook's table
        assert cells == [("killed", "killed"), ("live", "running"), ("run", "closed")]
    finally:
        live.close()
    assert na.load(tmp_path / "live").run_table["status"].to_list() == ["closed"]
    page = na.report(na.load(killed), tmp_path / "killed.html")
    assert "<td>killed (meta.json: running)</td>" in page.read_text()
    lock = killed / ".lock-rank0"
    owner = json.loads(lock.read_text())
    lock.write_text(json.dumps({**owner, "hostname": "elsewhere.example"}))
    assert na.load(killed).run_table["status"].to_list() == ["running"]  # another host's: cannot tell
    lock.unlink()  # a copy of a run without its lock file: it may still run where it was recorded
    assert na.load(killed).run_table["status"].to_list() == ["running"]


# 6. names with control characters in the command line's text


def test_text_output_escapes_control_characters_in_names_and_csv_keeps_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ("new\nline", "t\tab")
    odd = _record(tmp_path / "odd", names=names, event="sy\nnc")
    shown = [repr(name)[1:-1] for name in names]  # new\nline, as Python spells it
    code, out, _ = _cli(capsys, "summary", odd)
    assert code == 0
    lines = out.splitlines()
    assert lines[1].split() == ["module", "split", "epoch", "0", "epoch", "1", "epoch", "2", "epoch", "3"]
    assert [line.split()[:2] for line in lines[3:5]] == [[shown[0], "train"], [shown[1], "train"]]
    assert lines[5] == ""  # each module one whole row
    outputs = pl.from_arrow(read_table(odd, "outputs"))
    first = outputs.filter(pl.col("module") == names[0], pl.col("epoch") == 0)["norm"].cast(pl.Float64).mean()
    assert float(lines[3].split()[2]) == pytest.approx(first, rel=1e-3)
    code, out, _ = _cli(capsys, "summary", odd, "--csv")
    assert code == 0 and sorted(pl.read_csv(io.StringIO(out))["module"].unique()) == sorted(names)
    code, out, _ = _cli(capsys, "spikes", odd)
    assert code == 0
    naming = [line for line in out.splitlines() if "sy" in line]
    assert len(naming) == 4 and all(r"sy\nnc" in line for line in naming)
    assert sorted(line.split(":")[0] for line in naming) == sorted(shown * 2)
