"""The toy track: episode collection across autoresets, the shared estimator on gymnasium, learning, Blackjack.

The gym track has no returns/baselines/losses of its own: these tests check that the episodes it
collects are exactly the environment's episodes, and that the shared estimator computed on them is
the exact policy gradient (by enumeration) and unbiased on real sampled rollouts.
"""

import json
import math
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium import spaces

from rlhf_pg.core.advantages import discounted_returns
from rlhf_pg.gym.config import GymAlgorithmConfig, GymEnvConfig, gym_recipe_from_dict
from rlhf_pg.gym import GymAgent, collect_episodes, episode_advantages, make_vector_env, reinforce_loss, train_gym
from rlhf_pg.gym.blackjack import optimal_action, optimal_return, policy_return
from rlhf_pg.gym.envs import TABULAR_ENV_ID
from rlhf_pg.gym.rollout import EpisodeBatch
from rlhf_pg.run.metrics import read_metrics
from rlhf_pg.gym.tabular import default_mdp, estimator_moments, exact_gradient, trajectory_logprob


class ScriptedEnv(gymnasium.Env):
    """Episode k of copy c lasts 2 + (c + k) % 3 steps; observation t; reward 10 * k + t + 1 + 100 * c."""

    def __init__(self, copy: int = 0):
        self.observation_space = spaces.Discrete(8)
        self.action_space = spaces.Discrete(2)
        self.copy, self.episode, self.t = copy, -1, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        return 0, {}

    def step(self, action):
        reward = 10.0 * self.episode + self.t + 1 + 100.0 * self.copy
        self.t += 1
        length = 2 + (self.copy + self.episode) % 3
        return self.t, reward, self.t == length, False, {}


def test_collected_episodes_are_exactly_the_environment_episodes_across_autoresets():
    envs = gymnasium.vector.SyncVectorEnv([lambda c=c: ScriptedEnv(c) for c in range(2)],
                                          autoreset_mode=gymnasium.vector.AutoresetMode.NEXT_STEP)
    agent = GymAgent.for_spaces(spaces.Discrete(8), spaces.Discrete(2), [4])
    batch, _ = collect_episodes(envs, agent, episodes_per_env=3, generator=torch.Generator().manual_seed(0))
    # copy-major: copy 0's episodes 0..2, then copy 1's; the reset step between episodes is never recorded
    expected = []
    for copy in range(2):
        for episode in range(3):
            length = 2 + (copy + episode) % 3
            expected.append([10.0 * episode + t + 1 + 100.0 * copy for t in range(length)])
    assert batch.lengths.tolist() == [len(e) for e in expected]
    for row, rewards in enumerate(expected):
        assert batch.rewards[row, : len(rewards)].tolist() == rewards
        assert batch.rewards[row, len(rewards):].abs().sum() == 0 and batch.mask[row, len(rewards):].sum() == 0
        states = batch.observations[row, : len(rewards)].argmax(-1).tolist()  # one-hot observations s_t = t
        assert states == list(range(len(rewards)))
    assert batch.terminated.all()
    # reward-to-go with gamma = 0.5 on episode (copy 0, episode 0): rewards 1, 2 -> G = [1 + 0.5 * 2, 2]
    gamma = 0.5
    returns = discounted_returns(batch.rewards, batch.mask, gamma)
    for row, rewards in enumerate(expected):
        by_hand = [sum(gamma ** (k - t) * rewards[k] for k in range(t, len(rewards))) for t in range(len(rewards))]
        assert returns[row, : len(rewards)].tolist() == pytest.approx(by_hand)
    assert returns[0, :2].tolist() == [2.0, 2.0]


def _tabular_agent(theta: torch.Tensor) -> GymAgent:
    """The gym track's policy with no hidden layer and a frozen zero bias: pi(a | s) = softmax(theta[s])."""
    mdp = default_mdp()
    agent = GymAgent.for_spaces(spaces.Discrete(mdp.num_states), spaces.Discrete(mdp.num_actions), [])
    layer = agent.policy.net[0]
    with torch.no_grad():
        layer.weight.copy_(theta.T)
        layer.bias.zero_()
    layer.bias.requires_grad_(False)
    return agent.double()


THETA = torch.tensor([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]], dtype=torch.float64)


def _gym_gradient(agent: GymAgent, batch: EpisodeBatch, algorithm: GymAlgorithmConfig) -> torch.Tensor:
    """grad J estimate on ``batch`` through the gym track: episode_advantages + reinforce_loss; as [S, A]."""
    _, advantages = episode_advantages(batch, algorithm, agent)
    loss = reinforce_loss(agent.policy, batch, advantages)
    (grad_weight,) = torch.autograd.grad(-loss, [agent.policy.net[0].weight])
    return grad_weight.T


