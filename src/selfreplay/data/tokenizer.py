"""Byte-level BPE tokenizer with reserved domain tokens, and the text readers that feed it.

Ids 0..9 are the domain tokens ``<|domain_i|>`` (the paper's dataset-id token written at position 0 of every
sequence), id 10 is the end-of-document token ``</s>``, and merges fill the rest of the vocabulary.
Text comes from .txt (one document per line), .jsonl or .parquet files, each optionally .gz / .xz compressed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import warnings
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from selfreplay.errors import SelfReplayError

N_RESERVED = 10
# 4x the largest vocabularies in use (~256k); far above it the BPE trainer's tables outgrow memory and abort in Rust
MAX_VOCAB = 2 ** 20
EOS_TOKEN = "</s>"
EOS_ID = N_RESERVED
TEXT_FORMATS = (".txt", ".jsonl", ".parquet")
COMPRESSIONS = (".gz", ".xz")

PathLike = Union[str, os.PathLike]


def domain_token_name(i: int) -> str:
    """The special token string of domain ``i`` (0..9); its id is ``i``."""
    if not 0 <= i < N_RESERVED:
        raise SelfReplayError(f"domain token {i}: expected an id in 0..{N_RESERVED - 1}")
    return f"<|domain_{i}|>"


def special_tokens() -> list[str]:
    """The 10 domain tokens then EOS, in id order 0..10."""
    return [domain_token_name(i) for i in range(N_RESERVED)] + [EOS_TOKEN]


# --------------------------------------------------------------------------------------------------- reading text

def _split_suffix(path: Path) -> tuple[str, Optional[str]]:
    """(format, compression) from the file name, e.g. 'en.txt.xz' -> ('.txt', '.xz')."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    fmt = suffixes[-1] if suffixes else ""
    if fmt not in TEXT_FORMATS:
        kinds = ", ".join(TEXT_FORMATS)
        raise SelfReplayError(f"{path}: unknown file type {''.join(path.suffixes) or '(no extension)'!r}; "
                              f"expected {kinds}, optionally with .gz or .xz")
    return fmt, compression


def _open_binary(path: Path, compression: Optional[str]):
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".xz":
        return lzma.open(path, "rb")
    return open(path, "rb")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _guarded(path: Path, compression: Optional[str], docs: Iterator[str]) -> Iterator[str]:
    """Re-raise decompression and decoding failures as one-line errors naming the file; reject empty files."""
    n = 0
    try:
        for doc in docs:
            n += 1
            yield doc
    except (lzma.LZMAError, gzip.BadGzipFile, zlib.error, EOFError) as e:
        kind = {".gz": "gzip", ".xz": "xz"}.get(compression or "", "compressed")
        raise SelfReplayError(f"{path}: corrupt or truncated {kind} data ({_first_line(e)})") from None
    except UnicodeDecodeError as e:
        raise SelfReplayError(f"{path}: not UTF-8 text (bad byte at offset {e.start} of a line)") from None
    if n == 0:
        raise SelfReplayError(f"{path}: no text found (empty file)")


def _read_txt(f) -> Iterator[str]:
    for raw in f:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.strip():
            yield line


