"""Moved to ``rlhf_pg.core.kl_control``; this path stays importable (a thin re-export)."""

from .core.kl_control import (  # noqa: F401
    KLController,
)

__all__ = ["KLController"]
