"""``rlhf-pg doctor RECIPE [key=value ...]``: a preflight that says, in about a minute, whether a run would learn.

It loads what ``rlhf-pg train`` loads (the reward functions, the model and tokenizer, the prompts), then shows

    prompt    the first training prompt as the model reads it (rendered with the chat template when it is a
              conversation) and its length in tokens
    EOS       the ids that end a completion (``rollout.stop_token_ids``); with a chat template, that the token
              closing an assistant turn is one of them; on the sampled batch, that every finished completion's
              last masked token is an end token, i.e. the loss mask covers the decision to stop
    memory    an estimate for the configured batch (``memory_estimate`` has the formula)
    one batch K completions for each of the first step's prompts (fewer prompts when the time budget says so;
              the report says how many), scored one reward function at a time: truncation rate, the fraction
              of groups whose rewards are all equal (advantage 0: no learning signal), a histogram per reward
              function, each function's latency and errors
    recipe    the resolved recipe (presets and overrides applied, every default filled in)

and ends with a verdict. Exit codes: 1 when it finds a problem that would waste the run (every group has equal
rewards, every completion truncated, a reward function that fails or times out, an end-of-turn token that does
not end completions, a batch that does not fit in memory), each printed with its fix; 0 when there is none
(warnings are printed but do not fail); 2 for bad input (recipe, model, data), as every command.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .chat import completion_text, is_conversation, prompt_text, prompt_texts, reward_completions
from .errors import RewardFunctionError, UserError
from .recipe import Recipe

EXIT_PROBLEMS = 1
DEFAULT_TIME_BUDGET_S = 30  # seconds of sampling; loading, scoring and printing come on top
_PROBE_PROMPTS = 2  # sampled first, to measure how many more fit in the budget
_MIN_GROUPS_FOR_A_VERDICT = 4  # fewer sampled groups (a partial batch) that all tie make a warning, not a problem
_MOSTLY_DEGENERATE = 0.8  # a warning from this fraction of groups with equal rewards
_BAR = "█"


class DoctorFoundProblems(SystemExit):
    """Raised after the report when it lists a problem: the process exits with code 1."""

    def __init__(self, count: int):
        super().__init__(EXIT_PROBLEMS)
        self.count = count


@dataclass
class Finding:
    """One thing the doctor noticed: a ``problem`` (the run would be wasted: exit 1) or a ``warning``."""

    level: Literal["problem", "warning"]
    title: str
    detail: str
    fix: str


@dataclass
class Diagnosis:
    """What ``diagnose`` found: the findings and the numbers behind them (also for tests and scripts)."""

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


# --- pure pieces ----------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Bytes per part of a training step (``memory_estimate``) and the formula each part came from."""

    parts: dict[str, tuple[int, str]]  # name -> (bytes, formula)
    peak: int


def memory_estimate(num_parameters: int, trainable: int, weight_bytes: int, layers: int, hidden: int, kv_width: int,
                    vocab: int, sequences: int, micro_batch: int, prompt_tokens: int, new_tokens: int,
                    activation_bytes: int | None = None, reference: bool = False,
                    gradient_checkpointing: bool = False) -> MemoryEstimate:
    """A step's memory, in bytes, with N = parameters (N_t trainable), b = bytes per weight, L layers, d hidden
    size, w = KV width per layer (kv heads x head dim), V vocabulary, B sequences sampled per step
    (prompts_per_step x completions_per_prompt), M sequences per forward/backward (train.micro_batch_size or B),
    S = P + T tokens per sequence (prompt + max_new_tokens), a = bytes per activation (2 under bf16/fp16 mixed
    precision, else b):

        weights        N b                     (+ N b for the frozen reference when a KL term needs one)
        gradients      N_t b
        AdamW state    2 N_t b                 (exp_avg and exp_avg_sq, in the weights' dtype)
        KV cache       2 L B S w a             (keys and values while sampling)
        logits         2 M T V a               (the update's completion logits and their gradient)
        activations    34 M S d L a / 2        (rough: Korthikanti et al. 2022 without the attention-score
                                                term, as SDPA keeps none; 2 M S d L a with gradient checkpointing)
        peak = weights + gradients + AdamW + max(KV cache, logits + activations)

    Sampling and the update do not overlap, so the peak holds the larger of the two phases.
    """
    a = activation_bytes or weight_bytes
    s = prompt_tokens + new_tokens
    activation_factor = 2 if gradient_checkpointing else 17
    parts = {
        "weights": (num_parameters * weight_bytes, "N b"),
        "reference model": (num_parameters * weight_bytes if reference else 0, "N b (kl_coef > 0 or log_kl)"),
        "gradients": (trainable * weight_bytes, "N_t b"),
        "AdamW state": (2 * trainable * weight_bytes, "2 N_t b"),
        "KV cache (sampling)": (2 * layers * sequences * s * kv_width * a, "2 L B S w a"),
        "logits (update)": (2 * micro_batch * new_tokens * vocab * a, "2 M T V a"),
        "activations (update)": (activation_factor * micro_batch * s * hidden * layers * a,
                                 "2 M S d L a" if gradient_checkpointing else "34 M S d L a / 2"),
    }
    static = sum(parts[k][0] for k in ("weights", "reference model", "gradients", "AdamW state"))
    update = parts["logits (update)"][0] + parts["activations (update)"][0]
    return MemoryEstimate(parts, static + max(parts["KV cache (sampling)"][0], update))


