"""oneDNN weights packed once for sampling (``packed_linears``, ``PackedLinear``).

oneDNN's matmul reorders a plain ``[out, in]`` weight into its blocked layout on every call. Sampling calls each
linear layer once per decode step with weights that do not change, so the reorder can be done once per rollout:
the builtin and episode samplers wrap their decoding in ``packed_linears`` and the lean decoder packs its fused
q/k/v weight (``decoder._fused_projection``). Measured at SmolLM2-135M's `vs_trl.py --model` settings: the rollout
13 % faster (benchmarks/README.md, "Packed weights for sampling").
"""

from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
from torch import Tensor

from .kernels import _eligible, _linear_forward, _onednn, onednn_available, onednn_linear, sharded


class PackedLinear:
    """``x W^T + b`` through oneDNN with ``W`` reordered once into oneDNN's blocked layout (``_reorder_linear_weight``)
    instead of on every call: for sampling, whose weights do not change while it decodes. At SmolLM2-135M's shapes
    on 2 threads: 32 rows (decoding) 18 % faster, 368 (a prefill) 6 %, 4 rows 46 % (measured); the packing costs
    ~0.45 ms per MB of weight. Falls back to ``onednn_linear`` on the plain weight where that would not take oneDNN
    (autocast, few elements) or something is differentiated. The same float32 product to rounding."""

    routes_onednn = True  # (kernels.uses_onednn: a layer packed while sampling is still routed through oneDNN)

    def __init__(self, weight: Tensor, bias: Tensor | None, rows: int):
        self.weight, self.bias = weight, bias
        self.packed = _REORDER(weight.detach(), max(int(rows), 1))

    def __call__(self, x: Tensor) -> Tensor:
        if not _eligible(x, self.weight) or torch.is_grad_enabled() and (
                x.requires_grad or self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return onednn_linear(x, self.weight, self.bias)
        return _onednn(x.reshape(-1, x.shape[-1]).contiguous(), self.packed, self.bias).view(
            *x.shape[:-1], self.weight.shape[0])


_REORDER = getattr(getattr(torch.ops, "mkldnn", None), "_reorder_linear_weight", None)


def packable(weight: Tensor) -> bool:
    """Is this weight packed while sampling: a float32 CPU tensor, not sharded, that this torch can reorder, and
    trainable? Only trainable weights: their gradients, freed between updates, make room for the packed copies, so
    sampling's peak stays under the update's (a LoRA run's frozen base weights, the bulk of a large model, are not
    packed: their copies would add to the peak)."""
    return (_REORDER is not None and onednn_available() and weight.device.type == "cpu" and weight.requires_grad
            and weight.dtype == torch.float32 and weight.dim() == 2 and not sharded(weight))


def sample_on_onednn(model: torch.nn.Module, on: bool) -> int:
    """Mark every ``nn.Linear`` of ``model``: sample through oneDNN with packed weights (``packed_linears``) even where
    the layer is routed to torch's kernel for training (``cpu_matmul.MatmulChoice``: at a decode step's few rows
    the packed oneDNN product can win where MKL wins the update's, measured 1.5x at SmolLM2-135M's shapes on an
    AVX2 host), or unmark it. Returns how many layers."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.sample_onednn = bool(on)
            count += 1
    return count


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module, rows: int) -> Iterator[int]:
    """Inside, every ``nn.Linear`` of ``model`` that ``use_onednn_linears`` routed through oneDNN, or that
    ``sample_on_onednn`` marked, computes with its weight packed once (``PackedLinear``, ``rows`` the expected rows
    per call; ``packable`` weights only): for sampling, where the weights do not change. The packed copies (as large
    as those weights) are dropped on exit, and the routing restored. Yields how many layers were packed."""
    packed = []  # (module, routed to oneDNN before)
    try:
        for module in model.modules():
            if type(module) is not torch.nn.Linear or not packable(module.weight):
                continue
            own = module.__dict__.get("forward")
            routed = getattr(own, "__func__", None) is _linear_forward
            if routed or (own is None and module.__dict__.get("sample_onednn", False)):
                module.forward = PackedLinear(module.weight, module.bias, rows)
                packed.append((module, routed))
        yield len(packed)
    finally:
        for module, routed in packed:
            if routed:
                module.forward = types.MethodType(_linear_forward, module)
            else:
                del module.forward


__all__ = ["PackedLinear", "packable", "packed_linears", "sample_on_onednn"]
