"""``vs_trl.py --model NAME``: rlhf-pg vs TRL vs a naive loop on a real model (and the workers of ``--sizes``).

    HF_HUB_OFFLINE=1 python benchmarks/vs_trl.py --model builtin:smollm2-135m-instruct    # ~30 min on 2 cores
    HF_HUB_OFFLINE=1 python benchmarks/vs_trl.py --model builtin:smollm2-135m-instruct --rounds 1 --measured-steps 1

The setting (the same for every contender): the chat prompts of the built-in arithmetic task
(``"What is {a}+{b}? Reply with only the number."``, a, b in 10-99), 8 prompts x 4 completions per step
(B = 32), exactly 64 new tokens (min_new_tokens = max_new_tokens), temperature 1, top_p 1 (no top-k),
the dense reward ``vs_trl.digit_fraction``, lr 1e-6, fp32, no gradient checkpointing, gradient
clipping 1.0, ``BENCH_THREADS`` torch threads. Two settings: beta = 0 (no reference model) and
beta = 0.04 (a frozen reference model and a k3 KL term in the loss, as TRL's GRPO does):

- ours: ``rlhf_pg.trainer.setup`` + ``train_step`` (baseline group_mean, ``kl_mode: loss``,
  ``kl_estimator: k3``; the default seq-mean-token-sum aggregation);
- trl: TRL ``GRPOTrainer`` with its defaults otherwise (loss_type "dapo", scale_rewards "group",
  num_iterations 1, KL multiplied by the (on-policy, = 1) importance ratio, entropies computed);
- naive: HF ``generate`` on the chat-template-rendered prompts + one forward over prompt+completion with
  full logits and log_softmax + REINFORCE loss (group-mean baseline) (+ a reference forward under
  no_grad and beta x k3 KL) + clipping + AdamW.

The model is resolved to a plain HF directory once, before any timing (``resolve_model_path``). Each
contender runs in its own subprocess (``vs_trl.spawn``; peak RSS from ``VmHWM``); rounds are
interleaved (ours, trl, naive, ours, ... over both settings), warm-up steps are excluded, and the
median over rounds of the per-round medians is reported.

FLOP bound. N = the parameter count (embeddings included, tied weights once), P = the templated prompt
tokens of the step's 8 prompts together. Counted FLOPs: sampling 2N (B x 64 + 4P) (every row's prompt
and its sampled tokens), update 3 x 2N (P + B x 64) (each prompt once per group), and with beta > 0 the
reference forward 2N (P + B x 64). The fp32 matmul rate is measured in the same run (own subprocess,
same threads), per shape the faster of ``F.linear(x, W)`` and oneDNN's ``mkldnn._linear_pointwise``, at
the model's Llama-style shapes hidden->q (q_proj, o_proj: 2 per layer), hidden->kv (k, v: 2 per layer),
hidden->intermediate (gate, up: 2 per layer), intermediate->hidden (1 per layer), hidden->vocab (once),
with rows = B x 64 (update-like) and rows = B (decode-like): each set's FLOPs / its time is a rate, and
update + reference count at the update-like rate, sampling at the decode-like one, weighted by their
shares of the counted FLOPs: rate = 1 / (share_update / rate_update + share_sampling / rate_decode).
``flop_bound_seconds`` = counted FLOPs / rate; ``flop_bound_fraction`` = that / our s/step, per round against the
rate measured right after that round's rlhf-pg run (the median over rounds is printed: the host's matmul rate
drifts by 10-20 % within minutes here, more than a change moves a step), and printed beside it against the rate
measured once at the end (``flop_bound_fraction_end_rate``, the figure before 2026-12-07).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
PROMPTS, GROUP, NEW_TOKENS = 8, 4, 64
BATCH = PROMPTS * GROUP
LR = 1e-6
BETAS = (0.0, 0.04)
ROUNDS, WARMUP, MEASURED = 2, 1, 2
OURS_MICRO_BATCH = 4  # rlhf-pg's train.micro_batch_size here: one group (4 rows) per forward/backward


def add_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help=f"throughput on this model (e.g. {DEFAULT_MODEL}, or a local HF "
                        "directory): ours, TRL and naive at beta 0 and 0.04 (benchmarks/real_model.py)")
    parser.add_argument("--sizes", nargs="*", default=None, metavar="SIZE",
                        help="ours vs TRL over model sizes; SIZE among arith, 10m, 40m, real, 360m, 1.7b (default: all; "
                        "benchmarks/model_sizes.py)")
    parser.add_argument("--plot", action="store_true", help="--sizes: write benchmarks/sizes.png")
    parser.add_argument("--bf16", action="store_true", help="--model: also ours and TRL with bf16 mixed precision "
                        "(beta 0), against ours in fp32")
    parser.add_argument("--ours-micro-batch", type=int, default=OURS_MICRO_BATCH, metavar="ROWS",
                        help=f"--model/--sizes: rlhf-pg's train.micro_batch_size (default {OURS_MICRO_BATCH}: the update "
                        "in chunks of that many rows, the same gradient; 0 = all rows at once)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help=f"--model/--sizes: warm-up steps (default {WARMUP})")
    parser.add_argument("--measured-steps", type=int, default=None,
                        help=f"--model/--sizes: measured steps (default {MEASURED})")
    for flag, kind, default in (("--model-path", str, None), ("--beta", float, 0.0), ("--prompt-format", str, "chat"),
                                ("--new-tokens", int, NEW_TOKENS), ("--reward", str, "digit_fraction"),
                                ("--rows-update", int, 0), ("--rows-decode", int, 0), ("--precision", str, "no"),
                                ("--micro-batch-size", int, 0), ("--lora", int, 0), ("--checkpointing", int, 0),
                                ("--directory", str, None), ("--shape", str, "{}")):
        parser.add_argument(flag, type=kind, default=default, help=argparse.SUPPRESS)


def main(args, spawn, threads: int) -> bool:
    """Run --sizes (where --model names the largest size) or --model (True), else leave it to the toy parts."""
    if args.sizes is None and not args.model:
        return False
    import model_sizes  # the script's directory is on sys.path (run as benchmarks/vs_trl.py)

    results = {"sizes": model_sizes.run_sizes(args, spawn, threads)} if args.sizes is not None \
        else {"model": run_model(args, spawn, threads)}
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return True


def _vs():
    import vs_trl  # (as model_sizes above)

    return vs_trl


def _reward(name: str):
    """A reward by name: vs_trl's ``digit_fraction``, or model_sizes' ``digit_vowel_fraction``."""
    if name == "digit_fraction":
        return _vs().digit_fraction
    import model_sizes

    return getattr(model_sizes, name)


def _datasets(prompt_format: str):
    from rlhf_pg.data import load_prompt_datasets
    from rlhf_pg.recipe import DataConfig

    return load_prompt_datasets(DataConfig(task="arithmetic", prompt_format=prompt_format, min_operand=10,
                                           max_operand=99, num_eval=200))


def _render(tokenizer, prompt) -> str:
    """A conversation through the chat template (with the assistant header), a text prompt as is."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


