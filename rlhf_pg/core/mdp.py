"""The vocabulary: token generation as a Markov decision process.

    state   s_t = prompt + completion tokens a_0 .. a_{t-1}
    action  a_t = the next token, drawn from pi_theta(. | s_t)
    transition  s_{t+1} = s_t with a_t appended (deterministic)
    reward  r(s_t, a_t): a score of the finished completion on its last token (EOS), plus optional
            per-token terms such as a KL penalty
    trajectory  tau = (s_0, a_0, r_0, ..., s_{T-1}, a_{T-1}, r_{T-1}), one completion

In a multi-turn episode the environment also writes: after some actions it appends observation tokens
o (a tool's result, an environment's reply) drawn from its own distribution, s_{t+1} = s_t + a_t + o.
They are part of the *transition*, not actions: ``action_mask`` marks which completion tokens are actions.

A ``Rollout`` is a batch of B trajectories padded to T completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

Tensor = torch.Tensor


@dataclass
class Rollout:
    """B sampled trajectories. Tensors are ``[B, P]`` (prompt) or ``[B, T]`` (completion).

    Fields, in the MDP's notation:
      prompt_ids       ``[B, P]`` long: s_0, left-padded with the pad token.
      prompt_mask      ``[B, P]`` float 0/1: 1 on real prompt tokens.
      completion_ids   ``[B, T]`` long: the actions a_0 .. a_{T-1}, right-padded.
      completion_mask  ``[B, T]`` float 0/1: 1 up to and including the EOS token (right-padded).
      logprobs         ``[B, T]``: log pi_old(a_t | s_t) of the sampled tokens under the sampling policy.
      rewards          ``[B, T]``: r(s_t, a_t); 0 until scored (see ``terminal_rewards``).
      group_ids        ``[B]`` long: which prompt each completion came from (equal ids = one group).
      prompts, completions  the decoded texts (the reward functions' inputs).
      finished         ``[B]`` bool: the completion ended with EOS (not cut at max_new_tokens).
      extras           per-prompt dataset columns, repeated per completion (reward-function kwargs).
      ref_logprobs     ``[B, T]``: log pi_ref(a_t | s_t) under the reference policy, when KL control is on.
      action_mask      ``[B, T]`` float 0/1, multi-turn episodes only: 1 on the policy's own tokens (actions),
                       0 on the environment's (observations: tool results, environment replies), which are
                       transitions, appended to the context but never in the loss, the KL or the advantages.
                       None: every completion token is an action. ``action_tokens`` is the mask to use.
      step_rewards     ``[B, T]``, multi-turn episodes only: rewards the environment paid along the way, each on
                       the last action token of the turn that earned it (already part of the row's score).
      episodes         multi-turn episodes only: per row, the episode's record turn by turn (``episodes.spec.Episode``).
      temperature      T of the policy pi = softmax(logits / T) that ``logprobs`` were taken under (set by the sampler
                       from ``SamplingParams.policy_temperature``); the update and the reference score the batch
                       at the same T, so sampler and trainer agree on which policy acted.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    logprobs: Tensor
    group_ids: Tensor
    rewards: Tensor | None = None
    prompts: list[str] = field(default_factory=list)
    completions: list[str] = field(default_factory=list)
    finished: Tensor | None = None
    extras: dict[str, list] = field(default_factory=dict)
    ref_logprobs: Tensor | None = None
    action_mask: Tensor | None = None
    step_rewards: Tensor | None = None
    episodes: list | None = None
    temperature: float = 1.0

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, index: Tensor | slice | list[int]) -> "Rollout":
        """The rollout restricted to rows ``index`` (micro-batches, shards)."""
        if isinstance(index, slice):
            rows = list(range(len(self)))[index]
        elif isinstance(index, Tensor):
            rows = index.tolist()
        else:
            rows = list(index)
        row_tensor = torch.as_tensor(rows, dtype=torch.long, device=self.completion_ids.device)
        updates = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                updates[f.name] = value.index_select(0, row_tensor)
            elif isinstance(value, list):
                updates[f.name] = [value[i] for i in rows]
            elif isinstance(value, dict):
                updates[f.name] = {key: [column[i] for i in rows] for key, column in value.items()}
        return replace(self, **updates)


def action_tokens(batch: Rollout) -> Tensor:
    """``[B, T]`` float 0/1: the positions that are the policy's actions, ``completion_mask * action_mask``.

    The mask of every loss, KL term, aggregation and advantage: in a multi-turn episode the environment's
    tokens (observations) are in the context but are not actions, so their log-probabilities are never used.
    """
    if batch.action_mask is None:
        return batch.completion_mask
    return batch.completion_mask * batch.action_mask


def terminal_rewards(scores: Tensor, mask: Tensor, step_rewards: Tensor | None = None) -> Tensor:
    """Place each trajectory's score on its last real action: ``r[b, t] = scores[b]`` at the last t with mask 1.

    ``scores``: ``[B]``; ``mask``: ``[B, T]`` (it may have holes: the observations of an episode). All other
    steps get reward 0, so the undiscounted reward-to-go at every step equals the score. ``step_rewards``
    ``[B, T]``: rewards already paid along the way (an environment's, on the last action of their turn) and
    counted in ``scores``; they stay where they are and the last action gets the rest,
    ``scores[b] - sum_t step_rewards[b, t]``.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, -1).max(-1).values  # [B]: the last action, -1 when none
    rewards = torch.zeros_like(mask, dtype=scores.dtype)
    if step_rewards is not None:
        scores = scores - step_rewards.to(scores.dtype).sum(-1)
        rewards = rewards + step_rewards.to(scores.dtype) * (mask > 0)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    rewards[rows, last[rows]] += scores[rows]
    return rewards


def truncated(batch: Rollout) -> Tensor:
    """``[B]`` bool: the completion hit ``max_new_tokens`` without EOS or a stop string (``~batch.finished``)."""
    return ~batch.finished


def mask_truncated(batch: Rollout) -> Rollout:
    """``rollout.mask_truncated``: the batch with every truncated completion's mask (and log-probs) zeroed, so it
    carries no gradient; its reward still counts in the baselines of its group and batch.

        completion_mask[b, t] <- completion_mask[b, t] * finished[b]
    """
    keep = batch.finished.to(batch.completion_mask.dtype)[:, None]  # [B, 1]
    return replace(batch, completion_mask=batch.completion_mask * keep, logprobs=batch.logprobs * keep)


def padded_completions(token_rows: list[list[int]], pad_token_id: int, action_rows: list[list[float]] | None = None,
                       logprob_rows: list[list[float]] | None = None, device="cpu"
                       ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """``(completion_ids, completion_mask, action_mask, logprobs)`` ``[B, T]``, right-padded, from per-row lists.

    T = the longest row (at least 1); ``completion_mask`` is 1 on each row's tokens; ``action_mask`` from
    ``action_rows`` (None without them); ``logprobs`` from ``logprob_rows`` (0 without them, and on padding).
    """
    width = max(1, max((len(ids) for ids in token_rows), default=0))
    shape = (len(token_rows), width)
    completion_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    completion_mask, logprobs = torch.zeros(shape), torch.zeros(shape)
    action_mask = torch.zeros(shape) if action_rows is not None else None
    for row, ids in enumerate(token_rows):
        completion_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        completion_mask[row, : len(ids)] = 1.0
        if action_mask is not None:
            action_mask[row, : len(ids)] = torch.tensor(action_rows[row], dtype=torch.float32)
        if logprob_rows is not None:
            logprobs[row, : len(ids)] = torch.tensor(logprob_rows[row], dtype=torch.float32)
    return (completion_ids.to(device), completion_mask.to(device),
            action_mask.to(device) if action_mask is not None else None, logprobs.to(device))


def concat_rollouts(parts: list[Rollout], pad_token_id: int) -> Rollout:
    """One ``Rollout`` of the rows of ``parts`` (in order), re-padded to common widths.

    ``prompt_*`` tensors are left-padded (prompts end where completions begin), the others right-padded;
    id tensors pad with ``pad_token_id``, everything else with 0 (masks 0: padding is never an action).
    Every part must have been sampled at the same temperature.
    """
    if len(parts) == 1:
        return parts[0]
    temperatures = {part.temperature for part in parts}
    if len(temperatures) > 1:
        raise ValueError(f"cannot concatenate rollouts sampled at different temperatures {sorted(temperatures)}")
    merged = {"temperature": parts[0].temperature}
    for f in fields(Rollout):
        if f.name == "temperature":
            continue
        values = [getattr(part, f.name) for part in parts]
        if all(v is None for v in values):
            merged[f.name] = None
        elif isinstance(values[0], Tensor) and values[0].dim() == 2:
            width = max(v.shape[1] for v in values)
            fill = pad_token_id if f.name.endswith("_ids") else 0
            left = f.name.startswith("prompt_")
            padded = [torch.nn.functional.pad(v, (width - v.shape[1], 0) if left else (0, width - v.shape[1]), value=fill)
                      for v in values]
            merged[f.name] = torch.cat(padded)
        elif isinstance(values[0], Tensor):
            merged[f.name] = torch.cat(values)
        elif isinstance(values[0], list):
            merged[f.name] = [item for value in values for item in value]
        elif isinstance(values[0], dict):
            merged[f.name] = {key: [item for value in values for item in value[key]] for key in values[0]}
    return Rollout(**merged)
