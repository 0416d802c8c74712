"""The step's batch: this process's prompts, K sampled completions each, and their rewards.

    prompts       <- the step's prompts (this process's shard; a prompt's group stays on one process)
    tau_1..tau_K  <- K completions per prompt from pi_theta      (run.sampler: the recipe's engine, policy/sampler.py)
    r(tau)        <- the weighted reward functions (+ DAPO's soft overlong penalty)
                                                          (reward_models/scorer.py, core/advantages.py)
    b_ReMax       <- r(greedy completion of the same prompt), when the baseline is remax
    dynamic sampling (DAPO): drop groups of equal rewards, sample more prompts, for at most N rounds
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from reward_models.reasoning import entry_scores

from .core import estimator
from .core.advantages import degenerate_groups, overlong_penalty
from .core.mdp import Rollout, concat_rollouts
from .episodes.spec import environment_scores, episode_metrics
from .lm_run import LMRun


@dataclass
class Scored:
    """One step's sampled batch with its rewards: ``scores`` ``[B]`` (weighted sum, shaped), per reward, and
    the ReMax baseline ``greedy`` ``[B]`` when the recipe uses it."""

    batch: Rollout
    scores: list[float]
    per_reward: dict[str, list[float]]
    greedy: list[float] | None = None
    stats: dict[str, float] = field(default_factory=dict)


def _score(run: LMRun, prompts: list[Any], columns: dict[str, list[Any]], step: int, round_: int,
           group_offset: int) -> Scored:
    """Sample K completions per prompt, score them (+ DAPO's overlong penalty, + ReMax's greedy baseline)."""
    recipe, accelerator = run.recipe, run.accelerator
    seed = ((recipe.seed * 1_000_003 + step) * 997 + accelerator.process_index) * 31 + round_
    generator = torch.Generator(device=accelerator.device).manual_seed(seed)
    batch = run.sampler.sample(prompts, recipe.rollout.completions_per_prompt, run.sampling(), columns=columns,
                               generator=generator, group_offset=group_offset)
    scores, per_reward = run.scorer(batch.prompts, batch.completions, finished=batch.finished.tolist(), **batch.extras)
    scores = _shaped(run, batch, scores, per_reward)
    greedy = None
    if recipe.algorithm.baseline == estimator.REMAX_BASELINE:  # b = r(greedy completion of the prompt), not trained on
        params = replace(run.sampling(), temperature=0.0)
        greedy_batch = run.sampler.sample(prompts, 1, params, columns=columns, generator=generator)
        greedy_scores, greedy_per_reward = run.scorer(greedy_batch.prompts, greedy_batch.completions,
                                                      finished=greedy_batch.finished.tolist(), **greedy_batch.extras)
        greedy_scores = _shaped(run, greedy_batch, greedy_scores, greedy_per_reward)
        greedy = [g for g in greedy_scores for _ in range(recipe.rollout.completions_per_prompt)]
    return Scored(batch, list(scores), per_reward, greedy, episode_metrics(batch.episodes or []))


def _shaped(run: LMRun, batch: Rollout, scores: list[float], per_reward: dict[str, list[float]]) -> list[float]:
    """The scores + the environment's rewards (episodes only) + DAPO's soft overlong penalty (a ramp to
    -overlong_penalty over the last ``overlong_buffer_fraction`` of max_new_tokens), also in ``per_reward``."""
    scores = environment_scores(batch, scores, per_reward)
    algorithm, max_new = run.recipe.algorithm, run.recipe.rollout.max_new_tokens
    if algorithm.overlong_buffer_fraction > 0:
        penalty = overlong_penalty(batch.completion_mask.sum(-1), max_new,
                                   round(algorithm.overlong_buffer_fraction * max_new), algorithm.overlong_penalty)
        scores = [s + float(p) for s, p in zip(scores, penalty)]
        per_reward["overlong_penalty"] = penalty.tolist()
    return scores


def sample_step(run: LMRun, step: int) -> Scored:
    """This process's share of the step's prompts, K completions each, scored (a group stays on one process).

    With ``algorithm.dynamic_sampling`` (DAPO), groups whose rewards are all equal (no learning signal
    under a group-centred baseline) are dropped and more prompts are sampled, for at most
    ``max_sampling_rounds`` rounds; a batch still short after that goes on with what it has (a warning says
    how many groups), topped up with dropped groups when several processes must agree on the batch size.
    """
    recipe, accelerator = run.recipe, run.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process, k = recipe.rollout.prompts_per_step // world, recipe.rollout.completions_per_prompt
    prompts, columns = run.prompts.batch(step)
    mine = slice(rank * per_process, (rank + 1) * per_process)
    first = _score(run, prompts[mine], {key: v[mine] for key, v in columns.items()}, step, 0, mine.start)
    if not recipe.algorithm.dynamic_sampling:
        return first
    kept: list[Scored] = []
    dropped: list[Scored] = []
    kept_groups, rounds, degenerate, seen = 0, 0, 0, 0
    current = first
    while True:
        rounds += 1
        is_degenerate = degenerate_groups(torch.tensor(current.scores), current.batch.group_ids.cpu())
        groups = len(current.batch) // k
        flags = [bool(is_degenerate[g * k]) for g in range(groups)]
        seen, degenerate = seen + groups, degenerate + sum(flags)
        for value, target in ((False, kept), (True, dropped)):
            rows = [g * k + j for g in range(groups) if flags[g] == value for j in range(k)]
            if rows:
                target.append(_select(current, rows))
        kept_groups += flags.count(False)
        short = torch.tensor(float(kept_groups < per_process), device=accelerator.device)
        if rounds >= recipe.algorithm.max_sampling_rounds or float(accelerator.reduce(short, "max")) == 0:
            break
        needed = max(per_process - kept_groups, 1)
        extra_prompts, extra_columns = _extra_prompts(run, step, rounds, needed)
        current = _score(run, extra_prompts, extra_columns, step, rounds, 0)
    if kept_groups < per_process:
        print(f"step {step + 1}: dynamic sampling found {kept_groups} of {per_process} groups with unequal rewards "
              f"in {rounds} rounds (algorithm.max_sampling_rounds={recipe.algorithm.max_sampling_rounds}); "
              "training on what it has", flush=True)
    parts = kept + (dropped if world > 1 or not kept else [])  # several processes: equal batch sizes
    merged = _merge(parts, run.tokenizer.pad_token_id, k, per_process)
    # groups renumbered: unique per process, [rank * per_process, (rank + 1) * per_process)
    merged.batch.group_ids = (torch.arange(len(merged.batch), device=merged.batch.group_ids.device) // k
                              + rank * per_process)
    merged.stats = {"sampling/rounds": float(rounds), "sampling/degenerate_fraction": degenerate / max(seen, 1),
                    "sampling/kept_groups": float(min(kept_groups, per_process))}
    return merged


def _select(scored: Scored, rows: list[int]) -> Scored:
    return Scored(scored.batch.select(rows), [scored.scores[i] for i in rows],
                  {label: [values[i] for i in rows] for label, values in scored.per_reward.items()},
                  None if scored.greedy is None else [scored.greedy[i] for i in rows])


def _merge(parts: list[Scored], pad_token_id: int, k: int, groups: int) -> Scored:
    """The parts' rows, in order, cut to ``groups`` groups of ``k``."""
    batch = concat_rollouts([p.batch for p in parts], pad_token_id)
    rows = list(range(min(len(batch), groups * k)))
    merged = Scored(batch, [s for p in parts for s in p.scores],
                    {label: [v for p in parts for v in p.per_reward[label]] for label in parts[0].per_reward},
                    None if parts[0].greedy is None else [g for p in parts for g in p.greedy])
    return _select(merged, rows) if len(rows) < len(batch) else merged


