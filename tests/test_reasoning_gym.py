"""reasoning-gym as a prompt source and a reward: exact prompts, held-out items, determinism, scores, curriculum,
recipe errors through the CLI, and a short training run with per-task metrics."""

from __future__ import annotations

import json

import pytest

reasoning_gym = pytest.importorskip("reasoning_gym")

from reasoning_gym.utils import SYSTEM_PROMPTS, extract_answer  # noqa: E402

from reward_models import RewardScorer  # noqa: E402
from rlhf_pg.data import prompt_source  # noqa: E402
from rlhf_pg.recipe import recipe_from_dict  # noqa: E402
from rlhf_pg.tasks.reasoning_gym import TaskCurriculum  # noqa: E402
from test_cli import run_cli  # noqa: E402

CHAIN_SUM = {"name": "chain_sum", "weight": 1.0, "config": {"min_terms": 2, "max_terms": 2, "max_digits": 2}}
LETTERS = {"name": "letter_counting", "weight": 3.0, "config": {"min_words": 3, "max_words": 5}}


def data_recipe(**data):
    base = {"source": "reasoning_gym", "tasks": [CHAIN_SUM], "system_prompt": "direct", "num_eval": 50}
    return recipe_from_dict({"data": {**base, **data}, "rewards": ["reasoning_gym", "format"],
                             "rollout": {"prompts_per_step": 16}})


def test_prompts_are_exactly_the_system_prompt_and_the_question_and_the_item_travels_with_them():
    recipe = data_recipe(tasks=[CHAIN_SUM, LETTERS])
    source, eval_prompts, eval_columns = prompt_source(recipe.data, 16, seed=0)
    prompts, columns = source.batch(0)
    assert len(prompts) == 16 and set(columns) == {"task", "answer", "entry", "task_config"}
    for prompt, entry, task in zip(prompts + eval_prompts, columns["entry"] + eval_columns["entry"],
                                   columns["task"] + eval_columns["task"]):
        assert prompt == [{"role": "system", "content": SYSTEM_PROMPTS["direct"]},
                          {"role": "user", "content": entry["question"]}]
        assert entry["metadata"]["source_dataset"] == task
    assert eval_columns["task"] == ["chain_sum"] * 50 + ["letter_counting"] * 50  # num_eval per task
    literal = data_recipe(system_prompt="Reply inside <answer></answer> tags.")
    prompts, _ = prompt_source(literal.data, 16, seed=0)[0].batch(0)
    assert prompts[0][0] == {"role": "system", "content": "Reply inside <answer></answer> tags."}


def test_items_are_the_tasks_own_generated_items_mixed_by_weight():
    source = prompt_source(data_recipe(tasks=[CHAIN_SUM, LETTERS]).data, 16, seed=0)[0]
    tasks = [t for step in range(20) for t in source.batch(step)[1]["task"]]
    assert 0.65 < tasks.count("letter_counting") / len(tasks) < 0.85  # weights 1 : 3
    _, columns = source.batch(0)
    for entry, config, answer in zip(columns["entry"], columns["task_config"], columns["answer"]):
        assert answer == entry["answer"]
        if entry["metadata"]["source_dataset"] == "chain_sum":  # generated with the recipe's config
            assert config == CHAIN_SUM["config"] and entry["metadata"]["num_terms"] == 2
            assert str(eval(entry["metadata"]["expression"])) == entry["answer"]  # noqa: S307 - the task's own sum


