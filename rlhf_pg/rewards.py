"""Scoring completions: the recipe's weighted sum of reward functions, with checked outputs.

    r(tau) = sum_k w_k f_k(prompts, completions, **columns)[i]

Each f_k has TRL's signature ``f(prompts, completions, **kwargs) -> list[float]``, and is called as TRL
calls it: by keyword when it names a ``completions`` parameter (``trl.rewards:think_format_reward`` takes
only ``completions, **kwargs``), positionally otherwise. With conversational prompts (lists of messages)
``prompts`` are those lists and each completion is ``[{"role": "assistant", "content": text}]``, as in
TRL's GRPOTrainer (``chat.reward_completions``); with text prompts both are strings. A term with weight 0
is still computed and logged (``reward/<label>/mean``) but does not train: a monitor, such as a gold
reward next to a learned proxy. A function may carry ``validate_params(params)``, called once when the
recipe is read (``reward_model`` loads its model there, so a bad path fails before training). A function that
raises, returns the wrong number of values, or returns NaN/inf is reported by name together with the
first offending sample (``RewardFunctionError``, exit code 2 from the CLI).
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

from reward_models import resolve_reward

from .chat import reward_completions
from .recipe import RewardSpec
from .errors import RecipeError, RewardFunctionError, UserError


@dataclass
class _Term:
    label: str  # metric name: reward/<label>/mean
    name: str
    weight: float
    function: Callable[..., Any]
    params: dict[str, Any]


def _accepts(function: Callable[..., Any], keyword: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return True
    return keyword in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def _parameter_names(function: Callable[..., Any]) -> list[str]:
    try:
        return [name for name in inspect.signature(function).parameters if name not in ("prompts", "completions")]
    except (TypeError, ValueError):
        return []


class RewardScorer:
    """Callable ``(prompts, completions, **columns) -> (total, {label: scores})`` for a list of specs."""

    def __init__(self, specs: list[RewardSpec], where: str = "rewards"):
        self.terms: list[_Term] = []
        seen: dict[str, int] = {}
        for index, spec in enumerate(specs):
            try:
                function = resolve_reward(spec.name)
            except LookupError as error:
                raise RecipeError(f"{where}[{index}].name: {error}") from None
            declared = _parameter_names(function)
            for keyword in spec.params:
                if not _accepts(function, keyword):
                    close = difflib.get_close_matches(keyword, [*declared, "name", "weight"], n=1)
                    hint = f"did you mean {close[0]!r}?" if close else "remove the key or fix its spelling"
                    raise RecipeError(
                        f"{where}[{index}]: reward function {spec.name!r} takes no argument {keyword!r}; {hint}"
                    )
                # a **kwargs function accepts anything: a near-miss of a real key is a typo, not an argument
                near = difflib.get_close_matches(keyword, [*declared, "name", "weight"], n=1, cutoff=0.8)
                if keyword not in declared and near:
                    raise RecipeError(
                        f"{where}[{index}]: {keyword!r} is not a key of reward {spec.name!r}; did you mean {near[0]!r}?"
                    )
            validate = getattr(function, "validate_params", None)  # e.g. reward_model loads its model here
            if validate is not None:
                try:
                    validate(dict(spec.params))
                except (UserError, ValueError) as error:
                    raise RecipeError(f"{where}[{index}] ({spec.name}): {error}") from None
            label = spec.name.rsplit(":", 1)[-1]
            seen[label] = seen.get(label, 0) + 1
            if seen[label] > 1:
                label = f"{label}_{seen[label]}"
            self.terms.append(_Term(label, spec.name, spec.weight, function, dict(spec.params)))

    @property
    def labels(self) -> list[str]:
        return [term.label for term in self.terms]

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> tuple[list[float], dict[str, list[float]]]:
        completions = reward_completions(prompts, completions)
        total = [0.0] * len(completions)
        per_reward: dict[str, list[float]] = {}
        for term in self.terms:
            scores = _checked_call(term, prompts, completions, columns)
            per_reward[term.label] = scores
            total = [t + term.weight * s for t, s in zip(total, scores)]
        return total, per_reward


def _describe(prompts: list[Any], completions: list[Any], index: int) -> str:
    return f"sample {index} (prompt={prompts[index]!r}, completion={completions[index]!r})"


def _call(function: Callable[..., Any], prompts: list[Any], completions: list[Any], kwargs: dict[str, Any]) -> Any:
    """``function(prompts=..., completions=..., **kwargs)`` when it names ``completions`` (TRL calls reward
    functions by keyword), else ``function(prompts, completions, **kwargs)``."""
    try:
        by_keyword = "completions" in inspect.signature(function).parameters
    except (TypeError, ValueError):
        by_keyword = False
    if by_keyword:
        return function(prompts=prompts, completions=completions, **kwargs)
    return function(prompts, completions, **kwargs)


def _checked_call(term: _Term, prompts: list[Any], completions: list[Any], columns: dict[str, Any]) -> list[float]:
    kwargs = {**columns, **term.params}
    try:
        scores = _call(term.function, prompts, completions, kwargs)
    except UserError:
        raise  # already a message for people (e.g. a reward model that cannot be loaded)
    except Exception as error:  # noqa: BLE001 - the user's function; report it, do not crash
        index = _first_failing_sample(term, prompts, completions, kwargs)
        where = _describe(prompts, completions, index) if index is not None else "the batch"
        raise RewardFunctionError(
            f"reward function {term.name!r} raised {type(error).__name__}: {error} on {where}; "
            "fix the function (rlhf-pg --debug shows the traceback into it)"
        ) from error
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise RewardFunctionError(
            f"reward function {term.name!r} must return a list of numbers, got {type(scores).__name__}: {scores!r:.200}"
        ) from None
    if len(scores) != len(completions):
        raise RewardFunctionError(
            f"reward function {term.name!r} returned {len(scores)} values for {len(completions)} completions; "
            "it must return exactly one float per completion"
        )
    for index, score in enumerate(scores):
        if not math.isfinite(score):
            raise RewardFunctionError(
                f"reward function {term.name!r} returned {score} for {_describe(prompts, completions, index)}; "
                "rewards must be finite numbers"
            )
    return scores


def _first_failing_sample(term: _Term, prompts: list[Any], completions: list[Any], kwargs: dict[str, Any]) -> int | None:
    """Index of the first completion on which the function raises when called on it alone."""
    for index in range(len(completions)):
        single = {
            key: [value[index]] if isinstance(value, list) and len(value) == len(completions) else value
            for key, value in kwargs.items()
        }
        try:
            _call(term.function, [prompts[index]], [completions[index]], single)
        except Exception:  # noqa: BLE001
            return index
    return None
