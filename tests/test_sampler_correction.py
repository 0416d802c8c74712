"""The sampler/trainer gap corrected: completions drawn by mu != pi_theta, weighted back to pi_theta's gradient.

Exact, by enumeration (``gym.tabular.estimator_moments`` with ``sampling_theta``): every batch of trajectories
drawn by the sampler mu, with its probability, so the expectation of the corrected estimator is computed without
sampling error and compared with the exact gradient of J at theta.
"""

import pytest
import torch

from rlhf_pg.core.correction import sampler_correction
from rlhf_pg.core.estimator import EstimatorSpec, advantages
from rlhf_pg.core.losses import policy_gradient_loss
from rlhf_pg.gym.tabular import TabularMDP, default_mdp, estimator_moments, exact_gradient, policy_logprobs

THETA = torch.tensor([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]], dtype=torch.float64)  # the trained policy pi
MU = torch.tensor([[-0.1, 0.3], [0.5, -0.2], [0.0, 0.6]], dtype=torch.float64)  # the sampler: another policy


def corrected(mode: str, cap: float = 100.0, level: str = "token", returns: str = "reward_to_go",
              baseline: str = "none", sampler: torch.Tensor = MU):
    def estimator(theta, batch):
        theta = theta.detach().clone().requires_grad_(True)
        logprobs = policy_logprobs(theta, batch["states"], batch["actions"])
        sampler_logprobs = policy_logprobs(sampler, batch["states"], batch["actions"])  # what the sampler recorded
        rewards, mask = batch["rewards"], batch["mask"]
        advantage = advantages(EstimatorSpec(returns=returns, baseline=baseline), rewards, mask,
                               torch.zeros(rewards.shape[0], dtype=torch.long))
        weights, _ = sampler_correction(logprobs, sampler_logprobs, mask, mode, cap, level)
        if mode != "none":
            advantage = advantage * weights  # as policy_update weights each token's advantage
        (gradient,) = torch.autograd.grad(-policy_gradient_loss(logprobs, advantage, mask), theta)
        return gradient

    return estimator


def relative_error(mean, exact):
    return float((mean - exact).norm() / exact.norm())


@pytest.mark.parametrize("mode", ["tis", "mask"])
@pytest.mark.parametrize("returns,baseline,batch_size", [("total", "none", 1), ("reward_to_go", "none", 1),
                                                         ("reward_to_go", "leave_one_out", 2)])
def test_sequence_level_correction_is_exactly_unbiased_under_another_sampler(mode, returns, baseline, batch_size):
    mdp = default_mdp()
    mean, _ = estimator_moments(THETA, mdp, corrected(mode, cap=100.0, level="sequence", returns=returns,
                                                      baseline=baseline), batch_size, sampling_theta=MU)
    assert torch.allclose(mean, exact_gradient(THETA, mdp), atol=1e-10)


def test_without_correction_another_sampler_biases_the_gradient():
    mdp = default_mdp()
    mean, _ = estimator_moments(THETA, mdp, corrected("none"), 1, sampling_theta=MU)
    assert relative_error(mean, exact_gradient(THETA, mdp)) > 0.2
    same, _ = estimator_moments(THETA, mdp, corrected("none", sampler=THETA), 1, sampling_theta=THETA)
    assert torch.allclose(same, exact_gradient(THETA, mdp), atol=1e-10)  # mu = pi: nothing to correct


@pytest.mark.parametrize("mode", ["tis", "mask"])
def test_token_level_correction_is_exact_for_one_step_episodes(mode):
    bandit = TabularMDP(next_state=[[-1, -1]], reward=[[1.0, 3.0]], horizon=1)
    theta, mu = THETA[:1], MU[:1]
    mean, _ = estimator_moments(theta, bandit, corrected(mode, level="token", sampler=mu), 1, sampling_theta=mu)
    assert torch.allclose(mean, exact_gradient(theta, bandit), atol=1e-10)


def test_the_token_level_and_the_cap_bias_are_measured():
    """Token level on multi-step episodes drops the ratios of earlier tokens (biased); a cap below the largest
    ratio truncates (biased, bounded variance). Both biases are real and smaller than not correcting at all."""
    mdp = default_mdp()
    exact = exact_gradient(THETA, mdp)
    error = {name: relative_error(estimator_moments(THETA, mdp, estimator, 1, sampling_theta=MU)[0], exact)
             for name, estimator in {"none": corrected("none"), "token": corrected("tis", 100.0, "token"),
                                     "sequence cap 1.2": corrected("tis", 1.2, "sequence"),
                                     "sequence mask 1.2": corrected("mask", 1.2, "sequence")}.items()}
    assert error["token"] > 1e-3 and error["sequence cap 1.2"] > 1e-3 and error["sequence mask 1.2"] > 1e-3
    assert error["token"] < error["none"] and error["sequence cap 1.2"] < error["none"]
    print({name: round(value, 4) for name, value in error.items()})  # README's figures (pytest -s)


def test_weights_and_gap_statistics_by_hand():
    logprobs = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    sampler = torch.log(torch.tensor([[0.25, 0.4, 0.9]]))  # ratios 2.0, 0.5, 1.0
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    weights, stats = sampler_correction(logprobs, sampler, mask, "tis", cap=1.5)
    assert torch.allclose(weights, torch.tensor([[1.5, 0.5, 0.0]]))
    assert stats.metrics()["rollout/is_clipped_frac"] == pytest.approx(0.5)
    assert stats.metrics()["rollout/logprob_abs_diff"] == pytest.approx(float(torch.log(torch.tensor(2.0))))
    weights, _ = sampler_correction(logprobs, sampler, mask, "mask", cap=1.5)
    assert torch.allclose(weights, torch.tensor([[0.0, 0.0, 0.0]]))  # 2.0 > 1.5 and 0.5 < 1/1.5: both dropped
    weights, _ = sampler_correction(logprobs, sampler, mask, "tis", cap=3.0, level="sequence")
    assert torch.allclose(weights, torch.tensor([[1.0, 1.0, 0.0]]))  # 2.0 * 0.5 on every token of the row
