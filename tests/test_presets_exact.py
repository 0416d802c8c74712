"""Every preset's estimator held against the exact gradient on the enumerable MDP.

The estimator of a preset is the library's own pipeline: ``estimator.advantages`` (returns -> baseline ->
scale -> whiten) with the preset's spec, then the preset's loss (``off_policy_loss`` with its importance
weighting, ratio level, clip range and aggregation) at pi_old = pi_theta, i.e. on-policy, ratio 1.
``estimator_moments`` enumerates every batch of B i.i.d. trajectories, so E[g] and tr Cov[g] are exact.

Where theory says unbiased (reinforce, rloo, remax) E[g] == grad J. Where it does not, the bias is
measured and held to what can be derived: the group mean that includes the sample shrinks the gradient
by exactly (1 - 1/K); Dr. GRPO's constant length divides it by exactly L; dynamic sampling with one group
rescales it by exactly 1 / P(group not degenerate); std scaling and whitening only keep the direction
roughly (cosine asserted). ``python tests/test_presets_exact.py`` prints the table for the README.
"""

import math

import pytest
import torch

from rlhf_pg.core.advantages import degenerate_groups, overlong_penalty
from rlhf_pg.core.estimator import EstimatorSpec, advantages
from rlhf_pg.core.losses import aggregate, clipped_policy_loss, kl_estimate, kl_penalized_rewards, off_policy_loss
from rlhf_pg.core.losses import policy_gradient_loss, truncated_policy_loss
from rlhf_pg.core.mdp import terminal_rewards
from rlhf_pg.core.presets import PRESETS, resolve_preset
from rlhf_pg.gym.tabular import (
    batch_tensors, default_mdp, estimator_moments, exact_gradient, greedy_trajectory, policy_logprobs, trajectory_logprob,
)

THETA = torch.tensor([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]], dtype=torch.float64)
MDP = default_mdp()
BATCH = 4  # the MDP has one start state, so a batch of 4 is one prompt's group of K = 4, or two groups of 2


def spec_of(values: dict) -> EstimatorSpec:
    """The EstimatorSpec of dotted recipe values (what the recipe's ``AlgorithmConfig`` builds from them)."""
    return EstimatorSpec(gamma=values["algorithm.gamma"], baseline=values["algorithm.baseline"],
                         whiten=values["algorithm.whiten"], weighting=values["algorithm.estimator"],
                         scale=values["algorithm.scale"])


def preset_estimator(name: str, groups_of: int = BATCH, overrides: dict | None = None):
    """(estimator, condition) of preset ``name`` on the tabular MDP; ``condition`` is DAPO's dynamic sampling."""
    values = resolve_preset(name, overrides)
    spec = spec_of(values)
    aggregation = values["algorithm.aggregation"]
    norm_length = values.get("algorithm.norm_length") or MDP.horizon  # default: the longest completion
    buffer_length = round(values.get("algorithm.overlong_buffer_fraction", 0.0) * MDP.horizon)

    def shaped_rewards(batch):
        rewards, mask = batch["rewards"], batch["mask"]
        if buffer_length > 0:
            penalty = overlong_penalty(mask.sum(-1), MDP.horizon, buffer_length, values["algorithm.overlong_penalty"])
            rewards = rewards + terminal_rewards(penalty, mask)
        return rewards

    def group_ids(size):
        return torch.arange(size) // groups_of

    def estimator(theta, batch):
        rewards, mask = shaped_rewards(batch), batch["mask"]
        size = rewards.shape[0]
        greedy = None
        if spec.baseline == "remax":  # one greedy rollout per prompt: here one start state
            greedy = torch.full((size,), sum(greedy_trajectory(theta, MDP).rewards), dtype=torch.float64)
        advantage = advantages(spec, rewards, mask, group_ids(size), greedy_rewards=greedy)
        theta = theta.detach().clone().requires_grad_(True)
        logprobs = policy_logprobs(theta, batch["states"], batch["actions"])
        loss, _ = off_policy_loss(
            values["algorithm.importance"], logprobs, logprobs.detach(), advantage, mask, values["algorithm.clip_eps"],
            values["algorithm.clip_eps_high"], values["algorithm.ratio_level"], aggregation, norm_length=norm_length,
        )
        (gradient,) = torch.autograd.grad(-loss, theta)
        return gradient

    def no_degenerate_group(batch):
        rewards = shaped_rewards(batch)
        return not bool(degenerate_groups(rewards.sum(-1), group_ids(rewards.shape[0])).any())

    return estimator, (no_degenerate_group if values["algorithm.dynamic_sampling"] else None)


