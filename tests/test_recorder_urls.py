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


def test_the_refusal_names_the_url_and_shows_the_copy_to_its_scheme(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(nt.RunDirError) as info:
        nt.Recorder("gs://bucket/runs/x")
    assert str(info.value) == (
        "run directory 'gs://bucket/runs/x' is a URL: the recorder writes to a local directory only (a "
        "shard is renamed into place when complete, and a killed run keeps every flush). Record to a "
        "local directory and copy it when the run ends (or while it runs), e.g. "
        "pyarrow.fs.copy_files('runs/x', 'gs://bucket/runs/x'); normtrace_analysis loads it from there"
    )


@pytest.mark.parametrize(
    "run_dir",
    ["git+ssh://host/x", "my.fs://x", "my-fs://x", "S3://b/x", Path("abfs://container/x"), "s3://b/a://c"],
)
def test_schemes_with_the_characters_urls_allow_are_urls(run_dir, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(nt.RunDirError, match="is a URL"):
        nt.Recorder(run_dir)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "run_dir",
    ["c://x", "c:/x", "données://x", "a b://x", "runs/s3://x", "x_y://z", ":/x"],
    ids=["drive-letter", "drive-path", "non-ascii", "space", "inner", "underscore", "empty"],
)
def test_what_only_looks_like_a_url_is_a_local_directory(run_dir, tmp_path: Path, monkeypatch) -> None:
    """A one-letter scheme is a Windows drive; a scheme outside ASCII letters, digits, ``+``, ``.``
    and ``-`` is no scheme; ``://`` after a folder is part of a name."""
    monkeypatch.chdir(tmp_path)
    with nt.Recorder(run_dir) as rec:
        rec.push_metric("m", 1.0)
    assert rec.run_dir == Path(run_dir)
    assert (tmp_path / run_dir / "meta.json").is_file()
