"""Small policies for the toy track: an MLP giving pi_theta(a | s), and a learned baseline V(s).

    discrete actions    pi_theta(. | s) = Categorical(softmax(f_theta(s)))
    continuous actions  pi_theta(. | s) = Normal(mu_theta(s), diag(exp(log_std)^2)),  log_std learned
                        (the sampled action is clipped to the action bounds for the environment; the
                        log-probability is that of the unclipped sample, which is what was drawn)

Observations are encoded to a flat float vector: ``Box`` as is, ``Discrete`` one-hot, ``Tuple``
concatenated, so Blackjack's ``(sum, dealer card, usable ace)`` becomes three one-hots and the enumerable
MDP's state index becomes a one-hot (with ``hidden_sizes: []`` the policy is then exactly tabular).
A ``GymAgent`` (policy + optional value) saves and loads like a Hugging Face model:
``save_pretrained(dir)`` writes ``config.json`` and ``model.pt``; ``GymAgent.from_pretrained(dir)``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from ..errors import UserError

Tensor = torch.Tensor


# --- observations -----------------------------------------------------------------------------------


def observation_spec(space: spaces.Space) -> list[dict[str, Any]]:
    """A JSON description of how ``space`` is flattened: one part per ``Box`` / ``Discrete`` component."""
    if isinstance(space, spaces.Box):
        return [{"kind": "box", "dim": int(np.prod(space.shape))}]
    if isinstance(space, spaces.Discrete):
        return [{"kind": "discrete", "n": int(space.n), "start": int(space.start)}]
    if isinstance(space, spaces.Tuple) and all(isinstance(s, (spaces.Box, spaces.Discrete)) for s in space.spaces):
        return [part for s in space.spaces for part in observation_spec(s)]
    raise UserError(f"observation space {space} is not supported by the gym track; it handles Box, Discrete and "
                    "Tuples of them (wrap the environment with gymnasium.wrappers.FlattenObservation)")


def encode_observations(spec: list[dict[str, Any]], observations: Any) -> Tensor:
    """Batched raw observations (as a vector env returns them) -> float32 ``[N, D]``."""
    parts = observations if len(spec) > 1 else (observations,)
    encoded = []
    for part, values in zip(spec, parts):
        values = torch.as_tensor(np.asarray(values))
        if part["kind"] == "box":
            encoded.append(values.reshape(values.shape[0], -1).float())
        else:
            encoded.append(nn.functional.one_hot(values.long() - part["start"], part["n"]).float())
    return torch.cat(encoded, dim=-1)


def observation_dim(spec: list[dict[str, Any]]) -> int:
    return sum(part["dim"] if part["kind"] == "box" else part["n"] for part in spec)


# --- networks ---------------------------------------------------------------------------------------


def mlp(in_dim: int, hidden_sizes: list[int], out_dim: int, activation: str, out_gain: float) -> nn.Sequential:
    """Linear layers with ``activation`` between them, orthogonally initialized (gain sqrt 2; ``out_gain`` last)."""
    layers: list[nn.Module] = []
    sizes = [in_dim, *hidden_sizes, out_dim]
    for index, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layer = nn.Linear(fan_in, fan_out)
        last = index == len(sizes) - 2
        nn.init.orthogonal_(layer.weight, out_gain if last else math.sqrt(2))
        nn.init.zeros_(layer.bias)
        layers.append(layer)
        if not last:
            layers.append(nn.Tanh() if activation == "tanh" else nn.ReLU())
    return nn.Sequential(*layers)


class CategoricalPolicy(nn.Module):
    """pi(a | s) = softmax(f(s))_a over ``num_actions`` actions (environment actions start at ``start``)."""

    def __init__(self, obs_dim: int, num_actions: int, hidden_sizes: list[int], activation: str, start: int = 0):
        super().__init__()
        self.net = mlp(obs_dim, hidden_sizes, num_actions, activation, out_gain=0.01)
        self.start = start

    def logits(self, observations: Tensor) -> Tensor:
        return torch.log_softmax(self.net(observations), dim=-1)

    def log_prob(self, observations: Tensor, actions: Tensor) -> Tensor:
        """log pi(a | s): ``observations`` ``[..., D]``, ``actions`` ``[...]`` long -> ``[...]``."""
        return self.logits(observations).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self, observations: Tensor) -> Tensor:
        logits = self.logits(observations)
        return -(logits.exp() * logits).sum(-1)

    def sample(self, observations: Tensor, generator: torch.Generator | None, deterministic: bool = False) -> Tensor:
        logits = self.logits(observations)
        if deterministic:
            return logits.argmax(-1)
        return torch.multinomial(logits.exp(), 1, generator=generator).squeeze(-1)

    def env_actions(self, actions: Tensor) -> np.ndarray:
        return actions.numpy() + self.start


class GaussianPolicy(nn.Module):
    """pi(a | s) = Normal(mu(s), exp(log_std)^2) per action dimension; ``log_std`` is a learned vector."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes: list[int], activation: str, init_log_std: float,
                 low: list[float], high: list[float]):
        super().__init__()
        self.net = mlp(obs_dim, hidden_sizes, action_dim, activation, out_gain=0.01)
        self.log_std = nn.Parameter(torch.full((action_dim,), float(init_log_std)))
        self.register_buffer("low", torch.tensor(low, dtype=torch.float32))
        self.register_buffer("high", torch.tensor(high, dtype=torch.float32))

    def log_prob(self, observations: Tensor, actions: Tensor) -> Tensor:
        """log pi(a | s) = sum_k [-(a_k - mu_k)^2 / (2 sigma_k^2) - log sigma_k - log sqrt(2 pi)]; ``actions`` ``[..., A]``."""
        mean = self.net(observations)
        log_std = self.log_std.expand_as(mean)
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self, observations: Tensor) -> Tensor:
        per_dim = 0.5 + 0.5 * math.log(2 * math.pi) + self.log_std
        return per_dim.sum().expand(observations.shape[:-1])

    def sample(self, observations: Tensor, generator: torch.Generator | None, deterministic: bool = False) -> Tensor:
        mean = self.net(observations)
        if deterministic:
            return mean
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + torch.exp(self.log_std) * noise

    def env_actions(self, actions: Tensor) -> np.ndarray:
        return torch.maximum(torch.minimum(actions, self.high), self.low).numpy()