_MOMENTS: dict = {}


def moments(name: str, groups_of: int = BATCH, overrides: dict | None = None):
    """Exact (E[g], tr Cov[g]) of preset ``name`` over all batches of BATCH trajectories (cached: enumeration)."""
    key = (name, groups_of, tuple(sorted((overrides or {}).items())))
    if key not in _MOMENTS:
        estimator, condition = preset_estimator(name, groups_of, overrides)
        _MOMENTS[key] = estimator_moments(THETA, MDP, estimator, BATCH, condition=condition)
    return _MOMENTS[key]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum() / (a.norm() * b.norm()))


GRAD_J = exact_gradient(THETA, MDP)


# --- unbiased where theory says so -------------------------------------------------------------


@pytest.mark.parametrize("name,groups_of", [("reinforce", 4), ("rloo", 4), ("rloo", 2), ("remax", 4)])
def test_reinforce_rloo_and_remax_presets_are_unbiased_against_the_exact_gradient(name, groups_of):
    mean, _ = moments(name, groups_of)
    assert torch.allclose(mean, GRAD_J, atol=1e-10)


def test_remax_greedy_trajectory_is_the_argmax_path_and_its_return_the_baseline():
    """The greedy return depends on theta and the start state only; here it is -1, far below E[R], so on this
    MDP ReMax has *more* variance than no baseline (see the table): a baseline helps only near E[R | s]."""
    greedy = greedy_trajectory(THETA, MDP)
    assert greedy.actions == (0, 1)  # argmax theta[0] = 0 -> state 1, argmax theta[1] = 1 -> episode ends
    assert sum(greedy.rewards) == MDP.reward[0][0] + MDP.reward[1][1] == -1.0


# --- biased, by exactly what can be derived ----------------------------------------------------


@pytest.mark.parametrize("groups_of", [4, 2])
def test_dr_grpo_is_the_exact_gradient_shrunk_by_1_minus_1_over_k_and_divided_by_the_constant_length(groups_of):
    mean, _ = moments("dr_grpo", groups_of)
    assert torch.allclose(mean, (1 - 1 / groups_of) / MDP.horizon * GRAD_J, atol=1e-10)


def test_gspo_on_policy_is_grpo_and_cispo_on_policy_is_dapo_without_its_sampling_and_shaping():
    """On-policy every ratio is 1: the importance weighting (sequence ratio, truncation) changes nothing."""
    assert torch.allclose(moments("gspo")[0], moments("grpo")[0], atol=1e-12)
    dapo_plain = {"algorithm.dynamic_sampling": False, "algorithm.overlong_buffer_fraction": 0.0}
    assert torch.allclose(moments("cispo")[0], moments("dapo", overrides=dapo_plain)[0], atol=1e-12)


def test_dynamic_sampling_with_one_group_rescales_the_gradient_by_exactly_one_over_p_not_degenerate():
    """A degenerate group has advantages exactly 0, so dropping it only renormalises (one group per batch)."""
    plain = {"algorithm.dynamic_sampling": False, "algorithm.overlong_buffer_fraction": 0.0}
    without, _ = moments("dapo", overrides=plain)
    with_sampling, _ = moments("dapo", overrides={"algorithm.overlong_buffer_fraction": 0.0})
    _, condition = preset_estimator("dapo", overrides={"algorithm.overlong_buffer_fraction": 0.0})

    def indicator(theta, batch):
        return torch.full_like(theta, float(condition(batch)))

    kept = float(estimator_moments(THETA, MDP, indicator, BATCH)[0][0, 0])
    assert 0.0 < kept < 1.0
    assert torch.allclose(with_sampling, without / kept, atol=1e-10)


