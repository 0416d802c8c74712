"""The two preference recipes end to end from the real base model (slow: about 5 minutes on 2 CPU cores)."""

import json
from pathlib import Path

import pytest

from reward_models.bradley_terry import train_reward_model
from reward_models.config import load_reward_model_recipe
from rlhf_pg.recipe import load_recipe
from rlhf_pg.trainer import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reward_model_recipe_then_rlhf_raises_the_gold_reward(tmp_path):
    rm = train_reward_model(load_reward_model_recipe(ROOT / "recipes" / "reward_model.yaml"), tmp_path / "rm",
                            show_progress=False)
    assert rm["heldout_pair_accuracy"] >= 0.8, json.dumps(rm, indent=2)
    recipe = load_recipe(ROOT / "recipes" / "rlhf_preferences.yaml", [f"rewards.0.path={tmp_path / 'rm' / 'final'}"])
    summary = train(recipe, tmp_path / "rl", show_progress=False)
    before, after = summary["eval_reward_arithmetic_exact_before"], summary["eval_reward_arithmetic_exact_after"]
    assert after >= before + 0.1, json.dumps({k: v for k, v in summary.items() if k != "examples"}, indent=2)
    assert summary["eval_reward_reward_model_after"] > summary["eval_reward_reward_model_before"]
