"""A learned reward model as a reward function: ``{name: reward_model, path: DIR/final}`` in a recipe.

The policy's completions arrive as decoded text; the reward model reads them encoded with *its own*
tokenizer, so policy and reward model need not share a vocabulary (``preferences.reward_texts``): a text
prompt as ``prompt + completion`` (+ EOS when the completion finished), a conversation (chat prompts) as the
messages with the assistant reply appended, rendered with the reward model's chat template. Scoring is batched, in eval mode, without gradients; each model is loaded once per
process and device (``load_reward_model`` caches it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_pg.errors import UserError

from .preferences import reward_texts, templated
from .registry import register_reward

_LOADED: dict[tuple[str, str], tuple[object, object]] = {}


def default_device() -> torch.device:
    """This process's accelerator when there is one (``accelerate`` sets the current CUDA device), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_path(path: str | None) -> str:
    if not path:
        raise UserError("reward_model needs `path`: the directory written by 'rlhf-pg reward-model' "
                        "(e.g. {name: reward_model, path: runs/reward_model/final})")
    local = Path(path).expanduser()
    if not local.exists():
        raise UserError(f"reward model {path!r} does not exist; train it first with "
                        "'rlhf-pg reward-model recipes/reward_model.yaml' (it writes runs/reward_model/final)")
    if not (local / "config.json").exists():
        raise UserError(f"reward model {path!r} has no config.json; give the final/ directory of a reward-model run")
    return str(local.resolve())


def load_reward_model(path: str, device: torch.device | str | None = None):
    """``(model, tokenizer)`` for a saved ``AutoModelForSequenceClassification`` with one label, cached."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    resolved = _check_path(path)
    device = torch.device(device) if device is not None else default_device()
    key = (resolved, str(device))
    if key not in _LOADED:
        try:
            tokenizer = AutoTokenizer.from_pretrained(resolved)
            model = AutoModelForSequenceClassification.from_pretrained(resolved)
        except Exception as error:  # noqa: BLE001
            raise UserError(f"cannot load reward model {path!r}: {type(error).__name__}: {error}") from None
        if model.config.num_labels != 1:
            raise UserError(f"reward model {path!r} has {model.config.num_labels} outputs; a reward model has "
                            "exactly one (num_labels=1), as written by 'rlhf-pg reward-model'")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        _LOADED[key] = (model.eval().requires_grad_(False).to(device), tokenizer)
    return _LOADED[key]


@torch.no_grad()
def score_texts(model, tokenizer, texts: list[str], batch_size: int = 64, special_tokens: bool = True) -> list[float]:
    """The reward model's scalar for each text, in batches (right-padded; scores do not depend on padding).
    ``special_tokens``: encode with the tokenizer's special tokens (False for chat-template renderings)."""
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], padding=True, padding_side="right",
                            return_tensors="pt", add_special_tokens=special_tokens).to(device)
        logits = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits  # [b, 1]
        scores.extend(logits[:, 0].float().tolist())
    return scores


@register_reward("reward_model")
def reward_model(prompts: list, completions: list, path: str | None = None, batch_size: int = 64,
                 finished=None, **kwargs) -> list[float]:
    """The learned reward r_phi(prompt, completion) of the reward model saved in ``path`` (text or chat prompts)."""
    model, tokenizer = load_reward_model(path)
    texts = reward_texts(tokenizer, prompts, completions, finished)
    return score_texts(model, tokenizer, texts, batch_size, special_tokens=not templated(tokenizer, prompts))


def _validate(params: dict) -> None:
    """Called when a recipe names this reward: load the model now, so a bad path fails before training."""
    load_reward_model(params.get("path"))


reward_model.validate_params = _validate
