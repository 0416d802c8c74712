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
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from .run import checkpoint as ckpt
from .core.advantages import apply_baseline, discounted_returns, filtered_weights, whiten_advantages
from .config import Recipe
from .data import PromptSampler, columns_of, load_prompt_datasets
from .errors import NonFiniteError, TrainingInterrupted, UserError
from .evaluation import evaluate
from .core.kl_control import KLController
from .core.losses import aggregate, clipped_policy_loss, kl_estimate, kl_penalized_rewards, policy_gradient_loss
from .core.mdp import Rollout, terminal_rewards
from .run.metrics import MetricsLogger, progress_bar
from .models import apply_lora, context_length, load_causal_lm, load_lora_checkpoint, load_policy
from .rewards import RewardScorer
from .rollout import SamplingParams, check_prompt_lengths, completion_logprobs, rollout

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

    Completions whose advantage is 0 at every token contribute exactly 0 to the loss and its gradient
    (e.g. a group whose completions all got the same reward), so they are not run through the model:
    the gradient is unchanged, the update is cheaper. (Not with a KL loss term, which they do feed.)
    """
    algorithm, train = recipe.algorithm, recipe.train
    num_sequences, num_tokens = global_counts
    rows = list(range(len(batch)))
    if not (kl_coef > 0 and algorithm.kl_mode == "loss"):
        active = (advantages != 0).any(-1).nonzero().flatten().tolist()
        rows = active or rows[:1]  # keep one row so every process still joins the gradient all-reduce
    micro = train.micro_batch_size or len(rows)
    chunks = [rows[start : start + micro] for start in range(0, len(rows), micro)]
    temperature = recipe.rollout.temperature
    old_logprobs = torch.zeros_like(batch.completion_mask)
    results = []
    for epoch in range(algorithm.updates_per_batch):
        total_loss, ratio_stats = 0.0, []
        for index, chunk in enumerate(chunks):
            part = batch.select(chunk)
            part_adv = advantages[chunk]
            last_chunk = index == len(chunks) - 1
            # gradient accumulation: no all-reduce (DDP) and no optimizer step (DeepSpeed) before the last chunk
            accelerator.gradient_state._set_sync_gradients(last_chunk)
            sync = contextlib.nullcontext() if last_chunk else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                logprobs = completion_logprobs(
                    model, part.prompt_ids, part.prompt_mask, part.completion_ids, part.completion_mask, temperature
                )
                mask = part.completion_mask
                if epoch == 0:
                    old_logprobs[chunk] = logprobs.detach()
                if algorithm.updates_per_batch == 1:
                    loss = policy_gradient_loss(logprobs, part_adv, mask, algorithm.aggregation, num_sequences, num_tokens)
                else:
                    loss, stats = clipped_policy_loss(
                        logprobs, old_logprobs[chunk], part_adv, mask, algorithm.clip_eps, algorithm.clip_eps_high,
                        algorithm.ratio_level, algorithm.aggregation, num_sequences, num_tokens,
                    )
                    ratio_stats.append(stats)
                if kl_coef > 0 and algorithm.kl_mode == "loss":
                    kl = kl_estimate(logprobs, part.ref_logprobs, algorithm.kl_estimator)
                    loss = loss + kl_coef * aggregate(kl, mask, algorithm.aggregation, num_sequences, num_tokens)
                accelerator.backward(loss)
            total_loss += float(loss.detach())
        accelerator.gradient_state._set_sync_gradients(True)
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
        self.then = "finishing the current step, then writing a checkpoint"  # said when the first signal arrives
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
        print(f"\n{self.signal_name}: {self.then} (send it again to abort at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def prepare_output_dir(output_dir: Path, recipe: Recipe, resume: bool, overwrite: bool, is_main: bool) -> Path | None:
    """Refuse to mix runs; return the checkpoint to resume from (or None)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output dir {output_dir} is a file; choose a directory with --output-dir")
    marker = output_dir / RUN_MARKER
    # a run = some progress: a start that failed in setup or in the first evaluation can simply be retried
    holds_run = bool(ckpt.list_checkpoints(output_dir)) or any(
        (output_dir / name).exists() for name in ("metrics.jsonl", "summary.json"))
    if is_main:
        ckpt.clean_staging(output_dir)  # half-written checkpoints of a crashed run
    if resume:
        latest = ckpt.latest_checkpoint(output_dir)
        if latest is None:
            start = ("it holds a run that stopped before its first checkpoint: use --overwrite to start it again"
                     if holds_run else "drop --resume to start a new run")
            raise UserError(f"--resume: {output_dir} has no checkpoint-<step> directory to resume from; {start}")
        if marker.exists():
            try:
                previous = yaml.safe_load(marker.read_text()) or {}
            except yaml.YAMLError:
                previous = {}  # a damaged copy: the checkpoints are checked on their own
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
        for child in [*ckpt.list_checkpoints(output_dir), output_dir / "final", output_dir / "tensorboard"]:
            shutil.rmtree(child, ignore_errors=True)
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


