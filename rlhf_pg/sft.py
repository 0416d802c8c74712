"""Maximum-likelihood fine-tuning (SFT) on prompt/completion pairs: the policy-gradient update with A = 1.

    for step in range(steps):
        (x_i, y_i), i < B  <- demonstrations: dataset rows, or the arithmetic demonstrator's answers
        tau_i              <- (s_0 = x_i, actions = tokens of y_i then EOS): a trajectory of the demonstrator
        theta              <- theta - lr * grad[-(1/B) sum_i sum_t log pi(a_it | s_it) * 1]   (losses.py)

REINFORCE weights the policy's *own* samples by their advantage; SFT weights someone else's samples by
1. The step is literally the trainer's ``policy_update`` on a ``Rollout`` of demonstrations with
advantages = 1 at temperature 1, so micro-batching, mixed precision, gradient clipping, non-finite
skipping, checkpoints, metrics and the summary are the ones ``train`` uses. Only completion tokens (and EOS) carry loss;
prompts are left-padded and completions right-padded, padding is masked out.
"""

from __future__ import annotations

import functools
import random
import time
from pathlib import Path
from typing import Any

import torch

from .chat import assistant_completion_ids, completion_text, is_conversation
from .core.mdp import Rollout, action_tokens
from .data import PromptSampler, columns_of, load_prompt_datasets, prompt_source
from .errors import UserError
from .policy.logprobs import completion_logprobs
from .policy.prompts import context_length, encode_demonstrations, stop_token_ids
from .recipe import Recipe
from .tasks.arithmetic import flawed_sum
from .lm_run import LMRun, setup_run
from .run.loop import run_job
from .run.optim import step_scheduler
from .run.rundir import RunDir
from .policy.update import policy_update


# --- demonstrations --------------------------------------------------------------------------------


def demonstration_rollout(tokenizer, prompts: list[Any], completions: list[Any], device: torch.device | str = "cpu",
                          max_context: int | None = None, chat_template_kwargs: dict[str, Any] | None = None,
                          eos_token_ids: list[int] | None = None) -> Rollout:
    """Demonstrations as a batch of trajectories: s_0 = the prompt, actions = the completion's tokens + EOS.

    Prompts are encoded exactly as every sampler encodes them (``policy.prompts.encode_demonstrations``:
    left-padded; a conversation rendered with the chat template). A text completion is its tokens without
    special tokens, then EOS; for a conversation prompt the completion (a text or ``[{"role": "assistant", "content": ...}]``, TRL's conversational
    prompt-completion format) is the assistant turn as the template writes it, up to and including its
    end token (``chat.assistant_completion_ids``). Right-padded; ``completion_mask`` is 1 on the
    completion tokens and the end token. ``logprobs`` (log pi_old) are unknown for a demonstrator and left
    at 0: with one update per batch they are never read.
    """
    tokens = [assistant_completion_ids(tokenizer, prompt, completion, chat_template_kwargs, eos_token_ids)
              if is_conversation(prompt) else
              tokenizer(completion_text(completion), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
              for prompt, completion in zip(prompts, completions)]
    return encode_demonstrations(tokenizer, prompts, [completion_text(c) for c in completions], tokens, None, device,
                                 max_context, chat_template_kwargs)


@torch.no_grad()
def heldout_nll(model, tokenizer, prompts: list[Any], completions: list[Any], batch_size: int = 256,
                chat_template_kwargs: dict[str, Any] | None = None, demonstrations=None) -> float:
    """Negative log-likelihood per completion token, ``-sum_i sum_t log pi(a_it | s_it) / sum_i T_i`` (nats).

    ``demonstrations``: how pairs become a batch (default ``demonstration_rollout``;
    ``EpisodeSpec.demonstrations``: observations are not counted)."""
    if demonstrations is None:
        demonstrations = functools.partial(demonstration_rollout, chat_template_kwargs=chat_template_kwargs,
                                           eos_token_ids=stop_token_ids(tokenizer, model))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    for start in range(0, len(prompts), batch_size):
        batch = demonstrations(tokenizer, prompts[start : start + batch_size],
                               completions[start : start + batch_size], device, context_length(model))
        logprobs = completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                       batch.completion_mask)
        total -= float((logprobs * action_tokens(batch)).sum())
        count += float(action_tokens(batch).sum())
    if was_training:
        model.train()
    return total / max(count, 1.0)


