"""Several threads on one attached model: every row recorded, each with its own thread's norm and pass.

The docs' own actor/learner case (an acting thread under ``no_grad`` beside a learner) and learners in
several threads. The switch interval is cut to a microsecond so that threads interleave inside the hooks,
the compaction and the hand-over to the writer, not just between passes.
"""

from __future__ import annotations

import sys
import threading
from collections import defaultdict
from collections.abc import Callable

import pytest
import torch
from recorder_models import SEED_OUTPUT_MODULES, QNetwork, expected_output_norms, read_table
from torch import nn

import normtrace as nt


@pytest.fixture
def fast_switching():
    """Let the interpreter switch threads every microsecond (the default is 5 ms)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def run_together(*bodies: Callable[[], None]) -> None:
    """Run each body in its own thread, started together; re-raise the first error any of them hit."""
    barrier = threading.Barrier(len(bodies))
    errors: list[BaseException] = []

    def wrap(body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            barrier.wait()
            try:
                body()
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                errors.append(exc)

        return run

    threads = [threading.Thread(target=wrap(b)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    if errors:
        raise errors[0]


def input_of_each_pass(rows: list[dict], model: nn.Module, xs: list[torch.Tensor]) -> dict[int, int]:
    """Which input each recorded pass ran on, told apart by its norms (the inputs are random, so their
    norms differ); asserts that every pass holds exactly the seed's five modules, each with the norm
    torch computes for that one input, and that every input ran in exactly one pass."""
    by_pass: dict[int, dict[str, float]] = defaultdict(dict)
    for r in rows:
        assert r["module"] not in by_pass[r["pass"]], f"two {r['module']} rows in pass {r['pass']}"
        by_pass[r["pass"]][r["module"]] = r["norm"]
    want = [expected_output_norms(model, x) for x in xs]
    found: dict[int, int] = {}
    for p, got in by_pass.items():
        assert list(got) == SEED_OUTPUT_MODULES, (p, list(got))
        i = min(range(len(xs)), key=lambda k: abs(want[k]["net.relu1"] - got["net.relu1"]))
        assert got == pytest.approx(want[i], rel=1e-5), f"pass {p} mixes norms of several inputs"
        found[p] = i
    assert sorted(found.values()) == list(range(len(xs))), "an input's pass is missing or doubled"
    return found


def test_an_acting_thread_beside_a_learner_loses_and_mismatches_nothing(tmp_path, fast_switching):
    """The in-process actor/learner: the actor acts under no_grad (counted, not recorded), the learner
    records outputs, its loss and a metric. Every learner pass has its five rows with that input's norms,
    and the loss and metric it pushed carry the pass they came from."""
    torch.manual_seed(0)
    model, loss_fn = QNetwork(), nn.MSELoss()
    steps, acts_per_step = 60, 3
    learner_xs = [torch.randn(64, 4) for _ in range(steps)]
    targets = [torch.randn(64, 2) for _ in range(steps)]
    actor_xs = [torch.randn(1, 4) for _ in range(steps * acts_per_step)]
    losses: list[float] = [0.0] * steps
    lenses = [nt.LossMetrics(loss_fn=loss_fn), nt.OutputNorm(include=[nn.Identity])]
    rec = nt.Recorder(tmp_path, lenses=lenses, flush_every=7).attach(model)

    def learner() -> None:
        for i, x in enumerate(learner_xs):
            losses[i] = loss_fn(model(x), targets[i]).detach().item()
            rec.push_metric("learner_step", i)

    def actor() -> None:
        with torch.no_grad():
            for i, x in enumerate(actor_xs):
                model(x)
                rec.push_metric("reward", i)

    run_together(learner, actor)
    rec.close()

    outputs = read_table(tmp_path, "outputs").to_pylist()
    assert len(outputs) == steps * 5 and all(r["grad_enabled"] for r in outputs)
    input_at = input_of_each_pass(outputs, model, learner_xs)
    metrics = read_table(tmp_path, "metrics").to_pylist()
    loss_rows = [r for r in metrics if r["name"] == "loss"]
    assert len(loss_rows) == steps
    for r in loss_rows:
        assert r["value"] == pytest.approx(losses[input_at[r["pass"]]], rel=1e-6)
    steps_rows = [r for r in metrics if r["name"] == "learner_step"]
    assert sorted(input_at[r["pass"]] for r in steps_rows) == list(range(steps))
    assert all(input_at[r["pass"]] == r["value"] for r in steps_rows)
    rewards = sorted(r["value"] for r in metrics if r["name"] == "reward")
    assert rewards == list(range(steps * acts_per_step))
    assert rec.passes == steps * (1 + acts_per_step)


def test_learners_in_several_threads_keep_every_row_with_its_own_norm(tmp_path, fast_switching):
    """Equal batch sizes, so a norm paired with another thread's record would go unnoticed by shape;
    frequent flushes, so the hand-over to the writer runs while other threads append."""
    torch.manual_seed(1)
    model = QNetwork()
    threads, passes = 4, 50
    xs = [torch.randn(16, 4) for _ in range(threads * passes)]
    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])], flush_every=3).attach(model)

    def learner(k: int) -> Callable[[], None]:
        def body() -> None:
            for x in xs[k * passes : (k + 1) * passes]:
                model(x)

        return body

    run_together(*(learner(k) for k in range(threads)))
    rec.close()
    outputs = read_table(tmp_path, "outputs").to_pylist()
    assert len(outputs) == threads * passes * 5
    input_of_each_pass(outputs, model, xs)


def test_batches_taken_by_two_threads_reach_the_writer_in_the_order_taken(tmp_path) -> None:
    """A flush takes the buffered rows and queues them for the writer; a second thread flushing while the
    first has taken but not yet queued must queue after it, or the shards hold a pass's rows out of order
    (seen once in ten runs of the learners test above)."""
    import time

    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])]).attach(QNetwork())
    writer = rec._run.writer
    queued: list[int] = []
    submit = writer.submit_records

    def slow_submit(taken: dict) -> None:
        first = not queued
        queued.append(1)
        if first:
            time.sleep(0.3)  # the first flush is slow to queue: the second one starts meanwhile
        submit(taken)

    writer.submit_records = slow_submit
    rec._run.buffer.outputs.extend(("a", 0, 0, True, True, 1, 1, torch.ones(1)))
    first = threading.Thread(target=rec._run.hand_over)
    first.start()
    time.sleep(0.1)  # the first thread has taken record "a" and sleeps before queueing it
    rec._run.buffer.outputs.extend(("b", 1, 0, True, True, 1, 1, torch.ones(1)))
    rec._run.hand_over()
    first.join()
    writer.submit_records = submit
    rec.close()
    assert [r["module"] for r in read_table(tmp_path, "outputs").to_pylist()] == ["a", "b"]


class SharedActivation(nn.Module):
    """One ReLU instance after each of three layers: its calls in a pass are ``act``, ``act#1``, ``act#2``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc3(self.act(self.fc2(self.act(self.fc1(x))))))


