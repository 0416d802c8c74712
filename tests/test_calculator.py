"""The calculator task and the trainer's multi-turn hooks: SFT and REINFORCE updates count actions only, the
recipes load, a tiny run goes through sft -> train with the tool and logs tool calls; bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_pg.core.mdp import action_tokens
from rlhf_pg.episodes.spec import EpisodeSpec
from rlhf_pg.errors import RecipeError
from rlhf_pg.recipe import load_recipe, recipe_from_dict
from rlhf_pg.run.accel import new_accelerator
from reward_models.tasks import calculator_exact
from rlhf_pg.tasks.calculator import calculator, demonstration, write_dataset
from rlhf_pg.episodes.tools import CallFormat
from test_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
SPEC = EpisodeSpec(tools={"calculator": calculator}, call_format=CallFormat.parse("[{name} {args}]"),
                   result_format="={result};")
PROMPTS = ["123*4=", "7*8=", "5*5="]
DEMOS = ["[calculator 123*4]=492;492", "56", "[calculator 5*5]=25;[calculator 25]=25;25"]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_calculator_tool_and_its_reward():
    assert calculator("123*4") == "492" and calculator("(7 - 2) ** 2 // 3") == "8" and calculator("7/2") == "3.5"
    for bad, message in (("9**9**9", "too large"), ("__import__('os')", "unsupported"), ("1+", "not an arithmetic")):
        with pytest.raises(ValueError, match=message):
            calculator(bad)
    turns = [[{"role": "model", "content": "[calculator 2*3]"}, {"role": "tool", "content": "=6;"},
              {"role": "model", "content": "6"}],
             [{"role": "model", "content": "[calculator 2*3]"}, {"role": "tool", "content": "=6;"}]]
    # the last model turn is the answer; an episode that ends on the tool's result has none
    assert calculator_exact(["2*3="] * 2, ["[calculator 2*3]=6;6", "[calculator 2*3]=6;"], answer=["6", "6"],
                            finished=[True, True], turns=turns) == [1.0, 0.0]
    assert calculator_exact(["2*3=", "2*3="], ["6", "6"], finished=[True, False]) == [1.0, 0.0]  # no tools


def test_the_shipped_data_is_the_generators_output(tmp_path):
    rows = write_dataset(tmp_path / "calculator.jsonl")
    assert (tmp_path / "calculator.jsonl").read_bytes() == (ROOT / "recipes/data/calculator.jsonl").read_bytes()
    examples = [json.loads(line) for line in (tmp_path / "calculator.jsonl").read_text().splitlines()]
    assert rows == 7200 and 0.45 < sum("[calculator" in e["completion"] for e in examples) / rows < 0.55
    assert demonstration(123, 4, True) == "[calculator 123*4]=492;492" and demonstration(123, 4, False) == "492"


def test_the_chat_data_and_the_smollm2_recipe(tmp_path):
    write_dataset(tmp_path / "chat.jsonl", chat=True, rows=1000)
    assert (tmp_path / "chat.jsonl").read_bytes() == (ROOT / "recipes/data/calculator_chat.jsonl").read_bytes()
    first = json.loads((tmp_path / "chat.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in first["prompt"]] == ["system", "user"]
    recipe = load_recipe(ROOT / "recipes/smollm2_calculator.yaml")
    spec = EpisodeSpec.from_recipe(recipe)
    assert spec.call_format.render("calculator", "2*3") == "<tool>calculator(2*3)</tool>"
    assert spec.split_demonstration(first["completion"])[1][0] is False  # the result is an observation


def test_sft_demonstrations_keep_the_tool_results_out_of_the_loss():
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "rlhf_pg/weights/arith-gpt-v1")
    assert SPEC.split_demonstration(DEMOS[2]) == [(True, "[calculator 5*5]"), (False, "=25;"),
                                                  (True, "[calculator 25]"), (False, "=25;"), (True, "25")]
    batch = SPEC.demonstrations(tokenizer, PROMPTS, DEMOS)
    kept = ["".join(tokenizer.convert_ids_to_tokens(int(t)) for t, a in zip(row, actions) if a)
            for row, actions in zip(batch.completion_ids, action_tokens(batch))]
    assert kept == ["[calculator 123*4]492<eos>", "56<eos>", "[calculator 5*5][calculator 25]25<eos>"]


def _action_nll_gradients(model, tokenizer, prompts, completions):
    """Independent: HF cross-entropy with labels -100 on the prompt and on the tool's results."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for prompt, completion in zip(prompts, completions):
        ids, labels = tokenizer(prompt)["input_ids"], [-100] * len(tokenizer(prompt)["input_ids"])
        for is_action, text in SPEC.split_demonstration(completion):
            part = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids, labels = ids + part, labels + (part if is_action else [-100] * len(part))
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
        count = sum(label != -100 for label in labels)
        total = total + model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss * count
    (total / len(prompts)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_the_sft_and_reinforce_updates_count_actions_only(tiny_model_dir):
    """The update of an episode batch (policy_update, as sft and train call it) has the gradient of the actions'
    log-likelihood alone; the advantages on observation tokens (1 here) are never used."""
    from rlhf_pg.trainer import compute_advantages, policy_update, update_settings

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = _action_nll_gradients(model, tokenizer, PROMPTS, DEMOS)
    model.zero_grad(set_to_none=True)
    batch = SPEC.demonstrations(tokenizer, PROMPTS, DEMOS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    captured = {}
    optimizer.step = lambda: captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
    recipe = recipe_from_dict({"model": tiny_model_dir, "train": {"micro_batch_size": 2}, "optim": {"max_grad_norm": None}})
    policy_update(model, optimizer, new_accelerator("no"), batch, batch.completion_mask.clone(),
                  global_counts=(3.0, float(action_tokens(batch).sum())), **update_settings(recipe))
    for name in expected:
        assert torch.allclose(expected[name], captured[name], atol=1e-6, rtol=1e-4), name
    # advantages are 0 on the observations, whatever the estimator
    batch.rewards = torch.rand_like(batch.completion_mask)
    batch.group_ids = torch.zeros(3, dtype=torch.long)  # one group of three: leave-one-out has the others
    advantages = compute_advantages(batch, recipe.algorithm.estimator_spec(), new_accelerator("no"))
    assert advantages[action_tokens(batch) == 0].abs().sum() == 0 and advantages.abs().sum() > 0


def test_the_calculator_recipes_load_and_agree():
    sft, rl = load_recipe(ROOT / "recipes/calculator_sft.yaml"), load_recipe(ROOT / "recipes/calculator_tool.yaml")
    assert sft.tools == rl.tools == ["rlhf_pg.tasks.calculator:calculator"]
    assert rl.model.name_or_path == "runs/calculator_sft/final" == sft.output_dir + "/final"
    for key in ("tool_format", "result_format", "max_new_tokens", "max_turns"):
        assert getattr(sft.rollout, key) == getattr(rl.rollout, key), key
    assert sft.data == rl.data
    with pytest.raises(RecipeError, match=r"tools\[0\]='calculator' must be an import path"):
        load_recipe(ROOT / "recipes/calculator_tool.yaml", ["tools=[calculator]"])
    with pytest.raises(RecipeError, match="rollout.result_format='=' must contain"):
        load_recipe(ROOT / "recipes/calculator_tool.yaml", ["rollout.result_format=="])


def _tiny_recipe(tmp_path, model_dir, extra="") -> Path:
    rows = [{"prompt": f"{a}*{b}=", "completion": demonstration(a, b, (a + b) % 2 == 0), "answer": str(a * b)}
            for a in range(100, 120) for b in range(2, 6)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"model: {model_dir}\n"
        f"data: {{task: null, path: {data}, num_eval: 8}}\n"
        "tools: [rlhf_pg.tasks.calculator:calculator]\n"
        "rewards: [{name: 'calculator_exact'}]\n"
        "rollout: {prompts_per_step: 4, completions_per_prompt: 2, max_new_tokens: 30, max_turns: 2,\n"
        "          tool_format: '[{name} {args}]', result_format: '={result};'}\n"
        "sft: {batch_size: 8}\n"
        "train: {steps: 2, eval_every: 0, save_every: 0, tensorboard: false, num_threads: 1}\n" + extra)
    return recipe


def test_sft_then_train_with_the_tool_on_a_tiny_model(tiny_model_dir, tmp_path):
    recipe = _tiny_recipe(tmp_path, tiny_model_dir)
    result = run_cli("--no-progress", "sft", str(recipe), "--output-dir", str(tmp_path / "sft"), "optim.lr=3e-3",
                     "train.steps=40")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert summary["eval_nll_after"] < summary["eval_nll_before"] and "eval_tool_calls_after" in summary
    result = run_cli("--no-progress", "train", str(recipe), "--output-dir", str(tmp_path / "rl"),
                     f"model.name_or_path={tmp_path / 'sft' / 'final'}")
    assert result.returncode == 0, result.stderr
    metrics = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss/policy" in m]
    assert len(steps) == 2 and all("episode/tool_calls" in m and "episode/turns" in m for m in steps)
    assert "episode" in json.loads((tmp_path / "rl" / "summary.json").read_text())["examples"][0]


@pytest.mark.parametrize("extra,message", [
    ("environment: episodes_for_tests:WrongShapeEnv\n", "environment WrongShapeEnv: step("),
    ("environment: episodes_for_tests:NoStep\n", "environment: class NoStep has no step method"),
])
def test_a_bad_environment_exits_2_naming_the_class(tiny_model_dir, tmp_path, extra, message):
    recipe = _tiny_recipe(tmp_path, tiny_model_dir, extra + "eval: {temperature: 1.0}\n")
    result = run_cli("eval", str(recipe), "tools=[]", "rollout.max_new_tokens=40")
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_tool_that_is_not_a_function_exits_2_before_anything_is_written(tiny_model_dir, tmp_path):
    recipe = _tiny_recipe(tmp_path, tiny_model_dir)
    result = run_cli("train", str(recipe), "--output-dir", str(tmp_path / "run"),
                     "tools=[episodes_for_tests:NOT_A_FUNCTION]")
    assert result.returncode == 2 and "tools[0]: 'episodes_for_tests:NOT_A_FUNCTION' is int" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_calculator_recipes_reach_095_with_the_tool(tmp_path):
    """The README's numbers: sft (~2 min) then train (~1 min) on 2 CPU cores."""
    result = run_cli("--no-progress", "sft", str(ROOT / "recipes/calculator_sft.yaml"), "--output-dir",
                     str(tmp_path / "sft"))
    assert result.returncode == 0, result.stderr
    result = run_cli("--no-progress", "train", str(ROOT / "recipes/calculator_tool.yaml"), "--output-dir",
                     str(tmp_path / "rl"), f"model.name_or_path={tmp_path / 'sft' / 'final'}")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "rl" / "summary.json").read_text())
    assert summary["eval_reward_after"] >= 0.95 and summary["eval_tool_calls_after"] > 0.9, summary
