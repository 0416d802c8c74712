"""The doctor's checks: load what ``train`` loads, sample and score one batch, and turn what it sees into findings.

Each section's numbers go into ``Diagnosis.stats[section]`` and are printed (``report.py``) as soon as they exist,
so a slow model shows its progress; ``Diagnosis.findings`` are the verdict.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..chat import is_conversation, prompt_text, prompt_texts, reward_completions
from ..errors import RewardFunctionError, UserError
from ..recipe import Recipe
from .report import (show_batch, show_end, show_examples, show_memory, show_model, show_prompt, show_recipe,
                     show_rewards, show_verdict)
from ..policy.kernels import head_for_logprobs
from ..run.memory import available_memory, memory_estimate, rss_bytes, size_text, step_shape, what_fits
from .measures import end_of_turn_token, group_spread, histogram, model_shape

DEFAULT_TIME_BUDGET_S = 30  # seconds of sampling; loading, scoring and printing come on top
_PROBE_PROMPTS = 2  # sampled first, to measure how many more fit in the budget
_MIN_GROUPS_FOR_A_VERDICT = 4  # fewer sampled groups (a partial batch) that all tie make a warning, not a problem
_MOSTLY_DEGENERATE = 0.8  # a warning from this fraction of groups with equal rewards


@dataclass
class Finding:
    """One thing the doctor noticed: a ``problem`` (the run would be wasted: exit 1) or a ``warning``."""

    level: Literal["problem", "warning"]
    title: str
    detail: str
    fix: str


@dataclass
class Diagnosis:
    """The findings and the numbers behind them, per section (``model``, ``prompt``, ``end``, ``batch``,
    ``rewards``, ``memory``)."""

    findings: list[Finding] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "problem"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def add(self, level: Literal["problem", "warning"], title: str, detail: str, fix: str) -> None:
        self.findings.append(Finding(level, title, detail, fix))

    def verdict(self) -> str:
        if self.problems:
            return (f"doctor: {len(self.problems)} problem(s) that would waste the run, {len(self.warnings)} "
                    "warning(s); fix them and run the doctor again")
        return f"doctor: ready to train ({len(self.warnings)} warning(s))"


def diagnose(recipe: Recipe, prompts: int | None = None, time_budget_s: float = DEFAULT_TIME_BUDGET_S,
             console=None) -> Diagnosis:
    """Load, render, sample one batch and score it, printing each section to ``console`` (a ``rich`` Console);
    return the findings. ``prompts``: sample exactly that many of the first step's prompts (default: as many of
    ``rollout.prompts_per_step`` as ``time_budget_s`` seconds of sampling allow, after a probe of 2)."""
    from rich.console import Console

    from reward_models import RewardScorer

    from ..data import prompt_source
    from ..models import apply_lora, load_policy
    from ..policy.cpu_matmul import explain_choice
    from ..policy.prompts import check_prompt_lengths, context_length, stop_token_ids
    from ..run.accel import new_accelerator, set_threads

    console = console or Console()
    diagnosis = Diagnosis()
    started = time.perf_counter()
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # before we add to it
    set_threads(recipe.train.num_threads)
    scorer = RewardScorer(recipe.rewards)  # a bad reward name fails here: exit 2, as train
    runtime = rss_bytes()  # the process before the model: the memory estimate's R (as lm_run.setup_run measures it)
    model, tokenizer, model_path = load_policy(recipe.model)
    runtime = max(runtime, rss_bytes() - sum(p.numel() * p.element_size() for p in model.parameters()))
    if recipe.peft is not None:
        model = apply_lora(model, recipe.peft)
    device = new_accelerator(recipe.train.mixed_precision, shards_itself=True).device  # (one process: nothing to shard)
    model = model.to(device).eval()
    sampler, _, _ = prompt_source(recipe.data, recipe.rollout.prompts_per_step, recipe.data.shuffle_seed + recipe.seed)
    diagnosis.stats["model"] = {
        "name": recipe.model.name_or_path, "path": model_path, "dtype": recipe.model.dtype, "device": str(device),
        "parameters": sum(p.numel() for p in model.parameters()), "lora": recipe.peft is not None,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "tokenizer": type(tokenizer).__name__, "vocab": len(tokenizer),
        "chat_template": bool(getattr(tokenizer, "chat_template", None)), "load_s": time.perf_counter() - started,
        "threads": torch.get_num_threads(), "cores": os.cpu_count() or 1, "load_average": load_average}
    if device.type == "cpu":  # which kernel train.cpu_matmul: auto picks here, and why (the run's setup probe)
        rows = recipe.rollout.prompts_per_step * recipe.rollout.completions_per_prompt
        diagnosis.stats["model"]["cpu_matmul"] = explain_choice(recipe.train.cpu_matmul, model, rows)
    _check_threads(diagnosis, device)
    show_model(console, diagnosis.stats["model"])

    chat_kwargs = getattr(recipe.data, "chat_template_kwargs", None)  # keys read when the schema has them
    stop_strings = getattr(recipe.rollout, "stop", None) or ()
    stop_strings = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings)
    step_prompts, step_columns = sampler.batch(0)
    texts, special_tokens = prompt_texts(tokenizer, step_prompts[:1], chat_kwargs, where="data")
    ids = tokenizer(texts[0], add_special_tokens=special_tokens)["input_ids"]
    chat = is_conversation(step_prompts[0])
    diagnosis.stats["prompt"] = {"as_written": repr(step_prompts[0]), "as_read": tokenizer.decode(ids),
                                 "tokens": len(ids), "chat": chat,
                                 "double_bos": tokenizer.bos_token_id is not None and ids[:2] == [tokenizer.bos_token_id] * 2}
    show_prompt(console, diagnosis.stats["prompt"])
    stop_ids = stop_token_ids(tokenizer, model)
    _check_end_tokens(diagnosis, tokenizer, model, step_prompts[0] if chat else None, chat_kwargs, stop_ids, stop_strings)
    show_end(console, diagnosis.stats["end"])
    try:
        check_prompt_lengths(tokenizer, sampler.known_prompts(), recipe.rollout.max_new_tokens, context_length(model),
                             "rollout.max_new_tokens", chat_kwargs)
    except UserError as error:
        diagnosis.add("problem", "a prompt does not fit in the model's context", str(error),
                      "drop or shorten the long prompts, or lower rollout.max_new_tokens")

    batch = _sample(diagnosis, recipe, model, tokenizer, step_prompts, step_columns, prompts, time_budget_s, device)
    if batch is not None:
        per_reward, totals = _score(diagnosis, recipe, scorer, batch)
        _check_batch(diagnosis, recipe, batch, stop_ids, stop_strings, totals, prompts, time_budget_s)
        show_batch(console, diagnosis.stats["batch"])
        show_rewards(console, diagnosis.stats["rewards"])
        show_examples(console, diagnosis.stats["batch"]["examples"])
        _judge_rewards(diagnosis, scorer, per_reward, totals)
        _judge_batch(diagnosis, recipe)
    if diagnosis.stats["model"].get("doctor_threads"):
        torch.set_num_threads(diagnosis.stats["model"]["threads"])  # as the recipe set it
    _check_memory(diagnosis, recipe, model, device, int(batch.prompt_mask.sum(-1).max()) if batch is not None
                  else len(ids), runtime)
    show_memory(console, diagnosis.stats["memory"])
    show_recipe(console, recipe.to_dict())
    diagnosis.stats["wall_s"] = time.perf_counter() - started
    show_verdict(console, diagnosis)
    return diagnosis


def _check_threads(diagnosis, device) -> None:
    """On a busy CPU, several torch threads per process contend with the other processes' (spinning OpenMP
    threads): sampling can be many times slower than with one thread (10x measured on 2 shared cores). The
    doctor then samples with one thread itself, to stay within its minute, and says so."""
    stats = diagnosis.stats["model"]
    threads, cores, load = stats["threads"], stats["cores"], stats["load_average"]
    if device.type == "cpu" and threads > 1 and load >= 1.0 and load + threads > cores + 0.5:
        diagnosis.add("warning", "the CPU is shared",
                      f"the load average is {load:.1f} on {cores} cores and torch uses {threads} threads: contending "
                      "threads can make sampling and updates several times slower (the doctor sampled with 1)"
                      + ("; its matmul-kernel probe may have measured the other processes (a run's "
                         "train.cpu_matmul: auto re-checks between steps)" if stats.get("cpu_matmul", {}).get("probed")
                         else ""),
                      "set train.num_threads=1 (or OMP_NUM_THREADS=1) while other processes use the cores")
        torch.set_num_threads(1)
        stats["doctor_threads"] = 1


def _check_end_tokens(diagnosis, tokenizer, model, chat_prompt, chat_kwargs, stop_ids, stop_strings) -> None:
    """The end ids by name and source; with a chat prompt, the template's end-of-turn token must be one of them."""
    generation = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    generation = set(generation if isinstance(generation, (list, tuple)) else [generation]) - {None}
    rows = [(token, repr(tokenizer.convert_ids_to_tokens(token)),
             ", ".join(name for name, ids in (("tokenizer.eos_token_id", {tokenizer.eos_token_id}),
                                               ("generation_config.eos_token_id", generation)) if token in ids))
            for token in stop_ids]
    end = end_of_turn_token(tokenizer, chat_prompt, chat_kwargs) if chat_prompt is not None else None
    diagnosis.stats["end"] = {"ids": rows, "stop_strings": list(stop_strings), "chat": chat_prompt is not None,
                              "end_of_turn": None if end is None else (end, repr(tokenizer.convert_ids_to_tokens(end))),
                              "end_of_turn_ends": end in stop_ids}
    if chat_prompt is None:
        return
    if end is None:
        diagnosis.add("warning", "the chat template closes an assistant turn with no special token",
                      "a completion can then end only at the tokenizer's EOS or a stop string",
                      "check that the model was trained to emit its EOS after a reply, or set rollout.stop")
    elif end not in stop_ids:
        name = repr(tokenizer.convert_ids_to_tokens(end))
        diagnosis.add("problem", "the end-of-turn token does not end completions",
                      f"the chat template closes an assistant turn with {name} (id {end}), which is not among the end "
                      f"ids {stop_ids}: the policy answers, closes its turn and keeps sampling until max_new_tokens, so "
                      "completions are truncated and the loss never sees the end of a turn",
                      f"add {end} to eos_token_id in the model's generation_config.json (a list is allowed), or save "
                      "the tokenizer with that token as its eos_token")


