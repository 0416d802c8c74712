"""Learned reward models: TRL preference formats, re-encoding with the reward model's own tokenizer,
a short Bradley-Terry run that learns, generated preference pairs, and RL against a reward model."""

import json
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from reward_models.preferences import pairs_from_dataset, reward_texts
from reward_models.reward_model import load_reward_model, reward_model
from rlhf_pg.models.builtin import char_tokenizer
from reward_models.config import load_reward_model_recipe, reward_model_recipe_from_dict
from rlhf_pg.errors import RecipeError, UserError


def word_piece_tokenizer():
    """A tokenizer unlike the policy's: other ids, a [CLS] prefix, '</s>' as EOS, multi-character tokens."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[CLS]", "</s>", "[UNK]"]
    characters = list("9876543210+= abcdefghijklmnopqrstuvwxyz")
    merged = ["12", "34", "77"]
    vocab = {token: index for index, token in enumerate(specials + characters + merged)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("1", "2"), ("3", "4"), ("7", "7")], unk_token="[UNK]"))
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="</s>", unk_token="[UNK]",
                                   cls_token="[CLS]")


def save_tiny_reward_model(path, tokenizer, seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id,
                         max_position_embeddings=64)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_reward_model_re_encodes_policy_text_with_its_own_tokenizer(tmp_path):
    rm_dir = save_tiny_reward_model(tmp_path / "rm", word_piece_tokenizer())
    policy_tokenizer = char_tokenizer()
    rm_tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    # the two vocabularies really differ: same text, different ids and lengths
    assert policy_tokenizer("12+34=46")["input_ids"] != rm_tokenizer("12+34=46")["input_ids"]
    assert len(rm_tokenizer("12+34=46")["input_ids"]) == 1 + 6  # [CLS] 12 + 34 = 4 6

    # the policy's completions, decoded from *its* ids (as the trainer does)
    prompts = ["12+34=", "7+70=", "1+1="]
    completion_ids = [policy_tokenizer(c, add_special_tokens=False)["input_ids"] for c in ["46", "77", "2 "]]
    completions = policy_tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    assert completions == ["46", "77", "2 "]
    finished = [True, False, True]
    scores = reward_model(prompts, completions, path=rm_dir, finished=finished, batch_size=2)

    model = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    expected = []
    for prompt, completion, done in zip(prompts, completions, finished):
        text = prompt + completion + ("</s>" if done else "")
        ids = rm_tokenizer(text, return_tensors="pt")["input_ids"]
        assert ids[0, 0].item() == rm_tokenizer.cls_token_id
        assert (ids[0, -1].item() == rm_tokenizer.eos_token_id) == done  # EOS only for finished completions
        with torch.no_grad():
            expected.append(model(input_ids=ids).logits[0, 0].item())
    assert scores == pytest.approx(expected, abs=1e-5)
    # batching and padding do not change a score
    assert reward_model(prompts, completions, path=rm_dir, finished=finished, batch_size=64) == pytest.approx(expected, abs=1e-5)
    # loaded once per process and device
    assert load_reward_model(rm_dir)[0] is load_reward_model(rm_dir)[0]
    assert not load_reward_model(rm_dir)[0].training


def test_trl_explicit_and_implicit_prompt_formats_give_the_same_texts():
    import datasets

    tokenizer = char_tokenizer()
    explicit = datasets.Dataset.from_list([{"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": 0.5}])
    implicit = datasets.Dataset.from_list([{"chosen": "1+1=2", "rejected": "1+1=3<eos>"}])
    a, b = pairs_from_dataset(explicit, tokenizer), pairs_from_dataset(implicit, tokenizer)
    assert a.chosen == b.chosen == ["1+1=2<eos>"] and a.rejected == b.rejected == ["1+1=3<eos>"]
    assert a.margin == [0.5] and b.margin is None
    # the EOS text is the EOS token, as in scoring a finished completion
    assert tokenizer(a.chosen[0])["input_ids"][-1] == tokenizer.eos_token_id
    assert reward_texts(tokenizer, ["1+1="], ["2"], [True]) == a.chosen
    conversational = datasets.Dataset.from_list([{"chosen": [{"role": "user", "content": "hi"}],
                                                  "rejected": [{"role": "user", "content": "yo"}]}])
    with pytest.raises(UserError, match="need a tokenizer with a chat template"):
        pairs_from_dataset(conversational, tokenizer)
    with pytest.raises(UserError, match="has no column 'chosen'"):
        pairs_from_dataset(datasets.Dataset.from_list([{"good": "a", "rejected": "b"}]), tokenizer)


def sevens_preferences(path, num_pairs, seed=0):
    """Pairs of random digit strings; the one with more 7s is chosen (a rule a small model can learn)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < num_pairs:
        first, second = ("".join(rng.choice("0123456789777") for _ in range(rng.randint(1, 4))) for _ in range(2))
        if first.count("7") == second.count("7"):
            continue
        chosen, rejected = (first, second) if first.count("7") > second.count("7") else (second, first)
        rows.append({"prompt": f"{rng.randint(0, 99)}+{rng.randint(0, 99)}=", "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_a_short_bradley_terry_run_learns_the_preference_and_saves_a_reward_model(tmp_path):
    from reward_models.bradley_terry import train_reward_model

    data = sevens_preferences(tmp_path / "pairs.jsonl", 700)
    recipe = reward_model_recipe_from_dict({
        "model": {"name_or_path": None, "tokenizer": "builtin:char",
                  "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}},
        "data": {"path": data, "num_eval": 150},
        "optim": {"lr": 3e-3},
        "train": {"epochs": 4, "batch_size": 32, "eval_every": 0, "tensorboard": False, "num_threads": 1},
    })
    summary = train_reward_model(recipe, tmp_path / "run", show_progress=False)
    assert summary["train_pairs"] == 550 and summary["heldout_pairs"] == 150
    assert summary["heldout_pair_accuracy"] >= 0.85, summary
    assert summary["heldout_pair_accuracy"] > summary["heldout_pair_accuracy_before"] + 0.2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["heldout_pair_accuracy"] == summary["heldout_pair_accuracy"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final")
    assert model.config.num_labels == 1
    # the saved model is a reward function: more 7s, higher reward
    scores = reward_model(["3+4="] * 2, ["777", "123"], path=str(tmp_path / "run" / "final"))
    assert scores[0] > scores[1]
    with pytest.raises(UserError, match="already holds a reward-model run"):
        train_reward_model(recipe, tmp_path / "run", show_progress=False)


def test_generated_pairs_are_labelled_by_the_gold_reward_with_the_asked_label_noise(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from reward_models.arith_preferences import generate_arith_preferences
    from reward_models.rules import length_penalty
    from rlhf_pg.tasks.arithmetic import split_problems

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # make the random generator end its answers early: add the EOS direction to every state
        eos = policy.transformer.wte.weight[tokenizer.eos_token_id]
        policy.transformer.ln_f.bias.copy_(1.5 * eos / eos.pow(2).sum())
    records = generate_arith_preferences(policy, tokenizer, 600, gold="length_penalty", label_noise=0.3,
                                         temperature=1.0, max_new_tokens=6, max_operand=20, heldout_problems=50)
    assert len(records) == 600
    heldout = {f"{a}+{b}=" for a, b in split_problems(20, 50, 0)[1]}
    assert not heldout & {r["prompt"] for r in records}
    prompts = [r["prompt"] for r in records]
    chosen = length_penalty(prompts, [r["chosen"] for r in records])
    rejected = length_penalty(prompts, [r["rejected"] for r in records])
    assert all(c != r for c, r in zip(chosen, rejected))  # gold ties are dropped
    flipped = sum(c < r for c, r in zip(chosen, rejected)) / len(records)
    assert abs(flipped - 0.3) < 4 * (0.3 * 0.7 / 600) ** 0.5


def test_rl_against_a_reward_model_logs_proxy_gold_and_kl_every_step(tiny_model_dir, tmp_path):
    from rlhf_pg.recipe import recipe_from_dict
    from rlhf_pg.run.metrics import read_metrics
    from rlhf_pg.trainer import train

    rm_dir = save_tiny_reward_model(tmp_path / "rm", word_piece_tokenizer())
    recipe = recipe_from_dict({
        "model": tiny_model_dir,
        "data": {"task": "arithmetic", "max_operand": 20, "num_eval": 8},
        "rewards": [{"name": "reward_model", "path": rm_dir}, {"name": "arithmetic_exact", "weight": 0.0}],
        "rollout": {"prompts_per_step": 4, "completions_per_prompt": 2, "max_new_tokens": 4},
        "algorithm": {"kl_coef": 0.0, "log_kl": True},
        "train": {"steps": 3, "eval_every": 0, "save_every": 0, "tensorboard": False},
    })
    summary = train(recipe, tmp_path / "run", show_progress=False)
    steps = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record in steps:
        assert "kl/ref" in record and record["kl/coef"] == 0.0
        assert record["reward/mean"] == pytest.approx(record["reward/reward_model/mean"], abs=1e-5)  # gold has weight 0
        assert 0.0 <= record["reward/arithmetic_exact/mean"] <= 1.0
    assert abs(steps[0]["kl/ref"]) < 1e-4  # before the first update the policy is the reference
    for key in ("eval_reward_reward_model_before", "eval_reward_arithmetic_exact_before",
                "eval_reward_reward_model_after", "eval_reward_arithmetic_exact_after"):
        assert key in summary


def test_reward_model_recipes_are_validated_strictly(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown recipe key 'train.epoch'; did you mean 'epochs'"):
        reward_model_recipe_from_dict({"train": {"epoch": 2}})
    with pytest.raises(RecipeError, match=r"data.label_noise: 0.7 is out of range; it must be <= 0.5"):
        reward_model_recipe_from_dict({"data": {"label_noise": 0.7}})
    with pytest.raises(RecipeError, match="is an RL recipe"):
        reward_model_recipe_from_dict({"rewards": ["arithmetic_exact"]})
    with pytest.raises(RecipeError, match="model.config: name the architecture with model_type"):
        reward_model_recipe_from_dict({"model": {"name_or_path": None, "config": {"hidden_size": 8}}})
    recipe_file = tmp_path / "rm.yaml"
    recipe_file.write_text("train: {epochs: 1}\n")
    recipe = load_reward_model_recipe(recipe_file, ["data.num_pairs=800", "model.name_or_path=null", "model.config.model_type=gpt2"])
    assert recipe.data.num_pairs == 800 and recipe.model.config == {"model_type": "gpt2"}
    with pytest.raises(RecipeError, match="unknown recipe key 'optim.lrr'"):
        load_reward_model_recipe(recipe_file, ["optim.lrr=1"])
