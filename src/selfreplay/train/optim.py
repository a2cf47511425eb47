"""The optimizer, the learning-rate schedule, mixed precision and compilation of a run."""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch

from selfreplay.config import TrainConfig


def lr_factor(step: int, tokens_per_step: int, warmup_tokens: int, schedule: str, total_steps: Optional[int]) -> float:
    """Multiplier of the peak LR for update ``step`` (0-based): linear warmup by tokens, reaching the peak at the
    end of the warmup (the first update already moves: (1 / warmup steps) of the peak), then constant or cosine."""
    warmup_steps = warmup_tokens / tokens_per_step
    if warmup_steps > 0 and step + 1 < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine" and total_steps:
        start = min(warmup_steps, total_steps - 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step + 1 - start) / max(1.0, total_steps - start))))
    return 1.0


def low_precision(device: torch.device, precision: str) -> bool:
    """Whether ``precision`` means bf16 autocast on ``device`` (the default on CUDA)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


PAPER_WARMUP_TOKENS = 10_000_000
DEFAULT_WARMUP_RATIO = 0.1


def warmup_tokens_for(optim, tokens_per_step: int, total_steps: Optional[int]) -> float:
    """The warmup length in tokens, from whichever of optim.warmup_tokens / warmup_steps / warmup_ratio is given.

    None given: 10% of the run's length, at most the paper's 10M tokens (a long run warms up exactly as the paper's;
    a short one still reaches its peak LR, where 10M tokens would outlast it), 10M tokens when the length is unknown.
    """
    if optim.warmup_tokens is not None:
        return float(optim.warmup_tokens)
    if optim.warmup_steps is not None:
        return float(optim.warmup_steps * tokens_per_step)
    if optim.warmup_ratio is not None:
        return optim.warmup_ratio * (total_steps or 0) * tokens_per_step
    if total_steps is None:
        return float(PAPER_WARMUP_TOKENS)
    return min(float(PAPER_WARMUP_TOKENS), DEFAULT_WARMUP_RATIO * total_steps * tokens_per_step)


def autocast_for(device: torch.device, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA by default (or with precision=bf16 anywhere), full precision otherwise."""
    if low_precision(device, precision):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def compile_on(cfg: TrainConfig, model, device: torch.device) -> bool:
    value = str(cfg.compile).lower()
    return value == "true" or (value == "auto" and device.type == "cuda" and model.kind == "gpt")


def make_optimizer(cfg: TrainConfig, params: list, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    fused = o.fused if o.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
                             fused=fused or None)