@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
def test_gym_estimator_matches_the_exact_gradient_by_enumeration(baseline):
    mdp = default_mdp()
    algorithm = GymAlgorithmConfig(gamma=1.0, baseline=baseline, whiten=False)

    def estimator(theta, tensors):
        agent = _tabular_agent(theta)
        batch = EpisodeBatch(
            observations=torch.nn.functional.one_hot(tensors["states"], mdp.num_states).double(),
            actions=tensors["actions"], rewards=tensors["rewards"], mask=tensors["mask"],
            terminated=torch.ones(len(tensors["mask"]), dtype=torch.bool))
        return _gym_gradient(agent, batch, algorithm)

    mean, _ = estimator_moments(THETA, mdp, estimator, batch_size=3)
    assert torch.allclose(mean, exact_gradient(THETA, mdp), atol=1e-10)


def test_gym_rollouts_of_the_enumerable_mdp_have_the_exact_trajectory_law_and_an_unbiased_gradient():
    mdp = default_mdp()
    agent = _tabular_agent(THETA)
    envs = make_vector_env(GymEnvConfig(id=TABULAR_ENV_ID, num_envs=16))
    generator = torch.Generator().manual_seed(0)
    algorithm = GymAlgorithmConfig(gamma=1.0, baseline="leave_one_out", whiten=False)
    estimates, counts = [], {}
    envs.reset(seed=0)
    for _ in range(64):  # 64 batches of 16 copies x 12 episodes (several autoresets per copy)
        batch, _ = collect_episodes(envs, agent, 12, generator)
        batch.observations = batch.observations.double()
        batch.rewards, batch.mask = batch.rewards.double(), batch.mask.double()
        estimates.append(_gym_gradient(agent, batch, algorithm))
        for row in range(len(batch)):
            length = int(batch.lengths[row])
            key = tuple(batch.actions[row, :length].tolist())
            counts[key] = counts.get(key, 0) + 1
    envs.close()
    # 1. every trajectory appears with its exact probability (12288 episodes; 5-sigma binomial bounds)
    total = sum(counts.values())
    trajectories = mdp.trajectories()
    assert set(counts) <= {t.actions for t in trajectories}
    for trajectory in trajectories:
        p = float(torch.exp(trajectory_logprob(THETA, trajectory)))
        frequency = counts.get(trajectory.actions, 0) / total
        assert abs(frequency - p) < 5 * math.sqrt(p * (1 - p) / total) + 1e-9, trajectory
    # 2. the gradient estimates average to the exact gradient (per-coordinate z-scores)
    stacked = torch.stack(estimates)
    z = (stacked.mean(0) - exact_gradient(THETA, mdp)) / (stacked.std(0) / math.sqrt(len(estimates)))
    assert z.abs().max() < 4.5, z


def test_cartpole_smoke_run_improves_the_return(tmp_path):
    recipe = gym_recipe_from_dict({
        "env": {"id": "CartPole-v1", "num_envs": 8}, "policy": {"hidden_sizes": [32]},
        "algorithm": {"gamma": 0.99, "baseline": "timestep_mean", "whiten": False},
        "optim": {"lr": 1e-2}, "train": {"steps": 30, "save_every": 10}, "eval": {"episodes": 20}, "seed": 0,
    })
    summary = train_gym(recipe, tmp_path / "run", show_progress=False)
    returns = [m["episode/return"] for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "episode/return" in m]
    assert len(returns) == 30
    assert np.mean(returns[-3:]) > 2.5 * np.mean(returns[:3])
    assert summary["eval_return_mean"] > 2 * summary["eval_return_before"]
    assert summary["eval_episodes"] == 20 and summary["env_steps"] == sum(r * 8 for r in returns)
    # checkpoints and the final policy load back and act like the trained one
    assert (tmp_path / "run" / "checkpoint-20" / "model.pt").exists()
    agent = GymAgent.from_pretrained(tmp_path / "run" / "final")
    env = gymnasium.make("CartPole-v1")
    observation, _ = env.reset(seed=123)
    steps, done = 0, False
    while not done:
        observation, _, terminated, truncated, _ = env.step(int(agent.act(observation[None])[0]))
        steps, done = steps + 1, terminated or truncated
    assert steps > 2 * summary["eval_return_before"]


def test_blackjack_optimal_value_is_the_best_policy_value():
    for rules in ({}, {"sab": True}, {"natural": True}):
        best = optimal_return(rules)
        table = {(s, u, a): optimal_action(s, u, a, rules) for s in range(4, 22) for u in range(1, 11) for a in (0, 1)}
        assert policy_return(lambda s, u, a: float(table[(s, u, a)]), rules) == pytest.approx(best, abs=1e-12)
        rng = np.random.default_rng(0)
        for _ in range(5):  # random stochastic policies never beat it
            probabilities = rng.uniform(size=(22, 11, 2))
            assert policy_return(lambda s, u, a: probabilities[s, u, a], rules) < best
    # the registered Blackjack-v1 plays by Sutton & Barto's rules (sab=True)
    assert optimal_return({"sab": True}) == pytest.approx(-0.04311, abs=1e-5)