def _sample(diagnosis, recipe, model, tokenizer, step_prompts, step_columns, prompts, time_budget_s, device):
    """The first step's batch, drawn by the recipe's engine (``make_sampler``, as ``train`` draws it): ``prompts``
    of its prompts, or a probe of 2 and as many more as the budget allows."""
    from ..core.mdp import concat_rollouts
    from ..policy.sampler import SamplingParams, make_sampler

    config = recipe.rollout
    planned = min(prompts, config.prompts_per_step) if prompts else config.prompts_per_step
    params = SamplingParams.for_training(recipe)
    sampler = make_sampler(recipe, model, tokenizer)
    generator = torch.Generator(device=device).manual_seed(recipe.seed)
    parts, sampled, started = [], 0, time.perf_counter()
    try:
        while sampled < planned:
            if prompts or not parts:
                count = planned if prompts else min(planned, _PROBE_PROMPTS)
            else:  # seconds per prompt so far; a larger batch costs less per prompt, so this errs short
                elapsed = time.perf_counter() - started
                count = min(planned - sampled, int((time_budget_s - elapsed) / (elapsed / sampled)))
                if count < 1:
                    break
            rows = slice(sampled, sampled + count)
            parts.append(sampler.sample(step_prompts[rows], config.completions_per_prompt, params,
                                        columns={key: values[rows] for key, values in step_columns.items()},
                                        generator=generator, group_offset=sampled))
            sampled += count
    except UserError as error:
        diagnosis.add("problem", "sampling failed", str(error), "fix the input named above")
    finally:
        sampler.close()
    diagnosis.stats["batch"] = {"sampled": sampled, "planned": config.prompts_per_step, "sample_s":
                                time.perf_counter() - started}
    return concat_rollouts(parts, tokenizer.pad_token_id) if parts else None


