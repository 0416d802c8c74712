"""Loss aggregation, the REINFORCE loss's gradient, KL estimators and clipped ratios against their formulas."""

import math

import pytest
import torch

from rlhf_pg.core.advantages import discounted_returns
from rlhf_pg.core.losses import (
    aggregate, bradley_terry_loss, clipped_policy_loss, kl_estimate, kl_penalized_rewards, policy_gradient_loss,
)

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


def test_aggregations_match_hand_computation():
    assert aggregate(VALUES, MASK, "seq-mean-token-sum").item() == pytest.approx((3 + 15) / 2)
    assert aggregate(VALUES, MASK, "token-mean").item() == pytest.approx(18 / 5)
    assert aggregate(VALUES, MASK, "seq-mean-token-mean").item() == pytest.approx((1.5 + 5) / 2)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate(VALUES, MASK, "sum")


@pytest.mark.parametrize("aggregation", ["seq-mean-token-sum", "token-mean", "seq-mean-token-mean"])
def test_micro_batch_losses_with_global_counts_add_up_to_the_full_batch_loss(aggregation):
    torch.manual_seed(0)
    values = torch.randn(6, 5)
    mask = (torch.rand(6, 5) > 0.3).float()
    mask[:, 0] = 1
    full = aggregate(values, mask, aggregation)
    parts = sum(
        aggregate(values[i : i + 2], mask[i : i + 2], aggregation, num_sequences=6, num_tokens=mask.sum())
        for i in range(0, 6, 2)
    )
    assert torch.allclose(full, parts)


def test_policy_gradient_loss_gradient_is_minus_mean_of_advantage_weighted_scores():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, -0.1]], requires_grad=True)
    advantages = torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]], requires_grad=True)
    loss = policy_gradient_loss(logprobs, advantages, MASK)
    loss.backward()
    # d loss / d logprob[b, t] = -A[b, t] * mask[b, t] / B
    assert torch.allclose(logprobs.grad, -advantages.detach() * MASK / 2)
    assert advantages.grad is None or torch.all(advantages.grad == 0)  # advantages are constants
    assert loss.item() == pytest.approx(-((-1 - 2) * 2 + (-0.3 - 0.2 - 0.1) * -1) / 2)


def test_kl_estimators_match_their_formulas():
    logp = torch.tensor([-0.5, -2.0])
    ref = torch.tensor([-1.0, -1.5])
    log_ratio = logp - ref
    assert torch.allclose(kl_estimate(logp, ref, "k1"), log_ratio)
    assert torch.allclose(kl_estimate(logp, ref, "k2"), 0.5 * log_ratio**2)
    assert torch.allclose(kl_estimate(logp, ref, "k3"), torch.exp(-log_ratio) - 1 + log_ratio)
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_for_kl_and_k3_has_lower_variance():
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact_kl = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 400_000, replacement=True)
    logp, logq = p.log()[samples], q.log()[samples]
    k1 = kl_estimate(logp, logq, "k1")
    k3 = kl_estimate(logp, logq, "k3")
    for estimate in (k1, k3):
        standard_error = float(estimate.std()) / math.sqrt(len(samples))
        assert abs(float(estimate.mean()) - exact_kl) < 4 * standard_error
    assert float(k3.var()) < float(k1.var())
    assert float(k3.min()) >= 0


def test_clipped_loss_at_ratio_one_has_the_reinforce_gradient():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, requires_grad=True)
    logprobs = torch.nn.functional.logsigmoid(logits)
    advantages = torch.randn(3, 4)
    mask = torch.ones(3, 4)
    (reinforce,) = torch.autograd.grad(policy_gradient_loss(logprobs, advantages, mask), logits, retain_graph=True)
    loss, stats = clipped_policy_loss(logprobs, logprobs.detach(), advantages, mask, clip_eps=0.2)
    (clipped,) = torch.autograd.grad(loss, logits)
    assert torch.allclose(reinforce, clipped, atol=1e-7)
    assert stats.clip_fraction == 0 and stats.ratio_mean == pytest.approx(1.0)


