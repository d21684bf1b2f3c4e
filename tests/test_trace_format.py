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