def _score(diagnosis, recipe, scorer, batch) -> tuple[dict[str, list[float]], list[float]]:
    """Each reward function alone on the batch (its latency, its error), then the weighted total as training
    computes it (+ DAPO's overlong penalty when the recipe has one)."""
    from ..core.advantages import overlong_penalty

    completions = reward_completions(batch.prompts, batch.completions)
    columns = {"finished": batch.finished.tolist(), **batch.extras}
    per_reward, rows = {}, []
    for term in scorer.terms:
        began, error = time.perf_counter(), None
        try:
            per_reward[term.label] = scorer.score_term(term, batch.prompts, completions, columns)
        except (RewardFunctionError, UserError) as failure:
            error = str(failure)
        seconds, scores = time.perf_counter() - began, per_reward.get(term.label)
        judged = [s for s in scores if not math.isnan(s)] if scores is not None else []
        equal, groups = group_spread(scores, batch.group_ids) if scores is not None else (0, 0)
        rows.append({"name": term.name, "label": term.label, "where": term.where, "weight": term.weight,
                     "async": term.is_async, "seconds": seconds, "error": error, "judged": len(judged),
                     "mean": sum(judged) / len(judged) if judged else None, "spread": groups - equal, "groups": groups,
                     "histogram": histogram(scores) if scores is not None else []})
    totals = scorer.total(per_reward) if per_reward else [0.0] * len(batch)
    algorithm, max_new = recipe.algorithm, recipe.rollout.max_new_tokens
    if algorithm.overlong_buffer_fraction > 0:  # DAPO's soft overlong penalty is part of the trained reward
        penalty = overlong_penalty(batch.completion_mask.sum(-1), max_new,
                                   round(algorithm.overlong_buffer_fraction * max_new), algorithm.overlong_penalty)
        totals = [t + float(p) for t, p in zip(totals, penalty)]
    diagnosis.stats["rewards"] = {"rows": rows, "size": len(batch)}
    return per_reward, totals


