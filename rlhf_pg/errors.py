"""Errors meant for people: the CLI prints their message and exits with code 2, no traceback."""


class UserError(Exception):
    """Bad input from the user (recipe, CLI value, file, reward function). The message says what and how to fix it."""


class RecipeError(UserError):
    """A recipe file or override is malformed, has an unknown key, or a bad value."""


class RewardFunctionError(UserError):
    """A reward function raised, returned the wrong number of values, or returned NaN/inf."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the current step finished and a checkpoint was written."""

    def __init__(self, message: str, checkpoint: str | None):
        super().__init__(message)
        self.checkpoint = checkpoint


class NonFiniteError(UserError):
    """Too many consecutive updates had a non-finite loss or gradient."""