@dataclass
class Run:
    """Everything one training run holds between steps."""

    recipe: Recipe
    accelerator: Any
    output_dir: Path
    policy: Any  # prepared by accelerate (DDP-wrapped when distributed)
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    sampler: PromptSampler
    scorer: RewardScorer
    eval_scorer: RewardScorer
    eval_prompts: list[str]
    eval_columns: dict[str, list[Any]]
    kl: KLController
    reference: Any  # frozen copy of the initial policy, "adapter" (LoRA: adapter disabled), or None
    max_context: int | None
    counters: dict[str, Any]  # step-independent totals kept in checkpoints
    eval_before: dict[str, float] = field(default_factory=dict)  # first evaluation's numbers (reward, nll, ...)

    def all_finished(self, finished: torch.Tensor) -> bool:
        """Stop decoding when every sequence has ended, on every process if parameters are sharded."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            return bool(finished.all())
        pending = (~finished).sum().reshape(1)
        return int(self.accelerator.reduce(pending, "sum")) == 0

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.policy)

    def sampling(self) -> SamplingParams:
        r = self.recipe.rollout
        return SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.min_new_tokens)


def cpu_only() -> bool:
    """No GPU-like device: tell accelerate so, which makes `accelerate launch --multi_gpu` / `torchrun`
    run several CPU processes with the gloo backend instead of several independent single processes."""
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or torch.backends.mps.is_available() or (xpu is not None and xpu.is_available()))


def new_accelerator(mixed_precision: str):
    """An ``Accelerator`` for this run. Several runs in one process (``compare``, tests) may each pick
    their own precision: accelerate keeps one global state, so it is reset between runs (the process
    group, if any, is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu_only())


