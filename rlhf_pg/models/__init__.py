"""Loading policies and tokenizers with plain ``from_pretrained`` (built-in names resolve to a local directory:
the shipped or rebuilt arith-gpt, or a GGUF dequantized once into the cache)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import ModelConfig, PeftConfig
from ..errors import UserError, first_line
from ..policy.swiglu import use_lean_mlps

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str, progress: bool = True, gguf_file: str | None = None,
                       revision: str | None = None) -> str:
    """The local directory ``from_pretrained`` should read, or a hub id unchanged.

    ``builtin:NAME`` -> its cached directory (built or converted on first use); ``FILE.gguf``, or a
    directory / hub id with ``gguf_file``, -> the GGUF's dequantized save_pretrained directory
    (``gguf.resolve_gguf``, converted once and cached); a save_pretrained directory -> itself.
    """
    if name_or_path.startswith("builtin:"):
        from .builtin import BUILTIN_MODELS, builtin_path
        from .gguf import BUILTIN_GGUF, builtin_gguf_dir

        name = name_or_path.split(":", 1)[1]
        if name in BUILTIN_GGUF:
            return str(builtin_gguf_dir(name, progress=progress))
        if name not in BUILTIN_MODELS:
            raise UserError(f"model: unknown built-in model {name_or_path!r}; available: "
                            + ", ".join(f"builtin:{n}" for n in [*BUILTIN_MODELS, *BUILTIN_GGUF]))
        return str(builtin_path(name, progress=progress))
    if gguf_file is not None or name_or_path.lower().endswith(".gguf"):
        from .gguf import resolve_gguf

        return str(resolve_gguf(name_or_path, gguf_file, revision=revision, progress=progress))
    local = Path(name_or_path).expanduser()
    if name_or_path.startswith((".", "/", "~")) and not local.exists():
        raise UserError(f"model: {name_or_path!r} does not exist; give a directory written by save_pretrained")
    if local.is_dir() and not (local / "config.json").exists():
        gguf_hint = ""
        if any(local.glob("*.gguf")):
            gguf_hint = f" It holds GGUF files: give one as model: {{name_or_path: {name_or_path}, gguf_file: NAME.gguf}}"
        raise UserError(f"model: {name_or_path!r} has no config.json; is it a directory written by save_pretrained?"
                        + gguf_hint)
    return str(local) if local.exists() else name_or_path


def _resolve(config: ModelConfig) -> str:
    """``resolve_model_path`` for a recipe's ``model`` section (``model.gguf_file`` read when the schema has it)."""
    return resolve_model_path(config.name_or_path, gguf_file=getattr(config, "gguf_file", None),
                              revision=config.revision)


def _offline_hint(path: str) -> str:
    if Path(path).expanduser().exists():
        return ""
    if os.environ.get("HF_HUB_OFFLINE"):
        return f" ({path!r} is not a local directory, and HF_HUB_OFFLINE is set so the hub is not asked)"
    return f" (no local directory {path!r} exists either)"



def load_tokenizer(path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The tokenizer, with a pad token guaranteed (EOS is used when the tokenizer has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001
        raise UserError(f"model: cannot load the tokenizer of {path!r}: {first_line(error)}{_offline_hint(path)}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"model: the tokenizer of {path!r} has no EOS token; completions could never end. "
                        "Save the tokenizer with an eos_token set")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # standard fix-up; padded positions are masked anyway
    return tokenizer


def load_causal_lm(config: ModelConfig, path: str | None = None):
    """``AutoModelForCausalLM.from_pretrained`` with the recipe's dtype and options."""
    from transformers import AutoModelForCausalLM

    path = path or _resolve(config)
    kwargs = {"dtype": DTYPES[config.dtype], "revision": config.revision, "trust_remote_code": config.trust_remote_code}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise UserError(f"model: cannot load {path!r} as a causal LM: {first_line(error)}{_offline_hint(path)}") from None
    use_fused_activations(model)
    use_lean_mlps(model)  # gated MLPs keep two of their four intermediate tensors for the backward (policy/swiglu.py)
    gqa_attention_on_cpu()  # grouped-query attention on CPU without copying keys and values (no effect elsewhere)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass (``train.gradient_checkpointing``): transformers'
    ``gradient_checkpointing_enable`` with ``use_reentrant=False`` (gradients also reach inputs that do not require
    them, e.g. under LoRA, and the result is the same gradient as without)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def gqa_attention_on_cpu() -> bool:
    """transformers' ``sdpa`` attention copies a grouped-query model's keys and values out to every query head
    (``repeat_kv``) whenever a mask is given, except where ``use_gqa_in_sdpa`` says the kernel takes the groups itself.
    torch's CPU flash-attention kernel does (``enable_gqa``, torch >= 2.5), masks included: the same outputs to the bit
    and gradients to float rounding (checked), without the copies, their backward's sums, and their saved activations
    (SmolLM2-135M's update: 38 MB of a 4-row micro-batch's 373 MB, and 3.7 % of its time, measured). Patched once, for
    CPU tensors only (other devices keep transformers' rule). Returns whether it is on."""
    global _GQA_PATCHED
    if _GQA_PATCHED:
        return True
    try:
        from transformers.integrations import sdpa_attention
    except ImportError:
        return False
    rule = getattr(sdpa_attention, "use_gqa_in_sdpa", None)
    if rule is None or tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 5):
        return False

    def use_gqa_in_sdpa(attention_mask, key, value):
        if key.device.type == "cpu" and key.shape[-1] == value.shape[-1]:
            return True
        return rule(attention_mask, key, value)

    use_gqa_in_sdpa.original = rule
    sdpa_attention.use_gqa_in_sdpa = use_gqa_in_sdpa
    _GQA_PATCHED = True
    return True


_GQA_PATCHED = False


def use_fused_activations(model) -> None:
    """Swap transformers' Python tanh-GELU (``gelu_new``: 7 elementwise kernels, each saving a tensor for
    backward) for torch's fused kernel computing the same function, in place; the saved config is unchanged."""
    from transformers.activations import ACT2FN, NewGELUActivation

    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is NewGELUActivation:
                setattr(module, name, ACT2FN["gelu_pytorch_tanh"])


def load_policy(config: ModelConfig):
    """``(model, tokenizer, resolved path)`` for the recipe's ``model`` section."""
    path = _resolve(config)
    tokenizer = load_tokenizer(path, config.revision, config.trust_remote_code)
    model = load_causal_lm(config, path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, path


def apply_lora(model, config: PeftConfig):
    """Wrap ``model`` with LoRA adapters (``peft``); only adapter parameters stay trainable."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    fan_in_fan_out = any(isinstance(m, Conv1D) and _lora_targets(model, config.target_modules, name)
                         for name, m in model.named_modules())  # GPT-2's Conv1D stores weights transposed
    lora = LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=config.target_modules,
        task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out,
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as error:
        raise UserError(f"peft: cannot add LoRA adapters: {error}. Set peft.target_modules to module names of this "
                        "model (e.g. ['c_attn'] for GPT-2, ['q_proj', 'v_proj'] for Llama)") from None


def _lora_targets(model, target_modules, name: str) -> bool:
    """Whether peft would put an adapter on module ``name`` (list of suffixes, a regex, or its default)."""
    import re

    if target_modules is None:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

        target_modules = defaults.get(getattr(model.config, "model_type", ""), [])
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def load_lora_checkpoint(model, checkpoint: str):
    """The base ``model`` with the trainable adapter saved in ``checkpoint``."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
    except Exception as error:  # noqa: BLE001
        raise UserError(f"no usable LoRA adapter in {checkpoint}: {first_line(error)}") from None
