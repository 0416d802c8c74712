"""Policy-gradient losses, loss aggregation, KL estimators, importance ratios and the Bradley-Terry
preference loss: pure tensor functions.

The REINFORCE estimator of grad J(theta), J = E[r(tau)], over N sampled trajectories is

    g = (1/N) sum_i sum_t grad log pi_theta(a_it | s_it) * A_it

so the loss whose gradient is -g is ``-(1/N) sum_i sum_t logprob_it * A_it`` with the advantages held
constant. Maximum likelihood is the same sum with A = 1. Shared by the LM track and the gym track.
Shapes: ``logprobs``, ``advantages``, ``mask`` are ``[B, T]``; ``mask`` is float 0/1, right-padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor

AGGREGATIONS = ("seq-mean-token-sum", "token-mean", "seq-mean-token-mean", "token-sum", "seq-mean-token-sum-norm")


def aggregate(
    values: Tensor,
    mask: Tensor,
    aggregation: str = "seq-mean-token-sum",
    num_sequences: float | None = None,
    num_tokens: float | None = None,
    norm_length: float | None = None,
) -> Tensor:
    """Reduce per-token ``values`` ``[B, T]`` to a scalar, counting only positions where ``mask`` is 1.

    - ``seq-mean-token-sum``:      (1/N) sum_i sum_t v_it               (the estimator above)
    - ``token-mean``:              sum_i sum_t v_it / sum_i sum_t m_it  (DAPO, CISPO)
    - ``seq-mean-token-mean``:     (1/N) sum_i (sum_t v_it / sum_t m_it)  (GRPO, GSPO)
    - ``token-sum``:               sum_i sum_t v_it                     (no normalisation at all)
    - ``seq-mean-token-sum-norm``: (1/N) sum_i sum_t v_it / L           (Dr. GRPO; L = ``norm_length``, a
      constant such as the longest allowed completion, ``rollout.max_new_tokens``; TRL's ``dr_grpo`` loss)

    ``num_sequences`` (N) and ``num_tokens`` default to this batch's counts. Pass the counts of the
    whole batch when ``values`` is one micro-batch (or one process's shard) of it, so that the losses
    of the pieces add up to the loss of the whole. ``token-sum`` and ``seq-mean-token-sum-norm`` are
    sums over rows divided by constants, so they add up too; ``norm_length`` is required (a per-batch
    T would make micro-batches with different padding disagree). Under DDP's *mean* of gradients over
    P processes, ``token-sum`` comes out divided by P (the others are given per-process counts).
    """
    masked = values * mask
    if aggregation == "seq-mean-token-sum":
        denominator = num_sequences if num_sequences is not None else values.shape[0]
        return masked.sum() / denominator
    if aggregation == "token-mean":
        denominator = num_tokens if num_tokens is not None else mask.sum().clamp(min=1.0)
        return masked.sum() / denominator
    if aggregation == "seq-mean-token-mean":
        denominator = num_sequences if num_sequences is not None else values.shape[0]
        per_sequence = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_sequence.sum() / denominator
    if aggregation == "token-sum":
        return masked.sum()
    if aggregation == "seq-mean-token-sum-norm":
        if norm_length is None or norm_length <= 0:
            raise ValueError("aggregation 'seq-mean-token-sum-norm' divides by a constant length: pass "
                             f"norm_length > 0 (e.g. rollout.max_new_tokens), got {norm_length!r}")
        denominator = num_sequences if num_sequences is not None else values.shape[0]
        return masked.sum() / (denominator * norm_length)
    raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {list(AGGREGATIONS)}")


def policy_gradient_loss(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    aggregation: str = "seq-mean-token-sum",
    num_sequences: float | None = None,
    num_tokens: float | None = None,
    norm_length: float | None = None,
) -> Tensor:
    """REINFORCE loss ``-aggregate(logprobs * A)``; the advantages are constants (detached).

    ``logprobs[b, t] = log pi_theta(a_t | s_t)`` with gradient; with ``aggregation="seq-mean-token-sum"``
    the gradient of this loss is exactly ``-(1/N) sum_i sum_t grad log pi(a_it | s_it) A_it``.
    """
    return aggregate(-logprobs * advantages.detach(), mask, aggregation, num_sequences, num_tokens, norm_length)


def value_loss(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """Regression of a learned baseline on the returns: ``(1/2) sum_it m_it (V(s_it) - G_it)^2 / sum_it m_it``.

    ``values`` ``[B, T]`` with gradient, ``returns`` ``[B, T]`` the targets (detached).
    """
    return 0.5 * aggregate((values - returns.detach()) ** 2, mask, "token-mean")


# --- KL to a reference policy -------------------------------------------------------------------
# With a ~ pi_theta(. | s) and log-ratio  l = log pi_theta(a|s) - log pi_ref(a|s)  (Schulman, 2020):
#   k1 = l                       unbiased for KL(pi_theta || pi_ref), high variance, can be < 0
#   k2 = l^2 / 2                 biased, low variance, >= 0; its gradient is that of the KL
#   k3 = (e^-l - 1) + l          unbiased, low variance, >= 0


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log pi(a|s) - log pi_ref(a|s), per token."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k2 = (log pi(a|s) - log pi_ref(a|s))^2 / 2, per token."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = pi_ref(a|s)/pi(a|s) - 1 - log(pi_ref(a|s)/pi(a|s)), per token."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token KL(pi || pi_ref) estimate ``[B, T]`` from tokens sampled from pi; see k1/k2/k3 above."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {sorted(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


def kl_penalized_rewards(
    rewards: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float, estimator: str = "k1"
) -> Tensor:
    """Per-token rewards with the KL penalty: ``r'_t = r_t - beta * k(t)`` on real tokens, 0 elsewhere.

    ``rewards``, ``logprobs``, ``ref_logprobs``, ``mask``: ``[B, T]``. The reward-to-go of r' is then
    ``G_t = sum_{t'>=t} gamma^(t'-t) (r_t' - beta k_t')``: each action is charged for the divergence of
    itself and of every later action (with k1 and gamma = 1 this is the gradient of
    E[r(tau)] - beta KL(pi_theta || pi_ref) over whole sequences).
    """
    return (rewards - kl_coef * kl_estimate(logprobs, ref_logprobs, estimator)) * mask


# --- Reward models: the Bradley-Terry preference loss ---------------------------------------------


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None) -> Tensor:
    """Mean negative log-likelihood of the preferences under the Bradley-Terry model.

    P(chosen > rejected) = sigma(r_c - r_r), so the loss is ``-(1/N) sum_i log sigma(r_c,i - r_r,i - m_i)``
    with optional margins ``m`` (TRL's ``margin`` column; 0 by default). ``chosen_rewards``,
    ``rejected_rewards``, ``margin``: ``[N]``. ``logsigmoid`` keeps it finite for any reward gap.
    """
    difference = chosen_rewards - rejected_rewards
    if margin is not None:
        difference = difference - margin
    return -torch.nn.functional.logsigmoid(difference).mean()


# --- Off-policy reuse: importance ratios with a trust region -------------------------------------


@dataclass
class RatioStats:
    """Diagnostics of the importance ratios r = pi_theta / pi_old over the real tokens."""

    ratio_mean: float
    ratio_max: float
    clip_fraction: float
    approx_kl: float  # k3 with tokens drawn from pi_old: an estimate of KL(pi_old || pi_theta)


RATIO_LEVELS = ("token", "sequence", "sequence_mean")
IMPORTANCE = ("clip", "truncate")  # PPO's clipped surrogate, or CISPO's truncated (stop-gradient) weight


def importance_ratios(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, ratio_level: str = "token") -> Tensor:
    """Importance ratios ``r`` ``[B, T]`` of pi_theta over pi_old, with gradient through ``logprobs``.

    ``logprobs``, ``old_logprobs`` (constants), ``mask``: ``[B, T]``; l_it = log pi_theta(a_it|s_it) - log pi_old(a_it|s_it).

    - ``token``:         r_it = exp(l_it)
    - ``sequence``:      r_it = exp(sum_t' l_it')  the likelihood ratio of the whole sequence, every token
    - ``sequence_mean``: r_it = sg[s_i] * pi_theta(a_it|s_it) / sg[pi_theta(a_it|s_it)],
                         s_i = exp((1/|y_i|) sum_t' l_it')  GSPO (Zheng et al., 2025), "GSPO-token" form

    ``sequence_mean`` is GSPO's length-normalised (geometric-mean) ratio: every token carries the value s_i
    and the gradient of its own log-prob. When A is the same on every token of a sequence (an outcome
    reward) the loss and its gradient are exactly GSPO's sequence-level ones, and per-token advantages
    (reward-to-go with a KL penalty) stay meaningful. ``sequence`` is *not* GSPO: its ratio is a product of
    |y| token ratios, with a variance that grows with the length.
    """
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"ratio_level must be one of {list(RATIO_LEVELS)}, got {ratio_level!r}")
    # logprobs, old_logprobs, mask: [B, T]
    log_ratio = (logprobs - old_logprobs.detach()) * mask
    if ratio_level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(logprobs)
    elif ratio_level == "sequence_mean":
        mean_log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)  # [B, 1]
        log_ratio = mean_log_ratio.detach() + logprobs - logprobs.detach()
    return torch.exp(log_ratio)


def _ratio_stats(ratio: Tensor, was_clipped: Tensor, logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> RatioStats:
    with torch.no_grad():
        real = mask > 0
        count = real.sum().clamp(min=1)
        return RatioStats(
            ratio_mean=float(ratio[real].mean()) if bool(real.any()) else 1.0,
            ratio_max=float(ratio[real].max()) if bool(real.any()) else 1.0,
            clip_fraction=float((was_clipped & real).sum() / count),
            approx_kl=float((kl_k3(old_logprobs, logprobs) * mask).sum() / count),
        )


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    ratio_level: str = "token",
    aggregation: str = "seq-mean-token-sum",
    num_sequences: float | None = None,
    num_tokens: float | None = None,
    norm_length: float | None = None,
) -> tuple[Tensor, RatioStats]:
    """PPO-style clipped surrogate ``-aggregate(min(r A, clip(r, 1-eps, 1+eps_high) A))``.

    ``r`` from ``importance_ratios``: per token (``ratio_level="token"``), the whole sequence's likelihood
    ratio ``exp(sum_t (logprobs_t - old_logprobs_t))`` on each of its tokens (``"sequence"``), or GSPO's
    length-normalised ``exp(mean_t (...))`` (``"sequence_mean"``). At r = 1 the gradient is
    r * grad log pi * A = the REINFORCE gradient. Where the clipped term is the smaller one the gradient
    is exactly 0: this is the trust region (DAPO's clip-higher: eps = 0.2, eps_high = 0.28).
    """
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = importance_ratios(logprobs, old_logprobs, mask, ratio_level)
    advantages = advantages.detach()
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = aggregate(-torch.minimum(unclipped, clipped), mask, aggregation, num_sequences, num_tokens, norm_length)
    return loss, _ratio_stats(ratio, clipped < unclipped, logprobs, old_logprobs, mask)


def truncated_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps_high: float = 0.2,
    clip_eps_low: float | None = None,
    aggregation: str = "token-mean",
    num_sequences: float | None = None,
    num_tokens: float | None = None,
    norm_length: float | None = None,
) -> tuple[Tensor, RatioStats]:
    """CISPO (MiniMax-M1, 2025): ``-aggregate(sg[min(r_it, 1 + eps_high)] * A_it * log pi_theta(a_it|s_it))``.

    ``r_it = exp(logprobs_it - old_logprobs_it)`` per token; sg = stop-gradient. The importance weight
    is truncated (and held constant), never the update: the gradient of every token is
    ``-w_it A_it grad log pi(a_it|s_it)`` with w_it = min(r_it, 1 + eps_high) > 0, so a token whose ratio
    ran past the bound still moves (at weight 1 + eps_high), where ``clipped_policy_loss`` gives it
    exactly 0. ``clip_eps_low`` adds the lower bound ``max(., 1 - eps_low)`` (None: none, as the paper).
    At r = 1 (on-policy) this is the REINFORCE loss. ``RatioStats.clip_fraction`` counts truncated tokens.
    """
    # logprobs, old_logprobs, advantages, mask: [B, T]
    ratio = importance_ratios(logprobs, old_logprobs, mask, "token").detach()
    lower = None if clip_eps_low is None else 1.0 - clip_eps_low
    weight = torch.clamp(ratio, min=lower, max=1.0 + clip_eps_high)
    loss = aggregate(-weight * advantages.detach() * logprobs, mask, aggregation, num_sequences, num_tokens,
                     norm_length)
    return loss, _ratio_stats(ratio, weight != ratio, logprobs, old_logprobs, mask)


def off_policy_loss(
    importance: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    ratio_level: str = "token",
    aggregation: str = "seq-mean-token-sum",
    num_sequences: float | None = None,
    num_tokens: float | None = None,
    norm_length: float | None = None,
) -> tuple[Tensor, RatioStats]:
    """The importance-weighted loss of one reuse of a batch, by name (``IMPORTANCE``).

    ``clip``: ``clipped_policy_loss`` (PPO/GRPO/DAPO/GSPO; clipped tokens get no gradient). ``truncate``:
    ``truncated_policy_loss`` (CISPO; weight min(r, 1 + eps_high), eps_high = ``clip_eps_high`` or
    ``clip_eps``; no lower bound; token-level ratios only). Both equal the REINFORCE loss's gradient at r = 1.
    """
    if importance == "clip":
        return clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps, clip_eps_high, ratio_level,
                                   aggregation, num_sequences, num_tokens, norm_length)
    if importance == "truncate":
        if ratio_level != "token":
            raise ValueError(f"importance 'truncate' (CISPO) weights each token by its own ratio: it needs "
                             f"ratio_level 'token', got {ratio_level!r}")
        eps_high = clip_eps if clip_eps_high is None else clip_eps_high
        return truncated_policy_loss(logprobs, old_logprobs, advantages, mask, eps_high, None, aggregation,
                                     num_sequences, num_tokens, norm_length)
    raise ValueError(f"unknown importance {importance!r}; choose one of {list(IMPORTANCE)}")
