"""Moved to ``rlhf_pg.core.mdp``; this path stays importable (a thin re-export)."""

from .core.mdp import (  # noqa: F401
    Rollout,
    action_tokens,
    concat_rollouts,
    terminal_rewards,
)

__all__ = ["Rollout", "action_tokens", "concat_rollouts", "terminal_rewards"]
