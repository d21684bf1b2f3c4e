"""One self-contained HTML report of a trace, and static PNG/SVG export of its charts.

The report inlines the Vega, Vega-Lite and vega-embed JavaScript (from vl-convert), so opening it makes
no network request of any kind: it can be mailed, archived, or opened on an air-gapped machine. Every
chart is its own embedded view under its own heading, and a chart that fails (in Python or in the
browser) shows an error in its place without blanking the rest of the report.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache, partial
from pathlib import Path
from typing import Any, Literal, TypedDict, cast

import altair as alt
import polars as pl
import vl_convert

from . import charts
from .alignment import PLACEBO, TOLERANCE, check_event, format_p, recorded_events
from .charts import MAX_ROWS, Band
from .errors import TraceError
from .names import SENSITIVITY_WINDOWS, SERIES_KEYS, SUMMARY_KEYS, Level, Table
from .progress import progress as show_progress
from .runs import RUN_COLUMNS, differing
from .trace import Trace, load, refuse_inside_tables

Source = Trace | str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

SPIKE_ROWS = 50
"""Spikes listed in the report's table (highest scores first); the charts mark up to charts.MAX_SPIKES."""


@dataclass(frozen=True)
class ChartSection:
    """A chart of the report: file-safe ``slug``, its heading, and how to build it (None: no data)."""

    slug: str
    heading: str
    build: Callable[[], alt.TopLevelMixin] | None
    missing: str = ""


def report(
    source: Source,
    path: str | os.PathLike[str] = "report.html",
    *,
    level: Level = "pass",
    band: Band = "p05-p95",
    log: bool = False,
    event: str | Sequence[str] | None = None,
    max_rows: int = MAX_ROWS,
    progress: bool = False,
) -> Path:
    """Write one offline HTML report of ``source`` (a Trace, a run directory, a glob or a list of them).

    It shows the findings about each event (do spikes and steps follow it?), each run's metadata, a
    per-module summary, every chart (output and parameter norms with events and spikes, metrics, norm
    shares, the event-triggered average) and the spike table. ``event`` names the events the findings
    are about (one or several); by default every event the runs recorded, the most frequent first (at
    most :data:`REPORT_EVENTS`), so a DQN's report is about its ``target_update`` and a CNN's about its
    ``lr_drop``; a run without events gets findings about its spikes alone. A name no run recorded is
    an error listing those recorded. ``progress`` shows what it is doing on stderr when slow. A ``path``
    that is a folder, or inside a loaded run's table folder (``RUN/outputs/``, where the next load would
    find it), is refused before any work.

    ``level`` defaults to "pass" (curves binned over passes, spikes and alignment per pass): a DQN's
    target-sync transients last a few dozen passes and average away in per-epoch means.
    """
    if Path(path).is_dir():
        example = Path(path) / "report.html"
        raise ValueError(f"{path} is a folder, not a file for the HTML report: name the file, e.g. {example}")
    trace = _as_trace(source)
    refuse_inside_tables(trace, path)
    events = report_events(trace, event)
    parts: dict[str, str] = {}
    with trace.reading(), show_progress("report", enabled=progress) as bar:
        bar.set_postfix_str("spikes", refresh=False)
        try:
            spikes = _spikes_or_none(trace, level)
            parts["spikes"] = _spikes_html(spikes, level)
        except TraceError:  # the data cannot be read: say which file, do not write a report of errors
            raise
        except Exception as exc:  # the charts and the other tables are still worth writing
            spikes, parts["spikes"] = None, _failed("spikes", exc)
        sections = chart_sections(
            trace, level=level, band=band, log=log, max_rows=max_rows, spikes=spikes, event=events
        )
        findings: list[tuple[str, Callable[[], str]]] = [
            (f"alignment-{i}", partial(_alignment_html, trace, e, level)) for i, e in enumerate(events)
        ]
        signal_blocks: list[tuple[str, Callable[[], str]]] = [
            (f"signals-{family.slug}", partial(_signal_family_html, trace, family, findings_of))
            for family, findings_of in _signal_families(trace, events)
        ]
        blocks: list[tuple[str, Callable[[], str]]] = [
            *(findings or [("alignment-0", lambda: _no_events_html(trace, spikes, level))]),
            *signal_blocks,
            ("metadata", lambda: _metadata_html(trace)),
            ("summary", lambda: _summary_html(trace)),
        ]
        steps: list[tuple[str, Callable[[], str] | ChartSection]] = [
            *blocks,
            *((s.slug, s) for s in sections),
        ]
        for name, step in steps:
            bar.set_postfix_str(name, refresh=False)
            if name.startswith(SIGNAL_CHART):
                continue  # drawn in its family's section
            if isinstance(step, ChartSection):
                parts[name] = _chart_html(step)
            else:
                try:
                    parts[name] = step()
                except TraceError:
                    raise
                except Exception as exc:  # the rest of the report is still worth writing
                    parts[name] = _failed(name, exc)
    body = [
        *(parts[name] for name, _ in blocks if name.startswith("alignment-")),
        *(parts[name] for name, _ in signal_blocks),
        parts["metadata"],
        parts["summary"],
        '<section id="charts"><h2>Charts</h2>',
        *(parts[s.slug] for s in sections if not s.slug.startswith(SIGNAL_CHART)),
        "</section>",
        parts["spikes"],
    ]
    out = Path(path)
    out.write_text(_page(trace, body), encoding="utf-8")
    return out


