"""The recorder's public calls and meta.json, each value against where it comes from: the interpreter,
the host, the arguments given, counters known by construction; refusals word for word."""

from __future__ import annotations

import datetime as dt
import gc
import importlib.metadata
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from recorder_models import QNetwork, meta_of, notes, read_table
from torch import nn

import normtrace as nt
import normtrace.recorder as recorder_module
from normtrace import schema
from normtrace.buffer import row_count


def utc_seconds() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def test_meta_json_says_what_recorded_the_run_where_and_how(tmp_path):
    run = tmp_path / "the-run"
    started = utc_seconds()
    lenses = [nt.OutputNorm(), nt.ParameterNorm()]
    rec = nt.Recorder(
        run,
        lenses,
        flush_every=7,
        flush_secs=3.5,
        epoch_flush_secs=0.25,
        max_queued_rows=1234,
        config={"lr": 0.5, "seed": [1, 2]},
    )
    meta = meta_of(run)  # written when the recorder is made, before anything is attached
    assert meta["schema_version"] == schema.SCHEMA_VERSION
    assert meta["normtrace_version"] == importlib.metadata.version("normtrace")
    assert meta["torch_version"] == torch.__version__
    assert meta["python_version"] == platform.python_version()
    assert meta["run_name"] == "the-run"  # the directory's name when none is given
    assert started <= dt.datetime.fromisoformat(meta["start_time"]) <= utc_seconds()
    assert meta["start_time"].endswith("+00:00") and "." not in meta["start_time"]
    assert (meta["end_time"], meta["status"]) == (None, "running")
    assert (meta["rank"], meta["world_size"]) == (0, 1)
    assert (meta["hostname"], meta["pid"]) == (socket.gethostname(), os.getpid())
    assert meta["lenses"] == [
        {"type": "OutputNorm", **nt.OutputNorm().config()},
        {"type": "ParameterNorm", **nt.ParameterNorm().config()},
    ]
    assert meta["normalize"] == {"outputs": False, "params": False}
    assert (meta["root"], meta["optimizer"], meta["targets"], meta["notes"]) == (None, None, [], [])
    assert (meta["modules"], meta["metrics"]) == ({"outputs": [], "params": []}, [])  # the lenses' at attach
    assert meta["flush"] == {
        "every_passes": 7,
        "every_secs": 3.5,
        "epoch_min_secs": 0.25,
        "max_queued_rows": 1234,
    }
    assert meta["config"] == {"lr": 0.5, "seed": [1, 2]}
    for key in ("epochs", "passes", "steps"):
        assert key not in meta  # only once the run ends

    model, target = QNetwork(), QNetwork()
    opt = torch.optim.Adam(model.parameters())
    rec.attach(model, optimizer=opt)
    rec.track_target(target)
    rec.track_target(nn.Linear(1, 1), event="ema_sync")
    rec.flush()  # the rewrite at each attach is queued to the writer; flush() waits for it
    meta = meta_of(run)
    assert (meta["root"], meta["optimizer"]) == ("QNetwork", "Adam")
    # OutputNorm's default selection: the activations, each named with its class
    relus = [{"name": n, "class": "ReLU"} for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 4 and meta["modules"]["outputs"] == relus
    assert meta["targets"] == [
        {"class": "QNetwork", "event": "target_update"},
        {"class": "Linear", "event": "ema_sync"},
    ]
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    rec.tick_epoch()
    model(torch.randn(2, 4))
    assert rec.close() == run
    meta = meta_of(run)
    assert (meta["status"], meta["epochs"], meta["passes"], meta["steps"]) == ("closed", 1, 4, 3)
    assert started <= dt.datetime.fromisoformat(meta["end_time"]) <= utc_seconds()
    assert meta["end_time"] >= meta["start_time"]


def test_a_run_name_given_is_kept(tmp_path):
    with nt.Recorder(tmp_path / "dir", run_name="lr-sweep 3") as rec:
        assert meta_of(rec.run_dir)["run_name"] == "lr-sweep 3"


def test_push_loss_records_its_split_from_grad_mode_or_as_told(tmp_path):
    with nt.Recorder(tmp_path) as rec:
        rec.push_loss(1.0)  # grad mode on: training
        with torch.no_grad():
            rec.push_loss(torch.tensor(2.0))  # off: evaluation
            rec.push_loss(3.0, train=True)  # told otherwise
        rec.push_loss(4.0, train=False)
        with pytest.raises(
            TypeError, match=r"^metric 'loss': expected a number or a one-element tensor, got 'x'$"
        ):
            rec.push_loss("x")
    rows = read_table(tmp_path, "metrics").to_pylist()
    assert [(r["name"], r["value"], r["split"]) for r in rows] == [
        ("loss", 1.0, "train"),
        ("loss", 2.0, "val"),
        ("loss", 3.0, "train"),
        ("loss", 4.0, "val"),
    ]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda rec: rec.event(""), "Recorder.event(name): expected a non-empty string, got ''"),
        (lambda rec: rec.event(3), "Recorder.event(name): expected a non-empty string, got 3"),
        (
            lambda rec: rec.push_metric(None, 1.0),
            "Recorder.push_metric(name): expected a non-empty string, got None",
        ),
        (
            lambda rec: rec.track_target(nn.Linear(1, 1), event=""),
            "Recorder.track_target(event=...): expected a non-empty string, got ''",
        ),
    ],
    ids=["event-empty", "event-int", "metric-none", "target-event"],
)
def test_names_are_refused_naming_the_call_and_argument(tmp_path, call, message):
    with nt.Recorder(tmp_path) as rec:
        with pytest.raises(ValueError) as info:
            call(rec)
        assert str(info.value) == message
        rec.event("kept")
    assert read_table(tmp_path, "events").column("name").to_pylist() == ["kept"]
    assert meta_of(tmp_path)["targets"] == []