@pytest.mark.parametrize("name", ["grpo", "reinforce_pp", "dapo", "cispo", "gspo"])
def test_std_scaled_and_whitened_presets_keep_the_direction_of_the_exact_gradient(name):
    overrides = {"algorithm.overlong_buffer_fraction": 0.0} if name == "dapo" else None
    mean, variance = moments(name, overrides=overrides)
    assert cosine(mean, GRAD_J) > 0.9
    assert torch.isfinite(variance) and variance > 0


def test_std_scaling_biases_the_direction_beyond_the_group_mean_shrinkage():
    """Without std the group-mean estimator is exactly parallel to grad J; GRPO's std makes it not."""
    unscaled, _ = moments("grpo", overrides={"algorithm.scale": "none", "algorithm.aggregation": "seq-mean-token-sum"})
    assert cosine(unscaled, GRAD_J) == pytest.approx(1.0, abs=1e-12)
    scaled, _ = moments("grpo", overrides={"algorithm.aggregation": "seq-mean-token-sum"})
    assert cosine(scaled, GRAD_J) < 1.0 - 1e-6


# --- the overlong penalty changes the objective, not the estimator ----------------------------


def test_overlong_penalty_is_a_terminal_reward_reinforce_on_it_is_unbiased_for_the_shaped_objective():
    buffer_length = 1  # L_max = 3 (the horizon), L_cache = 1: length 3 gets -1, length 2 gets 0
    overrides = {"algorithm.overlong_buffer_fraction": buffer_length / MDP.horizon, "algorithm.overlong_penalty": 1.0}
    mean, _ = moments("reinforce", overrides=overrides)

    theta = THETA.clone().requires_grad_(True)
    shaped = sum(
        torch.exp(trajectory_logprob(theta, t))
        * (sum(t.rewards) + float(overlong_penalty(torch.tensor([len(t.actions)]), MDP.horizon, buffer_length)[0]))
        for t in MDP.trajectories()
    )
    (shaped_gradient,) = torch.autograd.grad(shaped, theta)
    assert torch.allclose(mean, shaped_gradient, atol=1e-10)
    assert not torch.allclose(shaped_gradient, GRAD_J, atol=1e-3)


# --- where the KL goes: in the reward (k1) or in the loss (k3) ----------------------------------

THETA_REF = torch.tensor([[0.0, 0.5], [-0.3, 0.0], [0.2, 0.1]], dtype=torch.float64)
BETA = 0.3


def test_k1_kl_in_the_reward_is_unbiased_for_the_kl_regularised_objective():
    """REINFORCE++ / RLOO / ReMax: r'_t = r_t - beta (log pi - log pi_ref) with reward-to-go is unbiased for
    grad [ E R - beta KL(p_theta(tau) || p_ref(tau)) ]."""

    def estimator(theta, batch):
        theta = theta.detach().clone().requires_grad_(True)
        logprobs = policy_logprobs(theta, batch["states"], batch["actions"])
        ref = policy_logprobs(THETA_REF, batch["states"], batch["actions"])
        rewards = kl_penalized_rewards(batch["rewards"], logprobs.detach(), ref, batch["mask"], BETA, "k1")
        advantage = advantages(EstimatorSpec(baseline="none"), rewards, batch["mask"])  # reward-to-go
        (gradient,) = torch.autograd.grad(-policy_gradient_loss(logprobs, advantage, batch["mask"]), theta)
        return gradient

    theta = THETA.clone().requires_grad_(True)
    objective = sum(
        torch.exp(trajectory_logprob(theta, t))
        * (sum(t.rewards) - BETA * (trajectory_logprob(theta, t) - trajectory_logprob(THETA_REF, t)))
        for t in MDP.trajectories()
    )
    (regularised,) = torch.autograd.grad(objective, theta)
    mean, _ = estimator_moments(THETA, MDP, estimator, 2)
    assert torch.allclose(mean, regularised, atol=1e-10)


