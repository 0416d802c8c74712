"""The variance lab: at fixed policy parameters, how far is each gradient estimator from the true gradient?

Every estimator is ``g = -grad policy_gradient_loss(log pi, A, mask)`` = (1/B) sum_i sum_t grad log pi(a_it|s_it) A_it
with the advantages A built from the shared functions in ``rlhf_pg.advantages`` (total return, reward-to-go,
each registry baseline, whitening, a learned V). All estimators see the *same* K independent batches
(common random numbers), and are compared with a reference gradient g* over the full parameter vector:

    g*        the average of M further independent batches of the unbiased reward-to-go + leave-one-out
              estimator (on the enumerable MDP, the exact gradient instead)
    variance  tr Cov[g]          = (1/(K-1)) sum_k ||g_k - mean g||^2
    bias^2    ||mean_k g_k - g*||^2
    MSE       (1/K) sum_k ||g_k - g*||^2  (~ variance + bias^2 + the reference's own error tr Cov[g*])
    cosine    (1/K) sum_k <g_k, g*> / (||g_k|| ||g*||)
    best-scale relative MSE  min_c E||c g - g*||^2 / ||g*||^2 = 1 - E[<g, g*>]^2 / (E||g||^2 ||g*||^2):
              scale-free (whitening rescales g, and a learning rate absorbs any scale), 0 = perfect.

The objective is the undiscounted return E[sum_t r_t] (what evaluation reports), so every estimator uses
gamma = 1 except the "discounted" row, which shows the bias discounting trades for variance.

Sources: a gym recipe (batches of episodes from ``rlhf_pg.gym``; the learned V is fitted on the reference
batches, which are independent of the measured ones) or an LM recipe (batches of prompts x completions from
the recipe's sampler (``policy.sampler.make_sampler``), scored by the recipe's rewards; the gradient is over all of the model's parameters).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..core import estimator
from ..core.estimator import LEARNED_BASELINE, REMAX_BASELINE, EstimatorSpec
from ..core.presets import PRESETS
from ..run.accel import set_threads
from ..run.rundir import RunDir
from .sources import Batch, GymSource, LMSource, flat_gradient
from ..config import load_yaml
from ..gym.config import is_gym_recipe
from ..errors import UserError
from ..core.losses import policy_gradient_loss
from ..run.metrics import progress_bar

Tensor = torch.Tensor


# --- estimators -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabEstimator:
    """One row of the lab: a name and the estimator it measures (``core.estimator.EstimatorSpec``)."""

    name: str
    spec: EstimatorSpec
    aggregation: str = "seq-mean-token-sum"  # how the per-token terms are reduced (presets choose theirs)


def _row(name: str, **keys: Any) -> LabEstimator:
    return LabEstimator(name, EstimatorSpec(**keys))


def preset_estimators(greedy: bool) -> list[LabEstimator]:
    """A row per preset of ``core.presets``: its baseline, scale, whitening and aggregation, on-policy (ratio 1).

    Not measured here: dynamic sampling and the overlong penalty (DAPO: they change which batches are
    drawn and the reward), and ReMax where the source has no greedy rollout (``greedy`` False: gym).
    """
    rows = []
    for name, preset in PRESETS.items():
        values = {key.split(".", 1)[1]: value for key, value in preset.values.items()}
        if values["baseline"] == REMAX_BASELINE and not greedy:
            continue
        rows.append(LabEstimator(f"preset {name}", EstimatorSpec.from_keys(values), values["aggregation"]))
    return rows


def default_estimators(groups: bool, value: bool, gamma: float = 1.0) -> list[LabEstimator]:
    """The lab's estimators; ``groups``: batches hold several completions per prompt; ``value``: a learned V exists."""
    specs = [
        _row("total return", returns="total"),
        _row("reward-to-go"),
    ]
    if gamma < 1.0:
        specs.append(_row(f"reward-to-go, discounted {gamma:g} + timestep_mean", baseline="timestep_mean", gamma=gamma))
    specs.append(_row("rtg + batch_mean", baseline="batch_mean"))
    if groups:
        specs.append(_row("rtg + group_mean", baseline="group_mean"))
    specs += [
        _row("rtg + leave_one_out", baseline="leave_one_out"),
        _row("rtg + timestep_mean", baseline="timestep_mean"),
    ]
    if value:
        specs.append(_row("rtg + learned value", baseline=LEARNED_BASELINE))
    specs += [
        _row("rtg + whiten", whiten=True),
        _row("rtg + leave_one_out + whiten", baseline="leave_one_out", whiten=True),
    ]
    return specs


REFERENCE = _row("reference: rtg + leave_one_out", baseline="leave_one_out")