def _is_completion(value: Any) -> bool:
    """A text, or TRL's conversational completion: a non-empty list of assistant messages with string content."""
    if isinstance(value, str):
        return True
    return (isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str) for m in value))


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
    answer each time a problem is drawn, seeded by (seed, step), so a resumed run sees the same data. From
    reasoning-gym (``data.source: reasoning_gym``): its items with the gold answer as ``<answer>{answer}</answer>``.
    """

    def __init__(self, recipe: Recipe, batch_size: int):
        self.recipe = recipe
        self.gold_answers = recipe.data.source == "reasoning_gym"
        if self.gold_answers:
            self.from_task = False
            self.prompts, self.eval_prompts, self.eval_columns = prompt_source(
                recipe.data, batch_size, recipe.data.shuffle_seed + recipe.seed)
            self.eval_completions = self._complete(self.eval_prompts, self.eval_columns, random.Random(0))
            return
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
                bad = next((i for i, v in enumerate(dataset[column]) if not _is_completion(v)), None)
                if bad is not None:
                    raise UserError(f"data: {name} row {bad} of {recipe.data.path!r} has {column}={dataset[bad][column]!r}; "
                                    "every completion must be a string or a list of assistant messages "
                                    "[{role: assistant, content: ...}]")
            train_set, eval_set = _as_completion(train_set, column), _as_completion(eval_set, column)
        self.prompts = PromptSampler(train_set, batch_size, recipe.data.shuffle_seed + recipe.seed)
        self.eval_prompts, self.eval_columns = columns_of(eval_set)
        self.eval_completions = self._complete(self.eval_prompts, self.eval_columns, random.Random(recipe.data.shuffle_seed))

    def _complete(self, prompts: list[str], columns: dict[str, list[Any]], rng: random.Random) -> list[str]:
        if self.gold_answers:
            return [f"<answer>{answer}</answer>" for answer in columns["answer"]]
        if self.from_task:
            return [str(flawed_sum(a, b, self.forget_carry, rng)) for a, b in zip(columns["a"], columns["b"])]
        return list(columns["completion"])

    def batch(self, step: int) -> tuple[list[str], list[str]]:
        """The global batch of step ``step``: ``(prompts, completions)``."""
        prompts, columns = self.prompts.batch(step)
        rng = random.Random(self.recipe.seed * 1_000_003 + step)
        return prompts, self._complete(prompts, columns, rng)

    def describe(self) -> str:
        if self.gold_answers:
            return "reasoning-gym items, the gold answer as <answer>{answer}</answer>"
        if self.from_task:
            if self.forget_carry == 0.0:
                return "arithmetic task, exact demonstrator"
            return f"arithmetic task, flawed demonstrator (forget_carry={self.forget_carry})"
        return f"{self.recipe.data.path} (columns prompt, {self.recipe.data.completion_column})"


# --- the run ---------------------------------------------------------------------------------------


def sft_batch_size(recipe: Recipe) -> int:
    """``sft.batch_size``, by default as many samples per step as RL draws (prompts x completions)."""
    return recipe.sft.batch_size or recipe.rollout.prompts_per_step * recipe.rollout.completions_per_prompt


def sft_step(run: LMRun, pairs: tuple[list[Any], list[Any]], demonstrations, optimizer) -> tuple[dict[str, float], int]:
    """One maximum-likelihood step on the global batch ``pairs = (prompts, completions)``: this process's share
    as trajectories, then the policy-gradient update with A = 1 on every demonstrated token at temperature 1.
    Returns the step's metrics (``loss/nll``, ``grad/norm``, ``completion/length``, ``perf/*``, maybe
    ``train/skipped_updates``) and the number of demonstrated tokens over all processes."""
    accelerator, world = run.accelerator, run.accelerator.num_processes
    started = time.perf_counter()
    # 1. this process's share of the step's demonstrations, as trajectories
    prompts, completions = pairs
    per_process = len(prompts) // world
    mine = slice(accelerator.process_index * per_process, (accelerator.process_index + 1) * per_process)
    batch = demonstrations(run.tokenizer, prompts[mine], completions[mine], accelerator.device, run.max_context)
    # 2. the policy-gradient update with A = 1 on every demonstrated token, at temperature 1: maximum likelihood
    global_tokens = float(accelerator.reduce(action_tokens(batch).sum(), "sum"))
    results = policy_update(run.policy, optimizer, accelerator, batch, batch.completion_mask.clone(),
                            global_counts=(float(len(batch)), global_tokens / world),
                            aggregation=run.recipe.algorithm.aggregation,
                            micro_batch_size=run.recipe.train.micro_batch_size,
                            max_grad_norm=run.recipe.optim.max_grad_norm)
    step_time = time.perf_counter() - started
    metrics = {
        "loss/nll": float(accelerator.reduce(torch.tensor(results[-1].loss, device=accelerator.device), "mean")),
        "grad/norm": results[-1].grad_norm,
        "completion/length": global_tokens / len(prompts),
        "perf/step_s": step_time,
        "perf/tokens_per_s": global_tokens / step_time if step_time > 0 else 0.0,
    }
    if not results[-1].applied:
        metrics["train/skipped_updates"] = 1
    return metrics, int(global_tokens)


def demonstrations_of(run: LMRun):
    """How ``run`` turns pairs into trajectories: observations masked out for episodes; a chat turn ends with its
    end-of-turn id."""
    if run.episodes is not None:
        return run.episodes.demonstrations
    return functools.partial(demonstration_rollout, chat_template_kwargs=run.recipe.data.chat_template_kwargs,
                             eos_token_ids=stop_token_ids(run.tokenizer, run.unwrapped))


class SftWarmup:
    """``train.sft_warmup_steps``: maximum likelihood on the recipe's demonstrations before RL's first step.

    The same step as ``rlhf-pg sft`` (``sft_step``) on the same demonstrations (``Demonstrations``: training
    items only, ``sft.batch_size`` per step), through the run's own optimizer at ``train.sft_warmup_lr``
    (constant). Afterwards the optimizer's moments are cleared and its learning rate put back, so RL starts
    with a fresh optimizer from the warmed weights. Built before the run directory is touched: a recipe whose
    data has no demonstrations fails first.
    """

    def __init__(self, recipe: Recipe):
        self.steps, self.lr = recipe.train.sft_warmup_steps, recipe.train.sft_warmup_lr
        self.batch_size = sft_batch_size(recipe)
        try:
            self.demos = Demonstrations(recipe, self.batch_size)
        except UserError as error:
            raise UserError(f"train.sft_warmup_steps={self.steps}: the SFT warm-up needs demonstrations (reasoning_gym "
                            f"gold answers, the built-in arithmetic task's demonstrator, or data.path rows with "
                            f"data.completion_column), and {error}. Set train.sft_warmup_steps: 0 to train "
                            "without a warm-up") from None

    def check_processes(self, world: int) -> None:
        """Every process takes an equal share of a warm-up step's demonstrations."""
        if self.batch_size % world:
            raise UserError(f"sft.batch_size={self.batch_size} (the SFT warm-up's) must be divisible by the number of "
                            f"processes ({world})")

    def run(self, run: LMRun) -> None:
        """``self.steps`` SFT steps on ``run.policy``; logs ``warmup/<metric>`` (at step 0, with ``warmup/step``)."""
        demonstrations = demonstrations_of(run)
        optimizer = getattr(run.optimizer, "optimizer", run.optimizer)  # accelerate's wrapper holds the torch one
        rl_lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        run.unwrapped.train()
        try:
            for step in range(self.steps):
                metrics, tokens = sft_step(run, self.demos.batch(step), demonstrations, run.optimizer)
                metrics = {"warmup/step": step + 1, **{f"warmup/{key}": value for key, value in metrics.items()}}
                if run.logger is not None:
                    run.logger.log(0, metrics)
                if run.is_main and (step == 0 or (step + 1) % 10 == 0 or step + 1 == self.steps):
                    line = f"SFT warm-up step {step + 1}/{self.steps}: nll {metrics['warmup/loss/nll']:.3f}"
                    if step == 0:
                        line += f" (lr {self.lr:g}, {self.batch_size} per step: {self.demos.describe()})"
                    if run.console is not None:
                        run.console.log(line, markup=False, highlight=False)
                    else:
                        print(line, flush=True)
        finally:
            optimizer.state.clear()  # RL's optimizer starts fresh: no Adam moments from the warm-up
            for group, lr in zip(optimizer.param_groups, rl_lrs):
                group["lr"] = lr
        run.sync_sampler()  # an engine with its own copy of the weights samples the warmed policy


