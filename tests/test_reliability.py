"""Reliability: every bad input gets exit code 2 and one clear message; a stopped run keeps its work and
resumes exactly; non-finite updates are skipped, counted and stop the run after N in a row.

Most cases go through the real command line in-process (``rlhf_pg.cli.main`` returns the exit code);
an exception other than a ``UserError`` would escape ``main`` and fail the test, so "exit 2" here
also means "no traceback". The signal test runs ``python -m rlhf_pg`` as a subprocess.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

import rewards_for_tests
from conftest import build_tiny_model
from rlhf_pg.run import checkpoint as ckpt
from rlhf_pg import cli
from rlhf_pg.models.builtin import char_tokenizer
from rlhf_pg.recipe import recipe_from_dict
from rlhf_pg.errors import EXIT_RESUMABLE, TrainingInterrupted, UserError
from rlhf_pg.run.metrics import read_metrics
from rlhf_pg.run.rundir import RunDir
from rlhf_pg.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def recipe_dict(model_dir, **sections) -> dict:
    recipe = {
        "model": str(model_dir),
        "data": {"task": "arithmetic", "max_operand": 20, "num_eval": 8},
        "rewards": [{"name": "rewards_for_tests:sevens"}],
        "rollout": {"prompts_per_step": 4, "completions_per_prompt": 2, "max_new_tokens": 3},
        "optim": {"lr": 0.01},
        "train": {"steps": 3, "eval_every": 0, "save_every": 0, "tensorboard": False},
        "eval": {"temperature": 1.0},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def write_recipe(path: Path, model_dir, **sections) -> Path:
    path.write_text(yaml.safe_dump(recipe_dict(model_dir, **sections)))
    return path


def run_main(capsys, *args) -> tuple[int, str]:
    """``rlhf-pg ARGS`` in this process: (exit code, the last line of stderr)."""
    code = cli.main(["--no-progress", *map(str, args)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return code, lines[-1] if lines else ""


def assert_user_error(capsys, args, *fragments):
    code, message = run_main(capsys, *args)
    assert code == 2, message
    assert message.startswith("error: "), message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: one torch thread is 10x faster than two fighting for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _reset_reward_calls():
    rewards_for_tests.calls["count"] = 0
    yield
    rewards_for_tests.calls["count"] = 0


# --- bad input: exit 2, one message -----------------------------------------------------------------


def test_missing_model_and_dataset_paths(tiny_model_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir)
    assert_user_error(capsys, ["train", recipe, "--output-dir", tmp_path / "a", "model.name_or_path=/no/such/model"],
                      "model: '/no/such/model' does not exist")
    assert_user_error(capsys, ["train", recipe, "--output-dir", tmp_path / "b", "model.name_or_path=no_such_local_model"],
                      "cannot load the tokenizer of 'no_such_local_model'", "not a local directory")
    assert_user_error(capsys, ["train", recipe, "--output-dir", tmp_path / "c", "data.task=null", "data.path=prompts.jsonl"],
                      "data.path 'prompts.jsonl' does not exist")
    assert_user_error(capsys, ["eval", recipe, "--model", tmp_path / "nowhere"], "does not exist")


@pytest.mark.parametrize("args,fragments", [
    (["--max-steps", "0"], ["--max-steps: expected a positive integer, got 0"]),
    (["--max-steps", "ten"], ["--max-steps: expected a positive integer, got 'ten'"]),
    (["--seed", "1.5"], ["--seed: expected an integer, got '1.5'"]),
    (["--seed", "-1"], ["seed: -1 is out of range; it must be >= 0"]),
    (["train.stepz=3"], ["unknown recipe key 'train.stepz'; did you mean 'train.steps'?"]),
    (["rewards.0.weigth=2"], ["'weigth' is not a key of reward", "did you mean 'weight'?"]),
    (["data.max_operand=2", "data.num_eval=50"], ["data.num_eval=50 leaves no training problems"]),
])
def test_invalid_cli_values_and_overrides(tiny_model_dir, tmp_path, capsys, args, fragments):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir)
    assert_user_error(capsys, ["train", recipe, "--output-dir", tmp_path / "out", *args], *fragments)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_datasets_without_prompts_or_with_non_text_prompts(tiny_model_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data={"task": None, "num_eval": 2})
    run = ["train", recipe, "--output-dir", tmp_path / "out", "--overwrite"]
    no_column = _jsonl(tmp_path / "q.jsonl", [{"question": f"{i}+1="} for i in range(10)])
    assert_user_error(capsys, [*run, f"data.path={no_column}"],
                      "has no column 'prompt' (columns: question)", "set data.prompt_column")
    numbers = _jsonl(tmp_path / "n.jsonl", [{"prompt": f"{i}+1="} for i in range(5)] + [{"prompt": 7}])
    assert_user_error(capsys, [*run, f"data.path={numbers}"], "row 5", "has prompt=7; every prompt must be text")
    (tmp_path / "empty.jsonl").write_text("")
    assert_user_error(capsys, [*run, f"data.path={tmp_path / 'empty.jsonl'}"], "is an empty file")
    # a directory with train/test splits whose test split lacks the column
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    _jsonl(split_dir / "train.jsonl", [{"question": f"{i}+1=", "prompt": ""} for i in range(10)])
    _jsonl(split_dir / "test.jsonl", [{"prompt": "1+1=", "question": None}])
    assert_user_error(capsys, [*run, f"data.path={split_dir}", "data.prompt_column=question", "data.eval_split=test"],
                      "row 0 of split 'test'", "has question=None")
    # eval_split on a single file would evaluate on the training rows themselves
    good = _jsonl(tmp_path / "good.jsonl", [{"prompt": f"{i}+1="} for i in range(10)])
    assert_user_error(capsys, [*run, f"data.path={good}", "data.eval_split=test"], "is a single file")


def test_prompts_longer_than_the_context_are_refused_before_the_first_step(tiny_model_dir, tmp_path, capsys):
    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1" * n} for n in (3, 4, 5, 61, 6, 7, 8, 9)])
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data={"task": None, "path": str(data), "num_eval": 2})
    message = assert_user_error(capsys, ["train", recipe, "--output-dir", tmp_path / "out"],
                                "is 62 tokens; with rollout.max_new_tokens=3 it exceeds the model's context of 64 tokens",
                                "lower rollout.max_new_tokens")
    assert "(1 of 6 prompts do)" in message  # 6 training prompts; the check runs before any step
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    long_only = _jsonl(tmp_path / "long.jsonl", [{"prompt": "2" * 61} for _ in range(4)])
    assert_user_error(capsys, ["eval", recipe, f"data.path={long_only}", "eval.max_new_tokens=3"],
                      "with eval.max_new_tokens=3 it exceeds", "(2 of 2 prompts do)")


@pytest.mark.parametrize("function,fragments", [
    ("raises_on_long", ["reward function 'rewards_for_tests:raises_on_long' raised RuntimeError: too long for me on "
                        "sample", "(prompt="]),
    ("wrong_count", ["'rewards_for_tests:wrong_count' returned 1 values for 8 completions"]),
    ("not_a_number", ["'rewards_for_tests:not_a_number' returned nan for sample 0 (prompt="]),
    ("infinite", ["returned inf for sample 0", "rewards must be finite numbers"]),
    ("not_a_list", ["must return a list of numbers, got NoneType"]),
])
def test_broken_reward_functions_exit_2_naming_the_function_and_sample(tiny_model_dir, tmp_path, capsys, function,
                                                                        fragments):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, rewards=[{"name": f"rewards_for_tests:{function}"}])
    assert_user_error(capsys, ["train", recipe, "--output-dir", tmp_path / "out"], *fragments)


def test_output_dir_that_is_a_file_or_holds_another_run(tiny_model_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir)
    (tmp_path / "file").write_text("x")
    assert_user_error(capsys, ["train", recipe, "--output-dir", tmp_path / "file"], "is a file")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint-2").mkdir(parents=True)
    assert_user_error(capsys, ["train", recipe, "--output-dir", run_dir], "already holds a run", "--resume", "--overwrite")
    assert_user_error(capsys, ["train", recipe, "--output-dir", tmp_path / "fresh", "--resume"],
                      "no checkpoint-<step> directory to resume from; drop --resume")


def test_output_dir_rules_for_failed_starts_crashed_runs_and_overwrite(tmp_path):
    recipe = recipe_from_dict(recipe_dict("builtin:arith-gpt"))
    failed_start = tmp_path / "failed-start"  # setup or the first evaluation failed: no progress to protect
    failed_start.mkdir()
    (failed_start / "recipe.yaml").write_text("{}")
    assert RunDir(failed_start).prepare(recipe.to_dict(), resume=False, overwrite=False) is None
    crashed = tmp_path / "crashed"  # steps ran, no checkpoint yet: --resume cannot help, --overwrite can
    crashed.mkdir()
    (crashed / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match="no checkpoint-<step> .* stopped before its first checkpoint: use --overwrite"):
        RunDir(crashed).prepare(recipe.to_dict(), resume=True, overwrite=False)
    old = tmp_path / "old"
    old.mkdir()
    for name in ("checkpoint-4", "final", "tensorboard", ".checkpoint-6.tmp"):
        (old / name).mkdir()
    for name in ("metrics.jsonl", "summary.json", "recipe.yaml"):
        (old / name).write_text("{}")
    (old / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds a run"):
        RunDir(old).prepare(recipe.to_dict(), resume=False, overwrite=False)
    assert RunDir(old).prepare(recipe.to_dict(), resume=False, overwrite=True) is None
    assert sorted(p.name for p in old.iterdir()) == ["notes.txt"]  # every trace of the old run, not the user's file


def test_tokenizer_without_pad_token_is_fixed_up_and_trains(tmp_path, capsys):
    model_dir = build_tiny_model(tmp_path / "nopad")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model_dir)
    config = GPT2Config.from_pretrained(model_dir)
    config.pad_token_id = None
    config.save_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).pad_token is None
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, train={"steps": 2})
    code, _ = run_main(capsys, "train", recipe, "--output-dir", tmp_path / "run")
    assert code == 0
    final = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    assert final.pad_token == final.eos_token  # the fix-up: EOS pads (padded positions are masked)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss/policy" in r] == [1, 2]
    # without an EOS token completions could never end: refused
    tokenizer.eos_token = None
    tokenizer.save_pretrained(model_dir)
    assert_user_error(capsys, ["train", recipe, "--output-dir", tmp_path / "run2"], "has no EOS token")


# --- corrupt or incompatible checkpoints on --resume ------------------------------------------------


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """A 3-step run with checkpoint-1 and checkpoint-2, plus a recipe file and a second, wider model."""
    root = tmp_path_factory.mktemp("checkpointed")
    model_dir = build_tiny_model(root / "model")
    wider = build_tiny_model(root / "wider", n_embd=48)
    recipe = write_recipe(root / "r.yaml", model_dir, train={"steps": 3, "save_every": 1, "keep_checkpoints": 5})
    train(recipe_from_dict(yaml.safe_load(recipe.read_text())), root / "run", show_progress=False)
    assert sorted(p.name for p in (root / "run").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    shutil.rmtree(root / "run" / "checkpoint-3")  # the final step's checkpoint: the tests resume from step 2
    return root, recipe, wider


def _truncate(name, size=100):
    def corrupt(checkpoint: Path, wider: Path):
        path = checkpoint / name
        path.write_bytes(path.read_bytes()[:size])
    return corrupt


def _write(name, text):
    return lambda checkpoint, wider: (checkpoint / name).write_text(text)


def _remove(name):
    return lambda checkpoint, wider: (checkpoint / name).unlink()


def _optimizer_of_wider_model(checkpoint: Path, wider: Path):
    model = AutoModelForCausalLM.from_pretrained(wider)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), checkpoint / "optimizer.pt")


def _weights_of_wider_model(checkpoint: Path, wider: Path):
    for name in ("model.safetensors", "config.json"):
        shutil.copy(wider / name, checkpoint / name)


@pytest.mark.parametrize("corrupt,fragments", [
    (_truncate("model.safetensors"), ["holds a model that does not load", "SafetensorError"]),
    (_truncate("model.safetensors", 4000), ["holds a model that does not load"]),
    (_write("trainer_state.json", "{not json"), ["has a corrupt trainer_state.json (JSONDecodeError"]),
    (_write("trainer_state.json", "[1, 2]"), ["has a corrupt trainer_state.json", "expected a JSON object"]),
    (_write("trainer_state.json", '{"global_step": 7}'), ["global_step=7 but the directory is checkpoint-2"]),
    (_write("trainer_state.json", '{"global_step": 2, "tokens_total": "many"}'), ["tokens_total='many'"]),
    (_write("trainer_state.json", '{"global_step": 2, "kl_controller": 5}'), ["kl_controller=5"]),
    (_truncate("optimizer.pt"), ["has an unusable optimizer.pt, corrupt or written for another model"]),
    (_truncate("scheduler.pt"), ["has an unusable scheduler.pt"]),
    (_truncate("rng_state.pth"), ["has an unusable rng_state.pth"]),
    (_optimizer_of_wider_model, ["unusable optimizer.pt", "has shape (99, 48) for a parameter of shape (99, 32)"]),
    (_weights_of_wider_model, ["holds a different model than", "(99, 48) there, (99, 32) in the recipe's model"]),
    (_remove("optimizer.pt"), ["is incomplete (missing optimizer.pt)"]),
    (_remove("config.json"), ["is incomplete (missing config.json or adapter_config.json)"]),
    (_remove("model.safetensors"), ["holds a model that does not load"]),
], ids=["truncated-weights", "half-weights", "garbage-state", "state-not-object", "state-wrong-step",
        "state-bad-counter", "state-bad-kl", "truncated-optimizer", "truncated-scheduler", "truncated-rng",
        "optimizer-of-other-model", "weights-of-other-model", "missing-optimizer", "missing-config", "missing-weights"])
def test_corrupt_or_incompatible_checkpoint_on_resume(checkpointed_run, tmp_path, capsys, corrupt, fragments):
    root, recipe, wider = checkpointed_run
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run", run_dir)
    corrupt(run_dir / "checkpoint-2", wider)
    assert_user_error(capsys, ["train", recipe, "--output-dir", run_dir, "--resume"], "checkpoint-2", *fragments,
                      "delete it to resume from checkpoint-1", "--overwrite")


def test_following_the_advice_resumes_from_the_earlier_checkpoint(checkpointed_run, tmp_path, capsys):
    root, recipe, wider = checkpointed_run
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run", run_dir)
    _truncate("model.safetensors")(run_dir / "checkpoint-2", wider)
    assert_user_error(capsys, ["train", recipe, "--output-dir", run_dir, "--resume"], "delete it to resume from checkpoint-1")
    shutil.rmtree(run_dir / "checkpoint-2")
    code, _ = run_main(capsys, "train", recipe, "--output-dir", run_dir, "--resume")
    assert code == 0
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from_step"] == 1
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss/policy" in r] == [1, 2, 3]


# --- atomic checkpoints, keep-last-K ------------------------------------------------------------------


class _Tokenizer:
    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_pretrained(self, path):
        if self.fail:
            raise OSError(28, "No space left on device")
        (Path(path) / "tokenizer.json").write_text("{}")


def _save(output_dir, step, model, optimizer, scheduler, keep=2, fail=False):
    return ckpt.save_checkpoint(output_dir, step, model, _Tokenizer(fail), optimizer, scheduler,
                                {"note": step}, keep)


def test_checkpoints_are_atomic_keep_the_last_k_and_leftovers_are_cleaned(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, optimizer, scheduler, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    # a failed write (disk full) is a clear error and leaves the earlier checkpoints untouched
    with pytest.raises(UserError, match="cannot write checkpoint .*checkpoint-5: .*No space left.* earlier checkpoints are intact"):
        _save(tmp_path, 5, model, optimizer, scheduler, fail=True)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    assert not (tmp_path / ".checkpoint-5.tmp").exists()
    # rewriting the same step swaps it in whole
    model.transformer.wte.weight.data += 1.0
    _save(tmp_path, 4, model, optimizer, scheduler)
    saved = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    assert torch.equal(saved["transformer.wte.weight"], model.transformer.wte.weight.detach())
    # what a crash leaves behind: a half-written .tmp (ignored, removed) and a swapped-out .old (restored)
    (tmp_path / ".checkpoint-6.tmp").mkdir()
    (tmp_path / ".checkpoint-6.tmp" / "optimizer.pt").write_bytes(b"half")
    os.replace(tmp_path / "checkpoint-3", tmp_path / ".checkpoint-3.old")
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-4"  # the .tmp is never taken for a checkpoint
    assert ckpt.clean_staging(tmp_path) == [".checkpoint-6.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]
    assert json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3


# --- interruption and exact resume --------------------------------------------------------------------


def build_dropout_model(path) -> Path:
    """Like conftest's tiny GPT-2, with dropout on: the update then draws from the global torch RNG."""
    torch.manual_seed(1)
    tokenizer = char_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory):
    path = build_dropout_model(tmp_path_factory.mktemp("dropout-gpt2"))
    model = AutoModelForCausalLM.from_pretrained(path).train()
    ids = torch.tensor([[1, 2, 3, 4]])
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout is really active
    return path


