"""How a recording ends, however it ends: dropped without close(), SIGTERM/SIGHUP, a slow writer, fork."""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import types
import warnings
from pathlib import Path

import pytest
import torch
from recorder_models import QNetwork, approx_output_norms, meta_of, norms_by_module, read_table
from torch import nn

import normtrace as nt
import normtrace.writer
from normtrace import lifecycle

TESTS = Path(__file__).parent
EXAMPLES = TESTS.parent / "examples"


def writer_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("normtrace-writer")}


# ---------------------------------------------------------------------------------- dropped recorders


def train_and_forget_to_close(run: Path, xs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A sweep's train() that never calls close(): the model and its recorder go out of scope together
    (a reference cycle through the hooks, so only the garbage collector frees them)."""
    model = QNetwork()
    rec = nt.Recorder(run, lenses=[nt.OutputNorm(include=[nn.Identity])], flush_every=10**6, flush_secs=3600)
    rec.attach(model)
    for x in xs:
        model(x)
    rec.push_metric("last", 5.0)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_recorders_collected_without_close_write_everything_and_stop_their_writers(tmp_path):
    xs = [torch.randn(3, 4) for _ in range(5)]
    before = writer_threads()
    weights = [train_and_forget_to_close(tmp_path / f"run{i}", xs) for i in range(20)]
    deadline = time.monotonic() + 30
    while writer_threads() - before and time.monotonic() < deadline:
        # collected again until every recorder is: a gc.collect() returns at once, collecting nothing,
        # while another thread's collection runs (a writer's, running finalizers of recorders it freed)
        gc.collect()
        for t in writer_threads() - before:
            t.join(timeout=0.2)
    assert writer_threads() - before == set(), "writer threads of collected recorders still run"
    for i, state in enumerate(weights):
        run = tmp_path / f"run{i}"
        model = QNetwork()
        model.load_state_dict(state)
        rows = read_table(run, "outputs").to_pylist()
        assert len(rows) == 5 * 5
        for p, x in enumerate(xs):
            assert norms_by_module(rows, p) == approx_output_norms(model, x)
        assert read_table(run, "metrics").column("value").to_pylist() == [5.0]
        meta = meta_of(run)
        assert (meta["status"], meta["passes"], meta["epochs"]) == ("abandoned", 5, 0)
        assert meta["end_time"] is not None


def test_a_recorder_dropped_by_its_last_reference_is_finished_at_once(tmp_path):
    rec = nt.Recorder(tmp_path, flush_secs=3600)
    rec.push_metric("m", 1.0)
    rec.event("e")
    thread = next(t for t in writer_threads() if str(tmp_path) in t.name)
    del rec  # no cycle: reference counting frees it here
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert read_table(tmp_path, "metrics").column("name").to_pylist() == ["m"]
    assert read_table(tmp_path, "events").column("name").to_pylist() == ["e"]
    assert meta_of(tmp_path)["status"] == "abandoned"


def test_a_dropped_recorder_puts_the_signal_handlers_back(tmp_path):
    gc.collect()
    before = signal.getsignal(signal.SIGTERM)
    rec = nt.Recorder(tmp_path / "r")
    assert signal.getsignal(signal.SIGTERM) is not before
    del rec  # finished by its finalizer, in this (the main) thread
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_new_recorder_on_a_dropped_ones_directory_waits_for_its_writer(tmp_path, monkeypatch):
    """The dropped recorder's writer still holds the directory while it writes (slowly here); a new
    recorder of this process on that directory waits for it instead of being refused as a second writer."""
    original = normtrace.writer.ShardWriter._write_shard

    def slow(writer, table, data):
        time.sleep(0.5)
        return original(writer, table, data)

    monkeypatch.setattr(normtrace.writer.ShardWriter, "_write_shard", slow)
    rec = nt.Recorder(tmp_path)
    rec.push_metric("first", 1.0)
    del rec
    again = nt.Recorder(tmp_path, overwrite=True)
    again.push_metric("second", 2.0)
    again.close()
    assert read_table(tmp_path, "metrics").column("name").to_pylist() == ["second"]
    assert meta_of(tmp_path)["status"] == "closed"


# ---------------------------------------------------------------------------------- a slow writer


class SlowDisk:
    """Makes every shard write wait until ``release()``; ``writes`` counts the writes that began."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self._open = threading.Event()
        self.writes = 0
        original = normtrace.writer.ShardWriter._write_shard

        def slow(writer, table, data):
            self.writes += 1
            assert self._open.wait(60), "the test never released the disk"
            return original(writer, table, data)

        monkeypatch.setattr(normtrace.writer.ShardWriter, "_write_shard", slow)

    def release(self) -> None:
        self._open.set()

    def block(self) -> None:
        """Make the writes that begin from now on wait again, until the next ``release()``."""
        self._open.clear()


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.001)


