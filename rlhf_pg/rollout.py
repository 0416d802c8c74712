"""Sample completions from a causal-LM policy, and recompute their log-probabilities for the update.

Sampling is a plain loop over decode steps with a KV cache (``decoder``): one prefill forward over
the left-padded prompts, then one single-token forward per step, stopping as soon as every sequence
has emitted EOS. The policy pi_theta(a | s) is ``softmax(logits(s) / temperature)``; the same
temperature is used when the update recomputes log-probabilities, so both sides agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache

from .decoder import make_decoder, positions_from_mask
from .errors import UserError
from .core.mdp import Rollout

Tensor = torch.Tensor


@dataclass
class SamplingParams:
    """How completions are drawn. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    min_new_tokens: int = 0


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / temperature)[tokens]`` without materializing the full log-softmax.

    ``logits``: ``[..., V]``, ``tokens``: ``[...]``. Computed as ``logit[token] - logsumexp(logits)``
    in float32 one row-block at a time, so no second ``[..., V]`` float32 tensor is kept.
    """
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float()
    flat = logits.reshape(-1, logits.shape[-1])
    chunk = 4096
    lse = torch.cat([torch.logsumexp(flat[i : i + chunk].float(), dim=-1) for i in range(0, flat.shape[0], chunk)])
    return picked - lse.view(picked.shape)


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
        # Exponential race: argmax_v p_v / E_v with E_v = -log U_v ~ Exp(1) is a draw from p
        # (uniforms are several times cheaper to draw than exponential_ or multinomial on CPU)
        race = torch.rand(probs.shape, generator=generator, device=probs.device).log_().neg_()
        action = (sampling / race).argmax(-1)
    return action, probs.gather(-1, action[:, None]).squeeze(-1).log()


def sample_completions(
    model,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    params: SamplingParams,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator | None = None,
    all_finished: Callable[[Tensor], bool] | None = None,
    lean: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw one completion per prompt row. Returns ``(completion_ids, completion_mask, logprobs, finished)``.

    ``prompt_ids``, ``prompt_mask``: ``[B, P]``, left-padded. ``completion_ids`` ``[B, T]`` is
    right-padded with ``pad_token_id`` after EOS; ``completion_mask`` is 1 up to and including EOS;
    ``logprobs[b, t] = log pi(a_t | s_t)`` of the drawn token; ``finished[b]`` says EOS was emitted.
    T <= max_new_tokens: the loop stops once every row has finished (``all_finished(finished)``; with
    sharded parameters (ZeRO-3, FSDP) every process must run the same number of forwards, so the
    trainer passes a check that all-reduces across processes). ``lean=False`` forces transformers'
    own forward (see ``decoder``).
    """
    # inference mode (cheaper per op than no_grad); the results are copied out of it so that the
    # update's autograd graph may use them (an inference tensor cannot be saved for backward)
    with torch.inference_mode():
        sampled = _sample(model, prompt_ids, prompt_mask, params, eos_token_id, pad_token_id, generator,
                          all_finished, lean)
    return tuple(tensor.clone() for tensor in sampled)


def _sample(model, prompt_ids, prompt_mask, params, eos_token_id, pad_token_id, generator, all_finished, lean):
    all_finished = all_finished or (lambda done: bool(done.all()))
    batch_size = prompt_ids.shape[0]
    decoder = make_decoder(model, batch_size, prompt_ids.shape[1] + params.max_new_tokens, lean=lean)
    logits = decoder.prefill(prompt_ids, prompt_mask)
    temperature = params.temperature if params.temperature > 0 else 1.0
    finished = torch.zeros(batch_size, dtype=torch.bool, device=prompt_ids.device)
    tokens, logprobs, masks = [], [], []
    for step in range(params.max_new_tokens):
        # min_new_tokens constrains the *sampler*; the recorded log-probs stay those of the policy
        allowed = logits.index_fill(-1, torch.tensor([eos_token_id], device=logits.device), float("-inf")) \
            if step < params.min_new_tokens else logits
        action, action_logprob = _choose_tokens(allowed, params, generator)
        if allowed is not logits:  # the policy's log-prob, not the EOS-masked sampler's
            action_logprob = token_logprobs(logits, action, temperature)
        action = action.masked_fill(finished, pad_token_id)
        logprobs.append(action_logprob)
        masks.append(~finished)
        tokens.append(action)
        finished = finished | (action == eos_token_id)
        if step == params.max_new_tokens - 1 or all_finished(finished):
            break
        logits = decoder.step(action)
    completion_mask = torch.stack(masks, 1).float()
    return torch.stack(tokens, 1), completion_mask, torch.stack(logprobs, 1) * completion_mask, finished


def completion_logprobs(
    model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor,
    temperature: float = 1.0, share_prompts: bool = True,
) -> Tensor:
    """``log pi_theta(a_t | s_t)`` ``[B, T]`` for given completions, with gradients; 0 where the mask is 0.

    Logits are computed only at the T positions that predict completion tokens, never at other
    prompt positions. When several rows share a prompt (the completions of one group), the prompt
    is run once and its key/value cache is reused by every completion of the group (the gradient
    flows through the shared cache): the same log-probs and gradients as one forward over
    ``[prompt | completion]`` per row (``share_prompts=False``), with 1/K of the prompt compute.
    """
    temperature = temperature if temperature > 0 else 1.0
    prompts = _shared_prompts(model, prompt_ids, prompt_mask) if share_prompts else None
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    positions = positions_from_mask(attention_mask)
    num_actions = completion_ids.shape[1]
    if prompts is None:
        logits = model(
            input_ids=torch.cat([prompt_ids, completion_ids], dim=1), attention_mask=attention_mask,
            position_ids=positions, logits_to_keep=num_actions + 1, use_cache=False,
        ).logits[:, :-1]  # [B, T, V]: position P-1+t predicts a_t
        return token_logprobs(logits, completion_ids, temperature) * completion_mask
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
    return token_logprobs(logits, completion_ids, temperature) * completion_mask


