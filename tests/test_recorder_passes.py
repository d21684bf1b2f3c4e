"""Passes counted when the attached root's forward does not run (issue 15 item 2): a Lightning
``training_step`` calling ``self.net(x)``. Each call of a child of the root made outside the root's forward
is a pass, with one warning; never silent ``name#k`` series."""

from __future__ import annotations

import json
import threading
import warnings

import pytest
import torch
from qnetwork import QNetwork
from recorder_models import SEED_OUTPUT_MODULES, approx_output_norms, norms_by_module, read_table
from torch import nn

import normtrace as nt

WARNING = r"'net\.relu1' ran outside QNetwork\.forward .* each call of a child of QNetwork \(net\)"


def _notes(run) -> dict[str, str]:
    meta = json.loads((run / "meta.json").read_text())
    return {n["kind"]: n["detail"] for n in meta.get("notes", [])}


def test_a_child_called_without_the_root_counts_one_pass_per_call(tmp_path):
    model = QNetwork()
    xs = [torch.randn(3, 4), torch.randn(2, 4), torch.randn(4, 4)]
    lenses = [nt.OutputNorm(include=[nn.Identity])]
    with pytest.warns(UserWarning, match=WARNING) as caught, nt.Recorder(tmp_path, lenses=lenses) as rec:
        rec.attach(model)
        for x in xs:
            model.net(x)  # a LightningModule's training_step calling self.net(x)
        assert rec.passes == len(xs)
    ours = [w for w in caught if "ran outside" in str(w.message)]
    assert len(ours) == 1  # once, not per pass
    assert ours[0].filename == __file__  # it points at the line that called model.net
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert sorted({r["module"] for r in rows}) == sorted(SEED_OUTPUT_MODULES)  # no net.relu1#1
    for p, x in enumerate(xs):
        assert norms_by_module(rows, p) == approx_output_norms(model, x)
    notes = json.loads((tmp_path / "meta.json").read_text())["notes"]
    assert [(n["module"], n["kind"]) for n in notes] == [("(root)", "passes_from_children")]
    assert json.loads((tmp_path / "meta.json").read_text())["passes"] == len(xs)


def test_the_root_and_its_children_called_in_turn(tmp_path):
    """Validation through ``self(x)``, training through ``self.net(x)``: the root's calls are passes as
    always, the children's too, each once; rows after a child's call (the loss) carry its pass."""
    model, loss_fn = QNetwork(), nn.MSELoss()
    xs = [torch.randn(3, 4) for _ in range(5)]
    lenses = [nt.OutputNorm(include=[nn.Identity]), nt.LossMetrics(loss_fn)]
    with pytest.warns(UserWarning, match="ran outside"), nt.Recorder(tmp_path, lenses=lenses) as rec:
        rec.attach(model)
        for i, x in enumerate(xs):
            out = model(x) if i in (0, 3) else model.net(x)  # root, child, child, root, child
            loss_fn(out.sum(1), torch.zeros(len(x)))
            rec.push_metric("step", float(i))  # the Recorder's own rows carry the step's pass too
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert [r["pass"] for r in rows] == [p for p in range(5) for _ in SEED_OUTPUT_MODULES]
    assert {r["module"] for r in rows} == set(SEED_OUTPUT_MODULES)
    for p, x in enumerate(xs):
        assert norms_by_module(rows, p) == approx_output_norms(model, x)
    metrics = read_table(tmp_path, "metrics").to_pylist()
    assert [r["pass"] for r in metrics if r["name"] == "loss"] == [0, 1, 2, 3, 4]
    assert [r["pass"] for r in metrics if r["name"] == "step"] == [0, 1, 2, 3, 4]


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.b(self.act(self.a(x))))


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = Body()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("lens", [nt.OutputNorm(), nt.ActivationRate()], ids=lambda lens: type(lens).__name__)
def test_a_shared_activation_keeps_its_call_numbers_in_passes_counted_at_children(tmp_path, lens):
    """The module that ran again is a second call within the child's pass (``act#1``), once passes are
    counted at the children; each lens alone sees it (ActivationRate keeps its own call numbers)."""
    model = Wrapper()
    xs = [torch.randn(3, 4) for _ in range(4)]
    with (
        pytest.warns(UserWarning, match="ran outside Wrapper.forward"),
        nt.Recorder(tmp_path, lenses=[lens]) as rec,
    ):
        rec.attach(model)
        for x in xs:
            model.body(x)
    table = "outputs" if isinstance(lens, nt.OutputNorm) else "signals"
    rows = read_table(tmp_path, table).to_pylist()
    if table == "signals":
        rows = [r for r in rows if r["kind"] == "active_rate"]
    got = sorted((r["pass"], r["module"]) for r in rows)
    # the very first call started counting at its first row: its second activation is already act#1
    assert got == sorted((p, m) for p in range(4) for m in ("body.act", "body.act#1"))
    first = model.body.act(model.body.a(xs[2]))
    expected = (first > 0).float().mean().item() if table == "signals" else first.norm(dim=1).mean().item()
    value = "value" if table == "signals" else "norm"
    assert next(r[value] for r in rows if (r["pass"], r["module"]) == (2, "body.act")) == pytest.approx(
        expected, rel=1e-5
    )


