"""Sampling multi-turn episodes with one KV cache for the whole episode (``episodes.spec`` has the vocabulary).

One prefill over the prompts, then one forward per iteration over a block ``[B, W]`` (``decoder.extend``):

    every row that is generating    samples its next token from its logits (an action) and appends it
    every row whose tool or environment has answered   appends the whole observation in the same block
    every row still waiting for its tool               appends nothing (masked slots): it never stalls the others

Rows run asynchronously: each is in its own turn, and a tool call runs in a thread while the other rows
keep decoding (after a grace of ``GRACE_S`` for fast tools, so a quick result joins the block at once).
Only when no row can move does the loop block, on the first call to finish or time out. Observation tokens
are prefilled into the cache in one forward, never recomputed, and each row's positions count only its
own tokens, so the logits equal those of one plain forward over ``[prompt | episode]`` (tested): the update
recomputes the log-probs of exactly the sampled actions. One forward per iteration on every process keeps
sharded (ZeRO-3, FSDP) runs in step (``all_finished``).

The completion of row b is its episode, contiguous: ``completion_ids`` = actions and observations in
order, ``completion_mask`` 1 up to the end, ``action_mask`` 1 on the sampled tokens only, ``logprobs`` of
the actions (0 on observations), ``step_rewards`` the environment's rewards on the last action of each turn.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..chat import is_conversation
from ..core.mdp import Rollout, padded_completions
from ..errors import UserError
from ..policy.builtin import choose_tokens, prefill_prompts
from ..policy.kernels import token_logprobs
from ..policy.packed import packed_linears
from ..policy.prompts import cut_at_stop, encode_prompts, stop_token_ids
from ..policy.sampler import SamplingParams
from .spec import ENVIRONMENT, MODEL, TOOL, Episode, EpisodeSpec, Turn, checked_step, new_environment
from .tools import PendingCall, call_tool, result_text, tool_schemas

GENERATING, WAITING, DONE = "generating", "waiting", "done"
GRACE_S = 0.01  # how long a freshly started call may keep the block waiting (a fast tool joins it at once)
TURNS_COLUMN = "turns"  # the episodes' turns, passed to the reward functions beside the dataset columns


class _Row:
    """One episode being sampled: its tokens so far, its turn, what it waits for, what it feeds next."""

    def __init__(self, spec: EpisodeSpec, tokenizer, budget: int, environment: Any = None):
        self.spec, self.tokenizer, self.budget, self.environment = spec, tokenizer, budget, environment
        self.tokens: list[int] = []
        self.is_action: list[bool] = []
        self.logprobs: list[float] = []
        self.rewards: dict[int, float] = {}  # token index -> the environment's reward for the turn ending there
        self.episode = Episode()
        self.state, self.feed = GENERATING, []
        self.turn_start, self.turn_text, self.actions = 0, "", 0
        self.pending: PendingCall | None = None
        self.pending_tool: str | None = None  # None while an environment step is pending

    # --- the model's turn ---------------------------------------------------------------------------

    def act(self, token: int, logprob: float, text: str, eos: set[int], stop: tuple[str, ...]) -> None:
        """Append a sampled token; ``text`` is the current turn's text with it. Ends the turn when it should."""
        since, spec = len(self.turn_text), self.spec
        self.tokens.append(token)
        self.is_action.append(True)
        self.logprobs.append(logprob)
        self.actions += 1
        self.turn_text, self.feed = text, [token]
        stopped = any(s in text[max(0, since - len(s) + 1):] for s in stop)
        call = spec.call_format.call_at_end(text, since) if spec.call_format is not None and not stopped else None
        if token in eos or stopped:
            self._end_turn(cut_at_stop(text, stop) if stopped else text)
            if self.environment is None:
                return self._finish("stop" if stopped and token not in eos else "eos")
            self.pending, self.pending_tool = PendingCall(self.environment.step, [self.episode.turns[-1].text], {},
                                                          spec.tool_timeout_s, "step"), None
            self.state = WAITING
        elif call is not None:
            self._end_turn(text)
            if self._turns() >= spec.max_turns or len(self.tokens) >= self.budget:
                return self._finish("max_turns" if self._turns() >= spec.max_turns else "budget")
            self.episode.tool_calls += 1
            self.pending, self.pending_tool = call_tool(spec.tools, call[0], call[1], spec.tool_timeout_s), call[0]
            self.state = WAITING
        elif len(self.tokens) >= self.budget:
            self._end_turn(text)
            self._finish("budget")

    def _end_turn(self, text: str) -> None:
        self.episode.turns.append(Turn(MODEL, text, len(self.tokens) - self.turn_start))

    def _turns(self) -> int:
        return sum(turn.role == MODEL for turn in self.episode.turns)

    def _finish(self, reason: str) -> None:
        self.state, self.feed, self.episode.ended = DONE, [], reason

    # --- the environment's answer -------------------------------------------------------------------

    def collect(self) -> None:
        """Take the pending answer (it is ready): the observation is appended and fed, or the episode ends."""
        value, error = self.pending.outcome()
        timed_out = not self.pending.done.is_set()
        self.pending, spec = None, self.spec
        if self.pending_tool is not None:
            self.episode.tool_errors += error is not None
            self._observe(TOOL, result_text(value, error, spec.result_format), self.pending_tool)
            if error is not None and self.episode.tool_errors >= spec.max_tool_errors:
                self._finish("tool_errors")
            return
        name = type(self.environment).__name__
        turn = self.episode.turns[-1]
        if timed_out:
            raise UserError(f"environment {name}: step({turn.text!r:.40}) did not return within rollout.tool_timeout_s="
                            f"{spec.tool_timeout_s:g} s; make it faster or raise rollout.tool_timeout_s")
        if error is not None:
            raise UserError(f"environment {name}: step({turn.text!r:.40}) raised {error}; fix the class (rlhf-pg "
                            "--debug shows the traceback)")
        observation, reward, done = checked_step(name, value, turn.text)
        turn.reward = reward
        self.rewards[len(self.tokens) - 1] = reward
        if done or self._turns() >= spec.max_turns or len(self.tokens) >= self.budget:
            self._finish("done" if done else "max_turns" if self._turns() >= spec.max_turns else "budget")
        else:
            self._observe(ENVIRONMENT, observation, None)

    def _observe(self, role: str, text: str, name: str | None) -> None:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        room = self.budget - len(self.tokens)
        kept = ids[:room]
        shown = text if len(kept) == len(ids) else self.tokenizer.decode(kept, skip_special_tokens=True)
        self.tokens += kept
        self.is_action += [False] * len(kept)
        self.logprobs += [0.0] * len(kept)
        self.episode.turns.append(Turn(role, shown, len(kept), name))
        self.feed += kept
        self.state, self.turn_start, self.turn_text = GENERATING, len(self.tokens), ""
        if len(self.tokens) >= self.budget:
            self._finish("budget")


