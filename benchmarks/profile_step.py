"""Where does one rlhf-pg training step spend its time? Phase timings and a torch.profiler table.

    HF_HUB_OFFLINE=1 python benchmarks/profile_step.py                  # the throughput settings
    HF_HUB_OFFLINE=1 python benchmarks/profile_step.py --quickstart     # recipes/quickstart.yaml
    HF_HUB_OFFLINE=1 python benchmarks/profile_step.py --hf-decoder     # transformers' forward for decoding
    HF_HUB_OFFLINE=1 python benchmarks/profile_step.py --model builtin:smollm2-135m-instruct --steps 4
        # a real model at vs_trl.py --model's settings: 8 chat prompts x 4, exactly 64 new tokens

Phases: rollout (sampling), reward, update (forward + backward + optimizer), rest (advantages,
metrics). The profiler table lists the operators with the most self CPU time over a few steps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

import rlhf_pg.trainer as trainer
from rlhf_pg.recipe import load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]


def timed(phases, name, function):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            phases[name].append(time.perf_counter() - started)

    return wrapper


class TimedScorer:
    """The run's scorer, its calls timed as the "reward" phase (its other attributes passed through)."""

    def __init__(self, phases, scorer):
        self._call, self._scorer = timed(phases, "reward", scorer), scorer

    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._scorer, name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quickstart", action="store_true", help="profile recipes/quickstart.yaml's step")
    parser.add_argument("--hf-decoder", action="store_true", help="decode with transformers' forward + DynamicCache")
    parser.add_argument("--model", help="profile this model at vs_trl.py --model's settings (chat prompts, 8 x 4, 64 tokens)")
    parser.add_argument("--kl-coef", type=float, default=0.0, help="with --model: beta (> 0 loads a reference model)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="with --model: train.micro_batch_size "
                        "(vs_trl.py --model uses 4)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler after the timed ones")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        from reward_models import register_reward
        from vs_trl import digit_fraction

        register_reward("digit_fraction")(digit_fraction)
        recipe = recipe_from_dict({
            "model": args.model, "data": {"task": "arithmetic", "prompt_format": "chat", "min_operand": 10},
            "rewards": [{"name": "digit_fraction"}],
            "rollout": {"prompts_per_step": 8, "completions_per_prompt": 4, "max_new_tokens": 64, "min_new_tokens": 64},
            "algorithm": {"baseline": "group_mean", "kl_coef": args.kl_coef}, "optim": {"lr": 1e-6},
            "train": {"tensorboard": False, "log_completions_every": 0, "mixed_precision": "no",
                      "micro_batch_size": args.micro_batch_size},
        })
    elif args.quickstart:
        recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", ["train.tensorboard=false"])
    else:
        from reward_models import register_reward
        from vs_trl import digit_fraction  # the throughput benchmark's dense reward (benchmarks/vs_trl.py)

        register_reward("digit_fraction")(digit_fraction)
        recipe = recipe_from_dict({
            "rewards": [{"name": "digit_fraction"}],
            "rollout": {"prompts_per_step": 16, "completions_per_prompt": 4, "max_new_tokens": 32, "min_new_tokens": 32},
            "algorithm": {"baseline": "group_mean"}, "optim": {"lr": 1e-4}, "train": {"tensorboard": False},
        })
    phases: dict[str, list[float]] = defaultdict(list)
    trainer.policy_update = timed(phases, "update", trainer.policy_update)
    run, _ = trainer.setup(recipe, tempfile.mkdtemp())
    if args.hf_decoder:
        run.sampler.lean = False  # the built-in engine with transformers' own forward
    run.sampler.sample = timed(phases, "rollout", run.sampler.sample)
    run.scorer = TimedScorer(phases, run.scorer)
    totals = []
    for step in range(args.steps):
        started = time.perf_counter()
        trainer.train_step(run, step)
        totals.append(time.perf_counter() - started)
    warm = slice(2 if args.steps > 3 else 1, None)
    step_time = statistics.median(totals[warm])
    print(f"median step {step_time * 1000:.1f} ms over {len(totals[warm])} steps (after {warm.start} warm-up steps)")
    accounted = 0.0
    for name in ("rollout", "reward", "update"):
        value = statistics.median(phases[name][warm])
        accounted += value
        print(f"  {name:8s} {value * 1000:7.1f} ms  {100 * value / step_time:5.1f} %")
    print(f"  {'rest':8s} {(step_time - accounted) * 1000:7.1f} ms  {100 * (step_time - accounted) / step_time:5.1f} %")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for step in range(args.steps, args.steps + args.profile_steps):
            trainer.train_step(run, step)
    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


if __name__ == "__main__":
    main()
