"""KL coefficient controllers: fixed, or adaptive toward a target KL (Ziegler et al., 2019).

Adaptive rule, after each batch of n samples with measured KL:
    error = clip((KL - target) / target, -0.2, 0.2)
    beta <- beta * (1 + error * n / horizon)
"""

from __future__ import annotations


class KLController:
    """Holds the current coefficient beta of the KL penalty."""

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000):
        self.coef = coef
        self.target = target
        self.horizon = horizon

    def update(self, measured_kl: float, num_samples: int) -> float:
        """Adapt beta toward the target (no-op without one); returns the new beta."""
        if self.target is not None:
            error = min(max((measured_kl - self.target) / self.target, -0.2), 0.2)
            self.coef *= 1.0 + error * num_samples / self.horizon
        return self.coef

    def state_dict(self) -> dict:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict) -> None:
        self.coef = float(state["coef"])
