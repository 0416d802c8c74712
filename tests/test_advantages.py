"""Hand-computed values for returns, baselines and whitening."""

import pytest
import torch

from rlhf_pg.core.advantages import apply_baseline, discounted_returns, total_returns, whiten_advantages

REWARDS = torch.tensor([[1.0, 0.0, 2.0, 9.0], [0.0, 3.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])


def test_discounted_returns_matches_hand_computation_and_ignores_masked_rewards():
    returns = discounted_returns(REWARDS, MASK, gamma=0.5)
    expected = torch.tensor([
        [1 + 0.5 * 0 + 0.25 * 2, 0 + 0.5 * 2, 2, 0],  # the 9 after the mask ends is ignored
        [0 + 0.5 * 3, 3, 0, 0],
        [1 + 0.5 + 0.25 + 0.125, 1 + 0.5 + 0.25, 1 + 0.5, 1],
    ])
    assert torch.allclose(returns, expected)


def test_undiscounted_returns_are_suffix_sums():
    returns = discounted_returns(REWARDS, MASK, gamma=1.0)
    assert returns[0].tolist() == [3.0, 2.0, 2.0, 0.0]
    assert returns[2].tolist() == [4.0, 3.0, 2.0, 1.0]


def test_total_returns_broadcast_the_whole_return():
    assert total_returns(REWARDS, MASK, 1.0)[0].tolist() == [3.0, 3.0, 3.0, 0.0]


G = torch.tensor([[3.0, 2.0, 2.0, 0.0], [3.0, 3.0, 0.0, 0.0], [4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
M = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
GROUPS = torch.tensor([7, 7, 9, 9])


def test_baseline_none_is_the_return():
    assert torch.equal(apply_baseline(G, M, "none"), G * M)


def test_batch_mean_subtracts_mean_of_total_returns():
    # mean of G[:, 0] = (3 + 3 + 4 + 0) / 4 = 2.5
    advantages = apply_baseline(G, M, "batch_mean")
    assert torch.allclose(advantages, (G - 2.5) * M)


def test_group_mean_uses_only_own_group():
    advantages = apply_baseline(G, M, "group_mean", GROUPS)
    # group 7: mean(3, 3) = 3; group 9: mean(4, 0) = 2
    expected = (G - torch.tensor([[3.0], [3.0], [2.0], [2.0]])) * M
    assert torch.allclose(advantages, expected)


def test_leave_one_out_uses_the_other_members():
    groups = torch.tensor([0, 0, 0, 1])
    returns = torch.tensor([[1.0, 1.0], [2.0, 0.0], [6.0, 6.0], [5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="at least 2 completions"):
        apply_baseline(returns, mask, "leave_one_out", groups)
    groups = torch.tensor([0, 0, 0, 1, 1])
    returns = torch.cat([returns, torch.tensor([[1.0, 1.0]])])
    mask = torch.cat([mask, torch.ones(1, 2)])
    advantages = apply_baseline(returns, mask, "leave_one_out", groups)
    # row 0: others (2, 6) -> 4; row 1: (1, 6) -> 3.5; row 2: (1, 2) -> 1.5; rows 3, 4: each other
    expected = torch.tensor([[1 - 4, 1 - 4], [2 - 3.5, 0], [6 - 1.5, 6 - 1.5], [5 - 1, 5 - 1], [1 - 5, 1 - 5.0]])
    assert torch.allclose(advantages, expected)


def test_timestep_mean_averages_over_sequences_still_running():
    advantages = apply_baseline(G, M, "timestep_mean")
    # t=0: all 4 running: (3+3+4+0)/4 = 2.5; t=1: rows 0,1,2: (2+3+3)/3; t=2: rows 0,2: (2+2)/2; t=3: row 2: 1
    baseline = torch.tensor([2.5, 8 / 3, 2.0, 1.0])
    assert torch.allclose(advantages, (G - baseline) * M)


@pytest.mark.parametrize("kind", ["none", "batch_mean", "group_mean", "leave_one_out", "timestep_mean"])
def test_every_baseline_is_zero_where_masked(kind):
    advantages = apply_baseline(G + 10.0, M, kind, GROUPS)
    assert torch.all(advantages[M == 0] == 0)


def test_unknown_baseline_and_missing_groups_are_clear_errors():
    with pytest.raises(ValueError, match="unknown baseline 'mean'.*choose one of"):
        apply_baseline(G, M, "mean")
    with pytest.raises(ValueError, match="needs group_ids"):
        apply_baseline(G, M, "group_mean")


def test_whitening_gives_zero_mean_unit_std_over_real_tokens():
    advantages = apply_baseline(G, M, "none")
    whitened = whiten_advantages(advantages, M)
    real = whitened[M > 0]
    assert abs(float(real.mean())) < 1e-6
    assert abs(float(real.std()) - 1.0) < 1e-5
    assert torch.all(whitened[M == 0] == 0)
    kept = whiten_advantages(advantages, M, shift_mean=False)[M > 0]
    assert abs(float(kept.mean()) - float(advantages[M > 0].mean())) < 1e-5