def test_track_target_refuses_what_is_not_a_module_naming_its_type(tmp_path):
    with nt.Recorder(tmp_path) as rec, pytest.raises(TypeError) as info:
        rec.track_target({"weight": torch.ones(1)})
    assert str(info.value) == "Recorder.track_target(module): expected an nn.Module, got dict"


def test_a_signal_survived_writes_the_counters_and_a_later_failure_reads_terminated(tmp_path):
    """SIGTERM with a handler of the user's that lets training go on: by the time that handler runs,
    everything is on disk and meta.json holds the counters of that moment; an exception that then leaves
    the ``with`` block is the signal's doing (``terminated``, not ``failed``)."""
    run = tmp_path / "r"
    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    started = utc_seconds()
    try:
        model = nn.Sequential(nn.Linear(2, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with (
            pytest.raises(RuntimeError, match="after the signal"),
            nt.Recorder(
                run, [nt.OutputNorm(include=[nn.Linear])], epoch_flush_secs=3600, flush_secs=3600
            ) as rec,
        ):
            rec.attach(model, optimizer=opt)
            for _ in range(2):
                for _ in range(3):
                    model(torch.randn(4, 2)).sum().backward()
                    opt.step()
                rec.tick_epoch()
            model(torch.randn(4, 2))  # a seventh pass, no step
            rec.push_metric("before", 1.0)
            signal.raise_signal(signal.SIGTERM)
            assert got == [signal.SIGTERM]
            meta = meta_of(run)
            assert (meta["status"], meta["epochs"], meta["passes"], meta["steps"]) == (
                "terminated",
                2,
                7,
                6,
            )
            assert started <= dt.datetime.fromisoformat(meta["end_time"]) <= utc_seconds()
            assert read_table(run, "metrics").column("name").to_pylist() == ["before"]
            assert read_table(run, "outputs").num_rows == 7
            raise RuntimeError("after the signal")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert meta_of(run)["status"] == "terminated"


def test_attach_refuses_naming_what_is_wrong_and_how_to_fix_it(tmp_path):
    first, other = nn.Linear(2, 2), nn.Linear(2, 2)
    with nt.Recorder(tmp_path) as rec:
        refusals = []
        for call in (
            lambda: rec.attach("model"),
            lambda: rec.attach(first, optimizer="sgd"),
            lambda: rec.attach(torch.jit.script(nn.Linear(1, 1))),
        ):
            with pytest.raises(TypeError) as info:
                call()
            refusals.append(str(info.value))
        rec.attach(first)
        with pytest.raises(nt.NormtraceError) as info:
            rec.attach(first)
        refusals.append(str(info.value))
        rec.detach()
        with pytest.raises(nt.NormtraceError) as info:
            rec.attach(other)
        refusals.append(str(info.value))
        rec.attach(first)  # the model it recorded, again: allowed
    assert refusals == [
        "Recorder.attach(model): expected an nn.Module, got str",
        "Recorder.attach(optimizer=...): expected a torch.optim.Optimizer, got str; a wrapper (a "
        "LightningOptimizer, an accelerate AcceleratedOptimizer) holds the torch optimizer as .optimizer: "
        "pass that",
        "Recorder.attach(model): a TorchScript module runs without Python, so nothing can observe its "
        "layers; attach the eager model (before torch.jit.script), or use torch.compile",
        f"Recorder for {tmp_path} is already attached to a Linear; call detach() first",
        f"Recorder for {tmp_path} recorded another model before; a run records one model, whose series "
        "another model's would merge into under the same names: record it with a new Recorder (its own "
        "run directory)",
    ]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"flush_every": 0}, ValueError, "Recorder(flush_every=...) must be at least 1 pass, got 0"),
        ({"flush_secs": 0}, ValueError, "Recorder(flush_secs=...) must be positive, got 0"),
        ({"flush_secs": float("nan")}, ValueError, "Recorder(flush_secs=...) must be positive, got nan"),
        ({"max_queued_rows": 0}, ValueError, "Recorder(max_queued_rows=...) must be at least 1, got 0"),
        (
            {"epoch_flush_secs": -0.5},
            ValueError,
            "Recorder(epoch_flush_secs=...) must be 0 or more, got -0.5",
        ),
        (
            {"epoch_flush_secs": float("nan")},
            ValueError,
            "Recorder(epoch_flush_secs=...) must be 0 or more, got nan",
        ),
        (
            {"lenses": ["OutputNorm"]},
            TypeError,
            "Recorder(lenses=...): 'OutputNorm' is not a lens: a lens has config() and attach(target, "
            "recording) methods (see normtrace.recording.Lens)",
        ),
        (
            {"lenses": [nt.ParameterNorm(), nt.OutputNorm(), nt.ParameterNorm()]},
            ValueError,
            "Recorder(lenses=...): more than one ParameterNorm lens",
        ),
    ],
    ids=[
        "flush_every",
        "flush_secs",
        "flush_secs-nan",
        "max_queued_rows",
        "epoch-negative",
        "epoch-nan",
        "not-a-lens",
        "twice",
    ],
)
def test_recorder_arguments_are_refused_before_anything_is_claimed(tmp_path, kwargs, error, message):
    with pytest.raises(error) as info:
        nt.Recorder(tmp_path / "run", **kwargs)
    assert str(info.value) == message
    assert not (tmp_path / "run").exists()


