"""Sessions: `nox -s tests` (the README's test command), `lint`, `typecheck`, `cartpole` (the main job), `bench`."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = os.environ.get("NORMTRACE_PYTHON")  # default: the interpreter running nox


def _install_project(session: nox.Session, *extras: str) -> None:
    """Both distributions, editable, from this checkout (torch resolves to the local CPU build)."""
    spec = f".[{','.join(extras)}]" if extras else "."
    # pip is silent under nox: say what the first, slow install is doing
    session.log("installing both packages (torch, pyarrow, polars, altair, ...): 1-3 minutes the first time")
    session.install("-e", spec, "-e", "./analysis")


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """Install both packages and run the whole test suite."""
    _install_project(session, "test")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Ruff over every Python file in the repository."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy, strict, over the recorder and the analysis package; their configurations are `[tool.mypy]` in
    pyproject.toml and analysis/pyproject.toml.

    Installs the two packages with their own dependencies (torch, from the pinned CPU build; polars,
    numpy, altair and vl-convert ship their types; pyarrow's and tqdm's come from pyarrow-stubs and
    types-tqdm): no test extras, no frameworks. mypy is pinned: a new release may find new errors, so bump
    it on purpose.
    """
    session.install("mypy==2.4.1", "pyarrow-stubs>=20", "types-tqdm", "-e", ".", "-e", "./analysis")
    session.run("mypy", *session.posargs)
    session.chdir("analysis")
    session.run("mypy", *session.posargs)


@nox.session(python=PYTHON)
def cartpole(session: nox.Session) -> None:
    """The main job: train the CartPole DQN into runs/cartpole and write runs/cartpole/report.html.

    60 episodes by default (a first look: ~25 s of training on 2 busy CPU cores, under a minute with the
    report once the environment exists; rewards already climb and there are 12 target syncs to align
    spikes with); `nox -s cartpole -- --episodes 300` is the seed's full run (~3 min of training).
    Arguments after `--` go to examples/cartpole_dqn.py and override these defaults (see its --help);
    --overwrite is on so a rerun replaces runs/cartpole (pass --run-dir elsewhere to keep an old run).
    """
    _install_project(session, "examples")
    defaults = ["--episodes", "60", "--run-dir", "runs/cartpole", "--overwrite"]
    session.run("python", "examples/cartpole_dqn.py", *defaults, *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Hook overhead of normtrace vs an untraced model, a bare hook and monitorch (benchmarks/overhead.py).

    monitorch==0.1.0.7 (the seed's library, the comparison D) is installed here only, never a dependency.
    Arguments after `--` go to the script: `nox -s bench -- --quick`, `-- --json bench.json`.
    """
    session.install("-e", ".", "-e", "./analysis")
    session.install("monitorch==0.1.0.7")
    session.run("python", "benchmarks/overhead.py", *session.posargs)
