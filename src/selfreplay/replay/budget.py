"""The forgetting budget: the replay coefficient as a Lagrange multiplier that keeps the replay KL at a target.

Users think "learn the new data, lose at most this much of the old", not "coefficient 10". With
``replay.target_kl`` the coefficient c of ``loss = NTP + c · KL(teacher ‖ student on replay)`` is adapted after each
optimizer step by dual ascent on log c, at the pace of the learning rate:

    k̄  ← smoothing · k̄ + (1 - smoothing) · KL_step          (bias-corrected, as Adam's moments; from update 2)
    g  ← 0.8 · g + 0.2 · Δ log k̄                             (the KL's trend per step)
    e  = clamp(log(k̄ / target) + H · max(g, 0), -2, 0.05)    (H = 1 / (1 - smoothing), the average's span)
    e  = clamp(log(k̄ / target), -1, 0.05)                    (instead, while the LR warms up)
    I  ← clamp(I + step · (lr / peak lr) · e, log coeff_min, log coeff_max)    (I starts at log replay.coeff)
    log c = clamp(I + gain · e, log coeff_min, log coeff_max)  (gain 0, the default: plain dual ascent)

so c shrinks while the replay KL is (and is heading) under the target and grows while it is over, multiplicatively
(the KL of a converged run falls roughly as a power of c, so steps in log c are the same size at every scale).
Why this shape:
- the step follows the LR schedule: the student moves in proportion to the LR, so c moves little during the warmup
  and the final decay, when the KL cannot answer it, and most while the LR peaks;
- the error is the KL *predicted* H steps ahead from its rising trend, not the KL now. The KL answers a change of c
  only after some steps (the student has to move, the average has to follow), so a controller that waits for the
  KL itself to reach the target has by then pushed c far past the value that meets it: the KL overshoots, or c
  must fall slowly. With the trend c falls fast (up to 0.4 per peak-LR step, 40x its rise) while the KL stays low,
  and stops as soon as the KL is on its way up. The same term is the start-up: the first update's KL is measured
  at the teacher's own weights (0), so it holds c and stays out of the average; after it, a KL near 0 that is
  rising says the student has only started to move (c holds), while one that stays low says c is indeed too high
  (c falls). Only a rising trend counts: a falling KL never speeds a fall;
- while the LR warms up, the KL's level speaks and its trend does not (c falls at most 0.2 per peak-LR step, half
  its later pace): the KL then climbs from 0 at a pace the rising LR sets, and its trend predicts many times the
  target whatever c is (the en_es finetune from c = 10: 0.3 per step at step 10, 30x the KL), so counting it held
  a c six times too high through the 24-step warmup, where most of the new data is learned: 0.04 nats of Spanish
  lost against the fixed-coefficient line, which falling on the level recovers (docs/budget.md);
- c rises slowly: with a fixed c the replay KL runs up to 2x above its final value while the LR is high (the new
  data pulls first, the penalty catches up), so a c that rose fast to hold the KL at the target then would end
  under it.
Measured (docs/budget.md): on a lagged simulated student the KL settles within 5% of the target with no overshoot
(the previous design, which held c until the KL reached half the target and then fell at most 0.05 per peak-LR
step: 1.67x), a fall from c = 10 to 0.1 fits in a 150-step cosine run (then: c ended at 0.37, the KL at 0.19x
its target), and on a tiny constant-LR finetune the KL peaks at 1.9x a 0.05 target (without the start-up
handling, c falling from the first step: 5.3x).
A c that sits at ``coeff_min`` / ``coeff_max`` while the KL pushes it further (an infeasible target) is warned about,
once per bound.

The update stays on the device (one host read every ``CHECK_EVERY`` updates, for that warning); the state is part
of checkpoints. Only the forward KL(teacher ‖ student) is controlled (``replay.divergence=forward_kl``): the KL per
token on replay sequences that the teacher itself generates estimates how much worse the model has become at the
teacher's own distribution: a budget of 0.05 nats means the old data's loss may rise by about 0.05 nats per token.
"""

from __future__ import annotations

import math
import warnings

import torch

from selfreplay.errors import SelfReplayError

# one step at the peak LR moves log c up by at most step · 0.05 and down by at most step · 2 (see above)
MAX_RISE, MAX_FALL = 0.05, 2.0
MAX_FALL_WARMUP = 1.0  # while the LR rises: the error is the KL's level alone, and c falls at half the later pace
TREND_SMOOTHING = 0.8  # the trend's own moving average (Δ log k̄ per step is noisy)
CHECK_EVERY = 25  # updates between host reads of the state (the warning at a bound)
STATE = ("integral", "log_coeff", "average", "updates", "trend", "last_log_kl")


