"""Checkpoints in ``DIR/checkpoint-<step>/``, named as the HF Trainer names them.

Each holds the model and tokenizer (``save_pretrained``), ``trainer_state.json`` (step, recipe,
metrics so far), ``optimizer.pt``, ``scheduler.pt`` and ``rng_state.pth``. A sharded run's (FSDP) holds the model's
``config.json`` and, instead of the weights and ``optimizer.pt``, ``sharded/``: a torch distributed checkpoint (DCP)
that every process wrote its shards of the model and the optimizer into (``run/fsdp.py``). A checkpoint is written to
a temporary directory, flushed to disk (fsync) and renamed into place, so a crash (``kill -9``, a power cut)
never leaves a half-written ``checkpoint-<step>``: a leftover ``.checkpoint-<step>.tmp`` is ignored, and removed
by ``clean_staging``. Only the last ``keep`` are kept; an older one is renamed to ``.checkpoint-<step>.del``
before it is deleted, so a crash mid-delete leaves no partial ``checkpoint-<step>`` either.
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

from ..errors import UserError, first_line

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_STAGING_RE = re.compile(r"^\.checkpoint-(\d+)\.(tmp|old|del)$")
REQUIRED_FILES = ("trainer_state.json", "optimizer.pt")  # a sharded checkpoint: sharded/.metadata for optimizer.pt
SHARDS = "sharded"
MODEL_FILES = ("config.json", "adapter_config.json")  # a full model or a LoRA adapter


def rng_state() -> dict[str, Any]:
    """Global RNG states: python, numpy, torch CPU and (when present) every CUDA device (dropout draws from these)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def has_shards(checkpoint: Path) -> bool:
    """Written by a sharded run (``sharded/`` holds the model and the optimizer)?"""
    return (checkpoint / SHARDS / ".metadata").exists()


def save_shards(output_dir: Path, step: int, write, is_main: bool, barrier) -> None:
    """Every process: ``write(DIR)`` its shards into ``.checkpoint-<step>.tmp/sharded`` (a fresh staging directory
    the main process makes), between barriers; ``save_checkpoint(..., staged=True)`` then completes and publishes it."""
    staging = output_dir / f".checkpoint-{step}.tmp"
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        (staging / SHARDS).mkdir(parents=True)
    barrier()
    try:
        write(staging / SHARDS)
    except (OSError, RuntimeError) as error:  # DCP raises on every process when one failed to write
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot write the shards of checkpoint-{step} in {output_dir}: {first_line(error)[:300]} "
                        f"({_free_mib(output_dir)} MiB free there); free some disk space or choose another "
                        "--output-dir (the earlier checkpoints are intact)") from None
    barrier()


def save_checkpoint(
    output_dir: Path, step: int, model, tokenizer, optimizer, scheduler, trainer_state: dict[str, Any], keep: int,
    staged: bool = False,
) -> Path:
    """Write ``checkpoint-<step>`` atomically (temp dir + rename) and prune older ones beyond ``keep``.

    ``staged``: the staging directory already holds ``sharded/`` (``save_shards``): it is kept, ``model`` is then the
    model's config and ``optimizer`` None. A failure while writing (disk full, permissions) leaves the earlier
    checkpoints as they were and is a ``UserError``.
    """
    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".checkpoint-{step}.tmp"
    try:
        if not staged:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
        model.save_pretrained(staging)
        if tokenizer is not None:  # the gym track saves a policy with no tokenizer
            tokenizer.save_pretrained(staging)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
        torch.save(rng_state(), staging / "rng_state.pth")
        (staging / "trainer_state.json").write_text(json.dumps({"global_step": step, **trainer_state}, indent=2))
        _flush(staging)
        if staged:
            _flush(staging / SHARDS)
        if final.exists():  # the same step written again: swap, so some complete copy exists at every moment
            previous = output_dir / f".checkpoint-{step}.old"
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
            os.replace(staging, final)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, final)
        _flush(output_dir, files=False)  # the rename itself
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError of its C++ stream
        shutil.rmtree(staging, ignore_errors=True)
        reason = error if isinstance(error, OSError) else first_line(error)
        raise UserError(f"cannot write checkpoint {final}: {reason} ({_free_mib(output_dir)} MiB free there); free some "
                        "disk space or choose another --output-dir (the earlier checkpoints are intact)") from None
    for old in list_checkpoints(output_dir)[:-keep]:
        doomed = output_dir / f".{old.name}.del"
        try:
            os.replace(old, doomed)  # out of the checkpoints' names first: a crash mid-delete leaves no partial one
        except OSError:
            continue  # kept: an extra checkpoint is harmless
        shutil.rmtree(doomed, ignore_errors=True)
    return final


def _free_mib(path: Path) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f}"
    except OSError:
        return "?"


