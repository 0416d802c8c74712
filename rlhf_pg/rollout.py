"""Sample completions from a causal-LM policy, and recompute their log-probabilities for the update.

Sampling is a plain loop over decode steps with a KV cache (``decoder``): one prefill forward over
the left-padded distinct prompts (a group's K rows share one, its cache copied to each), then one
single-token forward per step, stopping as soon as every sequence has ended. The policy pi_theta(a | s) is ``softmax(logits(s) / temperature)``; the same
temperature is used when the update recomputes log-probabilities, so both sides agree.

A completion ends at the first of: any EOS id (the tokenizer's and every id of the model's
``generation_config.eos_token_id``, which may be a list: a chat model's end-of-turn token), the first
occurrence of a stop string (``SamplingParams.stop``), or ``max_new_tokens`` (then it is *truncated*:
``finished[b]`` is False, see ``truncated`` / ``mask_truncated``). Prompts are text, or conversations
(lists of messages) rendered with the tokenizer's chat template (``chat``).
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import replace
from typing import Any, Callable, Iterable

import torch
from transformers import DynamicCache

from .chat import prompt_texts
from .decoder import make_decoder, positions_from_mask
from .errors import UserError
from .kernels import head_for_logprobs, hidden_states, linear_logprobs, token_logprobs
from .core.mdp import Rollout

Tensor = torch.Tensor


@dataclass
class SamplingParams:
    """How completions are drawn. ``temperature == 0`` means greedy decoding.

    ``stop``: stop strings (``rollout.stop``). A completion ends at the token that completes the first
    occurrence of any of them in its decoded text (special tokens skipped); that token is kept, so the
    stop string stays in the completion's text and its token carries gradient like EOS does; tokens
    after it are padding (mask 0), and text that the last token decodes to beyond the stop string is cut.
    Applied by ``rollout`` (which has the tokenizer); ``sample_completions`` takes a ``StopStrings``.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()


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


def cut_at_stop(text: str, stop: Iterable[str]) -> str:
    """``text`` up to and including the end of the earliest-ending stop string (unchanged when none occurs)."""
    ends = [text.find(s) + len(s) for s in stop if s and s in text]
    return text[: min(ends)] if ends else text