def test_inside_the_root_nothing_changes(tmp_path):
    """A model whose root runs every time: no warning, no note, shared activations as before."""
    model = Wrapper()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with nt.Recorder(tmp_path, lenses=[nt.OutputNorm()]) as rec:
            rec.attach(model)
            for _ in range(3):
                model(torch.randn(2, 4))
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert sorted((r["pass"], r["module"]) for r in rows) == sorted(
        (p, m) for p in range(3) for m in ("body.act", "body.act#1")
    )
    assert "passes_from_children" not in _notes(tmp_path)


def test_threads_calling_children_each_count_their_own_passes(tmp_path):
    model = QNetwork()
    done = threading.Barrier(3)

    def work() -> None:
        for _ in range(10):
            model.net(torch.randn(2, 4))
        done.wait()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])]) as rec:
            rec.attach(model)
            threads = [threading.Thread(target=work) for _ in range(2)]
            for t in threads:
                t.start()
            done.wait()
            for t in threads:
                t.join()
    rows = read_table(tmp_path, "outputs").to_pylist()
    # 20 calls in all; the first call of each thread may have started counting mid-call, after which every
    # pass holds each module exactly once
    by_pass: dict[int, list[str]] = {}
    for r in rows:
        by_pass.setdefault(r["pass"], []).append(r["module"])
    assert all("#" not in r["module"] for r in rows)
    assert len(rows) == 20 * len(SEED_OUTPUT_MODULES)
    assert all(sorted(mods) == sorted(SEED_OUTPUT_MODULES) for mods in by_pass.values())


