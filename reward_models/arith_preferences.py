"""A preference task that needs no download: the base model's answers, compared by a hidden gold rule.

Pairs: for a prompt ``"{a}+{b}="`` draw two completions from the base model (``builtin:arith-gpt``,
which forgets carries, so its answers disagree), score both with the *gold* reward (by default
``arithmetic_exact``: the rule a person checking the sum applies), drop ties, label the better one
``chosen`` and flip each label with probability ``label_noise`` (raters are fallible). A reward model
only ever sees these labels, never the gold reward itself.

The trap, as in real preference data: the base model's mistakes are nearly all *forgotten carries*,
so the answer that carries almost always wins. A reward model can fit the labels well by learning
"carrying is good" instead of "the sum is right" -- and a policy optimized hard against it learns to
carry where there is nothing to carry.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from rlhf_pg.errors import UserError
from rlhf_pg.tasks.arithmetic import format_chat_prompt, format_prompt, split_problems

from .registry import resolve_reward


def generate_arith_preferences(
    model, tokenizer, num_pairs: int, gold: str = "arithmetic_exact", label_noise: float = 0.05, temperature: float = 1.5,
    max_new_tokens: int = 8, max_operand: int = 99, heldout_problems: int = 200, seed: int = 0,
    batch_prompts: int = 512, progress=None, prompt_format: str = "text", min_operand: int = 0,
    keep_unfinished: bool = False,
) -> list[dict[str, Any]]:
    """``num_pairs`` records ``{"prompt", "chosen", "rejected"}`` (TRL's explicit-prompt format).

    Prompts are drawn uniformly from the problems outside the RL recipes' held-out set
    (``split_problems(max_operand, heldout_problems, seed, min_operand)``); completions that did not finish
    (no EOS within ``max_new_tokens``; kept when ``keep_unfinished``), identical pairs and gold ties are dropped. ``prompt_format="chat"``:
    TRL's conversational format, the prompt ``[{"role": "user", ...}]`` (as the RL recipes' ``data.prompt_format:
    chat``) and each answer ``[{"role": "assistant", "content": ...}]``.
    """
    from rlhf_pg.policy.sampler import SamplingParams, make_sampler

    try:
        gold_function = resolve_reward(gold)
    except LookupError as error:
        raise UserError(f"data.gold: {error}") from None
    try:
        problems, _ = split_problems(max_operand, heldout_problems, seed, min_operand)
    except ValueError as error:
        raise UserError(f"data.heldout_problems: {error}") from None
    rng = random.Random(seed)
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    sampler = make_sampler(None, model, tokenizer)
    records: list[dict[str, Any]] = []
    attempts = 0
    model.eval()
    while len(records) < num_pairs:
        attempts += 1
        if attempts > 50 + 20 * num_pairs // batch_prompts:
            raise UserError(f"data: only {len(records)} of {num_pairs} pairs after {attempts - 1} batches: the "
                            f"gold reward {gold!r} ties on almost every pair of samples; raise data.temperature "
                            "or use a gold reward that separates the samples")
        render = format_chat_prompt if prompt_format == "chat" else format_prompt
        prompts = [render(*rng.choice(problems)) for _ in range(batch_prompts)]
        with torch.no_grad():
            batch = sampler.sample(prompts, 2, params, generator=generator)
        finished = batch.finished.tolist()
        scores = [float(s) for s in gold_function(batch.prompts, batch.completions, finished=finished)]
        for i in range(0, len(batch.prompts), 2):
            first, second = batch.completions[i], batch.completions[i + 1]
            ended = keep_unfinished or (finished[i] and finished[i + 1])
            if not ended or first == second or scores[i] == scores[i + 1]:
                continue
            chosen, rejected = (first, second) if scores[i] > scores[i + 1] else (second, first)
            if rng.random() < label_noise:
                chosen, rejected = rejected, chosen
            if prompt_format == "chat":
                chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
            records.append({"prompt": batch.prompts[i], "chosen": chosen, "rejected": rejected})
            if len(records) == num_pairs:
                break
        if progress is not None:
            progress(len(records))
    return records
