"""The built-in arithmetic task and base model."""

import random
from pathlib import Path

import pytest

from rlhf_pg.models.builtin import char_tokenizer
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


def _greedy_answers(path, problems):
    """Greedy completions of ``a+b=`` by the model in ``path``, loaded with plain from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    answers = []
    for a, b in problems:
        encoded = tokenizer(f"{a}+{b}=", return_tensors="pt")
        out = model.generate(**encoded, max_new_tokens=6, do_sample=False)
        answers.append(tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def _flaw_signature(path, problems):
    """(accuracy without a carry, accuracy with one, share of carry problems answered with every carry dropped)."""
    rng = random.Random(0)  # unused by flawed_sum at forget_carry 0 or 1
    answers = dict(zip(problems, _greedy_answers(path, problems)))
    no_carry = [p for p in problems if flawed_sum(*p, 1.0, rng) == sum(p)]
    carry = [p for p in problems if p not in no_carry]

    def share(subset, target):
        return sum(answers[p] == str(target(*p)) for p in subset) / len(subset)

    return (share(no_carry, lambda a, b: a + b), share(carry, lambda a, b: a + b),
            share(carry, lambda a, b: flawed_sum(a, b, 1.0, rng)))


def _problems(n, seed):
    rng = random.Random(seed)
    return list(dict.fromkeys((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(n)))


def test_shipped_base_is_a_build_of_the_current_spec():
    """Fails when ArithBaseSpec changes without `python -m rlhf_pg.builtin --ship` (then it would be rebuilt on use)."""
    from rlhf_pg.models.builtin import shipped_path, shipped_root

    assert shipped_path("arith-gpt") == shipped_root() / "arith-gpt-v1"


def test_shipped_base_loads_with_from_pretrained_and_has_the_carry_flaw():
    from rlhf_pg.models.builtin import shipped_path

    no_carry, carry, carry_dropped = _flaw_signature(shipped_path("arith-gpt"), _problems(80, seed=7))
    assert no_carry > 0.9 and carry < 0.25 and carry_dropped > 0.7


def test_builtin_path_returns_the_shipped_weights_without_building_unless_rebuilt(monkeypatch, tmp_path):
    from rlhf_pg.models import builtin

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # its own cache: the fake rebuild must not outlive the test

    def fake_build(output_dir, spec=None, progress=True):  # what build-base --force would leave in the cache
        (Path(output_dir) / "config.json").write_text("{}")

    monkeypatch.setattr(builtin, "build_arith_gpt", lambda *a, **k: pytest.fail("built although weights are shipped"))
    assert builtin.builtin_path("arith-gpt") == builtin.shipped_path("arith-gpt")
    monkeypatch.setattr(builtin, "build_arith_gpt", fake_build)
    rebuilt = builtin.builtin_path("arith-gpt", force=True)
    assert rebuilt == builtin.cache_root() / "arith-gpt-v1" and (rebuilt / "config.json").exists()
    assert builtin.builtin_path("arith-gpt") == rebuilt  # a rebuild in the cache takes precedence


def test_builtin_path_builds_when_the_shipped_weights_are_not_of_the_current_spec(monkeypatch, tmp_path):
    from rlhf_pg.models import builtin

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    monkeypatch.setitem(builtin.BUILTIN_MODELS, "arith-gpt", builtin.ArithBaseSpec(seed=99))
    assert builtin.shipped_path("arith-gpt") is None
    built = []
    monkeypatch.setattr(builtin, "build_arith_gpt", lambda output_dir, spec, progress: (
        built.append(spec), (Path(output_dir) / "config.json").write_text("{}")))
    assert builtin.builtin_path("arith-gpt") == builtin.cache_root() / "arith-gpt-v1" and built[0].seed == 99


@pytest.mark.slow
def test_rebuilt_base_model_has_the_intended_flaw_and_matches_the_shipped_one(tmp_path):
    """The real builder, run again: right on problems without a carry, mostly wrong (the flawed answer) with
    one; and as accurate as the shipped weights on the same problems (equal when torch and the thread count
    match: the build is deterministic)."""
    from rlhf_pg.models.builtin import BUILTIN_MODELS, build_arith_gpt, shipped_path

    rebuilt = build_arith_gpt(tmp_path / "rebuilt", BUILTIN_MODELS["arith-gpt"], progress=False)
    problems = _problems(400, seed=123)
    no_carry, carry, carry_dropped = _flaw_signature(rebuilt, problems)
    assert no_carry > 0.95 and carry < 0.15 and carry_dropped > 0.8  # it imitates the forgetting
    shipped = _flaw_signature(shipped_path("arith-gpt"), problems)
    # within noise: ~3 binomial standard errors on ~250 carry problems
    assert all(abs(mine - theirs) < 0.08 for mine, theirs in zip((no_carry, carry, carry_dropped), shipped))
