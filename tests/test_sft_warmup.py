"""train.sft_warmup_steps: SFT steps on gold demonstrations inside ``rlhf-pg train``, before the first RL step.

It runs N steps and lowers the demonstrations' NLL (measured here with a plain forward), uses training items only,
leaves RL a fresh optimizer, is not redone by --resume, and a bad configuration exits 2 before anything is written.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

pytest.importorskip("reasoning_gym")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from rlhf_pg.data import prompt_source  # noqa: E402
from rlhf_pg.recipe import recipe_from_dict  # noqa: E402
from rlhf_pg.run.metrics import read_metrics  # noqa: E402
from test_reasoning_gym import CHAIN_SUM, LETTERS, chat_model_512  # noqa: E402,F401 (a fixture)

sft_module = importlib.import_module("rlhf_pg.sft")  # rlhf_pg.sft is also the name of the Python API's function


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Runs here use train.num_threads=1; give the other tests their threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def warmup_recipe(model, steps=1, warmup_steps=6, **train):
    return recipe_from_dict({
        "model": model,
        "data": {"source": "reasoning_gym", "tasks": [CHAIN_SUM, {**LETTERS, "weight": 1.0}], "num_eval": 4,
                 "system_prompt": "Reply as <answer>N</answer>."},
        "rewards": ["reasoning_gym", {"name": "format", "weight": 0.2}],
        "rollout": {"prompts_per_step": 4, "completions_per_prompt": 2, "max_new_tokens": 4},
        "optim": {"lr": 1.0e-9},  # RL's own steps leave the warmed weights as they are (to float rounding)
        "sft": {"batch_size": 8},
        "train": {"steps": steps, "eval_every": 0, "save_every": 1, "tensorboard": False, "num_threads": 1,
                  "log_completions_every": 0, "sft_warmup_steps": warmup_steps, "sft_warmup_lr": 3.0e-3, **train},
    })


@torch.no_grad()
def plain_nll(model_dir, prompts, completions) -> float:
    """Mean cross-entropy per completion token (completion + EOS after the rendered prompt), one sequence at a time."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    total, count = 0.0, 0
    for prompt, completion in zip(prompts, completions):
        prefix = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labels = torch.tensor([[-100] * len(prompt_ids) + completion_ids])
        loss = model(input_ids=torch.tensor([prompt_ids + completion_ids]), labels=labels).loss
        total, count = total + float(loss) * len(completion_ids), count + len(completion_ids)
    return total / count


def test_the_warm_up_runs_n_steps_lowers_the_demonstration_nll_and_leaves_rl_a_fresh_optimizer(
        chat_model_512, tmp_path, monkeypatch):
    from rlhf_pg.sft import Demonstrations
    from rlhf_pg.trainer import ReinforceRun, train

    recipe = warmup_recipe(chat_model_512)
    after_warmup = {}
    original = ReinforceRun.warm_up

    def warm_up(run, stop):
        result = original(run, stop)
        optimizer = run.optimizer.optimizer
        after_warmup["state"] = len(optimizer.state)
        after_warmup["lr"] = [group["lr"] for group in optimizer.param_groups]
        return result

    monkeypatch.setattr(ReinforceRun, "warm_up", warm_up)
    summary = train(recipe, tmp_path / "run", show_progress=False)
    assert after_warmup == {"state": 0, "lr": [1.0e-9]}  # no Adam moments from the warm-up, RL's lr back
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    warmup_rows = [r for r in records if "warmup/loss/nll" in r]
    assert [r["warmup/step"] for r in warmup_rows] == [1, 2, 3, 4, 5, 6] and all(r["step"] == 0 for r in warmup_rows)
    assert any("eval_after_warmup/reward" in r for r in records)
    assert summary["sft_warmup_steps"] == 6
    assert "eval_reward_before" in summary and "eval_reward_after_warmup" in summary
    assert "eval_chain_sum_accuracy_after_warmup" in summary and "eval_letter_counting_accuracy_after_warmup" in summary
    prompts, completions = Demonstrations(recipe, 8).batch(0)
    assert all(c.startswith("<answer>") and c.endswith("</answer>") for c in completions)
    before = plain_nll(chat_model_512, prompts, completions)
    after = plain_nll(tmp_path / "run" / "final", prompts, completions)
    assert after < before - 0.5, (before, after)


def test_the_warm_up_trains_on_training_items_only(chat_model_512, tmp_path, monkeypatch):
    from rlhf_pg.trainer import train

    recipe = warmup_recipe(chat_model_512, warmup_steps=4)
    seen = []
    original = sft_module.sft_step

    def sft_step(run, pairs, demonstrations, optimizer):
        seen.extend(json.dumps(prompt) for prompt in pairs[0])
        return original(run, pairs, demonstrations, optimizer)

    monkeypatch.setattr(sft_module, "sft_step", sft_step)
    train(recipe, tmp_path / "run", show_progress=False)
    _, eval_prompts, _ = prompt_source(recipe.data, 4, recipe.data.shuffle_seed + recipe.seed)
    held_out = {json.dumps(prompt) for prompt in eval_prompts}
    assert len(seen) == 4 * 8 and not held_out & set(seen)


def test_a_run_resumed_after_its_warm_up_does_not_redo_it(chat_model_512, tmp_path, monkeypatch):
    from rlhf_pg.trainer import train

    calls = []
    original = sft_module.SftWarmup.run
    monkeypatch.setattr(sft_module.SftWarmup, "run", lambda self, run: calls.append(1) or original(self, run))
    first = train(warmup_recipe(chat_model_512, steps=1, warmup_steps=3), tmp_path / "run", show_progress=False)
    assert len(calls) == 1
    resumed = train(warmup_recipe(chat_model_512, steps=2, warmup_steps=3), tmp_path / "run", resume=True,
                    show_progress=False)
    assert len(calls) == 1 and resumed["resumed_from_step"] == 1
    assert resumed["eval_reward_after_warmup"] == first["eval_reward_after_warmup"]  # kept in the checkpoint
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len([r for r in records if "warmup/loss/nll" in r]) == 3


@pytest.mark.parametrize("train_keys,data,message", [
    ({"sft_warmup_steps": -1}, None, "train.sft_warmup_steps"),
    ({"sft_warmup_steps": 2, "sft_warmup_lr": 0}, None, "train.sft_warmup_lr"),
    ({"sft_warmup_steps": 2}, "prompts-only", "train.sft_warmup_steps=2: the SFT warm-up needs demonstrations"),
])
def test_a_bad_warm_up_configuration_exits_2_before_anything_is_written(tmp_path, capsys, train_keys, data, message):
    from rlhf_pg.cli import main

    recipe = {"data": {"source": "reasoning_gym", "tasks": [CHAIN_SUM], "system_prompt": "direct"},
              "rewards": ["reasoning_gym"], "train": {"steps": 1, **train_keys}}
    if data == "prompts-only":
        rows = tmp_path / "prompts.jsonl"
        rows.write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(20)))
        recipe["data"] = {"path": str(rows), "num_eval": 4}
        recipe["rewards"] = ["arithmetic_exact"]
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    code = main(["--no-progress", "train", str(path), "--output-dir", str(tmp_path / "run")])
    stderr = capsys.readouterr().err
    error = stderr[stderr.index("error:"):]  # (after the datasets library's progress bar, for a data.path)
    assert code == 2 and message in error and error.count("\n") == 1 and "Traceback" not in stderr
    assert not (tmp_path / "run").exists()
