"""Recipes: YAML -> typed dataclasses, strict validation, ``key=value`` dotted overrides.

A recipe is a YAML mapping whose sections mirror the dataclasses below (``model``, ``data``,
``rewards``, ``rollout``, ``algorithm``, ``optim``, ``train``, ``eval``, ``peft``). Every key has a
default, so ``{}``-like recipes are valid; unknown keys, wrong types and out-of-range values are
``RecipeError``s that name the key and say how to fix it (with the closest valid key when misspelt).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import RecipeError


def _field(default: Any = None, *, help: str, min: float | None = None, max: float | None = None,
           min_exclusive: bool = False, factory: Any = None) -> Any:
    """A dataclass field with its documentation and range (checked by ``validate``)."""
    metadata = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


SEED_MAX = 2**32 - 1  # numpy's seed range (accelerate seeds python, numpy and torch with the same value)
MAX_ARITHMETIC_PROBLEMS = 10_000_000  # the arithmetic task enumerates every operand pair in memory


@dataclass
class ModelConfig:
    """The policy to fine-tune (any Hugging Face causal LM)."""

    name_or_path: str = _field("builtin:arith-gpt", help="'builtin:arith-gpt', a local directory, or a hub id (online only)")
    dtype: Literal["float32", "bfloat16", "float16"] = _field("float32", help="weights dtype when loading")
    revision: str | None = _field(None, help="hub revision (branch, tag or commit)")
    trust_remote_code: bool = _field(False, help="allow custom modelling code from the hub")
    attn_implementation: str | None = _field(None, help="e.g. 'sdpa' or 'eager'; None lets transformers choose")
    gradient_checkpointing: bool = _field(False, help="recompute activations in the backward pass to save memory")


@dataclass
class DataConfig:
    """Where prompts come from: a built-in generated task, or a dataset loaded with ``datasets``."""

    task: Literal["arithmetic"] | None = _field("arithmetic", help="built-in generated task; set to null when using path")
    max_operand: int = _field(99, min=0, help="arithmetic: largest operand")
    min_operand: int = _field(0, min=0, help="arithmetic: smallest operand")
    num_eval: int = _field(200, min=1, help="held-out prompts for evaluation (taken out of the training prompts)")
    path: str | None = _field(None, help="local .jsonl/.json/.csv/.parquet file or directory, or a hub dataset name")
    split: str = _field("train", help="split of `path` used for training")
    eval_split: str | None = _field(None, help="split used for evaluation; default: hold out num_eval rows of `split`")
    prompt_column: str = _field("prompt", help="column holding the prompt text")
    completion_column: str = _field("completion", help="sft/compare: column holding the target completion text")
    shuffle_seed: int = _field(0, min=0, max=SEED_MAX, help="seed of the held-out split and the prompt order")


@dataclass
class RewardSpec:
    """One reward function and its weight; any other keys are passed to the function as keyword arguments."""

    name: str = _field("arithmetic_exact", help="registered name (see reward_models) or 'package.module:function'")
    weight: float = _field(1.0, help="weight in the weighted sum of rewards")
    params: dict[str, Any] = _field(help="extra keyword arguments for the function (written inline in the recipe)", factory=dict)


@dataclass
class RolloutConfig:
    """Sampling: how many completions per step and how they are drawn."""

    prompts_per_step: int = _field(32, min=1, help="prompts per training step (across all processes)")
    completions_per_prompt: int = _field(4, min=1, help="completions sampled per prompt (a group)")
    max_new_tokens: int = _field(8, min=1, help="longest completion, in tokens")
    min_new_tokens: int = _field(0, min=0, help="EOS is forbidden before this many tokens")
    temperature: float = _field(1.0, min=0.0, help="sampling temperature (0 = greedy, no exploration)")
    top_p: float = _field(1.0, min=0.0, max=1.0, min_exclusive=True, help="nucleus sampling mass")


@dataclass
class AlgorithmConfig:
    """The estimator: returns, baseline, loss aggregation, KL control, off-policy reuse."""

    estimator: Literal["reinforce", "filtered_bc"] = _field(
        "reinforce", help="trajectory weights: 'reinforce' A = G - b; 'filtered_bc' A = 1[R >= reward_threshold] "
        "(maximum likelihood on the policy's own good samples; baseline is not used)")
    reward_threshold: float = _field(1.0, help="filtered_bc: keep a sample when its return R >= this")
    gamma: float = _field(1.0, min=0.0, max=1.0, help="discount in the reward-to-go")
    baseline: Literal["none", "batch_mean", "group_mean", "leave_one_out", "timestep_mean"] = _field(
        "leave_one_out", help="baseline subtracted from the reward-to-go")
    whiten: bool = _field(False, help="normalize advantages to zero mean, unit std over the batch")
    aggregation: Literal["seq-mean-token-sum", "token-mean", "seq-mean-token-mean"] = _field(
        "seq-mean-token-sum", help="how per-token terms are reduced to the loss")
    kl_coef: float = _field(0.0, min=0.0, help="KL-to-reference coefficient (0 = no reference model)")
    kl_estimator: Literal["k1", "k2", "k3"] = _field("k1", help="per-token KL estimator")
    kl_mode: Literal["reward", "loss"] = _field("reward", help="KL as a per-token reward penalty or a loss term")
    kl_target: float | None = _field(None, min=0.0, min_exclusive=True, help="adaptive KL controller target (None = fixed kl_coef)")
    kl_horizon: int = _field(10000, min=1, help="adaptive KL controller horizon, in samples")
    log_kl: bool = _field(False, help="load the frozen reference and log kl/ref every step even when kl_coef is 0")
    updates_per_batch: int = _field(1, min=1, help="optimizer steps per rollout batch (>1 = off-policy reuse with clipping)")
    clip_eps: float = _field(0.2, min=0.0, help="trust region: clip ratios to [1-clip_eps, 1+clip_eps_high]")
    clip_eps_high: float | None = _field(None, min=0.0, help="upper clip (default clip_eps)")
    ratio_level: Literal["token", "sequence"] = _field("token", help="importance ratio per token or per sequence")
    max_approx_kl: float | None = _field(None, min=0.0, min_exclusive=True, help="stop reusing a batch once KL(pi_old||pi) exceeds this")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = _field(1e-3, min=0.0, min_exclusive=True, help="peak learning rate")
    weight_decay: float = _field(0.0, min=0.0, help="AdamW weight decay")
    beta1: float = _field(0.9, min=0.0, max=1.0, help="AdamW beta1")
    beta2: float = _field(0.999, min=0.0, max=1.0, help="AdamW beta2")
    max_grad_norm: float | None = _field(1.0, min=0.0, min_exclusive=True, help="gradient clipping (None = off)")
    schedule: Literal["constant", "linear", "cosine"] = _field("constant", help="decay after warm-up")
    warmup_steps: int = _field(0, min=0, help="linear warm-up steps")


@dataclass
class TrainConfig:
    """Length of the run, precision, memory, checkpoints and logging."""

    steps: int = _field(100, min=1, help="optimizer steps (rollout batches)")
    micro_batch_size: int | None = _field(None, min=1, help="completions per forward/backward (None = whole batch)")
    mixed_precision: Literal["no", "bf16", "fp16"] = _field("no", help="accelerate mixed precision")
    eval_every: int = _field(25, min=0, help="held-out evaluation every N steps (0 = only before and after)")
    save_every: int = _field(50, min=0, help="checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = _field(2, min=1, help="how many recent checkpoints to keep")
    max_nonfinite_steps: int = _field(5, min=1, help="stop after this many consecutive non-finite updates")
    num_threads: int | None = _field(None, min=1, help="torch CPU threads (None = torch's default)")
    tensorboard: bool = _field(True, help="also write TensorBoard event files")


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy decoding scored by the recipe's rewards (or ``rewards`` here)."""

    batch_size: int = _field(256, min=1, help="prompts per generation batch")
    max_new_tokens: int | None = _field(None, min=1, help="default: rollout.max_new_tokens")
    temperature: float = _field(0.0, min=0.0, help="0 = greedy")
    rewards: list[RewardSpec] | None = _field(None, help="rewards for evaluation (default: the training rewards)")


