"""Tokenized corpora on disk and the batch loader that cuts them into training sequences.

A corpus is a directory holding ``tokens.bin`` (flat little-endian uint16, or uint32 for vocabularies over
65535) and ``meta.json`` (:class:`CorpusMeta`). The stream is documents, each followed by EOS; the corpus's
domain token is not in the stream: the loader writes it at position 0 of every sequence (the paper's
dataset-id token), so the same tokens can be cut at any context length. A corpus with ``sequence_length`` set
instead holds finished rows (e.g. self-generated replay samples, domain token included) used as they are.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from selfreplay.errors import SelfReplayError
from selfreplay.tokenizer import (N_RESERVED, PathLike, batch_encoder, domain_token_name, eos_id, iter_text,
                                  load_tokenizer, shuffled, tokenizer_fingerprint)

TOKENS_FILE = "tokens.bin"
META_FILE = "meta.json"
FORMAT_VERSION = 1
ENCODE_CHUNK_DOCS = 1024  # documents per encode_batch call


def token_dtype(vocab_size: int) -> str:
    """'uint16' when every id fits (vocab <= 65535), else 'uint32'."""
    return "uint16" if vocab_size <= 65535 else "uint32"


@dataclass
class CorpusMeta:
    """What ``meta.json`` records about a tokenized corpus."""

    num_tokens: int
    dtype: str  # uint16 | uint32, little-endian
    vocab_size: int
    tokenizer_fingerprint: str
    domain_token: int  # written at position 0 of every sequence cut from this corpus
    eos_token: Optional[int]
    source: list[str] = field(default_factory=list)  # input files it was made from
    name: str = ""
    sequence_length: Optional[int] = None  # set: the stream is pre-cut rows of this length, used as they are
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "CorpusMeta":
        """Parse and check a meta.json dict; ``where`` names the file in error messages."""
        if not isinstance(d, dict):
            raise SelfReplayError(f"{where}: corrupt metadata (expected a JSON object)")
        names = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise SelfReplayError(f"{where}: corrupt metadata (missing {', '.join(missing)})")
        meta = cls(**{k: v for k, v in d.items() if k in names})
        ints = ["num_tokens", "vocab_size", "domain_token", "format_version"]
        bad = [k for k in ints if not isinstance(getattr(meta, k), int) or isinstance(getattr(meta, k), bool)]
        bad += [k for k in ("eos_token", "sequence_length") if getattr(meta, k) is not None
                and not isinstance(getattr(meta, k), int)]
        if bad:
            raise SelfReplayError(f"{where}: corrupt metadata (bad value for {', '.join(bad)})")
        if meta.format_version > FORMAT_VERSION:
            raise SelfReplayError(f"{where}: format_version {meta.format_version} is newer than this selfreplay "
                                  f"supports ({FORMAT_VERSION}); upgrade selfreplay")
        if meta.dtype not in ("uint16", "uint32"):
            raise SelfReplayError(f"{where}: corrupt metadata (dtype {meta.dtype!r}, expected uint16 or uint32)")
        if meta.vocab_size < 1 or meta.num_tokens < 0:
            raise SelfReplayError(f"{where}: corrupt metadata (vocab_size {meta.vocab_size}, "
                                  f"num_tokens {meta.num_tokens})")
        if not 0 <= meta.domain_token < min(N_RESERVED, meta.vocab_size):
            raise SelfReplayError(f"{where}: corrupt metadata (domain_token {meta.domain_token} not in "
                                  f"0..{N_RESERVED - 1})")
        if meta.sequence_length is not None and (meta.sequence_length < 2 or meta.num_tokens % meta.sequence_length):
            raise SelfReplayError(f"{where}: corrupt metadata (num_tokens {meta.num_tokens} is not a multiple of "
                                  f"sequence_length {meta.sequence_length})")
        return meta


# ------------------------------------------------------------------------------------------------------- writing

def _is_replaceable(path: Path) -> bool:
    """An existing path we may overwrite: an empty directory or an earlier corpus."""
    return path.is_dir() and {p.name for p in path.iterdir()} <= {TOKENS_FILE, META_FILE}


@contextmanager
def _atomic_dir(out_dir: PathLike) -> Iterator[Path]:
    """Yield a fresh ``<out_dir>.tmp-<random>`` to fill; on success it replaces ``out_dir``, on failure it goes.

    Readers never see a half-written corpus: the directory appears (or is swapped) by rename only.
    """
    out = Path(out_dir)
    if out.exists() and not _is_replaceable(out):
        raise SelfReplayError(f"{out}: exists and is not a tokenized corpus; refusing to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f"{out.name}.old-{secrets.token_hex(4)}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_meta(dir_: Path, meta: CorpusMeta) -> None:
    (dir_ / META_FILE).write_text(json.dumps(dataclasses.asdict(meta), indent=2) + "\n", encoding="utf-8")


def write_corpus(tokens: np.ndarray, out_dir: PathLike, meta: CorpusMeta) -> CorpusMeta:
    """Write ``tokens`` and ``meta`` as a corpus directory, atomically; returns the meta as written.

    ``num_tokens`` and ``dtype`` are computed here (whatever ``meta`` says). A 2-D ``tokens`` [N, L] is a set of
    pre-cut rows and sets ``sequence_length = L``.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim == 2:
        if meta.sequence_length not in (None, tokens.shape[1]):
            raise SelfReplayError(f"write_corpus: rows of length {tokens.shape[1]} but sequence_length is "
                                  f"{meta.sequence_length}")
        meta = dataclasses.replace(meta, sequence_length=int(tokens.shape[1]))
        tokens = tokens.reshape(-1)
    if tokens.ndim != 1 or not (np.issubdtype(tokens.dtype, np.integer) or tokens.size == 0):
        raise SelfReplayError(f"write_corpus: expected a 1-D or 2-D integer array, got {tokens.dtype} "
                              f"with shape {tokens.shape}")
    if tokens.size == 0:
        raise SelfReplayError(f"write_corpus {out_dir}: no tokens (empty corpus)")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= meta.vocab_size:
        raise SelfReplayError(f"write_corpus {out_dir}: token ids span {lo}..{hi}, outside the vocabulary "
                              f"0..{meta.vocab_size - 1}")
    domain_token_name(meta.domain_token)  # checks 0..9
    if meta.sequence_length is not None and tokens.size % meta.sequence_length:
        raise SelfReplayError(f"write_corpus {out_dir}: {tokens.size} tokens is not a whole number of "
                              f"rows of {meta.sequence_length}")
    dtype = token_dtype(meta.vocab_size)
    meta = dataclasses.replace(meta, num_tokens=int(tokens.size), dtype=dtype, format_version=FORMAT_VERSION,
                               source=[str(s) for s in meta.source], name=meta.name or Path(out_dir).name)
    with _atomic_dir(out_dir) as tmp:
        tokens.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tofile(tmp / TOKENS_FILE)
        _write_meta(tmp, meta)
    return meta


