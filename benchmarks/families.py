"""normtrace's cost on the model families users train, against untraced, a bare hook and the seed's library.

Why: ``overhead.py`` measures the seed's small MLP, where every microsecond of a hook shows. Users also
train wide MLPs, convolutional nets, transformers and recurrent nets, where the same hooks are a smaller
share, and deep stacks of small blocks, where they are a larger one. This script runs one training step
(forward, MSE loss against zeros, backward, SGD step) of each family with the same machinery as
``overhead.py`` (interleaved, order-rotating repeats; the median over repeats of each repeat's ``X / A``)
and prints, per family, the variants' step-time ratios, normtrace's added time per observed module, and its
ratio without the block's ``close()`` (paid once per block of a few dozen steps here, once per run in
training).

Variants: **A** untraced; **B** a bare forward hook (``vector_norm(out).item()``) on the modules
normtrace observes; **F** the floor of any recorder of these norms (``overhead.py``'s F: each observed
module's per-sample norms of its first output tensor computed and kept, dropped every 64; no pass,
epoch, loss or writer; an LSTM's hidden states, which C also records, are left out), so that
C against F says what normtrace's bookkeeping costs beyond the kernels it must run; **C** normtrace
(``OutputNorm`` on the family's activation modules, ``ParameterNorm``, ``LossMetrics`` on the loss);
**D** monitorch 0.1.0.7 with the same lenses, where it runs (its ``OutputNorm`` fails on an LSTM's tuple
output: reported, not timed).

The memory allocator is controlled: glibc hands large blocks back to the system and faults them in again
at the next step (its dynamic mmap threshold), which made the hooked variants of a wide MLP look *faster*
than the untraced one (a hook's small allocations changed when the threshold moved). The script re-runs
itself with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` fixed (1 GiB), so every variant
keeps its memory; ``--default-allocator`` measures without that.

    python benchmarks/families.py                 # every family, 11 repeats
    python benchmarks/families.py --quick         # 3 repeats, fewer steps: checks that it runs
    python benchmarks/families.py --family lstm --family blocks200
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import normtrace as nt

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead  # noqa: E402  (the timing machinery: run_block, measure, Samples)

ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)}
"""glibc's thresholds, fixed so that no variant's blocks go back to the system between steps."""


class ResidualBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norm, a ReLU after each, a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet18(classes: int = 10) -> nn.Module:
    """ResNet-18's layout (2-2-2-2 basic blocks, 64..512 channels) for small images."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [ResidualBlock(cin, cout, stride), ResidualBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


class Recurrent(nn.Module):
    """A 2-layer LSTM over a sequence, then a ReLU head on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, 128, num_layers=2, batch_first=True)
        self.act = nn.ReLU()
        self.head = nn.Linear(128, 4)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(self.act(out[:, -1]))


def _stack(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class Family:
    """A model, an input batch, and the module classes every variant observes."""

    build: Callable[[], nn.Module]
    batch: Callable[[], Tensor]
    observe: tuple[type[nn.Module], ...]
    steps: int  # per block


def _transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(128, 4, 256, dropout=0.0, activation="gelu", batch_first=True)
    return nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)


FAMILIES: dict[str, Family] = {
    "seed_mlp": Family(lambda: _stack(128, 4), lambda: torch.randn(256, 128), (nn.ReLU,), 300),
    "blocks200": Family(lambda: _stack(32, 200), lambda: torch.randn(64, 32), (nn.ReLU,), 40),
    "mlp8x1024": Family(lambda: _stack(1024, 8), lambda: torch.randn(64, 1024), (nn.ReLU,), 40),
    "resnet18": Family(resnet18, lambda: torch.randn(8, 3, 32, 32), (nn.ReLU,), 10),
    "transformer6": Family(_transformer, lambda: torch.randn(16, 32, 128), (nn.TransformerEncoderLayer,), 30),
    "lstm": Family(Recurrent, lambda: torch.randn(16, 24, 32), (nn.LSTM, nn.ReLU), 40),
}


class Step:
    """One SGD training step of a family: forward, MSE against zeros, backward, step."""

    def __init__(self, family: Family) -> None:
        torch.manual_seed(0)
        self.model = family.build()
        self.loss_fn = nn.MSELoss()
        self.x = family.batch()
        with torch.no_grad():
            self.target = torch.zeros_like(self.model(self.x))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4)

    def step(self, i: int) -> None:
        """One training step."""
        loss = self.loss_fn(self.model(self.x), self.target)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def end_epoch(self, epoch: int) -> None:
        """Nothing between epochs."""


def _first_tensor(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else _first_tensor(out[0])


class BareHookOn(overhead.Untraced):
    """B: ``vector_norm(out).item()`` on every module of the observed classes."""

    def __init__(self, model: nn.Module, observe: tuple[type[nn.Module], ...]) -> None:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            torch.linalg.vector_norm(_first_tensor(out)).item()

        self.handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, observe)]

    def cleanup(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()


class KeptNormsOn(overhead.Untraced):
    """F: per-sample norms of every observed module's (first) output, computed with grad off and kept
    with the module's name, the list dropped every 64 entries (normtrace compacts as often)."""

    def __init__(self, model: nn.Module, observe: tuple[type[nn.Module], ...]) -> None:
        from normtrace.observe import after_forward

        kept: list[tuple[str, Tensor]] = []

        def keeper(name: str) -> Callable[[nn.Module, Any, Any], None]:
            def keep(module: nn.Module, args: Any, out: Any) -> None:
                with torch.no_grad():
                    t = _first_tensor(out)
                    kept.append((name, torch.linalg.vector_norm(t.flatten(1) if t.ndim > 2 else t, 2, 1)))
                if len(kept) >= 64:
                    kept.clear()

            return keep

        self.handles = [
            after_forward(m, keeper(n)) for n, m in model.named_modules() if isinstance(m, observe)
        ]

    def cleanup(self) -> None:
        """Give the modules their classes back."""
        for handle in self.handles:
            handle.remove()


