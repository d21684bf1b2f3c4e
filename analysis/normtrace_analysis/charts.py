"""Altair charts of a trace: norm curves per module, each layer's share of the norm, metrics, the
event-triggered average, and the signals (gradient norms, update ratios, dead units) per layer and step.

Every chart aggregates with Polars before it reaches Altair: the x axis (epochs or passes) is cut into
bins so that a chart's curves embed at most about ``max_rows`` rows whatever the run length, and event
rules and spike markers are bounded too. A 10-million-row trace therefore still gives a small chart.
Events (target-network updates, user events) are vertical rules on every panel and detected spikes are
marked points. Each function returns an Altair chart object for notebooks to compose and restyle.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

import altair as alt
import polars as pl

from .names import LEVELS, LOG_KINDS, SERIES_KEYS, SUMMARY_KEYS, Level, Table

if TYPE_CHECKING:
    from .trace import Trace

Band = Literal["p05-p95", "min-max", "none"]
Axis = Literal["pass", "epoch", "step"]
"""What a chart's x axis counts: passes or epochs (every table), or optimizer steps (signals)."""
Layout = Literal["panels", "overlay"]

MAX_ROWS = 3000
"""Default budget of aggregated curve rows per chart (a few thousand keeps the HTML small and fast)."""

DIGITS = 6
"""Significant digits kept in embedded values: far below what a chart or its tooltip can show."""

MAX_SPIKES = 300
"""Most spike markers drawn on one chart: the highest scores are kept."""

_BANDS = {"p05-p95": (0.05, 0.95), "min-max": (0.0, 1.0)}
_WIDE, _TALL = 640, 300
_SMALL_WIDE, _SMALL_TALL = 260, 150
_FORMAT = ".4~g"


@dataclass(frozen=True)
class Grid:
    """Bins along x shared by all curves of a chart: ``width`` consecutive epochs or passes from ``lo``."""

    lo: int
    hi: int
    width: int

    @classmethod
    def fit(cls, lo: int, hi: int, bins: int) -> Grid:
        """The narrowest grid covering ``lo..hi`` with at most ``bins`` bins."""
        return cls(lo, hi, max(1, math.ceil((hi - lo + 1) / max(1, bins))))

    def start(self, x: str) -> pl.Expr:
        """First x value of the bin that column ``x`` falls in."""
        return pl.lit(self.lo, pl.Int64) + (pl.col(x).cast(pl.Int64) - self.lo) // self.width * self.width


def x_domain(trace: Trace, level: Level = "epoch") -> tuple[int, int]:
    """Smallest and largest epoch (or pass) in any table, so that separate charts share one x axis."""
    x = _x_column(level)
    frames = [getattr(trace, name) for name in ("outputs", "params", "metrics", "events")]
    bounds = pl.collect_all([lf.select(lo=pl.col(x).min(), hi=pl.col(x).max()) for lf in frames])
    los = [b["lo"][0] for b in bounds if b["lo"][0] is not None]
    his = [b["hi"][0] for b in bounds if b["hi"][0] is not None]
    if not los:
        raise ValueError("the trace has no rows in any table")
    return int(min(los)), int(max(his))


