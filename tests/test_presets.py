"""The presets' primitives against hand computation, and the preset table, resolution and compatibility rules."""

import math
import re

import pytest
import torch

from rlhf_pg.core.advantages import (
    apply_baseline, degenerate_groups, discounted_returns, overlong_penalty, remax_baseline, scale_advantages,
    whiten_advantages,
)
from rlhf_pg.core.estimator import (
    AGGREGATION_NAMES, BASELINE_NAMES, IMPORTANCE_NAMES, KL_ESTIMATOR_NAMES, RATIO_LEVEL_NAMES, REMAX_BASELINE,
    SCALE_NAMES, EstimatorSpec, advantages,
)
from rlhf_pg.core.losses import (
    aggregate, clipped_policy_loss, importance_ratios, off_policy_loss, policy_gradient_loss, truncated_policy_loss,
)
from rlhf_pg.core.mdp import terminal_rewards
from rlhf_pg.core.presets import ESTIMATOR_KEYS, INCOMPATIBLE, PRESETS, check_compatibility, resolve_preset

# eight completions of one token each: group 0 has contrast, group 1 has three equal rewards 0.1, group 2 is alone
SCORES = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 5.0], dtype=torch.float64)
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
ONE_TOKEN = torch.ones(8, 1, dtype=torch.float64)


# --- scale: GRPO's std ---------------------------------------------------------------------------


def test_group_scale_divides_the_group_centred_reward_by_the_groups_unbiased_std():
    centred = apply_baseline(SCORES[:, None], ONE_TOKEN, "group_mean", GROUPS)
    scaled = scale_advantages(centred, SCORES[:, None], ONE_TOKEN, "group", GROUPS, eps=1e-6)
    std = math.sqrt(4 * 0.5**2 / 3)  # group 0: mean 0.5, unbiased std over 4 values
    assert scaled[:4, 0].tolist() == pytest.approx([r / (std + 1e-6) for r in (0.5, -0.5, -0.5, 0.5)], rel=1e-12)


def test_a_zero_variance_group_keeps_advantages_exactly_zero_and_never_nan():
    # 0.1 + 0.1 + 0.1 = 0.30000000000000004: a naive mean is not 0.1, the shifted one is
    assert (SCORES[4:7].sum() / 3).item() != 0.1
    for baseline in ("group_mean", "leave_one_out"):
        groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2])  # leave_one_out needs two per group
        scores = torch.cat([SCORES, torch.tensor([7.0], dtype=torch.float64)])
        mask = torch.ones(9, 1, dtype=torch.float64)
        centred = apply_baseline(scores[:, None], mask, baseline, groups)
        assert torch.all(centred[4:7] == 0)
        for kind in ("group", "batch"):
            scaled = scale_advantages(centred, scores[:, None], mask, kind, groups, eps=1e-12)
            assert torch.all(torch.isfinite(scaled)) and torch.all(scaled[4:7] == 0)
    # a group of one: std 0, advantage 0 (group_mean subtracts its own reward)
    spec = EstimatorSpec(baseline="group_mean", scale="group")
    assert advantages(spec, terminal_rewards(SCORES, ONE_TOKEN), ONE_TOKEN, GROUPS)[7, 0] == 0


def test_zero_spread_rows_are_zeroed_even_when_per_token_advantages_are_not():
    """Reward-to-go with per-step rewards: equal totals (sigma = 0) but G_t - mean G_0 != 0 at t = 1."""
    rewards = torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)  # both total 2
    mask = torch.ones(2, 2, dtype=torch.float64)
    returns = discounted_returns(rewards, mask)
    centred = apply_baseline(returns, mask, "group_mean", torch.tensor([0, 0]))
    assert centred[0, 1] != 0
    assert torch.all(scale_advantages(centred, returns, mask, "group", torch.tensor([0, 0])) == 0)


