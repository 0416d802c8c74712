"""Train a Bradley-Terry reward model on preference pairs: ``rlhf-pg reward-model RECIPE``.

    P(chosen > rejected) = sigma(r_phi(chosen) - r_phi(rejected))
    loss = -(1/N) sum_i log sigma(r_phi(chosen_i) - r_phi(rejected_i))       (rlhf_pg.core.losses.bradley_terry_loss)

r_phi is an ``AutoModelForSequenceClassification`` with one output (the score at the last real token).
Each step encodes B chosen and B rejected texts in one right-padded batch of 2B rows, splits the
scores, takes the loss and an AdamW step. Writes ``DIR/final/`` (model + tokenizer, loadable with
``from_pretrained``), ``DIR/metrics.jsonl`` and ``DIR/summary.json`` (``heldout_pair_accuracy``: the
fraction of held-out pairs whose chosen text scores higher).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from rlhf_pg.config import RewardModelBackbone, RewardModelRecipe
from rlhf_pg.errors import UserError
from rlhf_pg.core.losses import bradley_terry_loss
from rlhf_pg.run.metrics import MetricsLogger, progress_bar

from .preferences import PreferencePairs, load_preference_dataset, pairs_from_dataset, write_jsonl

RUN_MARKER = "reward_model_recipe.yaml"


# --- the model --------------------------------------------------------------------------------------


def build_reward_model(config: RewardModelBackbone):
    """``(model, tokenizer)``: pretrained weights with a new one-output score head, or a small model from scratch."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rlhf_pg.builtin import char_tokenizer
    from rlhf_pg.models import load_tokenizer, resolve_model_path

    weights = resolve_model_path(config.name_or_path) if config.name_or_path else None
    if config.tokenizer == "builtin:char":
        tokenizer = char_tokenizer()
    else:
        source = resolve_model_path(config.tokenizer) if config.tokenizer else weights
        if source is None:
            raise UserError("model.tokenizer: a model built from model.config needs a tokenizer: 'builtin:char' "
                            "or a tokenizer directory / hub id")
        tokenizer = load_tokenizer(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if weights is not None:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "score.weight newly initialized" is the point, not a problem
        try:
            model = AutoModelForSequenceClassification.from_pretrained(weights, num_labels=1)
        except Exception as error:  # noqa: BLE001
            raise UserError(f"model: cannot load {config.name_or_path!r} for sequence classification: "
                            f"{type(error).__name__}: {error}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
    else:
        settings = dict(config.config)
        model_type = settings.pop("model_type")
        special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id}
        try:
            model_config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), num_labels=1,
                                                **{**special, **settings})
            model = AutoModelForSequenceClassification.from_config(model_config)
        except (ValueError, TypeError, KeyError) as error:
            raise UserError(f"model.config: cannot build a {model_type!r} sequence classifier: {error}") from None
    model.config.pad_token_id = tokenizer.pad_token_id  # sequence classifiers find the last real token with it
    return model, tokenizer


# --- data -------------------------------------------------------------------------------------------


def load_pairs(recipe: RewardModelRecipe, tokenizer, output_dir: Path, is_main: bool = True,
               progress: bool = True) -> tuple[PreferencePairs, PreferencePairs, dict[str, Any]]:
    """``(train, held out, info)``. Generated pairs are also written to ``DIR/preferences/{train,test}.jsonl``
    (reusable with ``data.path: DIR/preferences``, ``data.eval_split: test``); ``info["heldout_records"]`` holds them.
    """
    import datasets

    data = recipe.data
    info: dict[str, Any] = {}
    if data.path is None:
        records, info = _generate(recipe, progress)
        generator = torch.Generator().manual_seed(data.shuffle_seed)
        order = torch.randperm(len(records), generator=generator).tolist()
        held_out = [records[i] for i in order[: data.num_eval]]
        training = [records[i] for i in order[data.num_eval :]]
        if is_main:
            write_jsonl(training, output_dir / "preferences" / "train.jsonl")
            write_jsonl(held_out, output_dir / "preferences" / "test.jsonl")
        info["heldout_records"] = held_out
        train_set, eval_set = datasets.Dataset.from_list(training), datasets.Dataset.from_list(held_out)
        source = "generated pairs"
    else:
        train_set = load_preference_dataset(data.path, data.split)
        source = repr(data.path)
        if data.eval_split is not None:
            eval_set = load_preference_dataset(data.path, data.eval_split)
        else:
            if len(train_set) <= data.num_eval:
                raise UserError(f"data: {len(train_set)} pairs cannot give {data.num_eval} held-out pairs and leave "
                                "some for training; lower data.num_eval or set data.eval_split")
            split = train_set.train_test_split(test_size=data.num_eval, seed=data.shuffle_seed, shuffle=True)
            train_set, eval_set = split["train"], split["test"]
    columns = (data.chosen_column, data.rejected_column, data.prompt_column)
    train_pairs = pairs_from_dataset(train_set, tokenizer, *columns, source=f"{source} split {data.split!r}")
    eval_pairs = pairs_from_dataset(eval_set, tokenizer, *columns, source=f"{source} held-out pairs")
    return train_pairs, eval_pairs, info


