"""The training loop end to end on a tiny local model: it learns, writes what it promises, resumes exactly."""

import json
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_pg.recipe import recipe_from_dict
from rlhf_pg.errors import RewardFunctionError, TrainingInterrupted, UserError
from rlhf_pg.run.metrics import read_metrics
from rlhf_pg.trainer import train


def tiny_recipe(model_dir, **sections):
    recipe = {
        "model": model_dir,
        "data": {"task": "arithmetic", "max_operand": 20, "num_eval": 16},
        "rewards": [{"name": "rewards_for_tests:sevens"}],
        "rollout": {"prompts_per_step": 8, "completions_per_prompt": 4, "max_new_tokens": 4},
        "optim": {"lr": 0.01},
        "train": {"steps": 30, "eval_every": 10, "save_every": 10, "tensorboard": False},
        "eval": {"temperature": 1.0},
    }
    for key, value in sections.items():
        recipe.setdefault(key, {})
        if isinstance(value, dict):
            recipe[key].update(value)
        else:
            recipe[key] = value
    return recipe_from_dict(recipe)


def test_training_raises_reward_and_writes_summary_metrics_and_final_model(tiny_model_dir, tmp_path):
    summary = train(tiny_recipe(tiny_model_dir), tmp_path, show_progress=False)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in records] == list(range(1, 31))
    first = sum(r["reward/mean"] for r in records[:5]) / 5
    last = sum(r["reward/mean"] for r in records[-5:]) / 5
    assert last > first + 0.3, (first, last)
    for key in ("eval_reward_before", "eval_reward_after", "steps", "wall_time_s", "tokens_per_s", "world_size",
                "resumed_from_step"):
        assert key in summary
    assert summary["world_size"] == 1 and summary["resumed_from_step"] is None and summary["steps"] == 30
    assert summary["eval_reward_after"] > summary["eval_reward_before"]
    assert json.loads((tmp_path / "summary.json").read_text())["eval_reward_after"] == summary["eval_reward_after"]
    for key in ("reward/std_err", "loss/policy", "adv/mean", "perf/tokens_per_s", "reward/sevens/mean"):
        assert key in records[0]
    # the final model loads with plain transformers
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert model(**tokenizer("1+2=", return_tensors="pt")).logits.shape[-1] == len(tokenizer)
    # save_every 10, keep 2, and the final step's checkpoint (written before final/)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]
    state = json.loads((tmp_path / "checkpoint-20" / "trainer_state.json").read_text())
    assert state["global_step"] == 20
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "checkpoint-20" / name).exists()


def _comparable(record):
    return {k: v for k, v in record.items() if not k.startswith("perf/") and not k.endswith("/latency_s")}


