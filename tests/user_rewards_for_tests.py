"""Reward functions as users write them (async, slow, hanging, partial): used by tests through import paths."""

import asyncio
import threading
import time

released = threading.Event()  # set by the tests to let a hung sync function finish


async def async_length(prompts, completions, **kwargs):
    """Completion length, after awaiting 0.3 s (a remote judge): concurrent terms overlap their waits."""
    await asyncio.sleep(0.3)
    return [float(len(completion)) for completion in completions]


async def async_sevens(prompts, completions, **kwargs):
    await asyncio.sleep(0.3)
    return [completion.count("7") / max(len(completion), 1) for completion in completions]


async def async_hangs(prompts, completions, **kwargs):
    await asyncio.sleep(3600)
    return [0.0] * len(completions)


async def async_blocks_the_loop(prompts, completions, **kwargs):
    """Blocks its event loop with a sync sleep (the mistake `await asyncio.sleep` avoids)."""
    released.wait(30)
    return [0.0] * len(completions)


async def async_raises(prompts, completions, **kwargs):
    await asyncio.sleep(0)
    raise ValueError("judge unavailable")


def sync_hangs(prompts, completions, **kwargs):
    """Waits until the test releases it (a hung HTTP call): its thread cannot be killed."""
    released.wait(30)
    return [0.0] * len(completions)


def sync_slow(prompts, completions, **kwargs):
    time.sleep(0.05)
    return [1.0] * len(completions)


def only_sevens(prompts, completions, **kwargs):
    """Judges only the completions that contain a 7 (1.0 if all its characters are 7s, else 0.0); None elsewhere."""
    return [None if "7" not in completion else float(set(completion) == {"7"}) for completion in completions]


def judges_nothing(prompts, completions, **kwargs):
    return [None] * len(completions)


class AsyncJudge:
    """A callable object whose ``__call__`` is async (a client holding a connection)."""

    async def __call__(self, prompts, completions, **kwargs):
        await asyncio.sleep(0)
        return [2.0] * len(completions)


async_judge = AsyncJudge()


def reads_a_missing_column(prompts, completions, **kwargs):
    """A reward written for another dataset: it needs a ``solution`` column this one lacks."""
    return [float(completion == kwargs["solution"]) for completion in completions]


def every_other(prompts, completions, **kwargs):
    """1.0 for the even-numbered samples, None (not judged) for the odd ones."""
    return [1.0 if index % 2 == 0 else None for index in range(len(completions))]
