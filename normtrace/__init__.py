"""normtrace: record what every layer outputs and how every parameter grows during PyTorch training.

The recorder writes Arrow IPC shards off the training thread; analyse them with ``normtrace_analysis``.
"""

__version__ = "0.1.0"

from normtrace.activations import ActivationRate  # noqa: E402
from normtrace.errors import NormtraceError, RunDirError, WriterError  # noqa: E402
from normtrace.gradients import GradientNorm, OutputGradientNorm, UpdateRatio  # noqa: E402
from normtrace.lenses import ACTIVATIONS, LossMetrics, OutputNorm, ParameterNorm  # noqa: E402
from normtrace.observe import after_forward, before_forward  # noqa: E402
from normtrace.recorder import Recorder  # noqa: E402
from normtrace.recording import Lens, Recording, Target  # noqa: E402
from normtrace.schema import SCHEMA_VERSION  # noqa: E402

__all__ = [
    "ACTIVATIONS",
    "SCHEMA_VERSION",
    "ActivationRate",
    "GradientNorm",
    "Lens",
    "LossMetrics",
    "NormtraceError",
    "OutputGradientNorm",
    "OutputNorm",
    "ParameterNorm",
    "Recorder",
    "Recording",
    "RunDirError",
    "Target",
    "UpdateRatio",
    "WriterError",
    "after_forward",
    "before_forward",
]
