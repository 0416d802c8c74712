"""The LM REINFORCE trainer: one step = rollout -> reward -> advantages -> update, through ``accelerate``.

    for step in range(steps):
        prompts            <- the step's prompts (this process's shard; a prompt's group stays together)
        tau_1..tau_N       <- sample completions from pi_theta       (the run's Sampler: policy/sampler.py)
        r(tau_i)           <- weighted reward functions, on the last token          (reward_models/scorer.py)
        r_t               -= beta * KL_t(pi_theta || pi_ref)  (optional penalty)    (core/losses.py)
        A_t                <- returns -> baseline -> whiten over the *global* batch (core/estimator.py)
                              (filtered_bc: A_t = 1[G_0 >= threshold], ML on the good samples)
        theta              <- theta - lr * grad[-(1/N) sum_i sum_t log pi(a_it|s_it) A_it]   (core/losses.py)
        sampler            <- the new theta (a no-op for the built-in engine, which shares the parameters)

The same code runs on CPU, one GPU or many (``accelerate launch``); only the main process writes. The
loop around the step (evaluation, checkpoints, signals, the final save) is ``run.loop``; the model,
data and optimizer a run holds are ``lm_run.LMRun``.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from .core import estimator
from .core.correction import GapStats
from .core.losses import kl_estimate, kl_penalized_rewards
from .core.mdp import Rollout, action_tokens, mask_truncated, terminal_rewards, truncated
from .evaluation import completion_records
from .lm_run import LMRun, setup_run
from .policy.logprobs import PromptPass, completion_logprobs
from .policy.update import UpdateResult, policy_update
from .recipe import Recipe
from .run.metrics import completions_table
from .sampling import sample_step, task_feedback
from .sft import SftWarmup
from .run.loop import run_job
from .run.memory import model_shape
from .run.optim import step_scheduler
from .run.rundir import RunDir

# --- pieces of one step ---------------------------------------------------------------------------


def compute_advantages(batch: Rollout, spec: estimator.EstimatorSpec, accelerator,
                       greedy_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """A ``[B_local, T]`` for this process's rows, with statistics taken over the global batch.

    Rewards are gathered from every process (tiny tensors), the estimator runs on the whole batch
    exactly as in a single process, and each process keeps its own rows: results do not depend on
    the number of processes.
    """
    rewards, mask, group_ids = batch.rewards, action_tokens(batch), batch.group_ids  # mask: actions only (episodes)
    local_rows, local_width = rewards.shape
    if accelerator.num_processes > 1:
        rewards = accelerator.gather(accelerator.pad_across_processes(rewards, dim=1))
        mask = accelerator.gather(accelerator.pad_across_processes(mask, dim=1))
        group_ids = accelerator.gather(group_ids)
        greedy_rewards = accelerator.gather(greedy_rewards) if greedy_rewards is not None else None
    advantages = estimator.advantages(spec, rewards, mask, group_ids, greedy_rewards=greedy_rewards)
    if accelerator.num_processes > 1:
        start = accelerator.process_index * local_rows
        advantages = advantages[start : start + local_rows, :local_width]
    return advantages


def update_settings(recipe: Recipe, kl_coef: float = 0.0) -> dict[str, Any]:
    """``policy_update``'s keyword arguments as a recipe sets them (``kl_coef``: the KL-in-loss coefficient now)."""
    algorithm = recipe.algorithm
    return dict(aggregation=algorithm.aggregation, micro_batch_size=recipe.train.micro_batch_size, max_grad_norm=recipe.optim.max_grad_norm,
                updates_per_batch=algorithm.updates_per_batch, clip_eps=algorithm.clip_eps,
                clip_eps_high=algorithm.clip_eps_high, ratio_level=algorithm.ratio_level,
                max_approx_kl=algorithm.max_approx_kl, kl_coef=kl_coef if algorithm.kl_mode == "loss" else 0.0,
                kl_estimator=algorithm.kl_estimator, importance=algorithm.importance,
                norm_length=algorithm.norm_length or recipe.rollout.max_new_tokens,
                is_correction=recipe.rollout.sampler_correction(), is_cap=recipe.rollout.is_cap,
                is_level=recipe.rollout.is_level)


