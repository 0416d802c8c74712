"""The Python API (rlhf_pg.train / sft / evaluate / doctor): rewards and data from Python, the run shell's
guarantees (lock, resume, interrupt), errors as exceptions before any model loads, nothing left behind."""

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import datasets
import pytest

import rlhf_pg
from rlhf_pg import RecipeError, RewardFunctionError, TrainingInterrupted, UserError
from rlhf_pg.api import RunResult, resolve_recipe, reward_name
from rlhf_pg.lm_run import LMRun

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"prompt": f"{a}+{b}=", "answer": a + b} for a in range(8) for b in range(8)]  # 64 problems


def tiny(model_dir, steps=2, **sections):
    """A recipe dict for the tiny random model: 4 prompts x 2 completions, 3 new tokens, 6 held-out prompts."""
    recipe = {"model": model_dir, "data": {"num_eval": 6},
              "rollout": {"prompts_per_step": 4, "completions_per_prompt": 2, "max_new_tokens": 3},
              "train": {"steps": steps, "eval_every": 0, "save_every": 0, "tensorboard": False,
                        "log_completions_every": 0}}
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


def answer_length(prompts, completions, answer, finished, **kwargs):
    """A reward that only the dataset's ``answer`` column decides: the number of digits of the sum."""
    return [float(len(str(value))) for value in answer]


