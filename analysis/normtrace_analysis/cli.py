"""The ``normtrace`` command: summarise a trace, list spikes, write the HTML report, export a table.

Bad input (no such run, a corrupt shard, a bad argument) ends with exit code 2 and one line on stderr,
never a traceback; anything slower than a second shows progress on stderr so stdout stays parseable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NoReturn

import polars as pl

from .alignment import recorded_events, series_name
from .charts import MAX_ROWS, printable, value_title
from .errors import TraceError
from .names import EVENT_WINDOW, PERMUTATIONS, SUMMARY_KEYS, THRESHOLD
from .progress import progress as show_progress
from .report import export_charts, report
from .schema import COMPACT_ROWS, SHARD_SUFFIX, TABLES, compact, drop_covered, lock_name, shard_span
from .storage import is_url
from .tensorboard import MAX_POINTS
from .trace import Trace, load, refuse_inside_tables

EXPORT_FORMATS = {".parquet": "parquet", ".csv": "csv", ".arrow": "ipc", ".ipc": "ipc", ".feather": "ipc"}
"""Output file extension -> format written by ``normtrace export``."""

_STATS = ("mean", "p50", "p05", "p95", "min", "max", "std", "count")
_SPIKE_COLUMNS = ("run", "kind", "module", "param", "split", "pass", "epoch", "value", "baseline", "score",
                  "points", "event", "lag_passes", "lag_epochs")  # fmt: skip


class _Help(argparse.HelpFormatter):
    """Help that states every option's default (none is shown for flags and options without one)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        # identity, not ==: a default of 0 (``--seed``) is stated, though ``0 == False``
        shown = all(default is not absent for absent in (None, False, argparse.SUPPRESS)) and default != []
        if action.option_strings and shown and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (exit code 2) instead of usage plus message, and whose
    help states the defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``normtrace`` command; returns the process exit code."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        handler: Callable[[argparse.Namespace], int] = args.handler  # each sub-command's set_defaults
        try:
            return handler(args)
        except BrokenPipeError:  # e.g. `normtrace spikes RUN --csv | head`: stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except (TraceError, ValueError, ImportError, re.error, OSError, pl.exceptions.PolarsError) as exc:
            if os.environ.get("NORMTRACE_DEBUG"):  # the full traceback, for a bug report
                raise
            print(f"normtrace: error: {_one_line(exc, 1)}", file=sys.stderr)
            return 2


