"""Imitation vs reward: SFT on demonstrations and REINFORCE from the same model, with the same budget.

Every arm starts from ``model``, takes ``train.steps`` optimizer steps of the same size (SFT:
``sft.batch_size`` = ``rollout.prompts_per_step x completions_per_prompt`` demonstrations; RL: as
many sampled completions) with the same optimizer and schedule, and is evaluated on the same held-out
prompts every ``train.eval_every`` steps. The arms, as policy-gradient weights on trajectories:

    sft          demonstrator's trajectories, A = 1                       (rlhf_pg/sft.py)
    sft_exact    an exact demonstrator's trajectories, A = 1 (built-in arithmetic task only)
    filtered_bc  own samples, A = 1[R >= algorithm.reward_threshold]   (rejection-sampling fine-tuning)
    rl           own samples, A = G - b                                 (REINFORCE, rlhf_pg/trainer.py)

Writes ``DIR/<arm>/`` (each a complete run), ``DIR/summary.json``, ``DIR/learning_curves.png`` and
``DIR/report.md``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..recipe import Recipe
from ..errors import RecipeError
from ..run.metrics import read_metrics
from ..sft import sft_batch_size, train_sft
from ..tasks.arithmetic import demonstrator_accuracy, split_problems
from ..run.rundir import RunDir
from ..trainer import train

LABELS = {
    "sft": "SFT (demonstrator)",
    "sft_exact": "SFT (exact demonstrator)",
    "filtered_bc": "filtered BC (own samples, R >= threshold)",
    "rl": "REINFORCE (own samples, A = G - b)",
}
OUTPUTS = ("report.md", "summary.json", "learning_curves.png")


def arm_recipe(recipe: Recipe, arm: str) -> Recipe:
    """The recipe of one arm: the shared recipe with the arm's estimator or demonstrator."""
    if arm in ("sft", "sft_exact"):
        sft = dataclasses.replace(recipe.sft, batch_size=sft_batch_size(recipe))
        if arm == "sft_exact":
            if recipe.data.path is not None:
                raise RecipeError("compare.arms: 'sft_exact' needs the built-in arithmetic task (data.path is set); "
                                  "remove the arm or the data.path")
            sft = dataclasses.replace(sft, demonstrator="exact")
        return dataclasses.replace(recipe, sft=sft)
    if arm == "filtered_bc":
        return dataclasses.replace(recipe, algorithm=dataclasses.replace(recipe.algorithm, estimator="filtered_bc",
                                                                          whiten=False))
    if arm == "rl":
        return dataclasses.replace(recipe, algorithm=dataclasses.replace(recipe.algorithm, estimator="reinforce"))
    raise RecipeError(f"compare.arms: unknown arm {arm!r}; choose from {', '.join(LABELS)}")


def learning_curve(metrics_path: Path, samples_per_step: int) -> list[dict[str, float]]:
    """Held-out reward at each evaluation, against samples seen and training time (evaluation excluded)."""
    records = read_metrics(metrics_path)
    clock, elapsed = 0.0, {0: 0.0}
    for record in records:
        if "perf/step_s" in record:
            clock += float(record["perf/step_s"])
            elapsed[record["step"]] = clock
    curve, seen = [], set()
    for record in records:
        if "eval/reward" in record and record["step"] not in seen:
            seen.add(record["step"])
            step = int(record["step"])
            curve.append({"step": step, "samples": step * samples_per_step,
                          "train_time_s": round(elapsed.get(step, clock), 3), "accuracy": float(record["eval/reward"])})
    return curve


def _describe(recipe: Recipe, arm: str) -> str:
    rollout, algorithm = recipe.rollout, recipe.algorithm
    rewards = " + ".join(r.name if r.weight == 1 else f"{r.weight:g}*{r.name}" for r in recipe.rewards)
    own = f"own samples ({rollout.prompts_per_step} prompts x {rollout.completions_per_prompt}, T={rollout.temperature:g})"
    if arm == "sft":
        if recipe.data.path is not None:
            return f"`{recipe.data.path}` completions (`{recipe.data.completion_column}`)"
        if recipe.sft.demonstrator == "exact":
            return "exact demonstrator"
        return f"flawed demonstrator (forget_carry={recipe.sft.forget_carry:g})"
    if arm == "sft_exact":
        return "exact demonstrator"
    if arm == "filtered_bc":
        return f"{own} with {rewards} >= {algorithm.reward_threshold:g}"
    return f"{own}, {rewards}, baseline {algorithm.baseline}"


