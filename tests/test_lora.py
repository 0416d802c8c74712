"""LoRA through peft: the reference is the policy with its adapter off; only adapter weights train."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_pg.recipe import recipe_from_dict
from rlhf_pg.core.losses import kl_estimate
from rlhf_pg.run.metrics import read_metrics
from rlhf_pg.policy.logprobs import completion_logprobs
from rlhf_pg.trainer import reference_logprobs, setup, train, train_step


def lora_recipe(model_dir, **train_options):
    return recipe_from_dict({
        "model": model_dir,
        "data": {"task": "arithmetic", "max_operand": 20, "num_eval": 8},
        "rewards": [{"name": "rewards_for_tests:sevens"}],
        "rollout": {"prompts_per_step": 4, "completions_per_prompt": 4, "max_new_tokens": 4},
        "algorithm": {"kl_coef": 0.05, "kl_estimator": "k1"},
        "optim": {"lr": 0.01},
        "peft": {"r": 4, "alpha": 8, "target_modules": ["c_attn", "c_fc"], "merge": True},
        "train": {"steps": 4, "eval_every": 0, "save_every": 2, "tensorboard": False, **train_options},
    })


def test_kl_to_reference_is_exactly_zero_before_the_first_update(tiny_model_dir, tmp_path):
    run, _ = setup(lora_recipe(tiny_model_dir), tmp_path)
    assert run.reference == "adapter"  # no second copy of the model
    from rlhf_pg.policy.builtin import BuiltinSampler
    from rlhf_pg.policy.sampler import SamplingParams

    batch = BuiltinSampler(run.unwrapped, run.tokenizer).sample(["1+2=", "3+4="], 4, SamplingParams(max_new_tokens=4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        policy = completion_logprobs(run.unwrapped, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                     batch.completion_mask)
    reference = reference_logprobs(run, batch)
    for estimator in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(policy, reference, estimator) * batch.completion_mask,
                           torch.zeros_like(policy))
    metrics = train_step(run, 0)
    assert abs(metrics["kl/ref"]) < 1e-5  # sampled log-probs (KV cache) vs a fresh forward: float noise only
    metrics = train_step(run, 1)
    assert metrics["kl/ref"] != 0.0  # after an update the adapter moved the policy


def test_only_adapter_parameters_change_and_final_holds_adapter_and_merged_model(tiny_model_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    summary = train(lora_recipe(tiny_model_dir), tmp_path, show_progress=False)
    final = tmp_path / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    assert not (final / "model.safetensors").exists()
    from safetensors.torch import load_file

    adapter = load_file(final / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert any(float(t.abs().max()) > 0 for name, t in adapter.items() if "lora_B" in name)  # B starts at 0
    merged = AutoModelForCausalLM.from_pretrained(summary["merged_model_dir"]).state_dict()
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed and all(any(m in name for m in ("c_attn", "c_fc")) for name in changed)
    # plain transformers loads the adapter directory too (peft integration), same outputs as merged
    adapted = AutoModelForCausalLM.from_pretrained(final)
    merged_model = AutoModelForCausalLM.from_pretrained(summary["merged_model_dir"])
    ids = torch.tensor([[1, 5, 76, 6, 84]])
    assert torch.allclose(adapted(ids).logits, merged_model(ids).logits, atol=1e-5)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "kl/ref" in r]
    assert len(records) == 4  # kl/ref logged every step


def test_lora_run_resumes_from_an_adapter_checkpoint(tiny_model_dir, tmp_path):
    train(lora_recipe(tiny_model_dir), tmp_path / "a", show_progress=False)
    assert (tmp_path / "a" / "checkpoint-2" / "adapter_model.safetensors").exists()
    shutil.rmtree(tmp_path / "a" / "checkpoint-4")  # the final step's checkpoint: resume from the one before
    # resuming a finished run from its step-2 checkpoint must redo steps 3-4 exactly
    resumed = train(lora_recipe(tiny_model_dir), tmp_path / "a", resume=True, show_progress=False)
    (tmp_path / "b").mkdir()
    assert resumed["resumed_from_step"] == 2
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["resumed_from_step"] == 2
    fresh = train(lora_recipe(tiny_model_dir), tmp_path / "b", overwrite=True, show_progress=False)
    strip = lambda path: [{k: v for k, v in r.items() if not k.startswith("perf/") and not k.endswith("/latency_s")} for r in read_metrics(path)]
    assert strip(tmp_path / "a" / "metrics.jsonl") == strip(tmp_path / "b" / "metrics.jsonl")
    assert fresh["eval_reward_after"] == resumed["eval_reward_after"]


@pytest.mark.parametrize("lora", [True, False])
def test_reference_log_probs_in_micro_batches_share_one_prompt_pass(tiny_model_dir, tmp_path, lora, monkeypatch):
    """trainer.reference_logprobs in chunks of 3 rows (uneven; groups of 4 split across chunks), its prompts run once
    (policy.logprobs.PromptPass), equals the frozen policy's log-probs from one plain full-batch forward."""
    import rlhf_pg.trainer as trainer

    monkeypatch.setattr(trainer, "reference_chunk_rows", lambda recipe, model, rows: 3)
    recipe = lora_recipe(tiny_model_dir, micro_batch_size=3)
    if not lora:
        recipe = recipe_from_dict({**recipe.to_dict(), "peft": None})
    run, _ = setup(recipe, tmp_path)
    assert (run.reference == "adapter") == lora and run.reference is not None
    from rlhf_pg.policy.builtin import BuiltinSampler
    from rlhf_pg.policy.logprobs import PromptPass
    from rlhf_pg.policy.sampler import SamplingParams

    sampler = BuiltinSampler(run.unwrapped, run.tokenizer)
    batch = sampler.sample(["1+2=", "3+4=", "15+6="], 4, SamplingParams(max_new_tokens=4),
                           generator=torch.Generator().manual_seed(1))
    model = run.unwrapped if lora else run.reference
    assert PromptPass.usable(model, 4)
    with torch.no_grad():
        plain = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                    batch.completion_mask, share_prompts=False)
    torch.testing.assert_close(reference_logprobs(run, batch), plain, rtol=1e-5, atol=1e-5)


def test_the_reference_pass_takes_a_micro_batch_per_layer_of_rows_at_once(tiny_model_dir):
    """A forward without autograd holds one layer's intermediates, an update's micro-batch all L layers': the
    reference pass runs micro_batch_size x L rows at once (x 2 under checkpointing), at most the batch."""
    from types import SimpleNamespace

    from rlhf_pg.trainer import reference_chunk_rows

    model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=30))
    assert reference_chunk_rows(lora_recipe(tiny_model_dir, micro_batch_size=4), model, 32) == 32
    assert reference_chunk_rows(lora_recipe(tiny_model_dir, micro_batch_size=4), model, 512) == 120
    assert reference_chunk_rows(lora_recipe(tiny_model_dir, micro_batch_size=4, gradient_checkpointing=True),
                                model, 512) == 8
    assert reference_chunk_rows(lora_recipe(tiny_model_dir), model, 512) == 512
