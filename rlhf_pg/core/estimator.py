"""The one estimator composition, shared by the LM trainer, the gym track, the variance lab and the tests.

    G_t  = sum_{t' >= t} gamma^(t'-t) r_t'          (returns = "reward_to_go"; "total": G_0 at every t)
    A_t  = G_t - b_t                                (b: a registry baseline, a learned V(s_t), or ReMax's
                                                     reward of the greedy completion)
    A_t <- A_t / (std_{group or batch} G_0 + eps)   (optional scale: GRPO's std, TRL's scale_rewards)
    A_t <- (A_t - mean A) / std A                   (optional whitening over the batch's real tokens)
    filtered_bc instead: A_t = 1[G_0 >= threshold]  (maximum likelihood on the good samples)

The gradient estimate is then (1/N) sum_i sum_t grad log pi(a_it | s_it) A_it (``losses``).

This module also owns the *name tables* (returns, baselines, scales, aggregations, KL estimators, weightings,
importance weightings, ratio levels): the recipe schemas build their allowed values from them, so a name is typed once. Pure tensors: no
model, device or process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .advantages import BASELINES, SCALES, apply_baseline, discounted_returns, filtered_weights, learned_baseline
from .advantages import remax_baseline, scale_advantages, total_returns, whiten_advantages
from .losses import AGGREGATIONS, IMPORTANCE, KL_ESTIMATORS, RATIO_LEVELS

Tensor = torch.Tensor

# --- the name tables (recipes validate against these) -----------------------------------------------------
RETURNS = ("reward_to_go", "total")
BASELINE_NAMES = tuple(BASELINES)  # none, batch_mean, group_mean, leave_one_out, timestep_mean
LEARNED_BASELINE = "value"  # A = G - V(s): needs a value function (the gym track has one)
REMAX_BASELINE = "remax"  # A = G - R(greedy completion): needs one greedy rollout per prompt (the LM trainer)
EXTRA_INPUTS = {LEARNED_BASELINE: "values", REMAX_BASELINE: "greedy_rewards"}  # baseline -> argument it needs
SCALE_NAMES = SCALES  # none, group, batch
WEIGHTINGS = ("reinforce", "filtered_bc")  # A = G - b, or A = 1[G_0 >= threshold]
AGGREGATION_NAMES = AGGREGATIONS
KL_ESTIMATOR_NAMES = tuple(KL_ESTIMATORS)
IMPORTANCE_NAMES = IMPORTANCE  # clip (PPO surrogate), truncate (CISPO)
RATIO_LEVEL_NAMES = RATIO_LEVELS  # token, sequence, sequence_mean (GSPO)


@dataclass(frozen=True)
class EstimatorSpec:
    """Which estimator: returns, discount, baseline, scale, whitening, and the trajectory weighting."""

    returns: str = "reward_to_go"  # one of RETURNS
    gamma: float = 1.0
    baseline: str = "none"  # one of BASELINE_NAMES, LEARNED_BASELINE or REMAX_BASELINE
    whiten: bool = False
    weighting: str = "reinforce"  # one of WEIGHTINGS
    threshold: float = 1.0  # filtered_bc: keep a trajectory when G_0 >= threshold
    scale: str = "none"  # one of SCALE_NAMES: divide A by the group's (or batch's) std of G_0 (GRPO)
    scale_eps: float = 1e-6  # A / (std + scale_eps)

    # the recipes' ``algorithm.<key>`` -> the field it sets: the one place recipe keys become an estimator
    RECIPE_KEYS = {"gamma": "gamma", "baseline": "baseline", "whiten": "whiten", "estimator": "weighting",
                   "reward_threshold": "threshold", "scale": "scale", "scale_eps": "scale_eps"}

    @classmethod
    def from_keys(cls, keys: Mapping[str, Any]) -> "EstimatorSpec":
        """The estimator an ``algorithm`` section (LM or gym recipe, or a preset's values) selects, by the recipes'
        key names; keys it does not have keep the defaults above."""
        return cls(**{name: keys[key] for key, name in cls.RECIPE_KEYS.items() if key in keys})


def returns_of(spec: EstimatorSpec, rewards: Tensor, mask: Tensor) -> Tensor:
    """``G`` ``[B, T]``: reward-to-go (or the total return at every step) with the spec's discount."""
    if spec.returns not in RETURNS:
        raise ValueError(f"unknown returns {spec.returns!r}; choose one of {list(RETURNS)}")
    return (total_returns if spec.returns == "total" else discounted_returns)(rewards, mask, spec.gamma)


def advantages(spec: EstimatorSpec, rewards: Tensor, mask: Tensor, group_ids: Tensor | None = None,
               values: Tensor | None = None, greedy_rewards: Tensor | None = None) -> Tensor:
    """``A`` ``[B, T]`` (0 where ``mask`` is 0) of estimator ``spec``: returns -> baseline -> scale -> whiten.

    ``rewards``, ``mask``: ``[B, T]``; ``group_ids``: ``[B]``, which prompt (or start state) each row came
    from (None: the batch is one group); ``values``: ``[B, T]`` V(s_t), only for ``baseline = "value"``;
    ``greedy_rewards``: ``[B]``, the reward of the greedy completion of each row's prompt, only for
    ``baseline = "remax"``.
    """
    # rewards, mask: [B, T]
    returns = returns_of(spec, rewards, mask)
    if spec.weighting == "filtered_bc":
        return filtered_weights(returns, mask, spec.threshold)
    if spec.weighting != "reinforce":
        raise ValueError(f"unknown weighting {spec.weighting!r}; choose one of {list(WEIGHTINGS)}")
    if group_ids is None:  # no groups given: the batch is one group
        group_ids = torch.zeros(rewards.shape[0], dtype=torch.long, device=rewards.device)
    if spec.baseline == LEARNED_BASELINE:
        if values is None:
            raise ValueError("baseline 'value' needs values V(s_t) of the same shape as the rewards")
        advantage = learned_baseline(returns, values, mask)
    elif spec.baseline == REMAX_BASELINE:
        if greedy_rewards is None:
            raise ValueError("baseline 'remax' needs greedy_rewards [B]: the reward of one greedy (argmax) "
                             "completion of each row's prompt")
        advantage = remax_baseline(returns, greedy_rewards, mask)
    else:
        advantage = apply_baseline(returns, mask, spec.baseline, group_ids)
    if spec.scale != "none":
        advantage = scale_advantages(advantage, returns, mask, spec.scale, group_ids, spec.scale_eps)
    if spec.whiten:
        advantage = whiten_advantages(advantage, mask)
    return advantage


__all__ = ["EstimatorSpec", "advantages", "returns_of", "RETURNS", "BASELINE_NAMES",
           "LEARNED_BASELINE", "REMAX_BASELINE", "EXTRA_INPUTS", "SCALE_NAMES", "WEIGHTINGS", "AGGREGATION_NAMES",
           "KL_ESTIMATOR_NAMES", "IMPORTANCE_NAMES", "RATIO_LEVEL_NAMES"]
