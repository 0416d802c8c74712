"""Held-out evaluation: decode every eval prompt (greedy by default) and score it with the rewards."""

from __future__ import annotations

from typing import Any

import torch

from reward_models import RewardScorer, judged_mean
from reward_models.reasoning import entry_scores

from .core.mdp import Rollout
from .episodes.spec import environment_scores, episode_metrics, render_episode
from .policy.sampler import Sampler, SamplingParams


@torch.no_grad()
def evaluate(
    sampler: Sampler, model, prompts: list[Any], columns: dict[str, list[Any]], scorer: RewardScorer,
    params: SamplingParams, batch_size: int = 256, seed: int = 0,
) -> dict[str, Any]:
    """Mean reward over ``prompts`` (text or conversations; one completion each, drawn by ``sampler`` from
    ``model``), per-reward means, the truncation rate and a few examples.

    Returns ``{"reward": mean total reward, "reward/<label>": mean of that reward, "truncated": fraction of
    completions cut at max_new_tokens without EOS or a stop string, "examples": [...]}``; reasoning-gym items
    (columns ``entry`` and ``task``) add ``"<task>/accuracy"``: the mean of ``score_answer(extract_answer(completion),
    entry)`` over that task's items, whatever the rewards are. When the sampler
    draws multi-turn episodes, the result also has ``tool_calls`` and ``tool_errors`` per episode, and each
    example its ``episode`` rendered turn by turn. ``model`` is put in eval mode meanwhile (no dropout).
    """
    all_episodes = []
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    totals: list[float] = []
    per_reward: dict[str, list[float]] = {label: [] for label in scorer.labels}
    examples: list[dict[str, Any]] = []
    truncated = 0
    per_task: dict[str, list[float]] = {}  # reasoning-gym items: the task's own score of each completion
    for start in range(0, len(prompts), batch_size):
        batch_prompts = prompts[start : start + batch_size]
        batch_columns = {key: values[start : start + batch_size] for key, values in columns.items()}
        batch = sampler.sample(batch_prompts, 1, params, columns=batch_columns, generator=generator)
        total, scores = scorer(batch.prompts, batch.completions, finished=batch.finished.tolist(), **batch.extras)
        total = environment_scores(batch, total, scores)
        all_episodes += batch.episodes or []
        truncated += int((~batch.finished).sum())
        totals.extend(total)
        if "entry" in batch_columns and "task" in batch_columns:
            task_scores = entry_scores(batch.completions, batch.extras["entry"], batch.extras.get("task_config"))
            for task, score in zip(batch.extras["task"], task_scores):
                per_task.setdefault(task, []).append(score)
        for label, values in scores.items():
            per_reward.setdefault(label, []).extend(values)  # episodes with an environment add "environment"
        if len(examples) < 8:
            examples.extend(
                {"prompt": p, "completion": c, "reward": r}
                for p, c, r in zip(batch.prompts[:8], batch.completions[:8], total[:8])
            )
            for example, episode in zip(examples[-8:], (batch.episodes or [])[:8]):
                example["episode"] = render_episode(episode)
    if was_training:
        model.train()
    result: dict[str, Any] = {"reward": sum(totals) / max(len(totals), 1)}
    for label, values in per_reward.items():
        result[f"reward/{label}"] = judged_mean(values)  # over the samples it judged (None: not judged)
    result["truncated"] = truncated / max(len(totals), 1)
    for task, values in per_task.items():
        result[f"{task}/accuracy"] = sum(values) / len(values)
    if all_episodes:
        metrics = episode_metrics(all_episodes)
        result["tool_calls"], result["tool_errors"] = metrics["episode/tool_calls"], metrics["episode/tool_errors"]
    result["examples"] = examples[:8]
    return result


def completion_records(step: int, batch: Rollout, scores: list[float], per_reward: dict[str, list[float]],
                       limit: int | None = None) -> list[dict[str, Any]]:
    """JSON-ready rows for a completions log (``train.log_completions_every``): one per completion, the first
    ``limit`` of the batch (all when None).

    Each row: ``step``, ``group`` (prompt id), ``prompt`` (text or messages, as the reward functions saw it),
    ``completion`` (text), ``reward`` (the weighted total), ``reward/<label>``, ``tokens`` (completion length,
    EOS included) and ``truncated`` (hit max_new_tokens without EOS or a stop string). A multi-turn batch
    adds ``episode`` (``render_episode``: the turns, actions and observations marked) and ``turns``.
    """
    rows = range(len(batch)) if limit is None else range(min(limit, len(batch)))
    lengths = batch.completion_mask.sum(-1).tolist()
    records = [
        {"step": step, "group": int(batch.group_ids[i]), "prompt": batch.prompts[i], "completion": batch.completions[i],
         "reward": scores[i], **{f"reward/{label}": None if values[i] != values[i] else values[i]  # NaN: not judged
                                 for label, values in per_reward.items()},
         "tokens": int(lengths[i]), "truncated": not bool(batch.finished[i])}
        for i in rows
    ]
    for record, i in zip(records, rows):
        if batch.episodes is not None:
            record.update(episode=render_episode(batch.episodes[i]), turns=batch.episodes[i].messages())
    return records
