"""Errors meant for people: the CLI prints their message and exits with their ``exit_code``, no traceback.

    2   (``UserError``)          bad input: fix what the message names, then run again
    75  (``EXIT_RESUMABLE``)     the run stopped cleanly and can continue: a scheduler's SIGTERM, a reward server
                                 that stayed unreachable, a lost peer process; its checkpoints are intact and
                                 the same command with ``--resume`` continues (75 is sysexits.h's EX_TEMPFAIL:
                                 "a temporary failure, the user is invited to retry")
"""

EXIT_USER_ERROR = 2
EXIT_RESUMABLE = 75


def first_line(error: BaseException, with_type: bool = True) -> str:
    """``"TypeName: first line of the message"``: a library's exception, shortened for a one-line error."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else ""
    return f"{type(error).__name__}: {line}" if with_type else line


class UserError(Exception):
    """Bad input from the user (recipe, CLI value, file, reward function). The message says what and how to fix it."""

    exit_code = EXIT_USER_ERROR


class RecipeError(UserError):
    """A recipe file or override is malformed, has an unknown key, or a bad value."""


class RewardFunctionError(UserError):
    """A reward function raised, returned the wrong number of values, or returned NaN/inf."""


class RewardUnavailable(UserError):
    """A reward's source (a server) could not give the rewards after its retries (``on_error: fail``).

    The step did not train; the run stopped cleanly (a single process first checkpoints the last completed
    step). The message names the reward, its URL and the last error; ``--resume`` continues once the source is back.
    """

    exit_code = EXIT_RESUMABLE


class PeerLost(UserError):
    """A collective operation failed in a multi-process run: another process died or hangs (its log says why).

    This process stops at once (a checkpoint would need the lost process); the last checkpoint is intact.
    """

    exit_code = EXIT_RESUMABLE


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; the current step finished and a checkpoint was written.

    ``reason`` says what happened, ``hint`` how to resume (the message is both); the CLI replaces the
    hint by the exact command line and exits with 130 after SIGINT (128 + 2, a person's Ctrl-C, as shells
    expect) and ``EXIT_RESUMABLE`` (75) after SIGTERM (a scheduler's preemption: 143 would not tell a stop with a
    checkpoint from a process killed by SIGTERM without one).
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
