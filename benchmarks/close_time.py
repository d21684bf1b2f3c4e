"""How long ``Recorder.close()`` takes as a run grows: issue 16 asked why it grew with the records.

What ``close()`` does: it hands the last flush's records to the writer, which converts and writes them,
and merges each table's shards into files of about a million rows (``schema.compact``, unless
``compact=False``). The first part grows with the records since the last flush (at most ``flush_every``
passes of every observed module); the merge, when it ran only at close, grew with the whole run. The
writer now merges as the run goes on, so close() merges at most the last one to two million rows of a
table.

Each run: a model of ``--modules`` blocks ``Linear(16, 16) + Identity`` with ``OutputNorm`` on the
Identities (one output row per block and pass), ``--passes`` forward passes (batch 8, one torch thread),
then ``close()`` timed (wall and this process's CPU, writer thread included), in a fresh process per run
so that one run's allocations do not slow the next.

    python benchmarks/close_time.py                                  # 100 modules, 0.2 to 10 M rows
    python benchmarks/close_time.py --modules 50 800 --passes 2000   # the final flush's share
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one(modules: int, passes: int, compact: bool) -> dict[str, float]:
    """Record ``passes`` passes of ``modules`` observed blocks, close, and time the close."""
    import torch
    from torch import nn

    import normtrace as nt

    torch.set_num_threads(1)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.Identity()) for _ in range(modules)])
    x = torch.randn(8, 16)
    workdir = Path(tempfile.mkdtemp(prefix="normtrace-close-"))
    try:
        rec = nt.Recorder(workdir / "run", [nt.OutputNorm(include=[nn.Identity])], compact=compact)
        rec.attach(model)
        start = time.perf_counter()
        for _ in range(passes):
            model(x)
        train = time.perf_counter() - start
        wall, cpu = time.perf_counter(), time.process_time()
        rec.close()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        files = sum(1 for _ in (workdir / "run" / "outputs").glob("*.arrow"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"close_ms": wall * 1e3, "close_cpu_ms": cpu * 1e3, "files": files, "train_s": train}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--modules", type=int, nargs="+", default=[100], help="observed modules (default 100)")
    p.add_argument("--passes", type=int, nargs="+", default=[2_000, 10_000, 40_000, 100_000])
    p.add_argument("--repeat", type=int, default=3, help="fresh processes per configuration (median)")
    p.add_argument("--one", nargs=3, metavar=("MODULES", "PASSES", "COMPACT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), int(args.one[1]), args.one[2] == "1")))
        return
    print("modules  passes  output rows  compact  close() ms (median; all)  CPU ms  files")
    for modules in args.modules:
        for passes in args.passes:
            for compact in (False, True):
                runs = []
                for _ in range(args.repeat):
                    out = subprocess.run(
                        [sys.executable, __file__, "--one", str(modules), str(passes), str(int(compact))],
                        check=True,
                        capture_output=True,
                        text=True,
                    ).stdout
                    runs.append(json.loads(out.strip().splitlines()[-1]))
                runs.sort(key=lambda r: r["close_ms"])
                mid = runs[len(runs) // 2]
                every = ", ".join(f"{r['close_ms']:.0f}" for r in runs)
                print(
                    f"{modules:7d}  {passes:6d}  {modules * passes / 1e6:9.2f} M  {str(compact):>7}  "
                    f"{mid['close_ms']:8.0f} ({every})  {mid['close_cpu_ms']:6.0f}  {mid['files']:5d}"
                )


if __name__ == "__main__":
    main()