def _shared_prompts(model, prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(first row of each distinct prompt, its index for every row)``, or None when sharing cannot help
    (all prompts distinct) or cannot work (gradient checkpointing turns the model's cache off)."""
    body = getattr(model, "module", model)
    checkpointing = getattr(body, "is_activation_checkpointing", None)  # transformers >= 5.2x
    if checkpointing is None:
        checkpointing = getattr(body, "is_gradient_checkpointing", False)
    if checkpointing:
        return None
    keyed = torch.cat([prompt_ids, prompt_mask.long()], dim=1)
    distinct, row_of = torch.unique(keyed, dim=0, return_inverse=True)
    if distinct.shape[0] == prompt_ids.shape[0]:
        return None
    first_row = torch.full((distinct.shape[0],), prompt_ids.shape[0], dtype=torch.long, device=prompt_ids.device)
    first_row = first_row.scatter_reduce(0, row_of, torch.arange(prompt_ids.shape[0], device=prompt_ids.device), "amin")
    return first_row, row_of


def encode_prompts(tokenizer, prompts: list[str], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Left-padded ``(prompt_ids, prompt_mask)`` ``[B, P]`` with the tokenizer's own special tokens."""
    encoded = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
    return encoded["input_ids"].to(device), encoded["attention_mask"].float().to(device)


def check_prompt_lengths(tokenizer, prompts: list[str], max_new_tokens: int, max_context: int | None,
                         limit_key: str = "rollout.max_new_tokens") -> None:
    """A ``UserError`` naming the longest prompt when some prompt + ``max_new_tokens`` exceeds ``max_context``.

    Checked once before training, so a long prompt met at step 900 cannot end the run. Only prompts
    that might not fit are tokenized: a token covers at least one UTF-8 byte, so a prompt of b bytes
    has at most b tokens plus the tokenizer's special tokens. (``rollout`` checks every batch too.)
    """
    if max_context is None:
        return
    room = max_context - max_new_tokens
    special = len(tokenizer("")["input_ids"])
    suspects = [p for p in prompts if len(p.encode("utf-8")) + special + 1 > room]
    if not suspects:
        return
    lengths = [len(ids) for ids in tokenizer(suspects)["input_ids"]]
    too_long = [(n, p) for n, p in zip(lengths, suspects) if n > room]
    if too_long:
        tokens, prompt = max(too_long, key=lambda pair: pair[0])
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        raise UserError(
            f"prompt {shown!r} is {tokens} tokens; with {limit_key}={max_new_tokens} it exceeds the model's context "
            f"of {max_context} tokens ({len(too_long)} of {len(prompts)} prompts do). Drop or shorten those prompts, "
            f"or lower {limit_key}"
        )


def decode_completions(tokenizer, completion_ids: Tensor, completion_mask: Tensor) -> list[str]:
    """Completion texts without special tokens (EOS, padding)."""
    rows = [ids[: int(n)].tolist() for ids, n in zip(completion_ids, completion_mask.sum(-1))]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


def rollout(
    model, tokenizer, prompts: list[str], completions_per_prompt: int, params: SamplingParams,
    extras: dict[str, list] | None = None, generator: torch.Generator | None = None,
    group_offset: int = 0, max_context: int | None = None, all_finished: Callable[[Tensor], bool] | None = None,
) -> Rollout:
    """Sample ``completions_per_prompt`` completions for each prompt and package them as a ``Rollout``.

    Group ids are ``group_offset + index of the prompt``; ``extras`` (dataset columns, one value per
    prompt) are repeated for each completion. ``max_context``: the model's longest sequence; a prompt
    that leaves no room for ``max_new_tokens`` is a ``UserError``.
    """
    device = next(model.parameters()).device
    repeated = [p for p in prompts for _ in range(completions_per_prompt)]
    prompt_ids, prompt_mask = encode_prompts(tokenizer, repeated, device)
    if max_context is not None and prompt_ids.shape[1] + params.max_new_tokens > max_context:
        longest = int(prompt_mask.sum(-1).argmax())
        raise UserError(
            f"prompt {repeated[longest]!r} is {int(prompt_mask[longest].sum())} tokens; with max_new_tokens="
            f"{params.max_new_tokens} it exceeds the model's context of {max_context} tokens. Shorten the prompts "
            "or lower rollout.max_new_tokens"
        )
    completion_ids, completion_mask, logprobs, finished = sample_completions(
        model, prompt_ids, prompt_mask, params, tokenizer.eos_token_id, tokenizer.pad_token_id, generator, all_finished
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
        completions=decode_completions(tokenizer, completion_ids, completion_mask),
        finished=finished,
        extras={key: [v for v in column for _ in range(completions_per_prompt)] for key, column in (extras or {}).items()},
    )
