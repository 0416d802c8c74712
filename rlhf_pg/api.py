"""From Python: ``rlhf_pg.train``, ``sft``, ``evaluate``, ``doctor`` for notebooks and scripts. The CLI calls these.

    import rlhf_pg
    result = rlhf_pg.train("recipes/quickstart.yaml", reward_funcs=[exact], train_dataset=ds,
                           overrides={"train.steps": 200})
    result.summary["eval_reward_after"], result.metrics (one dict per step), result.to_pandas(), result.final_dir

``recipe`` is a YAML path, a dict of sections or a ``Recipe``; ``overrides`` a dict ``{"optim.lr": 1e-4}`` or a list
``["optim.lr=1e-4"]``, the command line's ``key=value`` words. Python objects ride on the recipe beside a reference
that ``Recipe.to_dict`` can hold (the run directory's ``recipe.yaml``, what ``resume`` compares, the trackers' config):

    reward_funcs=[f] or {f: w}   rewards: [{name: python:f, weight: w}]  (they replace the recipe's rewards; a
                                 registered or importable function is named as the command line names it)
    train_dataset=ds             data: {task: null, path: python:train_dataset@<ds's fingerprint>}
    eval_dataset=ds              data.eval_split: python:eval_dataset@<fingerprint>  (without it, data.num_eval
                                 rows of the training set are held out, as for a file)

so ``resume=True`` continues a run when the same functions (by name) and the same rows are passed again. A dataset
is a ``datasets.Dataset`` or a list of dicts with TRL's columns (``prompt``: a text or a list of messages; the other
columns go to the reward functions). Functions have TRL's signature ``f(prompts, completions, **kwargs)``, sync or
``async def``. Bad input raises ``UserError`` with the message the CLI prints (exit code 2 there), before any
model is loaded. SIGINT (a notebook's stop button) or SIGTERM ends the step, writes a checkpoint and raises
``TrainingInterrupted`` (``.checkpoint``); the same call with ``resume=True`` continues exactly. Whatever a call
raises, the locals of its traceback's frames are cleared first: a notebook holding the last error does not hold
the model (``RLHF_PG_DEBUG=1`` keeps them, for ``%debug``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import config
from .data import PYTHON_REFERENCE
from .doctor import DEFAULT_TIME_BUDGET_S
from .errors import TrainingInterrupted, UserError, first_line
from .recipe import Recipe, RewardSpec
from .run.metrics import read_metrics

Overrides = Mapping[str, Any] | list[str] | None


@dataclass
class RunResult:
    """What a run left in ``output_dir``: ``summary`` (``summary.json``), ``metrics`` (``metrics.jsonl`` as one dict
    per step: step 0 holds the evaluation before training, the last step also the final one) and ``final_dir`` (the
    trained model: ``AutoModelForCausalLM.from_pretrained(final_dir)`` loads it)."""

    output_dir: Path
    final_dir: Path | None
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]

    @classmethod
    def load(cls, output_dir: str | Path, summary: dict[str, Any] | None = None) -> RunResult:
        """The result of the finished run in ``output_dir`` (one started from the command line too)."""
        directory = Path(output_dir)
        if summary is None:
            if not (directory / "summary.json").is_file():
                raise UserError(f"{directory} holds no finished run (no summary.json)")
            summary = json.loads((directory / "summary.json").read_text())
        path = directory / "metrics.jsonl"
        final = directory / "final"
        return cls(directory, final if final.is_dir() else None, summary, per_step(read_metrics(path)) if path.is_file() else [])

    def to_pandas(self):
        """``metrics`` as a ``pandas.DataFrame`` indexed by step, a column per metric name."""
        try:
            import pandas
        except ImportError:
            raise UserError("RunResult.to_pandas() needs pandas: pip install pandas") from None
        return pandas.DataFrame(self.metrics).set_index("step")


def per_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``metrics.jsonl``'s records merged by step (a step's training metrics and an evaluation there), in step order."""
    merged: dict[int, dict[str, Any]] = {}
    for record in records:
        merged.setdefault(record["step"], {}).update(record)
    return [merged[step] for step in sorted(merged)]


# --- the recipe: a path, a dict or a Recipe, with the Python objects in their places ------------------------------


