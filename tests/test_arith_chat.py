"""The arithmetic task as chat prompts for a real instruct model, and its rule rewards."""

import pytest

from rlhf_pg.recipe import DataConfig, RewardSpec
from rlhf_pg.data import load_prompt_datasets
from rlhf_pg.errors import UserError
from reward_models import RewardScorer
from rlhf_pg.tasks.arithmetic import parse_prompt


def chat_config(**overrides):
    config = DataConfig(min_operand=10, max_operand=99, num_eval=200)
    config.prompt_format = "chat"  # data.prompt_format: read with getattr until the schema has the key
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_chat_prompts_are_exactly_one_user_question_with_held_out_problems_removed():
    train, held_out = load_prompt_datasets(chat_config())
    assert len(held_out) == 200 and len(train) == 90 * 90 - 200
    row = held_out[0]
    assert row["prompt"] == [{"role": "user", "content": f"What is {row['a']}+{row['b']}? Reply with only the number."}]
    assert row["answer"] == str(row["a"] + row["b"])
    assert all(10 <= a <= 99 for a in train["a"]) and all(10 <= b <= 99 for b in train["b"])
    assert not {(r["a"], r["b"]) for r in held_out} & set(zip(train["a"], train["b"]))
    assert parse_prompt(row["prompt"]) == (row["a"], row["b"])


def test_the_text_format_is_unchanged_and_a_bad_format_is_a_user_error():
    train, _ = load_prompt_datasets(DataConfig(max_operand=9, num_eval=10))
    assert train[0]["prompt"] == f"{train[0]['a']}+{train[0]['b']}="
    with pytest.raises(UserError, match="data.prompt_format='json': use one of text, chat"):
        load_prompt_datasets(chat_config(prompt_format="json"))


QUESTION = [{"role": "user", "content": "What is 12+34? Reply with only the number."}]


def test_last_integer_reward_reads_trl_completions_and_plain_strings():
    scorer = RewardScorer([RewardSpec(name="arithmetic_last_integer")])
    texts = ["46", "The answer is 46.", "12+34=46", "46 or 47", "no number", "-46", " 46\n"]
    total, _ = scorer([QUESTION] * len(texts), texts, a=[12] * len(texts), b=[34] * len(texts))
    assert total == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    # plain strings and text prompts, the sum parsed from the prompt when there are no columns
    total, _ = scorer(["12+34=", QUESTION], ["46", [{"role": "assistant", "content": "so 46"}]])
    assert total == [1.0, 1.0]


def test_only_number_format_reward():
    scorer = RewardScorer([RewardSpec(name="arithmetic_only_number")])
    total, _ = scorer([QUESTION] * 4, ["46", " 46\n", "46.", "It is 46"])
    assert total == [1.0, 1.0, 0.0, 0.0]


def test_arithmetic_exact_accepts_conversational_completions():
    scorer = RewardScorer([RewardSpec(name="arithmetic_exact")])
    total, _ = scorer([QUESTION, QUESTION], ["46", "47"], finished=[True, True])
    assert total == [1.0, 0.0]