class ManyChildren(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        for i in range(n):
            self.add_module(f"c{i}", nn.Sequential(nn.Linear(2, 2), nn.ReLU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for child in self.children():
            x = child(x)
        return x


@pytest.mark.parametrize(("children", "shown"), [(5, "c0, c1, c2, c3, c4"), (6, "c0, c1, c2, c3, c4, …")])
def test_the_warning_names_the_module_and_up_to_five_children(tmp_path, children, shown):
    model = ManyChildren(children)
    with pytest.warns(UserWarning) as caught, nt.Recorder(tmp_path, lenses=[nt.OutputNorm()]) as rec:
        rec.attach(model)
        model.c1(torch.randn(3, 2))
    messages = [str(w.message) for w in caught if "ran outside" in str(w.message)]
    assert messages == [
        f"normtrace: 'c1.1' ran outside ManyChildren.forward (a Lightning training_step calling self.net(x) "
        f"instead of self(x)?): from now on each call of a child of ManyChildren ({shown}) made outside its "
        "forward counts as a pass. To count passes at the module you call, attach that one "
        "(Recorder.attach(model.net), or NormtraceCallback(module='net'))"
    ]
    assert _notes(tmp_path)["passes_from_children"] == messages[0].removeprefix("normtrace: ")


def test_no_pass_for_a_recomputed_or_exported_child_once_children_count(tmp_path):
    """After passes are counted at the children: a child's forward recomputed in backward (checkpoint) and
    torch.export tracing a child are not passes."""
    model = QNetwork()
    xs = [torch.randn(3, 4, requires_grad=True) for _ in range(3)]
    lenses = [nt.OutputNorm(include=[nn.Identity])]
    with pytest.warns(UserWarning, match="ran outside"), nt.Recorder(tmp_path, lenses=lenses) as rec:
        rec.attach(model)
        model.net(xs[0])  # passes now counted at the children
        for x in xs[1:]:
            torch.utils.checkpoint.checkpoint(model.net, x, use_reentrant=False).sum().backward()
        torch.export.export(model.net, (xs[0].detach(),))
        assert rec.passes == 3
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert [r["pass"] for r in rows] == [p for p in range(3) for _ in SEED_OUTPUT_MODULES]
    for p, x in enumerate(xs):
        assert norms_by_module(rows, p) == approx_output_norms(model, x.detach())


def test_data_parallel_replicas_of_a_child_in_worker_threads_are_no_passes(tmp_path):
    """nn.DataParallel's workers run replicas in threads that start no pass: their rows belong to the
    wrapper's pass, even when passes are counted at the children (replicated by hand, on the CPU)."""
    model = QNetwork()
    x = torch.randn(3, 4)

    def replicate(module: nn.Module) -> nn.Module:
        replica = module._replicate_for_data_parallel()
        replica._parameters = dict(module._parameters)
        replica._modules = {k: replicate(child) for k, child in module._modules.items()}
        return replica

    with (
        pytest.warns(UserWarning, match="ran outside"),
        nt.Recorder(tmp_path, lenses=[nt.OutputNorm(include=[nn.Identity])]) as rec,
    ):
        rec.attach(model)
        model.net(x)  # pass 0, and the children now count
        worker = threading.Thread(target=lambda: replicate(model.net)(x))
        worker.start()
        worker.join()
        assert rec.passes == 1
    rows = read_table(tmp_path, "outputs").to_pylist()
    assert [r["pass"] for r in rows] == [0] * 5 + [0] * 5  # the replica's rows join the last pass
    assert {r["module"] for r in rows[5:]} == set(SEED_OUTPUT_MODULES)


@pytest.mark.parametrize(
    ("root", "lens"),
    [(nn.Linear(4, 3), nt.OutputNorm(include=[nn.Linear])), (nn.ReLU(), nt.ActivationRate())],
    ids=["output-norm", "activation-rate"],
)
def test_a_lens_observing_the_root_itself_records_inside_its_pass(tmp_path, root, lens):
    """A one-layer model whose root is a module the lens selects: the root's output is recorded inside
    its pass, not seen as a module run outside the root's forward (which counted every call twice and
    warned about children)."""
    xs = [torch.randn(2, 4) for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with nt.Recorder(tmp_path, [lens]) as rec:
            rec.attach(root)
            outs = [root(x) for x in xs]
            assert rec.passes == 3
    assert "passes_from_children" not in _notes(tmp_path)
    if isinstance(lens, nt.OutputNorm):
        rows = read_table(tmp_path, "outputs").to_pylist()
        assert [(r["module"], r["pass"]) for r in rows] == [("(root)", p) for p in range(3)]
        want = [torch.linalg.vector_norm(out.detach().double(), dim=1).mean().item() for out in outs]
        assert [r["norm"] for r in rows] == pytest.approx(want, rel=1e-5)  # batch mean of sample norms
    else:
        rows = read_table(tmp_path, "signals").to_pylist()
        assert sorted({r["pass"] for r in rows}) == [0, 1, 2]
