"""Batched autoregressive sampling from a (frozen) model with a KV cache.

Works with any model offering ``new_kv_cache(batch_size)`` and ``model(tokens, cache=cache) -> logits``.
While sampling, the model's temperature-1 next-token log-probs at every position are the exact KL targets for
the sampled sequence, so :func:`sample` can return them and spare the trainer a second teacher pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from selfreplay.losses import TeacherTargets, TopKLogprobs


@dataclass
class Samples:
    """Sampled sequences; ``loss_mask`` marks real (non-padding) tokens, ``teacher_logprobs`` the KL targets."""

    tokens: torch.Tensor  # [B, L] long, prompt included
    loss_mask: Optional[torch.Tensor] = None  # [B, L] float; None = every token counts
    teacher_logprobs: Optional[TeacherTargets] = None  # per position t: log p(x_{t+1} = . | x_<=t), last row zero


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def sample(model, prompts: torch.Tensor, length: int, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, eos_id: Optional[int] = None, pad_id: int = 0,
           generator: Optional[torch.Generator] = None, return_logprobs: bool = False,
           logprobs_top_k: Optional[int] = None) -> Samples:
    """Extend ``prompts`` [B, P] to ``length`` tokens.

    temperature 0 means greedy decoding. With ``eos_id`` set, a sequence stops at its first EOS and the rest is
    ``pad_id`` with loss_mask 0; otherwise EOS is an ordinary token (the paper's default: full-length samples).
    Log-probs returned are always at temperature 1 (the teacher's own distribution), whatever was sampled.
    """
    B, P = prompts.shape
    if not 0 < P <= length:
        raise ValueError(f"prompt length {P} must be in [1, {length}]")
    device = prompts.device
    tokens = torch.full((B, length), pad_id, dtype=torch.long, device=device)
    tokens[:, :P] = prompts
    alive = torch.ones(B, dtype=torch.bool, device=device)
    mask = torch.ones(B, length, device=device)
    keep: list[torch.Tensor] = []  # per-position teacher targets, rows [B, V] or [B, k] (values, indices)
    cache = model.new_kv_cache(B)
    logits = model(prompts, cache=cache)
    if return_logprobs:
        keep.extend(_targets(logits[:, t], logprobs_top_k) for t in range(P - 1))
    last = logits[:, -1]
    for t in range(P, length):
        logp = F.log_softmax(last.float(), dim=-1)
        if return_logprobs:
            keep.append(_targets(last, logprobs_top_k, logp))
        if temperature == 0:
            nxt = logp.argmax(-1)
        else:
            probs = F.softmax(filter_logits(last.float() / temperature, top_k, top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        if eos_id is not None:
            nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
            mask[:, t] = alive.float()
            alive = alive & (nxt != eos_id)
        tokens[:, t] = nxt
        if t + 1 < length:
            last = model(nxt[:, None], cache=cache)[:, -1]
    out = Samples(tokens, mask if eos_id is not None else None)
    if return_logprobs:
        keep.append(_zeros_like_target(keep[0]) if keep else None)
        out.teacher_logprobs = _stack_targets(keep)
    return out


def _targets(logits: torch.Tensor, top_k: Optional[int], logp: Optional[torch.Tensor] = None):
    logp = F.log_softmax(logits.float(), dim=-1) if logp is None else logp
    return logp if top_k is None else logp.topk(top_k, dim=-1)


def _zeros_like_target(target):
    if isinstance(target, torch.Tensor):
        return torch.zeros_like(target)
    return type(target)(torch.zeros_like(target.values), torch.zeros_like(target.indices))


def _stack_targets(rows: list) -> TeacherTargets:
    if isinstance(rows[0], torch.Tensor):
        return torch.stack(rows, dim=1)
    return TopKLogprobs(torch.stack([r.values for r in rows], 1), torch.stack([r.indices for r in rows], 1))