def estimate(row: LabEstimator, batch: Batch, params: list[Tensor], retain_graph: bool = True) -> Tensor:
    """The estimate of grad J under ``row`` on ``batch``: minus the gradient of the shared REINFORCE loss."""
    advantages = estimator.advantages(row.spec, batch.rewards, batch.mask, batch.group_ids, batch.values,
                                      batch.greedy_rewards)
    loss = policy_gradient_loss(batch.logprobs, advantages, batch.mask, row.aggregation, norm_length=batch.mask.shape[1])
    return -flat_gradient(loss, params, retain_graph)


# --- the measurement ---------------------------------------------------------------------------------------------


def measure(source, specs: list[LabEstimator], batches: int, reference_batches: int,
            show_progress: bool = True) -> dict[str, Any]:
    """Reference gradient, then every estimator on ``batches`` shared batches; see the module docstring."""
    if batches < 2:
        raise UserError("--batches must be at least 2 (the variance needs two samples)")
    started = time.perf_counter()
    with progress_bar(show_progress) as bar:
        # 1. reference: the mean of M independent unbiased estimates (and its own variance)
        task = bar.add_task("reference gradient", total=reference_batches, status="")
        total, total_sq = None, 0.0
        for _ in range(reference_batches):
            g = estimate(REFERENCE, source.sample(keep_for_value=True), source.params, retain_graph=False)
            total = g if total is None else total + g
            total_sq += float(g @ g)
            bar.advance(task)
        sampled_reference = total / reference_batches
        reference_variance = (total_sq - reference_batches * float(sampled_reference @ sampled_reference)) / max(1, reference_batches - 1)
        exact = source.exact_reference()
        reference = exact if exact is not None else sampled_reference
        if float(reference @ reference) == 0.0:
            raise UserError("the reference gradient is exactly zero (every sampled trajectory got the same reward?); "
                            "there is nothing to measure at these parameters: try another policy (--policy) or reward")
        reference_error = 0.0 if exact is not None else reference_variance / reference_batches
        source.fit_value()
        specs = [s for s in specs if s.spec.baseline != LEARNED_BASELINE or source.value is not None]
        # 2. every estimator on the same batches
        sums = {s.name: torch.zeros_like(reference) for s in specs}
        stats = {s.name: {"sq": 0.0, "dot": 0.0, "err": 0.0, "cos": 0.0} for s in specs}
        ref_norm_sq = float(reference @ reference)
        task = bar.add_task("estimators", total=batches, status="")
        for _ in range(batches):
            batch = source.sample()
            for index, spec in enumerate(specs):
                g = estimate(spec, batch, source.params, retain_graph=index < len(specs) - 1)
                sums[spec.name] += g
                norm_sq, dot = float(g @ g), float(g @ reference)
                record = stats[spec.name]
                record["sq"] += norm_sq
                record["dot"] += dot
                record["err"] += float((g - reference) @ (g - reference))
                record["cos"] += dot / math.sqrt(max(norm_sq * ref_norm_sq, 1e-300))
            bar.advance(task)
    rows = []
    for spec in specs:
        mean = sums[spec.name] / batches
        record = stats[spec.name]
        variance = (record["sq"] - batches * float(mean @ mean)) / (batches - 1)
        second_moment = record["sq"] / batches
        best_scale_error = 1.0 - (record["dot"] / batches) ** 2 / max(second_moment * ref_norm_sq, 1e-300)
        rows.append({
            "estimator": spec.name,
            "mse": record["err"] / batches,
            "variance": variance,
            "bias_sq": float((mean - reference) @ (mean - reference)),
            "cosine": record["cos"] / batches,
            "relative_mse": record["err"] / batches / ref_norm_sq,
            "best_scale_relative_mse": best_scale_error,
            "spec": asdict(spec.spec),
            "aggregation": spec.aggregation,
        })
    return {
        "source": source.description,
        "num_parameters": int(reference.numel()),
        "batch_size": source.batch_size,
        "batches": batches,
        "reference": {
            "kind": "exact (enumeration)" if exact is not None else f"mean of {reference_batches} batches of {REFERENCE.name.split(': ')[1]}",
            "batches": reference_batches,
            "norm_sq": ref_norm_sq,
            "own_mse": reference_error,
            "sampled_vs_exact_sq": float((sampled_reference - exact) @ (sampled_reference - exact)) if exact is not None else None,
        },
        "estimators": rows,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }


# --- the report ----------------------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def report_markdown(result: dict[str, Any], figure: str = "variance.png") -> str:
    ref = result["reference"]
    lines = [
        f"# Variance lab: {result['source']}",
        "",
        f"{len(result['estimators'])} estimators of grad E[sum_t r_t] over all {result['num_parameters']:,} policy parameters, "
        f"each on the same {result['batches']} independent batches of {result['batch_size']} trajectories. "
        f"Reference g*: {ref['kind']} (||g*||^2 = {_fmt(ref['norm_sq'])}; its own error ~{_fmt(ref['own_mse'])} is part of every MSE).",
        "",
        f"![variance]({figure})",
        "",
        "| estimator | MSE to g* | variance (tr Cov) | bias^2 | cosine to g* | best-scale rel. MSE |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["estimators"]:
        lines.append(f"| {row['estimator']} | {_fmt(row['mse'])} | {_fmt(row['variance'])} | {_fmt(row['bias_sq'])} | "
                     f"{row['cosine']:.3f} | {row['best_scale_relative_mse']:.3f} |")
    lines += [
        "",
        "MSE = variance + bias^2 (+ the reference's error). Whitening divides by the advantages' std, so its "
        "MSE is at another scale; compare it by the scale-free columns (cosine, best-scale relative MSE = "
        "min_c E||c g - g*||^2 / ||g*||^2). batch_mean and group_mean include the trajectory's own return "
        "and shrink the gradient by (1 - 1/n): that shows as bias^2.",
        "",
        f"Wall time: {result['wall_time_s']} s.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Two panels: MSE and variance (log scale), and the scale-free best-scale relative MSE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = result["estimators"]
    rescaled = lambda r: r["spec"]["whiten"] or r["spec"]["scale"] != "none" or r["aggregation"] != "seq-mean-token-sum"  # noqa: E731
    names = [r["estimator"] + (" (rescaled)" if rescaled(r) else "") for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.8), sharey=True)
    positions = list(range(len(rows)))
    left.barh(positions, [r["mse"] for r in rows], color="tab:blue", label="MSE to g*")
    left.barh(positions, [r["variance"] for r in rows], color="tab:orange", height=0.4, label="variance (tr Cov)")
    left.set_xscale("log")
    smallest = min(min(r["mse"], r["variance"]) for r in rows if min(r["mse"], r["variance"]) > 0)
    left.set_xlim(smallest / 4, max(r["mse"] for r in rows) * 1.5)  # bars start a factor 4 below the shortest
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_yticks(positions, names)
    left.invert_yaxis()
    left.set_xlabel("squared error, log scale (lower is better)")
    left.legend(loc="lower right", fontsize=8)
    right.barh(positions, [r["best_scale_relative_mse"] for r in rows], color="tab:green")
    right.set_xlim(0.0, 1.0)
    right.set_xlabel("best-scale relative MSE: min_c E||c g - g*||^2 / ||g*||^2")
    for position, row in zip(positions, rows):
        right.text(row["best_scale_relative_mse"] + 0.01, position, f"cos {row['cosine']:.2f}", va="center", fontsize=8)
    figure.suptitle(f"{result['source']}: {result['batches']} batches of {result['batch_size']} trajectories", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def run_variance_lab(recipe_path: str, output_dir: str | Path, overrides: list[str] | None = None,
                     policy: str | None = None, batches: int | None = None, reference_batches: int | None = None,
                     overwrite: bool = False, presets: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Load a gym or LM recipe, measure, and write ``report.md``, ``variance.png`` and ``variance.json`` to ``output_dir``."""
    run_dir = RunDir(output_dir, marker="variance.yaml", outputs=("report.md", "variance.png", "variance.json"),
                     what="a measurement")
    with run_dir.lock():
        return _run_variance_lab(recipe_path, run_dir, overrides, policy, batches, reference_batches, overwrite,
                                 presets, show_progress)


def _run_variance_lab(recipe_path, run_dir: RunDir, overrides, policy, batches, reference_batches, overwrite,
                      presets, show_progress) -> dict[str, Any]:
    if is_gym_recipe(load_yaml(recipe_path)):
        from ..gym.config import load_gym_recipe

        recipe, source_class, defaults = load_gym_recipe(recipe_path, overrides), GymSource, (200, 1000)
    else:
        from ..recipe import load_recipe

        recipe, source_class, defaults = load_recipe(recipe_path, overrides), LMSource, (50, 200)
    run_dir.prepare(recipe.to_dict(), overwrite=overwrite, resumable=False)
    set_threads(recipe.train.num_threads)
    source: Any = source_class(recipe, policy)
    batches, reference_batches = batches or defaults[0], reference_batches or defaults[1]
    try:
        specs = default_estimators(groups=source.groups, value=isinstance(source, GymSource), gamma=source.gamma)
        if presets:
            specs += preset_estimators(greedy=isinstance(source, LMSource))
        elif isinstance(source, LMSource):
            source.greedy = False  # only the ReMax row needs the greedy completions
        result = measure(source, specs, batches, reference_batches, show_progress)
    finally:
        source.close()
    result["recipe"] = str(recipe_path)
    run_dir.write_marker(recipe.to_dict())
    with run_dir.staged_file("variance.png") as staging:
        plot(result, staging)
    run_dir.write_text("report.md", report_markdown(result))
    run_dir.write_json("variance.json", result)
    return result


__all__ = ["LabEstimator", "default_estimators", "estimate", "measure", "run_variance_lab"]
