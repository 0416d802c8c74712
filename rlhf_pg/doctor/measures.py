"""The doctor's measurements that need no model run: the memory formula, histograms, group spread, the chat
template's end-of-turn token, the model's shape and the memory free on a device."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class MemoryEstimate:
    """Bytes per part of a training step (``memory_estimate``) and the formula each part came from."""

    parts: dict[str, tuple[int, str]]  # name -> (bytes, formula)
    peak: int


def memory_estimate(num_parameters: int, trainable: int, weight_bytes: int, layers: int, hidden: int, kv_width: int,
                    vocab: int, sequences: int, micro_batch: int, prompt_tokens: int, new_tokens: int,
                    activation_bytes: int | None = None, reference: bool = False,
                    gradient_checkpointing: bool = False) -> MemoryEstimate:
    """A step's memory, in bytes, with N = parameters (N_t trainable), b = bytes per weight, L layers, d hidden
    size, w = KV width per layer (kv heads x head dim), V vocabulary, B sequences sampled per step
    (prompts_per_step x completions_per_prompt), M sequences per forward/backward (train.micro_batch_size or B),
    S = P + T tokens per sequence (prompt + max_new_tokens), a = bytes per activation (2 under bf16/fp16 mixed
    precision, else b):

        weights        N b                     (+ N b for the frozen reference when a KL term needs one)
        gradients      N_t b
        AdamW state    2 N_t b                 (exp_avg and exp_avg_sq, in the weights' dtype)
        KV cache       2 L B S w a             (keys and values while sampling)
        logits         2 M T V a               (the update's completion logits and their gradient)
        activations    34 M S d L a / 2        (rough: Korthikanti et al. 2022 without the attention-score
                                                term, as SDPA keeps none; 2 M S d L a with gradient checkpointing)
        peak = weights + gradients + AdamW + max(KV cache, logits + activations)

    Sampling and the update do not overlap, so the peak holds the larger of the two phases.
    """
    a = activation_bytes or weight_bytes
    s = prompt_tokens + new_tokens
    activation_factor = 2 if gradient_checkpointing else 17
    parts = {
        "weights": (num_parameters * weight_bytes, "N b"),
        "reference model": (num_parameters * weight_bytes if reference else 0, "N b (kl_coef > 0 or log_kl)"),
        "gradients": (trainable * weight_bytes, "N_t b"),
        "AdamW state": (2 * trainable * weight_bytes, "2 N_t b"),
        "KV cache (sampling)": (2 * layers * sequences * s * kv_width * a, "2 L B S w a"),
        "logits (update)": (2 * micro_batch * new_tokens * vocab * a, "2 M T V a"),
        "activations (update)": (activation_factor * micro_batch * s * hidden * layers * a,
                                 "2 M S d L a" if gradient_checkpointing else "34 M S d L a / 2"),
    }
    static = sum(parts[k][0] for k in ("weights", "reference model", "gradients", "AdamW state"))
    update = parts["logits (update)"][0] + parts["activations (update)"][0]
    return MemoryEstimate(parts, static + max(parts["KV cache (sampling)"][0], update))


def model_shape(model) -> dict[str, int]:
    """``{layers, hidden, heads, kv_heads, head_dim, vocab}`` from the model's config (0 where it does not say);
    ``vocab`` is the width of the output layer (the logits), which may exceed the tokenizer's."""
    config = getattr(model, "config", None)

    def value(*names, default=0):
        for name in names:
            found = getattr(config, name, None)
            if isinstance(found, int) and found > 0:
                return found
        return default

    hidden = value("hidden_size", "n_embd", "d_model")
    heads = value("num_attention_heads", "n_head", default=1)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {"layers": value("num_hidden_layers", "n_layer"), "hidden": hidden, "heads": heads,
            "kv_heads": value("num_key_value_heads", default=heads), "head_dim": value("head_dim", default=hidden // heads),
            "vocab": int(output.weight.shape[0]) if output is not None else value("vocab_size")}


def histogram(values: list[float], bins: int = 8) -> list[tuple[str, int]]:
    """``(label, count)`` rows: one per distinct value when there are at most ``bins``, else ``bins`` equal-width
    intervals; NaN (a sample the function did not judge) is counted in a last ``None`` row."""
    judged = [v for v in values if not math.isnan(v)]
    distinct = sorted(set(judged))
    if len(distinct) <= bins:
        rows = [(f"{v:g}", judged.count(v)) for v in distinct]
    else:
        low, high = distinct[0], distinct[-1]
        width = (high - low) / bins
        counts = [0] * bins
        for v in judged:
            counts[min(int((v - low) / width), bins - 1)] += 1
        rows = [(f"[{low + i * width:.3g}, {low + (i + 1) * width:.3g}{']' if i == bins - 1 else ')'}", n)
                for i, n in enumerate(counts)]
    unjudged = len(values) - len(judged)
    if unjudged:
        rows.append(("None (not judged)", unjudged))
    return rows


def group_spread(scores: list[float], group_ids: torch.Tensor) -> tuple[int, int]:
    """``(groups whose scores are all equal, groups)``, by ``core.advantages.degenerate_groups`` (NaN counts 0)."""
    from ..core.advantages import degenerate_groups

    ids = group_ids.cpu()
    flags = degenerate_groups(torch.nan_to_num(torch.tensor(scores, dtype=torch.float64)), ids)
    first_rows: dict[int, int] = {}
    for row, group in enumerate(ids.tolist()):
        first_rows.setdefault(group, row)
    return sum(bool(flags[row]) for row in first_rows.values()), len(first_rows)


def end_of_turn_token(tokenizer, prompt: list[dict[str, Any]], chat_template_kwargs: dict[str, Any] | None = None
                      ) -> int | None:
    """The first special token the chat template writes after an assistant reply (ChatML: ``<|im_end|>``), or None.

        ids(render(prompt + [assistant "42"]))[len(ids(render(prompt, add_generation_prompt=True))):]
    """
    kwargs = dict(chat_template_kwargs or {})
    rendered = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False, **kwargs)
    full = tokenizer.apply_chat_template(list(prompt) + [{"role": "assistant", "content": "42"}], tokenize=False,
                                         **kwargs)
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {tokenizer.eos_token_id}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, token in added.items() if getattr(token, "special", False)}
    return next((token for token in full_ids[len(prompt_ids):] if token in special), None)


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """``(bytes free now, where)`` on ``device``: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available host memory (MemAvailable)"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available host memory"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def size_text(count: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
