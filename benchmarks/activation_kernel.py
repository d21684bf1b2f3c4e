"""``activation_rates`` (ActivationRate's kernel) of this tree against an earlier commit's, per output shape.

Why: most of what ``ActivationRate`` adds to a step is this function (a handful of small kernels per
observed call); a change to it is judged here, both versions in one process, calls alternating in
blocks of ``--calls``, ``--repeats`` blocks each, medians of µs per call and of the paired ratio.

    python benchmarks/activation_kernel.py --base 108af96 [--repeats 15] [--calls 2000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
import types
from collections.abc import Callable

import torch

from normtrace.activations import activation_rates

SHAPES = [(256, 128), (32, 16, 8, 8), (1, 128)]  # the seed's batch, a small conv map, an acting pass


def base_kernel(base: str) -> Callable[[torch.Tensor], torch.Tensor | None]:
    """``activation_rates`` as of commit ``base`` (its module read with ``git show``, run on its own)."""
    source = subprocess.run(
        ["git", "show", f"{base}:normtrace/activations.py"], capture_output=True, text=True, check=True
    ).stdout
    start = source.index("def activation_rates")
    end = source.index("\n\n\n", start)
    module = types.ModuleType("activations_base")
    exec(compile("import torch\nfrom torch import Tensor\n" + source[start:end], "activations_base", "exec"),
         module.__dict__)  # fmt: skip
    return module.activation_rates


def per_call(kernel: Callable[[torch.Tensor], object], x: torch.Tensor, calls: int) -> float:
    """µs per call of ``kernel(x)``, over ``calls`` calls."""
    t0 = time.perf_counter()
    for _ in range(calls):
        kernel(x)
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the commit to compare with (e.g. 108af96)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    old = base_kernel(args.base)
    print(f"activation_rates, µs per call (median of {args.repeats} blocks of {args.calls}), one thread")
    print(f"{'shape':<16}{args.base:>10}{'this tree':>11}{'ratio':>8}")
    for shape in SHAPES:
        x = torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
        if not torch.allclose(old(x), activation_rates(x), rtol=1e-6, atol=0):  # (float32 rounding apart)
            raise SystemExit(f"the two kernels disagree on shape {shape}")
        times: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(args.repeats):
            order = [("old", old), ("new", activation_rates)]
            for key, kernel in order if r % 2 else order[::-1]:
                times[key].append(per_call(kernel, x, args.calls))
        ratio = statistics.median(n / o for n, o in zip(times["new"], times["old"], strict=True))
        label = "x".join(map(str, shape))
        print(f"{label:<16}{statistics.median(times['old']):>10.1f}{statistics.median(times['new']):>11.1f}"
              f"{ratio:>8.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
