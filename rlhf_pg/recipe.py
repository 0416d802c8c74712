"""The LM recipe schema (``rlhf-pg train``, ``sft``, ``compare``, ``eval``, ``variance``): sections and rules.

A recipe is a YAML mapping whose sections mirror the dataclasses below (``model``, ``data``,
``rewards``, ``rollout``, ``algorithm``, ``optim``, ``train``, ``eval``, ``peft``, ``sft``, ``compare``).
The engine that loads, overrides and validates it is ``rlhf_pg.config``; the allowed names of
baselines, aggregations and KL estimators come from ``rlhf_pg.core.estimator``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from . import config
from .config import SEED_MAX, option
from .core.estimator import (AGGREGATION_NAMES, BASELINE_NAMES, IMPORTANCE_NAMES, KL_ESTIMATOR_NAMES, RATIO_LEVEL_NAMES,
                             REMAX_BASELINE, SCALE_NAMES, WEIGHTINGS, EstimatorSpec)
from .core.correction import IS_CORRECTIONS, IS_LEVELS
from .core.presets import PRESETS, check_compatibility, resolve_preset
from .chat import check_chat_template_kwargs
from .episodes.tools import DEFAULT_RESULT_FORMAT, DEFAULT_TOOL_FORMAT, check_episode_keys
from .errors import RecipeError
from .models.config import ModelConfig, PeftConfig
from .policy.sampler import ENGINE_NAMES
from .policy.vllm import VLLMConfig
from .run.optim import OptimConfig
from .run.trackers import check_report_to
from .tasks.arithmetic import PROMPT_FORMATS

MAX_ARITHMETIC_PROBLEMS = 10_000_000  # the arithmetic task enumerates every operand pair in memory
PRESET_NAMES = tuple(PRESETS)


@dataclass
class DataConfig:
    """Where prompts come from: a built-in generated task, or a dataset loaded with ``datasets``."""

    def check(self) -> None:
        check_chat_template_kwargs(self.chat_template_kwargs)

    task: Literal["arithmetic"] | None = option("arithmetic", help="built-in generated task; set to null when using path")
    max_operand: int = option(99, min=0, help="arithmetic: largest operand")
    min_operand: int = option(0, min=0, help="arithmetic: smallest operand")
    num_eval: int = option(200, min=1, help="held-out prompts for evaluation (taken out of the training prompts)")
    path: str | None = option(None, help="local .jsonl/.json/.csv/.parquet file or directory, or a hub dataset name")
    split: str = option("train", help="split of `path` used for training")
    eval_split: str | None = option(None, help="split used for evaluation; default: hold out num_eval rows of `split`")
    prompt_column: str = option("prompt", help="column holding the prompt: a text, or a conversation (a list of "
                                "{role, content} messages, rendered with the tokenizer's chat template)")
    prompt_format: Literal[PROMPT_FORMATS] = option(
        "text", help="built-in arithmetic task: 'text' prompts '12+7=', or 'chat' conversations "
        "[{role: user, content: 'What is 12+7? Reply with only the number.'}] for chat models")
    chat_template_kwargs: dict[str, Any] = option(
        help="extra keyword arguments of tokenizer.apply_chat_template for conversation prompts (e.g. "
        "{enable_thinking: false})", factory=dict)
    completion_column: str = option("completion", help="sft/compare: column holding the target completion: a text, "
                                    "or [{role: assistant, content: ...}] (TRL's conversational prompt-completion)")
    shuffle_seed: int = option(0, min=0, max=SEED_MAX, help="seed of the held-out split and the prompt order")
    # from Python (rlhf_pg.api): datasets.Dataset objects; path / eval_split hold their references python:...@fingerprint
    dataset: Any = option(None, python=True, help="the training prompts given from Python (train_dataset=...)")
    eval_dataset: Any = option(None, python=True, help="the held-out prompts given from Python (eval_dataset=...)")


@dataclass
class RewardSpec:
    """One reward function and its weight; any other keys are passed to the function as keyword arguments."""

    extra_keys: ClassVar[str] = "params"

    @classmethod
    def shorthand(cls, value: Any) -> Any:
        """``rewards: [arithmetic_exact]`` means ``rewards: [{name: arithmetic_exact}]``."""
        return {"name": value} if isinstance(value, str) else value

    name: str = option("arithmetic_exact", help="registered name (see reward_models) or 'package.module:function'")
    weight: float = option(1.0, help="weight in the weighted sum of rewards")
    timeout_s: float | None = option(None, min=0.0, min_exclusive=True, help="seconds one call may take; past it the "
                                     "step fails naming the function (None = no limit); http / llm_judge: seconds "
                                     "per request, each retry with its own")
    on_error: Literal["fail", "none"] = option("fail", help="when the rewards cannot be had (a server down after its "
                                               "retries): 'fail' stops the run cleanly (exit 75, --resume continues), "
                                               "'none' leaves those samples unjudged (None) and logs how many")
    params: dict[str, Any] = option(help="extra keyword arguments for the function (written inline in the recipe)", factory=dict)
    function: Any = option(None, python=True, help="the function itself, given from Python (reward_funcs=...); "
                           "`name` is then its reference (python:<name>)")


@dataclass
class RolloutConfig:
    """Sampling: how many completions per step and how they are drawn."""

    engine: Literal[ENGINE_NAMES] = option("builtin", help="what draws the completions: 'builtin' (the KV-cached decoder "
                                           "on the policy's own weights; policy/builtin.py) or 'vllm' (an in-process "
                                           "vllm.LLM, its weights pushed every step; policy/vllm.py)")
    vllm: VLLMConfig = option(help="the vLLM engine's settings (rollout.engine: vllm)", factory=VLLMConfig)
    prompts_per_step: int = option(32, min=1, help="prompts per training step (across all processes)")
    completions_per_prompt: int = option(4, min=1, help="completions sampled per prompt (a group)")
    max_new_tokens: int = option(8, min=1, help="longest completion, in tokens")
    min_new_tokens: int = option(0, min=0, help="EOS is forbidden before this many tokens")
    temperature: float = option(1.0, min=0.0, help="sampling temperature (0 = greedy, no exploration)")
    top_p: float = option(1.0, min=0.0, max=1.0, min_exclusive=True, help="nucleus sampling mass")
    stop: list[str] = option(help="stop strings: a completion ends at the token that completes one (kept in the text; "
                             "EOS ids of the tokenizer and of the model's generation_config always stop)", factory=list)
    mask_truncated: bool = option(False, help="completions that hit max_new_tokens without EOS or a stop string get no "
                                  "gradient (they still count in the baselines); the rate is logged as completion/truncated")
    is_correction: Literal[("auto",) + IS_CORRECTIONS] = option(
        "auto", help="importance weights for the sampler/trainer gap (core/correction.py): 'tis' w = min(pi/mu, is_cap), "
        "'mask' w = pi/mu inside [1/is_cap, is_cap] else 0, 'none'; 'auto' = none for the builtin engine (it samples "
        "from the trained weights), tis for engines with their own copy (vllm)")
    is_cap: float = option(2.0, min=1.0, min_exclusive=True, help="the cap C of is_correction")
    is_level: Literal[IS_LEVELS] = option("token", help="importance ratio per token, or per sequence (the product of "
                                          "the token ratios on every token: exact, higher variance)")
    # multi-turn episodes, when `tools` or `environment` is set (rlhf_pg/episodes/); max_new_tokens is the episode's
    max_turns: int = option(4, min=1, help="episodes: most model turns per episode (a turn ends at a tool call or EOS)")
    max_tool_errors: int = option(3, min=1, help="episodes: failed tool calls after which the episode ends with reward 0")
    tool_timeout_s: float = option(10.0, min=0.0, min_exclusive=True, help="episodes: seconds a tool call (or an "
                                   "environment step) may take; a late tool call is an error observation")
    tool_format: str = option(DEFAULT_TOOL_FORMAT, help="episodes: how the model writes a call, PREFIX{name}SEP{args}CLOSE "
                              "(e.g. '[{name} {args}]')")
    result_format: str = option(DEFAULT_RESULT_FORMAT, help="episodes: how a tool's result is appended, with {result}")


    def sampler_correction(self) -> str:
        """``is_correction`` with ``auto`` resolved: none for the builtin engine, tis for the others."""
        if self.is_correction != "auto":
            return self.is_correction
        return "none" if self.engine == "builtin" else "tis"


@dataclass
class AlgorithmConfig:
    """The estimator: returns, baseline, loss aggregation, KL control, off-policy reuse."""

    preset: Literal[PRESET_NAMES] | None = option(
        None, help="a named algorithm (reinforce, rloo, grpo, dr_grpo, reinforce_pp, remax, dapo, cispo, gspo) that "
        "sets the estimator keys as its paper does; keys written in the recipe override it (README: presets)")
    estimator: Literal[WEIGHTINGS] = option(
        "reinforce", help="trajectory weights: 'reinforce' A = G - b; 'filtered_bc' A = 1[R >= reward_threshold] "
        "(maximum likelihood on the policy's own good samples; baseline is not used)")
    reward_threshold: float = option(1.0, help="filtered_bc: keep a sample when its return R >= this")
    gamma: float = option(1.0, min=0.0, max=1.0, help="discount in the reward-to-go")
    baseline: Literal[BASELINE_NAMES + (REMAX_BASELINE,)] = option(
        "leave_one_out", help="baseline subtracted from the reward-to-go ('remax': the reward of the prompt's greedy "
        "completion, one extra greedy rollout per prompt)")
    scale: Literal[SCALE_NAMES] = option("none", help="divide advantages by the std of the rewards over the prompt's "
                                         "group ('group', GRPO) or the batch ('batch'); a group of equal rewards gets 0")
    scale_eps: float = option(1e-6, min=0.0, help="A / (std + scale_eps)")
    whiten: bool = option(False, help="normalize advantages to zero mean, unit std over the batch")
    aggregation: Literal[AGGREGATION_NAMES] = option(
        "seq-mean-token-sum", help="how per-token terms are reduced to the loss")
    norm_length: int | None = option(None, min=1, help="seq-mean-token-sum-norm (Dr. GRPO): the constant L the token sum "
                                     "is divided by (None = rollout.max_new_tokens)")
    kl_coef: float = option(0.0, min=0.0, help="KL-to-reference coefficient (0 = no reference model)")
    kl_estimator: Literal[KL_ESTIMATOR_NAMES] = option("k1", help="per-token KL estimator")
    kl_mode: Literal["reward", "loss"] = option("reward", help="KL as a per-token reward penalty or a loss term")
    kl_target: float | None = option(None, min=0.0, min_exclusive=True, help="adaptive KL controller target (None = fixed kl_coef)")
    kl_horizon: int = option(10000, min=1, help="adaptive KL controller horizon, in samples")
    log_kl: bool = option(False, help="load the frozen reference and log kl/ref every step even when kl_coef is 0")
    updates_per_batch: int = option(1, min=1, help="optimizer steps per rollout batch (>1 = off-policy reuse with clipping)")
    clip_eps: float = option(0.2, min=0.0, help="trust region: clip ratios to [1-clip_eps, 1+clip_eps_high]")
    clip_eps_high: float | None = option(None, min=0.0, help="upper clip (default clip_eps)")
    ratio_level: Literal[RATIO_LEVEL_NAMES] = option(
        "token", help="importance ratio per token, per sequence (product of token ratios), or 'sequence_mean' (GSPO: "
        "exp of the mean token log-ratio)")
    importance: Literal[IMPORTANCE_NAMES] = option(
        "clip", help="off-policy weighting: 'clip' (PPO surrogate: clipped tokens get no gradient) or 'truncate' "
        "(CISPO: the stop-gradient ratio is capped at 1 + clip_eps_high, every token keeps its gradient)")
    dynamic_sampling: bool = option(False, help="DAPO: drop groups whose rewards are all equal and sample more prompts "
                                    "until the batch is full (at most max_sampling_rounds rounds)")
    max_sampling_rounds: int = option(3, min=1, help="dynamic_sampling: rollout rounds per step at most")
    overlong_buffer_fraction: float = option(0.0, min=0.0, max=0.99, help="DAPO soft overlong penalty: the last "
                                             "fraction of max_new_tokens where the penalty ramps to -overlong_penalty "
                                             "(0 = off)")
    overlong_penalty: float = option(1.0, min=0.0, help="DAPO soft overlong penalty: its size at max_new_tokens")
    max_approx_kl: float | None = option(None, min=0.0, min_exclusive=True, help="stop reusing a batch once KL(pi_old||pi) exceeds this")

    def estimator_spec(self) -> EstimatorSpec:
        """The estimator these keys select (``core.estimator.advantages`` computes it)."""
        return EstimatorSpec.from_keys(vars(self))


@dataclass
class TrainConfig:
    """Length of the run, precision, memory, checkpoints and logging."""

    steps: int = option(100, min=1, help="optimizer steps (rollout batches)")
    micro_batch_size: int | None = option(None, min=1, help="completions per forward/backward (None = whole batch)")
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", help="accelerate mixed precision")
    eval_every: int = option(25, min=0, help="held-out evaluation every N steps (0 = only before and after)")
    save_every: int = option(50, min=0, help="checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = option(2, min=1, help="how many recent checkpoints to keep")
    max_nonfinite_steps: int = option(5, min=1, help="stop after this many consecutive non-finite updates")
    num_threads: int | None = option(None, min=1, help="torch CPU threads (None = torch's default)")
    cpu_matmul: Literal["auto", "onednn", "torch"] = option("auto", help="float32 linear layers on CPU: 'onednn' "
                                                            "(often ~2x MKL's speed, e.g. on AMD), 'torch' (MKL), "
                                                            "'auto' = oneDNN where measured faster here")
    tensorboard: bool = option(True, help="also write TensorBoard event files (the 'tensorboard' of report_to)")
    report_to: list[str] = option(help="experiment trackers through accelerate: tensorboard, wandb, trackio, mlflow "
                                  "(each installed by you; [] = metrics.jsonl only)", factory=lambda: ["tensorboard"])
    log_completions_every: int = option(10, min=0, help="write the step's completions (prompt, completion, rewards, "
                                        "advantage) to DIR/completions.jsonl every N steps, and show a few (0 = off; "
                                        "evaluations are always logged)")
    distributed_timeout_s: float = option(600.0, min=0.0, min_exclusive=True, help="several processes: how long one "
                                          "waits for the others in a collective before it stops with an error (a hung "
                                          "or dead process); longer than the slowest checkpoint write or evaluation")

    def check(self) -> None:
        check_report_to(self.report_to)


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy decoding scored by the recipe's rewards (or ``rewards`` here)."""

    batch_size: int = option(256, min=1, help="prompts per generation batch")
    max_new_tokens: int | None = option(None, min=1, help="default: rollout.max_new_tokens")
    temperature: float = option(0.0, min=0.0, help="0 = greedy")
    rewards: list[RewardSpec] | None = option(None, help="rewards for evaluation (default: the training rewards)")


