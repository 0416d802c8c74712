"""Tools and environments used by the tests through recipe import paths ('episodes_for_tests:echo')."""

import math
import time

NOT_A_FUNCTION = 42
calls = {"sleepy": 0}


def echo(x="1"):
    """Answer 'ok' followed by the argument."""
    return f"ok{x}"


def two(a, b):
    """Add two numbers."""
    return a + b


def boom(x):
    """Always fails."""
    return 1 / 0


def sleepy(x):
    """Takes a second."""
    calls["sleepy"] += 1
    time.sleep(1.0)
    return "late"


def hangs(x):
    """Never returns in time."""
    time.sleep(30)
    return "never"


class CountingEnv:
    """Rewards the turn 'a' with 1, answers '<text>', ends after two turns; counts its instances."""

    instances = 0

    def __init__(self):
        CountingEnv.instances += 1
        self.turns = 0

    def reset(self, prompt, **columns):
        self.prompt = prompt
        return " go:"

    def step(self, text):
        self.turns += 1
        return f"<{text}>", (1.0 if text == "a" else 0.25), self.turns >= 2


class GymShapedEnv(CountingEnv):
    """Answers gymnasium's five-tuple."""

    def step(self, text):
        observation, reward, done = super().step(text)
        return observation, reward, done, False, {}


class WrongShapeEnv(CountingEnv):
    def step(self, text):
        return "no tuple here"


class NonFiniteEnv(CountingEnv):
    def step(self, text):
        return "", math.nan, False


class RaisingEnv(CountingEnv):
    def step(self, text):
        raise KeyError("the step blew up")


class NoStep:
    def reset(self, **row):
        return ""


class SlowEnv(CountingEnv):
    def step(self, text):
        time.sleep(2.0)
        return super().step(text)
