"""normtrace: record what every layer outputs and how every parameter grows during PyTorch training.

The recorder writes Arrow IPC shards off the training thread; analyse them with ``normtrace_analysis``.
"""

__version__ = "0.1.0"

from normtrace.errors import NormtraceError, RunDirError, WriterError  # noqa: E402
from normtrace.lenses import ACTIVATIONS, LossMetrics, OutputNorm, ParameterNorm  # noqa: E402
from normtrace.recorder import Recorder  # noqa: E402
from normtrace.schema import SCHEMA_VERSION  # noqa: E402

__all__ = [
    "ACTIVATIONS",
    "SCHEMA_VERSION",
    "LossMetrics",
    "NormtraceError",
    "OutputNorm",
    "ParameterNorm",
    "Recorder",
    "RunDirError",
    "WriterError",
]
