"""SFT is the policy-gradient update with A = 1: identical gradients, a run that learns, and clear errors."""

import json
import random
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_pg.recipe import recipe_from_dict
from rlhf_pg.errors import UserError
from rlhf_pg.core.losses import policy_gradient_loss
from rlhf_pg.run.metrics import read_metrics
from rlhf_pg.policy.logprobs import completion_logprobs
from rlhf_pg.sft import demonstration_rollout, heldout_nll, train_sft

PROMPTS = ["1+2=", "33+44=", "5+6=", "10+0="]
COMPLETIONS = ["3", "77", "11", ""]  # different lengths, one empty (EOS only)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Runs here use train.num_threads=1 (fast on a busy machine); give the other tests their threads back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def independent_nll_sums(model, tokenizer, prompts, completions):
    """Per-example summed cross-entropy of completion + EOS, one unpadded sequence at a time, via HF labels."""
    sums, counts = [], []
    for prompt, completion in zip(prompts, completions):
        prompt_ids = tokenizer(prompt)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        input_ids = torch.tensor([prompt_ids + completion_ids])
        labels = torch.tensor([[-100] * len(prompt_ids) + completion_ids])
        mean_nll = model(input_ids=input_ids, labels=labels).loss  # HF cross-entropy, mean over labelled tokens
        sums.append(mean_nll * len(completion_ids))
        counts.append(len(completion_ids))
    return torch.stack(sums), counts