def _documents(inputs: list[str], text_field: str, shuffle_seed: Optional[int]) -> Iterator[str]:
    """All documents of ``inputs`` in order, or, with a seed, all of them shuffled together (as ``iter_text``
    shuffles one file, so one file gives the same order as the tokenizer's training sample)."""
    readers = [iter_text(p, text_field) for p in inputs]  # raises now on missing files / unknown types
    if shuffle_seed is None:
        return chain.from_iterable(readers)
    return iter(shuffled([doc for r in readers for doc in r], shuffle_seed))


def _batched(docs: Iterator[str], n: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenize_corpus(inputs: list[str], tokenizer_path: PathLike, out_dir: PathLike, domain_token: int,
                    max_tokens: Optional[int] = None, shuffle_seed: Optional[int] = None, text_field: str = "text",
                    name: Optional[str] = None, progress: bool = True) -> CorpusMeta:
    """Encode documents from ``inputs``, each followed by EOS, into a corpus directory (at most ``max_tokens``).

    Paper recipe: one language file, ``shuffle_seed=0`` (the tokenizer's paragraph order), 9M tokens, domain
    token 0 for English and 1 for Spanish. Tokens stream to disk chunk by chunk; reading stops at max_tokens
    unless a shuffle needs the whole input.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [str(p) for p in inputs]
    if not inputs:
        raise SelfReplayError("tokenize: no input files")
    domain_token_name(domain_token)
    if max_tokens is not None and max_tokens < 1:
        raise SelfReplayError(f"max_tokens={max_tokens}: must be positive")
    tok = load_tokenizer(tokenizer_path)
    eos, vocab = eos_id(tok), tok.get_vocab_size()
    dtype = np.dtype(token_dtype(vocab)).newbyteorder("<")
    encode = batch_encoder(tok)
    docs = _documents(inputs, text_field, shuffle_seed)
    name = name or Path(out_dir).name
    n = 0
    with _atomic_dir(out_dir) as tmp:
        with open(tmp / TOKENS_FILE, "wb") as f, \
                tqdm(total=max_tokens, unit="tok", unit_scale=True, desc=f"tokenize {name}",
                     disable=not progress) as bar:
            for chunk in _batched(docs, ENCODE_CHUNK_DOCS):
                encodings = encode(chunk)
                count = sum(len(e.ids) for e in encodings) + len(encodings)
                ids = np.fromiter(chain.from_iterable(chain(e.ids, (eos,)) for e in encodings), dtype, count)
                if max_tokens is not None:
                    ids = ids[:max_tokens - n]
                ids.tofile(f)
                n += len(ids)
                bar.update(len(ids))
                if max_tokens is not None and n >= max_tokens:
                    break
        if n == 0:
            raise SelfReplayError(f"tokenize {', '.join(inputs)}: no text to tokenize (empty corpus)")
        meta = CorpusMeta(num_tokens=n, dtype=dtype.name, vocab_size=vocab,
                          tokenizer_fingerprint=tokenizer_fingerprint(tok), domain_token=domain_token,
                          eos_token=eos, source=inputs, name=name)
        _write_meta(tmp, meta)
    return meta


# ------------------------------------------------------------------------------------------------------- reading

class Corpus:
    """An opened, validated corpus directory; ``tokens`` is a read-only memmap of the flat token stream."""

    def __init__(self, path: Path, meta: CorpusMeta, tokens: np.memmap):
        self.path, self.meta, self.tokens = path, meta, tokens

    @classmethod
    def open(cls, path: PathLike, vocab_size: Optional[int] = None,
             tokenizer_fingerprint: Optional[str] = None) -> "Corpus":
        """Open ``path``, checking files, sizes and id range, and (if given) the model's vocab and tokenizer."""
        p = Path(path)
        if not p.exists():
            raise SelfReplayError(f"corpus {p}: not found (expected a directory written by `selfreplay tokenize`)")
        if not p.is_dir():
            raise SelfReplayError(f"corpus {p}: not a directory (expected one written by `selfreplay tokenize`)")
        meta_path, tokens_path = p / META_FILE, p / TOKENS_FILE
        for f in (meta_path, tokens_path):
            if not f.is_file():
                raise SelfReplayError(f"corpus {p}: missing {f.name}; not a tokenized corpus")
        try:
            raw = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SelfReplayError(f"corpus {p}: corrupt {META_FILE} ({str(e).splitlines()[0]})") from None
        meta = CorpusMeta.from_dict(raw, f"corpus {p}/{META_FILE}")
        if meta.num_tokens == 0:
            raise SelfReplayError(f"corpus {p}: no tokens (empty corpus)")
        dtype = np.dtype(meta.dtype).newbyteorder("<")
        size, expected = tokens_path.stat().st_size, meta.num_tokens * dtype.itemsize
        if size != expected:
            raise SelfReplayError(f"corpus {p}: corrupt {TOKENS_FILE} ({size} bytes, expected {expected} for "
                                  f"{meta.num_tokens} {meta.dtype} tokens)")
        if vocab_size is not None and meta.vocab_size != vocab_size:
            raise SelfReplayError(f"corpus {p} was tokenized with vocab {meta.vocab_size} but the model has "
                                  f"{vocab_size}")
        if tokenizer_fingerprint is not None and meta.tokenizer_fingerprint != tokenizer_fingerprint:
            raise SelfReplayError(f"corpus {p} was tokenized with tokenizer {meta.tokenizer_fingerprint}, not the "
                                  f"model's {tokenizer_fingerprint}")
        tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(meta.num_tokens,))
        top = int(tokens.max())
        if top >= meta.vocab_size:
            raise SelfReplayError(f"corpus {p}: corrupt {TOKENS_FILE} (token id {top} >= vocab {meta.vocab_size})")
        return cls(p, meta, tokens)

    def __len__(self) -> int:
        return self.meta.num_tokens

    def __repr__(self) -> str:
        return f"Corpus({str(self.path)!r}, {self.meta.num_tokens} tokens, domain {self.meta.domain_token})"


