"""Instructions per W1 pass of each ``overhead.py`` variant, counted by valgrind's callgrind.

Why: issue 16 asks that normtrace's per-module overhead in W1 be at most 1.2x the norm kernel's (C/K).
Both are a few µs, which this project's shared VM moves by half from one run to the next; instruction
counts do not move with the load. They leave out what the timed benchmarks include: cache misses (the
main cost inside a real step, see docs/recorder.md) and the writer thread's conversion (switched off
here, below). So this answers a narrower question exactly: how much work does each variant do per pass?

Each variant runs in its own process under ``valgrind --tool=callgrind --instr-atstart=no``; the process
warms up, then switches counting on (``callgrind_control -i on``) around N passes and again around 2N
passes, dumping the counts after each; one pass is ``(second - first) / N``, which cancels what the
switching itself costs. One more variant than ``overhead.py``'s: **P**, normtrace numbering passes with
no output observed (``LossMetrics`` alone), which splits C's bookkeeping into its per-pass share (P - A)
and its per-module share. The normtrace variants (C, P) never flush during the count (``flush_every`` and
``flush_secs`` out of reach: under valgrind a run is ~50x slower, so the 10 s clock would flush far more
often than in real use); they still number passes, and C compacts its norms every 64 records.

    python benchmarks/instructions.py                       # A K F C, 400 passes (~3 min a variant)
    python benchmarks/instructions.py --variants A K F C P B D --passes 800
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


class PassesOnly:
    """P: normtrace numbering passes with no output observed (``LossMetrics`` alone; W1 calls no loss):
    C's per-pass share."""

    def __init__(self, model: Any, loss_fn: Any, run_dir: Path, **options: Any) -> None:
        import normtrace as nt

        self.rec = nt.Recorder(run_dir, lenses=[nt.LossMetrics(loss_fn=loss_fn)], **options).attach(model)

    def finish(self) -> None:
        """Close the run."""
        self.rec.close()

    def cleanup(self) -> None:
        """Closed already; closing again does nothing."""
        self.rec.close()


def count_in_child(variant: str, passes: int, warmup: int) -> None:
    """The measured process: warm up, then count ``passes`` and ``2 * passes`` W1 passes, dumping each."""
    import torch

    sys.path.insert(0, str(HERE))
    import overhead

    torch.set_num_threads(1)
    work = overhead.ForwardOnly()
    tmp = Path(tempfile.mkdtemp(prefix="normtrace-instructions-"))
    options = {"flush_every": 10**9, "flush_secs": math.inf}
    if variant == "C":
        tracer = overhead.Normtrace(work.model, work.loss_fn, tmp / "run", **options)
    elif variant == "P":
        tracer = PassesOnly(work.model, work.loss_fn, tmp / "run", **options)
    else:
        tracer = overhead.tracer_factory(tmp)(variant, work.model, work.loss_fn)
    for i in range(warmup):
        work.step(i)
    pid = str(os.getpid())
    for label, n in (("first", passes), ("second", 2 * passes)):
        subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
        for i in range(n):
            work.step(i)
        subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
        subprocess.run(["callgrind_control", f"--dump={label}", pid], check=True, capture_output=True)
    tracer.finish()
    tracer.cleanup()
    shutil.rmtree(tmp, ignore_errors=True)


def _instructions(path: Path) -> int:
    """The total instruction count of one callgrind dump."""
    match = re.search(r"^totals:\s*(\d+)", path.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{path}: no instruction total in this callgrind output")
    return int(match.group(1))


def per_pass(variant: str, passes: int, warmup: int, workdir: Path) -> float:
    """Run ``variant`` under callgrind; instructions of one pass."""
    out = workdir / f"callgrind.{variant}"
    cmd = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
        sys.executable, __file__, "--child", variant, "--passes", str(passes), "--warmup", str(warmup),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"variant {variant} failed under valgrind:\n{done.stderr[-2000:]}")
    dumps = sorted(workdir.glob(f"callgrind.{variant}.[0-9]*"), key=lambda p: int(p.suffix[1:]))
    if len(dumps) != 2:  # .1 after the first count, .2 after the second (the end of the run: no suffix)
        raise RuntimeError(f"variant {variant}: expected two callgrind dumps, found {dumps}")
    first, second = (_instructions(d) for d in dumps)
    return (second - first) / passes


def main(argv: Sequence[str] | None = None) -> int:
    """Count each variant, print instructions per pass and per hooked module, and the ratios."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["A", "K", "F", "C"], help="default: A K F C")
    p.add_argument("--passes", type=int, default=400, help="N: passes of the first count (default 400)")
    p.add_argument("--warmup", type=int, default=300, help="passes before counting (default 300)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        count_in_child(args.child, args.passes, args.warmup)
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (Debian: apt install valgrind)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    from overhead import HOOKED

    variants = list(dict.fromkeys(["A", *args.variants]))
    counts: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="normtrace-callgrind-") as tmp:
        for v in variants:
            print(f"counting {v} ...", file=sys.stderr, flush=True)
            counts[v] = per_pass(v, args.passes, args.warmup, Path(tmp))
    print(f"W1 (QNetwork, batch 32, grad on), instructions per pass; {HOOKED} hooked modules; "
          f"N = {args.passes} passes after {args.warmup}")  # fmt: skip
    per_module = {v: (counts[v] - counts["A"]) / HOOKED for v in variants if v != "A"}
    for v in variants:
        extra = "" if v == "A" else f"  {per_module[v]:+10,.0f} per module over A"
        print(f"  {v}  {counts[v]:12,.0f}{extra}")
    for num, den in (("F", "K"), ("C", "K"), ("C", "F")):
        if num in per_module and den in per_module and per_module[den] > 0:
            print(f"  {num}/{den} per-module: {per_module[num] / per_module[den]:.2f}")
    if {"C", "F", "P"} <= set(counts):
        per_pass_share = counts["P"] - counts["A"]
        hook_share = (counts["C"] - counts["F"] - per_pass_share) / HOOKED
        print(f"  C over F: {per_pass_share:,.0f} per pass (P - A: numbering, the root's observers) and "
              f"{hook_share:,.0f} per module (the output hook's bookkeeping, compaction)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