def gradients(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("aggregation", ["seq-mean-token-sum", "token-mean"])
def test_ml_gradient_equals_policy_gradient_with_unit_advantages(tiny_model_dir, aggregation):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # independent: plain transformers cross-entropy on each unpadded prompt+completion
    sums, counts = independent_nll_sums(model, tokenizer, PROMPTS, COMPLETIONS)
    ml_loss = sums.sum() / (len(PROMPTS) if aggregation == "seq-mean-token-sum" else sum(counts))
    expected = gradients(model, ml_loss)
    # the library: a padded batch of demonstrations, policy_gradient_loss with A = 1
    batch = demonstration_rollout(tokenizer, PROMPTS, COMPLETIONS)
    logprobs = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    pg_loss = policy_gradient_loss(logprobs, torch.ones_like(batch.completion_mask), batch.completion_mask, aggregation)
    assert torch.allclose(pg_loss, ml_loss, atol=1e-5)
    actual = gradients(model, pg_loss)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.allclose(expected[name], actual[name], atol=1e-6, rtol=1e-4), name


def test_the_sft_step_is_the_trainer_update_and_has_the_ml_gradient(tiny_model_dir):
    """What train_sft does per step (policy_update on demonstrations, A = 1, micro-batches) = the ML gradient."""
    from rlhf_pg.run.accel import new_accelerator

    from rlhf_pg.trainer import policy_update, update_settings

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sums, _ = independent_nll_sums(model, tokenizer, PROMPTS, COMPLETIONS)
    expected = gradients(model, sums.mean())
    model.zero_grad(set_to_none=True)
    recipe = recipe_from_dict({"model": tiny_model_dir, "train": {"micro_batch_size": 3}, "optim": {"max_grad_norm": None}})
    batch = demonstration_rollout(tokenizer, PROMPTS, COMPLETIONS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    captured = {}
    optimizer.step = lambda: captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
    policy_update(model, optimizer, new_accelerator("no"), batch, batch.completion_mask.clone(),
                  global_counts=(float(len(batch)), float(batch.completion_mask.sum())), **update_settings(recipe))
    for name in expected:
        assert torch.allclose(expected[name], captured[name], atol=1e-6, rtol=1e-4), name


def test_demonstrations_mask_completion_tokens_and_eos_only(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = demonstration_rollout(tokenizer, PROMPTS, COMPLETIONS)
    assert batch.completion_mask.sum(-1).tolist() == [2.0, 3.0, 3.0, 1.0]
    for row, text in enumerate(COMPLETIONS):
        length = len(text) + 1
        assert tokenizer.decode(batch.completion_ids[row, : length - 1]) == text
        assert int(batch.completion_ids[row, length - 1]) == tokenizer.eos_token_id
        assert torch.all(batch.completion_ids[row, length:] == tokenizer.pad_token_id)
    assert torch.equal(batch.prompt_ids[0, -5:], torch.tensor(tokenizer("1+2=")["input_ids"]))  # left-padded prompt
    with pytest.raises(UserError, match="exceeds the model's context of 10 tokens"):
        demonstration_rollout(tokenizer, ["1+2="], ["123456"], max_context=10)


def copy_digit_dataset(path, rows=240, seed=0):
    """Prompts like 'qk7=' whose target is the digit: easy for a tiny model, checked by arithmetic_exact's answer column.

    A decoy ``completion`` column makes sure ``data.completion_column: target`` is the one learnt.
    """
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(rows):
            digit = str(rng.randrange(10))
            prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(2)) + digit + "="
            handle.write(json.dumps({"prompt": prompt, "target": digit, "answer": digit, "completion": "x"}) + "\n")
    return path


def easy_recipe(model_dir, data_path, **sections):
    recipe = {
        "model": model_dir,
        "data": {"task": None, "path": str(data_path), "num_eval": 40, "completion_column": "target"},
        "rewards": [{"name": "arithmetic_exact"}],  # compares with the `answer` column
        "sft": {"batch_size": 32},
        "optim": {"lr": 3e-3},
        "rollout": {"max_new_tokens": 3},
        "train": {"steps": 100, "eval_every": 50, "save_every": 0, "tensorboard": False, "num_threads": 1},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe_from_dict(recipe)


def test_sft_lowers_heldout_nll_and_raises_heldout_accuracy(tiny_model_dir, tmp_path):
    data = copy_digit_dataset(tmp_path / "digits.jsonl")
    summary = train_sft(easy_recipe(tiny_model_dir, data), tmp_path / "run", show_progress=False)
    assert summary["eval_nll_after"] < 0.25 * summary["eval_nll_before"], summary
    assert summary["eval_reward_before"] <= 0.1 and summary["eval_reward_after"] >= 0.8, summary
    assert summary["samples_seen"] == 100 * 32 and summary["steps"] == 100
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if "eval/nll" in r] == [0, 50, 100]
    assert all("loss/nll" in r and "perf/step_s" in r for r in records if 0 < r["step"] and "grad/norm" in r)
    # the final model is an ordinary saved model, and its held-out NLL is the one reported
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    nll = heldout_nll(model, tokenizer, [r["prompt"] for r in rows], [r["target"] for r in rows])
    assert nll < 0.25 * summary["eval_nll_before"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["eval_nll_after"] == summary["eval_nll_after"]


def test_sft_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path):
    recipe = recipe_from_dict({
        "model": tiny_model_dir, "data": {"max_operand": 9, "num_eval": 8}, "sft": {"batch_size": 8},
        "optim": {"lr": 1e-3, "schedule": "cosine"}, "rollout": {"max_new_tokens": 3},
        "train": {"steps": 6, "eval_every": 0, "save_every": 3, "tensorboard": False, "num_threads": 1},
    })
    train_sft(recipe, tmp_path / "a", show_progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "final")
    shutil.rmtree(tmp_path / "b" / "checkpoint-6")  # the final step's checkpoint: resume from step 3
    resumed = train_sft(recipe, tmp_path / "b", resume=True, show_progress=False)
    assert resumed["resumed_from_step"] == 3
    strip = lambda records: [{k: v for k, v in r.items() if not k.startswith("perf/") and not k.endswith("/latency_s")} for r in records]  # noqa: E731
    assert strip(read_metrics(tmp_path / "a" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    final_a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").state_dict()
    final_b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "final").state_dict()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_builtin_demonstrators_write_the_sum_exactly_or_with_forgotten_carries(tiny_model_dir):
    from rlhf_pg.sft import Demonstrations

    for demonstrator, expect_exact in (("exact", True), ("flawed", False)):
        recipe = recipe_from_dict({"model": tiny_model_dir, "data": {"max_operand": 99, "num_eval": 50},
                                   "sft": {"demonstrator": demonstrator, "forget_carry": 1.0}})
        demos = Demonstrations(recipe, batch_size=400)
        prompts, completions = demos.batch(0)
        assert demos.batch(0) == (prompts, completions)  # a step's demonstrations are reproducible
        sums = [sum(map(int, p[:-1].split("+"))) for p in prompts]
        right = [str(s) == c for s, c in zip(sums, completions)]
        assert all(right) if expect_exact else 0.2 < sum(right) / len(right) < 0.45  # no-carry problems only
        assert not set(prompts) & set(demos.eval_prompts)  # held-out problems are never demonstrated


def test_sft_command_line_runs_and_refuses_resume_without_a_checkpoint(tiny_model_dir, tmp_path, capsys):
    from rlhf_pg.cli import main

    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"model: {tiny_model_dir}\ndata: {{max_operand: 9, num_eval: 8}}\nsft: {{demonstrator: exact}}\n"
                      "rollout: {max_new_tokens: 3}\ntrain: {steps: 2, eval_every: 0, save_every: 0, tensorboard: false, "
                      "num_threads: 1}\n")
    assert main(["--no-progress", "sft", str(recipe), "--output-dir", str(tmp_path / "run"), "sft.batch_size=4"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["samples_seen"] == 8 and summary["demonstrations"] == "arithmetic task, exact demonstrator"
    assert main(["sft", str(recipe), "--output-dir", str(tmp_path / "other"), "--resume"]) == 2
    assert "has no checkpoint-<step> directory" in capsys.readouterr().err
