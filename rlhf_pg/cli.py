"""Command line: parse the arguments, run the command's row of ``COMMANDS``, print its outcome. A ``UserError``
becomes one clear message and its exit code (2: bad input; 75: resumable, the message ends with the resume
command); an interrupted run, its checkpoint and the resume command (exit 130 after SIGINT, 75 after SIGTERM).

    rlhf-pg train RECIPE [--output-dir DIR] [--max-steps N] [--seed S] [--resume] [--overwrite] [key=value ...]
    rlhf-pg eval RECIPE [--model DIR] [key=value ...]
    rlhf-pg sft RECIPE [--output-dir DIR] [--max-steps N] [--seed S] [--resume] [--overwrite] [key=value ...]
    rlhf-pg compare RECIPE [--output-dir DIR] [--max-steps N] [--seed S] [--overwrite] [key=value ...]
    rlhf-pg reward-model RECIPE [--output-dir DIR] [--seed S] [--resume] [--overwrite] [key=value ...]
    rlhf-pg report DIR [DIR ...] [--output-dir OUT] [--gold NAME] [--smooth N]
    rlhf-pg plot DIR [DIR ...] [--output-dir OUT]
    rlhf-pg gym RECIPE [--output-dir DIR] [--seed S] [--max-steps N] [--resume] [--overwrite] [key=value ...]
    rlhf-pg variance RECIPE [--output-dir DIR] [--policy DIR] [--batches N] [--reference-batches M] [--presets] [--overwrite] [key=value ...]
    rlhf-pg doctor RECIPE [--prompts N] [--time-budget S] [--seed S] [key=value ...]
    rlhf-pg build-base [--force]

``key=value`` words (recipe overrides such as ``optim.lr=5e-4``) may appear anywhere after the command.
Each command is a row of ``COMMANDS``: how it loads its recipe, runs, and names its default output dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import EXIT_RESUMABLE, DoctorFoundProblems, TrainingInterrupted, UserError

EXIT_INTERRUPTED = 130  # 128 + SIGINT: a person's Ctrl-C, as shells expect; a SIGTERM stop exits with EXIT_RESUMABLE


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a UserError (exit 2, one message)."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path of a YAML recipe, e.g. recipes/quickstart.yaml")
    parser.add_argument("--output-dir", help="where the run is written (default: the recipe's output_dir or runs/<recipe name>)")
    parser.add_argument("--max-steps", type=_positive_int, help="override train.steps")
    parser.add_argument("--seed", type=_int, help="override the recipe's seed")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe (presets and "
                        "overrides applied, every default filled in) as YAML and exit")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlhf-pg", description="Policy-gradient fine-tuning of causal language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="REINFORCE fine-tuning from a recipe")
    _add_run_arguments(train)
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    train.add_argument("--overwrite", action="store_true", help="replace a run already in the output dir")

    evaluate = commands.add_parser("eval", help="evaluate a model on a recipe's held-out prompts")
    evaluate.add_argument("recipe", help="path of a YAML recipe")
    evaluate.add_argument("--model", help="model directory (default: the recipe's model), e.g. runs/quickstart/final")
    evaluate.add_argument("--seed", type=_int, help="override the recipe's seed")

    sft = commands.add_parser("sft", help="maximum-likelihood fine-tuning on prompt/completion pairs")
    _add_run_arguments(sft)
    sft.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    sft.add_argument("--overwrite", action="store_true", help="replace a run already in the output dir")

    compare = commands.add_parser("compare", help="SFT on demonstrations vs REINFORCE from the same model, same budget")
    _add_run_arguments(compare)
    compare.add_argument("--overwrite", action="store_true", help="replace a comparison already in the output dir")

    reward = commands.add_parser("reward-model", help="train a Bradley-Terry reward model on preference pairs")
    reward.add_argument("recipe", help="path of a YAML reward-model recipe, e.g. recipes/reward_model.yaml")
    reward.add_argument("--output-dir", help="where the run is written (default: the recipe's output_dir or runs/<recipe name>)")
    reward.add_argument("--seed", type=_int, help="override the recipe's seed")
    reward.add_argument("--print-recipe", action="store_true", help="print the resolved recipe as YAML and exit")
    reward.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    reward.add_argument("--overwrite", action="store_true", help="replace a run already in the output dir")

    report = commands.add_parser("report", help="plot proxy and gold reward against KL from metrics.jsonl (PNG)")
    report.add_argument("runs", nargs="+", metavar="DIR", help="run directories (each with metrics.jsonl and recipe.yaml)")
    report.add_argument("--output-dir", help="where the PNGs go (default: DIR for one run, else the runs' common parent)")
    report.add_argument("--gold", action="append", help="monitored reward name(s) to plot as gold (default: the "
                        "rewards with weight 0)")
    report.add_argument("--smooth", type=_positive_int, default=10, help="moving-average window, in steps (default 10)")

    plot = commands.add_parser("plot", help="PNG curves of reward, held-out reward, KL, length and entropy of runs")
    plot.add_argument("runs", nargs="+", metavar="DIR", help="run directories (each with metrics.jsonl)")
    plot.add_argument("--output-dir", help="where the PNGs go (default: DIR/plots for one run, else plots/ in the runs' "
                      "common parent)")

    gym = commands.add_parser("gym", help="REINFORCE on a gymnasium environment (the toy track)")
    _add_run_arguments(gym)
    gym.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    gym.add_argument("--overwrite", action="store_true", help="replace a run already in the output dir")

    variance = commands.add_parser("variance", help="measure the variance of gradient estimators at fixed parameters")
    variance.add_argument("recipe", help="a gym recipe (recipes/gym/cartpole.yaml) or an LM recipe (recipes/quickstart.yaml)")
    variance.add_argument("--output-dir", help="where report.md, variance.png and variance.json go "
                          "(default: runs/variance-<recipe name>)")
    variance.add_argument("--policy", help="fixed parameters to measure at: a gym run's final/ (or checkpoint) directory, "
                          "or an LM model directory (default: the recipe's initial policy)")
    variance.add_argument("--batches", type=_positive_int, help="independent batches per estimator (default: 200 gym, 50 LM)")
    variance.add_argument("--reference-batches", type=_positive_int,
                          help="batches averaged into the reference gradient (default: 1000 gym, 200 LM)")
    variance.add_argument("--seed", type=_int, help="override the recipe's seed")
    variance.add_argument("--overwrite", action="store_true", help="replace a measurement already in the output dir")
    variance.add_argument("--presets", action="store_true", help="also a row per algorithm preset (grpo, rloo, ...)")

    doctor = commands.add_parser("doctor", help="preflight in about a minute: load, render a prompt, sample and score "
                                 "one batch; exit 1 when the run would be wasted")
    doctor.add_argument("recipe", help="path of a YAML recipe, e.g. recipes/quickstart.yaml")
    doctor.add_argument("--prompts", type=_positive_int, help="sample this many of the first step's prompts "
                        "(default: as many of rollout.prompts_per_step as --time-budget allows)")
    doctor.add_argument("--time-budget", type=_positive_int, default=30, metavar="S",
                        help="seconds of sampling when --prompts is not given (default 30)")
    doctor.add_argument("--seed", type=_int, help="override the recipe's seed")

    build = commands.add_parser("build-base", help="build (or rebuild) the built-in arith-gpt base model")
    build.add_argument("--force", action="store_true", help="rebuild even if it is cached")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; ``key=value`` words anywhere after the command are recipe overrides."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [word for word in extra if "=" in word and not word.startswith("-")]
    unknown = [word for word in extra if word not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides and args.command not in ("train", "eval", "sft", "compare", "reward-model", "gym", "variance", "doctor"):
        parser.error(f"{args.command} takes no key=value overrides (got {' '.join(overrides)})")
    args.overrides = overrides
    return args


# --- the command table: name -> (load the recipe, run, default output dir, what to print) -------------


def _overrides(args) -> list[str]:
    """The ``key=value`` words plus what --max-steps / --seed mean as overrides."""
    overrides = list(args.overrides)
    if getattr(args, "max_steps", None) is not None:
        overrides.append(f"train.steps={args.max_steps}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    return overrides


def _lm_recipe(args):
    from .api import resolve_recipe

    return resolve_recipe(args.recipe, overrides=_overrides(args))


def _gym_recipe(args):
    from .gym.config import load_gym_recipe

    return load_gym_recipe(args.recipe, _overrides(args))


def _reward_model_recipe(args):
    from reward_models.config import load_reward_model_recipe

    return load_reward_model_recipe(args.recipe, _overrides(args))


def _output_dir(args, recipe, default: str) -> Path:
    """--output-dir, else the recipe's output_dir, else ``runs/<default>``."""
    if getattr(args, "output_dir", None):
        return Path(args.output_dir)
    if getattr(recipe, "output_dir", None):
        return Path(recipe.output_dir)
    return Path("runs") / default


