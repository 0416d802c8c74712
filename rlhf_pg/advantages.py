"""Moved to ``rlhf_pg.core.advantages``; this path stays importable (a thin re-export)."""

from .core.advantages import (  # noqa: F401
    BASELINES,
    discounted_returns,
    total_returns,
    apply_baseline,
    filtered_weights,
    learned_baseline,
    whiten_advantages,
    group_mean_and_std,
    SCALES,
    scale_advantages,
    remax_baseline,
    degenerate_groups,
    overlong_penalty,
)

__all__ = ["BASELINES", "discounted_returns", "total_returns", "apply_baseline", "filtered_weights", "learned_baseline", "whiten_advantages"]