# -------------------------------------------------------------------------------------------------------- loading

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


class _Shuffled:
    """Endless walk over ``indices``, reshuffled every epoch from (seed, tag, epoch)."""

    def __init__(self, indices: np.ndarray, seed: int, tag: int):
        self.indices, self.seed, self.tag = indices, seed, tag
        self.epoch, self.position = 0, 0
        self._order: Optional[np.ndarray] = None
        self._order_epoch = -1

    def order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.tag, self.epoch])
            self._order, self._order_epoch = self.indices[rng.permutation(len(self.indices))], self.epoch
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


class BatchLoader:
    """Training batches [batch_size, context] from a corpus's train split, plus its validation split.

    Sequences are split train/valid once by ``split_seed`` (default ``seed``): ceil(valid_tokens / (context-1))
    random sequences are held out. Training sequences are visited in an order reshuffled every epoch from
    (seed, epoch), batches running on across epoch boundaries. With ``mix``, the last round(mix_fraction *
    batch_size) rows of each batch come from the mix corpus's own train split (same split rule, its own domain
    token, its own shuffled walk). ``max_train_tokens`` keeps only the first such many tokens' worth of training
    sequences (in stream order).
    """

    def __init__(self, corpus: Corpus, context: int, batch_size: int, valid_tokens: int = 0, seed: int = 0,
                 mix: Optional[Corpus] = None, mix_fraction: float = 0.0, max_train_tokens: Optional[int] = None,
                 split_seed: Optional[int] = None):
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
        self.mix_rows = round(self.mix_fraction * batch_size)
        self.main_rows = batch_size - self.mix_rows
        if self.mix is not None and self.mix_rows == 0:
            raise SelfReplayError(f"mix_fraction={mix_fraction} of batch_size={batch_size} rounds to 0 rows")
        if self.main_rows == 0:
            raise SelfReplayError(f"mix_fraction={mix_fraction} of batch_size={batch_size} leaves no rows of "
                                  f"corpus {corpus.path}")

        self._seqs = _Sequences(corpus, context)
        train, self.valid_indices = self._split(self._seqs, self.main_rows, max_train_tokens)
        self._train = _Shuffled(train, seed, _ORDER)
        self._mix_seqs = self._mix_train = None
        if self.mix is not None:
            if self.mix.meta.tokenizer_fingerprint != corpus.meta.tokenizer_fingerprint:
                raise SelfReplayError(f"mix corpus {self.mix.path} was tokenized with a different tokenizer "
                                      f"({self.mix.meta.tokenizer_fingerprint}) than {corpus.path} "
                                      f"({corpus.meta.tokenizer_fingerprint})")
            self._mix_seqs = _Sequences(self.mix, context)
            mix_train, _ = self._split(self._mix_seqs, self.mix_rows, None)
            self._mix_train = _Shuffled(mix_train, seed, _MIX_ORDER)

    def _split(self, seqs: _Sequences, rows: int, max_train_tokens: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
        """Train/valid indices of one corpus; errors when it cannot fill one batch's ``rows``."""
        c = seqs.corpus
        n, per_seq = c.meta.num_tokens, self.context - 1
        if seqs.count == 0:
            raise SelfReplayError(f"corpus {c.path} has {n} tokens: too short for one sequence of context "
                                  f"{self.context}")
        num_valid = math.ceil(self.valid_tokens / per_seq)
        train, valid = split_sequences(seqs.count, min(num_valid, seqs.count), self.split_seed)
        if max_train_tokens is not None:
            if max_train_tokens < 1:
                raise SelfReplayError(f"max_train_tokens={max_train_tokens}: must be positive")
            train = train[:max_train_tokens // per_seq]
        if len(train) < rows:
            limit = f", max_train_tokens {max_train_tokens}" if max_train_tokens is not None else ""
            raise SelfReplayError(f"corpus {c.path} has {n} tokens: too short for {self.valid_tokens} validation "
                                  f"tokens{limit} plus one batch of {rows} sequences of context {self.context}")
        return train, valid

    # --- sizes
    @property
    def num_train_sequences(self) -> int:
        return len(self._train.indices)

    @property
    def num_valid_sequences(self) -> int:
        return len(self.valid_indices)

    @property
    def sequences_per_epoch(self) -> int:
        """Training sequences in one pass over the main corpus's train split."""
        return self.num_train_sequences

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens in one pass over the train split, counted as the model sees them (context per sequence)."""
        return self.num_train_sequences * self.context

    @property
    def epochs_done(self) -> float:
        """Passes made over the main corpus's train split (fractional)."""
        return self._train.epochs_done

    @property
    def mix_epochs_done(self) -> float:
        return self._mix_train.epochs_done if self._mix_train is not None else 0.0

    # --- batches
    def next_batch(self) -> torch.Tensor:
        """The next training batch, int64 [batch_size, context]; mix rows (if any) come last."""
        rows = self._seqs.rows(self._train.take(self.main_rows))
        if self._mix_train is not None:
            rows = np.concatenate([rows, self._mix_seqs.rows(self._mix_train.take(self.mix_rows))])
        return torch.from_numpy(rows)

    def valid_batches(self, batch_size: Optional[int] = None,
                      max_tokens: Optional[int] = None) -> Iterator[torch.Tensor]:
        """The validation sequences in a fixed order (stream order), the last batch possibly smaller.

        ``max_tokens`` caps them at the first ceil(max_tokens / (context-1)) sequences.
        """
        batch_size = batch_size or self.batch_size
        idx = self.valid_indices
        if max_tokens is not None:
            idx = idx[:math.ceil(max_tokens / (self.context - 1))]
        for start in range(0, len(idx), batch_size):
            yield torch.from_numpy(self._seqs.rows(idx[start:start + batch_size]))

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
