"""Reward functions for rlhf-pg.

Every reward function has TRL's signature ``f(prompts, completions, **kwargs) -> list[float]``: one
float per completion. ``kwargs`` carry the dataset's other columns (one value per completion) and
``finished`` (the completion ended with EOS). Recipes name registered functions (``arithmetic_exact``)
or any importable function (``my_pkg.rewards:score``). ``reward_model`` scores with a Bradley-Terry
reward model trained by ``rlhf-pg reward-model`` (``bradley_terry.py``).
"""

from .registry import REWARD_FUNCTIONS, register_reward, resolve_reward
from . import rules  # noqa: F401  (registers the rule rewards)
from . import scoring  # noqa: F401  (registers reward_model)

__all__ = ["REWARD_FUNCTIONS", "register_reward", "resolve_reward"]
