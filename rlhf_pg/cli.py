"""Command line: argument parsing only. Errors become one clear message and exit code 2.

    rlhf-pg train RECIPE [--output-dir DIR] [--max-steps N] [--seed S] [--resume] [--overwrite] [key=value ...]
    rlhf-pg eval RECIPE [--model DIR] [key=value ...]
    rlhf-pg sft RECIPE [--output-dir DIR] [--max-steps N] [--seed S] [--resume] [--overwrite] [key=value ...]
    rlhf-pg compare RECIPE [--output-dir DIR] [--max-steps N] [--seed S] [--overwrite] [key=value ...]
    rlhf-pg reward-model RECIPE [--output-dir DIR] [--seed S] [--overwrite] [key=value ...]
    rlhf-pg report DIR [DIR ...] [--output-dir OUT] [--gold NAME] [--smooth N]
    rlhf-pg gym RECIPE [--output-dir DIR] [--seed S] [--max-steps N] [--overwrite] [key=value ...]
    rlhf-pg variance RECIPE [--output-dir DIR] [--policy DIR] [--batches N] [--reference-batches M] [key=value ...]
    rlhf-pg build-base [--force]

``key=value`` words (recipe overrides such as ``optim.lr=5e-4``) may appear anywhere after the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
from pathlib import Path

from .errors import TrainingInterrupted, UserError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT; a stop by SIGTERM exits with 143 (128 + SIGTERM), as shells expect


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
    reward.add_argument("--overwrite", action="store_true", help="replace a run already in the output dir")

    report = commands.add_parser("report", help="plot proxy and gold reward against KL from metrics.jsonl (PNG)")
    report.add_argument("runs", nargs="+", metavar="DIR", help="run directories (each with metrics.jsonl and recipe.yaml)")
    report.add_argument("--output-dir", help="where the PNGs go (default: DIR for one run, else the runs' common parent)")
    report.add_argument("--gold", action="append", help="monitored reward name(s) to plot as gold (default: the "
                        "rewards with weight 0)")
    report.add_argument("--smooth", type=_positive_int, default=10, help="moving-average window, in steps (default 10)")

    gym = commands.add_parser("gym", help="REINFORCE on a gymnasium environment (the toy track)")
    _add_run_arguments(gym)
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
    if overrides and args.command not in ("train", "eval", "sft", "compare", "reward-model", "gym", "variance"):
        parser.error(f"{args.command} takes no key=value overrides (got {' '.join(overrides)})")
    args.overrides = overrides
    return args


def _recipe(args):
    from .config import load_recipe

    overrides = list(args.overrides)
    if getattr(args, "max_steps", None) is not None:
        overrides.append(f"train.steps={args.max_steps}")
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    return load_recipe(args.recipe, overrides)


def _output_dir(args, recipe) -> Path:
    if getattr(args, "output_dir", None):
        return Path(args.output_dir)
    if recipe.output_dir:
        return Path(recipe.output_dir)
    return Path("runs") / Path(args.recipe).stem


def _run(args) -> int:
    if args.command == "train":
        from .trainer import train

        recipe = _recipe(args)
        summary = train(recipe, _output_dir(args, recipe), resume=args.resume, overwrite=args.overwrite,
                        show_progress=not args.no_progress)
        shown = {k: v for k, v in summary.items() if k != "examples"}
        print(json.dumps(shown, indent=2))
        return 0
    if args.command == "eval":
        from .trainer import evaluate_model

        result = evaluate_model(_recipe(args), args.model)
        print(json.dumps(result, indent=2))
        return 0
    if args.command == "sft":
        from .sft import train_sft

        recipe = _recipe(args)
        summary = train_sft(recipe, _output_dir(args, recipe), resume=args.resume, overwrite=args.overwrite,
                            show_progress=not args.no_progress)
        print(json.dumps({k: v for k, v in summary.items() if k != "examples"}, indent=2))
        return 0
    if args.command == "compare":
        from .lab.compare import compare

        recipe = _recipe(args)
        output_dir = _output_dir(args, recipe)
        summary = compare(recipe, output_dir, overwrite=args.overwrite, show_progress=not args.no_progress)
        print(json.dumps(summary, indent=2))
        print(f"report: {output_dir / 'report.md'}")
        return 0
    if args.command == "reward-model":
        from reward_models.bradley_terry import train_reward_model

        from .config import load_reward_model_recipe

        overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
        recipe = load_reward_model_recipe(args.recipe, overrides)
        summary = train_reward_model(recipe, _output_dir(args, recipe), overwrite=args.overwrite,
                                     show_progress=not args.no_progress)
        print(json.dumps(summary, indent=2))
        return 0
    if args.command == "report":
        from .lab.report import write_report

        for path in write_report(args.runs, args.output_dir, gold=args.gold, smooth=args.smooth):
            print(path)

    if args.command == "gym":
        from .config import load_gym_recipe
        from .gym import train_gym

        overrides = list(args.overrides)
        if args.max_steps is not None:
            overrides.append(f"train.steps={args.max_steps}")
        if args.seed is not None:
            overrides.append(f"seed={args.seed}")
        recipe = load_gym_recipe(args.recipe, overrides)
        output_dir = Path(args.output_dir or recipe.output_dir or Path("runs") / f"{Path(args.recipe).stem}-seed{recipe.seed}")
        summary = train_gym(recipe, output_dir, overwrite=args.overwrite, show_progress=not args.no_progress)
        print(json.dumps(summary, indent=2))
        return 0
    if args.command == "variance":
        from .lab.variance import run_variance_lab

        overrides = list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else [])
        output_dir = Path(args.output_dir or Path("runs") / f"variance-{Path(args.recipe).stem}")
        run_variance_lab(args.recipe, output_dir, overrides, policy=args.policy, batches=args.batches,
                         reference_batches=args.reference_batches, show_progress=not args.no_progress)
        print((output_dir / "report.md").read_text())
        return 0
    if args.command == "build-base":
        from .builtin import builtin_path

        print(builtin_path("arith-gpt", progress=not args.no_progress, force=args.force))
        return 0
    raise UserError(f"unknown command {args.command!r}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or bool(os.environ.get("RLHF_PG_DEBUG"))
    try:
        args = parse_args(argv)
        return _run(args)
    except UserError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingInterrupted as interrupted:
        print(f"interrupted: {interrupted.reason}. Resume with: {resume_command(argv)}", file=sys.stderr)
        number = getattr(signal.Signals, interrupted.signal_name or "SIGINT", signal.SIGINT)
        return 128 + int(number)
    except KeyboardInterrupt:
        hint = (f"; the run's earlier checkpoints (if any) are intact and --resume continues from the latest: "
                f"{resume_command(argv)}") if "train" in argv else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same words, without --overwrite, with --resume."""
    words = [word for word in argv if word != "--overwrite"]
    if "--resume" not in words:
        words.append("--resume")
    return shlex.join(["rlhf-pg", *words])


if __name__ == "__main__":
    sys.exit(main())
