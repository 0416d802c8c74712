"""Shared fixtures: tiny locally built models and tokenizers (no network, seconds to build)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the tests use tiny models: one thread is faster (no thread sync per tiny op) and steadier on a busy machine
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def build_tiny_model(path, seed: int = 0, n_layer: int = 2, n_embd: int = 32):
    """A random 2-layer char-level GPT-2 with the built-in character tokenizer, saved to ``path``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_pg.models.builtin import char_tokenizer

    torch.manual_seed(seed)
    tokenizer = char_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2")))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch, request):
    """Tests never write to the user's cache, except the slow ones that build the real base model."""
    if "slow" in request.keywords or "uses_builtin" in request.keywords:
        return
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg-cache"))