def test_the_smallest_accepted_settings_are_kept(tmp_path):
    with nt.Recorder(
        tmp_path, flush_every=1, flush_secs=1e-9, epoch_flush_secs=0, max_queued_rows=1, compact=0
    ) as rec:
        assert (rec.flush_every, rec.flush_secs, rec.epoch_flush_secs, rec.max_queued_rows) == (
            1,
            1e-9,
            0.0,
            1,
        )
        assert rec.compact is False
        rec.push_metric("m", 1.0)
    assert read_table(tmp_path, "metrics").column("value").to_pylist() == [1.0]


def test_a_config_may_hold_nan_and_infinity(tmp_path):
    """JSON has no NaN, but Python's json (and the analysis reading meta.json) read and write it: a
    hyperparameter set to inf (no gradient clipping) is kept."""
    with nt.Recorder(tmp_path, config={"clip": float("inf"), "tau": float("nan")}) as rec:
        pass
    config = meta_of(rec.run_dir)["config"]
    assert config["clip"] == float("inf") and config["tau"] != config["tau"]


def test_the_pass_counter_of_a_free_threaded_interpreter_hands_out_each_number_once(monkeypatch):
    """Without the GIL, ``itertools.count``'s ``__next__`` is not atomic: the counter takes a lock."""
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    next_pass = recorder_module._pass_counter()
    taken: list[list[int]] = [[] for _ in range(4)]

    def take(out: list[int]) -> None:
        for _ in range(2000):
            out.append(next_pass())

    threads = [threading.Thread(target=take, args=(out,)) for out in taken]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(n for out in taken for n in out) == list(range(8000))
    assert all(out == sorted(out) for out in taken)  # each thread sees its numbers grow
    assert next_pass.__name__ == "next_pass"  # the locked counter (under a GIL both count alike)
    for gil in ("enabled", "absent"):  # a GIL build, and a Python before 3.13 (no sys._is_gil_enabled)
        if gil == "enabled":
            monkeypatch.setattr(sys, "_is_gil_enabled", lambda: True, raising=False)
        else:
            monkeypatch.delattr(sys, "_is_gil_enabled", raising=False)
        fast = recorder_module._pass_counter()
        assert fast.__name__ == "__next__"  # itertools.count's: one C call, no lock
        assert [fast() for _ in range(3)] == [0, 1, 2]