def resolve_recipe(recipe: str | os.PathLike | Mapping | Recipe, *, reward_funcs=None, train_dataset=None,
                   eval_dataset=None, overrides: Overrides = None) -> Recipe:
    """The validated ``Recipe`` a call runs: ``recipe`` with the Python rewards and datasets in their places, then
    ``overrides`` (so ``rewards.0.weight`` reaches a function given here). ``RecipeError`` names a bad key."""
    data, source, objects = _recipe_data(recipe)
    functions = _reward_functions(reward_funcs)
    if functions and isinstance(data, dict):
        data["rewards"] = [{"name": reference, "weight": weight} for reference, (_, weight) in functions.items()]
        objects.update({reference: function for reference, (function, _) in functions.items()})
    for argument, value, key in (("train_dataset", train_dataset, "path"), ("eval_dataset", eval_dataset, "eval_split")):
        if value is None or not isinstance(data, dict):
            continue
        dataset = as_dataset(value, argument)
        reference = f"{PYTHON_REFERENCE}{argument}@{_fingerprint(dataset)}"
        section = data.get("data") or {}
        if isinstance(section, dict):  # else from_dict says what is wrong with it
            data["data"] = {**section, key: reference, **({"task": None} if key == "path" else {})}
        objects[reference] = dataset
    if isinstance(data, dict):
        data = config.apply_overrides(data, _override_items(overrides), Recipe)
    resolved = config.from_dict(Recipe, data, source)
    for spec in _specs(resolved):
        spec.function = objects.get(spec.name)
    resolved.data.dataset = objects.get(resolved.data.path) if resolved.data.path else None
    resolved.data.eval_dataset = objects.get(resolved.data.eval_split) if resolved.data.eval_split else None
    return resolved


def _recipe_data(recipe) -> tuple[Any, str, dict[str, Any]]:
    """``(plain data, its name in messages, {reference: Python object} it carries)``."""
    if isinstance(recipe, Recipe):
        objects = {spec.name: spec.function for spec in _specs(recipe) if spec.function is not None}
        for reference, dataset in ((recipe.data.path, recipe.data.dataset),
                                   (recipe.data.eval_split, recipe.data.eval_dataset)):
            if dataset is not None:
                objects[reference] = dataset
        return recipe.to_dict(), "recipe", objects
    if isinstance(recipe, Mapping):
        return copy.deepcopy(dict(recipe)), "recipe", {}
    if isinstance(recipe, (str, os.PathLike)):
        return config.load_yaml(recipe), str(recipe), {}
    raise UserError(f"recipe: expected the path of a YAML recipe, a dict of sections or a Recipe, got "
                    f"{type(recipe).__name__}")


def _specs(recipe: Recipe) -> list[RewardSpec]:
    return [*recipe.rewards, *(recipe.eval.rewards or [])]


def _override_items(overrides: Overrides) -> list[str | tuple[str, Any]]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [(str(key), value) for key, value in overrides.items()]
    if isinstance(overrides, (list, tuple)) and all(isinstance(item, str) for item in overrides):
        return list(overrides)
    raise UserError(f"overrides: expected a dict {{'optim.lr': 1e-4}} or a list of 'key=value' strings, got "
                    f"{overrides!r:.80}")


def _reward_functions(reward_funcs) -> dict[str, tuple[Callable[..., Any], float]]:
    """``{reference: (function, weight)}`` of ``reward_funcs``: a list (weight 1 each) or a dict ``{function: weight}``."""
    if reward_funcs is None:
        return {}
    if callable(reward_funcs):
        reward_funcs = [reward_funcs]
    if isinstance(reward_funcs, Mapping):
        items = list(reward_funcs.items())
    elif isinstance(reward_funcs, (list, tuple)):
        items = [(function, 1.0) for function in reward_funcs]
    else:
        raise UserError(f"reward_funcs: expected a list of functions or a dict {{function: weight}}, got "
                        f"{type(reward_funcs).__name__}")
    if not items:
        raise UserError("reward_funcs: no function given; pass f(prompts, completions, **kwargs) -> list[float], or "
                        "leave reward_funcs=None for the recipe's rewards")
    functions: dict[str, tuple[Callable[..., Any], float]] = {}
    for index, (function, weight) in enumerate(items):
        if not callable(function):
            raise UserError(f"reward_funcs[{index}]: {function!r:.60} is not callable; give a function "
                            "f(prompts, completions, **kwargs) -> list[float]")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise UserError(f"reward_funcs: the weight of {reward_name(function)!r} must be a finite number, got {weight!r}")
        reference, number = reward_name(function), 1
        while reference in functions:
            number += 1
            reference = f"{reward_name(function)}_{number}"
        functions[reference] = (function, float(weight))
    return functions


