"""A DQN on gymnasium's CartPole-v1, recorded with normtrace: the seed notebook's training as a script.

The network, replay buffer, epsilon schedule, loss and target sync are the seed notebook's
(``shared/seed/000_*.txt``), unchanged, so a run reproduces its learning curve (rewards in the hundreds
within 300 episodes) and its "jagged corners" after every target sync. What this script adds: fixed
seeds, a command line, optional recording (``--no-record`` trains the very same way without hooks) and
an offline HTML report next to the run.

    python examples/cartpole_dqn.py --episodes 300 --run-dir runs/cartpole

The functions are importable (``train``, ``write_report``, ``main``) so tests can run a few episodes
with and without the recorder and compare the per-step losses exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import time
from collections import deque, namedtuple
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
from qnetwork import QNetwork
from tqdm import trange

import normtrace as nt

Transition = namedtuple("Transition", ("state", "action", "reward", "next_state", "done"))

INSTALL_HINT = "python -m pip install -e ./analysis   (from the normtrace checkout)"


class ReplayBuffer:
    """The seed's uniform replay buffer (a bounded deque, sampled with the ``random`` module)."""

    def __init__(self, capacity: int = 10000) -> None:
        self.buffer: deque[Transition] = deque(maxlen=capacity)

    def push(self, *args: Any) -> None:
        self.buffer.append(Transition(*args))

    def sample(self, batch_size: int) -> Transition:
        batch = random.sample(self.buffer, batch_size)
        return Transition(*zip(*batch, strict=True))

    def __len__(self) -> int:
        return len(self.buffer)


@dataclass(frozen=True)
class Config:
    """Hyper-parameters; the defaults are the seed notebook's.

    ``target`` is ``"hard"`` (copy the policy into the target every ``sync_every`` episodes, after the
    episodes whose index is a multiple of it, as the seed does) or ``"soft"`` (Polyak averaging,
    ``target <- (1 - tau) target + tau policy`` after every optimisation step).
    """

    buffer_capacity: int = 20000
    batch_size: int = 256
    lr: float = 1e-3
    gamma: float = 0.99
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_decay: float = 1000
    max_steps: int = 500
    smoothing_factor: float = 0.2
    sync_every: int = 5
    target: str = "hard"
    tau: float = 0.005


@dataclass
class TrainResult:
    """What a run produced: per-episode rewards, every loss in step order, and where the trace went."""

    rewards: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    sync_episodes: list[int] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    run_dir: Path | None = None


def seed_everything(seed: int) -> None:
    """Fix every random source the training uses (torch init and sampling, ``random``, numpy)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epsilon(steps_done: int, cfg: Config) -> float:
    """The seed's exponentially decaying exploration rate."""
    return cfg.eps_end + (cfg.eps_start - cfg.eps_end) * np.exp(-1.0 * steps_done / cfg.eps_decay)


def select_action(
    policy_net: nn.Module, state: torch.Tensor, steps_done: int, action_dim: int, cfg: Config
) -> torch.Tensor:
    """Epsilon-greedy action as a (1, 1) long tensor; the greedy pass runs under ``no_grad``."""
    if random.random() < epsilon(steps_done, cfg):
        return torch.tensor([[random.randrange(action_dim)]], dtype=torch.long)
    with torch.no_grad():
        return policy_net(state).argmax(dim=1, keepdim=True)


