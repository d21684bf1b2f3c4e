"""The recorder writes local directories only: a URL is refused, never turned into a folder named ``s3:``."""

from __future__ import annotations

from pathlib import Path

import pytest

import normtrace as nt


@pytest.mark.parametrize(
    "run_dir",
    ["s3://bucket/runs/x", "gs://bucket/x", "abfs://container/x", "file:///tmp/x", Path("s3://b/x")],
)
def test_a_url_is_refused_with_the_way_to_get_the_run_there(
    run_dir: str | Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(nt.RunDirError, match=r"is a URL.*local directory.*copy_files"):
        nt.Recorder(run_dir)
    assert list(tmp_path.iterdir()) == []  # no ./s3:/bucket/... folder


def test_local_names_with_colons_are_still_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with nt.Recorder("runs/lr:0.1") as rec, nt.Recorder(tmp_path / "c:" / "x") as other:
        assert rec.run_dir == Path("runs/lr:0.1") and other.run_dir.parent.name == "c:"
    assert (tmp_path / "runs" / "lr:0.1" / "meta.json").is_file()