def test_training_waits_for_a_writer_slower_than_it_with_one_warning(tmp_path, monkeypatch):
    """The queue to the writer used to grow without bound (RSS 254 -> 467 MiB in the issue's run). Now
    a flush waits while more than max_queued_rows are queued, and says so once, naming the run."""
    disk = SlowDisk(monkeypatch)
    model = QNetwork()
    xs = [torch.randn(2, 4) for _ in range(12)]
    rec = nt.Recorder(
        tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])], flush_every=2, max_queued_rows=10
    ).attach(model)
    passes_done = []

    def train() -> None:
        for x in xs:
            model(x)
            passes_done.append(1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = threading.Thread(target=train)
        trainer.start()
        wait_until(lambda: rec._writer.stalls > 0 or len(passes_done) == len(xs), "training stalls")
        # passes 2 and 4 flush 10 rows each; pass 6 finds 20 queued (over 10) and waits in its flush
        assert len(passes_done) == 6 and rec._writer.queued_rows == 20 and rec._writer.stalls == 1
        disk.release()
        trainer.join(timeout=60)
        wait_until(lambda: rec._writer.queued_rows == 0, "the writer catches up")
        # On a busy machine the released writer can still lag behind passes 7-12 and stall them again:
        # count from here.
        before = rec._writer.stalls
        disk.block()  # another stall: counted, not warned about again
        trainer = threading.Thread(target=train)
        trainer.start()
        wait_until(lambda: rec._writer.stalls > before or len(passes_done) == 2 * len(xs), "training stalls")
        assert rec._writer.stalls == before + 1  # the trainer waits in that one until the release
        disk.release()
        trainer.join(timeout=60)
    rec.close()
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert len(rows) == 2 * 12 * 5
    for p, x in enumerate(xs + xs):
        assert norms_by_module(rows, p) == approx_output_norms(model, x)
    stalls = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert [str(w.message) for w in stalls] == [
        f"normtrace: the writer of {tmp_path} is 20 rows behind (max_queued_rows=10); training waits for "
        "it to catch up. The disk is slower than what is recorded: record fewer modules "
        "(OutputNorm(exclude=...)), or raise max_queued_rows to buy memory for speed"
    ]
    assert stalls[0].filename == __file__  # the training loop's line (model(x)), not normtrace's


def test_close_says_how_many_rows_are_left_while_it_drains(tmp_path, monkeypatch):
    monkeypatch.setattr(normtrace.writer, "PROGRESS_SECS", 0.01)
    disk = SlowDisk(monkeypatch)
    model = QNetwork()
    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])]).attach(model)
    for _ in range(4):
        model(torch.randn(2, 4))
    rec.push_metric("m", 1.0)
    said: list[str] = []
    spoke = threading.Event()

    class Listener(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())
            spoke.set()

    listener = Listener()
    logging.getLogger("normtrace").addHandler(listener)
    try:
        closer = threading.Thread(target=rec.close)
        closer.start()
        assert spoke.wait(30), "close() said nothing while the writer was stuck"
        disk.release()
        closer.join(timeout=60)
    finally:
        logging.getLogger("normtrace").removeHandler(listener)
    said_first = re.fullmatch(
        rf"normtrace: still writing {re.escape(str(tmp_path))}: 21 rows left \((\d+) s so far\)", said[0]
    )
    assert said_first and int(said_first[1]) < 60, said  # seconds since close() began
    assert read_table(tmp_path, "outputs").num_rows == 20
    assert meta_of(tmp_path)["status"] == "closed"


# ---------------------------------------------------------------------------------- signals

