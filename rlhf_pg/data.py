"""Prompts through ``datasets``: a built-in generated task, or ``load_dataset`` on files or a hub name.

Training prompts are drawn in a fixed order that depends only on the seed and the step number
(consecutive shuffled passes over the training split), so a resumed run sees exactly the prompts the
uninterrupted run would have seen.

A prompt is text or, in TRL's conversational format, a list of ``{"role", "content"}`` messages (a
jsonl ``prompt`` column of such lists loads as is; ``chat.py`` renders them with the chat template).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .chat import check_prompt_kinds
from .errors import UserError, first_line
from .recipe import DataConfig
from .tasks import arithmetic
from .tasks.reasoning_gym import ReasoningGymSource

PYTHON_REFERENCE = "python:"  # data.path of a dataset given from Python (rlhf_pg.api), which no file holds
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def load_path(path: str, split: str):
    """A ``datasets.Dataset`` from a local file or directory, or a hub dataset name."""
    import datasets

    local = Path(path).expanduser()
    try:
        if local.is_file():
            builder = _BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise UserError(f"data.path {path!r}: unsupported file type {local.suffix!r}; use one of {', '.join(_BUILDERS)}")
            if local.stat().st_size == 0:
                raise UserError(f"data.path {path!r} is an empty file; it needs one prompt per row")
            return datasets.load_dataset(builder, data_files={split: str(local)}, split=split)
        if local.is_dir():
            if (local / "dataset_info.json").exists() or (local / "state.json").exists():
                loaded = datasets.load_from_disk(str(local))
                return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
            return datasets.load_dataset(str(local), split=split)
        if path.startswith(PYTHON_REFERENCE):
            raise UserError(f"data.path {path!r} stands for a dataset given to rlhf_pg.train(train_dataset=...) (or sft, "
                            "evaluate, doctor); pass it again from Python, or point data.path at a file")
        if path.startswith((".", "/", "~")) or local.suffix.lower() in _BUILDERS or (os.sep in path and not _looks_like_hub_name(path)):
            raise UserError(f"data.path {path!r} does not exist; give an existing file or directory")
        return datasets.load_dataset(path, split=split)
    except UserError:
        raise
    except ValueError as error:
        raise UserError(f"data: cannot load split {split!r} of {path!r}: {first_line(error, with_type=False)}") from None
    except Exception as error:  # noqa: BLE001 - network, format and hub errors all need the same answer
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " (offline mode is on: use a local file)" if offline and not local.exists() else ""
        cause = f" ({type(error.__cause__).__name__}: {first_line(error.__cause__, with_type=False)})" if error.__cause__ else ""
        raise UserError(f"data: cannot load dataset {path!r}: {first_line(error)}{cause}{hint}") from None


def _looks_like_hub_name(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~"))


def load_prompt_datasets(config: DataConfig):
    """``(train, eval)`` ``datasets.Dataset``s with a ``prompt`` column (renamed from ``prompt_column``).

    The built-in arithmetic task writes its prompts as ``data.prompt_format`` says (``"text"``: ``"12+7="``;
    ``"chat"``: ``[{"role": "user", "content": "What is 12+7? Reply with only the number."}]``); the held-out
    problems are never training prompts, and columns a, b, answer go to the reward functions. Datasets given
    from Python (``config.dataset`` / ``config.eval_dataset``, ``rlhf_pg.api``) take the place of ``path`` / ``eval_split``;
    without a held-out set, ``num_eval`` rows of the training set are held out.
    """
    import datasets

    if config.source == "reasoning_gym":
        raise UserError("data.source: reasoning_gym generates prompts on the fly (rlhf-pg train, sft, eval, doctor); "
                        "this command needs a fixed dataset (data.task or data.path)")
    held_out = None
    if config.dataset is not None:
        train = _prompt_column(config.dataset, config, "train_dataset")
    elif config.path is None:
        prompt_format = getattr(config, "prompt_format", "text")
        if prompt_format not in arithmetic.PROMPT_FORMATS:
            raise UserError(f"data.prompt_format={prompt_format!r}: use one of {', '.join(arithmetic.PROMPT_FORMATS)}")
        train_problems, eval_problems = arithmetic.split_problems(
            config.max_operand, config.num_eval, config.shuffle_seed, config.min_operand
        )
        train = datasets.Dataset.from_dict(arithmetic.as_records(train_problems, prompt_format))
        held_out = datasets.Dataset.from_dict(arithmetic.as_records(eval_problems, prompt_format))
    else:
        train = _prompt_column(load_path(config.path, config.split), config, f"split {config.split!r} of {config.path!r}")
        if config.eval_split is not None and config.eval_dataset is None:
            if Path(config.path).expanduser().is_file():
                raise UserError(f"data.eval_split={config.eval_split!r}: {config.path!r} is a single file, so every split "
                                "of it is the same rows; set eval_split to null (data.num_eval rows are held out) or point "
                                "data.path at a directory or dataset that has that split")
            held_out = _prompt_column(load_path(config.path, config.eval_split), config,
                                      f"split {config.eval_split!r} of {config.path!r}")
    if config.eval_dataset is not None:
        return train, _prompt_column(config.eval_dataset, config, "eval_dataset")
    if held_out is not None:
        return train, held_out
    if len(train) <= config.num_eval:
        hint = "pass eval_dataset=" if config.dataset is not None else "set data.eval_split"
        raise UserError(
            f"data: {len(train)} rows cannot give {config.num_eval} held-out prompts and leave some for training; "
            f"lower data.num_eval or {hint}"
        )
    split = train.train_test_split(test_size=config.num_eval, seed=config.shuffle_seed, shuffle=True)
    return split["train"], split["test"]


def _prompt_column(dataset, config: DataConfig, where: str):
    """``dataset`` with its prompts in a ``prompt`` column, or a ``UserError`` naming the first bad row.

    Every prompt is text, or every prompt is a list of messages with a known role and string content. ``where``:
    the dataset in messages (``split 'train' of 'p.jsonl'``, ``train_dataset``).
    """
    column = config.prompt_column
    if column not in dataset.column_names:
        raise UserError(
            f"data: {where} has no column {column!r} (columns: {', '.join(dataset.column_names)}); "
            "set data.prompt_column to the column that holds the prompts"
        )
    if len(dataset) == 0:
        raise UserError(f"data: {where} has no rows")
    check_prompt_kinds(list(dataset[column]), column=column, row_name=lambda index: f"data: row {index} of {where}")
    if column != "prompt":
        if "prompt" in dataset.column_names:
            dataset = dataset.remove_columns("prompt")
        dataset = dataset.rename_column(column, "prompt")
    return dataset


def prompt_source(config: DataConfig, prompts_per_step: int, seed: int):
    """``(training prompt source, held-out prompts, held-out columns)``: a ``PromptSampler`` over
    ``load_prompt_datasets``'s training split, or a ``ReasoningGymSource`` (``data.source: reasoning_gym``)."""
    if config.source == "reasoning_gym":
        source = ReasoningGymSource(config, prompts_per_step, seed)
        return (source, *source.eval_columns())
    train, held_out = load_prompt_datasets(config)
    return (PromptSampler(train, prompts_per_step, seed), *columns_of(held_out))


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

    def draw(self, seed: int, count: int) -> tuple[list[Any], dict[str, list[Any]]]:
        """``count`` prompts drawn uniformly (with replacement) by ``seed``: a dynamic-sampling round's extra prompts."""
        indices = torch.randint(len(self.dataset), (count,), generator=torch.Generator().manual_seed(seed)).tolist()
        rows = self.dataset[indices]
        return rows.pop("prompt"), rows

    def known_prompts(self) -> list[Any]:
        """Every training prompt (checked against the context length before the run)."""
        return self.dataset["prompt"]

    def state_dict(self) -> dict[str, Any]:
        return {}  # the order is a function of (seed, step): nothing to save

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        pass


def columns_of(dataset) -> tuple[list[str], dict[str, list[Any]]]:
    """All prompts of ``dataset`` and its other columns."""
    rows = dataset[:]
    prompts = rows.pop("prompt")
    return prompts, rows
