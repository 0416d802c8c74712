"""The field's REINFORCE family as named presets: recipe-key values, each with its paper.

A preset is a set of dotted recipe keys (``"algorithm.baseline": "group_mean"``) that turns the one
composition of ``estimator`` (returns -> baseline -> scale -> whiten) and the losses of ``losses``
into a published algorithm. Every preset sets the same estimator keys (``ESTIMATOR_KEYS``), so a preset
fully decides the estimator whatever the recipe's defaults; the KL coefficient only where the paper
fixes it (it is a property of the task as much as of the algorithm). Off-policy reuse
(``algorithm.updates_per_batch``) is left to the recipe: on-policy every importance ratio is 1 and
each preset's loss has the REINFORCE gradient of its aggregation (``tests/test_presets_exact.py``).

    reinforce     A_it = G_it                                   sum over tokens, mean over sequences
    rloo          A_it = G_it - mean_{j != i} R_j               "
    remax         A_it = G_it - R(greedy completion)             "
    grpo          A_i  = (R_i - mean_g R) / (std_g R + eps)     mean over tokens, then sequences; k3 KL loss
    dr_grpo       A_i  = R_i - mean_g R                         sum over tokens / L_max, mean over sequences
    reinforce_pp  A_it = whiten(G_it) over the batch's tokens   token mean; k1 KL in the reward
    dapo          GRPO's A, token mean, clip (0.2, 0.28), dynamic sampling, soft overlong penalty, no KL
    cispo         GRPO's A, token mean, truncated stop-gradient IS weight (every token keeps a gradient)
    gspo          GRPO's A, sequence-level length-normalised ratio clipped to (1 - 3e-4, 1 + 4e-4)

``resolve_preset`` merges a preset with explicit keys; ``INCOMPATIBLE`` lists the combinations a recipe
may not make, as data (``check_compatibility`` evaluates it).
"""

from __future__ import annotations

import difflib
import operator
from dataclasses import dataclass
from typing import Any, Mapping

# The keys every preset sets (new keys proposed for the recipe schema are marked in the report).
ESTIMATOR_KEYS = (
    "algorithm.estimator", "algorithm.gamma", "algorithm.baseline", "algorithm.scale", "algorithm.whiten",
    "algorithm.aggregation", "algorithm.kl_mode", "algorithm.kl_estimator", "algorithm.importance",
    "algorithm.ratio_level", "algorithm.clip_eps", "algorithm.clip_eps_high", "algorithm.dynamic_sampling",
    "algorithm.overlong_buffer_fraction",
)


@dataclass(frozen=True)
class Preset:
    """One published algorithm: the recipe-key values that make it, where it comes from, what it is."""

    values: Mapping[str, Any]
    reference: str
    description: str
    notes: str = ""


def _preset(reference: str, description: str, notes: str = "", **values: Any) -> Preset:
    dotted = {f"algorithm.{key}": value for key, value in values.items()}
    return Preset(values=dotted, reference=reference, description=description, notes=notes)


_ON_POLICY = dict(estimator="reinforce", gamma=1.0, scale="none", whiten=False, importance="clip",
                  ratio_level="token", clip_eps=0.2, clip_eps_high=None, dynamic_sampling=False,
                  overlong_buffer_fraction=0.0)