TERMINATED = """
import json, signal, sys, time, torch
sys.path[:0] = [{tests!r}, {examples!r}]
import normtrace as nt
from recorder_models import QNetwork, expected_output_norms
{setup}
torch.manual_seed(0)
model = QNetwork()
rec = nt.Recorder({run!r}, lenses=[nt.OutputNorm(include=[torch.nn.Identity])], flush_every=10_000,
                  flush_secs=3600)
rec.attach(model)
xs = [torch.randn(3, 4) for _ in range(7)]
for x in xs:
    model(x)
rec.push_metric("last", 7.0)
rec.event("before_signal")
with open({expected!r}, "w") as f:
    json.dump([expected_output_norms(model, x) for x in xs], f)
print("ready", flush=True)
while True:
    time.sleep(0.01)
"""

USER_HANDLER = """
def on_term(signum, frame):
    with open({marker!r}, "w") as f:
        f.write("the user's handler ran")
    sys.exit(3)
signal.signal(signal.{sig}, on_term)
"""


def run_until_signal(tmp_path: Path, sig: signal.Signals, setup: str = "") -> subprocess.Popen:
    run, expected = tmp_path / "run", tmp_path / "expected.json"
    script = TERMINATED.format(
        tests=str(TESTS), examples=str(EXAMPLES), run=str(run), expected=str(expected), setup=setup
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # the signal's default action in the child, whatever this process inherited: under `nohup` SIGHUP is
        # ignored, and the recorder rightly hands the signal on to that "ignore"
        preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL),
    )
    assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()
    proc.send_signal(sig)
    proc.wait(timeout=180)  # a loaded machine: the flush and exit, not a hang
    return proc


def assert_everything_before_the_signal_is_there(tmp_path: Path) -> None:
    run = tmp_path / "run"
    expected = json.loads((tmp_path / "expected.json").read_text())
    rows = read_table(run, "outputs").to_pylist()
    assert len(rows) == 7 * 5
    for p, want in enumerate(expected):
        assert norms_by_module(rows, p) == pytest.approx(want, rel=1e-6)
    assert read_table(run, "metrics").column("value").to_pylist() == [7.0]
    assert read_table(run, "events").column("name").to_pylist() == ["before_signal"]
    meta = meta_of(run)
    assert (meta["status"], meta["passes"]) == ("terminated", 7)


SIGNALS = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_sigterm_and_sighup_write_the_unflushed_tail_and_still_kill(tmp_path, sig):
    """What schedulers and ``docker stop`` send: every row recorded before the signal is written, the run
    says it was terminated, and the process still dies of the signal."""
    proc = run_until_signal(tmp_path, sig)
    assert proc.returncode == -sig, proc.stderr.read().decode()
    assert_everything_before_the_signal_is_there(tmp_path)


def test_the_users_own_signal_handler_still_runs_after_the_recorders_are_written(tmp_path):
    marker = tmp_path / "marker"
    setup = USER_HANDLER.format(marker=str(marker), sig="SIGTERM")
    proc = run_until_signal(tmp_path, signal.SIGTERM, setup)
    assert proc.returncode == 3, proc.stderr.read().decode()
    assert marker.read_text() == "the user's handler ran"
    assert_everything_before_the_signal_is_there(tmp_path)


def test_signal_handlers_are_installed_while_open_and_put_back_after(tmp_path):
    """Installed by a recorder made in the main thread, put back when the last such recorder closes there
    (signal.signal works in the main thread only: one closed elsewhere leaves them to the next close)."""
    gc.collect()
    nt.Recorder(tmp_path / "earlier").close()
    before = signal.getsignal(signal.SIGTERM)
    with nt.Recorder(tmp_path / "a", handle_signals=False):
        assert signal.getsignal(signal.SIGTERM) is before
    rec = nt.Recorder(tmp_path / "b")
    assert signal.getsignal(signal.SIGTERM) is not before
    rec.close()
    assert signal.getsignal(signal.SIGTERM) is before
    if hasattr(signal, "SIGHUP"):  # a signal ignored on purpose (nohup) stays ignored
        previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            with nt.Recorder(tmp_path / "c"):
                assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        finally:
            signal.signal(signal.SIGHUP, previous)


