"""Replay sources: where the previous-distribution sequences of the forgetting penalty come from.

A source hands the trainer one :class:`ReplayBatch` per optimizer step. Real data (:class:`CorpusReplay`),
samples drawn from the frozen teacher during training (:class:`SelfGeneratedReplay`) and a replay corpus sampled
beforehand (:class:`StoredReplay`) implement the same small interface, so the training loop does not care which
it gets.
"""

from __future__ import annotations

import abc

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Sequence

import numpy as np
import torch

from selfreplay.errors import SelfReplayError
from selfreplay.losses import TeacherTargets, TopKLogprobs
from selfreplay.sampling import Sampler, Samples, check_sampling_args, make_generator

log = logging.getLogger(__name__)


@dataclass
class ReplayBatch:
    """Replay sequences [B, T]; optional token mask and precomputed teacher log-probs (the KL targets)."""

    tokens: torch.Tensor
    loss_mask: Optional[torch.Tensor] = None
    teacher_logprobs: Optional[TeacherTargets] = None


class ReplaySource(Protocol):
    """Anything that yields replay batches and can save/restore its position for resumable training."""

    sample_seconds: float  # time spent producing replay (sampling), reported apart from the training step

    def next_batch(self) -> ReplayBatch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class CorpusReplay:
    """Real previous-distribution data: rows from the training split of a tokenized corpus."""

    def __init__(self, loader):
        """``loader`` is a :class:`selfreplay.data.BatchLoader` over the previous corpus."""
        self.loader = loader
        self.sample_seconds = 0.0

    def next_batch(self) -> ReplayBatch:
        return ReplayBatch(tokens=self.loader.next_batch())

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])


# ------------------------------------------------------------------------------------------ self-generated replay

def domain_prompts(domains: Sequence[int], start_row: int, num_rows: int, device=None) -> torch.Tensor:
    """One-token prompts [num_rows, 1] for rows ``start_row ..`` of a replay stream: domains round-robin.

    Global row g gets ``domains[g % len(domains)]``, so every batch splits its rows evenly between the domains
    (within one row) and the split carries on across batches, refills and generation chunks alike.
    """
    ids = torch.tensor([int(d) for d in domains], dtype=torch.long, device=device)
    rows = torch.arange(start_row, start_row + num_rows, device=device)
    return ids[rows % len(ids)][:, None]


def eos_loss_mask(tokens: torch.Tensor, eos_id: int, prompt_length: int = 1) -> torch.Tensor:
    """The sampler's stop-at-EOS mask, rebuilt from tokens: 1 up to and including the first sampled EOS."""
    sampled_eos = (tokens == eos_id) & (torch.arange(tokens.shape[1], device=tokens.device) >= prompt_length)
    before = torch.cumsum(sampled_eos.int(), dim=1) - sampled_eos.int()  # EOS strictly before each position
    return (before == 0).float()


def _check_domains(domains: Sequence[int], vocab_size: Optional[int]) -> list[int]:
    domains = [int(d) for d in domains]
    if not domains:
        raise SelfReplayError("replay domains: give at least one domain token id to prompt with")
    bad = [d for d in domains if d < 0 or (vocab_size is not None and d >= vocab_size)]
    if bad:
        raise SelfReplayError(f"replay domains: token id {bad[0]} is outside the vocabulary 0..{vocab_size}")
    return domains


