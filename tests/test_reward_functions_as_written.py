"""Reward functions as users write them: async def (awaited concurrently), rewards[i].timeout_s, None for a
sample a function does not judge (excluded from its mean; 0 in the weighted total, TRL's nansum)."""

import asyncio
import math
import time

import pytest

import user_rewards_for_tests as user
from rlhf_pg.errors import RecipeError, RewardFunctionError
from rlhf_pg.recipe import recipe_from_dict
from reward_models import RewardScorer, judged_mean

PROMPTS = ["1+2=", "30+7=", "9+9="]
COMPLETIONS = ["3", "77", "7a"]


def scorer_of(*rewards) -> RewardScorer:
    return RewardScorer(recipe_from_dict({"rewards": list(rewards)}).rewards)


@pytest.fixture(autouse=True)
def _release_hung_functions():
    user.released.clear()
    yield
    user.released.set()  # let abandoned worker threads finish


def test_async_reward_functions_are_awaited_concurrently_and_summed_with_sync_ones():
    scorer = scorer_of({"name": "user_rewards_for_tests:async_length", "weight": 2.0},
                       "rewards_for_tests:sevens",
                       {"name": "user_rewards_for_tests:async_sevens", "weight": 0.5},
                       {"name": "user_rewards_for_tests:async_judge", "weight": 1.0})
    started = time.perf_counter()
    total, per_reward = scorer(PROMPTS, COMPLETIONS)
    elapsed = time.perf_counter() - started
    assert list(per_reward) == ["async_length", "sevens", "async_sevens", "async_judge"]  # the recipe's order
    assert per_reward["async_length"] == [1.0, 2.0, 2.0]
    assert per_reward["async_sevens"] == per_reward["sevens"] == [0.0, 1.0, 0.5]
    assert per_reward["async_judge"] == [2.0, 2.0, 2.0]
    assert total == pytest.approx([2 * 1 + 0 + 0 + 2, 2 * 2 + 1 + 0.5 + 2, 2 * 2 + 0.5 + 0.25 + 2])
    assert elapsed < 0.55, f"two 0.3 s async functions took {elapsed:.2f} s: not concurrent"


def test_async_rewards_work_when_the_caller_already_runs_an_event_loop():
    scorer = scorer_of("user_rewards_for_tests:async_length")

    async def notebook_cell():  # Jupyter runs cells inside a running loop
        return scorer(PROMPTS, COMPLETIONS)

    total, _ = asyncio.run(notebook_cell())
    assert total == [1.0, 2.0, 2.0]


def test_an_async_function_past_its_timeout_is_cancelled_and_named():
    scorer = scorer_of({"name": "user_rewards_for_tests:async_hangs", "timeout_s": 0.2}, "rewards_for_tests:sevens")
    started = time.perf_counter()
    with pytest.raises(RewardFunctionError, match=r"reward function 'user_rewards_for_tests:async_hangs' did not "
                                                  r"return within rewards\[0\]\.timeout_s=0\.2 s on a batch of 3 "
                                                  r"completions \(the call was cancelled\)"):
        scorer(PROMPTS, COMPLETIONS)
    assert time.perf_counter() - started < 2


def test_a_hung_sync_function_ends_the_step_naming_it_and_its_thread_is_abandoned():
    scorer = scorer_of("rewards_for_tests:sevens", {"name": "user_rewards_for_tests:sync_hangs", "timeout_s": 0.2})
    started = time.perf_counter()
    with pytest.raises(RewardFunctionError, match=r"'user_rewards_for_tests:sync_hangs' did not return within "
                                                  r"rewards\[1\]\.timeout_s=0\.2 s .*background thread, which Python "
                                                  r"cannot kill\); make it faster or raise rewards\[1\]\.timeout_s"):
        scorer(PROMPTS, COMPLETIONS)
    assert time.perf_counter() - started < 2


def test_an_async_function_that_blocks_its_event_loop_is_caught_by_the_loop_deadline():
    scorer = scorer_of({"name": "user_rewards_for_tests:async_blocks_the_loop", "timeout_s": 0.2})
    with pytest.raises(RewardFunctionError, match="did not return within .* blocked the event loop"):
        scorer(PROMPTS, COMPLETIONS)