def check_arms(arms: list[str]) -> None:
    """The arms are a list of distinct names (each name is checked by the recipe schema)."""
    if not arms:
        raise RecipeError("compare.arms: list at least one arm, e.g. [sft, rl]")
    if len(set(arms)) != len(arms):
        raise RecipeError(f"compare.arms: {arms} lists an arm twice; list each arm once")


def compare(recipe: Recipe, output_dir: str | Path, overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Run every arm of ``recipe.compare.arms``; write the report; return ``summary.json``'s content."""
    arms = list(recipe.compare.arms)
    check_arms(arms)
    samples_per_step = recipe.rollout.prompts_per_step * recipe.rollout.completions_per_prompt
    if recipe.sft.batch_size not in (None, samples_per_step):
        raise RecipeError(
            f"sft.batch_size={recipe.sft.batch_size}: compare matches budgets, so SFT takes as many samples per step as "
            f"RL draws (rollout.prompts_per_step x completions_per_prompt = {samples_per_step}); remove sft.batch_size")
    if recipe.train.sft_warmup_steps:
        raise RecipeError(f"train.sft_warmup_steps={recipe.train.sft_warmup_steps}: compare matches budgets, and a warm-up "
                          "would give the RL arms extra steps on demonstrations; set it to 0 (run the warm-up's effect "
                          "as its own 'sft' arm)")
    recipes = {arm: arm_recipe(recipe, arm) for arm in arms}  # validates every arm before anything runs
    run_dir = RunDir(output_dir, marker="compare.yaml", outputs=(*OUTPUTS, *LABELS), what="a comparison")
    with run_dir.lock():
        run_dir.prepare(recipe.to_dict(), overwrite=overwrite, resumable=False)
        run_dir.write_marker(recipe.to_dict())
        return _compare(recipe, recipes, run_dir, show_progress)


def _compare(recipe: Recipe, recipes: dict[str, Recipe], run_dir: RunDir, show_progress: bool) -> dict[str, Any]:
    output_dir, arms = run_dir.path, list(recipes)
    samples_per_step = recipe.rollout.prompts_per_step * recipe.rollout.completions_per_prompt

    results: dict[str, Any] = {}
    load_before = _load_average()
    started = time.perf_counter()
    for index, arm in enumerate(arms):
        print(f"[{index + 1}/{len(arms)}] {LABELS[arm]}: {_describe(recipe, arm)}", file=sys.stderr, flush=True)
        arm_started = time.perf_counter()
        run = train_sft if arm.startswith("sft") else train
        summary = run(recipes[arm], output_dir / arm, show_progress=show_progress)
        curve = learning_curve(output_dir / arm / "metrics.jsonl", samples_per_step)
        results[arm] = {
            "accuracy": summary["eval_reward_after"],
            "accuracy_before": summary["eval_reward_before"],
            "best_accuracy": max(point["accuracy"] for point in curve),
            "learns_from": _describe(recipe, arm),
            "samples_seen": recipe.train.steps * samples_per_step,
            "optimizer_steps": recipe.train.steps,
            "train_time_s": summary["train_time_s"],
            "wall_time_s": round(time.perf_counter() - arm_started, 3),
            "run_dir": str(output_dir / arm),
            "curve": curve,
        }
        if "eval_nll_after" in summary:
            results[arm]["heldout_nll_before"] = summary["eval_nll_before"]
            results[arm]["heldout_nll_after"] = summary["eval_nll_after"]

    report: dict[str, Any] = dict(results)
    if recipe.data.path is None:
        _, held_out = split_problems(recipe.data.max_operand, recipe.data.num_eval, recipe.data.shuffle_seed,
                                     recipe.data.min_operand)
        forget_carry = 0.0 if recipe.sft.demonstrator == "exact" else recipe.sft.forget_carry
        sampled, mode = demonstrator_accuracy(held_out, forget_carry)
        report["demonstrator"] = {"forget_carry": forget_carry, "accuracy": round(sampled, 4),
                                  "mode_accuracy": round(mode, 4)}
    report["budget"] = {"optimizer_steps": recipe.train.steps, "samples_per_step": samples_per_step,
                        "samples_seen": recipe.train.steps * samples_per_step,
                        "rl_prompts_per_step": recipe.rollout.prompts_per_step,
                        "sft_prompts_per_step": samples_per_step}
    report["held_out"] = {"prompts": recipe.data.num_eval if recipe.data.eval_split is None else None,
                          "decoding": "greedy" if recipe.eval.temperature == 0 else f"T={recipe.eval.temperature:g}"}
    report["start_model"] = recipe.model.name_or_path
    report["seed"] = recipe.seed
    report["torch_threads"] = torch.get_num_threads()
    report["load_average"] = {"before": load_before, "after": _load_average(), "cpus": os.cpu_count()}
    report["wall_time_s"] = round(time.perf_counter() - started, 3)
    with run_dir.staged_file("learning_curves.png") as staging:
        plot_curves(results, report.get("demonstrator"), staging)
    run_dir.write_json("summary.json", report)
    run_dir.write_text("report.md", render_report(recipe, report))
    return {arm: {k: v for k, v in value.items() if k != "curve"} if isinstance(value, dict) else value
            for arm, value in report.items()}


def _load_average() -> float | None:
    """The 1-minute load average (how busy the machine was), where the OS reports one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def plot_curves(results: dict[str, Any], demonstrator: dict[str, float] | None, path: Path) -> None:
    """Held-out accuracy vs samples seen (left) and vs training wall time (right), one line per arm."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    figure = Figure(figsize=(10, 3.8))
    by_samples, by_time = figure.subplots(1, 2, sharey=True)
    for arm, result in results.items():
        accuracy = [point["accuracy"] for point in result["curve"]]
        by_samples.plot([p["samples"] for p in result["curve"]], accuracy, marker="o", markersize=3, label=LABELS[arm])
        by_time.plot([p["train_time_s"] for p in result["curve"]], accuracy, marker="o", markersize=3, label=LABELS[arm])
    for axes in (by_samples, by_time):
        if demonstrator is not None:
            axes.axhline(demonstrator["accuracy"], color="gray", linestyle="--", linewidth=1,
                         label="demonstrator, one sample")
            axes.axhline(demonstrator["mode_accuracy"], color="gray", linestyle=":", linewidth=1,
                         label="demonstrator, most likely answer")
        axes.grid(alpha=0.3)
        axes.set_ylim(0, 1.02)
    by_samples.set_xlabel("samples seen (demonstrations or own completions)")
    by_time.set_xlabel("training wall time, s (evaluation excluded)")
    by_samples.set_ylabel("held-out accuracy (greedy)")
    by_samples.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def render_report(recipe: Recipe, report: dict[str, Any]) -> str:
    """``report.md``: what was compared, the table, the figure, and what it shows."""
    arms = [arm for arm in LABELS if arm in report]
    budget, held_out = report["budget"], report["held_out"]
    lines = [
        "# Imitation vs reward: SFT and REINFORCE from the same model",
        "",
        f"Start model: `{report['start_model']}` for every arm. Held-out set: "
        + (f"{held_out['prompts']} prompts never used for training" if held_out["prompts"] else "the eval split")
        + f", {held_out['decoding']} decoding, scored by `"
        + " + ".join(r.name for r in (recipe.eval.rewards or recipe.rewards)) + "` (accuracy = mean held-out reward).",
    ]
    if report["start_model"] == "builtin:arith-gpt":
        lines += [
            "",
            "`builtin:arith-gpt` was pre-trained by maximum likelihood on the flawed demonstrator (forget_carry 0.7): "
            "it starts where SFT on that demonstrator ends. Every arm starts there, as in the usual pipeline "
            "(imitate, then optimise the reward): a randomly initialised model essentially never earns the exact-match "
            "reward, so REINFORCE from scratch would have nothing to learn from.",
        ]
    lines += [
        "",
        "| arm | learns from | held-out accuracy: start → end (best) | samples seen | optimizer steps "
        "| training time (s) | wall time incl. evaluation (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        result = report[arm]
        lines.append(
            f"| {LABELS[arm]} | {result['learns_from']} | {result['accuracy_before']:.3f} → **{result['accuracy']:.3f}** "
            f"({result['best_accuracy']:.3f}) | {result['samples_seen']:,} | {result['optimizer_steps']} "
            f"| {result['train_time_s']:.1f} | {result['wall_time_s']:.1f} |")
    demonstrator = report.get("demonstrator")
    if demonstrator is not None:
        lines += [
            f"| demonstrator (forget_carry={demonstrator['forget_carry']:g}) | — | one sample: {demonstrator['accuracy']:.3f}; "
            f"most likely answer: {demonstrator['mode_accuracy']:.3f} | | | | |",
        ]
    lines += ["", "![held-out accuracy vs samples seen and vs training wall time](learning_curves.png)", ""]
    lines += [
        "## Budgets",
        "",
        f"- Optimizer steps: {budget['optimizer_steps']} for every arm, same optimizer (AdamW, lr {recipe.optim.lr:g}, "
        f"{recipe.optim.schedule} schedule, warm-up {recipe.optim.warmup_steps}), loss aggregation "
        f"`{recipe.algorithm.aggregation}`.",
        f"- Samples per step: {budget['samples_per_step']} for every arm (RL: {budget['rl_prompts_per_step']} prompts x "
        f"{recipe.rollout.completions_per_prompt} sampled completions; SFT: {budget['sft_prompts_per_step']} prompts with "
        f"one demonstration each), so {budget['samples_seen']:,} samples in all.",
        "- Wall time is not matched: an RL step also samples its completions, an SFT step does not. The right-hand "
        "plot puts the arms on one time axis. "
        f"Measured with {report['torch_threads']} torch thread(s), {report['load_average']['cpus']} CPUs, 1-minute "
        f"load average {report['load_average']['before']} before and {report['load_average']['after']} after: "
        "on a shared machine times are noisy; compare them within one report only.",
        f"- Total wall time of the comparison: {report['wall_time_s']:.0f} s.",
        "",
        "## What it shows",
        "",
    ]
    if "sft" in report and "rl" in report:
        sft, rl = report["sft"], report["rl"]
        lines.append(f"- REINFORCE ends at {rl['accuracy']:.3f}, SFT at {sft['accuracy']:.3f}: "
                     f"{rl['accuracy'] - sft['accuracy']:+.3f} for the reward signal at the same budget.")
    if demonstrator is not None:
        lines.append(
            f"- Maximum likelihood fits the demonstrator's distribution; greedy decoding of a perfect imitator returns the "
            f"demonstrator's most likely answer, right on {demonstrator['mode_accuracy']:.3f} of the held-out problems "
            f"(one sample from the demonstrator is right {demonstrator['accuracy']:.3f} of the time). More demonstrations "
            "cannot lift SFT above what the demonstrator does most often; a reward that checks the answer can.")
    if "sft_exact" in report:
        lines.append(f"- With an exact demonstrator, SFT reaches {report['sft_exact']['accuracy']:.3f}: imitation suffices "
                     "when the demonstrations are right, and is then the cheapest route (no sampling).")
    if "sft" in report and "heldout_nll_after" in report["sft"]:
        lines.append(f"- SFT does fit its demonstrations: their held-out NLL goes {report['sft']['heldout_nll_before']:.3f} → "
                     f"{report['sft']['heldout_nll_after']:.3f} nats/token (accuracy {report['sft']['accuracy_before']:.3f} → "
                     f"{report['sft']['accuracy']:.3f}).")
    if "filtered_bc" in report:
        rl_text = f" (REINFORCE: {report['rl']['accuracy']:.3f})" if "rl" in report else ""
        lines.append(
            f"- Filtered BC (maximum likelihood on the policy's own samples with reward >= "
            f"{recipe.algorithm.reward_threshold:g}) reaches {report['filtered_bc']['accuracy']:.3f}{rl_text}: the "
            "reward chooses what to imitate, and wrong answers are never pushed down (a baseline adds that). When the "
            "reward is 0/1 and the threshold 1, its weights 1[r >= 1] equal r: it is REINFORCE with baseline `none`.")
    lines.append("")
    return "\n".join(lines)


__all__ = ["arm_recipe", "compare", "learning_curve", "plot_curves", "render_report"]