def build_parser() -> argparse.ArgumentParser:
    """The ``normtrace`` argument parser with its sub-commands."""
    parser = _Parser(prog="normtrace", description="Analyse normtrace traces from the shell.")
    parser.add_argument("--version", action="version", version=f"%(prog)s (normtrace-analysis) {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    loading = _Parser(add_help=False)
    loading.add_argument("runs", nargs="+", metavar="RUN", help="run directory, or a glob such as 'runs/*'")
    view = loading.add_mutually_exclusive_group()
    view.add_argument(
        "--rms",
        dest="normalize",
        action="store_const",
        const=True,
        help="norms divided by sqrt(numel) (default: what the recorder's lens asked for)",
    )
    view.add_argument("--raw", dest="normalize", action="store_const", const=False, help="raw L2 norms")
    loading.add_argument("--modules", metavar="REGEX", help="only modules whose name matches REGEX")
    loading.add_argument(
        "--epochs", metavar="LO:HI", type=_range, help="only epochs LO..HI (either may be empty)"
    )
    loading.add_argument("--split", choices=["train", "no_grad"], help="only grad-enabled or no_grad passes")
    loading.add_argument(
        "--kind",
        action="append",
        metavar="KIND",
        help="only signals of this kind, e.g. grad_norm, update_ratio, dead_fraction (repeat for several; "
        "default: every kind; a kind no run recorded is an error listing those recorded)",
    )
    loading.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="leave out unreadable shards, and runs without any shard (unless all are), with a warning",
    )
    loading.add_argument(
        "--storage-option",
        action="append",
        type=_option,
        default=[],
        metavar="KEY=VALUE",
        help="for runs on object storage (s3://...): an option of Polars' scans, e.g. aws_region=eu-west-1 "
        "(repeat for several)",
    )
    script = _Parser(add_help=False)  # a parent: only its arguments are copied
    out = script.add_mutually_exclusive_group()
    out.add_argument("--json", dest="output", action="store_const", const="json", help="JSON on stdout")
    out.add_argument("--csv", dest="output", action="store_const", const="csv", help="CSV on stdout")

    summary = commands.add_parser("summary", parents=[loading, script], help="modules x epochs statistics")
    summary.add_argument(
        "--table",
        choices=["outputs", "params", "signals"],
        default="outputs",
        help="output norms, parameter norms, or signals (gradient norms, update ratios, dead units … of "
        "a trace-format-2 run; every kind unless --kind)",
    )
    summary.add_argument("--stat", choices=_STATS, default="mean", help="statistic shown per epoch (text)")
    summary.add_argument(
        "--columns",
        type=_positive,
        default=8,
        metavar="N",
        help="at most N epoch columns in the text table (first and last always)",
    )
    summary.set_defaults(handler=_summary)

    spikes = commands.add_parser(
        "spikes", parents=[loading, script], help="spikes and their alignment to events"
    )
    spikes.add_argument(
        "--table",
        choices=["outputs", "params", "signals"],
        default="outputs",
        help="search output norms, parameter norms, or signals (every kind unless --kind; norms and "
        "ratios on log10)",
    )
    spikes.add_argument(
        "--event",
        help="event to align spikes with (default: the event the runs recorded most often, such as a "
        "DQN's target_update; a name no run recorded is an error listing those recorded)",
    )
    spikes.add_argument(
        "--level",
        choices=["pass", "epoch"],
        default="pass",
        help="search every recorded pass, or the per-epoch means (too few points in a short run)",
    )
    spikes.add_argument(
        "--threshold",
        type=_positive_number,
        help=f"robust z-score above which a value is a spike (default: {THRESHOLD:g})",
    )
    spikes.add_argument(
        "--window",
        type=_positive,
        help="passes (epochs) after an event that count as following it "
        f"(default: {EVENT_WINDOW['pass']} passes, {EVENT_WINDOW['epoch']} epoch)",
    )
    spikes.add_argument(
        "--windows",
        type=_windows,
        metavar="W1,W2,…",
        help="also test these windows (e.g. 5,20,50): is the finding robust to the window?",
    )
    spikes.add_argument(
        "--permutations",
        type=_positive,
        default=PERMUTATIONS,
        metavar="B",
        help="jittered event trains per test",
    )
    spikes.add_argument("--seed", type=int, default=0, help="seed of the jitter (same seed, same p-values)")
    spikes.add_argument(
        "--alignment",
        action="store_true",
        help="with --csv: write the alignment table (one row per series and window) instead of the spikes",
    )
    spikes.add_argument(
        "--limit", type=_positive, default=20, metavar="N", help="spikes listed in text output"
    )
    spikes.set_defaults(handler=_spikes)

    rep = commands.add_parser(
        "report", parents=[loading], help="self-contained HTML report (or PNG/SVG charts)"
    )
    rep.add_argument("-o", "--output", type=Path, help="HTML file (default: report.html), or with --format "
                     "png|svg a folder for the chart files (default: RUN/charts/ for one run)")  # fmt: skip
    rep.add_argument(
        "--format",
        choices=["html", "png", "svg"],
        default="html",
        help="one HTML report, or a file per chart",
    )
    rep.add_argument(
        "--force", action="store_true", help="overwrite the HTML file or chart files if they exist"
    )
    rep.add_argument(
        "--level", choices=["pass", "epoch"], default="pass", help="x axis of the curves, and spike level"
    )
    rep.add_argument(
        "--band",
        choices=["p05-p95", "min-max", "none"],
        default="p05-p95",
        help="the band around each curve: the rows' 5th-95th percentiles or their range in each bin",
    )
    rep.add_argument("--log", action="store_true", help="log-scale y axes")
    rep.add_argument(
        "--event",
        action="append",
        help="event the findings align spikes with; repeat for several (default: every event the runs "
        "recorded, the most frequent first, at most three)",
    )
    rep.add_argument(
        "--max-rows", type=_positive, default=MAX_ROWS, metavar="N", help="rows per chart's curves"
    )
    rep.set_defaults(handler=_report)

    export = commands.add_parser(
        "export", parents=[loading], help="write a table to parquet, csv or arrow, or to TensorBoard"
    )
    export.add_argument(
        "--table",
        choices=["outputs", "params", "metrics", "events", "signals"],
        help="the table to export (default: outputs; with --tensorboard, every table)",
    )
    target = export.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "-o",
        "--output",
        type=Path,
        help=f"output file; its extension picks the format ({', '.join(EXPORT_FORMATS)}); with "
        "--format parquet and no .parquet extension, a folder of one Parquet file per run "
        "(DIR/run=<name>/part-0.parquet, readable by DuckDB, Spark, Dask)",
    )
    target.add_argument(
        "--tensorboard",
        type=Path,
        metavar="DIR",
        help="write every table as TensorBoard scalars under DIR/<run> (needs the tensorboard package)",
    )
    export.add_argument(
        "--format",
        choices=sorted(set(EXPORT_FORMATS.values())),
        help="format of -o (default: from its extension)",
    )
    export.add_argument(
        "--level",
        choices=["pass", "epoch"],
        help="TensorBoard step, with --tensorboard only: the pass or the epoch (default: pass)",
    )
    export.add_argument(
        "--max-points",
        type=_positive,
        metavar="N",
        help=f"TensorBoard points per tag (binned), with --tensorboard only (default: {MAX_POINTS})",
    )
    export.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    export.set_defaults(handler=_export)

    merge = commands.add_parser(
        "compact",
        help="merge each run's shards into files of about a million rows (what closing a run does)",
        description="Merge each table's shards, per rank, into files of at most --max-rows rows: the "
        "same rows in the same order, in few files (object stores and Spark handle many small files "
        "badly). A run whose writer still runs is refused; one that was killed is merged. Safe to "
        "interrupt: every row is read once at any moment.",
    )
    merge.add_argument("runs", nargs="+", metavar="RUN", help="run directory, or a glob such as 'runs/*'")
    merge.add_argument(
        "--max-rows", type=_positive, default=COMPACT_ROWS, metavar="N", help="rows per merged file at most"
    )
    merge.set_defaults(handler=_compact)
    return parser


