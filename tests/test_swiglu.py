"""The lean gated MLP (rlhf_pg/policy/swiglu.py) computes what the module computes, keeps fewer bytes, and steps aside
wherever it does not apply.

Values and gradients are checked against the module's own forward differentiated by autograd (the same matmuls in
the same order: equal to the bit without ``direct_weight_grads``, to float rounding with it), and through the
update's ``completion_logprobs`` on tiny random models of each family whose MLP it takes.
"""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from rlhf_pg.models import load_causal_lm
from rlhf_pg.models.config import ModelConfig
from rlhf_pg.policy import kernels, swiglu
from rlhf_pg.policy.logprobs import PromptPass, completion_logprobs
from rlhf_pg.policy.swiglu import SwiGLU, lean_mlp, use_lean_mlps
from tests.test_decoder_families import FAMILIES, tiny_model

ROUTES = ["torch"] + (["onednn"] if kernels.onednn_available() else [])


def _mlp(route: str, hidden: int = 48, intermediate: int = 160):
    torch.manual_seed(0)
    module = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu", num_attention_heads=4,
                                        num_key_value_heads=4))
    if route == "onednn":
        kernels.use_onednn_linears(module)
    return module


def _grads(module, x, upstream, direct=False):
    x = x.detach().clone().requires_grad_()
    for p in module.parameters():
        p.grad = None
    with kernels.direct_weight_grads(direct):
        y = module(x)
        (y * upstream).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in module.parameters()], y.grad_fn


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("direct", [False, True])
def test_swiglu_equals_the_modules_forward_and_autograd(route, direct):
    plain = _mlp(route)
    lean = copy.deepcopy(plain)
    assert use_lean_mlps(lean) == 1 and lean_mlp(lean)
    g = torch.Generator().manual_seed(1)
    x, upstream = torch.randn(3, 70, 48, generator=g), torch.randn(3, 70, 48, generator=g)  # 210 rows: oneDNN's path
    y0, dx0, dw0, fn0 = _grads(plain, x, upstream)
    y1, dx1, dw1, fn1 = _grads(lean, x, upstream, direct)
    assert type(fn1).__name__ == "SwiGLUBackward" and type(fn0).__name__ != "SwiGLUBackward"
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)  # the same matmuls and elementwise ops, in the same order
    torch.testing.assert_close(dx1, dx0, rtol=0 if not direct else 1e-5, atol=0 if not direct else 1e-5)
    for got, want in zip(dw1, dw0):
        torch.testing.assert_close(got, want, rtol=0 if not direct else 1e-5, atol=0 if not direct else 1e-4)


def test_swiglu_keeps_two_intermediate_tensors_not_four():
    def kept_bytes(module, x):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        params = sum(p.numel() * p.element_size() for p in module.parameters())
        return sum(storages.values()) - params

    plain = _mlp("torch", hidden=32, intermediate=256)
    lean = copy.deepcopy(plain)
    use_lean_mlps(lean)
    x = torch.randn(100, 32, requires_grad=True)
    intermediate = 100 * 256 * 4  # one [tokens, intermediate] float32 tensor
    # the module: x, gate(x), silu(gate(x)), up(x), their product; SwiGLU: x, gate(x), up(x)
    assert kept_bytes(plain, x) - kept_bytes(lean, x) == 2 * intermediate
    assert kept_bytes(lean, x) == 100 * 32 * 4 + 2 * intermediate


def test_swiglu_only_when_something_is_differentiated_outside_autocast():
    lean = _mlp("torch")
    use_lean_mlps(lean)
    x = torch.randn(5, 48)
    with torch.no_grad():
        assert lean(x).grad_fn is None
    for p in lean.parameters():
        p.requires_grad_(False)
    assert lean(x).grad_fn is None  # nothing to differentiate: the module's forward
    assert type(lean(x.requires_grad_()).grad_fn).__name__ == "SwiGLUBackward"
    for p in lean.parameters():
        p.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lean(x)
    assert out.dtype == torch.bfloat16 and type(out.grad_fn).__name__ != "SwiGLUBackward"