def optimize(
    policy_net: nn.Module,
    target_net: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    buffer: ReplayBuffer,
    cfg: Config,
) -> float:
    """One DQN step on a sampled batch (the seed's code); returns the loss value."""
    batch = buffer.sample(cfg.batch_size)
    non_final_mask = ~torch.tensor(batch.done, dtype=torch.bool)
    non_final_next_states = torch.cat([s for s, d in zip(batch.next_state, batch.done, strict=True) if not d])
    state_batch = torch.cat(batch.state)
    action_batch = torch.cat(batch.action)
    reward_batch = torch.tensor(batch.reward, dtype=torch.float32)

    q_values = policy_net(state_batch).gather(1, action_batch)
    next_q_values = torch.zeros(cfg.batch_size)
    with torch.no_grad():
        next_q_values[non_final_mask] = target_net(non_final_next_states).max(1)[0]
    expected_q_values = reward_batch + cfg.gamma * next_q_values
    loss = loss_fn(q_values.squeeze(), expected_q_values)

    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def soft_update(target_net: nn.Module, policy_net: nn.Module, tau: float) -> None:
    """Polyak averaging in place; it does not go through ``load_state_dict``, so logs no target event."""
    with torch.no_grad():
        for target_p, policy_p in zip(target_net.parameters(), policy_net.parameters(), strict=True):
            target_p.lerp_(policy_p, tau)


def make_recorder(run_dir: str | Path, loss_fn: nn.Module, *, overwrite: bool = False) -> nt.Recorder:
    """The seed's three lenses (loss + episode metrics, Identity/activation outputs, parameter norms) and
    the gradient, update and activation lenses the seed could not record."""
    return nt.Recorder(
        run_dir,
        lenses=[
            nt.LossMetrics(loss_fn=loss_fn, metrics=["total_reward", "smoothed_treward"]),
            nt.OutputNorm(include=[nn.Identity], normalize_by_size=True),
            nt.ParameterNorm(normalize_by_size=True),
            nt.GradientNorm(cosine=True),  # per parameter at every optimizer step, and its direction
            nt.UpdateRatio(),  # |update| / |weight| per parameter and step
            nt.OutputGradientNorm(include=[nn.Identity]),  # gradient arriving at each activation
            nt.ActivationRate(),  # share of active units, dead ReLUs
        ],
        overwrite=overwrite,
    )


@contextlib.contextmanager
def recording(
    run_dir: str | Path | None, loss_fn: nn.Module, overwrite: bool
) -> Iterator[nt.Recorder | None]:
    """A recorder for ``run_dir`` (closed on exit, ``failed`` on an exception), or None without one."""
    if run_dir is None:
        yield None
        return
    with make_recorder(run_dir, loss_fn, overwrite=overwrite) as rec:
        yield rec


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block (None: leave torch's setting alone).

    This network is tiny (batch 256 x 128 units): a second thread buys nothing, and on a busy machine
    the threads' spin-waiting made a 30-episode run 25x slower (2 s with one thread, 56 s with two, on 2
    shared cores). Hence one thread by default on the command line.
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Agent:
    """The training state of one run: networks, optimiser, buffer and step counter."""

    def __init__(self, env: gym.Env, cfg: Config, loss_fn: nn.Module) -> None:
        self.cfg = cfg
        self.loss_fn = loss_fn
        self.action_dim = int(env.action_space.n)
        state_dim = int(env.observation_space.shape[0])
        self.policy_net = QNetwork(state_dim, self.action_dim)
        self.target_net = QNetwork(state_dim, self.action_dim)
        self.target_net.load_state_dict(self.policy_net.state_dict())
        self.target_net.eval()
        self.optimizer = torch.optim.AdamW(self.policy_net.parameters(), lr=cfg.lr)
        self.buffer = ReplayBuffer(cfg.buffer_capacity)
        self.steps_done = 0

    def run_episode(self, env: gym.Env, reset_seed: int | None, losses: list[float]) -> float:
        """Play one episode, learning after every step once the buffer holds more than a batch."""
        cfg = self.cfg
        obs, _ = env.reset(seed=reset_seed)
        state = torch.tensor(obs, dtype=torch.float32).unsqueeze(0)
        total_reward = 0.0
        for _ in range(cfg.max_steps):
            action = select_action(self.policy_net, state, self.steps_done, self.action_dim, cfg)
            self.steps_done += 1
            obs, reward, terminated, truncated, _ = env.step(action.item())
            total_reward += reward
            done = terminated or truncated
            next_state = torch.tensor(obs, dtype=torch.float32).unsqueeze(0)
            self.buffer.push(state, action, reward, next_state, done)
            state = next_state
            if len(self.buffer) > cfg.batch_size:
                losses.append(
                    optimize(self.policy_net, self.target_net, self.optimizer, self.loss_fn, self.buffer, cfg)
                )
                if cfg.target == "soft":
                    soft_update(self.target_net, self.policy_net, cfg.tau)
            if done:
                break
        return total_reward

    def maybe_sync(self, episode: int) -> bool:
        """The seed's hard sync after every ``sync_every``-th episode (0, 5, 10, ...); True if it ran."""
        if self.cfg.target == "hard" and episode % self.cfg.sync_every == 0:
            self.target_net.load_state_dict(self.policy_net.state_dict())
            return True
        return False