def _choose_tokens(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Next tokens ``[B]`` from last-position logits ``[B, V]`` and their log-probabilities under the policy.

    Greedy when ``temperature == 0`` (log-probs then at temperature 1), else sampled from
    ``softmax(logits / temperature)``, restricted to the top-p nucleus when ``top_p < 1`` (the
    log-probs stay those of the unrestricted policy).
    """
    temperature = params.temperature if params.temperature > 0 else 1.0
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if params.temperature == 0.0:
        action = logits.argmax(-1)
    else:
        sampling = probs
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
            sampling = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))
        if params.top_p < 1.0 or probs.device.type != "cpu":
            # Exponential race: argmax_v p_v / E_v with E_v = -log U_v ~ Exp(1) is a draw from p
            # (uniforms are several times cheaper to draw than exponential_ or multinomial on CPU)
            race = torch.rand(probs.shape, generator=generator, device=probs.device).log_().neg_()
            action = (sampling / race).argmax(-1)
        else:  # inverse CDF: one uniform per row, the first token whose cumulative mass exceeds it (~2x cheaper)
            cumulative = probs.cumsum(-1)
            threshold = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device) * cumulative[:, -1:]
            action = torch.searchsorted(cumulative, threshold, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)
    return action, probs.gather(-1, action[:, None]).squeeze(-1).log()


def sample_completions(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    params: SamplingParams,
    eos_token_id: int | Iterable[int],
    pad_token_id: int,
    generator: torch.Generator | None = None,
    all_finished: Callable[[Tensor], bool] | None = None,
    lean: bool = True,
    stop_strings: StopStrings | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw one completion per prompt row. Returns ``(completion_ids, completion_mask, logprobs, finished)``.

    ``prompt_ids``, ``prompt_mask``: ``[B, P]``, left-padded. ``eos_token_id``: one id or several (any
    ends the completion). ``completion_ids`` ``[B, T]`` is right-padded with ``pad_token_id`` after the
    end; ``completion_mask`` is 1 up to and including the ending token (EOS, or the token completing a
    stop string of ``stop_strings``); ``logprobs[b, t] = log pi(a_t | s_t)`` of the drawn token;
    ``finished[b]`` says the completion ended (False: truncated at ``max_new_tokens``).
    T <= max_new_tokens: the loop stops once every row has finished (``all_finished(finished)``; with
    sharded parameters (ZeRO-3, FSDP) every process must run the same number of forwards, so the
    trainer passes a check that all-reduces across processes). ``lean=False`` forces transformers'
    own forward (see ``decoder``).
    """
    # inference mode (cheaper per op than no_grad); the results are copied out of it so that the
    # update's autograd graph may use them (an inference tensor cannot be saved for backward)
    with torch.inference_mode():
        sampled = _sample(model, prompt_ids, prompt_mask, params, eos_token_id, pad_token_id, generator,
                          all_finished, lean, stop_strings)
    return tuple(tensor.clone() for tensor in sampled)


def _sample(model, prompt_ids, prompt_mask, params, eos_token_id, pad_token_id, generator, all_finished, lean,
            stop_strings):
    all_finished = all_finished or (lambda done: bool(done.all()))
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos = torch.tensor(eos_ids, dtype=torch.long, device=prompt_ids.device)
    batch_size = prompt_ids.shape[0]
    max_length = prompt_ids.shape[1] + params.max_new_tokens
    groups = _distinct_rows(prompt_ids, prompt_mask)
    if groups is None:
        decoder = make_decoder(model, batch_size, max_length, lean=lean)
        logits = decoder.prefill(prompt_ids, prompt_mask)
    else:  # the K completions of a prompt share its prefill: run it once, then copy its cache to each row
        unique_rows, row_of = groups
        decoder = make_decoder(model, len(unique_rows), max_length, lean=lean)
        logits = decoder.prefill(prompt_ids[unique_rows], prompt_mask[unique_rows])[row_of]
        decoder.expand(row_of)
    temperature = params.temperature if params.temperature > 0 else 1.0
    finished = torch.zeros(batch_size, dtype=torch.bool, device=prompt_ids.device)
    tokens, logprobs, masks = [], [], []
    for step in range(params.max_new_tokens):
        # min_new_tokens constrains the *sampler*; the recorded log-probs stay those of the policy
        allowed = logits.index_fill(-1, eos, float("-inf")) if step < params.min_new_tokens else logits
        action, action_logprob = _choose_tokens(allowed, params, generator)
        if allowed is not logits:  # the policy's log-prob, not the EOS-masked sampler's
            action_logprob = token_logprobs(logits, action, temperature)
        action = action.masked_fill(finished, pad_token_id)
        logprobs.append(action_logprob)
        masks.append(~finished)
        tokens.append(action)
        ended = torch.isin(action, eos)
        if stop_strings:
            ended = ended | stop_strings(tokens, ~finished & ~ended)
        finished = finished | ended
        if step == params.max_new_tokens - 1 or all_finished(finished):
            break
        logits = decoder.step(action)
    completion_mask = torch.stack(masks, 1).float()
    return torch.stack(tokens, 1), completion_mask, torch.stack(logprobs, 1) * completion_mask, finished


def completion_logprobs(
    model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor,
    temperature: float = 1.0, share_prompts: bool = True, fused_head: bool = True,
) -> Tensor:
    """``log pi_theta(a_t | s_t)`` ``[B, T]`` for given completions, with gradients; 0 where the mask is 0.

    Logits are computed only at the T positions that predict completion tokens, never at other
    prompt positions. When several rows share a prompt (the completions of one group), the prompt
    is run once and its key/value cache is reused by every completion of the group (the gradient
    flows through the shared cache): the same log-probs and gradients as one forward over
    ``[prompt | completion]`` per row (``share_prompts=False``), with 1/K of the prompt compute.
    With ``fused_head`` (where ``kernels.head_for_logprobs`` allows it) the model stops at its final hidden
    states and ``kernels.linear_logprobs`` applies the output layer in chunks: no ``[B, T, V]`` logits.
    """
    temperature = temperature if temperature > 0 else 1.0
    head = head_for_logprobs(model) if fused_head else None
    if head is not None:
        with hidden_states(head):
            hidden = _completion_outputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, share_prompts)
        return linear_logprobs(hidden, head, completion_ids, temperature) * completion_mask
    logits = _completion_outputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, share_prompts)
    return token_logprobs(logits, completion_ids, temperature) * completion_mask


