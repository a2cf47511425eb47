"""Replay corpora for Hugging Face models: sample one ahead of training, read it (or any old data) back as rows.

``generate_hf_replay_corpus`` is ``selfreplay generate --model``: the model samples ``num_sequences`` rows of
``length`` tokens, each prompted only with BOS (or the chat template's prefix), at temperature 1, EOS ignored —
the paper's self-generated replay (§3.2) — and writes them as a replay corpus directory:

    input_ids.npy   [N, L] int32, the rows (prompt included)
    loss_mask.npy   [N, L] bool, the target tokens (False on the prompt; position 0 is never a target)
    replay.json     what made it: model, tokenizer, vocabulary size, prompt, sampling settings, seed

Rows are sampled in chunks of ``batch_size``; chunk i is refill i of :class:`selfreplay.hf_replay.HFSelfReplay`
with ``buffer × batch_size = batch_size`` (same seed, device and dtype give the same rows). Finished chunks are
kept in ``<out>.partial/`` so an interrupted run continues where it stopped; ``<out>`` appears, by one rename,
only when complete.

Training reads replay with :func:`load_replay_rows`: a replay corpus directory (:func:`load_replay_corpus`), a
``datasets.Dataset`` or list of records, or anything :func:`selfreplay.hf_data.prepare_hf_data` loads (a local
file or a hub dataset), always as :class:`selfreplay.hf_data.PackedRows`. :class:`RowReplay` hands such rows
out as replay batches.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from selfreplay.checkpoint import atomic_write_json
from selfreplay.errors import SelfReplayError
from selfreplay.generate import _chunk_path, _load_chunk, publish_corpus, run_chunked_job
from selfreplay.replay import ReplayBatch

PathLike = Union[str, os.PathLike]
CORPUS_FORMAT = "selfreplay-hf-replay"
CORPUS_FORMAT_VERSION = 1
IDS_FILE, MASK_FILE, INFO_FILE = "input_ids.npy", "loss_mask.npy", "replay.json"


# ------------------------------------------------------------------------------------------------ writing

def generate_hf_replay_corpus(model, tokenizer, out_dir: PathLike, num_sequences: int, length: int = 512,
                              prompt: str = "bos", batch_size: int = 32, temperature: float = 1.0,
                              top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0,
                              source: Optional[str] = None, autocast_dtype: Optional[torch.dtype] = None,
                              progress: bool = True, resume: bool = True) -> dict:
    """Sample a replay corpus from ``model`` (any transformers causal LM) into ``out_dir``; returns replay.json.

    ``source`` names the model (hub id or directory) in the metadata; ``resume=False`` discards the chunks of an
    interrupted run instead of continuing it.
    """
    from selfreplay.hf_model import Teacher
    from selfreplay.hf_replay import HFSelfReplay

    out = Path(out_dir)
    if num_sequences < 1:
        raise SelfReplayError(f"generate: --num-sequences={num_sequences}: must be positive")
    if batch_size < 1:
        raise SelfReplayError(f"generate: --batch-size={batch_size}: must be positive")
    if seed < 0:
        raise SelfReplayError(f"generate: --seed={seed}: must be >= 0")
    if out.exists():
        raise SelfReplayError(f"generate: {out} already exists; remove it or choose another output directory")
    chunk_rows = min(batch_size, num_sequences)
    teacher = Teacher(model.eval())
    sampler = HFSelfReplay(teacher, tokenizer, batch_size=chunk_rows, length=length, buffer=1, prompt=prompt,
                           temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, keep_logprobs="never",
                           autocast_dtype=autocast_dtype)
    head = model.get_output_embeddings()
    settings = {
        "format": CORPUS_FORMAT, "format_version": CORPUS_FORMAT_VERSION, "num_sequences": num_sequences,
        "length": length, "prompt": prompt, "prompt_ids": sampler.prompt_ids, "chunk_rows": chunk_rows,
        "seed": seed, "temperature": temperature, "top_k": top_k, "top_p": top_p,
        "vocab_size": int(head.weight.shape[0]), "tokenizer_vocab_size": len(tokenizer),
        "model": source or getattr(model.config, "_name_or_path", "") or type(model).__name__,
        "device": teacher.device.type, "dtype": str(next(model.parameters()).dtype),
        "autocast_dtype": str(autocast_dtype) if autocast_dtype else None,
    }

    def sample_chunk(i: int, n: int) -> dict[str, np.ndarray]:
        tokens, _ = sampler.sample_refill(i)
        return {"input_ids": tokens[:n].cpu().numpy().astype(np.int32)}

    work, num_chunks = run_chunked_job(out, settings, num_sequences, chunk_rows, sample_chunk, resume=resume,
                                       progress=progress, no_resume_hint="--no-resume")

    staging = work / "corpus"
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted assembly
    staging.mkdir()
    ids = np.concatenate([_load_chunk(_chunk_path(work, i))["input_ids"] for i in range(num_chunks)])
    if ids.shape != (num_sequences, length):
        raise SelfReplayError(f"generate: chunks in {work} hold rows {ids.shape}, expected "
                              f"({num_sequences}, {length}); delete {work} and start again")
    mask = np.ones(ids.shape, dtype=bool)
    mask[:, :len(sampler.prompt_ids)] = False
    np.save(staging / IDS_FILE, ids)
    np.save(staging / MASK_FILE, mask)
    info = {k: v for k, v in settings.items() if k not in ("chunk_rows",)}
    atomic_write_json(staging / INFO_FILE, info)
    publish_corpus(staging, out, work)
    return info


# ------------------------------------------------------------------------------------------------ reading

def is_replay_corpus(path) -> bool:
    """Whether ``path`` is a directory written by :func:`generate_hf_replay_corpus`."""
    return isinstance(path, (str, os.PathLike)) and (Path(path) / INFO_FILE).is_file() and \
        (Path(path) / IDS_FILE).is_file()


def read_replay_info(path: PathLike) -> dict:
    """The replay.json of a replay corpus, checked."""
    p = Path(path)
    try:
        info = json.loads((p / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SelfReplayError(f"replay corpus {p}: cannot read {INFO_FILE} ({str(e).splitlines()[0]})") from None
    if not isinstance(info, dict) or info.get("format") != CORPUS_FORMAT:
        raise SelfReplayError(f"replay corpus {p}: {INFO_FILE} is not a `selfreplay generate --model` corpus")
    if info.get("format_version", 0) > CORPUS_FORMAT_VERSION:
        raise SelfReplayError(f"replay corpus {p}: format_version {info['format_version']} is newer than this "
                              f"selfreplay supports ({CORPUS_FORMAT_VERSION}); upgrade selfreplay")
    return info


def load_replay_corpus(path: PathLike, vocab_size: Optional[int] = None):
    """A replay corpus directory as :class:`~selfreplay.hf_data.PackedRows` (``vocab_size``: the model's, checked)."""
    from selfreplay.hf_data import PackedRows

    p = Path(path)
    if not p.is_dir():
        raise SelfReplayError(f"replay corpus {p}: not a directory (expected one written by `selfreplay generate "
                              f"--model`)")
    info = read_replay_info(p)
    try:
        ids = np.load(p / IDS_FILE)
        mask = np.load(p / MASK_FILE) if (p / MASK_FILE).is_file() else np.ones(ids.shape, dtype=bool)
    except (OSError, ValueError) as e:
        raise SelfReplayError(f"replay corpus {p}: corrupt arrays ({str(e).splitlines()[0]})") from None
    if ids.ndim != 2 or ids.shape[1] < 2 or mask.shape != ids.shape or not np.issubdtype(ids.dtype, np.integer):
        raise SelfReplayError(f"replay corpus {p}: expected integer rows [N, L>=2] and a mask of the same shape, "
                              f"got {ids.dtype} {ids.shape} and {mask.shape}")
    if vocab_size is not None and int(ids.max()) >= vocab_size:
        raise SelfReplayError(f"replay corpus {p}: token id {int(ids.max())} is outside the model's vocabulary "
                              f"of {vocab_size} (sampled from {info.get('model')}, vocab {info.get('vocab_size')})")
    mask = mask.astype(bool)
    mask[:, 0] = False
    return PackedRows(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask))