@dataclass
class PeftConfig:
    """LoRA adapters through ``peft``."""

    r: int = _field(8, min=1, help="LoRA rank")
    alpha: float = _field(16.0, min=0.0, min_exclusive=True, help="LoRA alpha")
    dropout: float = _field(0.0, min=0.0, max=1.0, help="LoRA dropout")
    target_modules: list[str] | str | None = _field(None, help="module names to adapt (None = peft's default for the model)")
    merge: bool = _field(False, help="also write the merged model to final/merged")


@dataclass
class SftConfig:
    """Maximum likelihood on demonstrations (``rlhf-pg sft``, and the SFT arms of ``rlhf-pg compare``)."""

    batch_size: int | None = _field(None, min=1, help="demonstrations per optimizer step "
                                    "(None = rollout.prompts_per_step * rollout.completions_per_prompt, as many as RL samples)")
    demonstrator: Literal["flawed", "exact"] = _field(
        "flawed", help="built-in arithmetic task: who writes the completions ('flawed' forgets carries, 'exact' never does)")
    forget_carry: float = _field(0.7, min=0.0, max=1.0, help="flawed demonstrator: probability of dropping each carry "
                                 "(0.7 is the demonstrator builtin:arith-gpt imitates)")


@dataclass
class CompareConfig:
    """``rlhf-pg compare``: which arms run from the same model with the same budget."""

    arms: list[Literal["sft", "sft_exact", "filtered_bc", "rl"]] = _field(
        help="'sft' (the recipe's demonstrator), 'sft_exact' (exact demonstrator, arithmetic only), "
        "'filtered_bc' (ML on own samples with R >= algorithm.reward_threshold), 'rl' (REINFORCE)",
        factory=lambda: ["sft", "rl"])


