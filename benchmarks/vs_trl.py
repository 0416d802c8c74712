"""rlhf-pg vs TRL's GRPOTrainer vs a naive loop, side by side in one run.

    pip install -e '.[bench]'          # trl, psutil
    HF_HUB_OFFLINE=1 python benchmarks/vs_trl.py                 # both parts (~10 min on 2 cores)
    HF_HUB_OFFLINE=1 python benchmarks/vs_trl.py --part throughput --rounds 3
    HF_HUB_OFFLINE=1 python benchmarks/vs_trl.py --part target --trl-lrs 3e-4 5e-4 1e-3
    HF_HUB_OFFLINE=1 python benchmarks/vs_trl.py --model builtin:smollm2-135m-instruct   # real_model.py
    HF_HUB_OFFLINE=1 python benchmarks/vs_trl.py --sizes --plot        # over model sizes: model_sizes.py

Every measurement runs in its own subprocess (so peak RSS is per contender), on the same locally
built model (builtin:arith-gpt, 0.8M-parameter GPT-2), tokenizer, prompts, reward and threads
(``BENCH_THREADS``, default 2: torch threads in every contender).

Throughput at equal settings: B = 64 completions (16 prompts x 4), exactly 32 new tokens
(min_new_tokens = max_new_tokens = 32), no reference model, lr 1e-4, fp32, no gradient
checkpointing, reward = fraction of digits in the completion (see ``digit_fraction``); warm-up steps
excluded; the contenders are interleaved (ours, TRL, naive, ours, ...) and medians reported.

Time to target: wall time of training (evaluation excluded) until held-out greedy accuracy >= 0.9,
with the same evaluation (500 held-out problems, greedy) every K steps, for rlhf-pg's quickstart
recipe and for TRL GRPOTrainer (a small learning-rate sweep; the best is compared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import real_model  # --model and --sizes (benchmarks/real_model.py)
import real_target  # --part target-real (benchmarks/real_target.py)

ROOT = Path(__file__).resolve().parents[1]
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
STEPS_WARMUP, STEPS_MEASURED = 2, 6


# --- shared pieces ---------------------------------------------------------------------------------


def _setup_torch():
    import torch

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    return torch


def _model_path() -> str:
    from rlhf_pg.models.builtin import builtin_path

    return str(builtin_path("arith-gpt", progress=False))


def _arithmetic_data(num_eval: int = 500):
    from rlhf_pg.recipe import DataConfig
    from rlhf_pg.data import load_prompt_datasets

    return load_prompt_datasets(DataConfig(num_eval=num_eval))


def _peak_rss_mb() -> float:
    """This process's peak RSS: ``VmHWM`` (its own address space). ``ru_maxrss`` is not that on Linux: a child
    started by fork + exec begins with the parent's RSS at the fork as its maximum."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def digit_fraction(prompts, completions, **kwargs):
    """Throughput reward: the fraction of a completion's characters that are digits.

    Dense and varied, so every contender does the full update. (With exactly 32 forced tokens the
    arithmetic reward is 0 for every sample, every advantage is 0, and rlhf-pg would skip the
    forward/backward altogether — an exact optimization, but it would make the comparison moot.)
    """
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # chat: [{"role", "content"}]
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in texts]


def trl_reward(prompts, completions, completion_ids=None, answer=None, **kwargs):
    """``arithmetic_exact`` with ``finished`` taken from TRL's completion ids (EOS present)."""
    from reward_models.rules import arithmetic_exact

    from rlhf_pg.models.builtin import char_tokenizer

    eos = char_tokenizer().eos_token_id
    finished = [eos in ids for ids in completion_ids] if completion_ids is not None else None
    return arithmetic_exact(prompts, completions, finished=finished, answer=answer)


def _greedy_accuracy(model, tokenizer, eval_set) -> float:
    from reward_models.rules import arithmetic_exact  # noqa: F401  (registers the reward)

    from rlhf_pg.recipe import RewardSpec
    from rlhf_pg.data import columns_of
    from rlhf_pg.evaluation import evaluate
    from reward_models import RewardScorer
    from rlhf_pg.policy.sampler import SamplingParams, make_sampler

    prompts, columns = columns_of(eval_set)
    result = evaluate(make_sampler(None, model, tokenizer), model, prompts, columns, RewardScorer([RewardSpec("arithmetic_exact")]),
                      SamplingParams(max_new_tokens=6, temperature=0.0), batch_size=500)
    return result["reward"]


