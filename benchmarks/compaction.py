"""What compaction buys the analysis: a sweep of many small runs and one long run, before and after.

Why: a recorder flushing every few seconds (or at every episode) leaves a run as many small shards, and a
run that is not closed (killed, ``compact=False``, written by an older version) keeps them; ``normtrace
compact`` merges them into few files (``schema.compact``). This script measures what that changes for the
analysis, and what the merge costs. It writes, in the documented format (``tests/tracegen.py``, pyarrow
only):

* **many runs**: ``--runs`` (1,000) small DQN-like runs of 5 modules, each 10 to 40 shards per table
  (one per episode of 40 to 100 passes, as a flush at every ``tick_epoch`` writes them: a few hundred
  output rows per shard), with ``params`` at each tick, a loss per pass, a return per episode and a
  ``target_update`` every 5 episodes, and a ``meta.json`` per run;
* **one long run**: ``benchmarks/analysis.py``'s trace (100 modules, ``--long-rows`` = 10 M output rows)
  in shards of ``--long-shard-passes`` (100) passes, 10,000 rows each, instead of that script's 1,000.

Each set is copied (``before/`` to ``after/``, the same run names) and the copy is merged with ``normtrace compact`` (the command line's own code, its
writer lock included) in a fresh process, timed. Then, in a fresh process per repeat, before and after
alternating: ``load`` of the whole set (``DIR/*`` for the runs) and ``epoch_summary("outputs")``, and
for the long run ``spikes("outputs")`` too. Per step it prints the wall time, the child's CPU time (user +
system: on a shared machine the wall time also measures the neighbours), peak RSS (the analysis alone)
and the load average when it started; per set the file count and bytes on disk (apparent and allocated:
a small file takes a whole block), the medians over repeats and the after/before ratios. The results
after compaction are checked equal to those before (``assert_frame_equal``, exact): the same rows, read
from other files. The page cache is warm (the files were just written); a cold read is not measured.

It is a separate script rather than a mode of ``benchmarks/analysis.py`` because compaction changes the
trace it measures: that script writes (or reuses, ``--trace``) one trace and times the four analyses on
it; this one needs two copies of each set, a timed merge between them and the comparison of results,
and it times a directory of runs, which that script does not. It reuses that script's long trace.

Usage::

    python benchmarks/compaction.py                              # 1,000 runs and 10 M rows, 3 repeats
    python benchmarks/compaction.py --runs 100 --long-rows 1M --repeat 1   # a quick look, ~1 minute
    python benchmarks/compaction.py --long-rows 0 --keep --dir /tmp/compaction   # runs only, kept
"""

from __future__ import annotations

import argparse
import contextlib
import io
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tracegen import default_meta, write_shards  # noqa: E402

from analysis import MODULES, PASSES_PER_EPOCH, _rows, write_big_trace  # noqa: E402

SMALL_MODULES = ("net.0", "net.1", "net.2", "net.3", "net.4")  # Linear, ReLU, Linear, ReLU, Linear
SMALL_PARAMS = [(m, p) for m in ("net.0", "net.2", "net.4") for p in ("weight", "bias")]
SHARDS = (10, 40)  # shards per table of a small run (one per episode), inclusive
EPISODE_PASSES = (40, 100)  # passes per episode, inclusive
TARGET_EVERY = 5  # episodes


