"""Sample a replay corpus from a frozen teacher once, ahead of training, and measure replay quality.

``generate_replay_corpus`` writes self-generated replay (the paper's §3.2 recipe: domain-token prompt,
temperature 1, EOS ignored) as a tokenized corpus of pre-cut rows, optionally with the teacher's top-k
log-probs beside it, so ``finetune`` can replay it (``replay.source: <dir>``) without sampling.

Determinism and resuming: rows are sampled in chunks of ``batch_size``; chunk i uses rows i·batch_size.. of the
domain round-robin and a generator seeded from (seed, i), exactly as refill i of
:class:`selfreplay.replay.SelfGeneratedReplay` with ``buffer × batch_size = batch_size`` (same device and decode
mode). Finished chunks are kept in ``<out_dir>.partial/``, so an interrupted run continues where it stopped and
gives the same bytes; ``<out_dir>`` appears, by one rename, only when complete.

``replay_stats`` reports teacher NLL, distinct-n, domain coverage and n-gram overlap with a real corpus.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from selfreplay.checkpoint import atomic_write, atomic_write_json
from selfreplay.data import Corpus, CorpusMeta, token_dtype, write_corpus
from selfreplay.errors import SelfReplayError
from selfreplay.losses import position_weights, token_nll
from selfreplay.replay import (LOGPROB_INDICES, LOGPROB_VALUES, REPLAY_INFO, _check_domains, _model_config,
                               domain_prompts, eos_loss_mask, read_replay_info)
from selfreplay.sampling import Sampler, check_sampling_args, make_generator
from selfreplay.tokenizer import domain_token_name

PathLike = Union[str, os.PathLike]
JOB_FILE = "job.json"
REPLAY_FORMAT_VERSION = 1
LOGPROB_DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's weights (names, dtypes, shapes, bytes): ties a replay corpus to its teacher."""
    h = hashlib.sha256()
    state = getattr(model, "_orig_mod", model).state_dict()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _chunk_path(work: Path, index: int) -> Path:
    return work / f"chunk_{index:06d}.npz"


def _save_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(path, buf.getvalue())


def _load_chunk(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError) as e:
        raise SelfReplayError(f"{path}: corrupt chunk ({str(e).splitlines()[0]}); delete it to resample it") from None


def run_chunked_job(out: Path, settings: dict, num_sequences: int, chunk_rows: int, make_chunk,
                    resume: bool = True, progress: bool = True, no_resume_hint: str = "resume=False"
                    ) -> tuple[Path, int]:
    """Write ``num_sequences`` rows as chunks of ``chunk_rows`` into ``<out>.partial/``, resumably.

    ``settings`` (saved there as job.json) must match an interrupted run's to continue it; ``resume=False``
    discards that run instead. ``make_chunk(i, n)`` returns chunk i's arrays (n rows); chunks already on disk are
    skipped. Returns (the work directory, the number of chunks).
    """
    work = out.with_name(out.name + ".partial")
    job = work / JOB_FILE
    if work.exists() and not resume:
        shutil.rmtree(work)
    if work.exists():
        try:
            saved = json.loads(job.read_text(encoding="utf-8")) if job.is_file() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            saved = None
        if saved != settings:
            changed = [key for key in settings if saved is None or saved.get(key) != settings[key]]
            raise SelfReplayError(f"generate: {work} holds an interrupted run with other settings "
                                  f"({', '.join(changed)}); delete it or pass {no_resume_hint}")
    else:
        work.mkdir(parents=True)
        atomic_write_json(job, settings)

    num_chunks = math.ceil(num_sequences / chunk_rows)
    rows_of = [min(chunk_rows, num_sequences - i * chunk_rows) for i in range(num_chunks)]
    done = sum(rows_of[i] for i in range(num_chunks) if _chunk_path(work, i).is_file())
    with tqdm(total=num_sequences, initial=done, unit="seq", desc=f"generate {out.name}",
              disable=not progress) as bar:
        for i in range(num_chunks):
            if _chunk_path(work, i).is_file():
                continue
            _save_chunk(_chunk_path(work, i), make_chunk(i, rows_of[i]))
            bar.update(rows_of[i])
    return work, num_chunks