def _record_three_flushes(run: Path) -> nt.Recorder:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    rec = nt.Recorder(run, [nt.OutputNorm()], flush_every=1)
    rec.attach(model)
    for _ in range(4):  # passes 1-3 each hand over the one before: three shards, and one more at the end
        model(torch.randn(2, 3))
    return rec


@pytest.mark.parametrize("ending", ["closed", "failed", "abandoned"])
def test_a_run_merges_its_shards_when_the_user_ends_it_and_keeps_them_otherwise(tmp_path, ending):
    """``close()`` and a ``with`` block left on an exception merge each table's shards into one file; a
    recorder nobody closed (collected) keeps them as flushed (``normtrace compact`` merges them later)."""
    run = tmp_path / "r"
    rec = _record_three_flushes(run)
    if ending == "closed":
        rec.close()
    elif ending == "failed":
        with pytest.raises(RuntimeError), rec:
            raise RuntimeError("diverged")
    else:
        del rec
        gc.collect()
        deadline = time.monotonic() + 60
        while (run / ".lock-rank0").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # the finalizer does not wait for the writer
    assert not (run / ".lock-rank0").exists()
    assert meta_of(run)["status"] == ending
    shards = sorted(p.name for p in (run / "outputs").glob("*.arrow"))
    assert len(shards) == (1 if ending != "abandoned" else 4), shards
    assert read_table(run, "outputs").num_rows == 4


def test_a_run_whose_metadata_cannot_be_written_is_refused_and_frees_its_directory(tmp_path, monkeypatch):
    run = tmp_path / "r"

    def disk_full(path: Path, data: dict) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recorder_module, "write_json_atomic", disk_full)

    def writers() -> set[threading.Thread]:  # other tests' writers may end meanwhile: compare ours only
        return {t for t in threading.enumerate() if t.name.startswith(f"normtrace-writer-rank0:{run}")}

    with pytest.raises(nt.RunDirError) as info:
        nt.Recorder(run)
    assert str(info.value) == f"cannot write the run metadata in {run}: [Errno 28] No space left on device"
    assert isinstance(info.value.__cause__, OSError)
    assert not (run / ".lock-rank0").exists()  # released: the directory is free again
    assert writers() == set()  # no writer thread was started
    monkeypatch.undo()
    with nt.Recorder(run) as rec:
        rec.push_metric("m", 1.0)
    assert read_table(run, "metrics").num_rows == 1


def test_the_documented_defaults(tmp_path):
    """The class docstring's defaults, as meta.json records them: flush every 1000 passes or 10 s, at
    an epoch tick once 1 s has passed, training waits beyond a million queued rows."""
    with nt.Recorder(tmp_path) as rec:
        pass
    assert meta_of(rec.run_dir)["flush"] == {
        "every_passes": 1000,
        "every_secs": 10.0,
        "epoch_min_secs": 1.0,
        "max_queued_rows": 1_000_000,
    }


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            [("lr", 0.1)],
            "Recorder(config=...) must be a mapping of names to values, got list",
        ),
        ({1: 0.1}, "Recorder(config=...) keys must be strings, got 1"),
        (
            {"lr": 0.1, "model": object()},
            "Recorder(config=...)['model'] is not a JSON value (Object of type object is not JSON "
            "serializable): pass numbers, strings, booleans, None, lists or mappings",
        ),
    ],
    ids=["not-a-mapping", "a-key-not-a-string", "not-json"],
)
def test_a_config_refusal_names_the_key_and_what_json_takes(tmp_path, config, message):
    with pytest.raises(TypeError) as info:
        nt.Recorder(tmp_path / "run", config=config)
    assert str(info.value) == message


