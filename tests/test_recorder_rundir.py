"""One writer per run directory and rank, across processes: a lock file the kernel releases on death."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
from recorder_models import read_table

import normtrace as nt
from normtrace import rundir, schema

TESTS = Path(__file__).parent
EXAMPLES = TESTS.parent / "examples"

HOLDER = """
import os, sys, time
sys.path[:0] = [{tests!r}, {examples!r}]
import normtrace as nt
go = {go!r}
if go:
    print("ready", flush=True)
while go and not os.path.exists(go):
    time.sleep(0.0005)
try:
    rec = nt.Recorder({run!r}, overwrite={overwrite!r})
except Exception as exc:
    print("refused", type(exc).__name__, exc, flush=True)
    sys.exit(0)
print("writing", os.getpid(), flush=True)
sys.stdin.readline()  # hold the run until told to finish
rec.push_metric("from", os.getpid())
rec.close()
print("closed", flush=True)
"""


def start_holder(run: Path, *, go: Path | None = None, overwrite: bool = False) -> subprocess.Popen:
    script = HOLDER.format(
        tests=str(TESTS), examples=str(EXAMPLES), run=str(run), go=str(go) if go else "", overwrite=overwrite
    )
    return subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate("\n", timeout=60)
    assert proc.returncode == 0, out
    return out


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_processes_starting_together_on_one_run_exactly_one_writes(tmp_path, overwrite):
    """Both start on a go signal; exactly one gets the run, the other a RunDirError naming the winner
    (it used to be a 'No such file or directory' from the middle of the other's start, or, with
    overwrite=True, a run mixing both)."""
    run, go = tmp_path / "run", tmp_path / "go"
    if overwrite:  # a finished run both want to replace
        nt.Recorder(run).close()
    procs = [start_holder(run, go=go, overwrite=overwrite) for _ in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]  # both wait for go
    go.touch()
    firsts = [p.stdout.readline().split() for p in procs]
    writers = [f for f in firsts if f[0] == "writing"]
    refused = [" ".join(f) for f in firsts if f[0] == "refused"]
    assert len(writers) == 1 and len(refused) == 1, firsts
    winner = writers[0][1]
    assert f"process {winner} on {socket.gethostname()}" in refused[0] and "RunDirError" in refused[0]
    for p in procs:
        finish(p)
    assert read_table(run, "metrics").column("value").to_pylist() == [float(winner)]
    assert not (run / schema.lock_name(0)).exists()


def test_overwrite_refuses_a_run_that_a_live_process_is_writing(tmp_path):
    run = tmp_path / "run"
    holder = start_holder(run)
    first = holder.stdout.readline().split()
    assert first[0] == "writing", first
    lock = json.loads((run / schema.lock_name(0)).read_text())
    assert (lock["pid"], lock["hostname"]) == (int(first[1]), socket.gethostname())
    with pytest.raises(nt.RunDirError, match=rf"process {first[1]} on {socket.gethostname()}.*even with"):
        nt.Recorder(run, overwrite=True)
    finish(holder)
    assert read_table(run, "metrics").column("value").to_pylist() == [float(first[1])]
    assert json.loads((run / schema.meta_name(0)).read_text())["status"] == "closed"


def test_a_lock_left_by_a_killed_process_is_taken_over_with_a_warning(tmp_path):
    run = tmp_path / "run"
    holder = start_holder(run)
    first = holder.stdout.readline().split()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert (run / schema.lock_name(0)).exists()  # SIGKILL leaves the file; the kernel dropped the lock
    with pytest.raises(nt.RunDirError, match="already holds a trace"):
        nt.Recorder(run)  # the dead process's trace is still protected from accidents
    with pytest.warns(UserWarning, match=rf"process {first[1]}.*no longer running"):
        rec = nt.Recorder(run, overwrite=True)
    lock = json.loads((run / schema.lock_name(0)).read_text())
    assert lock["pid"] == os.getpid()
    rec.push_metric("mine", 1.0)
    rec.close()
    assert read_table(run, "metrics").column("name").to_pylist() == ["mine"]
    assert not (run / schema.lock_name(0)).exists()


def test_a_lock_file_from_another_host_is_refused_unless_overwrite(tmp_path):
    """A lock written on another host (a shared file system) cannot be checked from here: whether that
    process is alive is unknowable, so only overwrite=True takes it, with a warning."""
    run = tmp_path / "run"
    run.mkdir()
    lock = {"pid": 4242, "hostname": "elsewhere.example", "start_time": "2026-11-30T00:00:00+00:00"}
    (run / schema.lock_name(0)).write_text(json.dumps(lock))
    with pytest.raises(nt.RunDirError, match=r"process 4242 on elsewhere\.example.*overwrite=True"):
        nt.Recorder(run)
    with pytest.warns(UserWarning, match=r"elsewhere\.example"):
        nt.Recorder(run, overwrite=True).close()
    assert not (run / schema.lock_name(0)).exists()


def test_the_lock_file_is_held_while_open_and_ignored_by_the_reader(tmp_path):
    import normtrace_analysis as na

    rec = nt.Recorder(tmp_path)
    rec.push_metric("m", 1.0)
    rec.flush()
    lock = json.loads((tmp_path / schema.lock_name(0)).read_text())
    assert (lock["pid"], lock["hostname"]) == (os.getpid(), socket.gethostname())
    assert na.load(tmp_path).metrics.collect().height == 1
    rec.close()
    assert not (tmp_path / schema.lock_name(0)).exists()


def test_only_a_process_of_this_host_that_no_longer_runs_is_gone():
    """A lock's owner is known dead only on its own host and with a numeric pid; a live one, another
    host's or an unreadable one is never taken for gone."""
    from normtrace.rundir import _gone

    here = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert _gone({"pid": dead.pid, "hostname": here})
    assert not _gone({"pid": os.getpid(), "hostname": here})
    assert not _gone({"pid": dead.pid, "hostname": "elsewhere.example"})
    assert not _gone({"pid": str(dead.pid), "hostname": here})
    assert not _gone({"hostname": here})