# --- workers (each in its own subprocess) ---------------------------------------------------------


def real_ours(args) -> tuple[list[float], list[float], float | None]:
    """Step times, per step the fraction of groups with equal rewards (rows rlhf-pg skips at beta 0), and the peak
    MB ``rlhf_pg.run.memory`` estimated for the run before its first step (what ``rlhf-pg doctor`` prints)."""
    from reward_models import register_reward

    from rlhf_pg.recipe import recipe_from_dict
    from rlhf_pg.trainer import setup, train_step

    vs = _vs()
    reward, equal = _reward(args.reward), []

    def counted(prompts, completions, **kwargs):  # records the groups whose rewards are all equal
        scores = reward(prompts, completions, **kwargs)
        groups: dict[str, list[float]] = {}
        for prompt, score in zip(prompts, scores):
            groups.setdefault(str(prompt), []).append(score)
        equal.append(sum(max(g) == min(g) for g in groups.values()) / len(groups))
        return scores

    register_reward(args.reward)(counted)
    from memory_profile import record_estimates

    estimates = record_estimates()
    recipe = recipe_from_dict({
        "model": args.model_path,
        "data": {"task": "arithmetic", "prompt_format": args.prompt_format, "min_operand": 10, "max_operand": 99,
                 "num_eval": 200},
        "rewards": [{"name": args.reward}],
        "rollout": {"prompts_per_step": PROMPTS, "completions_per_prompt": GROUP, "max_new_tokens": args.new_tokens,
                    "min_new_tokens": args.new_tokens, "temperature": 1.0, "top_p": 1.0},
        "algorithm": {"baseline": "group_mean", "kl_coef": args.beta, "kl_mode": "loss", "kl_estimator": "k3"},
        "optim": {"lr": LR, "max_grad_norm": 1.0},
        "train": {"steps": args.steps, "tensorboard": False, "num_threads": vs.THREADS, "log_completions_every": 0,
                  "mixed_precision": args.precision, "micro_batch_size": args.micro_batch_size or None,
                  "gradient_checkpointing": bool(args.checkpointing)},
        **({"peft": {"r": args.lora, "alpha": 2.0 * args.lora}} if args.lora else {}),
    })
    run, _ = setup(recipe, tempfile.mkdtemp())
    times = []
    for step in range(args.steps):
        started = time.perf_counter()
        train_step(run, step)
        times.append(time.perf_counter() - started)
    return times, equal, estimates[0].peak / 2**20 if estimates else None