def publish_corpus(staging: Path, out: Path, work: Path) -> None:
    """Rename the finished ``staging`` directory to ``out`` (never over an existing one), then drop ``work``."""
    if out.exists():
        raise SelfReplayError(f"generate: {out} appeared while generating; not overwriting it (chunks kept in {work})")
    os.replace(staging, out)
    shutil.rmtree(work, ignore_errors=True)


def generate_replay_corpus(model, out_dir: PathLike, num_sequences: int, domains: Sequence[int],
                           context: Optional[int] = None, batch_size: int = 256, temperature: float = 1.0,
                           top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Optional[int] = None,
                           stop_at_eos: Optional[bool] = None, pad_id: int = 0, seed: int = 0,
                           logprobs_top_k: Optional[int] = None, logprobs_dtype: str = "float32",
                           tokenizer_fingerprint: str = "", vocab_size: Optional[int] = None,
                           source: Optional[str] = None, device=None, decode: str = "auto",
                           autocast_dtype: Optional[torch.dtype] = None, progress: bool = True,
                           resume: bool = True) -> CorpusMeta:
    """Sample ``num_sequences`` rows of ``context`` tokens from ``model`` into the corpus ``out_dir``.

    Each row starts with one of ``domains`` (round-robin) and is sampled at ``temperature`` (optionally top-k /
    top-p). EOS is an ordinary token unless ``stop_at_eos`` (default: whether ``eos_id`` is given, as in
    :class:`~selfreplay.replay.SelfGeneratedReplay`); then a row ends at its first EOS, padded with ``pad_id``.
    ``batch_size`` rows are sampled at once (the last chunk is cut short). With ``logprobs_top_k`` the
    teacher's k largest temperature-1 log-probs per position are stored too (``logprobs_dtype`` float32 or
    float16), and replaying the corpus needs no teacher pass. ``source`` describes the teacher (e.g. its
    checkpoint directory) for the metadata. ``resume=False`` discards an interrupted run's chunks.
    Returns the written corpus's metadata.
    """
    out = Path(out_dir)
    cfg = _model_config(model)
    vocab_size = vocab_size if vocab_size is not None else getattr(cfg, "vocab_size", None)
    if vocab_size is None:
        raise SelfReplayError("generate: vocab_size unknown (the model has no config); pass vocab_size")
    context = context if context is not None else getattr(cfg, "context", None)
    if context is None or context < 2:
        raise SelfReplayError(f"generate: context={context}: must be at least 2 (domain token + one sample)")
    if cfg is not None and context > cfg.context:
        raise SelfReplayError(f"generate: context={context} exceeds the model context {cfg.context}")
    if num_sequences < 1:
        raise SelfReplayError(f"generate: num_sequences={num_sequences}: must be positive")
    if batch_size < 1:
        raise SelfReplayError(f"generate: batch_size={batch_size}: must be positive")
    if seed < 0:
        raise SelfReplayError(f"generate: seed={seed}: must be >= 0")
    domains = _check_domains(domains, vocab_size)
    for d in domains:
        domain_token_name(d)  # corpora keep domain tokens in 0..9
    stop_at_eos = eos_id is not None if stop_at_eos is None else stop_at_eos
    if stop_at_eos and eos_id is None:
        raise SelfReplayError("generate: stop_at_eos needs eos_id (the tokenizer's EOS token id)")
    check_sampling_args(temperature, top_k, top_p, logprobs_top_k)
    if logprobs_dtype not in LOGPROB_DTYPES:
        raise SelfReplayError(f"generate: logprobs_dtype={logprobs_dtype!r}: expected float32 or float16")
    if out.exists():
        raise SelfReplayError(f"generate: {out} already exists; remove it or choose another output directory")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    sampler = Sampler(model, decode)
    chunk_rows = min(batch_size, num_sequences)
    k = None if logprobs_top_k is None else min(logprobs_top_k, vocab_size)
    settings = {
        "format_version": REPLAY_FORMAT_VERSION, "num_sequences": num_sequences, "context": context,
        "domains": domains, "chunk_rows": chunk_rows, "seed": seed, "temperature": temperature, "top_k": top_k,
        "top_p": top_p, "eos_id": eos_id if stop_at_eos else None, "pad_id": pad_id, "prompt_length": 1,
        "logprobs_top_k": k, "logprobs_dtype": logprobs_dtype if k is not None else None,
        "vocab_size": vocab_size, "tokenizer_fingerprint": tokenizer_fingerprint, "device": device.type,
        "decode": sampler.mode(device), "autocast_dtype": str(autocast_dtype) if autocast_dtype else None,
        "teacher_sha256": weights_fingerprint(model), "teacher": source,
    }

    tok_dtype = np.dtype(token_dtype(vocab_size))
    torch_lp, np_lp = LOGPROB_DTYPES[logprobs_dtype]

    def sample_chunk(i: int, n: int) -> dict[str, np.ndarray]:
        prompts = domain_prompts(domains, i * chunk_rows, chunk_rows, device)
        autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
                    else contextlib.nullcontext())
        with autocast:
            s = sampler.sample(prompts, context, temperature, top_k, top_p, eos_id if stop_at_eos else None,
                               pad_id, make_generator(seed, i, device), k is not None, k, torch_lp)
        arrays = {"tokens": s.tokens[:n].cpu().numpy().astype(tok_dtype)}
        if k is not None:
            top = s.teacher_logprobs
            arrays["values"] = top.values[:n].cpu().numpy().astype(np_lp)  # type: ignore[union-attr]
            arrays["indices"] = top.indices[:n].cpu().numpy().astype(np.int32)  # type: ignore[union-attr]
        return arrays

    work, num_chunks = run_chunked_job(out, settings, num_sequences, chunk_rows, sample_chunk, resume=resume,
                                       progress=progress, no_resume_hint="resume=False")
    return _assemble(out, work, settings, num_chunks, tokenizer_fingerprint, vocab_size, eos_id, source)