def reward_name(function: Callable[..., Any]) -> str:
    """A registered function's name, an importable one's ``module:name`` (the command line reads both), else
    ``python:<name>``; its metrics are ``reward/<name>/mean``."""
    from reward_models.registry import REWARD_FUNCTIONS, resolve_reward

    registered = next((name for name, known in REWARD_FUNCTIONS.items() if known is function), None)
    if registered is not None:
        return registered
    name = getattr(function, "__name__", None) or type(function).__name__
    module = getattr(function, "__module__", None)
    if module and module != "__main__" and getattr(function, "__qualname__", None) == name:  # a module's own function
        try:
            if resolve_reward(f"{module}:{name}") is function:
                return f"{module}:{name}"
        except LookupError:
            pass
    return f"{PYTHON_REFERENCE}{name}"


def as_dataset(value: Any, argument: str):
    """``value`` as a ``datasets.Dataset``: a Dataset as is, a list of dicts through ``Dataset.from_list``."""
    import datasets

    if isinstance(value, datasets.Dataset):
        return value
    if isinstance(value, datasets.DatasetDict):
        raise UserError(f"{argument}: a DatasetDict holds several splits ({', '.join(value)}); pass one, e.g. "
                        f"{argument}=ds[{next(iter(value), 'train')!r}]")
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{argument}: expected a datasets.Dataset or a list of dicts, got {type(value).__name__}")
    if not value:
        raise UserError(f"{argument}: the list is empty; give one dict per prompt, e.g. [{{'prompt': '2+3='}}]")
    bad = next((index for index, row in enumerate(value) if not isinstance(row, Mapping)), None)
    if bad is not None:
        raise UserError(f"{argument}: item {bad} is a {type(value[bad]).__name__}, not a dict; give one dict per "
                        "row, e.g. {'prompt': '2+3=', 'answer': 5}")
    try:
        return datasets.Dataset.from_list([dict(row) for row in value])
    except (TypeError, ValueError) as error:  # pyarrow: rows whose columns or types disagree
        raise UserError(f"{argument}: the rows do not make one table ({first_line(error)}); give every row the same "
                        "columns, each with values of one type") from None


def _fingerprint(dataset) -> str:
    """The dataset's own content fingerprint (``datasets`` derives it from the rows and the transforms applied)."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint:
        return fingerprint
    from datasets.fingerprint import Hasher

    return Hasher.hash(dataset.to_dict())[:16]


def _check_inputs(recipe: Recipe) -> None:
    """The Python rewards and datasets, before any model is loaded: the datasets' prompts (``load_prompt_datasets``
    checks them), each function's signature against the keyword arguments it will get."""
    given = [spec for spec in _specs(recipe) if spec.function is not None]
    if not given and recipe.data.dataset is None and recipe.data.eval_dataset is None:
        return  # nothing from Python: the run checks the recipe as the command line's does
    from reward_models.registry import check_reward_signature

    from .data import load_prompt_datasets

    if recipe.data.source == "reasoning_gym":
        from .tasks.reasoning_gym import COLUMNS

        columns = set(COLUMNS)
    else:
        train_set, eval_set = load_prompt_datasets(recipe.data)
        columns = (set(train_set.column_names) | set(eval_set.column_names)) - {"prompt"}
    for spec in given:
        check_reward_signature(spec.function, spec.name, sorted(columns | {"finished"} | set(spec.params)))


def _output_dir(recipe: Any, resolved: Recipe, output_dir: str | os.PathLike | None, command: str) -> Path:
    """``output_dir``, else the recipe's ``output_dir``, else ``runs/<recipe file's stem>`` (``runs/<command>``)."""
    if output_dir is not None:
        return Path(output_dir)
    if resolved.output_dir:
        return Path(resolved.output_dir)
    return Path("runs") / (Path(recipe).stem if isinstance(recipe, (str, os.PathLike)) else command)


def _run(call: Callable[[], Any], command: str, output_dir: Path | None) -> Any:
    """``call()``; what it raises leaves no locals behind (``_forget_frames``), an interrupt says how to resume."""
    try:
        return call()
    except TrainingInterrupted as stop:
        _forget_frames(stop)
        raise TrainingInterrupted(stop.reason, stop.checkpoint, stop.signal_name, stop.output_dir,
                                  hint=f"Resume with: rlhf_pg.{command}(..., output_dir={str(output_dir)!r}, "
                                  "resume=True) with the same recipe, rewards and data") from None
    except BaseException as error:
        _forget_frames(error)
        raise