def write_small_run(run: Path, seed: int) -> None:
    """One small run as a recorder flushing at every episode's ``tick_epoch`` leaves it: one shard per
    episode in ``outputs``, ``params`` and ``metrics``, one in ``events`` per episode with a sync."""
    rng = np.random.default_rng(seed)
    episodes = int(rng.integers(SHARDS[0], SHARDS[1] + 1))
    lengths = rng.integers(EPISODE_PASSES[0], EPISODE_PASSES[1] + 1, episodes)
    n_mod = len(SMALL_MODULES)
    level = rng.uniform(0.5, 5.0, n_mod)
    numel = np.array([64, 64, 64, 64, 2], np.int64)
    names = pa.array(list(SMALL_MODULES))
    pnames = pa.array([m for m, _ in SMALL_PARAMS])
    pparams = pa.array([p for _, p in SMALL_PARAMS])
    t0, first = 1.7e9 + seed * 1e4, 0
    for epoch, n in enumerate(lengths.tolist()):
        passes = np.arange(first, first + n, dtype=np.int64)
        rows = n * n_mod
        mod = np.tile(np.arange(n_mod, dtype=np.int32), n)
        norm = level[mod] * (1.0 + 0.3 * epoch / episodes) * np.exp(0.05 * rng.standard_normal(rows))
        write_shards(run, "outputs", pa.table({
            "pass": pa.array(np.repeat(passes, n_mod)),
            "epoch": pa.array(np.full(rows, epoch, np.int32)),
            "module": pa.DictionaryArray.from_arrays(pa.array(mod), names).cast(pa.string()),
            "norm": pa.array(norm.astype(np.float32)),
            "numel": pa.array(numel[mod]),
            "batch": pa.array(np.full(rows, 64, np.int32)),
            "grad_enabled": pa.array(np.ones(rows, bool)),
            "training": pa.array(np.ones(rows, bool)),
            "rank": pa.array(np.zeros(rows, np.int32)),
        }), 1)  # fmt: skip
        k = len(SMALL_PARAMS)
        write_shards(run, "params", pa.table({
            "epoch": pa.array(np.full(k, epoch, np.int32)),
            "pass": pa.array(np.full(k, first + n - 1, np.int64)),
            "module": pnames,
            "param": pparams,
            "norm": pa.array(rng.uniform(1, 10, k).astype(np.float32)),
            "numel": pa.array(np.array([256, 64, 4096, 64, 128, 2], np.int64)),
            "rank": pa.array(np.zeros(k, np.int32)),
            "time": pa.array(np.full(k, t0 + first + n)),
        }), 1)  # fmt: skip
        write_shards(run, "metrics", pa.table({
            "epoch": pa.array(np.full(n + 1, epoch, np.int32)),
            "pass": pa.array(np.append(passes, first + n - 1)),
            "name": pa.array(["loss"] * n + ["return"]),
            "value": pa.array(np.append(rng.exponential(0.1, n), float(n))),
            "split": pa.nulls(n + 1, pa.string()),
            "rank": pa.array(np.zeros(n + 1, np.int32)),
            "time": pa.array(t0 + np.append(passes, first + n - 1).astype(float)),
        }), 1)  # fmt: skip
        if epoch and epoch % TARGET_EVERY == 0:
            write_shards(run, "events", pa.table({
                "epoch": pa.array([epoch], pa.int32()),
                "pass": pa.array([first - 1], pa.int64()),
                "name": pa.array(["target_update"]),
                "rank": pa.array([0], pa.int32()),
                "time": pa.array([t0 + first]),
            }), 1)  # fmt: skip
        first += n
    meta = default_meta(run.name)
    meta["modules"] = {"outputs": list(SMALL_MODULES), "params": sorted({m for m, _ in SMALL_PARAMS})}
    meta["flush"] = {"every_passes": 1000, "every_secs": 10.0}
    meta.update(epochs=episodes, passes=first, steps=first)
    (run / "meta.json").write_text(json.dumps(meta))


def write_many(root: Path, n_runs: int) -> None:
    for i in range(n_runs):
        write_small_run(root / f"run{i:04d}", seed=i)


def write_long(root: Path, rows: int, passes_per_shard: int) -> None:
    write_big_trace(root / "long", rows, passes_per_shard=passes_per_shard)


def _usage() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**10


