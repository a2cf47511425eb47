"""The optimizer, the learning-rate schedule, mixed precision and compilation of a run."""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
from typing import Callable, Optional

import torch
from torch import nn

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


log = logging.getLogger(__name__)
COMPILE_BACKEND_ENV = "SELFREPLAY_COMPILE_BACKEND"  # internal: "eager" makes a cheap Dynamo-only compile (tests)
WARM_UP_COMPILES = 2  # per role: the first compile, and one that makes a changed size dynamic


def compile_on(cfg: TrainConfig, model, device: torch.device) -> bool:
    value = str(cfg.compile).lower()
    return value == "true" or (value == "auto" and device.type == "cuda" and model.kind == "gpt")


def compile_backend() -> str:
    """The torch.compile backend: inductor, unless $SELFREPLAY_COMPILE_BACKEND names another (tests use "eager")."""
    return os.environ.get(COMPILE_BACKEND_ENV) or "inductor"


class CompiledForward:
    """One role's compiled forward of a module: the student's training forward, its evaluation forward (no grad,
    eval mode), the teacher's forward (no grad).

    Dynamo keeps compiled graphs per code object, so every ``torch.compile`` of a :class:`CausalLM` shares one cache
    of ``CausalLM.forward`` and one recompile limit: roles that differ in grad mode, training flag, arguments or
    module each add entries, and past the limit Dynamo silently runs eager. So each role has its own compiled
    callable (its own cache where torch has ``isolate_recompiles``), its callers always pass the same keywords,
    and evaluation pads a ragged last batch (:func:`~selfreplay.evaluate.metrics.score`). A role compiles once, or
    twice when a size changes (the second graph has that size dynamic: the teacher sees replay rows and evaluation
    rows; Dynamo remembers sizes per function, not per role, so the other roles' first graphs may have it dynamic
    too); any further compile is logged as a warning. Module-like: ``train`` / ``eval`` / ``training`` act on the
    module.
    """

    def __init__(self, module: nn.Module, role: str):
        isolated = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(
            torch.compile).parameters else {}
        self.module, self.role = module, role
        self.compiled = torch.compile(module, backend=compile_backend(), **isolated)
        self.compiles = 0  # calls of this role that compiled (each frame of a graph-broken forward: still one)

    def __call__(self, *args, **kwargs):
        from torch._dynamo.utils import counters

        before = counters["frames"]["total"]  # frames Dynamo compiled, or tried to, in this process
        out = self.compiled(*args, **kwargs)
        if counters["frames"]["total"] != before:
            self.compiles += 1
            if self.compiles > WARM_UP_COMPILES:
                log.warning("torch.compile: the %s forward compiled again (%d calls compiled; shapes or arguments keep "
                            "changing, and past torch._dynamo.config.recompile_limit it runs eager)", self.role,
                            self.compiles)
        return out

    @property
    def training(self) -> bool:
        return self.module.training

    def train(self, mode: bool = True) -> "CompiledForward":
        self.module.train(mode)
        return self

    def eval(self) -> "CompiledForward":
        return self.train(False)


def make_optimizer(cfg: TrainConfig, params: list, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    fused = o.fused if o.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
                             fused=fused or None)
