"""normtrace_analysis: read normtrace traces lazily with Polars, summarise, find spikes, chart.

No torch needed: it reads only the documented trace format (Arrow IPC shards + meta.json).

``trace = load("runs/cartpole")`` then ``trace.epoch_summary("outputs")``, ``trace.spikes("outputs")``,
``trace.event_alignment("target_update")``.
"""

from . import charts
from .errors import (
    CorruptShardError,
    EmptyRunError,
    EmptySelectionError,
    MetaError,
    MissingEventError,
    MissingTableError,
    RunNotFoundError,
    SchemaVersionError,
    ShortSeriesWarning,
    SkippedShardsWarning,
    StrayFilesWarning,
    TraceError,
)
from .export import to_parquet
from .notebook import enable_offline_charts
from .report import report
from .schema import REQUIRED_COLUMNS, SCHEMA_VERSION
from .tensorboard import to_tensorboard
from .trace import Trace, load

__version__ = "0.1.0"

__all__ = [
    "REQUIRED_COLUMNS",
    "SCHEMA_VERSION",
    "CorruptShardError",
    "EmptyRunError",
    "EmptySelectionError",
    "MetaError",
    "MissingEventError",
    "MissingTableError",
    "RunNotFoundError",
    "SchemaVersionError",
    "ShortSeriesWarning",
    "SkippedShardsWarning",
    "StrayFilesWarning",
    "Trace",
    "TraceError",
    "__version__",
    "charts",
    "enable_offline_charts",
    "load",
    "report",
    "to_parquet",
    "to_tensorboard",
]
