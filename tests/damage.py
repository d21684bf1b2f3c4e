"""Damaging an Arrow IPC file's data while leaving it openable: what a bad disk or a partial copy does."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa


def damage_body(path: Path, *, keep_row_counts: bool = False) -> None:
    """Overwrite bytes inside the file's record batches so that its footer still opens (and, with
    ``keep_row_counts``, its batch headers still give its row count) but reading its rows fails."""
    data = path.read_bytes()
    for offset in range(64, len(data) - 64, 16):
        damaged = bytearray(data)
        damaged[offset : offset + 48] = b"\xff" * 48
        path.write_bytes(bytes(damaged))
        try:
            reader = pa.ipc.open_file(str(path))
            if keep_row_counts:
                reader.count_rows()
        except (OSError, pa.ArrowException):
            continue  # hit the footer or a batch header: try further on
        try:
            reader.read_all()
        except (OSError, pa.ArrowException):
            return
    raise AssertionError(f"could not damage the body of {path} alone")
