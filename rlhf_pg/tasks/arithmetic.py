"""The built-in arithmetic task: prompts ``"{a}+{b}="``, the answer is the decimal sum then EOS.

With ``prompt_format="chat"`` the prompts are conversations for a chat model instead:
``[{"role": "user", "content": "What is {a}+{b}? Reply with only the number."}]``.

It needs no download, so it is the default everywhere (quickstart, tests, benchmarks). It also ships
a *flawed demonstrator* that forgets each carry with some probability: imitating it by maximum
likelihood plateaus well below 100 % accuracy, and only a reward signal can fix the carries.
"""

from __future__ import annotations

import random
import re

_PROMPT_RE = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*$")
CHAT_QUESTION = "What is {a}+{b}? Reply with only the number."
_CHAT_RE = re.compile(r"What is\s*(\d+)\s*\+\s*(\d+)\s*\?")
PROMPT_FORMATS = ("text", "chat")


def format_prompt(a: int, b: int) -> str:
    """The prompt for ``a + b``: ``"12+7="`` (no spaces)."""
    return f"{a}+{b}="


def format_chat_prompt(a: int, b: int) -> list[dict[str, str]]:
    """The conversational prompt for ``a + b``: one user message, ``"What is 12+7? Reply with only the number."``."""
    return [{"role": "user", "content": CHAT_QUESTION.format(a=a, b=b)}]


def parse_prompt(prompt) -> tuple[int, int] | None:
    """``"12+7="``, or a conversation asking ``"What is 12+7? ..."``, -> ``(12, 7)``; ``None`` when it is not an
    addition prompt."""
    if isinstance(prompt, str):
        match = _PROMPT_RE.match(prompt)
    else:
        users = [m.get("content") or "" for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        match = _CHAT_RE.search(users[-1]) if users else None
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


def as_records(problems: list[tuple[int, int]], prompt_format: str = "text") -> dict[str, list]:
    """Columns for ``datasets.Dataset.from_dict``: prompt, a, b, answer (the exact sum as text).

    ``prompt_format``: ``"text"`` (``"12+7="``) or ``"chat"`` (``format_chat_prompt``).
    """
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format {prompt_format!r}: use one of {', '.join(PROMPT_FORMATS)}")
    render = format_chat_prompt if prompt_format == "chat" else format_prompt
    return {
        "prompt": [render(a, b) for a, b in problems],
        "a": [a for a, _ in problems],
        "b": [b for _, b in problems],
        "answer": [str(a + b) for a, b in problems],
    }
