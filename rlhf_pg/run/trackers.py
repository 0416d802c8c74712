"""Experiment trackers through accelerate: ``train.report_to: [tensorboard, wandb, trackio, mlflow]``.

Each name is one of accelerate's tracker classes (``accelerate.tracking``), started on the main process
only (the caller decides which process that is; see ``MetricsLogger``). What every tracker gets:

- the resolved recipe as the run's configuration (``store_init_configuration``), flattened to the
  dotted names of the CLI overrides (``train.steps``, ``rollout.temperature``...);
- the scalars of each step under the names of ``metrics.jsonl`` (``reward/mean``, ``kl/ref``...);
- a completions table, where the tracker has tables: a ``wandb.Table`` for wandb, a markdown table
  (``add_text``) for TensorBoard; trackio and mlflow get no table.

Where they write: TensorBoard under ``DIR/tensorboard`` (as before trackers existed); wandb under
``$WANDB_DIR`` (default: the run directory), project ``$WANDB_PROJECT`` (default ``rlhf-pg``), offline
with ``WANDB_MODE=offline``; trackio under its own cache, project ``rlhf-pg``; mlflow wherever
``MLFLOW_TRACKING_URI`` points, experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``rlhf-pg``). The run
is named after the run directory.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError

# report_to name -> (module that must be importable, pip package that provides it)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
}
PROJECT = "rlhf-pg"


def check_report_to(report_to: Sequence[str], key: str = "train.report_to") -> list[str]:
    """The tracker names of ``report_to``, deduplicated in order; a UserError for an unknown name or a
    tracker whose package is not installed (call it when the recipe is loaded, to fail before any work)."""
    if isinstance(report_to, str):
        report_to = [report_to]
    names: list[str] = []
    for name in report_to:
        if name not in TRACKERS:
            raise UserError(f"{key}: unknown tracker {name!r}; choose from {', '.join(TRACKERS)} "
                            f"(or [] for metrics.jsonl only)")
        module, package = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"{key}: {name!r} needs the {package!r} package, which is not installed; "
                            f"`pip install {package}` or remove {name!r} from {key}")
        if name not in names:
            names.append(name)
    return names


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """``{"train": {"steps": 3}}`` -> ``{"train.steps": 3}``: the names of the CLI overrides, and values every
    tracker accepts as hyper-parameters (bool, int, float, str; anything else, None included, as JSON text)."""
    flat: dict[str, bool | int | float | str] = {}
    for name, value in config.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, prefix=f"{dotted}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[dotted] = value
        else:
            flat[dotted] = json.dumps(value, default=str)
    return flat


def start_trackers(report_to: Sequence[str], output_dir: Path, config: dict[str, Any] | None = None,
                   resume_step: int | None = None) -> list:
    """Construct, start and configure accelerate's trackers for ``report_to`` (already checked names).

    Call on the main process only (the trackers' own main-process guard is switched off: we are it), after
    the run's ``Accelerator`` exists. accelerate's trackers log through accelerate's logger, which needs its
    process state; a command without an Accelerator (the gym track) gets the default single-process state
    here, the one a later ``Accelerator()`` would have made.
    """
    from accelerate import PartialState
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    if not report_to:
        return []
    PartialState()  # a no-op when an Accelerator (or PartialState) was made before
    output_dir = Path(output_dir)
    run_name = output_dir.resolve().name
    trackers = []
    for name in check_report_to(report_to):
        if name == "tensorboard":
            # TensorBoardTracker writes to logging_dir/run_name: DIR/tensorboard; purge_step drops the
            # events a resumed run will write again
            tracker = TensorBoardTracker("tensorboard", output_dir, purge_step=resume_step)
        elif name == "wandb":
            tracker = WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=run_name,
                                   dir=os.environ.get("WANDB_DIR", str(output_dir)))
        elif name == "trackio":
            tracker = TrackioTracker(PROJECT, name=run_name)
        else:
            tracker = MLflowTracker(experiment_name=PROJECT, run_name=run_name)
        tracker.main_process_only = False  # we are the main process (see the docstring)
        tracker.start()
        if config is not None:
            tracker.store_init_configuration(flatten_config(config))
        trackers.append(tracker)
    return trackers


def log_scalars(trackers: Sequence, step: int, record: dict[str, Any]) -> None:
    """The finite numbers of one ``metrics.jsonl`` record, under the same names, at ``step``."""
    scalars = {key: value for key, value in record.items() if key != "step" and not isinstance(value, bool)
               and isinstance(value, (int, float)) and math.isfinite(value)}
    if scalars:
        for tracker in trackers:
            tracker.log(scalars, step=step)


def log_completions(trackers: Sequence, step: int, rows: Sequence[dict[str, Any]], key: str = "completions") -> None:
    """A table of completions (one dict per row, e.g. prompt, completion, reward) at ``step``, for the
    trackers that have tables: wandb (``wandb.Table``) and TensorBoard (a markdown table as text)."""
    if not rows:
        return
    columns = list(dict.fromkeys(column for row in rows for column in row))
    for tracker in trackers:
        if tracker.name == "wandb":
            tracker.log_table(key, columns=columns, data=[[row.get(c) for c in columns] for row in rows], step=step)
        elif tracker.name == "tensorboard":
            tracker.writer.add_text(key, completions_markdown(rows, columns), global_step=step)
            tracker.writer.flush()


def completions_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows as a markdown table; ``|`` and line breaks inside cells are escaped so each row stays one line."""
    columns = list(columns or dict.fromkeys(column for row in rows for column in row))

    def cell(value: Any) -> str:
        if isinstance(value, float):
            value = f"{value:.4g}"
        text = "" if value is None else str(value)
        return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def finish_trackers(trackers: Sequence) -> None:
    """Close every tracker (flushes TensorBoard, ends the wandb/trackio/mlflow run)."""
    for tracker in trackers:
        tracker.finish()


__all__ = ["TRACKERS", "check_report_to", "completions_markdown", "finish_trackers", "flatten_config",
           "log_completions", "log_scalars", "start_trackers"]