def test_a_signal_ignored_on_purpose_leaves_the_other_signals_handled(tmp_path):
    """SIGTERM ignored (the first signal the recorder looks at) is left alone, and SIGHUP still gets the
    recorder's handler: skipping one signal must not skip the rest."""
    if not hasattr(signal, "SIGHUP"):
        pytest.skip("needs SIGHUP")
    term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    hup = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with nt.Recorder(tmp_path / "r"):
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, term)
        signal.signal(signal.SIGHUP, hup)


def test_a_signal_arriving_inside_the_recorder_reaches_the_users_handler_when_it_leaves(tmp_path):
    """A signal raised while the main thread is inside a critical stretch of the recorder (taking rows
    out of the buffer) is held until the stretch ends, then handed to the user's handler with the frame
    it interrupted, as if normtrace were not there; the run says it was terminated and keeps its rows."""
    got: list[tuple[int, object]] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append((signum, frame)))
    try:
        with nt.Recorder(tmp_path / "r") as rec:
            rec.push_metric("before", 1.0)
            with lifecycle.critical():
                with lifecycle.critical():  # stretches nest: leaving the inner one is not the end
                    pass
                signal.raise_signal(signal.SIGTERM)
                assert got == []  # held: the recorder is mid-stretch
            assert [signum for signum, _ in got] == [signal.SIGTERM]
            assert isinstance(got[0][1], types.FrameType)
            signal.raise_signal(signal.SIGTERM)  # outside a stretch: handed on at once, frame and all
            assert len(got) == 2 and isinstance(got[1][1], types.FrameType)
            assert meta_of(tmp_path / "r")["status"] == "terminated"
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert read_table(tmp_path / "r", "metrics").column("name").to_pylist() == ["before"]


CLOSE_FAILS_AT_EXIT = """
import sys
sys.path[:0] = [{tests!r}]
import normtrace as nt
rec = nt.Recorder({run!r})
rec.push_metric("m", 1.0)
close = rec.close
def failing_close(**options):
    close(**options)
    raise RuntimeError("the disk went away")
rec.close = failing_close
print(rec.run_dir, flush=True)
"""


