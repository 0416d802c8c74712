"""Reward functions used by the tests through recipe import paths ('rewards_for_tests:sevens')."""

import os
import signal

calls = {"count": 0}


def _text(completion):
    """A completion as text: itself, or the content of TRL's conversational ``[{"role": "assistant", ...}]``."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def sevens(prompts, completions, **kwargs):
    """Fraction of the completion's characters that are '7' (dense and easy to learn)."""
    return [_text(completion).count("7") / max(len(_text(completion)), 1) for completion in completions]


def sevens_then_interrupt(prompts, completions, **kwargs):
    """Like ``sevens``, but on call number $INTERRUPT_AT_CALL sends $INTERRUPT_SIGNAL (default SIGINT) to this
    process $INTERRUPT_TIMES times (default 1), and on call number $CRASH_AT_CALL raises (a run dying mid-way,
    without a checkpoint)."""
    calls["count"] += 1
    if str(calls["count"]) == os.environ.get("INTERRUPT_AT_CALL"):
        for _ in range(int(os.environ.get("INTERRUPT_TIMES", "1"))):  # twice = a second Ctrl-C: abort at once
            os.kill(os.getpid(), signal.Signals[os.environ.get("INTERRUPT_SIGNAL", "SIGINT")])
    if str(calls["count"]) == os.environ.get("CRASH_AT_CALL"):
        raise RuntimeError("simulated crash")
    return sevens(prompts, completions)


def infinite(prompts, completions, **kwargs):
    return [float("inf")] * len(completions)


def not_a_list(prompts, completions, **kwargs):
    return None


def raises_on_long(prompts, completions, **kwargs):
    for completion in completions:
        if len(completion) > 2:
            raise RuntimeError("too long for me")
    return [0.0] * len(completions)


def wrong_count(prompts, completions, **kwargs):
    return [0.0]


def not_a_number(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def noise(prompts, completions, **kwargs):
    """Draws from python's and numpy's global generators: an exact resume must restore both."""
    import random

    import numpy as np

    return [random.random() + float(np.random.rand()) for _ in completions]


def char_codes(prompts, completions, **kwargs):
    """Mean character code / 128: dense, different for almost every sample (non-zero advantages)."""
    return [sum(map(ord, completion)) / max(len(completion), 1) / 128 for completion in completions]

def length(prompts, completions, **kwargs):
    """Number of characters of the completion (varies even for a random model)."""
    return [float(len(completion)) for completion in completions]


def constant(prompts, completions, **kwargs):
    """The same reward for everything: every group is degenerate (no learning signal)."""
    return [1.0] * len(completions)


def prompt_length(prompts, completions, **kwargs):
    """A property of the prompt only: every completion of a prompt (the greedy one too) gets the same reward."""
    return [float(len(prompt)) for prompt in prompts]