def test_call_labels_count_calls_within_each_threads_own_pass(tmp_path, fast_switching):
    """A shared activation called from two threads: each pass has act, act#1, act#2 and no more (the
    per-module call counter used to count other threads' calls too, making act#3, act#4, ...)."""
    torch.manual_seed(2)
    model = SharedActivation()
    passes = 80
    xs = [torch.randn(5, 4) for _ in range(2 * passes)]
    rec = nt.Recorder(tmp_path, lenses=[nt.OutputNorm()], flush_every=5).attach(model)
    run_together(*(lambda k=k: [model(x) for x in xs[k * passes : (k + 1) * passes]] for k in range(2)))
    rec.close()
    rows = read_table(tmp_path, "outputs").to_pylist()
    by_pass: dict[int, list[tuple[str, float]]] = defaultdict(list)
    for r in rows:
        by_pass[r["pass"]].append((r["module"], r["norm"]))
    assert len(by_pass) == 2 * passes
    want = {}
    for i, x in enumerate(xs):
        with torch.no_grad():
            h1 = torch.relu(model.fc1(x))
            h2 = torch.relu(model.fc2(h1))
            h3 = torch.relu(model.fc3(h2))
        want[i] = [
            (label, torch.linalg.vector_norm(h, dim=1).mean().item())
            for label, h in (("act", h1), ("act#1", h2), ("act#2", h3))
        ]
    matched = []
    for got in by_pass.values():
        assert [label for label, _ in got] == ["act", "act#1", "act#2"]
        i = min(want, key=lambda k: abs(want[k][0][1] - got[0][1]))
        assert [n for _, n in got] == pytest.approx([n for _, n in want[i]], rel=1e-5)
        matched.append(i)
    assert sorted(matched) == list(range(2 * passes))