class DtypeLens:
    """A user's lens whose description holds values JSON has no type for (a dtype, a path)."""

    def config(self) -> dict:
        return {"type": "DtypeLens", "dtype": torch.float16, "cache": Path("/tmp/cache")}

    def attach(self, target: nt.Target, recording: nt.Recording) -> list:
        return []


def test_meta_json_is_indented_for_people_and_writes_any_value_as_text(tmp_path):
    """meta.json is the file people open: two-space indents and a final newline; a lens description's
    value that JSON cannot hold is written as its ``str()`` rather than failing the run."""
    with nt.Recorder(tmp_path, [DtypeLens()]) as rec:
        pass
    text = (rec.run_dir / "meta.json").read_text()
    meta = json.loads(text)
    assert meta["lenses"] == [{"type": "DtypeLens", "dtype": "torch.float16", "cache": "/tmp/cache"}]
    assert text == json.dumps(meta, indent=2) + "\n"


LZ4_FRAME, ZSTD_FRAME = b"\x04\x22\x4d\x18", b"\x28\xb5\x2f\xfd"  # the formats' magic numbers


@pytest.mark.parametrize(("compression", "magic"), [("lz4", LZ4_FRAME), ("zstd", ZSTD_FRAME), (None, None)])
def test_shards_are_compressed_as_asked(tmp_path, compression, magic):
    """Arrow IPC compresses each buffer as one frame of the codec's own format, whose magic number
    starts it: lz4 by default (fast enough for the training loop), zstd or none when asked."""
    kwargs = {} if compression == "lz4" else {"compression": compression}
    with nt.Recorder(tmp_path, compact=False, **kwargs) as rec:
        for i in range(50):
            rec.push_metric("reward", float(i))
    (shard,) = (tmp_path / "metrics").glob("*.arrow")
    data = shard.read_bytes()
    for frame in (LZ4_FRAME, ZSTD_FRAME):
        assert (frame in data) == (frame == magic), (compression, frame)
    assert read_table(tmp_path, "metrics").column("value").to_pylist() == [float(i) for i in range(50)]


def test_an_open_recorder_of_this_process_on_the_directory_is_refused_word_for_word(tmp_path):
    with nt.Recorder(tmp_path) as first:
        with pytest.raises(nt.RunDirError) as info:
            nt.Recorder(tmp_path)
        assert str(info.value) == (
            f"run directory {tmp_path} is being written by an open Recorder in this process; close that "
            "one, choose a new directory, or pass overwrite=True to close it and start over"
        )
        first.push_metric("still_open", 1.0)
    assert read_table(tmp_path, "metrics").column("name").to_pylist() == ["still_open"]


def test_overwrite_replaces_an_open_recorder_whose_writer_failed(tmp_path):
    """The old recorder's error at its close (its trace is about to be deleted) does not stop the new."""
    (tmp_path / "metrics").write_text("a file where the metrics folder should be")
    old = nt.Recorder(tmp_path)
    old.push_metric("lost", 1.0)  # written at the old one's close, which fails on the file
    new = nt.Recorder(tmp_path, overwrite=True)
    with pytest.raises(nt.NormtraceError, match="closed"):
        old.push_metric("late", 1.0)
    (tmp_path / "metrics").unlink()
    new.push_metric("kept", 2.0)
    new.close()
    assert read_table(tmp_path, "metrics").column("name").to_pylist() == ["kept"]
    assert meta_of(tmp_path)["status"] == "closed"