def reference_chunk_rows(recipe, model, rows: int) -> int:
    """Rows per forward of the reference pass: ``train.micro_batch_size`` x the model's layers (all rows without a
    micro-batch size). A forward without autograd holds one layer's intermediates at a time, where an update's
    micro-batch keeps every layer's for its backward, so L times the rows fit in the memory planned for the update
    (``run.memory``; twice the rows under gradient checkpointing, whose update keeps one layer and the layers'
    inputs). Fewer, larger matmuls: SmolLM2-135M's reference pass 5.77 -> 5.37 s on an AVX2 host (benchmarks/README.md)."""
    micro = recipe.train.micro_batch_size
    if not micro:
        return rows
    layers = model_shape(model)["layers"] or 1
    return max(1, min(rows, micro * (2 if recipe.train.gradient_checkpointing else layers)))


def reference_logprobs(run: LMRun, batch: Rollout) -> torch.Tensor:
    """log pi_ref(a_t | s_t) ``[B, T]``: the frozen initial policy (for LoRA: the policy with its adapter off), in
    chunks of ``reference_chunk_rows`` rows (rows are independent: the same numbers, to float rounding)."""
    model = run.unwrapped if run.reference == "adapter" else run.reference
    micro = reference_chunk_rows(run.recipe, model, len(batch))
    starts = range(0, len(batch), micro)
    chunks = []
    # inference mode: no autograd bookkeeping at all; the result is cloned out so the loss may use it
    with torch.inference_mode(), run.unwrapped.disable_adapter() if run.reference == "adapter" else nullcontext():
        # the batch's distinct prompts in one forward for all chunks (policy.logprobs.PromptPass)
        prompt_pass = PromptPass(model, batch.prompt_ids, batch.prompt_mask, list(range(len(batch)))) \
            if PromptPass.usable(model, len(starts)) else None
        for start in starts:
            rows = slice(start, start + micro)
            shared = (prompt_pass, torch.arange(start, min(start + micro, len(batch)), device=batch.prompt_ids.device)) \
                if prompt_pass else None
            chunks.append(completion_logprobs(model, batch.prompt_ids[rows], batch.prompt_mask[rows],
                                              batch.completion_ids[rows], batch.completion_mask[rows],
                                              batch.temperature, prompt_pass=shared))
    return torch.cat(chunks).clone()


# --- one step ---------------------------------------------------------------------------------------


def train_step(run: LMRun, step: int) -> dict[str, float]:
    """One step: rollout -> reward (+ KL penalty) -> advantages -> update. Returns the step's metrics."""
    recipe, accelerator = run.recipe, run.accelerator
    world = accelerator.num_processes
    started = time.perf_counter()
    # 1. rollout and reward r(tau) (on the last token), K completions per prompt
    run.unwrapped.eval()
    with run.full_weights():  # FSDP: the sharded policy gathered whole while it samples
        scored = sample_step(run, step)
    sample_time = time.perf_counter() - started
    run.unwrapped.train()
    batch, scores, mask = scored.batch, scored.scores, action_tokens(scored.batch)  # episodes: actions only
    batch.rewards = terminal_rewards(torch.tensor(scores, device=mask.device), mask, batch.step_rewards)
    # 2. optional per-token KL penalty r_t -= beta * KL_t
    kl_stats: dict[str, float] = {}
    if run.reference is not None:
        batch.ref_logprobs = reference_logprobs(run, batch)
        per_token_kl = kl_estimate(batch.logprobs, batch.ref_logprobs, recipe.algorithm.kl_estimator) * mask
        kl_stats = {"kl/ref": float(accelerator.reduce(per_token_kl.sum(-1).mean(), "mean")), "kl/coef": run.kl.coef}
        if recipe.algorithm.kl_mode == "reward" and run.kl.coef > 0:
            batch.rewards = kl_penalized_rewards(batch.rewards, batch.logprobs, batch.ref_logprobs, mask, run.kl.coef,
                                                 recipe.algorithm.kl_estimator)
    # 3. advantages A_t = G_t - b_t over the global batch
    greedy = torch.tensor(scored.greedy, device=mask.device) if scored.greedy is not None else None
    advantages = compute_advantages(batch, recipe.algorithm.estimator_spec(), accelerator, greedy)
    # 4. policy update(s); rollout.mask_truncated: completions cut at max_new_tokens carry no gradient
    global_tokens = float(accelerator.reduce(mask.sum(), "sum"))
    trained = mask_truncated(batch) if recipe.rollout.mask_truncated else batch
    results = policy_update(run.policy, run.optimizer, accelerator, trained, advantages,
                            global_counts=(float(len(batch)), global_tokens / world),
                            **update_settings(recipe, run.kl.coef))
    step_scheduler(run.scheduler)
    synced = time.perf_counter()
    run.sync_sampler()  # the engine samples the next step from the updated theta
    sync_time = time.perf_counter() - synced
    if kl_stats:
        run.kl.update(kl_stats["kl/ref"], len(batch) * world)
    step_time = time.perf_counter() - started
    metrics = _step_metrics(accelerator, batch, scores, scored.per_reward, advantages, results, global_tokens,
                            step_time, run.scheduler.get_last_lr()[0])
    metrics["perf/sample_s"] = sample_time  # rollout and rewards
    metrics["perf/sync_s"] = sync_time  # the new weights pushed to the engine (0 for builtin)
    metrics.update(kl_stats)
    metrics.update(scored.stats)
    metrics.update(task_feedback(run, step, scored))  # reasoning-gym: per-task reward, the curriculum's levels
    metrics.update(run.reward_metrics(run.scorer, f"step {step + 1}"))  # reward/<label>/latency_s, failures, ...
    if greedy is not None:
        metrics["reward/greedy_baseline"] = float(accelerator.gather(greedy).mean())
    run.counters["tokens_total"] += int(global_tokens)
    every = recipe.train.log_completions_every
    if every and (step + 1) % every == 0:
        log_completions(run, step + 1, scored, advantages)
    return metrics


