"""The toy track's recipe schema (``rlhf-pg gym``): environment, policy, value baseline, estimator, run.

Same estimator keys as the LM track (gamma, baseline, whiten, aggregation; names from
``rlhf_pg.core.estimator``), same optimizer section; what differs is where trajectories come from: a
vector of gymnasium environments, not a tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from .. import config
from ..config import option
from ..core.estimator import AGGREGATION_NAMES, BASELINE_NAMES, LEARNED_BASELINE, EstimatorSpec
from ..errors import RecipeError
from ..run.optim import OptimConfig


@dataclass
class GymEnvConfig:
    """The environment: any registered gymnasium id, run as ``num_envs`` synchronous copies."""

    id: str = option("CartPole-v1", help="gymnasium environment id, e.g. CartPole-v1, Acrobot-v1, InvertedPendulum-v5")
    kwargs: dict[str, Any] = option(help="keyword arguments for gymnasium.make (e.g. {natural: true} for Blackjack)", factory=dict)
    num_envs: int = option(16, min=1, help="environments stepped together (gymnasium.vector.SyncVectorEnv)")
    episodes_per_env: int = option(1, min=1, help="complete episodes each environment contributes per update")
    max_episode_steps: int | None = option(None, min=1, help="time limit (None = the environment's own)")


@dataclass
class GymPolicyConfig:
    """The policy network: an MLP giving a categorical (discrete actions) or Gaussian (continuous) distribution."""

    hidden_sizes: list[int] = option(help="hidden layer widths; [] = linear (a tabular softmax on one-hot states)",
                                     factory=lambda: [64, 64])
    activation: Literal["tanh", "relu"] = option("tanh", help="hidden-layer nonlinearity")
    init_log_std: float = option(-0.5, help="continuous actions: initial log standard deviation (learned, state-independent)")


@dataclass
class GymValueConfig:
    """The learned state-value baseline V(s), used when ``algorithm.baseline`` is ``value``."""

    hidden_sizes: list[int] = option(help="hidden layer widths of V", factory=lambda: [64, 64])
    lr: float = option(1e-3, min=0.0, min_exclusive=True, help="learning rate of V (a second parameter group of the optimizer)")
    epochs: int = option(5, min=1, help="full-batch regression steps of V on the returns, per update")


@dataclass
class GymAlgorithmConfig:
    """The estimator, with the LM track's names: reward-to-go with gamma, a baseline, whitening, aggregation."""

    gamma: float = option(0.99, min=0.0, max=1.0, help="discount in the reward-to-go")
    baseline: Literal[BASELINE_NAMES + (LEARNED_BASELINE,)] = option(
        "timestep_mean", help="baseline subtracted from the reward-to-go; a registry kind (the batch is one group) or 'value' (learned V(s_t))")
    whiten: bool = option(False, help="normalize advantages to zero mean, unit std over the batch")
    aggregation: Literal[AGGREGATION_NAMES] = option(
        "seq-mean-token-sum", help="how per-step terms are reduced to the loss")

    def estimator_spec(self) -> EstimatorSpec:
        """The estimator these keys select (``core.estimator.advantages`` computes it)."""
        return EstimatorSpec.from_keys(vars(self))


@dataclass
class GymTrainConfig:
    """Length of the run, checkpoints and logging."""

    steps: int = option(100, min=1, help="policy updates (each on num_envs * episodes_per_env fresh episodes)")
    save_every: int = option(0, min=0, help="checkpoint every N updates (0 = only the final policy)")
    keep_checkpoints: int = option(2, min=1, help="how many recent checkpoints to keep")
    num_threads: int | None = option(1, min=1, help="torch CPU threads (small MLPs are fastest on one)")
    tensorboard: bool = option(False, help="also write TensorBoard event files")
    report_to: list[str] | None = option(None, help="experiment trackers (tensorboard, wandb, trackio, mlflow); null = "
                                         "tensorboard when train.tensorboard, else metrics.jsonl only")


@dataclass
class GymEvalConfig:
    """Evaluation of the final policy: mean undiscounted return over fresh episodes."""

    episodes: int = option(50, min=20, help="evaluation episodes (at least 20)")
    deterministic: bool = option(True, help="act greedily (argmax / Gaussian mean) instead of sampling")
    every: int = option(0, min=0, help="also evaluate every N updates (0 = only at the end)")


@dataclass
class GymRecipe:
    """A toy-track run: REINFORCE on a gymnasium environment."""

    env: GymEnvConfig = option(help="the environment", factory=GymEnvConfig)
    policy: GymPolicyConfig = option(help="the policy network", factory=GymPolicyConfig)
    value: GymValueConfig = option(help="the learned value baseline", factory=GymValueConfig)
    algorithm: GymAlgorithmConfig = option(help="estimator", factory=GymAlgorithmConfig)
    optim: OptimConfig = option(help="optimizer (AdamW) and learning-rate schedule", factory=OptimConfig)
    train: GymTrainConfig = option(help="run length, checkpoints", factory=GymTrainConfig)
    eval: GymEvalConfig = option(help="evaluation", factory=GymEvalConfig)
    seed: int = option(0, help="seed for initialization, action sampling and the environments")
    output_dir: str | None = option(None, help="where the run is written (default runs/<recipe name>-seed<seed>)")

    kind: ClassVar[str] = "gym recipe"
    example: ClassVar[str] = "env: {id: CartPole-v1}"
    sections: ClassVar[str] = "env, policy, algorithm, ..."

    def to_dict(self) -> dict[str, Any]:
        return config.to_dict(self)

    @classmethod
    def precheck_file(cls, data: dict[str, Any], path: str) -> None:
        if not is_gym_recipe(data):
            raise RecipeError(f"{path} has no 'env' section, so it is not a gym recipe; add e.g. 'env: {{id: CartPole-v1}}' "
                              "(language-model recipes run with 'rlhf-pg train')")

    def check(self) -> None:
        for name in ("policy", "value"):
            sizes = getattr(self, name).hidden_sizes
            if any(size < 1 for size in sizes):
                raise RecipeError(f"{name}.hidden_sizes: every width must be >= 1, got {sizes}")
        batch = self.env.num_envs * self.env.episodes_per_env
        if self.algorithm.baseline == "leave_one_out" and batch < 2:
            raise RecipeError("algorithm.baseline 'leave_one_out' needs at least 2 episodes per update "
                              "(env.num_envs * env.episodes_per_env >= 2)")


def is_gym_recipe(data: Any) -> bool:
    """A recipe mapping is a toy-track recipe when it has an ``env`` section."""
    return isinstance(data, dict) and "env" in data


def gym_recipe_from_dict(data: Any, source: str = "recipe") -> GymRecipe:
    """Validate plain data into a ``GymRecipe``; ``RecipeError`` names the offending key and ``source``."""
    return config.from_dict(GymRecipe, data, source)


def load_gym_recipe(path: str | Path, overrides: list[str] | None = None) -> GymRecipe:
    """Load, override and validate a toy-track recipe file."""
    return config.load(GymRecipe, path, overrides)
