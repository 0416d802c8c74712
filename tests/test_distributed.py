"""Two CPU processes (gloo) under `accelerate launch`: one update's gradient equals the single-process
gradient on the same global batch, and a short 2-process training run finishes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from rlhf_pg.run.accel import new_accelerator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_worker  # noqa: E402


def launch(args, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    # --multi_gpu selects the torchrun launcher; on a machine without GPUs each process runs on the CPU (gloo)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def test_two_process_gradient_equals_single_process_gradient(tiny_model_dir, tmp_path):
    out = tmp_path / "grads.json"
    result = launch([str(ROOT / "tests" / "distributed_worker.py"), tiny_model_dir, str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = json.loads(out.read_text())
    assert distributed["world_size"] == 2
    accelerator = new_accelerator("no")  # fresh state: earlier tests in this process may have used bf16
    every_row = list(range(len(distributed_worker.PROMPTS) * distributed_worker.COMPLETIONS_PER_PROMPT))
    for (algorithm, micro), two_process in zip(distributed_worker.CONFIGS, distributed["results"]):
        single = distributed_worker.gradients(tiny_model_dir, algorithm, None, accelerator, every_row)
        assert set(single) == set(two_process)
        for name, grad in single.items():
            other = torch.tensor(two_process[name]).view_as(grad)
            assert torch.allclose(grad, other, atol=1e-6, rtol=1e-4), (algorithm, micro, name)
        assert any(float(g.abs().max()) > 1e-4 for g in single.values())


def test_two_process_training_run_finishes(tiny_model_dir, tmp_path):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"model: {tiny_model_dir}\n"
        "data: {task: arithmetic, max_operand: 9, num_eval: 6}\n"
        "rewards: [{name: 'rewards_for_tests:sevens'}]\n"
        "rollout: {prompts_per_step: 4, completions_per_prompt: 2, max_new_tokens: 3}\n"
        "algorithm: {baseline: batch_mean, whiten: true}\n"
        "train: {steps: 3, eval_every: 2, save_every: 2, tensorboard: false}\n"
    )
    result = launch(["-m", "rlhf_pg", "--no-progress", "train", str(recipe), "--output-dir", str(tmp_path / "run")],
                    tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "reward/mean" in r] == [1, 2, 3]  # one record per step: main process only
    assert (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").exists()


def test_fsdp2_through_accelerate_on_cpu_falls_back_to_ddp_and_this_test_says_when_it_shards(tiny_model_dir, tmp_path):
    """accelerate 1.x switches to FSDP only for GPU-like devices (accelerate/state.py: the FSDP branch covers
    MULTI_GPU/NPU/XPU/..., never MULTI_CPU): on 2 CPU processes an FSDP2 plugin runs plain data parallel, with
    the right gradient but no sharding. README ("What has run where") says so. When accelerate starts to
    shard on CPU, this test fails: then replace it by a gradient test of the sharded model."""
    out = tmp_path / "fsdp.json"
    result = launch([str(ROOT / "tests" / "fsdp_worker.py"), tiny_model_dir, str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["num_processes"] == 2
    # data parallel: each process's gradient of its half, averaged, equals the full-batch gradient
    assert found["max_grad_diff"] < 1e-5, found
    assert found["distributed_type"] == "DistributedType.MULTI_CPU" and found["sharded_parameters"] == 0, (
        f"accelerate now shards on CPU ({found}): test FSDP2 for real (sharded gradient == single process)")
