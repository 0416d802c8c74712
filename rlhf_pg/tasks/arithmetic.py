"""The built-in arithmetic task: prompts ``"{a}+{b}="``, the answer is the decimal sum then EOS.

It needs no download, so it is the default everywhere (quickstart, tests, benchmarks). It also ships
a *flawed demonstrator* that forgets each carry with some probability: imitating it by maximum
likelihood plateaus well below 100 % accuracy, and only a reward signal can fix the carries.
"""

from __future__ import annotations

import random
import re

_PROMPT_RE = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*$")


def format_prompt(a: int, b: int) -> str:
    """The prompt for ``a + b``: ``"12+7="`` (no spaces)."""
    return f"{a}+{b}="


def parse_prompt(prompt: str) -> tuple[int, int] | None:
    """``"12+7="`` -> ``(12, 7)``; ``None`` when the text is not an addition prompt."""
    match = _PROMPT_RE.match(prompt)
    return (int(match.group(1)), int(match.group(2))) if match else None


def flawed_sum(a: int, b: int, forget_carry: float, rng: random.Random) -> int:
    """Column addition that drops each carry with probability ``forget_carry``.

    Digits are added right to left; whenever a column produces a carry, the demonstrator forgets
    to add it to the next column with probability ``forget_carry``. ``forget_carry=0`` is exact.
    """
    result, place, carry = 0, 1, 0
    while a > 0 or b > 0 or carry:
        column = a % 10 + b % 10 + carry
        result += (column % 10) * place
        carry = column // 10
        if carry and rng.random() < forget_carry:
            carry = 0
        a, b, place = a // 10, b // 10, place * 10
    return result


def demonstrator_distribution(a: int, b: int, forget_carry: float) -> dict[int, float]:
    """Exact distribution of ``flawed_sum(a, b, forget_carry, rng)``: ``{answer: probability}``.

    Enumerates the keep/forget choice at every carry of the column addition (at most one per column).
    """
    outcomes: dict[int, float] = {}

    def walk(a: int, b: int, carry: int, result: int, place: int, probability: float) -> None:
        if probability == 0.0:
            return
        if not (a > 0 or b > 0 or carry):
            outcomes[result] = outcomes.get(result, 0.0) + probability
            return
        column = a % 10 + b % 10 + carry
        result += (column % 10) * place
        if column // 10:
            walk(a // 10, b // 10, 1, result, place * 10, probability * (1.0 - forget_carry))
            walk(a // 10, b // 10, 0, result, place * 10, probability * forget_carry)
        else:
            walk(a // 10, b // 10, 0, result, place * 10, probability)

    walk(a, b, 0, 0, 1, 1.0)
    return outcomes


def demonstrator_accuracy(problems: list[tuple[int, int]], forget_carry: float) -> tuple[float, float]:
    """``(sampled, mode)`` accuracy of the demonstrator on ``problems``, exactly (no sampling).

    ``sampled`` = mean P(flawed_sum = a + b): how often one of its answers is right. ``mode`` = the
    fraction of problems whose *most likely* answer is right: the greedy accuracy of a perfect
    imitator, which is what maximum likelihood on this demonstrator converges to under greedy decoding.
    """
    sampled = mode = 0.0
    for a, b in problems:
        distribution = demonstrator_distribution(a, b, forget_carry)
        sampled += distribution.get(a + b, 0.0)
        mode += float(max(distribution, key=distribution.get) == a + b)
    return sampled / len(problems), mode / len(problems)


def all_problems(max_operand: int, min_operand: int = 0) -> list[tuple[int, int]]:
    """Every ``(a, b)`` with both operands in ``[min_operand, max_operand]``."""
    span = range(min_operand, max_operand + 1)
    return [(a, b) for a in span for b in span]


def split_problems(
    max_operand: int, num_eval: int, seed: int, min_operand: int = 0
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Disjoint (train, eval) problem lists; the eval problems are held out of training prompts."""
    problems = all_problems(max_operand, min_operand)
    if num_eval >= len(problems):
        raise ValueError(
            f"num_eval={num_eval} leaves no training problems: operands {min_operand}..{max_operand} "
            f"give only {len(problems)} problems; lower data.num_eval or raise data.max_operand"
        )
    random.Random(seed).shuffle(problems)
    return problems[num_eval:], problems[:num_eval]


def as_records(problems: list[tuple[int, int]]) -> dict[str, list]:
    """Columns for ``datasets.Dataset.from_dict``: prompt, a, b, answer (the exact sum as text)."""
    return {
        "prompt": [format_prompt(a, b) for a, b in problems],
        "a": [a for a, _ in problems],
        "b": [b for _, b in problems],
        "answer": [str(a + b) for a, b in problems],
    }