def _check_batch(diagnosis, recipe, batch, stop_ids, stop_strings, totals, prompts, time_budget_s) -> None:
    """Truncation, the end token inside the loss mask, groups with equal rewards, a few examples."""
    stats = diagnosis.stats["batch"]
    finished = batch.finished.tolist()
    lengths = batch.completion_mask.sum(-1).long().tolist()
    eos = torch.tensor(stop_ids, device=batch.completion_ids.device)
    covered = outside = 0  # finished rows whose mask is 1 up to and including an end token (or a stop string's)
    for row, done in enumerate(finished):
        if not done:
            continue
        n, mask = lengths[row], batch.completion_mask[row]
        contiguous = n > 0 and bool(mask[:n].all()) and not bool(mask[n:].any())
        if contiguous and (bool(torch.isin(batch.completion_ids[row, n - 1], eos)) or stop_strings):
            covered += 1
        else:
            outside += 1
    if outside:
        diagnosis.add("problem", "the end token is outside the loss mask",
                      f"{outside} finished completion(s) do not end, inside completion_mask, with an end id {stop_ids}: "
                      "the update would never learn when to stop",
                      "report this as a bug of the sampler (completion_mask must be 1 up to and including EOS)")
    degenerate, groups = group_spread(totals, batch.group_ids)
    firsts: dict[int, int] = {}
    for row, group in enumerate(batch.group_ids.tolist()):
        firsts.setdefault(group, row)
    config, algorithm = recipe.rollout, recipe.algorithm
    stats.update(
        partial_because=(f"--prompts {prompts}" if prompts else f"to keep sampling within --time-budget {time_budget_s:g} s")
        if stats["sampled"] < stats["planned"] else None,
        k=config.completions_per_prompt, completions=len(batch), max_new_tokens=config.max_new_tokens,
        min_new_tokens=config.min_new_tokens, temperature=config.temperature, truncated=finished.count(False),
        mean_length=sum(lengths) / len(lengths), longest_finished=max((n for n, d in zip(lengths, finished) if d),
                                                                      default=0),
        covered=covered, outside=outside, degenerate=degenerate, groups=groups, baseline=algorithm.baseline,
        scale=algorithm.scale, reward_mean=sum(totals) / len(totals), distinct_totals=sorted(set(totals)),
        examples=[{"group": group, "prompt": prompt_text(batch.prompts[row]), "completion": batch.completions[row],
                   "reward": totals[row], "finished": finished[row]} for group, row in list(firsts.items())[:4]])


