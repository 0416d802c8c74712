"""The variance lab: at fixed policy parameters, how far is each gradient estimator from the true gradient?

Every estimator is ``g = -grad policy_gradient_loss(log pi, A, mask)`` = (1/B) sum_i sum_t grad log pi(a_it|s_it) A_it
with the advantages A built from the shared functions in ``rlhf_pg.advantages`` (total return, reward-to-go,
each registry baseline, whitening, a learned V). All estimators see the *same* K independent batches
(common random numbers), and are compared with a reference gradient g* over the full parameter vector:

    g*        the average of M further independent batches of the unbiased reward-to-go + leave-one-out
              estimator (on the enumerable MDP, the exact gradient instead)
    variance  tr Cov[g]          = (1/(K-1)) sum_k ||g_k - mean g||^2
    bias^2    ||mean_k g_k - g*||^2
    MSE       (1/K) sum_k ||g_k - g*||^2  (~ variance + bias^2 + the reference's own error tr Cov[g*])
    cosine    (1/K) sum_k <g_k, g*> / (||g_k|| ||g*||)
    best-scale relative MSE  min_c E||c g - g*||^2 / ||g*||^2 = 1 - E[<g, g*>]^2 / (E||g||^2 ||g*||^2):
              scale-free (whitening rescales g, and a learning rate absorbs any scale), 0 = perfect.

The objective is the undiscounted return E[sum_t r_t] (what evaluation reports), so every estimator uses
gamma = 1 except the "discounted" row, which shows the bias discounting trades for variance.

Sources: a gym recipe (batches of episodes from ``rlhf_pg.gym``; the learned V is fitted on the reference
batches, which are independent of the measured ones) or an LM recipe (batches of prompts x completions from
``rlhf_pg.rollout``, scored by the recipe's rewards; the gradient is over all of the model's parameters).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.advantages import apply_baseline, discounted_returns, learned_baseline, total_returns, whiten_advantages
from ..config import is_gym_recipe, load_yaml
from ..errors import UserError
from ..core.losses import policy_gradient_loss, value_loss
from ..run.metrics import progress_bar

Tensor = torch.Tensor


# --- estimators -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EstimatorSpec:
    """One gradient estimator: which returns, which baseline, whitening, and the discount."""

    name: str
    returns: str = "reward_to_go"  # or "total"
    baseline: str = "none"  # a registry kind of advantages.apply_baseline, or "value"
    whiten: bool = False
    gamma: float = 1.0


def default_estimators(groups: bool, value: bool, gamma: float = 1.0) -> list[EstimatorSpec]:
    """The lab's estimators; ``groups``: batches hold several completions per prompt; ``value``: a learned V exists."""
    specs = [
        EstimatorSpec("total return", returns="total"),
        EstimatorSpec("reward-to-go"),
    ]
    if gamma < 1.0:
        specs.append(EstimatorSpec(f"reward-to-go, discounted {gamma:g} + timestep_mean", baseline="timestep_mean",
                                   gamma=gamma))
    specs.append(EstimatorSpec("rtg + batch_mean", baseline="batch_mean"))
    if groups:
        specs.append(EstimatorSpec("rtg + group_mean", baseline="group_mean"))
    specs += [
        EstimatorSpec("rtg + leave_one_out", baseline="leave_one_out"),
        EstimatorSpec("rtg + timestep_mean", baseline="timestep_mean"),
    ]
    if value:
        specs.append(EstimatorSpec("rtg + learned value", baseline="value"))
    specs += [
        EstimatorSpec("rtg + whiten", whiten=True),
        EstimatorSpec("rtg + leave_one_out + whiten", baseline="leave_one_out", whiten=True),
    ]
    return specs


REFERENCE = EstimatorSpec("reference: rtg + leave_one_out", baseline="leave_one_out")