def _completion_outputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, share_prompts) -> Tensor:
    """The model's outputs ``[B, T, *]`` at the T positions that predict completion tokens (logits, or
    the hidden states when the head is cut off)."""
    prompts = _shared_prompts(model, prompt_ids, prompt_mask) if share_prompts else None
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    positions = positions_from_mask(attention_mask)
    num_actions = completion_ids.shape[1]
    if prompts is None:
        return model(
            input_ids=torch.cat([prompt_ids, completion_ids], dim=1), attention_mask=attention_mask,
            position_ids=positions, logits_to_keep=num_actions + 1, use_cache=False,
        ).logits[:, :-1]  # [B, T, V]: position P-1+t predicts a_t
    unique_rows, row_of = prompts
    body = getattr(model, "module", model)  # under DDP the prompt pass bypasses the wrapper: one wrapped forward
    cache = DynamicCache(config=body.config)
    prompt_length = prompt_ids.shape[1]
    first = body(  # [U, 1, V]: the logits that predict a_0, one row per distinct prompt
        input_ids=prompt_ids[unique_rows], attention_mask=attention_mask[unique_rows, :prompt_length],
        position_ids=positions[unique_rows, :prompt_length], cache=cache, use_cache=True, logits_to_keep=1,
    ).logits
    logits = first[row_of]
    if num_actions > 1:
        cache.reorder_cache(row_of)  # every completion gets its prompt's keys and values: [U, ...] -> [B, ...]
        rest = model(  # [B, T-1, V]: completion position t predicts a_{t+1}
            input_ids=completion_ids[:, :-1], attention_mask=attention_mask[:, :-1],
            position_ids=positions[:, prompt_length:-1], cache=cache, use_cache=True,
        ).logits
        logits = torch.cat([logits, rest], dim=1)
    return logits


