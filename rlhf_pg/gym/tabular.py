"""A small enumerable MDP with a tabular softmax policy, where the exact policy gradient is known.

Every trajectory can be listed with its probability, so J(theta) = sum_tau p_theta(tau) R(tau) and
its gradient are exact (autograd through the enumeration), and so is the expectation and the
variance of any gradient *estimator* over all batches of B trajectories. Used by the tests (the
estimators in ``advantages``/``losses`` are unbiased where theory says so) and by the variance lab.

Policy: pi_theta(a | s) = softmax(theta[s])_a,  theta: ``[num_states, num_actions]``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Trajectory:
    states: tuple[int, ...]
    actions: tuple[int, ...]
    rewards: tuple[float, ...]


@dataclass
class TabularMDP:
    """Deterministic transitions ``next_state[s][a]`` (-1 ends the episode), rewards ``reward[s][a]``.

    Episodes start in state 0 and last at most ``horizon`` steps.
    """

    next_state: list[list[int]]
    reward: list[list[float]]
    horizon: int

    @property
    def num_states(self) -> int:
        return len(self.next_state)

    @property
    def num_actions(self) -> int:
        return len(self.next_state[0])

    def trajectories(self) -> list[Trajectory]:
        """Every possible trajectory from state 0."""
        finished: list[Trajectory] = []

        def extend(states, actions, rewards):
            state = states[-1] if len(states) > len(actions) else None
            if state is None or len(actions) == self.horizon:
                finished.append(Trajectory(tuple(states[: len(actions)]), tuple(actions), tuple(rewards)))
                return
            for action in range(self.num_actions):
                following = self.next_state[state][action]
                next_states = states + ([following] if following >= 0 else [])
                extend(next_states, actions + [action], rewards + [self.reward[state][action]])

        extend([0], [], [])
        return finished


def default_mdp() -> TabularMDP:
    """Three states, two actions, horizon 3, with early termination (variable lengths) and rewards
    at every step, so reward-to-go differs from the total return."""
    return TabularMDP(
        next_state=[[1, 2], [2, -1], [0, 1]],
        reward=[[0.0, 1.0], [2.0, -1.0], [0.5, 3.0]],
        horizon=3,
    )


def trajectory_logprob(theta: Tensor, trajectory: Trajectory) -> Tensor:
    logits = torch.log_softmax(theta, dim=-1)
    return sum((logits[s, a] for s, a in zip(trajectory.states, trajectory.actions)), torch.zeros((), dtype=theta.dtype))


def exact_objective(theta: Tensor, mdp: TabularMDP, gamma: float = 1.0) -> Tensor:
    """J(theta) = sum_tau p_theta(tau) sum_t gamma^t r_t, differentiable in theta."""
    total = torch.zeros((), dtype=theta.dtype)
    for trajectory in mdp.trajectories():
        discounted = sum(gamma**t * r for t, r in enumerate(trajectory.rewards))
        total = total + torch.exp(trajectory_logprob(theta, trajectory)) * discounted
    return total


def exact_gradient(theta: Tensor, mdp: TabularMDP, gamma: float = 1.0) -> Tensor:
    theta = theta.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(exact_objective(theta, mdp, gamma), theta)
    return gradient


def batch_tensors(trajectories: list[Trajectory], horizon: int) -> dict[str, Tensor]:
    """``[B, T]`` tensors of a batch: states, actions (long), rewards, mask (float, right-padded)."""
    size = len(trajectories)
    states = torch.zeros(size, horizon, dtype=torch.long)
    actions = torch.zeros(size, horizon, dtype=torch.long)
    rewards = torch.zeros(size, horizon, dtype=torch.float64)
    mask = torch.zeros(size, horizon, dtype=torch.float64)
    for i, trajectory in enumerate(trajectories):
        length = len(trajectory.actions)
        states[i, :length] = torch.tensor(trajectory.states)
        actions[i, :length] = torch.tensor(trajectory.actions)
        rewards[i, :length] = torch.tensor(trajectory.rewards, dtype=torch.float64)
        mask[i, :length] = 1.0
    return {"states": states, "actions": actions, "rewards": rewards, "mask": mask}


def policy_logprobs(theta: Tensor, states: Tensor, actions: Tensor) -> Tensor:
    """log pi_theta(a_t | s_t) ``[B, T]`` for tabular ``theta``."""
    return torch.log_softmax(theta, dim=-1)[states, actions]


Estimator = Callable[[Tensor, dict[str, Tensor]], Tensor]  # (theta, batch tensors) -> gradient estimate


def estimator_moments(
    theta: Tensor, mdp: TabularMDP, estimator: Estimator, batch_size: int,
    condition: Callable[[dict[str, Tensor]], bool] | None = None, sampling_theta: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact mean and total variance (trace of the covariance) of a gradient estimator.

    Enumerates all ``|trajectories|^batch_size`` ordered batches of i.i.d. trajectories with their
    probabilities: no sampling error at all. With ``condition`` (batch tensors -> bool), the moments are
    conditional on the batch passing it: E[g | condition] over the batches that pass, reweighted by
    1 / P(condition) (e.g. DAPO's dynamic sampling, which only ever trains on groups with some contrast).
    ``sampling_theta``: the trajectories are drawn by another policy mu = softmax(sampling_theta) (a sampler
    that is not the trained policy), while the estimator is evaluated at ``theta``.
    """
    trajectories = mdp.trajectories()
    with torch.no_grad():
        source = theta if sampling_theta is None else sampling_theta
        probabilities = [float(torch.exp(trajectory_logprob(source, t))) for t in trajectories]
    mean = torch.zeros_like(theta, dtype=torch.float64)
    second = torch.zeros((), dtype=torch.float64)
    kept = 0.0
    for combo in itertools.product(range(len(trajectories)), repeat=batch_size):
        weight = 1.0
        for index in combo:
            weight *= probabilities[index]
        batch = batch_tensors([trajectories[i] for i in combo], mdp.horizon)
        if condition is not None and not condition(batch):
            continue
        kept += weight
        estimate = estimator(theta, batch).to(torch.float64)
        mean += weight * estimate
        second += weight * (estimate**2).sum()
    if condition is not None:
        if kept <= 0.0:
            raise ValueError("no batch of trajectories passes the condition: the conditional moments are undefined")
        mean, second = mean / kept, second / kept
    variance = second - (mean**2).sum()
    return mean, variance


def greedy_trajectory(theta: Tensor, mdp: TabularMDP) -> Trajectory:
    """The trajectory of the greedy policy a_t = argmax_a theta[s_t, a] (ties: the lower action).

    ReMax's baseline on the toy MDP: its return depends on theta and the start state only, never on the
    sampled actions of a batch.
    """
    states, actions, rewards = [], [], []
    state = 0
    while state >= 0 and len(actions) < mdp.horizon:
        action = int(torch.argmax(theta[state]))
        states.append(state)
        actions.append(action)
        rewards.append(mdp.reward[state][action])
        state = mdp.next_state[state][action]
    return Trajectory(tuple(states), tuple(actions), tuple(rewards))
