"""Reward combination: the weighted sum, per-reward scores (weight-0 monitors included), early validation."""

import pytest

from rlhf_pg.recipe import recipe_from_dict
from rlhf_pg.errors import RecipeError
from reward_models import RewardScorer


def test_rewards_are_summed_with_their_weights_and_a_zero_weight_reward_is_only_logged():
    recipe = recipe_from_dict({"rewards": [
        {"name": "rewards_for_tests:sevens", "weight": 2.0},
        {"name": "length_penalty", "weight": 0.5, "target": 4},
        {"name": "arithmetic_exact", "weight": 0.0},
    ]})
    scorer = RewardScorer(recipe.rewards)
    prompts = ["1+2=", "30+7=", "9+9="]
    completions = ["3", "77", "7777777"]
    total, per_reward = scorer(prompts, completions, finished=[True, True, False])
    sevens = [0.0, 1.0, 1.0]
    length = [-3 / 4, -2 / 4, -3 / 4]
    exact = [1.0, 0.0, 0.0]
    assert per_reward == {"sevens": sevens, "length_penalty": length, "arithmetic_exact": exact}
    assert total == pytest.approx([2 * s + 0.5 * l for s, l in zip(sevens, length)])
    assert scorer.labels == ["sevens", "length_penalty", "arithmetic_exact"]


def test_the_same_reward_twice_gets_two_labels():
    scorer = RewardScorer(recipe_from_dict({"rewards": ["length_penalty", {"name": "length_penalty", "target": 1}]}).rewards)
    assert scorer.labels == ["length_penalty", "length_penalty_2"]


def test_a_reward_model_that_does_not_exist_fails_when_the_recipe_is_read(tmp_path):
    recipe = recipe_from_dict({"rewards": [{"name": "reward_model", "path": str(tmp_path / "nope")}]})
    with pytest.raises(RecipeError, match=r"rewards\[0\] \(reward_model\): reward model .* does not exist; train it "
                                          r"first with 'rlhf-pg reward-model recipes/reward_model.yaml'"):
        RewardScorer(recipe.rewards)
    with pytest.raises(RecipeError, match="reward_model needs `path`"):
        RewardScorer(recipe_from_dict({"rewards": ["reward_model"]}).rewards)
    # a run fails before it writes anything, so the retry needs no --overwrite
    from rlhf_pg.trainer import train

    with pytest.raises(RecipeError, match="does not exist; train it first"):
        train(recipe, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()
