"""Conversational prompts (TRL's convention): rendering, encoding, reward inputs, validation, SFT targets."""

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_pg.chat import assistant_completion_ids, prompt_texts, reward_completions
from rlhf_pg.recipe import DataConfig, RewardSpec
from rlhf_pg.data import PromptSampler, load_prompt_datasets
from rlhf_pg.errors import UserError
from rlhf_pg.evaluation import evaluate
from reward_models import RewardScorer
from rlhf_pg.policy.builtin import BuiltinSampler
from rlhf_pg.policy.prompts import check_prompt_lengths, encode_prompts
from rlhf_pg.policy.sampler import SamplingParams

# ChatML-like, as SmolLM2's: a turn is <role>content<eos>\n; the generation prompt opens an assistant turn
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
QUESTION = [{"role": "user", "content": "1+2?"}]


def chat_model(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TEMPLATE
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer


def test_a_conversation_is_rendered_with_the_generation_prompt_and_encoded_without_a_second_bos(tiny_model_dir):
    _, tokenizer = chat_model(tiny_model_dir)
    texts, special_tokens = prompt_texts(tokenizer, [QUESTION])
    assert texts == ["<bos><user>1+2?<eos>\n<assistant>"] and special_tokens is False
    ids, mask = encode_prompts(tokenizer, [QUESTION, [{"role": "system", "content": "hi"}, *QUESTION]])
    expected = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    assert ids[0][mask[0].bool()].tolist() == expected
    assert expected.count(tokenizer.bos_token_id) == 1
    # plain text keeps the tokenizer's own special tokens, exactly as before
    text_ids, _ = encode_prompts(tokenizer, ["1+2="])
    assert text_ids[0].tolist() == tokenizer("1+2=")["input_ids"]


def test_reward_functions_receive_message_lists_and_trl_shaped_completions(tiny_model_dir):
    model, tokenizer = chat_model(tiny_model_dir)
    seen = {}

    def spy(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions, answer=kwargs["answer"])
        return [0.0] * len(completions)

    batch = BuiltinSampler(model, tokenizer).sample([QUESTION], 2, SamplingParams(max_new_tokens=4), generator=torch.Generator().manual_seed(0), columns={"answer": ["3"]})
    assert batch.prompts == [QUESTION, QUESTION] and all(isinstance(c, str) for c in batch.completions)
    scorer = RewardScorer([RewardSpec(name="arithmetic_last_integer")])
    scorer.terms[0].function = spy
    scorer(batch.prompts, batch.completions, finished=batch.finished.tolist(), **batch.extras)
    assert seen["prompts"] == [QUESTION, QUESTION] and seen["answer"] == ["3", "3"]
    assert seen["completions"] == [[{"role": "assistant", "content": c}] for c in batch.completions]
    assert reward_completions(["1+2="], ["3"]) == ["3"]  # text prompts: strings, as before


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed")
def test_trl_think_format_reward_runs_unchanged_by_import_path():
    scorer = RewardScorer([RewardSpec(name="trl.rewards:think_format_reward")])
    total, _ = scorer([QUESTION, QUESTION], ["<think>\nsum\n</think>\n3", "3"], finished=[True, True])
    assert total == [1.0, 0.0]


def test_evaluation_scores_chat_prompts_and_reports_truncation(tiny_model_dir):
    model, tokenizer = chat_model(tiny_model_dir)
    scorer = RewardScorer([RewardSpec(name="arithmetic_last_integer")])
    result = evaluate(BuiltinSampler(model, tokenizer), model, [QUESTION] * 3, {"a": [1] * 3, "b": [2] * 3}, scorer,
                      SamplingParams(max_new_tokens=3, temperature=0.0), batch_size=2)
    assert set(result) == {"reward", "reward/arithmetic_last_integer", "truncated", "examples"}
    assert 0.0 <= result["truncated"] <= 1.0 and result["examples"][0]["prompt"] == QUESTION


@pytest.mark.parametrize("messages, fragment", [
    ([{"role": "robot", "content": "hi"}], "message 0 has role 'robot'; use one of system, developer, user"),
    ([{"role": "user"}], "message 0 (role 'user') has no content"),
    ([{"role": "user", "content": ["a", "b"]}], "has content ['a', 'b'] (list)"),
])
def test_a_bad_message_is_a_user_error_that_names_the_row(tiny_model_dir, messages, fragment):
    _, tokenizer = chat_model(tiny_model_dir)
    with pytest.raises(UserError, match="row 1") as error:
        check_prompt_lengths(tokenizer, [QUESTION, messages], 4, 64)
    assert fragment in str(error.value)


def test_chat_prompts_need_a_chat_template(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert not tokenizer.chat_template
    with pytest.raises(UserError, match="has no chat template; use a chat model"):
        check_prompt_lengths(tokenizer, [QUESTION], 4, None)
    with pytest.raises(UserError, match="has no chat template"):
        encode_prompts(tokenizer, [QUESTION])


def test_a_prompt_too_long_after_templating_is_reported_before_training(tiny_model_dir):
    _, tokenizer = chat_model(tiny_model_dir)
    question = [{"role": "user", "content": "9" * 40}]  # char tokens: <bos> + "<user>" + 40 + <eos> + "\n" + "<assistant>" = 60
    check_prompt_lengths(tokenizer, ["9" * 40], 10, 64)  # as text it fits: 41 tokens + 10
    with pytest.raises(UserError, match=r"\(row 1\) is 60 tokens after the chat template; with rollout.max_new_tokens=10 "
                                        r"it exceeds the model's context of 64 tokens"):
        check_prompt_lengths(tokenizer, [QUESTION, question], 10, 64)


def test_text_and_chat_prompts_cannot_be_mixed(tiny_model_dir):
    _, tokenizer = chat_model(tiny_model_dir)
    with pytest.raises(UserError, match="row 1 has prompt='1\\+2=', text, but row 0 is a list of messages"):
        encode_prompts(tokenizer, [QUESTION, "1+2="])
    with pytest.raises(UserError, match="data.chat_template_kwargs: 'tokenize' is chosen by rlhf-pg"):
        encode_prompts(tokenizer, [QUESTION], chat_template_kwargs={"tokenize": True})


def test_a_jsonl_prompt_column_of_message_lists_loads_and_samples(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{i}+1?"}],
             "answer": str(i + 1)} for i in range(6)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    train, held_out = load_prompt_datasets(DataConfig(task=None, path=str(path), num_eval=2))
    assert len(train) == 4 and len(held_out) == 2
    prompts, columns = PromptSampler(train, 2, seed=0).batch(0)
    assert all(p in [r["prompt"] for r in rows] for p in prompts) and len(columns["answer"]) == 2


def test_a_jsonl_message_without_content_names_its_row(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"{i}+1?"}]} for i in range(5)] + [{"prompt": [{"role": "user"}]}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(UserError, match=r"data: row 5 of split 'train' of '.*chat.jsonl': message 0 \(role 'user'\) "
                                        r"has no content"):
        load_prompt_datasets(DataConfig(task=None, path=str(path), num_eval=2))


def test_sft_targets_cover_the_assistant_turn_and_its_end_token_only(tiny_model_dir):
    _, tokenizer = chat_model(tiny_model_dir)
    ids = assistant_completion_ids(tokenizer, QUESTION, "3")
    assert ids == tokenizer("3", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]  # not the "\n"
    assert assistant_completion_ids(tokenizer, QUESTION, [{"role": "assistant", "content": "3"}]) == ids
    prompt_ids, _ = encode_prompts(tokenizer, [QUESTION])  # the prompt the policy sees + these ids = the conversation
    full = tokenizer.apply_chat_template([*QUESTION, {"role": "assistant", "content": "3"}], tokenize=False)
    assert prompt_ids[0].tolist() + ids == tokenizer(full, add_special_tokens=False)["input_ids"][:-1]


def test_sft_targets_refuse_a_template_that_renders_history_differently(tiny_model_dir):
    _, tokenizer = chat_model(tiny_model_dir)
    tokenizer.chat_template = TEMPLATE.replace("<{{ m['role'] }}>", "<{{ 'bot' if m['role'] == 'assistant' else m['role'] }}>")
    with pytest.raises(UserError, match="not a prefix of the rendered conversation"):
        assistant_completion_ids(tokenizer, QUESTION, "3")
    with pytest.raises(UserError, match="every message of a completion must have role 'assistant'"):
        assistant_completion_ids(tokenizer, QUESTION, [{"role": "user", "content": "3"}])


def test_completion_records_are_json_rows_with_rewards_and_truncation(tiny_model_dir):
    from rlhf_pg.evaluation import completion_records

    model, tokenizer = chat_model(tiny_model_dir)
    batch = BuiltinSampler(model, tokenizer).sample([QUESTION], 2, SamplingParams(max_new_tokens=3), generator=torch.Generator().manual_seed(0), group_offset=4)
    scorer = RewardScorer([RewardSpec(name="arithmetic_last_integer")])
    scores, per_reward = scorer(batch.prompts, batch.completions, a=[1, 1], b=[2, 2])
    rows = completion_records(7, batch, scores, per_reward, limit=1)
    assert len(rows) == 1 and json.loads(json.dumps(rows))[0] == {
        "step": 7, "group": 4, "prompt": QUESTION, "completion": batch.completions[0], "reward": scores[0],
        "reward/arithmetic_last_integer": scores[0], "tokens": int(batch.completion_mask[0].sum()),
        "truncated": not bool(batch.finished[0])}