# --- throughput workers -----------------------------------------------------------------------------


def throughput_ours(steps: int) -> list[float]:
    from reward_models import register_reward

    from rlhf_pg.recipe import recipe_from_dict
    from rlhf_pg.trainer import setup, train_step
    import tempfile

    register_reward("digit_fraction")(digit_fraction)
    recipe = recipe_from_dict({
        "model": "builtin:arith-gpt",
        "data": {"num_eval": 500},
        "rewards": [{"name": "digit_fraction"}],
        "rollout": {"prompts_per_step": 16, "completions_per_prompt": 4, "max_new_tokens": 32, "min_new_tokens": 32},
        "algorithm": {"baseline": "group_mean"},
        "optim": {"lr": 1e-4, "max_grad_norm": 1.0},
        "train": {"steps": steps, "tensorboard": False, "num_threads": THREADS},
    })
    run, _ = setup(recipe, tempfile.mkdtemp())
    times = []
    for step in range(steps):
        started = time.perf_counter()
        train_step(run, step)
        times.append(time.perf_counter() - started)
    return times


def throughput_naive(steps: int) -> list[float]:
    """HF generate + one forward/backward of the REINFORCE loss + AdamW: what anyone would write first."""
    torch = _setup_torch()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _model_path()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_set, _ = _arithmetic_data()
    times = []
    for step in range(steps):
        started = time.perf_counter()
        rows = train_set[step * 16:(step + 1) * 16]
        prompts = [p for p in rows["prompt"] for _ in range(4)]
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        model.eval()
        with torch.no_grad():
            output = model.generate(**encoded, do_sample=True, max_new_tokens=32, min_new_tokens=32,
                                    pad_token_id=tokenizer.pad_token_id)
        model.train()
        completion = output[:, encoded["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
        rewards = torch.tensor(digit_fraction(prompts, texts))
        advantages = rewards.view(16, 4) - rewards.view(16, 4).mean(1, keepdim=True)
        attention = torch.cat([encoded["attention_mask"], torch.ones_like(completion)], dim=1)
        logits = model(input_ids=output, attention_mask=attention).logits[:, encoded["input_ids"].shape[1] - 1:-1]
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, completion[..., None]).squeeze(-1)
        loss = -(logprobs.sum(1) * advantages.flatten()).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - started)
    return times


def _trl_trainer(learning_rate: float, batch: int, new_tokens: int, min_new_tokens: int, max_steps: int, callbacks,
                 reward=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    import tempfile

    path = _model_path()
    train_set, _ = _arithmetic_data()
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, num_generations=4,
        max_completion_length=new_tokens, generation_kwargs={"min_new_tokens": min_new_tokens} if min_new_tokens else None,
        learning_rate=learning_rate, beta=0.0, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
        max_steps=max_steps, logging_steps=10_000, save_strategy="no", report_to=[], lr_scheduler_type="constant",
        max_grad_norm=1.0, dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    return GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=reward or trl_reward, args=args,
                       train_dataset=train_set, processing_class=AutoTokenizer.from_pretrained(path),
                       callbacks=callbacks)