def setup(recipe: Recipe, output_dir: str | Path, resume: bool = False, overwrite: bool = False) -> tuple[Run, Path | None]:
    """Load policy, reference, data and rewards; restore a checkpoint when resuming."""
    from accelerate.utils import set_seed

    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    accelerator = new_accelerator(recipe.train.mixed_precision)
    # reward functions first: a bad name or a missing reward model fails before the output dir is touched
    scorer = RewardScorer(recipe.rewards)
    eval_scorer = RewardScorer(recipe.eval.rewards, "eval.rewards") if recipe.eval.rewards else scorer
    output_dir = Path(output_dir)
    resume_from = prepare_output_dir(output_dir, recipe, resume, overwrite, accelerator.is_main_process)
    set_seed(recipe.seed)
    world = accelerator.num_processes
    if recipe.rollout.prompts_per_step % world:
        raise UserError(f"rollout.prompts_per_step={recipe.rollout.prompts_per_step} must be divisible by the "
                        f"number of processes ({world})")
    counters: dict[str, Any] = {}
    if resume_from is not None:
        counters = _checked_counters(ckpt.read_trainer_state(resume_from), resume_from)

    policy, tokenizer, model_path = load_policy(recipe.model)
    reference = None
    wants_reference = recipe.algorithm.kl_coef > 0 or recipe.algorithm.log_kl  # log_kl: kl/ref even at beta = 0
    if wants_reference and recipe.peft is None:
        reference = load_causal_lm(recipe.model, model_path).eval().requires_grad_(False)
    if recipe.peft is not None:
        policy = _checkpoint_adapter(policy, resume_from) if resume_from else apply_lora(policy, recipe.peft)
        reference = "adapter" if wants_reference else None
    elif resume_from is not None:
        policy = _checkpoint_policy(recipe, resume_from, policy)
    train_set, eval_set = load_prompt_datasets(recipe.data)
    eval_prompts, eval_columns = columns_of(eval_set)
    max_context = context_length(policy)
    check_prompt_lengths(tokenizer, train_set["prompt"], recipe.rollout.max_new_tokens, max_context,
                         "rollout.max_new_tokens")
    check_prompt_lengths(tokenizer, eval_prompts, recipe.eval.max_new_tokens or recipe.rollout.max_new_tokens,
                         max_context, "eval.max_new_tokens" if recipe.eval.max_new_tokens else "rollout.max_new_tokens")
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=recipe.optim.lr, betas=(recipe.optim.beta1, recipe.optim.beta2),
                                  weight_decay=recipe.optim.weight_decay)
    scheduler = _scheduler(optimizer, recipe)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    if isinstance(reference, torch.nn.Module):
        reference = reference.to(accelerator.device)
    kl = KLController(recipe.algorithm.kl_coef, recipe.algorithm.kl_target, recipe.algorithm.kl_horizon)
    if resume_from is not None:
        ckpt.load_training_state(resume_from, optimizer, scheduler)
        kl.load_state_dict(counters.get("kl_controller", kl.state_dict()))
    run = Run(
        recipe=recipe, accelerator=accelerator, output_dir=output_dir, policy=policy, tokenizer=tokenizer,
        optimizer=optimizer, scheduler=scheduler,
        sampler=PromptSampler(train_set, recipe.rollout.prompts_per_step, recipe.data.shuffle_seed + recipe.seed),
        scorer=scorer, eval_scorer=eval_scorer,
        eval_prompts=eval_prompts, eval_columns=eval_columns, kl=kl, reference=reference, max_context=max_context,
        counters={key: counters.get(key, default) for key, default in COUNTER_DEFAULTS.items()},
        eval_before=_eval_scalars(counters.get("eval_before") or {}) if isinstance(counters.get("eval_before"), dict) else {},
    )
    if accelerator.is_main_process:  # written once everything loaded: a start that failed leaves no run behind
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / RUN_MARKER).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        except OSError as error:
            raise UserError(f"cannot write to output dir {output_dir}: {error}; choose another --output-dir") from None
    accelerator.wait_for_everyone()
    return run, resume_from


COUNTER_DEFAULTS = {"global_step": 0, "eval_reward_before": None, "last_eval": None, "nonfinite_in_a_row": 0,
                    "skipped_updates": 0, "train_time_s": 0.0, "wall_time_s": 0.0, "tokens_total": 0}


