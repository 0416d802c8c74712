"""An enumerable multi-turn MDP: a tabular "language model" whose environment inserts stochastic observation
tokens between its actions, with the exact policy gradient by enumeration.

    tokens      0 .. V-1, one of them EOS
    turn        the policy emits one token a ~ pi_theta(. | prefix) (an action); EOS ends the episode
    transition  otherwise the environment appends an observation o (one or more tokens) drawn from
                P_env(o | a), which does not depend on theta, and rewards the turn with r_env(a, o)
    end         EOS, or ``max_turns`` actions; the final reward R(whole completion) lands on the last action

The policy is a table over prefixes, softmax(theta[prefix]) over all V tokens, like a language model: it also
assigns a probability to the observation tokens, which it did not choose. p_theta(tau) = prod over actions
pi_theta(a_t | s_t) * prod over observations P_env(o | s), so

    grad J = E[ sum_{t in actions} grad log pi(a_t | s_t) G_t ]       (the observations' terms cancel)

with G_t the discounted reward-to-go over *action* steps: J = E[sum_k gamma^k r_k], k counting actions. A
loss that also sums grad log pi(o | s) over observation tokens estimates something else: it is biased
(``tests/test_multiturn_exact.py`` measures it). The batch tensors carry both masks, as a ``Rollout`` does.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class TurnTrajectory:
    tokens: tuple[int, ...]  # the completion: actions and observations in order
    is_action: tuple[bool, ...]
    rewards: tuple[float, ...]  # per token: the reward earned on that action (0 on observations)
    env_probability: float  # prod of P_env(o | s) over the observations


def _default_observations() -> dict[int, list[tuple[tuple[int, ...], float]]]:
    # after action 0 the environment mostly answers [0]; after action 1 mostly [1, 1] (two tokens)
    return {0: [((0,), 0.7), ((1, 1), 0.3)], 1: [((0,), 0.25), ((1, 1), 0.75)]}


def _default_step_reward(action: int, observation: tuple[int, ...]) -> float:
    return (1.0 if observation == (1, 1) else -0.5) + 0.2 * action


def _default_final_reward(tokens: tuple[int, ...], is_action: tuple[bool, ...]) -> float:
    # depends on the observations too: an answer that repeats the environment's last token scores
    actions = [t for t, a in zip(tokens, is_action) if a]
    observed = [t for t, a in zip(tokens, is_action) if not a]
    echo = 1.5 if observed and actions[-1] == observed[-1] else 0.0
    return echo + 0.5 * sum(t == 1 for t in actions) - 0.3 * len(tokens)


@dataclass
class TurnMDP:
    """``observations[a]``: the environment's answers to action a, ``[(tokens, probability), ...]`` (EOS gets none)."""

    vocab: int = 3
    eos: int = 2
    max_turns: int = 2
    observations: dict[int, list[tuple[tuple[int, ...], float]]] = field(default_factory=_default_observations)
    step_reward: Callable[[int, tuple[int, ...]], float] = _default_step_reward
    final_reward: Callable[[tuple[int, ...], tuple[bool, ...]], float] = _default_final_reward

    def trajectories(self) -> list[TurnTrajectory]:
        """Every possible episode with its environment probability."""
        done: list[TurnTrajectory] = []

        def extend(tokens: list[int], is_action: list[bool], rewards: list[float], probability: float, turn: int):
            for action in range(self.vocab):
                t, a, r = tokens + [action], is_action + [True], rewards + [0.0]
                if action == self.eos or turn + 1 == self.max_turns:
                    r[-1] += self.final_reward(tuple(t), tuple(a))
                    done.append(TurnTrajectory(tuple(t), tuple(a), tuple(r), probability))
                    continue
                for observation, p in self.observations[action]:
                    r2 = r[:-1] + [r[-1] + self.step_reward(action, observation)]
                    extend(t + list(observation), a + [False] * len(observation), r2 + [0.0] * len(observation),
                           probability * p, turn + 1)

        extend([], [], [], 1.0, 0)
        return done

    def states(self) -> dict[tuple[int, ...], int]:
        """Index of every prefix at which a token is emitted (the rows of theta)."""
        prefixes: dict[tuple[int, ...], int] = {}
        for trajectory in self.trajectories():
            for t in range(len(trajectory.tokens)):
                prefixes.setdefault(trajectory.tokens[:t], len(prefixes))
        return prefixes

    @property
    def horizon(self) -> int:
        return max(len(t.tokens) for t in self.trajectories())


