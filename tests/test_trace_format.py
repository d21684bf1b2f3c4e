"""The trace-format contract: docs/trace-format.md, normtrace.schema and the analysis reader agree."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa

from normtrace import schema

DOC = Path(__file__).parents[1] / "docs" / "trace-format.md"


def documented_tables() -> dict[str, list[tuple[str, str, bool]]]:
    """``{table: [(column, arrow type, nullable)]}`` parsed from the document's column tables."""
    tables: dict[str, list[tuple[str, str, bool]]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        heading = re.match(r"^## Table `(\w+)`", line)
        if heading:
            current = tables.setdefault(heading.group(1), [])
        elif line.startswith("## "):
            current = None
        elif current is not None and line.startswith("| ") and not line.startswith(("| column", "| ---")):
            column, dtype, nullable = (cell.strip() for cell in line.strip("|").split("|")[:3])
            current.append((column, dtype, {"yes": True, "no": False}[nullable]))
    return tables


def test_document_names_its_schema_version():
    assert re.search(rf"schema version {schema.SCHEMA_VERSION}\b", DOC.read_text().splitlines()[0])


def test_document_matches_the_recorder_schema():
    documented = documented_tables()
    assert sorted(documented) == sorted(schema.TABLES)
    for table, arrow_schema in schema.TABLES.items():
        got = [(name, pa.type_for_alias(dtype), nullable) for name, dtype, nullable in documented[table]]
        assert got == [(f.name, f.type, f.nullable) for f in arrow_schema], table


def test_document_types_are_arrow_types():
    for columns in documented_tables().values():
        for _, dtype, _ in columns:
            assert isinstance(pa.type_for_alias(dtype), pa.DataType)


def test_analysis_reader_requires_exactly_the_documented_columns():
    import polars as pl
    from normtrace_analysis import schema as reader

    assert reader.SCHEMA_VERSION == schema.SCHEMA_VERSION
    assert (reader.META_FILE, reader.SHARD_SUFFIX) == (schema.META_FILE, schema.SHARD_SUFFIX)
    for table, columns in documented_tables().items():
        documented = {
            name: pl.from_arrow(pa.table({name: pa.array([], pa.type_for_alias(dtype))})).dtypes[0]
            for name, dtype, _ in columns
        }
        assert reader.REQUIRED_COLUMNS[table] == documented, table


def test_recorder_shards_load_with_the_analysis_reader(tmp_path):
    """A trace the recorder wrote is what the reader expects, end to end, column for column."""
    import normtrace_analysis as na
    import torch
    from recorder_models import QNetwork
    from torch import nn

    import normtrace as nt

    model, loss_fn = QNetwork(), nn.MSELoss()
    with nt.Recorder(tmp_path, lenses=[nt.LossMetrics(loss_fn), nt.OutputNorm(), nt.ParameterNorm()]) as rec:
        rec.attach(model)
        rec.track_target(QNetwork())
        y = model(torch.randn(4, 4))
        loss_fn(y, torch.zeros_like(y))
        rec.event("marker")
        rec.tick_epoch()
    trace = na.load(tmp_path)
    for table in schema.TABLES:
        frame = getattr(trace, table).collect()
        assert frame.height > 0, table
        for name, dtype in na.schema.REQUIRED_COLUMNS[table].items():
            assert frame.schema[name] == dtype, (table, name)
