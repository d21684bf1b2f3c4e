"""PPO on gymnasium's Acrobot-v1, recorded with normtrace: the seed's "next steps" (a policy-gradient method).

The DQN example asks whether output norms jump after each target-network sync. PPO has an event of the
same kind: after every rollout the policy that acts is replaced by the one just optimised
(``policy_update``, marked with ``rec.event``), and inside an update the same rollout is reused for
several epochs (``ppo_epoch``). The recorder sees both networks' outputs on every pass (acting passes
under ``no_grad``, update passes with grad), the parameter norms at every update, the losses, and the
episode returns; the report then says whether spikes follow the policy updates.

    python examples/acrobot_ppo.py --iterations 60 --run-dir runs/acrobot

PPO as in Schulman et al. (2017), clipped objective, GAE(lambda), separate actor and critic MLPs (64-64
tanh), advantage normalisation, the usual hyper-parameters for classic control. ``train`` is importable
so a test can run a few iterations with and without the recorder and compare the losses exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from tqdm import trange

import normtrace as nt

INSTALL_HINT = "python -m pip install -e ./analysis   (from the normtrace checkout)"


def mlp(inputs: int, outputs: int, hidden: int = 64) -> nn.Sequential:
    """Two tanh hidden layers; ``out`` is an Identity so OutputNorm sees the logits or the value."""
    return nn.Sequential(
        OrderedDict(
            [
                ("lin1", nn.Linear(inputs, hidden)),
                ("act1", nn.Tanh()),
                ("lin2", nn.Linear(hidden, hidden)),
                ("act2", nn.Tanh()),
                ("lin_out", nn.Linear(hidden, outputs)),
                ("out", nn.Identity()),
            ]
        )
    )


class ActorCritic(nn.Module):
    """The policy (action logits) and the value function, as two separate networks."""

    def __init__(self, state_dim: int, action_dim: int) -> None:
        super().__init__()
        self.actor = mlp(state_dim, action_dim)
        self.critic = mlp(state_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.actor(x), self.critic(x).squeeze(-1)


@dataclass(frozen=True)
class Config:
    """Hyper-parameters: common PPO settings for classic control."""

    rollout: int = 1024  # environment steps per iteration
    epochs: int = 4  # passes over each rollout
    minibatch: int = 256
    lr: float = 3e-4
    gamma: float = 0.99
    lam: float = 0.95
    clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    max_grad_norm: float = 0.5


@dataclass
class TrainResult:
    """Episode returns in order, every minibatch loss, and where the trace went."""

    returns: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    updates: int = 0
    steps: int = 0
    seconds: float = 0.0
    run_dir: Path | None = None


def make_recorder(run_dir: str | Path, *, overwrite: bool = False) -> nt.Recorder:
    """Every lens normtrace has: each layer's output and the gradient arriving at it, parameter norms,
    per-step gradient norms and update ratios (with their directions), activation rates, losses and
    episode returns."""
    return nt.Recorder(
        run_dir,
        lenses=[
            nt.LossMetrics(metrics=["episode_return", "policy_loss", "value_loss", "entropy"]),
            nt.OutputNorm(include=[nn.Tanh, nn.Identity], normalize_by_size=True, skip_no_grad_pass=False),
            nt.ParameterNorm(normalize_by_size=True),
            nt.GradientNorm(
                cosine=True
            ),  # at each optimizer step: after clip_grad_norm_, as step() uses them
            nt.UpdateRatio(cosine=True),
            nt.OutputGradientNorm(include=[nn.Tanh, nn.Identity]),
            nt.ActivationRate(),  # tanh is never exactly 0: recorded for completeness, no unit can die
        ],
        overwrite=overwrite,
    )


def advantages(
    rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: float, cfg: Config
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(lambda) advantages and the value targets (advantage + value) of one rollout."""
    adv = torch.zeros_like(rewards)
    gae = 0.0
    for t in reversed(range(len(rewards))):
        next_value = last_value if t == len(rewards) - 1 else float(values[t + 1])
        not_done = 1.0 - float(dones[t])
        delta = float(rewards[t]) + cfg.gamma * next_value * not_done - float(values[t])
        gae = delta + cfg.gamma * cfg.lam * not_done * gae
        adv[t] = gae
    return adv, adv + values


