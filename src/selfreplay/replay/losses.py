"""Losses: next-token cross-entropy and the divergences between the frozen teacher and the student.

Conventions shared by every function here:
- position t predicts token t+1; the last position has no target. A ``mask`` [B, T] over *tokens* says which
  tokens are targets (the prediction at t counts when ``mask[:, t+1]`` is set); position 0 never is.
- A loss is the **mean over target tokens** ("nats per token"). The paper's code divides by all B·T positions
  instead, so its numbers are ours times (T-1)/T: :func:`to_paper_convention` / :func:`from_paper_convention`
  convert wherever a paper number is used as a target or printed beside ours.
- Teacher targets are *logits* in whatever dtype they were computed (bf16 under autocast: stored losslessly at
  half the memory of float32 log-probs), normalised with a float32 log-softmax at use, so they always sum to 1;
  or :class:`TopKTargets` (a truncated distribution). Everything is computed in float32.

The ``*_sum`` functions work from final hidden states and the output head: the logits of at most ``chunk_size``
positions exist at any time, each chunk under activation checkpointing (backward recomputes that chunk's logits),
so a 128k vocabulary never needs a [B, T, V] tensor. With ``chunk_size=None`` all positions go in one piece,
with static shapes (what torch.compile wants for small vocabularies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class TopKTargets:
    """A truncated teacher distribution: the k largest log-probs per position and their token ids. The mass
    outside them, ``1 - exp(values).sum(-1)``, is one bucket (so the KL is a lower bound of the full one)."""

    values: torch.Tensor  # [B, T, k] float log-probs
    indices: torch.Tensor  # [B, T, k] long token ids

    def to(self, device, non_blocking: bool = False) -> "TopKTargets":
        return TopKTargets(self.values.to(device, non_blocking=non_blocking),
                           self.indices.to(device, non_blocking=non_blocking))

    def __getitem__(self, index) -> "TopKTargets":
        return TopKTargets(self.values[index], self.indices[index])


TeacherTargets = Union[torch.Tensor, TopKTargets]  # logits [B, T, V] (any dtype) or top-k log-probs


def to_paper_convention(loss: float, seq_len: int) -> float:
    """Our per-token mean as the paper's code reports it (divided by all T positions)."""
    return loss * (seq_len - 1) / seq_len


def from_paper_convention(loss: float, seq_len: int) -> float:
    """A paper number (e.g. a target loss) in our per-token convention."""
    return loss * seq_len / (seq_len - 1)


def token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position next-token negative log-likelihood [B, T-1]."""
    B, T, V = logits.shape
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), tokens[:, 1:].reshape(-1), reduction="none")
    return nll.view(B, T - 1)


def _topk_forward_kl(student_logprobs: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) with the teacher's tail outside its top k merged into one bucket."""
    t_logp = values.float()
    s_logp = student_logprobs.gather(-1, indices)
    t_p = t_logp.exp()
    head = (t_p * (t_logp - s_logp)).sum(-1)
    t_tail = (1.0 - t_p.sum(-1)).clamp_min(0.0)
    s_tail = (1.0 - s_logp.exp().sum(-1)).clamp_min(1e-12)
    tail = torch.where(t_tail > 1e-6, t_tail * (t_tail.clamp_min(1e-12).log() - s_tail.log()),
                       torch.zeros_like(t_tail))
    return head + tail


