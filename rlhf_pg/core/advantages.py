"""Returns, baselines and advantages: pure tensor functions shared by the LM track and the gym track.

Notation (trajectory tau = (s_0, a_0, r_0, s_1, ...), one row of a ``[B, T]`` batch per trajectory):

    reward-to-go   G_t = sum_{t' >= t} gamma^(t'-t) r_t'
    advantage      A_t = G_t - b_t           (b_t a baseline that does not depend on a_t)

The REINFORCE gradient is (1/N) sum_i sum_t grad log pi(a_it | s_it) * A_it (see ``losses``).
Every function takes ``mask`` ``[B, T]`` (float 0/1, right-padded: 1 on real steps) and returns 0
where the mask is 0. Nothing here knows about models, devices or processes.
"""

from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Reward-to-go ``G[b, t] = sum_{t' >= t, mask[b, t'] = 1} gamma^(t'-t) rewards[b, t']``.

    ``rewards``, ``mask``: ``[B, T]``. Returns ``[B, T]``, 0 where ``mask`` is 0. Computed by the
    backward recursion ``G_t = r_t + gamma * G_{t+1}``; masked steps contribute no reward.
    """
    # rewards, mask: [B, T]
    masked_rewards = rewards * mask
    returns = torch.zeros_like(masked_rewards)
    running = torch.zeros_like(masked_rewards[:, 0])  # [B]
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = masked_rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def total_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """The whole trajectory's return at every step: ``R[b, t] = G[b, 0]`` where mask is 1, else 0.

    Weighting every action by the total return (instead of the reward-to-go) is the plain
    REINFORCE estimator; it is unbiased too, but every action also carries the noise of the rewards
    that came *before* it.
    """
    return discounted_returns(rewards, mask, gamma)[:, :1] * mask


def _group_sums(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row sum and count of ``values`` over the rows sharing its group id. ``values``: ``[B]``."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    counts = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add_(
        0, inverse, torch.ones_like(values)
    )
    return sums[inverse], counts[inverse]


def _require_groups(group_ids: Tensor | None, kind: str, batch_size: int) -> Tensor:
    if group_ids is None:
        raise ValueError(f"baseline {kind!r} needs group_ids (which prompt each completion came from)")
    if group_ids.shape != (batch_size,):
        raise ValueError(f"group_ids must have shape [{batch_size}], got {list(group_ids.shape)}")
    return group_ids


def _baseline_none(returns: Tensor, mask: Tensor, group_ids: Tensor | None) -> Tensor:
    """b = 0, so A_t = G_t."""
    return torch.zeros_like(returns)


def _baseline_batch_mean(returns: Tensor, mask: Tensor, group_ids: Tensor | None) -> Tensor:
    """b = (1/B) sum_j G_j,0: the batch mean of the total returns (slightly biased, O(1/B))."""
    return returns[:, 0].mean().expand_as(returns)


def _baseline_group_mean(returns: Tensor, mask: Tensor, group_ids: Tensor | None) -> Tensor:
    """b_i = mean of G_j,0 over j in the group of i (GRPO without std; includes i, so O(1/K) biased)."""
    group_ids = _require_groups(group_ids, "group_mean", returns.shape[0])
    sums, counts = _group_sums(returns[:, 0], group_ids)
    return (sums / counts)[:, None].expand_as(returns)


def _baseline_leave_one_out(returns: Tensor, mask: Tensor, group_ids: Tensor | None) -> Tensor:
    """b_i = mean of G_j,0 over the *other* members j != i of i's group (RLOO): unbiased."""
    group_ids = _require_groups(group_ids, "leave_one_out", returns.shape[0])
    total_returns = returns[:, 0]
    sums, counts = _group_sums(total_returns, group_ids)
    if bool((counts < 2).any()):
        lonely = group_ids[counts < 2].unique().tolist()
        raise ValueError(
            f"baseline 'leave_one_out' needs at least 2 completions per prompt, but group(s) {lonely[:5]} "
            "have only one; sample more completions per prompt (rollout.completions_per_prompt >= 2) "
            "or use another baseline"
        )
    return ((sums - total_returns) / (counts - 1))[:, None].expand_as(returns)


