"""Decoding one token at a time with a KV cache: a lean path for common architectures, HF's as fallback.

Sampling spends most of its time in per-step overhead, not arithmetic: for a small model, a
transformers forward with its cache object costs several times the matrix work it does. The lean
decoders below call the model's *own* submodules (embeddings, layer norms, projections, MLPs — so
LoRA layers and any dtype still apply) and hand-write only what surrounds them: a preallocated KV
cache ``[layers, B, heads, S, head_dim]`` written in place, and the attention over it.

    decoder = make_decoder(model, batch_size, max_length)   # lean for GPT-2 / Llama-family, else HF
    logits = decoder.prefill(prompt_ids, prompt_mask)         # [B, V] at each prompt's last position
    decoder.expand(rows)                                      # row b <- row rows[b] (a shared prompt's cache)
    logits = decoder.step(tokens)                             # [B, V] after appending tokens [B]
    logits = decoder.extend(tokens, valid)                    # [B, V] after appending a block [B, L]

``extend`` appends a block of L tokens per row at once (a multi-turn episode's observations are
prefilled into the cache this way, never recomputed): right-aligned, with ``valid`` ``[B, L]`` False on
the slots a row does not use (they are masked out of every later attention, and positions skip them),
so rows may append different numbers of tokens, or none, in the same forward.

All return the same logits as ``model(...)`` (tested to float tolerance against the HF forward).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .kernels import _body, onednn_linear, sharded, uses_onednn
from .packed import PackedLinear, packable

Tensor = torch.Tensor


def cache_argument(model, cache) -> dict:
    """``{name: cache}`` for a forward call: transformers renamed forward's ``past_key_values`` to ``cache`` in 5.2x,
    and vLLM's CPU build pins an older transformers; the name this model's forward takes (an unknown keyword would be
    swallowed by ``**kwargs`` and the cache silently ignored)."""
    body = getattr(model, "module", model)
    body = body.get_base_model() if hasattr(body, "get_base_model") else body
    cls = type(body)
    if cls not in _CACHE_NAMES:
        _CACHE_NAMES[cls] = "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"
    return {_CACHE_NAMES[cls]: cache}


_CACHE_NAMES: dict[type, str] = {}


def growing_cache(model) -> bool:
    """Whether every layer of the model's key/value cache is a plain growing one: no sliding window, which keeps its own
    count of the slots it has seen and so attends differently when padding moves between them (as in the layout of a
    prefix shared by all prompts, ``prompts.prefix_layout``, or in a prompt pass read by several micro-batches)."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=_body(model).config).layers)


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token (left padding gets 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class HFDecoder:
    """Any causal LM through its own forward and a ``DynamicCache`` (the general fallback)."""

    def __init__(self, model):
        self.model = model

    def prefill(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        self.attention_mask = prompt_mask.long()
        positions = positions_from_mask(self.attention_mask)
        self.cache = DynamicCache(config=self.model.config)
        self.next_position = positions[:, -1] + 1
        return self.model(input_ids=prompt_ids, attention_mask=self.attention_mask, position_ids=positions,
                          **cache_argument(self.model, self.cache), use_cache=True, logits_to_keep=1).logits[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(self.attention_mask[:, :1])], dim=1)
        logits = self.model(input_ids=tokens[:, None], attention_mask=self.attention_mask,
                            position_ids=self.next_position[:, None], **cache_argument(self.model, self.cache),
                            use_cache=True).logits[:, -1]
        self.next_position = self.next_position + 1
        return logits

    def expand(self, rows: Tensor) -> None:
        """Row b of the cache becomes old row ``rows[b]`` (a prompt prefilled once, shared by its completions)."""
        self.cache.reorder_cache(rows)
        self.attention_mask, self.next_position = self.attention_mask[rows], self.next_position[rows]

    def extend(self, tokens: Tensor, valid: Tensor) -> Tensor:
        """Append ``tokens`` ``[B, L]`` (right-aligned; ``valid`` False on unused slots); logits at the last slot."""
        self.attention_mask = torch.cat([self.attention_mask, valid.long()], dim=1)
        positions = self.next_position[:, None] + valid.long().cumsum(-1) - 1
        logits = self.model(input_ids=tokens, attention_mask=self.attention_mask, position_ids=positions.clamp(min=0),
                            **cache_argument(self.model, self.cache), use_cache=True, logits_to_keep=1).logits[:, -1]
        self.next_position = self.next_position + valid.long().sum(-1)
        return logits


class _KVCacheDecoder:
    """Shared part of the lean decoders: the cache, positions and masked attention."""

    def __init__(self, model, num_layers: int, kv_heads: int, head_dim: int, batch_size: int, max_length: int):
        parameter = next(model.parameters())
        shape = (num_layers, batch_size, kv_heads, max_length, head_dim)
        self.keys = torch.empty(shape, dtype=parameter.dtype, device=parameter.device)
        self.values = torch.empty(shape, dtype=parameter.dtype, device=parameter.device)
        self.key_valid = torch.ones(batch_size, 1, 1, max_length, dtype=torch.bool, device=parameter.device)
        self.length = 0  # cache slots filled so far (the same for every row)
        self.model = model

    def attend(self, layer: int, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        """Write ``key``/``value`` ``[B, Hkv, L, D]`` to the cache, attend with ``query`` ``[B, H, L, D]``.

        Returns ``[B, L, H * D]``. Padding keys are masked; within a prefill the mask is also causal.
        """
        new = key.shape[2]
        end = self.length + new
        self.keys[layer, :, :, self.length : end] = key
        self.values[layer, :, :, self.length : end] = value
        keys, values = self.keys[layer, :, :, :end], self.values[layer, :, :, :end]
        batch, heads, _, head_dim = query.shape
        if new == 1:
            # one query per row: softmax(q K^T * scale + mask) V, with query heads grouped by their KV head
            # (grouped-query attention without copying the cache); cheaper than SDPA at this size
            grouped = query.view(batch, keys.shape[1], heads // keys.shape[1], head_dim)  # [B, Hkv, G, D]
            scores = torch.matmul(grouped, keys.transpose(-1, -2)).mul_(scale).add_(self.key_bias[..., :end])
            output = torch.matmul(torch.softmax(scores, dim=-1), values).view(batch, heads, 1, head_dim)
        else:  # a block after self.length cached slots (0 = prefill): causal, and every query sees itself
            # (all-pad rows are not all-masked); query i sits at slot length + i
            causal = torch.ones(new, end, dtype=torch.bool, device=query.device).tril(diagonal=self.length)
            itself = causal & ~torch.ones_like(causal).tril(diagonal=self.length - 1)
            mask = (self.key_valid[..., :end] & causal) | itself
            output = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale,
                                                    enable_gqa=heads != keys.shape[1])
        return output.transpose(1, 2).reshape(batch, new, -1)

    def prefill(self, prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        self.length = 0
        self.key_valid[:, 0, 0, : prompt_ids.shape[1]] = prompt_mask.bool()
        # additive mask for single-query steps: 0 on real keys, -inf on padding
        self.key_bias = torch.zeros(self.key_valid.shape, dtype=self.keys.dtype, device=self.keys.device)
        self.key_bias.masked_fill_(~self.key_valid, float("-inf"))
        positions = positions_from_mask(prompt_mask)
        self.next_position = positions[:, -1:] + 1
        logits = self.forward(prompt_ids, positions)
        self.length = prompt_ids.shape[1]
        return logits

    def expand(self, rows: Tensor) -> None:
        """Row b of the cache becomes old row ``rows[b]`` (a prompt prefilled once, shared by its completions)."""
        self.keys, self.values = self.keys.index_select(1, rows), self.values.index_select(1, rows)
        self.key_valid, self.key_bias = self.key_valid[rows], self.key_bias[rows]
        self.next_position = self.next_position[rows]

    def step(self, tokens: Tensor) -> Tensor:
        logits = self.forward(tokens[:, None], self.next_position)
        self.length += 1
        self.next_position = self.next_position + 1
        return logits

    def extend(self, tokens: Tensor, valid: Tensor) -> Tensor:
        """Append ``tokens`` ``[B, L]`` (right-aligned; ``valid`` False on unused slots); logits at the last slot."""
        width = tokens.shape[1]
        end = self.length + width
        if end > self.keys.shape[3]:  # more slots than reserved (blocks leave unused slots): grow the cache
            extra = max(end - self.keys.shape[3], self.keys.shape[3] // 2)
            self.keys = F.pad(self.keys, (0, 0, 0, extra))
            self.values = F.pad(self.values, (0, 0, 0, extra))
            self.key_valid = F.pad(self.key_valid, (0, extra), value=True)
            self.key_bias = F.pad(self.key_bias, (0, extra), value=0.0)
        self.key_valid[:, 0, 0, self.length : end] = valid
        self.key_bias[:, 0, 0, self.length : end] = torch.zeros_like(valid, dtype=self.key_bias.dtype).masked_fill_(
            ~valid, float("-inf"))
        positions = (self.next_position + valid.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
        logits = self.forward(tokens, positions)
        self.length = end
        self.next_position = self.next_position + valid.long().sum(-1, keepdim=True)
        return logits

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class GPT2Decoder(_KVCacheDecoder):
    """GPT-2: h = wte + wpe; per block h += attn(ln_1(h)); h += mlp(ln_2(h)); logits = lm_head(ln_f(h))."""

    def __init__(self, model, batch_size: int, max_length: int, rows: int | None = None):
        config = model.config
        super().__init__(model, config.n_layer, config.n_head, config.n_embd // config.n_head, batch_size, max_length)
        self.body = model.transformer
        self.num_heads, self.head_dim = config.n_head, config.n_embd // config.n_head

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        body = self.body
        hidden = body.wte(input_ids) + body.wpe(positions)  # [B, L, C]
        batch, length, _ = hidden.shape
        for index, block in enumerate(body.h):
            qkv = block.attn.c_attn(block.ln_1(hidden)).view(batch, length, 3, self.num_heads, self.head_dim)
            query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, D]
            hidden = hidden + block.attn.c_proj(self.attend(index, query, key, value, block.attn.scaling))
            hidden = hidden + block.mlp(block.ln_2(hidden))
        return self.model.lm_head(body.ln_f(hidden[:, -1]))


class LlamaDecoder(_KVCacheDecoder):
    """Llama-family (Llama, Mistral, Qwen2): RMSNorm, rotary positions, grouped-query attention, gated MLP."""

    def __init__(self, model, batch_size: int, max_length: int, rows: int | None = None):
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        super().__init__(model, config.num_hidden_layers, kv_heads, head_dim, batch_size, max_length)
        self.body = model.model
        self.head_dim = head_dim
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.apply_rotary = apply_rotary_pos_emb
        self.qkv = [_fused_projection(layer.self_attn, rows or batch_size) for layer in self.body.layers]

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        body = self.body
        hidden = body.embed_tokens(input_ids)
        batch, length, _ = hidden.shape
        cos, sin = body.rotary_emb(hidden, positions)
        for index, layer in enumerate(body.layers):
            attention = layer.self_attn
            normed = layer.input_layernorm(hidden)
            fused = self.qkv[index]
            projected = (fused[0](normed).split(fused[1], dim=-1) if fused is not None
                         else (p(normed) for p in (attention.q_proj, attention.k_proj, attention.v_proj)))
            query, key, value = (part.view(batch, length, -1, self.head_dim).transpose(1, 2) for part in projected)
            query, key = self.apply_rotary(query, key, cos, sin)
            hidden = hidden + attention.o_proj(self.attend(index, query, key, value, attention.scaling))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.lm_head(body.norm(hidden[:, -1]))


def _fused_projection(attention, rows: int):
    """``(project, sizes)``: q, k and v as one matmul ``project(x)`` (one weight ``[q + k + v, hidden]``, copied
    when the decoder is built: sampling never changes the weights; packed for oneDNN, ``packed.PackedLinear``, when
    the layers are routed there), when all three are plain linear layers (not LoRA-wrapped) routed alike; else None.
    One call instead of three: ~0.15 ms less per layer and decode step at SmolLM2's shape (measured)."""
    parts = (attention.q_proj, attention.k_proj, attention.v_proj)
    if any(type(p) is not torch.nn.Linear for p in parts) or len({uses_onednn(p) for p in parts}) > 1:
        return None
    if len({p.bias is None for p in parts}) > 1:
        return None
    with torch.no_grad():
        weight = torch.cat([p.weight for p in parts])
        bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
    sizes = [p.out_features for p in parts]
    if not uses_onednn(parts[0]):
        return functools.partial(F.linear, weight=weight, bias=bias), sizes
    if all(packable(p.weight) for p in parts):  # (the concatenated copy is no parameter: asked of the parts)
        return PackedLinear(weight, bias, rows), sizes
    return functools.partial(onednn_linear, weight=weight, bias=bias), sizes


def _lean_decoder_class(model):
    """The lean decoder for this model's architecture, or None when only HF's forward is safe."""
    config = model.config
    if any(sharded(p) for p in model.parameters()):
        return None  # sharded parameters (ZeRO-3, FSDP): gathering happens in the model's own forward
    if config.model_type == "gpt2":
        if getattr(config, "add_cross_attention", False) or getattr(config, "reorder_and_upcast_attn", False):
            return None
        return GPT2Decoder
    if config.model_type in ("llama", "mistral", "qwen2"):
        if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
            return None
        return LlamaDecoder
    return None


def make_decoder(model, batch_size: int, max_length: int, lean: bool = True, rows: int | None = None):
    """A decoder for ``model`` (a PEFT-wrapped model decodes through its base model's modules, adapters included).
    ``batch_size``: rows of the cache until ``expand``; ``rows``: the rows a decode step will have (packed weights are
    laid out for it; default ``batch_size``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder_class = _lean_decoder_class(base) if lean else None
    if decoder_class is None:
        return HFDecoder(model)
    return decoder_class(base, batch_size, max_length, rows=rows)
