"""FSDP2 that really shards, on 2 CPU processes (gloo): rlhf-pg applies torch's ``fully_shard`` itself (run/fsdp.py).

Proved here: every parameter is a DTensor shard; one update's gradient equals the single-process gradient on the
same global batch; each process holds about half the bytes of parameters + AdamW states; a run through
``recipes/accelerate/fsdp_cpu_2proc.yaml`` (or ``train.fsdp: true``) resumes exactly from its sharded (DCP) checkpoint
and writes a final/ that ``from_pretrained`` loads in one process; the two-node launch, rehearsed on 127.0.0.1.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rlhf_pg.errors import UserError
from rlhf_pg.run import fsdp
from rlhf_pg.run.accel import new_accelerator
from rlhf_pg.run.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_worker  # noqa: E402


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1"}


def accelerate(args, cwd, timeout=300):
    command = [sys.executable, "-m", "accelerate.commands.launch", *args]
    return subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=cwd, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_parameters_are_dtensors_the_gradient_is_the_single_process_one_and_bytes_halve(tiny_model_dir,
                                                                                                 tmp_path):
    out = tmp_path / "grads.json"
    result = accelerate(["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                         "--dynamo_backend", "no", str(ROOT / "tests" / "fsdp_shard_worker.py"), tiny_model_dir, str(out)],
                        tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads(out.read_text())
    assert sharded["world_size"] == 2
    accelerator = new_accelerator("no")
    every_row = list(range(len(distributed_worker.PROMPTS) * distributed_worker.COMPLETIONS_PER_PROMPT))
    for (algorithm, micro), two_process, size in zip(distributed_worker.CONFIGS, sharded["results"], sharded["sizes"]):
        assert size["dtensor_parameters"] == size["parameters"] > 0, size
        assert 0.45 <= size["local_bytes"] / size["whole_bytes"] <= 0.55, size  # params + exp_avg + exp_avg_sq
        single = distributed_worker.gradients(tiny_model_dir, algorithm, micro, accelerator, every_row)
        assert set(single) == set(two_process)
        for name, grad in single.items():
            other = torch.tensor(two_process[name]).view_as(grad)
            assert torch.allclose(grad, other, atol=1e-6, rtol=1e-4), (algorithm, micro, name)
        assert any(float(g.abs().max()) > 1e-4 for g in single.values())


def _recipe(tmp_path: Path, model_dir: str, **train) -> Path:
    recipe = {"model": model_dir, "data": {"task": "arithmetic", "max_operand": 9, "num_eval": 6},
              "rewards": [{"name": "rewards_for_tests:sevens"}],
              "rollout": {"prompts_per_step": 4, "completions_per_prompt": 2, "max_new_tokens": 3},
              "algorithm": {"baseline": "leave_one_out", "kl_coef": 0.05},  # a sharded reference model too
              "optim": {"lr": 0.01, "schedule": "constant"},
              "train": {"steps": 4, "eval_every": 2, "save_every": 2, "tensorboard": False, "num_threads": 1, **train}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _comparable(run_dir: Path, first_step: int) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and not k.endswith("/latency_s")}
            for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] >= first_step]


def test_fsdp_run_from_the_launch_config_or_the_recipe_key_resumes_exactly_and_final_loads(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = _recipe(tmp_path, tiny_model_dir)
    fsdp_config = ["--config_file", str(ROOT / "recipes" / "accelerate" / "fsdp_cpu_2proc.yaml")]
    key_config = ["--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml")]
    train = ["-m", "rlhf_pg", "--no-progress", "train", str(recipe)]
    whole = accelerate([*fsdp_config, *train, "--output-dir", str(tmp_path / "a")], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    # the run's summary JSON is printed once (by the main process), not once per process
    assert whole.stdout.count('"world_size": 2') == 1, whole.stdout[-3000:]
    first = accelerate([*key_config, *train, "--output-dir", str(tmp_path / "b"), "--max-steps", "2",
                        "train.fsdp=true"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (tmp_path / "b" / "checkpoint-2" / "sharded" / ".metadata").exists()
    assert not (tmp_path / "b" / "checkpoint-2" / "optimizer.pt").exists()
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    resumed = accelerate([*key_config, *train, "--output-dir", str(tmp_path / "b"), "--resume", "train.fsdp=true"],
                         tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["fsdp"] is True and summary["world_size"] == 2 and summary["resumed_from_step"] == 2
    assert _comparable(tmp_path / "a", 3) == _comparable(tmp_path / "b", 3)
    assert any("kl/ref" in r for r in _comparable(tmp_path / "a", 3))
    assert json.loads((tmp_path / "a" / "final" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    final_a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").state_dict()
    final_b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "final").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert final_a.keys() == initial.keys() and all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert any(not torch.equal(final_a[k], initial[k]) for k in final_a)
    # another number of processes: DCP reshards (here onto one unsharded process); said, and the run finishes
    single = subprocess.run([sys.executable, *train, "--output-dir", str(tmp_path / "c"), "--resume"],
                            capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "was written by 2 processes, this run has 1" in single.stdout + single.stderr
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["resumed_from_step"] == 2


@pytest.mark.parametrize("sharded", [False, True], ids=["ddp", "fsdp"])
def test_two_node_launch_rehearsed_as_two_machines_of_one_process_each(tiny_model_dir, tmp_path, sharded):
    """`accelerate launch --num_machines 2 --machine_rank {0,1} --main_process_ip ...`, each "machine" one process."""
    recipe = _recipe(tmp_path, tiny_model_dir, steps=2, eval_every=0, save_every=0)
    port, launches = _free_port(), []
    for rank in (0, 1):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
                   "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                   "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", "rlhf_pg", "--no-progress", "train", str(recipe), "--output-dir", str(tmp_path / f"node{rank}"),
                   *(["train.fsdp=true"] if sharded else [])]
        launches.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                         env=_env(), cwd=tmp_path))
    errors = [launch.communicate(timeout=300)[1] for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    summary = json.loads((tmp_path / "node0" / "summary.json").read_text())  # the main process is machine 0's
    assert summary["world_size"] == 2 and summary["fsdp"] is sharded and summary["steps"] == 2
    assert not (tmp_path / "node1" / "summary.json").exists()


def test_a_model_without_repeated_decoder_blocks_is_refused_saying_what_to_do():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(UserError, match="FSDP cannot wrap the policy .*Sequential.*cpu_2proc.yaml"):
        fsdp.shard(model, "cpu", name="the policy")


@pytest.mark.parametrize("extra,env,message", [
    (["train.fsdp=true", "peft.r=4"], {}, "train.fsdp with a peft: section (LoRA)"),
    (["train.fsdp=true", "model.gradient_checkpointing=true"], {}, "train.fsdp with model.gradient_checkpointing"),
    (["train.fsdp=true", "train.gradient_checkpointing=true"], {}, "train.fsdp with train.gradient_checkpointing"),
    (["train.fsdp=true", "train.mixed_precision=fp16"], {}, "train.fsdp with train.mixed_precision: fp16"),
    ([], {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp_version: 1 (rlhf-pg runs FSDP2)"),
    ([], {"ACCELERATE_USE_FSDP": "true", "FSDP_OFFLOAD_PARAMS": "true"}, "fsdp_offload_params: true"),
], ids=["lora", "checkpointing", "train-checkpointing", "fp16", "fsdp1", "offload"])
def test_fsdp_with_an_option_it_cannot_run_with_exits_2_naming_the_option(tmp_path, extra, env, message):
    result = subprocess.run([sys.executable, "-m", "rlhf_pg", "--no-progress", "train",
                             str(ROOT / "recipes" / "quickstart.yaml"), "--output-dir", str(tmp_path / "run"), *extra],
                            capture_output=True, text=True, env={**_env(), **env}, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_written_without_fsdp_is_refused_by_a_sharded_resume(tiny_model_dir, tmp_path):
    recipe = _recipe(tmp_path, tiny_model_dir, steps=2, eval_every=0, save_every=0)
    launch = ["--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"), "-m", "rlhf_pg", "--no-progress",
              "train", str(recipe), "--output-dir", str(tmp_path / "run")]
    assert accelerate(launch, tmp_path).returncode == 0
    resumed = accelerate([*launch, "--resume", "--max-steps", "3", "train.fsdp=true"], tmp_path)
    assert resumed.returncode != 0
    assert "checkpoint-2 was written by a run without FSDP (a full model and optimizer.pt)" in resumed.stderr
    message = next(line for line in resumed.stderr.splitlines() if line.startswith("error: checkpoint"))
    assert "resume with the recipe that wrote it" in message  # (the launcher adds its own traceback after it)


def test_a_sharded_run_logs_the_data_parallel_runs_numbers(tiny_model_dir, tmp_path):
    """Sampling from gathered weights, the sharded reference's KL, the loss, the clipped global gradient norm and the
    held-out evaluation of step 1 are those of a data-parallel run of the same recipe (float tolerance)."""
    recipe = _recipe(tmp_path, tiny_model_dir, steps=1, eval_every=0, save_every=0)
    runs = {}
    for name, extra in (("ddp", []), ("fsdp", ["train.fsdp=true"])):
        result = accelerate(["--config_file", str(ROOT / "recipes" / "accelerate" / "cpu_2proc.yaml"), "-m", "rlhf_pg",
                             "--no-progress", "train", str(recipe), "--output-dir", str(tmp_path / name), *extra],
                            tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = {}
        for record in read_metrics(tmp_path / name / "metrics.jsonl"):  # a step's training and held-out records
            runs[name].setdefault(record["step"], {}).update(record)
    ddp, sharded = runs["ddp"][1], runs["fsdp"][1]
    assert sharded["reward/mean"] == ddp["reward/mean"] and sharded["completion/length"] == ddp["completion/length"]
    for key in ("loss/policy", "grad/norm", "kl/ref", "policy/entropy", "eval/reward"):
        assert sharded[key] == pytest.approx(ddp[key], rel=1e-4, abs=1e-6), key
    assert runs["fsdp"][0]["eval/reward"] == runs["ddp"][0]["eval/reward"]


def test_an_fsdp_launch_of_a_command_that_does_not_shard_itself_is_refused_on_cpu(monkeypatch):
    """The reward-model trainer hands its model to accelerate, which on CPU would run plain data parallel."""
    from rlhf_pg.run.accel import refuse_cpu_sharding

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    refuse_cpu_sharding(shards_itself=True)  # train, sft: rlhf-pg's own fully_shard
    with pytest.raises(UserError, match="FSDP on CPU is rlhf-pg's own, for `train` and `sft`.*cpu_2proc.yaml"):
        refuse_cpu_sharding()
