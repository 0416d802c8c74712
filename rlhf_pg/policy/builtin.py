"""The built-in engine (``rollout.engine: builtin``): a KV-cached decode loop over the policy's own parameters.

    one prefill over the left-padded distinct prompts (a group's K rows share one, its cache copied to each; a prefix
        all prompts start with, e.g. a system prompt, prefilled once and copied to each prompt)
    for t in 0 .. max_new_tokens-1:
        a_t ~ pi_theta(. | s_t) = softmax(logits(s_t) / T)    (greedy at T = 0; top-p nucleus when top_p < 1)
        stop the row at an EOS id or a completed stop string; stop the loop once every row has stopped
        logits <- one single-token forward (``decoder``)

It samples from the very tensors the optimizer updates, so ``update_weights`` has nothing to copy, and its
log-probs are the trainer's up to float rounding. A completion ends at the first of: any EOS id
(``prompts.stop_token_ids``: the tokenizer's and every id of the model's ``generation_config.eos_token_id``,
e.g. a chat model's end-of-turn token), the first occurrence of a stop string (``SamplingParams.stop``), or
``max_new_tokens`` (then it is *truncated*: ``finished[b]`` is False).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from ..core.mdp import Rollout
from .decoder import growing_cache, make_decoder
from .kernels import token_logprobs
from .packed import packed_linears
from .prompts import (StopStrings, decode_completions, distinct_rows, encode_prompts, prefix_layout, shared_prefix,
                      stop_token_ids)
from .sampler import SamplingParams

Tensor = torch.Tensor


def choose_tokens(logits: Tensor, params: SamplingParams, generator: torch.Generator | None,
                  banned: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Next tokens ``[B]`` from last-position logits ``[B, V]`` and their log-probabilities under the policy.

    Greedy when ``temperature == 0`` (log-probs then at ``params.policy_temperature`` = 1), else sampled from
    ``softmax(logits / temperature)``, restricted to the top-p nucleus when ``top_p < 1`` (the log-probs stay
    those of the unrestricted policy). ``banned``: token ids never drawn (EOS before ``min_new_tokens``): the
    draw is from the policy renormalized without them, the log-probs stay the policy's.
    """
    temperature = params.policy_temperature
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    if params.temperature > 0.0 and params.top_p >= 1.0 and logits.device.type == "cpu":
        # inverse CDF: one uniform per row, the first token whose cumulative mass exceeds it (~2x cheaper than a
        # race). Banned tokens get weight 0 in place: a drawn token is never one of them, so its probability read
        # back is still the policy's (no second softmax over the vocabulary for the log-probs)
        probs = torch.softmax(scaled, dim=-1)
        action = _inverse_cdf(probs if banned is None else probs.index_fill_(-1, banned, 0.0), generator)
        if action is not None:
            return action, probs.gather(-1, action[:, None]).squeeze(-1).log()
        # (None: some row's unbanned mass underflowed to 0; the draw below renormalizes over the allowed logits)
    if banned is not None:
        action, _ = choose_tokens(logits.index_fill(-1, banned, float("-inf")), params, generator)
        return action, token_logprobs(logits, action, temperature)
    probs = torch.softmax(scaled, dim=-1)
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


INVERSE_CDF_BLOCK = 256  # tokens per block of the two-level inverse-CDF search


def _inverse_cdf(weights: Tensor, generator: torch.Generator | None) -> Tensor | None:
    """Per row of non-negative ``weights`` ``[B, V]`` (not necessarily normalized), the token i with
    ``c_{i-1} <= u c_V < c_i`` (c the cumulative sum, u one uniform per row): a draw from ``weights / c_V``. The
    cumulative sums are taken in two levels (blocks of ``INVERSE_CDF_BLOCK`` tokens, then within the one block that
    holds the threshold): the same draw as one cumulative sum over the vocabulary (1.8 ms for 32 x 49,152, the
    largest part of the draw), with less rounding. A drawn token always has positive weight. None when a row's
    weights sum to 0."""
    rows, vocab = weights.shape
    threshold = torch.rand(rows, 1, generator=generator, device=weights.device)
    block = INVERSE_CDF_BLOCK if vocab >= 4 * INVERSE_CDF_BLOCK else vocab  # a small vocabulary: one block
    full = vocab // block
    sums = weights[:, : full * block].view(rows, full, block).sum(-1)
    if full * block < vocab:
        sums = torch.cat([sums, weights[:, full * block :].sum(-1, keepdim=True)], dim=-1)
    cumulative = sums.cumsum(-1)
    total = cumulative[:, -1:]
    if not bool((total > 0).all()):
        return None
    # u c_V stays below c_V even where the product rounds up: the block found has positive mass
    threshold = torch.minimum(threshold * total, torch.nextafter(total, torch.zeros_like(total)))
    chosen = torch.searchsorted(cumulative, threshold, right=True).clamp_(max=sums.shape[1] - 1)  # [B, 1]
    before = torch.where(chosen > 0, cumulative.gather(-1, (chosen - 1).clamp(min=0)), 0.0)
    block_start = chosen * block
    index = block_start + torch.arange(block, device=weights.device)
    inside = index < vocab
    local = weights.gather(-1, index.clamp(max=vocab - 1)).masked_fill_(~inside, 0.0).cumsum(-1)
    # within the block: below the block's own total, so the token found has positive weight despite rounding
    target = (threshold - before).clamp_(min=0.0)
    target = torch.minimum(target, torch.nextafter(local[:, -1:], torch.zeros_like(target)))
    return (block_start + torch.searchsorted(local, target, right=True)).squeeze(-1).clamp_(max=vocab - 1)


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
    # the linear layers' weights packed once for oneDNN (packed.packed_linears): they do not change while decoding
    with torch.inference_mode(), packed_linears(model, prompt_ids.shape[0]):
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
    decoder, logits = prefill_prompts(model, prompt_ids, prompt_mask, max_length, lean)
    finished = torch.zeros(batch_size, dtype=torch.bool, device=prompt_ids.device)
    tokens, logprobs, masks = [], [], []
    for step in range(params.max_new_tokens):
        # min_new_tokens constrains the *sampler* (no EOS drawn before it); the recorded log-probs stay the policy's
        action, action_logprob = choose_tokens(logits, params, generator,
                                               banned=eos if step < params.min_new_tokens else None)
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


