"""Multi-turn truth: on an enumerable MDP whose environment inserts stochastic observation tokens between the
policy's actions, the library's estimators with the action mask are unbiased where theory says so, and
putting the observation tokens in the loss (or the KL) is biased. Exact: every episode and every batch is
enumerated (``rlhf_pg.gym.turns``); the estimators are the library's own (``core.estimator.advantages``,
``policy_gradient_loss``, ``kl_estimate``, ``terminal_rewards``, ``action_tokens``).
"""

import pytest
import torch

from rlhf_pg.core.estimator import EstimatorSpec, advantages
from rlhf_pg.core.losses import kl_estimate, policy_gradient_loss
from rlhf_pg.core.mdp import Rollout, action_tokens, terminal_rewards
from rlhf_pg.gym.turns import (TurnMDP, batch_tensors, estimator_moments, exact_gradient, exact_kl, policy_logprobs,
                               trajectory_logprob)

MDP = TurnMDP()
STATES = MDP.states()
THETA = torch.linspace(-0.8, 0.9, len(STATES) * MDP.vocab, dtype=torch.float64).reshape(len(STATES), MDP.vocab).sin()


def _rollout(batch) -> Rollout:
    """The batch as the trainer holds it (for ``action_tokens``)."""
    size, width = batch["tokens"].shape
    return Rollout(prompt_ids=torch.zeros(size, 1, dtype=torch.long), prompt_mask=torch.ones(size, 1),
                   completion_ids=batch["tokens"], completion_mask=batch["completion_mask"],
                   logprobs=torch.zeros(size, width), group_ids=torch.zeros(size, dtype=torch.long),
                   action_mask=batch["action_mask"])


def make_estimator(returns="reward_to_go", baseline="none", gamma=1.0, observations_in_loss=False):
    def estimator(theta, batch):
        theta = theta.detach().clone().requires_grad_(True)
        logprobs = policy_logprobs(theta, batch["states"], batch["tokens"])
        mask = batch["completion_mask"] if observations_in_loss else action_tokens(_rollout(batch))
        size = mask.shape[0]
        advantage = advantages(EstimatorSpec(returns=returns, gamma=gamma, baseline=baseline), batch["rewards"], mask,
                               torch.zeros(size, dtype=torch.long))
        (gradient,) = torch.autograd.grad(-policy_gradient_loss(logprobs, advantage, mask), theta)
        return gradient

    return estimator


def test_the_mdp_has_observations_of_different_lengths_between_actions():
    trajectories = MDP.trajectories()
    assert len(trajectories) == 13
    assert abs(sum(float(torch.exp(trajectory_logprob(THETA, MDP, t, STATES))) for t in trajectories) - 1) < 1e-12
    lengths = {t.is_action.count(False) for t in trajectories}
    assert lengths == {0, 1, 2}  # no observation (EOS first), a one-token and a two-token observation


@pytest.mark.parametrize("returns,baseline,batch_size", [
    ("total", "none", 1), ("reward_to_go", "none", 1), ("reward_to_go", "leave_one_out", 3),
])
def test_action_masked_estimators_are_unbiased_against_the_exact_gradient(returns, baseline, batch_size):
    mean, _ = estimator_moments(THETA, MDP, make_estimator(returns, baseline), batch_size)
    assert torch.allclose(mean, exact_gradient(THETA, MDP), atol=1e-10)


def test_observation_tokens_in_the_loss_bias_the_gradient():
    """The mistake this catches: a loss over completion_mask (observations included) adds
    grad log pi(o | s) * G for tokens the environment chose, which does not vanish in expectation."""
    exact = exact_gradient(THETA, MDP)
    mean, _ = estimator_moments(THETA, MDP, make_estimator(observations_in_loss=True), 1)
    assert (mean - exact).norm() > 0.1 * exact.norm()
    # the bias sits exactly in the rows of theta where observations are emitted
    observation_rows = {STATES[t.tokens[:i]] for t in MDP.trajectories() for i, a in enumerate(t.is_action) if not a}
    action_rows = {STATES[t.tokens[:i]] for t in MDP.trajectories() for i, a in enumerate(t.is_action) if a}
    only_observations = sorted(observation_rows - action_rows)
    assert only_observations and torch.allclose(exact[only_observations], torch.zeros_like(exact[only_observations]))
    assert mean[only_observations].abs().max() > 1e-3


def test_the_discount_counts_actions_not_observation_tokens():
    """J = E[sum_k gamma^k r_k] over action steps: the discounted return G_0 weights every action unbiasedly
    because discounted_returns skips the observation tokens (discounting them too would shrink later rewards
    by gamma per observation token, differently in episodes whose observations differ in length)."""
    mean, _ = estimator_moments(THETA, MDP, make_estimator("total", gamma=0.7), 1)
    assert torch.allclose(mean, exact_gradient(THETA, MDP, gamma=0.7), atol=1e-10)


def test_terminal_rewards_with_step_rewards_rebuild_the_per_turn_rewards():
    """How the trainer places rewards: the environment's per-turn rewards where they were earned, the rest of the
    score on the last action (the total return is the score)."""
    batch = batch_tensors(MDP.trajectories(), MDP)
    mask = action_tokens(_rollout(batch))
    last = torch.where(mask > 0, torch.arange(mask.shape[1]), -1).max(-1).values
    step_rewards = batch["rewards"].clone()
    step_rewards[torch.arange(len(last)), last] = 0.0  # what the environment paid along the way
    scores = batch["rewards"].sum(-1)  # the episode's return
    rebuilt = terminal_rewards(scores, mask, step_rewards)
    assert torch.allclose(rebuilt, batch["rewards"], atol=1e-12)


def test_the_kl_over_action_tokens_is_the_episode_kl_and_over_all_tokens_it_is_not():
    reference = 2.0 * THETA.flip(0).cos()
    expected = exact_kl(THETA, reference, MDP)
    trajectories = MDP.trajectories()
    probabilities = torch.stack([torch.exp(trajectory_logprob(THETA, MDP, t, STATES)) for t in trajectories])
    batch = batch_tensors(trajectories, MDP)
    per_token = kl_estimate(policy_logprobs(THETA, batch["states"], batch["tokens"]),
                            policy_logprobs(reference, batch["states"], batch["tokens"]), "k1")
    on_actions = float((probabilities * (per_token * action_tokens(_rollout(batch))).sum(-1)).sum())
    on_all = float((probabilities * (per_token * batch["completion_mask"]).sum(-1)).sum())
    assert abs(on_actions - expected) < 1e-10
    assert abs(on_all - expected) > 0.01
