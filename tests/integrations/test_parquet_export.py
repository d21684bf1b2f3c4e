"""``normtrace export 'runs/*' --format parquet -o DIR``: one Hive partition per run, read back by DuckDB."""

from __future__ import annotations

from pathlib import Path

import normtrace_analysis as na
import polars as pl
import pytest
from normtrace_analysis.cli import main
from optional import need
from tracegen import synthetic_dqn, write_trace

duckdb = need("duckdb")

NAMES = ["a", "lr[0.1]", "b c#2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    for i, name in enumerate(NAMES):
        s = synthetic_dqn(n_epochs=6, passes_per_epoch=20, no_grad=i == 1, seed=i)
        write_trace(root / name, outputs=s.outputs, events=s.events, normalize=i == 2)
    return root


def test_duckdb_reads_every_run_as_normtrace_analysis_does(runs: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "outputs"
    assert main(["export", f"{runs}/*", "--table", "outputs", "--format", "parquet", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["run=a", "run=b%20c%232", "run=lr%5B0.1%5D"]
    got = duckdb.sql(
        f"""select run, split, module, count(*) as n, sum(value) as total, max(pass) as last
            from read_parquet('{out}/**/*.parquet', hive_partitioning = true)
            group by all order by all"""
    ).pl()
    trace = na.load(f"{runs}/*")
    want = (
        trace.outputs.group_by("run", "split", "module")
        .agg(n=pl.len(), total=pl.col("value").sum(), last=pl.col("pass").max())
        .sort("run", "split", "module")
        .collect()
    )
    assert got["run"].to_list() == want["run"].to_list()  # names decoded from the folders
    assert (
        got.select("split", "module", "n", "last").rows()
        == want.select("split", "module", "n", "last").rows()
    )
    assert got["total"].to_list() == pytest.approx(want["total"].to_list(), rel=1e-12)  # RMS view kept
    # Polars reads the same dataset back lazily
    back = pl.scan_parquet(f"{out}/**/*.parquet", hive_partitioning=True).select(pl.len()).collect().item()
    assert back == want["n"].sum()


def test_new_runs_are_added_and_an_exported_run_is_replaced_only_with_force(
    runs: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "events"
    args = ["--table", "events", "--format", "parquet", "-o", str(out)]
    assert main(["export", str(runs / "a"), *args]) == 0
    assert main(["export", f"{runs}/*", *args]) == 2  # a is there already
    assert "already holds run run=a (1 of the 3 runs exported)" in capsys.readouterr().err
    assert main(["export", str(runs / "b c#2"), str(runs / "lr[0.1]"), *args]) == 0  # added beside a
    assert main(["export", f"{runs}/*", *args, "--force"]) == 0
    assert len(list(out.glob("run=*/*.parquet"))) == len(NAMES)
    assert duckdb.sql(f"select count(*) from read_parquet('{out}/**/*.parquet')").fetchall() == [
        (3,)
    ]  # a sync each
