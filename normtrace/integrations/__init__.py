"""Callbacks that record a framework's training with one line: ``callbacks=[NormtraceCallback("runs/x")]``.

- :mod:`normtrace.integrations.lightning` — ``lightning.pytorch.Trainer`` (``pip install normtrace[lightning]``)
- :mod:`normtrace.integrations.transformers` — Hugging Face ``transformers.Trainer``
  (``pip install normtrace[transformers]``)

Importing this package imports neither framework; each submodule imports its own when it is imported,
and says which extra to install when it is missing. Both use only the Recorder's public API.
"""