def _checked_counters(state: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """The counters of ``trainer_state.json``, each a number (or null where allowed), else a clear error."""
    for key, default in COUNTER_DEFAULTS.items():
        value = state.get(key, default)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (number or (default is None and value is None)):
            raise ckpt.unusable(checkpoint, f"has a corrupt trainer_state.json ({key}={value!r:.40})")
    controller = state.get("kl_controller", {"coef": 0.0})
    coef = controller.get("coef") if isinstance(controller, dict) else None
    if not isinstance(coef, (int, float)) or isinstance(coef, bool) or not math.isfinite(coef):
        raise ckpt.unusable(checkpoint, f"has a corrupt trainer_state.json (kl_controller={controller!r:.40})")
    return state


def _checkpoint_adapter(base, checkpoint: Path):
    try:
        return load_lora_checkpoint(base, str(checkpoint))
    except UserError as error:
        raise ckpt.unusable(checkpoint, f"is unusable ({error})", mismatch=True) from None


def _checkpoint_policy(recipe: Recipe, checkpoint: Path, base):
    """The full model saved in ``checkpoint``; it must have the shapes of the recipe's model ``base``."""
    try:
        policy = load_causal_lm(recipe.model, str(checkpoint))
    except UserError as error:
        raise ckpt.unusable(checkpoint, f"holds a model that does not load ({error})") from None
    expected = {name: tuple(t.shape) for name, t in base.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in policy.state_dict().items()}
    if expected != found:
        name = next((n for n in expected if found.get(n) != expected[n]), None) or next(iter(set(found) - set(expected)))
        raise ckpt.unusable(checkpoint, f"holds a different model than {recipe.model.name_or_path!r} ({name}: "
                                        f"{found.get(name)} there, {expected.get(name)} in the recipe's model)",
                            mismatch=True)
    return policy


def reference_logprobs(run: Run, batch: Rollout) -> torch.Tensor:
    """log pi_ref(a_t | s_t) ``[B, T]``: the frozen initial policy (for LoRA: the policy with its adapter off)."""
    args = (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, run.recipe.rollout.temperature)
    with torch.no_grad():
        if run.reference == "adapter":
            with run.unwrapped.disable_adapter():
                return completion_logprobs(run.unwrapped, *args)
        return completion_logprobs(run.reference, *args)


def train_step(run: Run, step: int) -> dict[str, float]:
    """One step: rollout -> reward (+ KL penalty) -> advantages -> update. Returns the step's metrics."""
    recipe, accelerator = run.recipe, run.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    started = time.perf_counter()
    # 1. rollout: this process's share of the step's prompts, K completions each (a group stays on one process)
    per_process = recipe.rollout.prompts_per_step // world
    prompts, columns = run.sampler.batch(step)
    mine = slice(rank * per_process, (rank + 1) * per_process)
    generator = torch.Generator(device=accelerator.device).manual_seed((recipe.seed * 1_000_003 + step) * 997 + rank)
    run.unwrapped.eval()
    batch = rollout(run.unwrapped, run.tokenizer, prompts[mine], recipe.rollout.completions_per_prompt, run.sampling(),
                    {k: v[mine] for k, v in columns.items()}, generator, group_offset=mine.start,
                    max_context=run.max_context, all_finished=run.all_finished)
    run.unwrapped.train()
    # 2. reward r(tau) on the last token; optional per-token KL penalty r_t -= beta * KL_t
    scores, per_reward = run.scorer(batch.prompts, batch.completions, finished=batch.finished.tolist(), **batch.extras)
    mask = batch.completion_mask
    batch.rewards = terminal_rewards(torch.tensor(scores, device=mask.device), mask)
    kl_stats: dict[str, float] = {}
    if run.reference is not None:
        batch.ref_logprobs = reference_logprobs(run, batch)
        per_token_kl = kl_estimate(batch.logprobs, batch.ref_logprobs, recipe.algorithm.kl_estimator) * mask
        kl_stats = {"kl/ref": float(accelerator.reduce(per_token_kl.sum(-1).mean(), "mean")), "kl/coef": run.kl.coef}
        if recipe.algorithm.kl_mode == "reward" and run.kl.coef > 0:
            batch.rewards = kl_penalized_rewards(batch.rewards, batch.logprobs, batch.ref_logprobs, mask, run.kl.coef,
                                                 recipe.algorithm.kl_estimator)
    # 3. advantages A_t = G_t - b_t over the global batch
    advantages = compute_advantages(batch, recipe, accelerator)
    # 4. policy update(s)
    global_tokens = float(accelerator.reduce(mask.sum(), "sum"))
    results = policy_update(run.policy, run.optimizer, accelerator, batch, advantages, recipe, run.kl.coef,
                            (float(len(batch)), global_tokens / world))
    with warnings.catch_warnings():  # the schedule follows steps, also when a step's update was skipped
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        run.scheduler.step()
    if kl_stats:
        run.kl.update(kl_stats["kl/ref"], len(batch) * world)
    step_time = time.perf_counter() - started
    metrics = _step_metrics(accelerator, batch, scores, per_reward, advantages, results, global_tokens, step_time,
                            run.scheduler.get_last_lr()[0])
    metrics.update(kl_stats)
    count_step(run, metrics, results, step_time, global_tokens)
    return metrics


def count_step(run: Run, metrics: dict[str, float], results: list[UpdateResult], step_time: float, tokens: float) -> None:
    """Add a step to the run's totals (kept in checkpoints); note skipped (non-finite) updates in ``metrics``."""
    skipped = sum(not r.applied for r in results)
    if skipped:
        metrics["train/skipped_updates"] = skipped
    counters = run.counters
    counters["skipped_updates"] += skipped
    counters["nonfinite_in_a_row"] = counters["nonfinite_in_a_row"] + 1 if skipped == len(results) else 0
    counters["train_time_s"] += step_time
    counters["tokens_total"] += int(tokens)


def run_evaluation(run: Run) -> dict[str, Any]:
    """Held-out evaluation; each process decodes its share of the prompts, results are gathered."""
    accelerator = run.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    prompts = run.eval_prompts[rank::world]
    columns = {key: values[rank::world] for key, values in run.eval_columns.items()}
    eval_config = run.recipe.eval
    params = SamplingParams(eval_config.max_new_tokens or run.recipe.rollout.max_new_tokens, eval_config.temperature)
    result = evaluate(run.unwrapped, run.tokenizer, prompts, columns, run.eval_scorer, params, eval_config.batch_size,
                      seed=run.recipe.seed + rank, all_finished=run.all_finished)
    if world > 1:
        from accelerate.utils import gather_object

        parts = gather_object([(len(prompts), {k: v for k, v in result.items() if k != "examples"})])
        total = sum(n for n, _ in parts)
        result = {**{key: sum(n * part[key] for n, part in parts) / total for key in parts[0][1]},
                  "examples": result["examples"]}
    return result


def save_run_checkpoint(run: Run, step: int) -> Path | None:
    """Checkpoint on the main process (all processes wait)."""
    run.counters["global_step"] = step
    run.accelerator.wait_for_everyone()
    path = None
    if run.accelerator.is_main_process:
        state = {**run.counters, "eval_before": run.eval_before, "recipe": run.recipe.to_dict(),
                 "kl_controller": run.kl.state_dict()}
        path = ckpt.save_checkpoint(run.output_dir, step, run.unwrapped, run.tokenizer, run.optimizer, run.scheduler,
                                    state, run.recipe.train.keep_checkpoints)
    run.accelerator.wait_for_everyone()
    return path


@contextlib.contextmanager
def output_dir_lock(output_dir: Path):
    """Hold ``DIR/.lock`` for the whole run so that two runs never write into one directory.

    An OS file lock (``flock``): the OS releases it when the process ends, however it ends, so a
    crashed run never leaves a stale lock. Only the first process of a distributed run takes it; on
    systems without ``fcntl`` (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is None or os.environ.get("RANK", "0") != "0" or (output_dir.exists() and not output_dir.is_dir()):
        yield  # (a file in the way is reported by prepare_output_dir)
        return
    created = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = open(output_dir / ".lock", "a+")
    except OSError as error:
        raise UserError(f"cannot write to output dir {output_dir}: {error}; choose another --output-dir") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip()
        handle.close()
        raise UserError(f"another rlhf-pg run{f' (pid {owner})' if owner else ''} is writing to {output_dir}; wait for "
                        "it to finish, stop it, or choose another --output-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        handle.close()  # releases the lock
        if created and {p.name for p in output_dir.iterdir()} <= {".lock"}:  # a start that failed leaves nothing
            shutil.rmtree(output_dir, ignore_errors=True)


@dataclass
class Loop:
    """What differs between ``train`` (REINFORCE) and ``sft`` (maximum likelihood); the loop is shared."""

    command: str  # the CLI command, for messages ("train", "sft")
    step: Callable[[Run, int], dict[str, float]]  # one optimizer step -> its metrics
    evaluate: Callable[[Run], dict[str, Any]]  # held-out numbers: "reward" (+ e.g. "nll") and "examples"
    status: Callable[[dict[str, float]], str]  # progress-bar text from a step's metrics
    loss_key: str = "loss/policy"


def reinforce_status(metrics: dict[str, float]) -> str:
    return f"reward {metrics['reward/mean']:.3f}"


def train(recipe: Recipe, output_dir: str | Path, resume: bool = False, overwrite: bool = False,
          show_progress: bool = True) -> dict[str, Any]:
    """Run a recipe; returns the summary also written to ``DIR/summary.json``."""
    with output_dir_lock(Path(output_dir)):
        run, resume_from = setup(recipe, output_dir, resume, overwrite)
        return run_loop(run, resume_from, Loop("train", train_step, run_evaluation, reinforce_status), show_progress)


def _eval_scalars(result: dict[str, Any]) -> dict[str, float]:
    return {key: value for key, value in result.items() if isinstance(value, (int, float))}


def run_loop(run: Run, resume_from: Path | None, loop: Loop, show_progress: bool = True,
             summary_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Steps with periodic evaluation, metrics, progress, checkpoints and signal handling; then the final
    evaluation, ``final/`` and ``summary.json``. Returns the summary."""
    from accelerate.utils import set_seed

    recipe = run.recipe
    counters, is_main = run.counters, run.accelerator.is_main_process
    start_step = int(counters["global_step"])
    if start_step > recipe.train.steps:
        raise UserError(f"--resume: {resume_from} is at step {start_step}, past train.steps={recipe.train.steps}; "
                        f"give --max-steps {start_step} or more")
    logger = MetricsLogger(run.output_dir, enabled=is_main, tensorboard=recipe.train.tensorboard,
                           resume_step=start_step if resume_from is not None else None)
    started = time.perf_counter()
    with _StopFlag() as stop, progress_bar(show_progress and is_main) as bar:
        # seed (or restore the checkpoint's RNG states) only now: importing some libraries (rich) draws from
        # python's global generator, and a fresh process imports them after setup
        if resume_from is None:
            set_seed(recipe.seed)
        else:
            ckpt.restore_rng_state(resume_from)
        if counters["eval_reward_before"] is None:
            before = _eval_scalars(loop.evaluate(run))
            counters["eval_reward_before"] = before["reward"]
            run.eval_before = before
            logger.log(0, {f"eval/{key}": value for key, value in before.items()})
        if stop.signal_name is not None:  # arrived during the first evaluation: keep it (checkpoint at this step)
            _stop(run, loop, start_step, stop.signal_name, logger, started)
        task = bar.add_task(loop.command, total=recipe.train.steps, completed=start_step, status="")
        for step in range(start_step, recipe.train.steps):
            metrics = loop.step(run, step)
            done = step + 1
            if recipe.train.eval_every and done % recipe.train.eval_every == 0 and done < recipe.train.steps:
                result = _eval_scalars(loop.evaluate(run))
                counters["last_eval"] = result["reward"]
                metrics.update({f"eval/{key}": value for key, value in result.items()})
                shown = {k: v for k, v in result.items() if not k.startswith("reward/")}  # per-reward: metrics.jsonl
                bar.console.log(f"step {done}: " + ", ".join(f"eval {k} {v:.3f}" for k, v in shown.items()))
            logger.log(done, metrics)
            shown_eval = counters["last_eval"] if counters["last_eval"] is not None else counters["eval_reward_before"]
            bar.update(task, completed=done, status=f"{loop.status(metrics)} | eval {shown_eval:.3f} | "
                                                    f"{metrics['perf/tokens_per_s']:.0f} tok/s")
            if metrics.get("train/skipped_updates"):
                bar.console.print(f"step {done}: non-finite loss ({metrics[loop.loss_key]}) or gradient norm "
                                  f"({metrics['grad/norm']}); update skipped ({counters['nonfinite_in_a_row']} in a "
                                  f"row, the run stops at {recipe.train.max_nonfinite_steps})",
                                  soft_wrap=True, markup=False, highlight=False)
            if counters["nonfinite_in_a_row"] >= recipe.train.max_nonfinite_steps:
                logger.close()
                raise NonFiniteError(
                    f"{counters['nonfinite_in_a_row']} consecutive updates had a non-finite loss or gradient (last at "
                    f"step {done}; train.max_nonfinite_steps={recipe.train.max_nonfinite_steps}); lower optim.lr, "
                    "set optim.max_grad_norm, check the reward scale, or use mixed_precision 'no'/'bf16' instead of "
                    "'fp16'. The model was not changed by the skipped updates")
            if stop.signal_name is not None:
                _stop(run, loop, done, stop.signal_name, logger, started)
            if recipe.train.save_every and done % recipe.train.save_every == 0 and done < recipe.train.steps:
                save_run_checkpoint(run, done)
        stop.then = "all steps are done: finishing the final evaluation and saving the model"
        final_eval = loop.evaluate(run)
    after = _eval_scalars(final_eval)
    logger.log(recipe.train.steps, {f"eval/{key}": value for key, value in after.items()})
    logger.close()
    before = {**run.eval_before, "reward": counters["eval_reward_before"]}
    summary = {
        "eval_reward_before": counters["eval_reward_before"],
        "eval_reward_after": final_eval["reward"],
        **{f"eval_{k.replace('/', '_')}_before": v for k, v in before.items() if k != "reward"},
        **{f"eval_{k.replace('/', '_')}_after": v for k, v in after.items() if k != "reward"},
        "steps": recipe.train.steps,
        **(summary_extra or {}),
        "wall_time_s": round(counters["wall_time_s"] + time.perf_counter() - started, 3),
        "train_time_s": round(counters["train_time_s"], 3),
        "tokens_per_s": round(counters["tokens_total"] / counters["train_time_s"], 1) if counters["train_time_s"] else None,
        "completion_tokens": counters["tokens_total"],
        "world_size": run.accelerator.num_processes,
        "resumed_from_step": start_step if resume_from is not None else None,
        "skipped_updates": counters["skipped_updates"],
        "model": recipe.model.name_or_path,
        "final_model_dir": str(run.output_dir / "final"),
        "examples": final_eval["examples"],
    }
    save_final(run, summary)
    return summary


def _stop(run: Run, loop: Loop, done: int, signal_name: str, logger: MetricsLogger, started: float):
    """Checkpoint after ``done`` steps and raise ``TrainingInterrupted`` saying how to resume."""
    run.counters["wall_time_s"] += time.perf_counter() - started
    path = save_run_checkpoint(run, done)
    logger.close()
    raise TrainingInterrupted(f"stopped by {signal_name} after step {done}; checkpoint written to {path}", str(path),
                              signal_name=signal_name, output_dir=str(run.output_dir),
                              hint=f"Resume with: rlhf-pg {loop.command} RECIPE --output-dir {run.output_dir} --resume")


def save_final(run: Run, summary: dict[str, Any]) -> None:
    """``DIR/final/`` (model or LoRA adapter + tokenizer; ``final/merged`` when peft.merge) and ``summary.json``."""
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        final_dir = run.output_dir / "final"
        staging = run.output_dir / ".final.tmp"  # written aside and renamed: never a half-written final/
        shutil.rmtree(staging, ignore_errors=True)
        model = run.unwrapped
        model.save_pretrained(staging)
        run.tokenizer.save_pretrained(staging)
        if run.recipe.peft is not None and run.recipe.peft.merge:
            merged = model.merge_and_unload()
            merged.save_pretrained(staging / "merged")
            run.tokenizer.save_pretrained(staging / "merged")
            summary["merged_model_dir"] = str(final_dir / "merged")
        shutil.rmtree(final_dir, ignore_errors=True)
        os.replace(staging, final_dir)
        summary_tmp = run.output_dir / ".summary.json.tmp"
        summary_tmp.write_text(json.dumps(summary, indent=2))
        os.replace(summary_tmp, run.output_dir / "summary.json")
    run.accelerator.wait_for_everyone()


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
    check_prompt_lengths(tokenizer, prompts, params.max_new_tokens, context_length(model),
                         "eval.max_new_tokens" if recipe.eval.max_new_tokens else "rollout.max_new_tokens")
    result = evaluate(model, tokenizer, prompts, columns, scorer, params, recipe.eval.batch_size, recipe.seed)
    result["num_prompts"] = len(prompts)
    result["model"] = model_config.name_or_path
    return result


__all__ = ["train", "evaluate_model", "compute_advantages", "policy_update"]
