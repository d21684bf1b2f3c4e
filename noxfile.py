"""Sessions: `nox -s tests` (the README's test command), `lint`, `typecheck`, `cartpole` (the main job), `bench`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

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
    """Hook overhead of normtrace vs an untraced model, a bare hook and monitorch (benchmarks/overhead.py),
    then the seed's training step with and without normtrace alternating every 5 steps
    (benchmarks/paired_steps.py: C/A with a 95% interval, the figure to quote for W2).

    monitorch==0.1.0.7 (the seed's library, the comparison D) is installed here only, never a dependency.
    Arguments after `--` go to the script: `nox -s bench -- --quick`, `-- --json bench.json`.
    """
    session.install("-e", ".", "-e", "./analysis")
    session.install("monitorch==0.1.0.7")
    session.run("python", "benchmarks/overhead.py", *session.posargs)
    # W2 again, A and C alternating every 5 steps: the C/A figure with a confidence interval
    session.run(
        "python", "benchmarks/paired_steps.py", *(["--epochs", "4"] if "--quick" in session.posargs else [])
    )


MUTATED = [
    "normtrace",
    "normtrace_analysis/alignment.py",
    "normtrace_analysis/cli.py",
    "normtrace_analysis/series.py",
    "normtrace_analysis/spikes.py",
    "normtrace_analysis/stats.py",
    "normtrace_analysis/summary.py",
    "normtrace_analysis/trace.py",
]
"""What `nox -s mutate` mutates (paths as staged, see there): the recorder and the analysis core."""

MUTATION_TESTS = ["tests/analysis", "tests/report", *sorted(str(p) for p in Path("tests").glob("test_recorder*.py")),
                  "tests/test_trace_format.py"]  # fmt: skip
"""Tests run against the mutants: all but the slow end-to-end ones (training examples, fresh-venv wheels,
third-party frameworks), which exercise the same code through the same functions."""


@nox.session(python=PYTHON)
def mutate(session: nox.Session) -> None:
    """Mutation testing with mutmut over the recorder and the analysis core: prints the score and survivors.

    mutmut expects the packages at the top of a tree (``./pkg`` or ``src/pkg``), so the session stages
    ``normtrace/`` and ``analysis/normtrace_analysis/`` side by side with the tests in a scratch folder
    and runs there (mutmut puts the mutated copies first on ``sys.path``). Takes hours on two cores;
    ``nox -s mutate -- normtrace_analysis/stats.py`` mutates only the paths given; ``MUTATE_CHILDREN=1``
    runs one mutant at a time (default: one per core); ``MUTATE_TESTS=tests/x.py,tests/y.py`` runs only
    those tests against the mutants. Results are kept in the scratch folder, so a second run resumes.
    docs/mutation.md records the scores measured and the commands they came from.
    """
    _install_project(session, "test")
    session.install("mutmut==3.8.1")
    stage = Path(session.create_tmp()).resolve() / "mutation"
    stage.mkdir(exist_ok=True)
    for source, target in (("normtrace", "normtrace"), ("analysis/normtrace_analysis", "normtrace_analysis"),
                           ("tests", "tests"), ("examples", "examples"), ("docs", "docs")):  # fmt: skip
        shutil.rmtree(stage / target, ignore_errors=True)
        shutil.copytree(source, stage / target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    paths = session.posargs or MUTATED
    # MUTATE_TESTS=a.py,b.py: only these tests (a module's own tests: minutes instead of hours)
    tests = [t for t in os.environ.get("MUTATE_TESTS", "").split(",") if t] or MUTATION_TESTS
    config = (
        "\n[tool.mutmut]\n"
        f"source_paths = {json.dumps(paths)}\n"
        'also_copy = ["examples", "docs", "normtrace", "normtrace_analysis"]\n'
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]\n'
        # mutmut forks a worker per mutant; straight from its main process (the default), every mutant
        # timed out: Polars' and torch's thread pools, started by the stats run, do not survive a fork.
        # A fork server keeps the main process free of them.
        'process_isolation = "forkserver"\n'
        # A mutant is stopped after (its tests' time + constant) x multiplier x 2 CPU seconds. At mutmut's
        # 15 x (t + 1 s), one looping mutant of stats.permutation_p (65 s of covering tests) ran for half an
        # hour. Much less stops mutants that fail at once as timeouts: the per-test times are wall-clock
        # and leave out fixtures each forked worker sets up again, while the limit counts the CPU time of
        # all of Polars' threads (at 1 x (t + 10 s), a summary mutant killed in 9 s by hand timed out).
        "timeout_multiplier = 3.0\ntimeout_constant = 10.0\n"
    )
    (stage / "pyproject.toml").write_text(Path("pyproject.toml").read_text() + config)
    session.chdir(stage)
    children = os.environ.get("MUTATE_CHILDREN", str(os.cpu_count() or 2))  # fewer on a shared machine
    session.run("mutmut", "run", "--max-children", children)
    session.run("mutmut", "export-cicd-stats")
    stats = json.loads((stage / "mutants" / "mutmut-cicd-stats.json").read_text())
    caught = stats["killed"] + stats["timeout"] + stats["segfault"]
    tested = stats["total"] - stats["skipped"] - stats["no_tests"]
    session.log(f"mutation score: {caught} of {tested} mutants caught ({100 * caught / max(tested, 1):.1f}%); "
                f"{stats['survived']} survived, {stats['no_tests']} not covered by any test")  # fmt: skip
    session.run("mutmut", "results")  # the survivors, one per line; `mutmut show NAME` in the folder
