"""Training rows from tokenized records, split by example, and the loader that walks them.

How examples become rows (``data.packing``):

- ``none`` (chats and prompt-completion by default): one example per row, right-padded; examples longer than a row
  are dropped or truncated (``data.too_long``), and the log says how many;
- ``stream`` (plain text by default, as pretraining data is): all examples concatenated and cut into rows of
  ``seq_len`` tokens; consecutive rows overlap by one token, so every token after the first is a target in exactly
  one row. Attention crosses document boundaries, as in pretraining; chats refuse it;
- ``examples``: whole examples packed greedily into rows, positions restarting at 0 for each one
  (``position_ids``), so that no token attends across examples (Hugging Face models build the block-diagonal
  mask from them).

The validation split is by example (``valid_examples`` picked by the seed), made before rows are cut: no example
has tokens on both sides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from selfreplay.data.batch import Batch
from selfreplay.data.loader import ShuffledWalk
from selfreplay.data.text import TokenizedExample
from selfreplay.errors import SelfReplayError

log = logging.getLogger(__name__)

PACKINGS = ("auto", "none", "stream", "examples")
TOO_LONG = ("drop", "truncate")
_SPLIT_STREAM, _ORDER_STREAM = 101, 102  # independent random streams of one seed: the split, the epoch orders


@dataclass
class Rows:
    """``input_ids`` [N, T] long, ``loss_mask`` [N, T] bool over target tokens, ``lengths`` [N] real tokens per
    row, and for packed examples ``position_ids`` [N, T]."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    lengths: torch.Tensor
    position_ids: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_targets(self) -> int:
        return int(self.loss_mask.sum())

    def batch(self, index) -> Batch:
        """Rows ``index`` as a Batch, cut to the longest of them (padding after it is never a target)."""
        index = torch.as_tensor(index, dtype=torch.long)
        length = max(2, int(self.lengths[index].max())) if len(index) else 2
        pos = None if self.position_ids is None else self.position_ids[index, :length]
        return Batch(self.input_ids[index, :length], self.loss_mask[index, :length].float(), pos)


def _stack(rows: list[tuple[list[int], list[bool], list[int]]], seq_len: int, pad_id: int, packed: bool) -> Rows:
    n = len(rows)
    ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.bool)
    pos = torch.zeros((n, seq_len), dtype=torch.long) if packed else None
    lengths = torch.zeros(n, dtype=torch.long)
    for i, (r_ids, r_mask, r_pos) in enumerate(rows):
        k = len(r_ids)
        ids[i, :k] = torch.tensor(r_ids, dtype=torch.long)
        mask[i, :k] = torch.tensor(r_mask, dtype=torch.bool)
        if pos is not None:
            pos[i, :k] = torch.tensor(r_pos, dtype=torch.long)
        lengths[i] = k
    mask[:, 0] = False
    return Rows(ids, mask, lengths, pos)