class SftRun(LMRun):
    """``rlhf-pg sft``: an LM run whose step is maximum likelihood on the step's demonstrations."""

    command = "sft"
    loss_key = "loss/nll"
    demos: Demonstrations
    batch_size: int
    demonstrations: Any  # (tokenizer, prompts, completions, device, max_context) -> Rollout

    def step(self, step: int) -> dict[str, float]:
        metrics, tokens = sft_step(self, self.demos.batch(step), self.demonstrations, self.optimizer)
        step_scheduler(self.scheduler)
        metrics["optim/lr"] = self.scheduler.get_last_lr()[0]
        self.counters["tokens_total"] += tokens
        return metrics

    def evaluate(self) -> dict[str, Any]:
        self.sync_sampler()  # SFT samples only here: the engine gets the weights the steps since wrote
        result = super().evaluate()
        result["nll"] = heldout_nll(self.unwrapped, self.tokenizer, self.demos.eval_prompts, self.demos.eval_completions,
                                    self.recipe.eval.batch_size, demonstrations=self.demonstrations)
        return result

    def status(self, metrics: dict[str, float]) -> str:
        return f"nll {metrics['loss/nll']:.3f}"

    def summary(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        return {**super().summary(before, after), "batch_size": self.batch_size,
                "samples_seen": self.recipe.train.steps * self.batch_size, "demonstrations": self.demos.describe()}


def train_sft(recipe: Recipe, output_dir: str | Path, resume: bool = False, overwrite: bool = False,
              show_progress: bool = True) -> dict[str, Any]:
    """Maximum-likelihood fine-tuning; writes what ``train`` writes and returns the summary.

    Uses ``model``, ``data`` (+ ``data.completion_column``), ``sft``, ``optim``, ``train``, ``eval``,
    ``rewards`` (held-out greedy reward, as ``train``), ``peft`` and ``algorithm.aggregation``; the
    other ``algorithm`` and ``rollout`` keys are for sampling and do not apply (no reference model is
    loaded). The loop (evaluation, checkpoints, signals, resume, summary) is ``run.loop``.
    """
    batch_size = sft_batch_size(recipe)
    demos = Demonstrations(recipe, batch_size)  # bad data fails before anything is written or loaded
    with RunDir(output_dir).lock():
        run, resume_from = setup_run(SftRun, recipe, output_dir, resume, overwrite, wants_reference=False)
        world = run.accelerator.num_processes
        if batch_size % world:
            raise UserError(f"sft.batch_size={batch_size} must be divisible by the number of processes ({world})")
        run.demos, run.batch_size = demos, batch_size
        run.demonstrations = demonstrations_of(run)
        try:
            return run_job(run, resume_from, show_progress)
        finally:
            run.close()


__all__ = ["Demonstrations", "demonstration_rollout", "heldout_nll", "sft_batch_size", "sft_step", "SftWarmup",
           "train_sft", "SftRun"]
