"""Write synthetic normtrace run directories in the documented format (docs/trace-format.md), pyarrow only.

``write_trace(run_dir, outputs={...}, events={...})`` takes columns as arrays (numpy, lists or pyarrow),
fills the optional ones, splits each table into several shards and writes ``meta.json``.
``synthetic_dqn(...)`` builds DQN-like output norms with planted spikes and target-network syncs whose
ground truth is known, for detector and report tests.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc


def _load_trace_schema() -> ModuleType:
    """``normtrace/schema.py``, the format's one definition, loaded by path: it needs only pyarrow, while
    ``import normtrace`` would import torch (and inflate the analysis benchmark's memory figure)."""
    path = Path(__file__).resolve().parents[1] / "normtrace" / "schema.py"
    spec = importlib.util.spec_from_file_location("_normtrace_trace_schema", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_schema = _load_trace_schema()
SCHEMA_VERSION: int = _schema.SCHEMA_VERSION
SCHEMAS: dict[str, pa.Schema] = dict(_schema.TABLES)


Columns = Mapping[str, Any]


def write_trace(
    run_dir: str | Path,
    *,
    outputs: Columns | pa.Table | None = None,
    params: Columns | pa.Table | None = None,
    metrics: Columns | pa.Table | None = None,
    events: Columns | pa.Table | None = None,
    signals: Columns | pa.Table | None = None,
    shards: int | Mapping[str, int] = 3,
    rank: int = 0,
    normalize: bool | Mapping[str, bool] = False,
    meta: Mapping[str, Any] | None = None,
    write_meta: bool = True,
) -> Path:
    """Write one rank's tables as LZ4 Arrow IPC shards ``RUN/<table>/rank{r}-{seq:06d}.arrow`` plus its meta.

    Columns the doc marks as per-row bookkeeping may be left out: ``rank`` (= ``rank``), ``time``,
    ``numel``/``batch`` (1), ``grad_enabled`` (True), ``training`` (= grad_enabled), metrics ``split``
    (null), signals ``param`` (null: module-level) and ``step`` (= ``pass``). Columns not in the format are written too (the format allows extra columns). A table given
    as None or with no rows gets no shards. ``shards`` (per table or for all) is the number of contiguous
    row chunks. Call again with ``rank=1`` etc. to add ranks; rank r > 0 writes ``meta.rank{r}.json``.
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tables = {"outputs": outputs, "params": params, "metrics": metrics, "events": events, "signals": signals}
    for name, cols in tables.items():
        if cols is None:
            continue
        table = cols if isinstance(cols, pa.Table) else _to_table(name, cols, rank)
        n_shards = shards.get(name, 3) if isinstance(shards, Mapping) else shards
        write_shards(run, name, table, n_shards, rank)
    if write_meta:
        norm = normalize if isinstance(normalize, Mapping) else {"outputs": normalize, "params": normalize}
        doc = default_meta(run.name, rank=rank, normalize=dict(norm))
        doc.update(meta or {})
        (run / ("meta.json" if rank == 0 else f"meta.rank{rank}.json")).write_text(json.dumps(doc))
    return run


def write_shards(run: Path, table_name: str, table: pa.Table, n_shards: int, rank: int = 0) -> list[Path]:
    """Split ``table`` into ``n_shards`` contiguous chunks and write each as a complete shard file."""
    if table.num_rows == 0:
        return []
    folder = run / table_name
    folder.mkdir(parents=True, exist_ok=True)
    existing = len(list(folder.glob(f"rank{rank}-*.arrow")))
    bounds = np.linspace(0, table.num_rows, min(n_shards, table.num_rows) + 1).astype(int)
    paths = []
    options = ipc.IpcWriteOptions(compression="lz4")
    for seq, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True), start=existing + 1):
        path = folder / f"rank{rank}-{seq:06d}.arrow"
        with ipc.new_file(str(path), table.schema, options=options) as writer:
            writer.write_table(table.slice(lo, hi - lo), max_chunksize=65536)
        paths.append(path)
    return paths


def default_meta(run_name: str, *, rank: int = 0, normalize: Mapping[str, bool] | None = None) -> dict:
    """A complete, plausible ``meta.json`` document for schema version 1."""
    return {
        "schema_version": SCHEMA_VERSION,
        "normtrace_version": "0.1.0",
        "torch_version": "2.13.0",
        "python_version": "3.11.0",
        "run_name": run_name,
        "start_time": "2026-11-25T00:00:00Z",
        "end_time": "2026-11-25T01:00:00Z",
        "status": "closed",
        "rank": rank,
        "world_size": 1,
        "hostname": "synthetic",
        "pid": 1,
        "lenses": [{"type": "OutputNorm"}, {"type": "ParameterNorm"}, {"type": "LossMetrics"}],
        "normalize": dict(normalize or {"outputs": False, "params": False}),
        "root": "Net",
        "modules": {"outputs": [], "params": []},
        "targets": [{"class": "Net", "event": "target_update"}],
        "metrics": [],
        "flush": {"every_passes": 1000, "every_secs": 30.0},
        "notes": [],
    }


def _to_table(name: str, cols: Columns, rank: int) -> pa.Table:
    """Columns -> Arrow table with the format's schema, filling the optional bookkeeping columns."""
    cols = dict(cols)
    n = len(next(iter(cols.values())))
    fill: dict[str, Any] = {
        "rank": np.full(n, rank, dtype=np.int32),
        "time": 1.7e9 + np.arange(n, dtype=float),
    }
    if name in ("outputs", "params"):
        fill["numel"] = np.ones(n, dtype=np.int64)
    if name == "outputs":
        fill["batch"] = np.ones(n, dtype=np.int32)
        fill["grad_enabled"] = np.ones(n, dtype=bool)
        fill["training"] = np.asarray(cols.get("grad_enabled", fill["grad_enabled"]), dtype=bool)
    if name == "metrics":
        fill["split"] = pa.nulls(n, pa.string())
    if name == "signals":
        fill["param"] = pa.nulls(n, pa.string())
        fill["step"] = np.asarray(cols["pass"], dtype=np.int64)
    schema = SCHEMAS[name]
    arrays, fields = [], []
    for f in schema:
        values = cols.pop(f.name) if f.name in cols else fill.get(f.name)
        if values is None:
            raise ValueError(f"{name}: column {f.name!r} is required")
        arrays.append(_array(values, f.type))
        fields.append(f)
    for extra, values in cols.items():
        arr = _array(values, None)
        arrays.append(arr)
        fields.append(pa.field(extra, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _array(values: Any, typ: pa.DataType | None) -> pa.Array:
    """An Arrow array of ``typ``; string columns given as numpy arrays go through a dictionary (fast)."""
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values.cast(typ) if typ is not None else values
    if typ == pa.string() and isinstance(values, np.ndarray) and values.dtype.kind in "UO":
        uniques, codes = np.unique(values, return_inverse=True)
        return pa.DictionaryArray.from_arrays(codes.astype(np.int32), pa.array(uniques.tolist())).cast(typ)
    return pa.array(values, type=typ)


@dataclass
class Synthetic:
    """A synthetic DQN-like trace and its ground truth.

    ``planted`` lists ``(module, pass)`` (level "pass") or ``(module, epoch)`` (level "epoch") of every
    planted spike, ``after_event`` the subset placed just after a target sync; ``numel`` maps module to
    elements per sample; ``clean`` holds the norms before spikes were added.
    """

    outputs: dict[str, np.ndarray]
    events: dict[str, np.ndarray]
    planted: list[tuple[str, int]]
    after_event: list[tuple[str, int]]
    numel: dict[str, int]
    passes_per_epoch: int
    clean: np.ndarray = field(repr=False)


def every_pass(
    n_pass: int = 12, modules: Sequence[str] = ("a", "b.0"), epoch_len: int = 4, grad_every: int = 1
) -> dict[str, np.ndarray]:
    """Outputs of every module on every pass, each row identifiable: norm = 10 * pass + module index + 1,
    numel 4 for the first module and 16 for the others, grad enabled on every ``grad_every``-th pass."""
    passes = np.repeat(np.arange(n_pass), len(modules))
    mod_idx = np.tile(np.arange(len(modules)), n_pass)
    return {
        "pass": passes,
        "epoch": (passes // epoch_len).astype(np.int32),
        "module": np.array(modules)[mod_idx],
        "norm": (10.0 * passes + mod_idx + 1).astype(np.float32),
        "numel": np.where(mod_idx == 0, 4, 16),
        "grad_enabled": passes % grad_every == 0,
    }


def synthetic_dqn(
    *,
    modules: Sequence[str] = ("net.0", "net.2", "net.4"),
    n_epochs: int = 200,
    passes_per_epoch: int = 50,
    target_every: int = 5,
    level: str = "pass",
    n_spikes: int = 20,
    spike_size: float = 12.0,
    after_event: float = 0.0,
    event_lag: int = 3,
    noise: float = 0.03,
    epoch_noise: float = 0.01,
    no_grad: bool = False,
    seed: int = 0,
) -> Synthetic:
    """DQN-like output norms: per-module trending levels with noise, syncs every ``target_every`` epochs.

    Each epoch has ``passes_per_epoch`` recorded training passes (with ``no_grad=True`` every training
    pass is preceded by a no-grad action-selection pass, also recorded). A ``target_update`` event opens
    every ``target_every``-th epoch (recorded with that epoch and the previous epoch's last pass).
    ``n_spikes`` spikes of ``spike_size`` noise units per module are planted on training passes
    (level "pass") or on whole epochs (level "epoch", in epoch-noise units), isolated from each other;
    a fraction ``after_event`` of them lands ``event_lag`` passes / 0 epochs after a sync.
    """
    rng = np.random.default_rng(seed)
    per_epoch = passes_per_epoch * (2 if no_grad else 1)
    n_pass = n_epochs * per_epoch
    passes = np.arange(n_pass, dtype=np.int64)
    epochs = (passes // per_epoch).astype(np.int32)
    grad = (passes % 2 == 1) if no_grad else np.ones(n_pass, dtype=bool)
    sync_epochs = np.arange(target_every, n_epochs, target_every)
    events = {
        "epoch": sync_epochs.astype(np.int32),
        "pass": (sync_epochs * per_epoch - 1).astype(np.int64),
        "name": np.full(len(sync_epochs), "target_update", dtype=object),
    }
    train_idx = np.flatnonzero(grad)
    numel = {m: int(2 ** (3 + i)) for i, m in enumerate(modules)}
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("pass", "epoch", "module", "norm", "numel", "grad_enabled")
    }
    planted: list[tuple[str, int]] = []
    aligned: list[tuple[str, int]] = []
    clean_all = []
    t = passes / n_pass
    for i, m in enumerate(modules):
        base = np.sqrt(numel[m]) * (1.0 + i) * (1.0 + 0.5 * t + 0.1 * np.sin(2 * np.pi * 3 * t))
        base = np.where(grad, base, 0.7 * base)
        jitter = 1.0 + epoch_noise * rng.standard_normal(n_epochs)
        clean = base * jitter[epochs] * (1.0 + noise * rng.standard_normal(n_pass))
        norm = clean.copy()
        n_aligned = int(round(after_event * n_spikes))
        if level == "pass":
            sync_points = [p + event_lag for p in events["pass"] if p + event_lag < n_pass]
            sync_points = [p if grad[p] else p + 1 for p in sync_points]
            near = _isolated(rng, sync_points, n_aligned, 200)
            picks = near + _isolated(
                rng, train_idx.tolist(), n_spikes - len(near), 200, avoid=near, margin=40
            )
            for p in picks:
                norm[p] += spike_size * noise * base[p]
                planted.append((m, p))
            aligned += [(m, p) for p in near]
        else:
            near = _isolated(rng, sync_epochs.tolist(), n_aligned, 12)
            picks = near + _isolated(
                rng, list(range(n_epochs)), n_spikes - len(near), 12, avoid=near, margin=3
            )
            for e in picks:
                sel = epochs == e
                norm[sel] += spike_size * epoch_noise * base[sel]
                planted.append((m, e))
            aligned += [(m, e) for e in near]
        cols["pass"].append(passes)
        cols["epoch"].append(epochs)
        cols["module"].append(np.full(n_pass, m))
        cols["norm"].append(norm.astype(np.float32))
        cols["numel"].append(np.full(n_pass, numel[m], dtype=np.int64))
        cols["grad_enabled"].append(grad)
        clean_all.append(clean)
    # Row order as the recorder writes it: pass by pass, every module within a pass.
    order = np.argsort(np.concatenate(cols["pass"]), kind="stable")
    outputs = {k: np.concatenate(v)[order] for k, v in cols.items()}
    outputs["batch"] = np.where(outputs["grad_enabled"], 64, 1).astype(np.int32)
    return Synthetic(
        outputs, events, planted, aligned, numel, passes_per_epoch, np.concatenate(clean_all)[order]
    )


def _isolated(
    rng: np.random.Generator,
    candidates: list[int],
    k: int,
    min_gap: int,
    avoid: Sequence[int] = (),
    margin: int = 0,
) -> list[int]:
    """Up to ``k`` candidates, at least ``min_gap`` apart and from ``avoid``, away from the series ends."""
    if not candidates or k <= 0:
        return []
    lo, hi = min(candidates) + margin, max(candidates) - margin
    chosen: list[int] = []
    for c in rng.permutation(candidates):
        if lo <= c <= hi and all(abs(int(c) - a) >= min_gap for a in [*avoid, *chosen]):
            chosen.append(int(c))
            if len(chosen) == k:
                break
    return sorted(chosen)


@dataclass
class SyntheticSignals:
    """A synthetic trace with a signals table (trace format 2) and what was planted in it.

    ``explode``: the layer whose gradient norm grows 10**4-fold over the run (``vanish``: falls
    10**4-fold); ``high_update``: the layer
    whose update ratio is 1e-1 (the others' 1e-3); ``dying``: the layer whose dead fraction rises from
    0.02 to 0.9; ``spiky``: the layer whose gradient norm (and output norm, when ``coupled``) is 10x for
    one pass, ``event_lag`` passes after each ``target_update``, at ``spike_passes``.
    """

    outputs: dict[str, np.ndarray]
    events: dict[str, np.ndarray]
    signals: dict[str, np.ndarray]
    modules: tuple[str, ...]
    explode: str | None
    vanish: str | None
    high_update: str | None
    dying: str | None
    spiky: str | None
    spike_passes: list[int]


def synthetic_signals(
    *,
    modules: Sequence[str] = ("net.0", "net.2", "net.4"),
    n_epochs: int = 60,
    passes_per_epoch: int = 50,
    target_every: int = 5,
    explode: str | None = None,
    vanish: str | None = None,
    high_update: str | None = None,
    dying: str | None = None,
    spiky: str | None = None,
    coupled: bool = True,
    event_lag: int = 3,
    noise: float = 0.05,
    seed: int = 0,
) -> SyntheticSignals:
    """A DQN-like run recorded with every lens: one optimizer step per pass (``step`` = pass + 1, the
    steps completed after the pass), a ``target_update`` every ``target_every`` epochs.

    Per layer: ``grad_norm`` and ``update_ratio`` of ``weight`` and ``bias`` (log-normal noise of
    ``noise`` around 0.1 / 0.05 and 1e-3), ``output_grad_norm``, ``active_rate`` (0.5) and
    ``dead_fraction`` (0.02) of the module (param null); output norms per pass. With every planted
    option None the trace is clean: no finding should fire on it.
    """
    rng = np.random.default_rng(seed)
    n_pass = n_epochs * passes_per_epoch
    passes = np.arange(n_pass, dtype=np.int64)
    epochs = (passes // passes_per_epoch).astype(np.int32)
    t = passes / max(n_pass - 1, 1)
    sync_epochs = np.arange(target_every, n_epochs, target_every)
    events = {
        "epoch": sync_epochs.astype(np.int32),
        "pass": (sync_epochs * passes_per_epoch - 1).astype(np.int64),
        "name": np.full(len(sync_epochs), "target_update", dtype=object),
    }
    spike_passes = [int(p) + event_lag for p in events["pass"] if int(p) + event_lag < n_pass]

    def lognormal(level: np.ndarray | float) -> np.ndarray:
        return np.asarray(level) * np.exp(noise * rng.standard_normal(n_pass))

    series: list[tuple[str, str, str | None, np.ndarray]] = []  # kind, module, param, values per pass
    out_cols: dict[str, list[np.ndarray]] = {k: [] for k in ("pass", "epoch", "module", "norm")}
    for i, m in enumerate(modules):
        for param, level in (("weight", 0.1), ("bias", 0.05)):
            grad = lognormal(level * (1 + 0.2 * i))
            if m == explode:
                grad = grad * 10.0 ** (4 * t)
            if m == vanish:
                grad = grad * 10.0 ** (-4 * t)
            if m == spiky:
                grad[spike_passes] *= 10.0
            series.append(("grad_norm", m, param, grad))
            ratio = lognormal(1e-1 if m == high_update else 1e-3)
            series.append(("update_ratio", m, param, ratio))
        series.append(("output_grad_norm", m, None, lognormal(0.01)))
        dead = np.clip(0.02 + (0.88 * t if m == dying else 0.0) + 0.005 * rng.standard_normal(n_pass), 0, 1)
        series.append(("dead_fraction", m, None, dead))
        series.append(
            ("active_rate", m, None, np.clip(0.5 * (1 - dead) + 0.01 * rng.standard_normal(n_pass), 0, 1))
        )
        norm = lognormal(2.0 + i)
        if m == spiky and coupled:
            norm[spike_passes] *= 3.0
        out_cols["pass"].append(passes)
        out_cols["epoch"].append(epochs)
        out_cols["module"].append(np.full(n_pass, m))
        out_cols["norm"].append(norm.astype(np.float32))
    # Rows as a recorder writes them: measurement by measurement, the same order of series each time.
    k = len(series)
    signals = {
        "step": np.repeat(passes + 1, k),
        "pass": np.repeat(passes, k),
        "epoch": np.repeat(epochs, k),
        "kind": np.tile(np.array([s[0] for s in series], dtype=object), n_pass),
        "module": np.tile(np.array([s[1] for s in series], dtype=object), n_pass),
        "param": pa.array(
            np.tile(np.array([s[2] for s in series], dtype=object), n_pass).tolist(), pa.string()
        ),
        "value": np.stack([s[3] for s in series], axis=1).ravel().astype(np.float32),
    }
    order = np.argsort(np.concatenate(out_cols["pass"]), kind="stable")
    outputs = {c: np.concatenate(v)[order] for c, v in out_cols.items()}
    return SyntheticSignals(
        outputs, events, signals, tuple(modules), explode, vanish, high_update, dying, spiky, spike_passes
    )