def _generate(recipe: RewardModelRecipe, progress: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from rlhf_pg.config import ModelConfig
    from rlhf_pg.models import load_policy

    from .arith_preferences import generate_arith_preferences

    data = recipe.data
    started = time.perf_counter()
    model, tokenizer, _ = load_policy(ModelConfig(name_or_path=data.generator))
    with progress_bar(progress) as bar:
        task = bar.add_task("generating preference pairs", total=data.num_pairs, status="")
        records = generate_arith_preferences(
            model, tokenizer, data.num_pairs, data.gold, data.label_noise, data.temperature, data.max_new_tokens,
            data.max_operand, data.heldout_problems, data.shuffle_seed, progress=lambda n: bar.update(task, completed=n))
    return records, {"generation_time_s": round(time.perf_counter() - started, 3)}


def _encode(tokenizer, pairs: PreferencePairs, max_length: int | None) -> list[dict[str, Any]]:
    """Token ids of both sides of each pair; pairs with a side longer than ``max_length`` are dropped."""
    chosen = tokenizer(pairs.chosen, add_special_tokens=True)["input_ids"]
    rejected = tokenizer(pairs.rejected, add_special_tokens=True)["input_ids"]
    examples = []
    for index, (good, bad) in enumerate(zip(chosen, rejected)):
        if max_length is not None and max(len(good), len(bad)) > max_length:
            continue
        example = {"chosen_ids": good, "rejected_ids": bad}
        if pairs.margin is not None:
            example["margin"] = pairs.margin[index]
        examples.append(example)
    return examples


def collate_pairs(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask`` ``[2B, L]``, right-padded: rows 0..B-1 chosen, B..2B-1 rejected."""
    rows = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "margin" in examples[0]:
        batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
    return batch


def pair_rewards(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r_chosen [B], r_rejected [B])`` from one forward over the 2B rows of ``collate_pairs``."""
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
    return scores.chunk(2)


# --- the run ----------------------------------------------------------------------------------------


def _prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
    holds_run = any((output_dir / name).exists() for name in (RUN_MARKER, "summary.json", "metrics.jsonl", "final"))
    if holds_run and not overwrite:
        raise UserError(f"{output_dir} already holds a reward-model run; pass --overwrite to replace it or choose "
                        "another --output-dir")
    if holds_run:
        for name in ("final", "preferences", "tensorboard"):
            shutil.rmtree(output_dir / name, ignore_errors=True)
        for name in ("metrics.jsonl", "summary.json", RUN_MARKER):
            (output_dir / name).unlink(missing_ok=True)


@torch.no_grad()
def evaluate_pairs(model, loader, accelerator) -> dict[str, float]:
    """Held-out pair accuracy (a tie counts 1/2), mean loss and mean reward gap over every pair of ``loader``."""
    was_training = model.training
    model.eval()
    gaps = []
    for batch in loader:
        chosen, rejected = pair_rewards(model, batch)
        gaps.append(accelerator.gather_for_metrics(chosen - rejected))
    gap = torch.cat(gaps)
    if was_training:
        model.train()
    return {
        "pair_accuracy": float(((gap > 0).float() + 0.5 * (gap == 0).float()).mean()),
        "loss": float(-torch.nn.functional.logsigmoid(gap).mean()),
        "reward_gap": float(gap.mean()),
    }


def train_reward_model(recipe: RewardModelRecipe, output_dir: str | Path, overwrite: bool = False,
                       show_progress: bool = True) -> dict[str, Any]:
    """Run a reward-model recipe; returns the summary also written to ``DIR/summary.json``."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from rlhf_pg.trainer import new_accelerator

    started = time.perf_counter()
    train_cfg, optim = recipe.train, recipe.optim
    if train_cfg.num_threads:
        torch.set_num_threads(train_cfg.num_threads)
    accelerator = new_accelerator(train_cfg.mixed_precision)
    is_main = accelerator.is_main_process
    output_dir = Path(output_dir)
    if is_main:
        _prepare_output_dir(output_dir, overwrite)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_MARKER).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    accelerator.wait_for_everyone()
    set_seed(recipe.seed)

    model, tokenizer = build_reward_model(recipe.model)
    train_pairs, eval_pairs, info = load_pairs(recipe, tokenizer, output_dir, is_main, show_progress and is_main)
    heldout_records = info.pop("heldout_records", None)
    train_examples = _encode(tokenizer, train_pairs, train_cfg.max_length)
    eval_examples = _encode(tokenizer, eval_pairs, train_cfg.max_length)
    if not train_examples or not eval_examples:
        raise UserError(f"train.max_length={train_cfg.max_length} drops every training or held-out pair; raise it")
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    longest = max(max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in train_examples + eval_examples)
    if context and longest > context:
        raise UserError(f"the longest pair is {longest} tokens but the reward model reads at most {context}; "
                        f"set train.max_length: {context} to drop longer pairs")

    collate = lambda examples: collate_pairs(examples, tokenizer.pad_token_id)  # noqa: E731
    generator = torch.Generator().manual_seed(recipe.seed)
    train_loader = torch.utils.data.DataLoader(train_examples, batch_size=train_cfg.batch_size, shuffle=True,
                                               collate_fn=collate, generator=generator)
    eval_loader = torch.utils.data.DataLoader(eval_examples, batch_size=train_cfg.eval_batch_size, collate_fn=collate)
    total_steps = train_cfg.epochs * len(train_loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2),
                                  weight_decay=optim.weight_decay)
    schedule = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[optim.schedule]
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=optim.warmup_steps, num_training_steps=total_steps)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)

    logger = MetricsLogger(output_dir, enabled=is_main, tensorboard=train_cfg.tensorboard)
    before = evaluate_pairs(model, eval_loader, accelerator)
    logger.log(0, {f"eval/{k}": v for k, v in before.items()})
    step, last_eval = 0, before
    train_started = time.perf_counter()
    model.train()
    with progress_bar(show_progress and is_main) as bar:
        task = bar.add_task("reward model", total=total_steps, status=f"held-out acc {before['pair_accuracy']:.3f}")
        for _ in range(train_cfg.epochs):
            for batch in train_loader:
                with accelerator.autocast():
                    chosen, rejected = pair_rewards(model, batch)
                    loss = bradley_terry_loss(chosen, rejected, batch.get("margin"))
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.max_grad_norm or float("inf"))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                gap = (chosen - rejected).detach()
                metrics = {"loss/bradley_terry": float(accelerator.reduce(loss.detach(), "mean")),
                           "rm/accuracy": float(accelerator.gather((gap > 0).float()).mean()),
                           "rm/reward_gap": float(accelerator.gather(gap).mean()),
                           "grad/norm": float(grad_norm), "optim/lr": scheduler.get_last_lr()[0]}
                if train_cfg.eval_every and step % train_cfg.eval_every == 0 and step < total_steps:
                    last_eval = evaluate_pairs(model, eval_loader, accelerator)
                    metrics.update({f"eval/{k}": v for k, v in last_eval.items()})
                logger.log(step, metrics)
                if not math.isfinite(metrics["loss/bradley_terry"]):
                    raise UserError(f"the Bradley-Terry loss became {metrics['loss/bradley_terry']} at step {step}; "
                                    "lower optim.lr")
                bar.update(task, completed=step, status=(f"loss {metrics['loss/bradley_terry']:.3f} | held-out acc "
                                                         f"{last_eval['pair_accuracy']:.3f}"))
    train_time = time.perf_counter() - train_started
    final = evaluate_pairs(model, eval_loader, accelerator)
    logger.log(step, {f"eval/{k}": v for k, v in final.items()})
    logger.close()
    summary = {
        "heldout_pair_accuracy": final["pair_accuracy"],
        "heldout_pair_accuracy_before": before["pair_accuracy"],
        "heldout_loss": final["loss"],
        "heldout_reward_gap": final["reward_gap"],
        "train_pairs": len(train_examples),
        "heldout_pairs": len(eval_examples),
        "dropped_pairs": len(train_pairs) + len(eval_pairs) - len(train_examples) - len(eval_examples),
        "epochs": train_cfg.epochs,
        "steps": step,
        "train_time_s": round(train_time, 3),
        **info,
        "wall_time_s": round(time.perf_counter() - started, 3),
        "world_size": accelerator.num_processes,
        "final_model_dir": str(output_dir / "final"),
    }
    if heldout_records is not None:
        summary["label_noise"] = recipe.data.label_noise
        summary["heldout_gold_agreement"] = _gold_agreement(accelerator.unwrap_model(model), tokenizer, recipe,
                                                            heldout_records)
    accelerator.wait_for_everyone()
    if is_main:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(output_dir / "final")
        tokenizer.save_pretrained(output_dir / "final")
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary


def _gold_agreement(model, tokenizer, recipe: RewardModelRecipe, records: list[dict[str, Any]]) -> float:
    """Generated task only: fraction of held-out pairs the reward model orders like the gold reward (noise-free labels)."""
    import datasets

    from .registry import resolve_reward
    from .scoring import score_texts

    gold = resolve_reward(recipe.data.gold)
    prompts = [r["prompt"] for r in records]
    gold_chosen = gold(prompts, [r["chosen"] for r in records])
    gold_rejected = gold(prompts, [r["rejected"] for r in records])
    model.eval()
    pairs = pairs_from_dataset(datasets.Dataset.from_list(records), tokenizer)
    chosen = score_texts(model, tokenizer, pairs.chosen, recipe.train.eval_batch_size)
    rejected = score_texts(model, tokenizer, pairs.rejected, recipe.train.eval_batch_size)
    agree = [(c > r) == (gc > gr) for c, r, gc, gr in zip(chosen, rejected, gold_chosen, gold_rejected)]
    return sum(agree) / len(agree)


__all__ = ["build_reward_model", "train_reward_model", "collate_pairs", "pair_rewards", "evaluate_pairs"]