def _compact(args: argparse.Namespace) -> int:
    remote = next((r for r in args.runs if is_url(r)), None)
    if remote is not None:  # refused before anything is listed: merging rewrites files in place
        raise ValueError(f"normtrace compact works on local run directories, not {remote}")
    trace = load(args.runs)
    for run, path in trace.paths.items():
        assert isinstance(path, Path)  # no URL was given
        files = before = after = 0
        for table in TABLES:
            folder = path / table
            shards = [p for p in folder.glob(f"rank*{SHARD_SUFFIX}")] if folder.is_dir() else []
            before += len(shards)
            for rank in sorted({span[0] for p in shards if (span := shard_span(p.name))}):
                with _writer_lock(path, rank):
                    files += len(compact(folder, rank, max_rows=args.max_rows))
                    drop_covered(folder, rank)  # what a killed writer merged but had not deleted yet
            after += len(list(folder.glob(f"rank*{SHARD_SUFFIX}"))) if folder.is_dir() else 0
        print(f"{run}: {before} shard files -> {after} ({files} merged file(s) written)")
    return 0


@contextlib.contextmanager
def _writer_lock(run: Path, rank: int) -> Iterator[None]:
    """Hold the lock a recorder's writer holds on ``RUN/.lock-rank{r}`` (an exclusive ``flock``) while
    merging, so a live writer's run is refused rather than merged under it. Where the lock file is gone
    (the run was closed) or ``fcntl`` is missing, there is nothing to hold."""
    lock = run / lock_name(rank)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"{run} (rank {rank}) is being written by a live recorder ({lock}): compact it once it is closed"
            ) from None
        yield
    finally:
        os.close(fd)


def _load(args: argparse.Namespace) -> Trace:
    """The runs named on the command line, with the row filters applied."""
    options = dict(args.storage_option) or None
    on_error: Literal["raise", "skip"] = "skip" if args.skip_corrupt else "raise"
    trace = load(args.runs, normalize=args.normalize, on_error=on_error, storage_options=options)
    filters: dict[str, Any] = {
        "modules": args.modules,
        "epochs": args.epochs,
        "split": args.split,
        "kinds": args.kind,
    }
    return trace.filter(**filters)