def _model_config(model):
    return getattr(getattr(model, "_orig_mod", model), "config", None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StreamPosition(abc.ABC):
    """state_dict / load_state_dict for replay sampled refill by refill from (seed, refill index).

    The state is the position in the sample stream plus the settings that define it (``_identity()``); the
    current buffer is not stored but resampled identically on resume (``_drop_buffer()`` forgets it).
    """

    _batches: int
    sample_seconds: float

    @abc.abstractmethod
    def _identity(self) -> dict:
        """The settings that define the sample stream (a resumed run must match them)."""

    @abc.abstractmethod
    def _drop_buffer(self) -> None:
        """Forget the current buffer so that the next batch resamples it."""

    def state_dict(self) -> dict:
        """Position in the sample stream (small: the current buffer is resampled on resume, not stored)."""
        return {**self._identity(), "batches": self._batches, "sample_seconds": self.sample_seconds}

    def load_state_dict(self, state: dict) -> None:
        saved = {k: state.get(k) for k in self._identity()}
        if saved != self._identity():
            diff = ", ".join(f"{k} {saved[k]} (now {v})" for k, v in self._identity().items() if saved[k] != v)
            raise SelfReplayError(f"replay state was saved with different settings: {diff}")
        self._batches = int(state["batches"])
        self.sample_seconds = float(state.get("sample_seconds", 0.0))
        self._drop_buffer()


class SelfGeneratedReplay(StreamPosition):
    """Replay sampled from the frozen teacher itself (the paper's self-generated replay, §3.2).

    Every refill samples ``buffer × batch_size`` sequences at once, each prompted only with a domain token
    (several domains share the rows evenly), at ``temperature`` (1: the teacher's own distribution), EOS
    ignored unless ``eos_id`` is given; :meth:`next_batch` then hands them out ``batch_size`` at a time.

    Refill r is sampled with a generator seeded from (seed, r), and its rows are rows r·buffer·batch_size.. of
    one stream, so (a) resuming only needs the number of batches handed out (the current refill is sampled
    again, identically, on the same device and decode mode) and (b) ``selfreplay generate`` with
    ``batch_size = buffer × batch_size`` and the same seed writes exactly these rows.

    KL targets: the sampler returns the teacher's temperature-1 log-probs at every position, and each batch
    carries them (``teacher_logprobs``) so the trainer skips its teacher forward. Full-vocabulary log-probs take
    buffer·batch·T·V·4 bytes (16·64·256·4096·4 = 4 GiB with the paper's settings), more than recomputing costs
    for a small teacher; so they are kept only while that is at most ``max_logprobs_bytes`` (default 1 GiB,
    None = no limit), else batches carry none and the trainer runs the teacher (exact KL either way).
    ``logprobs_top_k`` keeps the k largest log-probs per position instead (buffer·batch·T·k·12 bytes); the tail
    mass becomes one bucket, which gives a lower bound of the full KL, tight when the teacher is peaked.
    """

    def __init__(self, teacher, domains: Sequence[int], batch_size: int, buffer: int = 16,
                 context: Optional[int] = None, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, eos_id: Optional[int] = None, stop_at_eos: Optional[bool] = None,
                 pad_id: int = 0, logprobs_top_k: Optional[int] = None, return_logprobs: bool = True,
                 max_logprobs_bytes: Optional[int] = 1 << 30, logprobs_dtype: torch.dtype = torch.float32,
                 seed: int = 0, device=None, decode: str = "auto", autocast_dtype: Optional[torch.dtype] = None):
        cfg = _model_config(teacher)
        self.domains = _check_domains(domains, getattr(cfg, "vocab_size", None))
        if batch_size < 1:
            raise SelfReplayError(f"replay batch_size={batch_size}: must be positive")
        if buffer < 1:
            raise SelfReplayError(f"replay buffer={buffer}: must be positive")
        context = context if context is not None else getattr(cfg, "context", None)
        if context is None or context < 2:
            raise SelfReplayError(f"replay context={context}: must be at least 2 (domain token + one sample)")
        if cfg is not None and context > cfg.context:
            raise SelfReplayError(f"replay context={context} exceeds the teacher's context {cfg.context}")
        stop_at_eos = eos_id is not None if stop_at_eos is None else stop_at_eos
        if stop_at_eos and eos_id is None:
            raise SelfReplayError("replay stop_at_eos needs eos_id (the tokenizer's EOS token id)")
        check_sampling_args(temperature, top_k, top_p, logprobs_top_k)
        if seed < 0:
            raise SelfReplayError(f"replay seed={seed}: must be >= 0")
        self.teacher, self.batch_size, self.buffer, self.context = teacher, batch_size, buffer, context
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.eos_id = eos_id if stop_at_eos else None
        self.pad_id, self.logprobs_top_k, self.logprobs_dtype = pad_id, logprobs_top_k, logprobs_dtype
        self.seed, self.autocast_dtype = seed, autocast_dtype
        self.device = torch.device(device) if device is not None else next(teacher.parameters()).device
        self.sampler = Sampler(teacher, decode)
        self.decode = self.sampler.mode(self.device)
        self.keeps_logprobs = return_logprobs and self._fits(max_logprobs_bytes, getattr(cfg, "vocab_size", None))
        self.sample_seconds = 0.0
        self.refills = 0  # buffers sampled by this object (resampling after a resume included)
        self._batches = 0  # batches handed out over the whole stream
        self._held: Optional[int] = None  # index of the refill in self._samples
        self._samples: Optional[Samples] = None

    def _fits(self, max_bytes: Optional[int], vocab_size: Optional[int]) -> bool:
        """Whether one buffer's teacher log-probs fit in ``max_bytes`` (warns once when they do not)."""
        if max_bytes is None:
            return True
        positions = self.buffer * self.batch_size * self.context
        if self.logprobs_top_k is not None:
            per_position = min(self.logprobs_top_k, vocab_size or self.logprobs_top_k) * (
                self.logprobs_dtype.itemsize + 8)
        elif vocab_size is not None:
            per_position = vocab_size * self.logprobs_dtype.itemsize
        else:
            return True
        if positions * per_position <= max_bytes:
            return True
        log.warning("replay: the teacher log-probs of one buffer would take %.2f GiB (> %.2f GiB); not keeping "
                    "them, the trainer recomputes the teacher instead (set logprobs_top_k or a smaller buffer to "
                    "keep them)", positions * per_position / 2 ** 30, max_bytes / 2 ** 30)
        return False

    @property
    def rows_per_refill(self) -> int:
        return self.buffer * self.batch_size

    def sample_refill(self, index: int) -> Samples:
        """Refill ``index`` of the stream: buffer × batch_size rows (timed into ``sample_seconds``)."""
        rows = self.rows_per_refill
        prompts = domain_prompts(self.domains, index * rows, rows, self.device)
        generator = make_generator(self.seed, index, self.device)
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else contextlib.nullcontext())
        _sync(self.device)
        start = time.perf_counter()
        with autocast:
            samples = self.sampler.sample(prompts, self.context, self.temperature, self.top_k, self.top_p,
                                          self.eos_id, self.pad_id, generator, self.keeps_logprobs,
                                          self.logprobs_top_k, self.logprobs_dtype)
        _sync(self.device)
        self.sample_seconds += time.perf_counter() - start
        self.refills += 1
        return samples

    def next_batch(self) -> ReplayBatch:
        refill, slot = divmod(self._batches, self.buffer)
        if self._held != refill:
            self._samples = None  # free the old buffer before sampling the next
            self._samples, self._held = self.sample_refill(refill), refill
        part = self._samples.rows(slot * self.batch_size, (slot + 1) * self.batch_size)  # type: ignore[union-attr]
        self._batches += 1
        return ReplayBatch(part.tokens, part.loss_mask, part.teacher_logprobs)

    def _identity(self) -> dict:
        """The settings that define the sample stream; a saved position is only valid for the same ones."""
        return {"seed": self.seed, "domains": self.domains, "batch_size": self.batch_size, "buffer": self.buffer,
                "context": self.context, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "eos_id": self.eos_id}

    def _drop_buffer(self) -> None:
        self._held, self._samples = None, None


