"""Environments for the toy track: gymnasium vector environments with clear errors, and the
enumerable MDP of ``rlhf_pg.gym.tabular`` as a gymnasium environment.

Vector environments are ``gymnasium.vector.SyncVectorEnv`` in ``AutoresetMode.NEXT_STEP`` (gymnasium
1.x's default, set explicitly here because ``rollout.collect_episodes`` relies on it): the step after
an episode ends only resets that copy, ignores its action and returns reward 0.
"""

from __future__ import annotations

import difflib

import gymnasium
import numpy as np
from gymnasium import spaces

from .config import GymEnvConfig
from ..errors import UserError
from .tabular import TabularMDP, default_mdp

TABULAR_ENV_ID = "rlhf_pg/TabularMDP-v0"


class TabularMDPEnv(gymnasium.Env):
    """A ``TabularMDP`` (deterministic transitions, start in state 0) as a gymnasium environment.

    Observation: the state index (``Discrete(num_states)``); action ``Discrete(num_actions)``. The
    episode terminates when ``next_state[s][a] == -1`` and is truncated after ``horizon`` steps, so its
    trajectories are exactly those that ``TabularMDP.trajectories()`` enumerates.
    """

    metadata = {"render_modes": []}

    def __init__(self, mdp: TabularMDP | None = None):
        self.mdp = mdp or default_mdp()
        self.observation_space = spaces.Discrete(self.mdp.num_states)
        self.action_space = spaces.Discrete(self.mdp.num_actions)
        self._state, self._steps = 0, 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._state, self._steps = 0, 0
        return np.int64(self._state), {}

    def step(self, action):
        reward = float(self.mdp.reward[self._state][int(action)])
        following = self.mdp.next_state[self._state][int(action)]
        self._steps += 1
        terminated = following < 0
        if not terminated:
            self._state = following
        truncated = not terminated and self._steps >= self.mdp.horizon
        return np.int64(self._state), reward, terminated, truncated, {}


def register_envs() -> None:
    """Register the toy track's own environments with gymnasium (idempotent)."""
    if TABULAR_ENV_ID not in gymnasium.registry:
        gymnasium.register(id=TABULAR_ENV_ID, entry_point="rlhf_pg.gym.envs:TabularMDPEnv")


def make_vector_env(env: GymEnvConfig, num_envs: int | None = None) -> gymnasium.vector.VectorEnv:
    """``env.num_envs`` (or ``num_envs``) synchronous copies of ``env.id``; a ``UserError`` if that is impossible."""
    register_envs()
    kwargs = dict(env.kwargs)
    if env.max_episode_steps is not None:
        kwargs["max_episode_steps"] = env.max_episode_steps
    try:
        return gymnasium.make_vec(
            env.id, num_envs=num_envs or env.num_envs, vectorization_mode="sync",
            vector_kwargs={"autoreset_mode": gymnasium.vector.AutoresetMode.NEXT_STEP}, **kwargs,
        )
    except gymnasium.error.DependencyNotInstalled as error:
        raise UserError(
            f"env.id {env.id!r} needs a package that is not installed ({error}). MuJoCo environments such as "
            "InvertedPendulum-v5 need the optional extra: pip install 'rlhf-pg[gym]' (or: pip install 'gymnasium[mujoco]')"
        ) from None
    except (gymnasium.error.NameNotFound, gymnasium.error.NamespaceNotFound, gymnasium.error.VersionNotFound,
            gymnasium.error.DeprecatedEnv, gymnasium.error.UnregisteredEnv) as error:
        close = difflib.get_close_matches(env.id, list(gymnasium.registry), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else " (gymnasium.pprint_registry() lists them)"
        raise UserError(f"env.id {env.id!r} is not a registered gymnasium environment: {error}{hint}") from None
    except TypeError as error:
        raise UserError(f"env.kwargs {env.kwargs!r} do not fit {env.id!r}: {error}") from None
