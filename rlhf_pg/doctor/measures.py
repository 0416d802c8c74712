"""The doctor's measurements that need no model run: histograms, group spread, the chat template's end-of-turn
token, the model's shape (the memory formula and the memory free on a device are ``run.memory``'s)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..run.memory import (MemoryEstimate, StepShape, available_memory, memory_estimate, model_shape,  # noqa: F401
                          size_text, step_shape)


def histogram(values: list[float], bins: int = 8) -> list[tuple[str, int]]:
    """``(label, count)`` rows: one per distinct value when there are at most ``bins``, else ``bins`` equal-width
    intervals; NaN (a sample the function did not judge) is counted in a last ``None`` row."""
    judged = [v for v in values if not math.isnan(v)]
    distinct = sorted(set(judged))
    if len(distinct) <= bins:
        rows = [(f"{v:g}", judged.count(v)) for v in distinct]
    else:
        low, high = distinct[0], distinct[-1]
        width = (high - low) / bins
        counts = [0] * bins
        for v in judged:
            counts[min(int((v - low) / width), bins - 1)] += 1
        rows = [(f"[{low + i * width:.3g}, {low + (i + 1) * width:.3g}{']' if i == bins - 1 else ')'}", n)
                for i, n in enumerate(counts)]
    unjudged = len(values) - len(judged)
    if unjudged:
        rows.append(("None (not judged)", unjudged))
    return rows


def group_spread(scores: list[float], group_ids: torch.Tensor) -> tuple[int, int]:
    """``(groups whose scores are all equal, groups)``, by ``core.advantages.degenerate_groups`` (NaN counts 0)."""
    from ..core.advantages import degenerate_groups

    ids = group_ids.cpu()
    flags = degenerate_groups(torch.nan_to_num(torch.tensor(scores, dtype=torch.float64)), ids)
    first_rows: dict[int, int] = {}
    for row, group in enumerate(ids.tolist()):
        first_rows.setdefault(group, row)
    return sum(bool(flags[row]) for row in first_rows.values()), len(first_rows)


def end_of_turn_token(tokenizer, prompt: list[dict[str, Any]], chat_template_kwargs: dict[str, Any] | None = None
                      ) -> int | None:
    """The first special token the chat template writes after an assistant reply (ChatML: ``<|im_end|>``), or None.

        ids(render(prompt + [assistant "42"]))[len(ids(render(prompt, add_generation_prompt=True))):]
    """
    kwargs = dict(chat_template_kwargs or {})
    rendered = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False, **kwargs)
    full = tokenizer.apply_chat_template(list(prompt) + [{"role": "assistant", "content": "42"}], tokenize=False,
                                         **kwargs)
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {tokenizer.eos_token_id}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, token in added.items() if getattr(token, "special", False)}
    return next((token for token in full_ids[len(prompt_ids):] if token in special), None)