def stream_rows(examples: Sequence[TokenizedExample], seq_len: int, pad_id: int) -> Rows:
    """Examples concatenated in order and cut into rows overlapping by one token (nothing truncated)."""
    ids = np.fromiter((t for e in examples for t in e.input_ids), dtype=np.int64)
    mask = np.fromiter((m for e in examples for m in e.loss_mask), dtype=bool)
    if len(ids) < 2:
        raise SelfReplayError(f"only {len(ids)} tokens to cut into rows: need at least 2")
    stride = seq_len - 1
    num_rows = -(-(len(ids) - 1) // stride)
    padded = num_rows * stride + 1
    lengths = np.minimum(seq_len, len(ids) - np.arange(num_rows) * stride)
    ids = np.concatenate([ids, np.full(padded - len(ids), pad_id, dtype=np.int64)])
    mask = np.concatenate([mask, np.zeros(padded - len(mask), dtype=bool)])
    index = np.arange(num_rows)[:, None] * stride + np.arange(seq_len)[None, :]
    row_mask = mask[index]
    row_mask[:, 0] = False
    return Rows(torch.from_numpy(ids[index]), torch.from_numpy(row_mask), torch.from_numpy(lengths))


def _fit(examples: Sequence[TokenizedExample], seq_len: int, too_long: str, where: str
         ) -> list[tuple[list[int], list[bool]]]:
    """Each example's tokens and mask, long ones dropped or truncated (counted in the log)."""
    if too_long not in TOO_LONG:
        raise SelfReplayError(f"data.too_long={too_long!r}: expected drop or truncate")
    out, long = [], 0
    for e in examples:
        if len(e.input_ids) > seq_len:
            long += 1
            if too_long == "drop":
                continue
        out.append((list(e.input_ids[:seq_len]), list(e.loss_mask[:seq_len])))
    if long:
        log.warning("%s: %d of %d examples are longer than data.seq_len=%d tokens: %s (data.too_long)", where, long,
                    len(examples), seq_len, "dropped" if too_long == "drop" else "truncated")
    return out


def example_rows(examples: Sequence[TokenizedExample], seq_len: int, pad_id: int, too_long: str = "drop",
                 where: str = "data", packed: bool = False) -> Rows:
    """One example per row, or (``packed``) whole examples packed greedily with restarting positions."""
    fitted = _fit(examples, seq_len, too_long, where)
    rows: list[tuple[list[int], list[bool], list[int]]] = []
    for ids, mask in fitted:
        mask = [False] + mask[1:]  # an example's first token has no context of its own example
        if packed and rows and len(rows[-1][0]) + len(ids) <= seq_len:
            r = rows[-1]
            r[0].extend(ids), r[1].extend(mask), r[2].extend(range(len(ids)))
        else:
            rows.append((list(ids), mask, list(range(len(ids)))))
    if not rows:
        raise SelfReplayError(f"{where}: no example fits in data.seq_len={seq_len} tokens (set data.too_long="
                              f"truncate or a larger data.seq_len)")
    return _stack(rows, seq_len, pad_id, packed)


def resolve_packing(packing: str, fmt: str, where: str = "data") -> str:
    if packing not in PACKINGS:
        raise SelfReplayError(f"data.packing={packing!r}: expected one of {', '.join(PACKINGS)}")
    if packing == "auto":
        return "stream" if fmt == "text" else "none"
    if packing == "stream" and fmt != "text":
        raise SelfReplayError(f"{where}: data.packing=stream would let {fmt} examples attend to each other; use "
                              f"examples (packed, attention kept within each) or none")
    return packing


def make_rows(examples: Sequence[TokenizedExample], seq_len: int, pad_id: int, packing: str,
              too_long: str = "drop", where: str = "data") -> Rows:
    """Rows of ``examples`` for a resolved ``packing`` (none | stream | examples)."""
    if seq_len < 2:
        raise SelfReplayError(f"data.seq_len={seq_len}: must be at least 2")
    if pad_id is None:
        raise SelfReplayError("rows need a pad token id (the tokenizer has neither a pad nor an EOS token)")
    if packing == "stream":
        return stream_rows(examples, seq_len, pad_id)
    return example_rows(examples, seq_len, pad_id, too_long, where, packed=packing == "examples")


class RowLoader:
    """Training batches of rows made from records, and the held-out rows of ``valid_examples`` examples.

    ``batch_size`` is the global batch; rows are visited in an order reshuffled every epoch from (seed, epoch).
    """

    def __init__(self, examples: Sequence[TokenizedExample], fmt: str, seq_len: int, pad_id: int, batch_size: int,
                 seed: int = 0, valid_examples: int = 0, packing: str = "auto", too_long: str = "drop",
                 where: str = "data", evaluate_all: bool = False):
        """``evaluate_all``: old data that is only evaluated — every row is also a "held-out" row."""
        if batch_size < 1:
            raise SelfReplayError(f"batch_size={batch_size}: must be positive")
        if not 0 <= valid_examples < len(examples):
            raise SelfReplayError(f"{where}: data.valid_examples={valid_examples}: expected 0 <= valid_examples < "
                                  f"{len(examples)} (the examples)")
        self.seq_len, self.batch_size, self.seed, self.where = seq_len, batch_size, seed, where
        self.packing = resolve_packing(packing, fmt, where)
        perm = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(len(examples))
        valid_ids, train_ids = np.sort(perm[:valid_examples]), np.sort(perm[valid_examples:])
        self.train = make_rows([examples[i] for i in train_ids], seq_len, pad_id, self.packing, too_long, where)
        self.valid = make_rows([examples[i] for i in valid_ids], seq_len, pad_id, self.packing, too_long,
                               where) if valid_examples else None
        if evaluate_all:
            self.valid = self.train
        if self.train.num_targets == 0:
            raise SelfReplayError(f"{where}: no target tokens (e.g. no assistant replies in the conversations)")
        if len(self.train) < batch_size:
            raise SelfReplayError(f"{where}: {len(self.train)} training rows (after {valid_examples} validation "
                                  f"examples) are fewer than one batch of {batch_size}: lower the batch size or "
                                  f"add data")
        self._walk = ShuffledWalk(np.arange(len(self.train)), seed, _ORDER_STREAM)

    @property
    def num_train_rows(self) -> int:
        return len(self.train)

    @property
    def epochs_done(self) -> float:
        return self._walk.epochs_done

    def next_batch(self) -> Batch:
        return self.train.batch(torch.from_numpy(self._walk.take(self.batch_size)))

    def valid_batches(self, batch_size: int, max_tokens: Optional[int] = None) -> Iterator[Batch]:
        """The held-out rows in order; ``max_tokens`` stops once about that many tokens were handed out."""
        if self.valid is None:
            return
        seen = 0
        for start in range(0, len(self.valid), batch_size):
            if max_tokens is not None and seen >= max_tokens:
                return
            index = torch.arange(start, min(start + batch_size, len(self.valid)))
            seen += int(self.valid.lengths[index].sum())
            yield self.valid.batch(index)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "walk": self._walk.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise SelfReplayError(f"loader state was saved with seed {state.get('seed')}, not {self.seed}")
        self._walk.load_state_dict(state["walk"], self.where)
