"""``vs_trl.py --sizes``: rlhf-pg vs TRL's GRPOTrainer over model sizes, and the plot.

    HF_HUB_OFFLINE=1 python benchmarks/vs_trl.py --sizes --plot       # 0.8M, 7.3M, 31.5M, 134.5M, 362M, 1.71B
    HF_HUB_OFFLINE=1 python benchmarks/vs_trl.py --sizes 10m --rounds 1 --measured-steps 1   # one size only

Ours vs TRL at beta 0 in the same setting over model sizes: builtin:arith-gpt (0.8M,
character tokenizer, text prompts ``"12+34="``, and fewer new tokens so that prompt + completion fit its
64 positions), random-init Llama models with SmolLM2's tokenizer (built once into a temporary
directory; at 360M and 1.7B with SmolLM2-360M's and SmolLM2-1.7B's own architectures), and the real model
(``--model``, default builtin:smollm2-135m-instruct). rlhf-pg fine-tunes every weight up to 360M and trains
LoRA (r = 16) with activation checkpointing at 1.7B (``OURS_MODE``), all with ``--ours-micro-batch``; TRL runs
beside it where its full fine-tuning fits this machine (``TRL_SIZES``). Per size: s/step, tokens/s, peak RSS,
and the FLOP-bound fraction (``real_model.py``'s bound at the size's own matmul shapes). The reward there is
``digit_vowel_fraction`` (digits or vowels): a random-init model over a 49k-token vocabulary all but never
writes a digit, so with ``digit_fraction`` nearly every group would have equal rewards and rlhf-pg would
skip those rows (exactly; the "groups with equal rewards" figure printed for ours says how many were).
The workers, the rounds and the figures are ``real_model.py``'s (the --model part's), at beta 0 only.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from real_model import (BATCH, DEFAULT_MODEL, NEW_TOKENS, _defaults, _ours, _rounds, _summarize, combined_rate,
                        counted_flops, model_facts)

# random-init Llama configs (SmolLM2's tokenizer, vocab 49152, tied embeddings): 7.3M and 31.5M parameters, and
# SmolLM2-360M's and SmolLM2-1.7B's own architectures (their config.json: hidden, layers, MLP width, heads, KV heads)
RANDOM_LLAMAS = {
    "360m": {"hidden_size": 960, "num_hidden_layers": 32, "intermediate_size": 2560, "num_attention_heads": 15,
             "num_key_value_heads": 5},
    "1.7b": {"hidden_size": 2048, "num_hidden_layers": 24, "intermediate_size": 8192, "num_attention_heads": 32,
             "num_key_value_heads": 32},
    "10m": {"hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 512, "num_attention_heads": 4,
            "num_key_value_heads": 2},
    "40m": {"hidden_size": 384, "num_hidden_layers": 8, "intermediate_size": 1024, "num_attention_heads": 6,
            "num_key_value_heads": 2},
}
SIZE_NAMES = ("arith", "10m", "40m", "real", "360m", "1.7b")
# how rlhf-pg trains each size (train.micro_batch_size comes from --ours-micro-batch): full fine-tuning where
# weights + gradients + AdamW (16 bytes a parameter) leave room, LoRA with activation checkpointing beyond
OURS_MODE = {"1.7b": {"lora": 16, "checkpointing": 1}}
# TRL beside ours only where its full fine-tuning fits this 24 GB machine with room for the others on it: it
# peaked at 11.4 GB at 135M, and its fp32 logits and AdamW grow from there (360M: ~20 GB by that scaling)
TRL_SIZES = ("arith", "10m", "40m", "real")


def digit_vowel_fraction(prompts, completions, **kwargs):
    """The reward of --sizes: the fraction of a completion's characters that are digits or vowels.

    ``digit_fraction`` is all but always 0 for a random-init model over a 49k-token vocabulary (10 digit
    tokens), so nearly every group would have equal rewards and rlhf-pg would skip those rows exactly;
    vowels keep the reward varied for any model, so every contender does the full update.
    """
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() or ch in "aeiouAEIOU" for ch in text) / max(len(text), 1) for text in texts]


def build_random_llama(directory: Path, tokenizer_source: str, **shape) -> str:
    """A random-init LlamaForCausalLM (seed 0) with ``tokenizer_source``'s tokenizer, saved to ``directory``."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = AutoConfig.from_pretrained(tokenizer_source)
    config = LlamaConfig(vocab_size=source.vocab_size, tie_word_embeddings=True, max_position_embeddings=2048,
                         bos_token_id=source.bos_token_id, eos_token_id=source.eos_token_id,
                         pad_token_id=source.pad_token_id, **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    del model  # 1.7B in float32 is 6.8 GB: not held by the parent while the contenders run
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(directory)
    return str(directory)


def run_sizes(args, spawn, threads: int) -> dict:
    from rlhf_pg.models import resolve_model_path

    chosen = args.sizes or list(SIZE_NAMES)
    unknown = sorted(set(chosen) - set(SIZE_NAMES))
    if unknown:
        raise SystemExit(f"--sizes: unknown {unknown}; choose among {', '.join(SIZE_NAMES)}")
    rounds, warmup, measured = _defaults(args)
    real = resolve_model_path(args.model or DEFAULT_MODEL)
    scratch = Path(tempfile.mkdtemp(prefix="rlhf_pg_sizes_"))
    try:
        models = {}  # name -> (path, prompt format)
        for size in SIZE_NAMES:
            if size not in chosen:
                continue
            if size == "arith":
                models[size] = (resolve_model_path("builtin:arith-gpt"), "text")
            elif size == "real":
                models[size] = (real, "chat")
            else:
                built = spawn("build-llama", directory=scratch / size, model_path=real,
                              shape=json.dumps(RANDOM_LLAMAS[size]))
                models[size] = (built["path"], "chat")
        sizes = {}
        for size, (path, prompt_format) in models.items():
            facts = model_facts(path, prompt_format)
            # 64 new tokens unless the model's positions are fewer (arith-gpt: 64 positions, 7-token prompts -> 57)
            new_tokens = min(NEW_TOKENS, (facts["max_positions"] or 10**9) - max(facts["prompt_tokens"]))
            label = f"{facts['parameters'] / 1e6:.1f}M"
            mode = OURS_MODE.get(size, {})
            sizes[size] = {"label": label, "new_tokens": new_tokens, "prompt_format": prompt_format,
                           "ours": "LoRA r=16 + checkpointing" if mode.get("lora") else "full fine-tuning", **facts}
            print(f"size {size}: {facts['parameters']:,} parameters ({label}), {prompt_format} prompts of "
                  f"{facts['prompt_tokens'][0]} tokens, {new_tokens} new tokens; rlhf-pg {sizes[size]['ours']}"
                  f"{'' if size in TRL_SIZES else '; TRL not run (would not fit)'}", flush=True)
        print(f"== throughput over model sizes (beta 0, B={BATCH}; {warmup} warm-up + {measured} measured steps, "
              f"{rounds} rounds; threads: {threads}; rlhf-pg train.micro_batch_size "
              f"{args.ours_micro_batch or 'null'}) ==", flush=True)
        for size, (path, prompt_format) in models.items():
            info = sizes[size]
            job = {"model_path": path, "beta": 0.0, "prompt_format": prompt_format, "new_tokens": info["new_tokens"],
                   "reward": "digit_vowel_fraction"}
            contenders = ("ours", "trl") if size in TRL_SIZES else ("ours",)
            entries = _rounds(spawn, {size: job}, contenders, rounds, warmup, measured,
                              {**_ours(args), **OURS_MODE.get(size, {})})[size]
            _summarize(f"size={info['label']}", entries, BATCH * info["new_tokens"])
            info["contenders"] = entries
            if size != "arith":  # the FLOP bound of a Llama's matmuls (arith-gpt's Conv1D layers are not linear)
                rate = spawn("matmul-rate", model_path=path, rows_update=BATCH * info["new_tokens"], rows_decode=BATCH)
                flops = counted_flops(info["parameters"], info["prompt_tokens"], 0.0, info["new_tokens"])
                info["flop_bound_seconds"] = sum(flops.values()) / combined_rate(flops, rate)
                info["flop_bound_fraction"] = info["flop_bound_seconds"] / entries["ours"]["s_per_step"]
                info["onednn_vs_mkl"] = rate["update"]["onednn_vs_mkl"]
            if entries["ours"].get("estimate_mb"):  # rlhf-pg doctor's estimate against the measured peak
                info["estimate_vs_peak"] = entries["ours"]["estimate_mb"] / entries["ours"]["peak_rss_mb"]
            if "trl" in entries:
                info["ratio_vs_trl"] = entries["ours"]["tokens_per_s"] / entries["trl"]["tokens_per_s"]
                info["peak_rss_ratio_vs_trl"] = entries["ours"]["peak_rss_mb"] / entries["trl"]["peak_rss_mb"]
            print(f"size={info['label']} " + " ".join(f"{key}={info[key]:.2f}" for key in (
                "ratio_vs_trl", "peak_rss_ratio_vs_trl", "flop_bound_fraction", "onednn_vs_mkl", "estimate_vs_peak")
                if key in info), flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.plot:
        plot_sizes(sizes, Path(__file__).resolve().parent / "sizes.png")
    return {"threads": threads, "rounds": rounds, "warmup_steps": warmup, "measured_steps": measured, "sizes": sizes}


def plot_sizes(sizes: dict, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    ordered = sorted(sizes.values(), key=lambda info: info["parameters"])
    for name, label in (("ours", "rlhf-pg"), ("trl", "TRL GRPOTrainer")):
        shown = [info for info in ordered if name in info["contenders"]]
        axes.plot([info["parameters"] for info in shown], [info["contenders"][name]["tokens_per_s"] for info in shown],
                  marker="o", label=label)
        if name == "ours":
            for info in shown:
                axes.annotate(f"{info['contenders'][name]['peak_rss_mb'] / 1024:.1f} GiB"
                              + (" LoRA" if info["ours"].startswith("LoRA") else ""),
                              (info["parameters"], info["contenders"][name]["tokens_per_s"]), fontsize=7,
                              textcoords="offset points", xytext=(4, 4))
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("parameters")
    axes.set_ylabel("completion tokens/s")
    axes.set_title(f"B={BATCH}, {NEW_TOKENS} new tokens (arith-gpt: 57), fp32, beta 0")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(target, dpi=120)
    print(f"plot: {target}")
