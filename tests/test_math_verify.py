"""The math_verify reward: the completion's final answer against the ``answer`` column, with math-verify."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("math_verify")

from reward_models import RewardScorer  # noqa: E402
from reward_models.reasoning import answer_text, math_verify_reward  # noqa: E402
from rlhf_pg.recipe import RewardSpec  # noqa: E402


@pytest.mark.parametrize("completion,gold,expected", [
    ("<answer>\\frac{1}{2}</answer>", "0.5", 1.0),
    ("<answer>0.5</answer>", "\\frac{1}{2}", 1.0),
    ("so the half is \\boxed{1/2}.", "0.5", 1.0),              # no tags: the last \boxed{}
    ("12 apples, then 288 in all", "288", 1.0),                # no tags, no box: the last number
    ("<answer>287</answer>", "288", 0.0),
    ("<answer>3</answer> wait, <answer>288</answer>", "288", 1.0),  # the last answer pair
    ("<answer>288</answer> and later 5", "288", 1.0),          # the pair wins over a later number
    ("no answer here", "288", 0.0),
    ("<answer>x^2 + 2x + 1</answer>", "(x+1)^2", 1.0),
])
def test_math_verify_checks_the_final_answer_against_the_gold_answer(completion, gold, expected):
    scores = math_verify_reward(["q"], [completion], answer=[gold])
    assert list(scores) == [expected]
    assert scores.stats == {"gold_unparsed": 0.0, "timeouts": 0.0}


def test_an_unparseable_gold_answer_scores_zero_and_is_counted_never_a_crash():
    scorer = RewardScorer([RewardSpec(name="math_verify")])
    total, per_reward = scorer(["q"] * 3, ["<answer>5</answer>", "<answer>hello</answer>", "<answer>7</answer>"],
                               answer=["5", "", "no number here"])
    assert total == [1.0, 0.0, 0.0]
    metrics, notes = scorer.take_stats()
    assert metrics["reward/math_verify/gold_unparsed"] == 2.0 and metrics["reward/math_verify/timeouts"] == 0.0
    assert "gold answer '' does not parse" in notes[0]


def test_chat_completions_are_read_as_their_text_and_the_final_answer_rule_is_the_last_pair():
    scores = math_verify_reward(["q"], [[{"role": "assistant", "content": "<answer>2/4</answer>"}]], answer=["0.5"])
    assert list(scores) == [1.0]
    assert answer_text("a <answer> 1 </answer> b <answer>2</answer> 9") == "2"
    assert answer_text("just 9") == "just 9"


def test_a_sample_past_its_timeout_scores_zero_and_is_counted(monkeypatch):
    import math_verify
    from math_verify.errors import TimeoutException

    def slow_verify(gold, predicted, timeout_seconds=None):
        assert timeout_seconds == 2  # the per-sample limit reaches math-verify (main thread)
        raise TimeoutException("Operation timed out!")

    monkeypatch.setattr(math_verify, "verify", slow_verify)
    scores = math_verify_reward(["q"] * 2, ["<answer>1</answer>", "<answer>2</answer>"], answer=["1", "2"],
                                sample_timeout_s=2)
    assert list(scores) == [0.0, 0.0] and scores.stats["timeouts"] == 2.0


def test_a_math_verify_recipe_trains_on_an_answer_column(tiny_model_dir, tmp_path):
    from rlhf_pg.recipe import recipe_from_dict
    from rlhf_pg.run.metrics import read_metrics
    from rlhf_pg.trainer import train

    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1) if i % 3 else "\\bad{"}) + "\n"
                            for i in range(12)))
    recipe = recipe_from_dict({
        "model": tiny_model_dir, "data": {"task": None, "path": str(path), "num_eval": 3},
        "rewards": [{"name": "math_verify", "sample_timeout_s": 3}],
        "rollout": {"prompts_per_step": 3, "completions_per_prompt": 2, "max_new_tokens": 3},
        "train": {"steps": 2, "eval_every": 0, "save_every": 0, "tensorboard": False, "num_threads": 1},
    })
    train(recipe, tmp_path / "run", show_progress=False)
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss/policy" in r]
    assert len(steps) == 2 and all("reward/math_verify/gold_unparsed" in r for r in steps)


def test_the_gsm_symbolic_example_recipe_loads_and_gold_answers_score_one():
    pytest.importorskip("reasoning_gym")
    from pathlib import Path

    from rlhf_pg.data import prompt_source
    from rlhf_pg.recipe import load_recipe

    path = Path(__file__).resolve().parents[1] / "recipes" / "gsm_symbolic_math_verify.yaml"
    recipe = load_recipe(path, ["data.num_eval=4"])
    assert path.read_text().split("model:", 1)[1].split("train:")[0] in (path.parents[1] / "README.md").read_text()
    source, _, _ = prompt_source(recipe.data, 4, seed=0)
    prompts, columns = source.batch(0)
    scorer = RewardScorer(recipe.rewards)
    golden = [f"Step by step... <answer>{answer}</answer>" for answer in columns["answer"]]
    _, per_reward = scorer(prompts, golden, **columns)
    assert per_reward == {"math_verify": [1.0] * 4, "format": [1.0] * 4, "reasoning_gym": [1.0] * 4}
    _, per_reward = scorer(prompts, [f"\\boxed{{{int(a) + 1}}}" for a in columns["answer"]], **columns)
    assert per_reward["math_verify"] == [0.0] * 4 and per_reward["format"] == [0.0] * 4