def prefill_prompts(model, prompt_ids: Tensor, prompt_mask: Tensor, max_length: int, lean: bool = True):
    """``(decoder, logits [B, V])``: a decoder (``make_decoder``, room for ``max_length`` tokens a row) holding the
    left-padded prompts' cache, and each row's next-token logits. The K rows of a prompt share its prefill (run once,
    its cache copied to each), and a prefix every prompt starts with (``prompts.shared_prefix``: a system prompt) is
    prefilled once for all of them, each prompt's own tokens after it (``decoder.extend``); not for a sliding-window
    cache (``decoder.growing_cache``)."""
    batch_size = prompt_ids.shape[0]
    groups = distinct_rows(prompt_ids, prompt_mask)
    ids, mask = (prompt_ids, prompt_mask) if groups is None else (prompt_ids[groups[0]], prompt_mask[groups[0]])
    prefix = shared_prefix(ids, mask) if growing_cache(model) else 0
    if prefix:
        prefix_ids, suffix_ids, suffix_mask = prefix_layout(ids, mask, prefix)
        decoder = make_decoder(model, 1, max_length, lean=lean, rows=batch_size)
        decoder.prefill(prefix_ids, torch.ones_like(prefix_ids))
        decoder.expand(torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device))
        logits = decoder.extend(suffix_ids, suffix_mask.bool())
    else:
        decoder = make_decoder(model, ids.shape[0], max_length, lean=lean, rows=batch_size)
        logits = decoder.prefill(ids, mask)
    if groups is not None:
        logits = logits[groups[1]]
        decoder.expand(groups[1])
    return decoder, logits


class BuiltinSampler:
    """``rollout.engine: builtin``: the ``Sampler`` that decodes with the policy model itself (``decoder``).

    ``max_context``: the model's longest sequence (a prompt that leaves no room for ``max_new_tokens`` is a
    ``UserError``); ``all_finished``: see ``sample_completions``; ``chat_template_kwargs``: for conversation
    prompts; ``lean=False`` forces transformers' own forward.
    """

    engine = "builtin"

    def __init__(self, model, tokenizer, *, max_context: int | None = None,
                 all_finished: Callable[[Tensor], bool] | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None, lean: bool = True):
        self.model, self.tokenizer, self.max_context = model, tokenizer, max_context
        self.all_finished, self.chat_template_kwargs, self.lean = all_finished, chat_template_kwargs, lean

    def sample(self, prompts: list[Any], k: int, params: SamplingParams, *, columns: dict[str, list] | None = None,
               generator: torch.Generator | None = None, group_offset: int = 0) -> Rollout:
        """K completions per prompt (``Sampler.sample``); ``batch.prompts`` keeps the prompts as given (the
        reward functions' input), ``batch.completions`` are texts cut after a stop string."""
        model, tokenizer = self.model, self.tokenizer
        device = next(model.parameters()).device
        repeated = [p for p in prompts for _ in range(k)]
        prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device, self.chat_template_kwargs,
                                                 params.max_new_tokens, self.max_context)
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(k, 0), prompt_mask.repeat_interleave(k, 0)
        completion_ids, completion_mask, logprobs, finished = sample_completions(
            model, prompt_ids, prompt_mask, params, stop_token_ids(tokenizer, model), tokenizer.pad_token_id, generator,
            self.all_finished, self.lean, StopStrings(tokenizer, params.stop) if params.stop else None,
        )
        return Rollout(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
            completion_mask=completion_mask, logprobs=logprobs,
            group_ids=torch.arange(len(prompts), device=device).repeat_interleave(k) + group_offset,
            prompts=repeated, completions=decode_completions(tokenizer, completion_ids, completion_mask, params.stop),
            finished=finished, extras={key: [v for v in column for _ in range(k)] for key, column in (columns or {}).items()},
            temperature=params.policy_temperature,
        )

    def update_weights(self, model) -> None:
        """Nothing to copy: the engine decodes with the policy's own parameters (``model`` is kept, in case the
        caller hands a different object, e.g. one loaded from a checkpoint)."""
        self.model = model

    def close(self) -> None:
        """Nothing to free."""


__all__ = ["BuiltinSampler", "choose_tokens", "prefill_prompts", "sample_completions"]
