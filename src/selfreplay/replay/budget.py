"""The forgetting budget: the replay coefficient as a Lagrange multiplier that keeps the replay KL at a target.

Users think "learn the new data, lose at most this much of the old", not "coefficient 10". With
``replay.target_kl`` the coefficient c of ``loss = NTP + c · KL(teacher ‖ student on replay)`` is adapted after each
optimizer step by dual ascent on log c, at the pace of the learning rate:

    k̄  ← smoothing · k̄ + (1 - smoothing) · KL_step          (bias-corrected, as Adam's moments)
    e  = clamp(log(k̄ / target), -2, 0.05)
    I  ← clamp(I + step · (lr / peak lr) · e, log coeff_min, log coeff_max)    (I starts at log replay.coeff)
    log c = clamp(I + gain · e, log coeff_min, log coeff_max)  (gain 0, the default: plain dual ascent)

so c shrinks while the smoothed replay KL is under the target and grows while it is over, multiplicatively
(the KL of a converged run falls roughly as a power of c, so steps in log c are the same size at every scale).
Why this shape (measured on the English -> Spanish finetunes, cosine LR):
- the step follows the LR schedule: the student moves in proportion to the LR, so c moves little during the warmup
  and the final decay, when the KL cannot answer it, and most while the LR peaks;
- c falls up to 40x faster than it rises: with a fixed c the replay KL runs up to 2x above its final value while
  the LR is high (the new data pulls first, the penalty catches up), so a c that rose to hold the KL at the target
  then would end at half the target (measured: 0.5-0.6x); falling fast from a high start (the paper's c = 10) finds
  a large budget's c within the warmup, before a too-high c has cost any learning of the new data.
The first update holds c (its KL is measured at the teacher's own weights: 0). The update stays on the device (no
host sync); the state is part of checkpoints. The KL per token on replay sequences that the teacher itself generates
estimates how much worse the model has become at the teacher's own distribution: a budget of 0.05 nats means the
old data's loss may rise by about 0.05 nats per token.
"""

from __future__ import annotations

import math

import torch

from selfreplay.errors import SelfReplayError

# one step at the peak LR moves log c up by at most step · 0.05 and down by at most step · 2 (see above)
MAX_RISE, MAX_FALL = 0.05, 2.0
STATE = ("integral", "log_coeff", "average", "updates")


class ForgettingBudget:
    """Adapts the replay coefficient so that the smoothed replay KL tracks ``target`` nats per token."""

    def __init__(self, target: float, start: float, step: float = 0.2, smoothing: float = 0.9,
                 coeff_min: float = 1e-3, coeff_max: float = 1e4, device: torch.device | str = "cpu",
                 gain: float = 0.0):
        check_budget(target, start, step, smoothing, coeff_min, coeff_max, gain)
        self.target, self.step, self.smoothing, self.gain = float(target), float(step), float(smoothing), float(gain)
        self.log_min, self.log_max = math.log(coeff_min), math.log(coeff_max)
        start = min(max(start, coeff_min), coeff_max)
        self.integral = torch.tensor(math.log(start), dtype=torch.float64, device=device)
        self.log_coeff = self.integral.clone()
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

    def update(self, kl: torch.Tensor, lr_scale: float = 1.0) -> None:
        """One optimizer step's replay KL per token (averaged over ranks by the caller); ``lr_scale`` is that step's
        learning rate over the peak learning rate."""
        kl = kl.detach().to(self.average.device, torch.float64)
        self.average = self.smoothing * self.average + (1.0 - self.smoothing) * kl
        self.updates = self.updates + 1
        smoothed = self.smoothed_kl
        released = (self.updates > 1) | (smoothed >= self.target)  # the first update's KL is at the teacher's weights
        error = torch.log(smoothed.clamp_min(self.target * 1e-6) / self.target).clamp(
            -MAX_FALL, MAX_RISE) * released.double()
        self.integral = (self.integral + self.step * float(lr_scale) * error).clamp(self.log_min, self.log_max)
        self.log_coeff = (self.integral + self.gain * error).clamp(self.log_min, self.log_max)

    def state_dict(self) -> dict:
        return {name: float(getattr(self, name)) for name in STATE}

    def load_state_dict(self, state: dict) -> None:
        device = self.log_coeff.device
        state = {"integral": state["log_coeff"], **state}  # a checkpoint from before the integral was kept apart
        for name in STATE:
            setattr(self, name, torch.tensor(state[name], dtype=torch.float64, device=device))


def check_budget(target, start, step, smoothing, coeff_min, coeff_max, gain=0.0, prefix: str = "replay.") -> None:
    """One-line errors for a budget that cannot work (NaN and infinity included: they pass no range check)."""
    values = {"target_kl": target, "coeff": start, "target_kl_step": step, "target_kl_smoothing": smoothing,
              "coeff_min": coeff_min, "coeff_max": coeff_max, "target_kl_gain": gain}
    for name, value in values.items():
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise SelfReplayError(f"{prefix}{name}={value}: expected a finite number")
    if target is None or not target > 0:
        raise SelfReplayError(f"{prefix}target_kl={target}: expected a positive number of nats per token")
    if not start > 0:
        raise SelfReplayError(f"{prefix}coeff={start}: a forgetting budget starts from a positive coefficient (it "
                              f"adapts it multiplicatively); set {prefix}coeff to e.g. 1")
    if not step > 0:
        raise SelfReplayError(f"{prefix}target_kl_step={step}: must be positive")
    if not gain >= 0:
        raise SelfReplayError(f"{prefix}target_kl_gain={gain}: must be zero or positive")
    if not 0 <= smoothing < 1:
        raise SelfReplayError(f"{prefix}target_kl_smoothing={smoothing}: expected a value in [0, 1)")
    if not 0 < coeff_min < coeff_max:
        raise SelfReplayError(f"{prefix}coeff_min={coeff_min} / coeff_max={coeff_max}: expected 0 < min < max")
