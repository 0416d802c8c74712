"""The toy-track loop: REINFORCE on gymnasium with the LM track's own estimator functions.

    for update in range(steps):
        tau_1..tau_B  <- B complete episodes of pi_theta from N vector-env copies      (gym/rollout.py)
        G_t, A_t      <- returns -> baseline (registry or learned V(s)) -> whiten        (core/estimator.py)
        theta         <- theta - lr * grad policy_gradient_loss(log pi(a_t|s_t), A, mask)  (core/losses.py)
        phi           <- a few steps on value_loss(V_phi(s_t), G_t)  (baseline: value)   (core/losses.py)

The loop around the update (evaluation, checkpoints, signals, resume, the final save) is ``run.loop``.

The registry baselines see the whole batch as one group (every episode starts from the same
initial-state distribution), so ``leave_one_out`` is the unbiased batch mean of the other episodes.
"""

from __future__ import annotations

import base64
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core import estimator
from ..core.estimator import LEARNED_BASELINE
from ..core.losses import policy_gradient_loss, value_loss
from ..run import checkpoint as ckpt
from ..run.accel import set_threads
from ..run.loop import Job, run_job
from ..run.optim import build_optimizer, build_scheduler, step_scheduler
from ..run.rundir import RunDir
from .config import GymAlgorithmConfig, GymEnvConfig, GymRecipe
from .envs import make_vector_env
from .policy import GymAgent
from .rollout import EpisodeBatch, collect_episodes


# --- the estimator: shared functions only ----------------------------------------------------------------