class ForgettingBudget:
    """Adapts the replay coefficient so that the smoothed replay KL tracks ``target`` nats per token."""

    def __init__(self, target: float, start: float, step: float = 0.2, smoothing: float = 0.9,
                 coeff_min: float = 1e-3, coeff_max: float = 1e4, device: torch.device | str = "cpu",
                 gain: float = 0.0, prefix: str = "replay."):
        check_budget(target, start, step, smoothing, coeff_min, coeff_max, gain, prefix)
        self.target, self.step, self.smoothing, self.gain = float(target), float(step), float(smoothing), float(gain)
        self.coeff_min, self.coeff_max, self.prefix = float(coeff_min), float(coeff_max), prefix
        self.horizon = 1.0 / (1.0 - self.smoothing)  # the average's span (its lag), in steps
        self.log_min, self.log_max = math.log(coeff_min), math.log(coeff_max)
        start = min(max(start, coeff_min), coeff_max)

        def scalar(value: float) -> torch.Tensor:
            return torch.tensor(value, dtype=torch.float64, device=device)

        self.integral = scalar(math.log(start))
        self.log_coeff = self.integral.clone()
        self.average = scalar(0.0)  # EMA of the replay KL from the second update on, biased to 0
        self.updates = scalar(0.0)
        self.trend = scalar(0.0)  # the smoothed rise of log k̄ per step
        self.last_log_kl = scalar(0.0)  # log k̄ after the last averaged update
        self._pushed = scalar(0.0)  # the last update's error: its sign says where the KL pushes c
        self._warned: set[str] = set()
        self._host_updates = 0
        self.last_lr_scale = 0.0  # the last update's LR over the peak LR (a host float: the schedule is known there)

    @property
    def coeff(self) -> torch.Tensor:
        return self.log_coeff.exp().float()

    @property
    def smoothed_kl(self) -> torch.Tensor:
        """The bias-corrected moving average of the replay KL (0 until the second update)."""
        averaged = (self.updates - 1).clamp_min(0.0)
        correction = 1.0 - self.smoothing ** averaged
        return torch.where(averaged > 0, self.average / correction.clamp_min(1e-12), self.average)

    def update(self, kl: torch.Tensor, lr_scale: float = 1.0) -> None:
        """One optimizer step's replay KL per token (averaged over ranks by the caller); ``lr_scale`` is that step's
        learning rate over the peak learning rate."""
        kl = kl.detach().to(self.average.device, torch.float64)
        counted = (self.updates > 0).double()  # the first update's KL is at the teacher's weights: held, unaveraged
        warming_up, self.last_lr_scale = float(lr_scale) > self.last_lr_scale, float(lr_scale)
        self.average = torch.lerp(self.average, self.smoothing * self.average + (1.0 - self.smoothing) * kl, counted)
        self.updates = self.updates + 1
        smoothed = self.smoothed_kl
        log_kl = torch.log(smoothed.clamp_min(self.target * 1e-6))
        rise = log_kl - self.last_log_kl
        trended = (self.updates > 2).double()  # a trend needs two averaged updates: until then c may only rise
        self.trend = torch.lerp(self.trend, TREND_SMOOTHING * self.trend + (1.0 - TREND_SMOOTHING) * rise, trended)
        self.last_log_kl = torch.lerp(self.last_log_kl, log_kl, counted)
        trend = self.trend / (1.0 - TREND_SMOOTHING ** (self.updates - 2).clamp_min(1.0))  # bias-corrected
        predicted, fall = log_kl - math.log(self.target), MAX_FALL_WARMUP  # the level (while the LR warms up)
        if not warming_up:
            predicted, fall = predicted + self.horizon * trend.clamp_min(0.0), MAX_FALL
        error = torch.where(trended > 0, predicted.clamp(-fall, MAX_RISE), predicted.clamp(0.0, MAX_RISE))
        error = error * counted
        self.integral = (self.integral + self.step * float(lr_scale) * error).clamp(self.log_min, self.log_max)
        self.log_coeff = (self.integral + self.gain * error).clamp(self.log_min, self.log_max)
        self._pushed = error
        self._host_updates += 1
        if self._host_updates % CHECK_EVERY == 0:
            self.warn_at_bound()

    def warn_at_bound(self) -> None:
        """Warn (once per bound) when c sits at ``coeff_min`` / ``coeff_max`` and the KL pushes it further: the
        target cannot be met within the bounds."""
        log_c, pushed = float(self.log_coeff), float(self._pushed)
        for name, bound, beyond in (("coeff_max", self.coeff_max, log_c >= self.log_max - 1e-9 and pushed > 0),
                                    ("coeff_min", self.coeff_min, log_c <= self.log_min + 1e-9 and pushed < 0)):
            if beyond and name not in self._warned:
                self._warned.add(name)
                side = "above" if name == "coeff_max" else "below"
                warnings.warn(f"{self.prefix}target_kl={self.target:g}: the replay coefficient sits at "
                              f"{self.prefix}{name}={bound:g} with the replay KL ({float(self.smoothed_kl):.3g}) still "
                              f"{side} the target: it cannot be met within the bounds (widen {self.prefix}{name} or "
                              f"change the target)", stacklevel=2)

    def state_dict(self) -> dict:
        return {**{name: float(getattr(self, name)) for name in STATE}, "last_lr_scale": self.last_lr_scale}

    def load_state_dict(self, state: dict) -> None:
        device = self.log_coeff.device
        state = {"integral": state["log_coeff"], "trend": 0.0, **state}  # checkpoints of earlier designs
        for name in STATE:
            if name in state:
                setattr(self, name, torch.tensor(state[name], dtype=torch.float64, device=device))
        if "last_log_kl" not in state:
            self.last_log_kl = torch.log(self.smoothed_kl.clamp_min(self.target * 1e-6))
        self.last_lr_scale = float(state.get("last_lr_scale", 1.0))  # (older checkpoints: as if at the peak LR)

def check_budget(target, start, step, smoothing, coeff_min, coeff_max, gain=0.0, prefix: str = "replay.",
                 divergence: str = "forward_kl") -> None:
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
    check_controlled(divergence, prefix)


def check_controlled(divergence: str, prefix: str = "replay.") -> None:
    """A budget controls the forward KL(teacher ‖ student), the forgetting it names; refuse any other divergence."""
    if divergence != "forward_kl":
        raise SelfReplayError(f"{prefix}target_kl with {prefix}divergence={divergence}: a forgetting budget controls "
                              f"the forward KL(teacher || student), the forgetting it names; use "
                              f"{prefix}divergence=forward_kl or a fixed {prefix}coeff")
