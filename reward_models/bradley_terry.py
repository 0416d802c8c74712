"""Train a Bradley-Terry reward model on preference pairs: ``rlhf-pg reward-model RECIPE``.

    P(chosen > rejected) = sigma(r_phi(chosen) - r_phi(rejected))
    loss = -(1/N) sum_i log sigma(r_phi(chosen_i) - r_phi(rejected_i))       (rlhf_pg.core.losses.bradley_terry_loss)

r_phi is an ``AutoModelForSequenceClassification`` with one output (the score at the last real token).
Each step encodes B chosen and B rejected texts in one right-padded batch of 2B rows, splits the
scores, takes the loss and an AdamW step. Writes ``DIR/final/`` (model + tokenizer, loadable with
``from_pretrained``), ``DIR/metrics.jsonl`` and ``DIR/summary.json`` (``heldout_pair_accuracy``: the
fraction of held-out pairs whose chosen text scores higher). The loop (evaluation, checkpoints,
signals, ``--resume``, the atomic final save) is ``rlhf_pg.run.loop``, as for every command.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from rlhf_pg.core.losses import bradley_terry_loss
from rlhf_pg.errors import UserError
from rlhf_pg.run import checkpoint as ckpt
from rlhf_pg.run.accel import new_accelerator, set_threads
from rlhf_pg.run.loop import Job, run_job
from rlhf_pg.run.metrics import progress_bar
from rlhf_pg.run.optim import build_optimizer, build_scheduler, step_scheduler
from rlhf_pg.run.rundir import RunDir

from .config import RewardModelBackbone, RewardModelRecipe
from .preferences import PreferencePairs, load_preference_dataset, pairs_from_dataset, write_jsonl

RUN_MARKER = "reward_model_recipe.yaml"


# --- the model --------------------------------------------------------------------------------------


def build_reward_model(config: RewardModelBackbone):
    """``(model, tokenizer)``: pretrained weights with a new one-output score head, or a small model from scratch."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rlhf_pg.models.builtin import char_tokenizer
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
        columns = (data.prompt_column, data.chosen_column, data.rejected_column)
        train_set = load_preference_dataset(data.path, data.split, columns)
        source = repr(data.path)
        if data.eval_split is not None:
            eval_set = load_preference_dataset(data.path, data.eval_split, columns)
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
    from rlhf_pg.models.config import ModelConfig
    from rlhf_pg.models import load_policy

    from .arith_preferences import generate_arith_preferences

    data = recipe.data
    started = time.perf_counter()
    model, tokenizer, _ = load_policy(ModelConfig(name_or_path=data.generator))
    with progress_bar(progress) as bar:
        task = bar.add_task("generating preference pairs", total=data.num_pairs, status="")
        records = generate_arith_preferences(
            model, tokenizer, data.num_pairs, data.gold, data.label_noise, data.temperature, data.max_new_tokens,
            data.max_operand, data.heldout_problems, data.shuffle_seed, progress=lambda n: bar.update(task, completed=n),
            prompt_format=data.prompt_format, min_operand=data.min_operand, batch_prompts=data.generation_batch,
            keep_unfinished=data.keep_unfinished)
    return records, {"generation_time_s": round(time.perf_counter() - started, 3)}


def _encode(tokenizer, pairs: PreferencePairs, max_length: int | None) -> list[dict[str, Any]]:
    """Token ids of both sides of each pair; pairs with a side longer than ``max_length`` are dropped."""
    chosen = tokenizer(pairs.chosen, add_special_tokens=pairs.special_tokens)["input_ids"]
    rejected = tokenizer(pairs.rejected, add_special_tokens=pairs.special_tokens)["input_ids"]
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


