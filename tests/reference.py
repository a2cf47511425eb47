"""Reference losses from full logits (means over target tokens), to check the engine's chunked sums against."""

from typing import Optional

import torch

from selfreplay.replay.losses import TeacherTargets, token_divergence, token_nll


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens."""
    w = torch.ones_like(tokens[:, 1:], dtype=torch.float32) if mask is None else mask[:, 1:].float()
    return (token_nll(logits, tokens) * w).sum() / w.sum().clamp_min(1.0)


def divergence_loss(student_logits: torch.Tensor, teacher: TeacherTargets, tokens: torch.Tensor,
                    mask: Optional[torch.Tensor] = None, kind: str = "forward_kl", beta: float = 0.5) -> torch.Tensor:
    """Mean per-position divergence over the positions that predict a target token."""
    per_position = token_divergence(student_logits[:, :-1], teacher[:, :-1], kind, beta)
    w = torch.ones_like(tokens[:, 1:], dtype=torch.float32) if mask is None else mask[:, 1:].float()
    return (per_position * w).sum() / w.sum().clamp_min(1.0)
