"""The recorder's timing and bookkeeping, each against a value known by construction: time-based flushing
on a fake clock (no sleeping), the status a failing ``with`` block leaves, the loss of a
``reduction="none"`` loss function, half-precision parameter norms, the params ``time`` column, and
writes that never leave a half-written file (meta.json, a failed shard's temporary file)."""

from __future__ import annotations

import json
import os
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from recorder_models import read_table
from torch import nn

import normtrace as nt
import normtrace.recorder as recorder_module
from normtrace.errors import WriterError


class FakeClock:
    """The recorder's monotonic clock, set by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    # The recorder reads its clock as `time.monotonic()` through its module's `time` name: swapping that
    # name (not the time module itself) moves the recorder's clock only; rows keep the real time.time().
    monkeypatch.setattr(
        recorder_module, "time", types.SimpleNamespace(monotonic=fake.monotonic, time=time.time)
    )
    return fake


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 3), nn.ReLU())


def _written_passes(run: Path, rec: nt.Recorder) -> list[int]:
    """The passes whose output rows are on disk now (after the writer has caught up)."""
    rec._writer.wait()  # the writer thread is asynchronous; wait() blocks until it has written its queue
    table = read_table(run, "outputs")
    return sorted(set(table.column("pass").to_pylist())) if table.num_rows else []


def test_flush_secs_hands_over_the_buffer_once_the_clock_passes_the_deadline(tmp_path, clock):
    model = _model()
    x = torch.randn(2, 3)
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm()], flush_every=10**6, flush_secs=5.0) as rec:
        rec.attach(model)
        for _ in range(3):
            model(x)
            clock.now += 1.0  # 1003.0 after the loop: 3 s of the 5 s
        assert _written_passes(tmp_path, rec) == []
        clock.now = 1005.5  # past the deadline: the next pass hands over every pass before it
        model(x)  # pass 3
        assert _written_passes(tmp_path, rec) == [0, 1, 2]
        # The deadline moved to 1010.5: a pass at 1010.0 does not flush, one at 1011.0 does.
        clock.now = 1010.0
        model(x)  # pass 4
        assert _written_passes(tmp_path, rec) == [0, 1, 2]
        clock.now = 1011.0
        model(x)  # pass 5
        assert _written_passes(tmp_path, rec) == [0, 1, 2, 3, 4]
        # Calls other than a pass flush when due too (a loop that pushes metrics between passes).
        clock.now = 1016.5
        rec.push_metric("reward", 1.0)
        assert _written_passes(tmp_path, rec) == [0, 1, 2, 3, 4, 5]


def test_tick_epoch_flushes_only_once_epoch_flush_secs_have_passed(tmp_path, clock):
    model = _model()
    x = torch.randn(2, 3)
    rec = nt.Recorder(
        tmp_path, lenses=[nt.OutputNorm()], flush_every=10**6, flush_secs=100.0, epoch_flush_secs=2.0
    )
    rec.attach(model)
    model(x)
    clock.now += 1.0
    rec.tick_epoch()  # 1 s since the recorder started: too soon
    assert _written_passes(tmp_path, rec) == []
    model(x)
    clock.now += 1.0
    rec.tick_epoch()  # 2 s: due
    assert _written_passes(tmp_path, rec) == [0, 1]
    rec.close()


def test_leaving_a_with_block_on_an_exception_records_failed(tmp_path):
    with (
        pytest.raises(RuntimeError, match="diverged"),
        nt.Recorder(tmp_path / "bad", lenses=[nt.OutputNorm()]) as rec,
    ):
        rec.attach(_model())
        raise RuntimeError("diverged")
    assert json.loads((tmp_path / "bad" / "meta.json").read_text())["status"] == "failed"
    with nt.Recorder(tmp_path / "good", lenses=[nt.OutputNorm()]) as rec:
        rec.attach(_model())
    assert json.loads((tmp_path / "good" / "meta.json").read_text())["status"] == "closed"


def test_a_reduction_none_loss_is_recorded_as_its_mean(tmp_path):
    loss_fn = nn.MSELoss(reduction="none")
    model = _model()
    with nt.Recorder(tmp_path, lenses=[nt.LossMetrics(loss_fn=loss_fn)]) as rec:
        rec.attach(model)
        model(torch.randn(2, 3))
        # squared errors 1, 4, 9, 16: mean 7.5 (the sum would be 30)
        loss_fn(torch.zeros(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    metrics = read_table(tmp_path, "metrics").to_pylist()
    assert [(m["name"], m["value"]) for m in metrics] == [("loss", 7.5)]


def test_fp16_parameter_norms_are_accumulated_in_fp32(tmp_path):
    """4096 elements of 2000: the norm is 2000 * 64 = 128000 exactly, beyond float16's largest finite
    value (65504), so a norm accumulated or returned in float16 is inf."""
    model = nn.Linear(64, 64, bias=False).half()
    with torch.no_grad():
        model.weight.fill_(2000.0)
    with nt.Recorder(tmp_path, lenses=[nt.ParameterNorm(parameters=["weight"])]) as rec:
        rec.attach(model)
        rec.collect()
    rows = read_table(tmp_path, "params").to_pylist()
    assert [(r["param"], r["norm"]) for r in rows] == [("weight", 128000.0)]


def test_params_time_is_the_wall_clock_time_of_the_collection(tmp_path):
    model = _model()
    with nt.Recorder(tmp_path, lenses=[nt.ParameterNorm()]) as rec:
        rec.attach(model)
        for _ in range(3):
            model(torch.randn(2, 3))  # the pass number (2 at the collection) is not a time
        before = time.time()
        rec.collect()
        after = time.time()
    times = read_table(tmp_path, "params").column("time").to_pylist()
    assert len(times) == 2 and all(before <= t <= after for t in times), (before, times, after)


def test_meta_json_is_replaced_not_rewritten_in_place(tmp_path):
    """A reader that opened meta.json keeps reading one whole document: the new one is a new file."""
    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm()])
    rec.attach(_model())
    with open(tmp_path / "meta.json") as reader:
        rec.close()
        assert json.loads(reader.read())["status"] == "running"
    assert json.loads((tmp_path / "meta.json").read_text())["status"] == "closed"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_a_shard_that_cannot_be_written_leaves_no_temporary_file(tmp_path):
    model = _model()
    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm()], flush_every=1)
    rec.attach(model)
    # A directory where the first output shard should go: the rename onto it fails (an OSError).
    blocker = tmp_path / "outputs" / "rank0-000001.arrow"
    blocker.mkdir(parents=True)
    (blocker / "keep").write_text("")
    model(torch.randn(2, 3))
    model(torch.randn(2, 3))  # hands pass 0 to the writer
    with pytest.raises(WriterError):
        rec.close()
    leftovers = [p.name for p in (tmp_path / "outputs").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    assert os.listdir(blocker) == ["keep"]


def test_flush_returns_only_once_the_rows_are_on_disk(tmp_path, monkeypatch):
    """``Recorder.flush()`` waits for the writer thread: with every shard write slowed by 1 s (longer than
    the 0.5 s at which the wait checks that the thread still runs), the rows recorded before the call are
    all readable the moment it returns (a flush that only handed the rows over would return before any
    file exists)."""
    from normtrace.writer import ShardWriter

    slow = ShardWriter._write_shard

    def write_slowly(self, table, data):
        time.sleep(1.0)
        return slow(self, table, data)

    monkeypatch.setattr(ShardWriter, "_write_shard", write_slowly)
    model = _model()
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm()]) as rec:
        rec.attach(model)
        for _ in range(3):
            model(torch.randn(2, 3))
        rec.flush()
        assert sorted(read_table(tmp_path, "outputs").column("pass").to_pylist()) == [0, 1, 2]


def test_a_call_exactly_at_the_deadline_does_not_flush_one_after_it_does(tmp_path, clock):
    model = _model()
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm()], flush_every=10**6, flush_secs=5.0) as rec:
        rec.attach(model)
        rec.push_metric("at_the_start", 0.0)
        rec._writer.wait()
        assert read_table(tmp_path, "metrics").num_rows == 0  # 5 s to go: kept in the buffer
        model(torch.randn(2, 3))  # pass 0 at 1000.0; the deadline is 1005.0
        clock.now = 1005.0
        rec.push_metric("at_the_deadline", 1.0)
        model(torch.randn(2, 3))  # pass 1, at the deadline too
        assert _written_passes(tmp_path, rec) == []
        clock.now = 1005.25
        rec.push_metric("after_it", 2.0)
        assert _written_passes(tmp_path, rec) == [0, 1]


def test_flush_every_counts_from_the_last_flush_whatever_made_it(tmp_path, clock):
    """``flush_every`` passes after a flush that ``flush()`` made: with 4, the flush after passes 0-1
    makes pass 6 the next to hand over (passes 2-5), not pass 4 or pass 7."""
    model = _model()
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm()], flush_every=4, flush_secs=3600) as rec:
        rec.attach(model)
        for _ in range(2):
            model(torch.randn(2, 3))
        rec.flush()
        assert _written_passes(tmp_path, rec) == [0, 1]
        for _ in range(4):  # passes 2-5
            model(torch.randn(2, 3))
        assert _written_passes(tmp_path, rec) == [0, 1]
        model(torch.randn(2, 3))  # pass 6 hands over passes 2-5
        assert _written_passes(tmp_path, rec) == [0, 1, 2, 3, 4, 5]


def test_metrics_take_one_element_arrays_and_refuse_longer_ones_naming_the_metric(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy deprecates float() of a 1-d array: it is reshaped first
        with nt.Recorder(tmp_path) as rec:
            rec.push_metric("one_d", np.array([2.5]))
            rec.push_metric("zero_d", np.array(3.5, dtype=np.float16))
            rec.push_metric("nested", np.array([[4.5]]))
            with pytest.raises(TypeError) as info:
                rec.push_metric("q", np.ones(2))
    assert str(info.value) == "metric 'q': expected a number or a one-element tensor, got array([1., 1.])"
    rows = read_table(tmp_path, "metrics").to_pylist()
    assert [(r["name"], r["value"]) for r in rows] == [("one_d", 2.5), ("zero_d", 3.5), ("nested", 4.5)]
