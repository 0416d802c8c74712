"""The spectrum between imitation and reward: filtered BC weights, the exact demonstrator, and `rlhf-pg compare`."""

import collections
import json
import random
from pathlib import Path

import pytest
import torch
from rlhf_pg.run.accel import new_accelerator

from rlhf_pg.core.advantages import apply_baseline, discounted_returns, filtered_weights
from rlhf_pg.recipe import load_recipe, recipe_from_dict
from rlhf_pg.core.mdp import Rollout, terminal_rewards
from rlhf_pg.tasks.arithmetic import demonstrator_accuracy, demonstrator_distribution, flawed_sum
from rlhf_pg.trainer import compute_advantages
from rlhf_pg.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_filtered_weights_are_one_on_every_token_of_a_kept_sample_and_zero_elsewhere():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    rewards = terminal_rewards(torch.tensor([1.0, 0.0, 0.5]), mask)
    returns = discounted_returns(rewards, mask)
    assert filtered_weights(returns, mask, 0.5).tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1]]
    assert filtered_weights(returns, mask, 1.0).tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 0]]


def test_filtered_bc_with_a_binary_reward_is_reinforce_without_baseline():
    """A = 1[r >= 1] = r when r is 0/1: the filtered-BC arm differs from REINFORCE only by the baseline."""
    mask = (torch.rand(8, 5, generator=torch.Generator().manual_seed(0)) > 0.2).float()
    mask[:, 0] = 1.0
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    batch = Rollout(prompt_ids=torch.zeros(8, 2, dtype=torch.long), prompt_mask=torch.ones(8, 2),
                    completion_ids=torch.zeros(8, 5, dtype=torch.long), completion_mask=mask,
                    logprobs=torch.zeros(8, 5), group_ids=torch.arange(8) // 4, rewards=terminal_rewards(scores, mask))
    filtered = recipe_from_dict({"algorithm": {"estimator": "filtered_bc", "reward_threshold": 1.0}})
    plain = recipe_from_dict({"algorithm": {"baseline": "none"}})
    accelerator = new_accelerator("no")
    assert torch.equal(compute_advantages(batch, filtered.algorithm.estimator_spec(), accelerator), compute_advantages(batch, plain.algorithm.estimator_spec(), accelerator))
    rloo = apply_baseline(discounted_returns(batch.rewards, mask), mask, "leave_one_out", batch.group_ids)
    assert (rloo < 0).any()  # ... while the baseline also pushes the wrong samples down


def test_demonstrator_distribution_matches_sampling_and_the_exact_accuracy():
    rng = random.Random(0)
    for a, b in [(99, 99), (19, 1), (12, 34), (58, 67)]:
        exact = demonstrator_distribution(a, b, 0.7)
        assert sum(exact.values()) == pytest.approx(1.0)
        counts = collections.Counter(flawed_sum(a, b, 0.7, rng) for _ in range(20000))
        for answer, probability in exact.items():
            assert counts[answer] / 20000 == pytest.approx(probability, abs=0.015)
    # 0.3 ** (number of carries) is the chance of a right answer; the most likely answer is right without carries
    assert demonstrator_accuracy([(12, 34), (19, 1), (99, 99)], 0.7) == pytest.approx(((1 + 0.3 + 0.09) / 3, 1 / 3))
    assert demonstrator_accuracy([(12, 34), (19, 1), (99, 99)], 0.0) == (1.0, 1.0)


def tiny_compare_recipe(tmp_path, model_dir, arms="[sft, sft_exact, filtered_bc, rl]", extra=""):
    path = tmp_path / "compare.yaml"
    path.write_text(
        f"model: {model_dir}\n"
        "data: {task: arithmetic, max_operand: 9, num_eval: 10}\n"
        "rollout: {prompts_per_step: 4, completions_per_prompt: 2, max_new_tokens: 3}\n"
        "algorithm: {reward_threshold: 1.0}\n"
        "optim: {lr: 1.0e-3}\n"
        "train: {steps: 4, eval_every: 2, save_every: 0, tensorboard: false, num_threads: 1}\n"
        f"compare: {{arms: {arms}}}\n" + extra
    )
    return path


def test_compare_runs_every_arm_and_writes_report_summary_and_curves(tiny_model_dir, tmp_path):
    from rlhf_pg.lab.compare import compare

    recipe = load_recipe(tiny_compare_recipe(tmp_path, tiny_model_dir))
    out = tmp_path / "cmp"
    compare(recipe, out, show_progress=False)
    summary = json.loads((out / "summary.json").read_text())
    for arm in ("sft", "sft_exact", "filtered_bc", "rl"):
        result = summary[arm]
        assert 0.0 <= result["accuracy"] <= 1.0
        assert result["optimizer_steps"] == 4 and result["samples_seen"] == 4 * 8  # matched budgets
        assert [p["step"] for p in result["curve"]] == [0, 2, 4]
        assert [p["samples"] for p in result["curve"]] == [0, 16, 32]
        times = [p["train_time_s"] for p in result["curve"]]
        assert times[0] == 0.0 and times == sorted(times) and times[-1] == pytest.approx(result["train_time_s"], rel=1e-3)
        assert (out / arm / "final" / "config.json").exists()
        # the summary's accuracy is the arm's own final held-out evaluation
        assert result["accuracy"] == json.loads((out / arm / "summary.json").read_text())["eval_reward_after"]
    assert summary["budget"] == {"optimizer_steps": 4, "samples_per_step": 8, "samples_seen": 32,
                                 "rl_prompts_per_step": 4, "sft_prompts_per_step": 8}
    assert set(summary["demonstrator"]) == {"forget_carry", "accuracy", "mode_accuracy"}
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "![held-out accuracy" in report and "| REINFORCE" in report and "| SFT (demonstrator)" in report
    assert f"{summary['rl']['accuracy']:.3f}" in report and f"{summary['sft']['accuracy']:.3f}" in report


def cli(capsys, *args):
    """``rlhf-pg ARGS`` in this process: (exit code, stderr)."""
    code = main(list(args))
    return code, capsys.readouterr().err.strip().splitlines()[-1]  # the last line (progress bars come before)


def test_compare_cli_refuses_to_mix_runs_and_reports_bad_recipes(tiny_model_dir, tmp_path, capsys):
    recipe = tiny_compare_recipe(tmp_path, tiny_model_dir, arms="[sft, rl]")
    out = tmp_path / "cmp"
    code, err = cli(capsys, "--no-progress", "compare", str(recipe), "--output-dir", str(out), "--max-steps", "2")
    assert code == 0, err
    assert set(json.loads((out / "summary.json").read_text())) >= {"sft", "rl"}
    assert json.loads((out / "summary.json").read_text())["rl"]["optimizer_steps"] == 2
    code, err = cli(capsys, "compare", str(recipe), "--output-dir", str(out))
    assert code == 2 and "already holds a comparison" in err
    bad = {
        "sft.batch_size=5": "compare matches budgets",
        "train.sft_warmup_steps=3": "train.sft_warmup_steps=3: compare matches budgets",
        "compare.arms=[sft, sft]": "lists an arm twice",
        "compare.arms=[sft, ppo]": "compare.arms[1]: 'ppo' is not allowed",
        "algorithm.estimator=filtered": "did you mean 'filtered_bc'",
    }
    for override, message in bad.items():
        code, err = cli(capsys, "compare", str(recipe), "--output-dir", str(tmp_path / "x"), override)
        assert code == 2 and err.startswith("error:") and message in err, (override, err)


@pytest.mark.parametrize("rows,extra,message", [
    ([{"prompt": "a", "answer": "b"}] * 6, "", "have no column 'completion'"),
    ([{"prompt": "a", "completion": 3}] * 6, "", "every completion must be a string"),
    ([{"prompt": "a", "reply": "b"}] * 6, "  completion_column: response\n", "no column 'response'"),
    ([{"text": "a", "completion": "b"}] * 6, "", "has no column 'prompt'"),
])
def test_sft_bad_data_exits_2_with_a_clear_message(tiny_model_dir, tmp_path, capsys, rows, extra, message):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"model: {tiny_model_dir}\ndata:\n  task: null\n  path: {data}\n  num_eval: 2\n{extra}"
                      "train: {steps: 1, tensorboard: false}\n")
    code, err = cli(capsys, "sft", str(recipe), "--output-dir", str(tmp_path / "run"))
    assert code == 2 and err.startswith("error:") and message in err, err
    assert not (tmp_path / "run").exists()  # nothing written: the fixed recipe runs without --overwrite


def test_sft_exact_arm_needs_the_builtin_task(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(8)))
    recipe = tiny_compare_recipe(tmp_path, tiny_model_dir, arms="[sft_exact, rl]")
    code, err = cli(capsys, "compare", str(recipe), "--output-dir", str(tmp_path / "cmp"), "data.task=null",
                    f"data.path={data}", "data.num_eval=2")
    assert code == 2 and "'sft_exact' needs the built-in arithmetic task" in err


@pytest.mark.slow
def test_compare_arith_recipe_shows_reward_beating_the_flawed_demonstrator(tmp_path):
    """The real recipe (a few minutes): SFT stays near the demonstrator, REINFORCE far above it."""
    from rlhf_pg.lab.compare import compare

    summary = compare(load_recipe(ROOT / "recipes" / "compare_arith.yaml"), tmp_path, show_progress=False)
    demonstrator = summary["demonstrator"]
    assert abs(summary["sft"]["accuracy"] - demonstrator["mode_accuracy"]) < 0.1, summary
    assert summary["rl"]["accuracy"] >= demonstrator["accuracy"] + 0.3, summary
    assert summary["rl"]["accuracy"] >= summary["sft"]["accuracy"] + 0.4, summary