def real_trl(args) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    times: list[float] = []

    train_set, _ = _datasets(args.prompt_format)
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=BATCH, num_generations=GROUP,
        max_completion_length=args.new_tokens, generation_kwargs={"min_new_tokens": args.new_tokens},
        temperature=1.0, top_p=1.0, beta=args.beta, learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=1.0,
        bf16=args.precision == "bf16", fp16=False, gradient_checkpointing=False, use_cpu=True, max_steps=args.steps,
        logging_steps=10_000, save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32),
                          reward_funcs=_reward(args.reward), args=config, train_dataset=train_set,
                          processing_class=AutoTokenizer.from_pretrained(args.model_path),
                          callbacks=[_vs().step_timer(times)])
    trainer.train()
    return times


def real_naive(args) -> list[float]:
    """HF generate + one full-logits forward/backward of the REINFORCE loss (+ k3 KL) + AdamW."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reward = _reward(args.reward)
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    reference = copy.deepcopy(model).eval().requires_grad_(False) if args.beta > 0 else None  # frozen
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    train_set, _ = _datasets(args.prompt_format)
    chat = args.prompt_format == "chat"

    def token_logprobs(network, ids, attention, width, completion):
        logits = network(input_ids=ids, attention_mask=attention).logits[:, width - 1:-1]
        return torch.log_softmax(logits.float(), -1).gather(-1, completion[..., None]).squeeze(-1)

    times = []
    for step in range(args.steps):
        started = time.perf_counter()
        prompts = [p for p in train_set[step * PROMPTS:(step + 1) * PROMPTS]["prompt"] for _ in range(GROUP)]
        encoded = tokenizer([_render(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                            padding_side="left", add_special_tokens=not chat)
        model.eval()
        with torch.no_grad():
            output = model.generate(**encoded, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    pad_token_id=tokenizer.pad_token_id)
        model.train()
        width = encoded["input_ids"].shape[1]
        completion = output[:, width:]
        texts = tokenizer.batch_decode(completion, skip_special_tokens=True)
        rewards = torch.tensor(reward(prompts, texts)).view(PROMPTS, GROUP)
        advantages = (rewards - rewards.mean(1, keepdim=True)).flatten()
        attention = torch.cat([encoded["attention_mask"], torch.ones_like(completion)], dim=1)
        logprobs = token_logprobs(model, output, attention, width, completion)
        loss = -(logprobs.sum(1) * advantages).mean()
        if reference is not None:
            with torch.no_grad():
                ref_logprobs = token_logprobs(reference, output, attention, width, completion)
            delta = ref_logprobs - logprobs
            loss = loss + args.beta * (delta.exp() - delta - 1).sum(1).mean()  # k3
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - started)
    return times


def linear_shapes(config) -> list[tuple[str, int, int, int]]:
    """(name, in, out, count in one forward) of a Llama-style model's matmuls."""
    hidden, heads, layers = config.hidden_size, config.num_attention_heads, config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    return [("hidden->q", hidden, heads * head_dim, 2 * layers),
            ("hidden->kv", hidden, kv_heads * head_dim, 2 * layers),
            ("hidden->intermediate", hidden, intermediate, 2 * layers),
            ("intermediate->hidden", intermediate, hidden, layers), ("hidden->vocab", hidden, config.vocab_size, 1)]


