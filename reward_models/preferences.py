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

from rlhf_pg.chat import completion_text
from rlhf_pg.errors import UserError


@dataclass
class PreferencePairs:
    """Texts as the reward model reads them: ``chosen[i]`` is preferred to ``rejected[i]``."""

    chosen: list[str]
    rejected: list[str]
    margin: list[float] | None = None
    special_tokens: bool = True  # encode with the tokenizer's special tokens (False: a chat template wrote them)

    def __len__(self) -> int:
        return len(self.chosen)


def with_eos(text: str, eos_token: str | None) -> str:
    """``text`` ending with the EOS token (appended unless already there; unchanged without one)."""
    if eos_token and not text.endswith(eos_token):
        return text + eos_token
    return text


def reward_texts(tokenizer, prompts: list[Any], completions: list[Any], finished: list[bool] | None = None) -> list[str]:
    """What the reward model reads for policy samples, encoded as its training pairs were.

    A text prompt: ``prompt + completion``, plus EOS if the completion finished. A conversation (TRL's
    conversational format: ``prompt`` a list of messages, the completion its text or
    ``[{"role": "assistant", "content": ...}]``): the messages with the assistant reply appended, rendered with
    the reward model's own chat template (a truncated reply is left open, ``continue_final_message``, so it is
    not presented as a finished turn); when its tokenizer has no template, the contents joined by newlines.
    """
    texts = []
    for index, (prompt, completion) in enumerate(zip(prompts, completions)):
        done = True if finished is None else bool(finished[index])
        if _is_conversation(prompt):
            texts.append(conversation_text(tokenizer, list(prompt) + [{"role": "assistant",
                                                                       "content": completion_text(completion)}], done))
            continue
        text = prompt + completion_text(completion)
        texts.append(with_eos(text, tokenizer.eos_token) if done else text)
    return texts


def templated(tokenizer, prompts: list[Any]) -> bool:
    """The reward model reads these prompts' samples through its chat template, which writes the special tokens
    itself: encode them without the tokenizer's own (else a BOS is read twice)."""
    return bool(prompts) and _is_conversation(prompts[0]) and bool(getattr(tokenizer, "chat_template", None))


def conversation_text(tokenizer, messages: list[dict[str, Any]], finished: bool = True) -> str:
    """A conversation as the reward model reads it: its chat template (the last turn left open when not
    ``finished``), else the contents joined by newlines (+ EOS when finished)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=not finished)
    text = "\n".join(str(message.get("content", "")) for message in messages)
    return with_eos(text, tokenizer.eos_token) if finished else text


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _render(tokenizer, prompt: Any, answer: Any, where: str) -> str:
    """One side of a pair as text: standard strings are concatenated, conversations use the chat template."""
    if _is_conversation(answer):
        if prompt is not None and not _is_conversation(prompt):
            raise UserError(f"{where}: the answer is a list of messages but the prompt is not; in conversational data "
                            "the prompt must be a list of messages too (or leave it out: the implicit-prompt format)")
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
    conversational = _is_conversation(dataset[0][chosen_column])
    for index, (prompt, good, bad) in enumerate(zip(prompts, dataset[chosen_column], dataset[rejected_column])):
        where = f"data: {source} row {index}"
        for column, value in ((chosen_column, good), (rejected_column, bad)):
            if value is None:
                raise UserError(f"{where} has no {column!r}: every preference row needs both {chosen_column!r} and "
                                f"{rejected_column!r}")
        if _is_conversation(good) != conversational:
            raise UserError(f"{where}: {chosen_column!r} is {'text' if conversational else 'a list of messages'}, but "
                            f"row 0 is {'a list of messages' if conversational else 'text'}; one dataset must use one "
                            "format (all text, or all conversations)")
        chosen.append(_render(tokenizer, prompt, good, where))
        rejected.append(_render(tokenizer, prompt, bad, where))
    margin = [float(m) for m in dataset["margin"]] if "margin" in columns else None
    return PreferencePairs(chosen, rejected, margin, special_tokens=not conversational)


def load_preference_dataset(path: str, split: str, columns: tuple[str, ...] = ("prompt", "chosen", "rejected")):
    """A ``datasets.Dataset`` from a local file/directory or a hub name (the loader of ``rlhf_pg.data``).

    A JSON-lines file that ``datasets`` cannot read as one table (a column that is text in one row and messages
    in another) is read again line by line to name the first row that breaks the format."""
    from rlhf_pg.data import load_path

    try:
        return load_path(path, split)
    except UserError:
        problem = _first_bad_row(Path(path).expanduser(), columns)
        if problem:
            raise UserError(f"data: {path!r} {problem}") from None
        raise


def _first_bad_row(path: Path, columns: tuple[str, ...]) -> str | None:
    """What is wrong with the first row of a .jsonl file whose columns change kind (text vs. messages)."""
    import json

    if not (path.is_file() and path.suffix.lower() == ".jsonl"):
        return None
    kinds: dict[str, str] = {}
    with path.open() as handle:
        for index, line in enumerate(handle):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                return f"line {index + 1} is not JSON ({error.msg})"
            for column in columns:
                if column not in row or row[column] is None:
                    continue
                kind = "a list of messages" if isinstance(row[column], list) else type(row[column]).__name__
                first = kinds.setdefault(column, kind)
                if kind != first:
                    return (f"row {index}: {column!r} is {kind} but earlier rows have {first}; one dataset must use one "
                            "format (all text, or all conversations)")
    return None


def write_jsonl(records: list[dict[str, Any]], path: Path) -> None:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
