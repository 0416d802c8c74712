"""Text <-> tokens for the policy: encoding prompts, the ONE context-length check, decoding completions, stop strings.

    prompts (text or conversations)  --encode_prompts-->  prompt_ids, prompt_mask [B, P], left-padded
    completion tokens                --decode_completions-->  texts, cut after a stop string
    demonstrations (given completions) --encode_demonstrations-->  a Rollout to score teacher-forced (SFT)

Every engine and every command encodes prompts here (text: with the tokenizer's special tokens; a
conversation: rendered with the chat template, ``chat.prompt_texts``, without them), and every length check
goes through ``check_context``: a row of ``length`` tokens that needs ``extra`` more (the completion budget)
must fit in the model's context.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from ..chat import prompt_texts
from ..core.mdp import Rollout, padded_completions
from ..errors import UserError

Tensor = torch.Tensor


def context_length(model) -> int | None:
    """The model's maximum sequence length, when its config says."""
    for key in ("n_positions", "max_position_embeddings", "max_sequence_length", "seq_length"):
        value = getattr(model.config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's ``generation_config.eos_token_id``
    (an int or a list; chat models list their end-of-turn token there), in that order, without repeats."""
    ids: list[int] = []
    generation_config = getattr(model, "generation_config", None) if model is not None else None
    for value in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


# --- the one context check -------------------------------------------------------------------------------


def check_context(lengths: Sequence[int], extra: int, max_context: int | None,
                  describe: Callable[[int, int], str], fix: str, rows: str = "rows") -> None:
    """``UserError`` naming the longest offending row when some ``lengths[i] + extra > max_context``.

    ``lengths``: tokens each row already has (a prompt, or a prompt + its demonstration); ``extra``: tokens it
    still needs (the completion budget ``max_new_tokens``, 0 for a demonstration). ``describe(row, length)``
    says which row and why it needs that much (``"prompt '12+7=' (row 3) is 900 tokens; with
    rollout.max_new_tokens=16"``); ``fix`` says what to do; ``rows`` names them in the count ("1 of 6 prompts
    do"). Nothing to check when the context is unknown.
    """
    if max_context is None:
        return
    too_long = [(n, row) for row, n in enumerate(lengths) if n + extra > max_context]
    if not too_long:
        return
    length, row = max(too_long)
    count = f" ({len(too_long)} of {len(lengths)} {rows} do)" if len(lengths) > 1 else ""
    raise UserError(f"{describe(row, length)} it exceeds the model's context of {max_context} tokens{count}. {fix}")


def _shown(value: Any, width: int = 62) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def check_prompt_lengths(tokenizer, prompts: list[Any], max_new_tokens: int, max_context: int | None,
                         limit_key: str = "rollout.max_new_tokens",
                         chat_template_kwargs: dict[str, Any] | None = None) -> int:
    """Every prompt (as the model reads it, after the chat template) + ``max_new_tokens`` fits in ``max_context``.
    Returns the token count of the longest prompt text (the memory estimate's P, ``run.memory``).

    Checked once before training, so a long prompt met at step 900 cannot end the run; rendering also validates
    every message and that the tokenizer has a template (``chat.prompt_texts``). Only prompts that might not
    fit are tokenized: a token covers at least one UTF-8 byte, so a text of b bytes has at most b tokens plus
    the tokenizer's special tokens.
    """
    prompts = list(prompts)
    texts, special_tokens = prompt_texts(tokenizer, prompts, chat_template_kwargs, where="data")
    longest = max(texts, key=len, default="")
    longest_tokens = len(tokenizer(longest, add_special_tokens=special_tokens)["input_ids"]) if texts else 0
    if max_context is None:
        return longest_tokens
    room = max_context - max_new_tokens
    special = len(tokenizer("")["input_ids"]) if special_tokens else 0
    suspects = [i for i, text in enumerate(texts) if len(text.encode("utf-8")) + special + 1 > room]
    if not suspects:
        return longest_tokens
    counted = tokenizer([texts[i] for i in suspects], add_special_tokens=special_tokens)["input_ids"]
    lengths = [0] * len(prompts)
    for i, ids in zip(suspects, counted):
        lengths[i] = len(ids)
    templated = "" if special_tokens else " after the chat template"
    check_context(lengths, max_new_tokens, max_context,
                  lambda row, n: f"prompt {_shown(prompts[row])} (row {row}) is {n} tokens{templated}; with "
                                 f"{limit_key}={max_new_tokens}",
                  f"Drop or shorten those prompts, or lower {limit_key}", rows="prompts")
    return longest_tokens


# --- encoding and decoding --------------------------------------------------------------------------------


def encode_texts(tokenizer, texts: list[str], special_tokens: bool, device="cpu") -> tuple[Tensor, Tensor]:
    """Left-padded ``(ids, mask)`` ``[B, P]`` of texts already rendered (``chat.prompt_texts``)."""
    encoded = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=special_tokens)
    return encoded["input_ids"].to(device), encoded["attention_mask"].float().to(device)


def encode_prompts(tokenizer, prompts: list[Any], device: torch.device | str = "cpu",
                   chat_template_kwargs: dict[str, Any] | None = None, max_new_tokens: int = 0,
                   max_context: int | None = None, limit_key: str = "rollout.max_new_tokens") -> tuple[Tensor, Tensor]:
    """Left-padded ``(prompt_ids, prompt_mask)`` ``[B, P]``; with ``max_context``, every prompt must leave room
    for ``max_new_tokens`` (``check_context``).

    Text prompts are encoded with the tokenizer's own special tokens; conversations (lists of messages)
    are rendered with the chat template and encoded without them (``chat.prompt_texts``).
    """
    prompts = list(prompts)
    texts, special_tokens = prompt_texts(tokenizer, prompts, chat_template_kwargs, where="prompts")
    prompt_ids, prompt_mask = encode_texts(tokenizer, texts, special_tokens, device)
    check_context(prompt_mask.sum(-1).long().tolist(), max_new_tokens, max_context,
                  lambda row, n: f"prompt {prompts[row]!r:.200} is {n} tokens; with {limit_key}={max_new_tokens}",
                  f"Shorten the prompts or lower {limit_key}", rows="prompts")
    return prompt_ids, prompt_mask


def encode_demonstrations(tokenizer, prompts: list[Any], completions: list[Any], token_rows: list[list[int]],
                          action_rows: list[list[float]] | None = None, device: torch.device | str = "cpu",
                          max_context: int | None = None,
                          chat_template_kwargs: dict[str, Any] | None = None) -> Rollout:
    """Demonstrations as a batch of trajectories to score teacher-forced: s_0 = the prompt (encoded as every
    sampler encodes it), actions = ``token_rows[i]`` (the completion's tokens, its end token included).

    ``action_rows``: 1 on the demonstrator's own tokens, 0 on observations it quotes (episodes); None: all are
    actions. ``logprobs`` (log pi_old) are unknown for a demonstrator and left at 0 (never read with one update
    per batch); ``finished`` is True and the temperature 1 (maximum likelihood scores the policy itself).
    """
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device, chat_template_kwargs)
    prompt_lengths = prompt_mask.sum(-1).long().tolist()
    check_context([p + len(ids) for p, ids in zip(prompt_lengths, token_rows)], 0, max_context,
                  lambda row, n: f"demonstration {prompts[row]!r} -> {completions[row]!r} is {n} tokens with EOS;",
                  "Shorten or drop the long rows", rows="demonstrations")
    completion_ids, completion_mask, action_mask, logprobs = padded_completions(
        token_rows, tokenizer.pad_token_id, action_rows, device=device)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, logprobs=logprobs,
                   group_ids=torch.arange(len(token_rows), device=device), prompts=list(prompts),
                   completions=list(completions),
                   finished=torch.ones(len(token_rows), dtype=torch.bool, device=device), action_mask=action_mask)


def cut_at_stop(text: str, stop: Iterable[str]) -> str:
    """``text`` up to and including the end of the earliest-ending stop string (unchanged when none occurs)."""
    ends = [text.find(s) + len(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else text


def decode_completions(tokenizer, completion_ids: Tensor, completion_mask: Tensor, stop: Iterable[str] = ()) -> list[str]:
    """Completion texts without special tokens (EOS, padding), each cut after its first stop string (``cut_at_stop``)."""
    rows = [ids[: int(n)].tolist() for ids, n in zip(completion_ids, completion_mask.sum(-1))]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    stop = tuple(stop)
    return [cut_at_stop(text, stop) for text in texts] if stop else texts


class StopStrings:
    """Detects, one decode step at a time, which rows have just completed a stop string.

    Each step decodes only the last ``window`` tokens of the active rows (window = longest stop string in
    characters + 8 tokens: a token decodes to at least one character, so a stop string ending at the newest
    token lies inside the window, away from its first token where decoding may differ). A row whose window
    text contains a stop string has just completed it: had it completed earlier, the row would have ended then.
    """

    def __init__(self, tokenizer, stop: Iterable[str]):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.window = max((len(s) for s in self.stop), default=0) + 8

    def __bool__(self) -> bool:
        return bool(self.stop)

    def __call__(self, tokens: list[Tensor], active: Tensor) -> Tensor:
        """``[B]`` bool: row b is active and its completion (``tokens``: one ``[B]`` tensor per step) now
        ends with a completed stop string."""
        done = torch.zeros_like(active)
        rows = active.nonzero().flatten().tolist()
        if not rows:
            return done
        recent = torch.stack(tokens[-self.window:], 1)[rows].tolist()  # [A, <=window]
        texts = self.tokenizer.batch_decode(recent, skip_special_tokens=True)
        for row, text in zip(rows, texts):
            if any(s in text for s in self.stop):
                done[row] = True
        return done


def distinct_rows(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(first row of each distinct prompt, its index for every row)``, or None when all rows differ (the K
    completions of a group share one prompt: sampling and scoring run it once)."""
    keyed = torch.cat([prompt_ids, prompt_mask.long()], dim=1)
    distinct, row_of = torch.unique(keyed, dim=0, return_inverse=True)
    if distinct.shape[0] == prompt_ids.shape[0]:
        return None
    first_row = torch.full((distinct.shape[0],), prompt_ids.shape[0], dtype=torch.long, device=prompt_ids.device)
    first_row = first_row.scatter_reduce(0, row_of, torch.arange(prompt_ids.shape[0], device=prompt_ids.device), "amin")
    return first_row, row_of


# a prefix shared by every distinct prompt (a system prompt) runs once when it saves at least this many token rows
MIN_SHARED_PREFIX_ROWS = 16


def shared_prefix(prompt_ids: Tensor, prompt_mask: Tensor) -> int:
    """The number p of leading tokens that every row's prompt starts with (a system prompt, the chat template's
    opening), when running them once instead of per row saves at least ``MIN_SHARED_PREFIX_ROWS`` token rows; else 0.

    Rows are left-padded (``encode_prompts``): a row of n real tokens holds them in its last n columns. p stays below
    the shortest prompt, so every row keeps at least one token of its own after the prefix (the one that predicts its
    first action). 0 for one row, or for a mask that is not left padding. Keys and values of the prefix depend only on
    its tokens and positions 0..p-1, not on what follows, so one run serves every row (``prefix_layout``)."""
    rows, width = prompt_ids.shape
    if rows < 2 or width < 2:
        return 0
    mask = prompt_mask.long()
    lengths = mask.sum(-1)
    shortest = int(lengths.min())
    # left padding: each row's mask is 0 ... 0 1 ... 1
    if shortest < 2 or not bool((mask == (torch.arange(width, device=mask.device) >= width - lengths[:, None])).all()):
        return 0
    start = (width - lengths)[:, None] + torch.arange(shortest, device=prompt_ids.device)
    aligned = prompt_ids.gather(1, start)  # [B, shortest]: each row's first tokens
    same = (aligned == aligned[:1]).all(0).long()
    prefix = min(int(same.cumprod(0).sum()), shortest - 1)
    return prefix if (rows - 1) * prefix >= MIN_SHARED_PREFIX_ROWS else 0


def prefix_layout(prompt_ids: Tensor, prompt_mask: Tensor, prefix: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(prefix_ids [1, p], suffix_ids [B, P - p], suffix_mask [B, P - p])`` for ``shared_prefix``'s p: the prefix once,
    and each row's own tokens after it, left-padded to the width ``P - p``. The prompts' cache then holds the prefix in
    its first p slots for every row and the rest after it: ``cat([ones(B, p), suffix_mask])`` is the attention mask of
    that layout (positions from it, ``decoder.positions_from_mask``, are each token's own; only the padding moved)."""
    width = prompt_ids.shape[1]
    lengths = prompt_mask.long().sum(-1)
    first = width - int(lengths[0])
    prefix_ids = prompt_ids[:1, first : first + prefix]
    rest = width - prefix
    # a row's own tokens are its last (n - p) columns, in the original layout and in the suffix block alike
    suffix_mask = (torch.arange(rest, device=prompt_ids.device) >= rest - (lengths[:, None] - prefix)).to(prompt_mask.dtype)
    return prefix_ids, prompt_ids[:, prefix:], suffix_mask


__all__ = ["context_length", "stop_token_ids", "check_context", "check_prompt_lengths", "encode_texts", "encode_prompts",
           "encode_demonstrations", "cut_at_stop", "decode_completions", "StopStrings", "distinct_rows",
           "shared_prefix", "prefix_layout"]