def _best_seconds(function, min_repeats: int = 3, min_total: float = 0.2) -> float:
    function()
    best, total, repeats = float("inf"), 0.0, 0
    while repeats < min_repeats or total < min_total:
        started = time.perf_counter()
        function()
        elapsed = time.perf_counter() - started
        best, total, repeats = min(best, elapsed), total + elapsed, repeats + 1
    return best


def matmul_rate(args) -> dict:
    import torch
    from transformers import AutoConfig

    linear = torch.nn.functional.linear
    shapes = linear_shapes(AutoConfig.from_pretrained(args.model_path))
    result = {}
    for kind, rows in (("update", args.rows_update), ("decode", args.rows_decode)):
        flops, best_s, torch_s, onednn_s, per_shape = 0.0, 0.0, 0.0, 0.0, {}
        for name, fan_in, fan_out, count in shapes:
            x, weight = torch.randn(rows, fan_in), torch.randn(fan_out, fan_in)
            seconds_torch = _best_seconds(lambda x=x, weight=weight: linear(x, weight))
            try:
                seconds_onednn = _best_seconds(
                    lambda x=x, weight=weight: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""))
            except (AttributeError, RuntimeError):  # torch without oneDNN
                seconds_onednn = float("inf")
            shape_flops = 2.0 * rows * fan_in * fan_out
            per_shape[name] = {"gflops_torch": shape_flops / seconds_torch / 1e9,
                               "gflops_onednn": shape_flops / seconds_onednn / 1e9, "count": count}
            flops += count * shape_flops
            best_s += count * min(seconds_torch, seconds_onednn)
            torch_s += count * seconds_torch
            onednn_s += count * seconds_onednn
        result[kind] = {"rows": rows, "flops": flops, "gflops": flops / best_s / 1e9,
                        "gflops_torch": flops / torch_s / 1e9, "gflops_onednn": flops / onednn_s / 1e9,
                        "onednn_vs_mkl": torch_s / onednn_s, "shapes": per_shape}
    return result


WORKERS = {
    "real-ours": lambda a: dict(zip(("times", "equal_reward_groups", "estimate_mb"), real_ours(a))),
    "real-trl": lambda a: {"times": real_trl(a)},
    "real-naive": lambda a: {"times": real_naive(a)},
    "matmul-rate": matmul_rate,
    "build-llama": lambda a: {"path": _build_llama(a)},
}


def _build_llama(args) -> str:
    """--sizes' random-init Llama, built in its own process: a parent that built a 1.7B model would keep ~7 GB
    resident (glibc keeps what it freed), which every worker forked from it would also report as its peak."""
    import model_sizes

    return model_sizes.build_random_llama(Path(args.directory), args.model_path, **json.loads(args.shape))