def export_charts(
    source: Source,
    directory: str | os.PathLike[str],
    format: Literal["png", "svg"] = "svg",
    *,
    level: Level = "pass",
    band: Band = "p05-p95",
    log: bool = False,
    event: str | Sequence[str] | None = None,
    max_rows: int = MAX_ROWS,
    scale: float = 2.0,
    progress: bool = False,
) -> list[Path]:
    """Write each of the report's charts as ``directory/<slug>.png|svg`` (vl-convert, no browser needed).

    For papers and READMEs. Charts without data are left out; one that fails is skipped with a warning.
    Returns the files written, in report order. A ``directory`` that is a file, or inside a loaded run's
    table folder, is refused before any work.
    """
    if format not in ("png", "svg"):
        raise ValueError(f"format must be 'png' or 'svg', not {format!r}")
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise ValueError(
            f"{folder} is a file, not a folder for the {format} charts (a file each): name a folder"
        )
    trace = _as_trace(source)
    refuse_inside_tables(trace, folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    with trace.reading(), show_progress(f"export {format}", enabled=progress) as bar:
        bar.set_postfix_str("spikes", refresh=False)
        spikes = _spikes_or_none(trace, level)
        sections = chart_sections(
            trace, level=level, band=band, log=log, max_rows=max_rows, spikes=spikes, event=event
        )
        for section in sections:
            if section.build is None:
                continue  # no data for this chart
            bar.set_postfix_str(section.slug, refresh=False)
            target = _export_one(section.slug, section.build, folder, format, scale)
            if target is not None:
                written.append(target)
    return written


def _export_one(
    slug: str, build: Callable[[], alt.TopLevelMixin], folder: Path, format: str, scale: float
) -> Path | None:
    """Write one chart as SVG or PNG; None (and a warning) when it fails, so the others still get out."""
    try:
        spec = build().to_dict()
        target = folder / f"{slug}.{format}"
        if format == "svg":
            target.write_text(vl_convert.vegalite_to_svg(spec, vl_version=_vl_version()), encoding="utf-8")
        else:
            target.write_bytes(vl_convert.vegalite_to_png(spec, vl_version=_vl_version(), scale=scale))
    except TraceError:
        raise
    except Exception as exc:  # one chart's failure must not lose the others
        warnings.warn(f"chart {slug!r} was not exported: {exc}", stacklevel=3)
        return None
    return target


class _CurveOptions(TypedDict):
    """The options the report's curve charts (norms, metrics) share."""

    level: Level
    band: Band
    log: bool
    domain: tuple[int, int] | None
    max_rows: int


def chart_sections(
    trace: Trace,
    *,
    level: Level = "pass",
    band: Band = "p05-p95",
    log: bool = False,
    max_rows: int = MAX_ROWS,
    spikes: pl.DataFrame | None = None,
    event: str | Sequence[str] | None = None,
) -> list[ChartSection]:
    """The report's charts, in order, sharing one x axis range; unbuilt until ``build()`` is called.

    ``spikes`` (from ``trace.spikes(level=level)``) is drawn on the output-norm chart; the last charts
    are the event-triggered averages of the output norms, one per event of :func:`report_events`.
    """
    events = report_events(trace, event)
    present = {t: _has_rows(trace, t) for t in ("outputs", "params", "metrics")}
    domain = charts.x_domain(trace, level) if any(present.values()) else None
    epoch_domain = charts.x_domain(trace, "epoch") if any(present.values()) else None
    curves: _CurveOptions = {"level": level, "band": band, "log": log, "domain": domain, "max_rows": max_rows}
    marks: bool | pl.DataFrame = spikes if spikes is not None else False
    specs = [
        ("output-norms", f"Output norms per {level}", "outputs",
         lambda: charts.norms(trace, "outputs", spikes=marks, **curves)),
        ("parameter-norms", f"Parameter norms per {level}", "params",
         lambda: charts.norms(trace, "params", spikes=False, **curves)),
        ("metrics", f"Metrics per {level}", "metrics", lambda: charts.metrics(trace, **curves)),
        ("output-share", "Share of the output norm per layer", "outputs",
         lambda: charts.share(trace, "outputs", domain=epoch_domain, max_rows=max_rows)),
        ("parameter-share", "Share of the parameter norm per layer", "params",
         lambda: charts.share(trace, "params", domain=epoch_domain, max_rows=max_rows)),
    ]  # fmt: skip
    sections = [
        ChartSection(slug, heading, build if present[table] else None, f"The trace has no {table} rows.")
        for slug, heading, table, build in specs
    ]
    width = SENSITIVITY_WINDOWS[level][-1]
    unit = "passes" if level == "pass" else "epochs"
    for i, name in enumerate(events):
        sections.append(
            ChartSection(
                "event-profile" if i == 0 else f"event-profile-{i + 1}",
                f"Output norms around each {name}, {width} {unit} either side",
                partial(charts.event_profile, trace, name, window=width, level=level)
                if present["outputs"]
                else None,
                "The trace has no output norms.",
            )
        )
    if not events:
        sections.append(
            ChartSection("event-profile", "Output norms around events", None, "The runs recorded no events.")
        )
    for family, _ in _signal_families(trace, events):
        sections.extend(family.charts)
    return sections


# ----------------------------------------------------------------------------------------------------------
# Signals (trace format 2): a section per family, its findings and its charts

SIGNAL_CHART = "signal-"
"""Slug prefix of the signal charts (``signal-grad_norm`` …): drawn in their family's section."""


@dataclass(frozen=True)
class SignalFamily:
    """Signals the report shows together: their kinds (those recorded), the findings that are theirs,
    what was checked (said when nothing was found), and one chart per kind."""

    slug: str
    heading: str
    kinds: tuple[str, ...]
    findings: tuple[str, ...]
    checked: str
    charts: tuple[ChartSection, ...] = ()


_FAMILIES = (
    SignalFamily(
        "gradients",
        "Gradients",
        ("grad_norm", "output_grad_norm", "grad_cosine"),
        ("explode", "vanish", "spread", "spikes_with_outputs", "spikes_after_event"),
        "no gradient norm is non-finite or grows or falls a hundredfold from the first tenth of the steps "
        "to the last, the layers' norms at one step stay within three orders of magnitude, and no "
        "gradient-norm excursion was found beside an output-norm excursion or after an event",
    ),
    SignalFamily(
        "updates",
        "Updates",
        ("update_ratio", "update_cosine"),
        ("update_high", "update_low"),
        "every parameter's median update ratio over the last tenth of the steps is within 1e-4..1e-2",
    ),
    SignalFamily(
        "units",
        "Units",
        ("dead_fraction", "active_rate"),
        ("dead",),
        "no layer has half of its units dead over the last tenth of the steps, nor a dead fraction "
        "that rose by a quarter",
    ),
)


def _signal_families(
    trace: Trace, events: Sequence[str]
) -> list[tuple[SignalFamily, Callable[[], pl.DataFrame]]]:
    """The families with a recorded kind (none for a trace without signals: a version-1 trace), each with
    its charts and a function giving its findings (computed once for all families, on first use)."""
    if not trace.has_signals:
        return []
    recorded = trace.signal_kinds()
    known = {k for f in _FAMILIES for k in f.kinds}
    others = tuple(k for k in recorded if k not in known)
    families = [*_FAMILIES, SignalFamily("other", "Other signals", others, (), "")]
    found = partial(trace.signal_findings, event=list(events))
    out: list[tuple[SignalFamily, Callable[[], pl.DataFrame]]] = []
    for family in families:
        kinds = tuple(k for k in family.kinds if k in recorded)
        if not kinds:
            continue
        sections = tuple(
            ChartSection(
                f"{SIGNAL_CHART}{_slug(kind)}",
                f"{charts.SIGNAL_TITLES.get(kind, kind)} per step",
                partial(charts.signals, trace, kind),
            )
            for kind in kinds
        )
        mine = partial(_findings_of, found, family.findings)
        out.append((replace(family, kinds=kinds, charts=sections), mine))
    return out


def _findings_of(found: Callable[[], pl.DataFrame], findings: tuple[str, ...]) -> pl.DataFrame:
    """The rows of ``found()`` (every signal finding, memoised) that are one of ``findings``."""
    return found().filter(pl.col("finding").is_in(list(findings)))


def _slug(text: str) -> str:
    """A name made safe for a file name and an HTML id (a user's kind may hold anything)."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)


def _signal_family_html(trace: Trace, family: SignalFamily, findings: Callable[[], pl.DataFrame]) -> str:
    """A family's findings as sentences (or what was checked, when nothing stands out), then its charts."""
    head = f'<section id="signals-{family.slug}"><h2>Findings: {_esc(family.heading.lower())}</h2>'
    parts = [head]
    if family.findings:
        found = findings()
        if found.height:
            items = "".join(f"<li>{_esc(s)}</li>" for s in found["sentence"].to_list())
            parts.append(f'<ul class="findings">{items}</ul>')
        else:
            parts.append(f'<p class="verdict">{_esc("Nothing stands out: " + family.checked + ".")}</p>')
    parts.extend(_chart_html(section) for section in family.charts)
    parts.append("</section>")
    return "".join(parts)


REPORT_EVENTS = 3
"""Events a report is about when none is named: the most frequent ones the runs recorded."""


def report_events(trace: Trace, event: str | Sequence[str] | None) -> list[str]:
    """The events a report's findings are about: those named (each checked: a name no run recorded is a
    :class:`MissingEventError` listing those recorded), else the most frequent recorded ones."""
    if event is None:
        return recorded_events(trace)["name"].head(REPORT_EVENTS).to_list()
    names = [event] if isinstance(event, str) else list(dict.fromkeys(event))
    for name in names:
        check_event(trace, name)
    return names


@cache
def _vl_version() -> str | None:
    """The Vega-Lite version Altair writes specs for, as vl-convert names it (None: its newest)."""
    major_minor = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    return major_minor if major_minor in vl_convert.get_vegalite_versions() else None


@cache
def _javascript() -> str:
    """vega, vega-lite and vega-embed in one script, safe to inline in a ``<script>`` element."""
    # vl-convert's stub marks snippet as required; it is optional (default: vegaEmbed, vegaLite and vega
    # become globals), as its docstring and its runtime signature (snippet=None) say
    bundle: str = vl_convert.javascript_bundle(vl_version=_vl_version())  # type: ignore[call-arg]
    return bundle.replace("</script", "<\\/script")


def _as_trace(source: Source) -> Trace:
    return source if isinstance(source, Trace) else load(source)


def _has_rows(trace: Trace, table: str) -> bool:
    return trace.table(table).head(1).collect().height > 0


def _spikes_or_none(trace: Trace, level: Level) -> pl.DataFrame | None:
    """Output-norm spikes at the report's level, or None when there are no outputs to search."""
    return trace.spikes(table="outputs", level=level) if _has_rows(trace, "outputs") else None


def _failed(name: str, exc: Exception) -> str:
    """An error note standing in for a section that could not be built (also issued as a warning)."""
    warnings.warn(f"report section {name!r} failed: {exc}", stacklevel=3)
    return f'<section id="{name}"><p class="error">{_esc(f"{name} could not be built: {exc}")}</p></section>'


def _chart_html(section: ChartSection) -> str:
    """A chart's heading and container, with its Vega-Lite spec as inline JSON (or why it is absent)."""
    head = f'<h3 id="{section.slug}">{_esc(section.heading)}</h3>'
    if section.build is None:
        return f'{head}<p class="note">{_esc(section.missing)}</p>'
    try:
        spec = section.build().to_dict()
        spec.pop("$schema", None)
        text = json.dumps(spec, separators=(",", ":"), allow_nan=False)
    except TraceError:
        raise
    except Exception as exc:  # one failing chart never blanks the report
        warnings.warn(f"chart {section.slug!r} failed: {exc}", stacklevel=3)
        return f'{head}<p class="error">{_esc(f"This chart could not be built: {exc}")}</p>'
    target = f"chart-{section.slug}"
    safe = text.replace("<", "\\u003c")  # JSON escape: no "</script>" can end the element early
    return (
        f'{head}<div class="chart" id="{target}" data-chart="{section.slug}"></div>'
        f'<script type="application/json" data-for="{target}">{safe}</script>'
    )


def _metadata_html(trace: Trace) -> str:
    """Each run's meta.json as one column of a key/value table, plus any recorder notes; a killed run's
    status is "killed", with the "running" its meta.json still says."""
    status = dict(trace.run_table.select("run", "status").iter_rows())
    metas = {
        run: m
        if status[run] == m.get("status")
        else {**m, "status": f"{status[run]} (meta.json: {m.get('status')})"}
        for run, m in trace.metas.items()
    }
    keys = [k for k in _META_ORDER if any(k in m for m in metas.values())]
    keys += sorted({k for m in metas.values() for k in m} - set(keys))
    head = "".join(f"<th>{_esc(run)}</th>" for run in metas)
    rows = "".join(
        f"<tr><th>{_esc(k)}</th>{''.join(f'<td>{_esc(_meta_value(k, m.get(k)))}</td>' for m in metas.values())}</tr>"
        for k in keys
    )
    notes = [
        f"<li><b>{_esc(run)}</b> {_esc(str(n.get('module')))}: {_esc(str(n.get('kind')))} — "
        f"{_esc(str(n.get('detail')))}</li>"
        for run, m in metas.items()
        for n in (m.get("notes") or [])
        if isinstance(n, dict)
    ]
    note_html = f"<h3>Recorder notes</h3><ul>{''.join(notes)}</ul>" if notes else ""
    table = f'<table class="meta"><thead><tr><th></th>{head}</tr></thead><tbody>{rows}</tbody></table>'
    if len(metas) == 1:
        return f'<section id="metadata"><h2>Runs</h2>{table}{note_html}</section>'
    return (
        f'<section id="metadata"><h2>Runs</h2>{_sweep_html(trace)}'
        f"<details><summary>Each run's metadata</summary>{table}</details>{note_html}</section>"
    )


def _sweep_html(trace: Trace) -> str:
    """Several runs: one row each, with the configuration settings that differ between them; the settings
    they share are said once below."""
    frame = trace.run_table
    varying = differing(frame)
    shared = [c for c in frame.columns[len(RUN_COLUMNS) :] if c not in varying]
    view = frame.select("run", "status", "seconds", "epochs", "passes", *varying)
    caption = f"{frame.height} runs; configuration settings that differ between them: " + (
        ", ".join(varying)
        if varying
        else "none recorded (pass Recorder(config={...}) to compare runs by them)"
    )
    same = (
        "<p>Same in every run: "
        + "; ".join(f"{_esc(c)} = {_esc(_meta_value(c, frame[c][0]))}" for c in shared)
        + ".</p>"
        if shared
        else ""
    )
    return _table(view, caption=caption) + same


_META_ORDER = (
    "run_name", "status", "start_time", "end_time", "root", "world_size", "hostname", "pid", "normalize",
    "config", "lenses", "modules", "targets", "metrics", "flush", "notes", "schema_version", "normtrace_version",
    "torch_version", "python_version", "rank",
)  # fmt: skip


def _meta_value(key: str, value: Any) -> str:
    """A metadata value in a few words (lists of modules become counts, configs compact JSON)."""
    if value is None:
        return "–"
    if key == "normalize" and isinstance(value, dict):
        return ", ".join(f"{t}: {'RMS' if v else 'L2'}" for t, v in value.items())
    if key == "modules" and isinstance(value, dict):
        return ", ".join(f"{len(v)} {t}" for t, v in value.items() if isinstance(v, list))
    if key == "lenses" and isinstance(value, list):
        return ", ".join(
            str(lens.get("type", lens)) if isinstance(lens, dict) else str(lens) for lens in value
        )
    if key == "notes" and isinstance(value, list):
        return f"{len(value)} (listed below)" if value else "none"
    if isinstance(value, str | int | float | bool):
        return str(value)
    text = json.dumps(value, separators=(", ", ": "))
    return text if len(text) <= 200 else text[:199] + "…"


def _summary_html(trace: Trace) -> str:
    """Per module (and parameter), in the model's order: epochs seen, first and last epoch mean, their
    ratio, and the peak, with a caption saying what each count counts."""
    parts = []
    tables: tuple[tuple[Table, str], ...] = (("outputs", "Output norms"), ("params", "Parameter norms"))
    for table, title in tables:
        if not _has_rows(trace, table):
            continue
        per_epoch = trace.epoch_summary(table)
        keys = [k for k in SUMMARY_KEYS[table] if k != "epoch"]
        summary = (
            per_epoch.sort("epoch")
            .group_by(keys, maintain_order=True)
            .agg(
                epochs=pl.len(),
                rows=pl.col("count").sum(),
                nonfinite=pl.col("nonfinite").sum(),
                first_mean=pl.col("mean").first(),
                last_mean=pl.col("mean").last(),
                peak=pl.col("max").max(),
                peak_epoch=pl.col("epoch").get(pl.col("max").arg_max()),
            )
            .with_columns((pl.col("last_mean") / pl.col("first_mean")).alias("last/first"))
        )
        classes = charts.module_classes(trace, table)
        order = {m: i for i, m in enumerate(classes)}
        summary = summary.with_columns(
            pl.col("module").replace_strict(order, default=len(order), return_dtype=pl.Int64).alias("_order")
        ).sort("run", "_order", "module", *keys[2:])
        suffixes = {m: f" ({c})" for m, c in classes.items()}
        summary = summary.with_columns(
            pl.concat_str(
                ["module", pl.col("module").replace_strict(suffixes, default="", return_dtype=pl.String)]
            )
        ).drop("_order")
        if summary["run"].n_unique() == 1:
            summary = summary.drop("run")
        epochs = _run_epochs(trace)
        split_note = (
            " Only grad-enabled passes are recorded by default (the lens's skip_no_grad_pass), so a series "
            "has rows only in the epochs that ran a training pass."
            if table == "outputs"
            else ""
        )
        caption = (
            f"epochs: the epochs with rows for the series (the run has {epochs}); rows: its recorded "
            f"{'passes' if table == 'outputs' else 'collections'}; first_mean and last_mean: its mean over "
            "the first and the last of those epochs; last/first: their ratio; peak: its largest value, in "
            f"peak_epoch; nonfinite: NaN or infinite rows.{split_note}"
        )
        parts.append(f"<h3>{title} ({charts.value_title(trace, table)})</h3>{_table(summary, caption)}")
    body = "".join(parts) or '<p class="note">The trace has no output or parameter norms.</p>'
    return f'<section id="summary"><h2>Summary per module</h2>{body}</section>'


def _run_epochs(trace: Trace) -> str:
    """How many epochs each run has: what the recorder counted at close, else the epochs seen in rows."""
    counts = []
    for run, meta in trace.metas.items():
        n = meta.get("epochs") if isinstance(meta, dict) else None
        if not isinstance(n, int):
            seen = (
                pl.concat(
                    [
                        trace.filter(runs=run).table(t).select("epoch")
                        for t in ("outputs", "params", "metrics")
                    ],
                    how="vertical_relaxed",
                )
                .select(pl.col("epoch").max())
                .collect()
                .item()
            )
            n = None if seen is None else seen + 1
        counts.append(f"{n if n is not None else '?'}" + (f" in {run}" if len(trace.runs) > 1 else ""))
    return ", ".join(counts)


def _alignment_html(trace: Trace, event: str, level: Level) -> str:
    """The findings about ``event``: spikes after it (with placebo, q-values, correlated layers), the
    same across windows, and steps in the level at it."""
    head = f'<section id="alignment"><h2>Findings: what follows {_esc(event)}</h2>'
    if not _has_rows(trace, "outputs"):
        return f'{head}<p class="note">Not computed: the trace has no output norms.</p></section>'
    aligned = trace.event_alignment(event=event, level=level)
    tested = aligned.filter(pl.col("p_value").is_not_null())
    findings = _collapsed(tested, f"spikes do not follow {event} more often than chance")
    quiet = aligned.filter(pl.col("spikes") == 0)
    if quiet.height:  # one line for every series without a spike, not one each
        names = ", ".join(_series_names(quiet, "outputs"))
        findings += f"<li>No spikes, so nothing to align, in: {_esc(names)}</li>"
    untested = aligned.filter(pl.col("p_value").is_null() & (pl.col("spikes") > 0))
    findings += "".join(f"<li>{_esc(s)}</li>" for s in untested["finding"].to_list())
    verdict = f'<p class="verdict">{_esc(_verdict(trace, aligned, tested, event, level))}</p>'
    parts = [head, verdict, f'<ul class="findings">{findings}</ul>', _method_note(aligned, tested, level)]
    parts.append(_groups_html(trace, level))
    if tested.height:
        parts.append(
            f"<h3>Spikes after {_esc(event)}, per series with a spike</h3>"
            f"{_table(_alignment_view(tested.sort('p_value')))}"
        )
        windows = SENSITIVITY_WINDOWS[level]
        several = trace.event_alignment(event=event, level=level, window=windows)
        several = several.join(
            tested.select(SERIES_KEYS["outputs"]), on=SERIES_KEYS["outputs"], how="semi", nulls_equal=True
        )
        unit = "passes" if level == "pass" else "epochs"
        parts.append(
            f"<h3>The same for windows of {', '.join(map(str, windows))} {unit}</h3>"
            f'<p class="note">The default window is not a free choice: an effect that is real shows at '
            f"every window that covers it (q-values within each window).</p>{_table(_alignment_view(several, True))}"
        )
    parts.append(_steps_html(trace, event, level))
    return "".join(parts) + "</section>"


def _verdict(trace: Trace, aligned: pl.DataFrame, tested: pl.DataFrame, event: str, level: Level) -> str:
    """The answer in one or two sentences: in how many series spikes follow the event (q < 0.05), which
    layers spike together, and what the placebo says."""
    n = aligned.height
    if tested.is_empty():
        return f"No series has both a spike and a {event} event in its span, so there is nothing to test."
    found = tested.filter(pl.col("q_value") < SIGNIFICANT)
    if found.is_empty():
        return (
            f"Spikes do not follow {event} more often than chance in any of the {tested.height} series "
            f"tested (smallest q = {_least(tested['q_value']):.2g})."
        )
    groups = trace.spike_groups("outputs", level=level).filter(pl.col("size") > 1)
    keys = SERIES_KEYS["outputs"]
    grouped = groups.join(found.select(keys), on=keys, how="semi", nulls_equal=True)
    together = ""
    if grouped.height:  # groups are numbered per run and rank: a group is (run, rank, group)
        sizes = (
            grouped.group_by("run", "rank", "group", maintain_order=True)
            .len()
            .sort("len", descending=True, maintain_order=True)
        )
        top = sizes.row(0, named=True)
        largest = grouped.filter(
            (pl.col("run") == top["run"])
            & (pl.col("rank") == top["rank"])
            & (pl.col("group") == top["group"])
        )
        names = ", ".join(_series_names(largest, "outputs", several_runs=False))
        where = f"In {top['run']}, " if trace.run_table.height > 1 else ""
        together = f" {where}{names} spike together: one finding, not {largest.height}"
        more = sizes.height - 1
        together += f"; {more} more such group{'s' if more > 1 else ''} below." if more else "."
    placebo = found.filter(pl.col("placebo_p").is_not_null())
    boundary = ""
    if placebo.height:
        worst = _least(placebo["placebo_p"])
        bound = "= 1" if worst >= 1 else f"≥ {worst:.2g}"
        boundary = (
            f" The other {PLACEBO}, tested the same way, are not followed by spikes (placebo p {bound})."
            if worst >= SIGNIFICANT
            else f" But the other {PLACEBO} are followed by spikes too (placebo p = {worst:.2g}): the boundary, "
            f"not {event} itself, may be the cause."
        )
    return f"Spikes follow {event} in {found.height} of {n} output series (q < {SIGNIFICANT}).{together}{boundary}"


SIGNIFICANT = 0.05
"""The q-value below which the report's verdict counts a series as one where spikes follow the event."""

LISTED = 12
"""Findings listed one by one before those not significant are folded away (a sweep has hundreds)."""


def _collapsed(tested: pl.DataFrame, none_found: str) -> str:
    """``<li>`` findings of the tested series, most significant first; beyond ``LISTED`` lines the ones
    with q >= ``SIGNIFICANT`` fold into one expandable line, so a sweep's report opens on what was found."""
    ordered = tested.sort("p_value")
    lines = [f"<li>{_esc(s)}</li>" for s in ordered["finding"].to_list()]
    if len(lines) <= LISTED:
        return "".join(lines)
    significant = ordered["q_value"].fill_null(1.0) < SIGNIFICANT
    shown = [line for line, sig in zip(lines, significant, strict=True) if sig]
    folded = [line for line, sig in zip(lines, significant, strict=True) if not sig]
    if not folded:
        return "".join(shown)
    return "".join(shown) + (
        f"<li><details><summary>{len(folded)} other series: {_esc(none_found)} (q ≥ {SIGNIFICANT})</summary>"
        f"<ul>{''.join(folded)}</ul></details></li>"
    )


def _least(values: pl.Series) -> float:
    """The smallest of some p- or q-values known to hold one (Polars types a Series' min broadly)."""
    return cast(float, values.min())


def _series_names(frame: pl.DataFrame, table: str, *, several_runs: bool | None = None) -> list[str]:
    """Series as a reader names them: the module (``module.param``), the split when not "train", and the
    run and rank when there are several (``several_runs=False``: never the run)."""
    if several_runs is None:
        several_runs = frame["run"].n_unique() > 1
    several_ranks = frame["rank"].n_unique() > 1
    names = []
    for row in frame.iter_rows(named=True):
        name = row["module"] + (f".{row['param']}" if table == "params" else "")
        if table == "outputs" and row["split"] != "train":
            name += f" [{row['split']}]"
        if several_ranks:
            name += f" (rank {row['rank']})"
        names.append(f"{row['run']}: {name}" if several_runs else name)
    return names


def _no_events_html(trace: Trace, spikes: pl.DataFrame | None, level: Level) -> str:
    """Findings for runs that recorded no event: where each series spiked, in excursions."""
    head = '<section id="alignment"><h2>Findings: spikes</h2>'
    note = (
        '<p class="note">The runs recorded no events, so spikes cannot be related to one: mark them with '
        "<code>Recorder.event(name)</code> (a learning-rate drop, a curriculum step) or "
        "<code>Recorder.track_target(module)</code> (a DQN's target network).</p>"
    )
    if spikes is None:
        return f"{head}{note}<p>The trace has no output norms.</p></section>"
    if spikes.is_empty():
        return f'{head}{note}<p class="verdict">No spikes in any output series.</p></section>'
    clusters = trace.spike_clusters("outputs", level=level)
    keys = SERIES_KEYS["outputs"]
    per = (
        clusters.group_by(keys)
        .agg(
            pl.col("spikes").sum(),
            pl.len().alias("excursions"),
            pl.col("onset").min().alias("first"),
            pl.col("onset").max().alias("last"),
            pl.col("peak_score").abs().max().alias("largest |score|"),
        )
        .sort("excursions", descending=True)
    )
    names = _series_names(per, "outputs")
    items = "".join(
        f"<li>{_esc(name)}: {row['spikes']} spikes in {row['excursions']} excursions, from {level} "
        f"{row['first']} to {row['last']}</li>"
        for name, row in zip(names, per.iter_rows(named=True), strict=True)
    )
    verdict = f"{per.height} output series spiked."
    return f'{head}{note}<p class="verdict">{_esc(verdict)}</p><ul class="findings">{items}</ul></section>'


def _method_note(aligned: pl.DataFrame, tested: pl.DataFrame, level: Level) -> str:
    """How to read the numbers: units, the permutation p and its floor, BH, and the placebo."""
    if aligned.height == 0 or tested.height == 0:
        return ""
    floor = tested["p_floor"][0]
    placebo = (
        f" The placebo repeats the test on the {PLACEBO} that are not within the window of an event: an "
        "effect of the event, not of the boundary, shows as a small p beside a large placebo p."
        if level == "pass"
        else ""
    )
    return (
        '<p class="note">Counted in events: an event is followed when a spike cluster (spikes closer than '
        "the larger of the window and half the detector's baseline are one excursion) starts within the "
        "window after it. Chance is the share of followed events among the events moved at random a few "
        "event gaps away (local jitter, so drifting spike and event rates cancel); p is the share of "
        f"{round(1 / floor) - 1} such jittered event trains that do at least as well, so it cannot go below "
        f"{format_p(floor, floor).removeprefix('p ≤ ')}. q is the Benjamini–Hochberg q-value across the "
        f"{tested.height} series tested. Layers of one network are correlated — one excursion reaches "
        "several layers — and BH stays valid under such positive dependence (PRDS), but correlated layers "
        f"are one piece of evidence, not several: see the groups below.{placebo}</p>"
    )


def _groups_html(trace: Trace, level: Level) -> str:
    """Series whose spike clusters are the same excursions, listed as groups of two or more."""
    groups = trace.spike_groups("outputs", level=level).filter(pl.col("size") > 1)
    if groups.is_empty():
        return ""
    items = []
    multi_run = groups["run"].n_unique() > 1
    for (run, rank, _), part in groups.group_by("run", "rank", "group", maintain_order=True):
        names = ", ".join(
            m + (f" ({s})" if s != "train" else "") for m, s in part.select("module", "split").iter_rows()
        )
        where = f"{run}, rank {rank}: " if multi_run or rank else ""
        share = cast(float, part["shared"].mean())  # a float column with rows
        items.append(
            f"<li>{_esc(where + names)} — {share:.0%} of their spike clusters start within "
            f"{TOLERANCE[level]} {level}{'es' if level == 'pass' else 's'} of one another's</li>"
        )
    return f'<h3>Layers whose spikes are the same excursions</h3><ul class="findings">{"".join(items)}</ul>'


def _alignment_view(frame: pl.DataFrame, windows: bool = False) -> pl.DataFrame:
    """The alignment columns worth a reader's eye, "k of E" written out."""
    keys = ["module", "split"] + (["run"] if frame["run"].n_unique() > 1 else [])
    keys += ["rank"] if frame["rank"].n_unique() > 1 else []
    placebo: list[pl.Expr | str] = (
        [
            pl.format("{} of {}", "placebo_followed", "placebo_events").alias("placebo followed"),
            "placebo_chance",
            _p_text("placebo_p").alias("placebo p"),
        ]
        if frame["placebo_events"].is_not_null().any()
        else []
    )
    return frame.select(
        *keys,
        *(["window"] if windows else []),
        pl.format("{} of {}", "events_followed", "events").alias("events followed"),
        "chance",
        "enrichment",
        pl.format("{}–{}", pl.col("enrichment_lo").round(1), pl.col("enrichment_hi").round(1)).alias(
            "95% CI"
        ),
        _p_text("p_value").alias("p"),
        _p_text("q_value").alias("q"),
        "spikes",
        "clusters",
        *placebo,
    )


def _p_text(column: str) -> pl.Expr:
    """A p- or q-value column as text: "≤ 0.001" where it is the permutation floor (the data cannot say
    more), two significant digits otherwise."""
    value, floor = pl.col(column), pl.col("p_floor")
    digits = value.map_elements(lambda v: f"{v:.2g}", return_dtype=pl.String)
    at_floor = pl.lit("≤ ") + floor.map_elements(lambda v: f"{v:.2g}", return_dtype=pl.String)
    return pl.when(value <= floor * (1 + 1e-9)).then(at_floor).otherwise(digits)


def _steps_html(trace: Trace, event: str, level: Level) -> str:
    """Steps in the level at the event: findings and the table."""
    steps = trace.event_steps(event=event, level=level)
    steps = steps.filter(pl.col("p_value").is_not_null())
    if steps.is_empty():
        return ""
    findings = _collapsed(steps, f"no step at {event} beyond chance")
    keys = ["module", "split"] + (["run"] if steps["run"].n_unique() > 1 else [])
    table = steps.select(
        *keys,
        "events",
        pl.col("step").alias("step (robust SD)"),
        pl.format("{}%", (100 * pl.col("step_change")).round(2)).alias("change"),
        pl.format("{} of {}", "steps_up", "events").alias("up"),
        _p_text("p_value").alias("p"),
        _p_text("q_value").alias("q"),
    )
    return (
        f"<h3>Steps: the level after each {_esc(event)} against the level before it</h3>"
        '<p class="note">The spike detector cannot see a lasting step (its centred median absorbs it), so '
        "the median of the window after each event is compared with the median of the window before, in "
        "robust SDs of the series' noise; the median over events is tested two-sided against the same "
        f'jittered trains.</p><ul class="findings">{findings}</ul>{_table(table)}'
    )


def _spikes_html(spikes: pl.DataFrame | None, level: Level) -> str:
    """The highest-scoring spikes with the event that preceded each."""
    head = f'<section id="spikes"><h2>Spikes in output norms (per {level})</h2>'
    if spikes is None or spikes.is_empty():
        return f'{head}<p class="note">No spikes detected.</p></section>'
    top = spikes.sort(pl.col("score").abs(), descending=True).head(SPIKE_ROWS)
    shown = f"the {SPIKE_ROWS} highest scores of {spikes.height}" if spikes.height > SPIKE_ROWS else "all"
    varying = [k for k in ("run", "rank", "split") if top[k].n_unique() > 1]
    at = ["pass", "epoch"] if level == "pass" else ["epoch"]
    lag = ["lag_passes"] if level == "pass" else ["lag_epochs"]
    top = top.select(
        *varying[:2], "module", *varying[2:], *at, "value", "baseline", "score", "points", "event", *lag
    )
    caption = (
        "score: the distance from the baseline (a rolling median) in robust standard deviations; points: "
        "consecutive points over the threshold, merged into this spike at its peak; event and lag: the "
        f"nearest event before the spike and how many {level}{'es' if level == 'pass' else 's'} before it."
    )
    return f'{head}<p class="note">{spikes.height} spikes, {shown} shown.</p>{_table(top, caption)}</section>'


def _table(df: pl.DataFrame, caption: str = "") -> str:
    """An HTML table of a small frame (scrolling sideways when wider than the page); numbers
    right-aligned at four significant digits; ``caption`` says what its columns count."""
    numeric = [df.schema[c].is_numeric() for c in df.columns]
    head = "".join(
        f"<th{' class=num' if n else ''}>{_esc(c)}</th>" for c, n in zip(df.columns, numeric, strict=True)
    )
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=num' if n else ''}>{_esc(_cell(c, v))}</td>"
            for c, v, n in zip(df.columns, row, numeric, strict=True)
        )
        + "</tr>"
        for row in df.iter_rows()
    )
    cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
    return (
        f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'
    )


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if column in ("chance", "placebo_chance"):
            return f"{100 * value:.2g}%"
        return f"{value:.4g}"
    return str(value)


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _page(trace: Trace, body: list[str]) -> str:
    """The whole document: style, sections, the inlined Vega bundle and the loader that embeds charts."""
    from . import __version__  # the package's __init__ imports this module before defining it

    runs = ", ".join(trace.runs)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>normtrace report — {_esc(runs)}</title>