def test_k3_kl_in_the_loss_is_the_gradient_of_the_per_state_kl_from_the_reference_with_visits_held_fixed():
    """GRPO / DAPO placement: E[grad sum_t k3_t] = sum_s E[visits of s] grad KL(pi_ref(.|s) || pi_theta(.|s)),
    not the gradient of KL(pi_theta || pi_ref) of the sequence distribution."""

    def estimator(theta, batch):
        theta = theta.detach().clone().requires_grad_(True)
        logprobs = policy_logprobs(theta, batch["states"], batch["actions"])
        ref = policy_logprobs(THETA_REF, batch["states"], batch["actions"])
        penalty = aggregate(kl_estimate(logprobs, ref, "k3"), batch["mask"], "seq-mean-token-sum")
        (gradient,) = torch.autograd.grad(penalty, theta)
        return gradient

    mean, _ = estimator_moments(THETA, MDP, estimator, 1)
    visits = torch.zeros(MDP.num_states, dtype=torch.float64)
    for t in MDP.trajectories():
        probability = float(torch.exp(trajectory_logprob(THETA, t)))
        for state in t.states:
            visits[state] += probability
    theta = THETA.clone().requires_grad_(True)
    ref_probs = torch.softmax(THETA_REF, -1)
    forward_kl = (ref_probs * (ref_probs.log() - torch.log_softmax(theta, -1))).sum(-1)  # [S]
    (expected,) = torch.autograd.grad((visits * forward_kl).sum(), theta)
    assert torch.allclose(mean, expected, atol=1e-10)

    theta = THETA.clone().requires_grad_(True)
    sequence_kl = sum(torch.exp(trajectory_logprob(theta, t)) * (trajectory_logprob(theta, t)
                      - trajectory_logprob(THETA_REF, t)) for t in MDP.trajectories())
    (reverse,) = torch.autograd.grad(sequence_kl, theta)
    assert not torch.allclose(mean, reverse, atol=1e-3)


# --- off-policy: PPO clipping drops a token's gradient, CISPO's truncation keeps it --------------


def _score(theta: torch.Tensor, state: int, action: int) -> torch.Tensor:
    """grad_theta log pi(a|s) of the tabular softmax, by hand: e_a - pi(.|s) in row s."""
    gradient = torch.zeros_like(theta)
    gradient[state] = -torch.softmax(theta[state], -1)
    gradient[state, action] += 1.0
    return gradient