@dataclass
class Recipe:
    """A whole run."""

    model: ModelConfig = _field(help="the policy", factory=ModelConfig)
    data: DataConfig = _field(help="prompts", factory=DataConfig)
    rewards: list[RewardSpec] = _field(help="reward functions, summed with weights", factory=lambda: [RewardSpec()])
    rollout: RolloutConfig = _field(help="sampling", factory=RolloutConfig)
    algorithm: AlgorithmConfig = _field(help="estimator", factory=AlgorithmConfig)
    optim: OptimConfig = _field(help="optimizer", factory=OptimConfig)
    train: TrainConfig = _field(help="run length, checkpoints", factory=TrainConfig)
    eval: EvalConfig = _field(help="held-out evaluation", factory=EvalConfig)
    peft: PeftConfig | None = _field(None, help="LoRA adapters (null = full fine-tuning)")
    sft: SftConfig = _field(help="maximum likelihood on demonstrations (rlhf-pg sft)", factory=SftConfig)
    compare: CompareConfig = _field(help="arms of rlhf-pg compare", factory=CompareConfig)
    seed: int = _field(0, min=0, max=SEED_MAX, help="seed for sampling, data order and initialization")
    output_dir: str | None = _field(None, help="where the run is written (default runs/<recipe name>)")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (reward params inlined), loadable again with ``recipe_from_dict``."""
        data = dataclasses.asdict(self)
        data["rewards"] = [_reward_to_dict(r) for r in self.rewards]
        if self.eval.rewards is not None:
            data["eval"]["rewards"] = [_reward_to_dict(r) for r in self.eval.rewards]
        return data


def _reward_to_dict(spec: RewardSpec) -> dict[str, Any]:
    return {"name": spec.name, "weight": spec.weight, **spec.params}


# --- reward-model recipes (rlhf-pg reward-model) -------------------------------------------------


@dataclass
class RewardModelBackbone:
    """The reward model: ``AutoModelForSequenceClassification`` with one output, the scalar reward."""

    name_or_path: str | None = _field(
        "builtin:arith-gpt", help="initial weights: 'builtin:arith-gpt', a local directory, or a hub id (online only); "
        "a causal LM's weights are fine (the score head is new); null = build from `config`")
    config: dict[str, Any] | None = _field(
        None, help="build a small model from scratch instead: transformers config keys with model_type, e.g. "
        "{model_type: llama, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, intermediate_size: 128}")
    tokenizer: str | None = _field(
        None, help="tokenizer directory or hub id (default: name_or_path's); 'builtin:char' = arith-gpt's character tokenizer")


@dataclass
class PreferenceDataConfig:
    """Preference pairs: generated by the built-in task, or a dataset in TRL's preference format."""

    task: Literal["arith_preferences"] | None = _field(
        "arith_preferences", help="built-in generated pairs (base-model samples labelled by a hidden gold reward); "
        "ignored when path is set")
    path: str | None = _field(None, help="local .jsonl/.json/.parquet file or directory, or a hub dataset name, with "
                              "chosen/rejected columns (and optionally prompt and margin)")
    split: str = _field("train", help="split of `path` used for training")
    eval_split: str | None = _field(None, help="split used for held-out accuracy; default: hold out num_eval pairs of `split`")
    num_eval: int = _field(500, min=1, help="held-out pairs (taken out of the training pairs when eval_split is null)")
    prompt_column: str = _field("prompt", help="prompt column (explicit-prompt format); when absent, chosen/rejected "
                                "are whole texts (implicit prompt)")
    chosen_column: str = _field("chosen", help="column holding the preferred text or completion")
    rejected_column: str = _field("rejected", help="column holding the other text or completion")
    shuffle_seed: int = _field(0, help="seed of the held-out split and of the generated pairs")
    num_pairs: int = _field(6000, min=2, help="arith_preferences: pairs to generate (training + held out)")
    generator: str = _field("builtin:arith-gpt", help="arith_preferences: the causal LM whose samples are compared")
    temperature: float = _field(1.5, min=0.0, min_exclusive=True, help="arith_preferences: sampling temperature "
                                "(above 1: more varied answers, a better-covered reward model)")
    max_new_tokens: int = _field(8, min=1, help="arith_preferences: longest sampled completion (unfinished ones are dropped)")
    label_noise: float = _field(0.05, min=0.0, max=0.5, help="arith_preferences: probability that a pair's label is flipped")
    gold: str = _field("arithmetic_exact", help="arith_preferences: the hidden gold reward that labels the pairs "
                       "(registered name or 'pkg.module:function')")
    max_operand: int = _field(99, min=1, help="arith_preferences: largest operand")
    heldout_problems: int = _field(200, min=0, help="arith_preferences: problems never used for pairs: the RL "
                                   "recipes' held-out set (their data.num_eval with the same shuffle_seed)")


