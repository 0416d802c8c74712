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

Reward functions as users write them (TRL's conventions):

- ``async def`` functions: the async terms of one scoring call are awaited concurrently, gathered with
  ``asyncio.gather`` in one event loop (run in a worker thread, so a scorer called from a notebook's own
  running loop still works); sync terms are called one after the other, before them.
- ``rewards[i].timeout_s``: a call that takes longer ends the step with a ``RewardFunctionError`` naming the
  function and the timeout. An async function is cancelled (``asyncio.wait``); a sync one runs in a daemon
  worker thread that is abandoned, NOT killed (Python cannot kill a thread: it keeps running in the
  background until it returns, and holds whatever it holds). An async function that blocks its event
  loop (``time.sleep`` instead of ``await asyncio.sleep``) is caught by the loop's own deadline, the largest
  timeout of the async terms; without a timeout on every async term there is no such deadline.
- ``None`` for a sample the function does not judge (TRL turns it into NaN): ``per_reward[label][i]`` is
  NaN there; ``judged_mean`` (the ``reward/<label>`` metrics) averages the judged samples only; the
  weighted total treats it as a 0 contribution, as TRL's ``nansum`` does:

      r_i = sum_{k : f_k judged i} w_k f_k[i]      (a sample no function judges gets r_i = 0)

  NaN *returned* by a function is still an error: ``None`` is the way to say "not judged".

When the rewards cannot be had (``rewards[i].on_error``): a function whose source failed raises
``RewardSourceError`` (``remote.py``); ``on_error: fail`` (default) raises ``RewardUnavailable`` naming the
reward, its source and the error (the run stops cleanly, exit 75), ``on_error: none`` leaves those samples
unjudged, as it does for any other exception or timeout. A function whose signature names ``timeout_s`` gets
the reward's ``timeout_s`` and enforces it itself (per request); the scorer's deadline is for the others.
Per term the scorer adds up ``latency_s`` and ``failures`` (samples unjudged because the source failed), and
the function's own ``Scores.stats``, until ``take_stats()`` returns them as ``reward/<label>/<key>`` metrics.
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
import math
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from rlhf_pg.chat import reward_completions
from rlhf_pg.errors import RecipeError, RewardFunctionError, RewardUnavailable, UserError, first_line

from .registry import RewardSourceError, resolve_reward

if TYPE_CHECKING:  # the recipe schema lives above this package; a spec is read by attribute only
    from rlhf_pg.recipe import RewardSpec


@dataclass
class _Term:
    label: str  # metric name: reward/<label>/mean
    name: str
    weight: float
    function: Callable[..., Any]
    params: dict[str, Any]
    timeout_s: float | None = None
    where: str = "rewards[0]"  # recipe key of the spec, for messages
    on_error: str = "fail"  # or "none": samples the function could not score are unjudged

    @property
    def is_async(self) -> bool:
        """An ``async def`` function (or a callable object whose ``__call__`` is one)."""
        return inspect.iscoroutinefunction(self.function) or inspect.iscoroutinefunction(
            getattr(self.function, "__call__", None))

    @property
    def self_timed(self) -> bool:
        """The function takes ``timeout_s`` itself (the remote rewards: a timeout per request)."""
        return "timeout_s" in _parameter_names(self.function)

    @property
    def deadline(self) -> float | None:
        """The timeout the scorer enforces on a call (none for a self-timed function)."""
        return None if self.self_timed else self.timeout_s

    def kwargs(self, columns: dict[str, Any]) -> dict[str, Any]:
        """The call's keyword arguments: the dataset columns, the spec's params (and ``timeout_s`` if self-timed)."""
        timed = {"timeout_s": self.timeout_s} if self.self_timed and self.timeout_s is not None else {}
        return {**columns, **self.params, **timed}


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

    def __init__(self, specs: list["RewardSpec"], where: str = "rewards"):
        self.terms: list[_Term] = []
        seen: dict[str, int] = {}
        for index, spec in enumerate(specs):
            try:  # a function given from Python (rlhf_pg.api: reward_funcs=...) rides on its spec
                function = spec.function if getattr(spec, "function", None) is not None else resolve_reward(spec.name)
            except LookupError as error:
                raise RecipeError(f"{where}[{index}].name: {error}") from None
            declared = _parameter_names(function)
            for keyword in spec.params:
                if not _accepts(function, keyword):
                    close = difflib.get_close_matches(keyword, [*declared, *_SPEC_KEYS], n=1)
                    hint = f"did you mean {close[0]!r}?" if close else "remove the key or fix its spelling"
                    raise RecipeError(
                        f"{where}[{index}]: reward function {spec.name!r} takes no argument {keyword!r}; {hint}"
                    )
                # a **kwargs function accepts anything: a near-miss of a real key is a typo, not an argument
                near = difflib.get_close_matches(keyword, [*declared, *_SPEC_KEYS], n=1, cutoff=0.8)
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
            self.terms.append(_Term(label, spec.name, spec.weight, function, dict(spec.params),
                                    spec.timeout_s, f"{where}[{index}]", getattr(spec, "on_error", "fail")))
        self._stats: dict[str, dict[str, float]] = {}
        self._notes: list[str] = []

    @property
    def labels(self) -> list[str]:
        return [term.label for term in self.terms]

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> tuple[list[float], dict[str, list[float]]]:
        """``(total, per_reward)``: ``per_reward[label][i]`` is f_k's score of sample i (NaN where it returned
        None), ``total = self.total(per_reward)``. Sync terms run in order, then the async ones concurrently."""
        completions = reward_completions(prompts, completions)
        per_reward: dict[str, list[float]] = {}
        for term in self.terms:
            if not term.is_async:
                per_reward[term.label] = self.score_term(term, prompts, completions, columns)
        pending = [term for term in self.terms if term.is_async]
        if pending:
            outcomes = _gather(pending, prompts, completions, columns)
            for term in pending:
                per_reward[term.label] = self._checked(term, prompts, completions, columns, outcomes[term.label])
        per_reward = {term.label: per_reward[term.label] for term in self.terms}  # the recipe's order
        return self.total(per_reward), per_reward

    def take_stats(self) -> tuple[dict[str, float], list[str]]:
        """The counters since the last call, as metrics ``reward/<label>/latency_s`` (seconds spent in the function),
        ``reward/<label>/failures`` (samples unjudged because its source failed) and the function's own
        (``retries``, ``unparsed``), every term; and the notes to log (what failed, a reply that did not parse)."""
        metrics = {f"reward/{term.label}/{key}": value for term in self.terms
                   for key, value in self._stats.get(term.label, {"latency_s": 0.0, "failures": 0.0}).items()}
        notes, self._stats, self._notes = self._notes, {}, []
        return metrics, notes

    def _checked(self, term: _Term, prompts: list[Any], completions: list[Any], columns: dict[str, Any],
                 outcome: _Outcome) -> list[float]:
        """``_checked_scores``, following ``term.on_error``, with the call's counters added to ``self._stats``."""
        stats, error = {"latency_s": outcome.elapsed_s, "failures": 0.0}, outcome.error
        if isinstance(error, RewardSourceError) and term.on_error == "fail":
            raise RewardUnavailable(f"reward {term.name!r} ({term.where}) could not get its rewards from "
                                    f"{error.source}: {error}") from None
        if (error is not None and not isinstance(error, UserError) or outcome.timed_out) and term.on_error == "none":
            partial = isinstance(error, RewardSourceError)  # the batches that did come back are kept
            stats.update(error.stats if partial else {}, failures=float(error.failed if partial else len(completions)))
            what = str(error) if partial else first_line(error) if error else f"no reply within {term.timeout_s:g} s"
            self._notes.append(f"reward {term.label!r}: {stats['failures']:.0f} of {len(completions)} samples "
                               f"unjudged (on_error: none): {what}")
            outcome = _Outcome(value=error.scores if partial else [None] * len(completions))
        scores = _checked_scores(term, prompts, completions, columns, outcome)
        stats.update(getattr(outcome.value, "stats", {}))
        self._notes += [f"reward {term.label!r}: {note}" for note in getattr(outcome.value, "notes", [])]
        totals = self._stats.setdefault(term.label, {})
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + float(value)
        return scores

    def total(self, per_reward: dict[str, list[float]]) -> list[float]:
        """``r_i = sum_k w_k f_k[i]`` over the terms that judged sample i (TRL's nansum: None counts 0)."""
        weights = {term.label: term.weight for term in self.terms}
        size = len(next(iter(per_reward.values()), []))
        return [sum(weights[label] * scores[i] for label, scores in per_reward.items() if not math.isnan(scores[i]))
                for i in range(size)]

    def score_term(self, term: _Term, prompts: list[Any], completions: list[Any],
                   columns: dict[str, Any]) -> list[float]:
        """One term's checked scores (NaN where it returned None), sync or async, within its timeout.
        ``completions`` as the functions see them (``chat.reward_completions``)."""
        if term.is_async:
            outcome = _gather([term], prompts, completions, columns)[term.label]
        else:
            outcome = _outcome(lambda: _call(term.function, prompts, completions, term.kwargs(columns)), term.deadline)
        return self._checked(term, prompts, completions, columns, outcome)


_SPEC_KEYS = ("name", "weight", "timeout_s", "on_error")  # RewardSpec's own keys (the rest are the function's)


def judged_mean(values: list[float]) -> float:
    """Mean of the judged scores (NaN marks a sample the function returned None for); NaN when none is."""
    judged = [value for value in values if not math.isnan(value)]
    return sum(judged) / len(judged) if judged else math.nan


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


@dataclass
class _Outcome:
    """What one call of a reward function gave: its value, or the exception it raised, or a timeout."""

    value: Any = None
    error: BaseException | None = None
    timed_out: str | None = None  # what became of a call past its timeout
    elapsed_s: float = 0.0  # wall time of the call


def _outcome(call: Callable[[], Any], timeout_s: float | None, in_thread: bool = False) -> _Outcome:
    """``call()`` here, or (with a ``timeout_s``, or ``in_thread``) in a daemon worker thread that is abandoned
    after ``timeout_s`` seconds: a thread cannot be killed, it runs on until the call returns."""
    started = time.perf_counter()
    if timeout_s is None and not in_thread:
        try:
            value = call()
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - the user's function; reported by _checked_scores
            return _Outcome(error=error, elapsed_s=time.perf_counter() - started)
        return _Outcome(value=value, elapsed_s=time.perf_counter() - started)
    box: dict[str, _Outcome] = {}

    def target():
        try:
            box["outcome"] = _Outcome(value=call())
        except BaseException as error:  # noqa: BLE001 - carried back to the calling thread
            box["outcome"] = _Outcome(error=error)

    worker = threading.Thread(target=target, name="reward-function", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return _Outcome(timed_out="the call runs on in a background thread, which Python cannot kill", elapsed_s=timeout_s)
    outcome = box["outcome"]
    outcome.elapsed_s = time.perf_counter() - started
    if isinstance(outcome.error, UserError):
        raise outcome.error
    return outcome


async def _awaited(term: _Term, prompts: list[Any], completions: list[Any], kwargs: dict[str, Any]) -> _Outcome:
    """Await one async term, cancelled after its ``timeout_s`` (``asyncio.wait``: a ``TimeoutError`` the function
    raises itself stays its own error)."""
    started = time.perf_counter()
    try:
        task = asyncio.ensure_future(_call(term.function, prompts, completions, kwargs))
    except Exception as error:  # noqa: BLE001 - raised before the first await (e.g. a bad argument)
        return _Outcome(error=error)
    done, _ = await asyncio.wait({task}, timeout=term.deadline)
    elapsed = time.perf_counter() - started
    if not done:
        task.cancel()
        return _Outcome(timed_out="the call was cancelled", elapsed_s=elapsed)
    error = task.exception()
    return _Outcome(error=error, elapsed_s=elapsed) if error is not None else _Outcome(value=task.result(), elapsed_s=elapsed)


def _gather(terms: list[_Term], prompts: list[Any], completions: list[Any], columns: dict[str, Any]) -> dict[str, _Outcome]:
    """Every async term awaited concurrently in one event loop (``asyncio.gather``), run in a daemon worker thread.

    The thread is given the largest ``timeout_s`` of the terms (+1 s) when every term has one: a function that
    blocks the loop instead of awaiting is then reported as timed out too, with the terms still unfinished.
    """
    outcomes: dict[str, _Outcome] = {}

    async def one(term: _Term):
        outcomes[term.label] = await _awaited(term, prompts, completions, term.kwargs(columns))

    async def every():
        await asyncio.gather(*(one(term) for term in terms))

    limits = [term.deadline for term in terms]
    deadline = None if None in limits else max(limits) + 1.0
    crashed = _outcome(lambda: asyncio.run(every()), deadline, in_thread=True)  # a thread: no loop runs there
    if crashed.error is not None:
        raise crashed.error
    blocked = _Outcome(timed_out="it blocked the event loop (a blocking call inside `async def`?) and runs on in a "
                                 "background thread, which Python cannot kill")
    return {term.label: outcomes.get(term.label, blocked) for term in terms}


def _checked_scores(term: _Term, prompts: list[Any], completions: list[Any], columns: dict[str, Any],
                    outcome: _Outcome) -> list[float]:
    """The outcome's scores as floats (None -> NaN), or a ``RewardFunctionError`` naming the function."""
    kwargs = term.kwargs(columns)
    if outcome.timed_out:
        raise RewardFunctionError(
            f"reward function {term.name!r} did not return within {term.where}.timeout_s={term.timeout_s:g} s on a batch "
            f"of {len(completions)} completions ({outcome.timed_out}); make it faster or raise {term.where}.timeout_s"
        )
    if outcome.error is not None:
        error = outcome.error
        if isinstance(error, UserError):
            raise error  # already a message for people (e.g. a reward model that cannot be loaded)
        index = _first_failing_sample(term, prompts, completions, kwargs)
        where = _describe(prompts, completions, index) if index is not None else "the batch"
        raise RewardFunctionError(
            f"reward function {term.name!r} raised {type(error).__name__}: {error} on {where}; "
            "fix the function (rlhf-pg --debug shows the traceback into it)"
        ) from error
    scores = outcome.value
    try:
        scores = [math.nan if s is None else float(s) for s in scores]
    except (TypeError, ValueError):
        raise RewardFunctionError(
            f"reward function {term.name!r} must return a list of numbers, got {type(scores).__name__}: {scores!r:.200} "
            "(None is allowed in the list, for a sample the function does not judge)"
        ) from None
    if len(scores) != len(completions):
        raise RewardFunctionError(
            f"reward function {term.name!r} returned {len(scores)} values for {len(completions)} completions; "
            "it must return exactly one float per completion"
        )
    for index, (score, given) in enumerate(zip(scores, outcome.value)):
        if given is not None and not math.isfinite(score):
            raise RewardFunctionError(
                f"reward function {term.name!r} returned {score} for {_describe(prompts, completions, index)}; "
                "rewards must be finite numbers (return None for a sample the function does not judge)"
            )
    return scores


def _first_failing_sample(term: _Term, prompts: list[Any], completions: list[Any], kwargs: dict[str, Any]) -> int | None:
    """Index of the first completion on which the function raises when called on it alone."""
    for index in range(len(completions)):
        single = {
            key: [value[index]] if isinstance(value, list) and len(value) == len(completions) else value
            for key, value in kwargs.items()
        }
        if term.is_async:
            async def alone(single=single, index=index):
                return await _call(term.function, [prompts[index]], [completions[index]], single)

            outcome = _outcome(lambda: asyncio.run(alone()), term.deadline, in_thread=True)
        else:
            outcome = _outcome(lambda: _call(term.function, [prompts[index]], [completions[index]], single),
                               term.deadline)
        if outcome.timed_out:
            return None  # hangs on one sample too: stop looking
        if outcome.error is not None:
            return index
    return None
