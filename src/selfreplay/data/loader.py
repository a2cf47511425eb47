"""Cutting a token corpus into training rows: the train/valid split, the epoch order, mixing, resuming.

Row i of a flat corpus is its domain token + stream[i·(T-1) : (i+1)·(T-1)] (the incomplete tail dropped); a
pre-cut corpus's rows are used as they are. :class:`ShuffledWalk` is the resumable epoch order every row source of
the package uses.
"""

from __future__ import annotations

import logging
import math
from typing import Iterator, Optional

import numpy as np
import torch

from selfreplay.data.batch import Batch
from selfreplay.data.corpus import Corpus
from selfreplay.errors import SelfReplayError

log = logging.getLogger(__name__)

_SPLIT, _ORDER, _MIX_ORDER = 0, 1, 2  # tags that keep the random streams of one seed independent


class _Sequences:
    """The fixed-length rows of one corpus: sequence i is the domain token + stream[i*(T-1) : (i+1)*(T-1)]
    (incomplete tail dropped), or, for a pre-cut corpus, stored row i as it is."""

    def __init__(self, corpus: Corpus, context: int):
        self.corpus, self.context = corpus, context
        m = corpus.meta
        if m.sequence_length is not None and m.sequence_length != context:
            raise SelfReplayError(f"corpus {corpus.path} holds sequences of length {m.sequence_length} but the "
                                  f"context is {context}")
        self.precut = m.sequence_length is not None
        self.stride = context if self.precut else context - 1
        self.count = m.num_tokens // self.stride
        self._offsets = np.arange(self.stride, dtype=np.int64)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Sequences ``idx`` as an int64 array [len(idx), context]."""
        body = self.corpus.tokens[idx.astype(np.int64)[:, None] * self.stride + self._offsets]
        if self.precut:
            return body.astype(np.int64)
        out = np.empty((len(idx), self.context), dtype=np.int64)
        out[:, 0] = self.corpus.meta.domain_token
        out[:, 1:] = body
        return out


def split_sequences(num_sequences: int, num_valid: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) sequence indices, each sorted: ``num_valid`` picked at random by ``seed``."""
    perm = np.random.default_rng([seed, _SPLIT]).permutation(num_sequences)
    return np.sort(perm[num_valid:]), np.sort(perm[:num_valid])