def log_completions(run: LMRun, step: int, scored, advantages: torch.Tensor) -> None:
    """This process's completions of the step, with rewards and advantage (A at the first action), to
    ``completions.jsonl`` and the trackers; a few of them in the console."""
    if run.logger is None or not run.is_main:
        return
    rows = completion_records(step, scored.batch, scored.scores, scored.per_reward)
    for row, advantage in zip(rows, advantages[:, 0].tolist()):
        row["advantage"] = advantage
    run.logger.log_completions(step, rows)
    if run.console is not None:
        run.console.print(completions_table(rows, f"step {step}: sampled completions"))


def _step_metrics(accelerator, batch: Rollout, scores: list[float], per_reward: dict[str, list[float]],
                  advantages: torch.Tensor, results: list[UpdateResult], global_tokens: float, step_time: float,
                  lr: float) -> dict[str, float]:
    """Per-step metrics, gathered over processes where they are per-sample."""
    device = batch.completion_mask.device
    all_scores = accelerator.gather(torch.tensor(scores, device=device, dtype=torch.float32))
    lengths = accelerator.gather(batch.completion_mask.sum(-1))
    mask = action_tokens(batch)
    metrics = {
        "reward/mean": float(all_scores.mean()),
        "reward/std_err": float(all_scores.std() / math.sqrt(all_scores.numel())) if all_scores.numel() > 1 else 0.0,
        "loss/policy": sum(r.loss for r in results) / len(results),
        "adv/mean": float((advantages * mask).sum() / mask.sum().clamp(min=1)),
        "adv/std": float(advantages[mask > 0].std()) if int(mask.sum()) > 1 else 0.0,
        "completion/length": float(lengths.mean()),
        "completion/finished": float(accelerator.gather(batch.finished.float()).mean()),
        "completion/truncated": float(accelerator.gather(truncated(batch).float()).mean()),
        # -mean log pi(a_t | s_t) of the sampled tokens: a Monte-Carlo estimate of the sampling policy's entropy
        "policy/entropy": float(accelerator.reduce(-(batch.logprobs * mask).sum(), "sum") / max(global_tokens, 1.0)),
        "grad/norm": results[-1].grad_norm,
        "optim/lr": lr,
        "optim/updates": len(results),
        "perf/step_s": step_time,
        "perf/tokens_per_s": global_tokens / step_time if step_time > 0 else 0.0,
    }
    skipped = sum(not r.applied for r in results)
    if skipped:
        metrics["train/skipped_updates"] = skipped
    for label, values in per_reward.items():
        metrics[f"reward/{label}/mean"] = float(accelerator.gather(torch.tensor(values, device=device)).nanmean())
    for key in results[-1].stats:
        metrics[key] = results[-1].stats[key]
    metrics.update(_gap_metrics(accelerator, results[0].gap, device))
    return metrics