def estimator_advantages(spec: EstimatorSpec, rewards: Tensor, mask: Tensor, group_ids: Tensor,
                         values: Tensor | None = None) -> Tensor:
    """Advantages ``[B, T]`` of estimator ``spec``, composed only of ``rlhf_pg.advantages`` functions."""
    returns = (total_returns if spec.returns == "total" else discounted_returns)(rewards, mask, spec.gamma)
    if spec.baseline == "value":
        if values is None:
            raise ValueError("the learned-value estimator needs values")
        advantages = learned_baseline(returns, values, mask)
    else:
        advantages = apply_baseline(returns, mask, spec.baseline, group_ids)
    if spec.whiten:
        advantages = whiten_advantages(advantages, mask)
    return advantages


@dataclass
class Batch:
    """One sampled batch: ``logprobs`` ``[B, T]`` (with gradient), rewards, mask, groups, optional V(s_t)."""

    logprobs: Tensor
    rewards: Tensor
    mask: Tensor
    group_ids: Tensor
    values: Tensor | None = None


def flat_gradient(loss: Tensor, params: list[Tensor], retain_graph: bool) -> Tensor:
    """The gradient of ``loss`` over all ``params`` as one float64 vector (zeros for unused parameters)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(grads, params)])


def estimate(spec: EstimatorSpec, batch: Batch, params: list[Tensor], retain_graph: bool = True) -> Tensor:
    """The estimate of grad J under ``spec`` on ``batch``: minus the gradient of the shared REINFORCE loss."""
    advantages = estimator_advantages(spec, batch.rewards, batch.mask, batch.group_ids, batch.values)
    return -flat_gradient(policy_gradient_loss(batch.logprobs, advantages, batch.mask), params, retain_graph)


# --- sources of batches ----------------------------------------------------------------------------------------


class GymSource:
    """Batches of complete episodes of a gym policy (the recipe's initial policy, or a saved one)."""

    def __init__(self, recipe, policy_dir: str | None):
        from ..gym import GymAgent, make_vector_env
        from ..gym.envs import TABULAR_ENV_ID

        torch.manual_seed(recipe.seed)
        self.recipe = recipe
        self.envs = make_vector_env(recipe.env)
        self.envs.reset(seed=recipe.seed)
        if policy_dir:
            self.agent = GymAgent.from_pretrained(policy_dir)
        else:
            self.agent = GymAgent.for_spaces(self.envs.single_observation_space, self.envs.single_action_space,
                                             recipe.policy.hidden_sizes, recipe.policy.activation,
                                             recipe.policy.init_log_std, env_id=recipe.env.id)
        self.agent.eval()
        self.params = [p for p in self.agent.policy.parameters() if p.requires_grad]
        self.generator = torch.Generator().manual_seed(recipe.seed)
        self.batch_size = recipe.env.num_envs * recipe.env.episodes_per_env
        self.gamma = recipe.algorithm.gamma
        self.groups = False
        self.value = None
        self.tabular = recipe.env.id == TABULAR_ENV_ID
        where = f"policy {policy_dir}" if policy_dir else f"initial policy (seed {recipe.seed})"
        self.description = f"{recipe.env.id}, {where}"
        self._fit_data: list = []

    def episodes(self):
        from ..gym import collect_episodes

        episodes, _ = collect_episodes(self.envs, self.agent, self.recipe.env.episodes_per_env, self.generator)
        return episodes

    def sample(self, keep_for_value: bool = False) -> Batch:
        episodes = self.episodes()
        if keep_for_value and len(self._fit_data) < 256:
            self._fit_data.append(episodes)
        logprobs = self.agent.policy.log_prob(episodes.observations, episodes.actions) * episodes.mask
        values = None
        if self.value is not None:
            with torch.no_grad():
                values = self.value(episodes.observations)
        return Batch(logprobs, episodes.rewards.double(), episodes.mask.double(),
                     torch.zeros(len(episodes), dtype=torch.long), values)

    def fit_value(self, steps: int = 300) -> None:
        """Fit V(s) to the undiscounted reward-to-go on the kept reference episodes (independent of the measured batches)."""
        from ..gym.policy import ValueFunction

        if not self._fit_data:
            return
        torch.manual_seed(self.recipe.seed)
        self.value = ValueFunction(self.agent.policy.net[0].in_features, self.recipe.value.hidden_sizes,
                                   self.recipe.policy.activation)
        optimizer = torch.optim.Adam(self.value.parameters(), lr=self.recipe.value.lr)
        data = [(e.observations, discounted_returns(e.rewards, e.mask, 1.0), e.mask) for e in self._fit_data]
        for step in range(steps):
            observations, returns, mask = data[step % len(data)]
            optimizer.zero_grad()
            value_loss(self.value(observations), returns, mask).backward()
            optimizer.step()
        self.value.eval()

    def exact_reference(self) -> Tensor | None:
        """On the enumerable MDP: the exact grad J(params) by enumeration of all trajectories."""
        if not self.tabular:
            return None
        from ..gym.policy import encode_observations
        from ..gym.tabular import exact_objective

        mdp = self.envs.envs[0].unwrapped.mdp
        states = encode_observations(self.agent.observation_spec, torch.arange(mdp.num_states).numpy())
        theta = self.agent.policy.logits(states).double()  # [S, A] log pi(a | s) as a differentiable table
        objective = exact_objective(theta, mdp, 1.0)
        return flat_gradient(objective, self.params, retain_graph=False)

    def close(self) -> None:
        self.envs.close()


class LMSource:
    """Batches of prompts x completions from a causal LM, scored by the recipe's rewards (terminal reward)."""

    def __init__(self, recipe, policy_dir: str | None):
        import copy

        from ..data import PromptSampler, load_prompt_datasets
        from ..models import context_length, load_policy
        from ..rewards import RewardScorer
        from ..rollout import SamplingParams

        torch.manual_seed(recipe.seed)
        self.recipe = recipe
        model_config = copy.deepcopy(recipe.model)
        if policy_dir:
            model_config.name_or_path = policy_dir
        self.model, self.tokenizer, _ = load_policy(model_config)
        self.model.eval()  # no dropout: the lab measures the estimator's own noise
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        train_set, _ = load_prompt_datasets(recipe.data)
        self.sampler = PromptSampler(train_set, recipe.rollout.prompts_per_step, recipe.data.shuffle_seed + recipe.seed)
        self.scorer = RewardScorer(recipe.rewards)
        self.sampling = SamplingParams(recipe.rollout.max_new_tokens, recipe.rollout.temperature, recipe.rollout.top_p,
                                       recipe.rollout.min_new_tokens)
        self.max_context = context_length(self.model)
        self.generator = torch.Generator().manual_seed(recipe.seed)
        self.batch_size = recipe.rollout.prompts_per_step * recipe.rollout.completions_per_prompt
        self.gamma = recipe.algorithm.gamma
        self.groups = recipe.rollout.completions_per_prompt > 1
        self.value = None
        self.description = f"{model_config.name_or_path} on the recipe's prompts"
        self._step = 0

    def sample(self, keep_for_value: bool = False) -> Batch:
        from ..core.mdp import terminal_rewards
        from ..rollout import completion_logprobs, rollout

        prompts, columns = self.sampler.batch(self._step)
        self._step += 1
        batch = rollout(self.model, self.tokenizer, prompts, self.recipe.rollout.completions_per_prompt, self.sampling,
                        columns, self.generator, max_context=self.max_context)
        scores, _ = self.scorer(batch.prompts, batch.completions, finished=batch.finished.tolist(), **batch.extras)
        rewards = terminal_rewards(torch.tensor(scores, dtype=torch.float64), batch.completion_mask.double())
        logprobs = completion_logprobs(self.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                       batch.completion_mask, self.recipe.rollout.temperature)
        return Batch(logprobs, rewards, batch.completion_mask.double(), batch.group_ids)

    def fit_value(self) -> None:  # no value head for language models
        return None

    def exact_reference(self) -> Tensor | None:
        return None

    def close(self) -> None:
        return None


# --- the measurement ---------------------------------------------------------------------------------------------


def measure(source, specs: list[EstimatorSpec], batches: int, reference_batches: int,
            show_progress: bool = True) -> dict[str, Any]:
    """Reference gradient, then every estimator on ``batches`` shared batches; see the module docstring."""
    if batches < 2:
        raise UserError("--batches must be at least 2 (the variance needs two samples)")
    started = time.perf_counter()
    with progress_bar(show_progress) as bar:
        # 1. reference: the mean of M independent unbiased estimates (and its own variance)
        task = bar.add_task("reference gradient", total=reference_batches, status="")
        total, total_sq = None, 0.0
        for _ in range(reference_batches):
            g = estimate(REFERENCE, source.sample(keep_for_value=True), source.params, retain_graph=False)
            total = g if total is None else total + g
            total_sq += float(g @ g)
            bar.advance(task)
        sampled_reference = total / reference_batches
        reference_variance = (total_sq - reference_batches * float(sampled_reference @ sampled_reference)) / max(1, reference_batches - 1)
        exact = source.exact_reference()
        reference = exact if exact is not None else sampled_reference
        if float(reference @ reference) == 0.0:
            raise UserError("the reference gradient is exactly zero (every sampled trajectory got the same reward?); "
                            "there is nothing to measure at these parameters: try another policy (--policy) or reward")
        reference_error = 0.0 if exact is not None else reference_variance / reference_batches
        source.fit_value()
        specs = [s for s in specs if s.baseline != "value" or source.value is not None]
        # 2. every estimator on the same batches
        sums = {s.name: torch.zeros_like(reference) for s in specs}
        stats = {s.name: {"sq": 0.0, "dot": 0.0, "err": 0.0, "cos": 0.0} for s in specs}
        ref_norm_sq = float(reference @ reference)
        task = bar.add_task("estimators", total=batches, status="")
        for _ in range(batches):
            batch = source.sample()
            for index, spec in enumerate(specs):
                g = estimate(spec, batch, source.params, retain_graph=index < len(specs) - 1)
                sums[spec.name] += g
                norm_sq, dot = float(g @ g), float(g @ reference)
                record = stats[spec.name]
                record["sq"] += norm_sq
                record["dot"] += dot
                record["err"] += float((g - reference) @ (g - reference))
                record["cos"] += dot / math.sqrt(max(norm_sq * ref_norm_sq, 1e-300))
            bar.advance(task)
    rows = []
    for spec in specs:
        mean = sums[spec.name] / batches
        record = stats[spec.name]
        variance = (record["sq"] - batches * float(mean @ mean)) / (batches - 1)
        second_moment = record["sq"] / batches
        best_scale_error = 1.0 - (record["dot"] / batches) ** 2 / max(second_moment * ref_norm_sq, 1e-300)
        rows.append({
            "estimator": spec.name,
            "mse": record["err"] / batches,
            "variance": variance,
            "bias_sq": float((mean - reference) @ (mean - reference)),
            "cosine": record["cos"] / batches,
            "relative_mse": record["err"] / batches / ref_norm_sq,
            "best_scale_relative_mse": best_scale_error,
            "spec": asdict(spec),
        })
    return {
        "source": source.description,
        "num_parameters": int(reference.numel()),
        "batch_size": source.batch_size,
        "batches": batches,
        "reference": {
            "kind": "exact (enumeration)" if exact is not None else f"mean of {reference_batches} batches of {REFERENCE.name.split(': ')[1]}",
            "batches": reference_batches,
            "norm_sq": ref_norm_sq,
            "own_mse": reference_error,
            "sampled_vs_exact_sq": float((sampled_reference - exact) @ (sampled_reference - exact)) if exact is not None else None,
        },
        "estimators": rows,
        "wall_time_s": round(time.perf_counter() - started, 2),
    }


# --- the report ----------------------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def report_markdown(result: dict[str, Any], figure: str = "variance.png") -> str:
    ref = result["reference"]
    lines = [
        f"# Variance lab: {result['source']}",
        "",
        f"{len(result['estimators'])} estimators of grad E[sum_t r_t] over all {result['num_parameters']:,} policy parameters, "
        f"each on the same {result['batches']} independent batches of {result['batch_size']} trajectories. "
        f"Reference g*: {ref['kind']} (||g*||^2 = {_fmt(ref['norm_sq'])}; its own error ~{_fmt(ref['own_mse'])} is part of every MSE).",
        "",
        f"![variance]({figure})",
        "",
        "| estimator | MSE to g* | variance (tr Cov) | bias^2 | cosine to g* | best-scale rel. MSE |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["estimators"]:
        lines.append(f"| {row['estimator']} | {_fmt(row['mse'])} | {_fmt(row['variance'])} | {_fmt(row['bias_sq'])} | "
                     f"{row['cosine']:.3f} | {row['best_scale_relative_mse']:.3f} |")
    lines += [
        "",
        "MSE = variance + bias^2 (+ the reference's error). Whitening divides by the advantages' std, so its "
        "MSE is at another scale; compare it by the scale-free columns (cosine, best-scale relative MSE = "
        "min_c E||c g - g*||^2 / ||g*||^2). batch_mean and group_mean include the trajectory's own return "
        "and shrink the gradient by (1 - 1/n): that shows as bias^2.",
        "",
        f"Wall time: {result['wall_time_s']} s.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Two panels: MSE and variance (log scale), and the scale-free best-scale relative MSE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = result["estimators"]
    names = [r["estimator"] + (" (rescaled)" if r["spec"]["whiten"] else "") for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * len(rows) + 1.8), sharey=True)
    positions = list(range(len(rows)))
    left.barh(positions, [r["mse"] for r in rows], color="tab:blue", label="MSE to g*")
    left.barh(positions, [r["variance"] for r in rows], color="tab:orange", height=0.4, label="variance (tr Cov)")
    left.set_xscale("log")
    smallest = min(min(r["mse"], r["variance"]) for r in rows if min(r["mse"], r["variance"]) > 0)
    left.set_xlim(smallest / 4, max(r["mse"] for r in rows) * 1.5)  # bars start a factor 4 below the shortest
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_yticks(positions, names)
    left.invert_yaxis()
    left.set_xlabel("squared error, log scale (lower is better)")
    left.legend(loc="lower right", fontsize=8)
    right.barh(positions, [r["best_scale_relative_mse"] for r in rows], color="tab:green")
    right.set_xlim(0.0, 1.0)
    right.set_xlabel("best-scale relative MSE: min_c E||c g - g*||^2 / ||g*||^2")
    for position, row in zip(positions, rows):
        right.text(row["best_scale_relative_mse"] + 0.01, position, f"cos {row['cosine']:.2f}", va="center", fontsize=8)
    figure.suptitle(f"{result['source']}: {result['batches']} batches of {result['batch_size']} trajectories", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def run_variance_lab(recipe_path: str, output_dir: str | Path, overrides: list[str] | None = None,
                     policy: str | None = None, batches: int | None = None, reference_batches: int | None = None,
                     show_progress: bool = True) -> dict[str, Any]:
    """Load a gym or LM recipe, measure, and write ``report.md``, ``variance.png`` and ``variance.json`` to ``output_dir``."""
    data = load_yaml(recipe_path)
    source: Any
    if is_gym_recipe(data):
        from ..config import load_gym_recipe

        recipe = load_gym_recipe(recipe_path, overrides)
        if recipe.train.num_threads:
            torch.set_num_threads(recipe.train.num_threads)
        source = GymSource(recipe, policy)
        batches, reference_batches = batches or 200, reference_batches or 1000
    else:
        from ..config import load_recipe

        recipe = load_recipe(recipe_path, overrides)
        if recipe.train.num_threads:
            torch.set_num_threads(recipe.train.num_threads)
        source = LMSource(recipe, policy)
        batches, reference_batches = batches or 50, reference_batches or 200
    try:
        specs = default_estimators(groups=source.groups, value=isinstance(source, GymSource), gamma=source.gamma)
        result = measure(source, specs, batches, reference_batches, show_progress)
    finally:
        source.close()
    result["recipe"] = str(recipe_path)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    plot(result, output_dir / "variance.png")
    (output_dir / "report.md").write_text(report_markdown(result))
    (output_dir / "variance.json").write_text(json.dumps(result, indent=2))
    return result


__all__ = ["EstimatorSpec", "default_estimators", "estimator_advantages", "estimate", "measure", "run_variance_lab"]