def _judge_rewards(diagnosis, scorer, per_reward, totals) -> None:
    for row in diagnosis.stats["rewards"]["rows"]:
        if row["error"] is not None:
            diagnosis.add("problem", f"reward function {row['name']!r} fails", row["error"],
                          f"fix {row['name']!r} ({row['where']}) until `rlhf-pg doctor` scores the batch; a failing "
                          "reward function ends the run at its first step")
        elif row["judged"] == 0:
            diagnosis.add("warning", f"reward function {row['name']!r} judged no sample",
                          f"it returned None for all {diagnosis.stats['rewards']['size']} completions of the batch: it "
                          "adds nothing to the reward, and its mean is undefined", f"check {row['where']} and its inputs")
    unjudged = sum(1 for i in range(len(totals)) if per_reward and all(math.isnan(s[i]) for s in per_reward.values()))
    if unjudged and len(per_reward) > 1:
        diagnosis.add("warning", "some samples are judged by no reward function",
                      f"{unjudged} of {len(totals)} completions got None from every function: their total reward is 0 "
                      "(None counts 0 in the weighted sum)", "make at least one function judge every sample")


def _judge_batch(diagnosis, recipe) -> None:
    """Every completion truncated, every group tied (no learning signal), or most of them."""
    stats = diagnosis.stats["batch"]
    k, max_new, min_new = stats["k"], stats["max_new_tokens"], stats["min_new_tokens"]
    truncated = stats["truncated"] / stats["completions"]
    if truncated == 1.0:
        diagnosis.add("problem", "every completion was truncated",
                      f"all {stats['completions']} completions hit rollout.max_new_tokens={max_new} without an end "
                      "token: no completion shows the policy a finished answer"
                      + (f", and rollout.min_new_tokens={min_new} forbids EOS before then" if min_new >= max_new else ""),
                      f"raise rollout.max_new_tokens (e.g. {max(2 * max_new, 16)})"
                      + (" and lower rollout.min_new_tokens" if min_new else "")
                      + "; if completions should already end, check the end-token table above")
    elif truncated >= 0.5:
        diagnosis.add("warning", f"{truncated:.0%} of the completions were truncated",
                      f"they hit rollout.max_new_tokens={max_new} without an end token (the longest finished one has "
                      f"{stats['longest_finished']} tokens)",
                      "raise rollout.max_new_tokens, or penalize length (algorithm.overlong_buffer_fraction)")
    if diagnosis.stats["rewards"]["rows"] and all(r["error"] for r in diagnosis.stats["rewards"]["rows"]):
        return  # nothing scored: the failures say it
    degenerate, groups, distinct = stats["degenerate"], stats["groups"], stats["distinct_totals"]
    if k > 1 and degenerate == groups:
        values = (f"every completion scored {distinct[0]:g}" if len(distinct) == 1 else
                  f"the scores differ between prompts ({len(distinct)} values) but never within one")
        temperature = stats["temperature"]
        why = []
        if temperature == 0:
            why.append("rollout.temperature=0 samples the same greedy completion K times: set it to 1.0")
        elif temperature >= 1.0 and distinct == [0.0]:  # every sample failed
            why.append(f"a lower rollout.temperature (e.g. 0.7; now {temperature:g}) when a small model's samples are "
                       "noise but its greedy answers are sometimes right")
        why += ["a reward with partial credit (e.g. a format reward with weight > 0 beside the exact one)",
                f"more completions per prompt (rollout.completions_per_prompt, now {k})",
                "prompts the policy sometimes solves (easier or harder data, or an SFT start: rlhf-pg sft)"]
        if len(distinct) == 1:
            why.append("if the reward is a constant by design, it is a bug in the reward function")
        conclusive = stats["sampled"] == stats["planned"] or groups >= _MIN_GROUPS_FOR_A_VERDICT
        diagnosis.add("problem" if conclusive else "warning", "every group has equal rewards",
                      f"all {groups} groups of {k} completions got equal rewards within the group ({values}): their "
                      f"advantage is 0 under baseline {stats['baseline']}, so the update has no learning signal"
                      + ("" if conclusive else f" (only {groups} groups sampled: run with --prompts {stats['planned']} "
                                               "to be sure)"),
                      "give the completions of a prompt a chance to differ: " + "; ".join(why))
    elif k > 1 and degenerate / groups >= _MOSTLY_DEGENERATE:
        diagnosis.add("warning", f"{degenerate} of {groups} groups have equal rewards",
                      "those groups carry no learning signal (advantage 0) but still cost their samples",
                      "algorithm.dynamic_sampling: true drops them and samples more prompts (DAPO); or a partial-"
                      "credit reward, more completions per prompt, a higher temperature")
    elif k == 1 and len(distinct) == 1:
        diagnosis.add("problem", "every completion has the same reward",
                      f"all {stats['completions']} completions scored {distinct[0]:g}: with one completion per prompt "
                      "the baseline removes it and the update has no learning signal",
                      "a reward that distinguishes completions, or more completions per prompt")


