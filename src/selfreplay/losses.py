"""Losses: next-token cross-entropy and divergences between a frozen teacher and the student.

Conventions shared by every function here:
- ``logits`` are [B, T, V]; position t predicts token t+1, so the last position has no target and is excluded.
- ``loss_mask`` (optional) is [B, T] over *tokens*: 1 where a token is a training target. The prediction at
  position t counts when ``loss_mask[:, t + 1]`` is set. Position 0 (the domain/BOS token) is never a target.
- Averages are over the counted positions (the paper's code divides by all B·T positions, i.e. ours is its value
  times T/(T-1); the optimum and the gradient direction are the same).
- Everything is computed in float32 whatever the autocast dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class TopKLogprobs:
    """A truncated teacher distribution: the k largest log-probs per position and their token ids.

    The probability mass outside the top k is ``1 - exp(values).sum(-1)``; divergences treat it as one bucket.
    """

    values: torch.Tensor  # [B, T, k] float log-probs
    indices: torch.Tensor  # [B, T, k] long token ids

    def to(self, device) -> "TopKLogprobs":
        return TopKLogprobs(self.values.to(device), self.indices.to(device))


TeacherTargets = Union[torch.Tensor, TopKLogprobs]


def position_weights(tokens_shape: torch.Size, loss_mask: Optional[torch.Tensor], device) -> torch.Tensor:
    """[B, T-1] float weights of the positions that predict a target token."""
    B, T = tokens_shape[0], tokens_shape[1]
    if loss_mask is None:
        return torch.ones(B, T - 1, device=device)
    return loss_mask[:, 1:].to(device=device, dtype=torch.float32)


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [B, T-1] over positions with weight > 0 (0 if there are none)."""
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position next-token negative log-likelihood, [B, T-1]."""
    B, T, V = logits.shape
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), tokens[:, 1:].reshape(-1), reduction="none")
    return nll.view(B, T - 1)


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor,
                    loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean next-token cross-entropy: labels are the inputs shifted left by one."""
    return masked_mean(token_nll(logits, tokens), position_weights(tokens.shape, loss_mask, logits.device))