def train(
    episodes: int = 300,
    run_dir: str | Path | None = None,
    sync_every: int = 5,
    seed: int = 42,
    *,
    overwrite: bool = False,
    progress: bool = True,
    target: str = "hard",
    tau: float = 0.005,
    schedule_event: str | None = None,
    config: Config | None = None,
    threads: int | None = 1,
) -> TrainResult:
    """Train a DQN on CartPole-v1 for ``episodes`` episodes; record to ``run_dir`` unless it is None.

    The recorder only observes (detached norms, hooks that return nothing), so for the same ``seed`` the
    losses are identical with and without it. ``schedule_event``, when given, is logged with
    ``rec.event`` after every ``sync_every``-th episode whatever ``target`` is: a marker on the hard-sync
    schedule that a soft-update run can carry as a control for event alignment. ``threads`` sets torch's
    intra-op threads for the run (see ``torch_threads``; None keeps the current setting).
    """
    if target not in ("hard", "soft"):
        raise ValueError(f"train(target=...) must be 'hard' or 'soft', got {target!r}")
    cfg = replace(config or Config(), sync_every=int(sync_every), target=target, tau=float(tau))
    seed_everything(seed)
    env = gym.make("CartPole-v1")
    loss_fn = nn.MSELoss()
    agent = _Agent(env, cfg, loss_fn)
    result = TrainResult(run_dir=None if run_dir is None else Path(run_dir))
    start = time.perf_counter()
    smoothed = 0.0
    try:
        with torch_threads(threads), recording(run_dir, loss_fn, overwrite) as rec:
            if rec is not None:
                rec.attach(agent.policy_net, optimizer=agent.optimizer)
                rec.track_target(agent.target_net)
            bar = trange(episodes, disable=not progress, desc="episodes", unit="ep")
            for episode in bar:
                reward = agent.run_episode(env, seed if episode == 0 else None, result.losses)
                smoothed = (1 - cfg.smoothing_factor) * reward + cfg.smoothing_factor * smoothed
                result.rewards.append(reward)
                result.smoothed.append(smoothed)
                if rec is not None:
                    rec.push_metric("total_reward", reward)
                    rec.push_metric("smoothed_treward", smoothed)
                    rec.tick_epoch()
                if agent.maybe_sync(episode):
                    result.sync_episodes.append(episode)
                if rec is not None and schedule_event and episode % cfg.sync_every == 0:
                    rec.event(schedule_event)
                bar.set_postfix(reward=f"{reward:.0f}", smoothed=f"{smoothed:.1f}", refresh=False)
    finally:
        env.close()
    result.steps = agent.steps_done
    result.seconds = time.perf_counter() - start
    return result


def report_command(run_dirs: Sequence[str | Path], out: str | Path, event: str, level: str) -> str:
    """The ``normtrace report`` command line equivalent to ``write_report`` (the CLI's defaults omitted)."""
    flags = "" if level == "epoch" else f" --level {level}"
    flags += "" if event == "target_update" else f" --event {event}"
    return f"normtrace report {' '.join(str(r) for r in run_dirs)}{flags} -o {out}"


