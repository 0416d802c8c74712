"""Reward functions used by the tests through recipe import paths ('rewards_for_tests:sevens')."""

import os
import signal

calls = {"count": 0}


def sevens(prompts, completions, **kwargs):
    """Fraction of the completion's characters that are '7' (dense and easy to learn)."""
    return [completion.count("7") / max(len(completion), 1) for completion in completions]


def sevens_then_interrupt(prompts, completions, **kwargs):
    """Like ``sevens``, but sends SIGINT to this process on call number $INTERRUPT_AT_CALL."""
    calls["count"] += 1
    if str(calls["count"]) == os.environ.get("INTERRUPT_AT_CALL"):
        os.kill(os.getpid(), signal.SIGINT)
    return sevens(prompts, completions)


def raises_on_long(prompts, completions, **kwargs):
    for completion in completions:
        if len(completion) > 2:
            raise RuntimeError("too long for me")
    return [0.0] * len(completions)


def wrong_count(prompts, completions, **kwargs):
    return [0.0]


def not_a_number(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)


def length(prompts, completions, **kwargs):
    """Number of characters of the completion (varies even for a random model)."""
    return [float(len(completion)) for completion in completions]
