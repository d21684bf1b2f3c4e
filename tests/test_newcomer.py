"""A newcomer's first minutes: wheels built from this checkout carry what a user's tools expect, install
into a fresh virtual environment, and the README's Python quick start runs there as written."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = {"normtrace": REPO, "normtrace_analysis": REPO / "analysis"}


def _run(*cmd: str | Path, cwd: Path | None = None) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    for source in DISTRIBUTIONS.values():
        _run(
            sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", out, source
        )
    return {name: next(out.glob(f"{name}-*.whl")) for name in DISTRIBUTIONS}


def _version(package: Path) -> str:
    """``__version__`` as written in the package's ``__init__.py`` (its one source)."""
    found = re.search(r'^__version__ = "([^"]+)"$', (package / "__init__.py").read_text(), re.M)
    assert found is not None
    return found.group(1)


def test_wheels_are_typed_licensed_described_and_versioned_from_one_place(wheels: dict[str, Path]) -> None:
    versions = {name: _version(root / name) for name, root in DISTRIBUTIONS.items()}
    assert len(set(versions.values())) == 1, versions  # released together, one number
    for name, wheel in wheels.items():
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            meta = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        assert f"{name}/py.typed" in names  # users' type checkers read our hints
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
        assert f"\nVersion: {versions[name]}\n" in meta
        assert "License-Expression: MIT" in meta
        body = meta.split("\n\n", 1)[1]
        assert "normtrace_analysis" in body and len(body) > 500  # a real description, not a blank page
        assert not any(n.startswith("tests/") for n in names)


def test_source_distributions_ship_no_half_test_suite(tmp_path: Path) -> None:
    for name, root in DISTRIBUTIONS.items():
        out = tmp_path / name
        built = _run(
            sys.executable, "-c",
            f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))",
            cwd=root,
        )  # fmt: skip
        with tarfile.open(out / built.strip().splitlines()[-1]) as tar:
            members = [m.split("/", 1)[1] for m in tar.getnames() if "/" in m]
        assert "LICENSE" in members and "README.md" in members
        assert not [m for m in members if m.startswith("tests")], name  # tests need helpers it lacks


def quick_start() -> str:
    """The README's quick-start code block (the ```python block after the quick-start marker)."""
    text = (REPO / "README.md").read_text()
    after = text.split("<!-- quick-start -->", 1)[1]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_quick_start_runs_in_a_fresh_environment(wheels: dict[str, Path], tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", *wheels.values())
    work = tmp_path / "work"
    work.mkdir()
    (work / "quick_start.py").write_text(quick_start())
    out = _run(python, "quick_start.py", cwd=work)
    run = work / "runs" / "quickstart"
    assert (run / "report.html").stat().st_size > 100_000  # the page with Vega inlined
    assert "shape: (5, 13)" in out  # the printed summary: 5 epochs of the one ReLU
    summary = _run(env_dir / "bin" / "normtrace", "summary", run, "--csv", cwd=work)
    rows = summary.strip().splitlines()
    assert rows[0].startswith("run,epoch,module") and len(rows) == 1 + 5  # 5 epochs of one ReLU
    assert all(",1,train,20," in r for r in rows[1:])  # module "1", 20 passes each
