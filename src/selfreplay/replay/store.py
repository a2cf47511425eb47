"""``selfreplay generate``: sample a replay corpus from a frozen model once, ahead of training, for either kind.

The corpus is a directory of pre-cut rows in the token-corpus format (``tokens.bin`` + ``meta.json`` with
``sequence_length``), a ``replay.json`` saying how it was sampled (prompts, settings, the teacher's weights hash),
and optionally the teacher's top-k log-probs per position (``logprobs_values.npy`` / ``logprobs_indices.npy``),
so that finetuning replays it (``replay.source=<dir>``) without sampling and, with log-probs, without a teacher
pass.

Rows are sampled in chunks of ``batch_size``: chunk i is refill i of a
:class:`~selfreplay.replay.sources.SelfGeneratedReplay` with one batch of ``batch_size`` per refill (same seed,
device and decode mode give the same rows). Finished chunks are kept in ``<out_dir>.partial/``, so an interrupted
run continues where it stopped and gives the same bytes; ``<out_dir>`` appears, by one rename, only when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from selfreplay.data.corpus import CorpusMeta, token_dtype, write_corpus
from selfreplay.errors import SelfReplayError
from selfreplay.models.core import CausalLM, Teacher
from selfreplay.progress import progress
from selfreplay.replay.prompts import Prompts
from selfreplay.replay.sources import REPLAY_INFO, TOPK_INDICES, TOPK_VALUES, SelfGeneratedReplay
from selfreplay.train.files import (atomic_write, atomic_write_json, disk_full, remove_stale_temporaries,
                                   write_array)
from selfreplay.train.ownership import refuse_special, remove_if_only, remove_named, remove_tree

JOB_FILE = "job.json"
STAGING = "corpus"  # inside <out>.partial/: the corpus being assembled, renamed to <out> when complete
REPLAY_FORMAT_VERSION = 2
LOGPROB_DTYPES = {"float32": np.float32, "float16": np.float16}


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's weights (names, dtypes, shapes, bytes): ties a replay corpus to its teacher."""
    h = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


CHUNK_NAME = re.compile(r"chunk_\d{6,}\.npz")


def _chunk_path(work: Path, index: int) -> Path:
    return work / f"chunk_{index:06d}.npz"


def _save_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def _write_npy(path: Path, parts: list[np.ndarray]) -> None:
    """``parts`` joined along their first axis as one .npy file, written part by part (not through a memory map,
    whose writes kill the process with SIGBUS on a full disk instead of raising ENOSPC)."""
    shape = (sum(len(p) for p in parts), *parts[0].shape[1:])
    header = {"descr": np.lib.format.dtype_to_descr(parts[0].dtype), "fortran_order": False, "shape": shape}
    try:
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            for p in parts:
                write_array(np.ascontiguousarray(p), f)
    except OSError as e:
        if disk_full(e):
            raise SelfReplayError(f"no space left on the device writing {path}; the sampled chunks are kept: free "
                                  f"space and run the same command again to finish") from None
        raise


