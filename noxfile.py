"""Sessions: `nox -s tests` (the README's test command), `lint`, `cartpole` (the main job), `bench`."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = os.environ.get("NORMTRACE_PYTHON")  # default: the interpreter running nox


def _install_project(session: nox.Session, *extras: str) -> None:
    """Both distributions, editable, from this checkout (torch resolves to the local CPU build)."""
    spec = f".[{','.join(extras)}]" if extras else "."
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