def test_a_close_failing_at_exit_is_said_on_stderr_naming_the_run(tmp_path):
    """At interpreter exit raising helps nobody: what failed is said on stderr, naming the run directory
    and the error, and the process exits as it would have."""
    proc = subprocess.run(
        [sys.executable, "-c", CLOSE_FAILS_AT_EXIT.format(tests=str(TESTS), run=str(tmp_path / "r"))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    run_dir = proc.stdout.strip()
    assert proc.returncode == 0, proc.stderr
    assert f"normtrace: closing the recorder of {run_dir}: the disk went away\n" in proc.stderr
    assert meta_of(tmp_path / "r")["status"] == "exited"


ABANDONED_THEN_EXIT = """
import gc, sys, time
sys.path[:0] = [{tests!r}]
import normtrace as nt
import normtrace.writer
write = normtrace.writer.ShardWriter._write_shard
def slow_write(self, table, data):
    time.sleep(0.5)
    write(self, table, data)
normtrace.writer.ShardWriter._write_shard = slow_write
rec = nt.Recorder({run!r})
rec.push_metric("m", 1.0)
del rec
gc.collect()
nt.Recorder({run!r} + "-next").close()  # made and closed while the dropped one still writes
"""


def test_a_recorder_dropped_just_before_exit_is_written_before_the_process_ends(tmp_path):
    """A recorder collected without close() finishes without waiting (its finalizer may run on any
    thread); if the interpreter exits right after, the exit handler waits for its writer (a daemon
    thread that would otherwise die mid-write): here each shard takes half a second to write."""
    proc = subprocess.run(
        [sys.executable, "-c", ABANDONED_THEN_EXIT.format(tests=str(TESTS), run=str(tmp_path / "r"))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert read_table(tmp_path / "r", "metrics").column("name").to_pylist() == ["m"]
    assert meta_of(tmp_path / "r")["status"] == "abandoned"
    assert meta_of(tmp_path / "r-next")["status"] == "closed"


# ---------------------------------------------------------------------------------- fork


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_is_refused_the_parents_run_instead_of_hanging(tmp_path):
    """flush() in a forked child used to wait forever for a writer thread that fork does not copy. The
    child now gets a clear error, its hooks record nothing, close() leaves the parent's run alone, and
    the parent goes on recording."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's own ops hang in a forked child once the parent used its thread pool
    try:
        forked_child_runs_and_is_refused(tmp_path)
    finally:
        torch.set_num_threads(threads)


def forked_child_runs_and_is_refused(tmp_path: Path) -> None:
    model = QNetwork()
    x = torch.randn(3, 4)
    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])]).attach(model)
    model(x)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit code and the refusal's text only
        code = 1
        try:
            model(x)
            model.net(x)  # a child called alone: no pass, no note in the parent's meta.json
            try:
                rec.flush()
                code = 10
            except nt.NormtraceError as exc:
                os.write(write_end, str(exc).encode())
                code = 0
            rec.close()
        except BaseException:
            code = 12
        os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("flush() in the forked child hung")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status) == 0
    with os.fdopen(read_end) as refusal:
        assert refusal.read() == (
            f"this Recorder of {tmp_path} belongs to process {os.getpid()}; in this process ({pid}), a "
            "fork() of it, it records nothing and cannot write, since fork does not copy its writer "
            "thread: create a Recorder with its own run directory in the child"
        )
    assert "passes_from_children" not in (tmp_path / "meta.json").read_text()
    model(x)
    rec.close()
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert [r["pass"] for r in rows] == [0] * 5 + [1] * 5
    assert norms_by_module(rows, 1) == approx_output_norms(model, x)
    assert meta_of(tmp_path)["status"] == "closed"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_childs_own_recorder_puts_the_signal_handlers_back_when_it_closes(tmp_path):
    """The parent's recorder, copied into a forked child, records nothing there and wants no signal
    handler: when the child's own recorder closes, the handlers go back to what they were."""
    before = signal.getsignal(signal.SIGTERM)
    with nt.Recorder(tmp_path / "parent"):
        assert signal.getsignal(signal.SIGTERM) is not before
        pid = os.fork()
        if pid == 0:  # the child: report through the exit code only
            code = 1
            try:
                nt.Recorder(tmp_path / "child").close()
                code = 0 if signal.getsignal(signal.SIGTERM) is before else 10
            except BaseException:
                code = 11
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert signal.getsignal(signal.SIGTERM) is not before  # the parent's own stay while it is open
    assert meta_of(tmp_path / "child")["status"] == "closed"


def test_a_recorder_failing_to_write_on_a_signal_still_lets_the_users_handler_run(tmp_path, monkeypatch):
    """With a handler of the user's to hand the signal to, each open recorder writes what it has first;
    one of them failing must not keep the signal from that handler (or from the other recorders)."""
    got: list[int] = []

    def refuses(self, signum):
        raise OSError("the disk went away")

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with nt.Recorder(tmp_path / "a") as broken, nt.Recorder(tmp_path / "b") as fine:
            fine.push_metric("m", 1.0)
            monkeypatch.setattr(broken, "_terminated", refuses.__get__(broken))
            signal.raise_signal(signal.SIGTERM)
            assert got == [signal.SIGTERM]
            assert meta_of(tmp_path / "b")["status"] == "terminated"
    finally:
        signal.signal(signal.SIGTERM, previous)


BLOCKED = """
import signal, sys
sys.path[:0] = [{tests!r}]
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGTERM}})  # in every thread started from here on
import normtrace as nt
from normtrace import lifecycle
rec = nt.Recorder({run!r})
rec.push_metric("m", 1.0)
lifecycle._on_signal(signal.SIGTERM, None)  # as delivered; the signal handed on stays pending
print("still alive", flush=True)
"""


def test_a_signal_that_cannot_be_handed_on_still_ends_the_process_with_its_code(tmp_path):
    """After writing the runs, the default action is restored and the signal sent again; if this thread
    blocks it (so it stays pending), the process exits anyway, with the shell's code for that signal."""
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED.format(tests=str(TESTS), run=str(tmp_path / "r"))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "still alive" not in proc.stdout
    assert meta_of(tmp_path / "r")["status"] == "terminated"
    assert read_table(tmp_path / "r", "metrics").column("name").to_pylist() == ["m"]
