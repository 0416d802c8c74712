"""The lean KV-cache decoders give the same logits and samples as transformers' own forward."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig, Qwen2Config

from rlhf_pg.policy.decoder import GPT2Decoder, HFDecoder, LlamaDecoder, make_decoder
from rlhf_pg.policy.builtin import sample_completions
from rlhf_pg.policy.prompts import encode_prompts
from rlhf_pg.policy.sampler import SamplingParams


def tiny(config_class, **extra):
    torch.manual_seed(0)
    common = dict(vocab_size=99, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if config_class is GPT2Config:
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common, **extra)
    else:
        config = config_class(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=64, **common, **extra)
    return AutoModelForCausalLM.from_config(config).eval()


MODELS = {
    "gpt2": lambda: tiny(GPT2Config),
    "llama-gqa": lambda: tiny(LlamaConfig),
    "qwen2-bias": lambda: tiny(Qwen2Config),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_lean_decoder_matches_the_hf_forward_step_by_step(name):
    model = MODELS[name]()
    prompts = torch.tensor([[0, 0, 1, 5, 6, 7], [1, 8, 9, 10, 11, 12], [0, 0, 0, 0, 1, 13]])
    mask = (prompts != 0).float()
    mask[:, -1] = 1
    lean = make_decoder(model, 3, 12)
    assert isinstance(lean, (GPT2Decoder, LlamaDecoder))
    reference = HFDecoder(model)
    with torch.no_grad():
        a, b = lean.prefill(prompts, mask), reference.prefill(prompts, mask)
        for step in range(6):
            assert torch.allclose(a, b, atol=1e-5), (name, step)
            tokens = torch.tensor([20 + step, 30, 40 + step])
            a, b = lean.step(tokens), reference.step(tokens)
        assert torch.allclose(a, b, atol=1e-5)


def test_lean_and_hf_sampling_draw_the_same_tokens(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, mask = encode_prompts(tokenizer, ["1+2=", "33+44=", "7+80="] * 4)
    results = []
    for lean in (True, False):
        results.append(sample_completions(model, ids, mask, SamplingParams(max_new_tokens=8, top_p=0.9),
                                          tokenizer.eos_token_id, tokenizer.pad_token_id,
                                          torch.Generator().manual_seed(5), lean=lean))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert torch.allclose(results[0][2], results[1][2], atol=1e-5)


def test_lora_models_decode_through_their_adapters(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights=False, fan_in_fan_out=True)).eval()
    prompts = torch.tensor([[1, 5, 6, 7], [0, 1, 8, 9]])
    mask = (prompts != 0).float()
    lean = make_decoder(model, 2, 8)
    assert isinstance(lean, GPT2Decoder)
    with torch.no_grad():
        assert torch.allclose(lean.prefill(prompts, mask), HFDecoder(model).prefill(prompts, mask), atol=1e-5)
        with model.disable_adapter():  # the reference policy for KL: adapters off, still the lean path
            off = make_decoder(model, 2, 8).prefill(prompts, mask)
            assert torch.allclose(off, HFDecoder(model).prefill(prompts, mask), atol=1e-5)
        assert not torch.allclose(off, lean.prefill(prompts, mask), atol=1e-3)


def test_unknown_architectures_fall_back_to_the_hf_forward():
    from transformers import OPTConfig

    model = AutoModelForCausalLM.from_config(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                       ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16))
    assert isinstance(make_decoder(model, 2, 8), HFDecoder)


def test_fused_gelu_swap_computes_the_same_function_and_keeps_the_saved_config(tmp_path):
    from transformers.activations import NewGELUActivation

    from rlhf_pg.models import use_fused_activations

    model = MODELS["gpt2"]()
    assert model.config.activation_function == "gelu_new"
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    before = model(ids).logits
    use_fused_activations(model)
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert torch.allclose(model(ids).logits, before, atol=1e-5)
    model.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.activation_function == "gelu_new"