def _gap_metrics(accelerator, gap: GapStats, device) -> dict[str, float]:
    """``rollout/logprob_abs_diff`` (+ ``_max``), ``rollout/is_weight_mean``, ``rollout/is_clipped_frac`` over every
    process's action tokens (``core.correction.GapStats``)."""
    sums = torch.tensor([gap.abs_diff_sum, gap.weight_sum, gap.clipped, gap.tokens], device=device, dtype=torch.float64)
    sums = accelerator.reduce(sums, "sum") if accelerator.num_processes > 1 else sums
    largest = torch.tensor(gap.abs_diff_max, device=device, dtype=torch.float64)
    largest = accelerator.reduce(largest, "max") if accelerator.num_processes > 1 else largest
    total = GapStats(float(sums[0]), float(largest), float(sums[1]), float(sums[2]), float(sums[3]))
    return total.metrics()


# --- the command ------------------------------------------------------------------------------------


class ReinforceRun(LMRun):
    """``rlhf-pg train``: an LM run whose step is ``train_step``, after an optional SFT warm-up."""

    command = "train"
    warmup: Any = None  # sft.SftWarmup when train.sft_warmup_steps > 0 (set by ``train``)
    counter_defaults = {**LMRun.counter_defaults, "warmup_done": False, "eval_after_warmup": {}}

    def step(self, step: int) -> dict[str, float]:
        return train_step(self, step)

    def warm_up(self, stop) -> dict[str, Any] | None:
        """``train.sft_warmup_steps`` SFT steps before the first RL step, then a held-out evaluation. Not redone by a
        run resumed from a checkpoint (every checkpoint is written after it); a first signal waits for its end."""
        if self.warmup is None or self.counters["warmup_done"] or self.counters["global_step"] > 0:
            return None
        then, stop.then = stop.then, f"finishing the SFT warm-up ({self.warmup.steps} steps), then writing a checkpoint"
        self.warmup.run(self)
        self.counters["warmup_done"], stop.then = True, then
        result = self.evaluate()
        self.counters["eval_after_warmup"] = {key: value for key, value in result.items()
                                              if isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self.console is not None and self.is_main:
            shown = {k: v for k, v in self.counters["eval_after_warmup"].items() if "/" not in k}
            self.console.log("after the SFT warm-up: " + ", ".join(f"eval {k} {v:.3f}" for k, v in shown.items()),
                             markup=False, highlight=False)
        return result

    def status(self, metrics: dict[str, float]) -> str:
        return f"reward {metrics['reward/mean']:.3f}"

    def summary(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        """LMRun's summary; with a warm-up, ``sft_warmup_steps`` and ``eval_<key>_after_warmup`` beside the before and
        after figures (``eval_reward_before`` stays the model before the warm-up)."""
        summary = super().summary(before, after)
        if self.recipe.train.sft_warmup_steps:
            summary["sft_warmup_steps"] = self.recipe.train.sft_warmup_steps
            summary.update({f"eval_{key.replace('/', '_')}_after_warmup": value
                            for key, value in self.counters["eval_after_warmup"].items()})
        return summary


def setup(recipe: Recipe, output_dir: str | Path, resume: bool = False, overwrite: bool = False
          ) -> tuple[ReinforceRun, Path | None]:
    """A REINFORCE run ready for its first step (and the checkpoint it resumes from, or None)."""
    return setup_run(ReinforceRun, recipe, output_dir, resume, overwrite)


def train(recipe: Recipe, output_dir: str | Path, resume: bool = False, overwrite: bool = False,
          show_progress: bool = True) -> dict[str, Any]:
    """Run a recipe; returns the summary also written to ``DIR/summary.json``."""
    # data without demonstrations fails before anything is written or loaded
    warmup = SftWarmup(recipe) if recipe.train.sft_warmup_steps else None
    with RunDir(output_dir).lock():
        run, resume_from = setup(recipe, output_dir, resume, overwrite)
        if warmup is not None:
            warmup.check_processes(run.accelerator.num_processes)
        run.warmup = warmup
        try:
            return run_job(run, resume_from, show_progress)
        finally:
            run.close()


__all__ = ["train", "compute_advantages", "policy_update", "update_settings", "train_step", "reference_logprobs",
           "setup"]
