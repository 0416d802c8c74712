"""Where the variance lab's batches come from: a gym policy's episodes or an LM's sampled completions.

Each source gives ``sample() -> Batch`` (log-probs with gradient at the fixed parameters ``params``),
``groups``/``gamma``/``batch_size``, an optional learned V (``fit_value``) and, where the MDP can be
enumerated, the exact reference gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.advantages import discounted_returns
from ..core.losses import value_loss

Tensor = torch.Tensor


@dataclass
class Batch:
    """One sampled batch: ``logprobs`` ``[B, T]`` (with gradient), rewards, mask, groups, optional V(s_t)."""

    logprobs: Tensor
    rewards: Tensor
    mask: Tensor
    group_ids: Tensor
    values: Tensor | None = None
    greedy_rewards: Tensor | None = None  # [B]: the reward of the prompt's greedy completion (ReMax)



def flat_gradient(loss: Tensor, params: list[Tensor], retain_graph: bool) -> Tensor:
    """The gradient of ``loss`` over all ``params`` as one float64 vector (zeros for unused parameters)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(grads, params)])


# --- the sources ----------------------------------------------------------------------------------------


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

        from reward_models import RewardScorer

        from ..data import PromptSampler, load_prompt_datasets
        from ..models import load_policy
        from ..policy.sampler import SamplingParams, make_sampler

        torch.manual_seed(recipe.seed)
        self.recipe = recipe
        model_config = copy.deepcopy(recipe.model)
        if policy_dir:
            model_config.name_or_path = policy_dir
        self.model, self.tokenizer, _ = load_policy(model_config)
        self.model.eval()  # no dropout: the lab measures the estimator's own noise
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        train_set, _ = load_prompt_datasets(recipe.data)
        self.prompts = PromptSampler(train_set, recipe.rollout.prompts_per_step, recipe.data.shuffle_seed + recipe.seed)
        self.scorer = RewardScorer(recipe.rewards)
        self.sampling = SamplingParams.for_training(recipe)
        self.sampler = make_sampler(recipe, self.model, self.tokenizer)
        self.generator = torch.Generator().manual_seed(recipe.seed)
        self.batch_size = recipe.rollout.prompts_per_step * recipe.rollout.completions_per_prompt
        self.gamma = recipe.algorithm.gamma
        self.groups = recipe.rollout.completions_per_prompt > 1
        self.value = None
        self.description = f"{model_config.name_or_path} on the recipe's prompts"
        self.greedy = True  # also score each prompt's greedy completion (the ReMax baseline)
        self._step = 0

    def sample(self, keep_for_value: bool = False) -> Batch:
        from ..core.mdp import terminal_rewards
        from ..policy.logprobs import completion_logprobs

        prompts, columns = self.prompts.batch(self._step)
        self._step += 1
        batch = self.sampler.sample(prompts, self.recipe.rollout.completions_per_prompt, self.sampling,
                                    columns=columns, generator=self.generator)
        scores, _ = self.scorer(batch.prompts, batch.completions, finished=batch.finished.tolist(), **batch.extras)
        rewards = terminal_rewards(torch.tensor(scores, dtype=torch.float64), batch.completion_mask.double())
        logprobs = completion_logprobs(self.model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                       batch.completion_mask, batch.temperature)
        greedy = None
        if self.greedy:
            from dataclasses import replace

            greedy_batch = self.sampler.sample(prompts, 1, replace(self.sampling, temperature=0.0), columns=columns,
                                               generator=self.generator)
            greedy_scores, _ = self.scorer(greedy_batch.prompts, greedy_batch.completions,
                                           finished=greedy_batch.finished.tolist(), **greedy_batch.extras)
            k = self.recipe.rollout.completions_per_prompt
            greedy = torch.tensor(greedy_scores, dtype=torch.float64).repeat_interleave(k)
        return Batch(logprobs, rewards, batch.completion_mask.double(), batch.group_ids, greedy_rewards=greedy)

    def fit_value(self) -> None:  # no value head for language models
        return None

    def exact_reference(self) -> Tensor | None:
        return None

    def close(self) -> None:
        self.sampler.close()
