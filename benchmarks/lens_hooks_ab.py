"""CPU time inside the optimizer step hooks of a parameter lens: this tree's against an earlier commit's.

Why: the paired W2 benchmark measures the whole step on a machine whose speed drifts by tens of percent
between runs; to tell whether a change to ``normtrace/gradients.py`` made its hooks cheaper, both
versions run in one process, each on its own copy of the seed's step, alternating every 10 steps in a
random order, and only the time spent inside the step hooks is summed (thread CPU time). The old
version is ``gradients.py`` as of ``--base`` (read with ``git show``), importing the rest of this tree.

Run ``python benchmarks/lens_hooks_ab.py --base 895920c GradientNorm --cosine`` (``UpdateRatio`` the
same way), with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set to 1 GiB as
``paired_steps.py`` sets them. Prints µs per step for each version and the change; docs/recorder.md
has the figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import TrainStep, alternate  # noqa: E402  (the seed's step, as in every W2 benchmark)

import normtrace as nt  # noqa: E402


def old_module(base: str) -> object:
    """``normtrace/gradients.py`` as of commit ``base``, loaded as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{base}:normtrace/gradients.py"], capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "gradients_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("gradients_base", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gradients_base"] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def timed(step: TrainStep, lens: object, run_dir: Path) -> tuple[nt.Recorder, list[int]]:
    """Attach ``lens`` to ``step``'s model and optimizer; every step hook's thread CPU time is summed."""
    rec = nt.Recorder(run_dir, lenses=[lens]).attach(step.model, optimizer=step.optimizer)
    total = [0]
    for hooks in (step.optimizer._optimizer_step_pre_hooks, step.optimizer._optimizer_step_post_hooks):
        for key, hook in list(hooks.items()):

            def wrapped(*args: object, hook: object = hook) -> None:
                start = time.thread_time_ns()
                hook(*args)  # type: ignore[operator]
                total[0] += time.thread_time_ns() - start

            hooks[key] = wrapped
    return rec, total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("lens", choices=["GradientNorm", "UpdateRatio"])
    p.add_argument("--cosine", action="store_true", help="the lens with cosine=True")
    p.add_argument("--base", default="HEAD", help="the commit whose gradients.py is compared (default HEAD)")
    p.add_argument("--blocks", type=int, default=200, help="blocks of 10 steps per version (default 200)")
    args = p.parse_args()
    torch.set_num_threads(1)
    versions = {"base": old_module(args.base), "tree": nt}
    runs = {}
    for name, module in versions.items():
        step = TrainStep()
        lens = getattr(module, args.lens)(cosine=args.cosine)
        runs[name] = (step, *timed(step, lens, Path(tempfile.mkdtemp()) / name))

    def reset() -> None:  # after the warm-up
        for _, _, total in runs.values():
            total[0] = 0

    alternate({name: step for name, (step, _, _) in runs.items()}, args.blocks, reset)
    per_step = {}
    for name, (_, rec, total) in runs.items():
        rec.close()
        per_step[name] = total[0] / (10 * args.blocks) / 1e3
    print(f"{args.lens}(cosine={args.cosine}): step hooks, µs/step: {args.base} {per_step['base']:.1f}, "
          f"this tree {per_step['tree']:.1f} ({100 * (per_step['tree'] / per_step['base'] - 1):+.0f}%)")  # fmt: skip


if __name__ == "__main__":
    main()
