"""Sampling semantics and log-probability consistency on a tiny local model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_pg.policy.builtin import BuiltinSampler, sample_completions
from rlhf_pg.policy.logprobs import completion_logprobs
from rlhf_pg.policy.prompts import encode_prompts
from rlhf_pg.policy.sampler import SamplingParams


def load(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_mask_covers_tokens_up_to_and_including_eos_and_padding_after(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    # make EOS likely so that sequences end at different steps
    eos_logit_boost = torch.zeros(len(tokenizer))
    eos_logit_boost[tokenizer.eos_token_id] = 3.0
    model.lm_head.register_forward_hook(lambda module, args, output: output + eos_logit_boost)
    ids, mask = encode_prompts(tokenizer, ["1+2=", "33+44=", "5+6="] * 10)
    generator = torch.Generator().manual_seed(0)
    completion, completion_mask, logprobs, finished = sample_completions(
        model, ids, mask, SamplingParams(max_new_tokens=12), tokenizer.eos_token_id, tokenizer.pad_token_id, generator
    )
    for row in range(completion.shape[0]):
        length = int(completion_mask[row].sum())
        assert torch.all(completion_mask[row, :length] == 1) and torch.all(completion_mask[row, length:] == 0)
        eos_positions = (completion[row] == tokenizer.eos_token_id).nonzero().flatten().tolist()
        if finished[row]:
            assert eos_positions == [length - 1]  # exactly one EOS, the last real token
            assert torch.all(completion[row, length:] == tokenizer.pad_token_id)
        else:
            assert eos_positions == [] and length == 12
        assert torch.all(logprobs[row, length:] == 0)
    lengths = completion_mask.sum(-1)
    assert bool(finished.any()) and bool((~finished).any()) and len(set(lengths.tolist())) > 2


def test_sampled_logprobs_equal_a_fresh_forward_and_do_not_depend_on_padding(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    prompts = ["1+2=", "33+44=", "7+80="]
    batch = BuiltinSampler(model, tokenizer).sample(prompts, 2, SamplingParams(max_new_tokens=6), generator=torch.Generator().manual_seed(3))
    recomputed = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    assert torch.allclose(recomputed, batch.logprobs, atol=1e-5)
    for row in range(len(batch)):  # each row alone, without any padding
        ids, mask = encode_prompts(tokenizer, [batch.prompts[row]])
        length = int(batch.completion_mask[row].sum())
        alone = completion_logprobs(model, ids, mask, batch.completion_ids[row : row + 1, :length],
                                    batch.completion_mask[row : row + 1, :length])
        assert torch.allclose(alone[0], batch.logprobs[row, :length], atol=1e-5)


def test_group_ids_and_extras_follow_their_prompt(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    batch = BuiltinSampler(model, tokenizer).sample(["1+2=", "3+4="], 3, SamplingParams(max_new_tokens=3), group_offset=10, columns={"answer": ["3", "7"]})
    assert batch.group_ids.tolist() == [10, 10, 10, 11, 11, 11]
    assert batch.prompts == ["1+2="] * 3 + ["3+4="] * 3
    assert batch.extras["answer"] == ["3"] * 3 + ["7"] * 3


def test_greedy_matches_hf_generate(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    prompts = ["12+7=", "5+5=", "99+99="]
    ids, mask = encode_prompts(tokenizer, prompts)
    completion, completion_mask, _, _ = sample_completions(
        model, ids, mask, SamplingParams(max_new_tokens=5, temperature=0.0), tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    for row, prompt in enumerate(prompts):
        encoded = tokenizer(prompt, return_tensors="pt")
        generated = model.generate(**encoded, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = generated[0, encoded["input_ids"].shape[1]:].tolist()
        length = int(completion_mask[row].sum())
        assert completion[row, :length].tolist() == expected[:length]


def test_top_p_keeps_only_the_nucleus(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    ids, mask = encode_prompts(tokenizer, ["1+1="] * 200)
    greedy, _, _, _ = sample_completions(model, ids[:1], mask[:1], SamplingParams(1, temperature=0.0),
                                         tokenizer.eos_token_id, tokenizer.pad_token_id)
    sampled, _, _, _ = sample_completions(model, ids, mask, SamplingParams(1, top_p=1e-6),
                                          tokenizer.eos_token_id, tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    assert torch.all(sampled[:, 0] == greedy[0, 0])


def test_sharing_group_prompts_gives_the_same_logprobs_and_gradients(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    model.train()
    batch = BuiltinSampler(model, tokenizer).sample(["1+2=", "33+44=", "7+80="], 4, SamplingParams(max_new_tokens=6), generator=torch.Generator().manual_seed(3))
    batch = batch.select([0, 1, 2, 4, 5, 8, 11])  # uneven groups, as after dropping zero-advantage rows
    results = []
    for share in (True, False):
        model.zero_grad()
        logprobs = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                       batch.completion_mask, share_prompts=share)
        (logprobs * torch.linspace(-1, 2, 7)[:, None]).sum().backward()
        results.append((logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (shared, shared_grads), (plain, plain_grads) = results
    assert torch.allclose(shared, plain, atol=1e-5)
    for name in plain_grads:
        assert torch.allclose(shared_grads[name], plain_grads[name], atol=1e-5), name


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_the_sampler_draws_from_softmax_of_logits_over_temperature_within_the_nucleus(temperature, top_p):
    """Frequencies of 40,000 draws against the exact distribution (the inverse-CDF path at top_p = 1, the
    exponential race inside a nucleus): within 5 standard errors, and a -inf token never drawn."""
    from rlhf_pg.policy.builtin import choose_tokens

    logits = torch.tensor([2.0, 1.0, 0.5, float("-inf"), 0.0, -1.0, 1.5])
    rows = 40_000
    actions, logprobs = choose_tokens(logits.repeat(rows, 1), SamplingParams(temperature=temperature, top_p=top_p),
                                       torch.Generator().manual_seed(0))
    probs = torch.softmax(logits / temperature, -1)
    expected = probs.clone()
    if top_p < 1.0:  # the smallest set of most likely tokens whose mass reaches top_p, renormalized
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(-1) - ordered >= top_p
        expected = torch.zeros_like(probs).scatter_(0, order, ordered.masked_fill(outside, 0.0))
        expected = expected / expected.sum()
    counts = torch.bincount(actions, minlength=7).double() / rows
    standard_error = (expected * (1 - expected) / rows).sqrt().double()
    assert counts[3] == 0
    assert ((counts - expected.double()).abs() <= 5 * standard_error + 1e-12).all(), (counts, expected)
    torch.testing.assert_close(logprobs, probs.log()[actions])  # the policy's log-probs, not the nucleus's


def test_the_two_level_inverse_cdf_draws_from_the_policy_without_banned_tokens():
    """A vocabulary large enough for the two-level search (blocks of ``INVERSE_CDF_BLOCK`` tokens and a partial last
    block), EOS-like tokens banned (min_new_tokens): frequencies of heavy tokens at block edges, and of each block,
    within 5 standard errors of the policy renormalized without the banned ids; a banned or -inf token is never
    drawn; the log-probs are the policy's own (not renormalized)."""
    from rlhf_pg.policy.builtin import INVERSE_CDF_BLOCK, choose_tokens

    vocab, rows, block = 4 * INVERSE_CDF_BLOCK + 176, 20_000, INVERSE_CDF_BLOCK
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3))
    heavy = [block - 1, block, 2 * block + 7, vocab - 1]
    logits[heavy] += 4.0
    banned = torch.tensor([0, 3 * block])
    logits[banned] += 5.0  # the banned ids would be likely
    logits[17] = float("-inf")
    actions, logprobs = choose_tokens(logits.repeat(rows, 1), SamplingParams(temperature=0.8),
                                      torch.Generator().manual_seed(1), banned=banned)
    policy = torch.softmax(logits / 0.8, -1)
    expected = policy.index_fill(0, banned, 0.0)
    expected = (expected / expected.sum()).double()
    counts = torch.bincount(actions, minlength=vocab).double() / rows
    assert counts[banned].sum() == 0 and counts[17] == 0
    per_block = torch.stack([expected[i : i + block].sum() for i in range(0, vocab, block)])
    got_block = torch.stack([counts[i : i + block].sum() for i in range(0, vocab, block)])
    for got, want in ((counts[heavy], expected[heavy]), (got_block, per_block)):
        standard_error = (want * (1 - want) / rows).sqrt()
        assert ((got - want).abs() <= 5 * standard_error).all(), (got, want)
    torch.testing.assert_close(logprobs, policy.log()[actions])


