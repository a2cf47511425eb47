"""The forgetting budget: the replay coefficient as a Lagrange multiplier that keeps the replay KL at a target.

Users think "learn the new data, lose at most this much of the old", not "coefficient 10". With
``replay.target_kl`` the coefficient c of ``loss = NTP + c · KL(teacher ‖ student on replay)`` is adapted after each
optimizer step by dual ascent on log c:

    k̄  ← smoothing · k̄ + (1 - smoothing) · KL_step          (bias-corrected, as Adam's moments)
    log c ← clamp(log c + step · clamp(log(k̄ / target), -2, 2), log coeff_min, log coeff_max)

so c grows while the smoothed replay KL is over the target and shrinks while it is under, multiplicatively
(the KL of a converged run falls roughly as a power of c, so steps in log c are the same size at every scale).
The update stays on the device (no host sync); the state is part of checkpoints. The KL per token on replay
sequences that the teacher itself generates estimates how much worse the model has become at the teacher's own
distribution: a budget of 0.05 nats means the old data's loss may rise by about 0.05 nats per token.
"""

from __future__ import annotations

import math

import torch

from selfreplay.errors import SelfReplayError

MAX_LOG_RATIO = 2.0  # one step moves log c by at most step · 2


class ForgettingBudget:
    """Adapts the replay coefficient so that the smoothed replay KL tracks ``target`` nats per token."""

    def __init__(self, target: float, start: float, step: float = 0.05, smoothing: float = 0.9,
                 coeff_min: float = 1e-3, coeff_max: float = 1e4, device: torch.device | str = "cpu"):
        check_budget(target, start, step, smoothing, coeff_min, coeff_max)
        self.target, self.step, self.smoothing = float(target), float(step), float(smoothing)
        self.log_min, self.log_max = math.log(coeff_min), math.log(coeff_max)
        start = min(max(start, coeff_min), coeff_max)
        self.log_coeff = torch.tensor(math.log(start), dtype=torch.float64, device=device)
        self.average = torch.zeros((), dtype=torch.float64, device=device)  # EMA of the replay KL, biased to 0
        self.updates = torch.zeros((), dtype=torch.float64, device=device)

    @property
    def coeff(self) -> torch.Tensor:
        return self.log_coeff.exp().float()

    @property
    def smoothed_kl(self) -> torch.Tensor:
        """The bias-corrected moving average of the replay KL (0 before the first update)."""
        correction = 1.0 - self.smoothing ** self.updates
        return torch.where(self.updates > 0, self.average / correction.clamp_min(1e-12), self.average)

    def update(self, kl: torch.Tensor) -> None:
        """One optimizer step's replay KL per token (averaged over ranks by the caller)."""
        kl = kl.detach().to(self.average.device, torch.float64)
        self.average = self.smoothing * self.average + (1.0 - self.smoothing) * kl
        self.updates = self.updates + 1
        ratio = torch.log(self.smoothed_kl.clamp_min(self.target * 1e-6) / self.target)
        self.log_coeff = (self.log_coeff + self.step * ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)).clamp(
            self.log_min, self.log_max)

    def state_dict(self) -> dict:
        return {"log_coeff": float(self.log_coeff), "average": float(self.average), "updates": float(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        device = self.log_coeff.device
        for name in ("log_coeff", "average", "updates"):
            setattr(self, name, torch.tensor(state[name], dtype=torch.float64, device=device))


def check_budget(target, start, step, smoothing, coeff_min, coeff_max, prefix: str = "replay.") -> None:
    """One-line errors for a budget that cannot work."""
    if target is None or not target > 0:
        raise SelfReplayError(f"{prefix}target_kl={target}: expected a positive number of nats per token")
    if not start > 0:
        raise SelfReplayError(f"{prefix}coeff={start}: a forgetting budget starts from a positive coefficient (it "
                              f"adapts it multiplicatively); set {prefix}coeff to e.g. 1")
    if not step > 0:
        raise SelfReplayError(f"{prefix}target_kl_step={step}: must be positive")
    if not 0 <= smoothing < 1:
        raise SelfReplayError(f"{prefix}target_kl_smoothing={smoothing}: expected a value in [0, 1)")
    if not 0 < coeff_min < coeff_max:
        raise SelfReplayError(f"{prefix}coeff_min={coeff_min} / coeff_max={coeff_max}: expected 0 < min < max")
