"""CPU time of other ways to take the gradient norms (and cosines) in the optimizer's step pre-hook.

Why: ``GradientNorm``'s hooks cost what they *call* (each tensor call 2-7 µs after the step has pushed
torch's code out of the caches, docs/recorder.md), so the question for a faster version is how few calls
a step can take. Each variant runs on its own copy of the seed's step (``overhead.TrainStep``), all in
one process, in blocks of 10 steps in a random order; only the time inside the pre-hook is summed (thread
CPU time). ``lens`` and ``lens-cosine`` are ``GradientNorm`` itself (measured the same way, the writer
left out); the others compute the same values but record nothing, so they are lower bounds of what a
lens built on them would cost:

* ``foreach`` — the norms only, ``torch.stack(torch._foreach_norm(grads))``: what ``GradientNorm()``
  calls, without the recording.
* ``runs-sums`` — the cosine variant's kernels without the finishing: the gradients copied into one flat
  buffer, then the squared norms and the dot products with the last copy, one ``vecdot`` per run of
  equal sizes (what a lens finishing the cosines on the writer thread would call).
* ``numpy`` — the same sums with NumPy on the CPU tensors' memory: one flat copy, then
  ``np.add.reduceat`` of the products (a second implementation, CPU only).
* ``bincount`` — the same sums as one ``torch.bincount`` over per-element segment ids (float64
  accumulation; an index as large as the gradients).

Run ``python benchmarks/grad_hook_variants.py`` (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` at
1 GiB as ``paired_steps.py`` sets them); it prints µs per step for each variant. Figures in
docs/recorder.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch._utils import _flatten_dense_tensors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import TrainStep, alternate  # noqa: E402  (the seed's step, as in every W2 benchmark)

import normtrace as nt  # noqa: E402
from normtrace.flat import Layout  # noqa: E402

Hook = Callable[[Any, Any, Any], None]


def _variants(params: list[torch.Tensor]) -> dict[str, Hook]:
    """The hooks that record nothing, each over ``params`` (ordered by size)."""
    sizes = [p.numel() for p in params]
    offsets = np.cumsum([0, *sizes])[:-1]
    strided = Layout(params).runs  # (shape, stride, offset) of each run of equal sizes, as the lens's
    segment = torch.repeat_interleave(torch.arange(len(params)), torch.tensor(sizes))
    both = torch.cat([segment, segment + len(params)])
    kept: dict[str, Any] = {}
    out: list[Any] = []  # results, dropped now and then (a lens would hand them to the writer)

    def foreach(*_: Any) -> None:
        out.append(torch.stack(torch._foreach_norm([p.grad for p in params])))

    def runs_sums(*_: Any) -> None:
        now = _flatten_dense_tensors([p.grad for p in params])
        rows = [now.as_strided(*r) for r in strided]
        last = kept.get("rows")
        parts = [torch.linalg.vecdot(x, x, dim=1) for x in rows]
        if last is not None:
            parts += [torch.linalg.vecdot(x, y, dim=1) for x, y in zip(rows, last, strict=True)]
        out.append(torch.cat(parts))
        kept["rows"] = rows

    def numpy_sums(*_: Any) -> None:
        now = _flatten_dense_tensors([p.grad for p in params]).numpy()
        last = kept.get("flat")
        sums = [np.add.reduceat(now * now, offsets)]
        if last is not None:
            sums.append(np.add.reduceat(now * last, offsets))
        out.append(sums)
        kept["flat"] = now

    def bincount(*_: Any) -> None:
        now = _flatten_dense_tensors([p.grad for p in params])
        last = kept.get("bin")
        if last is None:
            out.append(torch.bincount(segment, now * now, minlength=len(params)))
        else:
            products = torch.stack((now, last)).mul_(now)
            out.append(torch.bincount(both, products.view(-1), minlength=2 * len(params)))
        kept["bin"] = now

    def drop_now_and_then(hook: Hook) -> Hook:
        def wrapped(*args: Any) -> None:
            hook(*args)
            if len(out) > 500:
                out.clear()

        return wrapped

    named = {"foreach": foreach, "runs-sums": runs_sums, "numpy": numpy_sums, "bincount": bincount}
    return {name: drop_now_and_then(hook) for name, hook in named.items()}


def _timed(step: TrainStep, hook: Hook, total: list[int]) -> None:
    def wrapped(*args: Any) -> None:
        start = time.thread_time_ns()
        hook(*args)
        total[0] += time.thread_time_ns() - start

    step.optimizer.register_step_pre_hook(wrapped)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--blocks", type=int, default=200, help="blocks of 10 steps per variant (default 200)")
    args = p.parse_args()
    torch.set_num_threads(1)
    runs: dict[str, tuple[TrainStep, list[int]]] = {}
    recorders = []
    for name in ("lens", "lens-cosine", "foreach", "runs-sums", "numpy", "bincount"):
        step, total = TrainStep(), [0]
        if name.startswith("lens"):
            lens = nt.GradientNorm(cosine=name == "lens-cosine")
            run_dir = Path(tempfile.mkdtemp()) / name
            recorders.append(nt.Recorder(run_dir, lenses=[lens]).attach(step.model, optimizer=step.optimizer))
            hooks = step.optimizer._optimizer_step_pre_hooks
            for key, hook in list(hooks.items()):  # the lens's own hook, timed in its place
                del hooks[key]
                _timed(step, hook, total)
        else:
            params = sorted(step.model.parameters(), key=lambda t: t.numel())
            _timed(step, _variants(params)[name], total)
        runs[name] = (step, total)

    def reset() -> None:  # after the warm-up
        for _, total in runs.values():
            total[0] = 0

    alternate({name: step for name, (step, _) in runs.items()}, args.blocks, reset)
    for rec in recorders:
        rec.close()
    for name, (_, total) in runs.items():
        print(f"{name:12s} {total[0] / (10 * args.blocks) / 1e3:7.1f} µs/step in the step pre-hook")


if __name__ == "__main__":
    main()
