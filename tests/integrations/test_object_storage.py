"""Runs on S3, against a real S3-compatible server (moto's server mode, a subprocess on a free local port):
recorded locally, uploaded with pyarrow, loaded with ``na.load("s3://…")`` and compared with the local load."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import normtrace_analysis as na
import numpy as np
import pyarrow.fs as pafs
import pytest
from normtrace_analysis import trace as trace_module
from normtrace_analysis.cli import main
from optional import need
from tracegen import synthetic_dqn, write_trace

NAMES = ["a", "lr[0.1]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """moto's S3 server in a subprocess; yields Polars-style storage options pointing at it."""
    need("moto")
    need("flask")
    port = _free_port()
    # its log goes to a file: moto logs every request, and an unread pipe that fills up blocks the server
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("wb") as err:  # the child keeps its own copy of the file
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto server did not start: {log.read_text(errors='replace')[-2000:]}"
                    ) from None
                time.sleep(0.1)
        yield {
            "aws_endpoint_url": f"http://127.0.0.1:{port}",
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "aws_region": "us-east-1",
            "aws_allow_http": "true",
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def uploaded(
    server: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, pafs.FileSystem]:
    """Two runs written locally, then copied to s3://bucket/runs/<name> as a user would."""
    local = tmp_path_factory.mktemp("runs")
    s3 = pafs.S3FileSystem(
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        endpoint_override=server["aws_endpoint_url"].removeprefix("http://"),
        scheme="http",
        allow_bucket_creation=True,
    )
    s3.create_dir("bucket")
    for i, name in enumerate(NAMES):
        s = synthetic_dqn(n_epochs=20, passes_per_epoch=25, seed=i, n_spikes=5)
        metrics = {"epoch": np.arange(20, dtype=np.int32), "pass": np.arange(20) * 25, "name": ["loss"] * 20,
                   "value": np.linspace(1.0, 0.1, 20)}  # fmt: skip
        write_trace(local / name, outputs=s.outputs, events=s.events, metrics=metrics, shards=4)
        pafs.copy_files(str(local / name), f"bucket/runs/{name}", destination_filesystem=s3)
    return local, s3


def test_a_remote_glob_loads_what_the_local_runs_hold(uploaded, server) -> None:
    local_dir, _ = uploaded
    remote = na.load("s3://bucket/runs/*", storage_options=server)
    local = na.load(str(local_dir / "*"))
    assert remote.runs == local.runs == NAMES
    assert str(remote.paths["lr[0.1]"]) == "s3://bucket/runs/lr[0.1]"
    assert [str(p) for p in remote.shards("outputs")][:1] == ["s3://bucket/runs/a/outputs/rank0-000001.arrow"]
    assert remote.metas == local.metas
    assert remote.epoch_summary().equals(local.epoch_summary())
    assert remote.spikes().equals(local.spikes())
    assert remote.event_alignment().equals(local.event_alignment())
    assert remote.metrics.collect().equals(local.metrics.collect())


def test_the_command_line_takes_storage_options(uploaded, server, capsys) -> None:
    options = [f"--storage-option={k}={v}" for k, v in server.items()]
    assert main(["spikes", "s3://bucket/runs/a", "--json", *options]) == 0
    spikes = json.loads(capsys.readouterr().out)["spikes"]
    local_dir, _ = uploaded
    assert spikes == json.loads(na.load(local_dir / "a").spikes().write_json())


def test_large_shards_are_opened_by_their_footer(uploaded, server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace_module, "_SMALL_SHARD", 0)  # every shard takes the range-request path
    remote = na.load("s3://bucket/runs/a", storage_options=server)
    local_dir, _ = uploaded
    assert remote.outputs.collect().equals(na.load(local_dir / "a").outputs.collect())


def test_the_reader_guarantees_hold_remotely(uploaded, server) -> None:
    local_dir, s3 = uploaded
    pafs.copy_files(str(local_dir / "a"), "bucket/damaged/a", destination_filesystem=s3)
    shard = "bucket/damaged/a/outputs/rank0-000002.arrow"
    with s3.open_input_stream(shard) as f:
        data = f.read()
    with s3.open_output_stream(shard) as f:
        f.write(data[: len(data) // 2])  # truncated
    with s3.open_output_stream("bucket/damaged/a/outputs/rank0-000001 copy.arrow") as f:
        f.write(data)
    with pytest.raises(na.CorruptShardError, match=r"s3://bucket/damaged/a/outputs/rank0-000002\.arrow"):
        na.load("s3://bucket/damaged/a", storage_options=server)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = na.load("s3://bucket/damaged/a", storage_options=server, on_error="skip")
    messages = {w.category: str(w.message) for w in caught}
    assert "s3://bucket/damaged/a/outputs/rank0-000001 copy.arrow" in messages[na.StrayFilesWarning]
    assert "s3://bucket/damaged/a/outputs/rank0-000002.arrow" in messages[na.SkippedShardsWarning]
    assert [p.name for p in trace.skipped] == ["rank0-000002.arrow"]
    assert len(trace.shards("outputs")) == 3


def test_missing_runs_and_plain_http_without_allow_http_are_named(server) -> None:
    with pytest.raises(na.RunNotFoundError, match="s3://bucket/runs/nope"):
        na.load("s3://bucket/runs/nope", storage_options=server)
    with pytest.raises(na.RunNotFoundError, match=r"no run directory matches 's3://bucket/runs/zz\*'"):
        na.load("s3://bucket/runs/zz*", storage_options=server)
    with pytest.raises(ValueError, match="aws_allow_http"):
        na.load("s3://bucket/runs/a", storage_options={**server, "aws_allow_http": "false"})


# Paths on object storage neither order nor compare with local paths: three places that assumed they did.


def test_two_names_for_one_remote_shard_are_both_stray(uploaded, server) -> None:
    local_dir, s3 = uploaded
    pafs.copy_files(str(local_dir / "a"), "bucket/twice/a", destination_filesystem=s3)
    with s3.open_input_stream("bucket/twice/a/outputs/rank0-000001.arrow") as f:
        data = f.read()
    with s3.open_output_stream("bucket/twice/a/outputs/rank0-1.arrow") as f:
        f.write(data)  # a second name for shard (0, 1)
    with pytest.warns(
        na.StrayFilesWarning, match=r"rank0-000001\.arrow\n  s3://bucket/twice/a/outputs/rank0-1"
    ):
        na.load("s3://bucket/twice/a", storage_options=server)


def test_a_local_run_with_a_skipped_shard_loads_beside_an_empty_remote_run(
    uploaded, server, tmp_path: Path
) -> None:
    local_dir, s3 = uploaded
    damaged = tmp_path / "damaged"
    pafs.copy_files(str(local_dir / "a"), str(damaged), destination_filesystem=pafs.LocalFileSystem())
    shard = damaged / "outputs" / "rank0-000002.arrow"
    shard.write_bytes(shard.read_bytes()[:100])
    with s3.open_output_stream("bucket/bare/run/meta.json") as f:
        f.write((local_dir / "a" / "meta.json").read_bytes())
    with pytest.warns(na.SkippedShardsWarning) as caught:
        trace = na.load([damaged, "s3://bucket/bare/run"], storage_options=server, on_error="skip")
    assert trace.runs == ["damaged"]  # the empty remote run is left out, the damaged local one kept
    messages = [str(w.message) for w in caught]
    assert any("rank0-000002.arrow" in m for m in messages)
    assert any(
        m.startswith("left out 1 run(s) with no shard") and "s3://bucket/bare/run" in m for m in messages
    )


def test_charts_of_a_remote_run_need_a_local_folder(uploaded, server, capsys) -> None:
    options = [f"--storage-option={k}={v}" for k, v in server.items()]
    assert main(["report", "s3://bucket/runs/a", "--format", "svg", *options]) == 2
    assert "on object storage: name a local folder for the charts with -o DIR" in capsys.readouterr().err


def test_a_filesystem_given_lists_the_runs_in_place_of_the_storage_options(uploaded, server) -> None:
    """``filesystem=`` replaces the client built from the options: one rooted elsewhere finds no run
    where the options' own client finds both."""
    _, s3 = uploaded
    assert na.load("s3://bucket/runs/*", storage_options=server).runs == NAMES
    elsewhere = pafs.SubTreeFileSystem("bucket/empty", s3)
    with pytest.raises(na.RunNotFoundError, match="s3://bucket/runs/"):
        na.load("s3://bucket/runs/*", storage_options=server, filesystem=elsewhere)
    assert na.load("s3://bucket/runs/a", storage_options=server, filesystem=s3).runs == ["a"]


def test_an_export_into_a_local_runs_table_folder_is_refused_beside_a_remote_run(
    uploaded, server, tmp_path: Path, capsys
) -> None:
    """The remote run, listed first, has no local folder to protect; the local run after it still has."""
    local_dir, _ = uploaded
    local = Path(shutil.copytree(local_dir / "a", tmp_path / "mine"))
    options = [f"--storage-option={k}={v}" for k, v in server.items()]
    inside = local / "outputs" / "all.csv"
    code = main(["export", "s3://bucket/runs/a", str(local), "-o", str(inside), *options])
    assert code == 2 and f"{inside} is inside the outputs/ folder of run 'mine'" in capsys.readouterr().err
    assert not inside.exists()
