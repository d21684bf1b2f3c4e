"""The recorder at run time: no host-device sync in hooks, killed runs, torch.distributed ranks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
import torch
import torch.multiprocessing as mp
from dist_worker import distributed_worker
from recorder_models import QNetwork, read_table
from torch import nn

import normtrace as nt

TESTS = Path(__file__).parent
REPO = TESTS.parent
EXAMPLES = REPO / "examples"


def test_hooks_and_recorder_calls_never_synchronise(tmp_path, monkeypatch):
    """Tensor.item/tolist/cpu/numpy/float/to(cpu) from the training thread would be a host-device sync."""
    model, loss_fn = QNetwork(), nn.MSELoss()
    calls: list[str] = []

    def spy(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            moves_to_host = name != "to" or any(str(a) == "cpu" for a in [*args, *kwargs.values()])
            if threading.current_thread() is threading.main_thread() and moves_to_host:
                calls.append(name)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    lenses = [
        nt.LossMetrics(loss_fn=loss_fn, metrics=["q"]),
        nt.OutputNorm(include=[nn.Identity]),
        nt.ParameterNorm(),
    ]
    with nt.Recorder(tmp_path, lenses=lenses, flush_every=1) as rec:
        rec.attach(model)
        rec.track_target(QNetwork())
        xs = [torch.randn(16, 4) for _ in range(6)]
        for name in ["item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "to"]:
            spy(name)
        for x in xs:  # flush_every=1: the writer hand-off happens inside every forward pass
            q = model(x)
            loss = loss_fn(q, torch.zeros_like(q))
            loss.backward()
            rec.push_metric("q", q.detach().max())
            rec.collect()
            rec.event("step")
        rec.tick_epoch()
        assert calls == []
        monkeypatch.undo()
    assert read_table(tmp_path, "outputs").num_rows == 6 * 5
    assert read_table(tmp_path, "metrics").num_rows == 12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
def test_no_sync_on_cuda(tmp_path):
    model = QNetwork().cuda()
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity]), nt.ParameterNorm()]) as rec:
        rec.attach(model)
        xs = [torch.randn(32, 4, device="cuda") for _ in range(20)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for x in xs:
                model(x).sum().backward()
            rec.collect()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert read_table(tmp_path, "outputs").num_rows == 20 * 5


KILLED_AFTER_FLUSHES = """
import os, signal, sys, time, torch
sys.path[:0] = [{tests!r}, {examples!r}]
import normtrace as nt
from recorder_models import QNetwork
torch.manual_seed(0)
model = QNetwork()
rec = nt.Recorder({run!r}, lenses=[nt.OutputNorm(include=[torch.nn.Identity])], flush_every=10, flush_secs=3600)
rec.attach(model)
rec.push_metric("before_kill", 1.0)
for _ in range(35):
    model(torch.randn(3, 4))
deadline = time.time() + 30
while len(list((rec.run_dir / "outputs").glob("*.arrow"))) < 3 and time.time() < deadline:
    time.sleep(0.01)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_keeps_every_earlier_flush(tmp_path):
    run = tmp_path / "run"
    script = KILLED_AFTER_FLUSHES.format(tests=str(TESTS), examples=str(EXAMPLES), run=str(run))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    passes = read_table(run, "outputs").column("pass").to_pylist()
    assert sorted(set(passes)) == list(range(30))  # three flushes of 10 passes; the unflushed 5 are lost
    assert read_table(run, "metrics").column("name").to_pylist() == ["before_kill"]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "running" and meta["end_time"] is None


KILLED_ANY_TIME = """
import sys, torch
sys.path[:0] = [{tests!r}, {examples!r}]
import normtrace as nt
from recorder_models import QNetwork
model = QNetwork()
rec = nt.Recorder({run!r}, lenses=[nt.OutputNorm(include=[torch.nn.Identity]), nt.ParameterNorm()], flush_every=1)
rec.attach(model)
shards = rec.run_dir / "outputs"
told = False
while True:
    model(torch.randn(64, 4))
    rec.collect()
    if not told and len(list(shards.glob("*.arrow"))) > 10:
        print("written", flush=True)  # the writer goes on writing one shard per pass: the kill lands mid-way
        told = True
"""


def test_sigkill_at_any_moment_leaves_only_complete_shards(tmp_path):
    run = tmp_path / "run"
    script = KILLED_ANY_TIME.format(tests=str(TESTS), examples=str(EXAMPLES), run=str(run))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    # The child says when more than 10 shards are on disk, and keeps writing: no guess of how long that takes.
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    files = sorted((run / "outputs").glob("*.arrow"))
    assert len(files) > 10
    passes = read_table(run, "outputs").column("pass").to_pylist()
    assert sorted(set(passes)) == list(range(max(passes) + 1))  # every flush up to the last one is there
    for table in ("outputs", "params"):
        frame = pl.scan_ipc(str(run / table / "*.arrow")).collect()
        assert frame.height == read_table(run, table).num_rows > 0


def test_each_rank_writes_its_own_shards(tmp_path):
    run = tmp_path / "run"
    init = f"file://{tmp_path / 'store'}"
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    mp.start_processes(
        distributed_worker, args=(2, init, str(run), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    for table in ("outputs", "params", "metrics"):
        for shard in sorted((run / table).glob("*.arrow")):
            rank = int(shard.name.split("-")[0].removeprefix("rank"))
            assert set(pa.ipc.open_file(shard).read_all().column("rank").to_pylist()) == {rank}
        assert {s.name.split("-")[0] for s in (run / table).glob("*.arrow")} == {"rank0", "rank1"}
    outputs = read_table(run, "outputs").to_pylist()
    for r, out in enumerate(outs):
        result = json.loads(out.read_text())
        assert result["collectives"] == []
        for p, want in enumerate(result["expected"]):
            got = {row["module"]: row["norm"] for row in outputs if row["rank"] == r and row["pass"] == p}
            assert got == pytest.approx(want, rel=1e-5)
    metas = [json.loads((run / name).read_text()) for name in ("meta.json", "meta.rank1.json")]
    assert [(m["rank"], m["world_size"]) for m in metas] == [(0, 2), (1, 2)]


CRASHED = """
import sys, torch
sys.path[:0] = [{tests!r}, {examples!r}]
import normtrace as nt
from recorder_models import QNetwork
model = QNetwork()
rec = nt.Recorder({run!r}, lenses=[nt.OutputNorm()], flush_every=10_000, flush_secs=3600)
rec.attach(model)
for step in range(7):
    model(torch.randn(3, 4))
rec.push_metric("last_words", 7.0)
raise RuntimeError("training diverged")
"""


def test_crashed_run_without_close_is_flushed_at_exit(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", CRASHED.format(tests=str(TESTS), examples=str(EXAMPLES), run=str(run))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "training diverged" in proc.stderr
    assert sorted(set(read_table(run, "outputs").column("pass").to_pylist())) == list(range(7))
    assert read_table(run, "metrics").column("name").to_pylist() == ["last_words"]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "exited" and meta["passes"] == 7