# --- the parent: model facts, rounds, figures -------------------------------------------------------
def model_facts(path: str, prompt_format: str) -> dict:
    """Parameter count (tied weights once, built on the meta device) and the templated prompt lengths."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        parameters = AutoModelForCausalLM.from_config(config).num_parameters()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = _datasets(prompt_format)[0][:PROMPTS]["prompt"]
    lengths = [len(tokenizer(_render(tokenizer, p), add_special_tokens=prompt_format != "chat")["input_ids"])
               for p in prompts]
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return {"parameters": parameters, "prompt_tokens": lengths, "max_positions": positions}


def counted_flops(parameters: int, prompt_tokens: list[int], beta: float, new_tokens: int = NEW_TOKENS) -> dict:
    prompt, completions = sum(prompt_tokens), len(prompt_tokens) * GROUP * new_tokens
    return {"sampling": 2.0 * parameters * (completions + GROUP * prompt),
            "update": 6.0 * parameters * (prompt + completions),
            "reference": 2.0 * parameters * (prompt + completions) if beta > 0 else 0.0}


def combined_rate(flops: dict, rate: dict, key: str = "gflops") -> float:
    """FLOPs per second at the counted FLOPs' mix: update + reference at the update-like rate, sampling at decode's."""
    total = sum(flops.values())
    seconds = (flops["update"] + flops["reference"]) / (rate["update"][key] * 1e9) \
        + flops["sampling"] / (rate["decode"][key] * 1e9)
    return total / seconds


def _rounds(spawn, jobs: dict, contenders, rounds: int, warmup: int, measured: int, ours: dict | None = None,
            probe=None) -> dict:
    """jobs: setting -> spawn options (``ours``: more options for rlhf-pg only). Interleaved rounds; setting ->
    contender -> per-round medians, peak RSS. ``probe()`` (the matmul rate), when given, runs right after each of
    rlhf-pg's runs: ``rates`` beside its ``per_round``, the host's rate at that time."""
    figures = {setting: {name: {"per_round": [], "peak_rss_mb": 0.0} for name in contenders} for setting in jobs}
    for round_index in range(rounds):
        for setting, options in jobs.items():
            for name in contenders:
                own = (ours or {}) if name == "ours" else {}
                result = spawn(f"real-{name}", steps=warmup + measured, **options, **own)
                per_step = statistics.median(result["times"][warmup:])
                entry = figures[setting][name]
                entry["per_round"].append(per_step)
                entry["peak_rss_mb"] = max(entry["peak_rss_mb"], result["peak_rss_mb"])
                if probe is not None and name == "ours":
                    entry.setdefault("rates", []).append(probe())
                if result.get("estimate_mb"):  # rlhf-pg's own estimate of its peak (rlhf-pg doctor's figure)
                    entry["estimate_mb"] = result["estimate_mb"]
                note = ""
                if "equal_reward_groups" in result:  # rlhf-pg skips rows of equal-reward groups (at beta 0)
                    equal = statistics.mean(result["equal_reward_groups"][warmup:])
                    entry.setdefault("equal_reward_groups", []).append(equal)
                    note = f"  (groups with equal rewards: {equal:.2f})"
                print(f"  round {round_index + 1}: {setting} {name:5s} {per_step:.3f} s/step{note}", flush=True)
    return figures


def _summarize(label: str, entries: dict, tokens_per_step: int) -> None:
    for name, entry in entries.items():
        entry["s_per_step"] = statistics.median(entry["per_round"])
        entry["tokens_per_s"] = tokens_per_step / entry["s_per_step"]
        estimate = (f" (estimated {entry['estimate_mb']:.0f} MB: {entry['estimate_mb'] / entry['peak_rss_mb']:.2f}x)"
                    if entry.get("estimate_mb") else "")
        print(f"{name:5s}  {label}  {entry['s_per_step']:.2f} s/step  {entry['tokens_per_s']:.1f} tokens/s  "
              f"peak RSS {entry['peak_rss_mb']:.0f} MB{estimate}")


def _ours(args) -> dict:
    """rlhf-pg's own options: ``--ours-micro-batch`` (train.micro_batch_size)."""
    return {"micro_batch_size": args.ours_micro_batch}


def _defaults(args) -> tuple[int, int, int]:
    return (args.rounds or ROUNDS, WARMUP if args.warmup_steps is None else args.warmup_steps,
            args.measured_steps or MEASURED)


