"""The toy track: REINFORCE on gymnasium environments with the LM track's own estimator functions.

    envs.py       gymnasium vector envs (clear errors), the enumerable MDP as an env
    policy.py     MLP policies (categorical / Gaussian), the learned baseline V(s), save/load
    rollout.py    complete episodes from a vector env -> EpisodeBatch [B, T] (autoreset handled)
    train.py      the loop: rollout -> advantages.py -> losses.py -> step; evaluation; summary
    blackjack.py  Blackjack-v1 solved exactly (optimal value, exact value of a learned policy)

Returns, baselines and losses come from ``rlhf_pg.core.advantages`` and ``rlhf_pg.core.losses``; nothing here
reimplements them. Run with ``rlhf-pg gym recipes/gym/cartpole.yaml``.
"""

from .envs import TABULAR_ENV_ID, TabularMDPEnv, make_vector_env
from .policy import GymAgent
from .rollout import EpisodeBatch, collect_episodes
from .train import episode_advantages, evaluate_agent, reinforce_loss, train_gym

__all__ = ["GymAgent", "EpisodeBatch", "TABULAR_ENV_ID", "TabularMDPEnv", "collect_episodes", "episode_advantages",
           "evaluate_agent", "make_vector_env", "reinforce_loss", "train_gym"]