def _train(args, recipe, output_dir):
    from .api import train

    return train(recipe, output_dir=output_dir, resume=args.resume, overwrite=args.overwrite,
                 progress=not args.no_progress).summary


def _sft(args, recipe, output_dir):
    from .api import sft

    return sft(recipe, output_dir=output_dir, resume=args.resume, overwrite=args.overwrite,
               progress=not args.no_progress).summary


def _eval(args, recipe, output_dir):
    from .api import evaluate

    return evaluate(args.model, recipe)


def _compare(args, recipe, output_dir):
    from .lab.compare import compare

    summary = compare(recipe, output_dir, overwrite=args.overwrite, show_progress=not args.no_progress)
    return {**summary, "report": str(output_dir / "report.md")}


def _reward_model(args, recipe, output_dir):
    from reward_models.bradley_terry import train_reward_model

    return train_reward_model(recipe, output_dir, resume=args.resume, overwrite=args.overwrite,
                              show_progress=not args.no_progress)


def _gym(args, recipe, output_dir):
    from .gym import train_gym

    return train_gym(recipe, output_dir, resume=args.resume, overwrite=args.overwrite, show_progress=not args.no_progress)


def _variance(args, recipe, output_dir):
    from .lab.variance import run_variance_lab

    run_variance_lab(args.recipe, output_dir, _overrides(args), policy=args.policy, batches=args.batches,
                     reference_batches=args.reference_batches, overwrite=args.overwrite, presets=args.presets,
                     show_progress=not args.no_progress)
    return (output_dir / "report.md").read_text()