def _assemble(out: Path, work: Path, settings: dict, num_chunks: int, tokenizer_fingerprint: str,
              vocab_size: int, eos_id: Optional[int], source: Optional[str]) -> CorpusMeta:
    """Join the chunks into ``<work>/corpus`` (tokens, log-probs, replay.json), then rename it to ``out``."""
    staging = work / "corpus"
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted assembly
    chunks = [_load_chunk(_chunk_path(work, i)) for i in range(num_chunks)]
    tokens = np.concatenate([c["tokens"] for c in chunks])
    N, T = settings["num_sequences"], settings["context"]
    if tokens.shape != (N, T):
        raise SelfReplayError(f"generate: chunks in {work} hold {tokens.shape} tokens, expected ({N}, {T}); "
                              f"delete {work} and start again")
    meta = CorpusMeta(num_tokens=int(tokens.size), dtype=token_dtype(vocab_size), vocab_size=vocab_size,
                      tokenizer_fingerprint=tokenizer_fingerprint, domain_token=settings["domains"][0],
                      eos_token=eos_id, source=[f"selfreplay generate from {source or 'a model'} "
                                                f"(weights sha256 {settings['teacher_sha256'][:16]})"],
                      name=out.name, sequence_length=T)
    meta = write_corpus(tokens, staging, meta)
    if settings["logprobs_top_k"] is not None:
        for key, name in (("values", LOGPROB_VALUES), ("indices", LOGPROB_INDICES)):
            first = chunks[0][key]
            arr = np.lib.format.open_memmap(staging / name, mode="w+", dtype=first.dtype,
                                            shape=(N, T, first.shape[-1]))
            start = 0
            for c in chunks:
                arr[start:start + len(c[key])] = c[key]
                start += len(c[key])
            arr.flush()
            del arr
    info = {k: v for k, v in settings.items() if k not in ("vocab_size", "tokenizer_fingerprint")}
    atomic_write_json(staging / REPLAY_INFO, info)
    publish_corpus(staging, out, work)
    return meta


# ------------------------------------------------------------------------------------------------ replay quality

NGRAM_ORDERS = (1, 2, 3, 4)