def episode_advantages(batch: EpisodeBatch, algorithm: GymAlgorithmConfig, agent: GymAgent | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, A)``, both ``[B, T]``: reward-to-go and advantages under the recipe's estimator.

    The registry baselines see the batch as one group; ``value`` uses the agent's V(s_t).
    """
    spec = algorithm.estimator_spec()
    values = None
    if spec.baseline == LEARNED_BASELINE:
        if agent is None or agent.value is None:
            raise ValueError("baseline 'value' needs an agent with a value function")
        with torch.no_grad():
            values = agent.value(batch.observations)
    returns = estimator.returns_of(spec, batch.rewards, batch.mask)
    return returns, estimator.advantages(spec, batch.rewards, batch.mask, values=values)


def reinforce_loss(policy, batch: EpisodeBatch, advantages: torch.Tensor, aggregation: str = "seq-mean-token-sum"
                   ) -> torch.Tensor:
    """``policy_gradient_loss`` on the batch: its gradient is -(1/B) sum_i sum_t grad log pi(a_it|s_it) A_it."""
    logprobs = policy.log_prob(batch.observations, batch.actions) * batch.mask  # [B, T]
    return policy_gradient_loss(logprobs, advantages, batch.mask, aggregation)


# --- evaluation ----------------------------------------------------------------------------------------------


def evaluate_agent(agent: GymAgent, env: GymEnvConfig, episodes: int, deterministic: bool = True,
                   seed: int = 0) -> dict[str, Any]:
    """Mean undiscounted return of ``agent`` over ``episodes`` fresh episodes (copies seeded from ``seed``)."""
    num_envs = min(episodes, 64)
    per_env = math.ceil(episodes / num_envs)
    envs = make_vector_env(env, num_envs=num_envs)
    try:
        generator = torch.Generator().manual_seed(seed)
        batch, _ = collect_episodes(envs, agent, per_env, generator, deterministic, seed=_env_seeds(seed, 1, num_envs))
    finally:
        envs.close()
    returns = batch.episode_returns[:episodes].double()
    return {
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()) if episodes > 1 else 0.0,
        "return_std_err": float(returns.std() / math.sqrt(episodes)) if episodes > 1 else 0.0,
        "length_mean": float(batch.lengths[:episodes].mean()),
        "episodes": episodes,
    }


def _env_seeds(seed: int, stream: int, count: int) -> list[int]:
    """Distinct environment seeds per run seed and stream (0 = training, 1 = evaluation)."""
    return [int(s) for s in np.random.SeedSequence([seed, stream]).generate_state(count)]


# --- the run -------------------------------------------------------------------------------------------------


class GymRun(Job):
    """``rlhf-pg gym``: the shared loop over REINFORCE updates on fresh episodes."""

    command = "gym"
    score = "return"
    counter_defaults = {"env_steps": 0, "simulated_steps": 0, "episodes": 0, "recent_returns": [], "generator": None}

    def __init__(self, recipe: GymRecipe, run_dir: RunDir, saved: dict[str, Any] | None, resume_from: Path | None):
        self.recipe, self.run_dir = recipe, run_dir
        self.steps, self.save_every, self.eval_every = recipe.train.steps, recipe.train.save_every, recipe.eval.every
        self.seed, self.tensorboard, self.report_to = recipe.seed, recipe.train.tensorboard, recipe.train.report_to
        self.init_counters(saved)
        start = int(self.counters["global_step"])
        self.envs = make_vector_env(recipe.env)
        # a resumed run starts fresh episodes (environment states are not checkpointed)
        self.envs.reset(seed=_env_seeds(recipe.seed, 0 if start == 0 else 2 + start, recipe.env.num_envs))
        use_value = recipe.algorithm.baseline == LEARNED_BASELINE
        if resume_from is not None:
            self.agent = GymAgent.from_pretrained(resume_from)
        else:
            self.agent = GymAgent.for_spaces(self.envs.single_observation_space, self.envs.single_action_space,
                                             recipe.policy.hidden_sizes, recipe.policy.activation,
                                             recipe.policy.init_log_std, recipe.value.hidden_sizes if use_value else None,
                                             env_id=recipe.env.id)
        groups = [{"params": list(self.agent.policy.parameters()), "lr": recipe.optim.lr}]
        if use_value:  # V's parameters get gradients only from value_loss: one optimizer, two groups
            groups.append({"params": list(self.agent.value.parameters()), "lr": recipe.value.lr})
        self.optimizer = build_optimizer(groups, recipe.optim)
        self.scheduler = build_scheduler(self.optimizer, recipe.optim, recipe.train.steps, constant_groups=int(use_value))
        if resume_from is not None:
            ckpt.load_training_state(resume_from, self.optimizer, self.scheduler)
        self.generator = torch.Generator().manual_seed(recipe.seed)
        if self.counters["generator"] is not None:
            state = np.frombuffer(base64.b64decode(self.counters["generator"]), dtype=np.uint8).copy()
            self.generator.set_state(torch.from_numpy(state))
        self.eval_seed = recipe.seed + 1_000_003

    def seed_everything(self, resume_from: Path | None) -> None:
        if resume_from is None:
            torch.manual_seed(self.seed)
            np.random.seed(self.seed)
        else:
            ckpt.restore_rng_state(resume_from)

    def step(self, step: int) -> dict[str, float]:
        recipe, agent, counters = self.recipe, self.agent, self.counters
        started = time.perf_counter()
        # 1. rollout: B = num_envs * episodes_per_env complete episodes of the current policy
        batch, simulated = collect_episodes(self.envs, agent, recipe.env.episodes_per_env, self.generator)
        # 2. returns and advantages (the shared estimator composition)
        returns, advantages = episode_advantages(batch, recipe.algorithm, agent)
        # 3. policy step on the REINFORCE loss
        loss = reinforce_loss(agent.policy, batch, advantages, recipe.algorithm.aggregation)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(agent.policy.parameters(),
                                                         recipe.optim.max_grad_norm or float("inf")))
        applied = math.isfinite(grad_norm)
        if applied:
            self.optimizer.step()
        # 4. the learned baseline regresses on this batch's returns (after it was used: no peeking)
        fitted = float("nan")
        if agent.value is not None:
            for _ in range(recipe.value.epochs):
                self.optimizer.zero_grad(set_to_none=True)
                fit = value_loss(agent.value(batch.observations), returns, batch.mask)
                fit.backward()
                self.optimizer.step()
                fitted = float(fit.detach())
        self.optimizer.zero_grad(set_to_none=True)
        step_scheduler(self.scheduler)
        # 5. metrics
        step_time = time.perf_counter() - started
        counters["env_steps"] += batch.num_steps
        counters["simulated_steps"] += simulated
        counters["episodes"] += len(batch)
        episode_returns = batch.episode_returns
        counters["recent_returns"] = (counters["recent_returns"] + episode_returns.tolist())[-max(100, len(batch)):]
        with torch.no_grad():
            real = batch.mask > 0
            entropy = float(agent.policy.entropy(batch.observations)[real].mean())
        metrics: dict[str, Any] = {
            "episode/return": float(episode_returns.mean()),
            "episode/return_std_err": float(episode_returns.std() / math.sqrt(len(batch))) if len(batch) > 1 else 0.0,
            "episode/length": float(batch.lengths.mean()),
            "loss/policy": float(loss.detach()),
            "adv/mean": float(advantages[real].mean()),
            "adv/std": float(advantages[real].std()) if int(real.sum()) > 1 else 0.0,
            "policy/entropy": entropy,
            "grad/norm": grad_norm,
            "optim/lr": self.scheduler.get_last_lr()[0],
            "perf/env_steps": counters["env_steps"],
            "perf/env_steps_per_s": batch.num_steps / step_time if step_time > 0 else 0.0,
            "perf/step_s": step_time,
        }
        if not applied:
            metrics["train/skipped_updates"] = 1
        if agent.value is not None:
            metrics["loss/value"] = fitted
        return metrics

    def evaluate(self) -> dict[str, Any]:
        result = evaluate_agent(self.agent, self.recipe.env, self.recipe.eval.episodes, self.recipe.eval.deterministic,
                                self.eval_seed)
        return {"return": result.pop("return_mean"), **result}

    def status(self, metrics: dict[str, float]) -> str:
        return (f"return {metrics['episode/return']:.1f} | {self.counters['env_steps']} steps | "
                f"{metrics['perf/env_steps_per_s']:.0f} steps/s")

    def save_checkpoint(self, step: int) -> Path:
        self.counters["generator"] = base64.b64encode(self.generator.get_state().numpy().tobytes()).decode()
        state = {**self.counters, "recipe": self.recipe.to_dict()}
        return ckpt.save_checkpoint(self.run_dir.path, step, self.agent, None, self.optimizer, self.scheduler, state,
                                    self.recipe.train.keep_checkpoints)

    def save_final(self, staging: Path, summary: dict[str, Any]) -> None:
        self.agent.save_pretrained(staging)

    def summary(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        recipe, counters = self.recipe, self.counters
        summary: dict[str, Any] = {
            "env_id": recipe.env.id,
            "seed": recipe.seed,
            "eval_return_mean": after["return"],
            "eval_return_std": after["return_std"],
            "eval_return_std_err": after["return_std_err"],
            "eval_episodes": after["episodes"],
            "eval_deterministic": recipe.eval.deterministic,
            "eval_return_before": before["return"],
            "train_return_last_100": float(np.mean(counters["recent_returns"])) if counters["recent_returns"] else None,
            "env_steps": counters["env_steps"],
            "env_steps_simulated": counters["simulated_steps"],
            "episodes": counters["episodes"],
            "updates": recipe.train.steps,
            "final_policy_dir": str(self.run_dir.path / "final"),
        }
        if recipe.env.id.startswith("Blackjack"):
            from .blackjack import blackjack_report, rules_for

            summary.update(blackjack_report(self.agent, rules_for(recipe.env.id, recipe.env.kwargs),
                                            recipe.eval.deterministic))
        return summary


def train_gym(recipe: GymRecipe, output_dir: str | Path, resume: bool = False, overwrite: bool = False,
              show_progress: bool = True) -> dict[str, Any]:
    """Run a toy-track recipe; returns the summary also written to ``DIR/summary.json``.

    ``resume`` continues from the latest checkpoint (policy, optimizer, schedule, RNG states); the
    environments start fresh episodes there, so a resumed run is not bitwise the uninterrupted one.
    """
    set_threads(recipe.train.num_threads)
    run_dir = RunDir(output_dir)
    with run_dir.lock():
        resume_from = run_dir.prepare(recipe.to_dict(), resume, overwrite, defaults=type(recipe)().to_dict())
        saved = ckpt.read_trainer_state(resume_from) if resume_from is not None else None
        run = GymRun(recipe, run_dir, saved, resume_from)
        try:
            run_dir.write_marker(recipe.to_dict())
            return run_job(run, resume_from, show_progress)
        finally:
            run.envs.close()