def _summary(args: argparse.Namespace) -> int:
    with show_progress("summary"):
        trace = _load(args)
        table = trace.epoch_summary(args.table)
    if args.output:
        _write_frame(table, args.output)
        return 0
    keys = [k for k in SUMMARY_KEYS[args.table] if k not in ("run", "epoch")]
    for (run,), part in table.group_by("run", maintain_order=True):
        epochs = part["epoch"].unique().sort().to_list()
        shown = _spread(epochs, args.columns)
        wide = part.filter(pl.col("epoch").is_in(shown)).pivot(
            "epoch", index=keys, values=args.stat, sort_columns=True
        )
        note = (
            ""
            if len(shown) == len(epochs)
            else f" ({len(shown)} of {len(epochs)} epochs shown; --csv for all)"
        )
        title = f"{args.stat} of the {value_title(trace, args.table)} per epoch{note}"
        print(f"{printable(run)} · {args.table}: {title}")
        headers = [*keys, *(f"epoch {e}" for e in shown)]
        print(_text_table(headers, wide.rows()))
        print()
    return 0


def _spikes(args: argparse.Namespace) -> int:
    with show_progress("spikes"):
        trace = _load(args)
        found = trace.spikes(table=args.table, level=args.level, threshold=args.threshold)
        options = {
            "level": args.level,
            "table": args.table,
            "threshold": args.threshold,
            "permutations": args.permutations,
            "seed": args.seed,
        }
        event = args.event or _most_recorded_event(trace)
        if event is None:  # nothing to align with: the spikes are still the answer
            aligned = several = steps = None
        else:
            aligned = trace.event_alignment(event, window=args.window, **options)
            # --windows are tested as well as the main window, not instead of it
            windows = sorted({int(aligned["window"][0]), *(args.windows or [])}) if aligned.height else []
            several = trace.event_alignment(event, window=windows, **options) if len(windows) > 1 else None
            steps = trace.event_steps(
                event,
                window=args.window,
                level=args.level,
                table=args.table,
                permutations=args.permutations,
                seed=args.seed,
            )
        groups = trace.spike_groups(
            args.table, level=args.level, threshold=args.threshold, window=args.window
        )
    table = several if several is not None else aligned
    if args.output == "csv":
        chosen = table if args.alignment else found
        if chosen is None:
            raise ValueError("--alignment: no events were recorded, so there is nothing to align")
        _write_frame(chosen, "csv")
        return 0
    if args.output == "json":
        doc = {
            "spikes": _records(found),
            "event": event,
            "alignment": None if table is None else _records(table),
            "steps": None if steps is None else _records(steps),
            "groups": _records(groups),
        }
        print(json.dumps(doc))
        return 0
    columns = [c for c in _SPIKE_COLUMNS if c in found.columns]
    top = found.sort(pl.col("score").abs(), descending=True).head(args.limit).select(columns)
    shown = f", the {top.height} strongest shown" if found.height > top.height else ""
    print(f"{found.height} spikes in {args.table} (per {args.level}){shown}")
    if top.height:
        print(_text_table(columns, top.rows()))
    print()
    if aligned is None or steps is None or event is None:
        print(
            "no events were recorded, so there is nothing to align the spikes with (mark events with "
            "Recorder.event(name), or track_target(module))"
        )
        return 0
    for finding in aligned["finding"]:
        print(printable(finding))
    tested = aligned.filter(pl.col("p_value").is_not_null())
    if tested.height:
        print()
        print(_alignment_text(several if several is not None else aligned, args.table))
        floor = tested["p_floor"][0]
        print(
            f"p: share of {args.permutations} jittered event trains doing as well (floor {floor:.2g}); "
            f"q: Benjamini–Hochberg across the {tested.height} series tested (valid for correlated layers)"
        )
    shared = groups.filter(pl.col("size") > 1)
    for _, part in shared.group_by("run", "rank", "group", maintain_order=True):
        names = ", ".join(printable(_series_name(row, args.table)) for row in part.iter_rows(named=True))
        print(f"the same excursions (one finding, not {part.height}): {names}")
    steps = steps.filter(pl.col("p_value").is_not_null()).sort("p_value")
    if steps.height:
        print()
        stepping = steps.filter(pl.col("q_value") < 0.05)
        for finding in stepping["finding"]:
            print(printable(finding))
        if stepping.is_empty():
            print(
                f"no step: in none of the {steps.height} series does the level after a "
                f"{printable(event)} differ from the level before (smallest p = {steps['p_value'][0]:.2g}; "
                "--json for all)"
            )
    return 0