class NormtraceOn:
    """C: a fresh ``Recorder`` per block with the three seed lenses on the observed classes."""

    def __init__(
        self, model: nn.Module, loss_fn: nn.Module, run_dir: Path, observe: tuple[type[nn.Module], ...]
    ):
        self.run_dir = run_dir
        lenses = [nt.LossMetrics(loss_fn=loss_fn), nt.OutputNorm(include=list(observe)), nt.ParameterNorm()]
        self.rec = nt.Recorder(run_dir, lenses).attach(model)

    def epoch(self, total_reward: float, smoothed: float) -> None:
        """Tick the epoch (parameter norms, a flush)."""
        self.rec.tick_epoch()

    def finish(self) -> None:
        """Close: the writer thread writes everything."""
        self.rec.close()

    def cleanup(self) -> None:
        """Delete the block's trace."""
        self.rec.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


class MonitorchOn(overhead.Monitorch):
    """D: monitorch's inspector with the same lenses on the observed classes."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, observe: tuple[type[nn.Module], ...]) -> None:
        from monitorch.inspector import PyTorchInspector
        from monitorch.lens import LossMetrics, OutputNorm, ParameterNorm

        self.model, self.loss_fn = model, loss_fn
        self.inspector = PyTorchInspector(
            lenses=[LossMetrics(loss_fn=loss_fn), OutputNorm(include=list(observe)), ParameterNorm()],
            visualizer="dummy",
        ).attach(model)

    def epoch(self, total_reward: float, smoothed: float) -> None:
        """Tick (aggregation, parameter norms)."""
        self.inspector.tick_epoch()


def factory(family: Family, workdir: Path) -> overhead.TracerFactory:
    """Variant ``key``'s tracer for this family."""
    counter = iter(range(10**9))

    def make(key: str, model: nn.Module, loss_fn: nn.Module) -> overhead.Tracer:
        if key == "A":
            return overhead.Untraced()
        if key == "B":
            return BareHookOn(model, family.observe)
        if key == "F":
            return KeptNormsOn(model, family.observe)
        if key == "C":
            return NormtraceOn(model, loss_fn, workdir / f"run{next(counter)}", family.observe)
        if key == "D":
            return MonitorchOn(model, loss_fn, family.observe)
        raise ValueError(key)

    return make


def runnable(work: Step, make: overhead.TracerFactory, key: str) -> str | None:
    """None when variant ``key`` gets through two steps and an epoch tick on this family, else why not."""
    try:
        tracer = make(key, work.model, work.loss_fn)
        try:
            overhead.run_block(work, tracer, 2, 2)
        finally:
            tracer.cleanup()
    except Exception as exc:  # a variant that cannot run this family is reported, not timed
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return None


