"""Weight-space baselines: a penalty on the distance from the weights finetuning started from.

    l2_init (L2-SP):  Σ_i (θ_i − θ0_i)²
    ewc:              Σ_i F_i (θ_i − θ0_i)²,  F = the teacher's diagonal Fisher on replay sequences

over the trainable parameters. Both are 0 at step 0. The Fisher is *per token*: the mean over sequences of the
squared gradient of each sequence's summed NLL divided by its number of target tokens n, (∇ Σ_t NLL_t)² / n. On
self-generated replay the sequences are samples of the teacher, so this is the *true* Fisher (a Monte Carlo
estimate), and as the scores of different positions are uncorrelated under the teacher's own samples, it is the
mean over positions of the per-token Fisher, whatever the context length: one ``replay.coeff`` means the same at
context 64 and 4096 (the gradient of the *mean* NLL, the earlier convention, gave the per-token Fisher / n). On real
old data it is the *empirical* Fisher (the same scale). Under FSDP2 the anchor is sharded like the parameters.

With LoRA the trainable parameters are the adapters, anchored at their initialisation: B starts at 0, so every
``lora_A`` gets exactly zero Fisher and EWC anchors only the ``lora_B`` matrices (the update B·A stays small only
through B); ``l2_init`` anchors both. Neither penalises the merged update B·A against the base weights' Fisher.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from selfreplay.data.batch import Batch
from selfreplay.replay.losses import ntp_sum


class WeightAnchor:
    """``Σ w · (θ − θ0)²`` over the trainable parameters of a model (``weights`` None: w = 1)."""

    def __init__(self, model: nn.Module):
        self.start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        self.weights: Optional[dict[str, torch.Tensor]] = None
        self.params: dict[str, torch.Tensor] = {}

    def bind(self, model: nn.Module) -> None:
        """Follow ``model``'s parameters (after DDP / FSDP2 wrapping: FSDP2 replaces them by sharded ones)."""
        self.params = {name: p for name, p in model.named_parameters() if name in self.start}
        for name, p in self.params.items():
            self.start[name] = _like(self.start[name], p)
            if self.weights is not None:
                self.weights[name] = _like(self.weights[name], p)

    def term(self) -> torch.Tensor:
        total = None
        for name, p in self.params.items():
            squares = (p - self.start[name]).float().pow(2)
            if self.weights is not None:
                squares = squares * self.weights[name]
            value = squares.sum()
            if hasattr(value, "full_tensor"):  # a DTensor (FSDP2): the sum over every shard
                value = value.full_tensor()
            total = value if total is None else total + value
        if total is None:
            raise ValueError("WeightAnchor.term: bind() the model first")
        return total

    def state_dict(self) -> dict:
        """The Fisher (the start weights are the teacher's: rebuilt when a run resumes)."""
        if self.weights is None:
            return {}
        return {name: _full(w).cpu() for name, w in self.weights.items()}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.weights = {name: _like(w, self.params.get(name, w)) for name, w in state.items()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``t`` (full or already laid out) on ``param``'s device and, for a DTensor parameter, its sharding."""
    t = _full(t).detach().float()
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(t.to(param.device_mesh.device_type), param.device_mesh, param.placements)
    return t.to(param.device)


def diagonal_fisher(model: nn.Module, batches: Iterable[Batch], num_sequences: int,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                    ) -> dict[str, torch.Tensor]:
    """Per-token Fisher: the mean over ``num_sequences`` rows of ``batches`` of (∇ Σ NLL)² / n for each row of n
    target tokens, for every trainable parameter of ``model`` (one backward per sequence; gradients are left zero)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    seen = 0
    device = next(iter(params.values())).device
    for batch in batches:
        batch = batch.to(device)
        mask = batch.mask()
        for row in range(len(batch)):
            one = batch.rows(slice(row, row + 1))
            targets = mask[row, 1:].sum()
            if targets == 0:
                continue
            with autocast():
                loss = model(one.tokens, position_ids=one.position_ids, head_fn=_nll_sum, tokens=one.tokens,
                             mask=mask[row:row + 1]) / targets
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (name, _), g in zip(params.items(), grads):
                if g is not None:  # (∇ mean NLL)² · n = (∇ Σ NLL)² / n
                    fisher[name] += g.float().pow(2) * targets.float()
            seen += 1
            if seen == num_sequences:
                return {name: f / seen for name, f in fisher.items()}
    if seen == 0:
        raise ValueError("diagonal_fisher: the replay rows hold no target tokens")
    return {name: f / seen for name, f in fisher.items()}


def _nll_sum(hidden: torch.Tensor, head, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ntp_sum(hidden, head, tokens, mask)
