"""The loop every training command shares: steps, evaluation, checkpoints, signals, the final save.

    evaluate()                                   held-out numbers before training (kept on resume)
    warm_up()                                    train.sft_warmup_steps: SFT steps, then evaluate() (not redone on resume)
    for step in range(start, steps):
        metrics <- job.step(step)                one optimizer step (or more) and its metrics
        job.after_step(step)                     between steps (the CPU matmul kernel re-check)
        evaluate() every eval_every steps; log metrics; progress bar
        non-finite guard: skipped updates counted, stop after max_nonfinite_steps in a row
        SIGINT/SIGTERM: finish the step, checkpoint, raise TrainingInterrupted (exit 130 / 75)
                   (several processes agree first: every one stops after the same step)
        checkpoint every save_every steps
    evaluate(); checkpoint-<steps>; final/ and summary.json written atomically

What the run cannot go on from stops it cleanly (``clean_stops``): a reward source that stays unreachable
(``RewardUnavailable``: a single process checkpoints its last completed step first) and a collective that
failed because another process died or hangs (``PeerLost``); both exit 75, the checkpoints intact, and
``--resume`` continues.

A command is a ``Job`` (the LM trainer, SFT, the gym track, the reward-model trainer): it says how to
take a step, evaluate, checkpoint and save its model; the guarantees above are written once, here.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import NonFiniteError, PeerLost, RewardUnavailable, TrainingInterrupted, UserError, first_line
from . import checkpoint as ckpt
from .accel import collective_failure
from .metrics import MetricsLogger, completions_table, progress_bar
from .rundir import RunDir


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and stops. A second signal aborts."""

    def __init__(self):
        self.signal_name: str | None = None
        self.then = "finishing the current step, then writing a checkpoint"  # said when the first signal arrives
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    @property
    def number(self) -> int:
        """The signal's number (0: none yet); SIGTERM (15) outranks SIGINT (2) when processes compare."""
        return int(signal.Signals[self.signal_name]) if self.signal_name else 0

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name}: {self.then} (send it again to abort at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


LOOP_COUNTERS = {"global_step": 0, "last_eval": None, "nonfinite_in_a_row": 0, "skipped_updates": 0,
                 "train_time_s": 0.0, "wall_time_s": 0.0}


class Job:
    """What a command gives the loop. Subclasses set the attributes and implement the methods.

    ``step`` returns the step's metrics with ``perf/step_s`` and, when updates were skipped as
    non-finite, ``train/skipped_updates`` (out of ``optim/updates``, default 1). ``evaluate`` returns
    held-out scalars, among them ``self.score``, and optionally ``examples``.
    """

    command = "train"  # the CLI command, for messages
    score = "reward"  # the main held-out scalar; its first value is kept as counters[f"eval_{score}_before"]
    loss_key = "loss/policy"
    counter_defaults: dict[str, Any] = {}  # the job's own totals, kept in checkpoints

    run_dir: RunDir
    steps: int
    eval_every: int = 0
    save_every: int = 0
    max_nonfinite_steps: int = 5
    seed: int = 0
    tensorboard: bool = True
    report_to: list[str] | None = None  # trackers (None: tensorboard when ``tensorboard``)
    is_main: bool = True
    num_processes: int = 1
    process_index: int = 0
    counters: dict[str, Any]
    logger: MetricsLogger | None = None  # set by run_job: steps may log completions through it
    console: Any = None  # set by run_job: the progress bar's console (prints above the bar)

    def init_counters(self, saved: dict[str, Any] | None = None) -> None:
        """The loop's and the job's counters, from a checkpoint's ``trainer_state.json`` when resuming."""
        defaults = {**LOOP_COUNTERS, f"eval_{self.score}_before": None, "eval_before": {}, **self.counter_defaults}
        saved = saved or {}
        self.counters = {key: saved.get(key, default) for key, default in defaults.items()}
        if not isinstance(self.counters["eval_before"], dict):
            self.counters["eval_before"] = {}

    def step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def after_step(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Between steps (``step`` = steps done, ``metrics`` the step's): work that must not happen inside a step
        (the LM runs re-check their CPU matmul kernel here). Returns metrics to log with the step's."""
        return {}

    def evaluate(self) -> dict[str, Any]:
        raise NotImplementedError

    def warm_up(self, stop: StopFlag) -> dict[str, Any] | None:
        """Work between the first evaluation and the first step that a resumed run must not redo (``train``'s SFT
        warm-up; the job keeps in its counters that it was done). Returns a held-out evaluation after it, or
        None when there was nothing to do."""
        return None

    def save_checkpoint(self, step: int) -> Path | None:
        """Write ``checkpoint-<step>`` holding ``self.counters`` (``global_step`` is already ``step``); every
        process calls it, the main process writes."""
        raise NotImplementedError

    def save_final(self, staging: Path, summary: dict[str, Any]) -> None:
        """Write the final model into ``staging`` (it becomes ``DIR/final``); main process only."""
        raise NotImplementedError

    def gather_final(self) -> None:
        """Every process, before ``save_final``: collect what it needs (a sharded model's full weights)."""

    def summary(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        """The command's own summary keys (the loop adds steps, times, resume and skip counts)."""
        return {}

    def status(self, metrics: dict[str, float]) -> str:
        return ""

    def seed_everything(self, resume_from: Path | None) -> None:
        """Seed (or restore the checkpoint's RNG states) right before the first evaluation: importing some
        libraries (rich) draws from python's global generator, and a fresh process imports them after setup."""
        from accelerate.utils import set_seed

        if resume_from is None:
            set_seed(self.seed)
        else:
            ckpt.restore_rng_state(resume_from)

    def barrier(self) -> None:
        """Wait for every process (distributed runs)."""

    def max_over_processes(self, value: int) -> int:
        """The largest ``value`` of all processes (several: an all-reduce, so that all of them act alike)."""
        return value

    def config(self) -> dict[str, Any] | None:
        """The resolved recipe as plain data: the trackers' run configuration."""
        recipe = getattr(self, "recipe", None)
        return recipe.to_dict() if recipe is not None else None


def _log_examples(job: Job, step: int, result: dict[str, Any], title: str) -> None:
    """Held-out examples (what the model writes) to ``completions.jsonl``, the trackers and the console."""
    examples = result.get("examples")
    if not examples or job.logger is None:
        return
    job.logger.log_completions(step, [{"split": "eval", **example} for example in examples])
    if job.console is not None and job.is_main:
        job.console.print(completions_table(examples, f"{title} (step {step}, held-out, greedy)"))


def eval_scalars(result: dict[str, Any]) -> dict[str, float]:
    return {key: value for key, value in result.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


def run_job(job: Job, resume_from: Path | None, show_progress: bool = True) -> dict[str, Any]:
    """Run ``job`` from its counters to ``job.steps``; returns the summary also written to ``DIR/summary.json``."""
    counters, score = job.counters, job.score
    before_key = f"eval_{score}_before"
    start_step = int(counters["global_step"])
    if start_step > job.steps:
        raise UserError(f"--resume: {resume_from} is at step {start_step}, past train.steps={job.steps}; "
                        f"give --max-steps {start_step} or more")
    logger = MetricsLogger(job.run_dir.path, enabled=job.is_main, tensorboard=job.tensorboard,
                           resume_step=start_step if resume_from is not None else None, report_to=job.report_to,
                           config=job.config() if job.is_main else None)
    started = time.perf_counter()
    # closing(logger): an error or a second Ctrl-C still stops the trackers' threads (a notebook's kernel runs on)
    with clean_stops(job, logger, started), StopFlag() as stop, progress_bar(show_progress and job.is_main) as bar, \
            contextlib.closing(logger):
        job.logger, job.console = logger, bar.console
        job.seed_everything(resume_from)
        if counters[before_key] is None:
            result = job.evaluate()
            before = eval_scalars(result)
            counters[before_key], counters["eval_before"] = before[score], before
            logger.log(0, {f"eval/{key}": value for key, value in before.items()})
            _log_examples(job, 0, result, "before training")
        if agreed := job.max_over_processes(stop.number):  # during the first evaluation: keep it (checkpoint here)
            _stop(job, start_step, agreed, stop, logger, started)
        if (warmed := job.warm_up(stop)) is not None:  # a signal during it: after it, checkpoint-0 holds it
            counters["last_eval"] = eval_scalars(warmed)[score]  # the progress bar's "eval" from here on
            logger.log(start_step, {f"eval_after_warmup/{key}": value for key, value in eval_scalars(warmed).items()})
            _log_examples(job, start_step, warmed, "after the warm-up")
            if agreed := job.max_over_processes(stop.number):
                _stop(job, start_step, agreed, stop, logger, started)
        task = bar.add_task(job.command, total=job.steps, completed=start_step, status="")
        for step in range(start_step, job.steps):
            metrics = job.step(step)
            done = step + 1
            counters["global_step"] = done
            _count(job, metrics)
            metrics.update(job.after_step(done, metrics))
            if job.eval_every and done % job.eval_every == 0 and done < job.steps:
                try:
                    full = job.evaluate()
                except RewardUnavailable:
                    logger.log(done, metrics)  # the step trained: its record stays (clean_stops checkpoints it)
                    raise
                _log_examples(job, done, full, "evaluation")
                result = eval_scalars(full)
                counters["last_eval"] = result[score]
                metrics.update({f"eval/{key}": value for key, value in result.items()})
                shown = {k: v for k, v in result.items() if "/" not in k}  # per-reward numbers: metrics.jsonl
                bar.console.log(f"step {done}: " + ", ".join(f"eval {k} {v:.3f}" for k, v in shown.items()))
            logger.log(done, metrics)
            shown_eval = counters["last_eval"] if counters["last_eval"] is not None else counters[before_key]
            speed = f" | {metrics['perf/tokens_per_s']:.0f} tok/s" if "perf/tokens_per_s" in metrics else ""
            bar.update(task, completed=done, status=f"{job.status(metrics)} | eval {shown_eval:.3f}{speed}")
            if metrics.get("train/skipped_updates"):
                bar.console.print(f"step {done}: non-finite loss ({metrics.get(job.loss_key)}) or gradient norm "
                                  f"({metrics.get('grad/norm')}); update skipped ({counters['nonfinite_in_a_row']} in a "
                                  f"row, the run stops at {job.max_nonfinite_steps})",
                                  soft_wrap=True, markup=False, highlight=False)
            if counters["nonfinite_in_a_row"] >= job.max_nonfinite_steps:
                logger.close()
                raise NonFiniteError(
                    f"{counters['nonfinite_in_a_row']} consecutive updates had a non-finite loss or gradient (last at "
                    f"step {done}; train.max_nonfinite_steps={job.max_nonfinite_steps}); lower optim.lr, "
                    "set optim.max_grad_norm, check the reward scale, or use mixed_precision 'no'/'bf16' instead of "
                    "'fp16'. The model was not changed by the skipped updates")
            if agreed := job.max_over_processes(stop.number):  # a signal to any process stops all after this step
                _stop(job, done, agreed, stop, logger, started)
            if job.save_every and done % job.save_every == 0 and done < job.steps:
                job.save_checkpoint(done)
        stop.then = "all steps are done: finishing the final evaluation and saving the model"
        final_eval = job.evaluate()
        _log_examples(job, job.steps, final_eval, "after training")
        after = eval_scalars(final_eval)
        logger.log(job.steps, {f"eval/{key}": value for key, value in after.items()})
        logger.close()
        counters["wall_time_s"] += time.perf_counter() - started
        summary = {
            **job.summary({**counters["eval_before"], score: counters[before_key]}, final_eval),
            "steps": job.steps,
            "wall_time_s": round(counters["wall_time_s"], 3),
            "train_time_s": round(counters["train_time_s"], 3),
            "resumed_from_step": start_step if resume_from is not None else None,
            "skipped_updates": counters["skipped_updates"],
            "final_model_dir": str(job.run_dir.path / "final"),
        }
        finish(job, summary)
    return summary


def _count(job: Job, metrics: dict[str, float]) -> None:
    """Add a step to the loop's totals (kept in checkpoints)."""
    counters = job.counters
    skipped = int(metrics.get("train/skipped_updates", 0))
    counters["skipped_updates"] += skipped
    counters["nonfinite_in_a_row"] = counters["nonfinite_in_a_row"] + 1 if skipped and skipped >= metrics.get(
        "optim/updates", 1) else 0
    counters["train_time_s"] += float(metrics.get("perf/step_s", 0.0))


def finish(job: Job, summary: dict[str, Any]) -> None:
    """``checkpoint-<steps>`` first, then ``final/`` and ``summary.json``: if writing ``final/`` fails, the
    trained model is safe in the checkpoint and ``--resume`` writes ``final/`` again."""
    job.counters["global_step"] = job.steps
    path = job.save_checkpoint(job.steps)
    job.gather_final()
    job.barrier()
    if job.is_main:
        try:
            with job.run_dir.staged_dir("final") as staging:
                job.save_final(staging, summary)
            job.run_dir.write_json("summary.json", summary)
        except Exception as error:  # noqa: BLE001 - any failure here must not lose the run
            raise UserError(
                f"training finished but writing {job.run_dir.path / 'final'} failed ({first_line(error)}); the "
                f"trained model is in {path}. Fix the cause (disk space, "
                f"permissions) and run the same command with --resume to write final/ again") from error
    job.barrier()


def _stop(job: Job, done: int, agreed: int, stop: StopFlag, logger: MetricsLogger, started: float):
    """Checkpoint after ``done`` steps and raise ``TrainingInterrupted`` saying how to resume (``agreed``: the
    signal any process received; several processes each raise it)."""
    job.counters["wall_time_s"] += time.perf_counter() - started
    path = job.save_checkpoint(done) or job.run_dir.path / f"checkpoint-{done}"  # (written by the main process)
    logger.close()
    signal_name = signal.Signals(agreed).name
    by = signal_name
    if job.num_processes > 1:
        by += f" (process {job.process_index} of {job.num_processes}{'' if stop.number else ': to another one'})"
    raise TrainingInterrupted(f"stopped by {by} after step {done}; checkpoint written to {path}", str(path),
                              signal_name=signal_name, output_dir=str(job.run_dir.path),
                              hint=f"Resume with: rlhf-pg {job.command} RECIPE --output-dir {job.run_dir.path} --resume")


@contextlib.contextmanager
def clean_stops(job: Job, logger: MetricsLogger, started: float):
    """Stop cleanly on what the run cannot go on from (exit 75, ``--resume`` continues):

    - ``RewardUnavailable`` (a reward source that stayed unreachable, ``on_error: fail``): the step in progress
      did not train. A single process checkpoints its last completed step (``global_step``) first; several
      processes keep their last checkpoint (the others may wait in a collective: no checkpoint without them).
    - a collective that failed because another process died or hangs (``accel.collective_failure``): ``PeerLost``
      naming this process, the error and the last checkpoint, instead of the backend's traceback.
    """
    try:
        yield
    except RewardUnavailable as error:
        done = int(job.counters["global_step"])
        if job.num_processes > 1:
            kept = ckpt.latest_checkpoint(job.run_dir.path)
            where = f"the last checkpoint ({kept or 'none yet'}) is intact"
        else:
            path = job.run_dir.path / f"checkpoint-{done}"
            if not path.is_dir():
                job.counters["wall_time_s"] += time.perf_counter() - started
                path = job.save_checkpoint(done)
            where = f"checkpoint: {path}"
        logger.close()
        raise RewardUnavailable(f"{error}. The run stopped after step {done} ({where}); --resume continues from "
                                "there once the source is back.") from None
    except Exception as error:
        if job.num_processes == 1 or isinstance(error, UserError) or not collective_failure(error):
            raise
        logger.close()
        kept = ckpt.latest_checkpoint(job.run_dir.path)
        raise PeerLost(
            f"process {job.process_index} of {job.num_processes} stopped at step {job.counters['global_step']}: a "
            f"collective operation with the other processes failed ({first_line(error)[:300]}); another process died "
            "or hangs (see its log; a hung process is waited for train.distributed_timeout_s). The last checkpoint "
            f"({kept or 'none yet'}) is intact: fix the cause, then resume.") from error
