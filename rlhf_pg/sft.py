"""Maximum-likelihood fine-tuning (SFT) on prompt/completion pairs: the policy-gradient update with A = 1.

    for step in range(steps):
        (x_i, y_i), i < B  <- demonstrations: dataset rows, or the arithmetic demonstrator's answers
        tau_i              <- (s_0 = x_i, actions = tokens of y_i then EOS): a trajectory of the demonstrator
        theta              <- theta - lr * grad[-(1/B) sum_i sum_t log pi(a_it | s_it) * 1]   (losses.py)

REINFORCE weights the policy's *own* samples by their advantage; SFT weights someone else's samples by
1. The step is literally the trainer's ``policy_update`` on a ``Rollout`` of demonstrations with
advantages = 1, so micro-batching, mixed precision, gradient clipping, non-finite skipping, checkpoints,
metrics and the summary are the ones ``train`` uses. Only completion tokens (and EOS) carry loss;
prompts are left-padded and completions right-padded, padding is masked out.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from . import checkpoint as ckpt
from .config import AlgorithmConfig, Recipe
from .data import PromptSampler, columns_of, load_prompt_datasets
from .errors import NonFiniteError, TrainingInterrupted, UserError
from .evaluation import evaluate
from .mdp import Rollout
from .metrics import MetricsLogger, progress_bar
from .models import context_length, load_causal_lm, load_policy
from .rewards import RewardScorer
from .rollout import SamplingParams, completion_logprobs, encode_prompts
from .tasks.arithmetic import flawed_sum
from .trainer import RUN_MARKER, _scheduler, _StopFlag, new_accelerator, policy_update, prepare_output_dir


# --- demonstrations --------------------------------------------------------------------------------


def demonstration_rollout(tokenizer, prompts: list[str], completions: list[str], device: torch.device | str = "cpu",
                          max_context: int | None = None) -> Rollout:
    """Demonstrations as a batch of trajectories: s_0 = the prompt, actions = the completion's tokens + EOS.

    Prompts are encoded exactly as ``rollout`` encodes them (left-padded, the tokenizer's own special
    tokens); completions without special tokens, EOS appended, right-padded with the pad token.
    ``completion_mask`` is 1 on the completion tokens and EOS. ``logprobs`` (log pi_old) are unknown
    for a demonstrator and left at 0: with one update per batch they are never read.
    """
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, device)
    tokens = [tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in completions]
    longest = max(len(ids) for ids in tokens)
    if max_context is not None and prompt_ids.shape[1] + longest > max_context:
        row = max(range(len(tokens)), key=lambda i: int(prompt_mask[i].sum()) + len(tokens[i]))
        raise UserError(
            f"demonstration {prompts[row]!r} -> {completions[row]!r} is {int(prompt_mask[row].sum()) + len(tokens[row])} "
            f"tokens with EOS; it exceeds the model's context of {max_context} tokens. Shorten or drop the long rows"
        )
    completion_ids = torch.full((len(tokens), longest), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros(len(tokens), longest)
    for row, ids in enumerate(tokens):
        completion_ids[row, : len(ids)] = torch.tensor(ids)
        completion_mask[row, : len(ids)] = 1.0
    completion_ids, completion_mask = completion_ids.to(device), completion_mask.to(device)
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids, completion_mask=completion_mask,
        logprobs=torch.zeros_like(completion_mask), group_ids=torch.arange(len(tokens), device=device),
        prompts=list(prompts), completions=list(completions),
        finished=torch.ones(len(tokens), dtype=torch.bool, device=device),
    )


@torch.no_grad()
def heldout_nll(model, tokenizer, prompts: list[str], completions: list[str], batch_size: int = 256) -> float:
    """Negative log-likelihood per completion token, ``-sum_i sum_t log pi(a_it | s_it) / sum_i T_i`` (nats)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    for start in range(0, len(prompts), batch_size):
        batch = demonstration_rollout(tokenizer, prompts[start : start + batch_size],
                                      completions[start : start + batch_size], device, context_length(model))
        logprobs = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                       batch.completion_mask)
        total -= float(logprobs.sum())
        count += float(batch.completion_mask.sum())
    if was_training:
        model.train()
    return total / max(count, 1.0)