def _most_recorded_event(trace: Trace) -> str | None:
    """The event the runs recorded most often (a DQN's target_update), or None when there are none."""
    names = recorded_events(trace)
    return str(names["name"][0]) if names.height else None


def _series_name(row: dict[str, Any], table: str) -> str:
    """A series as a reader names it: ``module``, ``module.param``, ``module (no_grad)``, ``grad_norm of
    module.param``."""
    if table != "outputs":
        return series_name(row, table)
    module: str = row["module"]
    return module + ("" if row["split"] == "train" else f" ({row['split']})")


def _alignment_text(aligned: pl.DataFrame, table: str) -> str:
    """The alignment numbers per tested series (and window) as a terminal table."""
    keys = [k for k in SUMMARY_KEYS[table] if k != "run" or aligned["run"].n_unique() > 1]
    rows = aligned.filter(pl.col("p_value").is_not_null()).select(
        *keys,
        "window",
        pl.format("{}/{}", "events_followed", "events").alias("followed"),
        (pl.col("chance") * 100).round(2).alias("chance %"),
        "enrichment",
        "p_value",
        "q_value",
        "clusters",
        pl.format("{}/{}", "placebo_followed", "placebo_events").alias("placebo"),
        "placebo_p",
    )
    return _text_table(rows.columns, rows.rows())


def _report(args: argparse.Namespace) -> int:
    trace = _load(args)
    options = {"level": args.level, "band": args.band, "log": args.log, "max_rows": args.max_rows}
    if args.format == "html":
        target = args.output or Path("report.html")
        _check_target(target, trace, args.force)
        path = report(trace, target, event=args.event, progress=True, **options)
        print(path)
        return 0
    if args.output is None and len(trace.runs) > 1:
        raise ValueError(
            f"--format {args.format} of several runs: name the folder for the charts with -o DIR"
        )
    folder: Path = args.output or _charts_folder(trace)
    _check_target(folder, trace, force=True)
    existing = sorted(folder.glob(f"*.{args.format}")) if folder.is_dir() else []
    if existing and not args.force:
        raise ValueError(f"{folder} already holds {args.format} files ({existing[0].name}, …); pass --force")
    written = export_charts(trace, folder, args.format, event=args.event, progress=True, **options)
    if not written:
        raise ValueError("no chart could be exported: the trace has no rows to chart")
    for path in written:
        print(path)
    return 0


def _charts_folder(trace: Trace) -> Path:
    """Where ``report --format png|svg`` writes one run's charts without ``-o``: beside the run, not in the
    cwd; a run on object storage has no local folder to write beside, so ``-o`` is needed there."""
    run = next(iter(trace.paths.values()))
    if not isinstance(run, Path):
        raise ValueError(f"{run} is on object storage: name a local folder for the charts with -o DIR")
    return run / "charts"


def _export(args: argparse.Namespace) -> int:
    if args.tensorboard is not None:
        return _export_tensorboard(args)
    for option in ("level", "max_points"):  # -o writes the rows as recorded: neither would do anything
        if getattr(args, option) is not None:
            raise ValueError(f"argument --{option.replace('_', '-')}: applies to --tensorboard only, not -o")
    args.table = args.table or "outputs"
    kind = args.format or EXPORT_FORMATS.get(args.output.suffix.lower())
    if kind is None:
        raise ValueError(f"cannot tell the format of {args.output}: use one of {', '.join(EXPORT_FORMATS)}")
    if kind == "parquet" and args.output.suffix.lower() != ".parquet":
        return _export_dataset(args)
    with show_progress(f"export {args.table}"):
        trace = _load(args)
        _check_target(args.output, trace, args.force)
        with trace.reading():
            getattr(trace.table(args.table), f"sink_{kind}")(args.output)
    print(args.output)
    return 0