class KeepRecording:
    """A lens that only keeps its ``Recording`` handle, for a test to record through."""

    def config(self) -> dict[str, str]:
        return {"type": "KeepRecording"}

    def attach(self, target: nt.Target, recording: nt.Recording) -> list[object]:
        self.recording = recording
        return []


def test_a_metric_pushed_outside_a_pass_carries_the_threads_own_last_pass(tmp_path):
    """A thread that ran a pass pushes under its own last pass, even after another thread started a
    later one; a thread that ran none pushes under the last pass any thread started, at each push. The
    same through ``Recorder.push_metric`` and through a lens's ``Recording.push_metric``."""
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    steps = [threading.Event() for _ in range(5)]

    def actor() -> None:  # runs pass 0, then pushes after the main thread's pass 1
        model(torch.randn(1, 2))
        steps[0].set()
        steps[1].wait(10)
        rec.push_metric("actor", 1.0)
        keeper.recording.push_metric("actor", 1.0, split="lens")
        steps[2].set()

    def watcher() -> None:  # runs no pass: pushes after pass 1, and again after pass 3
        rec.push_metric("watcher", 1.0)
        keeper.recording.push_metric("watcher", 1.0, split="lens")
        steps[4].set()
        steps[3].wait(10)
        rec.push_metric("watcher", 2.0)
        keeper.recording.push_metric("watcher", 2.0, split="lens")

    keeper = KeepRecording()
    with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(), keeper]) as rec:
        rec.attach(model)
        acting = threading.Thread(target=actor)
        acting.start()
        steps[0].wait(10)
        model(torch.randn(1, 2))  # pass 1
        steps[1].set()
        steps[2].wait(10)
        watching = threading.Thread(target=watcher)
        watching.start()
        steps[4].wait(10)
        model(torch.randn(1, 2))  # pass 2
        model(torch.randn(1, 2))  # pass 3
        steps[3].set()
        acting.join(10)
        watching.join(10)
        assert not acting.is_alive() and not watching.is_alive()
    rows = read_table(tmp_path, "metrics").to_pylist()
    for split in (None, "lens"):
        assert sorted((r["name"], r["value"], r["pass"]) for r in rows if r["split"] == split) == [
            ("actor", 1.0, 0),
            ("watcher", 1.0, 1),
            ("watcher", 2.0, 3),
        ]


def test_notes_of_several_threads_at_once_are_each_kept(tmp_path):
    """Hooks of two threads failing at once both note it (``Recording.note`` → ``_Run.note``): the notes
    are kept, and neither hook gets "dictionary changed size during iteration" (which escaped the hooks'
    own guard into the user's forward). Threads switch every microsecond, so bursts of notes interleave."""
    interval = sys.getswitchinterval()
    rec = nt.Recorder(tmp_path, lenses=[], handle_signals=False)
    run = rec._run
    run.write_meta = lambda: None  # the race is in the notes themselves: no metadata file per note
    errors: list[str] = []
    barrier = threading.Barrier(2)

    def burst(k: int) -> None:
        for _ in range(150):
            barrier.wait()
            if k == 0:
                run.notes.clear()
            barrier.wait()
            try:
                for i in range(100):
                    run.note(f"m{k}.{i}", "hook_error", "x")
            except Exception as exc:
                errors.append(repr(exc))
            barrier.wait()
            if k == 0 and len(run.notes) != 200:
                errors.append(f"{len(run.notes)} notes kept of 200")

    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=burst, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
        rec.close()
    assert errors == []
