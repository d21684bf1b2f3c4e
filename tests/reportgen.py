"""Synthetic runs for the chart, report and command-line tests, with their ground truth.

``dqn_run`` writes a small DQN-like run with all four tables; ``long_run`` one whose row count grows with
``n_epochs``; ``read_table`` reads a table back with pyarrow alone (independent of normtrace_analysis);
``specs`` and ``open_report`` read a written report back (its embedded specs; what Chromium drew).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
from tracegen import synthetic_dqn, write_trace

MODULES = ("(root)", "net.0", "net.2", "net.4")
PARAMS = (("net.0", "weight"), ("net.0", "bias"), ("net.4", "weight"), ("net.4", "bias"))


def param_norm(module: str, param: str, epoch: np.ndarray) -> np.ndarray:
    """Known parameter norms: weights grow linearly, biases start at exactly zero (for the log scale)."""
    scale = 1.0 + MODULES.index(module)
    return scale * (1.0 + 0.1 * epoch) if param == "weight" else 0.01 * epoch * scale


def dqn_run(path: Path, *, n_epochs: int = 40, seed: int = 0) -> Path:
    """A DQN-like run with all four tables: spiky outputs, syncs every 5 epochs, params and metrics."""
    syn = synthetic_dqn(
        modules=MODULES,
        n_epochs=n_epochs,
        passes_per_epoch=20,
        target_every=5,
        n_spikes=4,
        after_event=0.75,
        no_grad=True,
        seed=seed,
    )
    epochs = np.arange(n_epochs, dtype=np.int32)
    last_pass = (epochs + 1) * 40 - 1
    params: dict[str, list] = {"epoch": [], "pass": [], "module": [], "param": [], "norm": [], "numel": []}
    for module, param in PARAMS:
        params["epoch"] += epochs.tolist()
        params["pass"] += last_pass.tolist()
        params["module"] += [module] * n_epochs
        params["param"] += [param] * n_epochs
        params["norm"] += param_norm(module, param, epochs).tolist()
        params["numel"] += [64 if param == "weight" else 8] * n_epochs
    train = np.flatnonzero(syn.outputs["grad_enabled"][:: len(MODULES)])
    metrics = {
        "epoch": np.concatenate([train // 40, epochs]).astype(np.int32),
        "pass": np.concatenate([train, last_pass]).astype(np.int64),
        "name": ["loss"] * len(train) + ["total_reward"] * n_epochs,
        "value": np.concatenate([1.0 / (1.0 + train / 200.0), 10.0 + 2.0 * epochs]),
        "split": ["train"] * len(train) + [None] * n_epochs,
    }
    meta = {
        "modules": {"outputs": [{"name": m, "class": "Linear"} for m in MODULES], "params": []},
        "metrics": ["total_reward"],
        "notes": [{"module": "net.3", "kind": "non-tensor", "detail": "returned None"}],
    }
    return write_trace(
        path, outputs=syn.outputs, params=params, metrics=metrics, events=syn.events, meta=meta
    )


def long_run(path: Path, n_epochs: int, passes_per_epoch: int = 10) -> Path:
    """Three modules on every pass, a loss per pass, a sync every 7 epochs: rows grow with ``n_epochs``."""
    n_pass = n_epochs * passes_per_epoch
    passes = np.repeat(np.arange(n_pass), 3)
    sync = np.arange(7, n_epochs, 7)
    return write_trace(
        path,
        outputs={
            "pass": passes,
            "epoch": (passes // passes_per_epoch).astype(np.int32),
            "module": np.tile(np.array(["a", "b", "c"]), n_pass),
            "norm": (1.0 + np.tile([0.0, 1.0, 2.0], n_pass) + np.sin(passes / 50.0)).astype(np.float32),
        },
        metrics={
            "epoch": (np.arange(n_pass) // passes_per_epoch).astype(np.int32),
            "pass": np.arange(n_pass),
            "name": np.array(["loss"] * n_pass),
            "value": 1.0 / (1.0 + np.arange(n_pass)),
        },
        events={
            "epoch": sync.astype(np.int32),
            "pass": sync * passes_per_epoch,
            "name": ["target_update"] * len(sync),
        },
        shards=2,
    )


def read_table(run: Path, table: str) -> dict[str, np.ndarray]:
    """A table straight from its shards with pyarrow (independent of normtrace_analysis)."""
    parts = [ipc.open_file(str(p)).read_all() for p in sorted((run / table).glob("*.arrow"))]
    merged = pa.concat_tables(parts)
    return {name: merged.column(name).to_numpy(zero_copy_only=False) for name in merged.column_names}


def specs(text: str) -> dict[str, dict[str, Any]]:
    """The Vega-Lite spec embedded for each chart container, by slug."""
    found = re.findall(
        r'<script type="application/json" data-for="chart-([\w-]+)">(.*?)</script>', text, re.S
    )
    return {slug: json.loads(body) for slug, body in found}


def open_report(browser: Any, path: Path) -> dict[str, Any]:
    """Load a report with every http(s) request intercepted; what rendered, what failed, what was asked."""
    page = browser.new_page()
    requests: list[str] = []
    errors: list[str] = []
    page.route(re.compile(r"^https?://"), lambda route: route.abort())
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())
    page.wait_for_function(
        "() => [...document.querySelectorAll('[data-chart]')].every(el => el.dataset.state)", timeout=30_000
    )
    charts_state = page.eval_on_selector_all(
        "[data-chart]",
        """els => els.map(el => ({
            slug: el.dataset.chart,
            state: el.dataset.state,
            views: el.querySelectorAll('svg.marks, canvas').length,
            marks: el.querySelectorAll('g.mark-line path, g.mark-area path, g.mark-rule line').length,
            lines: el.querySelectorAll('g.mark-line path').length,
            title: [...el.querySelectorAll('g.role-title-text text')].map(t => t.textContent).join(' '),
            axes: el.querySelectorAll('g.role-axis').length,
            untitled: [...el.querySelectorAll('g.role-axis')].filter(  // grid-only axes have no labels
                a => a.querySelector('g.role-axis-label text')
                     && !a.querySelector('g.role-axis-title text')?.textContent.trim()).length,
        }))""",
    )
    page.close()
    return {"charts": charts_state, "errors": errors, "requests": requests}
