"""Moved to ``rlhf_pg.core.losses``; this path stays importable (a thin re-export)."""

from .core.losses import (  # noqa: F401
    aggregate,
    policy_gradient_loss,
    value_loss,
    kl_k1,
    kl_k2,
    kl_k3,
    kl_estimate,
    kl_penalized_rewards,
    bradley_terry_loss,
    RatioStats,
    clipped_policy_loss,
    AGGREGATIONS,
    KL_ESTIMATORS,
    RATIO_LEVELS,
    IMPORTANCE,
    importance_ratios,
    truncated_policy_loss,
    off_policy_loss,
)

__all__ = ["aggregate", "policy_gradient_loss", "value_loss", "kl_k1", "kl_k2", "kl_k3", "kl_estimate", "kl_penalized_rewards", "bradley_terry_loss", "RatioStats", "clipped_policy_loss", "AGGREGATIONS", "KL_ESTIMATORS"]