def token_divergence(student_logits: torch.Tensor, teacher: TeacherTargets, kind: str = "forward_kl",
                     beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence between the teacher's and the student's next-token distributions.

    - forward_kl: KL(teacher || student), the paper's penalty;
    - reverse_kl: KL(student || teacher);
    - jsd: generalised Jensen-Shannon, beta·KL(teacher || M) + (1-beta)·KL(student || M), M the beta-mixture.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {DIVERGENCES}")
    student = F.log_softmax(student_logits.float(), dim=-1)
    if isinstance(teacher, TopKTargets):
        if kind != "forward_kl":
            raise ValueError("top-k teacher targets support only forward_kl")
        return _topk_forward_kl(student, teacher.values, teacher.indices)
    t = F.log_softmax(teacher.float(), dim=-1)
    if kind == "forward_kl":
        return F.kl_div(student, t, log_target=True, reduction="none").sum(-1)
    if kind == "reverse_kl":
        return F.kl_div(t, student, log_target=True, reduction="none").sum(-1)
    log_beta, log_1mb = torch.log(torch.tensor(beta)), torch.log(torch.tensor(1.0 - beta))
    mixture = torch.logsumexp(torch.stack((t + log_beta, student + log_1mb)), dim=0)
    return (beta * F.kl_div(mixture, t, log_target=True, reduction="none").sum(-1)
            + (1.0 - beta) * F.kl_div(mixture, student, log_target=True, reduction="none").sum(-1))


# --- from hidden states, chunk by chunk --------------------------------------------------------------------------

def _gather(x: torch.Tensor, flat: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """x[b, t + shift] for the predicting positions (b, t) numbered ``flat`` in 0..B·(T-1)-1."""
    per_row = x.shape[1] - 1
    flat = flat.to(x.device)
    return x[flat // per_row, flat % per_row + shift]


def _weighted_sum(values: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_positions w · values; values may carry a trailing dimension of several quantities."""
    if values.dim() == w.dim():
        return (values * w).sum()
    # in float64, where float32 values add exactly: equal values give equal sums in any order
    return (values.double() * w.unsqueeze(-1).double()).flatten(0, -2).sum(0)


def position_sum(hidden: torch.Tensor, head: Callable, tokens: torch.Tensor, mask: torch.Tensor,
                 fn: Callable, *aligned: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Σ over predicting positions of ``mask[:, t+1] · fn(logits_t, target_t, *aligned_t)``.

    ``aligned`` tensors are [B, T, ...] per-position inputs of ``fn`` (teacher logits, teacher hidden states, ...).
    ``fn`` may return several values per position (a trailing dimension): the sum is then a vector.
    With ``chunk_size`` only the positions that count are computed, ``chunk_size`` at a time under checkpointing.
    """
    w = mask[:, 1:].to(device=hidden.device, dtype=torch.float32)
    if chunk_size is None or w.numel() <= chunk_size:
        values = fn(head(hidden[:, :-1]), tokens[:, 1:], *[a[:, :-1] for a in aligned])
        return _weighted_sum(values, w)
    def chunk(h, y, ww, *a):
        return _weighted_sum(fn(head(h), y, *a), ww)

    if torch.is_grad_enabled() and hidden.requires_grad:
        from torch.utils.checkpoint import checkpoint  # (its first call imports torch._dynamo: seconds per process)

        run_chunk = lambda *args: checkpoint(chunk, *args, use_reentrant=False)  # noqa: E731
    else:  # nothing to recompute in backward: an evaluation, a teacher
        run_chunk = chunk

    flat_w = w.reshape(-1)
    rows = flat_w.nonzero().squeeze(-1)
    total = hidden.sum().float() * 0.0  # connected to the graph even when no position counts (broadcasts to a vector)
    for idx in rows.split(chunk_size):
        total = total + run_chunk(_gather(hidden, idx), _gather(tokens, idx, 1), flat_w[idx],
                                  *[_gather(a, idx) for a in aligned])
    return total


def ntp_sum(hidden: torch.Tensor, head: Callable, tokens: torch.Tensor, mask: torch.Tensor,
            chunk_size: Optional[int] = None, dft: bool = False) -> torch.Tensor:
    """Summed next-token NLL over the target tokens; ``dft``: each token's NLL weighted by the model's own
    (detached) probability of it (dynamic fine-tuning, the first half of anchored SFT)."""
    def nll(logits, y):
        values = F.cross_entropy(logits.float().flatten(0, -2), y.flatten(), reduction="none").view(y.shape)
        return values * torch.exp(-values.detach()) if dft else values

    return position_sum(hidden, head, tokens, mask, nll, chunk_size=chunk_size)


def divergence_sum(hidden: torch.Tensor, head: Callable, tokens: torch.Tensor, mask: torch.Tensor,
                   teacher: Optional[TeacherTargets] = None, teacher_hidden: Optional[torch.Tensor] = None,
                   teacher_head: Optional[Callable] = None, kind: str = "forward_kl", beta: float = 0.5,
                   chunk_size: Optional[int] = None) -> torch.Tensor:
    """Summed divergence over the positions predicting a target token. The teacher is either its targets
    (logits or top-k) or its hidden states + head (run without gradient, chunk by chunk)."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {DIVERGENCES}")
    if (teacher is None) == (teacher_hidden is None or teacher_head is None):
        raise ValueError("give either teacher targets, or teacher_hidden and teacher_head")
    if isinstance(teacher, TopKTargets):
        if kind != "forward_kl":
            raise ValueError("top-k teacher targets support only forward_kl")
        fn = lambda logits, y, values, indices: token_divergence(  # noqa: E731
            logits, TopKTargets(values, indices), kind, beta)
        return position_sum(hidden, head, tokens, mask, fn, teacher.values, teacher.indices, chunk_size=chunk_size)
    if teacher is not None:
        fn = lambda logits, y, t: token_divergence(logits, t.detach(), kind, beta)  # noqa: E731
        return position_sum(hidden, head, tokens, mask, fn, teacher, chunk_size=chunk_size)

    def from_hidden(logits, y, t_hidden):
        with torch.no_grad():
            t_logits = teacher_head(t_hidden.detach())
        return token_divergence(logits, t_logits.to(logits.device), kind, beta)

    return position_sum(hidden, head, tokens, mask, from_hidden, teacher_hidden, chunk_size=chunk_size)
