"""The CPU kernels (rlhf_pg/kernels.py) compute what the plain torch code computes, values and gradients.

oneDNN's float32 matmul sums in another order than MKL's: agreement is to float32 rounding (~1e-6
relative), checked against ``F.linear`` and autograd. The chunked log-prob head is checked against
``log_softmax(F.linear(...))`` with autograd, and through ``completion_logprobs`` on a tiny random model
of every family the decoder tests cover (the fused path where ``head_for_logprobs`` allows it).
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from rlhf_pg.models import enable_gradient_checkpointing, gqa_attention_on_cpu
from rlhf_pg.policy import kernels, packed
from rlhf_pg.policy.cpu_matmul import MatmulChoice
from rlhf_pg.policy.decoder import make_decoder
from rlhf_pg.policy.logprobs import PromptPass, completion_logprobs
from tests.test_decoder_families import FAMILIES, tiny_model

needs_onednn = pytest.mark.skipif(not kernels.onednn_available(), reason="this torch build has no oneDNN linear op")


def _leaf(*shape, generator, scale=1.0):
    return (torch.randn(*shape, generator=generator) * scale).requires_grad_()


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_equals_f_linear_forward_and_backward(bias):
    g = torch.Generator().manual_seed(0)
    x, w = _leaf(3, 70, 48, generator=g), _leaf(200, 48, generator=g)  # 210 rows x 200 outputs: oneDNN's path
    b = _leaf(200, generator=g) if bias else None
    upstream = torch.randn(3, 70, 200, generator=g)
    assert kernels._eligible(x, w)
    ours = kernels.onednn_linear(x, w, b)
    grads = torch.autograd.grad((ours * upstream).sum(), [x, w] + ([b] if bias else []))
    plain = F.linear(x, w, b)
    expected = torch.autograd.grad((plain * upstream).sum(), [x, w] + ([b] if bias else []))
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_onednn_linear_with_a_frozen_weight_gives_only_the_input_gradient():
    g = torch.Generator().manual_seed(1)
    x, w = _leaf(256, 64, generator=g), torch.randn(96, 64, generator=g)
    (grad_x,) = torch.autograd.grad(kernels.onednn_linear(x, w).sum(), [x])
    torch.testing.assert_close(grad_x, torch.ones(256, 96) @ w, rtol=1e-5, atol=1e-4)
    with torch.inference_mode():  # sampling calls it under inference mode
        torch.testing.assert_close(kernels.onednn_linear(x.detach(), w), x.detach() @ w.T, rtol=1e-5, atol=1e-5)


def test_tiny_shapes_bf16_and_autocast_take_f_linear():
    x, w = torch.randn(2, 8), torch.randn(4, 8)
    assert not kernels._eligible(x, w)  # 8 outputs: MKL's small-matrix path is faster
    big_x, big_w = torch.randn(256, 64), torch.randn(256, 64)
    assert not kernels._eligible(big_x.bfloat16(), big_w.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not kernels._eligible(big_x, big_w)
        assert kernels.onednn_linear(big_x, big_w).dtype == torch.bfloat16  # autocast's F.linear, not ours


@needs_onednn
def test_use_onednn_linears_keeps_outputs_parameters_and_copies():
    model = tiny_model("llama")
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]] * 40)  # 320 rows per linear: oneDNN's path
    with torch.no_grad():
        before = model(ids).logits
    keys = list(model.state_dict())
    assert kernels.use_onednn_linears(model) == sum(type(m) is torch.nn.Linear for m in model.modules())
    assert kernels.uses_onednn(model) and list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)
    clone = copy.deepcopy(model)  # the patched forward is bound to the copy, not to the original
    layer = clone.model.layers[0].mlp.up_proj
    assert layer.forward.__self__ is layer


@needs_onednn
def test_use_torch_linears_undoes_only_the_onednn_routing():
    model = tiny_model("llama")
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]] * 40)
    with torch.no_grad():
        before = model(ids).logits
    count = kernels.use_onednn_linears(model)
    model.lm_head.forward = lambda hidden: hidden  # someone else's instance forward (as kernels.hidden_states sets)
    assert kernels.use_torch_linears(model) == count - 1
    assert "forward" in model.lm_head.__dict__
    del model.lm_head.forward
    assert not kernels.uses_onednn(model)
    assert all("forward" not in m.__dict__ for m in model.modules() if type(m) is torch.nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)  # F.linear again: the same bits
    assert kernels.use_torch_linears(model) == 0


@pytest.mark.parametrize("rows,keep_last", [(9, False), (9, True), (64, True)])
@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("temperature,bias", [(1.0, False), (0.7, True)])
def test_chunked_linear_logprobs_equal_log_softmax_with_gradients(temperature, bias, onednn, rows, keep_last):
    if onednn and not kernels.onednn_available():
        pytest.skip("no oneDNN")
    kernels.MIN_ONEDNN_ELEMENTS  # noqa: B018  (37 x 500 outputs: above it, oneDNN's path when asked)
    g = torch.Generator().manual_seed(2)
    x, w = _leaf(37, 24, generator=g), _leaf(500, 24, generator=g, scale=0.5)
    b = _leaf(500, generator=g) if bias else None
    tokens = torch.randint(0, 500, (37,), generator=g)
    upstream = torch.randn(37, generator=g)
    params = [x, w] + ([b] if bias else [])
    # 9 rows per chunk: 5 chunks, the last one short; 64: one chunk. keep_last: the last chunk's softmax is kept
    # from the forward (not recomputed); a second backward (retain_graph) must recompute it, and agree
    ours = kernels.LinearLogprobs.apply(x, w, b, tokens, temperature, rows, onednn, keep_last)
    first = torch.autograd.grad((ours * upstream).sum(), params, retain_graph=True)
    again = torch.autograd.grad((ours * upstream).sum(), params)
    plain = torch.log_softmax(F.linear(x, w, b) / temperature, -1).gather(-1, tokens[:, None]).squeeze(-1)
    expected = torch.autograd.grad((plain * upstream).sum(), params)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    for grads in (first, again):
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_linear_logprobs_bounds_the_chunk_and_keeps_the_shape():
    head = torch.nn.Linear(16, 300, bias=False)
    hidden, tokens = torch.randn(2, 11, 16), torch.randint(0, 300, (2, 11))
    out = kernels.linear_logprobs(hidden, head, tokens, max_chunk_elements=1000)  # 3 rows of 300 logits a chunk
    expected = torch.log_softmax(head(hidden), -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_head_with_hooks_soft_capping_or_sharding_is_not_cut():
    model = tiny_model("llama")
    assert kernels.head_for_logprobs(model) is model.lm_head
    handle = model.lm_head.register_forward_hook(lambda module, args, output: output * 2)
    assert kernels.head_for_logprobs(model) is None
    handle.remove()
    assert kernels.head_for_logprobs(tiny_model("gemma2")) is None  # final_logit_softcapping after the head
    sharded = tiny_model("llama")
    sharded.lm_head.weight.ds_id = 0  # DeepSpeed ZeRO-3 marks its partitioned parameters so
    assert kernels.head_for_logprobs(sharded) is None  # whole only inside the model's own forward
    assert MatmulChoice("onednn", [sharded]).kernel == "torch" and not kernels.uses_onednn(sharded)


@pytest.mark.parametrize("onednn", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_completion_logprobs_fused_head_equals_the_plain_forward(family, onednn, monkeypatch):
    if onednn and not kernels.onednn_available():
        pytest.skip("no oneDNN")
    model = tiny_model(family)  # eval mode: no dropout, so both passes see the same function
    assert (kernels.head_for_logprobs(model) is not None) == (family != "gemma2")  # the fused path is the one tested
    if onednn:  # every linear layer through oneDNN, even at these tiny shapes
        monkeypatch.setattr(kernels, "MIN_ONEDNN_ELEMENTS", 0)
        kernels.use_onednn_linears(model)
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(3, 97, (3, 5), generator=g).repeat_interleave(2, 0)  # groups of 2 share a prompt
    prompt_mask = torch.ones(6, 5)
    prompt_mask[4:, :2] = 0  # a left-padded group
    completions = torch.randint(3, 97, (6, 4), generator=g)
    completion_mask = torch.tensor([[1.0] * 4] * 5 + [[1.0, 1.0, 0.0, 0.0]])
    weights = torch.randn(6, 4, generator=g)

    def run(fused: bool):
        model.zero_grad(set_to_none=True)
        logprobs = completion_logprobs(model, prompts, prompt_mask, completions, completion_mask, 0.9, fused_head=fused)
        (logprobs * weights).sum().backward()
        return logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused, fused_grads = run(True)
    plain, plain_grads = run(False)
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
    assert fused_grads.keys() == plain_grads.keys()
    # tied embeddings took sparse lookup gradients inside (kernels.sparse_tied_embeddings): .grad is dense, the
    # module is as it was
    assert not any(grad.is_sparse for grad in fused_grads.values()) and not model.get_input_embeddings().sparse
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("fused,recompute", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_prompt_pass_for_all_micro_batches_gives_the_full_batch_gradient(family, fused, recompute):
    """logprobs.PromptPass: the distinct prompts run once, micro-batches (in any order, of a subset of rows) read
    their cache through detached leaves, one backward through the prompt pass at the end: the same log-probs and
    gradient as one full-batch forward and backward (which shares prompts its own way), for every family; also when
    the prompt pass keeps no activations and runs again in its backward (``recompute``)."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(4)
    prompts = torch.randint(3, 97, (4, 5), generator=g).repeat_interleave(2, 0)  # groups of 2 share a prompt
    prompt_mask = torch.ones(8, 5)
    prompt_mask[4:6, :2] = 0  # a left-padded group
    completions = torch.randint(3, 97, (8, 4), generator=g)
    completion_mask = torch.ones(8, 4)
    completion_mask[7, 2:] = 0
    weights = torch.randn(8, 4, generator=g)
    rows = [0, 1, 2, 4, 5, 6, 7]  # row 3 left out (a zero-advantage row the update skips)
    chunks = [[4, 0], [7, 2, 1], [6, 5]]  # rows of different prompts mixed, a group split across chunks
    if not PromptPass.usable(model, len(chunks)):
        assert family in ("mistral-sliding", "gemma2")  # sliding-window caches: the per-chunk prompt pass instead
        return

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    model.zero_grad(set_to_none=True)
    index = torch.tensor(rows)
    full = completion_logprobs(model, prompts[index], prompt_mask[index], completions[index], completion_mask[index],
                               0.9, fused_head=fused)
    (full * weights[index]).sum().backward()
    expected = grads()
    prompt_pass = PromptPass(model, prompts, prompt_mask, rows, fused_head=fused,
                             max_kept_tokens=0 if recompute else None)
    got = torch.zeros(8, 4)
    for chunk in chunks:
        part = torch.tensor(chunk)
        logprobs = completion_logprobs(model, prompts[part], prompt_mask[part], completions[part],
                                       completion_mask[part], 0.9, fused_head=fused, prompt_pass=(prompt_pass, part))
        (logprobs * weights[part]).sum().backward()
        got[part] = logprobs.detach()
    prompt_pass.backward()
    torch.testing.assert_close(got[index], full.detach(), rtol=1e-4, atol=1e-4)
    ours = grads()
    assert ours.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-3, atol=1e-4, msg=name)
    with pytest.raises(ValueError, match="outside the rows"):
        PromptPass(model, prompts, prompt_mask, rows, fused_head=fused).chunk(torch.tensor([3]))


