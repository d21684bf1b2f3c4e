"""The per-rank body of the torch.distributed recorder test (a module, so spawned children can import it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from recorder_models import QNetwork, expected_output_norms
from torch import nn

import normtrace as nt


def distributed_worker(rank: int, world: int, init: str, run: str, tmp: str) -> None:
    """Record five passes on this rank; write the expected norms and any collective calls seen to JSON."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(rank)
    model = QNetwork()
    xs = [torch.randn(8, 4) for _ in range(5)]
    collectives: list[str] = []
    for name in ["all_reduce", "broadcast", "all_gather", "barrier", "send", "recv", "all_gather_object"]:
        original = getattr(dist, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            collectives.append(_name)
            return _original(*args, **kwargs)

        setattr(dist, name, spy)
    with nt.Recorder(run, lenses=[nt.OutputNorm(include=[nn.Identity]), nt.ParameterNorm()]) as rec:
        rec.attach(model)
        for x in xs:
            model(x)
        rec.push_metric("rank_metric", float(rank))
        rec.tick_epoch()
    expected = [expected_output_norms(model, x) for x in xs]
    out = Path(tmp) / f"rank{rank}.json"
    out.write_text(json.dumps({"collectives": collectives, "expected": expected}))
    dist.destroy_process_group()


def ddp_gradient_worker(rank: int, world: int, init: str, run: str, tmp: str) -> None:
    """Three DDP steps on this rank's own data with GradientNorm and UpdateRatio; write the gradient norms
    seen at each step (after DDP's all-reduce) to JSON."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial weights on every rank, as DDP requires
    model = nn.parallel.DistributedDataParallel(QNetwork())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(100 + rank)  # each rank its own batches
    seen = []
    with nt.Recorder(run, lenses=[nt.GradientNorm(), nt.UpdateRatio()]) as rec:
        rec.attach(model, optimizer=opt)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            seen.append(
                {n: torch.linalg.vector_norm(p.grad).item() for n, p in model.module.named_parameters()}
            )
            opt.step()
    (Path(tmp) / f"ddp{rank}.json").write_text(json.dumps(seen))
    dist.destroy_process_group()