def test_batch_scale_uses_the_std_of_all_rewards_and_none_leaves_advantages_alone():
    centred = apply_baseline(SCORES[:, None], ONE_TOKEN, "group_mean", GROUPS)
    scaled = scale_advantages(centred, SCORES[:, None], ONE_TOKEN, "batch", GROUPS, eps=0.0)
    assert torch.allclose(scaled, centred / SCORES.std())
    assert torch.equal(scale_advantages(centred, SCORES[:, None], ONE_TOKEN, "none"), centred)
    with pytest.raises(ValueError, match="unknown scale 'std'"):
        scale_advantages(centred, SCORES[:, None], ONE_TOKEN, "std")


def test_composition_order_is_returns_then_baseline_then_scale_then_whiten():
    torch.manual_seed(0)
    rewards = torch.randn(6, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]],
                        dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    spec = EstimatorSpec(gamma=0.9, baseline="leave_one_out", scale="group", whiten=True)
    returns = discounted_returns(rewards, mask, 0.9)
    by_hand = whiten_advantages(scale_advantages(apply_baseline(returns, mask, "leave_one_out", groups), returns, mask,
                                                 "group", groups, spec.scale_eps), mask)
    assert torch.allclose(advantages(spec, rewards, mask, groups), by_hand, atol=1e-12)


# --- ReMax -----------------------------------------------------------------------------------------