def _read_jsonl(f, path: Path, text_field: str) -> Iterator[str]:
    for lineno, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise SelfReplayError(f"{path}: invalid JSON on line {lineno} ({e.msg})") from None
        if not isinstance(row, dict) or text_field not in row:
            raise SelfReplayError(f"{path}: line {lineno} has no field {text_field!r}")
        text = row[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise SelfReplayError(f"{path}: line {lineno}: field {text_field!r} is {type(text).__name__}, not text")
        if text.strip():
            yield text


def _read_parquet(f, path: Path, text_field: str, compressed: bool) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SelfReplayError(f"{path}: reading .parquet needs pyarrow (pip install 'selfreplay[parquet]')") from None
    source = pa.BufferReader(f.read()) if compressed else f  # parquet needs random access: decompress whole
    try:
        pf = pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as e:
        raise SelfReplayError(f"{path}: not a valid parquet file ({_first_line(e)})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise SelfReplayError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})")
    try:
        for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise SelfReplayError(f"{path}: column {text_field!r} holds {type(text).__name__}, not text")
                if text.strip():
                    yield text
    except pa.ArrowException as e:
        raise SelfReplayError(f"{path}: corrupt parquet data ({_first_line(e)})") from None


def _documents(path: Path, text_field: str) -> Iterator[str]:
    fmt, compression = _split_suffix(path)

    def read() -> Iterator[str]:
        with _open_binary(path, compression) as f:
            if fmt == ".txt":
                yield from _read_txt(f)
            elif fmt == ".jsonl":
                yield from _read_jsonl(f, path, text_field)
            else:
                yield from _read_parquet(f, path, text_field, compressed=compression is not None)

    return _guarded(path, compression, read())


def shuffled(docs: list[str], seed: int) -> list[str]:
    """``docs`` in the order of ``numpy.random.default_rng(seed).permutation``: the paper's paragraph shuffle."""
    order = np.random.default_rng(seed).permutation(len(docs))
    return [docs[i] for i in order]


def iter_text(path: PathLike, text_field: str = "text", max_lines: Optional[int] = None,
              shuffle_seed: Optional[int] = None) -> Iterator[str]:
    """The documents of one text file: lines of .txt (empty ones skipped), ``text_field`` of .jsonl / .parquet.

    With ``shuffle_seed`` the whole file is read and shuffled before the first ``max_lines`` are taken, so a
    sample spans the file rather than its beginning. Bad input raises :class:`SelfReplayError` here (missing
    file, unknown type) or while iterating (corrupt data, bad JSON, missing field, no text at all).
    """
    p = Path(path)
    if not p.exists():
        raise SelfReplayError(f"{p}: file not found")
    if not p.is_file():
        raise SelfReplayError(f"{p}: not a file")
    _split_suffix(p)
    if max_lines is not None and max_lines < 1:
        raise SelfReplayError(f"max_lines={max_lines}: must be positive")
    docs = _documents(p, text_field)
    if shuffle_seed is not None:
        return iter(shuffled(list(docs), shuffle_seed)[:max_lines])
    if max_lines is None:
        return docs
    return _take(docs, max_lines)


def _take(docs: Iterator[str], n: int) -> Iterator[str]:
    for i, doc in enumerate(docs):
        if i >= n:
            break
        yield doc


# ------------------------------------------------------------------------------------------------------ tokenizer

def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer (ByteLevel pre-tokenizer and decoder, no normalizer)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(files: Iterable[PathLike], out_path: PathLike, vocab_size: int = 4096,
                    max_lines_per_file: Optional[int] = None, shuffle_seed: Optional[int] = 0,
                    text_field: str = "text", progress: bool = False,
                    echo: Optional[Callable[[str], None]] = None) -> Tokenizer:
    """Train the byte-level BPE on ``files`` and save it (atomically) as JSON at ``out_path``.

    Paper recipe: vocab 4096, 60,000 paragraphs per language file shuffled with seed 0. The vocabulary is
    the 10 domain tokens and EOS (ids 0..10), the 256 byte symbols, then merges up to ``vocab_size``.
    ``progress``: the tokenizers library's bar (a terminal's); ``echo``: plain lines instead (a log file's).
    """
    files = [Path(f) for f in files]
    if not files:
        raise SelfReplayError("train_tokenizer: no input files")
    min_vocab = N_RESERVED + 1 + 256 + 1
    if vocab_size < min_vocab:
        raise SelfReplayError(f"vocab_size={vocab_size}: must be at least {min_vocab} "
                              f"({N_RESERVED} domain tokens + EOS + 256 bytes + at least one merge)")
    if vocab_size > MAX_VOCAB:
        raise SelfReplayError(f"vocab_size={vocab_size}: at most {MAX_VOCAB:,} (2^20; the largest vocabularies in "
                              f"use are ~256k)")
    readers = [iter_text(f, text_field, max_lines_per_file, shuffle_seed) for f in files]  # fail fast on bad paths

    def texts() -> Iterator[str]:
        lines = 0
        for f, r in zip(files, readers):
            if echo is not None:
                echo(f"tokenizer: reading {f}")
            for line in r:
                lines += 1
                yield line
        if echo is not None:
            echo(f"tokenizer: {lines:,} lines read; computing the merges up to {vocab_size} tokens")

    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(texts(), trainer=trainer)
    check_tokenizer(tok, str(out_path))
    if tok.get_vocab_size() < vocab_size:
        warnings.warn(f"tokenizer has only {tok.get_vocab_size()} tokens (asked for {vocab_size}): "
                      "the training text is too small; set the model's vocab_size to match")
    save_tokenizer(tok, out_path)
    return tok


def save_tokenizer(tok: Tokenizer, path: PathLike) -> None:
    """Write the tokenizer JSON atomically (a temp file in the same directory, then a rename)."""
    from selfreplay.train.files import atomic_write

    atomic_write(path, tok.to_str(pretty=True))


def check_tokenizer(tok: Tokenizer, where: str) -> None:
    """Require the reserved layout: ``<|domain_i|>`` at id i for i < 10, ``</s>`` at id 10."""
    for i, name in enumerate(special_tokens()):
        if tok.token_to_id(name) != i:
            raise SelfReplayError(f"{where}: not a selfreplay tokenizer (expected {name!r} at id {i}; "
                                  "train one with `selfreplay tokenizer`)")


def load_tokenizer(path: PathLike) -> Tokenizer:
    """Load a tokenizer JSON written by :func:`train_tokenizer`, checking its reserved ids."""
    p = Path(path)
    if not p.is_file():
        raise SelfReplayError(f"{p}: tokenizer file not found")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise SelfReplayError(f"{p}: not a valid tokenizer file ({_first_line(e)})") from None
    check_tokenizer(tok, str(p))
    return tok


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """First 16 hex digits of the sha256 of the tokenizer's canonical JSON: identifies vocab and merges."""
    canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def eos_id(tok: Tokenizer) -> int:
    """Id of ``</s>`` (10 for every tokenizer this module trains)."""
    i = tok.token_to_id(EOS_TOKEN)
    if i is None:
        raise SelfReplayError(f"tokenizer has no {EOS_TOKEN!r} token")
    return i


def batch_encoder(tok: Tokenizer) -> Callable[[list[str]], list]:
    """``encode_batch_fast`` (no offsets, quicker) when this tokenizers version has it, else ``encode_batch``."""
    fast = getattr(tok, "encode_batch_fast", None)
    if fast is not None:
        return lambda texts: fast(texts, add_special_tokens=False)
    return lambda texts: tok.encode_batch(texts, add_special_tokens=False)