def _as_completion(dataset, column: str):
    """``dataset`` with ``column`` renamed to ``completion`` (replacing a ``completion`` column it may have)."""
    if column == "completion":
        return dataset
    if "completion" in dataset.column_names:
        dataset = dataset.remove_columns("completion")
    return dataset.rename_column(column, "completion")


class Demonstrations:
    """Prompt/completion pairs for each step, and the held-out pairs.

    From ``data.path``: the ``prompt`` and ``data.completion_column`` columns. From the built-in
    arithmetic task: the training problems answered by the demonstrator (``sft.demonstrator``): a fresh
    answer each time a problem is drawn, seeded by (seed, step), so a resumed run sees the same data.
    """

    def __init__(self, recipe: Recipe, batch_size: int):
        self.recipe = recipe
        train_set, eval_set = load_prompt_datasets(recipe.data)
        self.from_task = recipe.data.path is None
        self.forget_carry = 0.0 if recipe.sft.demonstrator == "exact" else recipe.sft.forget_carry
        if not self.from_task:
            column = recipe.data.completion_column
            for name, dataset in (("training", train_set), ("held-out", eval_set)):
                if column not in dataset.column_names:
                    raise UserError(
                        f"data: the {name} rows of {recipe.data.path!r} have no column {column!r} (columns: "
                        f"{', '.join(dataset.column_names)}); set data.completion_column to the column that holds "
                        "the target completions"
                    )
                bad = next((i for i, v in enumerate(dataset[column]) if not isinstance(v, str)), None)
                if bad is not None:
                    raise UserError(f"data: {name} row {bad} of {recipe.data.path!r} has {column}={dataset[bad][column]!r}; "
                                    "every completion must be a string")
            train_set, eval_set = _as_completion(train_set, column), _as_completion(eval_set, column)
        self.sampler = PromptSampler(train_set, batch_size, recipe.data.shuffle_seed + recipe.seed)
        self.eval_prompts, self.eval_columns = columns_of(eval_set)
        self.eval_completions = self._complete(self.eval_prompts, self.eval_columns, random.Random(recipe.data.shuffle_seed))

    def _complete(self, prompts: list[str], columns: dict[str, list[Any]], rng: random.Random) -> list[str]:
        if self.from_task:
            return [str(flawed_sum(a, b, self.forget_carry, rng)) for a, b in zip(columns["a"], columns["b"])]
        return list(columns["completion"])

    def batch(self, step: int) -> tuple[list[str], list[str]]:
        """The global batch of step ``step``: ``(prompts, completions)``."""
        prompts, columns = self.sampler.batch(step)
        rng = random.Random(self.recipe.seed * 1_000_003 + step)
        return prompts, self._complete(prompts, columns, rng)

    def describe(self) -> str:
        if self.from_task:
            if self.forget_carry == 0.0:
                return "arithmetic task, exact demonstrator"
            return f"arithmetic task, flawed demonstrator (forget_carry={self.forget_carry})"
        return f"{self.recipe.data.path} (columns prompt, {self.recipe.data.completion_column})"


# --- the run ---------------------------------------------------------------------------------------


def sft_batch_size(recipe: Recipe) -> int:
    """``sft.batch_size``, by default as many samples per step as RL draws (prompts x completions)."""
    return recipe.sft.batch_size or recipe.rollout.prompts_per_step * recipe.rollout.completions_per_prompt