def _shared_prompts(model, prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(first row of each distinct prompt, its index for every row)``, or None when sharing cannot help
    (all prompts distinct) or cannot work (gradient checkpointing turns the model's cache off)."""
    body = getattr(model, "module", model)
    checkpointing = getattr(body, "is_activation_checkpointing", None)  # transformers >= 5.2x
    if checkpointing is None:
        checkpointing = getattr(body, "is_gradient_checkpointing", False)
    return None if checkpointing else _distinct_rows(prompt_ids, prompt_mask)


def _distinct_rows(prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(first row of each distinct prompt, its index for every row)``, or None when all rows differ."""
    keyed = torch.cat([prompt_ids, prompt_mask.long()], dim=1)
    distinct, row_of = torch.unique(keyed, dim=0, return_inverse=True)
    if distinct.shape[0] == prompt_ids.shape[0]:
        return None
    first_row = torch.full((distinct.shape[0],), prompt_ids.shape[0], dtype=torch.long, device=prompt_ids.device)
    first_row = first_row.scatter_reduce(0, row_of, torch.arange(prompt_ids.shape[0], device=prompt_ids.device), "amin")
    return first_row, row_of


def encode_prompts(tokenizer, prompts: list[Any], device: torch.device | str = "cpu",
                   chat_template_kwargs: dict[str, Any] | None = None) -> tuple[Tensor, Tensor]:
    """Left-padded ``(prompt_ids, prompt_mask)`` ``[B, P]``.

    Text prompts are encoded with the tokenizer's own special tokens; conversations (lists of messages)
    are rendered with the chat template and encoded without them (``chat.prompt_texts``).
    """
    texts, special_tokens = prompt_texts(tokenizer, list(prompts), chat_template_kwargs, where="prompts")
    return _encode_texts(tokenizer, texts, special_tokens, device)


def _encode_texts(tokenizer, texts: list[str], special_tokens: bool, device) -> tuple[Tensor, Tensor]:
    encoded = tokenizer(texts, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=special_tokens)
    return encoded["input_ids"].to(device), encoded["attention_mask"].float().to(device)


def check_prompt_lengths(tokenizer, prompts: list[Any], max_new_tokens: int, max_context: int | None,
                         limit_key: str = "rollout.max_new_tokens",
                         chat_template_kwargs: dict[str, Any] | None = None) -> None:
    """A ``UserError`` naming the longest prompt when some prompt + ``max_new_tokens`` exceeds ``max_context``.

    Checked once before training, so a long prompt met at step 900 cannot end the run. Conversations are
    checked as the model reads them, after the chat template (which also validates every message and that
    the tokenizer has a template: ``chat.prompt_texts``). Only prompts that might not fit are tokenized: a
    token covers at least one UTF-8 byte, so a text of b bytes has at most b tokens plus the tokenizer's
    special tokens. (``rollout`` checks every batch too.)
    """
    prompts = list(prompts)
    texts, special_tokens = prompt_texts(tokenizer, prompts, chat_template_kwargs, where="data")
    if max_context is None:
        return
    room = max_context - max_new_tokens
    special = len(tokenizer("")["input_ids"]) if special_tokens else 0
    suspects = [i for i, text in enumerate(texts) if len(text.encode("utf-8")) + special + 1 > room]
    if not suspects:
        return
    lengths = [len(ids) for ids in tokenizer([texts[i] for i in suspects], add_special_tokens=special_tokens)["input_ids"]]
    too_long = [(n, i) for n, i in zip(lengths, suspects) if n > room]
    if too_long:
        tokens, row = max(too_long)
        shown = repr(prompts[row])
        shown = shown if len(shown) <= 62 else shown[:59] + "..."
        templated = "" if special_tokens else " after the chat template"
        raise UserError(
            f"prompt {shown} (row {row}) is {tokens} tokens{templated}; with {limit_key}={max_new_tokens} it exceeds the "
            f"model's context of {max_context} tokens ({len(too_long)} of {len(prompts)} prompts do). Drop or shorten "
            f"those prompts, or lower {limit_key}"
        )


def decode_completions(tokenizer, completion_ids: Tensor, completion_mask: Tensor, stop: Iterable[str] = ()) -> list[str]:
    """Completion texts without special tokens (EOS, padding), each cut after its first stop string (``cut_at_stop``)."""
    rows = [ids[: int(n)].tolist() for ids, n in zip(completion_ids, completion_mask.sum(-1))]
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    return [cut_at_stop(text, stop) for text in texts] if stop else texts


def truncated(batch: Rollout) -> Tensor:
    """``[B]`` bool: the completion hit ``max_new_tokens`` without EOS or a stop string (``~batch.finished``)."""
    return ~batch.finished


def mask_truncated(batch: Rollout) -> Rollout:
    """``rollout.mask_truncated``: the batch with every truncated completion's mask (and log-probs) zeroed, so it
    carries no gradient; its reward still counts in the baselines of its group and batch.

        completion_mask[b, t] <- completion_mask[b, t] * finished[b]
    """
    keep = batch.finished.to(batch.completion_mask.dtype)[:, None]  # [B, 1]
    return replace(batch, completion_mask=batch.completion_mask * keep, logprobs=batch.logprobs * keep)


def rollout(
    model, tokenizer, prompts: list[Any], completions_per_prompt: int, params: SamplingParams,
    extras: dict[str, list] | None = None, generator: torch.Generator | None = None,
    group_offset: int = 0, max_context: int | None = None, all_finished: Callable[[Tensor], bool] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> Rollout:
    """Sample ``completions_per_prompt`` completions for each prompt and package them as a ``Rollout``.

    Group ids are ``group_offset + index of the prompt``; ``extras`` (dataset columns, one value per
    prompt) are repeated for each completion. ``max_context``: the model's longest sequence; a prompt
    that leaves no room for ``max_new_tokens`` is a ``UserError``. Prompts are text or conversations
    (rendered with ``chat_template_kwargs``); ``batch.prompts`` keeps them as given (the reward functions'
    input), ``batch.completions`` are texts. A completion ends at any of ``stop_token_ids(tokenizer, model)``
    or a stop string of ``params.stop``; ``batch.finished`` is False exactly for the truncated ones.
    """
    device = next(model.parameters()).device
    texts, special_tokens = prompt_texts(tokenizer, list(prompts), chat_template_kwargs, where="prompts")
    repeated = [p for p in prompts for _ in range(completions_per_prompt)]
    prompt_ids, prompt_mask = _encode_texts(tokenizer, [t for t in texts for _ in range(completions_per_prompt)],
                                            special_tokens, device)
    if max_context is not None and prompt_ids.shape[1] + params.max_new_tokens > max_context:
        longest = int(prompt_mask.sum(-1).argmax())
        raise UserError(
            f"prompt {repeated[longest]!r:.200} is {int(prompt_mask[longest].sum())} tokens; with max_new_tokens="
            f"{params.max_new_tokens} it exceeds the model's context of {max_context} tokens. Shorten the prompts "
            "or lower rollout.max_new_tokens"
        )
    stop = (params.stop,) if isinstance(params.stop, str) else tuple(params.stop)
    completion_ids, completion_mask, logprobs, finished = sample_completions(
        model, prompt_ids, prompt_mask, params, stop_token_ids(tokenizer, model), tokenizer.pad_token_id, generator,
        all_finished, stop_strings=StopStrings(tokenizer, stop) if stop else None,
    )
    group_ids = torch.arange(len(prompts), device=device).repeat_interleave(completions_per_prompt) + group_offset
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        logprobs=logprobs,
        group_ids=group_ids,
        prompts=repeated,
        completions=decode_completions(tokenizer, completion_ids, completion_mask, stop),
        finished=finished,
        extras={key: [v for v in column for _ in range(completions_per_prompt)] for key, column in (extras or {}).items()},
    )