def _check_memory(diagnosis, recipe, model, device, prompt_tokens: int, runtime: int) -> None:
    """``run.memory.memory_estimate`` for the configured batch against the memory this machine has for the run
    (CPU: MemAvailable + what this process holds now, as ``train`` checks it; ``run.memory.what_fits`` names
    the keys that would make it fit)."""
    shape = step_shape(recipe, model, prompt_tokens, fused_head=head_for_logprobs(model) is not None,
                       runtime=runtime if device.type == "cpu" else 0)
    estimate = memory_estimate(shape)
    free, where = available_memory(device)
    if free is not None and device.type == "cpu":
        free, where = free + rss_bytes(), f"{where} + this process's {size_text(rss_bytes())}"
    diagnosis.stats["memory"] = {"estimate": estimate, "free": free, "where": where, "sequences": shape.sequences,
                                 "micro": shape.micro_batch, "prompt_tokens": prompt_tokens,
                                 "new_tokens": shape.new_tokens, "weight_bytes": shape.weight_bytes, **model_shape(model),
                                 "activation_bytes": shape.activation_bytes, "intermediate": shape.intermediate,
                                 "checkpointing": shape.checkpointing, "parameters": shape.parameters,
                                 "trainable": shape.trainable}
    if free is not None and estimate.peak > free:
        fixes = what_fits(shape, free)
        diagnosis.add("problem", "the batch would not fit in memory",
                      f"the estimated peak {size_text(estimate.peak)} exceeds the {size_text(free)} {where}; "
                      "rlhf-pg train would refuse to start",
                      "; ".join(fixes) if fixes else "a smaller model, fewer rollout.prompts_per_step or a shorter "
                      "rollout.max_new_tokens (micro-batches, checkpointing, bf16 and LoRA are not enough alone)")
    elif free is not None and estimate.peak > 0.8 * free:
        diagnosis.add("warning", "the batch is close to the memory limit",
                      f"the estimated peak {size_text(estimate.peak)} is over 80% of the {size_text(free)} {where}",
                      "train.micro_batch_size or train.gradient_checkpointing: true leave room")