def train_sft(recipe: Recipe, output_dir: str | Path, resume: bool = False, overwrite: bool = False,
              show_progress: bool = True) -> dict[str, Any]:
    """Maximum-likelihood fine-tuning; writes what ``train`` writes and returns the summary.

    Uses ``model``, ``data`` (+ ``data.completion_column``), ``sft``, ``optim``, ``train``, ``eval``,
    ``rewards`` (held-out greedy reward, as ``train``) and ``algorithm.aggregation``; the other
    ``algorithm`` and ``rollout`` keys are for sampling and do not apply.
    """
    from accelerate.utils import set_seed

    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    accelerator = new_accelerator(recipe.train.mixed_precision)
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    batch_size = sft_batch_size(recipe)
    if batch_size % world:
        raise UserError(f"sft.batch_size={batch_size} must be divisible by the number of processes ({world})")
    demos = Demonstrations(recipe, batch_size)  # bad data or rewards fail before anything is written or loaded
    scorer = RewardScorer(recipe.eval.rewards or recipe.rewards, "eval.rewards" if recipe.eval.rewards else "rewards")
    output_dir = Path(output_dir)
    resume_from = prepare_output_dir(output_dir, recipe, resume, overwrite, is_main)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_MARKER).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    set_seed(recipe.seed)
    # policy_update with one plain update at temperature 1 is exactly maximum likelihood
    ml_recipe = dataclasses.replace(recipe, algorithm=AlgorithmConfig(aggregation=recipe.algorithm.aggregation),
                                    rollout=dataclasses.replace(recipe.rollout, temperature=1.0))

    policy, tokenizer, _ = load_policy(recipe.model)
    previous_state: dict[str, Any] = {}
    if resume_from is not None:
        previous_state = ckpt.read_trainer_state(resume_from)
        policy = load_causal_lm(recipe.model, str(resume_from))
    eval_sampling = SamplingParams(recipe.eval.max_new_tokens or recipe.rollout.max_new_tokens, recipe.eval.temperature)
    max_context = context_length(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=recipe.optim.lr, betas=(recipe.optim.beta1, recipe.optim.beta2),
                                  weight_decay=recipe.optim.weight_decay)
    scheduler = _scheduler(optimizer, recipe)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    start_step = 0
    if resume_from is not None:
        ckpt.load_training_state(resume_from, optimizer, scheduler)
        start_step = int(previous_state["global_step"])
    unwrapped = accelerator.unwrap_model(policy)

    def run_eval() -> dict[str, float]:
        result = evaluate(unwrapped, tokenizer, demos.eval_prompts, demos.eval_columns, scorer, eval_sampling,
                          recipe.eval.batch_size, seed=recipe.seed)
        result["nll"] = heldout_nll(unwrapped, tokenizer, demos.eval_prompts, demos.eval_completions, recipe.eval.batch_size)
        return result

    logger = MetricsLogger(output_dir, enabled=is_main, tensorboard=recipe.train.tensorboard,
                           resume_step=start_step if resume_from is not None else None)
    before = previous_state.get("eval_before")
    if before is None:
        before = {k: v for k, v in run_eval().items() if k in ("reward", "nll")}
        logger.log(0, {"eval/reward": before["reward"], "eval/nll": before["nll"]})
    last_eval = previous_state.get("last_eval")
    counters = {key: previous_state.get(key, 0) for key in ("nonfinite_in_a_row", "skipped_updates", "train_time_s",
                                                            "tokens_total")}
    started = time.perf_counter()
    per_process = batch_size // world
    mine = slice(accelerator.process_index * per_process, (accelerator.process_index + 1) * per_process)

    def save(step: int) -> Path | None:
        state = {"recipe": recipe.to_dict(), "eval_before": before, "last_eval": last_eval, **counters,
                 "wall_time_s": time.perf_counter() - started + float(previous_state.get("wall_time_s", 0.0))}
        accelerator.wait_for_everyone()
        path = None
        if is_main:
            path = ckpt.save_checkpoint(output_dir, step, unwrapped, tokenizer, optimizer, scheduler, state,
                                        recipe.train.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path

    with _StopFlag() as stop, progress_bar(show_progress and is_main) as bar:
        task = bar.add_task("sft", total=recipe.train.steps, completed=start_step, status=f"eval {before['reward']:.3f}")
        for step in range(start_step, recipe.train.steps):
            step_started = time.perf_counter()
            # 1. this process's share of the step's demonstrations, as trajectories
            prompts, completions = demos.batch(step)
            batch = demonstration_rollout(tokenizer, prompts[mine], completions[mine], accelerator.device, max_context)
            # 2. the policy-gradient update with A = 1 on every demonstrated token: maximum likelihood
            advantages = torch.ones_like(batch.completion_mask) * batch.completion_mask
            global_tokens = float(accelerator.reduce(batch.completion_mask.sum(), "sum"))
            results = policy_update(policy, optimizer, accelerator, batch, advantages, ml_recipe, 0.0,
                                    (float(len(batch)), global_tokens / world))
            scheduler.step()
            applied = results[-1].applied
            counters["skipped_updates"] += int(not applied)
            counters["nonfinite_in_a_row"] = 0 if applied else counters["nonfinite_in_a_row"] + 1
            step_time = time.perf_counter() - step_started
            counters["train_time_s"] += step_time
            counters["tokens_total"] += int(global_tokens)
            metrics = {
                "loss/nll": float(accelerator.reduce(torch.tensor(results[-1].loss, device=accelerator.device), "mean")),
                "grad/norm": results[-1].grad_norm,
                "optim/lr": scheduler.get_last_lr()[0],
                "completion/length": global_tokens / batch_size,
                "perf/step_s": step_time,
                "perf/tokens_per_s": global_tokens / step_time if step_time > 0 else 0.0,
            }
            done = step + 1
            if recipe.train.eval_every and done % recipe.train.eval_every == 0 and done < recipe.train.steps:
                result = run_eval()
                last_eval = {"reward": result["reward"], "nll": result["nll"]}
                metrics.update({"eval/reward": result["reward"], "eval/nll": result["nll"]})
                bar.console.log(f"step {done}: eval reward {result['reward']:.3f}, nll {result['nll']:.3f}")
            logger.log(done, metrics)
            shown = last_eval or before
            bar.update(task, completed=done, status=f"nll {metrics['loss/nll']:.3f} | eval {shown['reward']:.3f}"
                                                    f" | {metrics['perf/tokens_per_s']:.0f} tok/s")
            if counters["nonfinite_in_a_row"] >= recipe.train.max_nonfinite_steps:
                raise NonFiniteError(f"{counters['nonfinite_in_a_row']} consecutive updates had a non-finite loss or "
                                     f"gradient (last at step {done}); lower optim.lr or enable optim.max_grad_norm")
            if recipe.train.save_every and done % recipe.train.save_every == 0 and done < recipe.train.steps:
                save(done)
            if stop.signal_name is not None:
                path = save(done)
                logger.close()
                raise TrainingInterrupted(
                    f"stopped by {stop.signal_name} after step {done}; checkpoint written to {path}. "
                    f"Resume with: rlhf-pg sft RECIPE --output-dir {output_dir} --resume", str(path))

    final = run_eval()
    logger.log(recipe.train.steps, {"eval/reward": final["reward"], "eval/nll": final["nll"],
                                    **{f"eval/{k}": v for k, v in final.items() if k.startswith("reward/")}})
    logger.close()
    train_time = counters["train_time_s"]
    summary = {
        "eval_reward_before": before["reward"],
        "eval_reward_after": final["reward"],
        "eval_nll_before": before["nll"],
        "eval_nll_after": final["nll"],
        **{f"eval_{k.replace('/', '_')}_after": v for k, v in final.items() if k.startswith("reward/")},
        "steps": recipe.train.steps,
        "batch_size": batch_size,
        "samples_seen": recipe.train.steps * batch_size,
        "demonstrations": demos.describe(),
        "wall_time_s": round(time.perf_counter() - started + float(previous_state.get("wall_time_s", 0.0)), 3),
        "train_time_s": round(train_time, 3),
        "tokens_per_s": round(counters["tokens_total"] / train_time, 1) if train_time > 0 else None,
        "completion_tokens": counters["tokens_total"],
        "world_size": world,
        "resumed_from_step": start_step if resume_from is not None else None,
        "skipped_updates": counters["skipped_updates"],
        "model": recipe.model.name_or_path,
        "final_model_dir": str(output_dir / "final"),
        "examples": final["examples"],
    }
    accelerator.wait_for_everyone()
    if is_main:
        unwrapped.save_pretrained(output_dir / "final")
        tokenizer.save_pretrained(output_dir / "final")
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary


__all__ = ["Demonstrations", "demonstration_rollout", "heldout_nll", "sft_batch_size", "train_sft"]
