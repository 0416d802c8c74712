"""Errors meant for people: the CLI prints their message and exits with code 2, no traceback."""


def first_line(error: BaseException, with_type: bool = True) -> str:
    """``"TypeName: first line of the message"``: a library's exception, shortened for a one-line error."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else ""
    return f"{type(error).__name__}: {line}" if with_type else line


class UserError(Exception):
    """Bad input from the user (recipe, CLI value, file, reward function). The message says what and how to fix it."""


class RecipeError(UserError):
    """A recipe file or override is malformed, has an unknown key, or a bad value."""


class RewardFunctionError(UserError):
    """A reward function raised, returned the wrong number of values, or returned NaN/inf."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the current step finished and a checkpoint was written.

    ``reason`` says what happened, ``hint`` how to resume (the message is both); the CLI replaces the
    hint by the exact command line and exits with 128 + the signal's number.
    """

    def __init__(self, message: str, checkpoint: str | None, signal_name: str | None = None,
                 output_dir: str | None = None, hint: str | None = None):
        super().__init__(f"{message}. {hint}" if hint else message)
        self.reason = message
        self.checkpoint = checkpoint
        self.signal_name = signal_name
        self.output_dir = output_dir
        self.hint = hint


class NonFiniteError(UserError):
    """Too many consecutive updates had a non-finite loss or gradient."""


EXIT_PROBLEMS = 1


class DoctorFoundProblems(Exception):
    """``rlhf-pg doctor``'s report lists a problem: the CLI exits with code 1 (``rlhf_pg.doctor()`` returns the
    ``Diagnosis`` instead)."""

    def __init__(self, count: int):
        super().__init__(f"{count} problem(s)")
        self.count = count
        self.code = EXIT_PROBLEMS