def histogram(values: list[float], bins: int = 8) -> list[tuple[str, int]]:
    """``(label, count)`` rows: one per distinct value when there are at most ``bins``, else ``bins`` equal-width
    intervals; NaN (a sample the function did not judge) is counted in a last ``None`` row."""
    judged = [v for v in values if not math.isnan(v)]
    rows: list[tuple[str, int]] = []
    distinct = sorted(set(judged))
    if len(distinct) <= bins:
        rows = [(f"{v:g}", judged.count(v)) for v in distinct]
    else:
        low, high = distinct[0], distinct[-1]
        width = (high - low) / bins
        counts = [0] * bins
        for v in judged:
            counts[min(int((v - low) / width), bins - 1)] += 1
        rows = [(f"[{low + i * width:.3g}, {low + (i + 1) * width:.3g}{']' if i == bins - 1 else ')'}", n)
                for i, n in enumerate(counts)]
    unjudged = len(values) - len(judged)
    if unjudged:
        rows.append(("None (not judged)", unjudged))
    return rows


def group_spread(scores: list[float], group_ids: torch.Tensor) -> tuple[int, int]:
    """``(groups whose scores are all equal, groups)``: ``core.advantages.degenerate_groups`` per group."""
    from .core.advantages import degenerate_groups

    ids = group_ids.cpu()
    flags = degenerate_groups(torch.nan_to_num(torch.tensor(scores, dtype=torch.float64)), ids)
    first_rows = {}
    for row, group in enumerate(ids.tolist()):
        first_rows.setdefault(group, row)
    return sum(bool(flags[row]) for row in first_rows.values()), len(first_rows)


