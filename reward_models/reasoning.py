"""Rewards for reasoning answers: reasoning-gym's own scoring, the ``<answer>`` format, and math-verify.

    reasoning_gym   score_answer(answer=extract_answer(completion), entry=item)  in [0, 1], the task's own protocol
    format          1.0 one well-formed <answer>...</answer>, 0.5 an answer pair among other answer tags or empty,
                    0.0 none
    math_verify     1.0 when math-verify finds the completion's final answer equal to the ``answer`` column, else 0.0

``reasoning_gym`` reads the columns that ``data.source: reasoning_gym`` gives every completion (``entry``: the item,
``task_config``: the config it was generated with); ``math_verify`` reads any dataset's ``answer`` column.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from rlhf_pg.chat import completion_text
from rlhf_pg.errors import RewardFunctionError

from .registry import Scores, register_reward

ANSWER_PAIR = re.compile(r"<answer>\s?(.*?)\s?</answer>", flags=re.DOTALL)  # reasoning_gym.utils.extract_answer's


_DATASETS: dict[tuple[str, str], Any] = {}  # (task, repr of its config) -> a dataset to score with


def _task_dataset(name: str, config: dict[str, Any]):
    import reasoning_gym

    key = (name, repr(sorted(config.items())))
    if key not in _DATASETS:
        _DATASETS[key] = reasoning_gym.create_dataset(name, size=1, seed=0, **config)
    return _DATASETS[key]


def entry_scores(completions: list, entries: list[dict[str, Any]], task_configs: list[dict[str, Any]] | None = None
                 ) -> Scores:
    """reasoning-gym's protocol for each completion: ``dataset.score_answer(answer=extract_answer(text), entry=entry)``,
    the dataset being the item's task with the config it was generated with (its default config without one).

    A checker that raises on an answer scores 0 and is counted (``stats["checker_errors"]``, with a note)."""
    from reasoning_gym.utils import extract_answer

    scores, errors, notes = [], 0, []
    for i, (completion, entry) in enumerate(zip(completions, entries)):
        name = entry["metadata"]["source_dataset"]
        dataset = _task_dataset(name, task_configs[i] if task_configs is not None else {})
        answer = extract_answer(completion_text(completion))
        try:
            scores.append(float(dataset.score_answer(answer=answer, entry=entry)))
        except Exception as error:  # noqa: BLE001 - a task's checker failing on a model's answer is that answer's 0
            errors += 1
            notes.append(f"reasoning_gym: {name}'s score_answer raised on {str(answer)[:40]!r} ({type(error).__name__}: "
                         f"{error}); scored 0")
            scores.append(0.0)
    return Scores(scores, stats={"checker_errors": float(errors)}, notes=notes[:1])


@register_reward("reasoning_gym")
def reasoning_gym_reward(prompts: list, completions: list, entry=None, task_config=None, **kwargs) -> list[float]:
    """The task's own score of the last ``<answer>...</answer>`` of the completion, in [0, 1] (0 without one); a
    checker that raises scores 0 and is counted (``reward/reasoning_gym/checker_errors``)."""
    if entry is None:
        raise RewardFunctionError("reward 'reasoning_gym' scores reasoning-gym items: set data.source: reasoning_gym "
                                  "(its prompts carry the item as the column 'entry')")
    return entry_scores(completions, entry, task_config)


@register_reward("format")
def format_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """1.0: exactly one ``<answer>`` tag, then exactly one ``</answer>`` tag, with non-blank text between;
    0.5: a ``<answer>...</answer>`` pair is there (so an answer is extracted) but with other answer tags or blank;
    0.0: no pair."""
    scores = []
    for completion in completions:
        text = completion_text(completion)
        pairs = ANSWER_PAIR.findall(text)
        if not pairs:
            scores.append(0.0)
        elif text.count("<answer>") == 1 and text.count("</answer>") == 1 and pairs[0].strip():
            scores.append(1.0)
        else:
            scores.append(0.5)
    return scores


def answer_text(text: str) -> str:
    """The text math-verify reads: the last ``<answer>`` pair's content when there is one, else the whole completion
    (math-verify then takes its last ``\\boxed{}`` or, failing that, its last number or expression)."""
    pairs = ANSWER_PAIR.findall(text)
    return pairs[-1].strip() if pairs else text


def _parse(text: str, parse, limit: int | None) -> list:
    """math-verify's ``parse``; bare LaTeX (a ``\\``, ``^``, ``_`` or ``{`` in it and no ``$``, e.g. ``x^2+1``) is read
    as inline math ``$...$`` first, since math-verify's own extraction would take only its last number."""
    if re.search(r"[\\^_{]", text) and "$" not in text:
        parsed = parse(f"${text}$", parsing_timeout=limit)
        if parsed:
            return parsed
    return parse(text, parsing_timeout=limit)


@register_reward("math_verify")
def math_verify_reward(prompts: list, completions: list, answer=None, sample_timeout_s: int = 5, **kwargs) -> Scores:
    """1.0 when ``verify(parse(gold), parse(answer_text(completion)))``, else 0.0.

    ``sample_timeout_s``: math-verify's own per-sample limit on parsing and comparing (signal.alarm, so only where
    the scorer calls the function in the main thread, i.e. without the reward's ``timeout_s``); a sample past it
    scores 0 and is counted (``reward/math_verify/timeouts``). A gold answer math-verify cannot parse gives 0 and is
    counted (``reward/math_verify/gold_unparsed``), with a note quoting the first one.
    """
    try:
        from math_verify import parse, verify
        from math_verify.errors import TimeoutException
    except ImportError:
        raise RewardFunctionError("reward 'math_verify' needs the math-verify library: pip install "
                                  "'rlhf-pg[reasoning]' (math-verify)") from None
    if answer is None:
        raise RewardFunctionError("reward 'math_verify' compares with the dataset's 'answer' column; the data has none")
    limit = int(sample_timeout_s) if threading.current_thread() is threading.main_thread() else None
    scores, gold_unparsed, timeouts, notes = [], 0, 0, []
    for completion, gold_text in zip(completions, answer):
        try:
            gold = _parse(str(gold_text), parse, limit)
            if not gold:
                gold_unparsed += 1
                if not notes:
                    notes.append(f"math_verify: gold answer {str(gold_text)[:60]!r} does not parse; those samples score 0")
                scores.append(0.0)
                continue
            predicted = _parse(answer_text(completion_text(completion)), parse, limit)
            scores.append(1.0 if predicted and verify(gold, predicted, timeout_seconds=limit) else 0.0)
        except TimeoutException:
            timeouts += 1
            scores.append(0.0)
    return Scores(scores, stats={"gold_unparsed": float(gold_unparsed), "timeouts": float(timeouts)}, notes=notes)