def token_divergence(student_logits: torch.Tensor, teacher: TeacherTargets, kind: str = "forward_kl",
                     beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between teacher and student next-token distributions, [B, T].

    ``teacher`` is either full log-probs [B, T, V] or :class:`TopKLogprobs`.
    - forward_kl: KL(teacher || student), the paper's penalty;
    - reverse_kl: KL(student || teacher);
    - jsd: generalised Jensen-Shannon, beta·KL(teacher || M) + (1-beta)·KL(student || M), M = beta·teacher +
      (1-beta)·student.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {DIVERGENCES}")
    student_logprobs = F.log_softmax(student_logits.float(), dim=-1)
    if isinstance(teacher, TopKLogprobs):
        if kind != "forward_kl":
            raise ValueError("top-k teacher log-probs support only forward_kl")
        return _topk_forward_kl(student_logprobs, teacher)
    teacher_logprobs = teacher.float()
    if kind == "forward_kl":
        return F.kl_div(student_logprobs, teacher_logprobs, log_target=True, reduction="none").sum(-1)
    if kind == "reverse_kl":
        return F.kl_div(teacher_logprobs, student_logprobs, log_target=True, reduction="none").sum(-1)
    log_beta, log_1mb = torch.log(torch.tensor(beta)), torch.log(torch.tensor(1.0 - beta))
    mixture = torch.logsumexp(torch.stack((teacher_logprobs + log_beta, student_logprobs + log_1mb)), dim=0)
    kl_teacher = F.kl_div(mixture, teacher_logprobs, log_target=True, reduction="none").sum(-1)
    kl_student = F.kl_div(mixture, student_logprobs, log_target=True, reduction="none").sum(-1)
    return beta * kl_teacher + (1.0 - beta) * kl_student


def _topk_forward_kl(student_logprobs: torch.Tensor, teacher: TopKLogprobs) -> torch.Tensor:
    """KL(teacher || student) with the teacher's tail outside its top k merged into one bucket.

    By the data-processing inequality this never exceeds the full KL; the gap shrinks as the tail mass does.
    """
    t_logp = teacher.values.float()
    s_logp = student_logprobs.gather(-1, teacher.indices)
    t_p = t_logp.exp()
    head = (t_p * (t_logp - s_logp)).sum(-1)
    t_tail = (1.0 - t_p.sum(-1)).clamp_min(0.0)
    s_tail = (1.0 - s_logp.exp().sum(-1)).clamp_min(1e-12)
    tail = torch.where(t_tail > 1e-6, t_tail * (t_tail.clamp_min(1e-12).log() - s_tail.log()), torch.zeros_like(t_tail))
    return head + tail


def divergence_loss(student_logits: torch.Tensor, teacher: TeacherTargets, tokens_shape: torch.Size,
                    loss_mask: Optional[torch.Tensor] = None, kind: str = "forward_kl",
                    beta: float = 0.5) -> torch.Tensor:
    """Mean per-position divergence over positions 0..T-2 (the last one has no target)."""
    per_position = token_divergence(student_logits, teacher, kind, beta)[:, :-1]
    return masked_mean(per_position, position_weights(tokens_shape, loss_mask, student_logits.device))


def topk_logprobs(logprobs: torch.Tensor, k: int) -> TopKLogprobs:
    """Keep the k largest log-probs per position."""
    values, indices = logprobs.topk(k, dim=-1)
    return TopKLogprobs(values, indices)


# --- Bounded-memory losses from hidden states -------------------------------------------------------------------
# With a large vocabulary (e.g. 128k) the [B, T, V] float32 logits of student and teacher dominate memory. The
# functions below take final hidden states and the output head instead, and compute the loss `chunk_size` positions
# at a time; each chunk runs under activation checkpointing, so backward recomputes that chunk's logits rather than
# keeping them. Peak extra memory is O(chunk_size · V); values and gradients equal the full-logit functions above.

def _selected_positions(tokens: torch.Tensor, loss_mask: Optional[torch.Tensor], device):
    """Flat indices into the B·(T-1) predicting positions that count, their weights, and the weight total."""
    weights = position_weights(tokens.shape, loss_mask, device).reshape(-1)
    rows = weights.nonzero().squeeze(-1)
    return rows, weights[rows], weights.sum().clamp_min(1.0)


def _rows_of(x: torch.Tensor, flat_rows: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """x[b, t + shift] [N, ...] for the predicting positions (b, t) numbered ``flat_rows`` in 0..B·(T-1)-1,
    gathered without copying the rest of x (shift=1 gives the target tokens)."""
    flat_rows = flat_rows.to(x.device)
    per_row = x.shape[1] - 1
    return x[flat_rows // per_row, flat_rows % per_row + shift]


def _chunks(rows: torch.Tensor, weights: torch.Tensor, chunk_size: int):
    """(rows, weights) pieces of at most ``chunk_size`` positions."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return zip(rows.split(chunk_size), weights.split(chunk_size))


def _total(chunk_losses: list, hidden: torch.Tensor, weight_total: torch.Tensor) -> torch.Tensor:
    """Sum of the chunks' weighted losses over the weight total; a graph-connected 0 when no position counts."""
    if not chunk_losses:
        return hidden.sum().float() * 0.0
    return torch.stack(chunk_losses).sum() / weight_total


def chunked_next_token_loss(hidden: torch.Tensor, head, tokens: torch.Tensor,
                            loss_mask: Optional[torch.Tensor] = None, chunk_size: int = 1024) -> torch.Tensor:
    """:func:`next_token_loss` from final hidden states [B, T, D] and ``head`` ([N, D] -> [N, V] logits).

    Only ``chunk_size`` positions' logits exist at any time, in the forward and in the backward pass.
    """
    from torch.utils.checkpoint import checkpoint

    rows, weights, total = _selected_positions(tokens, loss_mask, hidden.device)

    def chunk_loss(h: torch.Tensor, chunk_targets: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        nll = F.cross_entropy(head(h).float(), chunk_targets, reduction="none")
        return (nll * w).sum()

    losses = []
    for chunk_rows, chunk_weights in _chunks(rows, weights, chunk_size):
        chunk_targets = _rows_of(tokens, chunk_rows, shift=1).to(hidden.device)
        losses.append(checkpoint(chunk_loss, _rows_of(hidden, chunk_rows), chunk_targets, chunk_weights,
                                 use_reentrant=False))
    return _total(losses, hidden, total)


def chunked_divergence_loss(hidden: torch.Tensor, head, tokens: torch.Tensor,
                            teacher_hidden: Optional[torch.Tensor] = None, teacher_head=None,
                            teacher_logprobs: Optional[TeacherTargets] = None,
                            loss_mask: Optional[torch.Tensor] = None, divergence: str = "forward_kl",
                            jsd_beta: float = 0.5, chunk_size: int = 1024) -> torch.Tensor:
    """:func:`divergence_loss` from hidden states, ``chunk_size`` positions at a time.

    The teacher is either ``teacher_hidden`` [B, T, D] + ``teacher_head`` (run without gradient, chunk by chunk)
    or precomputed ``teacher_logprobs`` (full [B, T, V] log-probs or :class:`TopKLogprobs`).
    """
    from torch.utils.checkpoint import checkpoint

    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    from_hidden = teacher_hidden is not None and teacher_head is not None
    if from_hidden == (teacher_logprobs is not None):
        raise ValueError("give either teacher_hidden and teacher_head, or teacher_logprobs")
    if isinstance(teacher_logprobs, TopKLogprobs) and divergence != "forward_kl":
        raise ValueError("top-k teacher log-probs support only forward_kl")

    rows, weights, total = _selected_positions(tokens, loss_mask, hidden.device)

    def chunk_loss(h: torch.Tensor, teacher_chunk, w: torch.Tensor) -> torch.Tensor:
        if from_hidden:
            with torch.no_grad():
                teacher = F.log_softmax(teacher_head(teacher_chunk).float(), dim=-1).to(h.device)
        elif isinstance(teacher_chunk, tuple):
            teacher = TopKLogprobs(*teacher_chunk)
        else:
            teacher = teacher_chunk
        return (token_divergence(head(h), teacher, divergence, jsd_beta) * w).sum()

    losses = []
    for chunk_rows, chunk_weights in _chunks(rows, weights, chunk_size):
        if from_hidden:  # stays on the teacher's device; its log-probs move to the student's
            teacher_chunk = _rows_of(teacher_hidden.detach(), chunk_rows)
        elif isinstance(teacher_logprobs, TopKLogprobs):
            teacher_chunk = (_rows_of(teacher_logprobs.values.detach(), chunk_rows).to(hidden.device),
                             _rows_of(teacher_logprobs.indices, chunk_rows).to(hidden.device))
        else:
            teacher_chunk = _rows_of(teacher_logprobs.detach(), chunk_rows).to(hidden.device)
        losses.append(checkpoint(chunk_loss, _rows_of(hidden, chunk_rows), teacher_chunk, chunk_weights,
                                 use_reentrant=False))
    return _total(losses, hidden, total)
