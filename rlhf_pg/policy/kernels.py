"""Two CPU kernels that the profile of a 135M model's step pointed at (benchmarks/profile_step.py --model).

**oneDNN fp32 linear layers.** torch's CPU float32 ``mm`` goes to MKL's sgemm. On some processors (the
AMD EPYC these benchmarks ran on) oneDNN's float32 matmul, which torch also ships, is about twice as
fast at a transformer's shapes (measured 390-430 GFLOPS against MKL's 160-210 at ``[2048, 576] x
[576, 1536]`` on 2 threads; 2-3x at decoding's 32-row shapes). ``use_onednn_linears(model)`` routes
each ``nn.Linear`` of a model through it, forward and backward (``OneDNNLinear``: the same float32
product, summed in another order: relative error ~1e-6, like any two BLAS libraries), and leaves
everything else alone: a bf16/autocast run, a GPU, tiny shapes where MKL wins, non-float32 weights
all take ``F.linear``; ``use_torch_linears`` undoes it. Which of the two a run uses is ``train.cpu_matmul``
(``cpu_matmul.py``: ``auto`` starts from what is known of the processor and re-checks on the run's own shapes
between steps; ``onednn`` / ``torch`` force one).

**The log-probability head, chunked.** The update needs ``log softmax(h W^T / tau)[a_t]`` at every
completion position: as logits, that is a ``[B, T, V]`` float32 tensor (400 MB at B*T = 2048 and
SmolLM2's 49,152-token vocabulary), kept for the backward pass with its gradient and a copy or two.
``linear_logprobs`` computes it ``rows`` at a time and keeps only ``h`` and one log-sum-exp per row;
its backward recomputes each chunk's logits (one extra ``lm_head`` matmul) and forms
``d/dh = g (onehot(a) - softmax) W / tau`` and ``d/dW`` chunk by chunk. ``head_for_logprobs(model)``
says whether a model's forward may be cut before its ``lm_head`` (families whose logits are exactly
``lm_head(hidden)``: no soft-capping or logit scaling after it), ``hidden_states(model)`` does the cut.

**Weight gradients in place.** Inside ``direct_weight_grads()`` (the update turns it on for one process and an
unwrapped model) both backward passes add ``d/dW`` into the parameter's ``.grad`` with ``addmm_`` instead of handing
autograd a new ``[out, in]`` tensor per micro-batch to add there (benchmarks/README.md, "Gradients added in place").
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
# below this many output elements per call (rows x out_features) MKL's small-matrix path wins (measured)
MIN_ONEDNN_ELEMENTS = 10_000


def onednn_available() -> bool:
    return _LINEAR is not None and torch.backends.mkldnn.is_available()


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return _LINEAR(x, weight, bias, "none", [], "")


def _eligible(x: Tensor, weight: Tensor) -> bool:
    return (x.device.type == "cpu" and weight.dtype == torch.float32 and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and x.numel() // max(x.shape[-1], 1) * weight.shape[0] >= MIN_ONEDNN_ELEMENTS)


# --- d/dW straight into .grad ----------------------------------------------------------------------------

_DIRECT_GRADS = False


@contextlib.contextmanager
def direct_weight_grads(enabled: bool = True) -> Iterator[None]:
    """Inside, the backward of ``OneDNNLinear`` and ``LinearLogprobs`` adds ``d/dW`` straight into the weight's
    ``.grad`` (``addmm_``: the product accumulated in place) instead of returning a fresh ``[out, in]`` tensor for
    autograd to add there. The same sum, without the transposed copies oneDNN makes of ``d/dW``'s inputs, the new
    tensor's page faults (113 MB for SmolLM2's head, per micro-batch) and autograd's separate ``add_`` of each
    micro-batch's gradient into ``.grad``. Only for parameters whose gradient nothing else watches: a leaf with no
    tensor hooks, a dense ``.grad`` (or none yet), no double backward; the caller says when no wrapper watches
    either (``policy_update``: one process, a model no DDP / DeepSpeed / FSDP wraps)."""
    global _DIRECT_GRADS
    saved, _DIRECT_GRADS = _DIRECT_GRADS, enabled
    try:
        yield
    finally:
        _DIRECT_GRADS = saved


def _direct_grad(weight: Tensor | None, *operands: Tensor) -> bool:
    """May this backward add ``d/dW`` (a product of ``operands``) into ``weight.grad`` itself
    (``direct_weight_grads``)? Not under autocast (the backward of a mixed-precision forward runs inside it).
    ``weight`` is the tensor the forward was given (kept on ``ctx``), not the one ``ctx.saved_tensors`` unpacks: under
    saved-tensor hooks (``torch.autograd.graph.save_on_cpu``, non-reentrant checkpointing) that is another tensor
    object with its own ``.grad``, and a gradient added there would be lost (None: the weight is no leaf)."""
    if not (_DIRECT_GRADS and weight is not None and weight.is_leaf and weight.requires_grad
            and all(operand.dtype == weight.dtype for operand in operands)
            and not torch.is_autocast_enabled(weight.device.type)
            and not torch.is_grad_enabled() and not weight._backward_hooks
            and not getattr(weight, "_post_accumulate_grad_hooks", None)):
        return False
    grad = weight.grad
    return grad is None or (grad.layout == torch.strided and grad.dtype == weight.dtype and grad.shape == weight.shape
                            and grad.is_contiguous() and not grad.requires_grad)


def _add_grad(weight: Tensor, left: Tensor, right: Tensor) -> None:
    """``weight.grad += left @ right`` in place (the product itself when there is no ``.grad`` yet)."""
    if weight.grad is None:
        weight.grad = torch.mm(left, right)
    else:
        weight.grad.addmm_(left, right)


def weight_grad(parameter: Tensor | None, g: Tensor, x: Tensor, onednn: bool) -> Tensor | None:
    """``g^T x`` ``[out, in]`` for the weight ``parameter`` of a linear layer: added into its ``.grad`` in place where
    ``direct_weight_grads`` allows it (MKL: transposed operands without copies; then None for autograd), else returned."""
    if _direct_grad(parameter, g, x):
        _add_grad(parameter, g.t(), x)
        return None
    return matmul_nt(g.t(), x.t(), onednn)


def matmul_nt(x: Tensor, weight: Tensor, onednn: bool) -> Tensor:
    """``x @ weight.T`` for 2-D ``x`` ``[N, in]`` and ``weight`` ``[out, in]``, through oneDNN when asked and eligible."""
    if onednn and _eligible(x, weight):
        return _onednn(x, weight)  # transposed views are fine (faster than copying them first: measured)
    return F.linear(x, weight)


class OneDNNLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with every matmul (forward, d/dx, d/dW) done by oneDNN."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        ctx.save_for_backward(flat, weight)
        ctx.has_bias, ctx.parameter = bias is not None, weight if weight.is_leaf else None  # (see _direct_grad)
        return _onednn(flat, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        flat, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).contiguous()  # [N, out]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul_nt(g, weight.t(), True).view(*grad.shape[:-1], weight.shape[1])  # g W
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(ctx.parameter, g, flat, True)  # g^T x  [out, in] (or added into .grad: None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` through oneDNN where eligible (CPU, float32, no autocast, not a tiny shape), else ``F.linear``."""
    if not _eligible(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return OneDNNLinear.apply(x, weight, bias)
    # nothing to differentiate (sampling, a reference pass): the kernel itself, without an autograd node's overhead
    # (~28 us a call: 0.27 s of a 135M model's 64-token rollout, measured)
    return _onednn(x.reshape(-1, x.shape[-1]).contiguous(), weight, bias).view(*x.shape[:-1], weight.shape[0])


def _linear_forward(self, input: Tensor) -> Tensor:
    return onednn_linear(input, self.weight, self.bias)


def use_onednn_linears(model: torch.nn.Module) -> int:
    """Route every plain ``nn.Linear`` of ``model`` (LoRA's base and adapter layers included) through
    ``onednn_linear``. Parameters, state dicts and saving are untouched. Returns how many layers."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.forward = types.MethodType(_linear_forward, module)
            count += 1
    return count


def use_torch_linears(model: torch.nn.Module) -> int:
    """Undo ``use_onednn_linears``: every ``nn.Linear`` of ``model`` routed through oneDNN goes back to its class's
    ``forward`` (``F.linear``). Other instance-level forwards are left alone. Returns how many layers."""
    count = 0
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) is _linear_forward:
            del module.forward
            count += 1
    return count


def uses_onednn(model: torch.nn.Module) -> bool:
    """Whether any linear layer of ``model`` is routed through oneDNN (``use_onednn_linears``; packed or not)."""
    return any(getattr(m.__dict__.get("forward"), "__func__", None) is _linear_forward
               or getattr(m.__dict__.get("forward"), "routes_onednn", False) for m in model.modules())


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(logits / temperature)[tokens]`` without materializing the full log-softmax.

    ``logits``: ``[..., V]``, ``tokens``: ``[...]``. Computed as ``logit[token] - logsumexp(logits)``
    in float32 one row-block at a time, so no second ``[..., V]`` float32 tensor is kept.
    """
    if temperature not in (0.0, 1.0):
        logits = logits / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float()
    flat = logits.reshape(-1, logits.shape[-1])
    chunk = 4096
    lse = torch.cat([torch.logsumexp(flat[i : i + chunk].float(), dim=-1) for i in range(0, flat.shape[0], chunk)])
    return picked - lse.view(picked.shape)


# --- the log-probability head ------------------------------------------------------------------------

# model types whose CausalLM forward returns exactly lm_head(hidden) (nothing applied after the head),
# each tested against the plain forward (tests/test_decoder_families.py)
HEAD_FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt_neox", "opt", "olmo2",
                 "starcoder2")


