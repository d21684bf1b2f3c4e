"""What the ``normtrace`` commands print besides their results: the count line of ``compact``, the paths
``export`` writes, warnings cut to one line, and the command list of ``--help``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc
import pytest
from normtrace_analysis.cli import build_parser, main
from optional import need
from tracegen import every_pass, write_trace


def _outputs() -> dict[str, np.ndarray]:
    return every_pass(60, ("m",), epoch_len=20)


def _events() -> dict[str, list]:
    return {"epoch": [0, 1, 2], "pass": [5, 25, 45], "name": ["sync"] * 3}


def test_compact_counts_the_files_before_and_after_and_those_written(tmp_path: Path, capsys) -> None:
    run = write_trace(tmp_path / "r", outputs=_outputs(), events=_events(), shards=3)
    assert main(["compact", str(run)]) == 0
    after = sorted(p.name for table in ("outputs", "events") for p in (run / table).glob("*.arrow"))
    assert after == ["rank0-000001-000003.arrow"] * 2  # each table's three shards, merged into one
    assert capsys.readouterr().out == "r: 6 shard files -> 2 (2 merged file(s) written)\n"


def test_export_prints_what_it_wrote(tmp_path: Path, capsys) -> None:
    run = write_trace(tmp_path / "r", outputs=_outputs())
    folder = tmp_path / "dataset"
    assert main(["export", str(run), "--format", "parquet", "-o", str(folder)]) == 0
    assert capsys.readouterr().out == f"{folder}\n" and (folder / "run=r" / "part-0.parquet").is_file()
    need("tensorboard")
    board = tmp_path / "board"
    assert main(["export", str(run), "--tensorboard", str(board)]) == 0
    assert capsys.readouterr().out == f"{board / 'r'}\n"


def test_a_long_warning_is_cut_to_its_first_four_lines(tmp_path: Path, capsys) -> None:
    run = write_trace(tmp_path / "r", outputs=_outputs(), shards=6)
    shards = sorted((run / "outputs").glob("*.arrow"))
    for shard in shards[:5]:
        shard.write_bytes(b"not arrow")
    assert main(["summary", str(run), "--skip-corrupt", "--csv"]) == 0
    warning = next(line for line in capsys.readouterr().err.splitlines() if "warning" in line)
    listed = "; ".join(str(p) for p in shards[:3])
    assert warning == f"normtrace: warning: skipped 5 unreadable shard(s): {listed} …"


def test_help_lists_every_command_with_its_summary(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    commands = build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
    for choice in commands._choices_actions:
        assert f"{choice.dest} {choice.help}" in " ".join(text.split()), choice.dest
    assert "COMMAND\n" in text  # the positional itself carries no text of its own


def test_compact_refuses_runs_on_object_storage_before_listing_them(tmp_path: Path, capsys) -> None:
    local = write_trace(tmp_path / "r", outputs=_outputs())
    assert main(["compact", str(local), "s3://bucket/runs/a"]) == 2
    assert capsys.readouterr().err == (
        "normtrace: error: normtrace compact works on local run directories, not s3://bucket/runs/a\n"
    )
    assert len(list((local / "outputs").glob("*.arrow"))) == 3  # nothing merged either


def test_export_to_a_file_of_unknown_format_names_the_formats(tmp_path: Path, capsys) -> None:
    run = write_trace(tmp_path / "r", outputs=_outputs())
    assert main(["export", str(run), "-o", str(tmp_path / "out.xyz")]) == 2
    assert capsys.readouterr().err == (
        f"normtrace: error: cannot tell the format of {tmp_path / 'out.xyz'}: use one of "
        ".parquet, .csv, .arrow, .ipc, .feather\n"
    )


def test_a_missing_command_is_a_one_line_error(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main([])
    assert done.value.code == 2
    assert capsys.readouterr().err == (
        "normtrace: error: the following arguments are required: COMMAND (see normtrace --help)\n"
    )


@pytest.mark.parametrize(("flags", "meta_rms", "rms"), [([], False, False), ([], True, True), (["--rms"], False, True),
                                                       (["--raw"], True, False)])  # fmt: skip
def test_rms_and_raw_choose_the_view_whatever_the_run_asked_for(
    tmp_path: Path, capsys, flags: list[str], meta_rms: bool, rms: bool
) -> None:
    outputs = _outputs()
    outputs["numel"] = np.full(len(outputs["pass"]), 16)
    run = write_trace(tmp_path / "r", outputs=outputs, normalize=meta_rms)
    assert main(["summary", str(run), "--csv", "--stat", "mean", *flags]) == 0
    means = pl.read_csv(io.StringIO(capsys.readouterr().out)).sort("epoch")["mean"].to_numpy()
    norms = np.asarray(outputs["norm"], dtype=np.float64).reshape(3, 20).mean(axis=1)  # three epochs of 20
    np.testing.assert_allclose(means, norms / (4.0 if rms else 1.0), rtol=1e-6)  # sqrt(16)


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "{run}", "--tensorboard", "{tmp}/tb", "--max-points", "0"],
        ["compact", "{run}", "--max-rows", "0"],
        ["report", "{run}", "-o", "{tmp}/r.html", "--max-rows", "0"],
        ["spikes", "{run}", "--threshold", "high"],
        ["spikes", "{run}", "--seed", "1.5"],
    ],
)
def test_bad_values_are_refused_by_their_option_before_any_work(
    tmp_path: Path, capsys, argv: list[str]
) -> None:
    run = write_trace(tmp_path / "r", outputs=_outputs(), shards=3)
    with pytest.raises(SystemExit) as exit_:
        main([a.format(run=run, tmp=tmp_path) for a in argv])
    assert exit_.value.code == 2
    assert f"argument {argv[-2]}: " in capsys.readouterr().err
    assert len(list((run / "outputs").glob("*.arrow"))) == 3 and not (tmp_path / "tb").exists()


def arrow_rows(path: Path) -> int:
    """Rows of an Arrow IPC file, read with pyarrow alone."""
    with pa.ipc.open_file(path) as reader:
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def test_compact_fills_merged_files_up_to_max_rows(tmp_path: Path, capsys) -> None:
    run = write_trace(tmp_path / "r", outputs=_outputs(), shards=3)  # three shards of 20 rows
    assert main(["compact", str(run), "--max-rows", "40"]) == 0
    sizes = sorted(arrow_rows(p) for p in (run / "outputs").glob("*.arrow"))
    assert sizes == [20, 40]  # the first two shards merged, the third alone
