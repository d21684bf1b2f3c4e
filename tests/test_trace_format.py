"""The trace-format contract: docs/trace-format.md, normtrace.schema and the analysis reader agree."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest

from normtrace import schema

REPO = Path(__file__).parents[1]
DOC = REPO / "docs" / "trace-format.md"


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


def documented_meta_keys() -> list[str]:
    """Every key named in the first cell of the document's ``meta.json`` table, in order."""
    text = DOC.read_text().split("## `meta.json`", 1)[1]
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    return [key for row in rows for key in re.findall(r"`(\w+)`", row.split("|")[1])]


def test_document_names_every_meta_key():
    assert documented_meta_keys() == sorted(
        [*schema.META_KEYS, *schema.META_END_KEYS], key=documented_meta_keys().index
    )
    assert set(documented_meta_keys()) == {*schema.META_KEYS, *schema.META_END_KEYS}


def test_the_analysis_format_module_is_the_recorders_file():
    """One definition: the analysis package's ``format`` is normtrace/schema.py itself, not a copy."""
    from normtrace_analysis import format as reader_format

    link = REPO / "analysis" / "normtrace_analysis" / "format.py"
    assert link.is_symlink() and link.resolve() == (REPO / "normtrace" / "schema.py").resolve()
    assert Path(reader_format.__file__).resolve() == Path(schema.__file__).resolve()


def test_the_format_module_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None; import normtrace_analysis.schema, normtrace_analysis.format"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "analysis")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_analysis_wheel_holds_the_format_as_a_real_file(tmp_path):
    """setuptools follows the symlink: the wheel carries normtrace/schema.py's text as format.py."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO / "analysis"),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build wheels here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert (
            zf.read("normtrace_analysis/format.py").decode() == (REPO / "normtrace" / "schema.py").read_text()
        )


def test_analysis_reader_requires_exactly_the_documented_columns():
    import polars as pl
    from normtrace_analysis import schema as reader

    assert reader.SCHEMA_VERSION == schema.SCHEMA_VERSION
    assert (reader.META_FILE, reader.SHARD_SUFFIX) == (schema.META_FILE, schema.SHARD_SUFFIX)
    assert tuple(schema.TABLES) == reader.TABLES
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
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    lenses = [nt.LossMetrics(loss_fn), nt.OutputNorm(), nt.ParameterNorm(), nt.GradientNorm()]
    with nt.Recorder(tmp_path, lenses=lenses) as rec:
        rec.attach(model, optimizer=opt)
        rec.track_target(QNetwork())
        y = model(torch.randn(4, 4))
        loss_fn(y, torch.zeros_like(y)).backward()
        opt.step()
        rec.event("marker")
        rec.tick_epoch()
    meta = json.loads((tmp_path / schema.META_FILE).read_text())
    assert list(meta) == [*schema.META_KEYS, *schema.META_END_KEYS]
    assert meta["optimizer"] == "SGD" and meta["steps"] == 1
    trace = na.load(tmp_path)
    for table in schema.TABLES:
        frame = trace.table(table).collect()
        assert frame.height > 0, table
        for name, dtype in na.schema.REQUIRED_COLUMNS[table].items():
            assert frame.schema[name] == dtype, (table, name)


def test_a_version_1_trace_loads_with_an_empty_signals_table(tmp_path):
    """A version-1 trace (no signals folder, no optimizer/steps keys) still loads."""
    import normtrace_analysis as na
    import torch
    from recorder_models import QNetwork

    import normtrace as nt

    model = QNetwork()
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm()]) as rec:
        rec.attach(model)
        model(torch.randn(4, 4))
    meta_path = tmp_path / schema.META_FILE
    meta = json.loads(meta_path.read_text())
    for key in ("optimizer", "steps"):
        del meta[key]
    meta_path.write_text(json.dumps({**meta, "schema_version": 1}))
    assert not (tmp_path / "signals").exists()
    trace = na.load(tmp_path)
    assert trace.table("outputs").collect().height == 4
    signals = trace.table("signals").collect()
    assert signals.height == 0
    for name, dtype in na.schema.REQUIRED_COLUMNS["signals"].items():
        assert signals.schema[name] == dtype