def timed_compact(pattern: str, out: str) -> None:
    """In a fresh process: ``normtrace compact PATTERN`` (its printed lines dropped), timed."""
    load_avg = os.getloadavg()[0]
    from normtrace_analysis.cli import main as cli

    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli(["compact", pattern])
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    assert code == 0, code
    record = {"wall": wall, "user": usage.ru_utime - usage0.ru_utime, "sys": usage.ru_stime - usage0.ru_stime}
    record.update(rss=usage.ru_maxrss / 2**10, load=load_avg)
    Path(out).write_text(json.dumps(record))


def timed_analysis(pattern: str, steps: list[str], out: str) -> None:
    """In a fresh process: load ``pattern`` and run ``steps`` on outputs; times to ``out`` (JSON), each
    step's result beside it (``out``.<step>.arrow) for the comparison."""
    load_avg = os.getloadavg()[0]
    import normtrace_analysis as na

    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    t0, c0 = time.perf_counter(), _usage()[0]
    trace = na.load(pattern)
    wall["load"], cpu["load"] = time.perf_counter() - t0, _usage()[0] - c0
    for step in steps:
        t, c = time.perf_counter(), _usage()[0]
        result = getattr(trace, step)("outputs")
        wall[step], cpu[step] = time.perf_counter() - t, _usage()[0] - c
        result.write_ipc(f"{out}.{step}.arrow")
    wall["total"], cpu["total"] = sum(wall.values()), sum(cpu.values())  # not the writes of results
    record = {"wall": wall, "cpu": cpu, "rss": _usage()[1], "load": load_avg}
    Path(out).write_text(json.dumps(record))


def _child(ctx: multiprocessing.context.SpawnContext, target, *args) -> None:  # noqa: ANN001
    child = ctx.Process(target=target, args=args)
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"{target.__name__} failed (exit code {child.exitcode})")


def disk(root: Path) -> tuple[int, int, int]:
    """Shard files, their bytes and the bytes allocated to them (blocks) under ``root``."""
    files = apparent = allocated = 0
    for path in root.rglob("*.arrow"):
        st = path.stat()
        files += 1
        apparent += st.st_size
        allocated += st.st_blocks * 512
    return files, apparent, allocated


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def bench_set(ctx, name: str, before: Path, pattern: str, steps: list[str], repeat: int) -> None:  # noqa: ANN001
    """Copy ``before``, compact the copy (timed), analyse both alternately, compare the results, print."""
    after = before.parents[1] / "after" / before.name  # the same names: run names come from folders
    t = time.perf_counter()
    shutil.copytree(before, after)
    print(f"[{name}] copied in {time.perf_counter() - t:.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/compact.json"
        _child(ctx, timed_compact, str(after / pattern) if pattern else str(after), out)
        compaction = json.loads(Path(out).read_text())
    files_b, size_b, alloc_b = disk(before)
    files_a, size_a, alloc_a = disk(after)
    print(f"[{name}] before: {files_b:,} shard files, {_mib(size_b)} ({_mib(alloc_b)} allocated); "
          f"after: {files_a:,} files, {_mib(size_a)} ({_mib(alloc_a)} allocated)")  # fmt: skip
    print(f"[{name}] normtrace compact (load average {compaction['load']:.2f}): {compaction['wall']:.2f} s wall, "
          f"CPU {compaction['user']:.2f} s user + {compaction['sys']:.2f} s system, peak RSS {compaction['rss']:.0f} MiB")  # fmt: skip
    records: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeat):
            for state, root in (("before", before), ("after", after)) if i % 2 == 0 else (
                ("after", after), ("before", before)):  # fmt: skip
                out = f"{tmp}/{state}{i}.json"
                _child(ctx, timed_analysis, str(root / pattern) if pattern else str(root), steps, out)
                record = json.loads(Path(out).read_text())
                records[state].append(record)
                steps_ = ", ".join(
                    f"{k} {v:.2f} s (CPU {record['cpu'][k]:.2f})" for k, v in record["wall"].items()
                )
                print(f"[{name}] {state:6} {i + 1} (load average {record['load']:.2f}): {steps_}; "
                      f"peak RSS {record['rss']:.0f} MiB")  # fmt: skip
        _compare(tmp, steps, repeat)
    print(f"[{name}] results after compaction equal those before ({', '.join(steps)}, every repeat)")
    medians: dict[str, dict[str, tuple[float, float]]] = {}
    for state, recs in records.items():
        medians[state] = {
            k: (statistics.median(r["wall"][k] for r in recs), statistics.median(r["cpu"][k] for r in recs))
            for k in recs[0]["wall"]
        }
    rss = {state: max(r["rss"] for r in recs) for state, recs in records.items()}
    loads = [r["load"] for recs in records.values() for r in recs]
    print(f"[{name}] median of {repeat} (load average {min(loads):.2f}-{max(loads):.2f}): before -> after")
    for key, (wall_b, cpu_b) in medians["before"].items():
        wall_a, cpu_a = medians["after"][key]
        print(f"    {key:14} wall {wall_b:7.2f} s -> {wall_a:7.2f} s (x{wall_a / wall_b:.2f}), "
              f"CPU {cpu_b:7.2f} s -> {cpu_a:7.2f} s (x{cpu_a / cpu_b:.2f})")  # fmt: skip
    print(f"    {'peak RSS':14} {rss['before']:.0f} MiB -> {rss['after']:.0f} MiB (largest of the repeats)")


