"""The quickstart, end to end, from the real built-in base model (slow: about 3 minutes from a cold cache)."""

import json
from pathlib import Path

import pytest

from rlhf_pg.recipe import load_recipe
from rlhf_pg.trainer import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_lifts_heldout_greedy_accuracy_above_0_9(tmp_path):
    summary = train(load_recipe(ROOT / "recipes" / "quickstart.yaml"), tmp_path, show_progress=False)
    assert summary["eval_reward_before"] <= 0.75
    assert summary["eval_reward_after"] >= 0.90, json.dumps(summary, indent=2)


def exact_sum(prompts, completions, answer, finished, **kwargs):
    """The quickstart's reward written as a user writes one: 1 for exactly the sum, ended with EOS."""
    return [1.0 if done and completion == str(total) else 0.0 for completion, total, done in zip(completions, answer, finished)]


@pytest.mark.slow
def test_the_quickstart_from_python_with_a_reward_and_a_dataset_made_in_python(tmp_path):
    import datasets

    import rlhf_pg

    my_ds = datasets.Dataset.from_list([{"prompt": f"{a}+{b}=", "answer": a + b} for a in range(100) for b in range(100)])
    result = rlhf_pg.train(str(ROOT / "recipes" / "quickstart.yaml"), reward_funcs=[exact_sum], train_dataset=my_ds,
                           output_dir=tmp_path, progress=False)
    summary = result.summary
    assert summary["eval_reward_before"] <= 0.45
    assert summary["eval_reward_after"] >= 0.95, json.dumps({k: v for k, v in summary.items() if k != "examples"}, indent=2)
    assert result.metrics[-1]["eval/reward"] == summary["eval_reward_after"]
    assert result.metrics[-1]["step"] == 300 and "reward/exact_sum/mean" in result.metrics[1]
