"""Checkpoints in ``DIR/checkpoint-<step>/``, named as the HF Trainer names them.

Each holds the model and tokenizer (``save_pretrained``), ``trainer_state.json`` (step, recipe,
metrics so far), ``optimizer.pt``, ``scheduler.pt`` and ``rng_state.pth``. A checkpoint is written to
a temporary directory and renamed into place, so a crash never leaves a half-written one; only the
last ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import UserError

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
REQUIRED_FILES = ("trainer_state.json", "optimizer.pt", "config.json")


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    output_dir: Path, step: int, model, tokenizer, optimizer, scheduler, trainer_state: dict[str, Any], keep: int,
) -> Path:
    """Write ``checkpoint-<step>`` atomically and prune older ones beyond ``keep``."""
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".checkpoint-{step}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    if tokenizer is not None:  # the gym track saves a policy with no tokenizer
        tokenizer.save_pretrained(staging)
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    torch.save(scheduler.state_dict(), staging / "scheduler.pt")
    torch.save(rng_state(), staging / "rng_state.pth")
    (staging / "trainer_state.json").write_text(json.dumps({"global_step": step, **trainer_state}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint, or a ``UserError`` saying it is corrupt and what to do."""
    missing = [name for name in REQUIRED_FILES if not (checkpoint / name).exists()]
    if missing:
        raise UserError(
            f"checkpoint {checkpoint} is incomplete (missing {', '.join(missing)}); delete it to resume from an "
            "earlier one, or start again with --overwrite"
        )
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        int(state["global_step"])
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"checkpoint {checkpoint} has a corrupt trainer_state.json ({error}); delete the checkpoint "
                        "or start again with --overwrite") from None
    return state


def load_training_state(checkpoint: Path, optimizer, scheduler) -> None:
    """Restore optimizer, scheduler and RNG states (the model is loaded with ``from_pretrained``)."""
    try:
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=False))
        if (checkpoint / "scheduler.pt").exists():
            scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
        if (checkpoint / "rng_state.pth").exists():
            set_rng_state(torch.load(checkpoint / "rng_state.pth", weights_only=False))
    except Exception as error:  # noqa: BLE001 - any failure here means the checkpoint does not fit this run
        raise UserError(
            f"checkpoint {checkpoint} does not match this recipe ({type(error).__name__}: {error}); resume with the "
            "recipe that wrote it, or start again with --overwrite"
        ) from None