def _flush(directory: Path, files: bool = True) -> None:
    """fsync the files directly in ``directory`` and the directory itself (its entries), where the OS allows."""
    paths = [child for child in directory.iterdir() if child.is_file()] if files else []
    for path in [*paths, directory]:
        try:
            handle = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # e.g. directories cannot be opened on Windows
        try:
            os.fsync(handle)
        except OSError:
            pass  # a file system without fsync for directories
        finally:
            os.close(handle)


def clean_staging(output_dir: Path) -> list[str]:
    """Remove what an interrupted ``save_checkpoint`` left behind; returns the names removed.

    ``.checkpoint-<step>.tmp`` is a half-written checkpoint: deleted. ``.checkpoint-<step>.old`` is a
    complete one that was being replaced: deleted if its replacement exists, else renamed back.
    ``.checkpoint-<step>.del`` was being deleted (an old one beyond ``keep``): deleted.
    """
    removed = []
    if not output_dir.is_dir():
        return removed
    for child in sorted(output_dir.iterdir()):
        match = _STAGING_RE.match(child.name)
        if not match or not child.is_dir():
            continue
        final = output_dir / f"checkpoint-{match.group(1)}"
        if match.group(2) == "old" and not final.exists():
            os.replace(child, final)
            continue
        shutil.rmtree(child, ignore_errors=True)
        removed.append(child.name)
    return removed


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


def unusable(checkpoint: Path, problem: str, mismatch: bool = False) -> UserError:
    """The error for a checkpoint that cannot be resumed: what is wrong and the ways out."""
    earlier = [path for path in list_checkpoints(checkpoint.parent) if path != checkpoint]
    ways = ["resume with the recipe that wrote it"] if mismatch else []
    if earlier:
        ways.append(f"delete it to resume from {earlier[-1].name}")
    ways.append("start again with --overwrite" + ("" if earlier else " (there is no earlier checkpoint)"))
    return UserError(f"checkpoint {checkpoint} {problem}; {', or '.join(ways)}")



def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint, or a ``UserError`` saying it is corrupt and what to do."""
    required = [name for name in REQUIRED_FILES if not (name == "optimizer.pt" and has_shards(checkpoint))]
    missing = [name for name in required if not (checkpoint / name).exists()]
    if not any((checkpoint / name).exists() for name in MODEL_FILES):
        missing.append(" or ".join(MODEL_FILES))
    if missing:
        raise unusable(checkpoint, f"is incomplete (missing {', '.join(missing)})")
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        if not isinstance(state, dict):
            raise TypeError(f"expected a JSON object, got {type(state).__name__}")
        step = state["global_step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"global_step={step!r} is not a step number")
        named = _CHECKPOINT_RE.match(checkpoint.name)
        if named and int(named.group(1)) != step:
            raise ValueError(f"global_step={step} but the directory is {checkpoint.name}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise unusable(checkpoint, f"has a corrupt trainer_state.json ({first_line(error)})") from None
    return state


def load_training_state(checkpoint: Path, optimizer, scheduler) -> None:
    """Restore optimizer, scheduler and RNG states (the model is loaded with ``from_pretrained``; a sharded
    checkpoint's model and optimizer with ``fsdp.resume``).

    The optimizer state is checked against the parameters' shapes, which ``load_state_dict`` does not
    do (a state from another model would otherwise fail only at the first step).
    """
    for name, restore in (("optimizer.pt", lambda state: _load_optimizer(optimizer, state)),
                          ("scheduler.pt", scheduler.load_state_dict), ("rng_state.pth", set_rng_state)):
        if (name != "optimizer.pt" or has_shards(checkpoint)) and not (checkpoint / name).exists():
            continue
        try:
            restore(torch.load(checkpoint / name, weights_only=False))
        except Exception as error:  # noqa: BLE001 - any failure here means the checkpoint does not fit this run
            raise unusable(checkpoint, f"has an unusable {name}, corrupt or written for another model "
                                       f"({first_line(error)})", mismatch=True) from None


def restore_rng_state(checkpoint: Path) -> None:
    """Set the global RNGs to the states saved in ``checkpoint`` (no-op for a checkpoint without them)."""
    if (checkpoint / "rng_state.pth").exists():
        set_rng_state(torch.load(checkpoint / "rng_state.pth", weights_only=False))


def _load_optimizer(optimizer, state: dict[str, Any]) -> None:
    optimizer.load_state_dict(state)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    if not isinstance(inner, torch.optim.Optimizer):
        return  # e.g. DeepSpeed's optimizer: its own checks apply
    for group in inner.param_groups:
        for param in group["params"]:
            for key, value in inner.state.get(param, {}).items():
                if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"its {key} has shape {tuple(value.shape)} for a parameter of shape "
                                     f"{tuple(param.shape)}")