def train(
    iterations: int = 60,
    run_dir: str | Path | None = None,
    seed: int = 0,
    *,
    config: Config | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train PPO on Acrobot-v1 for ``iterations`` rollouts; record to ``run_dir`` unless it is None.

    Each iteration is one recorder epoch: a rollout of ``config.rollout`` acting passes (batch 1, no
    grad), then ``epochs`` passes over it in shuffled minibatches (``ppo_epoch`` event at the start of
    each), then ``policy_update`` once the new policy takes over.
    """
    cfg = config or Config()
    torch.manual_seed(seed)
    np.random.seed(seed)
    env = gym.make("Acrobot-v1")
    model = ActorCritic(int(env.observation_space.shape[0]), int(env.action_space.n))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=1e-5)
    rng = np.random.default_rng(seed)
    result = TrainResult(run_dir=None if run_dir is None else Path(run_dir))
    start = time.perf_counter()
    obs, _ = env.reset(seed=seed)
    episode_return = 0.0
    recording = contextlib.nullcontext() if run_dir is None else make_recorder(run_dir, overwrite=overwrite)
    with recording as rec, contextlib.closing(env):  # the run is closed "failed" on an exception
        if rec is not None:
            rec.attach(model, optimizer=optimizer)
        bar = trange(iterations, disable=not progress, desc="iterations", unit="it")
        for _ in bar:
            states, actions, logps, rewards, dones, values = [], [], [], [], [], []
            for _ in range(cfg.rollout):
                state = torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0)
                with torch.no_grad():
                    logits, value = model(state)
                dist = torch.distributions.Categorical(logits=logits)
                action = dist.sample()
                obs, reward, terminated, truncated, _ = env.step(int(action))
                states.append(state)
                actions.append(action)
                logps.append(dist.log_prob(action))
                rewards.append(float(reward))
                dones.append(terminated)
                values.append(value)
                episode_return += float(reward)
                result.steps += 1
                if terminated or truncated:
                    result.returns.append(episode_return)
                    if rec is not None:
                        rec.push_metric("episode_return", episode_return)
                    episode_return = 0.0
                    obs, _ = env.reset()
            with torch.no_grad():
                last_value = 0.0 if dones[-1] else float(model(torch.as_tensor(obs).unsqueeze(0))[1])
            s, a, old_logp = torch.cat(states), torch.cat(actions), torch.cat(logps)
            v = torch.cat(values)
            adv, returns = advantages(torch.tensor(rewards), v, torch.tensor(dones), last_value, cfg)
            for _ in range(cfg.epochs):
                if rec is not None:
                    rec.event("ppo_epoch")
                order = rng.permutation(cfg.rollout)
                for lo in range(0, cfg.rollout, cfg.minibatch):
                    idx = torch.as_tensor(order[lo : lo + cfg.minibatch])
                    logits, value = model(s[idx])
                    dist = torch.distributions.Categorical(logits=logits)
                    ratio = torch.exp(dist.log_prob(a[idx]) - old_logp[idx])
                    mb_adv = (adv[idx] - adv[idx].mean()) / (adv[idx].std() + 1e-8)
                    policy_loss = -torch.min(
                        ratio * mb_adv, torch.clamp(ratio, 1 - cfg.clip, 1 + cfg.clip) * mb_adv
                    ).mean()
                    value_loss = (returns[idx] - value).pow(2).mean()
                    entropy = dist.entropy().mean()
                    loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
                    optimizer.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    if rec is not None:  # device tensors: the recorder reads them off the training thread
                        rec.push_loss(loss.detach())
                        rec.push_metric("policy_loss", policy_loss.detach())
                        rec.push_metric("value_loss", value_loss.detach())
                        rec.push_metric("entropy", entropy.detach())
                    result.losses.append(loss.item())
            result.updates += 1
            if rec is not None:
                rec.event("policy_update")
                rec.tick_epoch()
            recent = np.mean(result.returns[-10:]) if result.returns else float("nan")
            bar.set_postfix(ret=f"{recent:.0f}", refresh=False)
    result.seconds = time.perf_counter() - start
    return result


def summarize(result: TrainResult) -> str:
    """Episodes, the first and last mean returns (Acrobot: -500 is a timeout, above -100 is solved)."""
    if not result.returns:
        return "no episode finished"
    first, last = np.mean(result.returns[:10]), np.mean(result.returns[-10:])
    return (
        f"episodes: {len(result.returns)}, env steps: {result.steps}, policy updates: {result.updates}, "
        f"minibatch steps: {len(result.losses)}, time: {result.seconds:.1f} s\n"
        f"mean return of the first 10 episodes {first:.1f}, of the last 10 {last:.1f}"
    )


def write_report(run_dir: Path, out: Path) -> Path | None:
    """The offline HTML report, its findings about ``policy_update`` first; None without the analysis."""
    try:
        from normtrace_analysis import report
    except ImportError as exc:
        print(
            f"\nNo HTML report ({type(exc).__name__}: {exc}). Install with\n    {INSTALL_HINT}",
            file=sys.stderr,
        )
        return None
    return Path(report(run_dir, out, event=["policy_update", "ppo_epoch"], level="pass"))


def main(argv: Sequence[str] | None = None) -> int:
    """Train, print the return summary and the analysis' findings, write the report next to the run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=60, help="rollouts of 1024 steps (default: 60)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/acrobot"), help="trace directory")
    p.add_argument("--seed", type=int, default=0, help="seed for torch, numpy and the env")
    p.add_argument("--overwrite", action="store_true", help="replace a trace already in --run-dir")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if args.iterations < 1:
        raise SystemExit("--iterations must be at least 1")
    torch.set_num_threads(1)  # tiny networks: a second thread only spins (see cartpole_dqn.torch_threads)
    try:
        result = train(args.iterations, args.run_dir, args.seed, overwrite=args.overwrite,
                       progress=not args.no_progress)  # fmt: skip
    except nt.RunDirError as exc:
        raise SystemExit(f"{exc}\n(pass --overwrite to replace it, or choose another --run-dir)") from None
    print(summarize(result))
    print(f"trace: {args.run_dir}")
    written = write_report(args.run_dir, args.run_dir / "report.html")
    if written is not None:
        import normtrace_analysis as na

        print(f"report: {written}")
        print("findings (output-norm spikes after policy_update, per pass):")
        for finding in na.load(args.run_dir).event_alignment("policy_update", level="pass")["finding"]:
            print(f"  {finding}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
