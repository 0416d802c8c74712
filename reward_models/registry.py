"""The reward-function registry: names used in recipes -> functions."""

from __future__ import annotations

import importlib
from typing import Callable

RewardFunction = Callable[..., list]

REWARD_FUNCTIONS: dict[str, RewardFunction] = {}


def register_reward(name: str) -> Callable[[RewardFunction], RewardFunction]:
    """Decorator: make ``f(prompts, completions, **kwargs) -> list[float]`` available to recipes as ``name``."""

    def decorator(function: RewardFunction) -> RewardFunction:
        REWARD_FUNCTIONS[name] = function
        return function

    return decorator


def resolve_reward(name: str) -> RewardFunction:
    """A registered name, or ``'package.module:function'`` imported on demand.

    Raises ``LookupError`` with a message that lists the registered names or says what failed to import.
    """
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # noqa: BLE001 - any import failure is the user's to fix
            raise LookupError(f"cannot import module {module_name!r} for reward {name!r}: {error}") from None
        function = getattr(module, attribute, None)
        if function is None or not callable(function):
            raise LookupError(f"module {module_name!r} has no function {attribute!r} (reward {name!r})")
        return function
    raise LookupError(
        f"unknown reward function {name!r}; registered: {', '.join(sorted(REWARD_FUNCTIONS))}; "
        "or give an import path such as 'my_pkg.rewards:score'"
    )