def test_remax_subtracts_the_greedy_reward_of_each_rows_prompt():
    returns = torch.tensor([[3.0, 2.0], [1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert torch.equal(remax_baseline(returns, torch.tensor([1.0, 0.5]), mask), torch.tensor([[2.0, 1.0], [0.5, 0.0]]))
    spec = EstimatorSpec(baseline=REMAX_BASELINE)
    rewards = terminal_rewards(torch.tensor([1.0, 0.0]), mask)
    assert torch.equal(advantages(spec, rewards, mask, greedy_rewards=torch.tensor([0.25, 0.25])),
                       torch.tensor([[0.75, 0.75], [-0.25, 0.0]]))
    with pytest.raises(ValueError, match="needs greedy_rewards"):
        advantages(spec, rewards, mask)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        remax_baseline(returns, torch.tensor([1.0]), mask)


# --- aggregations ----------------------------------------------------------------------------------

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


def test_token_sum_and_dr_grpo_norm_aggregations_match_hand_computation():
    assert aggregate(VALUES, MASK, "token-sum").item() == pytest.approx(3 + 15)
    assert aggregate(VALUES, MASK, "seq-mean-token-sum-norm", norm_length=4).item() == pytest.approx(18 / (2 * 4))
    with pytest.raises(ValueError, match="pass norm_length"):
        aggregate(VALUES, MASK, "seq-mean-token-sum-norm")


@pytest.mark.parametrize("aggregation", list(AGGREGATION_NAMES))
def test_every_aggregation_adds_up_exactly_over_micro_batches_with_the_global_counts(aggregation):
    torch.manual_seed(0)
    values = torch.randn(6, 5, dtype=torch.float64)
    mask = (torch.rand(6, 5) > 0.3).double()
    mask[:, 0] = 1
    mask[1, 3:] = 0  # row 1 is short, so a micro-batch of it alone can be trimmed to 3 columns
    full = aggregate(values, mask, aggregation, norm_length=5)

    def part(rows):  # a micro-batch cut to its own longest row: only the constants keep it exact
        width = int(mask[rows].sum(0).nonzero().max()) + 1
        return aggregate(values[rows, :width], mask[rows, :width], aggregation, num_sequences=6,
                         num_tokens=mask.sum(), norm_length=5)

    for split in (([0, 1], [2, 3], [4, 5]), ([0], [1], [2, 3, 4, 5])):
        assert torch.allclose(full, sum(part(rows) for rows in split), atol=1e-12)


# --- DAPO: dynamic sampling and overlong ------------------------------------------------------------


def test_degenerate_groups_are_the_rows_whose_group_has_one_reward_value():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 3.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    assert degenerate_groups(scores, groups).tolist() == [True, True, False, False, True, True, True]
    assert degenerate_groups(SCORES, GROUPS).tolist() == [False] * 4 + [True] * 4
    with pytest.raises(ValueError, match="must both be"):
        degenerate_groups(scores[:, None], groups)


def test_overlong_penalty_matches_dapo_with_its_published_lengths():
    lengths = torch.tensor([100, 16384, 16385, 18432, 20480, 20481])
    penalty = overlong_penalty(lengths, max_length=20480, buffer_length=4096)
    assert penalty.tolist() == pytest.approx([0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.0])
    assert overlong_penalty(lengths, 20480, 4096, coef=0.5).tolist() == pytest.approx([0, 0, -0.5 / 4096, -0.25, -0.5, -0.5])
    assert torch.all(overlong_penalty(lengths, 20480, 0) == 0)
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(lengths, 8, 9)


# --- importance weights: GSPO's sequence ratio, CISPO's truncation ----------------------------------

OLD = torch.zeros(2, 3)
SEQ_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
OUTCOME_ADV = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]) * SEQ_MASK


def _gspo_sequence_objective(logprobs, old, advantages, mask, eps_low, eps_high):
    """GSPO as the paper writes it: (1/G) sum_i min(s_i A_i, clip(s_i, 1-eps_low, 1+eps_high) A_i)."""
    lengths = mask.sum(-1)
    ratio = torch.exp(((logprobs - old) * mask).sum(-1) / lengths)  # s_i, [G]
    adv = advantages[:, 0]
    return torch.minimum(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv).mean()


@pytest.mark.parametrize("eps_high", [0.3, 0.1])  # sequence 0's ratio e^0.2 = 1.22: inside, then clipped
def test_sequence_mean_ratio_is_gspo_value_and_gradient_for_outcome_advantages(eps_high):
    logprobs = torch.tensor([[0.1, 0.3, 5.0], [0.0, -0.2, 0.2]], requires_grad=True)  # 5.0 sits on padding
    ratio = importance_ratios(logprobs, OLD, SEQ_MASK, "sequence_mean")
    assert ratio[0, :2].tolist() == pytest.approx([math.exp(0.2)] * 2) and ratio[1].tolist() == pytest.approx([1.0] * 3)
    loss, stats = clipped_policy_loss(logprobs, OLD, OUTCOME_ADV, SEQ_MASK, 0.2, eps_high, "sequence_mean",
                                      "seq-mean-token-mean")
    (grad,) = torch.autograd.grad(loss, logprobs)
    reference = -_gspo_sequence_objective(logprobs, OLD, OUTCOME_ADV, SEQ_MASK, 0.2, eps_high)
    (reference_grad,) = torch.autograd.grad(reference, logprobs)
    assert loss.item() == pytest.approx(reference.item())
    assert torch.allclose(grad * SEQ_MASK, reference_grad * SEQ_MASK)
    if eps_high == 0.3:  # d/dlogp_it = -(1/G) s_i A_i / |y_i|
        assert grad[0, :2].tolist() == pytest.approx([-0.5 * math.exp(0.2) / 2] * 2)
        assert grad[1].tolist() == pytest.approx([0.5 / 3] * 3)
    else:  # the whole of sequence 0 is clipped, sequence 1 untouched
        assert torch.all(grad[0] == 0) and grad[1].tolist() == pytest.approx([0.5 / 3] * 3)
        assert stats.clip_fraction == pytest.approx(2 / 5)


def test_the_old_sequence_ratio_is_the_product_not_gspos_geometric_mean():
    logprobs = torch.tensor([[0.1, 0.3, 0.0], [0.0, -0.2, 0.2]])
    assert importance_ratios(logprobs, OLD, SEQ_MASK, "sequence")[0, 0].item() == pytest.approx(math.exp(0.4))
    assert importance_ratios(logprobs, OLD, SEQ_MASK, "sequence_mean")[0, 0].item() == pytest.approx(math.exp(0.2))
    with pytest.raises(ValueError, match="ratio_level must be one of"):
        importance_ratios(logprobs, OLD, SEQ_MASK, "seq")


def test_truncated_loss_weights_every_token_by_its_truncated_ratio_and_is_reinforce_on_policy():
    logprobs = torch.tensor([[0.5, -0.5, math.log(1.1), 0.5]], requires_grad=True)  # ratios 1.65, 0.61, 1.1, 1.65
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, stats = truncated_policy_loss(logprobs, torch.zeros(1, 4), advantages, mask, clip_eps_high=0.2,
                                        aggregation="seq-mean-token-sum")
    (grad,) = torch.autograd.grad(loss, logprobs)
    # d/dlogp of -w A logp = -w A, with w = min(r, 1.2) held constant: no token is left without gradient
    assert grad[0].tolist() == pytest.approx([-1.2, math.exp(-0.5), -1.1, 1.2])
    assert stats.clip_fraction == pytest.approx(0.5)
    lower, _ = truncated_policy_loss(logprobs, torch.zeros(1, 4), advantages, mask, 0.2, clip_eps_low=0.2,
                                     aggregation="seq-mean-token-sum")
    assert torch.autograd.grad(lower, logprobs)[0][0, 1].item() == pytest.approx(0.8)
    # on-policy: the REINFORCE gradient of the same aggregation
    on_policy = torch.tensor([[-1.0, -2.0, -0.5, -0.3]], requires_grad=True)
    truncated, _ = truncated_policy_loss(on_policy, on_policy.detach(), advantages, mask, 0.2)
    reinforce = policy_gradient_loss(on_policy, advantages, mask, "token-mean")
    assert torch.allclose(torch.autograd.grad(truncated, on_policy)[0], torch.autograd.grad(reinforce, on_policy)[0])


def test_off_policy_loss_dispatches_by_name_and_refuses_truncated_sequence_ratios():
    logprobs = torch.tensor([[0.1, 0.3, 0.0], [0.0, -0.2, 0.2]])
    clip, _ = off_policy_loss("clip", logprobs, OLD, OUTCOME_ADV, SEQ_MASK, 0.2, 0.28)
    assert clip == clipped_policy_loss(logprobs, OLD, OUTCOME_ADV, SEQ_MASK, 0.2, 0.28)[0]
    truncate, _ = off_policy_loss("truncate", logprobs, OLD, OUTCOME_ADV, SEQ_MASK, 0.2, 0.28, aggregation="token-mean")
    assert truncate == truncated_policy_loss(logprobs, OLD, OUTCOME_ADV, SEQ_MASK, 0.28)[0]
    with pytest.raises(ValueError, match="needs ratio_level 'token'"):
        off_policy_loss("truncate", logprobs, OLD, OUTCOME_ADV, SEQ_MASK, ratio_level="sequence_mean")
    with pytest.raises(ValueError, match="unknown importance"):
        off_policy_loss("cispo", logprobs, OLD, OUTCOME_ADV, SEQ_MASK)


# --- the presets -----------------------------------------------------------------------------------

ROLLOUT = {"rollout.completions_per_prompt": 4, "rollout.temperature": 1.0, "rollout.max_new_tokens": 8}


def test_the_presets_are_the_named_family_each_fully_setting_the_estimator_keys_with_known_names():
    assert list(PRESETS) == ["reinforce", "rloo", "grpo", "dr_grpo", "reinforce_pp", "remax", "dapo", "cispo", "gspo"]
    for name, preset in PRESETS.items():
        values = preset.values
        assert set(ESTIMATOR_KEYS) <= set(values), name
        assert all(key.startswith("algorithm.") for key in values)
        assert values["algorithm.baseline"] in BASELINE_NAMES + (REMAX_BASELINE,)
        assert values["algorithm.scale"] in SCALE_NAMES
        assert values["algorithm.aggregation"] in AGGREGATION_NAMES
        assert values["algorithm.kl_estimator"] in KL_ESTIMATOR_NAMES and values["algorithm.kl_mode"] in ("reward", "loss")
        assert values["algorithm.importance"] in IMPORTANCE_NAMES
        assert values["algorithm.ratio_level"] in RATIO_LEVEL_NAMES
        assert preset.reference and preset.description
        assert check_compatibility({**values, **ROLLOUT}) == [], name


def test_presets_carry_their_papers_numbers():
    assert (PRESETS["dapo"].values["algorithm.clip_eps"], PRESETS["dapo"].values["algorithm.clip_eps_high"]) == (0.2, 0.28)
    assert (PRESETS["gspo"].values["algorithm.clip_eps"], PRESETS["gspo"].values["algorithm.clip_eps_high"]) == (3e-4, 4e-4)
    grpo = PRESETS["grpo"].values
    assert (grpo["algorithm.kl_mode"], grpo["algorithm.kl_estimator"], grpo["algorithm.kl_coef"]) == ("loss", "k3", 0.04)
    assert PRESETS["dapo"].values["algorithm.overlong_buffer_fraction"] == pytest.approx(4096 / 20480)
    assert PRESETS["reinforce_pp"].values["algorithm.whiten"] and PRESETS["reinforce_pp"].values["algorithm.kl_mode"] == "reward"
    assert PRESETS["cispo"].values["algorithm.importance"] == "truncate"


def test_resolve_preset_lets_explicit_keys_win_and_leaves_the_table_alone():
    values = resolve_preset("grpo", {"algorithm.kl_coef": 0.0, "rollout.temperature": 0.7})
    assert values["algorithm.kl_coef"] == 0.0 and values["rollout.temperature"] == 0.7
    assert values["algorithm.baseline"] == "group_mean"
    assert PRESETS["grpo"].values["algorithm.kl_coef"] == 0.04
    assert resolve_preset("grpo") == dict(PRESETS["grpo"].values)


@pytest.mark.parametrize("typo,suggestion", [("grpo2", "grpo"), ("reinforce++", "reinforce_pp"), ("dr-grpo", "dr_grpo"),
                                             ("CISPO", "cispo")])
def test_unknown_preset_is_an_error_with_a_did_you_mean(typo, suggestion):
    with pytest.raises(ValueError, match=f"unknown preset '{re.escape(typo)}'; did you mean '{suggestion}'"):
        resolve_preset(typo)


@pytest.mark.parametrize("overrides,fragment", [
    ({"algorithm.baseline": "remax", "rollout.temperature": 0.0}, "every sampled completion is the greedy one"),
    ({"algorithm.scale": "group", "algorithm.baseline": "none"}, "only a group-centred baseline"),
    ({"algorithm.scale": "batch", "algorithm.baseline": "none"}, "uncentred returns"),
    ({"algorithm.scale": "group", "rollout.completions_per_prompt": 1}, "a group of one has no spread"),
    ({"algorithm.dynamic_sampling": True, "algorithm.baseline": "batch_mean"}, "dropping them biases"),
    ({"algorithm.importance": "truncate", "algorithm.ratio_level": "sequence_mean"}, "ratio_level 'token'"),
    ({"algorithm.estimator": "filtered_bc", "algorithm.scale": "group"}, "weights are 0/1"),
])
def test_incompatible_combinations_are_reported_with_their_keys(overrides, fragment):
    values = {**resolve_preset("grpo"), **ROLLOUT, **overrides}
    problems = check_compatibility(values)
    assert any(fragment in problem for problem in problems), problems
    first_key = next(iter(overrides))
    assert any(problem.startswith(first_key) or first_key in problem.split(":")[0] for problem in problems)


def test_a_rule_whose_keys_are_absent_does_not_apply_and_every_rule_is_plain_data():
    assert check_compatibility({"algorithm.baseline": "remax"}) == []
    for rule in INCOMPATIBLE:
        assert rule.when and rule.message
        assert all(op in ("==", "!=", "<", "<=", ">", ">=", "in", "not in") for _, op, _ in rule.when)
