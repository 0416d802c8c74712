"""The reward-function registry: names used in recipes -> functions."""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Iterable

from rlhf_pg.errors import RewardFunctionError

RewardFunction = Callable[..., list]

REWARD_FUNCTIONS: dict[str, RewardFunction] = {}
PYTHON_REFERENCE = "python:"  # a recipe's name for a function given from Python (rlhf_pg.api), not importable


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
    if name.startswith(PYTHON_REFERENCE):
        raise LookupError(f"{name!r} stands for a Python function given to rlhf_pg.train(reward_funcs=...) (or sft, "
                          "evaluate, doctor); pass it again from Python, or name a registered or importable function")
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


def check_reward_signature(function: Any, name: str, keywords: Iterable[str] = ()) -> None:
    """A ``RewardFunctionError`` unless ``function`` can be called as the scorer calls it: ``f(prompts=...,
    completions=..., **kwargs)`` when it names ``completions`` (TRL's way), else ``f(prompts, completions, **kwargs)``,
    with ``keywords`` (the dataset's other columns, ``finished``) as the kwargs. Run before any model is loaded."""
    if not callable(function):
        raise RewardFunctionError(f"reward function {name!r} is not callable (got {type(function).__name__})")
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return  # no signature to read (some builtins): the first call tells
    kwargs = dict.fromkeys(keywords, [])
    try:
        if "completions" in signature.parameters:
            signature.bind(prompts=[], completions=[], **kwargs)
        else:
            signature.bind([], [], **kwargs)
    except TypeError as error:
        raise RewardFunctionError(
            f"reward function {name!r} cannot be called as f(prompts, completions, **kwargs) with the keyword arguments "
            f"{', '.join(sorted(kwargs)) or '(none)'} ({error}); define it as def f(prompts, completions, **kwargs) -> "
            "list[float] (TRL's signature)") from None