def test_blackjack_exact_value_agrees_with_gymnasium_monte_carlo():
    """'Hit below 20' on gymnasium's own Blackjack-v1 (sab rules), 60k episodes, against the exact value."""
    envs = gymnasium.make_vec("Blackjack-v1", num_envs=64, vectorization_mode="sync")
    observations, _ = envs.reset(seed=0)
    returns, resetting = [], np.zeros(64, dtype=bool)
    while len(returns) < 60_000:
        observations, rewards, terminated, truncated, _ = envs.step((observations[0] < 20).astype(np.int64))
        done = (terminated | truncated) & ~resetting
        returns.extend(rewards[done].tolist())
        resetting = done
    envs.close()
    exact = policy_return(lambda s, u, a: float(s < 20), {"sab": True})
    standard_error = np.std(returns) / math.sqrt(len(returns))
    assert abs(np.mean(returns) - exact) < 4 * standard_error


@pytest.mark.slow
@pytest.mark.parametrize("recipe,threshold", [("cartpole", 475.0), ("acrobot", -100.0), ("inverted_pendulum", 950.0)])
def test_recipes_reach_their_returns(tmp_path, recipe, threshold):
    from rlhf_pg.gym.config import load_gym_recipe

    if recipe == "inverted_pendulum":
        pytest.importorskip("mujoco")

    path = Path(__file__).resolve().parents[1] / "recipes" / "gym" / f"{recipe}.yaml"
    summary = train_gym(load_gym_recipe(path, ["seed=1"]), tmp_path / recipe, show_progress=False)
    assert summary["eval_return_mean"] >= threshold


@pytest.mark.slow
def test_blackjack_recipe_gets_within_a_cent_of_basic_strategy(tmp_path):
    from rlhf_pg.gym.config import load_gym_recipe

    path = Path(__file__).resolve().parents[1] / "recipes" / "gym" / "blackjack.yaml"
    summary = train_gym(load_gym_recipe(path, ["seed=1"]), tmp_path / "blackjack", show_progress=False)
    assert summary["blackjack_optimal_return"] == pytest.approx(-0.04311, abs=1e-5)
    assert 0 <= summary["blackjack_gap"] < 0.01


# --- command line and recipe errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["gym", "CARTPOLE", "env.id=CartPole-v9"], "is not a registered gymnasium environment"),
    (["gym", "CARTPOLE", "env.id=CartPole-v9"], "did you mean 'CartPole-v1'"),
    (["gym", "CARTPOLE", "env.idd=CartPole-v1"], "unknown recipe key 'env.idd'; did you mean 'env.id'"),
    (["gym", "CARTPOLE", "eval.episodes=5"], "eval.episodes: 5 is out of range; it must be >= 20"),
    (["gym", "CARTPOLE", "algorithm.baseline=loo"], "algorithm.baseline: 'loo' is not allowed"),
    (["gym", "CARTPOLE", "env.kwargs.bogus=1"], "env.kwargs {'bogus': 1} do not fit 'CartPole-v1'"),
    (["gym", "QUICKSTART"], "has no 'env' section, so it is not a gym recipe"),
    (["gym", "CARTPOLE", "--max-steps", "0"], "--max-steps: expected a positive integer"),
    (["variance", "missing.yaml"], "recipe file not found: missing.yaml"),
    (["variance", "CARTPOLE", "--batches", "1"], "--batches must be at least 2"),
])
def test_bad_gym_input_exits_2_with_one_clear_message(tmp_path, capsys, args, message):
    from rlhf_pg.cli import main

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    replace = {"CARTPOLE": str(recipes / "gym" / "cartpole.yaml"), "QUICKSTART": str(recipes / "quickstart.yaml")}
    code = main(["--no-progress", *[replace.get(a, a) for a in args], "--output-dir", str(tmp_path / "out")]
                if args[0] == "gym" else ["--no-progress", *[replace.get(a, a) for a in args]])
    error = capsys.readouterr().err
    assert code == 2, error
    assert message in error and error.startswith("error:")


def test_missing_mujoco_is_a_clear_error(monkeypatch):
    from rlhf_pg.errors import UserError

    def no_mujoco(*args, **kwargs):
        raise gymnasium.error.DependencyNotInstalled("No module named 'mujoco'")

    monkeypatch.setattr(gymnasium, "make_vec", no_mujoco)
    with pytest.raises(UserError, match=r"pip install 'rlhf-pg\[gym\]'"):
        make_vector_env(GymEnvConfig(id="InvertedPendulum-v5"))


def test_gym_command_writes_a_run_and_refuses_to_overwrite_it(tmp_path, capsys):
    from rlhf_pg.cli import main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "gym" / "cartpole.yaml"
    args = ["--no-progress", "gym", str(recipe), "--max-steps", "2", "--seed", "3", "--output-dir", str(tmp_path / "run"),
            "env.num_envs=4"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["seed"] == 3 and summary["updates"] == 2 and summary["eval_episodes"] == 50
    assert summary["env_steps"] > 0 and summary["wall_time_s"] > 0 and "eval_return_mean" in summary
    assert (tmp_path / "run" / "final" / "config.json").exists() and (tmp_path / "run" / "recipe.yaml").exists()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run; pass --resume to continue it, --overwrite to replace it" in err
    assert main(args + ["--overwrite"]) == 0