def test_off_policy_ppo_clipping_zeroes_the_clipped_tokens_gradient_while_cispo_keeps_it():
    theta_old = THETA
    theta_new = THETA + torch.tensor([[-0.6, 0.6], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    trajectory = MDP.trajectories()[5]  # states (0, 2, 1), actions (1, 1, 0): the first token's ratio is large
    batch = batch_tensors([trajectory], MDP.horizon)
    states, actions, mask = batch["states"], batch["actions"], batch["mask"]
    advantage = torch.ones(1, MDP.horizon, dtype=torch.float64) * mask  # A > 0 on every token
    old = policy_logprobs(theta_old, states, actions)
    ratios = torch.exp(policy_logprobs(theta_new, states, actions) - old)[0]
    eps, eps_high = 0.2, 0.28
    assert ratios[0] > 1 + eps_high and all(1 - eps < r < 1 + eps for r in ratios[1:].tolist())

    def gradient(loss_fn):
        theta = theta_new.clone().requires_grad_(True)
        loss, stats = loss_fn(policy_logprobs(theta, states, actions))
        (grad,) = torch.autograd.grad(-loss, theta)
        return grad, stats

    ppo, ppo_stats = gradient(lambda lp: clipped_policy_loss(lp, old, advantage, mask, eps, eps_high))
    cispo, cispo_stats = gradient(
        lambda lp: truncated_policy_loss(lp, old, advantage, mask, eps_high, aggregation="seq-mean-token-sum"))
    scores = [_score(theta_new, s, a) for s, a in zip(trajectory.states, trajectory.actions)]
    # PPO: grad of r_t A_t is r_t A_t grad log pi_t inside the trust region, exactly 0 for the clipped token
    expected_ppo = sum(float(ratios[t]) * scores[t] for t in (1, 2))
    # CISPO: every token, weight min(r_t, 1 + eps_high)
    expected_cispo = (1 + eps_high) * scores[0] + sum(float(ratios[t]) * scores[t] for t in (1, 2))
    assert torch.allclose(ppo, expected_ppo, atol=1e-12)
    assert torch.allclose(cispo, expected_cispo, atol=1e-12)
    assert ppo[0].abs().sum() == 0  # state 0 is visited only by the clipped token: no gradient left there
    assert cispo[0].abs().sum() > 0
    assert ppo_stats.clip_fraction == pytest.approx(1 / 3) and cispo_stats.clip_fraction == pytest.approx(1 / 3)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_presets_loss_on_policy_has_the_plain_reinforce_gradient_of_its_aggregation(name):
    values = resolve_preset(name)
    spec = spec_of(values)
    trajectories = MDP.trajectories()
    batch = batch_tensors([trajectories[i] for i in (0, 2, 5, 4)], MDP.horizon)
    mask = batch["mask"]
    greedy = torch.full((4,), -1.0, dtype=torch.float64) if spec.baseline == "remax" else None
    advantage = advantages(spec, batch["rewards"], mask, torch.tensor([0, 0, 1, 1]), greedy_rewards=greedy)
    grads = []
    for off_policy in (False, True):
        theta = THETA.clone().requires_grad_(True)
        logprobs = policy_logprobs(theta, batch["states"], batch["actions"])
        if off_policy:
            loss, stats = off_policy_loss(values["algorithm.importance"], logprobs, logprobs.detach(), advantage, mask,
                                          values["algorithm.clip_eps"], values["algorithm.clip_eps_high"],
                                          values["algorithm.ratio_level"], values["algorithm.aggregation"],
                                          norm_length=MDP.horizon)
            assert stats.clip_fraction == 0 and stats.ratio_mean == pytest.approx(1.0)
        else:
            loss = policy_gradient_loss(logprobs, advantage, mask, values["algorithm.aggregation"],
                                        norm_length=MDP.horizon)
        grads.append(torch.autograd.grad(loss, theta)[0])
    assert torch.allclose(grads[0], grads[1], atol=1e-12)


# --- the table for the README ------------------------------------------------------------------

THEORY = {"reinforce": "unbiased", "rloo": "unbiased", "remax": "unbiased", "grpo": "biased: group mean + std + 1/|y|",
          "dr_grpo": "(1-1/K)/L x grad J", "reinforce_pp": "biased: batch whitening", "dapo": "biased: std, token mean",
          "cispo": "biased: std, token mean", "gspo": "biased: as grpo on-policy"}


def table(groups_of: int = BATCH) -> str:
    norm = float(GRAD_J.norm())
    lines = [f"B = {BATCH} trajectories, groups of K = {groups_of}; theta = THETA of tests/test_exact_gradient.py; "
             f"|grad J| = {norm:.4f}",
             "", "| preset | theory | cos(E g, grad J) | abs(E g) / abs(grad J) | tr Cov g | tr Cov g / abs(E g)^2 |",
             "|---|---|---|---|---|---|"]
    rows = [(name, None) for name in PRESETS]
    rows.insert(rows.index(("dapo", None)), ("dapo", {"algorithm.overlong_buffer_fraction": 0.0}))
    for name, overrides in rows:
        mean, variance = moments(name, groups_of, overrides)
        label = name if overrides is None else f"{name} (no overlong penalty)"
        theory = THEORY[name] if overrides is not None or name != "dapo" else "+ overlong shaping (L_cache = 1 of 3)"
        lines.append(f"| {label} | {theory} | {cosine(mean, GRAD_J):.4f} | {float(mean.norm()) / norm:.4f} | "
                     f"{float(variance):.4f} | {float(variance) / float(mean.norm()) ** 2:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(table(4))
    print()
    print(table(2))
    assert math.isfinite(float(GRAD_J.norm()))