def test_a_held_lock_naming_a_dead_process_is_read_again_before_it_is_reported(tmp_path):
    """The holder signs the file just after taking the lock (over a dead owner's name when it takes a
    stale lock over): a file still naming a dead process is read again until the patience runs out."""
    from normtrace.rundir import _live_owner

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "lock"
    stale = {"pid": dead.pid, "hostname": socket.gethostname()}
    path.write_text(json.dumps(stale))
    fd = os.open(path, os.O_RDONLY)
    try:
        start = time.monotonic()
        assert _live_owner(fd, patience=0.3) == stale
        assert time.monotonic() - start >= 0.3  # it waited for a signature that never came
        live = {"pid": os.getpid(), "hostname": socket.gethostname()}
        path.write_text(json.dumps(live))
        start = time.monotonic()
        assert _live_owner(fd, patience=5.0) == live
        assert time.monotonic() - start < 2.5  # a live owner is reported at once
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("owner", "said"),
    [
        ({}, "another process (its lock file is empty)"),
        ({"pid": 7, "hostname": "gpu3", "start_time": "2026-12-01T10:00:00"}, "process 7 on gpu3 since 2026-12-01T10:00:00"),
        ({"pid": 7, "hostname": "gpu3", "start_time": ""}, "process 7 on gpu3"),
        ({"start_time": "2026-12-01T10:00:00"}, "process ? on ? since 2026-12-01T10:00:00"),
    ],
    ids=["empty", "complete", "no start time", "no pid or host"],
)  # fmt: skip
def test_a_lock_owner_is_described_with_what_its_file_says(owner, said):
    from normtrace.rundir import _describe

    assert _describe(owner) == said


