"""normtrace_analysis: read normtrace traces lazily with Polars, summarise, find spikes, chart."""

__version__ = "0.1.0"