def write_report(
    run_dirs: Sequence[str | Path], out: str | Path, *, event: str = "target_update", level: str = "pass"
) -> Path | None:
    """Write the offline HTML report of ``run_dirs`` with ``normtrace_analysis``; without it, say how.

    ``level="pass"`` (the default here) draws the curves per forward pass and aligns spikes with ``event``
    within a few passes: a target sync's effect lasts a few dozen optimisation steps, and per-epoch
    aggregation averages it away (on the 300-episode run, per epoch 2 of 58 syncs are followed by a
    spike of net.output, p = 0.13; per pass 19 of 58 are, every one of its 19 spike excursions, 31x the
    local chance, p <= 0.001).
    Returns the report's path, or None when the analysis package cannot be imported: the trace is on
    disk either way, so that never fails a run.
    """
    try:
        from normtrace_analysis import report
    except ImportError as exc:
        print(
            f"\nNo HTML report: normtrace_analysis is not usable here ({type(exc).__name__}: {exc}).\n"
            f"Install it with\n    {INSTALL_HINT}\nthen write the report with\n"
            f"    {report_command(run_dirs, out, event, level)}",
            file=sys.stderr,
        )
        return None
    source = run_dirs[0] if len(run_dirs) == 1 else [str(r) for r in run_dirs]
    return Path(report(source, out, event=event, level=level))


def findings(run_dir: str | Path, *, event: str = "target_update", level: str = "pass") -> list[str]:
    """The analysis' one-sentence verdict per module on spikes after ``event`` (the report's headline)."""
    import normtrace_analysis as na

    return na.load(run_dir).event_alignment(event, level=level)["finding"].to_list()


def summarize(result: TrainResult) -> str:
    """A few lines on the learning curve: first/last/max smoothed reward, steps and time."""
    if not result.rewards:
        return "no episodes run"
    best = int(np.argmax(result.rewards))
    return (
        f"episodes: {len(result.rewards)}, env steps: {result.steps}, optimisation steps: "
        f"{len(result.losses)}, time: {result.seconds:.1f} s\n"
        f"smoothed reward: first {result.smoothed[0]:.1f}, last {result.smoothed[-1]:.1f}, "
        f"max {max(result.smoothed):.1f}; best episode {best} with reward {result.rewards[best]:.0f}; "
        f"mean reward of the last 20 episodes {np.mean(result.rewards[-20:]):.1f}\n"
        f"target syncs: {len(result.sync_episodes)}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag maps onto an argument of ``train`` or the report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=300, help="episodes to train (default: 300)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/cartpole"), help="trace directory")
    p.add_argument("--sync-every", type=int, default=5, help="hard target sync period in episodes")
    p.add_argument("--seed", type=int, default=42, help="seed for torch, random, numpy and the env")
    p.add_argument("--overwrite", action="store_true", help="replace a trace already in --run-dir")
    p.add_argument("--no-record", action="store_true", help="train without the recorder (no trace)")
    p.add_argument(
        "--report", type=Path, default=None, help="HTML report path (default: RUN_DIR/report.html)"
    )
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument(
        "--level",
        choices=["pass", "epoch"],
        default="pass",
        help="report x axis and alignment (default: pass)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1, fastest here)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Train, print the reward summary, and write the report next to the run."""
    args = build_parser().parse_args(argv)
    if args.episodes < 1 or args.sync_every < 1:
        raise SystemExit("--episodes and --sync-every must be at least 1")
    run_dir = None if args.no_record else args.run_dir
    try:
        result = train(
            args.episodes,
            run_dir,
            args.sync_every,
            args.seed,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            threads=args.threads,
        )
    except nt.RunDirError as exc:
        raise SystemExit(f"{exc}\n(pass --overwrite to replace it, or choose another --run-dir)") from None
    print(summarize(result))
    if run_dir is None:
        return 0
    print(f"trace: {run_dir}")
    if not args.no_report:
        written = write_report([run_dir], args.report or run_dir / "report.html", level=args.level)
        if written is not None:
            print(f"report: {written}")
            print(f"findings (output-norm spikes after target_update, per {args.level}):")
            for finding in findings(run_dir, level=args.level):
                print(f"  {finding}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
