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


class Scores(list):
    """What a reward function may return instead of a plain list: the scores (None = not judged) with counters
    the scorer adds to the step's metrics as ``reward/<label>/<key>`` and notes it logs.

    The remote rewards report ``retries`` (requests sent again after a timeout, a dropped connection, a 5xx or
    429); the judge also ``unparsed`` (replies that did not parse: those samples are None), with a note quoting
    the first such reply. A function should report the same keys on every call.
    """

    def __init__(self, values=(), stats: dict[str, float] | None = None, notes: list[str] | None = None):
        super().__init__(values)
        self.stats = dict(stats or {})
        self.notes = list(notes or [])


class RewardSourceError(Exception):
    """Raised by a reward function whose source (a server) could not give some or all of the rewards.

    ``source`` names it (a URL); ``scores`` has what it did give, None for the ``failed`` samples; ``stats`` as in
    ``Scores``. The scorer then follows the reward's ``on_error``: ``fail`` stops the run (``RewardUnavailable``,
    naming the reward, the source and this message), ``none`` keeps ``scores`` with those samples unjudged.
    """

    def __init__(self, message: str, source: str, scores: list, failed: int, stats: dict[str, float] | None = None):
        super().__init__(message)
        self.source, self.scores, self.failed, self.stats = source, list(scores), failed, dict(stats or {})


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