def load_replay_rows(source, tokenizer, seq_len: int, split: str = "train", text_field: str = "text",
                     vocab_size: Optional[int] = None):
    """Old data for replay as PackedRows of ``seq_len`` tokens.

    ``source``: a replay corpus directory (its rows are used as they are), PackedRows, a ``datasets.Dataset`` or
    list of records (text / messages / prompt-completion), or a data file or hub dataset id.
    """
    from selfreplay.hf_data import PackedRows, detect_format, pack_examples, prepare_hf_data, tokenize_records

    if isinstance(source, PackedRows):
        return source
    if is_replay_corpus(source):
        return load_replay_corpus(source, vocab_size)
    if isinstance(source, (str, os.PathLike)):
        return prepare_hf_data(str(source), tokenizer, seq_len, split=split, text_field=text_field)
    records = [dict(r) for r in source]  # a datasets.Dataset or a list of dicts
    fmt = detect_format(records, text_field, source="replay data")
    examples = tokenize_records(records, tokenizer, fmt, text_field, source="replay data")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pack_examples(examples, seq_len, pad_id)


class RowReplay:
    """A :class:`selfreplay.replay.ReplaySource` over fixed rows: ``batch_size`` at a time, reshuffled each epoch."""

    def __init__(self, rows, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        from selfreplay.hf_data import HFBatchLoader

        if len(rows) < batch_size * world_size:
            raise SelfReplayError(f"replay data: {len(rows)} rows are fewer than one replay batch of "
                                  f"{batch_size * world_size}; add data or lower the replay batch size")
        self.loader = HFBatchLoader(rows, batch_size * world_size, seed=seed, rank=rank, world_size=world_size)
        self.sample_seconds = 0.0

    def next_batch(self) -> ReplayBatch:
        ids, mask = self.loader.next_batch()
        return ReplayBatch(tokens=ids, loss_mask=mask.float())

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