def end_of_turn_token(tokenizer, prompt: list[dict[str, Any]], chat_template_kwargs: dict[str, Any] | None = None
                      ) -> int | None:
    """The first special token the chat template writes after an assistant reply (ChatML: ``<|im_end|>``), or None.

        ids(render(prompt + [assistant "42"]))[len(ids(render(prompt, add_generation_prompt=True))):]
    """
    kwargs = dict(chat_template_kwargs or {})
    rendered = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False, **kwargs)
    full = tokenizer.apply_chat_template(list(prompt) + [{"role": "assistant", "content": "42"}], tokenize=False,
                                         **kwargs)
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {tokenizer.eos_token_id}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, token in added.items() if getattr(token, "special", False)}
    return next((token for token in full_ids[len(prompt_ids):] if token in special), None)


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """``(bytes free now, where)`` on ``device``: CUDA's free memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available host memory (MemAvailable)"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available host memory"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def _config_value(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


# --- the diagnosis --------------------------------------------------------------------------------


def diagnose(recipe: Recipe, prompts: int | None = None, time_budget_s: float = DEFAULT_TIME_BUDGET_S,
             console=None) -> Diagnosis:
    """Load, render, sample one batch and score it, printing each section to ``console`` (a ``rich`` Console)
    as it is done; return the findings. ``prompts``: sample exactly that many of the first step's prompts
    (default: as many of ``rollout.prompts_per_step`` as ``time_budget_s`` seconds of sampling allow)."""
    from rich.console import Console

    from .data import PromptSampler, load_prompt_datasets
    from .models import apply_lora, context_length, load_policy
    from .rewards import RewardScorer
    from .rollout import SamplingParams, check_prompt_lengths, rollout, stop_token_ids
    from .run.accel import new_accelerator, set_threads

    console = console or Console()
    diagnosis = Diagnosis()
    stats = diagnosis.stats
    started = time.perf_counter()
    stats["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # before we add to it
    set_threads(recipe.train.num_threads)
    scorer = RewardScorer(recipe.rewards)  # a bad reward name fails here: exit 2, as train
    model, tokenizer, model_path = load_policy(recipe.model)
    if recipe.peft is not None:
        model = apply_lora(model, recipe.peft)
    device = new_accelerator(recipe.train.mixed_precision).device
    model = model.to(device).eval()
    train_set, _ = load_prompt_datasets(recipe.data)
    stats["load_s"] = time.perf_counter() - started
    _show_model(console, recipe, model, tokenizer, model_path, device, stats)
    _check_threads(diagnosis, device, stats["load_average"])

    chat_kwargs = getattr(recipe.data, "chat_template_kwargs", None)
    stop_strings = getattr(recipe.rollout, "stop", None) or ()
    stop_strings = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings)
    rollout_config = recipe.rollout
    sampler = PromptSampler(train_set, rollout_config.prompts_per_step, recipe.data.shuffle_seed + recipe.seed)
    step_prompts, step_columns = sampler.batch(0)
    chat = is_conversation(step_prompts[0])
    stop_ids = stop_token_ids(tokenizer, model)
    _show_prompt(console, tokenizer, step_prompts[0], chat, chat_kwargs, stats)
    _check_end_tokens(console, diagnosis, tokenizer, model, step_prompts[0], chat, chat_kwargs, stop_ids, stop_strings)
    try:
        check_prompt_lengths(tokenizer, train_set["prompt"], rollout_config.max_new_tokens, context_length(model),
                             "rollout.max_new_tokens", chat_kwargs)
    except UserError as error:
        diagnosis.add("problem", "a prompt does not fit in the model's context", str(error),
                      "drop or shorten the long prompts, or lower rollout.max_new_tokens")

    # one batch: a probe of 2 prompts, then as many more as the time budget allows
    k = rollout_config.completions_per_prompt
    planned = min(prompts, rollout_config.prompts_per_step) if prompts else rollout_config.prompts_per_step
    params = SamplingParams(rollout_config.max_new_tokens, rollout_config.temperature, rollout_config.top_p,
                            rollout_config.min_new_tokens, stop_strings)
    generator = torch.Generator(device=device).manual_seed(recipe.seed)
    parts, sampled, sampling_started = [], 0, time.perf_counter()
    try:
        while sampled < planned:
            if prompts or not parts:
                count = planned if prompts else min(planned, _PROBE_PROMPTS)
            else:
                elapsed = time.perf_counter() - sampling_started
                count = min(planned - sampled, int((time_budget_s - elapsed) / (elapsed / sampled)))
                if count < 1:
                    break
            rows = slice(sampled, sampled + count)
            parts.append(rollout(model, tokenizer, step_prompts[rows], k, params,
                                 {key: values[rows] for key, values in step_columns.items()}, generator,
                                 group_offset=sampled, max_context=context_length(model),
                                 chat_template_kwargs=chat_kwargs))
            sampled += count
    except UserError as error:
        diagnosis.add("problem", "sampling failed", str(error), "fix the input named above")
    stats["sample_s"] = time.perf_counter() - sampling_started
    stats["prompts_sampled"], stats["prompts_per_step"] = sampled, rollout_config.prompts_per_step
    if parts:
        from .core.mdp import concat_rollouts

        batch = concat_rollouts(parts, tokenizer.pad_token_id)
        _examine_batch(console, diagnosis, recipe, scorer, tokenizer, batch, stop_ids, stop_strings, time_budget_s,
                       prompts)
        _show_memory(console, diagnosis, recipe, model, device, int(batch.prompt_mask.sum(-1).max()), stats)
    else:
        _show_memory(console, diagnosis, recipe, model, device, 0, stats)
    _show_recipe(console, recipe)
    stats["wall_s"] = time.perf_counter() - started
    _show_verdict(console, diagnosis)
    return diagnosis


def _show_model(console, recipe, model, tokenizer, model_path, device, stats) -> None:
    from rich.table import Table

    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stats.update(parameters=parameters, trainable=trainable)
    table = Table(title="Model", show_header=False, title_justify="left")
    table.add_row("model", f"{recipe.model.name_or_path}" + (f" -> {model_path}" if model_path != recipe.model.name_or_path
                                                               else ""))
    table.add_row("parameters", f"{parameters:,} ({trainable:,} trainable{', LoRA' if recipe.peft else ''}), "
                                f"{recipe.model.dtype}, on {device}")
    table.add_row("tokenizer", f"{type(tokenizer).__name__}, vocabulary {len(tokenizer):,}, "
                               f"chat template: {'yes' if getattr(tokenizer, 'chat_template', None) else 'no'}")
    table.add_row("loaded in", f"{stats['load_s']:.1f} s (model, tokenizer, prompts, reward functions)")
    if device.type == "cpu":
        table.add_row("CPU", f"torch uses {torch.get_num_threads()} thread(s) on {os.cpu_count()} cores; load average "
                             f"{stats['load_average']:.1f} (other processes)")
    console.print(table)


def _check_threads(diagnosis, device, load_average: float) -> None:
    """On a busy CPU, several torch threads per process contend with the other processes' (spinning OpenMP
    threads): sampling can be many times slower than with one thread."""
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    if device.type == "cpu" and threads > 1 and load_average >= 1.0 and load_average + threads > cores + 0.5:
        diagnosis.add("warning", "the CPU is shared",
                      f"the load average is {load_average:.1f} on {cores} cores and torch uses {threads} threads: "
                      "contending threads can make sampling and updates several times slower",
                      "set train.num_threads=1 (or OMP_NUM_THREADS=1) while other processes use the cores")


def _show_prompt(console, tokenizer, prompt, chat, chat_kwargs, stats) -> None:
    from rich.panel import Panel
    from rich.text import Text

    texts, special_tokens = prompt_texts(tokenizer, [prompt], chat_kwargs, where="data")
    ids = tokenizer(texts[0], add_special_tokens=special_tokens)["input_ids"]
    stats["prompt_tokens"] = len(ids)
    how = ("rendered with the chat template (add_generation_prompt=True), encoded without the tokenizer's special "
           "tokens" if chat else "text, encoded with the tokenizer's special tokens")
    body = Text()
    body.append("as written:   ", style="bold")
    body.append(repr(prompt) + "\n")
    body.append("as the model reads it", style="bold")
    body.append(f" ({how}; {len(ids)} tokens):\n")
    body.append(tokenizer.decode(ids), style="cyan")
    if tokenizer.bos_token_id is not None and ids[:2] == [tokenizer.bos_token_id] * 2:
        body.append("\nwarning: the prompt starts with two BOS tokens", style="yellow")
    console.print(Panel(body, title="First training prompt", title_align="left"))


def _token_name(tokenizer, token: int) -> str:
    return repr(tokenizer.convert_ids_to_tokens(int(token)))


def _check_end_tokens(console, diagnosis, tokenizer, model, prompt, chat, chat_kwargs, stop_ids, stop_strings) -> None:
    from rich.table import Table

    table = Table(title="End of a completion", title_justify="left")
    table.add_column("id", justify="right")
    table.add_column("token")
    table.add_column("from")
    generation = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    generation = set(generation if isinstance(generation, (list, tuple)) else [generation]) - {None}
    for token in stop_ids:
        sources = [name for name, ids in (("tokenizer.eos_token_id", {tokenizer.eos_token_id}),
                                           ("generation_config.eos_token_id", generation)) if token in ids]
        table.add_row(str(token), _token_name(tokenizer, token), ", ".join(sources))
    if stop_strings:
        table.add_row("", ", ".join(map(repr, stop_strings)), "rollout.stop (stop strings)")
    console.print(table)
    if tokenizer.eos_token_id not in stop_ids:  # stop_token_ids always includes it; a guard for the plumbing
        diagnosis.add("problem", "the tokenizer's EOS does not end completions",
                      f"EOS id {tokenizer.eos_token_id} is not among the stop ids {stop_ids}",
                      "report this as a bug of rlhf_pg.rollout.stop_token_ids")
    if chat:
        end = end_of_turn_token(tokenizer, prompt, chat_kwargs)
        if end is None:
            diagnosis.add("warning", "the chat template closes an assistant turn with no special token",
                          "a completion can then end only at the tokenizer's EOS or a stop string",
                          "check that the model was trained to emit its EOS after a reply, or set rollout.stop")
        elif end not in stop_ids:
            diagnosis.add("problem", "the end-of-turn token does not end completions",
                          f"the chat template closes an assistant turn with {_token_name(tokenizer, end)} (id {end}), "
                          f"which is not among the end ids {stop_ids}: the policy answers, closes its turn and keeps "
                          "sampling until max_new_tokens, so every completion is truncated",
                          f"add {end} to eos_token_id in the model's generation_config.json (a list is allowed), or "
                          "save the tokenizer with that token as its eos_token")
        else:
            console.print(f"The chat template closes an assistant turn with {_token_name(tokenizer, end)} (id {end}): "
                          "an end id.")


def _examine_batch(console, diagnosis, recipe, scorer, tokenizer, batch, stop_ids, stop_strings, time_budget_s,
                   prompts_option) -> None:
    from rich.table import Table

    from .core.advantages import overlong_penalty

    stats = diagnosis.stats
    rollout_config, algorithm = recipe.rollout, recipe.algorithm
    k, sampled, planned = rollout_config.completions_per_prompt, stats["prompts_sampled"], stats["prompts_per_step"]
    finished = batch.finished.tolist()
    lengths = batch.completion_mask.sum(-1).long().tolist()
    truncated = finished.count(False) / len(finished)
    stats.update(completions=len(batch), truncated_fraction=truncated)

    # the loss mask covers the end token: 1 up to and including it, 0 after
    eos = torch.tensor(stop_ids, device=batch.completion_ids.device)
    by_eos = by_stop = outside = 0
    for row, done in enumerate(finished):
        if not done:
            continue
        n = lengths[row]
        contiguous = bool(batch.completion_mask[row, :n].all()) and not bool(batch.completion_mask[row, n:].any())
        if n > 0 and contiguous and bool(torch.isin(batch.completion_ids[row, n - 1], eos)):
            by_eos += 1
        elif n > 0 and contiguous and stop_strings:
            by_stop += 1
        else:
            outside += 1
    stats.update(finished_by_eos=by_eos, finished_by_stop_string=by_stop)
    if outside:
        diagnosis.add("problem", "the end token is outside the loss mask",
                      f"{outside} finished completion(s) do not end, inside completion_mask, with an end id "
                      f"{stop_ids}: the update would never learn when to stop",
                      "report this as a bug of rlhf_pg.rollout (completion_mask must be 1 up to and including EOS)")

    # rewards, one function at a time: latency and errors
    completions = reward_completions(batch.prompts, batch.completions)
    columns = {"finished": finished, **batch.extras}
    per_reward, latency, failures = {}, {}, {}
    for term in scorer.terms:
        began = time.perf_counter()
        try:
            per_reward[term.label] = scorer.score_term(term, batch.prompts, completions, columns)
        except (RewardFunctionError, UserError) as error:
            failures[term.label] = str(error)
        latency[term.label] = time.perf_counter() - began
    totals = scorer.total(per_reward) if per_reward else [0.0] * len(batch)
    if algorithm.overlong_buffer_fraction > 0:  # DAPO's soft overlong penalty is part of the trained reward
        penalty = overlong_penalty(batch.completion_mask.sum(-1), rollout_config.max_new_tokens,
                                   round(algorithm.overlong_buffer_fraction * rollout_config.max_new_tokens),
                                   algorithm.overlong_penalty)
        totals = [t + float(p) for t, p in zip(totals, penalty)]
    degenerate, groups = group_spread(totals, batch.group_ids)
    stats.update(degenerate_groups=degenerate, groups=groups, reward_latency_s=latency,
                 reward_failures=failures, reward_mean=sum(totals) / len(totals))

    table = Table(title=f"One batch: {sampled} of {planned} prompts x {k} completions", show_header=False,
                  title_justify="left")
    if sampled < planned:
        why = (f"--prompts {prompts_option}" if prompts_option else
               f"to keep sampling within --time-budget {time_budget_s:g} s")
        table.add_row("sampled", f"{sampled} of the first step's {planned} prompts ({why}); rates below are over "
                                 "these, the memory estimate is for the full batch")
    table.add_row("sampling time", f"{stats['sample_s']:.1f} s for {len(batch)} completions "
                                   f"(max_new_tokens={rollout_config.max_new_tokens}, "
                                   f"temperature={rollout_config.temperature:g})")
    table.add_row("truncated", f"{truncated:.0%} ({finished.count(False)} of {len(finished)} hit max_new_tokens "
                               "without an end token)")
    table.add_row("length", f"mean {sum(lengths) / len(lengths):.1f} tokens, longest finished "
                            f"{max((n for n, d in zip(lengths, finished) if d), default=0)}")
    mask_note = f"yes, for all {by_eos + by_stop} finished completions" if not outside else f"NO for {outside}"
    table.add_row("end token in loss mask", mask_note if any(finished) else "not verified: no completion finished")
    if k > 1:
        table.add_row("groups with equal rewards", f"{degenerate} of {groups} ({degenerate / groups:.0%}): advantage 0 "
                                                   f"under baseline {algorithm.baseline}" +
                      (", scale group" if algorithm.scale == "group" else ""))
    table.add_row("total reward", f"mean {stats['reward_mean']:.3g}, {len(set(totals))} distinct values")
    console.print(table)

    _show_rewards(console, scorer, per_reward, latency, failures, batch, len(batch))
    _show_examples(console, batch, totals, finished)
    _judge_batch(diagnosis, recipe, scorer, per_reward, failures, totals, truncated, lengths, finished, degenerate,
                 groups)


def _show_rewards(console, scorer, per_reward, latency, failures, batch, size) -> None:
    from rich.columns import Columns
    from rich.table import Table

    table = Table(title="Reward functions", title_justify="left")
    for name, justify in (("reward", "left"), ("weight", "right"), ("mean (judged)", "right"), ("judged", "right"),
                          ("groups with spread", "right"), ("latency", "right"), ("status", "left")):
        table.add_column(name, justify=justify)
    for term in scorer.terms:
        seconds = latency[term.label]
        timing = f"{seconds:.2f} s ({seconds / size * 1e3:.2f} ms/sample)" + (" async" if term.is_async else "")
        if term.label in failures:
            table.add_row(term.name, f"{term.weight:g}", "-", "-", "-", timing, "[red]failed[/red]")
            continue
        scores = per_reward[term.label]
        judged = [s for s in scores if not math.isnan(s)]
        equal, groups = group_spread(scores, batch.group_ids)
        mean = f"{sum(judged) / len(judged):.3g}" if judged else "-"
        table.add_row(term.name, f"{term.weight:g}" + (" (monitor)" if term.weight == 0 else ""), mean,
                      f"{len(judged)}/{len(scores)}", f"{groups - equal}/{groups}", timing, "[green]ok[/green]")
    console.print(table)
    histograms = []
    for term in scorer.terms:
        if term.label not in per_reward:
            continue
        rows = histogram(per_reward[term.label])
        widest = max((n for _, n in rows), default=1)
        chart = Table(title=term.label, show_header=False, box=None, title_justify="left")
        chart.add_column("value", justify="right")
        chart.add_column("bar")
        chart.add_column("count", justify="right")
        for label, count in rows:
            chart.add_row(label, "[magenta]" + _BAR * max(1 if count else 0, round(24 * count / widest)) + "[/magenta]",
                          str(count))
        histograms.append(chart)
    if histograms:
        console.print(Columns(histograms, padding=(0, 4)))
    for label, message in failures.items():
        console.print(f"[red]{label}[/red]: ", message, sep="", markup=True, highlight=False)


def _show_examples(console, batch, totals, finished, count: int = 4) -> None:
    """The first completion of each of the first ``count`` groups."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="Examples (the first completion of a group)", title_justify="left")
    for name in ("group", "prompt", "completion", "reward", "ended"):
        table.add_column(name)
    firsts: dict[int, int] = {}
    for row, group in enumerate(batch.group_ids.tolist()):
        firsts.setdefault(group, row)
    for group, row in list(firsts.items())[:count]:
        table.add_row(str(group), Text(prompt_text(batch.prompts[row])),
                      Text(repr(completion_text(batch.completions[row]))), f"{totals[row]:.3g}",
                      "end token" if finished[row] else "truncated")
    console.print(table)