<style>{_CSS}</style>
</head>
<body>
<header><h1>normtrace report</h1>
<p class="note">Runs: {_esc(runs)}. Written {stamp} by normtrace-analysis {__version__}.</p></header>
<main>
{"".join(body)}
</main>
<script>{_javascript()}</script>
<script>{_LOADER}</script>
</body>
</html>
"""


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f4f4f4; } td { white-space: nowrap; } .num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #555; } .error { color: #b00; font-weight: bold; }
.findings li { margin: .3em 0; } .chart { margin: 1em 0 2em; overflow-x: auto; }
.scroll { overflow-x: auto; max-width: 100%; } .verdict { font-size: 1.1em; font-weight: 600; }
caption { caption-side: bottom; text-align: left; color: #555; font-size: 12px; padding-top: .3em; }
"""

_LOADER = """
(function () {
  var options = {actions: false, mode: "vega-lite", renderer: "svg"};
  function fail(el, err) {
    el.dataset.state = "error";
    el.textContent = "This chart could not be drawn: " + err;
    console.error("normtrace: chart " + el.id + " failed:", err);
  }
  document.querySelectorAll('script[type="application/json"][data-for]').forEach(function (spec) {
    var el = document.getElementById(spec.dataset.for);
    try {
      vegaEmbed(el, JSON.parse(spec.textContent), options)
        .then(function () { el.dataset.state = "rendered"; })
        .catch(function (err) { fail(el, err); });
    } catch (err) { fail(el, err); }
  });
})();
"""
