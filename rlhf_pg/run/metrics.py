"""Metrics: one JSON object per step in ``DIR/metrics.jsonl``, TensorBoard scalars, a rich progress bar.

Metric names are stable and slash-separated: ``reward/mean``, ``reward/std_err``,
``reward/<name>/mean``, ``loss/policy``, ``kl/ref``, ``adv/mean``, ``adv/std``,
``completion/length``, ``grad/norm``, ``optim/lr``, ``perf/tokens_per_s``, ``perf/step_s``,
``eval/reward`` (and ``eval/reward/<name>``), ``ratio/mean``, ``ratio/clip_fraction``; SFT runs log
``loss/nll`` (the ML loss) and ``eval/nll`` (held-out NLL per completion token).
The gym track (``rlhf-pg gym``) logs ``episode/return``, ``episode/return_std_err``, ``episode/length``,
``loss/policy``, ``loss/value``, ``adv/mean``, ``adv/std``, ``policy/entropy``, ``grad/norm``, ``optim/lr``,
``perf/env_steps``, ``perf/env_steps_per_s``, ``perf/step_s`` and ``eval/return``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends step records to ``metrics.jsonl`` and TensorBoard (main process only)."""

    def __init__(self, output_dir: Path, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # drop records written after the checkpoint we resume from: they will be written again
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"), purge_step=resume_step)
            except ImportError:
                print("note: tensorboard is not installed; writing metrics.jsonl only", file=sys.stderr)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
    """A rich progress bar showing step, reward and throughput."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not enabled,
    )