def descriptors_on(path: Path) -> int:
    """How many of this process's file descriptors are open on ``path`` (Linux's /proc)."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in list(fds.iterdir()) if _target(fd) == str(path))


def _target(fd: Path) -> str | None:
    try:
        return os.readlink(fd)
    except OSError:  # closed meanwhile (another thread's)
        return None


def test_each_refusal_says_what_holds_the_directory_and_what_to_do_word_for_word(tmp_path):
    run = tmp_path / "run"
    lock_path = run / schema.lock_name(0)
    holder = start_holder(run)
    first = holder.stdout.readline().split()
    assert first[0] == "writing", first
    owner = json.loads(lock_path.read_text())
    with pytest.raises(nt.RunDirError) as live:
        nt.Recorder(run, overwrite=True)
    finish(holder)
    assert str(live.value) == (
        f"run directory {run} is being written by process {first[1]} on {socket.gethostname()} since "
        f"{owner['start_time']} ({lock_path}); a run has one writer at a time, even with overwrite=True: "
        "choose another directory, or stop that process first"
    )
    with pytest.raises(nt.RunDirError) as old:
        nt.Recorder(run)
    assert str(old.value) == (
        f"run directory {run} already holds a trace for rank 0 ({run / schema.meta_name(0)}); "
        "choose a new directory or pass overwrite=True"
    )
    foreign = {"pid": 4242, "hostname": "elsewhere.example", "start_time": "2026-11-30T00:00:00+00:00"}
    lock_path.write_text(json.dumps(foreign))
    with pytest.raises(nt.RunDirError) as elsewhere:
        nt.Recorder(run)
    assert str(elsewhere.value) == (
        f"run directory {run} is locked by process 4242 on elsewhere.example since "
        f"2026-11-30T00:00:00+00:00 ({lock_path}), which cannot be checked from this host; if that process "
        "has ended, pass overwrite=True, else choose another directory"
    )


def test_a_directory_nobody_locked_is_claimed_without_a_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nt.Recorder(tmp_path / "fresh").close()
        nt.Recorder(tmp_path / "fresh", overwrite=True).close()  # its lock file was removed at close


def test_without_flock_the_lock_file_is_created_exclusively_and_one_left_behind_is_foreign(
    tmp_path, monkeypatch
):
    """Where ``fcntl`` is missing (Windows) the lock is the file's exclusive creation, and a lock file
    left behind (by a crash) is treated as another host's: whether its owner runs cannot be told, so
    only ``overwrite=True`` takes it, with a warning."""
    monkeypatch.setattr(rundir, "fcntl", None)
    run = tmp_path / "run"
    lock_path = run / schema.lock_name(0)
    umask = os.umask(0)
    os.umask(umask)
    with nt.Recorder(run):
        assert stat.S_IMODE(lock_path.stat().st_mode) == 0o644 & ~umask
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    assert not lock_path.exists()
    lock_path.write_text(json.dumps({"pid": 999_999_999, "hostname": socket.gethostname()}))
    with pytest.raises(
        nt.RunDirError, match=rf"locked by process 999999999 on .* \({lock_path}\), which cannot"
    ):
        nt.Recorder(run, overwrite=False)
    with pytest.warns(UserWarning, match=rf"overwrite=True took {lock_path} from process 999999999"):
        nt.Recorder(run, overwrite=True).close()
    assert not lock_path.exists()


def test_a_second_claim_in_this_process_is_named_as_such(tmp_path):
    """A lock held by this very process (a recorder still closing on another thread, whose directory is
    no longer listed as open) is refused like any live owner, and the error says it is this process."""
    run = tmp_path / "run"
    lock = rundir.claim(run, 0, overwrite=False)
    try:
        owner = json.loads((run / schema.lock_name(0)).read_text())
        with pytest.raises(nt.RunDirError) as held:
            rundir.claim(run, 0, overwrite=True)
    finally:
        lock.release()
    assert str(held.value) == (
        f"run directory {run} is being written by process {os.getpid()} on {socket.gethostname()} since "
        f"{owner['start_time']} (this process: another Recorder) ({run / schema.lock_name(0)}); a run has "
        "one writer at a time, even with overwrite=True: choose another directory, or stop that process first"
    )


def test_a_lock_file_replaced_at_every_attempt_is_given_up_with_an_error(tmp_path, monkeypatch):
    """Between opening the lock file and locking it, its owner may remove it (and another process make a
    new one): the lock is retried on the new file; a file replaced every time ends in an error, with no
    descriptor left open."""
    run = tmp_path / "run"
    run.mkdir()
    path = run / schema.lock_name(0)
    stat_ = os.stat

    def replaced(target, *args, **kwargs):  # the path's inode never matches the descriptor's
        result = stat_(target, *args, **kwargs)
        if Path(target) == path:
            return os.stat_result((result.st_mode, result.st_ino + 1, *tuple(result)[2:]))
        return result

    monkeypatch.setattr(os, "stat", replaced)
    with pytest.raises(nt.RunDirError) as gave_up:
        rundir.claim(run, 0, overwrite=False)
    monkeypatch.undo()
    assert str(gave_up.value) == f"cannot lock {path}: it keeps being replaced"
    assert descriptors_on(path) == 0


def test_a_lock_file_holding_json_that_is_not_an_object_names_no_owner(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / schema.lock_name(0)).write_text("[4242]")  # valid JSON, not an owner
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no takeover to report: nobody is named
        nt.Recorder(run).close()


def test_a_run_directory_is_made_with_its_parents_and_a_path_that_cannot_be_one_is_refused(tmp_path):
    nested = tmp_path / "sweep" / "lr=0.1" / "seed=0"
    nt.Recorder(nested).close()
    assert (nested / schema.meta_name(0)).is_file()
    afile = tmp_path / "notes.txt"
    afile.write_text("not a run")
    with pytest.raises(nt.RunDirError) as taken:
        nt.Recorder(afile)
    assert str(taken.value) == f"run directory {afile} exists and is not a directory"
    with pytest.raises(nt.RunDirError) as under:
        nt.Recorder(afile / "run")
    assert str(under.value).startswith(
        f"cannot create run directory {afile / 'run'}: [Errno 20] Not a directory"
    )


def test_the_takeover_warning_points_at_the_users_line(tmp_path):
    """The warning that a stale lock was taken over names the line that made the Recorder (stacklevel),
    not normtrace's own code."""
    run = tmp_path / "run"
    run.mkdir()
    lock = {"pid": 4242, "hostname": "elsewhere.example", "start_time": "2026-11-30T00:00:00+00:00"}
    (run / schema.lock_name(0)).write_text(json.dumps(lock))
    with pytest.warns(UserWarning, match=r"overwrite=True took") as said:
        rec = nt.Recorder(run, overwrite=True)
    rec.close()
    assert [w.filename for w in said] == [__file__]


def test_the_lock_file_is_readable_by_all_and_writable_by_its_owner(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    with nt.Recorder(tmp_path / "run"):
        assert stat.S_IMODE((tmp_path / "run" / schema.lock_name(0)).stat().st_mode) == 0o644 & ~umask


def test_a_file_system_without_locks_is_named_in_the_error(tmp_path, monkeypatch):
    """flock failing for another reason than a holder (ENOLCK: some network file systems) is not a
    holder: the error says the file system may not support locks, and no descriptor is left open."""
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(
        rundir, "fcntl", types.SimpleNamespace(LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB, flock=no_locks)
    )
    run = tmp_path / "run"
    with pytest.raises(nt.RunDirError) as refused:
        nt.Recorder(run)
    assert str(refused.value) == (
        f"cannot lock {run / schema.lock_name(0)} ([Errno {errno.ENOLCK}] No locks available); the file "
        "system may not support locks"
    )
    assert descriptors_on(run / schema.lock_name(0)) == 0