def test_import_rlhf_pg_loads_no_torch_and_sft_doctor_stay_the_api_functions():
    code = ("import sys, rlhf_pg; heavy = {'torch', 'transformers', 'datasets'} & set(sys.modules); "
            "assert not heavy, heavy; import rlhf_pg.sft, rlhf_pg.doctor; from rlhf_pg.sft import train_sft; "
            "from rlhf_pg import api; assert rlhf_pg.sft is api.sft and rlhf_pg.doctor is api.doctor; "
            "assert rlhf_pg.train is api.train and rlhf_pg.evaluate is api.evaluate; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.stdout.strip() == "ok", result.stderr


def test_train_from_python_passes_the_dataset_columns_and_returns_the_runs_result(tiny_model_dir, tmp_path):
    calls = []

    def digits(prompts, completions, answer, finished, **kwargs):
        calls.append((list(prompts), list(answer), list(finished)))
        return answer_length(prompts, completions, answer, finished)

    result = rlhf_pg.train(tiny(tiny_model_dir), reward_funcs=[digits], train_dataset=ROWS, output_dir=tmp_path / "run",
                           progress=False)
    by_prompt = {row["prompt"]: row["answer"] for row in ROWS}
    for prompts, answers, finished in calls:  # every prompt arrived with its own row's answer
        assert answers == [by_prompt[p] for p in prompts] and all(isinstance(f, bool) for f in finished)
    training = [call for call in calls if len(call[0]) == 4 * 2]  # the held-out evaluations score 6 x 1
    assert len(training) == 2
    assert [m["step"] for m in result.metrics] == [0, 1, 2]  # merged: step 2 holds its metrics and the final eval
    for step, (_, answers, _) in enumerate(training, start=1):
        expected = sum(len(str(a)) for a in answers) / len(answers)
        assert result.metrics[step]["reward/mean"] == pytest.approx(expected)
        assert result.metrics[step]["reward/digits/mean"] == pytest.approx(expected)
    assert result.summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    assert result.final_dir == tmp_path / "run" / "final" and (result.final_dir / "config.json").is_file()
    assert result.to_pandas().loc[2, "reward/mean"] == result.metrics[2]["reward/mean"]
    assert RunResult.load(tmp_path / "run").metrics == result.metrics
    marker = (tmp_path / "run" / "recipe.yaml").read_text()  # the references that stand for the Python objects
    fingerprint = datasets.Dataset.from_list(ROWS)._fingerprint
    assert "name: python:" in marker and "digits" in marker and f"path: python:train_dataset@{fingerprint}" in marker


def test_resume_takes_the_same_functions_and_rows_and_refuses_other_rows(tiny_model_dir, tmp_path):
    recipe = tiny(tiny_model_dir, steps=2, train={"save_every": 1})
    first = rlhf_pg.train(recipe, reward_funcs={answer_length: 0.5}, train_dataset=datasets.Dataset.from_list(ROWS),
                          output_dir=tmp_path, progress=False)
    assert first.summary["resumed_from_step"] is None
    changed = [dict(row, answer=row["answer"] + (row["prompt"] == "0+0=")) for row in ROWS]
    with pytest.raises(UserError, match=r"different recipe \(differs in data.path\)"):
        rlhf_pg.train(recipe, reward_funcs={answer_length: 0.5}, train_dataset=changed, output_dir=tmp_path,
                      overrides=["train.steps=3"], resume=True, progress=False)
    with pytest.raises(UserError, match=r"differs in rewards\)"):
        rlhf_pg.train(recipe, reward_funcs=[answer_length], train_dataset=ROWS, output_dir=tmp_path,
                      overrides={"train.steps": 3}, resume=True, progress=False)
    again = rlhf_pg.train(recipe, reward_funcs={answer_length: 0.5}, train_dataset=list(ROWS), output_dir=tmp_path,
                          overrides={"train.steps": 3}, resume=True, progress=False)
    assert again.summary["resumed_from_step"] == 2 and again.summary["steps"] == 3
    assert [m["step"] for m in again.metrics] == [0, 1, 2, 3]


def no_model(*args, **kwargs):
    raise AssertionError("a model was loaded for bad input")


@pytest.mark.parametrize("case,error,message", [
    ("no completions", RewardFunctionError, r"cannot be called as f\(prompts, completions, \*\*kwargs\)"),
    ("no kwargs", RewardFunctionError, r"unexpected keyword argument 'answer'"),
    ("not callable", UserError, r"reward_funcs\[0\]: 3 is not callable"),
    ("no prompt column", UserError, r"data: train_dataset has no column 'prompt' \(columns: question, answer\)"),
    ("not a dict row", UserError, r"train_dataset: item 1 is a str, not a dict"),
    ("dataset dict", UserError, r"a DatasetDict holds several splits \(train\); pass one"),
    ("recipe type", UserError, r"recipe: expected the path of a YAML recipe, a dict of sections or a Recipe, got int"),
    ("few rows", UserError, r"data: 4 rows cannot give 6 held-out prompts .* pass eval_dataset="),
    ("python name from yaml", RecipeError, r"'python:gone' stands for a Python function given to rlhf_pg.train"),
])
def test_bad_input_raises_a_user_error_before_any_model_loads(tiny_model_dir, tmp_path, monkeypatch, case, error,
                                                              message):
    monkeypatch.setattr("rlhf_pg.lm_run.load_policy", no_model)
    recipe, kwargs = tiny(tiny_model_dir), {"reward_funcs": [answer_length], "train_dataset": ROWS}
    if case == "no completions":
        kwargs["reward_funcs"] = [lambda prompts: [0.0] * len(prompts)]
    elif case == "no kwargs":
        kwargs["reward_funcs"] = [lambda prompts, completions, finished: [0.0] * len(prompts)]
    elif case == "not callable":
        kwargs["reward_funcs"] = [3]
    elif case == "no prompt column":
        kwargs["train_dataset"] = [{"question": row["prompt"], "answer": row["answer"]} for row in ROWS]
    elif case == "not a dict row":
        kwargs["train_dataset"] = [ROWS[0], "1+1="]
    elif case == "dataset dict":
        kwargs["train_dataset"] = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})
    elif case == "recipe type":
        recipe = 42
    elif case == "few rows":
        kwargs["train_dataset"] = ROWS[:4]
    elif case == "python name from yaml":
        recipe, kwargs = {**recipe, "rewards": [{"name": "python:gone"}]}, {}
    with pytest.raises(error, match=message):
        rlhf_pg.train(recipe, output_dir=tmp_path / "run", progress=False, **kwargs)
    assert not (tmp_path / "run").exists()


def test_a_python_error_message_is_the_line_the_cli_prints(tmp_path, capsys):
    from rlhf_pg import cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {steps: 1}\n")
    assert cli.main(["train", str(recipe), "optim.lrate=0.1"]) == 2
    printed = capsys.readouterr().err.strip()
    for overrides in (["optim.lrate=0.1"], {"optim.lrate": 0.1}):
        with pytest.raises(RecipeError) as raised:
            rlhf_pg.train(recipe, overrides=overrides)
        assert printed == f"error: {raised.value}"
        assert "did you mean 'optim.lr'" in printed