def test_held_out_questions_are_never_training_questions_and_come_from_another_seed_stream():
    # chain_sum with one-digit terms has few distinct questions: collisions between the streams are certain
    small = {"name": "chain_sum", "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}
    source, _, eval_columns = prompt_source(data_recipe(tasks=[small], num_eval=60).data, 16, seed=0)
    held_out = [entry["question"] for entry in eval_columns["entry"]]
    assert len(set(held_out)) == 60
    trained = {entry["question"] for step in range(30) for entry in source.batch(step)[1]["entry"]}
    assert len(trained) > 20 and not trained & set(held_out)
    # the unfiltered training stream does hit held-out questions: the filter is what keeps them apart
    raw = reasoning_gym.create_dataset("chain_sum", size=500, seed=12345, **small["config"])
    assert {raw[i]["question"] for i in range(500)} & set(held_out)


def test_prompts_depend_only_on_seed_and_step_so_a_resumed_run_sees_the_same():
    recipe = data_recipe(tasks=[CHAIN_SUM, LETTERS])
    first = prompt_source(recipe.data, 16, seed=3)[0]
    again = prompt_source(recipe.data, 16, seed=3)[0]
    assert [first.batch(s) for s in (0, 5, 7)] == [again.batch(s) for s in (7, 5, 0)][::-1]
    assert first.batch(1)[0] != first.batch(2)[0]
    assert prompt_source(recipe.data, 16, seed=4)[0].batch(1)[0] != first.batch(1)[0]
    # the curriculum's state travels in the checkpoint: restored, the next prompts are the same
    curriculum = data_recipe(curriculum={"threshold": 0.5, "window": 4}, tasks=[CHAIN_SUM])
    moved = prompt_source(curriculum.data, 16, seed=3)[0]
    moved.observe(["chain_sum"] * 4, [1.0] * 4)
    restored = prompt_source(curriculum.data, 16, seed=3)[0]
    assert restored.batch(9) != moved.batch(9)
    restored.load_state_dict(json.loads(json.dumps(moved.state_dict())))
    assert restored.batch(9) == moved.batch(9)


def test_the_reasoning_gym_reward_is_the_tasks_own_score_answer(tmp_path):
    source = prompt_source(data_recipe(tasks=[CHAIN_SUM, LETTERS]).data, 16, seed=0)[0]
    prompts, columns = source.batch(2)
    completions = []
    for i, answer in enumerate(columns["answer"]):
        completions.append([f"<answer>{answer}</answer>", f"I think <answer>{answer}1</answer>", "no tags at all",
                            f"<answer>1</answer> then <answer>{answer}</answer>"][i % 4])
    total, per_reward = RewardScorer(data_recipe().rewards)(prompts, completions, **columns)
    for completion, entry, score in zip(completions, columns["entry"], per_reward["reasoning_gym"]):
        dataset = reasoning_gym.create_dataset(entry["metadata"]["source_dataset"])
        assert score == dataset.score_answer(answer=extract_answer(completion), entry=entry)
    assert per_reward["reasoning_gym"][0::4] == [1.0] * 4 and per_reward["reasoning_gym"][2::4] == [0.0] * 4
    assert per_reward["format"][:4] == [1.0, 1.0, 0.0, 0.5]
    assert total == [a + b for a, b in zip(per_reward["reasoning_gym"], per_reward["format"])]


def test_the_curriculum_raises_a_level_when_recent_accuracy_passes_the_threshold():
    curriculum = TaskCurriculum("chain_sum", {"allow_negation": False}, threshold=0.8, window=8)
    assert curriculum.level == 0 and curriculum.config()["max_terms"] == 2
    stream = [1, 0, 1, 0, 1, 0, 1, 0] + [1, 1, 1, 0, 1, 1, 1, 1]  # the last 8: at most 0.75, then 0.875
    notes = [curriculum.observe([score]) for score in stream]
    assert notes[:-1] == [None] * 15 and notes[-1].startswith("curriculum chain_sum: level 0 -> 1 (accuracy 0.875")
    assert curriculum.level == 1 and curriculum.config()["max_terms"] == 3 and curriculum.config()["max_digits"] == 2
    assert curriculum.observe([1.0] * 7) is None and curriculum.level == 1  # the window starts over after a move
    assert curriculum.observe([0.0] * 4) is None and curriculum.level == 1  # full at 0.5: stays
    state = curriculum.state_dict()
    assert state == {"levels": {"num_terms": 1, "num_digits": 1}, "window": [1.0] * 4 + [0.0] * 4}


def test_the_curriculum_moves_through_the_source_with_a_metric():
    recipe = data_recipe(curriculum={"threshold": 0.9, "window": 4})
    source = prompt_source(recipe.data, 16, seed=0)[0]
    metrics, notes = source.observe(["chain_sum"] * 4, [1.0, 1.0, 0.0, 1.0])
    assert metrics["curriculum/chain_sum/level"] == 0.0 and metrics["curriculum/chain_sum/accuracy"] == 0.75
    metrics, notes = source.observe(["chain_sum"] * 4, [1.0] * 4)
    assert metrics["curriculum/chain_sum/level"] == 1.0 and "level 0 -> 1" in notes[0]
    terms = {entry["metadata"]["num_terms"] for step in range(5) for entry in source.batch(step)[1]["entry"]}
    assert 3 in terms  # level 1 draws up to three terms


@pytest.mark.parametrize("data,message", [
    ({"tasks": [{"name": "chain_sums"}]}, "'chain_sums' is not a reasoning-gym task (close names: chain_sum"),
    ({"tasks": [{"name": "chain_sum", "config": {"max_termz": 3}}]}, "reasoning-gym rejects it: "),
    ({"tasks": [{"name": "chain_sum", "config": {"min_terms": 5, "max_terms": 2}}]}, "max_terms must be >= min_terms"),
    ({"system_prompt": "directt"}, "data.system_prompt='directt' is not a key of reasoning_gym.utils.SYSTEM_PROMPTS "
                                   "(did you mean 'direct'?"),
    ({"tasks": [{"name": "chain_sum", "weight": 0}]}, "data.tasks[0].weight"),
    ({"tasks": [{"name": "chain_sum", "weight": -1.0}]}, "data.tasks[0].weight"),
    ({"curriculum": {"treshold": 0.5}}, "unknown recipe key 'data.curriculum.treshold'"),
    ({"curriculum": {"tasks": ["gsm_symbolic"]}}, "data.curriculum.tasks: gsm_symbolic has no reasoning-gym curriculum"),
    ({"path": "x.jsonl"}, "data.source: reasoning_gym generates its prompts; remove data.path"),
])
def test_bad_reasoning_gym_recipes_exit_2_with_one_clear_message(tmp_path, capsys, data, message):
    from rlhf_pg.cli import main

    recipe = {"data": {"source": "reasoning_gym", "tasks": [CHAIN_SUM], "system_prompt": "direct", **data},
              "rewards": ["reasoning_gym"], "train": {"steps": 1}}
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    code = main(["--no-progress", "train", str(path), "--output-dir", str(tmp_path / "run")])
    stderr = capsys.readouterr().err
    assert code == 2 and message in stderr and stderr.startswith("error:") and "Traceback" not in stderr
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_a_bad_task_name_exits_2_from_the_command_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {source: reasoning_gym, tasks: [{name: letter_countin}]}\nrewards: [reasoning_gym]\n")
    result = run_cli("--no-progress", "train", str(path), "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error:") and "Traceback" not in result.stderr
    assert "data.tasks[0].name='letter_countin' is not a reasoning-gym task (close names: letter_counting" in result.stderr


def test_a_short_training_run_logs_per_task_accuracy_and_reward(chat_model_512, tmp_path):
    from rlhf_pg.run.metrics import read_metrics
    from rlhf_pg.trainer import train

    recipe = recipe_from_dict({
        "model": chat_model_512,
        "data": {"source": "reasoning_gym", "tasks": [CHAIN_SUM, {**LETTERS, "weight": 1.0}], "num_eval": 4,
                 "system_prompt": "Reply as <answer>N</answer>.", "curriculum": {"threshold": 0.5, "window": 2}},
        "rewards": ["reasoning_gym", {"name": "format", "weight": 0.5}],
        "rollout": {"prompts_per_step": 4, "completions_per_prompt": 2, "max_new_tokens": 6},
        "train": {"steps": 2, "eval_every": 1, "save_every": 1, "tensorboard": False, "num_threads": 1},
    })
    summary = train(recipe, tmp_path / "run", show_progress=False)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    evals = [r for r in records if "eval/chain_sum/accuracy" in r]
    assert len(evals) >= 3 and all("eval/letter_counting/accuracy" in r for r in evals)
    steps = [r for r in records if "loss/policy" in r]
    assert all("curriculum/chain_sum/level" in r for r in steps)
    assert any("reward/reasoning_gym/chain_sum" in r or "reward/reasoning_gym/letter_counting" in r for r in steps)
    assert 0.0 <= summary["eval_chain_sum_accuracy_after"] <= 1.0
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    assert set(state["prompt_source"]) == {"chain_sum", "letter_counting"}


@pytest.fixture(scope="module")
def chat_model_512(tmp_path_factory):
    """The tiny char GPT-2 with a 512-token context (a system prompt and a question fit) and a chat template."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from rlhf_pg.models.builtin import char_tokenizer
    from test_chat import TEMPLATE

    path = tmp_path_factory.mktemp("chat-512")
    tokenizer = char_tokenizer()
    tokenizer.model_max_length = 512
    tokenizer.chat_template = TEMPLATE
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _train_recipe(model, steps, **train):
    return recipe_from_dict({
        "model": model,
        "data": {"source": "reasoning_gym", "tasks": [CHAIN_SUM, {**LETTERS, "weight": 1.0}], "num_eval": 2,
                 "system_prompt": "Reply as <answer>N</answer>.", "curriculum": {"threshold": 0.5, "window": 2}},
        "rewards": ["reasoning_gym"],
        "rollout": {"prompts_per_step": 4, "completions_per_prompt": 2, "max_new_tokens": 4},
        "train": {"steps": steps, "eval_every": 0, "save_every": 1, "tensorboard": False, "num_threads": 1,
                  "log_completions_every": 1, **train},
    })


def test_a_resumed_run_draws_the_same_prompts_with_the_curriculum_where_it_was(chat_model_512, tmp_path, monkeypatch):
    import rlhf_pg.sampling
    from rlhf_pg.trainer import train

    # every completion scores 1 for the curriculum: it moves whenever a task's window fills
    monkeypatch.setattr(rlhf_pg.sampling, "entry_scores", lambda completions, entries, configs=None: [1.0] * len(entries))

    def prompts_by_step(run_dir):
        rows = [json.loads(line) for line in (run_dir / "completions.jsonl").read_text().splitlines()]
        return {step: [r["prompt"] for r in rows if r.get("step") == step and r.get("split") != "eval"]
                for step in (1, 2, 3)}

    train(_train_recipe(chat_model_512, 3), tmp_path / "whole", show_progress=False)
    train(_train_recipe(chat_model_512, 2), tmp_path / "parts", show_progress=False)
    train(_train_recipe(chat_model_512, 3), tmp_path / "parts", resume=True, show_progress=False)
    whole, parts = prompts_by_step(tmp_path / "whole"), prompts_by_step(tmp_path / "parts")
    assert whole == parts and all(len(whole[step]) == 8 for step in whole)
    state = json.loads((tmp_path / "whole" / "checkpoint-3" / "trainer_state.json").read_text())["prompt_source"]
    resumed = json.loads((tmp_path / "parts" / "checkpoint-3" / "trainer_state.json").read_text())["prompt_source"]
    assert state == resumed and state["chain_sum"]["levels"]["num_terms"] >= 1  # the curriculum moved, and resumed


def test_sft_trains_on_gold_answers_in_answer_tags(chat_model_512, tmp_path):
    from rlhf_pg.sft import Demonstrations, train_sft

    recipe = _train_recipe(chat_model_512, 1, save_every=0)
    demos = Demonstrations(recipe, 4)
    prompts, completions = demos.batch(0)
    _, columns = prompt_source(recipe.data, 4, recipe.data.shuffle_seed + recipe.seed)[0].batch(0)
    assert completions == [f"<answer>{answer}</answer>" for answer in columns["answer"]]
    summary = train_sft(recipe, tmp_path / "sft", show_progress=False)
    assert "eval_chain_sum_accuracy_after" in summary


def test_a_checker_that_raises_scores_zero_and_is_counted(monkeypatch):
    source = prompt_source(data_recipe().data, 4, seed=0)[0]
    prompts, columns = source.batch(0)
    dataset_class = reasoning_gym.factory.DATASETS["chain_sum"][0]

    def broken(self, answer, entry):
        if answer == "boom":
            raise ValueError("cannot read it")
        return 1.0

    monkeypatch.setattr(dataset_class, "score_answer", broken)
    scorer = RewardScorer(data_recipe().rewards)
    _, per_reward = scorer(prompts, ["<answer>boom</answer>", "<answer>1</answer>"] * 2, **columns)
    assert per_reward["reasoning_gym"] == [0.0, 1.0, 0.0, 1.0]
    metrics, notes = scorer.take_stats()
    assert metrics["reward/reasoning_gym/checker_errors"] == 2.0 and "score_answer raised on 'boom'" in notes[0]
