"""Collect complete episodes from a vector of gymnasium environments into a ``[B, T]`` batch.

Every one of the N environment copies plays exactly ``episodes_per_env`` episodes from a fresh reset,
so the batch is B = N * episodes_per_env i.i.d. episodes of the current policy. (Keeping "the first B
episodes to finish" instead would over-represent short episodes and bias the gradient.)

Autoreset (gymnasium 1.x ``AutoresetMode.NEXT_STEP``): when copy i returns terminated or truncated at
step t, its step t+1 does not act: it resets the copy, ignores the action, and returns the first
observation of the next episode with reward 0. That step belongs to no episode and is not recorded;
its observation is the next episode's s_0. Copies that have played their quota keep stepping (vector
envs step all copies together) but nothing they do is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

Tensor = torch.Tensor


@dataclass
class EpisodeBatch:
    """B episodes, right-padded to T steps, in the LM track's layout.

      observations  ``[B, T, D]`` float: encoded s_t (policy inputs)
      actions       ``[B, T]`` long (discrete) or ``[B, T, A]`` float (continuous, unclipped samples): a_t
      rewards       ``[B, T]``: r_t
      mask          ``[B, T]`` float 0/1: 1 on the episode's real steps
      terminated    ``[B]`` bool: the episode reached a terminal state (False: cut by a time limit)
    """

    observations: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor
    terminated: Tensor

    def __len__(self) -> int:
        return self.mask.shape[0]

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(-1)

    @property
    def episode_returns(self) -> Tensor:
        """Undiscounted return sum_t r_t of each episode ``[B]``."""
        return (self.rewards * self.mask).sum(-1)

    @property
    def num_steps(self) -> int:
        return int(self.mask.sum())


@torch.no_grad()
def collect_episodes(envs, agent, episodes_per_env: int, generator: torch.Generator | None = None,
                     deterministic: bool = False, seed: int | list[int] | None = None) -> tuple[EpisodeBatch, int]:
    """Play ``episodes_per_env`` complete episodes in every copy of ``envs`` with ``agent``'s policy.

    Returns the batch (episodes in copy-major order: copy 0's episodes first) and the number of
    environment transitions simulated (including those of copies past their quota). ``seed`` reseeds
    the copies on the initial reset (None continues their random streams).
    """
    num_envs = envs.num_envs
    raw_observations, _ = envs.reset(seed=seed)
    remaining = np.full(num_envs, episodes_per_env)
    resetting = np.zeros(num_envs, dtype=bool)  # NEXT_STEP autoreset: this copy's next step only resets it
    trace: dict[str, list] = {"obs": [], "actions": [], "rewards": [], "recorded": [], "done": [], "terminated": []}
    simulated = 0
    while remaining.any():
        observations = agent.encode(raw_observations)  # [N, D]
        actions = agent.policy.sample(observations, generator, deterministic)
        raw_observations, rewards, terminated, truncated, _ = envs.step(agent.policy.env_actions(actions))
        recorded = (remaining > 0) & ~resetting
        done = (terminated | truncated) & ~resetting
        for key, value in (("obs", observations), ("actions", actions), ("rewards", rewards), ("recorded", recorded),
                           ("done", done), ("terminated", terminated)):
            trace[key].append(value)
        simulated += int((~resetting).sum())
        remaining -= done & recorded
        resetting = done
    return _assemble(trace, num_envs, episodes_per_env), simulated


def _assemble(trace: dict[str, list], num_envs: int, episodes_per_env: int) -> EpisodeBatch:
    """Per-step traces ``[S, N, ...]`` -> episodes ``[B, T, ...]``, copy-major, each starting at t = 0."""
    recorded = np.stack(trace["recorded"], 1)  # [N, S]
    done = np.stack(trace["done"], 1) & recorded
    terminated = np.stack(trace["terminated"], 1)
    # episode id of each recorded step: copy * episodes_per_env + number of this copy's episodes already ended
    episode_in_copy = np.cumsum(done, axis=1) - done
    episode = (np.arange(num_envs)[:, None] * episodes_per_env + episode_in_copy)[recorded]  # copy-major, time-ordered
    num_episodes = num_envs * episodes_per_env
    lengths = np.bincount(episode, minlength=num_episodes)
    position = np.arange(len(episode)) - (np.cumsum(lengths) - lengths)[episode]
    horizon = int(lengths.max())
    rows, cols = torch.as_tensor(episode), torch.as_tensor(position)
    select = torch.as_tensor(recorded)

    def scatter(steps: list, dtype=None) -> Tensor:
        values = torch.as_tensor(np.stack([np.asarray(s) for s in steps], 1)) if not isinstance(steps[0], Tensor) \
            else torch.stack(steps, 1)  # [N, S, ...]
        values = values[select]
        out = torch.zeros((num_episodes, horizon, *values.shape[1:]), dtype=dtype or values.dtype)
        out[rows, cols] = values.to(out.dtype)
        return out

    mask = torch.zeros(num_episodes, horizon)
    mask[rows, cols] = 1.0
    return EpisodeBatch(
        observations=scatter(trace["obs"]),
        actions=scatter(trace["actions"]),
        rewards=scatter(trace["rewards"], torch.float32),
        mask=mask,
        terminated=torch.as_tensor(terminated[done]),
    )
