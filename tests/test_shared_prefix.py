"""A prefix every prompt starts with (a system prompt, a chat template's opening) runs once: in the update's prompt pass,
the reference pass and the sampler's prefill (``prompts.shared_prefix`` / ``prefix_layout``). The same log-probs and
gradients as one plain forward per row, with the prefix's token rows run once."""

from __future__ import annotations

import pytest
import torch

from rlhf_pg.policy import prompts as prompts_module
from rlhf_pg.policy.builtin import sample_completions
from rlhf_pg.policy.decoder import growing_cache
from rlhf_pg.policy.logprobs import PromptPass, completion_logprobs
from rlhf_pg.policy.prompts import prefix_layout, shared_prefix
from rlhf_pg.policy.sampler import SamplingParams
from tests.test_decoder_families import tiny_model


def left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def test_shared_prefix_and_its_layout_by_hand(monkeypatch):
    monkeypatch.setattr(prompts_module, "MIN_SHARED_PREFIX_ROWS", 1)
    ids, mask = left_padded([[5, 6, 7, 8, 9], [5, 6, 7, 3], [5, 6, 7, 8, 4, 4]])
    assert shared_prefix(ids, mask) == 3  # 5 6 7 in every row; the second row's next token differs
    prefix_ids, suffix_ids, suffix_mask = prefix_layout(ids, mask, 3)
    assert prefix_ids.tolist() == [[5, 6, 7]]
    # each row's own tokens right-aligned in a block of width 6 - 3; its other slots masked
    assert suffix_mask.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    own = [suffix_ids[i][suffix_mask[i].bool()].tolist() for i in range(3)]
    assert own == [[8, 9], [3], [8, 4, 4]]
    # the prefix stays shorter than the shortest prompt: each row keeps a token of its own (it predicts a_0)
    ids, mask = left_padded([[5, 6, 7], [5, 6, 7, 1], [5, 6, 7, 2]])
    assert shared_prefix(ids, mask) == 2
    # nothing shared, one row, a mask that is not left padding
    ids, mask = left_padded([[5, 6], [6, 5]])
    assert shared_prefix(ids, mask) == 0
    assert shared_prefix(*left_padded([[5, 6, 7, 8]])) == 0
    ids, mask = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]]), torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])
    assert shared_prefix(ids, mask) == 0
    # too little to save: (rows - 1) * p below the threshold
    monkeypatch.setattr(prompts_module, "MIN_SHARED_PREFIX_ROWS", 16)
    ids, mask = left_padded([[5, 6, 7, 8, 9], [5, 6, 7, 3]])
    assert shared_prefix(ids, mask) == 0
    ids, mask = left_padded([[*range(3, 20), 40], [*range(3, 20), 41]])
    assert shared_prefix(ids, mask) == 17


def batch_with_a_system_prompt(seed: int, group: int = 2):
    """4 prompts, left-padded, of lengths 14, 11, 12, 14 that start with the same 8 tokens; ``group`` rows each."""
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(3, 97, (8,), generator=g).tolist()
    rows = [system + torch.randint(3, 97, (n - 8,), generator=g).tolist() for n in (14, 11, 12, 14)]
    ids, mask = left_padded(rows)
    return ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0), g


class RowCounter:
    """Token rows the model's input embedding sees (a forward pre-hook)."""

    def __init__(self, model):
        self.rows = 0
        self.handle = model.get_input_embeddings().register_forward_pre_hook(self.count)

    def count(self, module, args):
        self.rows += args[0].numel()


