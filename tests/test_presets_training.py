"""Presets in recipes and in the trainer: resolution, overrides, bad input, and each one's step on a tiny model."""

from __future__ import annotations

import pytest
import torch
import yaml

from rlhf_pg.cli import main
from rlhf_pg.core.mdp import Rollout, concat_rollouts
from rlhf_pg.core.presets import PRESETS
from rlhf_pg.errors import RecipeError
from rlhf_pg.recipe import recipe_from_dict
from rlhf_pg.run.metrics import read_metrics


def test_a_preset_fills_the_keys_the_recipe_did_not_write_and_explicit_keys_win():
    grpo = recipe_from_dict({"algorithm": {"preset": "grpo"}}).algorithm
    for dotted, value in PRESETS["grpo"].values.items():
        assert getattr(grpo, dotted.split(".", 1)[1]) == value, dotted
    dapo = recipe_from_dict({"algorithm": {"preset": "dapo", "clip_eps_high": 0.3}}).algorithm
    assert dapo.clip_eps_high == 0.3 and dapo.dynamic_sampling and dapo.scale == "group"
    # a resolved recipe round-trips (the preset's keys are then explicit, and the preset adds nothing)
    recipe = recipe_from_dict({"algorithm": {"preset": "cispo"}})
    assert recipe_from_dict(recipe.to_dict()) == recipe


def test_bad_presets_and_combinations_are_one_clear_message():
    with pytest.raises(RecipeError, match=r"algorithm.preset: unknown preset 'grp'; did you mean 'grpo'"):
        recipe_from_dict({"algorithm": {"preset": "grp"}})
    with pytest.raises(RecipeError, match=r"scale 'group' needs rollout.completions_per_prompt >= 2"):
        recipe_from_dict({"algorithm": {"preset": "grpo"}, "rollout": {"completions_per_prompt": 1}})
    with pytest.raises(RecipeError, match=r"importance 'truncate' \(CISPO\)"):
        recipe_from_dict({"algorithm": {"preset": "cispo", "ratio_level": "sequence"}})
    # filtered BC ignores the baseline: one completion per prompt is fine there
    recipe_from_dict({"algorithm": {"estimator": "filtered_bc"}, "rollout": {"completions_per_prompt": 1}})


def test_print_recipe_shows_the_resolved_recipe_and_runs_nothing(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm: {preset: dr_grpo}\ntrain: {steps: 3}\n")
    assert main(["train", str(recipe), "--print-recipe", "--output-dir", str(tmp_path / "run"), "seed=4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["algorithm"]["aggregation"] == "seq-mean-token-sum-norm" and shown["seed"] == 4
    assert not (tmp_path / "run").exists()
    assert main(["train", str(recipe), "algorithm.preset=reinforce++"]) == 2
    assert "did you mean 'reinforce_pp'" in capsys.readouterr().err


def test_concat_rollouts_repads_prompts_left_and_completions_right():
    def part(prompt_width, completion_width, rows, start):
        return Rollout(prompt_ids=torch.full((rows, prompt_width), start), prompt_mask=torch.ones(rows, prompt_width),
                       completion_ids=torch.full((rows, completion_width), start),
                       completion_mask=torch.ones(rows, completion_width), logprobs=torch.zeros(rows, completion_width),
                       group_ids=torch.arange(rows) + start, prompts=[f"p{start}"] * rows,
                       completions=["c"] * rows, finished=torch.ones(rows, dtype=torch.bool), extras={"a": [start] * rows})
    merged = concat_rollouts([part(2, 3, 2, 1), part(4, 1, 1, 7)], pad_token_id=0)
    assert merged.prompt_ids.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [7, 7, 7, 7]]
    assert merged.prompt_mask[:, :2].sum() == 1 * 2 + 0 and merged.prompt_mask[2].sum() == 4  # left padding is 0
    assert merged.completion_ids.tolist() == [[1, 1, 1], [1, 1, 1], [7, 0, 0]]
    assert merged.completion_mask.tolist()[2] == [1.0, 0.0, 0.0]
    assert merged.extras == {"a": [1, 1, 7]} and merged.group_ids.tolist() == [1, 2, 7]


def _tiny_recipe(model_dir, **algorithm):
    return recipe_from_dict({
        "model": model_dir, "data": {"max_operand": 9, "num_eval": 8},
        "rewards": [{"name": "rewards_for_tests:char_codes"}],
        "rollout": {"prompts_per_step": 4, "completions_per_prompt": 3, "max_new_tokens": 4},
        "algorithm": algorithm, "optim": {"lr": 1e-3},
        "train": {"steps": 2, "eval_every": 0, "tensorboard": False, "num_threads": 1},
    })


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_takes_finite_steps_on_a_tiny_model(tiny_model_dir, tmp_path, preset):
    from rlhf_pg.trainer import train

    extra = {"updates_per_batch": 2} if preset in ("cispo", "gspo", "dapo") else {}  # their ratio code runs
    summary = train(_tiny_recipe(tiny_model_dir, preset=preset, **extra), tmp_path, show_progress=False)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss/policy" in r]
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss/policy"])) for r in records)
    assert summary["skipped_updates"] == 0
    if preset == "remax":
        assert all("reward/greedy_baseline" in r for r in records)
    if preset == "dapo":
        assert all(r["sampling/rounds"] >= 1 and "reward/overlong_penalty/mean" in r for r in records)
    if preset in ("cispo", "gspo", "dapo"):
        assert all("ratio/clip_fraction" in r for r in records)


def test_dynamic_sampling_with_only_degenerate_groups_warns_and_goes_on(tiny_model_dir, tmp_path, capsys):
    from rlhf_pg.trainer import train

    recipe = _tiny_recipe(tiny_model_dir, preset="dapo", overlong_buffer_fraction=0.0, max_sampling_rounds=2)
    recipe.rewards[0].name, recipe.rewards[0].params = "rewards_for_tests:constant", {}
    summary = train(recipe, tmp_path, show_progress=False)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss/policy" in r]
    assert [r["sampling/rounds"] for r in records] == [2.0, 2.0]  # the cap, then on with what it had
    assert all(r["sampling/degenerate_fraction"] == 1.0 and r["sampling/kept_groups"] == 0.0 for r in records)
    assert "dynamic sampling found 0 of 4 groups with unequal rewards in 2 rounds" in capsys.readouterr().out
    assert summary["steps"] == 2


def test_remax_baseline_is_the_greedy_completions_reward(tiny_model_dir, tmp_path):
    """With a reward that is the same for every completion of a prompt, A = R - R(greedy) = 0 exactly."""
    from rlhf_pg.trainer import setup, train_step

    recipe = _tiny_recipe(tiny_model_dir, preset="remax")
    recipe.rewards[0].name, recipe.rewards[0].params = "rewards_for_tests:prompt_length", {}
    run, _ = setup(recipe, tmp_path)
    before = {n: p.detach().clone() for n, p in run.unwrapped.named_parameters()}
    metrics = train_step(run, 0)
    assert metrics["adv/mean"] == 0.0 and metrics["adv/std"] == 0.0 and metrics["reward/greedy_baseline"] > 0
    assert all(torch.equal(before[n], p) for n, p in run.unwrapped.named_parameters())  # zero gradient: no change
