"""Tokenized corpora on disk: writing (``selfreplay tokenize``), opening and checking them.

A corpus is a directory holding ``tokens.bin`` (flat little-endian uint16, or uint32 for vocabularies over
65535) and ``meta.json`` (:class:`CorpusMeta`). The stream is documents, each followed by EOS; the corpus's
domain token is not in the stream: the loader writes it at position 0 of every sequence (the paper's
dataset-id token), so the same tokens can be cut at any context length. A corpus with ``sequence_length`` set
instead holds finished rows (e.g. self-generated replay samples, prompt included) used as they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from selfreplay.errors import SelfReplayError
from selfreplay.progress import progress
from selfreplay.train.files import write_array
from selfreplay.data.tokenizer import (N_RESERVED, PathLike, batch_encoder, domain_token_name, eos_id, iter_text,
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
    domain_token: Optional[int]  # written at position 0 of every sequence cut from this corpus (None: pre-cut rows)
    eos_token: Optional[int]
    source: list[str] = field(default_factory=list)  # input files it was made from
    name: str = ""
    sequence_length: Optional[int] = None  # set: the stream is pre-cut rows of this length, used as they are
    tokenizer: Optional[str] = None  # the tokenizer file it was made with (for decoding samples)
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
        ints = ["num_tokens", "vocab_size", "format_version"]
        bad = [k for k in ints if not isinstance(getattr(meta, k), int) or isinstance(getattr(meta, k), bool)]
        bad += [k for k in ("eos_token", "sequence_length", "domain_token") if getattr(meta, k) is not None
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
        if meta.domain_token is None and meta.sequence_length is None:
            raise SelfReplayError(f"{where}: corrupt metadata (no domain_token for a flat token stream)")
        if meta.domain_token is not None and not 0 <= meta.domain_token < min(N_RESERVED, meta.vocab_size):
            raise SelfReplayError(f"{where}: corrupt metadata (domain_token {meta.domain_token} not in "
                                  f"0..{N_RESERVED - 1})")
        if meta.sequence_length is not None and (meta.sequence_length < 2 or meta.num_tokens % meta.sequence_length):
            raise SelfReplayError(f"{where}: corrupt metadata (num_tokens {meta.num_tokens} is not a multiple of "
                                  f"sequence_length {meta.sequence_length})")
        return meta


# ------------------------------------------------------------------------------------------------------- writing

def _is_replaceable(path: Path) -> bool:
    """An existing path we may overwrite: an empty directory, or a corpus of ours (a readable meta.json and
    nothing but a corpus's files; a symbolic link never)."""
    if path.is_symlink() or not path.is_dir():
        return False
    names = {p.name for p in path.iterdir()}
    if not names:
        return True
    if not names <= {TOKENS_FILE, META_FILE, "recipe.json"}:
        return False
    try:
        CorpusMeta.from_dict(json.loads((path / META_FILE).read_text(encoding="utf-8")), str(path / META_FILE))
    except (OSError, ValueError, TypeError, SelfReplayError):
        return False
    return True


@contextmanager
def _atomic_corpus_dir(out_dir: PathLike) -> Iterator[Path]:
    """A temporary directory that replaces ``out_dir`` (only an earlier corpus) when complete."""
    from selfreplay.train.files import atomic_dir
    from selfreplay.train.ownership import refuse_special

    out = Path(out_dir)
    refuse_special(out, "corpus directory")
    if os.path.lexists(out) and not _is_replaceable(out):
        raise SelfReplayError(f"{out}: exists and is not a tokenized corpus; refusing to overwrite it")
    with atomic_dir(out) as tmp:
        yield tmp


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
    if meta.domain_token is not None:
        domain_token_name(meta.domain_token)  # checks 0..9
    if meta.sequence_length is not None and tokens.size % meta.sequence_length:
        raise SelfReplayError(f"write_corpus {out_dir}: {tokens.size} tokens is not a whole number of "
                              f"rows of {meta.sequence_length}")
    dtype = token_dtype(meta.vocab_size)
    meta = dataclasses.replace(meta, num_tokens=int(tokens.size), dtype=dtype, format_version=FORMAT_VERSION,
                               source=[str(s) for s in meta.source], name=meta.name or Path(out_dir).name)
    with _atomic_corpus_dir(out_dir) as tmp:
        write_array(tokens.astype(np.dtype(dtype).newbyteorder("<"), copy=False), tmp / TOKENS_FILE)
        _write_meta(tmp, meta)
    return meta


def _documents(inputs: list[str], text_field: str, shuffle_seed: Optional[int]) -> Iterator[str]:
    """All documents of ``inputs`` in order, or, with a seed, all of them shuffled together (as ``iter_text``
    shuffles one file, so one file gives the same order as the tokenizer's training sample)."""
    readers = [iter_text(p, text_field) for p in inputs]  # raises now on missing files / unknown types
    if shuffle_seed is None:
        return chain.from_iterable(readers)
    return iter(shuffled([doc for r in readers for doc in r], shuffle_seed))


def tokenize_corpus(inputs: list[str], tokenizer_path: PathLike, out_dir: PathLike, domain_token: int,
                    max_tokens: Optional[int] = None, shuffle_seed: Optional[int] = None, text_field: str = "text",
                    name: Optional[str] = None, show_progress: bool = True) -> CorpusMeta:
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
    with _atomic_corpus_dir(out_dir) as tmp:
        bar = progress(max_tokens, f"tokenize {name}", "tokens", enabled=show_progress)
        with open(tmp / TOKENS_FILE, "wb") as f:
            for chunk in iter(lambda: list(islice(docs, ENCODE_CHUNK_DOCS)), []):
                encodings = encode(chunk)
                count = sum(len(e.ids) for e in encodings) + len(encodings)
                ids = np.fromiter(chain.from_iterable(chain(e.ids, (eos,)) for e in encodings), dtype, count)
                if max_tokens is not None:
                    ids = ids[:max_tokens - n]
                write_array(ids, f)
                n += len(ids)
                bar.update(len(ids))
                if max_tokens is not None and n >= max_tokens:
                    break
        bar.close()
        if n == 0:
            raise SelfReplayError(f"tokenize {', '.join(inputs)}: no text to tokenize (empty corpus)")
        meta = CorpusMeta(num_tokens=n, dtype=dtype.name, vocab_size=vocab,
                          tokenizer_fingerprint=tokenizer_fingerprint(tok), domain_token=domain_token,
                          eos_token=eos, source=inputs, name=name, tokenizer=str(Path(tokenizer_path).resolve()))
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


def corpus_identity(meta: CorpusMeta) -> str:
    """What makes two corpus directories the same data (a moved or copied corpus keeps its identity)."""
    key = json.dumps([meta.num_tokens, meta.tokenizer_fingerprint, meta.domain_token, meta.name, meta.source,
                      meta.sequence_length], default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]
