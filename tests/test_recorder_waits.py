"""Every wait of the recorder ends: each is run in a thread that must finish within seconds, so a bug that
makes it wait forever fails here, naming the wait, instead of hanging the suite (or a user's exit). The
writer's waits come first: the recorder's own calls use them."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from recorder_models import meta_of, read_table
from torch import nn

import normtrace as nt
from normtrace import lifecycle
from normtrace.buffer import Buffer
from normtrace.writer import ShardWriter

PATIENCE = 20.0  # seconds; each wait below ends in well under one on an idle writer


def finishes(call: Callable[[], object], within: float = PATIENCE) -> bool:
    """Run ``call`` in a daemon thread; whether it returned within ``within`` seconds."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(within)
    return not thread.is_alive()


@pytest.fixture
def writer(tmp_path: Path):
    w = ShardWriter(tmp_path, 0, "lz4", 1)
    yield w
    w.close()
    assert finishes(w.join), "the writer thread did not stop after close()"


def test_close_stops_the_writer_thread(tmp_path):
    w = ShardWriter(tmp_path, 0, "lz4", 1)
    released: list[bool] = []
    w.close(then=lambda: released.append(True))
    w.close()  # a second close changes nothing
    assert finishes(w.join), "join() did not return after close()"
    assert (w.alive, released) == (False, [True])


def test_wait_returns_once_the_queue_is_handled(writer):
    writer.submit_meta({"status": "running"})
    assert finishes(writer.wait), "wait() did not return on an idle writer"


def test_wait_for_room_returns_once_the_writer_catches_up(writer):
    buffer = Buffer()
    buffer.metrics.append((0, 0, "m", 1.0, None, 0.0))
    writer.submit_records(buffer.take())  # a first write that succeeds: training must still wait after it
    assert finishes(writer.wait) and writer.queued_rows == 0
    writer.queued_rows = 5  # as if five rows were queued against a limit of one
    waiting = threading.Thread(target=writer.wait_for_room, daemon=True)
    with warnings.catch_warnings(record=True) as warned:  # records the waiting thread's warning too
        warnings.simplefilter("always")
        waiting.start()
        waiting.join(0.3)
        assert waiting.is_alive()  # behind: it waits
        with writer._room:
            writer.queued_rows = 0
            writer._room.notify_all()
        waiting.join(PATIENCE)
    assert not waiting.is_alive(), "wait_for_room() kept waiting after the writer caught up"
    assert writer.stalls == 1
    assert [str(w.message) for w in warned] == [
        f"normtrace: the writer of {writer.run_dir} is 5 rows behind (max_queued_rows=1); training waits "
        "for it to catch up. The disk is slower than what is recorded: record fewer modules "
        "(OutputNorm(exclude=...)), or raise max_queued_rows to buy memory for speed"
    ]


def test_critical_stretches_nest_and_end_at_depth_zero():
    assert lifecycle._local.depth == 0
    with lifecycle.critical():
        assert lifecycle._local.depth == 1
        with lifecycle.critical():
            assert lifecycle._local.depth == 2
        assert lifecycle._local.depth == 1
    assert lifecycle._local.depth == 0


def test_open_recorders_are_this_processs_open_ones_and_close_ends(tmp_path):
    rec = nt.Recorder(tmp_path / "a", handle_signals=False)  # closed from another thread below
    assert lifecycle._open_recorders() == [rec]
    assert finishes(rec.close)
    assert lifecycle._open_recorders() == []


def test_attach_returns_for_a_plain_model(tmp_path):
    """``attach`` looks through wrappers (``torch.compile``, DDP) in a loop: it must end on a plain model."""
    rec = nt.Recorder(tmp_path / "a", handle_signals=False)  # closed from another thread below
    assert finishes(lambda: rec.attach(nn.Sequential(nn.Linear(2, 2)))), "attach() did not return"
    assert finishes(rec.close)


def test_a_signal_held_in_a_critical_stretch_is_handed_on_when_it_ends(tmp_path):
    got: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    rec = nt.Recorder(tmp_path)
    try:
        with lifecycle.critical():
            signal.raise_signal(signal.SIGTERM)
            held = list(got)
        handed_on, left = list(got), list(lifecycle._deferred)
        lifecycle._deferred.clear()  # a signal never handed on would end the run at close: report instead
        rec.close()  # in the main thread, which puts the signal handlers back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (held, handed_on, left) == ([], [signal.SIGTERM], [])


def test_a_process_exiting_with_a_recorder_open_ends_and_writes_it(tmp_path):
    """Python waits for its non-daemon threads before the exit handlers run: the writer must be a daemon
    thread, or a run left open at exit would keep the process alive forever, its exit handler (which
    closes the recorder) never reached."""
    run = tmp_path / "r"
    code = f"import normtrace as nt\nrec = nt.Recorder({str(run)!r})\nrec.push_metric('m', 1.0)\n"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=PATIENCE * 3
        )
    except subprocess.TimeoutExpired:
        pytest.fail("a process with an open recorder did not exit")
    assert proc.returncode == 0, proc.stderr
    assert meta_of(run)["status"] == "exited"
    assert read_table(run, "metrics").column("value").to_pylist() == [1.0]


SIGNALLED_WHILE_WAITING = """
import signal, sys, time
import torch
from torch import nn
import normtrace as nt
import normtrace.writer as writer

write = writer.ShardWriter._write_shard
writer.ShardWriter._write_shard = lambda self, *a: (time.sleep(0.2), write(self, *a))[1]  # a slow disk
warn = writer.warn_user

def warn_then_signal(*args, **kwargs):  # SIGTERM arriving while the wait for room holds the writer's lock
    warn(*args, **kwargs)
    signal.raise_signal(signal.SIGTERM)

writer.warn_user = warn_then_signal
model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
rec = nt.Recorder(sys.argv[1], [nt.OutputNorm()], flush_every=1, max_queued_rows=3).attach(model)
for _ in range(50):
    model(torch.randn(2, 4))
"""


def test_a_signal_arriving_while_training_waits_for_the_writer_ends_the_run(tmp_path):
    """SIGTERM handled while ``wait_for_room`` holds the writer's lock: the handler, which writes the run
    and joins the writer, must not run there (the writer needs that lock to count what it wrote: the
    process ignored SIGTERM for ever). It runs when the wait ends, and the run reads terminated."""
    run = tmp_path / "r"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", SIGNALLED_WHILE_WAITING, str(run)],
            capture_output=True,
            text=True,
            timeout=PATIENCE * 3,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("SIGTERM during the wait for room never ended the process")
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    meta = meta_of(run)
    assert meta["status"] == "terminated"
    # every pass but the last, whose start waited for room and was ended there before its forward ran
    assert read_table(run, "outputs").column("pass").to_pylist() == list(range(meta["passes"] - 1))
