"""Blackjack-v1, solved exactly: the optimal (basic-strategy) value and the exact value of any policy.

gymnasium's rules: an infinite deck (cards 1..9 with probability 1/13 each, 10 with 4/13); the player
sees (sum, dealer's up card, usable ace) and hits or sticks; the dealer then draws until its sum is
>= 17 (a soft 17 stands); reward +1 win, 0 draw, -1 loss or bust. ``natural=True`` pays 1.5 for
winning with a two-card 21; ``sab=True`` makes a two-card 21 win unless the dealer also has one.
Note that ``gymnasium.make("Blackjack-v1")`` registers ``sab=True`` (Sutton & Barto's rules), so the
rules are the registered kwargs updated by the recipe's ``env.kwargs`` (``rules_for``).

With an infinite deck the player's (raw sum, holds an ace) and the dealer's up card are a Markov
state, so dynamic programming over them is exact:

    stick(p, u)  = sum_d P(dealer ends at d | u) * payoff(p, d)
    V*(s, u)     = max(stick(s, u), sum_c P(c) * [-1 if s + c busts else V*(s + c, u)])
    V^pi(s, u)   = (1 - pi(hit|s,u)) stick(s, u) + pi(hit|s,u) * sum_c P(c) * [...V^pi...]
    J(pi)        = sum_{c1, c2, u} P(c1) P(c2) P(u) V^pi((c1, c2), u)

The raw sum only grows, so the recursions end. ``tests/test_gym.py`` checks the optimal value against
a Monte-Carlo run of gymnasium's own environment.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch

CARDS = tuple(range(1, 11))
CARD_PROB = {card: (4 / 13 if card == 10 else 1 / 13) for card in CARDS}

# A hand is (raw sum with aces as 1, holds an ace, is a two-card 21). Observation: (sum, up card, usable ace).
Hand = tuple[int, bool, bool]
HitProbability = Callable[[int, int, int], float]  # (player sum, dealer up card, usable ace) -> pi(hit)


def hand_value(raw: int, has_ace: bool) -> tuple[int, int]:
    """(sum, usable ace) as gymnasium computes them: an ace counts 11 when that does not bust."""
    if has_ace and raw + 10 <= 21:
        return raw + 10, 1
    return raw, 0


@lru_cache(maxsize=None)
def dealer_outcomes(up_card: int) -> dict[tuple[int, bool], float]:
    """P(dealer's final (score, natural) | up card); score 0 = bust. The hole card is a fresh draw."""
    outcomes: dict[tuple[int, bool], float] = {}

    def play(raw: int, has_ace: bool, cards: int, probability: float) -> None:
        total, _ = hand_value(raw, has_ace)
        if total >= 17:
            key = (0 if total > 21 else total, cards == 2 and total == 21)
            outcomes[key] = outcomes.get(key, 0.0) + probability
            return
        for card in CARDS:
            play(raw + card, has_ace or card == 1, cards + 1, probability * CARD_PROB[card])

    play(up_card, up_card == 1, 1, 1.0)
    return outcomes


def _payoff(player: int, natural: bool, dealer: int, dealer_natural: bool, rules: dict) -> float:
    reward = float(player > dealer) - float(player < dealer)
    if rules.get("sab", False):
        if natural and not dealer_natural:
            return 1.0
    elif rules.get("natural", False) and natural and reward == 1.0:
        return 1.5
    return reward


def stick_value(hand: Hand, up_card: int, rules: dict) -> float:
    total, _ = hand_value(hand[0], hand[1])
    return sum(p * _payoff(total, hand[2], score, nat, rules) for (score, nat), p in dealer_outcomes(up_card).items())


def _solve(rules: dict, hit_probability: HitProbability | None) -> float:
    """J of the policy ``hit_probability`` (None = the optimal policy), exactly."""
    memo: dict[tuple[Hand, int], float] = {}

    def value(hand: Hand, up_card: int) -> float:
        key = (hand, up_card)
        if key in memo:
            return memo[key]
        stick = stick_value(hand, up_card, rules)
        hit = 0.0
        for card in CARDS:
            raw, has_ace = hand[0] + card, hand[1] or card == 1
            hit += CARD_PROB[card] * (-1.0 if raw > 21 else value((raw, has_ace, False), up_card))
        if hit_probability is None:
            result = max(stick, hit)
        else:
            total, usable = hand_value(hand[0], hand[1])
            p_hit = hit_probability(total, up_card, usable)
            result = (1.0 - p_hit) * stick + p_hit * hit
        memo[key] = result
        return result

    expected = 0.0
    for first in CARDS:
        for second in CARDS:
            raw, has_ace = first + second, first == 1 or second == 1
            natural = hand_value(raw, has_ace)[0] == 21
            for up_card in CARDS:
                probability = CARD_PROB[first] * CARD_PROB[second] * CARD_PROB[up_card]
                expected += probability * value((raw, has_ace, natural), up_card)
    return expected


def optimal_return(rules: dict | None = None) -> float:
    """Expected return of the optimal (basic-strategy) policy under gymnasium's Blackjack ``rules``."""
    return _solve(rules or {}, None)


def policy_return(hit_probability: HitProbability, rules: dict | None = None) -> float:
    """Exact expected return of a (possibly stochastic) policy given as pi(hit | sum, up card, usable ace)."""
    return _solve(rules or {}, hit_probability)


def optimal_action(total: int, up_card: int, usable: int, rules: dict | None = None) -> int:
    """The basic-strategy action (1 = hit, 0 = stick) in an observed state."""
    rules = rules or {}
    raw, has_ace = (total - 10, True) if usable else (total, False)
    best = {}

    def value(hand: Hand) -> float:
        if hand not in best:
            stick = stick_value(hand, up_card, rules)
            hit = sum(CARD_PROB[c] * (-1.0 if hand[0] + c > 21 else value((hand[0] + c, hand[1] or c == 1, False)))
                      for c in CARDS)
            best[hand] = max(stick, hit)
        return best[hand]

    hand = (raw, has_ace, False)
    hit = sum(CARD_PROB[c] * (-1.0 if raw + c > 21 else value((raw + c, has_ace or c == 1, False))) for c in CARDS)
    return int(hit > stick_value(hand, up_card, rules))


def agent_hit_probabilities(agent, deterministic: bool) -> dict[tuple[int, int, int], float]:
    """pi(hit | state) of a gym agent for every observable state (greedy: 0 or 1)."""
    states = [(total, up, usable) for total in range(4, 22) for up in CARDS for usable in (0, 1)]
    columns = tuple(torch.tensor([s[i] for s in states]) for i in range(3))
    with torch.no_grad():
        log_pi = agent.policy.logits(agent.encode(columns))  # [S, 2]
    hit = (log_pi.argmax(-1) == 1).double() if deterministic else log_pi[:, 1].exp().double()
    return {state: float(p) for state, p in zip(states, hit)}


def rules_for(env_id: str, kwargs: dict | None = None) -> dict:
    """The rules an environment made with ``gymnasium.make(env_id, **kwargs)`` plays by."""
    import gymnasium

    return {**gymnasium.spec(env_id).kwargs, **(kwargs or {})}


def blackjack_report(agent, rules: dict, deterministic: bool = True) -> dict:
    """The learned policy's exact expected return, the optimal one, the gap, and where they disagree."""
    probabilities = agent_hit_probabilities(agent, deterministic)
    learned = policy_return(lambda total, up, usable: probabilities[(total, up, usable)], rules)
    optimal = optimal_return(rules)
    differing = sum(round(p) != optimal_action(*state, rules) for state, p in probabilities.items()
                    if not (state[2] and state[0] < 12))
    return {
        "blackjack_rules": {key: rules[key] for key in ("natural", "sab") if key in rules},
        "blackjack_optimal_return": optimal,
        "blackjack_policy_return": learned,
        "blackjack_gap": optimal - learned,
        "blackjack_states_differing_from_basic_strategy": differing,
    }