def test_linear_logprobs_of_no_rows_is_empty_with_zero_gradients():
    head = torch.nn.Linear(8, 20, bias=False)
    hidden = torch.randn(0, 3, 8, requires_grad=True)
    out = kernels.linear_logprobs(hidden, head, torch.zeros(0, 3, dtype=torch.long))
    out.sum().backward()
    assert out.shape == (0, 3) and hidden.grad.shape == (0, 3, 8)
    assert torch.equal(head.weight.grad, torch.zeros_like(head.weight))


@needs_onednn
@pytest.mark.parametrize("family", ["llama-smollm2-shape", "gpt2"])
def test_direct_weight_grads_add_into_grad_what_autograd_would(family, monkeypatch):
    """kernels.direct_weight_grads: oneDNN linears and the fused head add d/dW into ``.grad`` themselves (in place,
    the same tensor from one micro-batch to the next); the gradients equal autograd's accumulation over the same
    micro-batches and prompt pass, tied embeddings included. A parameter with a hook, or a ``.grad`` that is not a
    plain dense tensor, goes through autograd (its hook sees its gradient)."""
    monkeypatch.setattr(kernels, "MIN_ONEDNN_ELEMENTS", 0)  # the tiny model's linears through oneDNN too
    model = tiny_model(family)
    kernels.use_onednn_linears(model)
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(3, 97, (3, 5), generator=g).repeat_interleave(2, 0)
    prompt_mask, completions = torch.ones(6, 5), torch.randint(3, 97, (6, 4), generator=g)
    completion_mask, weights = torch.ones(6, 4), torch.randn(6, 4, generator=g)
    chunks = [[0, 3], [1, 2], [4, 5]]
    named = dict(model.named_parameters())
    head_weight = model.get_output_embeddings().weight  # gpt2's linears are Conv1D: hook its (tied) head there
    hooked = next(n for n, p in named.items() if p is head_weight) if family == "gpt2" else next(
        n for n in named if n.endswith("mlp.down_proj.weight"))
    seen, added = [], []
    add_grad = kernels._add_grad
    monkeypatch.setattr(kernels, "_add_grad", lambda weight, *a: (added.append(weight), add_grad(weight, *a)))

    def run(direct: bool, hook: bool, shared: bool = True):
        model.zero_grad(set_to_none=True)
        added.clear()
        handle = named[hooked].register_hook(lambda grad: seen.append(grad.shape)) if hook else None
        prompt_pass = PromptPass(model, prompts, prompt_mask, list(range(6)), fused_head=True) if shared else None
        for chunk in chunks:
            part = torch.tensor(chunk)
            logprobs = completion_logprobs(model, prompts[part], prompt_mask[part], completions[part],
                                           completion_mask[part], 1.0, fused_head=True,
                                           prompt_pass=(prompt_pass, part) if shared else None)
            with kernels.direct_weight_grads(direct):
                (logprobs * weights[part]).sum().backward()
        if shared:
            with kernels.direct_weight_grads(direct):
                prompt_pass.backward()
        if handle is not None:
            handle.remove()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, {id(w) for w in added}

    expected, none = run(direct=False, hook=False)
    got, direct = run(direct=True, hook=False)
    linear_weights = {id(m.weight) for m in model.modules() if type(m) is torch.nn.Linear}
    assert not none and direct == linear_weights | {id(model.get_output_embeddings().weight)}  # every weight, head too
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    hooked_grads, direct = run(direct=True, hook=True)
    assert id(named[hooked]) not in direct and len(seen) >= len(chunks)  # through autograd: its hook saw it
    for name in expected:
        torch.testing.assert_close(hooked_grads[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not any(p.grad.is_sparse for p in model.parameters())
    # under saved-tensor hooks (activations offloaded: every saved tensor, the weights too, comes back as a copy) the
    # gradient still lands in the parameter's own .grad (it was added to the copy's, and lost, before)
    with torch.autograd.graph.save_on_cpu():
        offloaded, direct = run(direct=True, hook=False)
    assert direct == linear_weights | {id(model.get_output_embeddings().weight)}
    for name in expected:
        torch.testing.assert_close(offloaded[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    enable_gradient_checkpointing(model)  # train.gradient_checkpointing: non-reentrant, saved-tensor hooks too
    model.train()  # (and no shared prompt pass: policy_update runs none with checkpointing)
    for module in model.modules():  # gpt2's dropout off: the same function in train mode
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    checkpointed_autograd, _ = run(direct=False, hook=False, shared=False)
    checkpointed, direct = run(direct=True, hook=False, shared=False)
    assert direct == linear_weights | {id(model.get_output_embeddings().weight)}
    for name in expected:
        torch.testing.assert_close(checkpointed[name], checkpointed_autograd[name], rtol=1e-5, atol=1e-6, msg=name)


def test_direct_weight_grads_stay_out_of_double_backward_and_sparse_grads():
    """Under ``create_graph`` (the gradient itself differentiable) or with a sparse ``.grad`` the backward returns
    d/dW to autograd as usual."""
    head = torch.nn.Linear(8, 30, bias=False)
    hidden = torch.randn(5, 8, requires_grad=True)
    tokens = torch.randint(0, 30, (5,))
    with kernels.direct_weight_grads():
        (grad,) = torch.autograd.grad(kernels.linear_logprobs(hidden, head, tokens).sum(), [head.weight],
                                      create_graph=True)
    expected = torch.autograd.grad(torch.log_softmax(hidden @ head.weight.T, -1).gather(-1, tokens[:, None]).sum(),
                                   [head.weight])[0]
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    assert grad.requires_grad and head.weight.grad is None
    head.weight.grad = torch.zeros_like(head.weight).to_sparse()
    with kernels.direct_weight_grads():
        kernels.linear_logprobs(hidden, head, tokens).sum().backward()
    torch.testing.assert_close(head.weight.grad.to_dense(), expected, rtol=1e-5, atol=1e-6)


def test_a_second_backward_through_the_head_gives_the_same_gradient_to_the_last_bit():
    """The kept softmax (first backward) is computed as the recomputed one (a second backward, ``retain_graph``) is:
    the variance lab differentiates one graph several times and compares estimators exactly."""
    g = torch.Generator().manual_seed(7)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    tokens = torch.randint(0, 300, (2, 9), generator=g)
    loss = (kernels.linear_logprobs(hidden, head, tokens) * torch.randn(2, 9, generator=g)).sum()
    first = torch.autograd.grad(loss, [hidden, head.weight], retain_graph=True)
    second = torch.autograd.grad(loss, [hidden, head.weight])
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_grouped_query_attention_on_cpu_equals_the_expanded_keys_and_values(monkeypatch):
    """kernels.gqa_attention_on_cpu: transformers' sdpa attention hands a grouped-query model's 3 key/value heads to
    the kernel as they are (enable_gqa) instead of copying them out to the 9 query heads; on a left-padded batch
    (a mask, where transformers would copy) the logits are the same and the gradients agree to float rounding."""
    from transformers.integrations import sdpa_attention

    assert gqa_attention_on_cpu() and gqa_attention_on_cpu()  # idempotent
    patched = sdpa_attention.use_gqa_in_sdpa
    model = tiny_model("llama-smollm2-shape")
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids = torch.randint(3, 97, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = mask[1, :1] = 0  # left padding
    copies = []
    repeat = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda x, n: (copies.append(n), repeat(x, n))[1])

    def run(rule):
        monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", rule)
        model.zero_grad(set_to_none=True)
        copies.clear()
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits * mask[..., None]).square().sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(copies)

    expected_logits, expected_grads, expanded = run(patched.original)
    logits, grads, grouped = run(patched)
    assert expanded == 2 * model.config.num_hidden_layers and grouped == 0  # keys and values, per layer: now none
    assert torch.equal(logits, expected_logits)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()), msg=name)


@needs_onednn
def test_packed_linear_equals_f_linear_and_falls_back_where_onednn_would_not_run(monkeypatch):
    """packed.PackedLinear: the weight reordered once for oneDNN gives F.linear's product (float32 rounding) at
    decoding's, a prefill's and one row's shapes, 2-D and 3-D inputs, with and without bias; where oneDNN would not
    run (autocast; something to differentiate) it computes on the plain weight."""
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    for b in (None, bias):
        layer = packed.PackedLinear(weight, b, rows=32)
        assert layer.packed.layout != torch.strided  # a blocked oneDNN tensor, not a view of the weight
        for shape in ((32, 64), (368, 64), (1, 64), (4, 7, 64)):
            x = torch.randn(*shape, generator=g)
            torch.testing.assert_close(layer(x), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)
    layer = packed.PackedLinear(weight, bias, rows=32)
    x = torch.randn(32, 64, generator=g, requires_grad=True)
    layer(x).square().sum().backward()  # differentiated: onednn_linear on the plain weight, with its backward
    expected = torch.autograd.grad(F.linear(x, weight, bias).square().sum(), [x])[0]
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x.detach()).dtype == torch.bfloat16  # autocast's F.linear, as unpacked
    monkeypatch.setattr(kernels, "MIN_ONEDNN_ELEMENTS", 10**9)  # too small for oneDNN: F.linear's exact bits
    assert torch.equal(layer(x.detach()), F.linear(x.detach(), weight, bias))


