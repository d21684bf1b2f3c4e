"""Notebook display: a short ``repr`` and an HTML summary of a Trace, and charts that render offline.

Altair's default renderer loads Vega from a CDN, so without internet a notebook's charts are blank.
:func:`enable_offline_charts` registers a renderer that inlines the Vega, Vega-Lite and vega-embed
JavaScript (vl-convert's bundle, as the HTML report does) into each chart's output: charts then draw
with no network, in Jupyter, JupyterLab and VS Code, and the saved notebook shows them anywhere.
The price is about 0.9 MB of JavaScript per chart output; ``static=True`` renders SVG instead (small,
no tooltips or legend selection).

Row counts come from the shards' metadata (Polars counts rows without reading them), never a scan.
"""

from __future__ import annotations

import html
import itertools
import json
from typing import TYPE_CHECKING, Any

import altair as alt
import polars as pl

from .schema import TABLES

if TYPE_CHECKING:
    from .trace import Trace

RENDERER = "normtrace"
"""Name of the offline renderer in ``altair.renderers``."""

SHOWN_RUNS = 20
"""Runs listed one by one in the HTML summary (the rest are counted)."""

_ids = itertools.count()


def enable_offline_charts(*, static: bool = False) -> None:
    """Make Altair charts render in Jupyter with no internet: Vega inlined in each chart's output.

    Parameters
    ----------
    static:
        Render each chart as an SVG image instead (vl-convert): a few KB per chart, no interactivity.

    Example
    -------
    >>> import normtrace_analysis as na
    >>> na.enable_offline_charts()          # once per notebook, before displaying charts
    >>> na.charts.norms(trace)              # doctest: +SKIP
    """
    if static:
        alt.renderers.enable("svg")
        return
    if RENDERER not in alt.renderers.names():
        alt.renderers.register(RENDERER, render)
    alt.renderers.enable(RENDERER)


def render(spec: dict[str, Any], **metadata: Any) -> dict[str, str]:
    """Altair renderer: a ``text/html`` bundle that draws ``spec`` with the Vega code inlined.

    The bundle is evaluated inside a function (its top-level ``const`` declarations would clash when a
    second chart's output evaluates it again in the page's global scope); it sets ``window.vegaEmbed``.
    """
    from .report import _javascript  # the report's cached bundle, for the Vega-Lite version Altair writes

    target = f"normtrace-chart-{next(_ids)}"
    options = {"mode": "vega-lite", "actions": False, **(metadata.get("embed_options") or {})}
    spec_json = json.dumps(spec, allow_nan=False).replace("<", "\\u003c")
    options_json = json.dumps(options).replace("<", "\\u003c")
    body = f"""<div id="{target}"></div>
<script type="text/javascript">
(function () {{
  if (!window.vegaEmbed) {{ (function () {{ {_javascript()}
  }})(); }}
  var el = document.getElementById("{target}");
  window.vegaEmbed(el, {spec_json}, {options_json}).catch(function (err) {{
    el.textContent = "This chart could not be drawn: " + err;
  }});
}})();
</script>"""
    return {
        "text/html": body,
        "text/plain": "<normtrace chart: run na.enable_offline_charts() in a notebook>",
    }


# ---------------------------------------------------------------------------- Trace display


def row_counts(trace: Trace) -> dict[str, dict[str, int | None]]:
    """Rows per run and table, as the shards hold them (before the Trace's filters), from their metadata;
    None where they cannot be counted (a damaged shard, an unreachable store): a repr must not raise."""

    def count() -> dict[str, dict[str, int | None]]:
        counts: dict[str, dict[str, int | None]] = {}
        for run in trace._runs:
            per_table: dict[str, int | None] = {}
            for table in TABLES:
                paths = [str(p) for p, _ in run.shards[table]]
                if not paths:
                    per_table[table] = 0
                    continue
                options = run.storage_options
                scan = pl.scan_ipc(paths, glob=False, hive_partitioning=False, storage_options=options)
                try:
                    per_table[table] = int(scan.select(pl.len()).collect().item())
                except Exception:  # shown as "?"; an analysis names the cause
                    per_table[table] = None
            counts[run.name] = per_table
        return counts

    return trace.cached(("row_counts",), count)


def _count(n: int | None) -> str:
    return "?" if n is None else f"{n:,}"


def _total(counts: list[int | None]) -> int | None:
    """The sum, or None when any count is unknown."""
    known = [n for n in counts if n is not None]
    return sum(known) if len(known) == len(counts) else None


def _filters_text(trace: Trace) -> str:
    f = trace._filters
    parts = []
    for name in ("modules", "split", "epochs", "passes", "ranks", "runs", "kinds"):
        value = getattr(f, name)
        if value not in (None, ()):
            parts.append(f"{name}={value!r}" if name != "modules" else f"modules={list(value)!r}")
    return ", ".join(parts)


def _runs_text(names: list[str], at_most: int = 5) -> str:
    shown = ", ".join(names[:at_most])
    return shown + (f", … ({len(names) - at_most} more)" if len(names) > at_most else "")


def _shown_tables(trace: Trace) -> list[str]:
    """The tables a display lists: all, but ``signals`` only when recorded (a version-1 trace cannot
    have it, and "signals –" on every older trace would read as something missing)."""
    return [t for t in TABLES if t != "signals" or trace.has_signals]


def trace_repr(trace: Trace) -> str:
    """A few lines: the runs, rows per table (from shard metadata), shards, and the filters."""
    counts = row_counts(trace)
    shown = _shown_tables(trace)
    totals = {t: [c[t] for c in counts.values()] for t in shown}
    total = {t: _total(v) for t, v in totals.items()}
    shards = {t: len(trace.shards(t)) for t in shown}
    tables = " · ".join(
        f"{t} {_count(total[t])} rows/{shards[t]} shards" if shards[t] else f"{t} –" for t in shown
    )
    n = len(trace.runs)
    lines = [f"<normtrace Trace: {n} run{'s' * (n != 1)} ({_runs_text(trace.runs)})", f"  {tables}"]
    filters = _filters_text(trace)
    if filters:
        lines.append(f"  filtered: {filters} (row counts are before filters)")
    return "\n".join(lines) + ">"


def trace_html(trace: Trace) -> str:
    """A small HTML table: one row per run (the first :data:`SHOWN_RUNS`) with status and row counts."""
    counts = row_counts(trace)
    shown = _shown_tables(trace)
    head = ["run", "status", "epochs", "passes", "ranks", *shown, "path"]
    rows = []
    for run in trace._runs[:SHOWN_RUNS]:
        meta = run.meta
        cells = [
            run.name,
            "–" if run.status is None else run.status,  # "killed" where meta.json still says running
            meta.get("epochs", "–"),
            meta.get("passes", "–"),
            len(run.rank_metas),
            *(_count(counts[run.name][t]) for t in shown),
            str(run.path),
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    more = len(trace.runs) - SHOWN_RUNS
    if more > 0:
        rows.append(f'<tr><td colspan="{len(head)}">… and {more} more runs</td></tr>')
    filters = _filters_text(trace)
    note = f"<p>Filtered: {html.escape(filters)} (row counts are before filters).</p>" if filters else ""
    header = "".join(f"<th>{h}</th>" for h in head)
    n = len(trace.runs)
    return (
        f'<div class="normtrace-trace"><p><b>normtrace Trace</b>: {n} run{"s" * (n != 1)}; rows per table '
        f"from the shards' metadata.</p>{note}<table><thead><tr>{header}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )
