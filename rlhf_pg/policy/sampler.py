"""The LM as a policy that acts: the ``Sampler`` protocol, and ``make_sampler``, the ONE place an engine is chosen.

    sampler = make_sampler(recipe, model, tokenizer)           rollout.engine: builtin | vllm (+ episodes)
    batch   = sampler.sample(prompts, k, params)               K completions per prompt -> a Rollout
    ...the trainer scores the batch and steps the optimizer...
    sampler.update_weights(model)                              the engine now samples from the new theta
    sampler.close()

A ``Rollout`` from any engine has the same contract: completions right-padded, ``completion_mask`` 1 up to and
including the ending token (an EOS id, or the token that completes a stop string), ``finished`` False exactly for
the truncated ones, ``logprobs`` the sampler's own ``log pi(a_t | s_t)`` of each drawn token, and
``temperature`` the T of the policy ``softmax(logits / T)`` those log-probs are under. The trainer never asks
which engine sampled (verl's rollout table is the model: an engine name -> a class, imported on demand).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ..core.mdp import Rollout
from ..errors import RecipeError, UserError
from .prompts import context_length

ENGINES: dict[str, str] = {  # rollout.engine -> the Sampler class, "module:Class" (imported only when chosen)
    "builtin": "rlhf_pg.policy.builtin:BuiltinSampler",
    "vllm": "rlhf_pg.policy.vllm:VLLMSampler",
}
REQUIRES = {"vllm": "vllm"}  # engine -> the library it needs (checked before any model is loaded)
EPISODE_SAMPLER = "rlhf_pg.episodes.sampler:EpisodeSampler"  # tools / an environment: multi-turn episodes
ENGINE_NAMES = tuple(ENGINES)


@dataclass
class SamplingParams:
    """How completions are drawn. ``temperature == 0`` means greedy decoding.

    ``stop``: stop strings (``rollout.stop``). A completion ends at the token that completes the first
    occurrence of any of them in its decoded text (special tokens skipped); that token is kept, so the
    stop string stays in the completion's text and its token carries gradient like EOS does; tokens
    after it are padding (mask 0), and text that the last token decodes to beyond the stop string is cut.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)

    @property
    def policy_temperature(self) -> float:
        """T of the policy ``pi = softmax(logits / T)`` whose log-probs a batch records and the update scores:
        the sampling temperature, or 1 for greedy decoding (argmax has no temperature; its tokens are scored
        under the model's own distribution). The one place this rule is written."""
        return self.temperature if self.temperature > 0 else 1.0

    @classmethod
    def for_training(cls, recipe) -> "SamplingParams":
        """The recipe's ``rollout`` section: how training completions are drawn."""
        r = recipe.rollout
        return cls(r.max_new_tokens, r.temperature, r.top_p, r.min_new_tokens, stop=tuple(r.stop))

    @classmethod
    def for_eval(cls, recipe) -> "SamplingParams":
        """Held-out decoding: ``eval.temperature`` (greedy by default), the rollout's length and stop strings."""
        return cls(recipe.eval.max_new_tokens or recipe.rollout.max_new_tokens, recipe.eval.temperature,
                   stop=tuple(recipe.rollout.stop))


@runtime_checkable
class Sampler(Protocol):
    """An engine that draws completions from the policy.

    ``sample(prompts, k, params, columns=, generator=, group_offset=)``: K completions per prompt (text or
    conversations) as a ``Rollout``; ``columns`` are per-prompt dataset columns, repeated per completion into
    ``Rollout.extras``; group ids are ``group_offset + prompt index``; ``generator`` is the call's randomness
    (an engine that cannot use a torch generator draws its seed from it). ``update_weights(model)``: called
    after every optimizer step and after ``--resume``; the next ``sample`` draws from ``model``'s parameters (a
    no-op for an engine that shares them). ``close()``: free the engine (called once, at the end of a run).
    """

    engine: str

    def sample(self, prompts: list[Any], k: int, params: SamplingParams, *, columns: dict[str, list] | None = None,
               generator: torch.Generator | None = None, group_offset: int = 0) -> Rollout: ...

    def update_weights(self, model) -> None: ...

    def close(self) -> None: ...


def _imported(target: str) -> type:
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def engine_class(name: str) -> type:
    """The ``Sampler`` class registered as ``name`` in ``ENGINES`` (its module imported now)."""
    return _imported(ENGINES[name])


def check_engine(name: str, where: str = "rollout.engine", installed: bool = False) -> None:
    """``RecipeError`` naming the engines when ``name`` is not one of them; with ``installed``, a ``UserError`` with
    the install command when the library the engine needs is missing."""
    if name not in ENGINES:
        raise RecipeError(f"{where}: unknown engine {name!r}; the engines are {', '.join(ENGINE_NAMES)}")
    if installed and name in REQUIRES and importlib.util.find_spec(REQUIRES[name]) is None:
        install = getattr(_module_of(name), "INSTALL", f"pip install {REQUIRES[name]}")
        raise UserError(f"{where}: {name}, but {REQUIRES[name]} is not installed; {install}")


def _module_of(name: str):
    return importlib.import_module(ENGINES[name].partition(":")[0])


def make_sampler(recipe, model, tokenizer, *, episodes: Any = None, all_finished=None) -> Sampler:
    """The sampler a run (or eval, the doctor, the variance lab, preference generation) draws completions with.

    ``recipe``: an LM recipe (``rollout.engine``, ``rollout.<engine>`` settings, ``data.chat_template_kwargs``,
    its ``tools`` or ``environment``), or None for the built-in engine with defaults. With tools or an
    environment, completions are multi-turn episodes, sampled by the episode sampler on the built-in decoder
    (``episodes``: the recipe's ``EpisodeSpec`` when the caller already resolved it; else it is resolved from the
    recipe). ``all_finished``: stop decoding when every row has ended, on every process (sharded parameters need
    all processes to run the same number of forwards).
    """
    rollout = getattr(recipe, "rollout", None)
    engine = getattr(rollout, "engine", "builtin")
    check_engine(engine, installed=True)
    context = dict(max_context=context_length(model), all_finished=all_finished,
                   chat_template_kwargs=getattr(getattr(recipe, "data", None), "chat_template_kwargs", None))
    if episodes is not None or getattr(recipe, "tools", None) or getattr(recipe, "environment", None):
        if engine != "builtin":
            raise RecipeError(f"rollout.engine: {engine!r} does not sample multi-turn episodes (tools / environment) "
                              "yet; use rollout.engine: builtin for recipes with tools or an environment")
        episode_sampler = _imported(EPISODE_SAMPLER)
        if episodes is None:
            return episode_sampler.from_recipe(recipe, model, tokenizer, **context)
        return episode_sampler(episodes, model, tokenizer, **context)
    if engine == "builtin":
        return engine_class(engine)(model, tokenizer, **context)
    return engine_class(engine)(model, tokenizer, settings=getattr(rollout, engine, None), seed=getattr(recipe, "seed", 0),
                                **context)


__all__ = ["ENGINES", "ENGINE_NAMES", "SamplingParams", "Sampler", "engine_class", "check_engine", "make_sampler"]
