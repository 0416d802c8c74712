"""``rlhf-pg plot DIR [DIR ...]``: training curves of runs as PNG files, from each run's ``metrics.jsonl``.

One panel per metric that at least one run logged, one line per run, step on the x axis. Written to
``OUT/curves.png`` (all panels) and ``OUT/<metric>.png`` (one per panel, ``/`` spelled ``_``), where OUT
is ``--output-dir``, else ``DIR/plots`` for one run, else ``plots/`` in the runs' common parent directory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..run.metrics import read_metrics

# what is plotted by default, in panel order: the LM track, then the gym track's return
PLOTTED_METRICS = ("reward/mean", "eval/reward", "kl/ref", "completion/length", "policy/entropy",
                   "episode/return", "eval/return")


def plot_runs(run_dirs: Sequence[str | Path], output_dir: str | Path | None = None,
              metrics: Sequence[str] = PLOTTED_METRICS) -> list[Path]:
    """PNG curves of ``metrics`` vs step for the runs in ``run_dirs``; returns the files written, the
    all-panel figure first. A metric no run logged gets no panel; non-finite values are left out."""
    if not run_dirs:
        raise UserError("plot: give at least one run directory")
    curves = {label: _curves(path, metrics) for label, path in _labelled(run_dirs).items()}
    present = [metric for metric in metrics if any(metric in run for run in curves.values())]
    if not present:
        raise UserError(f"plot: none of {', '.join(metrics)} is in the metrics.jsonl of "
                        f"{', '.join(str(d) for d in run_dirs)}")
    output_dir = Path(output_dir) if output_dir is not None else _default_output_dir(run_dirs)
    output_dir.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    written = []
    columns = min(3, len(present))
    rows = math.ceil(len(present) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, present):
        _panel(ax, metric, curves)
    for ax in list(axes.flat)[len(present):]:
        ax.set_visible(False)
    figure.tight_layout()
    written.append(_save(figure, output_dir / "curves.png"))
    for metric in present:
        figure, ax = plt.subplots(figsize=(5.5, 3.6))
        _panel(ax, metric, curves)
        figure.tight_layout()
        written.append(_save(figure, output_dir / f"{metric.replace('/', '_')}.png"))
    return written


def _curves(run_dir: Path, metrics: Sequence[str]) -> dict[str, tuple[list[int], list[float]]]:
    """metric -> (steps, values) of one run, finite numbers only."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"plot: {run_dir} has no metrics.jsonl; give a run directory written by rlhf-pg "
                        "(train, sft, gym, train-rm)")
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for record in read_metrics(path):
        for metric in metrics:
            value: Any = record.get(metric)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                steps, values = curves.setdefault(metric, ([], []))
                steps.append(record["step"])
                values.append(float(value))
    return curves


def _panel(ax, metric: str, curves: dict[str, dict[str, tuple[list[int], list[float]]]]) -> None:
    for index, (label, run) in enumerate(curves.items()):
        if metric in run:
            steps, values = run[metric]
            sparse = len(steps) <= 30  # e.g. eval/reward, logged every eval_every steps: show the points
            ax.plot(steps, values, label=label, color=f"C{index % 10}",  # a run keeps its colour in every panel
                    marker="o" if sparse else None, markersize=3, linewidth=1.2)
    ax.set_title(metric)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize="small")


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _labelled(run_dirs: Sequence[str | Path]) -> dict[str, Path]:
    """Run label -> directory: the directory's name, or its path below the common parent when names repeat."""
    paths = [Path(d) for d in run_dirs]
    names = [p.resolve().name for p in paths]
    if len(set(names)) == len(names):
        return dict(zip(names, paths))
    parent = Path(os.path.commonpath([str(p.resolve()) for p in paths]))
    return {str(p.resolve().relative_to(parent)) or p.resolve().name: p for p in paths}


def _default_output_dir(run_dirs: Sequence[str | Path]) -> Path:
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "plots"
    return Path(os.path.commonpath([str(Path(d).resolve()) for d in run_dirs])) / "plots"


__all__ = ["PLOTTED_METRICS", "plot_runs"]
