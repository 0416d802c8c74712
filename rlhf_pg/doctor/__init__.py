"""``rlhf-pg doctor RECIPE [key=value ...]``: a preflight that says, in about a minute, whether a run would learn.

It loads what ``rlhf-pg train`` loads (the reward functions, the model and tokenizer, the prompts), then shows

    prompt    the first training prompt as the model reads it (rendered with the chat template when it is a
              conversation) and its length in tokens
    EOS       the ids that end a completion (``rollout.stop_token_ids``); with a chat template, that the token
              closing an assistant turn is one of them; on the sampled batch, that every finished completion's
              last masked token is an end token, i.e. the loss mask covers the decision to stop
    one batch K completions for each of the first step's prompts (fewer prompts when the time budget says so;
              the report says how many), scored one reward function at a time: truncation rate, the fraction
              of groups whose rewards are all equal (advantage 0: no learning signal), a histogram per reward
              function, each function's latency and errors
    memory    an estimate of a train process's peak for the configured batch (``run.memory.memory_estimate``
              has the formula; ``train`` checks the same estimate before its first step)
    recipe    the resolved recipe (presets and overrides applied, every default filled in)

and ends with a verdict. Exit codes: 1 when it finds a problem that would waste the run (every group has equal
rewards, every completion truncated, a reward function that fails or times out, an end-of-turn token that does
not end completions, a batch that does not fit in memory), each printed with its fix; 0 when there is none
(warnings are printed but do not fail); 2 for bad input (recipe, model, data), as every command.

    measures.py   pure pieces: histograms, group spread, the end-of-turn token, the model's shape
    diagnose.py   the checks: load, sample, score, findings
    report.py     the rich tables
"""

from __future__ import annotations

from ..errors import EXIT_PROBLEMS, DoctorFoundProblems  # the CLI's exit code 1
from .diagnose import DEFAULT_TIME_BUDGET_S, Diagnosis, Finding, diagnose
from .measures import MemoryEstimate, end_of_turn_token, group_spread, histogram, memory_estimate

__all__ = ["DEFAULT_TIME_BUDGET_S", "Diagnosis", "DoctorFoundProblems", "EXIT_PROBLEMS", "Finding", "MemoryEstimate",
           "diagnose", "end_of_turn_token", "group_spread", "histogram", "memory_estimate"]