def _compare(tmp: str, steps: list[str], repeat: int) -> None:
    import polars as pl
    from polars.testing import assert_frame_equal

    for step in steps:
        reference = pl.read_ipc(f"{tmp}/before0.json.{step}.arrow")
        for state in ("before", "after"):
            for i in range(repeat):
                assert_frame_equal(pl.read_ipc(f"{tmp}/{state}{i}.json.{step}.arrow"), reference)


def main() -> None:
    """Write both sets, compact copies, time the analysis before and after, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="small runs in the directory (0: none)")
    parser.add_argument("--long-rows", default="10M", help="output rows of the long run (0: none)")
    parser.add_argument("--long-shard-passes", type=int, default=100, help="passes per shard of the long run")
    parser.add_argument("--repeat", type=int, default=3, help="analyses of each state (fresh processes)")
    parser.add_argument("--dir", type=Path, help="write here (must not exist) instead of a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the written runs")
    args = parser.parse_args()
    long_rows = _rows(args.long_rows) if args.long_rows != "0" else 0
    if long_rows % (MODULES * args.long_shard_passes):
        raise SystemExit(f"--long-rows must be a multiple of {MODULES * args.long_shard_passes:,}")
    if long_rows > 50_000_000:
        raise SystemExit("--long-rows above 50M: use benchmarks/analysis.py for the largest traces")
    if args.dir is not None and args.dir.exists():
        raise SystemExit(f"{args.dir} exists: name a new folder")
    root = args.dir or Path(tempfile.mkdtemp(prefix="normtrace-compaction-"))
    root.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    print(f"load average at start {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs; writing under {root}")
    try:
        if args.runs:
            t = time.perf_counter()
            _child(ctx, write_many, root / "before" / "runs", args.runs)
            print(f"[runs] wrote {args.runs:,} runs in {time.perf_counter() - t:.1f} s")
            bench_set(ctx, "runs", root / "before" / "runs", "*", ["epoch_summary"], args.repeat)
        if long_rows:
            t = time.perf_counter()
            _child(ctx, write_long, root / "before", long_rows, args.long_shard_passes)
            print(f"[long] wrote {long_rows:,} output rows ({long_rows // PASSES_PER_EPOCH:,} epoch rows "
                  f"of summary) in {time.perf_counter() - t:.1f} s")  # fmt: skip
            bench_set(ctx, "long", root / "before" / "long", "", ["epoch_summary", "spikes"], args.repeat)
    finally:
        if args.keep:
            print(f"runs kept in {root}")
        else:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
