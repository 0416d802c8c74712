"""The command line: bad input exits with code 2 and one message, never a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None, env_extra=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "rlhf_pg", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)


@pytest.mark.parametrize("args,message", [
    (["train", "missing.yaml"], "recipe file not found: missing.yaml"),
    (["train", "RECIPE", "--max-steps", "-3"], "--max-steps: expected a positive integer, got -3"),
    (["train", "RECIPE", "optim.lrr=1"], "unknown recipe key 'optim.lrr'; did you mean 'optim.lr'"),
    (["train", "RECIPE", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["train", "EMPTY"], "is empty"),
    (["train", "BADYAML"], "flow sequence that starts at line 2"),
    (["reward-model", "RECIPE"], "unknown recipe key 'train.steps'"),
    (["report", "."], "has no metrics.jsonl"),
])
def test_bad_input_exits_2_with_one_clear_message(tmp_path, args, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {steps: 1}\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "bad.yaml").write_text("train:\n  - steps: [1\n")
    replace = {"RECIPE": str(recipe), "EMPTY": str(tmp_path / "empty.yaml"), "BADYAML": str(tmp_path / "bad.yaml")}
    result = run_cli(*[replace.get(a, a) for a in args], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.startswith("error:")


def test_debug_flag_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "train", "missing.yaml", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_train_then_eval_a_tiny_model(tiny_model_dir, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"model: {tiny_model_dir}\n"
        "data: {task: arithmetic, max_operand: 9, num_eval: 8}\n"
        "rewards: [{name: 'rewards_for_tests:sevens'}]\n"
        "rollout: {prompts_per_step: 4, completions_per_prompt: 2, max_new_tokens: 3}\n"
        "train: {steps: 2, eval_every: 0, save_every: 0, tensorboard: false}\n"
    )
    result = run_cli("--no-progress", "train", str(recipe), "--output-dir", str(tmp_path / "run"), "--seed", "3",
                     "optim.lr=1e-3")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "perf/step_s" in r]
    assert len(steps) == 2  # the builtin engine samples from the trainer's weights: nothing to push
    assert all(r["perf/sync_s"] < 0.01 and 0 < r["perf/sample_s"] < r["perf/step_s"] for r in steps), steps
    again = run_cli("--no-progress", "train", str(recipe), "--output-dir", str(tmp_path / "run"))
    assert again.returncode == 2 and "already holds a run" in again.stderr
    evaluated = run_cli("eval", str(recipe), "--model", str(tmp_path / "run" / "final"))
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["num_prompts"] == 8 and 0.0 <= result["reward"] <= 1.0


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    scripts = {entry.name: entry.value for entry in entry_points(group="console_scripts")}
    assert scripts.get("rlhf-pg") == "rlhf_pg.cli:main"


def test_deepspeed_through_accelerate_on_cpu_is_refused_not_silently_misrun(tmp_path):
    """What `accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml` sets in every process: on a
    CPU-only machine that run would misbehave (README: What has been run, and where), so it stops."""
    result = run_cli("--no-progress", "train", str(ROOT / "recipes" / "quickstart.yaml"), "--output-dir",
                     str(tmp_path / "run"), env_extra={"ACCELERATE_USE_DEEPSPEED": "true"})
    assert result.returncode == 2, result.stderr
    assert "DeepSpeed through accelerate needs GPUs" in result.stderr
    assert "recipes/accelerate/cpu_2proc.yaml" in result.stderr and "fsdp_cpu_2proc.yaml" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("how", ["env", "key"])
def test_fsdp_in_a_single_process_is_refused_naming_the_two_process_launch(tmp_path, how):
    """FSDP asked (the launch config's ACCELERATE_USE_FSDP, or train.fsdp: true) with one process: nothing to shard."""
    extra = ["train.fsdp=true"] if how == "key" else []
    result = run_cli("--no-progress", "train", str(ROOT / "recipes" / "quickstart.yaml"), "--output-dir",
                     str(tmp_path / "run"), *extra, env_extra={"ACCELERATE_USE_FSDP": "true"} if how == "env" else {})
    assert result.returncode == 2, result.stderr
    assert "single process: nothing to shard over" in result.stderr and "fsdp_cpu_2proc.yaml" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()