@needs_onednn
@pytest.mark.parametrize("family", ["llama-smollm2-shape", "gpt2"])
def test_sampling_with_packed_weights_matches_the_plain_forward_and_restores_the_routing(family, monkeypatch):
    """packed.packed_linears around the sampler: every oneDNN-routed linear (and the decoder's fused q/k/v)
    computes with packed weights while sampling; the sampled log-probs equal one plain forward pass over each
    prompt + completion; afterwards (also after an error) the layers are routed as before, nothing packed kept.
    Frozen weights are left unpacked."""
    from tests.test_decoder_families import EOS, PROMPTS, assert_sampler_matches_plain_forward

    monkeypatch.setattr(kernels, "MIN_ONEDNN_ELEMENTS", 0)
    model = tiny_model(family)
    routed = kernels.use_onednn_linears(model)
    calls = []
    call = packed.PackedLinear.__call__
    monkeypatch.setattr(packed.PackedLinear, "__call__", lambda self, x: (calls.append(id(self)), call(self, x))[1])
    assert_sampler_matches_plain_forward(model, [p for p in PROMPTS for _ in range(2)], EOS)
    # every routed layer decoded packed (llama: q/k/v as one fused packed matmul, the rest packed in place)
    fused = model.config.num_hidden_layers if family != "gpt2" else 0
    assert len(set(calls)) == routed - 3 * fused + fused
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert all(m.forward.__func__ is kernels._linear_forward for m in linears)
    with pytest.raises(RuntimeError, match="boom"):
        with packed.packed_linears(model, 4) as count:
            assert count == routed and all(isinstance(m.forward, packed.PackedLinear) for m in linears)
            raise RuntimeError("boom")
    assert all(m.forward.__func__ is kernels._linear_forward for m in linears) and kernels.uses_onednn(model)
    model.requires_grad_(False)  # frozen weights (a LoRA run's base) are not packed: no gradients to make room
    with packed.packed_linears(model, 4) as count:
        assert count == 0
    if family != "gpt2":
        assert not isinstance(make_decoder(model, 4, 16).qkv[0][0], packed.PackedLinear)
