"""Built-in models that need no download: ``builtin:arith-gpt`` (and, from an installed GGUF, ``builtin:smollm2-135m-instruct``).

``arith-gpt`` is a 4-layer, 128-wide character-level GPT-2 (~0.8M parameters) with a character
tokenizer (``PreTrainedTokenizerFast``; printable ASCII plus <pad>, <bos>, <eos>, <unk>; BOS is added
by the tokenizer itself, so plain ``tokenizer("12+7=")`` reproduces the training encoding). It is
pre-trained by maximum likelihood on a *flawed demonstrator* that forgets each carry with probability
0.7, so imitation plateaus far below 100 % and only reward-driven training fixes the carries.

Where ``builtin_path`` finds it, first match wins:

1. the cache, ``$XDG_CACHE_HOME/rlhf_pg/arith-gpt-v1`` (default ``~/.cache/rlhf_pg``): only there if you
   built it yourself, with ``rlhf-pg build-base --force`` (or an rlhf-pg older than the shipped weights
   built it on first use); delete that directory to go back to the shipped weights;
2. the shipped weights, package data in ``rlhf_pg/weights/arith-gpt-v1`` (3 MB): the builder's own output
   for the current ``ArithBaseSpec`` (regenerate them with ``python -m rlhf_pg.models.builtin --ship``); used
   only if their ``build_spec.json`` equals the current spec;
3. otherwise it is built into the cache (about two minutes on 2 CPU cores, deterministic for a given
   seed and thread count).

Either way it is a ``save_pretrained`` directory loaded with plain ``from_pretrained``.

``builtin:smollm2-135m-instruct`` is a real pretrained chat model converted from a GGUF file that a pip
package ships (``gguf.py``); ``models.resolve_model_path`` hands such names to ``gguf.builtin_gguf_dir``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import string
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.losses import policy_gradient_loss
from ..policy.logprobs import completion_logprobs
from ..tasks.arithmetic import flawed_sum, format_prompt

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARACTERS = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]


@dataclass
class ArithBaseSpec:
    """Everything that decides the built-in base model; ``version`` names the cache and shipped directories
    (bump it when any field changes, and rebuild the shipped weights)."""

    version: int = 1
    max_operand: int = 99
    forget_carry: float = 0.7
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 64
    steps: int = 1200
    batch_size: int = 128
    peak_lr: float = 2e-3
    seed: int = 1234

    @property
    def name(self) -> str:
        return f"arith-gpt-v{self.version}"


BUILTIN_MODELS = {"arith-gpt": ArithBaseSpec()}
SPEC_FILE = "build_spec.json"  # the ArithBaseSpec a build was made from, as JSON


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/rlhf_pg``, default ``~/.cache/rlhf_pg``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rlhf_pg"


def shipped_root() -> Path:
    """``rlhf_pg/weights``: the built-in models shipped as package data."""
    return Path(__file__).resolve().parents[1] / "weights"


def shipped_path(name: str) -> Path | None:
    """The shipped directory of built-in model ``name`` if it is a build of the current spec, else None."""
    spec = BUILTIN_MODELS[name]
    directory = shipped_root() / spec.name
    try:
        shipped_spec = json.loads((directory / SPEC_FILE).read_text())
    except (OSError, ValueError):
        return None
    if shipped_spec != dataclasses.asdict(spec) or not (directory / "model.safetensors").exists():
        return None
    return directory


def char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` that adds ``<bos>`` and pads on the left."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per char
    backend.decoder = decoders.Fuse()
    bos_id = vocab["<bos>"]
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="left", clean_up_tokenization_spaces=False, model_max_length=64,
    )


def _operand(rng: random.Random, max_operand: int) -> int:
    """An operand whose digit count is uniform (so 1-digit operands are as common as 2-digit ones)."""
    digits = rng.randint(1, len(str(max_operand)))
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), min(10**digits - 1, max_operand))


def _demonstrations(spec: ArithBaseSpec, rng: random.Random, batch_size: int) -> tuple[list[str], list[str]]:
    prompts, answers = [], []
    for _ in range(batch_size):
        a, b = _operand(rng, spec.max_operand), _operand(rng, spec.max_operand)
        prompts.append(format_prompt(a, b))
        answers.append(str(flawed_sum(a, b, spec.forget_carry, rng)))
    return prompts, answers


def build_arith_gpt(output_dir: str | Path, spec: ArithBaseSpec = ArithBaseSpec(), progress: bool = True) -> Path:
    """Pre-train arith-gpt by maximum likelihood on the flawed demonstrator; save it to ``output_dir``.

    The ML loss is ``policy_gradient_loss`` with advantages = 1 (token-mean over answer tokens):
    the same code as REINFORCE, with every weight set to 1.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, GenerationConfig

    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    tokenizer = char_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=spec.n_positions, n_embd=spec.n_embd, n_layer=spec.n_layer,
        n_head=spec.n_head, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.peak_lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.peak_lr, total_steps=spec.steps)
    started = time.time()
    progress_bar = _progress(progress)
    with progress_bar:
        task = progress_bar.add_task(f"building builtin:{spec.name.rsplit('-v', 1)[0]}", total=spec.steps)
        for step in range(spec.steps):
            prompts, answers = _demonstrations(spec, rng, spec.batch_size)
            prompt_enc = tokenizer(prompts, padding=True, padding_side="left", return_tensors="pt")
            answer_enc = tokenizer(
                [a + tokenizer.eos_token for a in answers], padding=True, padding_side="right",
                add_special_tokens=False, return_tensors="pt",
            )
            logprobs = completion_logprobs(
                model, prompt_enc["input_ids"], prompt_enc["attention_mask"].float(),
                answer_enc["input_ids"], answer_enc["attention_mask"].float(),
            )
            mask = answer_enc["attention_mask"].float()
            loss = policy_gradient_loss(logprobs, torch.ones_like(mask), mask, aggregation="token-mean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            progress_bar.update(task, advance=1, description=f"building builtin:arith-gpt  loss {loss.item():.3f}")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=8, do_sample=False,
    )
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    (output_dir / "BUILD_INFO.txt").write_text(
        f"{spec}\nbuilt in {time.time() - started:.1f}s with torch {torch.__version__}\n"
    )
    (output_dir / SPEC_FILE).write_text(json.dumps(dataclasses.asdict(spec), indent=1) + "\n")
    return output_dir