def test_clipping_zeroes_gradients_exactly_where_the_formula_says():
    old = torch.zeros(1, 4)
    # ratios e^0.5 = 1.65 (above 1.2), e^-0.5 = 0.61 (below 0.8), 1.1 (inside), 1.65 with negative advantage
    logprobs = torch.tensor([[0.5, -0.5, math.log(1.1), 0.5]], requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, stats = clipped_policy_loss(logprobs, old, advantages, torch.ones(1, 4), clip_eps=0.2)
    loss.backward()
    grad = logprobs.grad[0]
    # token 0: r > 1+eps with A > 0 -> clipped, grad 0; token 1: r < 1-eps with A < 0 -> clipped, grad 0
    assert grad[0] == 0 and grad[1] == 0
    # token 2: inside the region: d/dlogp of -(r A) = -r A
    assert grad[2].item() == pytest.approx(-1.1 * 1.0)
    # token 3: r > 1+eps but A < 0: the unclipped (pessimistic) term is kept, gradient -r A = +1.65
    assert grad[3].item() == pytest.approx(math.exp(0.5))
    assert stats.clip_fraction == pytest.approx(0.5)


def test_asymmetric_clip_and_sequence_level_ratio():
    old = torch.zeros(1, 2)
    logprobs = torch.tensor([[0.15, 0.1]], requires_grad=True)  # sequence ratio e^0.25 = 1.28
    advantages = torch.ones(1, 2)
    loss, _ = clipped_policy_loss(logprobs, old, advantages, torch.ones(1, 2), clip_eps=0.2, clip_eps_high=0.3,
                                  ratio_level="sequence")
    loss.backward()
    assert torch.all(logprobs.grad != 0)  # 1.28 < 1.3: not clipped with eps_high = 0.3
    logprobs.grad = None
    loss, _ = clipped_policy_loss(logprobs, old, advantages, torch.ones(1, 2), clip_eps=0.2, ratio_level="sequence")
    loss.backward()
    assert torch.all(logprobs.grad == 0)  # 1.28 > 1.2: clipped


def test_bradley_terry_loss_matches_hand_computation():
    chosen = torch.tensor([2.0, 0.0, -1.0], requires_grad=True)
    rejected = torch.tensor([0.0, 0.0, 1.0])
    # gaps 2, 0, -2: -log sigma(2) = log(1 + e^-2) = 0.126928, -log sigma(0) = log 2, -log sigma(-2) = log(1 + e^2)
    expected = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3
    loss = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(0.9823340, rel=1e-6)
    loss.backward()
    # d/dr_c of -log sigma(d) / N = -(1 - sigma(d)) / N
    sigma = [1 / (1 + math.exp(-d)) for d in (2.0, 0.0, -2.0)]
    assert chosen.grad.tolist() == pytest.approx([-(1 - s) / 3 for s in sigma], rel=1e-6)
    # TRL's margin: the gap must exceed m; gaps become 1, 0, -2
    margin = torch.tensor([1.0, 0.0, 0.0])
    expected_margin = (math.log1p(math.exp(-1)) + math.log(2) + math.log1p(math.exp(2))) / 3
    assert bradley_terry_loss(chosen, rejected, margin).item() == pytest.approx(expected_margin, rel=1e-6)
    # a huge wrong-way gap stays finite (logsigmoid, not log(sigmoid))
    assert bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([0.0])).item() == pytest.approx(200.0)


def test_kl_penalty_enters_the_reward_to_go_token_by_token():
    # one completion of 3 tokens scored 1 on its last token, one of 2 tokens scored 0 (third position is padding)
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, 0.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5], [-0.4, -0.1, -9.0]])
    beta = 0.1
    shaped = kl_penalized_rewards(rewards, logprobs, ref_logprobs, mask, beta, "k1")
    # k1 = logp - ref = [0.5, -1, 0], [0.2, -0.2, (pad)]; r' = r - beta * k1
    assert torch.allclose(shaped, torch.tensor([[-0.05, 0.1, 1.0], [-0.02, 0.02, 0.0]]))
    returns = discounted_returns(shaped, mask, gamma=1.0)
    # G_t = sum over t' >= t of r'_t': every action pays for its own and all later divergences
    assert torch.allclose(returns, torch.tensor([[1.05, 1.1, 1.0], [0.0, 0.02, 0.0]]), atol=1e-6)
    assert torch.allclose(returns[:, 0], torch.tensor([1.0, 0.0]) - beta * ((logprobs - ref_logprobs) * mask).sum(-1))
    # k3 penalty: (e^-l - 1) + l per token, l = logp - ref
    shaped_k3 = kl_penalized_rewards(rewards, logprobs, ref_logprobs, mask, beta, "k3")
    l = 0.5
    assert shaped_k3[0, 0].item() == pytest.approx(-beta * (math.exp(-l) - 1 + l))
    assert shaped_k3[1, 2].item() == 0.0  # padding never carries a penalty


def test_adaptive_kl_controller_moves_beta_toward_the_target():
    from rlhf_pg.core.kl_control import KLController

    controller = KLController(0.1, target=1.0, horizon=100)
    # KL three times the target: the error is clipped at +0.2, beta grows by 0.2 * n / horizon
    assert controller.update(3.0, num_samples=50) == pytest.approx(0.1 * 1.1)
    assert controller.update(0.5, num_samples=50) == pytest.approx(0.1 * 1.1 * 0.9)  # error -0.5 clipped to -0.2
    assert controller.update(1.0, num_samples=50) == pytest.approx(0.1 * 1.1 * 0.9)  # on target: unchanged
    # closed loop on a policy whose KL falls as beta grows (KL = 0.3 / beta): beta settles where KL = target
    controller = KLController(0.02, target=1.0, horizon=1000)
    for _ in range(2000):
        controller.update(0.3 / controller.coef, num_samples=128)
    assert controller.coef == pytest.approx(0.3, rel=0.05)
    fixed = KLController(0.05)
    assert fixed.update(10.0, 128) == 0.05