def test_dict_and_list_overrides_are_the_same_recipe_and_python_values_stay_as_given(tmp_path):
    recipe = {"model": "builtin:arith-gpt", "train": {"steps": 5}}
    as_list = resolve_recipe(recipe, overrides=["optim.lr=1e-4", 'rollout.stop=["\\n"]', "train.report_to=[]"])
    as_dict = resolve_recipe(recipe, overrides={"optim.lr": 1e-4, "rollout.stop": ["\n"], "train.report_to": []})
    assert as_list == as_dict and as_dict.optim.lr == 1e-4 and as_dict.rollout.stop == ["\n"]
    assert resolve_recipe({}, overrides={"rollout.stop": ["yes"]}).rollout.stop == ["yes"]  # not YAML's true
    with pytest.raises(RecipeError, match=r"rollout.stop\[0\]: expected a string, got True"):
        resolve_recipe({}, overrides=["rollout.stop=[yes]"])
    assert recipe == {"model": "builtin:arith-gpt", "train": {"steps": 5}}  # the caller's dict is not changed
    with pytest.raises(UserError, match="overrides: expected a dict"):
        resolve_recipe(recipe, overrides="optim.lr=1")
    with pytest.raises(RecipeError, match="unknown recipe key 'data.dataset'"):  # Python objects are no recipe keys
        resolve_recipe({"data": {"dataset": "prompts.jsonl"}})
    assert "dataset" not in resolve_recipe({}).to_dict()["data"] and "function" not in resolve_recipe({}).to_dict()["rewards"][0]


def test_reward_names_are_what_the_command_line_reads_or_python_references():
    from reward_models.rules import arithmetic_exact
    from rewards_for_tests import sevens

    assert reward_name(arithmetic_exact) == "arithmetic_exact"  # registered
    assert reward_name(sevens) == "rewards_for_tests:sevens"  # importable
    assert reward_name(answer_length) == f"{__name__}:answer_length"
    assert reward_name(lambda prompts, completions, **kwargs: []) == "python:<lambda>"

    def local(prompts, completions, **kwargs):
        return []

    resolved = resolve_recipe({}, reward_funcs=[local, local, sevens])
    assert [spec.name for spec in resolved.rewards] == ["python:local", "python:local_2", "rewards_for_tests:sevens"]
    assert all(spec.function is not None for spec in resolved.rewards)
    assert resolve_recipe(resolved) == resolved and resolve_recipe(resolved).rewards[0].function is local


def test_a_reward_returning_the_wrong_length_fails_at_its_first_call_and_leaves_no_run(tiny_model_dir, tmp_path):
    def one_value(prompts, completions, **kwargs):
        return [1.0]

    with pytest.raises(RewardFunctionError, match=r"'python:one_value' returned 1 values for 6 completions"):
        rlhf_pg.train(tiny(tiny_model_dir), reward_funcs=[one_value], train_dataset=ROWS, output_dir=tmp_path,
                      progress=False)
    # the first evaluation failed: no run behind, the lock released, the same directory takes the next run
    result = rlhf_pg.train(tiny(tiny_model_dir, steps=1), reward_funcs=[answer_length], train_dataset=ROWS,
                           output_dir=tmp_path, progress=False)
    assert result.summary["steps"] == 1


def test_async_rewards_run_inside_a_running_event_loop(tiny_model_dir, tmp_path):
    seen = []

    async def slow_digits(prompts, completions, answer, **kwargs):
        seen.append(asyncio.get_running_loop())
        await asyncio.sleep(0.01)
        return [float(len(str(value))) for value in answer]

    async def notebook_cell():  # a Jupyter cell runs inside the kernel's event loop
        outer = asyncio.get_running_loop()
        result = rlhf_pg.train(tiny(tiny_model_dir), reward_funcs=[slow_digits], train_dataset=ROWS,
                               output_dir=tmp_path, progress=False)
        return outer, result

    outer, result = asyncio.run(notebook_cell())
    assert seen and all(loop is not outer for loop in seen)  # awaited in the scorer's own loop, in a worker thread
    assert result.metrics[1]["reward/slow_digits/mean"] == result.metrics[1]["reward/mean"] > 0