def run_model(args, spawn, threads: int) -> dict:
    from rlhf_pg.models import resolve_model_path

    name = args.model or DEFAULT_MODEL
    path = resolve_model_path(name)  # GGUF dequantized / built once, before any timing
    rounds, warmup, measured = _defaults(args)
    facts = model_facts(path, "chat")
    print(f"model: {name} ({path}); {facts['parameters'] / 1e6:.1f}M parameters; "
          f"prompt tokens {facts['prompt_tokens']}; threads: {threads}")
    print(f"== throughput on a real model (B={BATCH}: {PROMPTS} chat prompts x {GROUP}, {NEW_TOKENS} new tokens, "
          f"fp32, lr {LR:g}; {warmup} warm-up + {measured} measured steps, {rounds} rounds; rlhf-pg "
          f"train.micro_batch_size {args.ours_micro_batch or 'null'}) ==")
    jobs = {f"beta{beta:g}": {"model_path": path, "beta": beta, "prompt_format": "chat"} for beta in BETAS}
    def probe() -> dict:
        return spawn("matmul-rate", model_path=path, rows_update=BATCH * NEW_TOKENS, rows_decode=BATCH)

    figures = _rounds(spawn, jobs, ("ours", "trl", "naive"), rounds, warmup, measured, _ours(args), probe)
    rate = probe()
    print(f"  matmul rate: update-like (rows {BATCH * NEW_TOKENS}) {rate['update']['gflops']:.1f} GFLOPS "
          f"(torch {rate['update']['gflops_torch']:.1f}), decode-like (rows {BATCH}) {rate['decode']['gflops']:.1f} "
          f"GFLOPS (torch {rate['decode']['gflops_torch']:.1f})", flush=True)
    # the host's kernel margin: oneDNN's fp32 matmul over torch's default (MKL) at this model's shapes, which moves
    # ratio_vs_trl from host to host (TRL runs on MKL); figures from different days compare at equal margins
    print(f"kernel_margin onednn_vs_mkl_update={rate['update']['onednn_vs_mkl']:.2f} "
          f"onednn_vs_mkl_decode={rate['decode']['onednn_vs_mkl']:.2f}", flush=True)
    results = {"model": name, "path": path, **facts, "threads": threads, "rounds": rounds, "warmup_steps": warmup,
               "measured_steps": measured, "matmul": rate, "settings": {}}
    for (setting, options), entries in zip(jobs.items(), figures.values()):
        _summarize(f"beta={options['beta']:g}", entries, BATCH * NEW_TOKENS)
        flops = counted_flops(facts["parameters"], facts["prompt_tokens"], options["beta"])
        gflops, gflops_torch = combined_rate(flops, rate) / 1e9, combined_rate(flops, rate, "gflops_torch") / 1e9
        bound = sum(flops.values()) / (gflops * 1e9)
        ours, trl, naive = entries["ours"], entries["trl"], entries["naive"]
        # each round's step against the rate measured right after it (the host drifts by more than our changes)
        paired = [sum(flops.values()) / combined_rate(flops, r) / seconds
                  for r, seconds in zip(ours.get("rates", []), ours["per_round"])]
        summary = {"counted_gflop": sum(flops.values()) / 1e9, "flops": flops, "matmul_gflops": gflops,
                   "matmul_gflops_torch": gflops_torch, "flop_bound_seconds": bound,
                   "flop_bound_fraction_end_rate": bound / ours["s_per_step"],
                   "flop_bound_fraction_per_round": paired,
                   "flop_bound_fraction": statistics.median(paired) if paired else bound / ours["s_per_step"],
                   "ratio_vs_trl": ours["tokens_per_s"] / trl["tokens_per_s"],
                   "ratio_vs_naive": ours["tokens_per_s"] / naive["tokens_per_s"],
                   "peak_rss_ratio_vs_trl": ours["peak_rss_mb"] / trl["peak_rss_mb"]}
        print(f"setting={setting} counted_gflop={summary['counted_gflop']:.0f} matmul_gflops={gflops:.1f} "
              f"matmul_gflops_torch={gflops_torch:.1f} flop_bound_seconds={bound:.2f} (rate at the end: fraction "
              f"{summary['flop_bound_fraction_end_rate']:.2f}; per round, each against the rate right after it: "
              + " ".join(f"{value:.2f}" for value in paired) + ")")
        print(f"setting={setting} " + " ".join(f"{key}={summary[key]:.2f}" for key in (
            "ratio_vs_trl", "ratio_vs_naive", "peak_rss_ratio_vs_trl", "flop_bound_fraction")), flush=True)
        results["settings"][setting] = {"beta": options["beta"], "contenders": entries, **summary}
    if args.bf16:  # bf16 mixed precision on CPU, measured rather than assumed (beta 0)
        print("== bf16 mixed precision (train.mixed_precision: bf16; TRL bf16=True), beta 0 ==", flush=True)
        bf16 = _rounds(spawn, {"bf16": {"model_path": path, "beta": 0.0, "prompt_format": "chat", "precision": "bf16"}},
                       ("ours", "trl"), rounds, warmup, measured, _ours(args))["bf16"]
        _summarize("bf16", bf16, BATCH * NEW_TOKENS)
        fp32 = results["settings"]["beta0"]["contenders"]
        summary = {"ours_bf16_vs_fp32_speed": fp32["ours"]["s_per_step"] / bf16["ours"]["s_per_step"],
                   "trl_bf16_vs_fp32_speed": fp32["trl"]["s_per_step"] / bf16["trl"]["s_per_step"],
                   "ratio_vs_trl_bf16": bf16["ours"]["tokens_per_s"] / bf16["trl"]["tokens_per_s"]}
        print("setting=bf16 " + " ".join(f"{key}={value:.2f}" for key, value in summary.items()), flush=True)
        results["settings"]["bf16"] = {"contenders": bf16, **summary}
    return results
