"""The policy scored teacher-forced: ``log pi_theta(a_t | s_t)`` of given completions, for the update and the reference.

    logits[b, t] = model([prompt_b | a_b,0 .. a_b,t-1])[last position]      (only the T completion positions)
    logprobs[b, t] = log_softmax(logits[b, t] / T)[a_b,t] * completion_mask[b, t]

This is the update's side of the policy (with gradients); sampling is the engines' side
(``policy.sampler``). The two meet in ``Rollout.temperature``: the batch says at which T it was sampled.
"""

from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint
from transformers import DynamicCache

from .decoder import cache_argument, growing_cache, positions_from_mask
from .kernels import (head_for_logprobs, hidden_states, linear_logprobs, sharded, sharded_head_logprobs,
                      sparse_tied_embeddings, token_logprobs)
from .prompts import distinct_rows, prefix_layout, shared_prefix

Tensor = torch.Tensor


def completion_logprobs(
    model, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, completion_mask: Tensor,
    temperature: float = 1.0, share_prompts: bool = True, fused_head: bool = True,
    prompt_pass: "tuple[PromptPass, Tensor] | None" = None,
) -> Tensor:
    """``log pi_theta(a_t | s_t)`` ``[B, T]`` for given completions, with gradients; 0 where the mask is 0.

    ``temperature``: T > 0 of ``softmax(logits / T)`` (a batch's ``Rollout.temperature``). Logits are computed
    only at the T positions that predict completion tokens, never at other prompt positions. When several rows
    share a prompt (the completions of one group), the prompt is run once and its key/value cache is reused by
    every completion of the group (the gradient flows through the shared cache): the same log-probs and
    gradients as one forward over ``[prompt | completion]`` per row (``share_prompts=False``), with 1/K of the
    prompt compute. With ``fused_head`` (where ``kernels.head_for_logprobs`` allows it) the model stops at its
    final hidden states and ``kernels.linear_logprobs`` applies the output layer in chunks: no ``[B, T, V]`` logits.
    ``prompt_pass=(PromptPass, rows)``: these are rows ``rows`` of the batch whose prompts that pass ran (a
    micro-batch): their prompts are not run again (see ``PromptPass``).
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
    if prompt_pass is not None and (head is not None) != prompt_pass[0].fused:
        raise ValueError("completion_logprobs: the prompt pass and this call disagree on fused_head")
    if head is not None:
        with hidden_states(head), sparse_tied_embeddings(model, head):
            hidden = _completion_outputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, share_prompts,
                                         prompt_pass)
        return linear_logprobs(hidden, head, completion_ids, temperature) * completion_mask
    logits = _completion_outputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, share_prompts,
                                 prompt_pass)
    return token_logprobs(logits, completion_ids, temperature) * completion_mask


class PromptPass:
    """The distinct prompts of a batch's ``rows``, run once with gradients for all of its micro-batches.

    A micro-batched update (``train.micro_batch_size``) otherwise runs each chunk's prompts in a forward of their
    own: one group's prompt per chunk at 4 rows a chunk, a 46-row forward at SmolLM2's chat prompts, at about half
    the matmul rate of one 368-row forward over all 8 (measured). Here every distinct prompt runs once (a prefix they
    all start with, once for all: ``_prompt_outputs``); each
    micro-batch reads its keys/values (and the prompt's last hidden state, which predicts a_0) through detached
    leaves, whose gradients add up over the micro-batches, and ``backward()`` then sends the sum through the prompt
    pass once. The same gradient (the chain rule, cut at the cache). Its activations stay alive until ``backward()``,
    unless its prompts hold more than ``max_kept_tokens`` tokens: then it keeps none and runs again in
    ``backward()`` (torch's checkpointing, RNG state kept). Without gradients (a reference model) it is a plain
    forward whose cache the chunks read. For one process whose parameters are whole (under DDP the last
    micro-batch's backward is the synchronizing one; sharded forwards are collectives) and a model whose cache is on
    (no checkpointing) and grows (no sliding window).
    """

    def __init__(self, model, prompt_ids: Tensor, prompt_mask: Tensor, rows: list[int], fused_head: bool = True,
                 max_kept_tokens: int | None = None):
        body = getattr(model, "module", model)
        head = head_for_logprobs(model) if fused_head else None
        self.fused = head is not None
        index = torch.as_tensor(rows, dtype=torch.long, device=prompt_ids.device)
        ids, mask = prompt_ids[index], prompt_mask[index]
        groups = distinct_rows(ids, mask)
        unique_rows, row_of = groups if groups is not None else (torch.arange(len(rows), device=ids.device),) * 2
        self.unique_of_row = torch.full((prompt_ids.shape[0],), -1, dtype=torch.long, device=ids.device)
        self.unique_of_row[index] = row_of
        ids, mask = ids[unique_rows], mask[unique_rows].long()
        grad = torch.is_grad_enabled()
        # (counted without a shared prefix, as run.memory's estimate does: kept, the pass would add its activations to
        # every micro-batch's; recomputed, a shared prefix makes it cheaper)
        recompute = grad and max_kept_tokens is not None and int(mask.sum()) > max_kept_tokens
        cache_masks = []

        def prompt_forward(ids: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
            with contextlib.ExitStack() as stack:  # (entered here: a recompute runs outside the caller's)
                for manager in (hidden_states(head), sparse_tied_embeddings(model, head)) if head is not None else ():
                    stack.enter_context(manager)
                first, cache, cache_mask = _prompt_outputs(body, ids, mask)
            cache_masks[:] = [cache_mask]  # (the same on a recompute)
            return (first, *[t for layer in cache.layers for t in (layer.keys, layer.values)])

        self.config = body.config
        if recompute:
            self.outputs = list(torch.utils.checkpoint.checkpoint(prompt_forward, ids, mask, use_reentrant=False))
        else:
            self.outputs = list(prompt_forward(ids, mask))
        self.leaves = [t.detach().requires_grad_() for t in self.outputs] if grad else self.outputs
        self.cache_mask = cache_masks[0]  # [U, P]: which cache slots hold tokens (a shared prefix first)

    @staticmethod
    def usable(model, chunks: int) -> bool:
        """Whether a ``PromptPass`` may serve ``chunks`` micro-batches of ``model`` (see the class doc)."""
        body = getattr(model, "module", model)
        if not (chunks > 1 and body is model and not _collective(model) and _shared_prompts_allowed(model)):
            return False
        return growing_cache(body)  # plain growing layers only: a sliding-window layer counts the slots it has seen

    def chunk(self, rows: Tensor) -> tuple[Tensor, DynamicCache, Tensor]:
        """Batch rows ``rows``: the outputs that predict their a_0 ``[b, 1, *]``, a cache of their prompts and the
        attention mask of its slots ``[b, P]`` (``_prompt_outputs``)."""
        unique = self.unique_of_row[rows]
        if bool((unique < 0).any()):
            raise ValueError("PromptPass.chunk: rows outside the rows this prompt pass ran")
        cache = DynamicCache(config=self.config)
        # index_select, whose backward is an index_add (advanced indexing's is a slower accumulating index_put)
        for layer in range(len(self.leaves) // 2):
            cache.update(self.leaves[1 + 2 * layer].index_select(0, unique),
                         self.leaves[2 + 2 * layer].index_select(0, unique), layer)
        return self.leaves[0].index_select(0, unique), cache, self.cache_mask.index_select(0, unique)

    def backward(self) -> None:
        """The micro-batches' gradients at the cut, sent through the prompt pass (once, after the last of them)."""
        pairs = [(output, leaf.grad) for output, leaf in zip(self.outputs, self.leaves) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        self.outputs, self.leaves = [], []


def _completion_outputs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, share_prompts,
                        prompt_pass=None) -> Tensor:
    """The model's outputs ``[B, T, *]`` at the T positions that predict completion tokens (logits, or
    the hidden states when the head is cut off)."""
    num_actions = completion_ids.shape[1]
    if prompt_pass is not None:  # the prompts ran already, for all micro-batches
        logits, cache, cache_mask = prompt_pass[0].chunk(prompt_pass[1])
    else:
        prompts = _shared_prompts(model, prompt_ids, prompt_mask) if share_prompts else None
        if prompts is None:
            attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
            positions = positions_from_mask(attention_mask)
            return model(
                input_ids=torch.cat([prompt_ids, completion_ids], dim=1), attention_mask=attention_mask,
                position_ids=positions, logits_to_keep=num_actions + 1, use_cache=False,
            ).logits[:, :-1]  # [B, T, V]: position P-1+t predicts a_t
        unique_rows, row_of = prompts
        body = getattr(model, "module", model)  # under DDP the prompt pass bypasses the wrapper: one wrapped forward
        first, cache, cache_mask = _prompt_outputs(body, prompt_ids[unique_rows], prompt_mask[unique_rows].long(),
                                                   share_prefix=not _collective(model))
        if len(unique_rows) < len(row_of):  # (else each row is its own prompt: nothing to copy)
            logits, cache_mask = first[row_of], cache_mask[row_of]
            if num_actions > 1:
                cache.reorder_cache(row_of)  # every completion gets its prompt's keys and values: [U, ...] -> [B, ...]
        else:
            logits = first
    # the cache's slots (a shared prefix first, ``_prompt_outputs``), then the completion: each token's own position
    attention_mask = torch.cat([cache_mask.to(completion_mask.dtype), completion_mask], dim=1).long()
    positions = positions_from_mask(attention_mask)
    if num_actions > 1:
        rest = model(  # [B, T-1, V]: completion position t predicts a_{t+1}
            input_ids=completion_ids[:, :-1], attention_mask=attention_mask[:, :-1],
            position_ids=positions[:, prompt_ids.shape[1]:-1], **cache_argument(model, cache), use_cache=True,
        ).logits
        logits = torch.cat([logits, rest], dim=1)
    return logits


def _prompt_outputs(body, prompt_ids: Tensor, prompt_mask: Tensor,
                    share_prefix: bool = True) -> tuple[Tensor, DynamicCache, Tensor]:
    """One forward over (distinct) prompts: the outputs that predict a_0 ``[U, 1, *]``, their key/value cache and the
    attention mask of its slots ``[U, P]``. A prefix every prompt starts with (``prompts.shared_prefix``: a system
    prompt) runs once, its cache copied to every row, and only each row's own tokens after it run per row: the cache
    then holds the prefix first (``prompts.prefix_layout``), which the returned mask says. The same keys, values and
    outputs to rounding, the gradient flowing back through the copies (their sum) into the one prefix pass.
    ``share_prefix=False``: one forward whatever the prompts (sharded forwards are collectives: every process must run
    as many)."""
    prefix = shared_prefix(prompt_ids, prompt_mask) if share_prefix and growing_cache(body) else 0
    cache = DynamicCache(config=body.config)
    if prefix:
        prefix_ids, prompt_ids, suffix_mask = prefix_layout(prompt_ids, prompt_mask, prefix)
        body(input_ids=prefix_ids, attention_mask=torch.ones_like(prefix_ids),
             position_ids=torch.arange(prefix, device=prefix_ids.device)[None], **cache_argument(body, cache),
             use_cache=True, logits_to_keep=1)
        cache.reorder_cache(torch.zeros(prompt_ids.shape[0], dtype=torch.long, device=prompt_ids.device))
        prompt_mask = torch.cat([torch.ones_like(suffix_mask[:, :1]).expand(-1, prefix), suffix_mask], dim=1)
    positions = positions_from_mask(prompt_mask)[:, prefix:]
    first = body(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions,
                 **cache_argument(body, cache), use_cache=True, logits_to_keep=1).logits
    return first, cache, prompt_mask


def _shared_prompts(model, prompt_ids: Tensor, prompt_mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(first row of each distinct prompt, its index for every row)``, or None when sharing cannot help
    (all prompts distinct) or cannot work (gradient checkpointing turns the model's cache off). With sharded
    parameters (FSDP, ZeRO-3: every forward a collective) distinct prompts still take the shared path, each its own
    group, so that every process runs the same two forwards."""
    if not _shared_prompts_allowed(model):
        return None
    groups = distinct_rows(prompt_ids, prompt_mask)
    if groups is None and (_collective(model) or shared_prefix(prompt_ids, prompt_mask) and growing_cache(model)):
        # distinct prompts: each its own group (a prefix they share still runs once, ``_prompt_outputs``)
        rows = torch.arange(prompt_ids.shape[0], device=prompt_ids.device)
        return rows, rows
    return groups


def _shared_prompts_allowed(model) -> bool:
    """False when gradient checkpointing turns the model's cache off."""
    body = getattr(model, "module", model)
    checkpointing = getattr(body, "is_activation_checkpointing", None)  # transformers >= 5.2x
    if checkpointing is None:
        checkpointing = getattr(body, "is_gradient_checkpointing", False)
    return not checkpointing


def _collective(model) -> bool:
    """Are the model's forwards collectives (parameters sharded between forwards: FSDP2, ZeRO-3)?"""
    return sharded(next(getattr(model, "module", model).parameters()))


__all__ = ["PromptPass", "completion_logprobs"]
