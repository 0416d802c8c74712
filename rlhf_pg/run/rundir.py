"""The run directory every command writes: marker, --overwrite/--resume policy, lock, atomic outputs.

    DIR/recipe.yaml        the marker: the resolved recipe (a reward-model run names it differently)
    DIR/.lock              held (flock) for the whole run: two runs never write into one directory
    DIR/checkpoint-<step>/ written atomically (run/checkpoint.py)
    DIR/final/             written aside and renamed into place: never half-written
    DIR/summary.json       likewise (temp file + rename)

A directory "holds a run" once a run made progress there (a checkpoint, metrics, a summary, final/);
a start that failed during setup leaves nothing and can simply be retried. Such a directory is only
written again with ``--resume`` (same recipe, continue from the latest checkpoint) or ``--overwrite``
(delete the earlier run's outputs, listed in ``RunDir.outputs``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import yaml

from ..errors import UserError
from . import checkpoint as ckpt

RUN_MARKER = "recipe.yaml"
# keys a resumed run may change (train.fsdp: how the run is spread over processes; a sharded checkpoint resumes
# unsharded too, an unsharded one is refused by a sharded run)
IGNORED_ON_RESUME = {"train.steps", "output_dir", "train.distributed_timeout_s", "train.fsdp", "train.num_threads"}


class RunDir:
    """One run's output directory. ``outputs``: the files and folders ``--overwrite`` removes."""

    def __init__(self, path: str | Path, marker: str = RUN_MARKER, outputs: tuple[str, ...] = (), what: str = "a run",
                 resume_may_change: set[str] = IGNORED_ON_RESUME):
        self.path = Path(path)
        self.resume_may_change = resume_may_change  # dotted keys a resumed run may change (its length, its dir)
        self.marker = marker
        self.outputs = ("metrics.jsonl", "completions.jsonl", "summary.json", "final", "tensorboard", marker, *outputs)
        self.what = what  # for messages: "a run", "a comparison", "a measurement"

    # --- policy ---------------------------------------------------------------------------------------

    def holds_run(self) -> bool:
        """Some progress of an earlier run is here (a checkpoint or one of the outputs other than the marker)."""
        return bool(ckpt.list_checkpoints(self.path)) or any(
            (self.path / name).exists() for name in self.outputs if name != self.marker)

    def prepare(self, recipe: dict[str, Any], resume: bool = False, overwrite: bool = False,
                is_main: bool = True, resumable: bool = True, defaults: dict[str, Any] | None = None) -> Path | None:
        """Refuse to mix runs; return the checkpoint to resume from (or None).

        ``recipe``: the resolved recipe as plain data; on ``--resume`` it must equal the marker's (up to
        ``resume_may_change``; a key the marker lacks, added by a newer rlhf-pg, may hold its value in ``defaults``:
        the schema's defaults). ``resumable=False`` for commands that have no checkpoints.
        """
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"output dir {self.path} is a file; choose a directory with --output-dir")
        holds_run = self.holds_run()
        if is_main:
            ckpt.clean_staging(self.path)  # half-written checkpoints of a crashed run
        if resume:
            latest = ckpt.latest_checkpoint(self.path)
            if latest is None:
                start = ("it holds a run that stopped before its first checkpoint: use --overwrite to start it again"
                         if holds_run else "drop --resume to start a new run")
                raise UserError(f"--resume: {self.path} has no checkpoint-<step> directory to resume from; {start}")
            previous = self.read_marker()
            differing = differing_keys(previous, recipe, self.resume_may_change, defaults=defaults) if previous else []
            if differing:
                raise UserError(f"--resume: {self.path} was written by a different recipe (differs in "
                                f"{', '.join(differing[:5])}); resume with the same recipe or use --overwrite")
            return latest
        if holds_run and not overwrite:
            again = "pass --resume to continue it, --overwrite to replace it" if resumable else "pass --overwrite to replace it"
            raise UserError(f"{self.path} already holds {self.what}; {again}, or choose another --output-dir")
        if holds_run and is_main:
            self.clear()
        return None

    def clear(self) -> None:
        """Delete an earlier run's outputs (what ``--overwrite`` promises to delete, nothing else)."""
        for child in [*ckpt.list_checkpoints(self.path), *(self.path / name for name in self.outputs)]:
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)

    def read_marker(self) -> dict[str, Any]:
        try:
            return yaml.safe_load((self.path / self.marker).read_text()) or {}
        except (OSError, yaml.YAMLError):
            return {}  # missing or damaged: the checkpoints are checked on their own

    # --- writing --------------------------------------------------------------------------------------

    def write_marker(self, recipe: dict[str, Any]) -> None:
        """Written once everything loaded: a start that failed leaves no run behind."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / self.marker).write_text(yaml.safe_dump(recipe, sort_keys=False))
        except OSError as error:
            raise UserError(f"cannot write to output dir {self.path}: {error}; choose another --output-dir") from None

    def write_json(self, name: str, content: Any) -> Path:
        """``DIR/name`` as JSON, written atomically (``staged_file``)."""
        with self.staged_file(name) as staging:
            staging.write_text(json.dumps(content, indent=2))
        return self.path / name

    def write_text(self, name: str, text: str) -> Path:
        with self.staged_file(name) as staging:
            staging.write_text(text)
        return self.path / name

    @contextlib.contextmanager
    def staged_file(self, name: str) -> Iterator[Path]:
        """Yield a temporary path to write; on success it replaces ``DIR/name`` in one rename (readers never
        see half a file). The temporary name keeps the suffix, for writers that go by it (matplotlib)."""
        target = self.path / name
        staging = self.path / f".tmp-{name}"
        try:
            yield staging
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        os.replace(staging, target)

    @contextlib.contextmanager
    def staged_dir(self, name: str = "final") -> Iterator[Path]:
        """Yield ``DIR/.name.tmp`` to fill; on success it replaces ``DIR/name`` in one rename."""
        staging = self.path / f".{name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        target = self.path / name
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``DIR/.lock`` for the whole run so that two runs never write into one directory.

        An OS file lock (``flock``): the OS releases it when the process ends, however it ends, so a
        crashed run never leaves a stale lock. Only the first process of a distributed run takes it; on
        systems without ``fcntl`` (Windows) there is no lock. A directory this run created and left
        empty (a start that failed) is removed.
        """
        try:
            import fcntl
        except ImportError:
            fcntl = None
        path = self.path
        if fcntl is None or os.environ.get("RANK", "0") != "0" or (path.exists() and not path.is_dir()):
            yield  # (a file in the way is reported by prepare)
            return
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            handle = open(path / ".lock", "a+")
        except OSError as error:
            raise UserError(f"cannot write to output dir {path}: {error}; choose another --output-dir") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip()
            handle.close()
            raise UserError(f"another rlhf-pg run{f' (pid {owner})' if owner else ''} is writing to {path}; wait for "
                            "it to finish, stop it, or choose another --output-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.close()  # releases the lock
            if created and path.is_dir() and {p.name for p in path.iterdir()} <= {".lock"}:
                shutil.rmtree(path, ignore_errors=True)


def differing_keys(old: Any, new: Any, ignore: set[str], prefix: str = "", defaults: Any = None) -> list[str]:
    """Dotted keys whose values differ between two nested mappings (``ignore``: dotted keys to skip). A key missing
    from ``old`` (a run written before that key existed) is unchanged when ``new`` holds its value in ``defaults``."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = []
        defaults = defaults if isinstance(defaults, dict) else {}
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}{key}"
            if path in ignore or (key not in old and key in new and key in defaults and new[key] == defaults[key]):
                continue
            keys += differing_keys(old.get(key), new.get(key), ignore, path + ".", defaults.get(key))
        return keys
    return [] if old == new else [prefix.rstrip(".")]