def _export_dataset(args: argparse.Namespace) -> int:
    """``--format parquet -o DIR``: one Parquet file per run under ``DIR/run=<name>/``."""
    from .export import to_parquet

    with show_progress(f"export {args.table}"):
        trace = _load(args)
        _check_target(args.output, trace, force=True)
        files = to_parquet(trace, args.output, table=args.table, overwrite=args.force)
    print(args.output)
    return 0 if files else _nothing(f"no run has {args.table} rows")


def _export_tensorboard(args: argparse.Namespace) -> int:
    """``--tensorboard DIR``: every table as TensorBoard scalars (see ``tensorboard.to_tensorboard``)."""
    from .tensorboard import to_tensorboard

    with show_progress("export tensorboard"):
        trace = _load(args)
        _check_target(args.tensorboard, trace, force=True)
        tables = [args.table] if args.table else TABLES
        folders = to_tensorboard(
            trace,
            args.tensorboard,
            level=args.level or "pass",
            max_points=args.max_points or MAX_POINTS,
            tables=tables,
            overwrite=args.force,
        )
    for folder in folders:
        print(folder)
    return 0 if folders else _nothing("the trace has no rows to export")


def _nothing(why: str) -> int:
    print(f"normtrace: error: nothing written: {why}", file=sys.stderr)
    return 2


def _check_target(path: Path, trace: Trace, force: bool) -> None:
    """Refuse to write ``path`` over an existing file (unless ``force``) or anywhere inside a loaded run's
    table folders (:func:`.trace.refuse_inside_tables`)."""
    refuse_inside_tables(trace, path)
    if path.exists() and not force:
        raise ValueError(f"{path} exists; pass --force to overwrite it")


def _write_frame(df: pl.DataFrame, output: str) -> None:
    """A frame on stdout as CSV (NaN and inf spelled out) or as a JSON array of row objects."""
    if output == "csv":
        sys.stdout.write(df.write_csv())
    else:
        print(json.dumps(_records(df)))


def _records(df: pl.DataFrame) -> list[dict[str, Any]]:
    """Rows as JSON-ready dicts; NaN and ±inf (which JSON cannot hold) become null, as in Polars' JSON."""
    records: list[dict[str, Any]] = json.loads(df.write_json())  # write_json: an array of row objects
    return records


def _spread(values: list[Any], at_most: int) -> list[Any]:
    """At most ``at_most`` items spread evenly over ``values``, keeping the first and the last."""
    if len(values) <= at_most:
        return values
    step = (len(values) - 1) / max(at_most - 1, 1)
    return [values[i] for i in sorted({round(k * step) for k in range(at_most)})]


def _text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns aligned for a terminal: text left, numbers right at four significant digits; control
    characters in names (a module named with a newline) spelled as escapes, so no name breaks a row."""
    headers = [printable(h) for h in headers]
    cells = [[printable(_fmt(v)) for v in row] for row in rows]
    numeric = [all(isinstance(r[i], int | float) or r[i] is None for r in rows) for i in range(len(headers))]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = (
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
        )
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _range(text: str) -> tuple[int | None, int | None]:
    """``LO:HI`` with either end optional (``10:``, ``:50``), or a single epoch ``N``."""
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            return int(lo), int(lo)
        return (int(lo) if lo else None, int(hi) if hi else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO:HI with integers, got {text!r}") from None


def _windows(text: str) -> list[int]:
    """``5,20,50``: positive integers separated by commas."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _option(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of ``--storage-option``."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """Warnings as one ``normtrace: warning:`` line each, without Python's source context."""
    print(f"normtrace: warning: {_one_line(message, 4)}", file=sys.stderr)


def _one_line(message: object, keep: int) -> str:
    """The first ``keep`` non-blank lines of a message joined into one line (a line ending in a colon
    introduces the next, so no "; " after it)."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return type(message).__name__
    kept = lines[:keep]
    joined = kept[0]
    for line in kept[1:]:
        joined += (" " if joined.endswith(":") else "; ") + line
    return joined + (" …" if len(lines) > keep else "")


def _version() -> str:
    from . import __version__  # the package's __init__ imports this module's neighbours first

    return __version__


if __name__ == "__main__":
    sys.exit(main())
