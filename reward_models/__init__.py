"""Every source of reward for rlhf-pg: the registry, the scorer, rule rewards, task rewards, learned reward models.

Every reward function has TRL's signature ``f(prompts, completions, **kwargs) -> list[float]``: one
float per completion (or None for a sample it does not judge). ``kwargs`` carry the dataset's other
columns (one value per completion) and ``finished`` (the completion ended with EOS or a stop string).
Recipes name registered functions (``arithmetic_exact``) or any importable function
(``my_pkg.rewards:score``); ``RewardScorer`` (``scorer.py``) sums a recipe's weighted terms.

    registry.py        names -> functions                 scorer.py      the weighted sum, checked outputs
    rules.py           rewards computed from the text     tasks.py       the calculator task's rewards
    reward_model.py    a learned reward model as a reward (text or chat prompts)
    remote.py          http: a reward server              judge.py       llm_judge: an OpenAI-compatible chat model
    reasoning.py       reasoning_gym (the task's own score), format (<answer> tags), math_verify (math answers)
    bradley_terry.py   training one (``rlhf-pg reward-model``), on pairs from preferences.py /
                       arith_preferences.py, configured by config.py
"""

from .registry import REWARD_FUNCTIONS, register_reward, resolve_reward
from . import rules  # noqa: F401  (registers the rule rewards)
from . import tasks  # noqa: F401  (registers the task rewards)
from . import reward_model  # noqa: F401  (registers reward_model)
from . import remote, judge  # noqa: F401  (register http, llm_judge)
from . import reasoning  # noqa: F401  (registers reasoning_gym, format, math_verify)
from .registry import RewardSourceError, Scores
from .scorer import RewardScorer, judged_mean

__all__ = ["REWARD_FUNCTIONS", "register_reward", "resolve_reward", "RewardScorer", "judged_mean", "Scores",
           "RewardSourceError"]
