"""Replay sources: where the previous-distribution sequences of the forgetting penalty come from.

A source hands the trainer one :class:`ReplayBatch` per optimizer step. Real data (:class:`CorpusReplay`) and
self-generated samples implement the same small interface, so the training loop does not care which it gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from selfreplay.losses import TeacherTargets


@dataclass
class ReplayBatch:
    """Replay sequences [B, T]; optional token mask and precomputed teacher log-probs (the KL targets)."""

    tokens: torch.Tensor
    loss_mask: Optional[torch.Tensor] = None
    teacher_logprobs: Optional[TeacherTargets] = None


class ReplaySource(Protocol):
    """Anything that yields replay batches and can save/restore its position for resumable training."""

    sample_seconds: float  # time spent producing replay (sampling), reported apart from the training step

    def next_batch(self) -> ReplayBatch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class CorpusReplay:
    """Real previous-distribution data: rows from the training split of a tokenized corpus."""

    def __init__(self, loader):
        """``loader`` is a :class:`selfreplay.data.BatchLoader` over the previous corpus."""
        self.loader = loader
        self.sample_seconds = 0.0

    def next_batch(self) -> ReplayBatch:
        return ReplayBatch(tokens=self.loader.next_batch())

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
