"""Time the HTML report of a trace with very many modules, and loading a run of very many shards.

Why: a large model records thousands of series (a 24-layer transformer observed per activation and
per head; 10,000 modules in the worst case seen), and a long run that flushes every 10 s leaves tens of
thousands of small shards per table. The report must stay usable (bounded charts: at most
``charts.MAX_SERIES`` curves each, the rest lumped) and finish within a budget on a 2-core machine;
``load`` must not take minutes. The trace is written in the documented format (tests/tracegen.py).

Usage: ``python benchmarks/report_scale.py [--modules 10000] [--passes 100] [--shards 100000]``.
Exits 1 when a budget is exceeded (the budgets are the constants below, measured on this project's
2-core CPU machine with room for a busy neighbour).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.ipc as ipc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import normtrace_analysis as na  # noqa: E402
from tracegen import _to_table, default_meta, write_trace  # noqa: E402

REPORT_BUDGET_S = 60.0
"""10,000 modules x 100 passes (1 million output rows): load + report, seconds."""

LOAD_BUDGET_S = 30.0
"""100,000 one-batch shards: load + collect one column, seconds."""


def many_modules(run: Path, modules: int, passes: int) -> Path:
    """``modules`` series of ``passes`` rows, nested names (``block{i}.layer{j}``), a sync every 20 passes."""
    rng = np.random.default_rng(0)
    names = np.array([f"block{i // 100}.layer{i % 100}.act" for i in range(modules)])
    p = np.repeat(np.arange(passes), modules)
    norm = (1.0 + np.tile(np.arange(modules) % 7, passes)) * (1 + 0.05 * rng.standard_normal(p.size))
    sync = np.arange(20, passes, 20)
    return write_trace(
        run,
        outputs={
            "pass": p,
            "epoch": (p // 10).astype(np.int32),
            "module": np.tile(names, passes),
            "norm": norm.astype(np.float32),
        },
        events={"pass": sync, "epoch": (sync // 10).astype(np.int32), "name": ["target_update"] * len(sync)},
        metrics={"pass": np.arange(passes), "epoch": (np.arange(passes) // 10).astype(np.int32),
                 "name": ["loss"] * passes, "value": rng.random(passes)},
        shards=10,
    )  # fmt: skip


def many_shards(run: Path, shards: int) -> Path:
    """``shards`` outputs shards of 10 rows each, as a run flushing very often would leave."""
    folder = run / "outputs"
    folder.mkdir(parents=True)
    options = ipc.IpcWriteOptions(compression="lz4")
    for seq in range(1, shards + 1):
        table = _to_table(
            "outputs",
            {"pass": np.arange(10) + 10 * seq, "epoch": np.zeros(10, np.int32), "module": ["m"] * 10,
             "norm": np.ones(10, np.float32)},
            0,
        )  # fmt: skip
        with ipc.new_file(str(folder / f"rank0-{seq:06d}.arrow"), table.schema, options=options) as w:
            w.write_table(table)
    (run / "meta.json").write_text(json.dumps(default_meta(run.name)))
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", type=int, default=10_000)
    parser.add_argument("--passes", type=int, default=100)
    parser.add_argument("--shards", type=int, default=100_000, help="0 skips the many-shards load")
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        run = many_modules(Path(tmp) / "wide", args.modules, args.passes)
        start = time.perf_counter()
        trace = na.load(run)
        page = na.report(trace, Path(tmp) / "report.html")
        took = time.perf_counter() - start
        size = page.stat().st_size / 2**20
        within = took <= REPORT_BUDGET_S
        ok &= within
        print(
            f"report of {args.modules:,} modules x {args.passes} passes: {took:.1f} s, {size:.1f} MiB "
            f"(budget {REPORT_BUDGET_S:.0f} s: {'met' if within else 'MISSED'})"
        )
        if args.shards:
            run = many_shards(Path(tmp) / "long", args.shards)
            start = time.perf_counter()
            rows = na.load(run).outputs.select("pass").collect().height
            took = time.perf_counter() - start
            within = took <= LOAD_BUDGET_S
            ok &= within
            print(
                f"load + collect of {args.shards:,} shards ({rows:,} rows): {took:.1f} s "
                f"(budget {LOAD_BUDGET_S:.0f} s: {'met' if within else 'MISSED'})"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
