"""``rlhf-pg doctor``: a preflight that exits 0 when a run would learn, 1 with each problem and its fix, 2 for bad
input; and the pure pieces it prints (histograms, group spread, end-of-turn token)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from rlhf_pg import cli
from rlhf_pg.doctor import DoctorFoundProblems, end_of_turn_token, group_spread, histogram

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(path: Path, model_dir="builtin:arith-gpt", **sections) -> Path:
    """The quickstart's task on a tiny model (default: the shipped 0.8M-parameter arith-gpt, which ends its
    completions; a random model would truncate them all)."""
    recipe = {
        "model": str(model_dir),
        "data": {"task": "arithmetic", "max_operand": 20, "num_eval": 8},
        "rewards": [{"name": "arithmetic_exact"}],
        "rollout": {"prompts_per_step": 6, "completions_per_prompt": 4, "max_new_tokens": 6},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and isinstance(recipe.get(key), dict) else value
    path.write_text(yaml.safe_dump(recipe))
    return path


def doctor(capsys, monkeypatch, *args) -> tuple[int, str]:
    """``rlhf-pg doctor ARGS`` in this process: (exit code, stdout)."""
    monkeypatch.setenv("COLUMNS", "1000")  # rich wraps at the terminal width; keep each finding on one line
    try:
        code = cli.main(["--no-progress", "doctor", *map(str, args)])
    except DoctorFoundProblems as stop:
        code = stop.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out + captured.err


def test_the_quickstart_recipe_passes_the_doctor(capsys, monkeypatch):
    code, out = doctor(capsys, monkeypatch, ROOT / "recipes" / "quickstart.yaml")
    assert code == 0, out
    assert "ready to train" in out
    for section in ("First training prompt", "End of a completion", "One batch: 32 of 32 prompts x 4 completions",
                    "Reward functions", "Memory estimate", "Resolved recipe", "Verdict"):
        assert section in out
    assert "end token in loss mask" in out and "yes, for all" in out
    assert "'<eos>'" in out  # the end id, by name


def test_a_constant_reward_fails_with_every_group_has_equal_rewards_and_its_fix(tmp_path, capsys, monkeypatch):
    recipe = tiny_recipe(tmp_path / "r.yaml", rewards=[{"name": "rewards_for_tests:constant"}])
    code, out = doctor(capsys, monkeypatch, recipe)
    assert code == 1, out
    assert "every group has equal rewards" in out
    assert "every completion scored 1" in out and "advantage is 0 under baseline leave_one_out" in out
    assert "give the completions of a prompt a chance to differ" in out  # the fix
    assert "if the reward is a constant by design, it is a bug in the reward function" in out
    assert "doctor: 1 problem(s) that would waste the run" in out


def test_a_failing_reward_function_fails_the_doctor_naming_it(tmp_path, capsys, monkeypatch):
    recipe = tiny_recipe(tmp_path / "r.yaml",
                         rewards=["arithmetic_exact", {"name": "user_rewards_for_tests:reads_a_missing_column"}])
    code, out = doctor(capsys, monkeypatch, recipe)
    assert code == 1, out
    assert "doctor: 1 problem(s)" in out  # the other reward still scored the batch
    assert "reward function 'user_rewards_for_tests:reads_a_missing_column' fails" in out
    assert "raised KeyError: 'solution' on sample 0" in out
    assert "fix 'user_rewards_for_tests:reads_a_missing_column' (rewards[1])" in out


def test_a_hung_reward_function_fails_the_doctor_with_its_timeout(tmp_path, capsys, monkeypatch):
    import user_rewards_for_tests as user

    recipe = tiny_recipe(tmp_path / "r.yaml", rewards=[{"name": "user_rewards_for_tests:sync_hangs", "timeout_s": 0.2}])
    try:
        code, out = doctor(capsys, monkeypatch, recipe)
    finally:
        user.released.set()
    assert code == 1, out
    assert "did not return within rewards[0].timeout_s=0.2 s" in out


def test_one_new_token_truncates_every_completion_and_fails(tmp_path, capsys, monkeypatch):
    # min_new_tokens=1 forbids EOS at the only step: every completion is truncated, whatever the weights
    code, out = doctor(capsys, monkeypatch, tiny_recipe(tmp_path / "r.yaml"),
                       "rollout.max_new_tokens=1", "rollout.min_new_tokens=1")
    assert code == 1, out
    assert "every completion was truncated" in out
    assert "raise rollout.max_new_tokens (e.g. 16)" in out
    assert "not verified: no completion finished" in out


def test_bad_input_exits_2_as_every_command(tmp_path, capsys, monkeypatch):
    recipe = tiny_recipe(tmp_path / "r.yaml")
    assert doctor(capsys, monkeypatch, tmp_path / "missing.yaml")[0] == 2
    code, out = doctor(capsys, monkeypatch, recipe, "rewards.0.name=no_such_reward")
    assert code == 2 and "unknown reward function 'no_such_reward'" in out
    assert doctor(capsys, monkeypatch, recipe, "--prompts", "0")[0] == 2


def test_prompts_limits_the_batch_and_the_report_says_so(tmp_path, capsys, monkeypatch):
    code, out = doctor(capsys, monkeypatch, tiny_recipe(tmp_path / "r.yaml"), "--prompts", "2")
    assert code == 0, out
    assert "One batch: 2 of 6 prompts x 4 completions" in out and "(--prompts 2)" in out


def test_a_chat_template_whose_end_of_turn_token_is_not_an_end_id_is_a_problem(tiny_model_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "chat-model"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # a turn ends with <pad>, which is not the EOS: the policy would close its turn and keep sampling
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ pad_token }}{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    tokenizer.save_pretrained(model_dir)
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(model_dir)
    assert end_of_turn_token(tokenizer, [{"role": "user", "content": "1+2?"}]) == tokenizer.pad_token_id
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{a}+1?"}]}) + "\n" for a in range(12)))
    recipe = tiny_recipe(tmp_path / "r.yaml", model_dir, data={"task": None, "path": str(data), "num_eval": 2})
    code, out = doctor(capsys, monkeypatch, recipe)
    assert code == 1, out
    assert "the end-of-turn token does not end completions" in out
    assert "add 0 to eos_token_id in the model's generation_config.json" in out


def test_doctor_says_when_the_batch_would_not_fit(tmp_path, capsys, monkeypatch):
    import importlib

    diagnose = importlib.import_module("rlhf_pg.doctor.diagnose")  # the module, not the function of that name

    monkeypatch.setattr(diagnose, "available_memory", lambda device: (0, "a test budget"))
    monkeypatch.setattr(diagnose, "rss_bytes", lambda: 0)
    code, out = doctor(capsys, monkeypatch, tiny_recipe(tmp_path / "r.yaml"), "--prompts", "2")
    assert code == 1, out
    assert "the batch would not fit in memory" in out and "rlhf-pg train would refuse to start" in out
    assert "Memory estimate" in out and "activations (update)" in out and "a smaller model" in out


def test_histogram_counts_values_bins_and_unjudged_samples():
    assert histogram([0.0, 1.0, 1.0, float("nan")]) == [("0", 1), ("1", 2), ("None (not judged)", 1)]
    rows = histogram([i / 10 for i in range(100)], bins=4)
    assert [n for _, n in rows] == [25, 25, 25, 25] and rows[-1][0].endswith("]")


def test_group_spread_counts_groups_whose_rewards_are_all_equal():
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    assert group_spread([1.0, 1.0, 0.0, 1.0, 0.0, 0.0], groups) == (2, 3)