@dataclass
class SftConfig:
    """Maximum likelihood on demonstrations (``rlhf-pg sft``, and the SFT arms of ``rlhf-pg compare``)."""

    batch_size: int | None = option(None, min=1, help="demonstrations per optimizer step "
                                    "(None = rollout.prompts_per_step * rollout.completions_per_prompt, as many as RL samples)")
    demonstrator: Literal["flawed", "exact"] = option(
        "flawed", help="built-in arithmetic task: who writes the completions ('flawed' forgets carries, 'exact' never does)")
    forget_carry: float = option(0.7, min=0.0, max=1.0, help="flawed demonstrator: probability of dropping each carry "
                                 "(0.7 is the demonstrator builtin:arith-gpt imitates)")


@dataclass
class CompareConfig:
    """``rlhf-pg compare``: which arms run from the same model with the same budget."""

    arms: list[Literal["sft", "sft_exact", "filtered_bc", "rl"]] = option(
        help="'sft' (the recipe's demonstrator), 'sft_exact' (exact demonstrator, arithmetic only), "
        "'filtered_bc' (ML on own samples with R >= algorithm.reward_threshold), 'rl' (REINFORCE)",
        factory=lambda: ["sft", "rl"])


@dataclass
class Recipe:
    """A whole run."""

    model: ModelConfig = option(help="the policy", factory=ModelConfig)
    data: DataConfig = option(help="prompts", factory=DataConfig)
    rewards: list[RewardSpec] = option(help="reward functions, summed with weights", factory=lambda: [RewardSpec()])
    rollout: RolloutConfig = option(help="sampling", factory=RolloutConfig)
    algorithm: AlgorithmConfig = option(help="estimator", factory=AlgorithmConfig)
    optim: OptimConfig = option(help="optimizer", factory=OptimConfig)
    train: TrainConfig = option(help="run length, checkpoints", factory=TrainConfig)
    eval: EvalConfig = option(help="held-out evaluation", factory=EvalConfig)
    peft: PeftConfig | None = option(None, help="LoRA adapters (null = full fine-tuning)")
    sft: SftConfig = option(help="maximum likelihood on demonstrations (rlhf-pg sft)", factory=SftConfig)
    compare: CompareConfig = option(help="arms of rlhf-pg compare", factory=CompareConfig)
    tools: list[str] = option(help="multi-turn: tools the model may call, 'package.module:function' "
                              "(rlhf_pg/episodes/tools.py)",
                              factory=list)
    environment: str | None = option(None, help="multi-turn: 'package.module:Class' with reset(**row) -> observation "
                                     "and step(text) -> (observation, reward, done), one instance per episode")
    seed: int = option(0, min=0, max=SEED_MAX, help="seed for sampling, data order and initialization")
    output_dir: str | None = option(None, help="where the run is written (default runs/<recipe name>)")

    kind: ClassVar[str] = "recipe"
    example: ClassVar[str] = "train: {steps: 100}"
    sections: ClassVar[str] = "model, data, rewards, ..."

    def to_dict(self) -> dict[str, Any]:
        """Plain data (reward params inlined), loadable again with ``recipe_from_dict``."""
        return config.to_dict(self)

    @classmethod
    def expand(cls, data: dict[str, Any]) -> dict[str, Any]:
        """``algorithm.preset``: the preset's keys fill in every ``algorithm`` key the recipe did not write."""
        algorithm = data.get("algorithm")
        if not isinstance(algorithm, dict) or algorithm.get("preset") is None:
            return data
        try:
            values = resolve_preset(algorithm["preset"])
        except (ValueError, TypeError) as error:
            raise RecipeError(f"algorithm.preset: {error}") from None
        values = {key.split(".", 1)[1]: value for key, value in values.items()}
        return {**data, "algorithm": {**values, **algorithm}}

    def check(self) -> None:
        """Rules that involve more than one key (the estimator's combinations: ``core.presets.INCOMPATIBLE``)."""
        flat = {f"{section}.{key}": value for section in ("algorithm", "rollout")
                for key, value in vars(getattr(self, section)).items()}
        problems = check_compatibility(flat)
        if problems:
            raise RecipeError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        if self.data.task is None and self.data.path is None:
            raise RecipeError("data: set either data.task (a built-in task) or data.path (a dataset file or name)")
        if self.data.min_operand > self.data.max_operand:
            raise RecipeError("data.min_operand must be <= data.max_operand")
        if self.data.path is None:
            problems = (self.data.max_operand - self.data.min_operand + 1) ** 2
            if problems > MAX_ARITHMETIC_PROBLEMS:
                raise RecipeError(
                    f"data.max_operand={self.data.max_operand}: the arithmetic task would enumerate {problems:,} problems "
                    f"(at most {MAX_ARITHMETIC_PROBLEMS:,}); lower data.max_operand or raise data.min_operand")
            if self.data.num_eval >= problems:
                raise RecipeError(
                    f"data.num_eval={self.data.num_eval} leaves no training problems: operands {self.data.min_operand}.."
                    f"{self.data.max_operand} give only {problems} problems; lower data.num_eval or raise data.max_operand")
        if self.rollout.min_new_tokens > self.rollout.max_new_tokens:
            raise RecipeError("rollout.min_new_tokens must be <= rollout.max_new_tokens")
        if not self.rewards:
            raise RecipeError("rewards: list at least one reward function, e.g. rewards: [{name: arithmetic_exact}]")
        check_episode_keys(self.tools, self.environment, self.rollout.tool_format, self.rollout.result_format)
        if self.algorithm.kl_target is not None and self.algorithm.kl_coef == 0:
            raise RecipeError("algorithm.kl_target adapts the KL coefficient multiplicatively, so it needs a starting "
                              "algorithm.kl_coef > 0 (e.g. 0.05)")


def recipe_from_dict(data: Any, source: str = "recipe") -> Recipe:
    """Validate plain data into a ``Recipe``; ``RecipeError`` names the offending key and ``source``."""
    return config.from_dict(Recipe, data, source)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, override and validate a recipe file."""
    return config.load(Recipe, path, overrides)


def apply_overrides(data: dict[str, Any], overrides: list[str], root: type | None = None) -> dict[str, Any]:
    """``config.apply_overrides`` with ``Recipe`` as the default schema."""
    return config.apply_overrides(data, overrides, root or Recipe)


def recipe_keys(root: type | None = None) -> list[tuple[str, str, str]]:
    """Every key of ``root`` (default ``Recipe``) as ``(dotted key, default, help)``."""
    return config.recipe_keys(root or Recipe)