def _ngram_keys(windows: np.ndarray, vocab_size: int) -> np.ndarray:
    """One comparable key per n-gram row of ``windows`` [M, n]: an exact int64 when V^n fits, else raw bytes."""
    n = windows.shape[1]
    if vocab_size ** n < 2 ** 63:
        keys = np.zeros(len(windows), dtype=np.int64)
        for j in range(n):
            keys = keys * vocab_size + windows[:, j].astype(np.int64)
        return keys
    w = np.ascontiguousarray(windows.astype(np.int64))
    return w.view(np.dtype((np.void, 8 * n))).ravel()


def _row_ngrams(rows: np.ndarray, lengths: np.ndarray, n: int, vocab_size: int) -> np.ndarray:
    """Keys of all n-grams inside each row's first ``lengths[i]`` tokens (rows [N, L])."""
    if rows.shape[1] < n:
        return _ngram_keys(np.empty((0, n), dtype=np.int64), vocab_size)
    windows = np.lib.stride_tricks.sliding_window_view(rows, n, axis=1)  # [N, L-n+1, n]
    keep = np.arange(windows.shape[1])[None, :] + n <= lengths[:, None]
    return _ngram_keys(windows[keep], vocab_size)


def _replay_rows(replay) -> tuple[np.ndarray, Optional[torch.Tensor], int, str]:
    """(rows [N, T] int64, loss mask or None, vocab size, description) of a replay corpus or array."""
    if isinstance(replay, (np.ndarray, torch.Tensor)):
        rows = np.asarray(replay.cpu() if isinstance(replay, torch.Tensor) else replay).astype(np.int64)
        if rows.ndim != 2 or rows.shape[1] < 2:
            raise SelfReplayError(f"replay_stats: expected rows [N, T>=2], got shape {rows.shape}")
        return rows, None, int(rows.max()) + 1, f"{len(rows)} rows"
    corpus = replay if isinstance(replay, Corpus) else Corpus.open(replay)
    T = corpus.meta.sequence_length
    if T is None:
        raise SelfReplayError(f"replay_stats: {corpus.path} is a flat corpus, not a replay corpus of rows")
    rows = np.asarray(corpus.tokens).reshape(-1, T).astype(np.int64)
    info = read_replay_info(corpus.path) or {}
    mask = None
    if info.get("eos_id") is not None:
        mask = eos_loss_mask(torch.from_numpy(rows), int(info["eos_id"]), int(info.get("prompt_length", 1)))
    return rows, mask, corpus.meta.vocab_size, str(corpus.path)