def _report(args, recipe, output_dir):
    from .lab.report import write_report

    return "\n".join(str(path) for path in write_report(args.runs, args.output_dir, gold=args.gold, smooth=args.smooth))


def _plot(args, recipe, output_dir):
    from .lab.plot import plot_runs

    return "\n".join(str(path) for path in plot_runs(args.runs, args.output_dir))


def _build_base(args, recipe, output_dir):
    from .models.builtin import builtin_path

    return str(builtin_path("arith-gpt", progress=not args.no_progress, force=args.force))


def _doctor(args, recipe, output_dir):
    from .api import doctor

    diagnosis = doctor(recipe, prompts=args.prompts, time_budget_s=args.time_budget)
    if diagnosis.problems:
        print(diagnosis.verdict())
        raise DoctorFoundProblems(len(diagnosis.problems))  # exit code 1
    return diagnosis.verdict()


def _stem(args) -> str:
    return Path(args.recipe).stem


@dataclass(frozen=True)
class Command:
    """One CLI command: how to load its recipe (None: it takes none), run it, and name its default output dir."""

    run: Callable[..., Any]
    load: Callable[[argparse.Namespace], Any] | None = None
    default_dir: Callable[[argparse.Namespace, Any], str] | None = None
    show_examples: bool = False  # print the result's "examples" too


COMMANDS: dict[str, Command] = {
    "train": Command(_train, _lm_recipe, lambda args, recipe: _stem(args)),
    "sft": Command(_sft, _lm_recipe, lambda args, recipe: _stem(args)),
    "eval": Command(_eval, _lm_recipe, show_examples=True),
    "compare": Command(_compare, _lm_recipe, lambda args, recipe: _stem(args)),
    "reward-model": Command(_reward_model, _reward_model_recipe, lambda args, recipe: _stem(args)),
    "gym": Command(_gym, _gym_recipe, lambda args, recipe: f"{_stem(args)}-seed{recipe.seed}"),
    "variance": Command(_variance, None, lambda args, recipe: f"variance-{_stem(args)}"),
    "report": Command(_report),
    "plot": Command(_plot),
    "build-base": Command(_build_base),
    "doctor": Command(_doctor, _lm_recipe),
}


def _run(args) -> int:
    """Look the command up, load its recipe, run it, print its result (JSON for a summary, else text)."""
    command = COMMANDS.get(args.command)
    if command is None:
        raise UserError(f"unknown command {args.command!r}; choose one of {', '.join(COMMANDS)}")
    recipe = command.load(args) if command.load is not None else None
    if getattr(args, "print_recipe", False):
        import yaml

        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="")
        return 0
    output_dir = _output_dir(args, recipe, command.default_dir(args, recipe)) if command.default_dir else None
    result = command.run(args, recipe, output_dir)
    if int(os.environ.get("RANK", "0") or 0) != 0:  # under accelerate launch: the summary once, from the main process
        return 0
    if isinstance(result, dict):
        print(json.dumps({k: v for k, v in result.items() if command.show_examples or k != "examples"}, indent=2))
    else:
        print(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or bool(os.environ.get("RLHF_PG_DEBUG"))
    try:
        args = parse_args(argv)
        return _run(args)
    except UserError as error:
        if debug:
            raise
        resume = f" {_resume_hint(argv)}" if error.exit_code == EXIT_RESUMABLE else ""
        print(f"error: {error}{resume}", file=sys.stderr)
        return error.exit_code
    except DoctorFoundProblems as found:
        return found.code
    except TrainingInterrupted as interrupted:
        print(f"interrupted: {interrupted.reason}. {_resume_hint(argv)}", file=sys.stderr)
        return EXIT_INTERRUPTED if interrupted.signal_name in (None, "SIGINT") else EXIT_RESUMABLE
    except KeyboardInterrupt:
        hint = (f"; the run's earlier checkpoints (if any) are intact and --resume continues from the latest: "
                f"{resume_command(argv)}") if "train" in argv else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _resume_hint(argv: list[str]) -> str:
    """``Resume with: <command>`` (several processes: under the same launcher)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"Resume with the same launcher (accelerate launch, torchrun, srun ...) running: {resume_command(argv)}"
    return f"Resume with: {resume_command(argv)}"


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same words, without --overwrite, with --resume."""
    words = [word for word in argv if word != "--overwrite"]
    if "--resume" not in words:
        words.append("--resume")
    return shlex.join(["rlhf-pg", *words])


if __name__ == "__main__":
    sys.exit(main())
