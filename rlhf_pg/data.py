"""Prompts through ``datasets``: a built-in generated task, or ``load_dataset`` on files or a hub name.

Training prompts are drawn in a fixed order that depends only on the seed and the step number
(consecutive shuffled passes over the training split), so a resumed run sees exactly the prompts the
uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .config import DataConfig
from .errors import UserError
from .tasks import arithmetic

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def _load_path(path: str, split: str):
    """A ``datasets.Dataset`` from a local file or directory, or a hub dataset name."""
    import datasets

    local = Path(path).expanduser()
    try:
        if local.is_file():
            builder = _BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise UserError(f"data.path {path!r}: unsupported file type {local.suffix!r}; use one of {', '.join(_BUILDERS)}")
            return datasets.load_dataset(builder, data_files={split: str(local)}, split=split)
        if local.is_dir():
            if (local / "dataset_info.json").exists() or (local / "state.json").exists():
                loaded = datasets.load_from_disk(str(local))
                return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
            return datasets.load_dataset(str(local), split=split)
        if path.startswith((".", "/", "~")) or os.sep in path and not _looks_like_hub_name(path):
            raise UserError(f"data.path {path!r} does not exist; give an existing file or directory")
        return datasets.load_dataset(path, split=split)
    except UserError:
        raise
    except ValueError as error:
        raise UserError(f"data: cannot load split {split!r} of {path!r}: {error}") from None
    except Exception as error:  # noqa: BLE001 - network, format and hub errors all need the same answer
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " (offline mode is on: use a local file)" if offline else ""
        raise UserError(f"data: cannot load dataset {path!r}: {type(error).__name__}: {error}{hint}") from None


def _looks_like_hub_name(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~"))


def load_prompt_datasets(config: DataConfig):
    """``(train, eval)`` ``datasets.Dataset``s with a ``prompt`` column (renamed from ``prompt_column``)."""
    import datasets

    if config.path is None:
        train_problems, eval_problems = arithmetic.split_problems(
            config.max_operand, config.num_eval, config.shuffle_seed, config.min_operand
        )
        return (
            datasets.Dataset.from_dict(arithmetic.as_records(train_problems)),
            datasets.Dataset.from_dict(arithmetic.as_records(eval_problems)),
        )
    train = _load_path(config.path, config.split)
    if config.prompt_column not in train.column_names:
        raise UserError(
            f"data: dataset {config.path!r} has no column {config.prompt_column!r} (columns: {', '.join(train.column_names)}); "
            "set data.prompt_column to the column that holds the prompts"
        )
    if config.prompt_column != "prompt":
        if "prompt" in train.column_names:
            train = train.remove_columns("prompt")
        train = train.rename_column(config.prompt_column, "prompt")
    if len(train) == 0:
        raise UserError(f"data: dataset {config.path!r} split {config.split!r} has no rows")
    if config.eval_split is not None:
        held_out = _load_path(config.path, config.eval_split)
        if config.prompt_column != "prompt":
            held_out = held_out.rename_column(config.prompt_column, "prompt")
        return train, held_out
    if len(train) <= config.num_eval:
        raise UserError(
            f"data: {len(train)} rows cannot give {config.num_eval} held-out prompts and leave some for training; "
            "lower data.num_eval or set data.eval_split"
        )
    split = train.train_test_split(test_size=config.num_eval, seed=config.shuffle_seed, shuffle=True)
    return split["train"], split["test"]


class PromptSampler:
    """Prompts for step ``s``: positions ``[s*k, (s+1)*k)`` of consecutive seeded permutations."""

    def __init__(self, dataset, prompts_per_step: int, seed: int):
        self.dataset = dataset
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.dataset), generator=generator).tolist()}
        return self._orders[epoch]

    def indices(self, step: int) -> list[int]:
        size = len(self.dataset)
        start = step * self.prompts_per_step
        return [self._order(pos // size)[pos % size] for pos in range(start, start + self.prompts_per_step)]

    def batch(self, step: int) -> tuple[list[str], dict[str, list[Any]]]:
        """``(prompts, other columns)`` for ``step``."""
        rows = self.dataset[self.indices(step)]
        prompts = rows.pop("prompt")
        return prompts, rows


def columns_of(dataset) -> tuple[list[str], dict[str, list[Any]]]:
    """All prompts of ``dataset`` and its other columns."""
    rows = dataset[:]
    prompts = rows.pop("prompt")
    return prompts, rows
