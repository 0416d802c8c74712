"""Preference pairs in TRL's format, turned into the texts a reward model reads.

TRL's preference datasets have ``chosen``/``rejected`` columns, either

- *implicit prompt*: each is a whole text (prompt included), or
- *explicit prompt*: a ``prompt`` column plus the two completions; the model reads ``prompt + completion``,

as plain strings (*standard*) or lists of ``{"role", "content"}`` messages (*conversational*, rendered
with the reward model's chat template). An optional ``margin`` column asks for a reward gap of at least
that size. Like TRL, a standard text gets the tokenizer's EOS token appended (it is a finished
answer); during RL, a completion gets it only if the policy emitted EOS (``reward_texts``), so training
and scoring encode a finished answer identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_pg.errors import UserError


@dataclass
class PreferencePairs:
    """Texts as the reward model reads them: ``chosen[i]`` is preferred to ``rejected[i]``."""

    chosen: list[str]
    rejected: list[str]
    margin: list[float] | None = None

    def __len__(self) -> int:
        return len(self.chosen)


def with_eos(text: str, eos_token: str | None) -> str:
    """``text`` ending with the EOS token (appended unless already there; unchanged without one)."""
    if eos_token and not text.endswith(eos_token):
        return text + eos_token
    return text


def reward_texts(tokenizer, prompts: list[str], completions: list[str], finished: list[bool] | None = None) -> list[str]:
    """What the reward model reads for policy samples: ``prompt + completion``, plus EOS if the completion finished."""
    texts = []
    for index, (prompt, completion) in enumerate(zip(prompts, completions)):
        done = True if finished is None else bool(finished[index])
        text = prompt + completion
        texts.append(with_eos(text, tokenizer.eos_token) if done else text)
    return texts


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _render(tokenizer, prompt: Any, answer: Any, where: str) -> str:
    """One side of a pair as text: standard strings are concatenated, conversations use the chat template."""
    if _is_conversation(answer):
        messages = (prompt or []) + answer
        if not _is_conversation(messages):
            raise UserError(f"{where}: the prompt and the answer must both be lists of messages in conversational data")
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{where}: conversational pairs need a tokenizer with a chat template; the reward "
                            "model's tokenizer has none (use plain-text pairs or set model.tokenizer)")
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if not isinstance(answer, str) or (prompt is not None and not isinstance(prompt, str)):
        raise UserError(f"{where}: expected text (or lists of chat messages), got {type(answer).__name__}")
    return with_eos((prompt or "") + answer, tokenizer.eos_token)


def pairs_from_dataset(dataset, tokenizer, chosen_column: str = "chosen", rejected_column: str = "rejected",
                       prompt_column: str = "prompt", source: str = "dataset") -> PreferencePairs:
    """``PreferencePairs`` from a ``datasets.Dataset`` in TRL's format (columns named by the recipe)."""
    columns = dataset.column_names
    missing = [c for c in (chosen_column, rejected_column) if c not in columns]
    if missing:
        raise UserError(f"data: {source} has no column {missing[0]!r} (columns: {', '.join(columns)}); a preference "
                        "dataset needs chosen/rejected columns (set data.chosen_column / data.rejected_column)")
    if len(dataset) == 0:
        raise UserError(f"data: {source} has no rows")
    prompts = dataset[prompt_column] if prompt_column in columns else [None] * len(dataset)
    chosen, rejected = [], []
    for index, (prompt, good, bad) in enumerate(zip(prompts, dataset[chosen_column], dataset[rejected_column])):
        where = f"data: {source} row {index}"
        chosen.append(_render(tokenizer, prompt, good, where))
        rejected.append(_render(tokenizer, prompt, bad, where))
    margin = [float(m) for m in dataset["margin"]] if "margin" in columns else None
    return PreferencePairs(chosen, rejected, margin)


def load_preference_dataset(path: str, split: str):
    """A ``datasets.Dataset`` from a local file/directory or a hub name (the loader of ``rlhf_pg.data``)."""
    from rlhf_pg.data import load_path

    return load_path(path, split)


def write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
