"""``vs_trl.py --part target-real``: training time to held-out accuracy >= 0.6 on the real model's recipe.

    HF_HUB_OFFLINE=1 python benchmarks/vs_trl.py --part target-real                    # ~30-40 min on 2 cores
    HF_HUB_OFFLINE=1 python benchmarks/vs_trl.py --part target-real --trl-lrs 1e-5 3e-5 --real-target 0.6

rlhf-pg runs ``recipes/smollm2_arithmetic.yaml`` as it is (SmolLM2-135M-Instruct, chat prompts
``"What is {a}+{b}? Reply with only the number."``, reward ``arithmetic_last_integer``, 4 completions per
prompt, its prompts per step, 16 new tokens, temperature 1). TRL's ``GRPOTrainer`` gets the same model
directory, the same training prompts (the recipe's dataset: its held-out problems removed), the same
reward function (TRL passes the conversations and the ``a``/``b`` columns; ours accepts TRL's convention),
the same group size, batch (prompts per step x 4 completions per optimizer step), completion length
and temperature, beta 0, constant learning rate, clipping 1.0, fp32; its other settings are TRL's
defaults (loss_type "dapo", scale_rewards "group"). Both are evaluated the same way every
``--real-eval-every`` steps: greedy, the recipe's 200 held-out problems, ``rlhf_pg.evaluation.evaluate``
with the recipe's reward; evaluation time is excluded from the training clock. TRL gets a small
learning-rate sweep (``--trl-lrs``) and its fastest run is compared:
``time_to_target_ratio_real`` = TRL's best training seconds to the target / ours.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2_arithmetic.yaml"
TARGET, EVAL_EVERY, MAX_STEPS = 0.6, 5, 60
TRL_LRS = (1e-5, 3e-5)
THREADS = int(os.environ.get("BENCH_THREADS", "2"))


def add_arguments(parser) -> None:
    parser.add_argument("--real-target", type=float, default=TARGET, help=f"--part target-real: held-out accuracy to "
                        f"reach (default {TARGET})")
    parser.add_argument("--real-eval-every", type=int, default=EVAL_EVERY, help="--part target-real: evaluate every N "
                        f"steps (default {EVAL_EVERY})")
    parser.add_argument("--real-max-steps", type=int, default=MAX_STEPS, help="--part target-real: give up after N "
                        f"steps (default {MAX_STEPS})")


def _recipe(threads: int):
    from rlhf_pg.recipe import load_recipe

    return load_recipe(RECIPE, [f"train.num_threads={threads}", "train.tensorboard=false",
                                "train.log_completions_every=0", "train.mixed_precision=no"])  # fp32, as TRL here


def _accuracy(model, tokenizer, recipe, prompts, columns) -> float:
    from rlhf_pg.evaluation import evaluate
    from reward_models import RewardScorer
    from rlhf_pg.policy.sampler import SamplingParams, make_sampler

    scorer = RewardScorer([spec for spec in recipe.rewards if spec.weight != 0])
    params = SamplingParams(max_new_tokens=recipe.eval.max_new_tokens or recipe.rollout.max_new_tokens, temperature=0.0)
    result = evaluate(make_sampler(recipe, model, tokenizer), model, prompts, columns, scorer, params,
                      batch_size=recipe.eval.batch_size)
    return float(result["reward"])


def _reached(curve, target):
    return next(((step, seconds) for step, seconds, accuracy in curve if accuracy >= target), None)


def target_real_ours(args) -> dict:
    import tempfile

    from rlhf_pg.trainer import setup, train_step

    recipe = _recipe(THREADS)
    run, _ = setup(recipe, tempfile.mkdtemp())
    prompts, columns = run.eval_prompts, run.eval_columns
    curve = [(0, 0.0, _accuracy(run.unwrapped, run.tokenizer, recipe, prompts, columns))]
    clock = 0.0
    for step in range(min(args.real_max_steps, recipe.train.steps)):
        started = time.perf_counter()
        train_step(run, step)
        clock += time.perf_counter() - started
        if (step + 1) % args.real_eval_every == 0:
            curve.append((step + 1, clock, _accuracy(run.unwrapped, run.tokenizer, recipe, prompts, columns)))
            print(f"ours step {step + 1}: {curve[-1][2]:.3f} after {clock:.0f} s", flush=True)
            if curve[-1][2] >= args.real_target:
                break
    reached = _reached(curve, args.real_target)
    return {"curve": curve, "steps_to_target": reached and reached[0], "seconds_to_target": reached and reached[1],
            "prompts_per_step": recipe.rollout.prompts_per_step, "lr": recipe.optim.lr}


def target_real_trl(args) -> dict:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from reward_models.rules import arithmetic_last_integer
    from rlhf_pg.data import columns_of, load_prompt_datasets
    from rlhf_pg.models import resolve_model_path

    recipe = _recipe(THREADS)
    path = resolve_model_path(recipe.model.name_or_path)
    train_set, eval_set = load_prompt_datasets(recipe.data)
    prompts, columns = columns_of(eval_set)
    tokenizer = AutoTokenizer.from_pretrained(path)
    curve: list = []
    clock = {"train": 0.0}

    class EvalAndTime(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args_, state, control, model=None, **kwargs):
            clock["train"] += time.perf_counter() - self.started
            if state.global_step % args.real_eval_every == 0:
                accuracy = _accuracy(model, tokenizer, recipe, prompts, columns)
                model.train()
                curve.append((state.global_step, clock["train"], accuracy))
                print(f"trl lr={args.lr} step {state.global_step}: {accuracy:.3f} after {clock['train']:.0f} s",
                      flush=True)
                if accuracy >= args.real_target:
                    control.should_training_stop = True

    k = recipe.rollout.completions_per_prompt
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=recipe.rollout.prompts_per_step * k,
        num_generations=k, max_completion_length=recipe.rollout.max_new_tokens,
        temperature=recipe.rollout.temperature, top_p=1.0, beta=0.0, learning_rate=args.lr,
        lr_scheduler_type="constant", max_grad_norm=1.0, bf16=False, fp16=False, gradient_checkpointing=False,
        use_cpu=True, max_steps=args.real_max_steps, logging_steps=10_000, save_strategy="no", report_to=[],
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                          reward_funcs=arithmetic_last_integer, args=config, train_dataset=train_set,
                          processing_class=tokenizer, callbacks=[EvalAndTime()])
    curve.append((0, 0.0, _accuracy(trainer.model, tokenizer, recipe, prompts, columns)))
    trainer.model.train()
    trainer.train()
    curve.sort()
    reached = _reached(curve, args.real_target)
    return {"curve": curve, "steps_to_target": reached and reached[0], "seconds_to_target": reached and reached[1]}


WORKERS = {"target-real-ours": target_real_ours, "target-real-trl": target_real_trl}


def _seconds(value) -> str:
    return "never" if value is None else f"{value:.0f} s"


def run_target_real(args, spawn, trl_lrs) -> dict:
    from rlhf_pg.models import resolve_model_path

    recipe = _recipe(1)
    resolve_model_path(recipe.model.name_or_path)  # convert the GGUF once, before any timing
    options = dict(real_target=args.real_target, real_eval_every=args.real_eval_every,
                   real_max_steps=args.real_max_steps)
    print(f"== time to held-out greedy accuracy >= {args.real_target} on {RECIPE.name} (eval every "
          f"{args.real_eval_every} steps, eval time excluded) ==", flush=True)
    ours = spawn("target-real-ours", **options)
    print(f"ours (the recipe, lr {ours['lr']}): {_seconds(ours['seconds_to_target'])}, {ours['steps_to_target']} steps; "
          f"peak RSS {ours['peak_rss_mb']:.0f} MB", flush=True)
    trl_runs = {}
    for lr in trl_lrs:
        result = spawn("target-real-trl", lr=lr, **options)
        trl_runs[str(lr)] = result
        best = max(a for _, _, a in result["curve"])
        print(f"TRL GRPO lr={lr}: {_seconds(result['seconds_to_target'])}, {result['steps_to_target']} steps "
              f"(best accuracy {best:.3f}); peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    reached = {lr: r["seconds_to_target"] for lr, r in trl_runs.items() if r["seconds_to_target"] is not None}
    summary = {"ours": ours, "trl": trl_runs}
    if ours["seconds_to_target"] is None:
        print("time_to_target_ratio_real=n/a (rlhf-pg did not reach the target)")
    elif not reached:
        bound = max(r["curve"][-1][1] for r in trl_runs.values()) / ours["seconds_to_target"]
        summary["time_to_target_ratio_real_lower_bound"] = bound
        print(f"TRL did not reach {args.real_target} within {args.real_max_steps} steps at any lr; "
              f"time_to_target_ratio_real>={bound:.2f}")
    else:
        best_lr = min(reached, key=reached.get)
        summary["time_to_target_ratio_real"] = reached[best_lr] / ours["seconds_to_target"]
        print(f"TRL's best lr: {best_lr}")
        print(f"time_to_target_ratio_real={summary['time_to_target_ratio_real']:.2f}")
    return summary