def norms(
    trace: Trace,
    table: Table = "outputs",
    *,
    level: Level = "epoch",
    band: Band = "p05-p95",
    log: bool = False,
    events: bool | Sequence[str] = True,
    spikes: bool | pl.DataFrame = True,
    max_rows: int = MAX_ROWS,
    domain: tuple[int, int] | None = None,
    layout: Layout = "panels",
) -> alt.TopLevelMixin:
    """Norm curves of every module (outputs) or parameter (params), per epoch or per pass.

    ``layout="panels"`` (the default) gives every series a small panel with its own y scale, in the
    model's order and named with its class (``net.2 (ReLU)``), so that a layer whose norm is a
    hundredth of the output's still shows its spikes; colour is the module, or the run when there are
    several. ``layout="overlay"`` draws every series in one view (with ``log=True``, to compare levels;
    with several runs, panels are kept). The line is the mean over the rows in each x bin and the band
    spans ``band`` (p05-p95 or min-max) of them. ``spikes`` is True to run ``trace.spikes`` at this
    level, False for none, or a frame it returned.
    """
    if layout not in ("panels", "overlay"):
        raise ValueError(f"layout must be 'panels' or 'overlay', not {layout!r}")
    _norms_only(table)
    lf = getattr(trace, table)
    x = _x_column(level)
    ids = SUMMARY_KEYS[table]
    groups = (
        lf.group_by(ids)
        .agg(
            lo=pl.col(x).min(),
            hi=pl.col(x).max(),
            mean=pl.col("value").filter(pl.col("value").is_finite()).mean(),
        )
        .collect()
    )
    if groups.is_empty():
        raise ValueError(f"the trace has no {table} rows to chart")
    classes = module_classes(trace, table)
    label = _series_label(
        table, several_splits=table == "outputs" and groups["split"].n_unique() > 1, classes=classes
    )
    found = None if spikes is False else trace.spikes(table=table, level=level) if spikes is True else spikes
    shown, others = _most_telling(groups, ids, found)
    grid = _grid(groups, domain, max(2, max_rows // (shown.height + others["run"].n_unique())))
    curves = _curves(lf.join(shown.lazy(), on=ids, how="semi", nulls_equal=True), x, ids, band, grid, label)
    title_note = ""
    if others.height:
        rest = _others_label(others.height, table)
        lumped = _curves(
            lf.join(others.lazy(), on=ids, how="semi", nulls_equal=True), x, ["run"], band, grid, pl.lit(rest)
        )
        curves = pl.concat([curves, lumped.select(curves.columns)])
        title_note = f" ({shown.height} of {groups.height} series shown: {_SHOWN_RULE}; {rest})"
    rules = _event_rules(trace, x, grid, events)
    marks = _spike_marks(found, label, level, shown, ids)
    if log:
        curves, marks = _positive_only(curves), marks.filter(pl.col("y") > 0)
    y_title = value_title(trace, table)
    several_runs = curves["run"].n_unique() > 1
    order = _in_model_order(curves["series"].unique().to_list(), classes)
    if not several_runs and layout == "overlay":
        layers = _layers(curves, rules, marks, "series", grid, level, y_title, log, select=True, order=order)
        title = f"{y_title} per {level} — {printable(curves['run'][0])}{title_note}"
        return alt.layer(*layers).properties(width=_WIDE, height=_TALL, title=title)
    colour = "run" if several_runs else "series"
    panels = []
    for series in order:
        part = curves.filter(pl.col("series") == series)
        spots = marks.filter(pl.col("series") == series)
        layers = _layers(part, rules, spots, colour, grid, level, y_title, log, select=False, order=order)
        panels.append(
            alt.layer(*layers).properties(width=_SMALL_WIDE, height=_SMALL_TALL, title=printable(series))
        )
    whose = "by run" if several_runs else printable(curves["run"][0])
    title = f"{y_title} per {level} — {whose}, one panel per series with its own y scale{title_note}"
    return alt.concat(*panels, columns=3).properties(title=title)


MAX_SERIES = 20
"""Most series drawn one by one in a chart (more lines, or more panels, cannot be told apart); the rest
are drawn as one lumped curve (mean and band over all their rows), and the chart's title says so."""

_SHOWN_RULE = "those with the most spikes, then the largest mean"


def _most_telling(
    groups: pl.DataFrame, ids: list[str], found: pl.DataFrame | None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split the series (``groups``: one row per ``ids``) into the ``MAX_SERIES`` distinct names to draw,
    across runs, ranked by spike count then mean value, and the rest (both as frames of ``ids``)."""
    keys = ids[1:]
    if groups.select(keys).n_unique() <= MAX_SERIES:
        return groups.select(ids), groups.select(ids).clear()
    ranked = groups.group_by(keys).agg(pl.col("mean").max())
    if found is not None and not found.is_empty():
        counts = found.group_by(keys).len("spikes")
        ranked = ranked.join(counts, on=keys, how="left", nulls_equal=True)
    else:
        ranked = ranked.with_columns(spikes=pl.lit(None, pl.UInt32))
    top = ranked.sort(
        pl.col("spikes").fill_null(0), pl.col("mean").fill_nan(None), *keys, descending=True, nulls_last=True
    ).head(MAX_SERIES)
    shown = groups.join(top.select(keys), on=keys, how="semi", nulls_equal=True).select(ids)
    return shown, groups.join(top.select(keys), on=keys, how="anti", nulls_equal=True).select(ids)


def _others_label(n: int, table: Table) -> str:
    """Name of the lumped curve of the series not drawn one by one."""
    return f"the other {n} {'modules' if table == 'outputs' else 'parameters'} together"


def share(
    trace: Trace,
    table: Table = "outputs",
    *,
    events: bool | Sequence[str] = True,
    max_rows: int = MAX_ROWS,
    domain: tuple[int, int] | None = None,
) -> alt.TopLevelMixin:
    """Each layer's fraction of the summed norm per epoch, as stacked areas (one panel per run).

    Outputs use the leaf modules only (a container's output repeats its children's), each module's
    epoch mean; parameters combine a module's tensors as the root of the summed squared norms.
    """
    _norms_only(table)
    lf = getattr(trace, table).filter(pl.col("value").is_finite())
    if table == "outputs":
        leaves = _leaf_modules(lf.select(pl.col("module").unique()).collect()["module"].to_list())
        per_module = (
            lf.filter(pl.col("module").is_in(leaves))
            .group_by("run", "epoch", "module")
            .agg(norm=pl.col("value").mean())
        )
    else:
        per_module = (
            lf.group_by("run", "epoch", "module", "param")
            .agg(norm=pl.col("value").mean())
            .group_by("run", "epoch", "module")
            .agg(norm=(pl.col("norm") ** 2).sum().sqrt())
        )
    total = pl.col("norm").sum().over("run", "epoch")
    frame = per_module.with_columns(share=(pl.col("norm") / total).fill_nan(None)).collect()  # 0/0: no share
    if frame.is_empty():
        raise ValueError(f"the trace has no {table} rows to chart")
    title_note = ""
    modules = frame.group_by("module").agg(pl.col("share").mean()).sort("share", "module", descending=True)
    if modules.height > MAX_SERIES:  # the largest shares one by one, the rest as one area
        kept = modules["module"].head(MAX_SERIES - 1)
        rest = _others_label(modules.height - kept.len(), table)
        frame = (
            frame.with_columns(
                pl.when(pl.col("module").is_in(kept.implode())).then("module").otherwise(pl.lit(rest))
            )
            .group_by("run", "epoch", "module")
            .agg(pl.col("share").sum())
        )
        title_note = f" ({kept.len()} largest of {modules.height} shown one by one; {rest})"
    groups = frame.group_by("run", "module").agg(lo=pl.col("epoch").min(), hi=pl.col("epoch").max())
    grid = _grid(groups, domain, max(2, max_rows // groups.height))
    areas = (
        frame.with_columns(x_lo=grid.start("epoch"))
        .group_by("run", "module", "x_lo")
        .agg(share=pl.col("share").mean().round_sig_figs(DIGITS), x_hi=pl.col("epoch").max())
        .with_columns(x=pl.col("x_lo") + (grid.width - 1) / 2)
        .sort("run", "module", "x_lo")
    )
    classes = module_classes(trace, table)
    suffixes = {m: f" ({c})" for m, c in classes.items()}
    areas = areas.with_columns(
        pl.concat_str(
            ["module", pl.col("module").replace_strict(suffixes, default="", return_dtype=pl.String)]
        )
    )
    order = [printable(m) for m in _in_model_order(areas["module"].unique().to_list(), classes)]
    palette = alt.Scale(domain=order, scheme="tableau10" if len(order) <= 10 else "tableau20")
    rules = _event_rules(trace, "epoch", grid, events)
    x_enc = _x_encoding("epoch", grid)
    one_run = areas["run"].n_unique() == 1
    panels = []
    for (run,), part in areas.group_by("run", maintain_order=True):
        pick = alt.selection_point(fields=["module"], bind="legend") if one_run else None
        ranked = _printable_frame(part).with_columns(
            pl.col("module")
            .replace_strict(order, list(range(len(order))), return_dtype=pl.Int64)
            .alias("_rank")
        )
        stack = (
            alt.Chart(ranked)
            .mark_area()
            .encode(
                x=x_enc,
                y=alt.Y("share:Q", stack="normalize", title="share of the norm", axis=alt.Axis(format="%")),
                color=alt.Color("module:N", title="module", scale=palette, sort=order),
                order=alt.Order("_rank:Q"),
                opacity=alt.when(pick).then(alt.value(0.9)).otherwise(alt.value(0.2))
                if pick
                else alt.value(0.9),
                tooltip=[
                    "module:N",
                    alt.Tooltip("x_lo:Q", title="epochs from"),
                    alt.Tooltip("x_hi:Q", title="to"),
                    alt.Tooltip("share:Q", format=".1%"),
                ],
            )
        )
        layers = [
            stack.add_params(pick) if pick else stack,
            *_rule_layer(rules.filter(pl.col("run") == run), x_enc),
        ]
        width = _WIDE if one_run else 360
        panels.append(alt.layer(*layers).properties(width=width, height=_TALL, title=printable(str(run))))
    what = "output" if table == "outputs" else "parameter"
    return alt.hconcat(*panels).properties(title=f"share of the {what} norm per epoch{title_note}")


SIGNAL_TITLES: dict[str, str] = {
    "grad_norm": "gradient norm (L2)",
    "grad_cosine": "cosine of successive gradients",
    "update_ratio": "update ratio ‖Δθ‖/‖θ‖",
    "update_cosine": "cosine of successive updates",
    "output_grad_norm": "norm of the gradient at the output (L2)",
    "active_rate": "active rate (share of non-zero outputs)",
    "dead_fraction": "dead fraction (share of units zero on the whole batch)",
}
"""The y-axis title of each kind of signal normtrace records (a user's kind is titled by its name)."""

UPDATE_BAND = (1e-4, 1e-2)
"""The shaded reference band of the update-ratio chart, around the rule at 1e-3 (see
:data:`.signals.UPDATE_BAND`, the band its finding uses)."""


def signals(
    trace: Trace,
    kind: str = "grad_norm",
    *,
    band: Band = "p05-p95",
    log: bool | None = None,
    events: bool | Sequence[str] = True,
    spikes: bool | pl.DataFrame = True,
    max_rows: int = MAX_ROWS,
) -> alt.TopLevelMixin:
    """One signal per layer over optimizer steps: a curve per module (and parameter) in one view, in the
    model's order, coloured by series, with the events as rules and the detected spikes as points.

    ``kind`` is one recorded kind (``"grad_norm"``, ``"update_ratio"``, ``"dead_fraction"`` …; an
    unknown one is refused, naming those recorded). ``log=None`` draws the kinds that span orders of
    magnitude (:data:`.names.LOG_KINDS`: gradient norms, update ratios) on a log scale and the others
    linearly. The update ratio's view shades :data:`UPDATE_BAND` and rules 1e-3, the usual healthy size
    of a step. The line is the mean over the rows in each bin of steps and the band spans ``band`` of
    them; at most :data:`MAX_SERIES` series are drawn one by one (those with the most spikes, then the
    largest mean), the rest as one lumped curve; with several runs, one panel per run. ``spikes`` is
    True to run ``trace.spikes("signals")`` on this kind, False for none, or a frame it returned.
    """
    recorded = trace.signal_kinds()
    if kind not in recorded:
        have = ", ".join(recorded) if recorded else "none (the trace has no signals table)"
        raise ValueError(f"no {kind!r} signals to chart; the trace records kinds: {have}")
    lf = trace.signals.filter(pl.col("kind") == kind).with_columns(pl.col("value").cast(pl.Float64))
    ids = SUMMARY_KEYS["signals"]
    groups = (
        lf.group_by(ids)
        .agg(
            lo=pl.col("step").min(),
            hi=pl.col("step").max(),
            mean=pl.col("value").filter(pl.col("value").is_finite()).mean(),
        )
        .collect()
    )
    classes = {**module_classes(trace, "params"), **module_classes(trace, "outputs")}
    label = _signal_label(classes)
    one_kind = trace.of_kind(kind)
    found = None if spikes is False else one_kind.spikes("signals") if spikes is True else spikes
    if found is not None:
        found = _with_steps(trace, found.filter(pl.col("kind") == kind), exact=True)
    shown, others = _most_telling(groups, ids, found)
    grid = _grid(groups, None, max(2, max_rows // (shown.height + others["run"].n_unique())))
    curves = _curves(
        lf.join(shown.lazy(), on=ids, how="semi", nulls_equal=True), "step", ids, band, grid, label
    )
    title_note = ""
    if others.height:
        rest = f"the other {others.height} series together"
        lumped = _curves(
            lf.join(others.lazy(), on=ids, how="semi", nulls_equal=True),
            "step",
            ["run"],
            band,
            grid,
            pl.lit(rest),
        )
        curves = pl.concat([curves, lumped.select(curves.columns)])
        title_note = f" ({shown.height} of {groups.height} series shown: {_SHOWN_RULE}; {rest})"
    rules = _step_rules(trace, grid, events)
    marks = _spike_marks(found, label, "step", shown, ids)
    log = kind in LOG_KINDS if log is None else log
    if log:
        curves, marks = _positive_only(curves), marks.filter(pl.col("y") > 0)
    y_title = SIGNAL_TITLES.get(kind, printable(kind))
    order = _in_model_order(curves["series"].unique().to_list(), classes)
    panels = []
    for (run,), part in curves.group_by("run", maintain_order=True):
        layers = _layers(
            part,
            rules.filter(pl.col("run") == run),
            marks.filter(pl.col("run") == run),
            "series",
            grid,
            "step",
            y_title,
            log,
            select=True,
            order=order,
        )
        if kind == "update_ratio":
            layers = [*_update_band(), *layers]
        panels.append(alt.layer(*layers).properties(width=_WIDE, height=_TALL, title=printable(str(run))))
    return alt.vconcat(*panels).properties(title=f"{y_title} per step, one curve per layer{title_note}")


def _norms_only(table: str) -> None:
    """Refuse the signals table where a chart draws norms (a signal's kind is part of its series)."""
    if table not in ("outputs", "params"):
        raise ValueError(
            f"this chart draws output or parameter norms, not {table!r}; for the signals use "
            "charts.signals(trace, kind)"
        )


def _signal_label(classes: dict[str, str]) -> pl.Expr:
    """Name of a signal's curve: ``module.param`` or ``module`` (``(model)`` for the whole model, module
    ""), with the module's class from ``classes`` (``net.0.weight (Linear)``)."""
    module = pl.when(pl.col("module") == "").then(pl.lit("(model)")).otherwise(pl.col("module"))
    name = pl.concat_str([module, pl.lit("."), pl.col("param")], ignore_nulls=False).fill_null(module)
    if not classes:
        return name
    suffixes = {m: f" ({c})" for m, c in classes.items()}
    return pl.concat_str(
        [name, pl.col("module").replace_strict(suffixes, default="", return_dtype=pl.String)]
    )


def _with_steps(trace: Trace, frame: pl.DataFrame, *, exact: bool) -> pl.DataFrame:
    """``frame`` (run, rank, pass, …) with the ``step`` of its pass: that of the signals measured at the
    pass (``exact``; a spike's own row), or of the last measurement at or before it (an event, recorded
    after its pass: the steps completed by then). Null before the first measurement."""
    steps = trace.signals.group_by("run", "rank", "pass").agg(pl.col("step").max()).sort("pass").collect()
    if frame.is_empty():
        return frame.with_columns(pl.lit(None, pl.Int64).alias("step"))
    if exact:
        return frame.join(steps, on=["run", "rank", "pass"], how="left")
    return frame.sort("pass").join_asof(
        steps, on="pass", by=["run", "rank"], strategy="backward", check_sortedness=False
    )


def _step_rules(trace: Trace, grid: Grid, which: bool | Sequence[str]) -> pl.DataFrame:
    """The event rules of a chart over steps: each event at the steps completed when it was recorded,
    one rule per run, name and bin of steps (as :func:`_event_rules` does for passes)."""
    events = trace.events.select("run", "rank", "pass", "name").collect()
    if which is False:
        events = events.clear()
    elif which is not True:
        events = events.filter(pl.col("name").is_in(list(which)))
    at = _with_steps(trace, events, exact=False).filter(pl.col("step").is_between(grid.lo, grid.hi))
    return (
        at.with_columns(x_bin=grid.start("step"))
        .group_by("run", "name", "x_bin")
        .agg(x=pl.col("step").min().cast(pl.Float64), count=pl.len(), last=pl.col("step").max())
        .drop("x_bin")
        .sort("run", "name", "x")
    )


def _update_band() -> list[alt.Chart]:
    """The update ratio's reference: :data:`UPDATE_BAND` shaded, a rule at 1e-3."""
    lo, hi = UPDATE_BAND
    band = alt.Chart(pl.DataFrame({"lo": [lo], "hi": [hi]})).mark_rect(color="#2ca02c", opacity=0.08)
    rule = alt.Chart(pl.DataFrame({"y": [1e-3]})).mark_rule(color="#2ca02c", strokeDash=[6, 3])
    return [
        band.encode(y=alt.Y("lo:Q", scale=alt.Scale(type="log")), y2="hi:Q"),
        rule.encode(y=alt.Y("y:Q", scale=alt.Scale(type="log"))),
    ]


def metrics(
    trace: Trace,
    names: Sequence[str] | None = None,
    *,
    level: Level = "epoch",
    band: Band = "p05-p95",
    log: bool = False,
    events: bool | Sequence[str] = True,
    max_rows: int = MAX_ROWS,
    domain: tuple[int, int] | None = None,
) -> alt.TopLevelMixin:
    """One panel per metric (loss, total_reward, ...) stacked vertically over the same x axis.

    Colour is the run when there are several, else the split (train/val) when the metric has one.
    """
    lf = trace.metrics
    if names is not None:
        lf = lf.filter(pl.col("name").is_in(list(names)))
    x = _x_column(level)
    groups = lf.group_by("run", "name", "split").agg(lo=pl.col(x).min(), hi=pl.col(x).max()).collect()
    if groups.is_empty():
        raise ValueError("the trace has no metrics to chart")
    order = sorted(groups["name"].unique().to_list(), key=lambda n: (n != "loss", n))
    note = ""
    if len(order) > MAX_SERIES:
        note = f" (the first {MAX_SERIES} of {len(order)} metrics: pass names=[...] for the others)"
        order = order[:MAX_SERIES]
        groups = groups.filter(pl.col("name").is_in(order))
        lf = lf.filter(pl.col("name").is_in(order))
    several_runs = groups["run"].n_unique() > 1
    parts = [pl.col("run")] if several_runs else []
    label = pl.concat_str([*parts, pl.col("split").fill_null(pl.col("name"))], separator=" ")
    grid = _grid(groups, domain, max(2, max_rows // groups.height))
    curves = _curves(lf, x, ["run", "name", "split"], band, grid, label)
    if log:
        curves = _positive_only(curves)
    rules = _event_rules(trace, x, grid, events)
    no_spikes = pl.DataFrame(schema={"series": pl.String, "x": pl.Float64, "y": pl.Float64})
    panels = []
    for name in order:
        part = curves.filter(pl.col("name") == name)
        # the name goes in the panel's title, plain text: an axis title also reaches a Vega expression
        layers = _layers(part, rules, no_spikes, "series", grid, level, "value", log, select=False)
        panels.append(alt.layer(*layers).properties(width=_WIDE, height=_SMALL_TALL, title=printable(name)))
    return alt.vconcat(*panels).properties(title=f"metrics per {level}{note}")


_CONTROL = re.compile("[\x00-\x1f\x7f\u2028\u2029]")
"""Characters a chart must not show raw: NUL aborts vl-convert's PNG/SVG export (a panic, not an
exception), and line breaks garble titles and legends."""


def printable(text: str) -> str:
    """``text`` with control characters and line separators spelled as escapes (``\\n``, ``\\x00``):
    module, metric, event and run names are the user's, and any of them may hold one."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


def _printable_frame(df: pl.DataFrame) -> pl.DataFrame:
    """``df`` with :func:`printable` applied to every string column that needs it (chart data only)."""
    fixes = [
        pl.col(c).map_elements(printable, return_dtype=pl.String)
        for c, dtype in df.schema.items()
        if dtype == pl.String and df[c].str.contains(_CONTROL.pattern).any()
    ]
    return df.with_columns(fixes) if fixes else df


def event_profile(
    trace: Trace,
    event: str = "target_update",
    *,
    window: int | None = None,
    level: Level = "pass",
    table: Table = "outputs",
    modules: Sequence[str] | str | None = None,
    placebo: bool = True,
    panels: int = 12,
) -> alt.TopLevelMixin:
    """The event-triggered average: every series from −W to +W around ``event``, one small panel each.

    With more than ``panels`` series, the ``panels`` whose average after the event strays farthest from 1
    are drawn (in series order): a hundred layers' panels would bury the ones where something happens.

    The line is the median over events of the value divided by its event's pre-event median (1 = as
    before the event), the band the quartiles over events; the placebo (epoch boundaries away from every
    event) is drawn beside it in grey when there is one. The median rather than the mean: early in
    training a few events move a norm several-fold, and a mean (and its interval) is then theirs alone;
    the tooltip has the mean and its 95% interval too. The rule between offsets 0 and 1 is the event:
    it is recorded after the pass of offset 0. Data: :meth:`Trace.event_profile`.
    """
    frame = trace.event_profile(
        event, window=window, level=level, table=table, modules=modules, placebo=placebo
    )
    if frame.filter(pl.col("kind") == "event").is_empty():
        raise ValueError(f"no {event} events (or no {table} rows around them) to profile")
    keys = SERIES_KEYS[table]
    several = {k: frame[k].n_unique() > 1 for k in keys if k != "module"}
    parts = [pl.col("run")] if several["run"] else []
    parts.append(pl.col("module") + (pl.lit(".") + pl.col("param") if table == "params" else pl.lit("")))
    if table == "outputs" and several.get("split"):
        parts.append(pl.lit("[") + pl.col("split") + pl.lit("]"))
    if several["rank"]:
        parts.append(pl.lit("rank ") + pl.col("rank").cast(pl.String))
    strays = (
        frame.filter((pl.col("kind") == "event") & (pl.col("offset") > 0))
        .group_by(keys)
        .agg((pl.col("median") - 1).abs().max().alias("_stray"))
        .sort("_stray", descending=True, nulls_last=True)
        .head(panels)
    )
    frame = frame.join(strays.select(keys), on=keys, how="semi", nulls_equal=True)
    # Offsets no event has a point at (a series recorded every other pass) would break the line.
    data = (
        frame.filter(pl.col("events") > 0)
        .with_columns(
            pl.concat_str(parts, separator=" ").alias("series"),
            pl.col("mean", "ci_lo", "ci_hi", "median", "p25", "p75").round_sig_figs(DIGITS),
        )
        .select("series", "kind", "offset", "events", "median", "p25", "p75", "mean", "ci_lo", "ci_hi")
    )
    unit = "passes" if level == "pass" else "epochs"
    x = alt.X("offset:Q", title=f"{unit} from the event")
    # The legend's labels are data, not a labelExpr: an event name is the user's and may hold quotes,
    # and no user string may reach a Vega expression (titles of encodings do too: they stay generic).
    around = {"event": printable(event), "placebo": "other epoch boundaries"}
    data = data.with_columns(pl.col("kind").replace_strict(around, return_dtype=pl.String))
    colour = alt.Color(
        "kind:N",
        title="around",
        scale=alt.Scale(domain=list(around.values()), range=["#d62728", "#7f7f7f"]),
    )
    y_title = "value / pre-event median"
    drawn = []  # one panel per series (``panels`` is their number)
    for (series,), part in data.group_by("series", maintain_order=True):
        base = alt.Chart(_printable_frame(part))
        layers = [
            base.mark_area(opacity=0.2).encode(
                x=x, y=alt.Y("p25:Q", title=y_title, scale=alt.Scale(zero=False)), y2="p75:Q", color=colour
            ),
            base.mark_line(point=part.height <= 2 * 41).encode(
                x=x,
                y=alt.Y("median:Q", title=y_title),
                color=colour,
                tooltip=[
                    alt.Tooltip("kind:N"),
                    alt.Tooltip("offset:Q"),
                    alt.Tooltip("events:Q"),
                    alt.Tooltip("median:Q", format=_FORMAT),
                    alt.Tooltip("p25:Q", format=_FORMAT),
                    alt.Tooltip("p75:Q", format=_FORMAT),
                    alt.Tooltip("mean:Q", format=_FORMAT),
                    alt.Tooltip("ci_lo:Q", title="mean, 95% from", format=_FORMAT),
                    alt.Tooltip("ci_hi:Q", title="to", format=_FORMAT),
                ],
            ),
            alt.Chart(pl.DataFrame({"x": [0.5]})).mark_rule(color="#555", strokeDash=[4, 3]).encode(x="x:Q"),
            alt.Chart(pl.DataFrame({"y": [1.0]})).mark_rule(color="#999", strokeWidth=0.5).encode(y="y:Q"),
        ]
        drawn.append(
            alt.layer(*layers).properties(width=_SMALL_WIDE, height=_SMALL_TALL, title=printable(series))
        )
    return alt.concat(*drawn, columns=3).properties(
        title=f"{printable(event)}-triggered average of the {value_title(trace, table)} (median and quartiles over events)"
    )


def value_title(trace: Trace, table: Table) -> str:
    """What ``value`` means for a table: the raw L2 norm or the RMS view (norm / sqrt(numel)); for the
    signals, the kind's title when one kind is selected."""
    if table == "signals":
        kinds = trace.signal_kinds()
        return (
            SIGNAL_TITLES.get(kinds[0], printable(kinds[0])) if len(kinds) == 1 else "signal value (per kind)"
        )
    what = "output" if table == "outputs" else "parameter"
    views = {flags[table] for flags in trace.normalize.values()}
    if views == {True}:
        return f"{what} RMS (norm/√numel)"
    if views == {False}:
        return f"{what} norm (L2)"
    return f"{what} norm (RMS in some runs, L2 in others)"


def _x_column(level: Level) -> str:
    if level not in LEVELS:
        raise ValueError(f"level must be 'epoch' or 'pass', not {level!r}")
    return level


def _grid(groups: pl.DataFrame, domain: tuple[int, int] | None, bins: int) -> Grid:
    """Grid over ``domain`` (or the groups' own x range) with at most ``bins`` bins."""
    if domain is not None:
        lo, hi = domain
    else:  # min and max of an integer column (pass or epoch) with rows: ints, whatever Polars' types say
        lo, hi = cast(int, groups["lo"].min()), cast(int, groups["hi"].max())
    return Grid.fit(lo, hi, bins)


def _series_label(table: Table, *, several_splits: bool, classes: dict[str, str] | None = None) -> pl.Expr:
    """Name of a curve: the module (``module.param`` for parameters) with its class from ``classes``
    (``net.2 (ReLU)``, ``net.0.weight (Linear)``), plus the split when both occur (``[no_grad]``)."""
    name = (
        pl.concat_str([pl.col("module"), pl.lit("."), pl.col("param")])
        if table == "params"
        else pl.col("module")
    )
    if classes:
        suffixes = {m: f" ({c})" for m, c in classes.items()}
        name = pl.concat_str(
            [name, pl.col("module").replace_strict(suffixes, default="", return_dtype=pl.String)]
        )
    if table == "outputs" and several_splits:
        return pl.concat_str([name, pl.lit(" ["), pl.col("split"), pl.lit("]")])
    return name


def module_classes(trace: Trace, table: Table) -> dict[str, str]:
    """Module name -> its class name, in the model's order, from the runs' ``meta.json`` (the recorder
    lists every observed module with its class, in ``named_modules()`` order). A module the metadata
    does not list (a synthetic trace, a per-call ``act#1`` or tuple ``enc.0`` series) is left out.
    """
    listed: dict[str, str] = {}
    for meta in trace.metas.values():
        modules = meta.get("modules") if isinstance(meta, dict) else None
        entries = modules.get(table, []) if isinstance(modules, dict) else []
        for entry in entries if isinstance(entries, list) else []:
            if (
                isinstance(entry, dict)
                and isinstance(entry.get("name"), str)
                and isinstance(entry.get("class"), str)
            ):
                listed.setdefault(entry["name"], entry["class"])
    return listed


def _natural(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key reading digit runs as numbers: ``net.2`` before ``net.10``."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part)


def _in_model_order(series: list[str], classes: dict[str, str]) -> list[str]:
    """Curve names in the model's order (that of ``classes``, which :func:`module_classes` keeps), the
    others after them in natural order, the lumped rest last."""
    rank = {module: i for i, module in enumerate(classes)}

    def key(label: str) -> tuple[int, int, tuple[tuple[int, int | str], ...]]:
        if label.startswith("the other "):
            return (2, 0, ())
        module = next((m for m in rank if label == m or label.startswith((m + " ", m + "."))), None)
        return (0, rank[module], _natural(label)) if module is not None else (1, 0, _natural(label))

    return sorted(series, key=key)


def _curves(
    lf: pl.LazyFrame, x: str, keys: list[str], band: Band, grid: Grid, label: pl.Expr
) -> pl.DataFrame:
    """Mean of ``value`` per key and x bin, with the band's bounds, the bin's range and its row count.

    The curve's name (``label`` of the keys, as column ``series``) is computed after aggregating, so a
    long trace pays for it once per bin rather than once per row.
    """
    value = pl.col("value")
    if band == "none":
        bounds = [pl.lit(None, pl.Float64).alias("lo"), pl.lit(None, pl.Float64).alias("hi")]
    elif band in _BANDS:
        q_lo, q_hi = _BANDS[band]
        bounds = [value.quantile(q_lo, "linear").alias("lo"), value.quantile(q_hi, "linear").alias("hi")]
    else:
        raise ValueError(f"band must be one of {[*_BANDS, 'none']}, not {band!r}")
    inside = pl.col(x).is_between(grid.lo, grid.hi)
    return (
        lf.filter(inside & value.is_finite())
        .with_columns(x_lo=grid.start(x))
        .group_by(*keys, "x_lo")
        .agg(value.mean().alias("y"), *bounds, pl.len().alias("n"), pl.col(x).max().alias("x_hi"))
        .with_columns(
            pl.col("y", "lo", "hi").round_sig_figs(DIGITS),
            x=(pl.col("x_lo") + (grid.width - 1) / 2).cast(pl.Float64),
            series=label,
        )
        .sort(*keys, "x_lo")
        .select("run", *(["name"] if "name" in keys else []), "series", pl.exclude(*keys, "series"))
        .collect()
    )


def _positive_only(curves: pl.DataFrame) -> pl.DataFrame:
    """Blank values a log scale cannot show (zero norms, e.g. a bias at initialisation)."""
    return curves.with_columns(pl.when(pl.col(c) > 0).then(pl.col(c)).alias(c) for c in ("y", "lo", "hi"))


def _event_rules(trace: Trace, x: str, grid: Grid, which: bool | Sequence[str]) -> pl.DataFrame:
    """One rule per run, event name and x bin (at the bin's first event), with how many it stands for."""
    events = trace.events.filter(pl.col(x).is_between(grid.lo, grid.hi))
    if which is False:
        events = events.filter(pl.lit(False))
    elif which is not True:
        events = events.filter(pl.col("name").is_in(list(which)))
    return (
        events.with_columns(x_bin=grid.start(x))
        .group_by("run", "name", "x_bin")
        .agg(x=pl.col(x).min().cast(pl.Float64), count=pl.len(), last=pl.col(x).max())
        .drop("x_bin")
        .sort("run", "name", "x")
        .collect()
    )


def _spike_marks(
    found: pl.DataFrame | None, label: pl.Expr, level: Axis, shown: pl.DataFrame, ids: list[str]
) -> pl.DataFrame:
    """The ``MAX_SPIKES`` strongest spikes (largest ``|score|``) of the ``shown`` series that have a
    finite value to draw.

    Columns: run, series, x, y, score, and direction ("up" or "down", the sign of the score).
    """
    columns = {"run": pl.String, "series": pl.String, "x": pl.Float64, "y": pl.Float64, "score": pl.Float64}
    if found is None:
        return pl.DataFrame(schema={**columns, "direction": pl.String})
    return (
        found.join(shown, on=ids, how="semi", nulls_equal=True)
        .filter(pl.col("value").is_finite())
        .sort(pl.col("score").abs(), descending=True)
        .head(MAX_SPIKES)
        .select(
            pl.col("run"),
            label.alias("series"),
            pl.col(level).cast(pl.Float64).alias("x"),
            pl.col("value").cast(pl.Float64).alias("y"),
            pl.col("score").cast(pl.Float64),
            pl.when(pl.col("score") < 0).then(pl.lit("down")).otherwise(pl.lit("up")).alias("direction"),
        )
    )


def _x_encoding(level: Axis, grid: Grid) -> alt.X:
    """The shared x axis: passes or epochs, whole numbers only (a short run must not tick at 2.5)."""
    axis = alt.Axis(format=",d", tickMinStep=1)
    scale = alt.Scale(domain=[grid.lo, grid.hi], nice=False, zero=False)
    return alt.X("x:Q", title=level, scale=scale, axis=axis)


def _layers(
    curves: pl.DataFrame,
    rules: pl.DataFrame,
    marks: pl.DataFrame,
    color: str,
    grid: Grid,
    level: Axis,
    y_title: str,
    log: bool,
    *,
    select: bool,
    order: list[str] | None = None,
) -> list[alt.Chart]:
    """Band, line, event rules and spike points sharing one x axis; ``select`` binds the legend; ``order``
    fixes the colour of each series (the same in every panel) when colour is the series."""
    x_enc = _x_encoding(level, grid)
    y_scale = alt.Scale(type="log") if log else alt.Scale(zero=False)
    base = alt.Chart(_printable_frame(curves))
    domain = [printable(n) for n in order] if order and color == "series" else []
    scheme: Literal["tableau10", "tableau20"] = "tableau10" if len(domain) <= 10 else "tableau20"
    palette = alt.Scale(domain=domain, scheme=scheme) if domain else alt.Scale(scheme=scheme)
    pick = alt.selection_point(fields=[color], bind="legend") if select else None
    strong = alt.when(pick).then(alt.value(1.0)).otherwise(alt.value(0.15)) if pick else alt.value(1.0)
    faint = alt.when(pick).then(alt.value(0.18)).otherwise(alt.value(0.03)) if pick else alt.value(0.18)
    tooltip = [
        alt.Tooltip(f"{color}:N"),
        alt.Tooltip("x_lo:Q", title=f"{level}s from"),
        alt.Tooltip("x_hi:Q", title="to"),
        alt.Tooltip("y:Q", title="mean", format=_FORMAT),
        alt.Tooltip("lo:Q", format=_FORMAT),
        alt.Tooltip("hi:Q", format=_FORMAT),
        alt.Tooltip("n:Q", title="rows"),
    ]
    layers = []
    if curves["lo"].is_not_null().any():
        layers.append(
            base.mark_area(clip=True).encode(
                x=x_enc,
                y=alt.Y("lo:Q", title=y_title, scale=y_scale),
                y2="hi:Q",
                color=alt.Color(f"{color}:N", scale=palette),
                fillOpacity=faint,  # not opacity: the shared legend would draw its symbols faint
            )
        )
    line = base.mark_line(clip=True, point=curves.height <= 60).encode(
        x=x_enc,
        y=alt.Y("y:Q", title=y_title, scale=y_scale),
        # one legend for band and line, drawn as full-strength strokes rather than the faint band
        color=alt.Color(
            f"{color}:N", title=color, scale=palette, legend=alt.Legend(symbolType="stroke", symbolOpacity=1)
        ),
        opacity=strong,
        tooltip=tooltip,
    )
    layers.append(line.add_params(pick) if pick else line)
    layers.extend(_rule_layer(rules, x_enc))
    if not marks.is_empty():
        layers.append(
            alt.Chart(_printable_frame(marks))
            # one view of many series: a spike takes its series' colour (outlined), else spike red
            .mark_point(
                filled=True, size=70, color="#d62728", stroke="#222", strokeWidth=0.6, opacity=1.0, clip=True
            )
            .encode(
                x=x_enc,
                y=alt.Y("y:Q", title=y_title, scale=y_scale),
                **({"color": alt.Color("series:N", scale=palette, legend=None)} if select else {}),
                shape=alt.Shape(
                    "direction:N",
                    title="spike",
                    scale=alt.Scale(domain=["up", "down"], range=["triangle-up", "triangle-down"]),
                ),
                tooltip=[
                    alt.Tooltip("series:N", title="spike in"),
                    alt.Tooltip("x:Q", title=level),
                    alt.Tooltip("y:Q", title="value", format=_FORMAT),
                    alt.Tooltip("score:Q", format=".3~g"),
                ],
            )
        )
    return layers


def _rule_layer(rules: pl.DataFrame, x_enc: alt.X) -> list[alt.Chart]:
    """Dashed grey vertical rules at events (empty list when there are none)."""
    if rules.is_empty():
        return []
    return [
        alt.Chart(_printable_frame(rules))
        .mark_rule(color="#555", strokeWidth=1, opacity=0.6, clip=True)
        .encode(
            x=x_enc,
            strokeDash=alt.StrokeDash("name:N", title="event"),
            tooltip=[
                alt.Tooltip("name:N", title="event"),
                alt.Tooltip("run:N"),
                alt.Tooltip("x:Q", title="at"),
                alt.Tooltip("count:Q", title="events in bin"),
            ],
        )
    ]


def _leaf_modules(modules: list[str]) -> list[str]:
    """Modules that contain no other recorded module (and not the root), so shares do not double count."""
    named = [m for m in modules if m != "(root)"]
    parents = {name[:i] for name in named for i, c in enumerate(name) if c == "."}  # every dotted prefix
    leaves = [m for m in named if m not in parents]
    return sorted(leaves or modules)