class ValueFunction(nn.Module):
    """V_phi(s): an MLP to one output; the learned baseline of ``advantages.learned_baseline``."""

    def __init__(self, obs_dim: int, hidden_sizes: list[int], activation: str):
        super().__init__()
        self.net = mlp(obs_dim, hidden_sizes, 1, activation, out_gain=1.0)

    def forward(self, observations: Tensor) -> Tensor:
        return self.net(observations).squeeze(-1)


# --- the agent: policy + optional value, save/load -------------------------------------------------------


class GymAgent(nn.Module):
    """The policy, the optional learned baseline and the observation encoding, as one saveable module."""

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = config
        self.observation_spec = config["observation_spec"]
        obs_dim = observation_dim(self.observation_spec)
        action = config["action"]
        if action["kind"] == "discrete":
            self.policy: nn.Module = CategoricalPolicy(obs_dim, action["n"], config["hidden_sizes"], config["activation"],
                                                       action["start"])
        else:
            self.policy = GaussianPolicy(obs_dim, action["dim"], config["hidden_sizes"], config["activation"],
                                         config["init_log_std"], action["low"], action["high"])
        self.value = None
        if config.get("value_hidden_sizes") is not None:
            self.value = ValueFunction(obs_dim, config["value_hidden_sizes"], config["activation"])

    @classmethod
    def for_spaces(cls, observation_space: spaces.Space, action_space: spaces.Space, hidden_sizes: list[int],
                   activation: str = "tanh", init_log_std: float = -0.5, value_hidden_sizes: list[int] | None = None,
                   env_id: str | None = None) -> "GymAgent":
        """A fresh agent for an environment's single observation and action spaces."""
        if isinstance(action_space, spaces.Discrete):
            action = {"kind": "discrete", "n": int(action_space.n), "start": int(action_space.start)}
        elif isinstance(action_space, spaces.Box) and len(action_space.shape) == 1:
            action = {"kind": "box", "dim": int(action_space.shape[0]), "low": action_space.low.tolist(),
                      "high": action_space.high.tolist()}
        else:
            raise UserError(f"action space {action_space} is not supported by the gym track; it handles Discrete "
                            "(categorical policy) and 1-D Box (Gaussian policy)")
        return cls({"env_id": env_id, "observation_spec": observation_spec(observation_space), "action": action,
                    "hidden_sizes": list(hidden_sizes), "activation": activation, "init_log_std": init_log_std,
                    "value_hidden_sizes": None if value_hidden_sizes is None else list(value_hidden_sizes)})

    def encode(self, observations: Any) -> Tensor:
        """Raw batched observations from a vector env -> ``[N, D]`` policy inputs (in the policy's dtype)."""
        dtype = next(self.policy.parameters()).dtype
        return encode_observations(self.observation_spec, observations).to(dtype)

    @torch.no_grad()
    def act(self, observations: Any, deterministic: bool = True, generator: torch.Generator | None = None) -> np.ndarray:
        """Environment actions for a batch of raw observations (greedy by default)."""
        actions = self.policy.sample(self.encode(observations), generator, deterministic)
        return self.policy.env_actions(actions)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config, indent=2))
        torch.save(self.state_dict(), directory / "model.pt")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "GymAgent":
        directory = Path(directory)
        if not (directory / "config.json").exists() or not (directory / "model.pt").exists():
            raise UserError(f"{directory} holds no gym policy (config.json and model.pt); give a run's final/ or "
                            "checkpoint-<step>/ directory")
        agent = cls(json.loads((directory / "config.json").read_text()))
        agent.load_state_dict(torch.load(directory / "model.pt", weights_only=True))
        return agent
