"""Where does a training step's memory go? Peak RSS per phase of ``train_step``, one process per variant.

    HF_HUB_OFFLINE=1 python benchmarks/memory_profile.py                      # 135M, vs_trl.py --model's settings
    HF_HUB_OFFLINE=1 python benchmarks/memory_profile.py --variant micro8 train.micro_batch_size=8 \\
        --variant checkpointing train.gradient_checkpointing=true
    HF_HUB_OFFLINE=1 python benchmarks/memory_profile.py --model builtin:arith-gpt --steps 2   # a quick smoke run

The setting is ``vs_trl.py --model``'s (8 chat prompts x 4, exactly 64 new tokens, digit_fraction, group-mean
baseline, lr 1e-6, fp32, 2 threads; ``--kl-coef 0.04`` adds the reference model and the k3 KL loss term).
Every variant (``--variant NAME KEY=VALUE ...``: recipe overrides; ``default`` = none) runs in its own
subprocess, so that RSS is per variant. A thread reads ``VmRSS`` from ``/proc/self/status`` every
``--interval-ms`` and charges it to the phase running then:

    setup      loading the model, the optimizer, the kernel choice        (before the first step)
    sampling   the rollout and the rewards                               (trainer.sample_step)
    reference  log pi_ref of the batch                                   (trainer.reference_logprobs)
    forward    the update's teacher-forced log-probs                     (policy.update.completion_logprobs,
                                                                          and the micro-batches' PromptPass)
    backward   the loss's backward                                       (accelerator.backward, PromptPass.backward)
    optimizer  clipping and the AdamW step                               (policy.update._optimizer_step)
    other      advantages, metrics, the sampler's weight sync

Per phase: the highest RSS seen in it over the measured steps (``peak``), and RSS when it started (``start``);
``step_s`` is the median measured step time. ``ru_maxrss`` (the process's peak, as vs_trl.py reports it) is
printed beside, with the peak ``rlhf_pg.run.memory`` estimated for the run before its first step. RSS is a process's resident memory: glibc keeps freed blocks, so a phase's ``start`` includes
what earlier phases freed but the allocator did not return.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("setup", "sampling", "reference", "forward", "backward", "optimizer", "other")


def rss_bytes() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PhaseMeter:
    """Peak and starting RSS per phase, sampled by a daemon thread."""

    def __init__(self, interval_s: float):
        self.phase, self.interval_s = "setup", interval_s
        self.peak = {name: 0 for name in PHASES}
        self.start: dict[str, int] = {"setup": rss_bytes()}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.stopped.is_set():
            current, phase = rss_bytes(), self.phase
            self.peak[phase] = max(self.peak[phase], current)
            time.sleep(self.interval_s)

    @contextmanager
    def inside(self, phase: str):
        outer, self.phase = self.phase, phase
        now = rss_bytes()
        self.peak[phase] = max(self.peak[phase], now)
        self.start.setdefault(phase, now)
        try:
            yield
        finally:
            self.peak[phase] = max(self.peak[phase], rss_bytes())
            self.phase = outer

    def wrap(self, phase: str, function):
        def wrapper(*args, **kwargs):
            with self.inside(phase):
                return function(*args, **kwargs)

        return wrapper

    def reset(self) -> None:
        """Forget what the warm-up steps saw (``setup`` is kept)."""
        self.peak = {name: (value if name == "setup" else 0) for name, value in self.peak.items()}
        self.start = {name: value for name, value in self.start.items() if name == "setup"}


def recipe_for(model: str, kl_coef: float, steps: int, overrides: list[str]):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from reward_models import register_reward
    from vs_trl import THREADS, digit_fraction

    from rlhf_pg.recipe import apply_overrides, recipe_from_dict

    register_reward("digit_fraction")(digit_fraction)
    chat = not model.startswith("builtin:arith")
    new_tokens = 64 if chat else 32
    data = {
        "model": {"name_or_path": model},
        "data": {"task": "arithmetic", "prompt_format": "chat" if chat else "text", "min_operand": 10,
                 "max_operand": 99, "num_eval": 200},
        "rewards": [{"name": "digit_fraction"}],
        "rollout": {"prompts_per_step": 8, "completions_per_prompt": 4, "max_new_tokens": new_tokens,
                    "min_new_tokens": new_tokens, "temperature": 1.0, "top_p": 1.0},
        "algorithm": {"baseline": "group_mean", "kl_coef": kl_coef, "kl_mode": "loss", "kl_estimator": "k3"},
        "optim": {"lr": 1e-6, "max_grad_norm": 1.0},
        "train": {"steps": steps, "tensorboard": False, "num_threads": THREADS, "log_completions_every": 0},
    }
    return recipe_from_dict(apply_overrides(data, overrides))


def record_estimates() -> list:
    """From now on, every ``rlhf_pg.run.memory`` estimate made by ``train``'s memory check (``check_run_memory`` calls
    ``check_fits``) is appended to the returned list: what ``rlhf-pg doctor`` prints for the run."""
    import rlhf_pg.run.memory as memory

    estimates, check_fits = [], memory.check_fits

    def recording(shape, *rest, **options):
        estimates.append(memory.memory_estimate(shape))
        return check_fits(shape, *rest, **options)

    memory.check_fits = recording
    return estimates


def worker(args) -> dict:
    """One variant in this process: setup, ``--warmup-steps`` unmeasured steps, ``--steps`` measured ones."""
    meter = PhaseMeter(args.interval_ms / 1000)
    import rlhf_pg.policy.update as update
    import rlhf_pg.trainer as trainer

    estimates = record_estimates()

    recipe = recipe_for(args.model, args.kl_coef, args.warmup_steps + args.steps, args.overrides)
    trainer.sample_step = meter.wrap("sampling", trainer.sample_step)
    trainer.reference_logprobs = meter.wrap("reference", trainer.reference_logprobs)
    update.completion_logprobs = meter.wrap("forward", update.completion_logprobs)

    class MeteredPromptPass(update.PromptPass):  # the shared prompt pass of the micro-batches: forward and backward
        def __init__(self, *args, **kwargs):
            with meter.inside("forward"):
                super().__init__(*args, **kwargs)

        def backward(self):
            with meter.inside("backward"):
                super().backward()

    update.PromptPass = MeteredPromptPass
    update._optimizer_step = meter.wrap("optimizer", update._optimizer_step)
    run, _ = trainer.setup(recipe, tempfile.mkdtemp())
    run.accelerator.backward = meter.wrap("backward", run.accelerator.backward)
    times = []
    for step in range(args.warmup_steps + args.steps):
        if step == args.warmup_steps:
            meter.reset()
        meter.phase = "other"
        started = time.perf_counter()
        trainer.train_step(run, step)
        times.append(time.perf_counter() - started)
    meter.stopped.set()
    measured = times[args.warmup_steps:]
    estimate = estimates[0] if estimates else None
    return {"peak": meter.peak, "start": meter.start, "step_s": statistics.median(measured), "times": times,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "estimate": estimate.peak if estimate else None,
            "estimate_parts": {name: size for name, (size, _) in estimate.parts.items()} if estimate else {}}


def gib(value: int) -> str:
    return f"{value / 2**30:5.2f}" if value else "    -"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--kl-coef", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=2, help="measured steps")
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--interval-ms", type=float, default=5.0)
    parser.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "KEY=VALUE"),
                        help="a named set of recipe overrides (repeatable; default: one variant 'default')")
    parser.add_argument("--output", help="also write the figures as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    results = {}
    for name, *overrides in args.variant or [["default"]]:
        command = [sys.executable, __file__, "--worker", "--model", args.model, "--kl-coef", str(args.kl_coef),
                   "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
                   "--interval-ms", str(args.interval_ms), *overrides]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        output = subprocess.run(command, capture_output=True, text=True, env=env)
        lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
        if output.returncode != 0 or not lines:
            raise SystemExit(f"variant {name} failed:\n{output.stderr[-4000:]}")
        results[name] = {"overrides": overrides, **json.loads(lines[-1][len("RESULT "):])}
        result = results[name]
        estimated = (f", estimated {gib(result['estimate'])} GiB ({result['estimate'] / result['ru_maxrss']:.2f}x)"
                     if result["estimate"] else "")
        print(f"\n{name} ({' '.join(overrides) or 'recipe defaults'}): {result['step_s']:.2f} s/step, "
              f"ru_maxrss {gib(result['ru_maxrss'])} GiB{estimated}", flush=True)
        print(f"  {'phase':10s} {'start GiB':>10s} {'peak GiB':>9s}")
        for phase in PHASES:
            print(f"  {phase:10s} {gib(result['start'].get(phase, 0)):>10s} {gib(result['peak'][phase]):>9s}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