def _body(model):
    body = getattr(model, "module", model)  # DDP
    return body.get_base_model() if hasattr(body, "get_base_model") else body  # PEFT


def sharded(parameter) -> bool:
    """A parameter that is sharded between forwards (FSDP2 DTensor, DeepSpeed ZeRO-3): only the model's own
    forward sees it whole."""
    return hasattr(parameter, "ds_id") or type(parameter).__name__ == "DTensor"


def head_for_logprobs(model, allow_sharded: bool = False) -> torch.nn.Linear | None:
    """The model's output layer when its logits are exactly ``head(hidden)`` (a plain linear layer without
    hooks, of a family in ``HEAD_FAMILIES``), so ``linear_logprobs`` may replace it; else None. A weight sharded
    between forwards only with ``allow_sharded`` (``sharded_head_logprobs`` gathers it)."""
    if "FullyShardedDataParallel" in type(model).__name__:  # FSDP1: flat parameters, sharded outside forward
        return None
    body = _body(model)
    config = getattr(body, "config", None)
    if config is None or getattr(config, "model_type", None) not in HEAD_FAMILIES:
        return None
    if any(getattr(config, key, None) not in (None, 1.0) for key in ("final_logit_softcapping", "logit_scale",
                                                                      "logits_scaling")):
        return None
    head = body.get_output_embeddings() if hasattr(body, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head._forward_hooks or head._forward_pre_hooks or (
            sharded(head.weight) and not allow_sharded):
        return None  # a LoRA-wrapped head, hooks that expect logits, or a weight sharded after the forward
    return head


def sharded_head_logprobs(model):
    """FSDP2 (a sharded root whose head ``head_for_logprobs`` allows): ``(head, apply)`` where ``apply(hidden, tokens,
    temperature)`` is ``linear_logprobs`` run as a forward method FSDP knows (``register_fsdp_forward_method``), so the
    head's weight is gathered for it and its gradient reduce-scattered; else None. No ``[B, T, V]`` logits then
    either."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    body, head = _body(model), head_for_logprobs(model, allow_sharded=True)
    if not isinstance(body, FSDPModule) or head is None or not sharded(head.weight):
        return None
    if "rlhf_pg_head_logprobs" not in body.__dict__:
        def head_logprobs(self, hidden, tokens, temperature):
            return linear_logprobs(hidden, self.get_output_embeddings(), tokens, temperature)

        body.rlhf_pg_head_logprobs = types.MethodType(head_logprobs, body)
        register_fsdp_forward_method(body, "rlhf_pg_head_logprobs")
    return head, body.rlhf_pg_head_logprobs


@contextlib.contextmanager
def hidden_states(head: torch.nn.Module) -> Iterator[None]:
    """Inside, ``head`` returns its input: the model's ``.logits`` are the final hidden states."""
    saved = head.__dict__.get("forward")
    head.forward = lambda hidden: hidden
    try:
        yield
    finally:
        if saved is None:
            del head.forward
        else:
            head.forward = saved


@contextlib.contextmanager
def sparse_tied_embeddings(model, head: torch.nn.Module) -> Iterator[None]:
    """Inside, a model whose input embedding shares its weight with ``head`` (tied embeddings, e.g. SmolLM2, GPT-2)
    records a sparse gradient for the embedding lookups: only the looked-up rows, added into the head's dense
    ``[V, H]`` gradient of the same backward, instead of a zero-filled ``[V, H]`` tensor per lookup (two per
    micro-batch: ~40 ms each at SmolLM2's size, against 0.4 ms sparse, measured). The same gradient; the
    parameter's ``.grad`` stays dense, since the head's part of it always is. Untied, frozen or sharded
    embeddings are left alone."""
    body = _body(model)
    embeddings = body.get_input_embeddings() if hasattr(body, "get_input_embeddings") else None
    if (type(embeddings) is not torch.nn.Embedding or embeddings.weight is not head.weight or embeddings.sparse
            or not embeddings.weight.requires_grad or embeddings.max_norm is not None or sharded(head.weight)):
        yield
        return
    embeddings.sparse = True
    try:
        yield
    finally:
        embeddings.sparse = False


class LinearLogprobs(torch.autograd.Function):
    """``log softmax((x W^T + b) / tau)[tokens]`` for ``x`` ``[N, H]``, ``rows`` rows at a time (see module doc)."""

    @staticmethod
    def forward(ctx, x, weight, bias, tokens, temperature: float, rows: int, onednn: bool, keep_last: bool = False):
        scale = 1.0 / temperature
        picked = torch.empty(x.shape[0], dtype=_exact(weight.dtype), device=x.device)
        maxes, sums = torch.empty_like(picked), torch.empty_like(picked)
        for start in range(0, x.shape[0], rows):
            logits = _chunk_logits(x[start : start + rows], weight, bias, scale, onednn)
            picked[start : start + rows] = logits.gather(-1, tokens[start : start + rows, None]).squeeze(-1)
            # log-sum-exp in place: the chunk becomes exp(z - max) (torch.logsumexp would allocate a second chunk,
            # 50 MB at 256 rows of SmolLM2's vocabulary: its page faults made it ~4x slower, measured)
            _exp_shifted(logits, maxes[start : start + rows], sums[start : start + rows])
        lse = sums.log().add_(maxes)
        ctx.save_for_backward(x, weight, bias, tokens, maxes, sums)
        ctx.scale, ctx.rows, ctx.onednn = scale, rows, onednn
        ctx.parameter = weight if weight.is_leaf else None  # (see _direct_grad)
        # the last chunk's softmax is kept for the backward, which then need not recompute its logits (the whole
        # batch when it is one chunk, e.g. a micro-batch). No higher peak: the backward starts here, and its
        # recomputed chunk would be as large; computed as the backward's recompute is (exp(z - max) / sum), so a
        # second backward (retain_graph) gives the same gradient to the last bit
        ctx.last_probs = None
        if keep_last and x.shape[0] > 0:  # (grad mode is off inside forward: the caller says if a backward follows)
            ctx.last_probs = logits.div_(sums[start : start + rows, None])
        return picked - lse

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, tokens, maxes, sums = ctx.saved_tensors
        scale, rows, onednn = ctx.scale, ctx.rows, ctx.onednn
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if want_x else None
        grad_w = None
        grad_b = torch.zeros(weight.shape[0], dtype=_exact(weight.dtype), device=x.device) if want_b and bias is not None else None
        # d/dW straight into .grad (the softmax is computed in weight's dtype only when that is float32 or float64)
        direct = want_w and weight.dtype == _exact(weight.dtype) and _direct_grad(ctx.parameter, x)
        weight_t = weight.t()  # [H, V]
        last, ctx.last_probs = ctx.last_probs, None  # (a second backward, retain_graph=True, recomputes it)
        for start in range(0, x.shape[0], rows):
            part, g = x[start : start + rows], grad[start : start + rows].to(_exact(weight.dtype))
            if last is not None and start + rows >= x.shape[0]:
                probs = last
            else:
                probs = _chunk_logits(part, weight, bias, scale, onednn).sub_(maxes[start : start + rows, None]).exp_()
                probs = probs.div_(sums[start : start + rows, None])
            # d picked-lse / d logits = onehot(a) - softmax; times the upstream g and the 1/tau of the logits
            probs = probs.mul_(-(g * scale)[:, None])
            probs.scatter_add_(-1, tokens[start : start + rows, None], (g * scale)[:, None])
            probs = probs.to(weight.dtype)
            if want_x:
                grad_x[start : start + rows] = matmul_nt(probs, weight_t, onednn)
            if direct:
                _add_grad(ctx.parameter, probs.t(), part)
            elif want_w and grad_w is None and probs.dtype == _exact(weight.dtype):
                grad_w = torch.mm(probs.t(), part)  # the first chunk starts the sum (no zero-filled [V, H] first)
            elif want_w:
                if grad_w is None:
                    grad_w = torch.zeros_like(weight, dtype=_exact(weight.dtype))
                grad_w.addmm_(probs.t(), part)  # accumulated in place (oneDNN here would need two transposed copies)
            if grad_b is not None:
                grad_b += probs.sum(0)
        if want_w and not direct and grad_w is None:  # no rows
            grad_w = torch.zeros_like(weight)
        return (grad_x, grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None, None, None, None)


def _chunk_logits(x: Tensor, weight: Tensor, bias: Tensor | None, scale: float, onednn: bool) -> Tensor:
    logits = matmul_nt(x, weight, onednn)
    if bias is not None:
        logits = logits + bias
    logits = logits.to(_exact(logits.dtype))
    return logits.mul_(scale) if scale != 1.0 else logits


def _exp_shifted(logits: Tensor, maxes: Tensor, sums: Tensor) -> None:
    """``logits`` ``[N, V]`` becomes ``exp(logits - max)`` in place, each row's max written to ``maxes`` and the sum
    of its exponentials to ``sums`` (so log-sum-exp = log(sums) + maxes, softmax = logits / sums). A row whose max is
    not finite is shifted by 0 instead, as torch.logsumexp does."""
    torch.amax(logits, dim=-1, out=maxes)
    maxes.masked_fill_(~torch.isfinite(maxes), 0.0)
    logits.sub_(maxes[:, None]).exp_()
    torch.sum(logits, dim=-1, out=sums)


def _exact(dtype: torch.dtype) -> torch.dtype:
    """The dtype the log-softmax is computed in: float32, or float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


def linear_logprobs(hidden: Tensor, head: torch.nn.Linear, tokens: Tensor, temperature: float = 1.0,
                    max_chunk_elements: int = 1 << 25) -> Tensor:
    """``log softmax(head(hidden) / temperature)[tokens]`` with ``hidden`` ``[..., H]``, ``tokens`` ``[...]``,
    never holding more than ``max_chunk_elements`` logits (default 32M: 128 MB of float32) at once."""
    flat, ids = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    rows = max(1, min(flat.shape[0], max_chunk_elements // head.weight.shape[0]))
    onednn = uses_onednn(head) or False
    keep_last = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                for t in (flat, head.weight, head.bias))
    out = LinearLogprobs.apply(flat, head.weight, head.bias, ids, float(temperature), rows, onednn, keep_last)
    return out.view(tokens.shape)
