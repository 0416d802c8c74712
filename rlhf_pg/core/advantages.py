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
    """Reward-to-go ``G[b, t] = sum_{t' >= t, mask[b, t'] = 1} gamma^(k(t') - k(t)) rewards[b, t']``.

    ``rewards``, ``mask``: ``[B, T]``; k(t) counts the steps with mask 1 before t, so the discount is per
    action. Returns ``[B, T]``, 0 where ``mask`` is 0. Computed by the backward recursion
    ``G_t = r_t + gamma * G_{t+1}`` over the masked steps; a step with mask 0 contributes no reward and no
    discount (in a multi-turn episode the observation tokens between two actions are not time steps).
    """
    # rewards, mask: [B, T]
    masked_rewards = rewards * mask
    returns = torch.zeros_like(masked_rewards)
    running = torch.zeros_like(masked_rewards[:, 0])  # [B]
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = torch.where(mask[:, t] > 0, masked_rewards[:, t] + gamma * running, running)
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


def _group_reference(values: Tensor, group_ids: Tensor) -> Tensor:
    """Per row, the value of the *first* row of its group. ``values``: ``[B]``.

    Group statistics are taken of ``values - reference`` (the shifted-data algorithm): when every member
    of a group has the same value the shifted values are exactly 0, so that group's mean is exactly its
    value and its spread exactly 0. Without the shift, ``(0.1 + 0.1 + 0.1) / 3 != 0.1`` in floating point
    and a zero-variance group would get advantages of 1e-17 (and 1e-17 / eps after std scaling).
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    positions = torch.arange(values.shape[0], device=values.device)
    first = torch.full((num_groups,), values.shape[0], dtype=torch.long, device=values.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return values[first][inverse]


def group_mean_and_std(values: Tensor, group_ids: Tensor, exclude_self: bool = False) -> tuple[Tensor, Tensor]:
    """Per row i, the mean and the standard deviation of ``values`` over the rows of i's group.

    ``values``, ``group_ids``: ``[B]``; returns two ``[B]`` tensors:

        mean_i = (1/K_i) sum_{j in g(i)} v_j        (``exclude_self``: (1/(K_i - 1)) sum_{j in g(i), j != i} v_j)
        std_i  = sqrt( sum_{j in g(i)} (v_j - mean_g)^2 / (K_i - 1) )   (unbiased, as torch.std; 0 if K_i = 1)

    A group whose members all have the same value gets mean = that value and std = 0 *exactly* (see
    ``_group_reference``). ``exclude_self`` needs K_i >= 2 (the caller checks).
    """
    reference = _group_reference(values, group_ids)
    shifted = values - reference  # [B], exactly 0 in a zero-variance group
    sums, counts = _group_sums(shifted, group_ids)
    group_mean = sums / counts
    squares, _ = _group_sums((shifted - group_mean) ** 2, group_ids)
    std = (squares / (counts - 1).clamp(min=1.0)).sqrt()
    if exclude_self:
        return reference + (sums - shifted) / (counts - 1).clamp(min=1.0), std
    return reference + group_mean, std


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
    group_mean, _ = group_mean_and_std(returns[:, 0], group_ids)
    return group_mean[:, None].expand_as(returns)


def _baseline_leave_one_out(returns: Tensor, mask: Tensor, group_ids: Tensor | None) -> Tensor:
    """b_i = mean of G_j,0 over the *other* members j != i of i's group (RLOO): unbiased."""
    group_ids = _require_groups(group_ids, "leave_one_out", returns.shape[0])
    total_returns = returns[:, 0]
    _, counts = _group_sums(total_returns, group_ids)
    if bool((counts < 2).any()):
        lonely = group_ids[counts < 2].unique().tolist()
        raise ValueError(
            f"baseline 'leave_one_out' needs at least 2 completions per prompt, but group(s) {lonely[:5]} "
            "have only one; sample more completions per prompt (rollout.completions_per_prompt >= 2) "
            "or use another baseline"
        )
    others_mean, _ = group_mean_and_std(total_returns, group_ids, exclude_self=True)
    return others_mean[:, None].expand_as(returns)


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


# --- Scaling by the spread of the rewards (GRPO's std) --------------------------------------------

SCALES = ("none", "group", "batch")


