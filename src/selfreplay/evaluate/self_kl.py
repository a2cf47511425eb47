"""A forgetting meter that needs no old data: KL(teacher ‖ model) on sequences the teacher samples itself.

``selfreplay eval MODEL --self N`` samples N sequences from the teacher (the model MODEL started from, or
``--teacher``) exactly as self-generated replay does — prompted only by BOS / the chat prefix (Hugging Face) or
the teacher's domain token (built-in GPT), temperature 1 — and reports the per-token KL(teacher ‖ model) on them,
with a bootstrap confidence interval over sequences. It is the quantity a forgetting budget
(``replay.target_kl``) controls: how much worse the model has become at the teacher's own distribution.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch

from selfreplay.errors import SelfReplayError
from selfreplay.models import CausalLM, Teacher
from selfreplay.progress import progress


def teacher_samples(teacher: Teacher, num_sequences: int, length: Optional[int], prompt: str = "bos",
                    domains: Sequence[int] = (), batch_size: int = 8, seed: int = 0, tokenizer=None,
                    keep_targets: bool = True) -> list:
    """``num_sequences`` rows sampled from ``teacher`` at temperature 1 (ReplayBatches of ``batch_size``, with the
    teacher's logits kept when ``keep_targets`` and they fit: they are the KL targets; else the teacher runs again
    when the KL is scored)."""
    from selfreplay.replay.prompts import Prompts, tokenizer_prompt
    from selfreplay.replay.sources import SelfGeneratedReplay

    module = teacher.module
    if module.kind == "gpt":
        if not domains:
            corpus = module.info.get("train_corpus") or {}
            if corpus.get("domain_token") is None:
                raise SelfReplayError("eval --self: the teacher's run.json records no domain token; pass --domain")
            domains = [corpus["domain_token"]]
        prompts = Prompts.domains(domains, module.vocab_size, "eval --domain")
        length = length or module.context
    else:
        if domains:
            raise SelfReplayError("eval --domain: applies to built-in GPT runs only (a Hugging Face teacher is "
                                  "prompted by --prompt)")
        if tokenizer is None:
            raise SelfReplayError("eval --self: a Hugging Face teacher needs its tokenizer")
        prompts = Prompts([tokenizer_prompt(tokenizer, prompt)])
        length = length or 512
    batches = math.ceil(num_sequences / batch_size)
    keep, cap = module.kind == "gpt" or module.vocab_size < 32768, 1 << 30
    _check_sampling_memory(module, batches * batch_size, length, keep, cap, teacher.device, num_sequences)
    source = SelfGeneratedReplay(teacher, prompts, batch_size, length, buffer=batches, seed=seed,
                                 keep_targets=keep_targets and keep, max_targets_bytes=cap)
    return [source.next_batch() for _ in range(batches)]


def _check_sampling_memory(module, rows: int, length: int, keep: bool, cap: int, device, num_sequences: int) -> None:
    """All the sequences are sampled at once: refuse, before allocating, a number that cannot fit."""
    from selfreplay.train.memory import Part, check_fits, model_shape, sampling_bytes

    shape = model_shape(module)
    kept = rows * length * shape.vocab * 4 if keep else 0
    needed = sampling_bytes(shape, rows, length, kept if kept <= cap else 0, low=False)
    check_fits([Part("the teacher's samples", needed, [("eval --self", num_sequences, 1)])], device, "sampling")


@torch.no_grad()
def per_sequence_kl(model: CausalLM, teacher: Teacher, batches: list, device, autocast,
                    chunk_size: Optional[int] = None, bar=None) -> tuple[np.ndarray, np.ndarray]:
    """(Σ KL over each sequence's target positions, its number of target positions), one entry per sequence; one
    forward of the model per batch, and of the teacher where the batch kept no targets."""
    from selfreplay.replay.penalty import ReplayPenalty

    penalty = ReplayPenalty("kl", 1.0, teacher, source=object(), chunk_size=chunk_size)
    sums, counts = [], []
    for batch in batches:
        batch = batch.to(device)
        mask = batch.mask()
        with autocast():
            targets = penalty.teacher_targets(batch, device)
            row_sums = model(batch.tokens, position_ids=batch.position_ids, head_fn=_row_kl_sums, tokens=batch.tokens,
                             mask=mask, targets=targets, chunk_size=chunk_size)
        sums += row_sums.tolist()
        counts += mask[:, 1:].sum(1).tolist()
        if bar is not None:
            bar.update(len(batch))
    return np.array(sums, dtype=float), np.array(counts, dtype=float)


def _row_kl_sums(hidden: torch.Tensor, head, tokens: torch.Tensor, mask: torch.Tensor, targets: dict,
                 chunk_size: Optional[int]) -> torch.Tensor:
    """Σ KL(teacher || model) over each row's target positions [B] (inside the model's forward: its head)."""
    from selfreplay.replay.losses import divergence_sum

    def row(value, r: int):
        return value[r:r + 1] if not callable(value) else value  # the teacher's head is shared by the rows

    return torch.stack([divergence_sum(hidden[r:r + 1], head, tokens[r:r + 1], mask[r:r + 1], chunk_size=chunk_size,
                                       **{k: row(v, r) for k, v in targets.items()}).float()
                        for r in range(len(tokens))])


def bootstrap_ratio(sums: np.ndarray, counts: np.ndarray, confidence: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """Σ sums / Σ counts and its percentile bootstrap interval, resampling sequences with replacement."""
    estimate = float(sums.sum() / counts.sum())
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), size=(resamples, len(sums)))
    ratios = sums[picks].sum(1) / np.maximum(counts[picks].sum(1), 1.0)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return estimate, float(low), float(high)


def self_kl_report(models: Sequence[str], num_sequences: int, teacher: Optional[str] = None,
                   length: Optional[int] = None, prompt: str = "bos", domains: Sequence[int] = (),
                   batch_size: int = 8, seed: int = 0, device: str = "auto", dtype: str = "auto",
                   confidence: float = 0.95, show_progress: bool = True, precision: str = "auto") -> list[dict]:
    """One row per model: the data-free forgetting estimate (per-token KL on the teacher's samples) with its
    bootstrap interval. Samples are drawn once per teacher (same seed: every model sees the same sequences).

    The KL targets are those training uses: under bf16 autocast (``precision``; by default on CUDA) the teacher
    runs again under the same autocast as the model (the kept fp32 sampling logits against a bf16 model would read
    a KL floor, 4e-5, at model = teacher); in full precision the sampling logits are kept."""
    from selfreplay.evaluate.report import load_for_eval, teacher_of
    from selfreplay.models import hf_path
    from selfreplay.train.distributed import resolve_device
    from selfreplay.train.optim import autocast_for, low_precision

    if num_sequences < 2:
        raise SelfReplayError(f"eval --self={num_sequences}: give at least 2 sequences (for the interval)")
    dev = resolve_device(device)
    autocast = autocast_for(dev, precision)
    keep_targets = not low_precision(dev, precision)
    samples: dict[str, tuple[Teacher, list]] = {}
    rows = []
    bar = progress(len(models) * num_sequences, "eval --self", "sequences", show_progress)
    for name in models:
        model = load_for_eval(name, dev, dtype)
        teacher_name = teacher or teacher_of(model)
        if not teacher_name:
            raise SelfReplayError(f"eval --self: {name} records no model it started from; pass --teacher")
        if teacher_name not in samples:
            t = Teacher(load_for_eval(teacher_name, dev, dtype).requires_grad_(False))
            tokenizer = None
            if t.module.kind == "hf":
                from selfreplay.models.hf import load_tokenizer

                tokenizer = load_tokenizer(hf_path(teacher_name))
            samples[teacher_name] = t, teacher_samples(t, num_sequences, length, prompt, domains, batch_size, seed,
                                                       tokenizer, keep_targets)
        t, batches = samples[teacher_name]
        if t.module.vocab_size != model.vocab_size:
            raise SelfReplayError(f"teacher {teacher_name} has vocabulary {t.module.vocab_size}, model {name} has "
                                  f"{model.vocab_size}; KL needs the same tokenizer")
        chunk = 1024 if model.vocab_size >= 32768 else None
        sums, counts = per_sequence_kl(model, t, batches, dev, autocast, chunk, bar)
        sums, counts = sums[:num_sequences], counts[:num_sequences]
        kl, low, high = bootstrap_ratio(sums, counts, confidence, seed=seed)
        rows.append({"model": name, "teacher": teacher_name, "self_kl": kl, "ci_low": low, "ci_high": high,
                     "confidence": confidence, "sequences": int(len(sums)), "tokens": int(counts.sum())})
    bar.close()
    return rows


def format_self_kl(rows: list[dict]) -> str:
    lines = [f"{'model':<40} {'KL(teacher||model) on its samples':>34}  {'sequences':>9}"]
    for r in rows:
        interval = f"{r['self_kl']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]"
        lines.append(f"{r['model']:<40} {interval:>34}  {r['sequences']:>9}")
    lines.append(f"(nats per token; {rows[0]['confidence']:.0%} bootstrap interval over sequences)" if rows else "")
    return "\n".join(lines)


def _ranks(values: list[float]) -> "np.ndarray":
    """Ranks 1..n, ties sharing their mean rank."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    order = v.argsort(kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(1, len(v) + 1)
    for value in np.unique(v):
        ranks[v == value] = ranks[v == value].mean()
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson's on the ranks)."""
    import numpy as np

    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def compare_with_held_out(self_rows: list[dict], rows: list[dict]) -> list[str]:
    """How the data-free estimate ranks the models against each held-out data set of ``selfreplay eval`` (3+ models):
    Spearman's ρ with the real KL and with the loss increase, and the median ratio data-free / real KL."""
    import numpy as np

    estimate = {r["model"]: r["self_kl"] for r in self_rows}
    lines = []
    for data in dict.fromkeys(r["data"] for r in rows):
        held = [r for r in rows if r["data"] == data and r["model"] in estimate and r.get("kl") is not None]
        if len(held) < 3:
            continue
        free = [estimate[r["model"]] for r in held]
        ratio = float(np.median([f / r["kl"] for f, r in zip(free, held) if r["kl"] > 0]))
        with_kl, with_loss = spearman(free, [r["kl"] for r in held]), spearman(free, [r["delta"] for r in held])
        lines.append(f"data-free vs held-out {data} ({len(held)} models): Spearman ρ {with_kl:.3f} with its KL, "
                     f"{with_loss:.3f} with its loss increase; data-free / held-out KL: median {ratio:.2f}")
    return lines
