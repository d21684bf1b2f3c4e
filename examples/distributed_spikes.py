"""normtrace's per-module spike detection on a Dask cluster, over a Parquet export of many runs.

For a team whose runs outgrow one machine (docs/scaling.md): export the outputs of every run once,

    normtrace export 's3://bucket/runs/*' --table outputs --format parquet -o s3://… (or a local DIR)

then run the detector where the data is, one series at a time:

    python examples/distributed_spikes.py DIR --workers 4             # a LocalCluster on this machine
    python examples/distributed_spikes.py DIR --scheduler tcp://host:8786 --csv spikes.csv

The detector is the one ``normtrace_analysis.spikes`` documents (a Hampel filter: centred rolling median
of ``window`` points as the baseline, a rolling MAD over four windows at block resolution as the scale
(the root mean square deviation where that MAD is 0; a series too short for it, its blocks' median MAD),
NaN/±Inf always spikes, consecutive flags merged at their peak), written here per series with numpy and
pandas so that any engine that can apply a pandas function per group runs it: Dask's
``groupby(...).apply``, Spark's ``groupBy(...).applyInPandas``, or a plain loop.
``tests/integrations/test_distributed.py`` checks that it finds exactly the spikes ``trace.spikes()``
finds. Two ways to distribute it:

- ``by="series"``: ``ddf.groupby(series keys).apply(detect_series)`` — works whatever the files hold,
  at the price of a shuffle that gathers each series;
- ``by="run"`` (default): one task per run's file (``dd.from_map``), each detecting every series of
  its run — no shuffle, since the export keeps a run in one file.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

THRESHOLD = 6.0
WINDOW = {"pass": 51, "epoch": 11}
SCALE_SPAN = 4
MAD_TO_SIGMA = 1.4826
SCALE_FLOOR = 1e-4
KEYS = ["run", "rank", "module", "split"]
COLUMNS = {"pass": "int64", "epoch": "int32", "value": "float64", "baseline": "float64", "score": "float64",
           "points": "int64"}  # fmt: skip


def _centred_median(x: np.ndarray, window: int) -> np.ndarray:
    """Centred rolling median needing half a window of non-NaN values; the end (and any gap) carries the
    last median forward, as ``normtrace_analysis.spikes._centred_median`` does."""
    half = window // 2
    trailing = pd.Series(x).rolling(window, min_periods=half + 1).median()
    return trailing.shift(-half).ffill().to_numpy()


def detect_series(values: np.ndarray, positions: np.ndarray, epochs: np.ndarray, *, threshold: float = THRESHOLD,
                  window: int = WINDOW["pass"]) -> pd.DataFrame:  # fmt: skip
    """Spikes of one series (points in time order): position (pass or epoch), epoch, value, baseline,
    score, points — one row per run of consecutive flagged points, at its largest ``|score|``."""
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    baseline = _centred_median(np.where(finite, v, np.nan), window)
    absdev = np.where(finite, np.abs(v - baseline), np.nan)
    block = max(1, window // 4)
    blocks = np.arange(len(v)) // block
    block_mad = pd.Series(absdev).groupby(blocks).median().to_numpy()
    span = max(3, (SCALE_SPAN * window // block) | 1)
    if len(block_mad) > span // 2:
        mad = _centred_median(block_mad, span)[blocks]
    else:  # too few blocks for a rolling MAD: the median of all the blocks' MADs
        mad = np.full(len(v), pd.Series(block_mad).median())
    # where the MAD is 0 (most points exactly on the baseline: quantised values, a flat stretch), the root
    # mean square deviation over the same span of blocks (the window cut at the series' ends)
    known = ~np.isnan(absdev)
    squares = np.pad(np.bincount(blocks, weights=np.where(known, absdev, 0) ** 2), span // 2)
    counts = np.pad(np.bincount(blocks, weights=known), span // 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        rms = np.sqrt(sliding_window_view(squares, span).sum(1) / sliding_window_view(counts, span).sum(1))
    sigma = np.where(mad == 0, rms[blocks], MAD_TO_SIGMA * mad)
    scale = np.fmax(np.fmax(sigma, SCALE_FLOOR * np.abs(baseline)), 1e-300)
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(finite, (v - baseline) / scale, np.where(v < 0, -math.inf, math.inf))
        flag = ~finite | (np.abs(score) > threshold)
    starts = np.flatnonzero(flag & ~np.concatenate([[False], flag[:-1]]))
    rows = []
    for start in starts:
        end = start
        while end + 1 < len(flag) and flag[end + 1]:
            end += 1
        peak = start + int(np.argmax(np.abs(score[start : end + 1])))
        rows.append((positions[peak], epochs[peak], v[peak], baseline[peak], score[peak], end - start + 1))
    return pd.DataFrame(rows, columns=["pass", "epoch", "value", "baseline", "score", "points"]).astype(
        COLUMNS
    )


def detect_frame(df: pd.DataFrame, *, level: str = "pass", threshold: float = THRESHOLD,
                 window: int | None = None) -> pd.DataFrame:  # fmt: skip
    """Spikes of every series in ``df`` (columns: the series keys, pass, epoch, value) — what a Dask or
    Spark task applies to its group or partition. Level "epoch" works on per-epoch means."""
    window = WINDOW[level] if window is None else window
    out = []
    for key, group in df.groupby(KEYS, sort=True, observed=True):
        group = group.sort_values("pass", kind="stable")
        if level == "pass":
            found = detect_series(group["value"].to_numpy(), group["pass"].to_numpy(), group["epoch"].to_numpy(),
                                  threshold=threshold, window=window)  # fmt: skip
        else:  # the epoch mean (NaN when any value is NaN, as in normtrace_analysis)
            means = group.groupby("epoch", sort=True)["value"].agg(lambda s: s.to_numpy().mean())
            epochs = means.index.to_numpy()
            found = detect_series(means.to_numpy(), epochs, epochs, threshold=threshold, window=window)
            found = found.drop(columns="pass")
        for name, value in zip(KEYS, key, strict=True):
            found[name] = value
        out.append(found)
    columns = [*KEYS, *(["pass"] if level == "pass" else []), "epoch", "value", "baseline", "score", "points"]
    if not out:
        return pd.DataFrame({c: pd.Series(dtype=COLUMNS.get(c, "object")) for c in columns})
    return pd.concat(out, ignore_index=True)[columns]


def _meta(level: str) -> pd.DataFrame:
    columns = {"run": "object", "rank": "int32", "module": "object", "split": "object",
               **({"pass": "int64"} if level == "pass" else {}), **{k: v for k, v in COLUMNS.items() if k != "pass"}}  # fmt: skip
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in columns.items()})


def _series_task(group: pd.DataFrame, **options: Any) -> pd.DataFrame:
    """One series as ``groupby(...).apply`` hands it over: pandas leaves the keys out, in ``.name``."""
    return detect_frame(group.assign(**dict(zip(KEYS, group.name, strict=True))), **options)


def _read_run(path: str, run: str, storage_options: dict[str, Any] | None) -> pd.DataFrame:
    df = pd.read_parquet(path, columns=["rank", "module", "split", "pass", "epoch", "value"],
                         storage_options=storage_options)  # fmt: skip
    df.insert(0, "run", run)
    return df


def dask_spikes(dataset: str, *, by: str = "run", level: str = "pass", threshold: float = THRESHOLD,
                window: int | None = None, storage_options: dict[str, Any] | None = None) -> Any:  # fmt: skip
    """A Dask DataFrame of the spikes of every series in ``dataset`` (``normtrace export --format
    parquet``'s folder, local or ``s3://``); ``.compute()`` runs it on the active Dask client."""
    import dask.dataframe as dd

    options = {"level": level, "threshold": threshold, "window": window}
    if by == "series":
        ddf = dd.read_parquet(dataset, columns=["run", *KEYS[1:], "pass", "epoch", "value"],
                              storage_options=storage_options)  # fmt: skip
        ddf = ddf.astype({"run": "object"})  # the partition column comes back categorical
        return ddf.groupby(KEYS).apply(_series_task, meta=_meta(level), **options)
    if by != "run":
        raise ValueError(f"by must be 'run' or 'series', not {by!r}")
    files = _run_files(dataset, storage_options)

    def run_task(item: tuple[str, str]) -> pd.DataFrame:
        return detect_frame(_read_run(item[0], item[1], storage_options), **options)

    return dd.from_map(run_task, files, meta=_meta(level), enforce_metadata=False)


def _run_files(dataset: str, storage_options: dict[str, Any] | None) -> list[tuple[str, str]]:
    """``(file, run name)`` for every ``run=<name>/*.parquet`` of the dataset (names percent-decoded)."""
    import urllib.parse

    import fsspec

    fs, root = fsspec.core.url_to_fs(dataset, **(storage_options or {}))
    prefix = dataset.split("://")[0] + "://" if "://" in dataset else ""
    found = []
    for path in sorted(fs.glob(f"{root.rstrip('/')}/run=*/*.parquet")):
        run = urllib.parse.unquote(path.rstrip("/").split("/")[-2].removeprefix("run="))
        found.append((prefix + path if prefix else path, run))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "dataset", help="folder written by `normtrace export --table outputs --format parquet -o`"
    )
    parser.add_argument("--scheduler", help="address of a running Dask scheduler (default: a LocalCluster)")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    parser.add_argument("--by", choices=["run", "series"], default="run")
    parser.add_argument("--level", choices=["pass", "epoch"], default="pass")
    parser.add_argument("--threshold", type=float, default=THRESHOLD)
    parser.add_argument("--csv", type=Path, help="write the spikes here")
    args = parser.parse_args(argv)

    from dask.distributed import Client, LocalCluster

    cluster = None if args.scheduler else LocalCluster(n_workers=args.workers, threads_per_worker=1)
    with Client(args.scheduler or cluster) as client:
        start = time.perf_counter()
        found = dask_spikes(args.dataset, by=args.by, level=args.level, threshold=args.threshold).compute()
        took = time.perf_counter() - start
        print(f"{len(found)} spikes in {took:.1f} s on {len(client.scheduler_info()['workers'])} workers")
    if cluster is not None:
        cluster.close()
    if args.csv:
        found.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
