"""The toy-track loop: REINFORCE on gymnasium with the LM track's own estimator functions.

    for update in range(steps):
        tau_1..tau_B  <- B complete episodes of pi_theta from N vector-env copies      (gym/rollout.py)
        G_t           <- discounted_returns(r, mask, gamma)                              (advantages.py)
        A_t           <- apply_baseline(G, mask, kind)  or  learned_baseline(G, V(s))     (advantages.py)
        A_t           <- whiten_advantages(A, mask)  (optional)                          (advantages.py)
        theta         <- theta - lr * grad policy_gradient_loss(log pi(a_t|s_t), A, mask)  (losses.py)
        phi           <- a few steps on value_loss(V_phi(s_t), G_t)  (baseline: value)   (losses.py)

The registry baselines see the whole batch as one group (every episode starts from the same
initial-state distribution), so ``leave_one_out`` is the unbiased batch mean of the other episodes.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..run import checkpoint as ckpt
from ..core.advantages import apply_baseline, discounted_returns, learned_baseline, whiten_advantages
from ..config import GymAlgorithmConfig, GymEnvConfig, GymRecipe, OptimConfig
from ..errors import UserError
from ..core.losses import policy_gradient_loss, value_loss
from ..run.metrics import MetricsLogger, progress_bar
from .envs import make_vector_env
from .policy import GymAgent
from .rollout import EpisodeBatch, collect_episodes

RUN_MARKER = "recipe.yaml"


# --- the estimator: shared functions only ----------------------------------------------------------------


def episode_advantages(batch: EpisodeBatch, algorithm: GymAlgorithmConfig, agent: GymAgent | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, A)``, both ``[B, T]``: reward-to-go and advantages under the recipe's estimator."""
    returns = discounted_returns(batch.rewards, batch.mask, algorithm.gamma)
    if algorithm.baseline == "value":
        if agent is None or agent.value is None:
            raise ValueError("baseline 'value' needs an agent with a value function")
        with torch.no_grad():
            values = agent.value(batch.observations)
        advantages = learned_baseline(returns, values, batch.mask)
    else:
        one_group = torch.zeros(len(batch), dtype=torch.long)
        advantages = apply_baseline(returns, batch.mask, algorithm.baseline, one_group)
    if algorithm.whiten:
        advantages = whiten_advantages(advantages, batch.mask)
    return returns, advantages


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


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Learning-rate factor after ``step`` updates: linear warm-up, then constant, linear or cosine decay to 0."""

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
        if optim.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if optim.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


def _prepare_output_dir(output_dir: Path, overwrite: bool) -> None:
    holds_run = any((output_dir / name).exists() for name in (RUN_MARKER, "metrics.jsonl", "summary.json", "final"))
    holds_run = holds_run or bool(ckpt.list_checkpoints(output_dir))
    if holds_run and not overwrite:
        raise UserError(f"{output_dir} already holds a run; pass --overwrite to replace it, or choose another --output-dir")
    if holds_run:
        for child in [*ckpt.list_checkpoints(output_dir), output_dir / "final", output_dir / "tensorboard"]:
            shutil.rmtree(child, ignore_errors=True)
        for name in ("metrics.jsonl", "summary.json", RUN_MARKER):
            (output_dir / name).unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)


def train_gym(recipe: GymRecipe, output_dir: str | Path, overwrite: bool = False, show_progress: bool = True
              ) -> dict[str, Any]:
    """Run a toy-track recipe; returns the summary also written to ``DIR/summary.json``."""
    started = time.perf_counter()
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    output_dir = Path(output_dir)
    _prepare_output_dir(output_dir, overwrite)
    (output_dir / RUN_MARKER).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed)

    envs = make_vector_env(recipe.env)
    envs.reset(seed=_env_seeds(recipe.seed, 0, recipe.env.num_envs))
    use_value = recipe.algorithm.baseline == "value"
    agent = GymAgent.for_spaces(envs.single_observation_space, envs.single_action_space, recipe.policy.hidden_sizes,
                                recipe.policy.activation, recipe.policy.init_log_std,
                                recipe.value.hidden_sizes if use_value else None, env_id=recipe.env.id)
    groups = [{"params": list(agent.policy.parameters()), "lr": recipe.optim.lr}]
    if use_value:  # V's parameters get gradients only from value_loss: one optimizer, two groups
        groups.append({"params": list(agent.value.parameters()), "lr": recipe.value.lr})
    optimizer = torch.optim.AdamW(groups, betas=(recipe.optim.beta1, recipe.optim.beta2),
                                  weight_decay=recipe.optim.weight_decay)
    schedules = [lr_lambda(recipe.optim, recipe.train.steps)] + ([lambda step: 1.0] if use_value else [])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
    generator = torch.Generator().manual_seed(recipe.seed)
    eval_seed = recipe.seed + 1_000_003

    eval_before = evaluate_agent(agent, recipe.env, recipe.eval.episodes, recipe.eval.deterministic, eval_seed)
    logger = MetricsLogger(output_dir, tensorboard=recipe.train.tensorboard)
    logger.log(0, {"eval/return": eval_before["return_mean"]})
    env_steps = simulated_steps = episodes = 0
    recent_returns: list[float] = []
    train_time = 0.0

    with progress_bar(show_progress) as bar:
        task = bar.add_task(f"{recipe.env.id}", total=recipe.train.steps, status="")
        for update in range(1, recipe.train.steps + 1):
            step_started = time.perf_counter()
            # 1. rollout: B = num_envs * episodes_per_env complete episodes of the current policy
            batch, simulated = collect_episodes(envs, agent, recipe.env.episodes_per_env, generator)
            # 2. returns and advantages (shared estimator functions)
            returns, advantages = episode_advantages(batch, recipe.algorithm, agent)
            # 3. policy step on the REINFORCE loss
            loss = reinforce_loss(agent.policy, batch, advantages, recipe.algorithm.aggregation)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = recipe.optim.max_grad_norm or float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(agent.policy.parameters(), max_norm))
            if math.isfinite(grad_norm):
                optimizer.step()
            # 4. the learned baseline regresses on this batch's returns (after it was used: no peeking)
            fitted = float("nan")
            if use_value:
                for _ in range(recipe.value.epochs):
                    optimizer.zero_grad(set_to_none=True)
                    fit = value_loss(agent.value(batch.observations), returns, batch.mask)
                    fit.backward()
                    optimizer.step()
                    fitted = float(fit.detach())
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            # 5. metrics
            step_time = time.perf_counter() - step_started
            train_time += step_time
            env_steps += batch.num_steps
            simulated_steps += simulated
            episodes += len(batch)
            episode_returns = batch.episode_returns
            recent_returns = (recent_returns + episode_returns.tolist())[-max(100, len(batch)):]
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
                "optim/lr": scheduler.get_last_lr()[0],
                "perf/env_steps": env_steps,
                "perf/env_steps_per_s": batch.num_steps / step_time if step_time > 0 else 0.0,
                "perf/step_s": step_time,
            }
            if use_value:
                metrics["loss/value"] = fitted
            if recipe.eval.every and update % recipe.eval.every == 0 and update < recipe.train.steps:
                metrics["eval/return"] = evaluate_agent(agent, recipe.env, recipe.eval.episodes,
                                                        recipe.eval.deterministic, eval_seed)["return_mean"]
                bar.console.log(f"update {update}: eval return {metrics['eval/return']:.2f}")
            logger.log(update, metrics)
            bar.update(task, completed=update, status=(
                f"return {metrics['episode/return']:.1f} | {env_steps} steps | {metrics['perf/env_steps_per_s']:.0f} steps/s"))
            if recipe.train.save_every and update % recipe.train.save_every == 0 and update < recipe.train.steps:
                state = {"recipe": recipe.to_dict(), "env_steps": env_steps, "episodes": episodes}
                ckpt.save_checkpoint(output_dir, update, agent, None, optimizer, scheduler, state,
                                     recipe.train.keep_checkpoints)
    envs.close()

    final = evaluate_agent(agent, recipe.env, recipe.eval.episodes, recipe.eval.deterministic, eval_seed)
    logger.log(recipe.train.steps, {"eval/return": final["return_mean"]})
    logger.close()
    agent.save_pretrained(output_dir / "final")
    summary: dict[str, Any] = {
        "env_id": recipe.env.id,
        "seed": recipe.seed,
        "eval_return_mean": final["return_mean"],
        "eval_return_std": final["return_std"],
        "eval_return_std_err": final["return_std_err"],
        "eval_episodes": final["episodes"],
        "eval_deterministic": recipe.eval.deterministic,
        "eval_return_before": eval_before["return_mean"],
        "train_return_last_100": float(np.mean(recent_returns)) if recent_returns else None,
        "env_steps": env_steps,
        "env_steps_simulated": simulated_steps,
        "episodes": episodes,
        "updates": recipe.train.steps,
        "train_time_s": round(train_time, 3),
        "wall_time_s": round(time.perf_counter() - started, 3),
        "final_policy_dir": str(output_dir / "final"),
    }
    if recipe.env.id.startswith("Blackjack"):
        from .blackjack import blackjack_report, rules_for

        summary.update(blackjack_report(agent, rules_for(recipe.env.id, recipe.env.kwargs), recipe.eval.deterministic))
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
