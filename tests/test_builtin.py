"""The built-in arithmetic task and base model."""

import random

import pytest

from rlhf_pg.builtin import char_tokenizer
from rlhf_pg.tasks.arithmetic import flawed_sum, parse_prompt, split_problems
from reward_models.rules import arithmetic_exact


def test_flawed_sum_is_exact_without_forgetting_and_drops_carries_when_forgetting():
    rng = random.Random(0)
    for a, b in [(0, 0), (19, 1), (99, 99), (45, 55), (123, 989)]:
        assert flawed_sum(a, b, 0.0, rng) == a + b
    assert flawed_sum(19, 1, 1.0, rng) == 10  # 9+1 = 10: write 0, forget the carry
    assert flawed_sum(99, 99, 1.0, rng) == 88
    assert flawed_sum(12, 34, 1.0, rng) == 46  # no carry, nothing to forget


def test_split_is_disjoint_and_complete():
    train, held_out = split_problems(20, 50, seed=1)
    assert len(held_out) == 50 and not set(train) & set(held_out)
    assert len(train) + len(held_out) == 21 * 21


def test_reward_requires_exact_sum_and_eos():
    prompts = ["12+7=", "12+7=", "12+7=", "99+1=", "5+5="]
    completions = ["19", "19", " 19", "100", "1"]
    assert arithmetic_exact(prompts, completions, finished=[True, False, True, True, True]) == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert arithmetic_exact(["x"], ["3"], answer=["3"]) == [1.0]
    assert parse_prompt("12+7=") == (12, 7) and parse_prompt("hello") is None


def test_char_tokenizer_round_trips_through_save_and_plain_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = loaded("12+7=")["input_ids"]
    assert ids[0] == loaded.bos_token_id and len(ids) == 6
    assert loaded.decode(ids, skip_special_tokens=True) == "12+7="
    assert loaded.decode(loaded("19", add_special_tokens=False)["input_ids"] + [loaded.eos_token_id],
                         skip_special_tokens=True) == "19"
    assert loaded.padding_side == "left" and loaded.pad_token_id != loaded.eos_token_id


@pytest.mark.slow
def test_built_base_model_has_the_intended_flaw():
    """The real base: right on problems without a carry, mostly wrong (the flawed answer) with one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_pg.builtin import builtin_path

    path = builtin_path("arith-gpt", progress=False)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rng = random.Random(123)
    problems = [(rng.randint(0, 99), rng.randint(0, 99)) for _ in range(400)]
    no_carry = [p for p in problems if flawed_sum(*p, 1.0, rng) == sum(p)]
    carry = [p for p in problems if p not in no_carry]

    def accuracy(subset, target):
        correct = 0
        for a, b in subset:
            encoded = tokenizer(f"{a}+{b}=", return_tensors="pt")
            out = model.generate(**encoded, max_new_tokens=6, do_sample=False)
            text = tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += text == str(target(a, b))
        return correct / len(subset)

    assert accuracy(no_carry, lambda a, b: a + b) > 0.95
    assert accuracy(carry, lambda a, b: a + b) < 0.15
    assert accuracy(carry, lambda a, b: flawed_sum(a, b, 1.0, rng)) > 0.8  # it imitates the forgetting