def _extra_prompts(run: LMRun, step: int, round_: int, count: int) -> tuple[list[Any], dict[str, list[Any]]]:
    """``count`` more training prompts for a dynamic-sampling round, drawn by (seed, step, round, process)."""
    seed = ((run.recipe.seed * 1_000_003 + step) * 101 + round_) * 997 + run.accelerator.process_index
    return run.prompts.draw(seed, count)


def task_feedback(run: LMRun, step: int, scored: Scored) -> dict[str, float]:
    """reasoning-gym prompts: each completion's score by its task's own protocol (``entry_scores``), over every
    process, as ``reward/reasoning_gym/<task>`` (the step's mean per task), fed to the curriculum
    (``ReasoningGymSource.observe``: ``curriculum/<task>/level``, ``curriculum/<task>/accuracy``); a level that moves
    is said in the console. Other prompt sources: no metrics."""
    extras = scored.batch.extras
    if "entry" not in extras or "task" not in extras or not hasattr(run.prompts, "observe"):
        return {}
    scores = entry_scores(scored.batch.completions, extras["entry"], extras.get("task_config"))
    tasks = list(extras["task"])
    if run.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object([(tasks, scores)])
        tasks, scores = [t for part in parts for t in part[0]], [s for part in parts for s in part[1]]
    metrics = {}
    for task in dict.fromkeys(tasks):
        mine = [s for t, s in zip(tasks, scores) if t == task]
        metrics[f"reward/reasoning_gym/{task}"] = sum(mine) / len(mine)
    curriculum, notes = run.prompts.observe(tasks, scores)
    for note in notes:
        run.say(f"step {step + 1}: {note}")
    return {**metrics, **curriculum}
