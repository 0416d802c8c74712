"""Rule rewards: scores computed from the text, no model needed."""

from __future__ import annotations

import re

from .registry import register_reward

_ADDITION = re.compile(r"^\s*(\d+)\s*\+\s*(\d+)\s*=\s*$")


@register_reward("arithmetic_exact")
def arithmetic_exact(prompts: list[str], completions: list[str], finished=None, answer=None, **kwargs) -> list[float]:
    """1.0 when the completion is exactly the decimal sum and ended with EOS, else 0.0.

    The expected answer is the ``answer`` column when the dataset has one, else it is parsed from a
    ``"{a}+{b}="`` prompt. A completion cut off before EOS (``finished`` False) scores 0.
    """
    scores = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        if answer is not None:
            expected = str(answer[i]).strip()
        else:
            match = _ADDITION.match(prompt)
            if match is None:
                raise ValueError(f"arithmetic_exact expects prompts like '12+7=', got {prompt!r}")
            expected = str(int(match.group(1)) + int(match.group(2)))
        ended = True if finished is None else bool(finished[i])
        scores.append(1.0 if ended and completion == expected else 0.0)
    return scores


@register_reward("length_penalty")
def length_penalty(prompts: list[str], completions: list[str], target: int = 20, **kwargs) -> list[float]:
    """``-|len(completion) - target| / target``: 0 at the target length, more negative further away."""
    return [-abs(len(completion) - target) / max(target, 1) for completion in completions]
