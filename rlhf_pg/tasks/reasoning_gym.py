"""reasoning-gym as a prompt source: items generated on the fly, a weighted task mixture, held-out items, curricula.

    step s  ->  P task names drawn with the recipe's weights      (random.Random(seed, s): the same on --resume)
            ->  per task, fresh items of create_dataset(name, seed=crc32(seed/task/s), **config)
                (an item whose question is a held-out question is skipped)
            ->  prompt = [{system: <system prompt>}, {user: item["question"]}]; the item travels beside it

Held-out items come from another seed stream (``2**31 + crc32(shuffle_seed/task)``) with the recipe's config (the
curriculum's first level when it has one), num_eval distinct questions per task. A reward function sees the
columns ``task``, ``answer`` (the item's gold answer), ``entry`` (the item as generated) and ``task_config`` (the
config it was generated with), one value per completion. ``reward_models/reasoning_gym.py`` scores them.

The curriculum (``data.curriculum``) keeps each task's last ``window`` training scores; when their mean reaches
``threshold`` the task's reasoning-gym curriculum goes up one global level and the window starts over. Its state
(levels and windows) is saved in checkpoints, so a resumed run draws the prompts the uninterrupted run would.
"""

from __future__ import annotations

import difflib
import random
import re
import zlib
from collections import deque
from typing import Any

from ..errors import RecipeError, UserError

INSTALL = "pip install 'rlhf-pg[reasoning]' (reasoning-gym)"
EVAL_STREAM = 2**31  # held-out seeds live in [2**31, 2**31 + 2**30): training seeds are below 2**31
COLUMNS = ("task", "answer", "entry", "task_config")  # what reward functions get beside each prompt
MAX_DRAWS = 20  # candidate items per wanted item before a task is declared exhausted


def _gym():
    try:
        import reasoning_gym
        import reasoning_gym.utils  # noqa: F401
    except ImportError:
        raise RecipeError(f"data.source: reasoning_gym needs the reasoning-gym library: {INSTALL}") from None
    return reasoning_gym