def test_lora_wrapped_projections_take_the_modules_forward_with_their_adapters():
    from peft import LoraConfig, get_peft_model

    config = AutoConfig.for_model("llama", vocab_size=40, **FAMILIES["llama"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    use_lean_mlps(model)  # installed before LoRA wraps gate_proj and up_proj (as load_causal_lm then apply_lora do)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "up_proj"], init_lora_weights=False))
    mlp = lora.base_model.model.model.layers[0].mlp
    assert not lean_mlp(mlp)
    x = torch.randn(2, 7, config.hidden_size, requires_grad=True)
    with lora.disable_adapter():
        base = mlp(x)
    out = mlp(x)
    assert type(out.grad_fn).__name__ != "SwiGLUBackward"
    assert (out - base).abs().max() > 1e-3  # the adapters count
    expected = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("family", ["llama-smollm2-shape", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("route", ROUTES)
def test_update_gradient_with_lean_mlps_equals_without(family, route):
    """The update's log-probs and parameter gradients through ``completion_logprobs``, micro-batched over one prompt
    pass (the path ``policy_update`` takes), with and without the lean MLP."""
    plain = tiny_model(family).train()
    if route == "onednn":
        kernels.use_onednn_linears(plain)
    lean = copy.deepcopy(plain)
    assert use_lean_mlps(lean) == plain.config.num_hidden_layers
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(3, 40, (6, 5), generator=g)
    prompt_ids, prompt_mask = prompts.repeat_interleave(2, 0), torch.ones(12, 5)
    prompt_mask[:2, :2] = 0  # some left padding
    completion_ids, completion_mask = torch.randint(3, 40, (12, 9), generator=g), torch.ones(12, 9)
    completion_mask[3, 6:] = 0
    weights = torch.randn(12, 9, generator=g)
    results = []
    for model in (plain, lean):
        model.zero_grad(set_to_none=True)
        prompt_pass = PromptPass(model, prompt_ids, prompt_mask, list(range(12)))
        logprobs = []
        for rows in (torch.arange(0, 6), torch.arange(6, 12)):
            lp = completion_logprobs(model, prompt_ids[rows], prompt_mask[rows], completion_ids[rows],
                                     completion_mask[rows], prompt_pass=(prompt_pass, rows))
            (lp * weights[rows]).sum().backward()
            logprobs.append(lp.detach())
        prompt_pass.backward()
        results.append((torch.cat(logprobs), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (lp0, grads0), (lp1, grads1) = results
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
    for name, want in grads0.items():
        torch.testing.assert_close(grads1[name], want, rtol=1e-4, atol=1e-4, msg=name)


def test_load_causal_lm_installs_it_on_gated_mlps_only(tmp_path):
    for family, expected in (("llama", FAMILIES["llama"]["num_hidden_layers"]), ("gpt2", 0), ("gemma", 0)):
        tiny_model(family).save_pretrained(tmp_path / family)
        model = load_causal_lm(ModelConfig(name_or_path=str(tmp_path / family)))
        lean = [m for m in model.modules()
                if getattr(m.__dict__.get("forward"), "__func__", None) is swiglu._lean_mlp_forward]
        assert len(lean) == expected, family


def test_swiglu_apply_directly_matches_the_formula():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, generator=g, requires_grad=True)
    wg, wu, wd = (torch.randn(*s, generator=g, requires_grad=True) for s in ((16, 8), (16, 8), (8, 16)))
    y = SwiGLU.apply(x, wg, wu, wd, False)
    expected = (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)) @ wd.T
    torch.testing.assert_close(y, expected)
    got = torch.autograd.grad(y.square().sum(), [x, wg, wu, wd])
    want = torch.autograd.grad(expected.square().sum(), [x, wg, wu, wd])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_recomputes_the_lean_mlp_to_the_same_gradient():
    from rlhf_pg.models import enable_gradient_checkpointing

    plain = tiny_model("llama-smollm2-shape").train()
    lean = copy.deepcopy(plain)
    use_lean_mlps(lean)
    enable_gradient_checkpointing(lean)
    ids = torch.randint(3, 40, (3, 12), generator=torch.Generator().manual_seed(4))
    grads = []
    for model in (plain, lean):
        model.zero_grad(set_to_none=True)
        model(input_ids=ids).logits.log_softmax(-1)[..., 5].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, rtol=1e-5, atol=1e-5, msg=name)
