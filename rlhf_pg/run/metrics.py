"""Metrics: one JSON object per step in ``DIR/metrics.jsonl``, the trackers of ``train.report_to``
(TensorBoard by default; ``run/trackers.py``), a rich progress bar.

Metric names are stable and slash-separated: ``reward/mean``, ``reward/std_err``,
``reward/<name>/mean``, ``loss/policy``, ``kl/ref``, ``adv/mean``, ``adv/std``,
``completion/length``, ``grad/norm``, ``optim/lr``, ``perf/tokens_per_s``, ``perf/step_s`` (of which
``perf/sample_s``: rollout and rewards, ``perf/sync_s``: weights pushed to the engine),
``eval/reward`` (and ``eval/reward/<name>``), ``ratio/mean``, ``ratio/clip_fraction``; SFT runs log
``loss/nll`` (the ML loss) and ``eval/nll`` (held-out NLL per completion token).
The gym track (``rlhf-pg gym``) logs ``episode/return``, ``episode/return_std_err``, ``episode/length``,
``loss/policy``, ``loss/value``, ``adv/mean``, ``adv/std``, ``policy/entropy``, ``grad/norm``, ``optim/lr``,
``perf/env_steps``, ``perf/env_steps_per_s``, ``perf/step_s`` and ``eval/return``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .trackers import check_report_to, finish_trackers, log_completions, log_scalars, start_trackers


class MetricsLogger:
    """Appends step records to ``metrics.jsonl`` and sends them to the trackers of ``report_to``.

    ``report_to`` names accelerate trackers (``tensorboard``, ``wandb``, ``trackio``, ``mlflow``; see
    ``run/trackers.py``); None means ``[tensorboard]``. ``tensorboard=False`` removes ``tensorboard`` from
    the list (the older spelling, kept so ``train.tensorboard: false`` still means no event files).
    ``config`` (the resolved recipe as a dict) becomes each tracker's run configuration. Construct it with
    ``enabled=False`` on every process but the main one: then it writes nothing and starts no tracker.
    """

    def __init__(self, output_dir: Path, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None,
                 report_to: Sequence[str] | None = None, config: dict[str, Any] | None = None):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.completions_path = Path(output_dir) / "completions.jsonl"
        self.trackers: list = []
        if not enabled:
            return
        for path in (self.path, self.completions_path):
            if resume_step is not None and path.exists():
                # drop records written after the checkpoint we resume from: they will be written again
                kept = [line for line in path.read_text().splitlines() if _step_of(line) <= resume_step]
                path.write_text("".join(line + "\n" for line in kept))
            elif resume_step is None and path.exists():
                path.unlink()
        if report_to is None:  # the default: TensorBoard if it can be had, without insisting
            report_to = ["tensorboard"] if tensorboard else []
            if report_to and importlib.util.find_spec("tensorboard") is None:
                print("note: tensorboard is not installed; writing metrics.jsonl only", file=sys.stderr)
                report_to = []
        names = [name for name in check_report_to(report_to) if tensorboard or name != "tensorboard"]
        self.trackers = start_trackers(names, Path(output_dir), config=config, resume_step=resume_step)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """One line of ``metrics.jsonl``; its finite numbers to every tracker under the same names."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        log_scalars(self.trackers, step, record)

    def log_completions(self, step: int, rows: Sequence[dict[str, Any]]) -> None:
        """Completions (one dict per row: prompt, completion, rewards, advantage...) appended to
        ``completions.jsonl`` (each row with its ``step``) and sent as a table to the trackers that have tables."""
        if not self.enabled or not rows:
            return
        plain = [{"step": step, **{k: _plain(v) for k, v in row.items() if k != "step"}} for row in rows]
        with self.completions_path.open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in plain)
        log_completions(self.trackers, step, plain)

    def close(self) -> None:
        """End the trackers' runs (a second call does nothing)."""
        trackers, self.trackers = self.trackers, []
        finish_trackers(trackers)
        self.trackers = []


def _step_of(line: str) -> float:
    """The step of a ``metrics.jsonl`` line; a line cut short by a crash counts as after any checkpoint."""
    try:
        record = json.loads(line)
        return record.get("step", 0) if isinstance(record, dict) else math.inf
    except ValueError:
        return math.inf


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def progress_bar(enabled: bool = True):
    """A rich progress bar showing step, reward and throughput (in Jupyter: a live ipywidgets Output).

    In a terminal, what is printed while it runs goes above it (rich redirects stdout/stderr). Not in Jupyter:
    there the bar is a widget of its own, and rich's redirection recurses forever once the kernel flushes stderr
    while publishing a display (a SIGINT note, a checkpoint's progress)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console()
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, redirect_stdout=not console.is_jupyter, redirect_stderr=not console.is_jupyter,
        disable=not enabled,
    )


def completions_table(rows: Sequence[dict[str, Any]], title: str, limit: int = 4):
    """A rich table of the first ``limit`` completions: prompt (its last message for a conversation), completion,
    reward (and advantage when the rows have one) — what the model writes, in the console."""
    from rich.table import Table

    table = Table(title=title, show_lines=False, title_justify="left", expand=False)
    table.add_column("prompt", overflow="fold", max_width=48)
    table.add_column("completion", overflow="fold", max_width=64)
    table.add_column("reward", justify="right")
    with_advantage = any("advantage" in row for row in rows)
    if with_advantage:
        table.add_column("advantage", justify="right")
    for row in list(rows)[:limit]:
        prompt = row.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
            prompt = prompt[-1].get("content", "")
        cells = [str(prompt), str(row.get("completion")), f"{row.get('reward', float('nan')):.3f}"]
        if with_advantage:
            cells.append(f"{row.get('advantage', float('nan')):+.3f}")
        table.add_row(*cells)
    return table
