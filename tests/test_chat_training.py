"""Chat recipes end to end: train with TRL's reward function unchanged, SFT on TRL's conversational pairs,
completion logs, truncation masking and the final save of a model that refuses to be saved."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from test_chat import TEMPLATE

from rlhf_pg.recipe import recipe_from_dict
from rlhf_pg.run.metrics import read_metrics


@pytest.fixture(scope="module")
def chat_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny char GPT-2 with a ChatML-like template saved in its tokenizer (a chat model, to the library)."""
    path = tmp_path_factory.mktemp("chat-model")
    shutil.copytree(tiny_model_dir, path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return str(path)


def _chat_data(path, rows=24):
    with open(path, "w") as handle:
        for i in range(rows):
            prompt = [{"role": "user", "content": f"{i % 10}+1?"}]
            handle.write(json.dumps({"prompt": prompt, "completion": [{"role": "assistant", "content": "77"}]}) + "\n")
    return str(path)


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed (pip install trl)")
def test_a_chat_recipe_trains_with_trls_think_format_reward_unchanged(chat_model_dir, tmp_path):
    from rlhf_pg.trainer import train

    recipe = recipe_from_dict({
        "model": chat_model_dir,
        "data": {"task": None, "path": _chat_data(tmp_path / "chat.jsonl"), "num_eval": 4},
        "rewards": [{"name": "rewards_for_tests:sevens"}, {"name": "trl.rewards:think_format_reward", "weight": 0.0}],
        "rollout": {"prompts_per_step": 4, "completions_per_prompt": 2, "max_new_tokens": 6, "mask_truncated": True},
        "train": {"steps": 2, "eval_every": 0, "tensorboard": False, "num_threads": 1, "log_completions_every": 1},
    })
    summary = train(recipe, tmp_path / "run", show_progress=False)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss/policy" in r]
    assert all("reward/think_format_reward/mean" in r and "completion/truncated" in r for r in records)
    assert all(0.0 <= r["completion/truncated"] <= 1.0 and r["policy/entropy"] > 0 for r in records)
    rows = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r.get("split") != "eval"]
    assert [r["step"] for r in trained] == [1] * 8 + [2] * 8  # every completion of steps 1 and 2
    assert all(isinstance(r["prompt"], list) and r["prompt"][0]["role"] == "user" for r in trained)
    assert all({"completion", "reward", "advantage", "reward/sevens", "truncated"} <= set(r) for r in trained)
    assert {r["step"] for r in rows if r.get("split") == "eval"} == {0, 2}  # before and after training
    assert summary["eval_truncated_after"] >= 0.0


def test_sft_on_conversational_pairs_learns_the_assistant_turn_and_its_end_token(chat_model_dir, tmp_path):
    from rlhf_pg.sft import train_sft

    recipe = recipe_from_dict({
        "model": chat_model_dir,
        "data": {"task": None, "path": _chat_data(tmp_path / "chat.jsonl", 40), "num_eval": 8},
        "rewards": [{"name": "rewards_for_tests:sevens"}],
        "sft": {"batch_size": 8}, "optim": {"lr": 3e-3}, "rollout": {"max_new_tokens": 4},
        "train": {"steps": 60, "eval_every": 0, "tensorboard": False, "num_threads": 1},
    })
    summary = train_sft(recipe, tmp_path / "run", show_progress=False)
    assert summary["eval_nll_after"] < 0.25 * summary["eval_nll_before"], summary
    # greedy decoding now writes the reply and stops at the end token (not truncated)
    assert summary["eval_reward_after"] == pytest.approx(1.0) and summary["eval_truncated_after"] == 0.0


