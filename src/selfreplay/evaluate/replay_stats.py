"""Quality numbers of a replay corpus: teacher NLL, distinct-n, domain coverage, n-gram overlap with real data
(``selfreplay replay-stats``)."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from selfreplay.data.corpus import Corpus
from selfreplay.errors import SelfReplayError
from selfreplay.replay.losses import token_nll
from selfreplay.replay.prompts import eos_loss_mask, prompt_mask
from selfreplay.replay.sources import read_replay_info

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
    prompt_length = int(info.get("prompt_length", 1))
    if info.get("eos_id") is not None:
        mask = eos_loss_mask(torch.from_numpy(rows), int(info["eos_id"]), prompt_length)
    else:
        mask = prompt_mask(len(rows), T, prompt_length)
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
        weights = torch.ones(tokens.shape[0], tokens.shape[1] - 1, device=device) if m is None else m[:, 1:]
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
