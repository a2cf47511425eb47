"""Replay sources: where the old-distribution rows of the forgetting penalty come from.

A source hands the penalty one :class:`ReplayBatch` per optimizer step and saves / restores its position for
resumable training. Three kinds cover every case of either model kind:

- :class:`DataReplay`: rows of real old data (the teacher's corpus, an old text / chat file) from any loader;
- :class:`StoredReplay`: a replay corpus sampled beforehand by ``selfreplay generate`` (optionally with the
  teacher's top-k log-probs as KL targets);
- :class:`SelfGeneratedReplay`: sampled by the frozen teacher itself during training (the paper's §3.2).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from selfreplay.data.batch import Batch
from selfreplay.data.loader import ShuffledWalk
from selfreplay.errors import SelfReplayError
from selfreplay.models.core import Teacher
from selfreplay.replay.losses import TopKTargets
from selfreplay.replay.prompts import Prompts, eos_loss_mask, prompt_mask
from selfreplay.replay.sampling import Sampler, Samples, check_sampling_args, make_generator
from selfreplay.progress import progress

log = logging.getLogger(__name__)

REPLAY_INFO = "replay.json"  # how a replay corpus was sampled (written by selfreplay.replay.store)
TOPK_VALUES = "logprobs_values.npy"  # [N, T, k] teacher top-k log-probs (float16/32), beside tokens.bin
TOPK_INDICES = "logprobs_indices.npy"  # [N, T, k] their token ids (int32)
_STORED_ORDER = 3  # keeps the stored-replay row order independent of the data loaders' streams of one seed


class ReplayBatch(Batch):
    """Replay rows, with the teacher's targets (``teacher_targets``) when they were kept, else the penalty runs
    the teacher."""


class DataReplay:
    """Real old-distribution rows: the training walk of any loader (its batch size is the replay batch)."""

    def __init__(self, loader):
        self.loader = loader
        self.sample_seconds = 0.0

    def next_batch(self) -> Batch:
        return self.loader.next_batch()

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])


# --------------------------------------------------------------------------------------------- self-generated

class SelfGeneratedReplay:
    """Replay sampled from the frozen teacher during training.

    Every refill samples ``buffer × batch_size`` rows of ``length`` tokens at once (KV cache), prompted by
    ``prompts`` (row g gets prompt g mod n: domains share every batch evenly), at ``temperature`` (1: the teacher's
    own distribution), EOS ignored unless ``eos_id`` is given; batches are then handed out ``batch_size`` at a time.

    Refill r uses a generator seeded from (seed, r) and holds rows r·buffer·batch_size.. of one stream, so resuming
    needs only the number of batches handed out (the current refill is sampled again, identically, on the same
    device and decode mode), and ``selfreplay generate`` with chunks of buffer × batch_size rows writes exactly
    these rows.

    KL targets: the teacher's logits at every sampled position are the exact targets (the same function the
    trainer would compute), so a batch carries them and the penalty skips the teacher forward — while one
    buffer's logits fit in ``max_targets_bytes`` (rows·length·V·bytes: the paper's 16·64·256·4096 float32 logits
    are 4 GiB); else the batch carries none and the teacher runs again. ``targets_top_k`` keeps the k largest
    log-probs per position instead (a lower bound of the KL, see TopKTargets).
    """

    def __init__(self, teacher: Teacher, prompts: Prompts, batch_size: int, length: int, buffer: int = 16,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_id: Optional[int] = None, pad_id: int = 0, seed: int = 0, keep_targets: bool = True,
                 max_targets_bytes: Optional[int] = 1 << 30, targets_top_k: Optional[int] = None,
                 decode: str = "auto", autocast_dtype: Optional[torch.dtype] = None, show_progress: bool = False):
        for name, value in (("batch_size", batch_size), ("buffer", buffer), ("temperature", temperature)):
            if value <= 0:
                raise SelfReplayError(f"replay.{name}={value}: must be positive")
        if seed < 0:
            raise SelfReplayError(f"replay seed={seed}: must be >= 0")
        check_sampling_args(temperature, top_k, top_p, targets_top_k)
        self.prompt_length = prompts.length
        if not self.prompt_length < length:
            raise SelfReplayError(f"replay.length={length}: must exceed the prompt's {self.prompt_length} tokens")
        context = teacher.module.context
        if teacher.module.kind == "gpt" and length > context:
            raise SelfReplayError(f"replay.length={length} exceeds the teacher's context {context}")
        self.teacher, self.prompts, self.batch_size, self.length, self.buffer = \
            teacher, prompts, batch_size, length, buffer
        self.temperature, self.top_k, self.top_p, self.eos_id, self.pad_id = temperature, top_k, top_p, eos_id, pad_id
        self.seed, self.autocast_dtype, self.targets_top_k = seed, autocast_dtype, targets_top_k
        self.show_progress = show_progress  # a progress display per refill, its first line at once
        self.device = teacher.device
        self.sampler = Sampler(teacher.forward_module, decode)
        self.decode = self.sampler.mode(self.device)
        self.keeps_targets = keep_targets and self._fits(max_targets_bytes)
        self.sample_seconds = 0.0
        self.refills = 0  # buffers sampled by this object (resampling after a resume included)
        self._batches = 0  # batches handed out over the whole stream
        self._held: Optional[int] = None
        self._samples: Optional[Samples] = None

    def _fits(self, max_bytes: Optional[int]) -> bool:
        if max_bytes is None:
            return True
        positions = self.buffer * self.batch_size * self.length
        if self.targets_top_k is not None:
            per_position = self.targets_top_k * 12
        else:
            per_position = self.teacher.module.vocab_size * (2 if self.autocast_dtype is not None else 4)
        if positions * per_position <= max_bytes:
            return True
        log.info("replay: one buffer of teacher logits would take %.2f GiB (> %.2f GiB); the teacher is run again "
                 "instead", positions * per_position / 2 ** 30, max_bytes / 2 ** 30)
        return False

    @property
    def rows_per_refill(self) -> int:
        return self.buffer * self.batch_size

    def sample_refill(self, index: int) -> Samples:
        """Refill ``index`` of the stream (timed into ``sample_seconds``)."""
        rows = self.rows_per_refill
        prompts = self.prompts.for_rows(index * rows, rows, self.device)
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                    else contextlib.nullcontext())
        _sync(self.device)
        start = time.perf_counter()
        bar = progress(self.length - self.prompt_length, f"replay: sampling {rows} sequences x {self.length} tokens "
                       f"(buffer {index + 1})", "tok", self.show_progress, every_s=10.0, position=1, announce=True,
                       leave=False)
        with self.teacher.active(), autocast:
            samples = self.sampler.sample(prompts, self.length, self.temperature, self.top_k, self.top_p,
                                          self.eos_id, self.pad_id, make_generator(self.seed, index, self.device),
                                          self.keeps_targets, self.targets_top_k, on_token=lambda: bar.update(1))
        bar.close()
        _sync(self.device)
        self.sample_seconds += time.perf_counter() - start
        self.refills += 1
        return samples

    def next_batch(self) -> ReplayBatch:
        refill, slot = divmod(self._batches, self.buffer)
        if self._held != refill:
            self._samples = None  # free the old buffer before sampling the next
            self._samples, self._held = self.sample_refill(refill), refill
        part = self._samples.rows(slot * self.batch_size, (slot + 1) * self.batch_size)
        self._batches += 1
        return ReplayBatch(part.tokens, part.loss_mask, None, part.teacher_targets)

    def _identity(self) -> dict:
        """The settings that define the stream; a saved position is only valid for the same ones."""
        return {"seed": self.seed, "prompts": self.prompts.rows, "batch_size": self.batch_size,
                "buffer": self.buffer, "length": self.length, "temperature": self.temperature, "top_k": self.top_k,
                "top_p": self.top_p, "eos_id": self.eos_id}

    def state_dict(self) -> dict:
        """Position in the stream (small: the current buffer is resampled on resume, not stored)."""
        return {**self._identity(), "batches": self._batches, "sample_seconds": self.sample_seconds}

    def load_state_dict(self, state: dict) -> None:
        saved = {k: state.get(k) for k in self._identity()}
        if saved != self._identity():
            diff = ", ".join(f"{k} {saved[k]} (now {v})" for k, v in self._identity().items() if saved[k] != v)
            raise SelfReplayError(f"replay state was saved with different settings: {diff}")
        self._batches = int(state["batches"])
        self.sample_seconds = float(state.get("sample_seconds", 0.0))
        self._held = self._samples = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------- stored replay

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
    """Replay read from a replay corpus (pre-cut rows written by :func:`selfreplay.replay.store.generate_replay`).

    Rows are visited in an order reshuffled every epoch from (seed, epoch) (stored order with ``shuffle=False``),
    batches running on across epochs, each row cut to ``length``. Rows sampled with a multi-token prompt or
    stop-at-EOS get their target mask back; stored top-k log-probs come along as KL targets (``use_targets``).
    """

    def __init__(self, corpus, batch_size: int, length: Optional[int] = None, seed: int = 0, shuffle: bool = True,
                 use_targets: bool = True, vocab_size: Optional[int] = None):
        from selfreplay.data.corpus import Corpus

        if not isinstance(corpus, Corpus):
            corpus = Corpus.open(corpus, vocab_size=vocab_size)
        if batch_size < 1:
            raise SelfReplayError(f"replay.batch_size={batch_size}: must be positive")
        stored = corpus.meta.sequence_length
        if stored is None:
            raise SelfReplayError(f"replay corpus {corpus.path} is a flat token stream, not pre-cut replay rows")
        self.corpus, self.batch_size, self.seed, self.shuffle = corpus, batch_size, seed, shuffle
        self.sample_seconds = 0.0
        self.info = read_replay_info(corpus.path) or {}
        self.length = length if length is not None else stored
        if not 2 <= self.length <= stored:
            raise SelfReplayError(f"replay corpus {corpus.path} holds rows of {stored} tokens; cannot replay them at "
                                  f"length {self.length}")
        self.num_rows = corpus.meta.num_tokens // stored
        if self.num_rows < batch_size:
            raise SelfReplayError(f"replay corpus {corpus.path} has {self.num_rows} rows, fewer than one replay "
                                  f"batch of {batch_size}")
        self._rows = corpus.tokens.reshape(self.num_rows, stored)
        self.prompt_length = int(self.info.get("prompt_length", 1))
        self.eos_id = self.info.get("eos_id")
        self.has_targets = bool(use_targets and self.info.get("logprobs_top_k"))
        if self.has_targets:
            self._values, self._indices = self._open_targets(corpus.path, stored)
        self._walk = ShuffledWalk(np.arange(self.num_rows), seed, _STORED_ORDER, shuffle)

    def _open_targets(self, path: Path, length: int) -> tuple[np.ndarray, np.ndarray]:
        arrays = []
        for name in (TOPK_VALUES, TOPK_INDICES):
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
        return arrays[0], arrays[1]

    def next_batch(self) -> ReplayBatch:
        idx = self._walk.take(self.batch_size)
        T = self.length
        tokens = torch.from_numpy(self._rows[idx][:, :T].astype(np.int64))
        if self.eos_id is not None:
            mask = eos_loss_mask(tokens, int(self.eos_id), self.prompt_length)
        else:
            mask = prompt_mask(len(idx), T, self.prompt_length)
        targets = None
        if self.has_targets:
            targets = TopKTargets(torch.from_numpy(self._values[idx][:, :T].astype(np.float32)),
                                  torch.from_numpy(self._indices[idx][:, :T].astype(np.int64)))
        return ReplayBatch(tokens, mask, None, targets)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "num_rows": self.num_rows, "shuffle": self.shuffle,
                "walk": self._walk.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved = (state.get("seed"), state.get("num_rows"), state.get("shuffle"))
        if saved != (self.seed, self.num_rows, self.shuffle):
            raise SelfReplayError(f"replay state does not match this replay corpus (saved seed/rows/shuffle "
                                  f"{saved}, now {(self.seed, self.num_rows, self.shuffle)})")
        self._walk.load_state_dict(state["walk"], f"replay corpus {self.corpus.path}")
