"""The sampler/trainer gap: completions drawn by a sampler mu that is not exactly the trained policy pi_theta.

An engine with its own copy of the weights (vLLM: other kernels, another precision, a weight push that lags)
samples a_t ~ mu(. | s_t), while the update differentiates log pi_theta. REINFORCE's estimate is unbiased only
for tokens drawn from pi_theta; importance sampling restores it:

    grad J = E_pi[ sum_t grad log pi(a_t|s_t) A_t ] = E_mu[ sum_t w_t grad log pi(a_t|s_t) A_t ]

    token level     rho_t = pi(a_t|s_t) / mu(a_t|s_t)       (per token: low variance; exact for one-step
                                                             episodes, biased when later tokens' ratios matter)
    sequence level  rho   = prod_t rho_t, on every token     (exact for the whole trajectory, higher variance)

    none   w = 1                                    (trust the sampler: exact when mu = pi)
    tis    w = min(rho, cap)                        (truncated IS: bounded weights; unbiased where rho <= cap)
    mask   w = rho if 1/cap <= rho <= cap else 0    (drop what sampler and trainer disagree on; verl's "mask")

The weights are constants (no gradient flows through them). ``tests/test_sampler_correction.py`` enumerates a
small MDP sampled by a different policy and checks that the corrected estimator's expectation is the exact
gradient, and measures the bias of the cap and of the token level.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor

IS_CORRECTIONS = ("none", "tis", "mask")
IS_LEVELS = ("token", "sequence")


@dataclass
class GapStats:
    """How far the sampler's log-probs are from the trainer's, and what the correction did (over action tokens).

    ``logprob_abs_diff``: mean |log pi_theta - log mu|; ``logprob_abs_diff_max``: its max; ``is_weight_mean``:
    mean w; ``is_clipped_frac``: fraction of tokens whose weight the cap changed (tis) or zeroed (mask).
    """

    abs_diff_sum: float = 0.0
    abs_diff_max: float = 0.0
    weight_sum: float = 0.0
    clipped: float = 0.0
    tokens: float = 0.0

    def add(self, other: "GapStats") -> "GapStats":
        return GapStats(self.abs_diff_sum + other.abs_diff_sum, max(self.abs_diff_max, other.abs_diff_max),
                        self.weight_sum + other.weight_sum, self.clipped + other.clipped, self.tokens + other.tokens)

    def metrics(self) -> dict[str, float]:
        tokens = max(self.tokens, 1.0)
        return {"rollout/logprob_abs_diff": self.abs_diff_sum / tokens, "rollout/logprob_abs_diff_max": self.abs_diff_max,
                "rollout/is_weight_mean": self.weight_sum / tokens, "rollout/is_clipped_frac": self.clipped / tokens}


def sampler_correction(logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, mode: str = "tis", cap: float = 2.0,
                       level: str = "token") -> tuple[Tensor, GapStats]:
    """Importance weights ``w`` ``[B, T]`` (constants) for actions drawn by the sampler, and the gap's statistics.

    ``logprobs``: log pi_theta(a_t|s_t) ``[B, T]`` (the trainer's; detached here); ``sampler_logprobs``: log
    mu(a_t|s_t) as the sampler recorded them; ``mask``: 1 on action tokens. See the module for the formulas.
    """
    if mode not in IS_CORRECTIONS:
        raise ValueError(f"unknown sampler correction {mode!r}; choose one of {list(IS_CORRECTIONS)}")
    if level not in IS_LEVELS:
        raise ValueError(f"unknown importance level {level!r}; choose one of {list(IS_LEVELS)}")
    if mode != "none" and not cap > 1.0:
        raise ValueError(f"the importance-weight cap must be > 1, got {cap}")
    log_ratio = (logprobs.detach() - sampler_logprobs) * mask  # [B, T]
    if level == "sequence":
        log_ratio = log_ratio.sum(-1, keepdim=True).expand_as(mask)  # log prod_t rho_t on every token of the row
    ratio = torch.exp(log_ratio.clamp(max=50.0))
    if mode == "none":
        weights, changed = torch.ones_like(ratio), torch.zeros_like(ratio, dtype=torch.bool)
    elif mode == "tis":
        weights, changed = ratio.clamp(max=cap), ratio > cap
    else:
        inside = (ratio >= 1.0 / cap) & (ratio <= cap)
        weights, changed = torch.where(inside, ratio, torch.zeros_like(ratio)), ~inside
    weights = weights * mask
    gap = (logprobs.detach() - sampler_logprobs).abs() * mask
    stats = GapStats(abs_diff_sum=float(gap.sum()), abs_diff_max=float(gap.max()) if gap.numel() else 0.0,
                     weight_sum=float(weights.sum()), clipped=float((changed.float() * mask).sum()),
                     tokens=float(mask.sum()))
    return weights, stats


__all__ = ["IS_CORRECTIONS", "IS_LEVELS", "GapStats", "sampler_correction"]
