"""The run shell every command shares: one schedule, --resume for gym and reward-model, report exits 0."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlhf_pg.run.optim import OptimConfig, build_optimizer, build_scheduler, lr_factor

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("schedule,name", [("constant", "constant_with_warmup"), ("linear", "linear"), ("cosine", "cosine")])
@pytest.mark.parametrize("warmup", [0, 3])
def test_the_one_schedule_is_transformers_schedule_step_by_step(schedule, name, warmup):
    from transformers import get_scheduler

    total = 12
    ours = build_scheduler(build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimConfig(lr=0.5, schedule=schedule,
                                                                                           warmup_steps=warmup)),
                           OptimConfig(lr=0.5, schedule=schedule, warmup_steps=warmup), total)
    theirs = get_scheduler(name, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.5),
                           num_warmup_steps=warmup, num_training_steps=total)
    for _ in range(total + 2):
        assert ours.get_last_lr()[0] == pytest.approx(theirs.get_last_lr()[0], abs=1e-12)
        ours.optimizer.step(), theirs.optimizer.step()
        ours.step(), theirs.step()
    assert lr_factor(schedule, warmup, total)(0) == (0.0 if warmup else 1.0)  # warm-up starts at 0, as transformers'


def test_a_constant_group_keeps_its_rate_while_the_policy_group_follows_the_schedule():
    optim = OptimConfig(lr=1.0, schedule="linear")
    optimizer = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1.0},
                                 {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1}], optim)
    scheduler = build_scheduler(optimizer, optim, 4, constant_groups=1)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == pytest.approx([0.5, 0.1])


def test_gym_resume_continues_from_the_checkpoint_to_the_new_length(tmp_path, capsys):
    from rlhf_pg.cli import main
    from rlhf_pg.run.metrics import read_metrics

    recipe = ROOT / "recipes" / "gym" / "cartpole.yaml"
    base = ["--no-progress", "gym", str(recipe), "--output-dir", str(tmp_path / "run"), "env.num_envs=4",
            "eval.episodes=20"]
    assert main(base + ["--max-steps", "2"]) == 0
    assert (tmp_path / "run" / "checkpoint-2" / "model.pt").exists()  # the final step's checkpoint
    capsys.readouterr()
    assert main(base + ["--max-steps", "4", "--resume"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["resumed_from_step"] == 2 and summary["updates"] == 4
    steps = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss/policy" in r]
    assert steps == [1, 2, 3, 4]
    assert main(base + ["--max-steps", "4", "--resume", "seed=9"]) == 2
    assert "written by a different recipe (differs in seed)" in capsys.readouterr().err


def test_reward_model_resume_reproduces_the_uninterrupted_run(tmp_path):
    from test_reward_model import sevens_preferences

    from reward_models.bradley_terry import train_reward_model
    from reward_models.config import reward_model_recipe_from_dict
    from rlhf_pg.run.metrics import read_metrics

    data = sevens_preferences(tmp_path / "pairs.jsonl", 300)
    recipe = reward_model_recipe_from_dict({
        "model": {"name_or_path": None, "tokenizer": "builtin:char",
                  "config": {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}},
        "data": {"path": data, "num_eval": 60},
        "optim": {"lr": 3e-3, "schedule": "cosine"},
        "train": {"epochs": 2, "batch_size": 40, "eval_every": 0, "save_every": 3, "tensorboard": False,
                  "num_threads": 1},
    })
    whole = train_reward_model(recipe, tmp_path / "a", show_progress=False)
    assert whole["steps"] == 12  # 2 epochs of ceil(240 / 40) batches
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    for name in ("final", "checkpoint-12", "summary.json"):
        shutil.rmtree(tmp_path / "b" / name) if (tmp_path / "b" / name).is_dir() else (tmp_path / "b" / name).unlink()
    resumed = train_reward_model(recipe, tmp_path / "b", resume=True, show_progress=False)
    assert resumed["resumed_from_step"] == 9
    strip = lambda path: [{k: v for k, v in r.items() if not k.startswith("perf/") and not k.endswith("/latency_s")} for r in read_metrics(path)]  # noqa: E731
    assert strip(tmp_path / "a" / "metrics.jsonl") == strip(tmp_path / "b" / "metrics.jsonl")
    assert resumed["heldout_pair_accuracy"] == whole["heldout_pair_accuracy"]


def test_report_on_real_runs_exits_0_and_draws_its_figures(tiny_model_dir, tmp_path, capsys):
    from rlhf_pg.cli import main

    runs = []
    for beta in (0.0, 0.1):
        recipe = tmp_path / f"kl{beta}.yaml"
        recipe.write_text(
            f"model: {tiny_model_dir}\ndata: {{max_operand: 9, num_eval: 8}}\n"
            "rewards: [{name: arithmetic_exact}, {name: length_penalty, weight: 0.0}]\n"
            "rollout: {prompts_per_step: 4, completions_per_prompt: 2, max_new_tokens: 3}\n"
            f"algorithm: {{kl_coef: {beta}, log_kl: true}}\n"
            "train: {steps: 3, eval_every: 0, tensorboard: false, num_threads: 1}\n")
        assert main(["--no-progress", "train", str(recipe), "--output-dir", str(tmp_path / f"run{beta}")]) == 0
        runs.append(str(tmp_path / f"run{beta}"))
    capsys.readouterr()
    assert main(["report", *runs, "--output-dir", str(tmp_path / "report"), "--smooth", "1"]) == 0
    printed = capsys.readouterr()
    assert "error" not in printed.err
    for name in ("goodhart.png", "rewards_by_step.png"):
        assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG"
        assert str(tmp_path / "report" / name) in printed.out
    # rlhf-pg plot: the curves of the same runs (kl/ref was logged, so its panel exists)
    assert main(["plot", *runs, "--output-dir", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out.split()
    names = {Path(path).name for path in printed}
    assert {"curves.png", "reward_mean.png", "kl_ref.png", "policy_entropy.png"} <= names, names
    assert all(Path(path).read_bytes()[:4] == b"\x89PNG" for path in printed)


def test_a_failure_writing_final_keeps_the_checkpoint_and_resume_writes_final_again(tiny_model_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    from rlhf_pg.cli import main
    from rlhf_pg.lm_run import LMRun

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_model_dir}\ndata: {{max_operand: 9, num_eval: 8}}\n"
                      "rollout: {prompts_per_step: 4, completions_per_prompt: 2, max_new_tokens: 3}\n"
                      "train: {steps: 2, eval_every: 0, tensorboard: false, num_threads: 1}\n")
    original = LMRun.save_final

    def broken(self, staging, summary):
        raise ValueError("The model is quantized with gguf and is not serializable")

    monkeypatch.setattr(LMRun, "save_final", broken)
    run_dir = tmp_path / "run"
    code = main(["--no-progress", "train", str(recipe), "--output-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "training finished but writing" in err and "checkpoint-2" in err and "--resume" in err
    assert (run_dir / "checkpoint-2" / "model.safetensors").exists() and not (run_dir / "final").exists()
    monkeypatch.setattr(LMRun, "save_final", original)
    assert main(["--no-progress", "train", str(recipe), "--output-dir", str(run_dir), "--resume"]) == 0
    assert (run_dir / "final" / "model.safetensors").exists() and (run_dir / "summary.json").exists()


def test_report_to_an_uninstalled_tracker_is_one_clear_message_and_empty_means_metrics_only(tiny_model_dir, tmp_path,
                                                                                            capsys):
    import importlib.util

    from rlhf_pg.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tiny_model_dir}\ndata: {{max_operand: 9, num_eval: 4}}\n"
                      "rollout: {prompts_per_step: 2, completions_per_prompt: 2, max_new_tokens: 2}\n"
                      "train: {steps: 1, eval_every: 0, num_threads: 1}\n")
    if importlib.util.find_spec("mlflow") is None:
        assert main(["train", str(recipe), "train.report_to=[mlflow]", "--output-dir", str(tmp_path / "x")]) == 2
        assert "'mlflow' needs the 'mlflow' package" in capsys.readouterr().err
    assert main(["train", str(recipe), "train.report_to=[wand]", "--output-dir", str(tmp_path / "x")]) == 2
    assert "choose from tensorboard, wandb, trackio, mlflow" in capsys.readouterr().err
    assert main(["--no-progress", "train", str(recipe), "train.report_to=[]", "--output-dir", str(tmp_path / "a")]) == 0
    assert not (tmp_path / "a" / "tensorboard").exists() and (tmp_path / "a" / "metrics.jsonl").exists()
    assert main(["--no-progress", "train", str(recipe), "--output-dir", str(tmp_path / "b")]) == 0
    assert any((tmp_path / "b" / "tensorboard").rglob("events.out.tfevents.*"))


def test_resume_accepts_a_run_written_before_a_key_existed_when_the_key_keeps_its_default(tmp_path):
    """A newer rlhf-pg adds keys with defaults: the old run's marker lacks them. Resuming it with the defaults is the
    same recipe; with another value it is not; a machine-only knob (num_threads) may change."""
    from rlhf_pg.errors import UserError
    from rlhf_pg.recipe import Recipe
    from rlhf_pg.run.rundir import RunDir

    defaults = Recipe().to_dict()
    current = Recipe().to_dict()
    old = json.loads(json.dumps(current))
    del old["train"]["check_memory"]  # as written by a version without the key
    run_dir = RunDir(tmp_path / "run")
    run_dir.prepare(old)
    run_dir.write_marker(old)
    (tmp_path / "run" / "checkpoint-1").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-1" / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    assert run_dir.prepare(current, resume=True, defaults=defaults).name == "checkpoint-1"
    current["train"]["num_threads"] = 7  # how many threads this machine runs is not the recipe's science
    assert run_dir.prepare(current, resume=True, defaults=defaults).name == "checkpoint-1"
    current["train"]["check_memory"] = False
    with pytest.raises(UserError, match=r"differs in train\.check_memory"):
        run_dir.prepare(current, resume=True, defaults=defaults)
    with pytest.raises(UserError, match=r"differs in train\.check_memory"):  # without the schema's defaults: strict
        run_dir.prepare(Recipe().to_dict(), resume=True)