def test_banned_tokens_holding_all_the_mass_still_leave_a_valid_draw():
    """When every unbanned token's probability underflows to 0 in float32, the draw renormalizes over the allowed
    logits (no NaN, no banned token) and the log-prob stays the policy's, finite."""
    from rlhf_pg.policy.builtin import choose_tokens
    from rlhf_pg.policy.kernels import token_logprobs

    logits = torch.zeros(4, 2000)
    logits[:, 5] = 300.0  # the banned token
    actions, logprobs = choose_tokens(logits, SamplingParams(), torch.Generator().manual_seed(0),
                                      banned=torch.tensor([5]))
    assert (actions != 5).all() and torch.isfinite(logprobs).all()
    torch.testing.assert_close(logprobs, token_logprobs(logits, actions))


@pytest.mark.parametrize("vocab", [300, 3000])
def test_the_largest_uniform_never_draws_a_token_of_zero_weight(vocab, monkeypatch):
    """u c_V can round up to c_V: with the largest float32 uniform below 1 and zero weight on every token after the
    last positive one (a banned tail, a whole empty last block), both inverse-CDF paths still draw that last token
    of positive weight."""
    from rlhf_pg.policy import builtin

    weights = torch.rand(6, vocab, generator=torch.Generator().manual_seed(0)) * 3.0
    last = [vocab - 1, vocab - 2, vocab // 2, 0, vocab - 300, 5]
    for row, end in enumerate(last):
        weights[row, end + 1 :] = 0.0
    largest = 1.0 - 2.0**-24
    monkeypatch.setattr(builtin.torch, "rand", lambda *shape, **kwargs: torch.full(shape, largest))
    drawn = builtin._inverse_cdf(weights, None)
    assert drawn.tolist() == last