def sample_episodes(spec: EpisodeSpec, model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    params: SamplingParams, environments: list[Any], generator: torch.Generator | None = None,
                    all_finished=None, lean: bool = True) -> list[_Row]:
    """One episode per prompt row (``environments[b]``: row b's instance, or None); the rows, all done."""
    with torch.inference_mode(), packed_linears(model, prompt_ids.shape[0]):  # weights packed while decoding
        return _sample(spec, model, tokenizer, prompt_ids, prompt_mask, params, environments, generator,
                       all_finished or (lambda done: bool(done.all())), lean)


def _sample(spec, model, tokenizer, prompt_ids, prompt_mask, params, environments, generator, all_finished, lean):
    device = prompt_ids.device
    eos_ids = stop_token_ids(tokenizer, model)
    eos, eos_set = torch.tensor(eos_ids, device=device), set(eos_ids)
    stop = params.stop
    rows = [_Row(spec, tokenizer, params.max_new_tokens, env) for env in environments]
    # a group's prompt prefilled once, and a prefix all prompts share (a system prompt, tool instructions) once for all
    decoder, logits = prefill_prompts(model, prompt_ids, prompt_mask, prompt_ids.shape[1] + params.max_new_tokens + 8,
                                      lean)  # [B, V]: row b's next-token logits (valid while generating)
    while True:
        generating = [b for b, row in enumerate(rows) if row.state == GENERATING]
        if generating:
            early = torch.tensor([rows[b].actions < params.min_new_tokens for b in range(len(rows))], device=device)
            allowed = logits.masked_fill(early[:, None] & torch.isin(torch.arange(logits.shape[-1], device=device),
                                                                     eos), float("-inf")) if bool(early.any()) else logits
            action, action_logprob = choose_tokens(allowed, params, generator)
            if allowed is not logits:  # min_new_tokens constrains the sampler; record the policy's log-probs
                action_logprob = token_logprobs(logits, action, params.policy_temperature)
            chosen = action.tolist()
            texts = tokenizer.batch_decode([rows[b].tokens[rows[b].turn_start:] + [chosen[b]] for b in generating],
                                           skip_special_tokens=True)
            for b, text in zip(generating, texts):
                rows[b].act(chosen[b], float(action_logprob[b]), text, eos_set, stop)
        _collect(rows, time.monotonic() + GRACE_S)
        if all_finished(torch.tensor([row.state == DONE for row in rows], device=device)):
            break
        if not any(row.feed for row in rows) and any(row.state == WAITING for row in rows):
            _collect(rows, None)  # nothing can move: block on the first call to finish (or time out)
        width = max(1, max(len(row.feed) for row in rows))
        block = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
        valid = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
        for b, row in enumerate(rows):
            if row.feed:  # right-aligned: every row's last real token is the block's last slot
                block[b, width - len(row.feed):] = torch.tensor(row.feed, device=device)
                valid[b, width - len(row.feed):] = True
                row.feed = []
        fed = valid[:, -1:]
        logits = torch.where(fed, decoder.extend(block, valid), logits)
    return rows