def test_mask_truncated_removes_exactly_the_truncated_rows_from_the_gradient(tiny_model_dir, tmp_path):
    from rlhf_pg.core.mdp import mask_truncated
    from rlhf_pg.run.accel import new_accelerator
    from rlhf_pg.trainer import policy_update, setup, update_settings

    recipe = recipe_from_dict({"model": tiny_model_dir, "data": {"max_operand": 9, "num_eval": 4},
                               "rewards": [{"name": "rewards_for_tests:char_codes"}],
                               "rollout": {"prompts_per_step": 4, "completions_per_prompt": 2, "max_new_tokens": 2},
                               "algorithm": {"baseline": "none"}, "optim": {"max_grad_norm": None}})
    run, _ = setup(recipe, tmp_path)
    from rlhf_pg.sampling import sample_step

    scored = sample_step(run, 0)
    batch = scored.batch
    batch.finished = torch.tensor([True, False, False, True, True, False, True, False])  # which rows hit the limit
    advantages = torch.ones_like(batch.completion_mask) * batch.completion_mask

    def gradient(rollout, rows):
        captured = {}
        run.optimizer.step = lambda: captured.update({n: p.grad.clone() for n, p in run.unwrapped.named_parameters()})
        policy_update(run.policy, run.optimizer, new_accelerator("no"), rollout, advantages[rows],
                      global_counts=(float(len(batch)), float(batch.completion_mask.sum())), **update_settings(recipe))
        return captured

    masked = gradient(mask_truncated(batch), list(range(len(batch))))
    finished_rows = batch.finished.nonzero().flatten().tolist()
    only_finished = gradient(batch.select(finished_rows), finished_rows)  # same normalisation, fewer rows
    for name in masked:
        assert torch.allclose(masked[name], only_finished[name], atol=1e-6), name


# --- a learned reward model on chat prompts (the classic RLHF case) ----------------------------------------


def _chat_reward_model_dir(path, template=TEMPLATE, seed=0):
    """A tiny Llama sequence classifier (one output) over the char tokenizer, with a chat template when given."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rlhf_pg.models.builtin import char_tokenizer

    tokenizer = char_tokenizer()
    tokenizer.chat_template = template
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, max_position_embeddings=64)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_the_reward_model_reads_a_chat_sample_through_its_own_chat_template(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from reward_models.reward_model import reward_model

    rm_dir = _chat_reward_model_dir(tmp_path / "rm")
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    prompts = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2?"}]] * 2
    completions = [[{"role": "assistant", "content": "3"}], [{"role": "assistant", "content": "33"}]]
    scores = reward_model(prompts, completions, path=rm_dir, finished=[True, False])
    # the texts written out by hand from the template: a finished reply closes its turn, a truncated one stays open
    texts = ["<bos><system>be brief<eos>\n<user>1+2?<eos>\n<assistant>3<eos>\n",
             "<bos><system>be brief<eos>\n<user>1+2?<eos>\n<assistant>33"]
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    with torch.no_grad():  # one plain forward per text, unpadded
        expected = [float(model(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0])
                    for text in texts]
    assert scores == pytest.approx(expected, abs=1e-5)


def test_without_a_chat_template_the_reward_model_reads_the_joined_contents(tmp_path):
    from reward_models.preferences import reward_texts

    tokenizer = AutoTokenizer.from_pretrained(_chat_reward_model_dir(tmp_path / "rm", template=None))
    texts = reward_texts(tokenizer, [[{"role": "user", "content": "1+2?"}]] * 2, ["3", "4"], finished=[True, False])
    assert texts == ["1+2?\n3" + tokenizer.eos_token, "1+2?\n4"]


def test_a_chat_recipe_trains_against_a_learned_reward_model(chat_model_dir, tmp_path):
    """RLHF on a chat model: the reward_model reward on conversation prompts, through train, end to end."""
    from rlhf_pg.trainer import train

    rm_dir = _chat_reward_model_dir(tmp_path / "rm")
    recipe = recipe_from_dict({
        "model": chat_model_dir,
        "data": {"task": "arithmetic", "prompt_format": "chat", "max_operand": 9, "num_eval": 4},
        "rewards": [{"name": "reward_model", "path": rm_dir}, {"name": "arithmetic_last_integer", "weight": 0.0}],
        "rollout": {"prompts_per_step": 4, "completions_per_prompt": 2, "max_new_tokens": 4},
        "train": {"steps": 2, "eval_every": 0, "tensorboard": False, "num_threads": 1},
    })
    summary = train(recipe, tmp_path / "run", show_progress=False)
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss/policy" in r]
    assert len(records) == 2 and all(r["reward/reward_model/mean"] == r["reward/reward_model/mean"] for r in records)
    assert summary["eval_reward_reward_model_after"] == summary["eval_reward_after"]  # the gold monitor has weight 0