def _judge_batch(diagnosis, recipe, scorer, per_reward, failures, totals, truncated, lengths, finished, degenerate,
                 groups) -> None:
    rollout_config, algorithm = recipe.rollout, recipe.algorithm
    names = {term.label: term.name for term in scorer.terms}
    where = {term.label: term.where for term in scorer.terms}
    for label, message in failures.items():
        diagnosis.add("problem", f"reward function {names[label]!r} fails", message,
                      f"fix {names[label]!r} ({where[label]}) until `rlhf-pg doctor` scores the batch; a failing "
                      "reward function ends the run at its first step")
    for label, scores in per_reward.items():
        if all(math.isnan(s) for s in scores):
            diagnosis.add("warning", f"reward function {names[label]!r} judged no sample",
                          f"it returned None for all {len(scores)} completions of the batch: it adds nothing to "
                          "the reward, and its mean is undefined", f"check {where[label]} and its inputs")
    unjudged = [i for i in range(len(totals)) if per_reward and all(math.isnan(s[i]) for s in per_reward.values())]
    if unjudged and len(per_reward) > 1:
        diagnosis.add("warning", "some samples are judged by no reward function",
                      f"{len(unjudged)} of {len(totals)} completions got None from every function: their total "
                      "reward is 0 (None counts 0 in the weighted sum)",
                      "make at least one function judge every sample")
    k = rollout_config.completions_per_prompt
    if truncated == 1.0:
        diagnosis.add("problem", "every completion was truncated",
                      f"all {len(finished)} completions hit rollout.max_new_tokens={rollout_config.max_new_tokens} "
                      "without an end token: no completion shows the policy a finished answer"
                      + (f", and rollout.min_new_tokens={rollout_config.min_new_tokens} forbids EOS before then"
                         if rollout_config.min_new_tokens >= rollout_config.max_new_tokens else ""),
                      f"raise rollout.max_new_tokens (e.g. {max(2 * rollout_config.max_new_tokens, 16)})"
                      + (" and lower rollout.min_new_tokens" if rollout_config.min_new_tokens else "")
                      + "; if completions should already end, check the end-token table above")
    elif truncated >= 0.5:
        diagnosis.add("warning", f"{truncated:.0%} of the completions were truncated",
                      f"they hit rollout.max_new_tokens={rollout_config.max_new_tokens} without an end token "
                      f"(the longest finished one has {max(n for n, d in zip(lengths, finished) if d)} tokens)",
                      "raise rollout.max_new_tokens, or penalize length (algorithm.overlong_buffer_fraction)")
    if failures and not per_reward:
        return  # nothing scored: the failures say it
    if k > 1 and degenerate == groups:
        distinct = sorted(set(totals))
        sampled, planned = diagnosis.stats["prompts_sampled"], diagnosis.stats["prompts_per_step"]
        values = (f"every completion scored {distinct[0]:g}" if len(distinct) == 1 else
                  f"the scores differ between prompts ({len(distinct)} values) but never within one")
        why = []
        if rollout_config.temperature == 0:
            why.append("rollout.temperature=0 samples the same greedy completion K times: set it to 1.0")
        elif rollout_config.temperature >= 1.0 and len(distinct) == 1:
            why.append(f"a lower rollout.temperature (e.g. 0.7; now {rollout_config.temperature:g}) when a small "
                       "model's samples are noise but its greedy answers are sometimes right")
        why += ["a reward with partial credit (e.g. a format reward with weight > 0 beside the exact one)",
                f"more completions per prompt (rollout.completions_per_prompt, now {k})",
                "prompts the policy sometimes solves (easier or harder data, or an SFT start: rlhf-pg sft)"]
        if len(distinct) == 1:
            why.append("if the reward is a constant by design, it is a bug in the reward function")
        conclusive = sampled == planned or groups >= _MIN_GROUPS_FOR_A_VERDICT
        diagnosis.add("problem" if conclusive else "warning", "every group has equal rewards",
                      f"all {groups} groups of {k} completions got equal rewards within the group ({values}): their "
                      f"advantage is 0 under baseline {algorithm.baseline}, so the update has no learning signal"
                      + ("" if conclusive else f" (only {groups} groups sampled: run with --prompts {planned} to be sure)"),
                      "give the completions of a prompt a chance to differ: " + "; ".join(why))
    elif k > 1 and degenerate / groups >= _MOSTLY_DEGENERATE:
        diagnosis.add("warning", f"{degenerate} of {groups} groups have equal rewards",
                      "those groups carry no learning signal (advantage 0) but still cost their samples",
                      "algorithm.dynamic_sampling: true drops them and samples more prompts (DAPO); or a partial-"
                      "credit reward, more completions per prompt, a higher temperature")
    elif k == 1 and len(set(totals)) == 1:
        diagnosis.add("problem", "every completion has the same reward",
                      f"all {len(totals)} completions scored {totals[0]:g}: with one completion per prompt the "
                      "baseline removes it and the update has no learning signal",
                      "a reward that distinguishes completions, or more completions per prompt")


