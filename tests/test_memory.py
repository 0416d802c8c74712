"""Memory: micro-batches and activation checkpointing give exactly the full-batch gradient for every preset's
loss, the estimate follows its formula and tracks a measured peak, and ``train`` refuses a run that cannot fit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_pg.core.mdp import terminal_rewards
from rlhf_pg.core.presets import PRESETS
from rlhf_pg.errors import UserError
from rlhf_pg.models import enable_gradient_checkpointing
from rlhf_pg.policy.builtin import BuiltinSampler
from rlhf_pg.policy.sampler import SamplingParams
from rlhf_pg.recipe import recipe_from_dict
from rlhf_pg.run.accel import new_accelerator
from rlhf_pg.run.memory import StepShape, memory_estimate, what_fits
from rlhf_pg.run.metrics import read_metrics
from rlhf_pg.trainer import compute_advantages, policy_update, train, update_settings

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(model_dir, **sections):
    recipe = {
        "model": model_dir,
        "data": {"task": "arithmetic", "max_operand": 20, "num_eval": 4},
        "rewards": [{"name": "rewards_for_tests:sevens"}],
        "rollout": {"prompts_per_step": 3, "completions_per_prompt": 4, "max_new_tokens": 5},
        "optim": {"lr": 0.01, "max_grad_norm": None},
        "train": {"steps": 2, "eval_every": 0, "save_every": 0, "tensorboard": False},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value}
    return recipe_from_dict(recipe)


def update_gradients(model_dir, recipe, checkpointing=False) -> list[dict[str, torch.Tensor]]:
    """The gradient of every optimizer step ``policy_update`` takes on one sampled batch (SGD, so later passes of
    ``updates_per_batch`` > 1 see moved weights: ratios != 1, clipping and truncation active)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = BuiltinSampler(model, tokenizer).sample(["1+2=", "3+4=", "5+6="], 4, SamplingParams(max_new_tokens=5),
                                                    generator=torch.Generator().manual_seed(0))
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train().double()  # float64: chunked and whole sums agree to ~1e-15, so the tolerance can be tight
    batch.logprobs, batch.completion_mask = batch.logprobs.double(), batch.completion_mask.double()
    batch.rewards = terminal_rewards(torch.tensor([0.0, 1, 3, 0, 2, 2, 5, 1, 0, 0, 4, 1]), batch.completion_mask)
    batch.ref_logprobs = batch.logprobs + 0.1 * torch.randn(batch.logprobs.shape, generator=torch.Generator().manual_seed(1))
    accelerator = new_accelerator("no")
    greedy = torch.tensor([1.0, 2.0, 0.5]).repeat_interleave(4)
    advantages = compute_advantages(batch, recipe.algorithm.estimator_spec(), accelerator,
                                    greedy if recipe.algorithm.baseline == "remax" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    captured, step = [], optimizer.step

    def capturing_step():
        captured.append({name: p.grad.clone() for name, p in model.named_parameters()})
        step()

    optimizer.step = capturing_step
    policy_update(model, optimizer, accelerator, batch, advantages,
                  global_counts=(float(len(batch)), float(batch.completion_mask.sum())),
                  **update_settings(recipe, recipe.algorithm.kl_coef))
    return captured


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("updates", [1, 2])
def test_micro_batches_give_exactly_the_full_batch_gradient_for_every_preset(tiny_model_dir, preset, updates):
    """Token-mean over the batch, sequence means, Dr. GRPO's constant, GSPO's sequence ratio, CISPO's truncation,
    the KL-in-loss term: chunks of 1, 5 (uneven) and 12 rows accumulate to the unchunked gradient."""
    algorithm = {"preset": preset, "updates_per_batch": updates, "kl_coef": 0.05, "kl_mode": "loss"}
    full = update_gradients(tiny_model_dir, tiny_recipe(tiny_model_dir, algorithm=algorithm))
    assert len(full) == updates
    for micro in (1, 5, 12):
        chunked = update_gradients(tiny_model_dir, tiny_recipe(tiny_model_dir, algorithm=algorithm,
                                                               train={"micro_batch_size": micro}))
        for step, (expected, got) in enumerate(zip(full, chunked, strict=True)):
            for name, gradient in expected.items():
                assert torch.allclose(gradient, got[name], rtol=1e-9, atol=1e-12), (micro, step, name)


@pytest.mark.parametrize("preset", ["grpo", "gspo"])
def test_gradient_checkpointing_gives_the_same_gradient_in_micro_batches(tiny_model_dir, preset):
    algorithm = {"preset": preset, "updates_per_batch": 2}
    plain = update_gradients(tiny_model_dir, tiny_recipe(tiny_model_dir, algorithm=algorithm))
    checkpointed = update_gradients(tiny_model_dir, tiny_recipe(tiny_model_dir, algorithm=algorithm,
                                                                train={"micro_batch_size": 5}), checkpointing=True)
    for expected, got in zip(plain, checkpointed, strict=True):
        for name, gradient in expected.items():
            assert torch.allclose(gradient, got[name], rtol=1e-9, atol=1e-12), name


def test_a_run_with_micro_batches_checkpointing_and_a_chunked_reference_logs_the_same_metrics(tiny_model_dir, tmp_path):
    """Two steps of ``train`` with a KL term (the reference pass): the default, then micro-batches of 5 rows with
    train.gradient_checkpointing (the built-in sampler still samples from the checkpointed model)."""
    logged = []
    for name, train_keys in (("plain", {}), ("lean", {"micro_batch_size": 5, "gradient_checkpointing": True})):
        recipe = tiny_recipe(tiny_model_dir, train=train_keys, algorithm={"kl_coef": 0.1, "kl_mode": "loss"})
        train(recipe, tmp_path / name, show_progress=False)
        logged.append([r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss/policy" in r])
    assert len(logged[0]) == len(logged[1]) == 2
    for plain, lean in zip(*logged):
        for key in ("loss/policy", "grad/norm", "reward/mean", "kl/ref", "completion/length"):
            assert lean[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("lora", [False, True])
def test_train_gradient_checkpointing_holds_for_lora_and_a_resumed_run(tiny_model_dir, tmp_path, lora):
    from rlhf_pg.trainer import setup

    extra = {"peft": {"r": 2}} if lora else {}
    recipe = tiny_recipe(tiny_model_dir, train={"gradient_checkpointing": True, "steps": 1, "save_every": 1}, **extra)
    train(recipe, tmp_path / "run", show_progress=False)
    run, resumed_from = setup(recipe, tmp_path / "run", resume=True)
    try:
        assert resumed_from is not None and run.unwrapped.is_gradient_checkpointing
    finally:
        run.close()


SHAPE = StepShape(parameters=1000, trainable=1000, weight_bytes=4, layers=2, hidden=16, intermediate=64, kv_width=8,
                  vocab=50, sequences=8, prompts=2, micro_batch=8, prompt_tokens=10, new_tokens=6, activation_bytes=4,
                  runtime=100)


def test_memory_estimate_follows_its_formula():
    from dataclasses import replace

    sizes = {name: size for name, (size, _) in memory_estimate(replace(SHAPE, reference=True)).parts.items()}
    assert sizes["weights"] == sizes["reference model"] == 4000 and sizes["runtime"] == 100
    assert sizes["gradients"] == 4000 and sizes["AdamW state"] == 8000
    assert sizes["sampling (KV cache)"] == 2 * 2 * 8 * 16 * 8 * 4 + 2 * 16 * (16 + 16) * 4
    tokens = 8 * 6 + 2 * 10  # completions, and each group's prompt once
    assert sizes["activations (update)"] == tokens * (14 * 16 + 4 * 8 + 4 * 64) * 2 * 4
    assert sizes["logits (update)"] == 2 * 8 * 6 * 50 * 4  # the chunked head's chunk: every logit here
    assert sizes["vocabulary gradients (update)"] == 3 * 50 * 16 * 4
    estimate = memory_estimate(replace(SHAPE, reference=True))
    update = sizes["logits (update)"] + sizes["vocabulary gradients (update)"] + sizes["activations (update)"]
    assert estimate.peak == 100 + 5 * 4000 + max(sizes["sampling (KV cache)"], update)
    assert memory_estimate(replace(SHAPE, trainable=10)).parts["vocabulary gradients (update)"][0] == 0  # LoRA
    halves = memory_estimate(replace(SHAPE, micro_batch=4)).parts["activations (update)"][0]
    assert halves == (4 * 6 + 1 * 10) * (14 * 16 + 4 * 8 + 4 * 64) * 2 * 4
    lean = memory_estimate(replace(SHAPE, checkpointing=True)).parts["activations (update)"][0]
    assert lean == 8 * 16 * (16 * 2 + 14 * 16 + 4 * 8 + 4 * 64) * 4  # no shared prompt: 8 rows of 16 tokens



def test_the_estimate_counts_lean_mlps_and_a_prompt_pass_kept_or_recomputed():
    from dataclasses import replace

    def activations(**changes):
        return memory_estimate(replace(SHAPE, **changes)).parts["activations (update)"][0]

    width, lean_width = 14 * 16 + 4 * 8 + 4 * 64, 14 * 16 + 4 * 8 + 2 * 64
    assert activations(lean_mlp=True) == (8 * 6 + 2 * 10) * lean_width * 2 * 4
    # one prompt pass (2 prompts x 10 tokens) for micro-batches of 2 rows (12 tokens): kept, or recomputed
    assert activations(micro_batch=2, prompt_pass=True) == (2 * 6 + 2 * 10) * width * 2 * 4
    assert activations(micro_batch=2, prompt_pass=True, prompt_recompute=True) == max(2 * 6, 2 * 10) * width * 2 * 4


def test_check_fits_takes_the_recomputed_prompt_pass_when_the_kept_one_would_not_fit():
    from dataclasses import replace

    from rlhf_pg.run.memory import check_fits

    shape = replace(SHAPE, micro_batch=2, prompt_pass=True)
    kept, recomputed = memory_estimate(shape).peak, memory_estimate(replace(shape, prompt_recompute=True)).peak
    assert recomputed < kept
    assert check_fits(shape, kept, "test").peak == kept
    assert check_fits(shape, recomputed, "test").peak == recomputed  # the update will recompute: it fits
    with pytest.raises(UserError, match="would not fit"):
        check_fits(shape, recomputed - 1, "test")


def test_the_prompt_pass_is_kept_where_half_the_free_memory_holds_it(tiny_model_dir, monkeypatch):
    from rlhf_pg.policy import update as update_module
    from rlhf_pg.run import memory
    from rlhf_pg.run.memory import kept_bytes_per_token, model_shape

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    accelerator = new_accelerator(mixed_precision="no")
    per_token = kept_bytes_per_token(model, 4)
    shape = model_shape(model)
    width = 14 * shape["hidden"] + 4 * shape["kv_heads"] * shape["head_dim"] + 4 * shape["intermediate"]
    assert per_token == width * shape["layers"] * 4  # (a GPT-2: no gated MLP)
    for free, expected in ((1000 * per_token, 500), (10 * per_token, 64), (None, 64)):
        monkeypatch.setattr(memory, "available_memory", lambda device, free=free: (free, "a test budget"))
        assert update_module._kept_prompt_tokens(model, accelerator, 64) == expected

def test_what_fits_names_the_cheapest_keys_that_fit():
    big = StepShape(parameters=135_000_000, trainable=135_000_000, weight_bytes=4, layers=30, hidden=576,
                    intermediate=1536, kv_width=192, vocab=49152, sequences=32, prompts=8, micro_batch=32,
                    prompt_tokens=46, new_tokens=64, activation_bytes=4, runtime=500 << 20)
    peak = memory_estimate(big).peak
    fixes = what_fits(big, int(0.6 * peak))
    assert fixes and fixes[0].startswith("train.micro_batch_size: ")
    assert what_fits(big, 1 << 20) == []


def test_a_full_fine_tuning_of_smollm2_1_7b_on_24_gb_is_told_to_use_lora():
    """SmolLM2-1.7B's architecture at vs_trl.py's batch: 16 bytes a parameter (27 GB) cannot fit 22 GiB whatever the
    micro-batch; LoRA with micro-batches does, and a LoRA run is not told to use LoRA again."""
    from dataclasses import replace

    full = StepShape(parameters=1_711_376_384, trainable=1_711_376_384, weight_bytes=4, layers=24, hidden=2048,
                     intermediate=8192, kv_width=2048, vocab=49152, sequences=32, prompts=8, micro_batch=32,
                     prompt_tokens=46, new_tokens=64, activation_bytes=4, runtime=450 << 20)
    fixes = what_fits(full, 22 << 30)
    assert len(fixes) == 1 and "micro_batch_size: 4 and peft" in fixes[0]
    lora = replace(full, trainable=3_145_728, checkpointing=True, micro_batch=4)
    assert memory_estimate(lora).peak < 16 << 30  # the --sizes 1.7B LoRA row's budget
    assert not any("peft" in fix or "checkpointing" in fix for fix in what_fits(replace(lora, micro_batch=32), 8 << 30))


def test_train_refuses_a_run_that_would_not_fit_and_names_the_keys(tiny_model_dir, tmp_path, monkeypatch):
    import rlhf_pg.lm_run as lm_run
    from rlhf_pg.run import memory

    monkeypatch.setattr(lm_run, "rss_bytes", lambda: 0)
    monkeypatch.setattr(memory, "rss_bytes", lambda: 0)
    monkeypatch.setattr(memory, "available_memory", lambda device: (4096, "a test budget"))
    with pytest.raises(UserError, match=r"would not fit in memory: its estimated peak is .* against 4\.0 KiB "
                                        r"\(a test budget.*train\.check_memory: false"):
        train(tiny_recipe(tiny_model_dir), tmp_path / "refused", show_progress=False)
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()  # stopped before the first step
    summary = train(tiny_recipe(tiny_model_dir, train={"check_memory": False, "steps": 1}), tmp_path / "forced",
                    show_progress=False)
    assert summary["completion_tokens"] > 0


def test_the_refusal_names_micro_batches_when_they_are_enough(tiny_model_dir, tmp_path, monkeypatch):
    from dataclasses import replace

    import rlhf_pg.lm_run as lm_run
    from rlhf_pg.run import memory

    shapes, real_check_fits = [], memory.check_fits
    monkeypatch.setattr(lm_run, "rss_bytes", lambda: 0)
    monkeypatch.setattr(memory, "rss_bytes", lambda: 0)
    monkeypatch.setattr(memory, "check_fits", lambda shape, *args, **kwargs: shapes.append(shape))
    train(tiny_recipe(tiny_model_dir, train={"steps": 1}), tmp_path / "probe", show_progress=False)
    full, chunked = memory_estimate(shapes[0]).peak, memory_estimate(replace(shapes[0], micro_batch=1)).peak
    assert chunked < full
    monkeypatch.setattr(memory, "check_fits", real_check_fits)
    monkeypatch.setattr(memory, "available_memory", lambda device: ((chunked + full) // 2, "a test budget"))
    with pytest.raises(UserError, match=r"To make it fit: train\.micro_batch_size: \d"):
        train(tiny_recipe(tiny_model_dir, train={"steps": 1}), tmp_path / "refused", show_progress=False)


MEASURE = r"""
import json, resource, sys, tempfile
import torch
from transformers import LlamaConfig, LlamaForCausalLM
sys.path.insert(0, sys.argv[2])
from rlhf_pg.models.builtin import char_tokenizer
from reward_models import register_reward
register_reward("ones")(lambda prompts, completions, **kwargs: [1.0] * len(completions))  # A = 1: every row trains
from rlhf_pg.recipe import recipe_from_dict
import rlhf_pg.lm_run as lm_run
from rlhf_pg.trainer import setup, train_step
torch.manual_seed(0)
tokenizer = char_tokenizer()
config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
LlamaForCausalLM(config).save_pretrained(sys.argv[1]); tokenizer.save_pretrained(sys.argv[1])
shapes = []
real = lm_run.check_fits
lm_run.check_fits = lambda shape, *a, **k: (shapes.append(shape), real(shape, *a, **k))[1]
recipe = recipe_from_dict({"model": sys.argv[1], "data": {"task": "arithmetic", "max_operand": 99, "num_eval": 4},
    "rewards": [{"name": "ones"}], "rollout": {"prompts_per_step": 8, "completions_per_prompt": 4,
    "max_new_tokens": 48, "min_new_tokens": 48}, "optim": {"lr": 1e-6},
    "train": {"steps": 2, "tensorboard": False, "num_threads": 2}, "algorithm": {"baseline": "none"}})
run, _ = setup(recipe, tempfile.mkdtemp())
for step in range(2):
    train_step(run, step)
from rlhf_pg.run.memory import memory_estimate
print("RESULT " + json.dumps({"estimate": memory_estimate(shapes[0]).peak, "runtime": shapes[0].runtime,
                              "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


@pytest.mark.slow
def test_the_estimate_is_within_25_percent_of_the_measured_peak(tmp_path):
    """A 6-layer Llama (5M parameters, 4k vocabulary), 32 rows of 48 new tokens: the estimated peak of the process,
    and its increase over the process before the model (the part the formula models), against ``ru_maxrss``."""
    output = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "model"), str(ROOT)], capture_output=True,
                            text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, output.stderr[-3000:]
    measured = json.loads(lines[-1][len("RESULT "):])
    assert measured["estimate"] == pytest.approx(measured["peak"], rel=0.25)
    assert measured["estimate"] - measured["runtime"] == pytest.approx(measured["peak"] - measured["runtime"], rel=0.25)


@pytest.mark.parametrize("flags,expected", [({"avx2", "avx512_bf16"}, "bf16"), ({"avx2", "amx_bf16"}, "bf16"),
                                            ({"avx2", "avx512f"}, "no")])
def test_mixed_precision_auto_is_bf16_only_on_a_cpu_with_bf16_units(tiny_model_dir, tmp_path, monkeypatch, flags,
                                                                     expected):
    from rlhf_pg.run import accel

    monkeypatch.setattr(accel, "cpu_flags", lambda: flags)
    assert accel.resolve_mixed_precision("auto") == expected
    assert accel.resolve_mixed_precision("no") == "no" and accel.resolve_mixed_precision("bf16") == "bf16"
    recipe = tiny_recipe(tiny_model_dir, train={"mixed_precision": "auto", "steps": 1})
    assert recipe.train.mixed_precision == "auto"  # the recipe keeps what was asked; the run records what ran
    summary = train(recipe, tmp_path / "run", show_progress=False)
    assert summary["mixed_precision"] == expected
    shape_bytes = {"bf16": 2, "no": 4}[expected]  # the memory estimate counts the activations the run will keep
    from rlhf_pg.run.memory import step_shape
    from rlhf_pg.models import load_policy

    policy = load_policy(recipe.model)[0]
    assert step_shape(recipe, policy, 8).activation_bytes == shape_bytes


FAULTS_SCRIPT = """
import resource, sys, torch
from rlhf_pg.run.memory import keep_freed_memory
print("set", keep_freed_memory() if sys.argv[1] == "keep" else None)
def cycle():  # a micro-batch's activations: many blocks of a few MB, allocated, written, then all freed
    blocks = [torch.ones(1 << 19) for _ in range(128)]  # 128 x 2 MiB
    del blocks
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_reuses_freed_activations_instead_of_faulting_them_back(tmp_path):
    """run.memory.keep_freed_memory (set at a CPU run's setup): 256 MiB of activation-sized blocks freed and
    allocated again come back from the heap without page faults; glibc's default hands the heap's top back to the
    OS and faults much of it in again each time. A user's own MALLOC_* setting wins."""
    script = tmp_path / "faults.py"
    script.write_text(FAULTS_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    def faults(mode: str, **extra) -> tuple[str, int]:
        out = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, check=True,
                             env={**env, **extra}, cwd=ROOT).stdout.split()
        return out[1], int(out[3])

    was_set, kept = faults("keep")
    default = faults("default")[1]
    assert was_set == "True" and kept < 5_000  # (measured: ~500)
    assert default > 50_000  # 200 MiB and more faulted in again (measured: ~131,000 of 5 x 65,536 pages)
    assert faults("keep", MALLOC_TRIM_THRESHOLD_="131072")[0] == "False"
