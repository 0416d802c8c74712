"""Generation for real models: every EOS id ends a completion, stop strings, truncation, long completions."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from rlhf_pg.core.mdp import mask_truncated, truncated
from rlhf_pg.policy.builtin import BuiltinSampler, sample_completions
from rlhf_pg.policy.logprobs import completion_logprobs
from rlhf_pg.policy.prompts import StopStrings, cut_at_stop, encode_prompts, stop_token_ids
from rlhf_pg.policy.sampler import SamplingParams


def load(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def boost(model, token_ids, amount: float):
    """Make ``token_ids`` likely by adding ``amount`` to their logits (a hook on the LM head)."""
    bias = torch.zeros(model.lm_head.out_features)
    bias[token_ids] = amount
    model.lm_head.register_forward_hook(lambda module, args, output: output + bias)


def test_every_eos_id_of_the_tokenizer_and_the_generation_config_ends_a_completion(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    end_of_turn = tokenizer.convert_tokens_to_ids("|")
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]  # a list, as chat models have
    assert stop_token_ids(tokenizer, model) == [tokenizer.eos_token_id, end_of_turn]
    boost(model, [end_of_turn], 4.0)
    batch = BuiltinSampler(model, tokenizer).sample(["1+2=", "33+44="], 8, SamplingParams(max_new_tokens=12), generator=torch.Generator().manual_seed(0))
    lengths = batch.completion_mask.sum(-1).long()
    ended_by_turn = [row for row in range(len(batch)) if batch.completion_ids[row, lengths[row] - 1] == end_of_turn]
    assert len(ended_by_turn) > len(batch) // 2
    for row in ended_by_turn:
        assert batch.finished[row] and end_of_turn not in batch.completion_ids[row, : lengths[row] - 1].tolist()
        assert torch.all(batch.completion_ids[row, lengths[row]:] == tokenizer.pad_token_id)
    # min_new_tokens forbids every EOS id, not only the tokenizer's
    forced = BuiltinSampler(model, tokenizer).sample(["1+2="], 8, SamplingParams(max_new_tokens=6, min_new_tokens=6), generator=torch.Generator().manual_seed(0))
    assert forced.completion_mask.sum() == 8 * 6 and not forced.finished.any()


def test_a_stop_string_ends_the_completion_is_kept_in_the_text_and_masks_what_follows(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    boost(model, [tokenizer.convert_tokens_to_ids("7")], 4.5)
    params = SamplingParams(max_new_tokens=12, stop=("77",))
    batch = BuiltinSampler(model, tokenizer).sample(["1+2=", "33+44="], 8, params, generator=torch.Generator().manual_seed(1))
    stopped = [row for row, text in enumerate(batch.completions) if "77" in text]
    assert stopped, batch.completions
    for row in stopped:
        text = batch.completions[row]
        assert text.endswith("77") and text.index("77") == len(text) - 2  # the first occurrence ends the text
        length = int(batch.completion_mask[row].sum())
        assert tokenizer.decode(batch.completion_ids[row, :length]).endswith("77")  # its last token is kept
        assert bool(batch.finished[row]) and torch.all(batch.completion_ids[row, length:] == tokenizer.pad_token_id)
        assert torch.all(batch.logprobs[row, length:] == 0)
    recomputed = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                     batch.completion_mask)
    torch.testing.assert_close(recomputed, batch.logprobs, atol=1e-5, rtol=0)


def test_stop_strings_are_found_across_token_boundaries_and_cut_after_the_earliest():
    class Words:  # a tokenizer whose tokens are several characters
        vocab = ["<pad>", "Ans", "wer:", " 4", "2\n", "\n", "x"]

        def batch_decode(self, rows, skip_special_tokens=True):
            return ["".join(self.vocab[i] for i in row if i != 0) for row in rows]

    stop = StopStrings(Words(), ["\n\n", ":"])
    tokens = [torch.tensor([1, 6]), torch.tensor([2, 4]), torch.tensor([3, 5])]  # row 0 "Answer: 4", row 1 "x2\n\n"
    active = torch.tensor([True, True])
    assert stop(tokens[:1], active).tolist() == [False, False]
    assert stop(tokens[:2], active).tolist() == [True, False]  # ":" completed by "wer:"
    assert stop(tokens, torch.tensor([False, True])).tolist() == [False, True]  # "\n\n" across "2\n" + "\n"
    assert cut_at_stop("Answer: 42\n\nmore", ["\n\n", ":"]) == "Answer:"
    assert cut_at_stop("no stop here", ["\n\n"]) == "no stop here"


def test_truncated_completions_are_flagged_and_can_be_masked(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    boost(model, [tokenizer.eos_token_id], 2.0)
    batch = BuiltinSampler(model, tokenizer).sample(["1+2=", "33+44="], 8, SamplingParams(max_new_tokens=4), generator=torch.Generator().manual_seed(0))
    cut = truncated(batch)
    assert cut.dtype == torch.bool and cut.shape == (len(batch),) and cut.any() and (~cut).any()
    assert torch.equal(cut, batch.completion_mask.sum(-1).eq(4) & ~batch.finished)
    masked = mask_truncated(batch)
    assert torch.all(masked.completion_mask[cut] == 0) and torch.all(masked.logprobs[cut] == 0)
    assert torch.equal(masked.completion_mask[~cut], batch.completion_mask[~cut])


def test_hundreds_of_new_tokens_decode_with_consistent_logprobs():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    prompt_ids = torch.tensor([[0, 0, 1, 5, 6], [1, 7, 8, 9, 10]])
    prompt_mask = (prompt_ids != 0).float()
    ids, mask, logprobs, finished = sample_completions(
        model, prompt_ids, prompt_mask, SamplingParams(max_new_tokens=300, min_new_tokens=300), 2, 0,
        torch.Generator().manual_seed(0))
    assert ids.shape == (2, 300) and mask.sum() == 600 and not finished.any()
    recomputed = completion_logprobs(model, prompt_ids, prompt_mask, ids, mask)
    torch.testing.assert_close(recomputed, logprobs, atol=1e-4, rtol=0)


def test_encode_prompts_still_matches_for_text(tiny_model_dir):
    _, tokenizer = load(tiny_model_dir)
    ids, mask = encode_prompts(tokenizer, ["1+2=", "33+44="])
    assert ids[1].tolist() == tokenizer("33+44=")["input_ids"] and mask[0].tolist() == [0, 0] + [1] * 5
