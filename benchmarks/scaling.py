"""Many runs: Polars on one machine against Dask over the Parquet export (docs/scaling.md's figures).

Writes ``--runs`` synthetic runs (``--modules`` modules x ``--passes`` passes each, DQN-like norms with
planted spikes, see tests/tracegen.py), then times

1. ``na.load(DIR/*)`` and ``trace.spikes()`` (Polars, all cores of this machine);
2. ``normtrace export DIR/* --format parquet`` (``na.to_parquet``);
3. ``examples/distributed_spikes.py``'s ``dask_spikes`` on a ``LocalCluster`` of ``--workers`` processes,

and checks that 1 and 3 found the same spikes. Usage:

    python benchmarks/scaling.py --runs 200 --modules 20 --passes 10000 [--dir /tmp/scaling] [--keep]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]

import normtrace_analysis as na  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from tracegen import synthetic_dqn, write_trace  # noqa: E402


def write_runs(root: Path, runs: int, modules: int, passes: int) -> None:
    names = tuple(f"net.{2 * i}" for i in range(modules))
    epochs = max(1, passes // 100)
    for r in range(runs):
        s = synthetic_dqn(
            modules=names, n_epochs=epochs, passes_per_epoch=passes // epochs, seed=r, n_spikes=5
        )
        write_trace(root / f"run{r:04d}", outputs=s.outputs, events=s.events, shards=4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--modules", type=int, default=20)
    parser.add_argument("--passes", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", type=Path, help="where to write the runs (reused if it holds them)")
    parser.add_argument("--keep", action="store_true", help="keep the runs and the export")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="normtrace-scaling-"))
    runs_dir, export = root / "runs", root / "export"
    rows = args.runs * args.modules * args.passes
    if not (runs_dir.is_dir() and len(list(runs_dir.iterdir())) == args.runs):
        shutil.rmtree(runs_dir, ignore_errors=True)
        start = time.perf_counter()
        write_runs(runs_dir, args.runs, args.modules, args.passes)
        print(f"wrote {args.runs} runs, {rows:,} output rows in {time.perf_counter() - start:.1f} s")
    size = sum(p.stat().st_size for p in runs_dir.rglob("*.arrow")) / 2**20
    print(
        f"{args.runs} runs x {args.modules} modules x {args.passes:,} passes = {rows:,} rows, {size:.0f} MiB of shards"
    )

    start = time.perf_counter()
    trace = na.load(runs_dir / "*")
    loaded = time.perf_counter() - start
    found = trace.spikes()
    polars_s = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(
        f"polars: load {loaded:.1f} s, load + spikes {polars_s:.1f} s, {found.height} spikes, peak RSS {rss:.0f} MiB"
    )

    start = time.perf_counter()
    na.to_parquet(trace, export, table="outputs", overwrite=True)
    size = sum(p.stat().st_size for p in export.rglob("*.parquet")) / 2**20
    print(f"export: {time.perf_counter() - start:.1f} s, {size:.0f} MiB of Parquet")
    del trace

    from dask.distributed import Client, LocalCluster
    from distributed_spikes import dask_spikes

    with (
        LocalCluster(n_workers=args.workers, threads_per_worker=1, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        start = time.perf_counter()
        got = dask_spikes(str(export), by="run").compute()
        dask_s = time.perf_counter() - start
    print(f"dask ({args.workers} worker processes, one task per run): {dask_s:.1f} s, {len(got)} spikes")
    same = (
        pl.from_pandas(got, nan_to_null=False)
        .select("run", "module", "split", "pass", "points")
        .sort(pl.all())
    )
    want = found.select("run", "module", "split", "pass", "points").sort(pl.all())
    print(f"same spikes as trace.spikes(): {same.equals(want.cast(same.schema))}")
    if not args.keep and args.dir is None:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
