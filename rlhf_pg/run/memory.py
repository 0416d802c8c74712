"""Memory planning: a training step's peak memory from the model's shape and the recipe, before anything runs.

``rlhf-pg doctor`` prints the breakdown; ``rlhf-pg train`` refuses to start a run whose estimate exceeds the
memory free on the device (``check_fits``), naming the recipe keys that would make it fit, instead of being
killed by the OOM killer at step 1. Calibrated against the peaks ``benchmarks/memory_profile.py`` and
``benchmarks/vs_trl.py --sizes`` measure (README: memory planning).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ..errors import UserError
from .accel import resolve_mixed_precision

GIB = 1 << 30
HEAD_CHUNK_ELEMENTS = 1 << 25  # policy.kernels.linear_logprobs: logits held at once by the chunked head


@dataclass(frozen=True)
class StepShape:
    """What a step's memory depends on: the model (N parameters, N_t trainable, b bytes per weight, L layers,
    d hidden, I intermediate, w = KV width per layer, V vocabulary) and the batch (B rows of P prompt + T new
    tokens, G prompts, M rows per forward/backward, a bytes per activation)."""

    parameters: int
    trainable: int
    weight_bytes: int
    layers: int
    hidden: int
    intermediate: int
    kv_width: int
    vocab: int
    sequences: int
    prompts: int
    micro_batch: int
    prompt_tokens: int
    new_tokens: int
    activation_bytes: int
    reference: bool = False  # a frozen copy of the weights (KL term without LoRA)
    checkpointing: bool = False
    fused_head: bool = True  # policy.kernels.linear_logprobs: no [M, T, V] logits
    prompt_pass: bool = False  # policy.logprobs.PromptPass: all G prompts run once for the micro-batches
    prompt_recompute: bool = False  # ... its activations recomputed in its backward, not kept (memory is short)
    lean_mlp: bool = False  # policy.swiglu: gated MLPs keep 2 of their 4 [tokens, I] tensors
    runtime: int = 0  # the process before the model: interpreter, torch, transformers


@dataclass
class MemoryEstimate:
    """Bytes per part of a training step and the formula each part came from; ``peak`` = the static parts + the
    larger of the two phases that never overlap (sampling, the update)."""

    parts: dict[str, tuple[int, str]]  # name -> (bytes, formula)
    peak: int


def memory_estimate(shape: StepShape) -> MemoryEstimate:
    """A step's peak resident memory, in bytes:

        runtime        R                          (the process before the model is loaded, measured)
        weights        N b                        (+ N b for the frozen reference when a KL term needs one)
        gradients      N_t b
        AdamW state    2 N_t b                    (exp_avg and exp_avg_sq, in the weights' dtype)
        sampling       2 L B S w a + L d (d + 2w) b     (the KV cache, and the decoder's fused q/k/v weights)
        logits         2 min(M T V, 32M) 4 (the chunked head: a chunk and its log-sum-exp or softmax temporary)
                       or 3 M T V a (a head it cannot chunk: the logits, their log-softmax and its gradient)
        vocab grads    3 V d b                    (when the embeddings train: the head's d/dW, the embedding's
                                                   dense gradient, their sum, beside the gradients)
        activations    X (14 d + 4 w + k I) L a   (X = update tokens: M T + (M/K) P with shared prompts, M T + G P
                                                   with one prompt pass for all micro-batches (the max of the two
                                                   where memory is short: it is recomputed, ``update``), M S when
                                                   checkpointing, each layer's kept tensors per token; with
                                                   checkpointing: X d L a + one layer's (14 d + 4 w + k I) X a;
                                                   k = 2 for gated MLPs ``policy.swiglu`` takes, else 4)
        peak = runtime + weights + gradients + AdamW + max(sampling, logits + vocab grads + activations)
    """
    s, a, b = shape, shape.activation_bytes, shape.weight_bytes
    length = s.prompt_tokens + s.new_tokens
    group = max(1, s.sequences // max(1, s.prompts))
    if s.checkpointing:  # transformers turns the cache off under checkpointing: no shared prompt in the update
        tokens = s.micro_batch * length
    elif s.prompt_pass and s.micro_batch < s.sequences:  # its activations kept, or recomputed where memory is short
        kept = s.prompts * s.prompt_tokens
        tokens = max(s.micro_batch * s.new_tokens, kept) if s.prompt_recompute else s.micro_batch * s.new_tokens + kept
    else:
        tokens = s.micro_batch * s.new_tokens + -(-s.micro_batch // group) * s.prompt_tokens
    per_token_layer = layer_width(s.hidden, s.kv_width, s.intermediate, s.lean_mlp)
    k = 2 if s.lean_mlp else 4
    if s.checkpointing:
        activations = tokens * (s.hidden * s.layers + per_token_layer) * a
        activation_formula = f"X d L a + X (14 d + 4 w + {k} I) a (checkpointing)"
    else:
        activations = tokens * per_token_layer * s.layers * a
        activation_formula = f"X (14 d + 4 w + {k} I) L a"
    if s.fused_head:
        logits = 2 * min(s.micro_batch * s.new_tokens * s.vocab, HEAD_CHUNK_ELEMENTS) * 4
        logits_formula = "2 min(M T V, 32M) 4 (chunked head)"
    else:
        logits = 3 * s.micro_batch * s.new_tokens * s.vocab * max(a, 4)
        logits_formula = "3 M T V a"
    parts = {
        "runtime": (s.runtime, "R (measured before the model loads)"),
        "weights": (s.parameters * b, "N b"),
        "reference model": (s.parameters * b if s.reference else 0, "N b (kl_coef > 0 or log_kl)"),
        "gradients": (s.trainable * b, "N_t b"),
        "AdamW state": (2 * s.trainable * b, "2 N_t b"),
        "sampling (KV cache)": (2 * s.layers * s.sequences * length * s.kv_width * a
                                + s.layers * s.hidden * (s.hidden + 2 * s.kv_width) * b, "2 L B S w a + L d (d+2w) b"),
        "logits (update)": (logits, logits_formula),
        "vocabulary gradients (update)": (3 * s.vocab * s.hidden * b if s.trainable == s.parameters else 0,
                                          "3 V d b (the embeddings train)"),
        "activations (update)": (activations, activation_formula),
    }
    static = sum(parts[key][0] for key in ("runtime", "weights", "reference model", "gradients", "AdamW state"))
    update = sum(parts[key][0] for key in ("logits (update)", "vocabulary gradients (update)", "activations (update)"))
    return MemoryEstimate(parts, static + max(parts["sampling (KV cache)"][0], update))


def layer_width(hidden: int, kv_width: int, intermediate: int, lean_mlp: bool) -> int:
    """Elements an update keeps per token and layer for the backward: ``14 d + 4 w + 4 I`` (calibrated against
    measured peaks), ``2 I`` fewer where ``policy.swiglu`` computes the gated MLP."""
    return 14 * hidden + 4 * kv_width + (2 if lean_mlp else 4) * intermediate


def lean_mlps(model) -> bool:
    """Whether ``model``'s gated MLPs run ``policy.swiglu.SwiGLU`` in the update: the forward it installs carries
    ``applies(module)``, whether it still computes that module (not once LoRA wrapped a projection)."""
    for module in model.modules():
        applies = getattr(getattr(module.__dict__.get("forward"), "__func__", None), "applies", None)
        if applies is not None and applies(module):
            return True
    return False


def kept_bytes_per_token(model, activation_bytes: int) -> int:
    """Bytes of activations an update keeps per token, all layers (``layer_width`` x layers x bytes)."""
    shape = model_shape(model)
    lean = lean_mlps(model) and activation_bytes == next(model.parameters()).element_size()
    width = layer_width(shape["hidden"], shape["kv_heads"] * shape["head_dim"], shape["intermediate"], lean)
    return max(1, width * shape["layers"] * activation_bytes)


def model_shape(model) -> dict[str, int]:
    """``{layers, hidden, heads, kv_heads, head_dim, intermediate, vocab}`` from the model's config (0 where it does
    not say); ``vocab`` is the width of the output layer (the logits), which may exceed the tokenizer's."""
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
            "intermediate": value("intermediate_size", "n_inner", default=4 * hidden),
            "vocab": int(output.weight.shape[0]) if output is not None else value("vocab_size")}