def test_a_function_within_its_timeout_scores_normally_and_errors_keep_their_sample():
    assert scorer_of({"name": "user_rewards_for_tests:sync_slow", "timeout_s": 5})(PROMPTS, COMPLETIONS)[0] == [1.0] * 3
    with pytest.raises(RewardFunctionError, match=r"'user_rewards_for_tests:async_raises' raised ValueError: judge "
                                                  r"unavailable on sample 0 \(prompt='1\+2='"):
        scorer_of("user_rewards_for_tests:async_raises")(PROMPTS, COMPLETIONS)
    with pytest.raises(RewardFunctionError, match="raised RuntimeError: too long for me on sample"):
        scorer_of({"name": "rewards_for_tests:raises_on_long", "timeout_s": 5})(["a", "b"], ["1", "12345"])


def test_timeout_s_is_validated_and_not_passed_to_the_function():
    assert scorer_of({"name": "rewards_for_tests:sevens", "timeout_s": 1}).terms[0].params == {}
    with pytest.raises(RecipeError, match="timeout_s"):
        scorer_of({"name": "rewards_for_tests:sevens", "timeout_s": 0})
    with pytest.raises(RecipeError, match="did you mean 'timeout_s'"):
        scorer_of({"name": "rewards_for_tests:sevens", "timeout": 1})


def test_none_is_excluded_from_that_rewards_mean_and_counts_0_in_the_weighted_total():
    scorer = scorer_of({"name": "user_rewards_for_tests:only_sevens", "weight": 2.0},
                       {"name": "rewards_for_tests:sevens", "weight": 1.0})
    prompts, completions = ["a", "b", "c", "d"], ["77", "17", "3", "4"]
    total, per_reward = scorer(prompts, completions)
    judged = per_reward["only_sevens"]
    assert judged[:2] == [1.0, 0.0] and math.isnan(judged[2]) and math.isnan(judged[3])
    assert judged_mean(judged) == 0.5  # (1 + 0) / 2 judged samples, not / 4
    assert total == [2 * 1.0 + 1.0, 2 * 0.0 + 0.5, 0.0 + 0.0, 0.0 + 0.0]  # unjudged: 0 contribution, no NaN
    _, nothing = scorer_of("user_rewards_for_tests:judges_nothing")(prompts, completions)
    assert math.isnan(judged_mean(nothing["judges_nothing"]))
    assert scorer_of("user_rewards_for_tests:judges_nothing")(prompts, completions)[0] == [0.0] * 4


def test_nan_returned_by_a_function_is_still_an_error_none_is_the_way_to_skip():
    with pytest.raises(RewardFunctionError, match="returned nan for sample 0 .*return None for a sample the function "
                                                  "does not judge"):
        scorer_of("rewards_for_tests:not_a_number")(PROMPTS, COMPLETIONS)


def test_the_held_out_evaluation_means_only_judged_samples(tiny_model_dir):
    from rlhf_pg.evaluation import evaluate
    from rlhf_pg.models import load_policy
    from rlhf_pg.recipe import ModelConfig
    from rlhf_pg.policy.sampler import SamplingParams, make_sampler

    model, tokenizer, _ = load_policy(ModelConfig(name_or_path=tiny_model_dir))
    result = evaluate(make_sampler(None, model, tokenizer), model, ["1+2="] * 6, {}, scorer_of("user_rewards_for_tests:judges_nothing",
                                                                    "rewards_for_tests:sevens"),
                      SamplingParams(3, 1.0), seed=0)
    assert math.isnan(result["reward/judges_nothing"]) and math.isfinite(result["reward"])


def test_a_training_step_logs_the_mean_over_judged_samples_and_the_total_with_none_as_0(tiny_model_dir, tmp_path):
    from rlhf_pg.run.metrics import read_metrics
    from rlhf_pg.trainer import train

    recipe = recipe_from_dict({
        "model": tiny_model_dir, "data": {"task": "arithmetic", "max_operand": 20, "num_eval": 4},
        "rewards": ["user_rewards_for_tests:every_other"],
        "rollout": {"prompts_per_step": 4, "completions_per_prompt": 2, "max_new_tokens": 3},
        "train": {"steps": 1, "eval_every": 0, "save_every": 0, "tensorboard": False},
    })
    train(recipe, tmp_path / "run", show_progress=False)
    step = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward/mean" in r][0]
    assert step["reward/every_other/mean"] == 1.0  # the 4 judged samples, not the 8 (0.5) nor NaN
    assert step["reward/mean"] == 0.5  # totals 1, 0, 1, 0, ...: None counts 0