def observed(work: Step, family: Family) -> int:
    """How many modules the variants observe (every module of the observed classes)."""
    return sum(isinstance(m, family.observe) for m in work.model.modules())


def measure_family(
    name: str, family: Family, workdir: Path, repeats: int, quick: bool, monitorch: bool
) -> str:
    """Time the variants on one family; its line of the table (and why a variant could not run)."""
    work = Step(family)
    make = factory(family, workdir)
    variants = ["A", "B", "F", "C"] + (["D"] if monitorch else [])
    failed = {k: why for k in variants if (why := runnable(work, make, k)) is not None}
    steps = max(2, family.steps // (4 if quick else 1))
    samples = overhead.measure(
        work, [k for k in variants if k not in failed], make,
        steps=steps, warmup=max(1, steps // 4), repeats=repeats, epoch_len=max(1, steps // 2), log=lambda _: None,
    )  # fmt: skip
    n = observed(work, family)

    def ratio(key: str) -> str:
        if key in failed:
            return "fails"
        if key not in samples.per_unit["cpu"]:
            return "-"
        return f"{samples.paired('cpu', key, lambda x, y: x / y):.3f}"

    per_module = samples.paired("cpu", "C", lambda x, y: (x - y) / n * 1e6)
    floor = (
        samples.paired("cpu", "F", lambda x, y: (x - y) / n * 1e6)
        if "F" in samples.per_unit["cpu"]
        else float("nan")
    )
    q = statistics.quantiles(samples.paired_values("cpu", "C", lambda x, y: x / y), n=4)
    # close() once per block of a few dozen steps weighs more than once per run: C's step without it
    wall, finish = samples.per_unit["wall"], samples.finish_per_unit["C"]
    steps_only = statistics.median((c - f) / a for c, f, a in zip(wall["C"], finish, wall["A"], strict=True))
    close_ms = statistics.median(samples.finish_per_unit["C"]) * steps * 1e3
    line = (f"{name:<13} {n:>7} {samples.median('cpu', 'A') * 1e3:>10.2f} {ratio('B'):>7} {ratio('F'):>7} {ratio('C'):>7} "
            f"{ratio('D'):>7} {per_module:>14.1f} {floor:>14.1f} {q[0]:>6.3f}..{q[2]:.3f} {steps_only:>9.3f} {close_ms:>6.1f}")  # fmt: skip
    return "\n".join([line, *(f"  {key} cannot run {name}: {why}" for key, why in failed.items())])


def main() -> None:
    """Re-run under the fixed allocator if needed, then measure each family and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", action="append", choices=sorted(FAMILIES), help="only these (repeatable)")
    p.add_argument("--repeats", type=int, default=11, help="repeats per variant (default 11)")
    p.add_argument("--quick", action="store_true", help="3 repeats, a quarter of the steps")
    p.add_argument("--default-allocator", action="store_true", help="leave glibc's thresholds as they are")
    args = p.parse_args()
    if not args.default_allocator and any(os.environ.get(k) != v for k, v in ALLOCATOR_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})
    torch.set_num_threads(1)
    repeats = 3 if args.quick else args.repeats
    have_monitorch = overhead.monitorch_version() is not None
    print(f"normtrace model families: torch {torch.__version__}, 1 thread, {repeats} repeats, allocator "
          f"{'default' if args.default_allocator else 'thresholds fixed at 1 GiB'}, load {overhead._loadavg():.1f}, "
          f"{overhead.machine_info(1)['cpu']}")  # fmt: skip
    print(f"{'family':<13} {'modules':>7} {'A ms/step':>10} {'B/A':>7} {'F/A':>7} {'C/A':>7} {'D/A':>7} "
          f"{'C-A us/module':>14} {'F-A us/module':>14} {'C q1..q3':>13} {'C/A -close':>9} {'close ms':>6}")  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="normtrace-families-"))
    try:
        for name in args.family or list(FAMILIES):
            print(measure_family(name, FAMILIES[name], workdir, repeats, args.quick, have_monitorch))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("ratios: median over repeats of the repeat's X / A on CPU time (all threads of the process); "
          "C/A -close: on the wall clock, C's block without its close() (once per block of a few dozen "
          "steps here, once per run in training); close ms: its wall time per block")  # fmt: skip


if __name__ == "__main__":
    main()