def test_the_rows_counted_as_queued_are_the_rows_each_table_gets(tmp_path):
    """Back-pressure counts queued rows per table (``row_count``): a params record holds one row per
    parameter, a signals record one per key, an outputs record its fields; each count must equal the
    rows the writer then writes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lenses = [nt.OutputNorm(), nt.ParameterNorm(), nt.GradientNorm(), nt.LossMetrics()]
    rec = nt.Recorder(tmp_path, lenses, compact=False, flush_secs=3600)
    rec.attach(model, optimizer=opt)
    for _ in range(3):
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
        rec.push_metric("m", 1.0)
        rec.event("e")
    rec.collect()
    rec.collect()
    taken = rec._buffer.take()
    counts = {table: row_count(table, records) for table, records in taken.items()}
    rec._writer.submit_records(taken)
    rec.close()
    assert set(counts) == {"outputs", "params", "signals", "metrics", "events"}
    assert counts == {table: read_table(tmp_path, table).num_rows for table in counts}
    assert counts["params"] == 2 * 4  # two collections of four parameters, not two records
    assert all(type(n) is int for n in counts.values())  # whole rows: the catch-up warning prints them


def test_before_the_first_pass_rows_belong_to_pass_minus_one_and_none_are_counted(tmp_path):
    """The format's rule: a row recorded before any pass belongs to pass -1."""
    model = nn.Sequential(nn.Linear(2, 2))
    with nt.Recorder(tmp_path, [nt.OutputNorm(include=[nn.Linear])]) as rec:
        rec.attach(model)
        assert (rec.passes, rec.epoch) == (0, 0)
        rec.push_metric("before", 1.0)
        model(torch.randn(1, 2))
        rec.push_metric("after", 2.0)
        assert rec.passes == 1
    rows = read_table(tmp_path, "metrics").to_pylist()
    assert [(r["name"], r["pass"]) for r in rows] == [("before", -1), ("after", 0)]
    meta = meta_of(tmp_path)
    assert (meta["optimizer"], meta["passes"]) == (None, 1)  # attached without an optimizer