def _real_rows(real, max_tokens: Optional[int]) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows, lengths, vocab size) of a real corpus's text: one row for a flat stream, else its rows without
    their domain token; only the first ``max_tokens`` tokens."""
    corpus = real if isinstance(real, Corpus) else Corpus.open(real)
    tokens = np.asarray(corpus.tokens[:max_tokens] if max_tokens else corpus.tokens).astype(np.int64)
    T = corpus.meta.sequence_length
    if T is None:
        return tokens[None, :], np.array([len(tokens)]), corpus.meta.vocab_size
    rows = tokens[: len(tokens) // T * T].reshape(-1, T)[:, 1:]
    return rows, np.full(len(rows), T - 1), corpus.meta.vocab_size


@torch.no_grad()
def _teacher_nll(model, rows: np.ndarray, mask: Optional[torch.Tensor], batch_size: int, device) -> float:
    """Mean teacher NLL per predicted token (masked padding excluded)."""
    total, count = 0.0, 0.0
    for start in range(0, len(rows), batch_size):
        tokens = torch.from_numpy(rows[start:start + batch_size]).to(device)
        m = None if mask is None else mask[start:start + batch_size].to(device)
        weights = position_weights(tokens.shape, m, device)
        nll = token_nll(model(tokens), tokens)
        total += float((nll * weights).sum())
        count += float(weights.sum())
    return total / max(count, 1.0)


def replay_stats(replay, teacher=None, real=None, max_sequences: Optional[int] = None,
                 max_real_tokens: Optional[int] = None, batch_size: int = 64, device=None) -> dict:
    """Quality numbers of a replay corpus (a directory, a Corpus, or rows [N, T]).

    - ``teacher_nll``: the teacher's mean NLL per sampled token (needs ``teacher``; ≈ its entropy rate on its
      own samples at temperature 1), and ``teacher_ppl`` = exp of it;
    - ``distinct_n`` (n = 1..4): distinct n-grams / all n-grams of the sampled tokens (the domain token and
      padding after EOS left out; n-grams do not cross rows);
    - ``domains``: fraction of rows starting with each domain token;
    - ``overlap_n`` (with ``real``, a corpus directory): the fraction of the replay's n-gram occurrences that
      also occur somewhere in the real corpus (its first ``max_real_tokens`` tokens).
    ``max_sequences`` uses only the first rows.
    """
    rows, mask, vocab_size, what = _replay_rows(replay)
    if max_sequences is not None:
        if max_sequences < 1:
            raise SelfReplayError(f"replay_stats: max_sequences={max_sequences}: must be positive")
        rows = rows[:max_sequences]
        mask = None if mask is None else mask[:max_sequences]
    N, T = rows.shape
    # sampled tokens of each row: positions 1 .. (last unmasked position)
    lengths = np.full(N, T - 1) if mask is None else mask[:, 1:].sum(1).numpy().astype(np.int64)
    body = rows[:, 1:]
    first, counts = np.unique(rows[:, 0], return_counts=True)
    stats: dict = {"replay": what, "num_sequences": int(N), "sequence_length": int(T),
                   "sampled_tokens": int(lengths.sum()),
                   "domains": {str(int(d)): float(c) / N for d, c in zip(first, counts)}}
    stats["teacher_nll"] = stats["teacher_ppl"] = None
    if teacher is not None:
        device = torch.device(device) if device is not None else next(teacher.parameters()).device
        nll = _teacher_nll(teacher, rows, mask, batch_size, device)
        stats["teacher_nll"], stats["teacher_ppl"] = nll, math.exp(min(nll, 700.0))
    if real is not None:
        real_rows, real_lengths, real_vocab = _real_rows(real, max_real_tokens)
        vocab_size = max(vocab_size, real_vocab)
    for n in NGRAM_ORDERS:
        keys = _row_ngrams(body, lengths, n, vocab_size)
        stats[f"distinct_{n}"] = float(len(np.unique(keys)) / len(keys)) if len(keys) else None
        if real is not None:
            real_keys = np.unique(_row_ngrams(real_rows, real_lengths, n, vocab_size))
            stats[f"overlap_{n}"] = float(np.isin(keys, real_keys).mean()) if len(keys) else None
    stats["real"] = None if real is None else str(getattr(real, "path", real))
    return stats


def format_replay_stats(stats: dict) -> str:
    """A plain-text table of :func:`replay_stats` output."""
    def num(v, fmt="{:.4f}") -> str:
        return "-" if v is None else fmt.format(v)

    lines = [f"replay corpus      {stats['replay']}",
             f"sequences          {stats['num_sequences']} x {stats['sequence_length']} tokens "
             f"({stats['sampled_tokens']} sampled)"]
    if stats.get("teacher_nll") is not None:
        ppl = num(stats["teacher_ppl"], "{:.2f}")
        lines.append(f"teacher NLL/token  {num(stats['teacher_nll'])} (perplexity {ppl})")
    domains = "  ".join(f"{d}: {100 * f:.1f}%" for d, f in sorted(stats["domains"].items(), key=lambda x: int(x[0])))
    lines.append(f"domain coverage    {domains}")
    has_real = stats.get("real") is not None
    lines.append("")
    lines.append("n   distinct-n" + ("   overlap with real" if has_real else ""))
    for n in NGRAM_ORDERS:
        row = f"{n:<3} {num(stats.get(f'distinct_{n}')):>10}"
        if has_real:
            row += f"   {num(stats.get(f'overlap_{n}')):>17}"
        lines.append(row)
    if has_real:
        lines.append(f"(real corpus: {stats['real']})")
    return "\n".join(lines)