class RewardModelRun(Job):
    """``rlhf-pg reward-model``: the shared loop over Bradley-Terry steps (``epochs`` passes over the pairs).

    Step k takes batch ``k % n`` of epoch ``k // n`` in an order seeded by (seed, epoch), so a resumed
    run sees exactly the batches the uninterrupted one would have.
    """

    command = "reward-model"
    score = "pair_accuracy"
    loss_key = "loss/bradley_terry"

    def __init__(self, recipe: RewardModelRecipe, run_dir: RunDir, accelerator, model, tokenizer, train_examples,
                 eval_examples, info: dict[str, Any], heldout_records, saved: dict[str, Any] | None,
                 resume_from: Path | None):
        train_cfg = recipe.train
        self.recipe, self.run_dir, self.accelerator, self.tokenizer = recipe, run_dir, accelerator, tokenizer
        self.train_examples, self.eval_examples, self.info, self.heldout_records = (
            train_examples, eval_examples, info, heldout_records)
        world = accelerator.num_processes
        self.batches_per_epoch = max(1, math.ceil(len(train_examples) / train_cfg.batch_size))
        self.steps = train_cfg.epochs * self.batches_per_epoch
        self.eval_every, self.save_every = train_cfg.eval_every, train_cfg.save_every
        self.max_nonfinite_steps, self.tensorboard = train_cfg.max_nonfinite_steps, train_cfg.tensorboard
        self.report_to = train_cfg.report_to
        self.seed, self.is_main = recipe.seed, accelerator.is_main_process
        self.init_counters(saved)
        collate = lambda examples: collate_pairs(examples, tokenizer.pad_token_id)  # noqa: E731
        self.collate = collate
        eval_loader = torch.utils.data.DataLoader(eval_examples, batch_size=train_cfg.eval_batch_size, collate_fn=collate)
        if resume_from is not None:
            model = _checkpoint_model(model, resume_from)
        optimizer = build_optimizer(model.parameters(), recipe.optim)
        self.scheduler = build_scheduler(optimizer, recipe.optim, self.steps)
        self.model, self.optimizer, self.eval_loader = accelerator.prepare(model, optimizer, eval_loader)
        if resume_from is not None:
            ckpt.load_training_state(resume_from, self.optimizer, self.scheduler)
        self.rank, self.world = accelerator.process_index, world

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def _batch(self, step: int) -> dict[str, torch.Tensor]:
        """This process's share of the pairs of step ``step``."""
        epoch, index = divmod(step, self.batches_per_epoch)
        order = torch.randperm(len(self.train_examples),
                               generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        size = self.recipe.train.batch_size
        rows = order[index * size : (index + 1) * size].tolist()[self.rank :: self.world] or order[:1].tolist()
        batch = self.collate([self.train_examples[i] for i in rows])
        return {key: value.to(self.accelerator.device) for key, value in batch.items()}

    def step(self, step: int) -> dict[str, float]:
        accelerator, model = self.accelerator, self.model
        started = time.perf_counter()
        model.train()
        batch = self._batch(step)
        with accelerator.autocast():
            chosen, rejected = pair_rewards(model, batch)
            loss = bradley_terry_loss(chosen, rejected, batch.get("margin"))
        accelerator.backward(loss)
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), self.recipe.optim.max_grad_norm or float("inf")))
        mean_loss = float(accelerator.reduce(loss.detach(), "mean"))
        applied = math.isfinite(mean_loss) and math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
        step_scheduler(self.scheduler)
        self.optimizer.zero_grad(set_to_none=True)
        gap = (chosen - rejected).detach()
        metrics = {"loss/bradley_terry": mean_loss,
                   "rm/accuracy": float(accelerator.gather((gap > 0).float()).mean()),
                   "rm/reward_gap": float(accelerator.gather(gap).mean()),
                   "grad/norm": grad_norm, "optim/lr": self.scheduler.get_last_lr()[0],
                   "perf/step_s": time.perf_counter() - started}
        if not applied:
            metrics["train/skipped_updates"] = 1
        return metrics

    def evaluate(self) -> dict[str, Any]:
        return evaluate_pairs(self.model, self.eval_loader, self.accelerator)

    def status(self, metrics: dict[str, float]) -> str:
        return f"loss {metrics['loss/bradley_terry']:.3f}"

    def save_checkpoint(self, step: int) -> Path | None:
        self.accelerator.wait_for_everyone()
        path = None
        if self.is_main:
            state = {**self.counters, "recipe": self.recipe.to_dict()}
            path = ckpt.save_checkpoint(self.run_dir.path, step, self.accelerator.unwrap_model(self.model),
                                        self.tokenizer, self.optimizer, self.scheduler, state,
                                        self.recipe.train.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return path

    def save_final(self, staging: Path, summary: dict[str, Any]) -> None:
        self.accelerator.unwrap_model(self.model).save_pretrained(staging)
        self.tokenizer.save_pretrained(staging)

    def summary(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        recipe = self.recipe
        summary = {
            "heldout_pair_accuracy": after["pair_accuracy"],
            "heldout_pair_accuracy_before": before["pair_accuracy"],
            "heldout_loss": after["loss"],
            "heldout_reward_gap": after["reward_gap"],
            "train_pairs": len(self.train_examples),
            "heldout_pairs": len(self.eval_examples),
            "dropped_pairs": self.info.pop("dropped_pairs"),
            "epochs": recipe.train.epochs,
            **self.info,
            "world_size": self.accelerator.num_processes,
        }
        if self.heldout_records is not None:
            summary["label_noise"] = recipe.data.label_noise
            summary["heldout_gold_agreement"] = _gold_agreement(self.accelerator.unwrap_model(self.model),
                                                                self.tokenizer, recipe, self.heldout_records)
        return summary


def _checkpoint_model(model, checkpoint: Path):
    """The reward model saved in ``checkpoint`` (the same architecture as the recipe's)."""
    from transformers import AutoModelForSequenceClassification

    try:
        return AutoModelForSequenceClassification.from_pretrained(str(checkpoint))
    except Exception as error:  # noqa: BLE001
        raise ckpt.unusable(checkpoint, f"holds a reward model that does not load ({type(error).__name__})") from None


def train_reward_model(recipe: RewardModelRecipe, output_dir: str | Path, resume: bool = False, overwrite: bool = False,
                       show_progress: bool = True) -> dict[str, Any]:
    """Run a reward-model recipe; returns the summary also written to ``DIR/summary.json``."""
    from accelerate.utils import set_seed

    train_cfg = recipe.train
    set_threads(train_cfg.num_threads)
    run_dir = RunDir(output_dir, marker=RUN_MARKER, outputs=("preferences",), what="a reward-model run",
                     resume_may_change={"train.epochs", "output_dir"})
    with run_dir.lock():
        accelerator = new_accelerator(train_cfg.mixed_precision)
        is_main = accelerator.is_main_process
        resume_from = run_dir.prepare(recipe.to_dict(), resume, overwrite, is_main, defaults=type(recipe)().to_dict())
        saved = ckpt.read_trainer_state(resume_from) if resume_from is not None else None
        accelerator.wait_for_everyone()
        set_seed(recipe.seed)
        model, tokenizer = build_reward_model(recipe.model)
        train_pairs, eval_pairs, info = load_pairs(recipe, tokenizer, run_dir.path, is_main, show_progress and is_main)
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
        info["dropped_pairs"] = len(train_pairs) + len(eval_pairs) - len(train_examples) - len(eval_examples)
        run = RewardModelRun(recipe, run_dir, accelerator, model, tokenizer, train_examples, eval_examples, info,
                             heldout_records, saved, resume_from)
        if is_main:
            run_dir.write_marker(recipe.to_dict())
        accelerator.wait_for_everyone()
        return run_job(run, resume_from, show_progress)


def _gold_agreement(model, tokenizer, recipe: RewardModelRecipe, records: list[dict[str, Any]]) -> float:
    """Generated task only: fraction of held-out pairs the reward model orders like the gold reward (noise-free labels)."""
    import datasets

    from .registry import resolve_reward
    from .reward_model import score_texts

    gold = resolve_reward(recipe.data.gold)
    prompts = [r["prompt"] for r in records]
    gold_chosen = gold(prompts, [r["chosen"] for r in records])
    gold_rejected = gold(prompts, [r["rejected"] for r in records])
    model.eval()
    pairs = pairs_from_dataset(datasets.Dataset.from_list(records), tokenizer)
    chosen = score_texts(model, tokenizer, pairs.chosen, recipe.train.eval_batch_size, pairs.special_tokens)
    rejected = score_texts(model, tokenizer, pairs.rejected, recipe.train.eval_batch_size, pairs.special_tokens)
    agree = [(c > r) == (gc > gr) for c, r, gc, gr in zip(chosen, rejected, gold_chosen, gold_rejected)]
    return sum(agree) / len(agree)


__all__ = ["build_reward_model", "train_reward_model", "collate_pairs", "pair_rewards", "evaluate_pairs",
           "RewardModelRun"]