def test_passes_counted_at_children_again_after_detach_and_attach(tmp_path):
    """``detach()`` forgets which children counted passes, so after attaching again a child called
    outside the root's forward counts a pass at each call (the children are observed anew)."""
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    x = torch.randn(1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "ran outside Sequential.forward", once per attach
        with nt.Recorder(tmp_path, [nt.OutputNorm()]) as rec:
            rec.attach(model)
            model[0](x)
            rec.detach()
            rec.attach(model)
            for _ in range(3):
                model[0](x)
            assert rec.passes == 4
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert [(r["module"], r["pass"]) for r in rows] == [("0.1", p) for p in range(4)]


def test_a_run_left_open_at_exit_after_a_survived_signal_reads_terminated(tmp_path):
    """A SIGTERM the user's handler survived, then an exit without ``close()``: the exit is the signal's
    doing, so the run says ``terminated``, not ``exited``, and keeps what came after the signal."""
    run = tmp_path / "r"
    code = (
        "import signal\nimport normtrace as nt\n"
        "signal.signal(signal.SIGTERM, lambda signum, frame: None)\n"
        f"rec = nt.Recorder({str(run)!r})\n"
        "rec.push_metric('before', 1.0)\nsignal.raise_signal(signal.SIGTERM)\nrec.push_metric('after', 2.0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert meta_of(run)["status"] == "terminated"
    assert read_table(run, "metrics").column("name").to_pylist() == ["before", "after"]


class FailingLens:
    """A user's lens whose ``attach`` fails (after ``OutputNorm`` attached its observers)."""

    def config(self) -> dict:
        return {"type": "FailingLens"}

    def attach(self, target: nt.Target, recording: nt.Recording) -> list:
        raise RuntimeError("no such layer: encoder")


def test_a_lens_failing_to_attach_leaves_nothing_attached_and_names_itself(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    classes = [type(m) for m in model.modules()]
    with nt.Recorder(tmp_path, [nt.OutputNorm(), FailingLens()]) as rec:
        with pytest.raises(RuntimeError, match="no such layer") as info:
            rec.attach(model)
        assert info.value.__notes__ == ["normtrace: FailingLens.attach failed; nothing is attached"]
        assert [type(m) for m in model.modules()] == classes  # OutputNorm's observers removed again
        model(torch.randn(1, 2))
        assert rec.passes == 0
        rec.push_metric("still_recording", 1.0)
    assert not (tmp_path / "outputs").exists()
    assert read_table(tmp_path, "metrics").column("name").to_pylist() == ["still_recording"]
    assert meta_of(tmp_path)["status"] == "closed"


def test_a_recorder_given_no_lenses_records_output_and_parameter_norms(tmp_path):
    """No ``lenses``: those of the framework callbacks (output norms of the activations, parameter norms
    per epoch), with the values a direct computation gives; ``lenses=[]``: passes and events only."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    x = torch.randn(5, 3)
    with nt.Recorder(tmp_path / "default") as rec:
        rec.attach(model)
        model(x)
        rec.tick_epoch()
    outputs = read_table(tmp_path / "default", "outputs").to_pylist()
    assert [r["module"] for r in outputs] == ["1"]
    want = torch.linalg.vector_norm(model(x), dim=1).mean().item()
    assert outputs[0]["norm"] == pytest.approx(want, rel=1e-6)
    params = {
        (r["module"], r["param"]): r["norm"] for r in read_table(tmp_path / "default", "params").to_pylist()
    }
    assert params == pytest.approx(
        {("0", n): p.norm().item() for n, p in model[0].named_parameters()}, rel=1e-6
    )
    with nt.Recorder(tmp_path / "none", lenses=[]) as rec:
        rec.attach(model)
        model(x)
        rec.event("seen")
    assert sorted(p.name for p in (tmp_path / "none").iterdir() if p.is_dir()) == ["events"]
    assert meta_of(tmp_path / "none")["passes"] == 1


@pytest.mark.parametrize(
    ("lenses", "message"),
    [
        ([nt.OutputNorm], "Recorder(lenses=...): OutputNorm is a class; pass a lens, OutputNorm()"),
        (
            nt.OutputNorm(),
            "Recorder(lenses=...) takes a list of lenses, got OutputNorm: write lenses=[OutputNorm(...)]",
        ),
        (3, "Recorder(lenses=...) takes a list of lenses, got int"),
    ],
    ids=["a-class", "one-lens", "not-a-list"],
)
def test_lenses_given_wrongly_are_refused_saying_how_to_give_them(tmp_path, lenses, message):
    with pytest.raises(TypeError) as info:
        nt.Recorder(tmp_path / "run", lenses=lenses)
    assert str(info.value) == message
    assert not (tmp_path / "run").exists()  # refused before the directory was claimed


def test_numpy_numbers_in_a_config_are_stored_as_the_numbers_they_hold(tmp_path):
    import numpy as np

    config = {"lr": np.float32(0.25), "seed": np.int64(7), "sizes": np.array([3, 4]), "flag": np.bool_(True)}
    with nt.Recorder(tmp_path, config=config):
        pass
    assert meta_of(tmp_path)["config"] == {"lr": 0.25, "seed": 7, "sizes": [3, 4], "flag": True}


def test_a_module_named_as_another_modules_second_call_is_warned_of(tmp_path):
    """Rows of a module's k-th call in a pass are labelled ``name#k``: a module literally named so would
    share that series. The clash is said at attach (at the user's line, and as a note), naming both; the
    count is what follows the last ``#`` (``b#c#1`` is the second call of ``b#c``)."""
    model = nn.Sequential()
    for name in ("relu", "relu#1", "b#c", "b#c#1"):
        model.add_module(name, nn.ReLU() if name == "relu" else nn.Tanh())
    with (
        nt.Recorder(tmp_path, [nt.OutputNorm(include=[nn.Tanh])]) as rec,
        pytest.warns(UserWarning) as caught,
    ):
        rec.attach(model)
    messages = [str(w.message) for w in caught]
    clash = (
        "OutputNorm: module {!r} of Sequential has the name its rows give the call 2 of {!r} in a pass ({!r}, "
        "then {!r}, ...): if {!r} runs that often in a pass, the two share one series. Rename one of them "
        "(add_module)"
    )
    assert messages == [clash.format(n + "#1", n, n, n + "#1", n) for n in ("b#c", "relu")]
    assert {w.filename for w in caught} == {__file__}  # the user's attach line
    assert [(kind, detail) for _, kind, detail in notes(tmp_path)] == [
        ("output_modules_name_clash", messages[0])
    ]
    apart = nt.OutputNorm(exclude=["relu", "b#c"], include=[nn.Tanh])
    with nt.Recorder(tmp_path / "apart", [apart]) as rec, warnings.catch_warnings():
        warnings.simplefilter("error")
        rec.attach(model)  # neither base selected: no clash
