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

AGGREGATIONS = ("seq-mean-token-sum", "token-mean", "seq-mean-token-mean")


def aggregate(
    values: Tensor,
    mask: Tensor,
    aggregation: str = "seq-mean-token-sum",
    num_sequences: float | None = None,
    num_tokens: float | None = None,
) -> Tensor:
    """Reduce per-token ``values`` ``[B, T]`` to a scalar, counting only positions where ``mask`` is 1.

    - ``seq-mean-token-sum``:  (1/N) sum_i sum_t v_it               (the estimator above)
    - ``token-mean``:          sum_i sum_t v_it / sum_i sum_t m_it
    - ``seq-mean-token-mean``: (1/N) sum_i (sum_t v_it / sum_t m_it)

    ``num_sequences`` (N) and ``num_tokens`` default to this batch's counts. Pass the counts of the
    whole batch when ``values`` is one micro-batch (or one process's shard) of it, so that the losses
    of the pieces add up to the loss of the whole.
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
    raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {list(AGGREGATIONS)}")


def policy_gradient_loss(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    aggregation: str = "seq-mean-token-sum",
    num_sequences: float | None = None,
    num_tokens: float | None = None,
) -> Tensor:
    """REINFORCE loss ``-aggregate(logprobs * A)``; the advantages are constants (detached).

    ``logprobs[b, t] = log pi_theta(a_t | s_t)`` with gradient; with ``aggregation="seq-mean-token-sum"``
    the gradient of this loss is exactly ``-(1/N) sum_i sum_t grad log pi(a_it | s_it) A_it``.
    """
    return aggregate(-logprobs * advantages.detach(), mask, aggregation, num_sequences, num_tokens)


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
) -> tuple[Tensor, RatioStats]:
    """PPO-style clipped surrogate ``-aggregate(min(r A, clip(r, 1-eps, 1+eps_high) A))``.

    ``r_t = exp(logprobs_t - old_logprobs_t)`` per token (``ratio_level="token"``) or one ratio per
    sequence ``r = exp(sum_t (logprobs_t - old_logprobs_t))`` broadcast over its tokens
    (``"sequence"``). At r = 1 the gradient is r * grad log pi * A = the REINFORCE gradient. Where the
    clipped term is the smaller one the gradient is exactly 0: this is the trust region.
    """
    if ratio_level not in ("token", "sequence"):
        raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = (logprobs - old_logprobs.detach()) * mask
    if ratio_level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(logprobs)
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = aggregate(-torch.minimum(unclipped, clipped), mask, aggregation, num_sequences, num_tokens)
    with torch.no_grad():
        real = mask > 0
        count = real.sum().clamp(min=1)
        was_clipped = (clipped < unclipped) & real
        stats = RatioStats(
            ratio_mean=float(ratio[real].mean()) if bool(real.any()) else 1.0,
            ratio_max=float(ratio[real].max()) if bool(real.any()) else 1.0,
            clip_fraction=float(was_clipped.sum() / count),
            approx_kl=float((kl_k3(old_logprobs, logprobs) * mask).sum() / count),
        )
    return loss, stats