PRESETS: dict[str, Preset] = {
    "reinforce": _preset(
        "Williams (1992), Simple statistical gradient-following algorithms for connectionist reinforcement "
        "learning, Machine Learning 8:229-256",
        "REINFORCE with reward-to-go, no baseline: the unbiased estimator everything else modifies",
        "KL, when used, as a per-token reward penalty (the RLHF convention)",
        **{**_ON_POLICY, "baseline": "none", "aggregation": "seq-mean-token-sum", "kl_mode": "reward",
           "kl_estimator": "k1"},
    ),
    "rloo": _preset(
        "Ahmadian et al. (2024), Back to Basics: Revisiting REINFORCE Style Optimization for Learning from "
        "Human Feedback in LLMs, ACL 2024, arXiv:2402.14740; Kool et al. (2019), Buy 4 REINFORCE samples, "
        "get a baseline for free",
        "REINFORCE with the leave-one-out mean of the other completions of the prompt: unbiased, lower variance",
        "the whole completion is one action (sum of token log-probs); KL in the reward",
        **{**_ON_POLICY, "baseline": "leave_one_out", "aggregation": "seq-mean-token-sum", "kl_mode": "reward",
           "kl_estimator": "k1"},
    ),
    "grpo": _preset(
        "Shao et al. (2024), DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language "
        "Models, arXiv:2402.03300 (section 4.1, outcome supervision)",
        "group-mean baseline divided by the group's reward std, per-sequence token mean, KL (k3) in the loss",
        "beta = 0.04 as in the paper (which also makes one policy update per batch); the group mean "
        "includes the sample and the std is the sample's own: both bias the gradient (measured)",
        **{**_ON_POLICY, "baseline": "group_mean", "scale": "group", "aggregation": "seq-mean-token-mean",
           "kl_mode": "loss", "kl_estimator": "k3", "kl_coef": 0.04},
    ),
    "dr_grpo": _preset(
        "Liu et al. (2025), Understanding R1-Zero-Like Training: A Critical Perspective, arXiv:2503.20783",
        "GRPO without the std division and without the 1/|o_i| length normalisation: token sums over a "
        "constant L (the longest allowed completion)",
        "algorithm.norm_length unset = rollout.max_new_tokens; the group mean still includes the sample, so "
        "E[g] = (1 - 1/K) grad J / L exactly; KL placed as GRPO's, its coefficient is the recipe's",
        **{**_ON_POLICY, "baseline": "group_mean", "aggregation": "seq-mean-token-sum-norm", "norm_length": None,
           "kl_mode": "loss", "kl_estimator": "k3"},
    ),
    "reinforce_pp": _preset(
        "Hu et al. (2025), REINFORCE++: Stabilizing Critic-Free Policy Optimization with Global Advantage "
        "Normalization, arXiv:2501.03262",
        "no baseline; per-token k1 KL in the reward, reward-to-go, advantages whitened over the global batch",
        "global normalisation = algorithm.whiten over the gathered batch's real tokens (the trainer already "
        "computes advantages over the global batch); token-mean as OpenRLHF; 'REINFORCE++ w/ baseline' is "
        "this with baseline group_mean",
        **{**_ON_POLICY, "baseline": "none", "whiten": True, "aggregation": "token-mean", "kl_mode": "reward",
           "kl_estimator": "k1"},
    ),
    "remax": _preset(
        "Li et al. (2024), ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for "
        "Aligning Large Language Models, ICML 2024, arXiv:2310.10505",
        "baseline = reward of the greedy completion of the same prompt: unbiased, one greedy rollout per prompt",
        "KL in the reward for the sampled completion; the baseline is the greedy completion's task reward",
        **{**_ON_POLICY, "baseline": "remax", "aggregation": "seq-mean-token-sum", "kl_mode": "reward",
           "kl_estimator": "k1"},
    ),
    "dapo": _preset(
        "Yu et al. (2025), DAPO: An Open-Source LLM Reinforcement Learning System at Scale, arXiv:2503.14476",
        "GRPO's advantages with clip-higher (0.2, 0.28), token-level mean, dynamic sampling of groups with "
        "0 < accuracy < 1, soft overlong punishment, no KL",
        "overlong buffer 4096 of 20480 tokens = 0.2 of rollout.max_new_tokens",
        **{**_ON_POLICY, "baseline": "group_mean", "scale": "group", "aggregation": "token-mean",
           "kl_mode": "loss", "kl_estimator": "k3", "kl_coef": 0.0, "clip_eps": 0.2, "clip_eps_high": 0.28,
           "dynamic_sampling": True, "overlong_buffer_fraction": 0.2, "overlong_penalty": 1.0},
    ),
    "cispo": _preset(
        "MiniMax (2025), MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention, "
        "arXiv:2506.13585 (section 3.1, CISPO)",
        "GRPO's advantages, token-level mean, the importance weight truncated at 1 + eps_high and held "
        "constant: clipped tokens keep their gradient",
        "no lower bound on the weight, as the paper; the paper does not publish eps_high, so "
        "algorithm.clip_eps_high is the recipe's (default clip_eps); no KL",
        **{**_ON_POLICY, "baseline": "group_mean", "scale": "group", "aggregation": "token-mean",
           "importance": "truncate", "kl_mode": "loss", "kl_estimator": "k3", "kl_coef": 0.0},
    ),
    "gspo": _preset(
        "Zheng et al. (2025), Group Sequence Policy Optimization, arXiv:2507.18071",
        "GRPO's advantages with one importance ratio per sequence, exp(mean_t log-ratio), clipped to "
        "(1 - 3e-4, 1 + 4e-4): whole sequences are kept or clipped",
        "ratio_level sequence_mean is GSPO-token (equal to GSPO when A is constant over a sequence); "
        "per-sequence token mean as the paper's 1/|y_i|; KL placed as GRPO's, its coefficient is the recipe's",
        **{**_ON_POLICY, "baseline": "group_mean", "scale": "group", "aggregation": "seq-mean-token-mean",
           "ratio_level": "sequence_mean", "clip_eps": 3e-4, "clip_eps_high": 4e-4, "kl_mode": "loss",
           "kl_estimator": "k3"},
    ),
}


