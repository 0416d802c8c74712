"""Rule rewards: scores computed from the text, no model needed.

Completions may be strings or, for conversational prompts, TRL's ``[{"role": "assistant", "content": text}]``;
prompts may be text (``"12+7="``) or conversations (``"What is 12+7? ..."`` in the last user message).
"""

from __future__ import annotations

import re

from rlhf_pg.chat import completion_text
from rlhf_pg.tasks.arithmetic import parse_prompt

from .registry import register_reward

_INTEGER = re.compile(r"-?\d+")
_ONLY_INTEGER = re.compile(r"^\s*-?\d+\s*$")


def _expected_sums(name: str, prompts: list, a=None, b=None, answer=None) -> list[int]:
    """``a + b`` per sample: from the a and b columns, else the answer column, else parsed from the prompt."""
    if a is not None and b is not None:
        return [int(x) + int(y) for x, y in zip(a, b)]
    if answer is not None:
        return [int(str(value).strip()) for value in answer]
    sums = []
    for prompt in prompts:
        operands = parse_prompt(prompt)
        if operands is None:
            raise ValueError(f"{name} needs columns a and b (or answer), or prompts like '12+7=' or "
                             f"'What is 12+7?', got {prompt!r}")
        sums.append(operands[0] + operands[1])
    return sums


@register_reward("arithmetic_exact")
def arithmetic_exact(prompts: list, completions: list, finished=None, answer=None, **kwargs) -> list[float]:
    """1.0 when the completion is exactly the decimal sum and ended with EOS, else 0.0.

    The expected answer is the ``answer`` column when the dataset has one, else it is parsed from a
    ``"{a}+{b}="`` prompt. A completion cut off before EOS (``finished`` False) scores 0.
    """
    scores = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        if answer is not None:
            expected = str(answer[i]).strip()
        else:
            operands = parse_prompt(prompt)
            if operands is None:
                raise ValueError(f"arithmetic_exact expects prompts like '12+7=', got {prompt!r}")
            expected = str(operands[0] + operands[1])
        ended = True if finished is None else bool(finished[i])
        scores.append(1.0 if ended and completion_text(completion) == expected else 0.0)
    return scores


@register_reward("arithmetic_last_integer")
def arithmetic_last_integer(prompts: list, completions: list, a=None, b=None, answer=None, **kwargs) -> list[float]:
    """1.0 when the LAST integer in the completion's text equals ``a + b``, else 0.0 (also when it has none).

    ``"The answer is 46."`` and ``"12+34=46"`` score 1 for 12+34; ``"46 or 47"`` scores 0. The sum comes
    from the ``a`` and ``b`` columns, else the ``answer`` column, else the prompt (text or conversation).
    """
    expected = _expected_sums("arithmetic_last_integer", prompts, a, b, answer)
    scores = []
    for target, completion in zip(expected, completions):
        integers = _INTEGER.findall(completion_text(completion))
        scores.append(1.0 if integers and int(integers[-1]) == target else 0.0)
    return scores


@register_reward("arithmetic_closeness")
def arithmetic_closeness(prompts: list, completions: list, a=None, b=None, answer=None, **kwargs) -> list[float]:
    """Partial credit for a near miss: ``max(0, 1 - |n - (a+b)| / (a+b))`` for the LAST integer ``n`` of the reply
    (1.0 exact, 0.9 for 10 % off, 0.0 for no integer or 100 % off or more); for a sum of 0, 1.0 only when exact.

    A graded gold rule: two replies nearly always differ, so nearly every pair of samples can be labelled.
    """
    expected = _expected_sums("arithmetic_closeness", prompts, a, b, answer)
    scores = []
    for target, completion in zip(expected, completions):
        integers = _INTEGER.findall(completion_text(completion))
        if not integers:
            scores.append(0.0)
            continue
        miss = abs(int(integers[-1]) - target)
        scores.append(float(miss == 0) if target == 0 else max(0.0, 1.0 - miss / abs(target)))
    return scores


@register_reward("arithmetic_only_number")
def arithmetic_only_number(prompts: list, completions: list, **kwargs) -> list[float]:
    """Format reward: 1.0 when the reply is only an integer (surrounding whitespace allowed), else 0.0."""
    return [1.0 if _ONLY_INTEGER.match(completion_text(completion)) else 0.0 for completion in completions]


@register_reward("length_penalty")
def length_penalty(prompts: list, completions: list, target: int = 20, **kwargs) -> list[float]:
    """``-|len(completion) - target| / target``: 0 at the target length, more negative further away."""
    return [-abs(len(completion_text(completion)) - target) / max(target, 1) for completion in completions]
