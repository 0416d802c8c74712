"""``vs_trl.py --sizes``: rlhf-pg vs TRL's GRPOTrainer over model sizes, and the plot.

    HF_HUB_OFFLINE=1 python benchmarks/vs_trl.py --sizes --plot                  # 0.8M, 7.3M, 31.5M, 134.5M: ~12 min
    HF_HUB_OFFLINE=1 python benchmarks/vs_trl.py --sizes 10m --rounds 1 --measured-steps 1   # one size only

Ours vs TRL at beta 0 in the same setting over model sizes: builtin:arith-gpt (0.8M,
character tokenizer, text prompts ``"12+34="``, and fewer new tokens so that prompt + completion fit its
64 positions), random-init Llama models with SmolLM2's tokenizer (built once into a temporary
directory), and the real model (``--model``, default builtin:smollm2-135m-instruct). The reward there is
``digit_vowel_fraction`` (digits or vowels): a random-init model over a 49k-token vocabulary all but never
writes a digit, so with ``digit_fraction`` nearly every group would have equal rewards and rlhf-pg would
skip those rows (exactly; the "groups with equal rewards" figure printed for ours says how many were).
The workers, the rounds and the figures are ``real_model.py``'s (the --model part's), at beta 0 only.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from real_model import BATCH, DEFAULT_MODEL, NEW_TOKENS, _defaults, _rounds, _summarize, model_facts

# random-init Llama configs (SmolLM2's tokenizer, vocab 49152, tied embeddings): 7.3M and 31.5M parameters
RANDOM_LLAMAS = {
    "10m": {"hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 512, "num_attention_heads": 4,
            "num_key_value_heads": 2},
    "40m": {"hidden_size": 384, "num_hidden_layers": 8, "intermediate_size": 1024, "num_attention_heads": 6,
            "num_key_value_heads": 2},
}
SIZE_NAMES = ("arith", "10m", "40m", "real")


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
    LlamaForCausalLM(config).save_pretrained(directory)
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
                models[size] = (build_random_llama(scratch / size, real, **RANDOM_LLAMAS[size]), "chat")
        jobs, sizes = {}, {}
        for size, (path, prompt_format) in models.items():
            facts = model_facts(path, prompt_format)
            # 64 new tokens unless the model's positions are fewer (arith-gpt: 64 positions, 7-token prompts -> 57)
            new_tokens = min(NEW_TOKENS, (facts["max_positions"] or 10**9) - max(facts["prompt_tokens"]))
            label = f"{facts['parameters'] / 1e6:.1f}M"
            sizes[size] = {"label": label, "new_tokens": new_tokens, "prompt_format": prompt_format, **facts}
            jobs[size] = {"model_path": path, "beta": 0.0, "prompt_format": prompt_format, "new_tokens": new_tokens,
                          "reward": "digit_vowel_fraction"}
            print(f"size {size}: {facts['parameters']:,} parameters ({label}), {prompt_format} prompts of "
                  f"{facts['prompt_tokens'][0]} tokens, {new_tokens} new tokens")
        print(f"== throughput over model sizes (beta 0, B={BATCH}; {warmup} warm-up + {measured} measured steps, "
              f"{rounds} rounds; threads: {threads}) ==")
        figures = _rounds(spawn, jobs, ("ours", "trl"), rounds, warmup, measured)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for size, entries in figures.items():
        info = sizes[size]
        _summarize(f"size={info['label']}", entries, BATCH * info["new_tokens"])
        info["contenders"] = entries
        info["ratio_vs_trl"] = entries["ours"]["tokens_per_s"] / entries["trl"]["tokens_per_s"]
        info["peak_rss_ratio_vs_trl"] = entries["ours"]["peak_rss_mb"] / entries["trl"]["peak_rss_mb"]
        print(f"size={info['label']} ratio_vs_trl={info['ratio_vs_trl']:.2f} "
              f"peak_rss_ratio_vs_trl={info['peak_rss_ratio_vs_trl']:.2f}", flush=True)
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
        axes.plot([info["parameters"] for info in ordered],
                  [info["contenders"][name]["tokens_per_s"] for info in ordered], marker="o", label=label)
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