def _forget_frames(error: BaseException) -> None:
    """Clear the locals of the finished frames in ``error``'s tracebacks (and its causes'): they hold the run (model,
    optimizer), which Jupyter would keep alive through ``sys.last_value``. ``RLHF_PG_DEBUG=1`` keeps them."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen and not os.environ.get("RLHF_PG_DEBUG"):
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


# --- the commands ---------------------------------------------------------------------------------------------------


def train(recipe, *, reward_funcs=None, train_dataset=None, eval_dataset=None, output_dir=None,
          overrides: Overrides = None, resume: bool = False, overwrite: bool = False, progress: bool = True) -> RunResult:
    """REINFORCE fine-tuning (``rlhf-pg train``) in ``output_dir`` (default: the recipe's, else ``runs/<recipe
    name>``). ``resume``: continue from the latest checkpoint (same recipe, rewards and data; only ``train.steps`` may
    grow); ``overwrite``: replace a run already there. Returns the finished run's ``RunResult``."""
    resolved = resolve_recipe(recipe, reward_funcs=reward_funcs, train_dataset=train_dataset, eval_dataset=eval_dataset,
                              overrides=overrides)
    directory = _output_dir(recipe, resolved, output_dir, "train")
    _check_inputs(resolved)
    from .trainer import train as train_recipe

    summary = _run(lambda: train_recipe(resolved, directory, resume=resume, overwrite=overwrite, show_progress=progress),
                   "train", directory)
    return RunResult.load(directory, summary)


def sft(recipe, *, train_dataset=None, eval_dataset=None, reward_funcs=None, output_dir=None,
        overrides: Overrides = None, resume: bool = False, overwrite: bool = False, progress: bool = True) -> RunResult:
    """Maximum likelihood on prompt/completion pairs (``rlhf-pg sft``): the datasets' rows need ``prompt`` and
    ``completion`` (``data.completion_column``); ``reward_funcs`` score the held-out greedy completions. As ``train``."""
    resolved = resolve_recipe(recipe, reward_funcs=reward_funcs, train_dataset=train_dataset, eval_dataset=eval_dataset,
                              overrides=overrides)
    directory = _output_dir(recipe, resolved, output_dir, "sft")
    _check_inputs(resolved)
    from .sft import train_sft

    summary = _run(lambda: train_sft(resolved, directory, resume=resume, overwrite=overwrite, show_progress=progress),
                   "sft", directory)
    return RunResult.load(directory, summary)


def evaluate(model_dir: str | os.PathLike | RunResult | None, recipe, *, reward_funcs=None, train_dataset=None,
             eval_dataset=None, overrides: Overrides = None) -> dict[str, Any]:
    """``rlhf-pg eval``: greedy completions of ``model_dir`` (a directory, a ``RunResult``: its ``final_dir``; None:
    the recipe's model) for the recipe's held-out prompts, scored: ``{"reward": mean, "reward/<name>": ...,
    "examples": [...], "num_prompts": n, "model": ...}``. Pass the ``train_dataset`` of the run to hold out the same rows."""
    if isinstance(model_dir, RunResult):
        model_dir = model_dir.final_dir
    resolved = resolve_recipe(recipe, reward_funcs=reward_funcs, train_dataset=train_dataset, eval_dataset=eval_dataset,
                              overrides=overrides)
    _check_inputs(resolved)
    from .lm_run import evaluate_model

    return _run(lambda: evaluate_model(resolved, None if model_dir is None else str(model_dir)), "evaluate", None)


def doctor(recipe, *, reward_funcs=None, train_dataset=None, eval_dataset=None, overrides: Overrides = None,
           prompts: int | None = None, time_budget_s: float = DEFAULT_TIME_BUDGET_S):
    """``rlhf-pg doctor``: load what ``train`` loads, sample and score one batch, print the report; returns the
    ``Diagnosis`` (``.problems``: what would waste the run, each with its fix; ``.warnings``; ``.stats``)."""
    resolved = resolve_recipe(recipe, reward_funcs=reward_funcs, train_dataset=train_dataset, eval_dataset=eval_dataset,
                              overrides=overrides)
    _check_inputs(resolved)
    from .doctor import diagnose

    return _run(lambda: diagnose(resolved, prompts=prompts, time_budget_s=time_budget_s), "doctor", None)


__all__ = ["RunResult", "as_dataset", "doctor", "evaluate", "per_step", "resolve_recipe", "reward_name", "sft", "train"]
