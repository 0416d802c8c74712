"""The policy scored teacher-forced: ``log pi_theta(a_t | s_t)`` of given completions, for the update and the reference.

    logits[b, t] = model([prompt_b | a_b,0 .. a_b,t-1])[last position]      (only the T completion positions)
    logprobs[b, t] = log_softmax(logits[b, t] / T)[a_b,t] * completion_mask[b, t]

This is the update's side of the policy (with gradients); sampling is the engines' side
(``policy.sampler``). The two meet in ``Rollout.temperature``: the batch says at which T it was sampled.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .decoder import cache_argument, positions_from_mask
from .kernels import (head_for_logprobs, hidden_states, linear_logprobs, sharded, sharded_head_logprobs,
                      sparse_tied_embeddings, token_logprobs)
from .prompts import distinct_rows

Tensor = torch.Tensor


def completion_logprobs(
    model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor,
    temperature: float = 1.0, share_prompts: bool = True, fused_head: bool = True,
) -> Tensor:
    """``log pi_theta(a_t | s_t)`` ``[B, T]`` for given completions, with gradients; 0 where the mask is 0.

    ``temperature``: T > 0 of ``softmax(logits / T)`` (a batch's ``Rollout.temperature``). Logits are computed
    only at the T positions that predict completion tokens, never at other prompt positions. When several rows
    share a prompt (the completions of one group), the prompt is run once and its key/value cache is reused by
    every completion of the group (the gradient flows through the shared cache): the same log-probs and
    gradients as one forward over ``[prompt | completion]`` per row (``share_prompts=False``), with 1/K of the
    prompt compute. With ``fused_head`` (where ``kernels.head_for_logprobs`` allows it) the model stops at its
    final hidden states and ``kernels.linear_logprobs`` applies the output layer in chunks: no ``[B, T, V]`` logits.
    """
    if not temperature > 0:
        raise ValueError(f"completion_logprobs: temperature must be > 0, got {temperature} "
                         "(greedy batches are scored at SamplingParams.policy_temperature = 1)")
    if share_prompts and completion_ids.shape[1] == 1 and _collective(model):
        # sharded forwards are collectives: every process runs the same two (prompt pass, completion pass), so a
        # one-token batch gets a masked second column
        padded = (torch.nn.functional.pad(completion_ids, (0, 1)), torch.nn.functional.pad(completion_mask, (0, 1)))
        return completion_logprobs(model, prompt_ids, prompt_mask, *padded, temperature, share_prompts, fused_head)[:, :1]
    head = head_for_logprobs(model) if fused_head else None
    gathered_head = sharded_head_logprobs(model) if fused_head and head is None else None
    if gathered_head is not None:  # FSDP2: the same chunked head, its weight gathered for it
        with hidden_states(gathered_head[0]):
            hidden = _completion_outputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, share_prompts)
        return gathered_head[1](hidden, completion_ids, temperature) * completion_mask
    if head is not None:
        with hidden_states(head), sparse_tied_embeddings(model, head):
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
        position_ids=positions[unique_rows, :prompt_length], **cache_argument(body, cache), use_cache=True,
        logits_to_keep=1,
    ).logits
    logits = first[row_of]
    if num_actions > 1:
        cache.reorder_cache(row_of)  # every completion gets its prompt's keys and values: [U, ...] -> [B, ...]
        rest = model(  # [B, T-1, V]: completion position t predicts a_{t+1}
            input_ids=completion_ids[:, :-1], attention_mask=attention_mask[:, :-1],
            position_ids=positions[:, prompt_length:-1], **cache_argument(model, cache), use_cache=True,
        ).logits
        logits = torch.cat([logits, rest], dim=1)
    return logits


def _shared_prompts(model, prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(first row of each distinct prompt, its index for every row)``, or None when sharing cannot help
    (all prompts distinct) or cannot work (gradient checkpointing turns the model's cache off). With sharded
    parameters (FSDP, ZeRO-3: every forward a collective) distinct prompts still take the shared path, each its own
    group, so that every process runs the same two forwards."""
    body = getattr(model, "module", model)
    checkpointing = getattr(body, "is_activation_checkpointing", None)  # transformers >= 5.2x
    if checkpointing is None:
        checkpointing = getattr(body, "is_gradient_checkpointing", False)
    if checkpointing:
        return None
    groups = distinct_rows(prompt_ids, prompt_mask)
    if groups is None and _collective(model):
        rows = torch.arange(prompt_ids.shape[0], device=prompt_ids.device)
        return rows, rows
    return groups


def _collective(model) -> bool:
    """Are the model's forwards collectives (parameters sharded between forwards: FSDP2, ZeRO-3)?"""
    return sharded(next(getattr(model, "module", model).parameters()))


__all__ = ["completion_logprobs"]