def _baseline_timestep_mean(returns: Tensor, mask: Tensor, group_ids: Tensor | None) -> Tensor:
    """b_t = mean of G_j,t over the sequences j still running at step t (mask[j, t] = 1)."""
    running = mask.sum(0).clamp(min=1.0)  # [T]
    return ((returns * mask).sum(0) / running).expand_as(returns)


BASELINES: dict[str, Callable[[Tensor, Tensor, Tensor | None], Tensor]] = {
    "none": _baseline_none,
    "batch_mean": _baseline_batch_mean,
    "group_mean": _baseline_group_mean,
    "leave_one_out": _baseline_leave_one_out,
    "timestep_mean": _baseline_timestep_mean,
}


def apply_baseline(returns: Tensor, mask: Tensor, kind: str, group_ids: Tensor | None = None) -> Tensor:
    """Advantages ``A = G - b`` for the baseline ``kind``; 0 where ``mask`` is 0.

    ``returns``, ``mask``: ``[B, T]``; ``group_ids``: ``[B]`` (which prompt each row came from).
    Kinds: ``none`` (b = 0); ``batch_mean`` (b = mean_j G[j, 0]); ``group_mean`` (b = mean of G[j, 0]
    over j in the same group); ``leave_one_out`` (mean of G[j, 0] over the other members of the group;
    ``ValueError`` if a group has one member); ``timestep_mean`` (b_t = mean of G[j, t] over the j with
    mask[j, t] = 1).
    """
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {sorted(BASELINES)}")
    if returns.shape != mask.shape:
        raise ValueError(f"returns {list(returns.shape)} and mask {list(mask.shape)} must have the same shape")
    baseline = BASELINES[kind](returns, mask, group_ids)
    return (returns - baseline) * mask


def filtered_weights(returns: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """Filtered behaviour cloning (rejection-sampling fine-tuning): ``A_it = 1[G_i,0 >= threshold]``.

    ``returns``, ``mask``: ``[B, T]``. Every action of a trajectory whose total return passes the
    threshold gets weight 1, every other one 0; with these weights the policy-gradient loss is
    maximum likelihood on the kept samples (scaled by the kept fraction). With a 0/1 reward and
    ``threshold = 1`` this is REINFORCE with ``baseline = none``; what a baseline adds is pushing
    *down* the rejected samples.
    """
    kept = (returns[:, :1] >= threshold).to(returns.dtype)  # [B, 1]
    return kept * mask

def learned_baseline(returns: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Advantages ``A_t = G_t - V(s_t)`` with a learned state-value baseline; 0 where ``mask`` is 0.

    ``returns``, ``values``, ``mask``: ``[B, T]``; ``values`` are treated as constants (detached).
    V depends on the state only, never on a_t, so the estimator stays unbiased whatever V is; the
    closer V is to E[G_t | s_t], the lower the variance. Used by the gym track (``baseline: value``).
    """
    if returns.shape != values.shape or returns.shape != mask.shape:
        raise ValueError(f"returns {list(returns.shape)}, values {list(values.shape)} and mask {list(mask.shape)} "
                         "must have the same shape")
    return (returns - values.detach()) * mask


def whiten_advantages(advantages: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(A - mean) / (std + eps)`` over the real tokens of the batch (mean kept when ``shift_mean=False``).

    Mean and (unbiased) standard deviation are taken over all positions where ``mask`` is 1.
    """
    count = mask.sum()
    mean = (advantages * mask).sum() / count
    variance = (((advantages - mean) * mask) ** 2).sum() / (count - 1).clamp(min=1.0)
    whitened = (advantages - mean) / (variance.sqrt() + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask
