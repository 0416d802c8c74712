"""The policy-gradient update, shared by every LM command (``train``'s REINFORCE step, ``sft``'s A = 1 step, the
SFT warm-up): one or more passes over a batch of trajectories, each a gradient step on the aggregated loss.

    loss = -sum_i sum_t w_it A_it log pi_theta(a_it | s_it) / norm     (core/losses.py; norm from ``aggregation``)
    theta <- theta - lr * clip(grad loss)                              (skipped when not finite)
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from ..core.correction import GapStats, sampler_correction
from ..core.losses import aggregate, kl_estimate, off_policy_loss, policy_gradient_loss
from ..core.mdp import Rollout, action_tokens
from .kernels import direct_weight_grads, sharded
from .logprobs import PromptPass, completion_logprobs


@dataclass
class UpdateResult:
    loss: float
    grad_norm: float
    applied: bool
    stats: dict[str, float] = field(default_factory=dict)
    gap: GapStats | None = None  # the first pass's sampler/trainer gap (this process's sums)


def policy_update(
    model, optimizer, accelerator, batch: Rollout, advantages: torch.Tensor, *, global_counts: tuple[float, float],
    aggregation: str = "seq-mean-token-sum", micro_batch_size: int | None = None,
    max_grad_norm: float | None = None, updates_per_batch: int = 1, clip_eps: float = 0.2,
    clip_eps_high: float | None = None, ratio_level: str = "token", max_approx_kl: float | None = None,
    kl_coef: float = 0.0, kl_estimator: str = "k1", importance: str = "clip", norm_length: float | None = None,
    is_correction: str = "none", is_cap: float = 2.0, is_level: str = "token",
) -> list[UpdateResult]:
    """``updates_per_batch`` optimizer steps on one rollout batch, in micro-batches.

    log pi_theta is recomputed at the batch's own temperature (``batch.temperature``: the policy that sampled it);
    its first pass, before any optimizer step, is compared with the sampler's log-probs (``batch.logprobs``): the
    gap is measured and, with ``is_correction`` (``core.correction``), each token's advantage is weighted by the
    importance weight w of pi_theta against the sampler. One update: the REINFORCE loss. Several: the importance-weighted loss against the log-probs of the
    first pass (so the first step's ratio is exactly 1), PPO-clipped (``importance="clip"``) or CISPO-
    truncated (``"truncate"``), stopping early once the approximate KL to pi_old exceeds ``max_approx_kl``.
    ``norm_length``: the constant L of the ``seq-mean-token-sum-norm`` aggregation (Dr. GRPO). ``global_counts`` = (sequences, tokens) of the
    whole batch per process, so micro-batch and per-process losses add up to the full-batch loss.
    ``kl_coef > 0`` adds ``kl_coef * KL(pi || pi_ref)`` to the loss (``batch.ref_logprobs``: the KL-as-loss
    placement; the KL-in-reward placement is done to the rewards before the advantages).

    Completions whose advantage is 0 at every token contribute exactly 0 to the loss and its gradient
    (e.g. a group whose completions all got the same reward), so they are not run through the model:
    the gradient is unchanged, the update is cheaper. (Not with a KL loss term, which they do feed.)
    """
    num_sequences, num_tokens = global_counts
    rows = list(range(len(batch)))
    if kl_coef == 0:
        active = (advantages != 0).any(-1).nonzero().flatten().tolist()
        rows = active or rows[:1]  # keep one row so every process still joins the gradient all-reduce
    micro = micro_batch_size or len(rows)
    chunks = [rows[start : start + micro] for start in range(0, len(rows), micro)]
    real_chunks = len(chunks)
    if accelerator.num_processes > 1 and sharded(next(model.parameters())):
        # FSDP / ZeRO-3: every forward and backward is a collective, so all processes run as many micro-batches;
        # the extra ones (a row again, its loss times 0) add nothing to the gradient
        most = int(accelerator.reduce(torch.tensor(len(chunks), device=batch.completion_mask.device), "max"))
        chunks += [rows[:1]] * (most - len(chunks))
    # one prompt pass for all micro-batches (logprobs.PromptPass): one process, whole parameters, cache on
    shared_prompts = accelerator.num_processes == 1 and PromptPass.usable(model, len(chunks))
    old_logprobs = torch.zeros_like(batch.completion_mask)
    is_weights = torch.ones_like(batch.completion_mask)
    gap = GapStats()
    results = []
    # backward passes add d/dW straight into .grad (kernels.direct_weight_grads) where no wrapper watches gradients
    direct = accelerator.num_processes == 1 and getattr(model, "module", model) is model and not sharded(
        next(model.parameters()))
    for epoch in range(updates_per_batch):
        total_loss, ratio_stats = 0.0, []
        prompt_pass = None
        if shared_prompts:  # per pass over the batch: theta changed since the last one
            with accelerator.autocast():
                kept = _kept_prompt_tokens(model, accelerator, micro * batch.completion_ids.shape[1])
                prompt_pass = PromptPass(model, batch.prompt_ids, batch.prompt_mask, rows, max_kept_tokens=kept)
        for index, chunk in enumerate(chunks):
            part = batch.select(chunk)
            part_adv = advantages[chunk]
            last_chunk, padding = index == len(chunks) - 1, index >= real_chunks
            # gradient accumulation: no all-reduce (DDP) and no optimizer step (DeepSpeed) before the last chunk
            accelerator.gradient_state._set_sync_gradients(last_chunk)
            sync = contextlib.nullcontext() if last_chunk else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                rows_of_part = torch.as_tensor(chunk, device=batch.completion_mask.device)
                logprobs = completion_logprobs(model, part.prompt_ids, part.prompt_mask, part.completion_ids,
                                               part.completion_mask, batch.temperature,
                                               prompt_pass=(prompt_pass, rows_of_part) if prompt_pass else None)
                mask = action_tokens(part)  # completion_mask, without an episode's observation tokens
                if epoch == 0 and not padding:  # pi_theta before any step, against the sampler's log-probs (core/correction.py)
                    old_logprobs[chunk] = logprobs.detach()
                    weights, chunk_gap = sampler_correction(logprobs, part.logprobs, mask, is_correction, is_cap, is_level)
                    gap = gap.add(chunk_gap)
                    if is_correction != "none":
                        is_weights[chunk] = weights
                if is_correction != "none":
                    part_adv = part_adv * is_weights[chunk]  # w_t A_t: the estimate under the sampler's draws
                if updates_per_batch == 1:
                    loss = policy_gradient_loss(logprobs, part_adv, mask, aggregation, num_sequences, num_tokens,
                                                norm_length)
                else:
                    loss, stats = off_policy_loss(
                        importance, logprobs, old_logprobs[chunk], part_adv, mask, clip_eps, clip_eps_high,
                        ratio_level, aggregation, num_sequences, num_tokens, norm_length,
                    )
                    ratio_stats += [] if padding else [stats]
                if kl_coef > 0:
                    kl = kl_estimate(logprobs, part.ref_logprobs, kl_estimator)
                    loss = loss + kl_coef * aggregate(kl, mask, aggregation, num_sequences, num_tokens, norm_length)
                with direct_weight_grads(direct):
                    accelerator.backward(loss * 0.0 if padding else loss)
            total_loss += 0.0 if padding else float(loss.detach())
        if prompt_pass is not None:
            with direct_weight_grads(direct):
                prompt_pass.backward()  # the micro-batches' gradients at the prompts' cache, through the prompt pass
        accelerator.gradient_state._set_sync_gradients(True)
        result = _optimizer_step(model, optimizer, accelerator, total_loss, max_grad_norm)
        result.gap = gap if epoch == 0 else None
        if ratio_stats:
            result.stats = {
                "ratio/mean": sum(s.ratio_mean for s in ratio_stats) / len(ratio_stats),
                "ratio/max": max(s.ratio_max for s in ratio_stats),
                "ratio/clip_fraction": sum(s.clip_fraction for s in ratio_stats) / len(ratio_stats),
                "ratio/approx_kl": sum(s.approx_kl for s in ratio_stats) / len(ratio_stats),
            }
        results.append(result)
        approx_kl = result.stats.get("ratio/approx_kl", 0.0)
        if max_approx_kl is not None and accelerator.num_processes > 1:  # one decision for all (each step is collective)
            approx_kl = float(accelerator.reduce(torch.tensor(approx_kl, device=batch.completion_mask.device), "max"))
        if max_approx_kl is not None and approx_kl > max_approx_kl:
            break
    return results


def _kept_prompt_tokens(model, accelerator, micro_tokens: int) -> int:
    """How many prompt tokens the prompt pass may keep the activations of (``PromptPass(max_kept_tokens)``; more and
    it runs again in its backward). Recomputing lowers the update's activation peak from ``M T + G P`` tokens to
    ``max(M T, G P)``, and costs a forward of the prompts: the pass is kept while it is no larger than a micro-batch,
    or while half of the memory free now holds it (``run.memory.available_memory``: the host's MemAvailable, a GPU's
    free memory): speed where there is room, the lower peak where memory is short. The same gradient either way."""
    from ..run.memory import available_memory, kept_bytes_per_token

    free, _ = available_memory(accelerator.device)
    if free is None:
        return micro_tokens
    body = getattr(model, "module", model)
    activation_bytes = 2 if accelerator.mixed_precision in ("bf16", "fp16") else next(body.parameters()).element_size()
    return max(micro_tokens, free // 2 // kept_bytes_per_token(body, activation_bytes))


def _optimizer_step(model, optimizer, accelerator, loss: float, max_grad_norm: float | None) -> UpdateResult:
    """Clip and step, unless the loss or gradient is not finite (then the update is skipped)."""
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm else float("inf"))
    grad_norm = float(grad_norm)
    applied = math.isfinite(loss) and math.isfinite(grad_norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return UpdateResult(loss=loss, grad_norm=grad_norm, applied=applied)


__all__ = ["UpdateResult", "policy_update"]