def scale_advantages(advantages: Tensor, returns: Tensor, mask: Tensor, kind: str = "group",
                     group_ids: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Divide the advantages by the spread of the total returns: ``A_it <- A_it / (sigma_i + eps)``.

    ``advantages``, ``returns``, ``mask``: ``[B, T]``; ``group_ids``: ``[B]``. With R_j = G_j,0 the total
    return of row j (its sequence reward):

    - ``group``: sigma_i = std of R_j over j in the group of i (GRPO: A_i = (R_i - mean_g R) / (std_g R + eps);
      TRL ``scale_rewards="group"``)
    - ``batch``: sigma_i = std of R_j over the whole batch (TRL ``scale_rewards="batch"``)
    - ``none``:  unchanged

    std is the unbiased one (as ``torch.std``). *Zero-variance group* (all R_j equal, or a group of one):
    sigma = 0 exactly and its advantages are set to exactly 0 (no NaN, no 1/eps). With an outcome reward
    and a group-centred baseline they are exactly 0 already (GRPO's value: no contrast, no signal), and the
    trainer can skip those rows. With per-token rewards (reward-to-go with a KL penalty, or the toy MDP's
    per-step rewards) such a group can have A_it != 0 at t > 0 while sigma = 0: dividing that by eps
    would blow it up by 1e6, so the group's signal is dropped instead. Scaling by a statistic of the
    sample itself biases the gradient; ``tests/test_presets_exact.py`` measures by how much.
    """
    if kind not in SCALES:
        raise ValueError(f"unknown scale {kind!r}; choose one of {list(SCALES)}")
    if kind == "none":
        return advantages * mask
    if kind == "batch" or group_ids is None:
        group_ids = torch.zeros(returns.shape[0], dtype=torch.long, device=returns.device)
    group_ids = _require_groups(group_ids, "scale", returns.shape[0])
    _, spread = group_mean_and_std(returns[:, 0], group_ids)  # [B]
    inverse_scale = torch.where(spread > 0, 1.0 / (spread + eps), torch.zeros_like(spread))  # [B]
    return advantages * inverse_scale[:, None] * mask


# --- ReMax: the greedy completion's reward as the baseline ----------------------------------------


def remax_baseline(returns: Tensor, greedy_rewards: Tensor, mask: Tensor) -> Tensor:
    """ReMax (Li et al., 2023): ``A_it = G_it - b_i`` with ``b_i = R(greedy completion of i's prompt)``.

    ``returns``, ``mask``: ``[B, T]``; ``greedy_rewards``: ``[B]`` (the reward of the argmax-decoded
    completion of the row's prompt, repeated over the rows of that prompt; treated as constants). The
    greedy completion depends on the prompt (and theta), never on the sampled actions, so the estimator is
    unbiased; it costs one extra greedy rollout per prompt.
    """
    if greedy_rewards.shape != (returns.shape[0],):
        raise ValueError(f"greedy_rewards must have shape [{returns.shape[0]}] (one per row), "
                         f"got {list(greedy_rewards.shape)}")
    if returns.shape != mask.shape:
        raise ValueError(f"returns {list(returns.shape)} and mask {list(mask.shape)} must have the same shape")
    return (returns - greedy_rewards.detach().to(returns.dtype)[:, None]) * mask


# --- DAPO: dynamic sampling and the soft overlong penalty -----------------------------------------


def degenerate_groups(scores: Tensor, group_ids: Tensor) -> Tensor:
    """``[B]`` bool: True on the rows whose group's scores are all equal (``max_g R == min_g R``).

    ``scores``, ``group_ids``: ``[B]``. Such a group (all correct or all wrong under a 0/1 reward; any group
    of one) has advantage exactly 0 under a group-centred baseline, so it adds nothing to the gradient but
    still counts in the aggregation's denominators. DAPO's *dynamic sampling* drops these rows and samples
    more prompts until the batch is full of groups with 0 < accuracy < 1. Equality is exact (no tolerance):
    pass the task scores, before any KL shaping.
    """
    if scores.shape != group_ids.shape or scores.dim() != 1:
        raise ValueError(f"scores {list(scores.shape)} and group_ids {list(group_ids.shape)} must both be [B]")
    _, spread = group_mean_and_std(scores, group_ids)
    return spread == 0


def overlong_penalty(lengths: Tensor, max_length: int, buffer_length: int, coef: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment ``R_length(|y|)`` ``[B]``, added to the task reward.

    ``lengths``: ``[B]`` completion lengths |y| in tokens (``mask.sum(-1)``); L_max = ``max_length``,
    L_cache = ``buffer_length``:

        R_length(|y|) = 0                                  if |y| <= L_max - L_cache
                      = ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
                      = -1                                 if |y| > L_max

    times ``coef``. It falls linearly from 0 to -1 across the last L_cache tokens; a completion cut at
    L_max (``max_new_tokens``) gets -1. ``buffer_length = 0`` turns it off (all zeros).
    """
    if buffer_length < 0 or buffer_length > max_length:
        raise ValueError(f"buffer_length must be in [0, max_length={max_length}], got {buffer_length}")
    lengths = lengths.to(torch.get_default_dtype()) if not lengths.is_floating_point() else lengths
    if buffer_length == 0:
        return torch.zeros_like(lengths)
    start = max_length - buffer_length
    penalty = ((start - lengths) / buffer_length).clamp(max=0.0)
    penalty = torch.where(lengths > max_length, torch.full_like(penalty, -1.0), penalty)
    return coef * penalty