# every feature whose state a resume must restore: eval and checkpoints interleaved, 2 updates per batch
# (clipped ratios), micro-batches, a cosine schedule with warm-up, an adaptive KL controller, dropout (torch
# RNG) and a reward drawing from python's and numpy's RNGs
RICH = {
    "rewards": [{"name": "rewards_for_tests:sevens_then_interrupt"}, {"name": "rewards_for_tests:noise", "weight": 0.01}],
    "rollout": {"prompts_per_step": 4, "completions_per_prompt": 2, "max_new_tokens": 3},
    "algorithm": {"updates_per_batch": 2, "clip_eps": 0.2, "kl_coef": 0.05, "kl_target": 0.001, "kl_horizon": 50},
    "optim": {"lr": 0.02, "schedule": "cosine", "warmup_steps": 1},
    "train": {"steps": 6, "eval_every": 2, "save_every": 2, "keep_checkpoints": 2, "micro_batch_size": 4,
              "tensorboard": False},
}
# reward calls: 1 first eval | 2 step1 | 3 step2 | 4 eval@2 | 5 step3 | 6 step4 | 7 eval@4 | 8 step5 | 9 step6 | 10 final


def _comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and not k.endswith("/latency_s")} for r in records]


def _final_weights(run_dir):
    return load_file(run_dir / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(dropout_model_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    summary = train(recipe_from_dict(recipe_dict(dropout_model_dir, **RICH)), run_dir, show_progress=False)
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss/policy" in r]
    assert len({r["kl/coef"] for r in steps}) == 6  # the adaptive controller moves every step
    assert len({round(r["optim/lr"], 12) for r in steps}) >= 5  # the cosine schedule moves
    assert all(r["optim/updates"] == 2 and "ratio/clip_fraction" in r for r in steps)
    assert [r["step"] for r in records if "eval/reward" in r] == [0, 2, 4, 6]
    return summary, records, _final_weights(run_dir)


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_stop_by_signal_then_resume_reproduces_every_later_step(dropout_model_dir, uninterrupted, tmp_path, monkeypatch,
                                                                signal_name):
    reference, reference_records, reference_weights = uninterrupted
    recipe = recipe_from_dict(recipe_dict(dropout_model_dir, **RICH))
    monkeypatch.setenv("INTERRUPT_AT_CALL", "5")  # during step 3, between the checkpoints of steps 2 and 4
    monkeypatch.setenv("INTERRUPT_SIGNAL", signal_name)
    with pytest.raises(TrainingInterrupted, match=f"stopped by {signal_name} after step 3") as stopped:
        train(recipe, tmp_path, show_progress=False)
    assert stopped.value.checkpoint.endswith("checkpoint-3") and stopped.value.signal_name == signal_name
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    monkeypatch.delenv("INTERRUPT_AT_CALL")
    resumed = train(recipe, tmp_path, resume=True, show_progress=False)
    assert resumed["resumed_from_step"] == 3
    assert _comparable(read_metrics(tmp_path / "metrics.jsonl")) == _comparable(reference_records)
    assert resumed["eval_reward_after"] == reference["eval_reward_after"]
    weights = _final_weights(tmp_path)
    assert all(torch.equal(weights[k], reference_weights[k]) for k in reference_weights)


def test_crash_without_checkpoint_resumes_from_the_last_one_exactly(dropout_model_dir, uninterrupted, tmp_path,
                                                                   monkeypatch):
    """A run that dies (here: at step 6) after logging step 5 resumes from checkpoint-4: the metrics logged
    after it, a line cut in half and a half-written checkpoint are dropped, and steps 5-6 come out the same."""
    _, reference_records, reference_weights = uninterrupted
    recipe = recipe_from_dict(recipe_dict(dropout_model_dir, **RICH))
    monkeypatch.setenv("CRASH_AT_CALL", "9")
    with pytest.raises(UserError, match="simulated crash"):
        train(recipe, tmp_path, show_progress=False)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss/policy" in r] == [1, 2, 3, 4, 5]
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 6, "reward/me')  # killed while writing
    (tmp_path / ".checkpoint-6.tmp").mkdir()  # killed while checkpointing
    monkeypatch.delenv("CRASH_AT_CALL")
    resumed = train(recipe, tmp_path, resume=True, show_progress=False)
    assert resumed["resumed_from_step"] == 4
    assert not (tmp_path / ".checkpoint-6.tmp").exists()
    assert _comparable(read_metrics(tmp_path / "metrics.jsonl")) == _comparable(reference_records)
    weights = _final_weights(tmp_path)
    assert all(torch.equal(weights[k], reference_weights[k]) for k in reference_weights)


def test_signal_during_the_first_evaluation_keeps_it(tiny_model_dir, tmp_path, monkeypatch):
    recipe = recipe_from_dict(recipe_dict(tiny_model_dir, rewards=[{"name": "rewards_for_tests:sevens_then_interrupt"}]))
    monkeypatch.setenv("INTERRUPT_AT_CALL", "1")  # the first evaluation scores with call 1
    with pytest.raises(TrainingInterrupted, match="after step 0"):
        train(recipe, tmp_path, show_progress=False)
    before = json.loads((tmp_path / "checkpoint-0" / "trainer_state.json").read_text())["eval_reward_before"]
    monkeypatch.delenv("INTERRUPT_AT_CALL")
    resumed = train(recipe, tmp_path, resume=True, show_progress=False)
    assert resumed["resumed_from_step"] == 0 and resumed["eval_reward_before"] == before
    assert rewards_for_tests.calls["count"] == 1 + 3 + 1  # the first evaluation was not run again


def _cli_env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_sigterm_to_the_cli_checkpoints_says_how_to_resume_and_the_resume_finishes(tiny_model_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train={"steps": 400})
    run_dir = tmp_path / "run"
    args = ["--no-progress", "train", str(recipe), "--output-dir", str(run_dir), "optim.lr=0.005"]
    process = subprocess.Popen([sys.executable, "-m", "rlhf_pg", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_cli_env(), cwd=tmp_path)
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count('"loss/policy"') >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    # meanwhile, a second run into the same directory is refused (the first holds DIR/.lock)
    assert_user_error(capsys, ["train", recipe, "--output-dir", run_dir, "--resume"],
                      f"another rlhf-pg run (pid {process.pid}) is writing to {run_dir}")
    process.send_signal(signal.SIGTERM)  # from outside, mid-run
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_RESUMABLE == 75, stderr  # a scheduler's stop: resumable (143 would not say so)
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: stopped by SIGTERM after step ")
    step = int(last.split("after step ")[1].split(";")[0])
    assert step >= 2 and (run_dir / f"checkpoint-{step}").is_dir()
    command = last.split("Resume with: ")[1]
    assert command == f"rlhf-pg --no-progress train {recipe} --output-dir {run_dir} optim.lr=0.005 --resume"
    # resume with exactly that command, in this process to save a start-up (fewer steps, so the test is short:
    # train.steps may change on resume)
    code = cli.main([*shlex.split(command)[1:], "--max-steps", str(step + 2)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from_step"] == step and summary["steps"] == step + 2
    steps = [r["step"] for r in read_metrics(metrics) if "loss/policy" in r]
    assert steps == list(range(1, step + 3))  # every step once: nothing lost, nothing repeated


# --- numerical guards ---------------------------------------------------------------------------------


def _inject_inf_into_update_logits(monkeypatch, steps: set[int] | None):
    """Make the policy's logits +inf at one vocabulary entry in the update forward of the given steps
    (all steps when None), as an fp16 overflow would. Sampling and evaluation run without gradients
    and are left alone, so is the shared-prompt pass (one logit per row); with one update per step, the
    n-th gradient-enabled forward over completions is step n."""
    import rlhf_pg.lm_run as lm_run_module

    original = lm_run_module.load_policy
    state = {"forwards": 0}

    def hook(module, args, output):
        if not torch.is_grad_enabled() or output.logits.shape[1] == 1:
            return output  # sampling, evaluation, or the shared-prompt pass of the update
        state["forwards"] += 1
        if steps is None or state["forwards"] in steps:
            bump = torch.zeros_like(output.logits)
            bump[..., 5] = float("inf")
            output.logits = output.logits + bump
        return output

    def load_policy(config):
        model, tokenizer, path = original(config)
        model.register_forward_hook(hook)
        return model, tokenizer, path

    monkeypatch.setattr(lm_run_module, "load_policy", load_policy)


def test_nonfinite_updates_are_skipped_counted_logged_and_training_goes_on(tiny_model_dir, tmp_path, monkeypatch, capsys):
    _inject_inf_into_update_logits(monkeypatch, steps={2, 3})
    # a dense reward: every completion gets its own, so every update has a non-zero gradient
    recipe = recipe_from_dict(recipe_dict(tiny_model_dir, rewards=[{"name": "rewards_for_tests:char_codes"}],
                                          train={"steps": 5, "save_every": 1, "keep_checkpoints": 10,
                                                 "max_nonfinite_steps": 3}))
    summary = train(recipe, tmp_path, show_progress=False)
    assert summary["skipped_updates"] == 2
    records = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss/policy" in r}
    assert {step for step, r in records.items() if r.get("train/skipped_updates")} == {2, 3}
    assert all(records[s]["train/skipped_updates"] == 1 for s in (2, 3))
    logged = capsys.readouterr().out
    assert "step 2: non-finite loss" in logged and "update skipped (2 in a row, the run stops at 3)" in logged

    def weights(step):
        return load_file(tmp_path / f"checkpoint-{step}" / "model.safetensors")

    w1, w3, w4 = weights(1), weights(3), weights(4)
    assert all(torch.equal(w1[k], w3[k]) for k in w1)  # the skipped updates left the model as it was
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)  # and training went on afterwards
    adam_steps = torch.load(tmp_path / "checkpoint-4" / "optimizer.pt")["state"][0]["step"]
    assert int(adam_steps) == 2  # steps 1 and 4 only


def test_consecutive_nonfinite_updates_stop_the_cli_with_exit_2(tiny_model_dir, tmp_path, monkeypatch, capsys):
    _inject_inf_into_update_logits(monkeypatch, steps=None)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, train={"steps": 10, "max_nonfinite_steps": 3})
    assert_user_error(capsys, ["train", recipe, "--output-dir", tmp_path / "out"],
                      "3 consecutive updates had a non-finite loss or gradient (last at step 3",
                      "train.max_nonfinite_steps=3", "lower optim.lr")
    skipped = [r["train/skipped_updates"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss/policy" in r]
    assert skipped == [1, 1, 1]


def test_a_second_signal_aborts_at_once_and_the_last_checkpoint_stays_usable(tiny_model_dir, tmp_path, monkeypatch,
                                                                             capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, rewards=[{"name": "rewards_for_tests:sevens_then_interrupt"}],
                          train={"steps": 4, "save_every": 1})
    run_dir = tmp_path / "run"
    monkeypatch.setenv("INTERRUPT_AT_CALL", "4")  # 1: first evaluation, 2-4: steps 1-3
    monkeypatch.setenv("INTERRUPT_TIMES", "2")
    code, message = run_main(capsys, "train", recipe, "--output-dir", run_dir)
    assert code == 130, message
    assert message.startswith("interrupted; the run's earlier checkpoints (if any) are intact") and "--resume" in message
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["checkpoint-1", "checkpoint-2"]
    monkeypatch.delenv("INTERRUPT_AT_CALL")
    code, _ = run_main(capsys, "train", recipe, "--output-dir", run_dir, "--resume")
    assert code == 0
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from_step"] == 2
    # resuming with fewer steps than the checkpoint already has (the final one, step 4) is refused, not
    # silently "finished"
    assert_user_error(capsys, ["train", recipe, "--output-dir", run_dir, "--resume", "--max-steps", "2"],
                      "is at step 4, past train.steps=2; give --max-steps 4 or more")


def test_corrupt_lora_adapter_checkpoint_on_resume(tiny_model_dir, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, peft={"r": 2, "target_modules": ["c_attn"]},
                          train={"steps": 1})  # one checkpoint: the final step's
    run_dir = tmp_path / "run"
    assert run_main(capsys, "train", recipe, "--output-dir", run_dir)[0] == 0
    adapter = run_dir / "checkpoint-1" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:64])
    assert_user_error(capsys, ["train", recipe, "--output-dir", run_dir, "--resume"],
                      "checkpoint-1 is unusable (no usable LoRA adapter in", "start again with --overwrite")


@pytest.mark.slow
def test_resume_in_a_fresh_cli_process_matches_an_uninterrupted_cli_run(dropout_model_dir, tmp_path):
    """The exact-resume property across processes (what users do): import-time side effects included."""
    recipe = write_recipe(tmp_path / "r.yaml", dropout_model_dir, **RICH)

    def cli_run(run_dir, *extra, **env):
        return subprocess.run([sys.executable, "-m", "rlhf_pg", "--no-progress", "train", str(recipe), "--output-dir",
                               str(run_dir), *extra], capture_output=True, text=True, env={**_cli_env(), **env},
                              timeout=600)

    stopped = cli_run(tmp_path / "b", INTERRUPT_AT_CALL="5", INTERRUPT_SIGNAL="SIGTERM")
    assert stopped.returncode == EXIT_RESUMABLE and "after step 3" in stopped.stderr, stopped.stderr
    assert cli_run(tmp_path / "b", "--resume").returncode == 0
    assert cli_run(tmp_path / "a").returncode == 0
    a, b = (_comparable(read_metrics(tmp_path / name / "metrics.jsonl")) for name in "ab")
    assert a == b
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["resumed_from_step"] == 3
    assert all(torch.equal(x, _final_weights(tmp_path / "b")[k]) for k, x in _final_weights(tmp_path / "a").items())
