"""The ``normtrace`` command: outputs match the trace computed independently; bad input exits 2 in one line."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import normtrace_analysis as na
import normtrace_analysis.progress as progress_module
import numpy as np
import polars as pl
import pytest
from normtrace_analysis.cli import build_parser, main
from normtrace_analysis.progress import progress
from reportgen import MODULES, PARAMS, param_norm, read_table
from tracegen import write_trace


def run_cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_summary_csv_holds_every_epochs_statistics(run_a: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "summary", run_a, "--csv")
    assert code == 0
    table = pl.read_csv(io.StringIO(out))
    assert table.height == len(MODULES) * 2 * 40
    raw = read_table(run_a, "outputs")
    for row in table.filter(pl.col("epoch").is_in([0, 25])).iter_rows(named=True):
        sel = (raw["module"] == row["module"]) & (raw["epoch"] == row["epoch"])
        sel &= raw["grad_enabled"] == (row["split"] == "train")
        values = raw["norm"][sel].astype(np.float64)
        assert row["count"] == len(values)
        assert row["mean"] == pytest.approx(values.mean(), rel=1e-9)
        assert row["p95"] == pytest.approx(np.percentile(values, 95), rel=1e-9)


def test_summary_text_is_a_modules_by_epochs_table(run_a: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "summary", run_a, "--split", "train", "--columns", "3")
    assert code == 0
    lines = out.splitlines()
    assert (
        lines[0]
        == "run-a · outputs: mean of the output norm (L2) per epoch (3 of 40 epochs shown; --csv for all)"
    )
    assert lines[1].split() == ["module", "split", "epoch", "0", "epoch", "20", "epoch", "39"]
    raw = read_table(run_a, "outputs")
    row = next(line for line in lines if line.startswith("net.2 "))
    means = [
        raw["norm"][(raw["module"] == "net.2") & raw["grad_enabled"] & (raw["epoch"] == e)]
        .astype(float)
        .mean()
        for e in (0, 20, 39)
    ]
    assert row.split()[2:] == [f"{m:.4g}" for m in means]


def test_summary_json_of_parameters(run_a: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "summary", run_a, "--table", "params", "--json", "--epochs", "10:12")
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == len(PARAMS) * 3
    for row in rows:
        expected = param_norm(row["module"], row["param"], np.array(row["epoch"]))
        assert row["mean"] == pytest.approx(expected, rel=1e-6)


def test_spikes_json_and_text_match_the_analysis(run_a: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = na.load(run_a)
    found = trace.spikes("outputs", level="pass")
    aligned = trace.event_alignment("target_update", level="pass")
    code, out, _ = run_cli(capsys, "spikes", run_a, "--json")
    assert code == 0
    doc = json.loads(out)
    assert sorted((s["module"], s["pass"]) for s in doc["spikes"]) == sorted(
        zip(found["module"], found["pass"], strict=True)
    )
    assert [a["finding"] for a in doc["alignment"]] == aligned["finding"].to_list()
    code, out, _ = run_cli(capsys, "spikes", run_a, "--limit", "3")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{found.height} spikes in outputs (per pass), the 3 strongest shown"
    assert all(finding in lines for finding in aligned["finding"])
    code, out, _ = run_cli(capsys, "spikes", run_a, "--csv")
    assert pl.read_csv(io.StringIO(out)).height == found.height


def test_spikes_shows_events_followed_q_values_placebo_and_windows(
    run_a: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = na.load(run_a)
    aligned = trace.event_alignment("target_update", window=(5, 20), permutations=199, seed=3)
    code, out, _ = run_cli(
        capsys, "spikes", run_a, "--windows", "5,20", "--permutations", "199", "--seed", "3"
    )
    assert code == 0
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("module"))
    assert header.split() == [
        "module", "split", "window", "followed", "chance", "%", "enrichment", "p_value", "q_value",
        "clusters", "placebo", "placebo_p",
    ]  # fmt: skip
    tested = aligned.filter(pl.col("p_value").is_not_null())
    for row in tested.iter_rows(named=True):
        followed = f"{row['events_followed']}/{row['events']}"
        assert any(
            line.split()[:4] == [row["module"], row["split"], str(row["window"]), followed] for line in lines
        )
    assert any("Benjamini–Hochberg across the" in line for line in lines)
    code, out, _ = run_cli(
        capsys,
        "spikes",
        run_a,
        "--csv",
        "--alignment",
        "--windows",
        "5,20",
        "--permutations",
        "199",
        "--seed",
        "3",
    )
    table = pl.read_csv(io.StringIO(out))
    assert table.height == aligned.height and set(table["window"]) == {5, 20}
    assert {"events_followed", "chance", "q_value", "placebo_p", "placebo_q"} <= set(table.columns)
    assert table["q_value"].to_list() == pytest.approx(aligned["q_value"].to_list(), nan_ok=True)
    code, out, _ = run_cli(capsys, "spikes", run_a, "--json", "--permutations", "199")
    doc = json.loads(out)
    assert set(doc) == {"spikes", "event", "alignment", "steps", "groups"}
    assert doc["event"] == "target_update"  # the event the run recorded
    assert {"events_followed", "q_value", "placebo_followed", "finding"} <= set(doc["alignment"][0])
    assert {"step", "step_change", "p_value", "q_value"} <= set(doc["steps"][0])
    with pytest.raises(SystemExit) as exit_:  # argparse's own error: one line, exit code 2
        run_cli(capsys, "spikes", run_a, "--windows", "5,0")
    assert exit_.value.code == 2 and "positive integers" in capsys.readouterr().err


def test_spikes_align_on_the_event_asked_for(
    run_a: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_cli(capsys, "spikes", run_a, "--event", "target_updates")  # a typo
    assert code == 2 and out == ""
    assert "no 'target_updates' events in run-a; events recorded: target_update (7)" in err
    # By default the findings are about the event the run recorded, whatever its name.
    renamed = Path(shutil.copytree(run_a, tmp_path / "cnn"))
    events = read_table(renamed, "events")
    for shard in (renamed / "events").glob("*.arrow"):
        shard.unlink()
    write_trace(renamed, events={**events, "name": ["lr_drop"] * len(events["pass"])}, write_meta=False)
    code, out, _ = run_cli(capsys, "spikes", renamed)
    assert code == 0 and "lr_drop events are followed" in out and "target_update" not in out
    bare = Path(shutil.copytree(run_a, tmp_path / "bare"))
    shutil.rmtree(bare / "events")
    code, out, _ = run_cli(capsys, "spikes", bare)
    assert code == 0 and "no events were recorded, so there is nothing to align" in out


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".arrow"])
def test_export_hands_the_table_to_other_tools(
    run_a: Path, tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / f"outputs{suffix}"
    code, out, _ = run_cli(capsys, "export", run_a, "--table", "outputs", "-o", target)
    assert (code, out.strip()) == (0, str(target))
    read = {".parquet": pl.read_parquet, ".csv": pl.read_csv, ".arrow": pl.read_ipc}[suffix]
    back = read(target).sort("pass", "module")
    raw = read_table(run_a, "outputs")
    order = np.lexsort((raw["module"], raw["pass"]))
    assert back.height == len(raw["pass"])
    assert np.array_equal(back["norm"].cast(pl.Float32).to_numpy(), raw["norm"][order])  # csv: f32 digits
    assert set(back["run"]) == {"run-a"}


def test_report_writes_html_or_static_charts(
    run_a: Path, run_b: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "both.html"
    code, out, _ = run_cli(capsys, "report", run_a, run_b, "-o", page)
    assert (code, out.strip()) == (0, str(page))
    text = page.read_text()
    assert text.count('data-chart="') == 6 and "run-a, run-b" in text
    code, out, _ = run_cli(
        capsys, "report", run_a, "--format", "svg", "-o", tmp_path / "svg", "--modules", "net.0"
    )
    assert code == 0
    files = [Path(line) for line in out.splitlines()]
    assert len(files) == 6 and all(f.suffix == ".svg" and f.read_text().startswith("<svg") for f in files)


def corrupt_copy(run: Path, where: Path) -> Path:
    """A copy of ``run`` whose first outputs shard lost its second half (and so its footer)."""
    copy = Path(shutil.copytree(run, where))
    shard = sorted((copy / "outputs").glob("*.arrow"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return copy


def bad_inputs(run: Path, tmp: Path) -> dict[str, list[object]]:
    bad_meta = Path(shutil.copytree(run, tmp / "bad-meta"))
    (bad_meta / "meta.json").write_text("{not json")
    return {
        "no such run": ["summary", tmp / "missing"],
        "no run matches a glob": ["report", tmp / "nothing-*"],
        "corrupt shard": ["spikes", corrupt_copy(run, tmp / "corrupt")],
        "bad meta.json": ["summary", bad_meta],
        "bad epoch range": ["summary", run, "--epochs", "a:b"],
        "unknown export format": ["export", run, "-o", tmp / "out.xlsx"],
        "bad level": ["spikes", run, "--level", "batch"],
        "bad regex": ["summary", run, "--modules", "("],
        "unknown command": ["frobnicate", run],
        "no command": [],
        "table never recorded": ["summary", write_outputs_only(tmp / "outputs-only"), "--table", "params"],
    }


def write_outputs_only(path: Path) -> Path:
    from tracegen import write_trace

    return write_trace(path, outputs={"pass": [0], "epoch": [0], "module": ["a"], "norm": [1.0]})


def test_bad_input_exits_2_with_one_line(
    run_a: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for case, argv in bad_inputs(run_a, tmp_path).items():
        try:
            code, out, err = run_cli(capsys, *argv)
        except SystemExit as exit_:  # argparse's own errors
            code, (out, err) = exit_.code, capsys.readouterr()
        assert code == 2, case
        assert out == "", case
        assert len(err.splitlines()) == 1 and err.startswith("normtrace"), (case, err)
        assert "Traceback" not in err, case


def test_skip_corrupt_warns_in_one_line_and_goes_on(
    run_a: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = corrupt_copy(run_a, tmp_path / "corrupt")
    code, out, err = run_cli(capsys, "summary", broken, "--skip-corrupt", "--csv")
    assert code == 0
    assert (
        err.startswith("normtrace: warning: skipped 1 unreadable shard(s): ") and len(err.splitlines()) == 1
    )
    assert ":;" not in err and str(broken / "outputs") in err  # the listing follows its colon
    assert 0 < pl.read_csv(io.StringIO(out))["count"].sum() < len(read_table(run_a, "outputs")["pass"])


def test_the_installed_command_never_prints_a_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "normtrace_analysis.cli", "spikes", str(tmp_path / "missing"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == f"normtrace: error: run directory not found: {tmp_path / 'missing'}\n"


def _drawn(capsys: pytest.CaptureFixture[str], want: str) -> str:
    """stderr until ``want`` shows (the ticker thread draws at once with DELAY_S patched to 0)."""
    seen = ""
    for _ in range(200):
        out, err = capsys.readouterr()
        assert out == ""  # stdout stays for data
        seen += err
        if want in seen:
            break
        threading.Event().wait(0.05)
    return seen


def test_progress_is_plain_lines_on_stderr_when_it_is_not_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(progress_module, "DELAY_S", 0.0)  # "slow" from the start, no waiting in the test
    with progress("crunching") as bar:
        bar.set_postfix_str("step one", refresh=False)
        seen = _drawn(capsys, "step one")
        bar.set_postfix_str("step two", refresh=False)
        bar.set_postfix_str("step two", refresh=False)  # the same step again: no new line
        seen += _drawn(capsys, "step two")
    seen += capsys.readouterr().err
    assert "\r" not in seen and "\x1b" not in seen  # nothing that garbles a log or a pipe
    lines = seen.splitlines()
    if lines[0] == "crunching (0 s)":  # the block's own line, when its ticker ran before the first step
        lines = lines[1:]
    assert lines == ["crunching: step one (0 s)", "crunching: step two (0 s)"]
    with progress("quiet", enabled=False) as bar:
        bar.set_postfix_str("never shown")
    assert capsys.readouterr() == ("", "")


def test_slow_work_without_named_steps_still_shows_a_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A long export names no step: after the delay its description and time are shown all the same."""
    monkeypatch.setattr(progress_module, "DELAY_S", 0.0)
    with progress("export outputs"):
        seen = _drawn(capsys, "export outputs")
    assert seen == "export outputs (0 s)\n"


def test_progress_is_one_redrawn_line_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    monkeypatch.setattr(progress_module, "DELAY_S", 0.0)
    with progress("crunching") as bar:
        bar.set_postfix_str("step one", refresh=False)
        for _ in range(200):
            if "step one" in screen.getvalue():
                break
            threading.Event().wait(0.05)
    assert "crunching: 00:0" in screen.getvalue() and "\r" in screen.getvalue()


def test_debug_variable_shows_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad input is one line and exit 2, unless NORMTRACE_DEBUG asks for the exception itself."""
    missing = tmp_path / "no-such-run"
    code, _, err = run_cli(capsys, "summary", missing)
    assert code == 2 and err.strip() == f"normtrace: error: run directory not found: {missing}"
    monkeypatch.setenv("NORMTRACE_DEBUG", "1")
    with pytest.raises(na.RunNotFoundError):
        main(["summary", str(missing)])


def test_outputs_are_not_overwritten_without_force(
    run_a: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page, table, charts = tmp_path / "r.html", tmp_path / "o.parquet", tmp_path / "charts"
    for argv, target in (
        (["report", run_a, "-o", page], page),
        (["export", run_a, "-o", table], table),
    ):
        target.write_bytes(b"keep me")
        code, _, err = run_cli(capsys, *argv)
        assert code == 2 and "--force" in err and str(target) in err
        assert target.read_bytes() == b"keep me"
        code, out, _ = run_cli(capsys, *argv, "--force")
        assert code == 0 and target.read_bytes() != b"keep me"
    assert run_cli(capsys, "report", run_a, "--format", "svg", "-o", charts)[0] == 0
    before = {p: p.stat().st_mtime_ns for p in charts.iterdir()}
    code, _, err = run_cli(capsys, "report", run_a, "--format", "svg", "-o", charts)
    assert code == 2 and "--force" in err
    assert {p: p.stat().st_mtime_ns for p in charts.iterdir()} == before


def test_nothing_is_exported_into_a_runs_table_folders(
    run_a: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = Path(shutil.copytree(run_a, tmp_path / "copy"))
    shards = sorted((run / "outputs").iterdir())
    for target, table in (
        (run / "outputs" / "all.arrow", "outputs"),
        (run / "params" / "a" / "p.csv", "params"),
    ):
        code, _, err = run_cli(capsys, "export", run, "-o", target, "--force")
        assert code == 2 and f"inside the {table}/ folder" in err
        assert not target.exists()
    assert sorted((run / "outputs").iterdir()) == shards
    code, out, _ = run_cli(capsys, "export", run, "-o", run / "outputs.parquet")  # beside them is fine
    assert code == 0


def test_filters_that_match_nothing_exit_2_listing_what_exists(
    run_a: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("summary", "spikes", "report", "export"):
        extra = ["-o", "/nonexistent/never-written.parquet"] if command == "export" else []
        code, out, err = run_cli(capsys, command, run_a, "--modules", "rleu", *extra)
        assert code == 2 and out == "", command
        assert err.startswith("normtrace: error: no row matches modules='rleu'") and "net.0, net.2" in err
    code, _, err = run_cli(capsys, "summary", run_a, "--epochs", "100:200")
    assert code == 2 and "epochs=(100, 200)" in err and "epochs 0..39" in err


def test_help_states_every_option_and_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    for command, defaults in (
        (
            "summary",
            ["--table {outputs,params,signals}", "(default: outputs)", "(default: mean)", "(default: 8)"],
        ),
        ("spikes", ["(default: pass)", "(default: 6)", "(default: 20 passes, 1 epoch)", "(default: 999)"]),
        ("report", ["(default: html)", "(default: p05-p95)", "(default: 3000)", "RUN/charts/"]),
        ("export", ["(default: pass)", "(default: 1000)", "from its extension"]),
    ):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for expected in defaults:
            assert expected in text, (command, expected)
        parser = next(
            a
            for a in build_parser()._subparsers._group_actions[0].choices.values()
            if a.prog.endswith(command)
        )
        for action in parser._actions:
            assert action.help, (command, action.option_strings)  # no option without a word of help


def test_version_is_the_packages(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert (
        done.value.code == 0
        and capsys.readouterr().out.strip() == f"normtrace (normtrace-analysis) {na.__version__}"
    )


def test_too_few_epochs_for_the_detector_say_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 50  # 5 epochs of 10 passes: fewer epochs than the 11-epoch baseline window
    run = write_trace(
        tmp_path / "short",
        outputs={"pass": np.arange(n), "epoch": (np.arange(n) // 10).astype(np.int32),
                 "module": ["m"] * n, "norm": np.linspace(1, 2, n)},
    )  # fmt: skip
    code, out, err = run_cli(capsys, "spikes", run, "--level", "epoch")
    assert code == 0 and out.startswith("0 spikes")
    assert (
        "1 of 1 series have fewer epochs (5 at least) than the spike detector's baseline window of 11" in err
    )
    assert "--level pass" in err and len(err.splitlines()) == 1
    with pytest.warns(na.ShortSeriesWarning):
        na.load(run).spikes(level="epoch")


def test_static_charts_go_beside_the_run_unless_told(
    run_a: Path, run_b: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = Path(shutil.copytree(run_a, tmp_path / "mine"))
    code, out, _ = run_cli(capsys, "report", run, "--format", "svg")
    assert code == 0 and all(Path(line).parent == run / "charts" for line in out.splitlines())
    code, _, err = run_cli(capsys, "report", run_a, run_b, "--format", "svg")
    assert code == 2 and "-o DIR" in err
