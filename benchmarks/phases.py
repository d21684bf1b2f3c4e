"""Where normtrace's overhead lands inside the seed's training step (W2), phase by phase.

Why: ``overhead.py`` says how much slower the whole step is; this says where. Each step is cut into the
``overhead.PHASES`` by ``perf_counter`` laps; blocks of the untraced step (A) and of normtrace with the
seed's lenses (C) alternate, and for every phase the script prints the median over steps, then over
repeats, and the median over repeats of each repeat's paired difference C - A. Medians over steps leave
out the rare steps that compact, flush or close (those are in ``overhead.py``'s totals), so the rows
show the steady per-step cost, including what the hooks cost the phases they do not touch (the target
forward, backward and optimizer step run in caches the hooks have evicted).

    python benchmarks/phases.py [--repeats 7] [--steps 600]

Numbers move by several µs from run to run on a shared VM; read the differences, not the digits.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import PHASES, TracerFactory, TrainStep, run_block, tracer_factory  # noqa: E402


class LappedStep:
    """A ``TrainStep`` whose steps record how long each of the ``PHASES`` took (a ``Workload``)."""

    def __init__(self, work: TrainStep) -> None:
        self.work, self.model, self.loss_fn = work, work.model, work.loss_fn
        self.per_phase: list[list[float]] = [[] for _ in PHASES]
        self._laps: list[float] = []

    def _lap(self) -> None:
        self._laps.append(time.perf_counter())

    def step(self, i: int) -> None:
        """One W2 step, its phase durations appended to ``per_phase``."""
        self._laps.clear()
        self._lap()
        self.work.step(i, self._lap)
        for k, (t0, t1) in enumerate(itertools.pairwise(self._laps)):
            self.per_phase[k].append(t1 - t0)

    def end_epoch(self, epoch: int) -> None:
        """The step's own epoch boundary (the target net reload)."""
        self.work.end_epoch(epoch)


def phase_medians(
    work: TrainStep, key: str, make_tracer: TracerFactory, steps: int, epoch_len: int
) -> list[float]:
    """Median seconds per phase over one block of ``steps`` steps with variant ``key`` attached, the block
    run exactly as ``overhead.py`` runs it (epoch ticks, the final close)."""
    lapped = LappedStep(work)
    tracer = make_tracer(key, work.model, work.loss_fn)
    run_block(lapped, tracer, steps, epoch_len)
    tracer.cleanup()
    return [statistics.median(v) for v in lapped.per_phase]


def main(argv: Sequence[str] | None = None) -> int:
    """Alternate A and C blocks, then print the per-phase table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7, help="A/C block pairs (default 7)")
    p.add_argument("--steps", type=int, default=600, help="W2 steps per block (default 600)")
    p.add_argument("--epoch-len", type=int, default=200, help="steps per epoch tick (default 200)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = TrainStep()
    samples: dict[str, list[list[float]]] = {"A": [], "C": []}
    with tempfile.TemporaryDirectory(prefix="normtrace-phases-") as tmp:
        make = tracer_factory(Path(tmp))
        for key in ("A", "C"):  # warm-up blocks, not recorded
            phase_medians(work, key, make, args.steps // 3, args.epoch_len)
        for r in range(args.repeats):
            for key in ("A", "C") if r % 2 == 0 else ("C", "A"):
                gc.collect()
                samples[key].append(phase_medians(work, key, make, args.steps, args.epoch_len))
            print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
    print(f"W2 phases, median µs per step ({args.repeats} A/C block pairs of {args.steps} steps)")
    print(f"  {'phase':<40} {'A untraced':>11} {'C - A':>8}")
    for k, name in enumerate(PHASES):
        a = statistics.median(rep[k] for rep in samples["A"]) * 1e6
        diff = statistics.median(c[k] - a_[k] for c, a_ in zip(samples["C"], samples["A"], strict=True)) * 1e6
        print(f"  {name:<40} {a:11.1f} {diff:+8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