# --------------------------------------------------------------------------------------------- stored replay

REPLAY_INFO = "replay.json"  # how a replay corpus was sampled (written by selfreplay.generate)
LOGPROB_VALUES = "logprobs_values.npy"  # [N, T, k] teacher top-k log-probs (float16/32), beside tokens.bin
LOGPROB_INDICES = "logprobs_indices.npy"  # [N, T, k] their token ids (int32)
_STORED_ORDER = 3  # tag keeping the stored-replay row order independent of data.py's streams of the same seed


def read_replay_info(path) -> Optional[dict]:
    """The ``replay.json`` of a replay corpus directory, or None for an ordinary corpus."""
    p = Path(path) / REPLAY_INFO
    if not p.is_file():
        return None
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SelfReplayError(f"replay corpus {path}: corrupt {REPLAY_INFO} ({str(e).splitlines()[0]})") from None
    if not isinstance(info, dict):
        raise SelfReplayError(f"replay corpus {path}: corrupt {REPLAY_INFO} (expected a JSON object)")
    return info


class StoredReplay:
    """Replay read from a corpus directory, e.g. one written by :func:`selfreplay.generate.generate_replay_corpus`.

    Pre-cut rows (``sequence_length`` set) are visited in an order reshuffled every epoch from (seed, epoch)
    (in stored order with ``shuffle=False``), batches running on across epochs, each row cut to ``context``.
    When the corpus stores the teacher's top-k log-probs they come along as KL targets (``use_logprobs``);
    otherwise batches carry none and the trainer recomputes the teacher. Rows sampled with stop-at-EOS get
    their loss mask back. An ordinary (flat) tokenized corpus is cut into rows by a
    :class:`selfreplay.data.BatchLoader` (no validation split), i.e. real-data replay.
    """

    def __init__(self, corpus, batch_size: int, context: Optional[int] = None, seed: int = 0,
                 shuffle: bool = True, use_logprobs: bool = True, vocab_size: Optional[int] = None,
                 tokenizer_fingerprint: Optional[str] = None):
        from selfreplay.data import BatchLoader, Corpus

        if not isinstance(corpus, Corpus):
            corpus = Corpus.open(corpus, vocab_size=vocab_size, tokenizer_fingerprint=tokenizer_fingerprint)
        if batch_size < 1:
            raise SelfReplayError(f"replay batch_size={batch_size}: must be positive")
        if seed < 0:
            raise SelfReplayError(f"replay seed={seed}: must be >= 0")
        self.corpus, self.batch_size, self.seed, self.shuffle = corpus, batch_size, seed, shuffle
        self.sample_seconds = 0.0  # nothing is sampled: reading rows is part of the step
        self.info = read_replay_info(corpus.path)
        self.has_logprobs = False
        self.loss_mask_eos: Optional[int] = None
        length = corpus.meta.sequence_length
        if length is None:
            if context is None:
                raise SelfReplayError(f"replay corpus {corpus.path}: a flat corpus needs a context length")
            self._loader = BatchLoader(corpus, context, batch_size, valid_tokens=0, seed=seed)
            self.context, self.num_rows = context, self._loader.num_train_sequences
            return
        self._loader = None
        self.context = context if context is not None else length
        if not 2 <= self.context <= length:
            raise SelfReplayError(f"replay corpus {corpus.path} holds rows of {length} tokens; cannot replay them "
                                  f"at context {self.context}")
        self.num_rows = corpus.meta.num_tokens // length
        if self.num_rows < batch_size:
            raise SelfReplayError(f"replay corpus {corpus.path} has {self.num_rows} rows, fewer than one replay "
                                  f"batch of {batch_size}")
        self._rows = corpus.tokens.reshape(self.num_rows, length)
        info = self.info or {}
        if info.get("eos_id") is not None:
            self.loss_mask_eos = int(info["eos_id"])
            self._prompt_length = int(info.get("prompt_length", 1))
        if use_logprobs and info.get("logprobs_top_k"):
            self._values, self._indices = self._open_logprobs(corpus.path, length)
            self.has_logprobs = True
        self._position = 0  # rows taken over the whole (endless) walk
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _open_logprobs(self, path: Path, length: int) -> tuple[np.ndarray, np.ndarray]:
        arrays = []
        for name in (LOGPROB_VALUES, LOGPROB_INDICES):
            f = Path(path) / name
            if not f.is_file():
                raise SelfReplayError(f"replay corpus {path}: {REPLAY_INFO} promises log-probs but {name} is missing")
            try:
                a = np.load(f, mmap_mode="r")
            except (ValueError, OSError) as e:
                raise SelfReplayError(f"replay corpus {path}: corrupt {name} ({str(e).splitlines()[0]})") from None
            if a.ndim != 3 or a.shape[:2] != (self.num_rows, length):
                raise SelfReplayError(f"replay corpus {path}: {name} has shape {a.shape}, expected "
                                      f"({self.num_rows}, {length}, k)")
            arrays.append(a)
        if arrays[0].shape != arrays[1].shape:
            raise SelfReplayError(f"replay corpus {path}: {LOGPROB_VALUES} and {LOGPROB_INDICES} differ in shape")
        return arrays[0], arrays[1]

    def _order_of(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            n = self.num_rows
            order = (np.random.default_rng([self.seed, _STORED_ORDER, epoch]).permutation(n) if self.shuffle
                     else np.arange(n))
            self._order_epoch, self._order = epoch, order
        return self._order

    def _take(self, k: int) -> np.ndarray:
        parts = []
        while k > 0:
            epoch, offset = divmod(self._position, self.num_rows)
            part = self._order_of(epoch)[offset:offset + k]
            parts.append(part)
            self._position += len(part)
            k -= len(part)
        return np.concatenate(parts)

    def next_batch(self) -> ReplayBatch:
        if self._loader is not None:
            return ReplayBatch(tokens=self._loader.next_batch())
        idx = self._take(self.batch_size)
        T = self.context
        tokens = torch.from_numpy(self._rows[idx][:, :T].astype(np.int64))
        mask = None if self.loss_mask_eos is None else eos_loss_mask(tokens, self.loss_mask_eos, self._prompt_length)
        targets = None
        if self.has_logprobs:
            targets = TopKLogprobs(torch.from_numpy(self._values[idx][:, :T].astype(np.float32)),
                                   torch.from_numpy(self._indices[idx][:, :T].astype(np.int64)))
        return ReplayBatch(tokens, mask, targets)

    def state_dict(self) -> dict:
        if self._loader is not None:
            return {"loader": self._loader.state_dict()}
        return {"seed": self.seed, "num_rows": self.num_rows, "shuffle": self.shuffle, "rows": self._position}

    def load_state_dict(self, state: dict) -> None:
        if self._loader is not None:
            if "loader" not in state:
                raise SelfReplayError("replay state does not match: it was saved for a replay corpus of rows")
            self._loader.load_state_dict(state["loader"])
            return
        saved = (state.get("seed"), state.get("num_rows"), state.get("shuffle"))
        if saved != (self.seed, self.num_rows, self.shuffle) or not isinstance(state.get("rows"), int):
            raise SelfReplayError(f"replay state does not match this replay corpus (saved seed/rows/shuffle "
                                  f"{saved}, now {(self.seed, self.num_rows, self.shuffle)})")
        self._position = state["rows"]