def step_timer(times: list[float]):
    """A TrainerCallback appending each optimizer step's wall time to ``times``."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.started)

    return Timer()


def throughput_trl(steps: int) -> list[float]:
    _setup_torch()
    times: list[float] = []
    trainer = _trl_trainer(1e-4, 64, 32, 32, steps, [step_timer(times)], reward=digit_fraction)
    trainer.train()
    return times


# --- time-to-target workers -------------------------------------------------------------------------


def target_ours(eval_every: int, max_steps: int, lr: float | None = None) -> dict:
    from rlhf_pg.recipe import load_recipe
    from rlhf_pg.trainer import setup, train_step
    import tempfile

    overrides = [f"train.num_threads={THREADS}", "train.tensorboard=false"]
    if lr is not None:
        overrides.append(f"optim.lr={lr}")
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", overrides)
    run, _ = setup(recipe, tempfile.mkdtemp())
    _, eval_set = _arithmetic_data(recipe.data.num_eval)
    curve, train_time = [], 0.0
    accuracy = _greedy_accuracy(run.unwrapped, run.tokenizer, eval_set)
    curve.append((0, 0.0, accuracy))
    for step in range(min(max_steps, recipe.train.steps)):
        started = time.perf_counter()
        train_step(run, step)
        train_time += time.perf_counter() - started
        if (step + 1) % eval_every == 0:
            accuracy = _greedy_accuracy(run.unwrapped, run.tokenizer, eval_set)
            curve.append((step + 1, train_time, accuracy))
            if accuracy >= 0.9:
                break
    reached = next(((s, t) for s, t, a in curve if a >= 0.9), None)
    return {"curve": curve, "steps_to_target": reached[0] if reached else None,
            "seconds_to_target": reached[1] if reached else None}


def target_trl(eval_every: int, max_steps: int, lr: float) -> dict:
    _setup_torch()
    from transformers import TrainerCallback

    _, eval_set = _arithmetic_data()
    curve: list = []
    clock = {"train": 0.0}

    class EvalAndTime(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            clock["train"] += time.perf_counter() - self.started
            if state.global_step % eval_every == 0:
                accuracy = _greedy_accuracy(model, processing_class, eval_set)
                model.train()
                curve.append((state.global_step, clock["train"], accuracy))
                if accuracy >= 0.9:
                    control.should_training_stop = True

    trainer = _trl_trainer(lr, 128, 6, 0, max_steps, [EvalAndTime()])
    curve.append((0, 0.0, _greedy_accuracy(trainer.model, trainer.processing_class, eval_set)))
    trainer.model.train()
    trainer.train()
    curve.sort()
    reached = next(((s, t) for s, t, a in curve if a >= 0.9), None)
    return {"curve": curve, "steps_to_target": reached[0] if reached else None,
            "seconds_to_target": reached[1] if reached else None}


WORKERS = {
    "throughput-ours": lambda a: {"times": throughput_ours(a.steps)},
    "throughput-trl": lambda a: {"times": throughput_trl(a.steps)},
    "throughput-naive": lambda a: {"times": throughput_naive(a.steps)},
    "target-ours": lambda a: target_ours(a.eval_every, a.max_steps, a.lr),
    "target-trl": lambda a: target_trl(a.eval_every, a.max_steps, a.lr),
    **real_model.WORKERS,
    **real_target.WORKERS,
}


def worker_main(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _setup_torch()
    result = WORKERS[args.worker](args)
    result["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(result))


def spawn(worker: str, **options) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker]
    for key, value in options.items():
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(THREADS), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    output = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
    if output.returncode != 0 or not lines:
        raise RuntimeError(f"{worker} failed:\n{output.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# --- the comparison ---------------------------------------------------------------------------------


def throughput(rounds: int) -> dict:
    tokens_per_step = 64 * 32
    measured: dict[str, list[float]] = {"ours": [], "trl": [], "naive": []}
    rss: dict[str, float] = {}
    for round_index in range(rounds):
        for name in measured:
            result = spawn(f"throughput-{name}", steps=STEPS_WARMUP + STEPS_MEASURED)
            per_step = statistics.median(result["times"][STEPS_WARMUP:])
            measured[name].append(per_step)
            rss[name] = max(rss.get(name, 0.0), result["peak_rss_mb"])
            print(f"  round {round_index + 1}: {name:5s} {per_step:.3f} s/step", flush=True)
    summary = {}
    for name, values in measured.items():
        seconds = statistics.median(values)
        summary[name] = {"s_per_step": seconds, "tokens_per_s": tokens_per_step / seconds, "peak_rss_mb": rss[name]}
        print(f"{name:5s}  {tokens_per_step / seconds:8.0f} tokens/s  {seconds:.3f} s/step  peak RSS {rss[name]:.0f} MB")
    summary["ratio_vs_trl"] = summary["ours"]["tokens_per_s"] / summary["trl"]["tokens_per_s"]
    summary["ratio_vs_naive"] = summary["ours"]["tokens_per_s"] / summary["naive"]["tokens_per_s"]
    print(f"ratio_vs_trl={summary['ratio_vs_trl']:.2f}")
    print(f"ratio_vs_naive={summary['ratio_vs_naive']:.2f}")
    return summary


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def time_to_target(eval_every: int, max_steps: int, trl_lrs: list[float]) -> dict:
    ours = spawn("target-ours", eval_every=eval_every, max_steps=max_steps)
    print(f"ours (quickstart): {_seconds(ours['seconds_to_target'])}, {ours['steps_to_target']} steps to 0.9; "
          f"peak RSS {ours['peak_rss_mb']:.0f} MB", flush=True)
    trl_runs = {}
    for lr in trl_lrs:
        run = spawn("target-trl", eval_every=eval_every, max_steps=max_steps, lr=lr)
        trl_runs[str(lr)] = run
        print(f"TRL GRPO lr={lr}: {_seconds(run['seconds_to_target'])}, {run['steps_to_target']} steps to 0.9 "
              f"(best accuracy {max(a for _, _, a in run['curve']):.3f}); peak RSS {run['peak_rss_mb']:.0f} MB", flush=True)
    reached = {lr: r["seconds_to_target"] for lr, r in trl_runs.items() if r["seconds_to_target"] is not None}
    best_lr = min(reached, key=reached.get) if reached else None
    result = {"ours": ours, "trl": trl_runs, "trl_best_lr": best_lr}
    if ours["seconds_to_target"] is None:
        print("time_to_target_ratio=n/a (rlhf-pg did not reach 0.9)")
    elif best_lr is None:
        total = max(r["curve"][-1][1] for r in trl_runs.values())
        result["time_to_target_ratio_lower_bound"] = total / ours["seconds_to_target"]
        print(f"TRL did not reach 0.9 within {max_steps} steps at any lr; "
              f"time_to_target_ratio>={result['time_to_target_ratio_lower_bound']:.2f}")
    else:
        result["time_to_target_ratio"] = reached[best_lr] / ours["seconds_to_target"]
        print(f"TRL's best lr: {best_lr}")
        print(f"time_to_target_ratio={result['time_to_target_ratio']:.2f}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["throughput", "target", "all", "target-real"], default="all",
                        help="the toy model's parts, or target-real: time to 0.6 on recipes/smollm2_arithmetic.yaml")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved throughput rounds (default 3; "
                        f"--model/--sizes: {real_model.ROUNDS})")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--trl-lrs", type=float, nargs="+", default=None,
                        help=f"TRL's learning rates (default 3e-4 5e-4 1e-3; target-real: {' '.join(map(str, real_target.TRL_LRS))})")
    parser.add_argument("--output", default=None, help="also write the figures as JSON here")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=STEPS_WARMUP + STEPS_MEASURED, help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, default=None, help=argparse.SUPPRESS)
    real_model.add_arguments(parser)
    real_target.add_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    if real_model.main(args, spawn, THREADS):  # --model, --sizes
        return
    if args.part == "target-real":
        results = {"time_to_target_real": real_target.run_target_real(args, spawn, args.trl_lrs or real_target.TRL_LRS)}
        if args.output:
            Path(args.output).write_text(json.dumps(results, indent=2))
        return
    args.trl_lrs = args.trl_lrs or [3e-4, 5e-4, 1e-3]
    args.rounds = args.rounds or 3
    spawn_check = _model_path()  # build the base model once, before any timing
    print(f"model: {spawn_check}; threads: {THREADS}")
    results = {}
    if args.part in ("throughput", "all"):
        print("== throughput at equal settings (B=64, 32 new tokens, fp32, lr 1e-4) ==")
        results["throughput"] = throughput(args.rounds)
    if args.part in ("target", "all"):
        print(f"== time to held-out greedy accuracy >= 0.9 (eval every {args.eval_every} steps, eval time excluded) ==")
        results["time_to_target"] = time_to_target(args.eval_every, args.max_steps, args.trl_lrs)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