def _load_chunk(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise SelfReplayError(f"{path}: corrupt chunk ({str(e).splitlines()[0]}); delete it to resample it") from None


def _is_our_work(work: Path) -> bool:
    """A ``.partial`` folder of ours: a real directory holding the job.json an interrupted generate wrote."""
    try:
        saved = json.loads((work / JOB_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return not work.is_symlink() and isinstance(saved, dict) and "format_version" in saved


def _clear_work(work: Path) -> None:
    """Delete what generate wrote in ``work`` (chunks, the staging corpus, job.json, temporaries); the folder goes
    too unless something else is in it."""
    remove_named(work, [p.name for p in work.iterdir() if CHUNK_NAME.fullmatch(p.name)] + [STAGING, JOB_FILE])
    remove_stale_temporaries(work)
    remove_if_only(work, [])


def _resume_or_start(work: Path, settings: dict, resume: bool) -> None:
    job = work / JOB_FILE
    if work.is_symlink() or (work.exists() and not _is_our_work(work)):
        raise SelfReplayError(f"generate: {work} exists and is not an interrupted selfreplay generate (no "
                              f"{JOB_FILE} of ours); remove it or choose another --out")
    if work.exists() and not resume:
        _clear_work(work)
    if job.is_file():
        try:
            saved = json.loads(job.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            saved = None
        if saved != json.loads(json.dumps(settings)):
            changed = [k for k in settings if saved is None or saved.get(k) != json.loads(json.dumps(settings[k]))]
            raise SelfReplayError(f"generate: {work} holds an interrupted run with other settings ({', '.join(changed)})"
                                  f"; delete it or pass --no-resume")
    else:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_json(job, settings)


def generate_replay(model: CausalLM, out_dir, num_sequences: int, prompts: Prompts, length: int,
                    batch_size: int = 256, temperature: float = 1.0, top_k: Optional[int] = None,
                    top_p: Optional[float] = None, eos_id: Optional[int] = None, pad_id: int = 0, seed: int = 0,
                    logprobs_top_k: Optional[int] = None, logprobs_dtype: str = "float32",
                    tokenizer_fingerprint: str = "", tokenizer: Optional[str] = None, source: Optional[str] = None,
                    decode: str = "auto", autocast_dtype: Optional[torch.dtype] = None, show_progress: bool = True,
                    resume: bool = True) -> CorpusMeta:
    """Sample ``num_sequences`` rows of ``length`` tokens from ``model`` into the replay corpus ``out_dir``.

    Row g starts with prompt g mod n of ``prompts`` and is sampled at ``temperature`` (optionally top-k / top-p);
    EOS is an ordinary token unless ``eos_id`` is given (then a row ends there, padded with ``pad_id``). With
    ``logprobs_top_k`` the teacher's k largest log-probs per position are stored too. Returns the corpus metadata.
    """
    out = Path(out_dir)
    for name, value in (("--num-sequences", num_sequences), ("--batch-size", batch_size)):
        if value < 1:
            raise SelfReplayError(f"generate: {name}={value}: must be positive")
    if seed < 0:
        raise SelfReplayError(f"generate: --seed={seed}: must be >= 0")
    if logprobs_dtype not in LOGPROB_DTYPES:
        raise SelfReplayError(f"generate: logprobs_dtype={logprobs_dtype!r}: expected float32 or float16")
    refuse_special(out, "generate --out")
    if os.path.lexists(out):
        raise SelfReplayError(f"generate: {out} already exists; remove it or choose another output directory")
    vocab = model.vocab_size
    chunk_rows = min(batch_size, num_sequences)
    k = None if logprobs_top_k is None else min(logprobs_top_k, vocab)
    stream = SelfGeneratedReplay(Teacher(model.eval()), prompts, chunk_rows, length, 1, temperature, top_k, top_p,
                                 eos_id, pad_id, seed, keep_targets=k is not None, max_targets_bytes=None,
                                 targets_top_k=k, decode=decode, autocast_dtype=autocast_dtype,
                                 show_progress=show_progress)
    settings = {"format_version": REPLAY_FORMAT_VERSION, "num_sequences": num_sequences, "length": length,
                "prompts": prompts.rows, "prompt_length": prompts.length, "chunk_rows": chunk_rows, "seed": seed,
                "temperature": temperature, "top_k": top_k, "top_p": top_p, "eos_id": eos_id, "pad_id": pad_id,
                "logprobs_top_k": k, "logprobs_dtype": logprobs_dtype if k is not None else None,
                "vocab_size": vocab, "device": stream.device.type, "decode": stream.decode,
                "autocast_dtype": str(autocast_dtype) if autocast_dtype else None,
                "teacher_sha256": weights_fingerprint(model), "teacher": source}
    work = out.with_name(out.name + ".partial")
    _resume_or_start(work, settings, resume)
    num_chunks = math.ceil(num_sequences / chunk_rows)
    rows_of = [min(chunk_rows, num_sequences - i * chunk_rows) for i in range(num_chunks)]
    tok_dtype = np.dtype(token_dtype(vocab))
    done = sum(rows_of[i] for i in range(num_chunks) if _chunk_path(work, i).is_file())
    bar = progress(num_sequences, f"generate {out.name}", "seq", show_progress, done)
    for i in range(num_chunks):
        if _chunk_path(work, i).is_file():
            continue
        s = stream.sample_refill(i)
        n = rows_of[i]
        arrays = {"tokens": s.tokens[:n].cpu().numpy().astype(tok_dtype)}
        if k is not None:
            arrays["values"] = s.teacher_targets.values[:n].cpu().numpy().astype(LOGPROB_DTYPES[logprobs_dtype])
            arrays["indices"] = s.teacher_targets.indices[:n].cpu().numpy().astype(np.int32)
        _save_chunk(_chunk_path(work, i), arrays)
        bar.update(n)
    bar.close()
    return _assemble(out, work, settings, num_chunks, tokenizer_fingerprint, tokenizer, vocab, eos_id, prompts,
                     source)


def _assemble(out: Path, work: Path, settings: dict, num_chunks: int, fingerprint: str, tokenizer: Optional[str],
              vocab: int, eos_id: Optional[int], prompts: Prompts, source: Optional[str]) -> CorpusMeta:
    """Join the chunks into ``<work>/corpus`` (tokens, log-probs, replay.json), then rename it to ``out``."""
    staging = work / STAGING
    remove_tree(staging)  # left by an interrupted assembly
    chunks = [_load_chunk(_chunk_path(work, i)) for i in range(num_chunks)]
    tokens = np.concatenate([c["tokens"] for c in chunks])
    N, T = settings["num_sequences"], settings["length"]
    if tokens.shape != (N, T):
        raise SelfReplayError(f"generate: chunks in {work} hold {tokens.shape} tokens, expected ({N}, {T}); delete "
                              f"{work} and start again")
    one_domain = prompts.length == 1 and len(prompts.rows) == 1 and prompts.rows[0][0] < 10
    domain = prompts.rows[0][0] if one_domain else None  # metadata only: pre-cut rows are used as stored
    meta = CorpusMeta(num_tokens=int(tokens.size), dtype=token_dtype(vocab), vocab_size=vocab,
                      tokenizer_fingerprint=fingerprint, domain_token=domain, eos_token=eos_id,
                      source=[f"selfreplay generate from {source or 'a model'} "
                              f"(weights sha256 {settings['teacher_sha256'][:16]})"],
                      name=out.name, sequence_length=T, tokenizer=tokenizer)
    meta = write_corpus(tokens, staging, meta)
    if settings["logprobs_top_k"] is not None:
        for key, name in (("values", TOPK_VALUES), ("indices", TOPK_INDICES)):
            _write_npy(staging / name, [c[key] for c in chunks])
    atomic_write_json(staging / REPLAY_INFO, {k: v for k, v in settings.items() if k != "vocab_size"})
    if out.exists():
        raise SelfReplayError(f"generate: {out} appeared while generating; not overwriting it (chunks kept in {work})")
    os.replace(staging, out)
    _clear_work(work)
    return meta


def generate_from(name: str, out_dir, num_sequences: int, length: Optional[int] = None, domains: list = (),
                  prompt: str = "bos", batch_size: int = 64, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None, stop_at_eos: bool = False, logprobs_top_k: Optional[int] = None,
                  seed: int = 0, dtype: str = "auto", device: str = "auto", resume: bool = True,
                  text_out: Optional[str] = None) -> CorpusMeta:
    """``selfreplay generate``: load the model a user names (either kind), prompt it as training would, sample."""
    from selfreplay.data.corpus import Corpus
    from selfreplay.models import hf_path, load_model
    from selfreplay.replay.prompts import tokenizer_prompt
    from selfreplay.train.distributed import resolve_device

    dev = resolve_device(device)
    model = load_model(name, dev, dtype)
    if model.kind == "gpt":
        corpus = (model.info.get("train_corpus") or {})
        meta = Corpus.open(corpus["path"]).meta if corpus.get("path") and Path(corpus["path"]).is_dir() else None
        domains = list(domains) or [corpus.get("domain_token")]
        if domains[0] is None:
            raise SelfReplayError(f"generate: {name} records no domain token; pass --domain")
        eos = meta.eos_token if meta is not None else None
        if stop_at_eos and eos is None:
            raise SelfReplayError(f"generate --stop-at-eos: the training corpus of {name} records no EOS token")
        prompts = Prompts.domains(domains, model.vocab_size, "generate --domain")
        fingerprint = model.info.get("tokenizer_fingerprint", "")
        tokenizer_file, length = corpus.get("tokenizer") or (meta.tokenizer if meta else None), length or model.context
        pad_id, decode = 0, None
    else:
        if domains or stop_at_eos:
            raise SelfReplayError("generate: --domain / --stop-at-eos apply to built-in GPT runs only")
        from selfreplay.models.hf import load_tokenizer

        tokenizer = load_tokenizer(hf_path(name))
        prompts = Prompts([tokenizer_prompt(tokenizer, prompt)])
        fingerprint, tokenizer_file = f"hf:{hf_path(name)}:{len(tokenizer)}", hf_path(name)
        length, pad_id, eos = length or 512, int(tokenizer.pad_token_id), None
        decode = tokenizer.decode
    meta = generate_replay(model, out_dir, num_sequences, prompts, length, batch_size, temperature, top_k, top_p,
                           eos if stop_at_eos else None, pad_id, seed, logprobs_top_k,
                           tokenizer_fingerprint=fingerprint, tokenizer=tokenizer_file, source=str(name),
                           resume=resume)
    if text_out:
        write_text(out_dir, text_out, decode)
    return meta


def write_text(replay_dir, out_file, decode=None) -> int:
    """Decoded samples of a replay corpus as JSONL (``{"text": ...}`` per row); returns the number of rows."""
    from selfreplay.data.corpus import Corpus

    corpus = Corpus.open(replay_dir)
    rows = np.asarray(corpus.tokens).reshape(-1, corpus.meta.sequence_length)
    if decode is None:
        if not corpus.meta.tokenizer or not Path(corpus.meta.tokenizer).is_file():
            raise SelfReplayError(f"--text: the tokenizer of {replay_dir} is not recorded or gone "
                                  f"({corpus.meta.tokenizer}); cannot decode the samples")
        from selfreplay.data.tokenizer import load_tokenizer

        tok = load_tokenizer(corpus.meta.tokenizer)
        decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    lines = [json.dumps({"text": decode([int(t) for t in row])}, ensure_ascii=False) for row in rows]
    atomic_write(out_file, "\n".join(lines) + "\n")
    return len(lines)
