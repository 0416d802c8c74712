"""The variance lab: its measurements agree with theory on the enumerable MDP and with exact identities on an LM."""

import json
from pathlib import Path

import pytest

from rlhf_pg.lab.variance import run_variance_lab

ROOT = Path(__file__).resolve().parents[1]


def rows_by_name(result):
    return {row["estimator"]: row for row in result["estimators"]}


def test_variance_lab_on_the_enumerable_mdp_shows_the_expected_ordering(tmp_path):
    result = run_variance_lab(str(ROOT / "recipes" / "gym" / "tabular.yaml"), tmp_path, batches=600,
                              reference_batches=400, show_progress=False)
    rows = rows_by_name(result)
    reference = result["reference"]
    assert reference["kind"] == "exact (enumeration)" and reference["own_mse"] == 0.0
    # the sampled reference (400 batches) agrees with the exact gradient that replaces it, within its noise
    assert reference["sampled_vs_exact_sq"] < 12 * rows["rtg + leave_one_out"]["variance"] / 400
    variance = {name: row["variance"] for name, row in rows.items()}
    # exact ratios on this MDP (tests/test_exact_gradient.py): rtg < 0.8 total, timestep_mean < 0.5 rtg
    assert variance["reward-to-go"] < 0.9 * variance["total return"]
    assert variance["rtg + timestep_mean"] < 0.6 * variance["reward-to-go"]
    assert variance["rtg + learned value"] < 0.8 * variance["reward-to-go"]
    # unbiased estimators: bias^2 is only sampling noise, ~ variance / K; batch_mean shrinks by 1 - 1/B
    for name in ("total return", "reward-to-go", "rtg + leave_one_out"):
        assert rows[name]["bias_sq"] < 6 * rows[name]["variance"] / 600, name
    shrink_bias = (1 / result["batch_size"]) ** 2 * result["reference"]["norm_sq"]
    assert rows["rtg + batch_mean"]["bias_sq"] == pytest.approx(shrink_bias, rel=0.5)
    # MSE = variance + bias^2 (the exact reference has no error of its own)
    for row in rows.values():
        assert row["mse"] == pytest.approx(row["variance"] * (600 - 1) / 600 + row["bias_sq"], rel=1e-6)
    # the files
    assert (tmp_path / "variance.png").stat().st_size > 10_000
    assert "| rtg + timestep_mean |" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "variance.json").read_text())["batches"] == 600


def test_variance_lab_on_a_language_model(tiny_model_dir, tmp_path):
    recipe = tmp_path / "lm.yaml"
    recipe.write_text(
        f"model: {tiny_model_dir}\n"
        "data: {task: arithmetic, max_operand: 9, num_eval: 8}\n"
        "rewards: [{name: 'rewards_for_tests:char_codes'}]\n"
        "rollout: {prompts_per_step: 4, completions_per_prompt: 2, max_new_tokens: 3}\n"
    )
    result = run_variance_lab(str(recipe), tmp_path / "out", batches=3, reference_batches=2, show_progress=False)
    rows = rows_by_name(result)
    total_params = result["num_parameters"]
    assert total_params > 10_000  # the full parameter vector, not a subset
    # the reward is terminal and gamma = 1: the total return *is* the reward-to-go at every token
    assert rows["total return"]["variance"] == rows["reward-to-go"]["variance"]
    # group_mean = (K-1)/K * leave_one_out for every completion (K = 2), so its variance is exactly 1/4 of it
    assert rows["rtg + group_mean"]["variance"] == pytest.approx(rows["rtg + leave_one_out"]["variance"] / 4, rel=1e-9)
    assert "rtg + learned value" not in rows  # no value head for language models
    assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / "variance.png").exists()


def test_preset_rows_are_the_same_estimators_as_the_lab_rows_they_reduce_to(tmp_path):
    """A preset row is the one composition with the preset's keys: reinforce = reward-to-go, rloo = rtg + LOO
    (same batches, same numbers); GRPO's std scaling and Dr. GRPO's length normalization are biased."""
    result = run_variance_lab(str(ROOT / "recipes" / "gym" / "tabular.yaml"), tmp_path, batches=200,
                              reference_batches=50, presets=True, show_progress=False)
    rows = rows_by_name(result)
    for preset, plain in (("preset reinforce", "reward-to-go"), ("preset rloo", "rtg + leave_one_out")):
        assert rows[preset]["variance"] == pytest.approx(rows[plain]["variance"], rel=1e-9)
        assert rows[preset]["bias_sq"] == pytest.approx(rows[plain]["bias_sq"], rel=1e-9)
    assert "preset remax" not in rows  # the gym lab has no greedy rollout
    for preset in ("preset grpo", "preset dr_grpo"):  # biased by construction: far beyond the sampling noise
        assert rows[preset]["bias_sq"] > 50 * rows[preset]["variance"] / 200, preset
