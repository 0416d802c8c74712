"""Over-optimization report: proxy and gold reward against KL from the reference, as PNGs.

    rlhf-pg report runs/rlhf_preferences/kl_0 runs/rlhf_preferences/kl_0.05 ...

Each run directory has ``metrics.jsonl`` (one record per step) and ``recipe.yaml``. The *proxy* is the
reward the policy was trained on, ``reward/mean`` (the weighted sum of the recipe's rewards, before the
KL penalty); the *gold* rewards are the monitored ones, logged as ``reward/<name>/mean`` and given weight
0 in the recipe (or named with ``--gold``). The x axis is ``kl/ref``, the per-sequence KL estimate
from the frozen reference (logged when ``algorithm.kl_coef > 0`` or ``algorithm.log_kl: true``).
Curves are moving averages over ``smooth`` steps, labelled by the run's KL coefficient; a dot marks
where each run ended, a dotted line where the runs started (the initial policy's first-step mean).

Writes ``goodhart.png`` (proxy and gold against KL) and ``rewards_by_step.png`` (proxy, gold and KL
against the step).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..run.metrics import read_metrics


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start): ``m_i = mean(v[max(0, i-w+1) .. i])``."""
    averaged, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averaged.append(total / min(index + 1, window))
    return averaged


def _run_label(recipe: dict[str, Any]) -> str:
    algorithm = recipe.get("algorithm", {}) or {}
    coef = algorithm.get("kl_coef", 0.0)
    label = f"β = {coef:g}"
    if algorithm.get("kl_target") is not None:
        label += f" (adaptive, target {algorithm['kl_target']:g})"
    return label


def _monitored_rewards(recipe: dict[str, Any]) -> list[str]:
    """Labels of the weight-0 rewards, as the trainer names their metrics (``reward/<label>/mean``)."""
    labels, seen = [], {}
    for spec in recipe.get("rewards", []) or []:
        spec = {"name": spec} if isinstance(spec, str) else spec
        label = str(spec.get("name", "")).rsplit(":", 1)[-1]
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            label = f"{label}_{seen[label]}"
        if float(spec.get("weight", 1.0)) == 0.0:
            labels.append(label)
    return labels


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """``{"dir", "label", "recipe", "records"}`` for one run directory, with clear errors for what is missing."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise UserError(f"report: {run_dir} has no metrics.jsonl; give directories written by 'rlhf-pg train'")
    recipe_path = run_dir / "recipe.yaml"
    recipe = yaml.safe_load(recipe_path.read_text()) if recipe_path.exists() else {}
    records = [r for r in read_metrics(metrics) if "reward/mean" in r]
    if not records:
        raise UserError(f"report: {metrics} has no training steps yet")
    if not any("kl/ref" in r for r in records):
        raise UserError(f"report: {run_dir} logged no kl/ref; train with algorithm.kl_coef > 0 or "
                        "algorithm.log_kl: true so the KL from the reference is measured")
    return {"dir": run_dir, "label": _run_label(recipe), "recipe": recipe, "records": records}


def write_report(run_dirs: list[str | Path], output_dir: str | Path | None = None, gold: list[str] | None = None,
                 smooth: int = 10) -> list[Path]:
    """Draw the report's PNGs for ``run_dirs`` into ``output_dir``; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    runs.sort(key=lambda run: float((run["recipe"].get("algorithm", {}) or {}).get("kl_coef", 0.0)))
    gold_names = gold or sorted({name for run in runs for name in _monitored_rewards(run["recipe"])})
    if not gold_names:
        raise UserError("report: no gold reward to plot; give it weight 0 in the recipe's rewards "
                        "(e.g. {name: arith_gold, weight: 0}) or name it with --gold")
    for run in runs:
        for name in gold_names:
            if not any(f"reward/{name}/mean" in r for r in run["records"]):
                available = sorted(k[7:-5] for k in run["records"][0] if k.startswith("reward/") and k.endswith("/mean")
                                   and k != "reward/mean")
                raise UserError(f"report: {run['dir']} has no metric reward/{name}/mean; its rewards are: "
                                f"{', '.join(available) or 'none'}")
    if output_dir is None:
        output_dir = Path(run_dirs[0]) if len(run_dirs) == 1 else Path(os.path.commonpath(
            [str(Path(d).resolve()) for d in run_dirs])) / "report"
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    colors = plt.get_cmap("tab10")
    columns = 1 + len(gold_names)
    keys = ["reward/mean"] + [f"reward/{g}/mean" for g in gold_names]

    def series(run, key):
        rows = [r for r in run["records"] if key in r and "kl/ref" in r]
        return [r["step"] for r in rows], moving_average([float(r["kl/ref"]) for r in rows], smooth), \
            moving_average([float(r[key]) for r in rows], smooth)

    written = []
    figure, axes = plt.subplots(1, columns, figsize=(4.6 * columns, 3.8), squeeze=False)
    for column, key in enumerate(keys):  # where every run started: the first step's mean (the initial policy)
        start = sum(float(run["records"][0].get(key, 0.0)) for run in runs) / len(runs)
        axes[0, column].axhline(start, color="grey", linestyle=":", linewidth=1, label="initial policy (step 1)")
    for index, run in enumerate(runs):
        for column, key in enumerate(keys):
            _, kl, value = series(run, key)
            axes[0, column].plot(kl, value, color=colors(index), label=run["label"])
            axes[0, column].plot(kl[-1:], value[-1:], "o", color=colors(index))  # where the run ended
    axes[0, 0].set_title("proxy: the trained reward")
    axes[0, 0].set_ylabel("reward/mean")
    for column, name in enumerate(gold_names, start=1):
        axes[0, column].set_title(f"gold: {name}")
        axes[0, column].set_ylabel(f"reward/{name}/mean")
    for ax in axes[0]:
        ax.set_xlabel("KL(π || π_ref) per completion (kl/ref)")
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=8)
    figure.suptitle(f"Proxy vs gold reward as the policy moves away from the reference ({smooth}-step moving average)",
                    fontsize=10)
    figure.tight_layout()
    path = output_dir / "goodhart.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    written.append(path)

    figure, axes = plt.subplots(1, columns + 1, figsize=(4.2 * (columns + 1), 3.6), squeeze=False)
    for index, run in enumerate(runs):
        for column, key in enumerate(keys):
            steps, kl, value = series(run, key)
            axes[0, column].plot(steps, value, color=colors(index), label=run["label"])
        steps, kl, _ = series(run, "reward/mean")
        axes[0, -1].plot(steps, kl, color=colors(index), label=run["label"])
    titles = ["proxy (reward/mean)"] + [f"gold ({g})" for g in gold_names] + ["kl/ref"]
    for ax, title in zip(axes[0], titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=8)
    figure.tight_layout()
    path = output_dir / "rewards_by_step.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    written.append(path)
    return written


__all__ = ["write_report", "load_run", "moving_average"]