@dataclass
class RewardModelTrainConfig:
    """Length of the reward-model run, batching, evaluation and logging."""

    epochs: int = _field(2, min=1, help="passes over the training pairs")
    batch_size: int = _field(64, min=1, help="pairs per optimizer step")
    max_length: int | None = _field(None, min=1, help="drop pairs whose texts exceed this many tokens (None = keep all)")
    eval_every: int = _field(50, min=0, help="held-out pair accuracy every N steps (0 = only at the end)")
    eval_batch_size: int = _field(256, min=1, help="pairs per forward pass in evaluation")
    mixed_precision: Literal["no", "bf16", "fp16"] = _field("no", help="accelerate mixed precision")
    num_threads: int | None = _field(None, min=1, help="torch CPU threads (None = torch's default)")
    tensorboard: bool = _field(True, help="also write TensorBoard event files")


@dataclass
class RewardModelRecipe:
    """A Bradley-Terry reward-model run (``rlhf-pg reward-model RECIPE``)."""

    model: RewardModelBackbone = _field(help="the reward model", factory=RewardModelBackbone)
    data: PreferenceDataConfig = _field(help="preference pairs", factory=PreferenceDataConfig)
    optim: OptimConfig = _field(help="optimizer", factory=OptimConfig)
    train: RewardModelTrainConfig = _field(help="run length, evaluation", factory=RewardModelTrainConfig)
    seed: int = _field(0, help="seed for initialization and batch order")
    output_dir: str | None = _field(None, help="where the run is written (default runs/<recipe name>)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading and validation ----------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters (messages stay one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` converted to type ``tp`` or a ``RecipeError`` naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except RecipeError as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]  # `X | None`: X's own message is the precise one (e.g. the item of a list)
        raise RecipeError(f"{where}: expected {_type_name(tp)}, got {_short(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"{where}: {_short(value)} is not allowed; choose one of {', '.join(map(repr, choices))}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected {_type_name(tp)}, got {_short(value)}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {_short(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _dataclass_from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{where}: expected true or false, got {_short(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(f"{where}: expected an integer, got {_short(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML reads 1e-3 (no dot) as a string
            except ValueError:
                raise RecipeError(f"{where}: expected a number, got {_short(value)}") from None
        else:
            raise RecipeError(f"{where}: expected a number, got {_short(value)}")
        if not math.isfinite(number):
            raise RecipeError(f"{where}: expected a finite number, got {_short(value)}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{where}: expected a string, got {_short(value)}")
    raise TypeError(f"unsupported recipe type {tp!r} at {where}")  # a bug in the schema, not user input


def _dataclass_from_dict(cls: type, data: Any, where: str) -> Any:
    if cls is RewardSpec and isinstance(data, str):
        data = {"name": data}
    if cls is ModelConfig and isinstance(data, str):
        data = {"name_or_path": data}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of keys to values, got {_short(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known or (cls is RewardSpec and key == "params"):
            if cls is RewardSpec:
                if not isinstance(key, str) or not key.isidentifier():
                    raise RecipeError(f"{where}: {_short(key)} is not a valid keyword argument name for a reward function")
                extra[key] = value  # reward keyword arguments, checked against the function later
                continue
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys here: {', '.join(known)}"
            raise RecipeError(f"unknown recipe key {_short(path)}{hint}")
        values[key] = _coerce(value, hints[key], path)
    if cls is RewardSpec:
        values["params"] = extra
    instance = cls(**values)
    _check_ranges(instance, where)
    return instance


def _check_ranges(instance: Any, where: str) -> None:
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        low, high = f.metadata.get("min"), f.metadata.get("max")
        path = f"{where}.{f.name}" if where else f.name
        if low is not None and (value < low or (f.metadata.get("min_exclusive") and value == low)):
            relation = ">" if f.metadata.get("min_exclusive") else ">="
            raise RecipeError(f"{path}: {_short(value)} is out of range; it must be {relation} {low}")
        if high is not None and value > high:
            raise RecipeError(f"{path}: {_short(value)} is out of range; it must be <= {high}")


def _check_consistency(recipe: Recipe) -> None:
    """Rules that involve more than one key."""
    if recipe.data.task is None and recipe.data.path is None:
        raise RecipeError("data: set either data.task (a built-in task) or data.path (a dataset file or name)")
    if recipe.data.min_operand > recipe.data.max_operand:
        raise RecipeError("data.min_operand must be <= data.max_operand")
    if recipe.data.path is None:
        problems = (recipe.data.max_operand - recipe.data.min_operand + 1) ** 2
        if problems > MAX_ARITHMETIC_PROBLEMS:
            raise RecipeError(
                f"data.max_operand={recipe.data.max_operand}: the arithmetic task would enumerate {problems:,} problems "
                f"(at most {MAX_ARITHMETIC_PROBLEMS:,}); lower data.max_operand or raise data.min_operand")
        if recipe.data.num_eval >= problems:
            raise RecipeError(
                f"data.num_eval={recipe.data.num_eval} leaves no training problems: operands {recipe.data.min_operand}.."
                f"{recipe.data.max_operand} give only {problems} problems; lower data.num_eval or raise data.max_operand")
    if recipe.rollout.min_new_tokens > recipe.rollout.max_new_tokens:
        raise RecipeError("rollout.min_new_tokens must be <= rollout.max_new_tokens")
    if recipe.algorithm.estimator == "filtered_bc" and recipe.algorithm.whiten:
        raise RecipeError("algorithm.whiten must be false with algorithm.estimator 'filtered_bc' "
                          "(its weights are 0/1 by definition)")
    if not recipe.compare.arms:
        raise RecipeError("compare.arms: list at least one arm, e.g. [sft, rl]")
    if len(set(recipe.compare.arms)) != len(recipe.compare.arms):
        raise RecipeError(f"compare.arms: {recipe.compare.arms} lists an arm twice; list each arm once")
    if (recipe.algorithm.estimator == "reinforce" and recipe.algorithm.baseline in ("leave_one_out",)
            and recipe.rollout.completions_per_prompt < 2):
        raise RecipeError(
            "algorithm.baseline 'leave_one_out' needs rollout.completions_per_prompt >= 2 "
            "(it averages the other completions of the same prompt)"
        )
    if not recipe.rewards:
        raise RecipeError("rewards: list at least one reward function, e.g. rewards: [{name: arithmetic_exact}]")
    if recipe.algorithm.kl_target is not None and recipe.algorithm.kl_coef == 0:
        raise RecipeError("algorithm.kl_target adapts the KL coefficient multiplicatively, so it needs a starting "
                          "algorithm.kl_coef > 0 (e.g. 0.05)")


def recipe_from_dict(data: Any, source: str = "recipe") -> Recipe:
    """Validate plain data into a ``Recipe``; ``RecipeError`` names the offending key and ``source``."""
    if data is None:
        raise RecipeError(f"{source} is empty; a recipe is a YAML mapping, e.g. 'train: {{steps: 100}}'")
    if not isinstance(data, dict):
        raise RecipeError(f"{source} must be a YAML mapping of sections (model, data, rewards, ...), got {type(data).__name__}")
    try:
        recipe = _dataclass_from_dict(Recipe, data, "")
        _check_consistency(recipe)
    except RecipeError as error:
        raise RecipeError(f"{source}: {error}") from None
    return recipe


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file; missing files and syntax errors become ``RecipeError`` with the line number."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file not found: {path} (give the path of a .yaml recipe, e.g. recipes/quickstart.yaml)")
    if path.is_dir():
        raise RecipeError(f"{path} is a directory; give the path of a .yaml recipe file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"cannot read recipe {path}: {error}") from None
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise RecipeError(f"{path}: malformed YAML: nested too deeply to be a recipe") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join((getattr(error, "problem", None) or str(error).splitlines()[0]).split())
        context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
        if context and context_mark is not None and (mark is None or context_mark.line != mark.line):
            problem += f" ({' '.join(context.split())} that starts at line {context_mark.line + 1})"
        raise RecipeError(f"{path}: malformed YAML{where}: {problem}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> ``(["optim", "lr"], 0.001)``; the value is parsed as YAML."""
    if "=" not in text:
        raise RecipeError(f"override {_short(text)} must look like key=value, e.g. optim.lr=0.001")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {_short(text)} has an empty key; write e.g. train.steps=50")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    except RecursionError:
        raise RecipeError(f"override {_short(text)}: the value is nested too deeply") from None
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str], root: type | None = None) -> dict[str, Any]:
    """Set each dotted ``key=value`` in ``data`` (list items by index: ``rewards.0.weight=0.5``).

    Keys must exist in the schema ``root`` (default ``Recipe``; ``GymRecipe``, ``RewardModelRecipe``);
    ``recipe_from_dict`` reports unknown ones with a suggestion.
    """
    for text in overrides:
        parts, value = parse_override(text)
        node: Any = data
        cls: Any = root or Recipe
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise RecipeError(f"override {_short(text)}: {_short(where)} is not an item of the list (it has {len(node)})")
                index = int(part)
                if last:
                    node[index] = value
                else:
                    node = node[index]
                cls = RewardSpec
                continue
            if dataclasses.is_dataclass(cls) and cls is not RewardSpec:
                names = [f.name for f in dataclasses.fields(cls)]
                if part not in names:
                    close = difflib.get_close_matches(part, names, n=1, cutoff=0.5)
                    hint = f"; did you mean '{'.'.join(parts[:depth] + [close[0]])}'?" if close else ""
                    raise RecipeError(f"override {_short(text)}: unknown recipe key {_short(where)}{hint}")
                cls = _section_type(typing.get_type_hints(cls)[part])
                if not last and not (dataclasses.is_dataclass(cls) or cls in (list, dict)):
                    raise RecipeError(f"override {_short(text)}: '{where}' is a value, not a section; write {where}=VALUE")
            if not isinstance(node, dict):
                raise RecipeError(f"override {_short(text)}: {_short('.'.join(parts[:depth]))} is not a section")
            if last:
                node[part] = value
            else:
                child = node.get(part)
                if child is None:
                    child = [] if cls is list else {}
                    if typing.get_origin(cls) is list:
                        child = []
                    node[part] = child
                elif isinstance(child, str):  # shorthand such as `model: builtin:arith-gpt`
                    child = {"name_or_path": child} if part == "model" else {"name": child}
                    node[part] = child
                node = child
    return data


def _section_type(tp: Any) -> Any:
    """The dataclass (or list, or dict) type behind an optional/list/mapping annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is not type(None):
                return _section_type(arg)
    if origin is list:
        return list
    if origin is dict:
        return dict  # a free-form mapping (e.g. a model config): any keys below it
    return tp


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe file."""
    data = load_yaml(path)
    if data is None:
        raise RecipeError(f"{path} is empty; a recipe is a YAML mapping, e.g. 'train: {{steps: 100}}'")
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides)
    return recipe_from_dict(data, source=str(path))


def _check_reward_model_consistency(recipe: RewardModelRecipe) -> None:
    data, model = recipe.data, recipe.model
    if data.task is None and data.path is None:
        raise RecipeError("data: set either data.task (arith_preferences) or data.path (a preference dataset)")
    if model.name_or_path is None and model.config is None:
        raise RecipeError("model: set model.name_or_path (initial weights) or model.config (build from scratch)")
    if model.name_or_path is not None and model.config is not None:
        raise RecipeError("model: set only one of model.name_or_path and model.config (null the other)")
    if model.config is not None and "model_type" not in model.config:
        raise RecipeError("model.config: name the architecture with model_type, e.g. model_type: llama")
    if data.path is None and data.num_eval >= data.num_pairs:
        raise RecipeError(f"data.num_eval ({data.num_eval}) must be smaller than data.num_pairs ({data.num_pairs})")


def reward_model_recipe_from_dict(data: Any, source: str = "recipe") -> RewardModelRecipe:
    """Validate plain data into a ``RewardModelRecipe``; ``RecipeError`` names the offending key and ``source``."""
    if data is None:
        raise RecipeError(f"{source} is empty; a reward-model recipe is a YAML mapping, e.g. 'train: {{epochs: 2}}'")
    if not isinstance(data, dict):
        raise RecipeError(f"{source} must be a YAML mapping of sections (model, data, optim, train), got {type(data).__name__}")
    if "rewards" in data or "rollout" in data:
        raise RecipeError(f"{source} is an RL recipe (it has rewards/rollout); train it with 'rlhf-pg train'")
    try:
        recipe = _dataclass_from_dict(RewardModelRecipe, data, "")
        _check_reward_model_consistency(recipe)
    except RecipeError as error:
        raise RecipeError(f"{source}: {error}") from None
    return recipe


def load_reward_model_recipe(path: str | Path, overrides: list[str] | None = None) -> RewardModelRecipe:
    """Load, override and validate a reward-model recipe file."""
    data = load_yaml(path)
    if data is None:
        raise RecipeError(f"{path} is empty; a reward-model recipe is a YAML mapping, e.g. 'train: {{epochs: 2}}'")
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides, root=RewardModelRecipe)
    return reward_model_recipe_from_dict(data, source=str(path))


def recipe_keys(root: type | None = None) -> list[tuple[str, str, str]]:
    """Every recipe key of ``root`` (default ``Recipe``) as ``(dotted key, default, help)``, for documentation."""
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            section = _section_type(hints[f.name])
            if dataclasses.is_dataclass(section) and section is not RewardSpec:
                walk(section, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else "(see below)"
            rows.append((prefix + f.name, repr(default), f.metadata.get("help", "")))

    walk(root or Recipe, "")
    return rows


# --- the toy track: gymnasium recipes (``rlhf-pg gym``) --------------------------------------------
# Same estimator keys as the LM track (gamma, baseline, whiten, aggregation), same optimizer section;
# what differs is where trajectories come from: a vector of gymnasium environments, not a tokenizer.

GymBaseline = Literal["none", "batch_mean", "group_mean", "leave_one_out", "timestep_mean", "value"]


@dataclass
class GymEnvConfig:
    """The environment: any registered gymnasium id, run as ``num_envs`` synchronous copies."""

    id: str = _field("CartPole-v1", help="gymnasium environment id, e.g. CartPole-v1, Acrobot-v1, InvertedPendulum-v5")
    kwargs: dict[str, Any] = _field(help="keyword arguments for gymnasium.make (e.g. {natural: true} for Blackjack)", factory=dict)
    num_envs: int = _field(16, min=1, help="environments stepped together (gymnasium.vector.SyncVectorEnv)")
    episodes_per_env: int = _field(1, min=1, help="complete episodes each environment contributes per update")
    max_episode_steps: int | None = _field(None, min=1, help="time limit (None = the environment's own)")


@dataclass
class GymPolicyConfig:
    """The policy network: an MLP giving a categorical (discrete actions) or Gaussian (continuous) distribution."""

    hidden_sizes: list[int] = _field(help="hidden layer widths; [] = linear (a tabular softmax on one-hot states)",
                                     factory=lambda: [64, 64])
    activation: Literal["tanh", "relu"] = _field("tanh", help="hidden-layer nonlinearity")
    init_log_std: float = _field(-0.5, help="continuous actions: initial log standard deviation (learned, state-independent)")


@dataclass
class GymValueConfig:
    """The learned state-value baseline V(s), used when ``algorithm.baseline`` is ``value``."""

    hidden_sizes: list[int] = _field(help="hidden layer widths of V", factory=lambda: [64, 64])
    lr: float = _field(1e-3, min=0.0, min_exclusive=True, help="learning rate of V (a second parameter group of the optimizer)")
    epochs: int = _field(5, min=1, help="full-batch regression steps of V on the returns, per update")


@dataclass
class GymAlgorithmConfig:
    """The estimator, with the LM track's names: reward-to-go with gamma, a baseline, whitening, aggregation."""

    gamma: float = _field(0.99, min=0.0, max=1.0, help="discount in the reward-to-go")
    baseline: GymBaseline = _field(
        "timestep_mean", help="baseline subtracted from the reward-to-go; a registry kind (the batch is one group) or 'value' (learned V(s_t))")
    whiten: bool = _field(False, help="normalize advantages to zero mean, unit std over the batch")
    aggregation: Literal["seq-mean-token-sum", "token-mean", "seq-mean-token-mean"] = _field(
        "seq-mean-token-sum", help="how per-step terms are reduced to the loss")


@dataclass
class GymTrainConfig:
    """Length of the run, checkpoints and logging."""

    steps: int = _field(100, min=1, help="policy updates (each on num_envs * episodes_per_env fresh episodes)")
    save_every: int = _field(0, min=0, help="checkpoint every N updates (0 = only the final policy)")
    keep_checkpoints: int = _field(2, min=1, help="how many recent checkpoints to keep")
    num_threads: int | None = _field(1, min=1, help="torch CPU threads (small MLPs are fastest on one)")
    tensorboard: bool = _field(False, help="also write TensorBoard event files")


@dataclass
class GymEvalConfig:
    """Evaluation of the final policy: mean undiscounted return over fresh episodes."""

    episodes: int = _field(50, min=20, help="evaluation episodes (at least 20)")
    deterministic: bool = _field(True, help="act greedily (argmax / Gaussian mean) instead of sampling")
    every: int = _field(0, min=0, help="also evaluate every N updates (0 = only at the end)")


@dataclass
class GymRecipe:
    """A toy-track run: REINFORCE on a gymnasium environment."""

    env: GymEnvConfig = _field(help="the environment", factory=GymEnvConfig)
    policy: GymPolicyConfig = _field(help="the policy network", factory=GymPolicyConfig)
    value: GymValueConfig = _field(help="the learned value baseline", factory=GymValueConfig)
    algorithm: GymAlgorithmConfig = _field(help="estimator", factory=GymAlgorithmConfig)
    optim: OptimConfig = _field(help="optimizer (AdamW) and learning-rate schedule", factory=OptimConfig)
    train: GymTrainConfig = _field(help="run length, checkpoints", factory=GymTrainConfig)
    eval: GymEvalConfig = _field(help="evaluation", factory=GymEvalConfig)
    seed: int = _field(0, help="seed for initialization, action sampling and the environments")
    output_dir: str | None = _field(None, help="where the run is written (default runs/<recipe name>-seed<seed>)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_gym_recipe(data: Any) -> bool:
    """A recipe mapping is a toy-track recipe when it has an ``env`` section."""
    return isinstance(data, dict) and "env" in data


def gym_recipe_from_dict(data: Any, source: str = "recipe") -> GymRecipe:
    """Validate plain data into a ``GymRecipe``; ``RecipeError`` names the offending key and ``source``."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source} must be a YAML mapping of sections (env, policy, algorithm, ...), got {type(data).__name__}")
    try:
        recipe = _dataclass_from_dict(GymRecipe, data, "")
        for name in ("policy", "value"):
            sizes = getattr(recipe, name).hidden_sizes
            if any(size < 1 for size in sizes):
                raise RecipeError(f"{name}.hidden_sizes: every width must be >= 1, got {sizes}")
        batch = recipe.env.num_envs * recipe.env.episodes_per_env
        if recipe.algorithm.baseline == "leave_one_out" and batch < 2:
            raise RecipeError("algorithm.baseline 'leave_one_out' needs at least 2 episodes per update "
                              "(env.num_envs * env.episodes_per_env >= 2)")
    except RecipeError as error:
        raise RecipeError(f"{source}: {error}") from None
    return recipe


def load_gym_recipe(path: str | Path, overrides: list[str] | None = None) -> GymRecipe:
    """Load, override and validate a toy-track recipe file."""
    data = load_yaml(path)
    if data is None:
        raise RecipeError(f"{path} is empty; a gym recipe is a YAML mapping, e.g. 'env: {{id: CartPole-v1}}'")
    if isinstance(data, dict) and not is_gym_recipe(data):
        raise RecipeError(f"{path} has no 'env' section, so it is not a gym recipe; add e.g. 'env: {{id: CartPole-v1}}' "
                          "(language-model recipes run with 'rlhf-pg train')")
    if isinstance(data, dict) and overrides:
        data = apply_overrides(data, overrides, root=GymRecipe)
    return gym_recipe_from_dict(data, source=str(path))