def test_interrupt_checkpoints_and_resume_reproduces_the_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    sections = {"rewards": [{"name": "rewards_for_tests:sevens_then_interrupt"}],
                "train": {"steps": 8, "save_every": 0, "eval_every": 4}}
    reference = train(tiny_recipe(tiny_model_dir, **sections), tmp_path / "a", show_progress=False)
    import rewards_for_tests

    rewards_for_tests.calls["count"] = 0
    monkeypatch.setenv("INTERRUPT_AT_CALL", "4")  # call 1 is the first eval; call 4 scores step 3
    with pytest.raises(TrainingInterrupted, match="Resume with: .* --resume") as stopped:
        train(tiny_recipe(tiny_model_dir, **sections), tmp_path / "b", show_progress=False)
    assert stopped.value.checkpoint.endswith("checkpoint-3")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.delenv("INTERRUPT_AT_CALL")
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny_recipe(tiny_model_dir, **sections), tmp_path / "b", show_progress=False)
    resumed = train(tiny_recipe(tiny_model_dir, **sections), tmp_path / "b", resume=True, show_progress=False)
    assert resumed["resumed_from_step"] == 3
    a = [_comparable(r) for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    b = [_comparable(r) for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert a == b
    assert resumed["eval_reward_after"] == reference["eval_reward_after"]
    final_a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").state_dict()
    final_b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "final").state_dict()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_resume_refuses_a_different_recipe_and_an_empty_dir(tiny_model_dir, tmp_path):
    train(tiny_recipe(tiny_model_dir, train={"steps": 2, "save_every": 1}), tmp_path, show_progress=False)
    with pytest.raises(UserError, match="different recipe .*optim.lr"):
        train(tiny_recipe(tiny_model_dir, train={"steps": 4, "save_every": 1}, optim={"lr": 0.5}), tmp_path,
              resume=True, show_progress=False)
    with pytest.raises(UserError, match="no checkpoint"):
        train(tiny_recipe(tiny_model_dir), tmp_path / "empty", resume=True, show_progress=False)


@pytest.mark.parametrize("function,message", [
    ("raises_on_long", r"'rewards_for_tests:raises_on_long' raised RuntimeError: too long for me on sample \d+ \(prompt="),
    ("wrong_count", r"returned 1 values for \d+ completions"),
    ("not_a_number", r"returned nan for sample 0"),
])
def test_broken_reward_functions_are_named(tiny_model_dir, tmp_path, function, message):
    recipe = tiny_recipe(tiny_model_dir, rewards=[{"name": f"rewards_for_tests:{function}"}])
    with pytest.raises(RewardFunctionError, match=message):
        train(recipe, tmp_path, show_progress=False)


def test_micro_batches_give_the_full_batch_gradient(tiny_model_dir):
    from rlhf_pg.core.mdp import terminal_rewards
    from rlhf_pg.policy.builtin import BuiltinSampler
    from rlhf_pg.policy.sampler import SamplingParams
    from rlhf_pg.run.accel import new_accelerator
    from rlhf_pg.trainer import compute_advantages, policy_update, update_settings

    gradients = {}
    for micro in (None, 3):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        recipe = tiny_recipe(tiny_model_dir, train={"micro_batch_size": micro}, algorithm={"aggregation": "token-mean"})
        accelerator = new_accelerator("no")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        batch = BuiltinSampler(model, tokenizer).sample(["1+2=", "3+4=", "5+6="], 4, SamplingParams(max_new_tokens=5), generator=torch.Generator().manual_seed(0))
        batch.rewards = terminal_rewards(torch.arange(12.0), batch.completion_mask)
        advantages = compute_advantages(batch, recipe.algorithm.estimator_spec(), accelerator)
        captured = {}
        optimizer.step = lambda: captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
        policy_update(model, optimizer, accelerator, batch, advantages,
                      global_counts=(float(len(batch)), float(batch.completion_mask.sum())), **update_settings(recipe))
        gradients[micro] = captured
    for name, full in gradients[None].items():
        assert torch.allclose(full, gradients[3][name], atol=1e-6), name


def test_prompt_longer_than_the_context_is_a_clear_error(tiny_model_dir, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": "9" * n}) + "\n" for n in (3, 70, 4, 5, 6)))
    recipe = tiny_recipe(tiny_model_dir, data={"task": None, "path": str(data), "num_eval": 1})
    with pytest.raises(UserError, match="exceeds the model's context of 64 tokens"):
        train(recipe, tmp_path / "run", show_progress=False)


def test_bf16_mixed_precision_runs_on_cpu(tiny_model_dir, tmp_path):
    summary = train(tiny_recipe(tiny_model_dir, train={"steps": 2, "mixed_precision": "bf16", "save_every": 0}),
                    tmp_path, show_progress=False)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss/policy" in r]
    assert summary["skipped_updates"] == 0 and len(records) == 2
    assert all(abs(r["loss/policy"]) < 1e3 for r in records)


def test_gradient_checkpointing_gives_the_same_gradient(tiny_model_dir):
    from rlhf_pg.recipe import ModelConfig
    from rlhf_pg.models import load_causal_lm
    from rlhf_pg.policy.builtin import BuiltinSampler
    from rlhf_pg.policy.logprobs import completion_logprobs
    from rlhf_pg.policy.sampler import SamplingParams
    from rlhf_pg.core.losses import policy_gradient_loss

    grads = []
    for checkpointing in (False, True):
        model = load_causal_lm(ModelConfig(name_or_path=tiny_model_dir, gradient_checkpointing=checkpointing))
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        model.eval()
        batch = BuiltinSampler(model, tokenizer).sample(["1+2=", "33+4="], 3, SamplingParams(max_new_tokens=4), generator=torch.Generator().manual_seed(0))
        model.train()
        logprobs = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                       batch.completion_mask)
        policy_gradient_loss(logprobs, torch.linspace(-1, 1, 6)[:, None].expand_as(logprobs), batch.completion_mask).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert model.is_gradient_checkpointing
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_skipping_zero_advantage_completions_leaves_the_gradient_unchanged(tiny_model_dir):
    from rlhf_pg.core.mdp import terminal_rewards
    from rlhf_pg.policy.builtin import BuiltinSampler
    from rlhf_pg.policy.sampler import SamplingParams
    from rlhf_pg.run.accel import new_accelerator
    from rlhf_pg.trainer import compute_advantages, policy_update, update_settings

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = BuiltinSampler(model, tokenizer).sample(["1+2=", "3+4=", "5+6="], 4, SamplingParams(max_new_tokens=5), generator=torch.Generator().manual_seed(0))
    # group 0 all rewarded, group 1 mixed, group 2 all unrewarded: only group 1 has non-zero advantages
    batch.rewards = terminal_rewards(torch.tensor([1.0] * 4 + [1.0, 0.0, 0.0, 1.0] + [0.0] * 4), batch.completion_mask)
    recipe = tiny_recipe(tiny_model_dir, algorithm={"aggregation": "token-mean"})
    accelerator = new_accelerator("no")  # fresh state: an earlier test may have left bf16 autocast on
    advantages = compute_advantages(batch, recipe.algorithm.estimator_spec(), accelerator)
    assert (advantages.abs().sum(-1) > 0).tolist() == [False] * 4 + [True] * 4 + [False] * 4
    counts = (float(len(batch)), float(batch.completion_mask.sum()))
    seen = []
    model.register_forward_hook(lambda module, args, kwargs, output: seen.append(kwargs["input_ids"].shape[0]),
                                with_kwargs=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    skipped = {}
    optimizer.step = lambda: skipped.update({n: p.grad.clone() for n, p in model.named_parameters()})
    policy_update(model, optimizer, accelerator, batch, advantages, global_counts=counts, **update_settings(recipe))
    assert seen == [1, 4]  # only the mixed group went through the model: its prompt once, then its 4 completions
    # the full-batch loss, every row included, has the same gradient
    from rlhf_pg.core.losses import policy_gradient_loss
    from rlhf_pg.policy.logprobs import completion_logprobs

    model.zero_grad()
    logprobs = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    policy_gradient_loss(logprobs, advantages, batch.completion_mask, "token-mean").backward()
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter.grad, skipped[name], atol=1e-7), name


def test_the_builtin_engine_samples_the_trained_policy_so_the_gap_is_float_rounding(tiny_model_dir, tmp_path):
    train(tiny_recipe(tiny_model_dir, train={"steps": 3, "eval_every": 0, "save_every": 0}), tmp_path, show_progress=False)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss/policy" in r]
    assert len(records) == 3
    for record in records:  # is_correction auto = none for the builtin engine: every weight is 1
        assert record["rollout/logprob_abs_diff"] < 1e-5 and record["rollout/logprob_abs_diff_max"] < 1e-4
        assert record["rollout/is_weight_mean"] == 1.0 and record["rollout/is_clipped_frac"] == 0.0


def test_truncated_importance_weights_scale_each_tokens_advantage(tiny_model_dir):
    """A sampler that gave every drawn token half the trainer's probability: rho = 2 everywhere, capped at 1.5.
    The tis update's gradient is exactly the plain update's with every advantage multiplied by 1.5."""
    from dataclasses import replace

    from rlhf_pg.core.mdp import terminal_rewards
    from rlhf_pg.policy.builtin import BuiltinSampler
    from rlhf_pg.policy.sampler import SamplingParams
    from rlhf_pg.run.accel import new_accelerator
    from rlhf_pg.trainer import compute_advantages, policy_update

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = BuiltinSampler(model, tokenizer).sample(["1+2=", "3+4="], 3, SamplingParams(max_new_tokens=4),
                                                    generator=torch.Generator().manual_seed(0))
    batch.rewards = terminal_rewards(torch.arange(6.0), batch.completion_mask)
    recipe = tiny_recipe(tiny_model_dir)
    advantages = compute_advantages(batch, recipe.algorithm.estimator_spec(), new_accelerator("no"))
    other_sampler = replace(batch, logprobs=(batch.logprobs - torch.log(torch.tensor(2.0))) * batch.completion_mask)
    gradients = []
    for update_batch, scale, correction in ((other_sampler, 1.0, "tis"), (batch, 1.5, "none")):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        captured = {}
        optimizer.step = lambda: captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
        results = policy_update(model, optimizer, new_accelerator("no"), update_batch, advantages * scale,
                                global_counts=(6.0, float(batch.completion_mask.sum())), is_correction=correction,
                                is_cap=1.5)
        gradients.append(captured)
    assert results[0].gap.metrics()["rollout/is_weight_mean"] == 1.0  # "none" weighs nothing
    for name, expected in gradients[1].items():
        assert torch.allclose(gradients[0][name], expected, atol=1e-6), name