def system_prompt_text(value: str | None) -> str | None:
    """The system prompt ``data.system_prompt`` names: a key of ``reasoning_gym.utils.SYSTEM_PROMPTS``, or literal text.

    Rule: a value that is one identifier-like word (letters, digits, ``_`` or ``-``, no space) must be a key; any other
    value (it has a space, punctuation or a newline) is the prompt itself. None: no system message.
    """
    if value is None:
        return None
    prompts = _gym().utils.SYSTEM_PROMPTS
    if value in prompts:
        return prompts[value]
    if re.fullmatch(r"[A-Za-z0-9_\-]+", value):
        close = difflib.get_close_matches(value, list(prompts), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise RecipeError(f"data.system_prompt={value!r} is not a key of reasoning_gym.utils.SYSTEM_PROMPTS ({hint}keys: "
                          f"{', '.join(prompts)}); a literal prompt is any text with a space in it")
    return value


def check_tasks(data) -> None:
    """A ``RecipeError`` for an unknown task name in ``data.tasks`` (with the close names), a config the task rejects
    (reasoning-gym's own message), a ``system_prompt`` that names no prompt, or a ``curriculum.tasks`` entry without a
    reasoning-gym curriculum. Weights are checked by the schema (> 0)."""
    gym = _gym()
    tasks = data.tasks
    if not tasks:
        raise RecipeError("data.tasks: list at least one task, e.g. tasks: [{name: chain_sum}]")
    names = sorted(gym.factory.DATASETS)
    seen = set()
    for index, task in enumerate(tasks):
        where = f"data.tasks[{index}]"
        if task.name not in gym.factory.DATASETS:
            close = difflib.get_close_matches(task.name, names, n=5, cutoff=0.6)
            hint = f"close names: {', '.join(close)}" if close else f"{len(names)} tasks, e.g. {', '.join(names[:8])}, ..."
            raise RecipeError(f"{where}.name={task.name!r} is not a reasoning-gym task ({hint})")
        if task.name in seen:
            raise RecipeError(f"{where}.name={task.name!r} is listed twice; give each task once (weights make the mixture)")
        seen.add(task.name)
        for key in ("seed", "size"):
            if key in task.config:
                raise RecipeError(f"{where}.config.{key}: rlhf-pg sets the items' seed and size itself; remove it")
        _create(task.name, task.config, seed=0, size=1, where=f"{where}.config")
    system_prompt_text(data.system_prompt)
    if data.curriculum is not None:
        missing = [name for name in data.curriculum.tasks or [] if name not in seen or name not in gym.factory.CURRICULA]
        if missing:
            raise RecipeError(f"data.curriculum.tasks: {', '.join(missing)} has no reasoning-gym curriculum (or is not in "
                              "data.tasks); list tasks of data.tasks that have one")


def _create(name: str, config: dict[str, Any], seed: int, size: int, where: str = "data.tasks"):
    """``reasoning_gym.create_dataset``; a config the task rejects is a ``RecipeError`` with reasoning-gym's message."""
    try:
        return _gym().create_dataset(name, size=size, seed=seed, **config)
    except (TypeError, ValueError, AssertionError, KeyError) as error:
        import dataclasses

        message = str(error).strip() or type(error).__name__
        keys = [f.name for f in dataclasses.fields(_gym().factory.DATASETS[name][1]) if f.name not in ("seed", "size")]
        raise RecipeError(f"{where} of task {name!r}: reasoning-gym rejects it: {message} (its keys: "
                          f"{', '.join(keys)})") from None


class TaskCurriculum:
    """One task's reasoning-gym curriculum, moved by its recent accuracy.

    ``observe(scores)`` appends training scores to a window of the last ``window``; once the window is full and its
    mean >= ``threshold``, ``increment_global_level()`` and the window starts over. ``config()`` is the curriculum's
    configuration at its level over the task's own config (the curriculum's attributes win).
    """

    def __init__(self, name: str, base: dict[str, Any], threshold: float, window: int):
        from reasoning_gym.factory import create_curriculum

        self.name, self.base, self.threshold = name, dict(base), threshold
        self.curriculum = create_curriculum(name)
        self.window: deque[float] = deque(maxlen=window)

    @property
    def level(self) -> int:
        return self.curriculum.get_max_level()

    def config(self) -> dict[str, Any]:
        generated = self.curriculum.generate_configuration({**self.base, "seed": 0, "size": 1})
        return {key: value for key, value in vars(generated).items() if key not in ("seed", "size")}

    def accuracy(self) -> float | None:
        return sum(self.window) / len(self.window) if self.window else None

    def observe(self, scores: list[float]) -> str | None:
        """Add scores; returns a line saying the level moved (and why), or None."""
        self.window.extend(float(s) for s in scores)
        accuracy = self.accuracy()
        if len(self.window) < self.window.maxlen or accuracy < self.threshold:
            return None
        before, old = self.level, self.config()
        if not self.curriculum.increment_global_level():
            return None  # at its last level: stays there
        self.window.clear()
        shown = " ".join(f"{key}={value}" for key, value in self.config().items() if old.get(key) != value)
        return (f"curriculum {self.name}: level {before} -> {self.level} (accuracy {accuracy:.3f} >= {self.threshold} "
                f"over the last {self.window.maxlen}): {shown}")

    def state_dict(self) -> dict[str, Any]:
        return {"levels": {attr: self.curriculum.get_attr_level(attr) for attr in self.curriculum.attributes},
                "window": list(self.window)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for attr, level in state.get("levels", {}).items():
            self.curriculum.set_attr_level(attr, int(level))
        self.window.clear()
        self.window.extend(float(s) for s in state.get("window", []))


class ReasoningGymSource:
    """Training prompts of step ``s`` and the held-out items, for ``data.source: reasoning_gym``.

    Has ``PromptSampler``'s surface (``batch(step)``, ``draw(seed, count)``, ``known_prompts()``, ``state_dict()``),
    plus ``eval_columns()`` and ``observe(tasks, scores)`` for the curriculum.
    """

    def __init__(self, data, prompts_per_step: int, seed: int):
        check_tasks(data)
        self.tasks = list(data.tasks)
        self.system = system_prompt_text(data.system_prompt)
        self.prompts_per_step, self.seed, self.eval_seed, self.num_eval = prompts_per_step, seed, data.shuffle_seed, data.num_eval
        self.curricula: dict[str, TaskCurriculum] = {}
        curriculum = data.curriculum
        if curriculum is not None:
            from reasoning_gym.factory import has_curriculum

            for task in self.tasks:
                if has_curriculum(task.name) and (not curriculum.tasks or task.name in curriculum.tasks):
                    self.curricula[task.name] = TaskCurriculum(task.name, task.config, curriculum.threshold,
                                                               curriculum.window)
        self._eval_prompts, self._eval_columns = self._held_out()
        self._eval_questions = {entry["question"] for entry in self._eval_columns["entry"]}

    def task_config(self, name: str) -> dict[str, Any]:
        """The config the task's items are generated with now (its curriculum's level, when it has one)."""
        if name in self.curricula:
            return self.curricula[name].config()
        return dict(next(task.config for task in self.tasks if task.name == name))

    def _record(self, name: str, config: dict[str, Any], entry: dict[str, Any]) -> tuple[list[dict], dict[str, Any]]:
        prompt = ([{"role": "system", "content": self.system}] if self.system is not None else []) + [
            {"role": "user", "content": entry["question"]}]
        return prompt, {"task": name, "answer": str(entry["answer"]), "entry": entry, "task_config": config}

    def _held_out(self) -> tuple[list[Any], dict[str, list[Any]]]:
        prompts: list[Any] = []
        columns: dict[str, list[Any]] = {key: [] for key in COLUMNS}
        for task in self.tasks:
            config = self.task_config(task.name)  # before a checkpoint's levels: the curriculum's first level
            stream = EVAL_STREAM + zlib.crc32(f"{self.eval_seed}/{task.name}".encode()) % 2**30
            dataset = _create(task.name, config, seed=stream, size=self.num_eval * MAX_DRAWS)
            seen: set[str] = set()
            for index in range(self.num_eval * MAX_DRAWS):
                entry = dataset[index]
                if entry["question"] in seen:
                    continue
                seen.add(entry["question"])
                prompt, row = self._record(task.name, config, entry)
                prompts.append(prompt)
                for key, value in row.items():
                    columns[key].append(value)
                if len(seen) == self.num_eval:
                    break
            else:
                raise UserError(f"data.tasks: task {task.name!r} gave only {len(seen)} distinct questions in "
                                f"{self.num_eval * MAX_DRAWS} items; lower data.num_eval or widen its config")
        return prompts, columns

    def eval_columns(self) -> tuple[list[Any], dict[str, list[Any]]]:
        """The held-out prompts and their columns (``num_eval`` per task, in the recipe's task order)."""
        return self._eval_prompts, self._eval_columns

    def _fresh(self, name: str, seed: int, count: int) -> list[dict[str, Any]]:
        """``count`` items of task ``name`` from the stream ``seed``, none of them a held-out question."""
        config = self.task_config(name)
        dataset = _create(name, config, seed=seed, size=count * MAX_DRAWS)
        items = []
        for index in range(count * MAX_DRAWS):
            entry = dataset[index]
            if entry["question"] not in self._eval_questions:
                items.append(entry)
                if len(items) == count:
                    return items
        raise UserError(f"data.tasks: task {name!r} keeps giving held-out questions: its config allows too few distinct "
                        "questions for data.num_eval held-out ones; lower data.num_eval or widen its config")

    def draw(self, seed: int, count: int) -> tuple[list[Any], dict[str, list[Any]]]:
        """``count`` prompts drawn from the mixture by ``seed`` (a step's batch, a dynamic-sampling round)."""
        rng = random.Random(seed)
        names = rng.choices([task.name for task in self.tasks], weights=[task.weight for task in self.tasks], k=count)
        by_task = {name: iter(self._fresh(name, zlib.crc32(f"{seed}/{name}".encode()) % EVAL_STREAM, names.count(name)))
                   for name in dict.fromkeys(names)}
        prompts: list[Any] = []
        columns: dict[str, list[Any]] = {key: [] for key in COLUMNS}
        for name in names:
            prompt, row = self._record(name, self.task_config(name), next(by_task[name]))
            prompts.append(prompt)
            for key, value in row.items():
                columns[key].append(value)
        return prompts, columns

    def batch(self, step: int) -> tuple[list[Any], dict[str, list[Any]]]:
        """``(prompts, columns)`` of ``step``: a function of (seed, step, curriculum levels) only."""
        return self.draw(self.seed * 1_000_003 + step, self.prompts_per_step)

    def known_prompts(self) -> list[Any]:
        """Prompts to check against the context length before the run: the first step's."""
        return self.batch(0)[0]

    def observe(self, tasks: list[str], scores: list[float]) -> tuple[dict[str, float], list[str]]:
        """The step's training scores (reasoning-gym's score of each completion) -> the curriculum metrics
        ``curriculum/<task>/level`` and ``curriculum/<task>/accuracy`` (the window's mean), and lines for the console."""
        metrics, notes = {}, []
        for name, curriculum in self.curricula.items():
            note = curriculum.observe([s for t, s in zip(tasks, scores) if t == name])
            if note:
                notes.append(note)
            metrics[f"curriculum/{name}/level"] = float(curriculum.level)
            accuracy = curriculum.accuracy()
            if accuracy is not None:
                metrics[f"curriculum/{name}/accuracy"] = accuracy
        return metrics, notes

    def state_dict(self) -> dict[str, Any]:
        return {name: curriculum.state_dict() for name, curriculum in self.curricula.items()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        for name, saved in (state or {}).items():
            if name in self.curricula:
                self.curricula[name].load_state_dict(saved)