@pytest.mark.parametrize("family", ["llama-smollm2-shape", "gpt2", "qwen3", "gpt_neox", "mistral-sliding", "gemma2"])
def test_a_shared_prefix_runs_once_with_the_plain_forwards_log_probs_and_gradient(family):
    """completion_logprobs (one call, and micro-batches reading one PromptPass) against one plain forward over
    [prompt | completion] per row: the same log-probs and gradients, the prefix's 8 tokens run once for the 4 prompts
    (models whose cache has a sliding window keep the plain layout: a window counts slots)."""
    model = tiny_model(family)
    ids, mask, g = batch_with_a_system_prompt(7)
    completions = torch.randint(3, 97, (8, 5), generator=g)
    completion_mask = torch.ones(8, 5)
    completion_mask[3, 2:] = 0
    weights = torch.randn(8, 5, generator=g)
    sliding = not growing_cache(model)
    assert sliding == (family in ("mistral-sliding", "gemma2"))
    assert shared_prefix(ids[::2], mask[::2]) == 8

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    model.zero_grad(set_to_none=True)
    plain = completion_logprobs(model, ids, mask, completions, completion_mask, 0.8, share_prompts=False)
    (plain * weights).sum().backward()
    expected = grads()
    counter = RowCounter(model)
    shared = completion_logprobs(model, ids, mask, completions, completion_mask, 0.8)
    prompt_rows = counter.rows - 8 * 4  # the completion pass: 8 rows x 4 inputs
    counter.handle.remove()
    (shared * weights).sum().backward()
    got = grads()
    # the 4 distinct prompts: 51 tokens; the prefix once: 8 + (51 - 4 * 8), in a block 14 - 8 wide per prompt
    assert prompt_rows == (4 * 14 if sliding else 8 + 4 * 6)
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-5)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-5, msg=name)
    if not PromptPass.usable(model, 2):
        assert sliding
        return
    for recompute in (False, True):
        prompt_pass = PromptPass(model, ids, mask, list(range(8)), max_kept_tokens=0 if recompute else None)
        assert prompt_pass.cache_mask.shape == (4, 14)
        out = torch.zeros(8, 5)
        for chunk in ([6, 0, 3], [1, 2, 4, 5, 7]):
            part = torch.tensor(chunk)
            logprobs = completion_logprobs(model, ids[part], mask[part], completions[part], completion_mask[part],
                                           0.8, prompt_pass=(prompt_pass, part))
            (logprobs * weights[part]).sum().backward()
            out[part] = logprobs.detach()
        prompt_pass.backward()
        torch.testing.assert_close(out, plain.detach(), rtol=1e-4, atol=1e-5)
        got = grads()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-5, msg=name)


def test_distinct_prompts_with_a_shared_prefix_take_the_prompt_path():
    """No two rows share a whole prompt (one completion per prompt), but all start alike: the prefix still runs once."""
    model = tiny_model("llama")
    ids, mask, g = batch_with_a_system_prompt(8, group=1)
    completions, completion_mask = torch.randint(3, 97, (4, 3), generator=g), torch.ones(4, 3)
    weights = torch.randn(4, 3, generator=g)
    plain = completion_logprobs(model, ids, mask, completions, completion_mask, share_prompts=False)
    (plain * weights).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    counter = RowCounter(model)
    shared = completion_logprobs(model, ids, mask, completions, completion_mask)
    assert counter.rows == 8 + 4 * 6 + 4 * 2
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-5)
    (shared * weights).sum().backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["llama-smollm2-shape", "gpt2", "gpt_neox", "gemma2"])
def test_the_sampler_prefills_a_shared_prefix_once(family):
    """The builtin sampler (lean decoders: llama, gpt2; transformers' forward: gpt_neox, gemma2) prefills the prefix
    once and each prompt's own tokens after it: the log-probs it records are a plain forward's over what it drew."""
    model = tiny_model(family).eval()
    ids, mask, _ = batch_with_a_system_prompt(9, group=3)
    counter = RowCounter(model)
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    completion_ids, completion_mask, logprobs, _ = sample_completions(
        model, ids, mask, params, eos_token_id=1, pad_token_id=0, generator=torch.Generator().manual_seed(2))
    counter.handle.remove()
    steps = completion_ids.shape[1] - 1
    prefill = 4 * 14 if family == "gemma2" else 8 + 4 * 6
    assert counter.rows == prefill + 12 * steps
    with torch.no_grad():
        plain = completion_logprobs(model, ids, mask, completion_ids, completion_mask, share_prompts=False)
    torch.testing.assert_close(logprobs, plain, rtol=1e-4, atol=1e-5)