def trajectory_logprob(theta: Tensor, mdp: TurnMDP, trajectory: TurnTrajectory, states: dict) -> Tensor:
    """log p_theta(tau): the policy's log-probs of the actions plus log P_env of the observations."""
    logits = torch.log_softmax(theta, dim=-1)
    total = torch.log(torch.tensor(trajectory.env_probability, dtype=theta.dtype))
    for t, (token, is_action) in enumerate(zip(trajectory.tokens, trajectory.is_action)):
        if is_action:
            total = total + logits[states[trajectory.tokens[:t]], token]
    return total


def exact_objective(theta: Tensor, mdp: TurnMDP, gamma: float = 1.0) -> Tensor:
    """J(theta) = sum_tau p_theta(tau) sum_k gamma^k r_k (k counts actions), differentiable in theta."""
    states = mdp.states()
    total = torch.zeros((), dtype=theta.dtype)
    for trajectory in mdp.trajectories():
        action_rewards = [r for r, a in zip(trajectory.rewards, trajectory.is_action) if a]
        discounted = sum(gamma**k * r for k, r in enumerate(action_rewards))
        total = total + torch.exp(trajectory_logprob(theta, mdp, trajectory, states)) * discounted
    return total


def exact_gradient(theta: Tensor, mdp: TurnMDP, gamma: float = 1.0) -> Tensor:
    theta = theta.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(exact_objective(theta, mdp, gamma), theta)
    return gradient


def batch_tensors(trajectories: list[TurnTrajectory], mdp: TurnMDP) -> dict[str, Tensor]:
    """``[B, T]`` tensors: states (prefix index), tokens, rewards, completion_mask, action_mask (right-padded)."""
    states, horizon, size = mdp.states(), mdp.horizon, len(trajectories)
    out = {"states": torch.zeros(size, horizon, dtype=torch.long), "tokens": torch.zeros(size, horizon, dtype=torch.long)}
    for name in ("rewards", "completion_mask", "action_mask"):
        out[name] = torch.zeros(size, horizon, dtype=torch.float64)
    for i, trajectory in enumerate(trajectories):
        n = len(trajectory.tokens)
        out["states"][i, :n] = torch.tensor([states[trajectory.tokens[:t]] for t in range(n)])
        out["tokens"][i, :n] = torch.tensor(trajectory.tokens)
        out["rewards"][i, :n] = torch.tensor(trajectory.rewards, dtype=torch.float64)
        out["completion_mask"][i, :n] = 1.0
        out["action_mask"][i, :n] = torch.tensor(trajectory.is_action, dtype=torch.float64)
    return out


def policy_logprobs(theta: Tensor, states: Tensor, tokens: Tensor) -> Tensor:
    """log pi_theta(token_t | prefix_t) ``[B, T]`` at every position, actions and observations alike (as an LM)."""
    return torch.log_softmax(theta, dim=-1)[states, tokens]


def estimator_moments(theta: Tensor, mdp: TurnMDP, estimator: Callable[[Tensor, dict[str, Tensor]], Tensor],
                      batch_size: int) -> tuple[Tensor, Tensor]:
    """Exact mean and total variance of ``estimator`` over all ordered batches of ``batch_size`` i.i.d. episodes."""
    trajectories, states = mdp.trajectories(), mdp.states()
    with torch.no_grad():
        probabilities = [float(torch.exp(trajectory_logprob(theta, mdp, t, states))) for t in trajectories]
    mean = torch.zeros_like(theta, dtype=torch.float64)
    second = torch.zeros((), dtype=torch.float64)
    for combo in itertools.product(range(len(trajectories)), repeat=batch_size):
        weight = 1.0
        for index in combo:
            weight *= probabilities[index]
        estimate = estimator(theta, batch_tensors([trajectories[i] for i in combo], mdp)).to(torch.float64)
        mean += weight * estimate
        second += weight * (estimate**2).sum()
    return mean, second - (mean**2).sum()


def exact_kl(theta: Tensor, reference: Tensor, mdp: TurnMDP) -> float:
    """KL(p_theta || p_ref) between the two policies' episode distributions (the environment's terms cancel)."""
    states = mdp.states()
    total = 0.0
    for trajectory in mdp.trajectories():
        log_p = trajectory_logprob(theta, mdp, trajectory, states)
        total += float(torch.exp(log_p) * (log_p - trajectory_logprob(reference, mdp, trajectory, states)))
    return total


__all__ = ["TurnTrajectory", "TurnMDP", "trajectory_logprob", "exact_objective", "exact_gradient", "batch_tensors",
           "policy_logprobs", "estimator_moments", "exact_kl"]