def _collect(rows: list[_Row], grace_until: float | None) -> None:
    """Take every ready answer. A call younger than ``GRACE_S`` may be waited for until ``grace_until``; with
    None, block until at least one waiting row's call is ready."""
    waiting = [row for row in rows if row.state == WAITING]
    if grace_until is None and waiting and not any(row.pending.ready() for row in waiting):
        while not any(row.pending.ready() for row in waiting):
            min(waiting, key=lambda row: row.pending.deadline).pending.wait(time.monotonic() + 0.002)
    for row in waiting:
        if grace_until is not None and not row.pending.ready():
            row.pending.wait(min(grace_until, row.pending.started + GRACE_S))
        if row.pending.ready():
            row.collect()


class EpisodeSampler:
    """The ``Sampler`` of multi-turn episodes (a recipe with ``tools`` or an ``environment``), on the built-in decoder.

    ``sample`` draws K episodes per prompt as a ``Rollout`` with ``action_mask``, ``step_rewards`` and
    ``episodes``; ``extras`` gets ``turns`` (each episode's turns as messages). With an environment, each
    episode gets a fresh instance and ``reset(prompt=..., **columns)``; its observation is appended to the
    prompt (to the last user message of a conversation, as TRL does). With conversational prompts the tools'
    schemas are passed to the chat template as ``tools`` (TRL's way). ``max_new_tokens`` is the whole
    episode's budget (actions and observations together).
    """

    engine = "builtin"

    def __init__(self, spec: EpisodeSpec, model, tokenizer, *, max_context: int | None = None,
                 all_finished: Callable[[torch.Tensor], bool] | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None):
        self.spec, self.model, self.tokenizer, self.max_context = spec, model, tokenizer, max_context
        self.all_finished, self.chat_template_kwargs = all_finished, chat_template_kwargs

    @classmethod
    def from_recipe(cls, recipe, model, tokenizer, **context) -> "EpisodeSampler":
        """The sampler of a recipe's episodes (its tools and environment imported now: a bad path fails here)."""
        return cls(EpisodeSpec.from_recipe(recipe), model, tokenizer, **context)

    def sample(self, prompts: list[Any], k: int, params: SamplingParams, *, columns: dict[str, list] | None = None,
               generator: torch.Generator | None = None, group_offset: int = 0) -> Rollout:
        spec, model, tokenizer = self.spec, self.model, self.tokenizer
        device = next(model.parameters()).device
        columns = {key: [v for v in column for _ in range(k)] for key, column in (columns or {}).items()}
        if TURNS_COLUMN in columns:
            raise UserError(f"data: the column {TURNS_COLUMN!r} is reserved in episodes (the reward functions get "
                            "each episode's turns under that name); rename the column")
        repeated = [p for p in prompts for _ in range(k)]
        environments: list[Any] = [None] * len(repeated)
        if spec.environment is not None:
            for row, prompt in enumerate(repeated):
                environments[row], observation = new_environment(
                    spec.environment, {"prompt": prompt, **{key: column[row] for key, column in columns.items()}})
                repeated[row] = _with_observation(prompt, observation)
        kwargs = dict(self.chat_template_kwargs or {})
        if spec.tools and repeated and is_conversation(repeated[0]):
            kwargs.setdefault("tools", tool_schemas(spec.tools))
        prompt_ids, prompt_mask = encode_prompts(tokenizer, repeated, device, kwargs, params.max_new_tokens,
                                                 self.max_context)
        rows = sample_episodes(spec, model, tokenizer, prompt_ids, prompt_mask, params, environments, generator,
                               self.all_finished)
        completion_ids, completion_mask, action_mask, logprobs = padded_completions(
            [row.tokens for row in rows], tokenizer.pad_token_id, [row.is_action for row in rows],
            [row.logprobs for row in rows], device)
        step_rewards = torch.zeros_like(completion_mask)
        for b, row in enumerate(rows):
            for position, reward in row.rewards.items():
                step_rewards[b, position] += reward
        episodes = [row.episode for row in rows]
        columns[TURNS_COLUMN] = [episode.messages() for episode in episodes]
        return Rollout(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
            completion_mask=completion_mask, logprobs=logprobs,
            group_ids=torch.arange(len(prompts), device=device).repeat_interleave(k) + group_offset,
            prompts=repeated, completions=[episode.text for episode in episodes],
            finished=torch.tensor([episode.finished for episode in episodes], device=device), extras=columns,
            action_mask=action_mask, episodes=episodes,
            step_rewards=step_rewards if spec.environment is not None else None,  # tools pay no reward
            temperature=params.policy_temperature,
        )

    def update_weights(self, model) -> None:
        """Nothing to copy: episodes are decoded with the policy's own parameters."""
        self.model = model

    def close(self) -> None:
        """Nothing to free."""


def _with_observation(prompt: Any, observation: str) -> Any:
    """The prompt with the environment's first observation appended (to the last user message of a conversation)."""
    if not observation:
        return prompt
    if isinstance(prompt, str):
        return prompt + observation
    messages = [dict(m) for m in prompt]
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if users:
        messages[users[-1]]["content"] = messages[users[-1]]["content"] + observation
    else:
        messages.append({"role": "user", "content": observation})
    return messages


__all__ = ["EpisodeSampler", "sample_episodes", "GRACE_S", "TURNS_COLUMN"]