def test_sigint_checkpoints_raises_training_interrupted_and_the_same_call_resumes(tiny_model_dir, tmp_path):
    calls = {"count": 0}

    def interrupting(prompts, completions, answer, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:  # call 1: the first evaluation; call 3 scores step 2
            os.kill(os.getpid(), signal.SIGINT)
        return [float(len(str(value))) for value in answer]

    recipe = tiny(tiny_model_dir, steps=4)
    with pytest.raises(TrainingInterrupted, match=r"Resume with: rlhf_pg.train\(\.\.\., output_dir=.*resume=True\)") as stop:
        rlhf_pg.train(recipe, reward_funcs=[interrupting], train_dataset=ROWS, output_dir=tmp_path, progress=False)
    assert stop.value.checkpoint == str(tmp_path / "checkpoint-2") and Path(stop.value.checkpoint).is_dir()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    result = rlhf_pg.train(recipe, reward_funcs=[interrupting], train_dataset=ROWS, output_dir=tmp_path,
                           resume=True, progress=False)
    assert result.summary["resumed_from_step"] == 2 and [m["step"] for m in result.metrics] == [0, 1, 2, 3, 4]


def _threads() -> set[str]:
    return {thread.name for thread in threading.enumerate() if thread.is_alive()}


def test_runs_in_one_process_leak_no_thread_no_run_and_no_lock(tiny_model_dir, tmp_path):
    recipe = tiny(tiny_model_dir, train={"tensorboard": True})  # TensorBoard's writer has a thread of its own
    rlhf_pg.train(recipe, reward_funcs=[answer_length], train_dataset=ROWS, output_dir=tmp_path / "a", progress=False)
    gc.collect()
    before = _threads()

    def fails_in_step_one(prompts, completions, **kwargs):
        if len(completions) == 8:
            raise KeyError("answer")
        return [0.0] * len(completions)

    with pytest.raises(RewardFunctionError) as failed:  # the notebook keeps the last error: sys.last_value
        rlhf_pg.train(recipe, reward_funcs=[fails_in_step_one], train_dataset=ROWS, output_dir=tmp_path / "b",
                      progress=False)
    rlhf_pg.train(recipe, reward_funcs=[answer_length], train_dataset=ROWS, output_dir=tmp_path / "c", progress=True)
    gc.collect()
    assert failed.value.__traceback__ is not None
    assert not [o for o in gc.get_objects() if isinstance(o, LMRun)]  # no model, optimizer, sampler held
    assert _threads() <= before, _threads() - before
    rlhf_pg.train(recipe, reward_funcs=[answer_length], train_dataset=ROWS, output_dir=tmp_path / "b", overwrite=True,
                  progress=False)  # the failed run's lock is free


def test_sft_evaluate_and_doctor_take_python_rewards_and_data(tiny_model_dir, tmp_path, capsys):
    pairs = [{**row, "completion": str(row["answer"])} for row in ROWS]
    held_out = pairs[:6]
    result = rlhf_pg.sft(tiny(tiny_model_dir), train_dataset=pairs[6:], eval_dataset=held_out,
                         reward_funcs=[answer_length], output_dir=tmp_path, progress=False)
    assert result.summary["steps"] == 2 and "eval_nll_after" in result.summary
    scores = rlhf_pg.evaluate(result, tiny(tiny_model_dir), reward_funcs=[answer_length], eval_dataset=held_out)
    expected = sum(len(str(row["answer"])) for row in held_out) / len(held_out)
    assert scores["num_prompts"] == 6 and scores["reward"] == pytest.approx(expected)
    assert scores["model"] == str(tmp_path / "final")
    diagnosis = rlhf_pg.doctor(tiny(tiny_model_dir), reward_funcs=[answer_length], train_dataset=ROWS, prompts=2)
    assert diagnosis.verdict().startswith("doctor:") and "rewards" in diagnosis.stats


def test_the_cli_runs_through_the_python_api(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from rlhf_pg import api, cli

    called = []
    original = api.train

    def recording(*args, **kwargs):
        called.append(kwargs["output_dir"])
        return original(*args, **kwargs)

    monkeypatch.setattr(api, "train", recording)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps({**tiny(tiny_model_dir), "rewards": ["rewards_for_tests:sevens"]}))
    assert cli.main(["--no-progress", "train", str(recipe), "--output-dir", str(tmp_path / "run")]) == 0
    assert called == [tmp_path / "run"]
    assert '"steps": 2' in capsys.readouterr().out
