"""Multi-turn episodes: the model's segments are actions, the environment's replies are transitions.

    s_0   = prompt (+ the environment's first observation, ``reset(**row)``)
    turn  = the model samples tokens (actions: in the loss, in the KL) until its turn ends:
              a tool call completes                -> the tool runs, its result is appended (an observation)
              EOS / a stop string, with an environment -> ``step(turn text)`` answers (observation, reward, done)
              EOS / a stop string, tools only      -> the episode ends (the final answer)
    end   = the environment says done, EOS without an environment, ``rollout.max_turns`` model turns,
            ``rollout.max_tool_errors`` failed tool calls (the episode then scores 0), or the token budget
            ``rollout.max_new_tokens`` over the whole episode (actions and observations together)

Observation tokens are appended to the context (prefilled into the KV cache, ``episodes.sampler``) but are not
actions: ``Rollout.action_mask`` is 0 on them, and every loss, KL term, aggregation and advantage uses
``completion_mask * action_mask`` (``core.mdp.action_tokens``); their log-probabilities are never used.
Rewards: an environment's per-step reward lands on the last action token of the turn that earned it
(``Rollout.step_rewards``), the reward functions' score of the whole conversation on the last action token
of the episode, and ``discounted_returns`` over the action tokens gives every turn the reward-to-go of
everything after it.

Two ways to define the environment, after TRL's conventions: ``tools: [pkg.module:function, ...]``
(``episodes/tools.py``) and ``environment: pkg.module:Class`` with ``reset(**row) -> observation`` and
``step(model_text) -> (observation, reward, done)`` (gymnasium's shape, text in and out; gymnasium's
``(observation, reward, terminated, truncated, info)`` is read too), one instance per episode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable


from ..core.mdp import Rollout
from ..errors import UserError, first_line
from ..policy.prompts import encode_demonstrations
from .tools import CallFormat, import_attribute, resolve_tools, result_parts

MODEL, TOOL, ENVIRONMENT = "model", "tool", "environment"  # the roles of a turn


@dataclass
class Turn:
    """One segment of an episode: the model's (actions) or the environment's (an observation)."""

    role: str  # MODEL, TOOL or ENVIRONMENT
    text: str
    tokens: int
    name: str | None = None  # the tool that answered
    reward: float = 0.0  # the environment's reward for this model turn


@dataclass
class Episode:
    """One episode, turn by turn. ``ended``: eos, stop, done (the environment), max_turns, budget, tool_errors."""

    turns: list[Turn] = field(default_factory=list)
    tool_calls: int = 0
    tool_errors: int = 0
    ended: str = ""

    @property
    def finished(self) -> bool:
        """The episode ended on its own (EOS, a stop string, the environment), not cut by a limit."""
        return self.ended in ("eos", "stop", "done")

    @property
    def text(self) -> str:
        """The whole conversation after the prompt (what the reward functions score)."""
        return "".join(turn.text for turn in self.turns)

    def messages(self) -> list[dict[str, Any]]:
        """The turns as ``{"role", "content"}`` (+ ``name`` for a tool): the reward functions' ``turns``."""
        return [{"role": t.role, "content": t.text, **({"name": t.name} if t.name else {})} for t in self.turns]


def render_episode(episode: Episode) -> str:
    """The episode for a log, one turn per line: ``[model] ...``, ``[tool calculator] ...``, ``[environment
    reward=1] ...``, then ``[end: eos]``; observations are indented, so actions and observations stand apart."""
    lines = []
    for turn in episode.turns:
        if turn.role == MODEL:
            reward = f" reward={turn.reward:g}" if turn.reward else ""
            lines.append(f"[model{reward}] {turn.text}")
        else:
            lines.append(f"    [{turn.role}{' ' + turn.name if turn.name else ''}] {turn.text}")
    errors = f", {episode.tool_errors} tool errors" if episode.tool_errors else ""
    lines.append(f"[end: {episode.ended}{errors}]")
    return "\n".join(lines)


# --- the environment class ------------------------------------------------------------------------------


def resolve_environment(path: str, key: str = "environment") -> type:
    """The class at ``path``; ``UserError`` unless it is a class with callable ``reset`` and ``step``."""
    environment = import_attribute(path, key)
    if not isinstance(environment, type):
        raise UserError(f"{key}: {path!r} is {type(environment).__name__}, not a class; give a class with "
                        "reset(**row) -> observation and step(text) -> (observation, reward, done)")
    missing = [m for m in ("reset", "step") if not callable(getattr(environment, m, None))]
    if missing:
        raise UserError(f"{key}: class {environment.__name__} has no {' and no '.join(missing)} method; an environment "
                        "needs reset(**row) -> observation and step(text) -> (observation, reward, done)")
    return environment


def new_environment(environment: type, row: dict[str, Any]) -> tuple[Any, str]:
    """``(instance, first observation)``: ``environment()`` then ``reset(**row)``; ``UserError`` naming the class."""
    name = environment.__name__
    try:
        instance = environment()
        observation = instance.reset(**row)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - the user's class
        raise UserError(f"environment {name}: creating it and calling reset(**row) with the columns "
                        f"{sorted(row)} raised {first_line(error)}; reset must accept the dataset columns as "
                        "keyword arguments (add **kwargs) and return an observation (text or None)") from None
    if observation is not None and not isinstance(observation, str):
        raise UserError(f"environment {name}: reset() returned {observation!r:.60} ({type(observation).__name__}); "
                        "it must return the first observation as text, or None")
    return instance, observation or ""


def checked_step(environment_name: str, value: Any, text: str) -> tuple[str, float, bool]:
    """``step``'s answer as ``(observation, reward, done)``; ``UserError`` naming the class when it is not one."""
    where = f"environment {environment_name}: step({text!r:.40})"
    if isinstance(value, tuple) and len(value) == 5:  # gymnasium: observation, reward, terminated, truncated, info
        value = (value[0], value[1], bool(value[2]) or bool(value[3]))
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise UserError(f"{where} returned {value!r:.80}; it must return (observation: text or None, reward: number, "
                        "done: bool)")
    observation, reward, done = value
    if observation is not None and not isinstance(observation, str):
        raise UserError(f"{where} returned the observation {observation!r:.60} ({type(observation).__name__}); "
                        "it must be text or None")
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) and not hasattr(reward, "__float__"):
        raise UserError(f"{where} returned the reward {reward!r:.40}; it must be a number")
    reward = float(reward)
    if not math.isfinite(reward):
        raise UserError(f"{where} returned the reward {reward}; rewards must be finite numbers")
    if not isinstance(done, bool) and type(done).__name__ not in ("bool_", "bool"):
        raise UserError(f"{where} returned done={done!r:.40}; it must be True or False")
    return observation or "", reward, bool(done)


# --- what the recipe asks for ---------------------------------------------------------------------------


@dataclass
class EpisodeSpec:
    """Everything an episode needs besides the model: the tools, the environment class and the limits."""

    tools: dict[str, Callable[..., Any]]
    environment: type | None = None
    call_format: CallFormat | None = None
    result_format: str = "<result>{result}</result>"
    max_turns: int = 4
    max_tool_errors: int = 3
    tool_timeout_s: float = 10.0

    @classmethod
    def from_recipe(cls, recipe) -> "EpisodeSpec | None":
        """The recipe's episodes (imports resolved: a bad path fails here), or None without tools and environment."""
        tools_paths, environment_path = list(getattr(recipe, "tools", []) or []), getattr(recipe, "environment", None)
        if not tools_paths and environment_path is None:
            return None
        rollout = recipe.rollout
        return cls(tools=resolve_tools(tools_paths),
                   environment=resolve_environment(environment_path) if environment_path is not None else None,
                   call_format=CallFormat.parse(rollout.tool_format) if tools_paths else None,
                   result_format=rollout.result_format, max_turns=rollout.max_turns,
                   max_tool_errors=rollout.max_tool_errors, tool_timeout_s=rollout.tool_timeout_s)

    def demonstrations(self, tokenizer, prompts: list[Any], completions: list[str], device="cpu",
                       max_context: int | None = None) -> Rollout:
        """SFT on episodes: ``sft.demonstration_rollout`` with the observations of each demonstration masked out.

        In a demonstration's text, what immediately follows a complete tool call and matches
        ``result_format`` (its literal before ``{result}``, anything, its literal after) is an observation: in
        the context, ``action_mask`` 0, no loss. Segments are tokenized one by one (as the sampler does), EOS
        is appended as the last action.
        """
        token_rows, action_rows = [], []
        for text in completions:
            ids, actions = [], []
            for is_action, segment in self.split_demonstration(text):
                tokens = tokenizer(segment, add_special_tokens=False)["input_ids"] if segment else []
                ids += tokens
                actions += [float(is_action)] * len(tokens)
            token_rows.append(ids + [tokenizer.eos_token_id])
            action_rows.append(actions + [1.0])
        return encode_demonstrations(tokenizer, prompts, completions, token_rows, action_rows, device, max_context)

    def split_demonstration(self, text: str) -> list[tuple[bool, str]]:
        """``[(is_action, text), ...]``: ``text`` cut into the model's segments and the observations after its calls."""
        if self.call_format is None:
            return [(True, text)]
        opening, closing = result_parts(self.result_format)
        parts, start, scan = [], 0, 0
        while True:
            call_end = self._next_call_end(text, scan)
            if call_end is None:
                break
            scan = call_end
            if not text.startswith(opening, call_end):
                continue
            result_end = text.find(closing, call_end + len(opening))
            if result_end < 0:
                break
            result_end += len(closing)
            parts += [(True, text[start:call_end]), (False, text[call_end:result_end])]
            start = scan = result_end
        return parts + [(True, text[start:])]

    def _next_call_end(self, text: str, since: int) -> int | None:
        close = self.call_format.close
        position = text.find(close, since)
        while position >= 0:
            if self.call_format.call_at_end(text[: position + len(close)], position) is not None:
                return position + len(close)
            position = text.find(close, position + 1)
        return None


# --- after the rollout ----------------------------------------------------------------------------------


def environment_scores(batch: Rollout, scores: list[float], per_reward: dict[str, list[float]]) -> list[float]:
    """The episodes' returns: the reward functions' ``scores`` plus the environment's rewards (logged as
    ``reward/environment/mean``), and 0 for an episode ended by ``rollout.max_tool_errors``. No-op for a
    single-turn batch."""
    if batch.episodes is None:
        return list(scores)
    if batch.step_rewards is not None:  # an environment's episodes (tools pay nothing)
        paid = batch.step_rewards.sum(-1).tolist()
        per_reward["environment"] = paid
        scores = [s + p for s, p in zip(scores, paid)]
    return [0.0 if episode.ended == "tool_errors" else float(s) for s, episode in zip(scores, batch.episodes)]


def episode_metrics(episodes: list[Episode]) -> dict[str, float]:
    """Per-episode means: ``episode/tool_calls``, ``episode/tool_errors``, ``episode/turns`` (model turns),
    ``episode/observation_tokens``; ``episode/ended_by_tool_errors``: how many episodes that ended."""
    if not episodes:
        return {}
    count = len(episodes)
    return {
        "episode/tool_calls": sum(e.tool_calls for e in episodes) / count,
        "episode/tool_errors": sum(e.tool_errors for e in episodes) / count,
        "episode/turns": sum(sum(t.role == MODEL for t in e.turns) for e in episodes) / count,
        "episode/observation_tokens": sum(sum(t.tokens for t in e.turns if t.role != MODEL) for e in episodes) / count,
        "episode/ended_by_tool_errors": float(sum(e.ended == "tool_errors" for e in episodes)),
    }


__all__ = ["Turn", "Episode", "render_episode", "resolve_environment", "new_environment", "checked_step",
           "EpisodeSpec", "environment_scores", "episode_metrics", "MODEL", "TOOL", "ENVIRONMENT"]