def _progress(enabled: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False,
    )


def builtin_path(name: str, progress: bool = True, force: bool = False) -> Path:
    """Local directory of built-in model ``name``: the cache if it holds a build, else the shipped weights,
    else a new build into the cache (see the module docstring). ``force`` rebuilds into the cache.

    Concurrent builds are safe: each builds into a temporary directory and renames it into place.
    """
    if name not in BUILTIN_MODELS:
        raise KeyError(name)
    spec = BUILTIN_MODELS[name]
    target = cache_root() / spec.name
    if force and target.exists():
        shutil.rmtree(target)
    if (target / "config.json").exists():
        return target
    shipped = None if force else shipped_path(name)
    if shipped is not None:
        return shipped
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        build_arith_gpt(staging, spec, progress=progress)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race to nobody: a real error
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def ship(name: str = "arith-gpt", progress: bool = True) -> Path:
    """Rebuild the shipped weights of ``name`` (package data under ``rlhf_pg/weights``) with the builder."""
    spec = BUILTIN_MODELS[name]
    target = shipped_root() / spec.name
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=target.parent))
    try:
        build_arith_gpt(staging, spec, progress=progress)
        for path in [staging, *staging.iterdir()]:  # mkdtemp's 0700 is for the cache; package data is readable
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


__all__ = ["BUILTIN_MODELS", "ArithBaseSpec", "build_arith_gpt", "builtin_path", "cache_root", "char_tokenizer",
           "ship", "shipped_path", "shipped_root"]


if __name__ == "__main__":  # python -m rlhf_pg.models.builtin --ship
    import sys

    if sys.argv[1:] != ["--ship"]:
        sys.exit("usage: python -m rlhf_pg.models.builtin --ship   (rebuilds the shipped weights in rlhf_pg/weights)")
    print(ship())
