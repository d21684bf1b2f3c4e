"""Speed and memory of normtrace_analysis on large synthetic traces: load, epoch_summary, spikes, alignment.

Why: the analysis promises that a long run is summarised and searched for spikes in seconds, in memory
that does not grow with the run. This script writes, in the documented format (tests/tracegen.py,
pyarrow only), 100 modules x N passes of ``outputs`` rows in LZ4 shards of 1,000 passes (as a recorder
flushing every 1,000 passes would), epochs of 200 passes, a ``target_update`` event every 5 epochs and a
few planted spikes; then analyses it in a fresh child process per repeat and prints, per step:

* ``load``: list the shards, open every footer, build the lazy frames;
* ``epoch_summary("outputs")``: every (module, epoch) of 200 rows;
* ``spikes("outputs")``: the rolling median/MAD detector over 100 series;
* ``event_alignment("target_update")``: clusters, the jitter test and its placebo;

then the total, the child's peak RSS (``getrusage`` in the child: the analysis alone, not the writer),
its CPU time (user + system; on a shared machine the wall time also measures the neighbours), the load
average when it started, and the trace's bytes per row on disk. ``--order report`` asks for spikes first,
as the report and the command line do (the spike scan then computes the summary on the side).

Usage::

    python benchmarks/analysis.py                          # 10 M rows in a temporary folder
    python benchmarks/analysis.py --rows 30M --trace /tmp/bench30 --repeat 3
    python benchmarks/analysis.py --rows 100M --allow-100m --trace /tmp/bench100   # ~1 GB of disk
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tracegen import write_shards, write_trace  # noqa: E402

MODULES = 100
PASSES_PER_EPOCH = 200
PASSES_PER_SHARD = 1_000
TARGET_EVERY = 5  # epochs
SIZES = {"10M": 10_000_000, "30M": 30_000_000, "100M": 100_000_000}
STEPS = {
    "summary": ("epoch_summary", "spikes", "event_alignment"),
    "report": ("spikes", "event_alignment", "epoch_summary"),
}


def write_big_trace(run: Path, rows: int, seed: int = 0, passes_per_shard: int = PASSES_PER_SHARD) -> None:
    """The benchmark trace, shard by shard, so that writing holds one shard's worth (``passes_per_shard``
    passes of every module each; ``benchmarks/compaction.py`` writes it in smaller shards)."""
    rng = np.random.default_rng(seed)
    passes_total = rows // MODULES
    names = pa.array([f"net.layers.{i}.act" for i in range(MODULES)])
    numel = (2 ** rng.integers(2, 9, MODULES)).astype(np.int64)
    level = rng.uniform(0.5, 5.0, MODULES)
    for shard in range(passes_total // passes_per_shard):
        passes = np.repeat(np.arange(shard * passes_per_shard, (shard + 1) * passes_per_shard), MODULES)
        mod = np.tile(np.arange(MODULES, dtype=np.int32), passes_per_shard)
        trend = 1.0 + 0.5 * passes / passes_total
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
    sync = np.arange(TARGET_EVERY, passes_total // PASSES_PER_EPOCH, TARGET_EVERY)
    events = {"epoch": sync, "pass": sync * PASSES_PER_EPOCH - 1, "name": ["target_update"] * len(sync)}
    write_trace(run, events=events, shards=1)


def timed_analysis(run: str, rows: int, order: str, out: str) -> None:
    """In a fresh process: seconds per step, CPU time and peak RSS, written to ``out`` as JSON."""
    load_avg = os.getloadavg()[0]
    import normtrace_analysis as na

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = usage.ru_utime + usage.ru_stime
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    trace = na.load(run)
    times["load"] = time.perf_counter() - t0
    results = {}
    for step in STEPS[order]:
        t = time.perf_counter()
        if step == "event_alignment":
            results[step] = trace.event_alignment("target_update")
        else:
            results[step] = getattr(trace, step)("outputs")
        times[step] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    summary = results["epoch_summary"]
    assert summary.height == rows // PASSES_PER_EPOCH, summary.height
    assert int(summary["count"].sum()) == rows
    assert results["event_alignment"].height == MODULES
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = {
        "times": times,
        "cpu": usage.ru_utime + usage.ru_stime - cpu0,
        "peak_rss_mib": usage.ru_maxrss / 2**10,
        "load": load_avg,
        "spikes": results["spikes"].height,
    }
    Path(out).write_text(json.dumps(record))


def _rows_in(run: Path) -> int:
    """Output rows of a trace written earlier (from the shards' metadata)."""
    import polars as pl

    files = [str(p) for p in sorted((run / "outputs").glob("*.arrow"))]
    return int(pl.scan_ipc(files, glob=False).select(pl.len()).collect().item()) if files else 0


def _rows(text: str) -> int:
    if text.upper() in SIZES:
        return SIZES[text.upper()]
    return int(float(text.upper().removesuffix("M")) * 1e6) if text.upper().endswith("M") else int(text)


def main() -> None:
    """Write (or reuse) the trace, time the analysis in child processes, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10M", help="output rows: 10M, 30M or 100M (default 10M)")
    parser.add_argument("--allow-100m", action="store_true", help="needed for 100M: ~1 GB of disk, minutes")
    parser.add_argument("--trace", type=Path, help="reuse (or write, if absent) the trace here")
    parser.add_argument("--keep", action="store_true", help="keep the generated trace")
    parser.add_argument("--repeat", type=int, default=1, help="analyse it this many times (fresh processes)")
    parser.add_argument(
        "--order", choices=sorted(STEPS), default="summary", help="summary first (default) or spikes first"
    )
    args = parser.parse_args()
    rows = _rows(args.rows)
    if rows % (MODULES * PASSES_PER_SHARD):
        raise SystemExit(f"--rows must be a multiple of {MODULES * PASSES_PER_SHARD:,}")
    if rows > 50_000_000 and not args.allow_100m:
        raise SystemExit(
            "more than 50M rows writes about 1 GB per 100M rows and takes minutes: add --allow-100m"
        )
    tmp = None
    run = args.trace
    if run is None:
        tmp = Path(tempfile.mkdtemp(prefix="normtrace-bench-"))
        run = tmp / "bench"
    ctx = multiprocessing.get_context("spawn")
    if (run / "meta.json").exists() and _rows_in(run) != rows:
        raise SystemExit(f"{run} holds a trace of {_rows_in(run):,} rows: pass another --trace")
    if not (run / "meta.json").exists():
        t = time.perf_counter()
        child = ctx.Process(target=write_big_trace, args=(run, rows))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"writing the benchmark trace failed (exit code {child.exitcode})")
        print(f"wrote {rows:,} output rows to {run} in {time.perf_counter() - t:.1f} s")
    size = sum(p.stat().st_size for p in (run / "outputs").glob("*.arrow"))
    print(f"{rows:,} rows, {len(list((run / 'outputs').glob('*.arrow')))} shards, {size / 2**20:.0f} MiB: "
          f"{size / rows:.2f} bytes per row on disk")  # fmt: skip
    records = []
    try:
        for i in range(args.repeat):
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                child = ctx.Process(target=timed_analysis, args=(str(run), rows, args.order, out.name))
                child.start()
                child.join()
                if child.exitcode != 0:
                    raise SystemExit(f"the analysis failed (exit code {child.exitcode})")
                record = json.loads(Path(out.name).read_text())
            records.append(record)
            steps = ", ".join(f"{k} {v:.2f} s" for k, v in record["times"].items())
            print(
                f"run {i + 1} (load {record['load']:.1f}): {steps}; CPU {record['cpu']:.2f} s, "
                f"peak RSS {record['peak_rss_mib']:.0f} MiB, {record['spikes']} spikes"
            )
        if len(records) > 1:
            total = statistics.median(r["times"]["total"] for r in records)
            cpu = statistics.median(r["cpu"] for r in records)
            rss = max(r["peak_rss_mib"] for r in records)
            loads = [r["load"] for r in records]
            print(
                f"median of {len(records)}: total {total:.2f} s, CPU {cpu:.2f} s; largest peak RSS {rss:.0f} MiB; "
                f"load {min(loads):.1f}-{max(loads):.1f}"
            )
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp)
        elif tmp is not None:
            print(f"trace kept in {run}")


if __name__ == "__main__":
    main()