def step_shape(recipe, model, prompt_tokens: int, *, processes: int = 1, fused_head: bool = True,
               runtime: int = 0) -> StepShape:
    """The ``StepShape`` of ``recipe`` (this process's share of the batch) on the loaded ``model``."""
    rollout, train = recipe.rollout, recipe.train
    shape = model_shape(model)
    parameters = {id(p): p for p in model.parameters()}.values()  # tied weights once
    weight_bytes = next(iter(parameters)).element_size()
    prompts = max(1, rollout.prompts_per_step // processes)
    sequences = prompts * rollout.completions_per_prompt
    reference = (recipe.algorithm.kl_coef > 0 or recipe.algorithm.log_kl) and recipe.peft is None
    activation_bytes = 2 if resolve_mixed_precision(train.mixed_precision) in ("bf16", "fp16") else weight_bytes
    return StepShape(
        parameters=sum(p.numel() for p in parameters), trainable=sum(p.numel() for p in parameters if p.requires_grad),
        weight_bytes=weight_bytes, layers=shape["layers"], hidden=shape["hidden"], intermediate=shape["intermediate"],
        kv_width=shape["kv_heads"] * shape["head_dim"], vocab=shape["vocab"],
        sequences=sequences, prompts=prompts, micro_batch=min(train.micro_batch_size or sequences, sequences),
        prompt_tokens=prompt_tokens, new_tokens=rollout.max_new_tokens,
        activation_bytes=activation_bytes, reference=reference,
        lean_mlp=activation_bytes == weight_bytes and lean_mlps(model),
        checkpointing=bool(train.gradient_checkpointing or recipe.model.gradient_checkpointing),
        fused_head=fused_head, runtime=runtime, prompt_pass=processes == 1)


def what_fits(shape: StepShape, free: int) -> list[str]:
    """The recipe changes, cheapest first, whose estimate fits in ``free`` bytes (each alone, then combined)."""
    fixes = []
    for rows in (8, 4, 2, 1):
        if rows < shape.micro_batch and memory_estimate(replace(shape, micro_batch=rows)).peak <= free:
            fixes.append(f"train.micro_batch_size: {rows} (the same gradient, accumulated over chunks of {rows} rows)")
            break
    smallest = replace(shape, micro_batch=min(shape.micro_batch, 4))
    for change, text, applies in (
        (dict(checkpointing=True), "train.gradient_checkpointing: true (the same gradient; ~1/3 more update compute)",
         not shape.checkpointing),
        (dict(activation_bytes=2), "train.mixed_precision: bf16 (activations in 2 bytes)", shape.activation_bytes > 2),
        (dict(trainable=shape.parameters // 100, reference=False), "peft: {r: 16} (LoRA: gradients and AdamW "
         "state for ~1% of the weights)", shape.trainable > shape.parameters // 2),
    ):
        if applies and memory_estimate(replace(smallest, **change)).peak <= free:
            rows = "" if smallest.micro_batch == shape.micro_batch else f"train.micro_batch_size: {smallest.micro_batch} and "
            fixes.append(rows + text)
    return fixes


def rss_bytes() -> int:
    """This process's resident memory now (``VmRSS``; 0 where /proc is not there)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def available_memory(device) -> tuple[int | None, str]:
    """``(bytes free now, where)`` on ``device``: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        import torch

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


def check_fits(shape: StepShape, free: int | None, where: str, resident: int = 0) -> MemoryEstimate:
    """The estimate; ``UserError`` (exit 2) when its peak exceeds ``free`` + ``resident`` (the part of the estimate
    this process already holds: the free figure was read after the model was loaded). The message gives the
    breakdown and the keys that would make the run fit, and ``train.check_memory: false`` to start anyway."""
    estimate = memory_estimate(shape)
    if free is None or estimate.peak <= free + resident:
        return estimate
    if shape.prompt_pass and not shape.prompt_recompute:  # the update recomputes the prompt pass where memory is short
        recomputed = memory_estimate(replace(shape, prompt_recompute=True))
        if recomputed.peak <= free + resident:
            return recomputed
    budget = free + resident
    breakdown = ", ".join(f"{name} {size_text(size)}" for name, (size, _) in estimate.parts.items() if size)
    fixes = what_fits(shape, budget)
    advice = ("; ".join(fixes) if fixes else "a smaller model, fewer rollout.prompts_per_step or a shorter "
              "rollout.max_new_tokens (none of train.micro_batch_size, train.gradient_checkpointing, "
              "train.mixed_precision: bf16 or LoRA is enough alone)")
    raise UserError(f"this run would not fit in memory: its estimated peak is {size_text(estimate.peak)} ({breakdown}) "
                    f"against {size_text(budget)} ({where}: {size_text(free)} free now + {size_text(resident)} "
                    f"already held). To make it fit: {advice}. `rlhf-pg doctor RECIPE` prints the estimate; "
                    "train.check_memory: false starts the run anyway")


def check_run_memory(recipe, policy, prompt_tokens: int, accelerator, runtime: int, fused_head,
                     sharded: bool = False) -> None:
    """``run.memory.check_fits`` for this process's share of the batch (CPU: the host's MemAvailable plus what the
    process already holds; CUDA: the device's free memory, before the model is moved there); ``fused_head``: the
    policy's ``head_for_logprobs`` (None: full logits). Several processes on
    one host share its memory, and DeepSpeed/FSDP (``sharded``: rlhf-pg's own) shard what the estimate counts whole:
    the check is left to ``rlhf-pg doctor`` there."""
    device = accelerator.device
    if sharded or accelerator.distributed_type.value in ("DEEPSPEED", "FSDP") or (device.type == "cpu" and accelerator.num_processes > 1):
        return
    shape = step_shape(recipe, policy, prompt_tokens, processes=accelerator.num_processes,
                       fused_head=fused_head is not None, runtime=runtime if device.type == "cpu" else 0)
    free, where = available_memory(device)
    check_fits(shape, free, where, resident=rss_bytes() if device.type == "cpu" else 0)


def keep_freed_memory(trim_threshold: int = 1 << 30, mmap_threshold: int = 32 << 20) -> bool:
    """glibc: keep the memory freed at the top of the heap for the next allocations instead of handing it back to the
    OS (``M_TRIM_THRESHOLD``), with blocks under ``mmap_threshold`` served from the heap (``M_MMAP_THRESHOLD``:
    setting either turns off glibc's own adjustment of both, which would raise this one to 32 MB by itself). A CPU
    step allocates and frees its activations once per micro-batch; with glibc's default the freed top of the heap
    went back to the OS after each and came back as page faults in the next: ~350,000 a step (1.3 GiB) in
    SmolLM2-135M's update at the ``vs_trl.py --model`` settings, none with this, at the same peak RSS
    (benchmarks/README.md, "Packed weights for sampling, grouped attention, no page faults"). ``MALLOC_*`` settings
    the user made win. Not with FSDP (``fsdp.return_freed_memory`` wants the opposite). Returns whether it was set
    (False off glibc)."""
    if any(name in os.environ for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                                             "MALLOC_MMAP_MAX_")):
        return False
    return mallopt((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold))


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def mallopt(*settings: tuple[int, int]) -> bool:
    """glibc's ``mallopt(parameter, value)`` for each pair, in order (``keep_freed_memory``,
    ``fsdp.return_freed_memory``). True when every one was set; False off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return all([bool(libc.mallopt(parameter, value)) for parameter, value in settings])
    except (OSError, AttributeError):
        return False


__all__ = ["MemoryEstimate", "StepShape", "available_memory", "check_fits", "check_run_memory", "keep_freed_memory",
           "kept_bytes_per_token", "layer_width", "lean_mlps", "mallopt", "memory_estimate", "model_shape", "rss_bytes",
           "size_text", "step_shape", "what_fits"]