def _show_memory(console, diagnosis, recipe, model, device, prompt_tokens, stats) -> None:
    from rich.table import Table

    config = getattr(model, "config", None)
    layers = _config_value(config, "num_hidden_layers", "n_layer", default=0)
    hidden = _config_value(config, "hidden_size", "n_embd", "d_model", default=0)
    heads = _config_value(config, "num_attention_heads", "n_head", default=1)
    kv_heads = _config_value(config, "num_key_value_heads", default=heads)
    head_dim = _config_value(config, "head_dim", default=hidden // max(heads, 1))
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = int(output.weight.shape[0]) if output is not None else _config_value(config, "vocab_size", default=0)
    weight_bytes = next(model.parameters()).element_size()
    activation_bytes = 2 if recipe.train.mixed_precision in ("bf16", "fp16") else weight_bytes
    rollout_config = recipe.rollout
    sequences = rollout_config.prompts_per_step * rollout_config.completions_per_prompt
    micro = min(recipe.train.micro_batch_size or sequences, sequences)
    reference = (recipe.algorithm.kl_coef > 0 or recipe.algorithm.log_kl) and recipe.peft is None
    estimate = memory_estimate(stats["parameters"], stats["trainable"], weight_bytes, layers, hidden,
                               kv_heads * head_dim, vocab, sequences, micro, prompt_tokens or stats["prompt_tokens"],
                               rollout_config.max_new_tokens, activation_bytes, reference,
                               recipe.model.gradient_checkpointing)
    free, where = available_memory(device)
    stats.update(memory_peak_bytes=estimate.peak, memory_available_bytes=free)
    table = Table(title=f"Memory estimate: B={sequences} sequences of S={prompt_tokens or stats['prompt_tokens']}+"
                        f"{rollout_config.max_new_tokens} tokens, M={micro} per backward", title_justify="left")
    table.add_column("part")
    table.add_column("formula")
    table.add_column("size", justify="right")
    for name, (size, formula) in estimate.parts.items():
        if size:
            table.add_row(name, formula, _size(size))
    table.add_row("[bold]peak[/bold]", "weights + gradients + AdamW + max(KV cache, logits + activations)",
                  f"[bold]{_size(estimate.peak)}[/bold]")
    if free is not None:
        table.add_row(where, "", _size(free))
    table.caption = (f"N={stats['parameters']:,} N_t={stats['trainable']:,} b={weight_bytes} a={activation_bytes} "
                     f"L={layers} d={hidden} w={kv_heads}x{head_dim} V={vocab}; activations are a rough guide "
                     "(doctor module docstring: memory_estimate)")
    console.print(table)
    if free is not None and estimate.peak > free:
        diagnosis.add("problem", "the batch would not fit in memory",
                      f"the estimated peak {_size(estimate.peak)} exceeds the {_size(free)} {where}",
                      "set train.micro_batch_size (e.g. "
                      f"{max(1, micro * free // max(estimate.peak, 1))}), model.gradient_checkpointing: true, "
                      "peft (LoRA), train.mixed_precision: bf16, or fewer rollout.prompts_per_step")
    elif free is not None and estimate.peak > 0.8 * free:
        diagnosis.add("warning", "the batch is close to the memory limit",
                      f"the estimated peak {_size(estimate.peak)} is over 80% of the {_size(free)} {where}",
                      "train.micro_batch_size or model.gradient_checkpointing: true leave room")


def _show_recipe(console, recipe) -> None:
    import yaml
    from rich.panel import Panel
    from rich.text import Text

    text = yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None, width=max(console.width - 24, 60))
    console.print(Panel(Text(text.rstrip()),
                        title="Resolved recipe (presets and overrides applied, defaults filled in)", title_align="left"))