def resolve_preset(name: str, explicit: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The recipe-key values of preset ``name`` with ``explicit`` dotted keys on top (explicit wins).

    ``ValueError`` for an unknown name, with the closest preset names.
    """
    if name not in PRESETS:
        close = difflib.get_close_matches(str(name).lower().replace("-", "_").replace("++", "_pp"), PRESETS, n=2,
                                          cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint} (presets: {', '.join(PRESETS)})")
    return {**PRESETS[name].values, **dict(explicit or {})}


# --- combinations a recipe may not make, as data -------------------------------------------------

_OPERATORS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
              ">=": operator.ge, "in": lambda a, b: a in b, "not in": lambda a, b: a not in b}
_GROUP_CENTRED = ("group_mean", "leave_one_out")


@dataclass(frozen=True)
class Incompatible:
    """A combination that fails when every condition ``(dotted key, operator, value)`` holds."""

    when: tuple[tuple[str, str, Any], ...]
    message: str


INCOMPATIBLE: tuple[Incompatible, ...] = (
    Incompatible((("algorithm.baseline", "==", "remax"), ("rollout.temperature", "==", 0.0)),
                 "baseline 'remax' subtracts the greedy completion's reward, and with temperature 0 every sampled "
                 "completion is the greedy one: all advantages would be 0; sample with rollout.temperature > 0"),
    Incompatible((("algorithm.scale", "==", "group"), ("algorithm.baseline", "not in", _GROUP_CENTRED)),
                 "scale 'group' divides by the group's reward std, which is 0 for a group of equal rewards; only a "
                 "group-centred baseline (group_mean, leave_one_out) makes those advantages 0 instead of R / eps"),
    Incompatible((("algorithm.scale", "==", "batch"), ("algorithm.baseline", "==", "none")),
                 "scale 'batch' divides uncentred returns by the batch std (R / eps when all rewards are equal); "
                 "use a baseline (group_mean, batch_mean, leave_one_out) or algorithm.whiten"),
    Incompatible((("algorithm.scale", "==", "group"), ("rollout.completions_per_prompt", "<", 2)),
                 "scale 'group' needs rollout.completions_per_prompt >= 2 (a group of one has no spread)"),
    Incompatible((("algorithm.estimator", "==", "reinforce"), ("algorithm.baseline", "==", "leave_one_out"),
                  ("rollout.completions_per_prompt", "<", 2)),
                 "baseline 'leave_one_out' needs rollout.completions_per_prompt >= 2 (it averages the other "
                 "completions of the same prompt)"),
    Incompatible((("algorithm.dynamic_sampling", "==", True), ("rollout.completions_per_prompt", "<", 2)),
                 "dynamic_sampling drops groups whose rewards are all equal, and a group of one always is: "
                 "set rollout.completions_per_prompt >= 2"),
    Incompatible((("algorithm.dynamic_sampling", "==", True), ("algorithm.baseline", "not in", _GROUP_CENTRED)),
                 "dynamic_sampling drops the groups of equal rewards, which carry no gradient only under a "
                 "group-centred baseline (group_mean, leave_one_out); with another baseline dropping them biases "
                 "the estimator"),
    Incompatible((("algorithm.estimator", "==", "filtered_bc"), ("algorithm.scale", "!=", "none")),
                 "algorithm.scale must be 'none' with algorithm.estimator 'filtered_bc' (its weights are 0/1)"),
    Incompatible((("algorithm.estimator", "==", "filtered_bc"), ("algorithm.whiten", "==", True)),
                 "algorithm.whiten must be false with algorithm.estimator 'filtered_bc' (its weights are 0/1)"),
    Incompatible((("algorithm.importance", "==", "truncate"), ("algorithm.ratio_level", "!=", "token")),
                 "importance 'truncate' (CISPO) weights each token by its own truncated ratio: set "
                 "algorithm.ratio_level 'token' (or importance 'clip' for sequence-level ratios)"),
)


def check_compatibility(values: Mapping[str, Any]) -> list[str]:
    """Messages of every ``INCOMPATIBLE`` row whose conditions all hold for ``values`` (dotted keys).

    A row whose keys are not all in ``values`` does not apply. Each message starts with the offending
    key=value pairs, e.g. ``algorithm.scale='group', algorithm.baseline='none': ...``.
    """
    problems = []
    for rule in INCOMPATIBLE:
        if all(key in values and _OPERATORS[op](values[key], operand) for key, op, operand in rule.when):
            shown = ", ".join(f"{key}={values[key]!r}" for key, _, _ in rule.when)
            problems.append(f"{shown}: {rule.message}")
    return problems


__all__ = ["Preset", "PRESETS", "ESTIMATOR_KEYS", "resolve_preset", "Incompatible", "INCOMPATIBLE",
           "check_compatibility"]