class ShuffledWalk:
    """Endless walk over ``indices``, reshuffled every epoch from (seed, tag, epoch) (in order without ``shuffle``).

    Batches run on across epoch boundaries; the position is all a resumed run needs.
    """

    def __init__(self, indices: np.ndarray, seed: int, tag: int, shuffle: bool = True):
        if len(indices) == 0:
            raise SelfReplayError("nothing to walk over: no rows")
        self.indices, self.seed, self.tag, self.shuffle = np.asarray(indices), seed, tag, shuffle
        self.epoch, self.position = 0, 0
        self._order: Optional[np.ndarray] = None
        self._order_epoch = -1

    def order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.tag, self.epoch])
                self._order = self.indices[rng.permutation(len(self.indices))]
            else:
                self._order = self.indices
            self._order_epoch = self.epoch
        return self._order  # type: ignore[return-value]

    def take(self, k: int) -> np.ndarray:
        parts = []
        while k > 0:
            part = self.order()[self.position:self.position + k]
            parts.append(part)
            self.position += len(part)
            k -= len(part)
            if self.position == len(self.indices):
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / len(self.indices)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_sequences": len(self.indices)}

    def load_state_dict(self, state: dict, what: str) -> None:
        if state.get("num_sequences") != len(self.indices) or not 0 <= state.get("position", -1) < len(self.indices):
            raise SelfReplayError(f"loader state does not match {what} ({state.get('num_sequences')} training "
                                  f"sequences saved, {len(self.indices)} now)")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class CorpusLoader:
    """Training batches [batch_size, context] from a corpus's train split, plus its validation split.

    Sequences are split train/valid once by ``split_seed`` (default ``seed``): ceil(valid_tokens / (context-1))
    random sequences are held out. Training sequences are visited in an order reshuffled every epoch from
    (seed, epoch), batches running on across epoch boundaries. With ``mix``, the last floor(mix_fraction *
    batch_size) rows of each batch come from the mix corpus's own train split (split by ``mix_split`` =
    (valid_tokens, seed), default the main corpus's; its own domain token and shuffled walk).
    ``max_train_tokens`` keeps only the first such many tokens' worth of training sequences (in stream order).
    """

    def __init__(self, corpus: Corpus, context: int, batch_size: int, valid_tokens: int = 0, seed: int = 0,
                 mix: Optional[Corpus] = None, mix_fraction: float = 0.0, max_train_tokens: Optional[int] = None,
                 split_seed: Optional[int] = None, mix_split: Optional[tuple[int, int]] = None):
        if context < 2:
            raise SelfReplayError(f"context={context}: must be at least 2 (domain token + one text token)")
        if batch_size < 1:
            raise SelfReplayError(f"batch_size={batch_size}: must be positive")
        if valid_tokens < 0:
            raise SelfReplayError(f"valid_tokens={valid_tokens}: must be >= 0")
        if seed < 0 or (split_seed is not None and split_seed < 0):
            raise SelfReplayError(f"seed={seed}: must be >= 0")
        if not 0.0 <= mix_fraction < 1.0:
            raise SelfReplayError(f"mix_fraction={mix_fraction}: expected a fraction in [0, 1)")
        if mix_fraction > 0 and mix is None:
            raise SelfReplayError("mix_fraction > 0 needs a mix corpus")
        self.corpus, self.context, self.batch_size = corpus, context, batch_size
        self.valid_tokens, self.seed = valid_tokens, seed
        self.split_seed = seed if split_seed is None else split_seed
        self.mix, self.mix_fraction = (mix, mix_fraction) if mix_fraction > 0 else (None, 0.0)
        self.mix_rows = math.floor(self.mix_fraction * batch_size + 1e-9)  # floor, as the paper's int(f · B)
        self.main_rows = batch_size - self.mix_rows
        if self.mix is not None and self.mix_rows == 0:
            raise SelfReplayError(f"data.mix_fraction={mix_fraction} of data.batch_size={batch_size} is less than "
                                  f"one row")
        if self.main_rows == 0:
            raise SelfReplayError(f"mix_fraction={mix_fraction} of batch_size={batch_size} leaves no rows of "
                                  f"corpus {corpus.path}")

        self.seq_len = context
        self._seqs = _Sequences(corpus, context)
        train, self.valid_indices = self._split(self._seqs, self.main_rows, max_train_tokens,
                                                (self.valid_tokens, self.split_seed))
        self._train = ShuffledWalk(train, seed, _ORDER)
        self._mix_seqs = self._mix_train = None
        if self.mix is not None:
            if self.mix.meta.tokenizer_fingerprint != corpus.meta.tokenizer_fingerprint:
                raise SelfReplayError(f"mix corpus {self.mix.path} was tokenized with a different tokenizer "
                                      f"({self.mix.meta.tokenizer_fingerprint}) than {corpus.path} "
                                      f"({corpus.meta.tokenizer_fingerprint})")
            self._mix_seqs = _Sequences(self.mix, context)
            mix_train, _ = self._split(self._mix_seqs, self.mix_rows, None,
                                       mix_split or (self.valid_tokens, self.split_seed))
            self._mix_train = ShuffledWalk(mix_train, seed, _MIX_ORDER)

    def _split(self, seqs: _Sequences, rows: int, max_train_tokens: Optional[int],
               split: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Train/valid indices of one corpus; errors when it cannot fill one batch's ``rows``."""
        c = seqs.corpus
        n, per_seq = c.meta.num_tokens, self.context - 1
        if seqs.count == 0:
            raise SelfReplayError(f"corpus {c.path} has {n} tokens: too short for one sequence of context "
                                  f"{self.context}")
        valid_tokens, split_seed = split
        num_valid = math.ceil(valid_tokens / per_seq)
        train, valid = split_sequences(seqs.count, min(num_valid, seqs.count), split_seed)
        if max_train_tokens is not None:
            if max_train_tokens < 1:
                raise SelfReplayError(f"max_train_tokens={max_train_tokens}: must be positive")
            train = train[:max_train_tokens // per_seq]
        if len(train) < rows:
            limit = f", max_train_tokens {max_train_tokens}" if max_train_tokens is not None else ""
            raise SelfReplayError(f"corpus {c.path} has {n} tokens: too short for {valid_tokens} validation "
                                  f"tokens{limit} plus one batch of {rows} sequences of context {self.context}")
        if len(valid) > len(train):
            log.warning("corpus %s: the validation split (%d sequences) is larger than the training split (%d); "
                        "lower valid_tokens", c.path, len(valid), len(train))
        return train, valid

    # --- sizes
    @property
    def num_train_rows(self) -> int:
        return len(self._train.indices)

    @property
    def num_valid_sequences(self) -> int:
        return len(self.valid_indices)

    @property
    def epochs_done(self) -> float:
        """Passes made over the main corpus's train split (fractional)."""
        return self._train.epochs_done

    @property
    def mix_epochs_done(self) -> float:
        return self._mix_train.epochs_done if self._mix_train is not None else 0.0

    # --- batches
    def next_batch(self) -> Batch:
        """The next training batch, int64 [batch_size, context]; mix rows (if any) come last."""
        rows = self._seqs.rows(self._train.take(self.main_rows))
        if self._mix_train is not None:
            rows = np.concatenate([rows, self._mix_seqs.rows(self._mix_train.take(self.mix_rows))])
        return Batch(torch.from_numpy(rows))

    def valid_batches(self, batch_size: Optional[int] = None,
                      max_tokens: Optional[int] = None) -> Iterator[Batch]:
        """The validation sequences in a fixed order (stream order), the last batch possibly smaller.

        ``max_tokens`` caps them at the first ceil(max_tokens / (context-1)) sequences.
        """
        batch_size = batch_size or self.batch_size
        idx = self.valid_indices
        if max_tokens is not None:
            idx = idx[:math.ceil(max_tokens / (self.context - 1))]
        for start in range(0, len(idx), batch_size):
            yield Batch(torch.from_numpy(self._seqs.rows(idx[start:start + batch_size])))

    # --- resuming
    def state_dict(self) -> dict:
        """JSON-able position of both walks; :meth:`load_state_dict` continues with exactly the next batches."""
        return {"seed": self.seed, "train": self._train.state_dict(),
                "mix": self._mix_train.state_dict() if self._mix_train is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.seed:
            raise SelfReplayError(f"loader state was saved with seed {state.get('seed')}, not {self.seed}")
        if (state.get("mix") is None) != (self._mix_train is None):
            raise SelfReplayError("loader state does not match: mixing was " +
                                  ("off" if state.get("mix") is None else "on") + " when it was saved")
        self._train.load_state_dict(state["train"], f"corpus {self.corpus.path}")
        if self._mix_train is not None:
            self._mix_train.load_state_dict(state["mix"], f"mix corpus {self.mix.path}")  # type: ignore[union-attr]