def _show_verdict(console, diagnosis) -> None:
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    if not diagnosis.findings:
        console.print(Panel(f"No problems found in {diagnosis.stats['wall_s']:.0f} s: ready to train.",
                            title="Verdict", title_align="left", border_style="green"))
        return
    table = Table(show_lines=True)
    table.add_column("")
    table.add_column("finding")
    table.add_column("fix")
    for finding in sorted(diagnosis.findings, key=lambda f: f.level != "problem"):
        mark = "[red]problem[/red]" if finding.level == "problem" else "[yellow]warning[/yellow]"
        what = Text(finding.title, style="bold")
        what.append("\n" + finding.detail, style="")
        table.add_row(mark, what, Text(finding.fix))
    style = "red" if diagnosis.problems else "yellow"
    console.print(Panel(table, title=f"Verdict: {diagnosis.verdict()} ({diagnosis.stats['wall_s']:.0f} s)",
                        title_align="left", border_style=style))


def doctor_command(args, recipe: Recipe) -> str:
    """``rlhf-pg doctor``: print the report; the verdict line is the result, ``DoctorFoundProblems`` (exit 1)
    when the report lists a problem."""
    diagnosis = diagnose(recipe, prompts=args.prompts, time_budget_s=args.time_budget)
    if diagnosis.problems:
        print(diagnosis.verdict())
        raise DoctorFoundProblems(len(diagnosis.problems))
    return diagnosis.verdict()


__all__ = ["DEFAULT_TIME_BUDGET_S", "Diagnosis", "DoctorFoundProblems", "Finding", "MemoryEstimate", "diagnose",
           "doctor_command", "end_of_turn_token", "group_spread", "histogram", "memory_estimate"]
