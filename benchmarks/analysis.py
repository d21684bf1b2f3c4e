"""Speed of normtrace_analysis on a large synthetic trace: load + epoch_summary + spikes + event_alignment.

Why: the analysis package promises that a long run (tens of millions of output rows in many shards) is
summarised and searched for spikes in seconds on a laptop. This script writes, in the documented format
(tests/tracegen.py, pyarrow only), 100 modules x 100,000 passes = 10 million ``outputs`` rows in 100
LZ4 shards (one per 1,000 passes, as a recorder flushing every 1,000 passes would), 500 epochs of 200
passes, a ``target_update`` event every 5 epochs and a few planted spikes; then times, in this process:

* ``load``: list the shards, open every footer, build the lazy frames;
* ``epoch_summary("outputs")``: 50,000 groups (module x epoch) of 200 rows;
* ``spikes("outputs")``: rolling median/MAD detector over 100 series of 100,000 passes;
* ``event_alignment("target_update")``: spikes again (not cached) plus the coverage of the event windows.

The trace is generated in a child process so that this process's peak RSS (printed, from
``getrusage``) is the analysis alone. For an outside measure run it under ``/usr/bin/time -v``
with ``--trace DIR`` pointing at a trace written by an earlier ``--keep`` run.

Usage: ``python benchmarks/analysis.py [--trace DIR] [--keep] [--repeat N]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tracegen import write_shards, write_trace  # noqa: E402

MODULES = 100
PASSES = 100_000
PASSES_PER_EPOCH = 200
PASSES_PER_SHARD = 1_000
TARGET_EVERY = 5  # epochs


def write_big_trace(run: Path, seed: int = 0) -> None:
    """The benchmark trace: shard by shard, so generation memory stays at one shard's worth."""
    rng = np.random.default_rng(seed)
    names = pa.array([f"net.layers.{i}.act" for i in range(MODULES)])
    numel = (2 ** rng.integers(2, 9, MODULES)).astype(np.int64)
    level = rng.uniform(0.5, 5.0, MODULES)
    for shard in range(PASSES // PASSES_PER_SHARD):
        passes = np.repeat(np.arange(shard * PASSES_PER_SHARD, (shard + 1) * PASSES_PER_SHARD), MODULES)
        mod = np.tile(np.arange(MODULES, dtype=np.int32), PASSES_PER_SHARD)
        trend = 1.0 + 0.5 * passes / PASSES
        norm = level[mod] * trend * np.exp(0.05 * rng.standard_normal(len(passes)))
        spiky = rng.random(len(passes)) < 2e-5
        norm[spiky] *= 3.0
        table = pa.table(
            {
                "pass": pa.array(passes, pa.int64()),
                "epoch": pa.array((passes // PASSES_PER_EPOCH).astype(np.int32)),
                "module": pa.DictionaryArray.from_arrays(pa.array(mod), names).cast(pa.string()),
                "norm": pa.array(norm.astype(np.float32)),
                "numel": pa.array(numel[mod]),
                "batch": pa.array(np.full(len(passes), 64, np.int32)),
                "grad_enabled": pa.array(np.ones(len(passes), bool)),
                "training": pa.array(np.ones(len(passes), bool)),
                "rank": pa.array(np.zeros(len(passes), np.int32)),
            }
        )
        write_shards(run, "outputs", table, 1)
    sync = np.arange(TARGET_EVERY, PASSES // PASSES_PER_EPOCH, TARGET_EVERY)
    events = {"epoch": sync, "pass": sync * PASSES_PER_EPOCH - 1, "name": ["target_update"] * len(sync)}
    write_trace(run, events=events, shards=1)


def timed_analysis(run: Path) -> dict[str, float]:
    """Seconds per step of the analysis, with the row counts that prove each step did the work."""
    import normtrace_analysis as na

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    trace = na.load(run)
    times["load"] = time.perf_counter() - t0
    t = time.perf_counter()
    summary = trace.epoch_summary("outputs")
    times["epoch_summary"] = time.perf_counter() - t
    t = time.perf_counter()
    spikes = trace.spikes("outputs")
    times["spikes"] = time.perf_counter() - t
    t = time.perf_counter()
    alignment = trace.event_alignment("target_update")
    times["event_alignment"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    assert summary.height == MODULES * PASSES // PASSES_PER_EPOCH, summary.height
    assert int(summary["count"].sum()) == MODULES * PASSES
    assert alignment.height == MODULES
    print(f"  {summary.height} summary rows, {spikes.height} spikes, {alignment.height} alignment rows")
    return times


def main() -> None:
    """Write (or reuse) the trace, time the analysis, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, help="reuse (or write, if absent) the trace here")
    parser.add_argument("--keep", action="store_true", help="keep the generated trace")
    parser.add_argument("--repeat", type=int, default=1, help="time the analysis this many times")
    args = parser.parse_args()
    tmp = None
    run = args.trace
    if run is None:
        tmp = Path(tempfile.mkdtemp(prefix="normtrace-bench-"))
        run = tmp / "bench"
    if not (run / "meta.json").exists():
        t = time.perf_counter()
        child = multiprocessing.get_context("spawn").Process(target=write_big_trace, args=(run,))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"writing the benchmark trace failed (exit code {child.exitcode})")
        size = sum(p.stat().st_size for p in run.rglob("*.arrow")) / 2**20
        print(
            f"wrote {MODULES * PASSES:,} output rows to {run} ({size:.0f} MiB) in {time.perf_counter() - t:.1f} s"
        )
    try:
        for i in range(args.repeat):
            print(f"run {i + 1}:")
            times = timed_analysis(run)
            print("  " + ", ".join(f"{k} {v:.3f} s" for k, v in times.items()))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        print(f"peak RSS of the analysis process: {peak:.0f} MiB")
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp)
        elif tmp is not None:
            print(f"trace kept in {run}")


if __name__ == "__main__":
    main()
