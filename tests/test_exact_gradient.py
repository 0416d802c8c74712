"""The estimators are unbiased where theory says so, checked against the exact gradient of J(theta).

On a small MDP every trajectory is enumerated, so J(theta), its gradient, and the exact mean and
variance of each estimator over all batches of B i.i.d. trajectories are computed without sampling.
The estimators are the library's own (``core.estimator.advantages`` + ``policy_gradient_loss``).
"""

import pytest
import torch

from rlhf_pg.core.estimator import EstimatorSpec, advantages
from rlhf_pg.core.losses import policy_gradient_loss
from rlhf_pg.gym.tabular import default_mdp, estimator_moments, exact_gradient, policy_logprobs

THETA = torch.tensor([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]], dtype=torch.float64)


def make_estimator(returns_kind: str, baseline: str, gamma: float = 1.0, groups_of: int | None = None):
    def estimator(theta, batch):
        theta = theta.detach().clone().requires_grad_(True)
        logprobs = policy_logprobs(theta, batch["states"], batch["actions"])
        rewards, mask = batch["rewards"], batch["mask"]
        size = rewards.shape[0]
        group_ids = torch.arange(size) // (groups_of or size)
        # the library's one composition, as the trainer, the gym track and the variance lab call it
        advantage = advantages(EstimatorSpec(returns=returns_kind, gamma=gamma, baseline=baseline), rewards, mask, group_ids)
        # J's gradient estimate is minus the loss gradient
        (gradient,) = torch.autograd.grad(-policy_gradient_loss(logprobs, advantage, mask), theta)
        return gradient

    return estimator


@pytest.mark.parametrize(
    "returns_kind,baseline,groups_of",
    [("total", "none", None), ("reward_to_go", "none", None), ("reward_to_go", "leave_one_out", None),
     ("reward_to_go", "leave_one_out", 2)],
)
def test_unbiased_estimators_match_the_exact_gradient(returns_kind, baseline, groups_of):
    mdp = default_mdp()
    batch_size = 4 if groups_of == 2 else 3
    mean, _ = estimator_moments(THETA, mdp, make_estimator(returns_kind, baseline, groups_of=groups_of), batch_size)
    assert torch.allclose(mean, exact_gradient(THETA, mdp), atol=1e-10)


def test_discounted_reward_to_go_is_unbiased_for_the_discounted_objective():
    mdp = default_mdp()
    mean, _ = estimator_moments(THETA, mdp, make_estimator("total", "none", gamma=0.7), 1)
    assert torch.allclose(mean, exact_gradient(THETA, mdp, gamma=0.7), atol=1e-10)


@pytest.mark.parametrize("baseline,batch_size,groups_of,shrink", [
    ("batch_mean", 3, None, 2 / 3),   # the own sample in the mean: E = (1 - 1/B) grad J
    ("group_mean", 4, 2, 1 / 2),      # E = (1 - 1/K) grad J with K completions per group
])
def test_mean_baselines_that_include_the_sample_shrink_the_gradient_by_exactly_1_minus_1_over_n(
    baseline, batch_size, groups_of, shrink
):
    mdp = default_mdp()
    mean, _ = estimator_moments(THETA, mdp, make_estimator("total", baseline, groups_of=groups_of), batch_size)
    assert torch.allclose(mean, shrink * exact_gradient(THETA, mdp), atol=1e-10)


def test_reward_to_go_and_baselines_reduce_variance():
    """Exact total variances at B = 4. (With B = 2 the leave-one-out baseline is a single other sample
    and *adds* variance here; the variance lab shows such trade-offs.)"""
    mdp = default_mdp()
    variances = {
        name: estimator_moments(THETA, mdp, make_estimator(*spec), 4)[1].item()
        for name, spec in {
            "total": ("total", "none"),
            "reward_to_go": ("reward_to_go", "none"),
            "reward_to_go+loo": ("reward_to_go", "leave_one_out"),
            "reward_to_go+timestep_mean": ("reward_to_go", "timestep_mean"),
        }.items()
    }
    assert variances["reward_to_go"] < 0.8 * variances["total"]
    assert variances["reward_to_go+loo"] < 0.9 * variances["reward_to_go"]
    assert variances["reward_to_go+timestep_mean"] < 0.5 * variances["reward_to_go"]
