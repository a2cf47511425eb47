"""What every data source hands the training loop: a :class:`Batch` of token rows and their target mask.

Conventions shared by the whole engine:
- ``tokens`` [B, T]: position t predicts token t+1; position 0 (a domain token, BOS or an example's first token)
  is never a target.
- ``loss_mask`` [B, T] (optional) over *tokens*: 1 where token t is a training target (the prediction at t-1
  counts). None means every token after position 0.
- ``position_ids`` [B, T] (optional): packed whole examples, positions restarting at 0 for each one (attention then
  stays within an example).

A data source (token corpora: :class:`~selfreplay.data.loader.CorpusLoader`; records:
:class:`~selfreplay.data.rows.RowLoader`; the toy tasks: :class:`~selfreplay.data.toy.ToyLoader`) has ``seq_len``,
``next_batch()`` (the next *global* batch: every rank draws the same and takes its rows), ``valid_batches(batch_size,
max_tokens)`` (the held-out rows), ``epochs_done``, ``num_train_rows`` and ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch


@dataclass
class Batch:
    tokens: torch.Tensor
    loss_mask: Optional[torch.Tensor] = None
    position_ids: Optional[torch.Tensor] = None
    teacher_targets: Optional[object] = None  # replay rows: the teacher's KL targets when they were kept

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, tokens=move(self.tokens), loss_mask=move(self.loss_mask),
                       position_ids=move(self.position_ids), teacher_targets=move(self.teacher_targets))

    def rows(self, index) -> "Batch":
        """A subset of rows (a slice or an index tensor)."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return replace(self, tokens=self.tokens[index], loss_mask=pick(self.loss_mask),
                       position_ids=pick(self.position_ids), teacher_targets=pick(self.teacher_targets))

    def mask(self) -> torch.Tensor:
        """The float target mask [B, T] (position 0 always 0)."""
        if self.loss_mask is None:
            m = torch.ones(self.tokens.shape, dtype=torch.float32, device=self.tokens.device)
        else:
            m = self.loss_mask.to(torch.float32).clone()
        m[:, 0] = 0.0
        return m

    def num_targets(self) -> torch.Tensor:
        """Number of target tokens (a tensor: no host sync)."""
        if self.loss_mask is None:
            return torch.tensor(float(self.tokens.shape[0] * (self.tokens.shape[1] - 1)), device=self.tokens.device)
        return self.loss_mask[:, 1:].to(torch.float32).sum()


def pad_to(t: Optional[torch.Tensor], length: int, value) -> Optional[torch.Tensor]:
    """Right-pad [B, L] to [B, length]."""
    if t is None or t.shape[1] == length:
        return t
    pad = torch.full((t.shape[0], length - t.shape[1]), value, dtype=t.dtype, device=t.device)
    return torch.cat((t, pad), 1)


def cat_rows(batches: list[Batch], pad_id: int = 0) -> Batch:
    """Batches stacked row-wise, right-padded to the longest (padding masked; causal attention keeps it inert)."""
    if len(batches) == 1:
        return batches[0]
    length = max(b.tokens.shape[1] for b in batches)
    tokens = torch.cat([pad_to(b.tokens, length, pad_id) for b in batches])
    if all(b.loss_mask is None and b.tokens.shape[1] == length for b in batches):
        mask = None
    else:
        mask = torch.cat([pad_to(b.mask(), length, 0.0) for b in batches])
    positions = None
    if any(b.position_ids is not None for b in batches):
        def pos(b: Batch) -> torch.Tensor:
            p = b.position_ids if b.position_ids is not None else \
                torch.arange(b.tokens.shape[1], device=b.tokens.device).expand(len(b), -1)
            return pad_to(p, length, 0)
        positions = torch.cat([pos(b) for b in batches])
    return Batch(tokens, mask, positions)
