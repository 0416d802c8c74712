"""The loop: rollout -> reward -> advantages -> loss -> optimizer step, through ``accelerate``.

    for step in range(steps):
        prompts            <- the step's prompts (this process's shard; a prompt's group stays together)
        tau_1..tau_N       <- sample completions from pi_theta                      (rollout.py)
        r(tau_i)           <- weighted reward functions, on the last token          (rewards.py)
        r_t               -= beta * KL_t(pi_theta || pi_ref)  (optional penalty)    (losses.py)
        G_t, A_t           <- reward-to-go and baseline over the *global* batch     (advantages.py)
                              (filtered_bc: A_t = 1[G_0 >= threshold], ML on the good samples)
        theta              <- theta - lr * grad[-(1/N) sum_i sum_t log pi(a_it|s_it) A_it]   (losses.py)

The same code runs on CPU, one GPU or many (``accelerate launch``); only the main process writes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from . import checkpoint as ckpt
from .advantages import apply_baseline, discounted_returns, filtered_weights, whiten_advantages
from .config import Recipe
from .data import PromptSampler, columns_of, load_prompt_datasets
from .errors import NonFiniteError, TrainingInterrupted, UserError
from .evaluation import evaluate
from .kl_control import KLController
from .losses import aggregate, clipped_policy_loss, kl_estimate, policy_gradient_loss
from .mdp import Rollout, terminal_rewards
from .metrics import MetricsLogger, progress_bar
from .models import context_length, load_causal_lm, load_policy
from .rewards import RewardScorer
from .rollout import SamplingParams, completion_logprobs, rollout

RUN_MARKER = "recipe.yaml"


# --- pieces of one step ---------------------------------------------------------------------------


def compute_advantages(batch: Rollout, recipe: Recipe, accelerator) -> torch.Tensor:
    """A ``[B_local, T]`` for this process's rows, with statistics taken over the global batch.

    Rewards are gathered from every process (tiny tensors), the estimator runs on the whole batch
    exactly as in a single process, and each process keeps its own rows: results do not depend on
    the number of processes.
    """
    algorithm = recipe.algorithm
    rewards, mask, group_ids = batch.rewards, batch.completion_mask, batch.group_ids
    local_rows = rewards.shape[0]
    if accelerator.num_processes > 1:
        width = recipe.rollout.max_new_tokens
        rewards = accelerator.gather(_pad_to(rewards, width))
        mask = accelerator.gather(_pad_to(mask, width))
        group_ids = accelerator.gather(group_ids)
    returns = discounted_returns(rewards, mask, algorithm.gamma)
    if algorithm.estimator == "filtered_bc":  # maximum likelihood on the samples that pass the threshold
        advantages = filtered_weights(returns, mask, algorithm.reward_threshold)
    else:
        advantages = apply_baseline(returns, mask, algorithm.baseline, group_ids)
        if algorithm.whiten:
            advantages = whiten_advantages(advantages, mask)
    if accelerator.num_processes > 1:
        start = accelerator.process_index * local_rows
        advantages = advantages[start : start + local_rows, : batch.completion_mask.shape[1]]
    return advantages


def _pad_to(tensor: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]))


@dataclass
class UpdateResult:
    loss: float
    grad_norm: float
    applied: bool
    stats: dict[str, float] = field(default_factory=dict)


def policy_update(
    model, optimizer, accelerator, batch: Rollout, advantages: torch.Tensor, recipe: Recipe,
    kl_coef: float, global_counts: tuple[float, float],
) -> list[UpdateResult]:
    """``updates_per_batch`` optimizer steps on one rollout batch, in micro-batches.

    One update: the REINFORCE loss. Several: the clipped importance-weighted loss against the
    log-probs of the first pass (so the first step's ratio is exactly 1), stopping early once the
    approximate KL to pi_old exceeds ``max_approx_kl``. ``global_counts`` = (sequences, tokens) of the
    whole batch per process, so micro-batch and per-process losses add up to the full-batch loss.
    """
    algorithm, train = recipe.algorithm, recipe.train
    num_sequences, num_tokens = global_counts
    size = len(batch)
    micro = train.micro_batch_size or size
    chunks = [list(range(start, min(start + micro, size))) for start in range(0, size, micro)]
    temperature = recipe.rollout.temperature
    old_logprobs = torch.zeros_like(batch.completion_mask)
    results = []
    for epoch in range(algorithm.updates_per_batch):
        total_loss, ratio_stats = 0.0, []
        for index, rows in enumerate(chunks):
            part = batch.select(rows)
            part_adv = advantages[rows]
            sync = accelerator.no_sync(model) if index < len(chunks) - 1 else contextlib.nullcontext()
            with sync, accelerator.autocast():
                logprobs = completion_logprobs(
                    model, part.prompt_ids, part.prompt_mask, part.completion_ids, part.completion_mask, temperature
                )
                mask = part.completion_mask
                if epoch == 0:
                    old_logprobs[rows] = logprobs.detach()
                if algorithm.updates_per_batch == 1:
                    loss = policy_gradient_loss(logprobs, part_adv, mask, algorithm.aggregation, num_sequences, num_tokens)
                else:
                    loss, stats = clipped_policy_loss(
                        logprobs, old_logprobs[rows], part_adv, mask, algorithm.clip_eps, algorithm.clip_eps_high,
                        algorithm.ratio_level, algorithm.aggregation, num_sequences, num_tokens,
                    )
                    ratio_stats.append(stats)
                if kl_coef > 0 and algorithm.kl_mode == "loss":
                    kl = kl_estimate(logprobs, part.ref_logprobs, algorithm.kl_estimator)
                    loss = loss + kl_coef * aggregate(kl, mask, algorithm.aggregation, num_sequences, num_tokens)
                accelerator.backward(loss)
            total_loss += float(loss.detach())
        result = _optimizer_step(model, optimizer, accelerator, total_loss, recipe.optim.max_grad_norm)
        if ratio_stats:
            result.stats = {
                "ratio/mean": sum(s.ratio_mean for s in ratio_stats) / len(ratio_stats),
                "ratio/max": max(s.ratio_max for s in ratio_stats),
                "ratio/clip_fraction": sum(s.clip_fraction for s in ratio_stats) / len(ratio_stats),
                "ratio/approx_kl": sum(s.approx_kl for s in ratio_stats) / len(ratio_stats),
            }
        results.append(result)
        approx_kl = result.stats.get("ratio/approx_kl", 0.0)
        if algorithm.max_approx_kl is not None and approx_kl > algorithm.max_approx_kl:
            break
    return results


def _optimizer_step(model, optimizer, accelerator, loss: float, max_grad_norm: float | None) -> UpdateResult:
    """Clip and step, unless the loss or gradient is not finite (then the update is skipped)."""
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm if max_grad_norm else float("inf"))
    grad_norm = float(grad_norm)
    applied = math.isfinite(loss) and math.isfinite(grad_norm)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return UpdateResult(loss=loss, grad_norm=grad_norm, applied=applied)


# --- the run ---------------------------------------------------------------------------------------


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and stops. A second signal aborts."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def prepare_output_dir(output_dir: Path, recipe: Recipe, resume: bool, overwrite: bool, is_main: bool) -> Path | None:
    """Refuse to mix runs; return the checkpoint to resume from (or None)."""
    marker = output_dir / RUN_MARKER
    holds_run = marker.exists() or ckpt.list_checkpoints(output_dir) or (output_dir / "metrics.jsonl").exists()
    if resume:
        latest = ckpt.latest_checkpoint(output_dir)
        if latest is None:
            raise UserError(f"--resume: {output_dir} has no checkpoint-<step> directory to resume from; "
                            "drop --resume to start a new run")
        if marker.exists():
            previous = yaml.safe_load(marker.read_text()) or {}
            current = recipe.to_dict()
            differing = _differing_keys(previous, current, ignore={"train.steps", "output_dir"})
            if differing:
                raise UserError(f"--resume: {output_dir} was written by a different recipe (differs in "
                                f"{', '.join(differing[:5])}); resume with the same recipe or use --overwrite")
        return latest
    if holds_run and not overwrite:
        raise UserError(f"{output_dir} already holds a run; pass --resume to continue it, --overwrite to replace "
                        "it, or choose another --output-dir")
    if holds_run and overwrite and is_main:
        for child in ckpt.list_checkpoints(output_dir):
            shutil.rmtree(child)
        for name in ("metrics.jsonl", "summary.json", RUN_MARKER):
            (output_dir / name).unlink(missing_ok=True)
    return None


def _differing_keys(old: Any, new: Any, ignore: set[str], prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = []
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}{key}"
            if path not in ignore:
                keys += _differing_keys(old.get(key), new.get(key), ignore, path + ".")
        return keys
    return [] if old == new else [prefix.rstrip(".")]


def train(recipe: Recipe, output_dir: str | Path, resume: bool = False, overwrite: bool = False,
          show_progress: bool = True) -> dict[str, Any]:
    """Run a recipe; returns the summary also written to ``DIR/summary.json``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision)
    is_main = accelerator.is_main_process
    output_dir = Path(output_dir)
    resume_from = prepare_output_dir(output_dir, recipe, resume, overwrite, is_main)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_MARKER).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    set_seed(recipe.seed)

    # the policy, its reference, data and rewards
    policy, tokenizer, model_path = load_policy(recipe.model)
    previous_state: dict[str, Any] = {}
    if resume_from is not None:
        previous_state = ckpt.read_trainer_state(resume_from)
        policy = load_causal_lm(recipe.model, str(resume_from))
    train_set, eval_set = load_prompt_datasets(recipe.data)
    world = accelerator.num_processes
    if recipe.rollout.prompts_per_step % world:
        raise UserError(f"rollout.prompts_per_step={recipe.rollout.prompts_per_step} must be divisible by the "
                        f"number of processes ({world})")
    sampler = PromptSampler(train_set, recipe.rollout.prompts_per_step, recipe.data.shuffle_seed + recipe.seed)
    eval_prompts, eval_columns = columns_of(eval_set)
    scorer = RewardScorer(recipe.rewards)
    eval_scorer = RewardScorer(recipe.eval.rewards, "eval.rewards") if recipe.eval.rewards else scorer
    kl = KLController(recipe.algorithm.kl_coef, recipe.algorithm.kl_target, recipe.algorithm.kl_horizon)
    reference = None
    if recipe.algorithm.kl_coef > 0:
        reference = load_causal_lm(recipe.model, model_path).eval().requires_grad_(False)
    sampling = SamplingParams(recipe.rollout.max_new_tokens, recipe.rollout.temperature, recipe.rollout.top_p,
                              recipe.rollout.min_new_tokens)
    eval_sampling = SamplingParams(recipe.eval.max_new_tokens or recipe.rollout.max_new_tokens, recipe.eval.temperature)
    max_context = context_length(policy)

    optimizer = torch.optim.AdamW(policy.parameters(), lr=recipe.optim.lr, betas=(recipe.optim.beta1, recipe.optim.beta2),
                                  weight_decay=recipe.optim.weight_decay)
    scheduler = _scheduler(optimizer, recipe)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    if reference is not None:
        reference = reference.to(accelerator.device)
    start_step = 0
    if resume_from is not None:
        ckpt.load_training_state(resume_from, optimizer, scheduler)
        start_step = int(previous_state["global_step"])
        if "kl_controller" in previous_state:
            kl.load_state_dict(previous_state["kl_controller"])
    unwrapped = accelerator.unwrap_model(policy)

    def run_eval() -> dict[str, Any]:
        return evaluate(unwrapped, tokenizer, eval_prompts, eval_columns, eval_scorer, eval_sampling,
                        recipe.eval.batch_size, seed=recipe.seed)

    logger = MetricsLogger(output_dir, enabled=is_main, tensorboard=recipe.train.tensorboard,
                           resume_step=start_step if resume_from is not None else None)
    eval_before = previous_state.get("eval_reward_before")
    if eval_before is None:
        eval_before = run_eval()["reward"]
        logger.log(0, {"eval/reward": eval_before})
    history: dict[str, Any] = {"eval_reward_before": eval_before, "last_eval": previous_state.get("last_eval")}
    nonfinite_in_a_row = int(previous_state.get("nonfinite_in_a_row", 0))
    skipped_total = int(previous_state.get("skipped_updates", 0))
    train_time = float(previous_state.get("train_time_s", 0.0))
    tokens_total = int(previous_state.get("tokens_total", 0))
    started = time.perf_counter()
    per_process = recipe.rollout.prompts_per_step // world
    last_checkpoint: Path | None = resume_from

    def save(step: int) -> Path | None:
        state = {"recipe": recipe.to_dict(), "eval_reward_before": eval_before, "last_eval": history["last_eval"],
                 "kl_controller": kl.state_dict(), "nonfinite_in_a_row": nonfinite_in_a_row,
                 "skipped_updates": skipped_total, "train_time_s": train_time, "tokens_total": tokens_total}
        accelerator.wait_for_everyone()
        path = None
        if is_main:
            path = ckpt.save_checkpoint(output_dir, step, accelerator.unwrap_model(policy), tokenizer, optimizer,
                                        scheduler, state, recipe.train.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path

    with _StopFlag() as stop, progress_bar(show_progress and is_main) as bar:
        task = bar.add_task("training", total=recipe.train.steps, completed=start_step, status=f"eval {eval_before:.3f}")
        for step in range(start_step, recipe.train.steps):
            step_started = time.perf_counter()
            # 1. rollout: this process's prompts, K completions each, from the current policy
            prompts, columns = sampler.batch(step)
            mine = slice(accelerator.process_index * per_process, (accelerator.process_index + 1) * per_process)
            prompts, columns = prompts[mine], {k: v[mine] for k, v in columns.items()}
            generator = torch.Generator(device=accelerator.device).manual_seed(
                (recipe.seed * 1_000_003 + step) * 997 + accelerator.process_index)
            unwrapped.eval()
            batch = rollout(unwrapped, tokenizer, prompts, recipe.rollout.completions_per_prompt, sampling, columns,
                            generator, group_offset=mine.start, max_context=max_context)
            unwrapped.train()
            # 2. reward on the last token, optional KL penalty per token
            scores, per_reward = scorer(batch.prompts, batch.completions, finished=batch.finished.tolist(), **batch.extras)
            batch.rewards = terminal_rewards(torch.tensor(scores, device=batch.completion_mask.device), batch.completion_mask)
            kl_stats: dict[str, float] = {}
            if reference is not None:
                with torch.no_grad():
                    batch.ref_logprobs = completion_logprobs(reference, batch.prompt_ids, batch.prompt_mask,
                                                             batch.completion_ids, batch.completion_mask,
                                                             recipe.rollout.temperature)
                per_token_kl = kl_estimate(batch.logprobs, batch.ref_logprobs, recipe.algorithm.kl_estimator)
                kl_per_sequence = (per_token_kl * batch.completion_mask).sum(-1)
                kl_stats["kl/ref"] = float(accelerator.reduce(kl_per_sequence.mean(), "mean"))
                kl_stats["kl/coef"] = kl.coef
                if recipe.algorithm.kl_mode == "reward":
                    batch.rewards = batch.rewards - kl.coef * per_token_kl * batch.completion_mask
            # 3. advantages over the global batch
            advantages = compute_advantages(batch, recipe, accelerator)
            # 4. update
            local_tokens = batch.completion_mask.sum()
            global_tokens = float(accelerator.reduce(local_tokens, "sum"))
            counts = (float(len(batch)), global_tokens / world)
            results = policy_update(policy, optimizer, accelerator, batch, advantages, recipe, kl.coef, counts)
            scheduler.step()
            if kl_stats:
                kl.update(kl_stats["kl/ref"], len(batch) * world)
            skipped = sum(not r.applied for r in results)
            skipped_total += skipped
            nonfinite_in_a_row = nonfinite_in_a_row + 1 if skipped == len(results) else 0
            step_time = time.perf_counter() - step_started
            train_time += step_time
            tokens_total += int(global_tokens)
            # 5. metrics (reduced over processes)
            metrics = _step_metrics(accelerator, batch, scores, per_reward, advantages, results, global_tokens,
                                    step_time, scheduler.get_last_lr()[0])
            metrics.update(kl_stats)
            if skipped:
                metrics["train/skipped_updates"] = skipped
            done = step + 1
            if recipe.train.eval_every and done % recipe.train.eval_every == 0 and done < recipe.train.steps:
                history["last_eval"] = run_eval()["reward"]
                metrics["eval/reward"] = history["last_eval"]
                bar.console.log(f"step {done}: eval reward {history['last_eval']:.3f}")
            logger.log(done, metrics)
            bar.update(task, completed=done, status=(
                f"reward {metrics['reward/mean']:.3f} | eval {history['last_eval'] if history['last_eval'] is not None else eval_before:.3f}"
                f" | {metrics['perf/tokens_per_s']:.0f} tok/s"))
            if nonfinite_in_a_row >= recipe.train.max_nonfinite_steps:
                raise NonFiniteError(
                    f"{nonfinite_in_a_row} consecutive updates had a non-finite loss or gradient (last at step {done}); "
                    "lower optim.lr, enable optim.max_grad_norm, or check the reward scale"
                )
            if recipe.train.save_every and done % recipe.train.save_every == 0 and done < recipe.train.steps:
                last_checkpoint = save(done)
            if stop.signal_name is not None:
                last_checkpoint = save(done)
                logger.close()
                raise TrainingInterrupted(
                    f"stopped by {stop.signal_name} after step {done}; checkpoint written to {last_checkpoint}. "
                    f"Resume with: rlhf-pg train RECIPE --output-dir {output_dir} --resume", str(last_checkpoint))

    final_eval = run_eval()
    logger.log(recipe.train.steps, {"eval/reward": final_eval["reward"],
                                    **{f"eval/{k}": v for k, v in final_eval.items() if k.startswith("reward/")}})
    logger.close()
    summary = {
        "eval_reward_before": eval_before,
        "eval_reward_after": final_eval["reward"],
        **{f"eval_{k.replace('/', '_')}_after": v for k, v in final_eval.items() if k.startswith("reward/")},
        "steps": recipe.train.steps,
        "wall_time_s": round(time.perf_counter() - started + float(previous_state.get("wall_time_s", 0.0)), 3),
        "train_time_s": round(train_time, 3),
        "tokens_per_s": round(tokens_total / train_time, 1) if train_time > 0 else None,
        "completion_tokens": tokens_total,
        "world_size": world,
        "resumed_from_step": int(previous_state["global_step"]) if resume_from is not None else None,
        "skipped_updates": skipped_total,
        "model": recipe.model.name_or_path,
        "final_model_dir": str(output_dir / "final"),
        "examples": final_eval["examples"],
    }
    accelerator.wait_for_everyone()
    if is_main:
        final_dir = output_dir / "final"
        accelerator.unwrap_model(policy).save_pretrained(final_dir)
        tokenizer.save_pretrained(final_dir)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return summary


def _scheduler(optimizer, recipe: Recipe):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[recipe.optim.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=recipe.optim.warmup_steps,
                         num_training_steps=recipe.train.steps)


def _step_metrics(accelerator, batch: Rollout, scores: list[float], per_reward: dict[str, list[float]],
                  advantages: torch.Tensor, results, global_tokens: float, step_time: float, lr: float) -> dict[str, float]:
    """Per-step metrics, gathered over processes where they are per-sample."""
    device = batch.completion_mask.device
    all_scores = accelerator.gather(torch.tensor(scores, device=device, dtype=torch.float32))
    lengths = accelerator.gather(batch.completion_mask.sum(-1))
    mask = batch.completion_mask
    metrics = {
        "reward/mean": float(all_scores.mean()),
        "reward/std_err": float(all_scores.std() / math.sqrt(all_scores.numel())) if all_scores.numel() > 1 else 0.0,
        "loss/policy": sum(r.loss for r in results) / len(results),
        "adv/mean": float((advantages * mask).sum() / mask.sum().clamp(min=1)),
        "adv/std": float(advantages[mask > 0].std()) if int(mask.sum()) > 1 else 0.0,
        "completion/length": float(lengths.mean()),
        "completion/finished": float(accelerator.gather(batch.finished.float()).mean()),
        "grad/norm": results[-1].grad_norm,
        "optim/lr": lr,
        "optim/updates": len(results),
        "perf/step_s": step_time,
        "perf/tokens_per_s": global_tokens / step_time if step_time > 0 else 0.0,
    }
    for label, values in per_reward.items():
        metrics[f"reward/{label}/mean"] = float(accelerator.gather(torch.tensor(values, device=device)).mean())
    for key in results[-1].stats:
        metrics[key] = results[-1].stats[key]
    return metrics


def evaluate_model(recipe: Recipe, model_dir: str | None = None) -> dict[str, Any]:
    """Evaluate ``model_dir`` (default: the recipe's model) on the recipe's held-out prompts."""
    model_config = copy.deepcopy(recipe.model)
    if model_dir is not None:
        model_config.name_or_path = model_dir
    model, tokenizer, _ = load_policy(model_config)
    _, eval_set = load_prompt_datasets(recipe.data)
    prompts, columns = columns_of(eval_set)
    scorer = RewardScorer(recipe.eval.rewards or recipe.rewards)
    params = SamplingParams(recipe.eval.max_new_tokens or recipe.rollout.max_new_tokens, recipe.eval.temperature)
    result = evaluate(model, tokenizer, prompts, columns, scorer, params, recipe.eval.batch_size, recipe.seed)
    result["num_prompts"] = len(prompts)
    result["model"] = model_config.name_or_path
    return result


__all__ = ["train", "evaluate_model", "compute_advantages", "policy_update"]
