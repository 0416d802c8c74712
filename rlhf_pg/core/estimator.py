"""The one estimator composition, shared by the LM trainer, the gym track, the variance lab and the tests.

    G_t  = sum_{t' >= t} gamma^(t'-t) r_t'          (returns = "reward_to_go"; "total": G_0 at every t)
    A_t  = G_t - b_t                                (b: a registry baseline, or a learned V(s_t))
    A_t <- (A_t - mean A) / std A                   (optional whitening over the batch's real tokens)
    filtered_bc instead: A_t = 1[G_0 >= threshold]  (maximum likelihood on the good samples)

The gradient estimate is then (1/N) sum_i sum_t grad log pi(a_it | s_it) A_it (``losses``).

This module also owns the *name tables* (returns, baselines, aggregations, KL estimators, weightings):
the recipe schemas build their allowed values from them, so a name is typed once. Pure tensors: no
model, device or process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .advantages import BASELINES, apply_baseline, discounted_returns, filtered_weights, learned_baseline, total_returns
from .advantages import whiten_advantages
from .losses import AGGREGATIONS, KL_ESTIMATORS

Tensor = torch.Tensor

# --- the name tables (recipes validate against these) -----------------------------------------------------
RETURNS = ("reward_to_go", "total")
BASELINE_NAMES = tuple(BASELINES)  # none, batch_mean, group_mean, leave_one_out, timestep_mean
LEARNED_BASELINE = "value"  # A = G - V(s): needs a value function (the gym track has one)
WEIGHTINGS = ("reinforce", "filtered_bc")  # A = G - b, or A = 1[G_0 >= threshold]
AGGREGATION_NAMES = AGGREGATIONS
KL_ESTIMATOR_NAMES = tuple(KL_ESTIMATORS)


@dataclass(frozen=True)
class EstimatorSpec:
    """Which estimator: returns, discount, baseline, whitening, and the trajectory weighting."""

    returns: str = "reward_to_go"  # one of RETURNS
    gamma: float = 1.0
    baseline: str = "none"  # one of BASELINE_NAMES, or LEARNED_BASELINE
    whiten: bool = False
    weighting: str = "reinforce"  # one of WEIGHTINGS
    threshold: float = 1.0  # filtered_bc: keep a trajectory when G_0 >= threshold


def returns_of(spec: EstimatorSpec, rewards: Tensor, mask: Tensor) -> Tensor:
    """``G`` ``[B, T]``: reward-to-go (or the total return at every step) with the spec's discount."""
    if spec.returns not in RETURNS:
        raise ValueError(f"unknown returns {spec.returns!r}; choose one of {list(RETURNS)}")
    return (total_returns if spec.returns == "total" else discounted_returns)(rewards, mask, spec.gamma)


def advantages(spec: EstimatorSpec, rewards: Tensor, mask: Tensor, group_ids: Tensor | None = None,
               values: Tensor | None = None) -> Tensor:
    """``A`` ``[B, T]`` (0 where ``mask`` is 0) of estimator ``spec``.

    ``rewards``, ``mask``: ``[B, T]``; ``group_ids``: ``[B]``, which prompt (or start state) each row came
    from; ``values``: ``[B, T]`` V(s_t), only for ``baseline = "value"``.
    """
    # rewards, mask: [B, T]
    returns = returns_of(spec, rewards, mask)
    if spec.weighting == "filtered_bc":
        return filtered_weights(returns, mask, spec.threshold)
    if spec.weighting != "reinforce":
        raise ValueError(f"unknown weighting {spec.weighting!r}; choose one of {list(WEIGHTINGS)}")
    if spec.baseline == LEARNED_BASELINE:
        if values is None:
            raise ValueError("baseline 'value' needs values V(s_t) of the same shape as the rewards")
        advantage = learned_baseline(returns, values, mask)
    else:
        if group_ids is None:  # no groups given: the batch is one group
            group_ids = torch.zeros(rewards.shape[0], dtype=torch.long, device=rewards.device)
        advantage = apply_baseline(returns, mask, spec.baseline, group_ids)
    if spec.whiten:
        advantage = whiten_advantages(advantage, mask)
    return advantage


__all__ = ["EstimatorSpec", "advantages", "returns_of", "RETURNS", "BASELINE_NAMES", "LEARNED_BASELINE",
           "WEIGHTINGS", "AGGREGATION_NAMES", "KL_ESTIMATOR_NAMES"]
