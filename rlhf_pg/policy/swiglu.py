"""The gated MLP of Llama-family models, ``down(silu(gate(x)) * up(x))``, with fewer saved activations.

Differentiated op by op, the MLP keeps four ``[tokens, intermediate]`` tensors per layer for its backward: ``gate(x)``
(for SiLU's derivative), ``silu(gate(x))`` and ``up(x)`` (for the product's) and the product itself (the input of
``down``, for ``d/dW_down``). ``SwiGLU`` keeps two, ``g = gate(x)`` and ``u = up(x)``, and recomputes
``h = silu(g) * u`` in its backward (two elementwise passes; no matmul is recomputed):

    forward    g = x W_g^T,  u = x W_u^T,  h = silu(g) u,  y = h W_d^T               (kept: x, g, u)
    backward   dW_d = dy^T h,  dh = dy W_d,  du = dh silu(g),  dg = dh u silu'(g),
               dW_g = dg^T x,  dW_u = du^T x,  dx = dg W_g + du W_u

The same function and the same gradients to float rounding (tested against the module's own forward and
autograd). At SmolLM2-135M (intermediate 1536, hidden 576) that is 12 KB less per token and layer of the ~60 KB an
update keeps, so a micro-batch holds ~20 % fewer bytes of activations. ``use_lean_mlps(model)`` installs it on every
gated MLP whose three projections are plain bias-free ``nn.Linear`` layers with a SiLU; it takes effect only where
something is differentiated, outside autocast, on whole (unsharded) weights: everything else (sampling, a reference
pass, LoRA-wrapped projections, mixed precision, FSDP) runs the module's own forward. The matmuls go where the
linear layers are routed (oneDNN or torch, ``kernels.use_onednn_linears``), and inside ``direct_weight_grads`` the
weight gradients are added into ``.grad`` in place, as ``kernels.OneDNNLinear`` does.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .kernels import matmul_nt, sharded, uses_onednn, weight_grad

Tensor = torch.Tensor


class SwiGLU(torch.autograd.Function):
    """``down(silu(x W_g^T) * x W_u^T)`` for ``x`` ``[..., hidden]``, keeping ``x``, ``g`` and ``u`` (module doc)."""

    @staticmethod
    def forward(ctx, x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, onednn: bool) -> Tensor:
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        g, u = matmul_nt(flat, w_gate, onednn), matmul_nt(flat, w_up, onednn)
        y = matmul_nt(F.silu(g).mul_(u), w_down, onednn)
        ctx.save_for_backward(flat, g, u, w_gate, w_up, w_down)
        ctx.onednn = onednn
        ctx.parameters = tuple(w if w.is_leaf else None for w in (w_gate, w_up, w_down))  # (kernels._direct_grad)
        return y.view(*x.shape[:-1], w_down.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        flat, g, u, w_gate, w_up, w_down = ctx.saved_tensors
        onednn, (p_gate, p_up, p_down) = ctx.onednn, ctx.parameters
        dy = grad.reshape(-1, grad.shape[-1]).contiguous()
        s = F.silu(g)
        grads = [None, None, None, None, None]
        if ctx.needs_input_grad[3]:
            grads[3] = weight_grad(p_down, dy, s * u, onednn)
        dh = matmul_nt(dy, w_down.t(), onednn)  # [N, intermediate]
        du = s.mul_(dh)  # dh silu(g)
        dg = torch.ops.aten.silu_backward(dh.mul_(u), g)  # dh u silu'(g)
        if ctx.needs_input_grad[0]:
            dx = matmul_nt(dg, w_gate.t(), onednn)
            grads[0] = dx.add_(matmul_nt(du, w_up.t(), onednn)).view(*grad.shape[:-1], w_gate.shape[1])
        if ctx.needs_input_grad[1]:
            grads[1] = weight_grad(p_gate, dg, flat, onednn)
        if ctx.needs_input_grad[2]:
            grads[2] = weight_grad(p_up, du, flat, onednn)
        return tuple(grads)


def _lean_mlp_forward(self, x: Tensor) -> Tensor:
    if torch.is_grad_enabled() and lean_mlp(self):  # (asked again: LoRA may have wrapped a projection since)
        weights = (self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        if ((x.requires_grad or any(w.requires_grad for w in weights)) and not torch.is_autocast_enabled(x.device.type)
                and all(w.dtype == x.dtype for w in weights) and not any(sharded(w) for w in weights)):
            return SwiGLU.apply(x, *weights, uses_onednn(self.gate_proj))
    return type(self).forward(self, x)


def lean_mlp(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a gated MLP ``SwiGLU`` computes: plain bias-free gate/up/down ``nn.Linear`` and a SiLU."""
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return (all(type(p) is torch.nn.Linear and p.bias is None for p in parts)
            and _silu(getattr(module, "act_fn", None)))


def _silu(act) -> bool:
    """torch's ``nn.SiLU`` or transformers' ``SiLUActivation`` (``F.silu``; the one ``ACT2FN["silu"]`` gives)."""
    return type(act) is torch.nn.SiLU or (type(act).__name__ == "SiLUActivation"
                                          and type(act).__module__ == "transformers.activations")


def use_lean_mlps(model: torch.nn.Module) -> int:
    """Give every gated MLP of ``model`` that ``lean_mlp`` accepts the ``SwiGLU`` forward (an instance attribute:
    parameters, state dicts and saving are untouched; modules wrapped later, e.g. by LoRA, fall back by themselves).
    Returns how many modules."""
    count = 0
    for module in model.modules():
        if lean_mlp(module):
            module.forward = types.MethodType(_lean_mlp_forward, module)
            count += 1
    return count


_lean_mlp_forward.applies = lean_mlp  # (run.memory.lean_mlps asks it, without importing this module)


__all__ = ["SwiGLU", "lean_mlp", "use_lean_mlps"]
