"""Rewards of the built-in tasks beyond rules on the text: the calculator task's (``rlhf_pg/tasks/calculator.py``).

``calculator_exact`` scores an episode's last model turn against the product; ``used_tool`` is a monitor (give
it weight 0): did the episode call the tool? Both read ``turns``, the episodes' turns that the episode sampler
passes beside the dataset columns.
"""

from __future__ import annotations

from rlhf_pg.chat import completion_text

from .registry import register_reward


def _product(prompt: str) -> int:
    """``a * b`` of an ``"a*b="`` prompt."""
    left, _, right = prompt.rstrip("=").partition("*")
    return int(left) * int(right)


def final_answer(completion: str, turns: list[dict] | None) -> str:
    """The text of the model's last turn (the whole completion without turns); '' when the environment spoke last."""
    if turns is None:
        return completion
    if not turns or turns[-1].get("role") != "model":
        return ""
    return turns[-1].get("content", "")


@register_reward("calculator_exact")
def calculator_exact(prompts: list, completions: list, answer=None, finished=None, turns=None, **kwargs) -> list[float]:
    """1.0 when the episode ended with EOS and its last model turn is exactly ``answer``, else 0.0.

    ``turns``: each episode's turns (the episode sampler passes them); without them (no tools) the completion is the
    answer. ``answer`` defaults to the product parsed from an ``"a*b="`` prompt.
    """
    scores = []
    for i, completion in enumerate(completions):
        text = completion_text(completion)
        expected = str(answer[i]).strip() if answer is not None else str(_product(prompts[i]))
        ended = True if finished is None else bool(finished[i])
        given = final_answer(text, turns[i] if turns is not None else None).strip()
        scores.append(1.0 if ended and given == expected else 0.0)
    return scores


@register_reward("used_tool")
def used_tool(prompts: list, completions: list, turns=None, **kwargs) -> list[float]:
    """1.0 for an episode with at least one tool result in it (a monitor: give it weight 0)."""
    if turns is None:
        return [0.0] * len(completions)
    return [float(any(t.get("role") == "tool" for t in episode)) for episode in turns]
