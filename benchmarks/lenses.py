"""Cost of the gradient, update and activation lenses on the seed's training step (W2 of ``overhead.py``).

Why: the issue sets targets for the new lenses on the seed's DQN step: gradient norms (with cosine) and
update ratio each at most 1.05x the untraced step, every lens together at most 1.12x, and each new lens
at least 5x cheaper in added time than the seed library's equivalent. This measures exactly that, with
``overhead.py``'s workload (``TrainStep``), blocks, interleaved order-rotating repeats and paired medians.

Variants, each a fresh tracer per block on the same model and optimizer:

* ``A`` untraced;
* ``G`` ``GradientNorm(cosine=True)``, ``U`` ``UpdateRatio(cosine=True)``, ``O`` ``OutputGradientNorm()``,
  ``R`` ``ActivationRate()``: each alone, with ``rec.attach(model, optimizer=opt)``;
* ``ALL`` the seed's lenses (as ``overhead.py``'s C) plus all four;
* ``mG``, ``mU``, ``mO``, ``mR``: monitorch's ``ParameterGradientGeometry``, ``ParameterUpdateGeometry``,
  ``OutputGradientGeometry``, ``OutputActivation`` (correlations on, as its defaults), when monitorch is
  importable (``nox -s bench`` installs it).

Printed: per variant the median over repeats of X/A (paired within a repeat) and of the added µs per
step (X − A); and for each new lens the ratio of monitorch's added time to normtrace's.

Run ``python benchmarks/lenses.py`` (``--repeats``, ``--steps``) or ``nox -s bench -- --lenses``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import normtrace as nt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import (  # noqa: E402  (the same workload, blocks and pairing as the main benchmark)
    METRICS,
    TrainStep,
    Untraced,
    measure,
    monitorch_version,
)

NEW_LENSES: dict[str, Callable[[], Any]] = {
    "G": lambda: nt.GradientNorm(cosine=True),
    "U": lambda: nt.UpdateRatio(cosine=True),
    "O": lambda: nt.OutputGradientNorm(),
    "R": lambda: nt.ActivationRate(),
}
"""normtrace's new lenses, one variant each."""

TARGETS = {"G": 1.05, "U": 1.05, "ALL": 1.12}
"""The issue's ceilings on X/A."""


class Recording:
    """A normtrace variant: a fresh recorder with ``lenses`` attached with the step's optimizer."""

    def __init__(self, work: TrainStep, lenses: list[Any], run_dir: Path) -> None:
        self.run_dir = run_dir
        self.rec = nt.Recorder(run_dir, lenses=lenses).attach(work.model, optimizer=work.optimizer)

    def epoch(self, total_reward: float, smoothed: float) -> None:
        """The seed's per-episode calls."""
        self.rec.push_metric("total_reward", total_reward)
        self.rec.push_metric("smoothed_treward", smoothed)
        self.rec.tick_epoch()

    def finish(self) -> None:
        """Close: the writer drains what the block recorded (counted)."""
        self.rec.close()

    def cleanup(self) -> None:
        """Delete the block's trace."""
        self.rec.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


class SeedLens:
    """A monitorch variant: ``PyTorchInspector`` with one lens and the ``"dummy"`` visualizer."""

    def __init__(self, work: TrainStep, key: str) -> None:
        from monitorch import lens as m
        from monitorch.inspector import PyTorchInspector

        lens = {
            "mG": lambda: m.ParameterGradientGeometry(),
            "mU": lambda: m.ParameterUpdateGeometry(work.optimizer),
            "mO": lambda: m.OutputGradientGeometry(),
            "mR": lambda: m.OutputActivation(),
        }[key]()
        self.inspector = PyTorchInspector(lenses=[lens], visualizer="dummy").attach(work.model)

    def epoch(self, total_reward: float, smoothed: float) -> None:
        """The seed's per-episode calls."""
        self.inspector.push_metric("total_reward", total_reward)
        self.inspector.push_metric("smoothed_treward", smoothed)
        self.inspector.tick_epoch()

    def finish(self) -> None:
        """Everything was reduced in the hooks and at the ticks."""

    def cleanup(self) -> None:
        """Remove the hooks."""
        self.inspector.detach()


def factory(work: TrainStep, workdir: Path) -> Callable[[str, nn.Module, nn.Module], Any]:
    """Build variant ``key``'s tracer for one block."""
    counter = iter(range(10**9))

    def make(key: str, model: nn.Module, loss_fn: nn.Module) -> Any:
        if key == "A":
            return Untraced()
        if key in NEW_LENSES:
            return Recording(work, [NEW_LENSES[key]()], workdir / f"run{next(counter)}")
        if key == "ALL":
            seed = [
                nt.LossMetrics(loss_fn=loss_fn, metrics=list(METRICS)),
                nt.OutputNorm(include=[nn.Identity], normalize_by_size=True),
                nt.ParameterNorm(normalize_by_size=True),
            ]
            lenses = seed + [make_lens() for make_lens in NEW_LENSES.values()]
            return Recording(work, lenses, workdir / f"run{next(counter)}")
        return SeedLens(work, key)

    return make


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table; exit 1 with ``--strict`` when a target is missed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps", type=int, default=200, help="training steps per block")
    parser.add_argument("--epoch-len", type=int, default=20, help="steps per episode (tick_epoch)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    work = TrainStep()
    variants = ["A", *NEW_LENSES, "ALL"]
    if monitorch_version() is not None:
        variants += ["mG", "mU", "mO", "mR"]
    workdir = Path(tempfile.mkdtemp(prefix="normtrace-lenses-"))
    try:
        samples = measure(
            work,
            variants,
            factory(work, workdir),
            steps=args.steps,
            warmup=max(20, args.steps // 10),
            repeats=args.repeats,
            epoch_len=args.epoch_len,
            log=lambda line: print(line, file=sys.stderr),
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    added = {k: samples.paired("cpu", k, lambda x, a: (x - a) * 1e6) for k in variants}
    print(f"W2 untraced: {samples.median('cpu', 'A') * 1e6:.0f} us/step (cpu clock, all threads)")
    print("variant  X/A (cpu)  X/A (wall)  added us/step  target")
    missed = False
    for key in variants[1:]:
        ratio = samples.paired("cpu", key, lambda x, a: x / a)
        wall = samples.paired("wall", key, lambda x, a: x / a)
        target = TARGETS.get(key)
        verdict = "" if target is None else f"<= {target}: {'ok' if ratio <= target else 'MISSED'}"
        missed |= target is not None and ratio > target
        print(f"{key:7}  {ratio:9.3f}  {wall:10.3f}  {added[key]:13.1f}  {verdict}")
    for key in NEW_LENSES:
        seed = f"m{key}"
        if seed in added and added[key] > 0:
            times = added[seed] / added[key]
            print(f"monitorch's {seed} adds {times:.1f}x what {key} adds (target >= 5x)")
            missed |= times < 5
    print(f"repeats {args.repeats}, {args.steps} steps per block; spread: {_spread(samples, variants)}")
    return 1 if args.strict and missed else 0


def _spread(samples: Any, variants: list[str]) -> str:
    parts = []
    for key in variants[1:]:
        values = sorted(samples.paired_values("cpu", key, lambda x, a: x / a))
        parts.append(f"{key} {values[0]:.3f}-{values[-1]:.3f}")
    return (
        ", ".join(parts)
        + f" (min-max X/A; median of A {statistics.median(samples.per_unit['cpu']['A']):.2e} s)"
    )


if __name__ == "__main__":
    sys.exit(main())
