"""The forgetting report behind ``selfreplay eval``: each checkpoint against its teacher, on each corpus."""

from __future__ import annotations

import os
from typing import Optional

from selfreplay.checkpoint import load_model
from selfreplay.config import DataConfig
from selfreplay.data import BatchLoader, Corpus
from selfreplay.errors import SelfReplayError
from selfreplay.metrics import evaluate
from selfreplay.trainer import autocast_for, resolve_device


def _split_for(corpus_path: str, infos: list[dict], valid_tokens: Optional[int], split_seed: Optional[int]):
    """Validation split parameters: explicit options, else those recorded by a run that trained on the corpus."""
    recorded = next((spec for info in infos for spec in (info.get("train_corpus"), info.get("teacher_corpus"))
                     if spec and os.path.abspath(spec["path"]) == os.path.abspath(corpus_path)), None)
    default_tokens = recorded["valid_tokens"] if recorded else DataConfig().valid_tokens
    default_seed = recorded["split_seed"] if recorded else 0
    return (valid_tokens if valid_tokens is not None else default_tokens,
            split_seed if split_seed is not None else default_seed)


def forgetting_report(checkpoints: list[str], corpora: list[str], teacher: Optional[str] = None,
                      valid_tokens: Optional[int] = None, split_seed: Optional[int] = None,
                      max_tokens: Optional[int] = None, batch_size: int = 64, device: str = "auto") -> list[dict]:
    """One row per (checkpoint, corpus): loss, second-half loss, the teacher's loss, their difference and KL."""
    dev = resolve_device(device)
    autocast = autocast_for(dev, "auto")
    rows = []
    teachers: dict[str, tuple] = {}
    for path in checkpoints:
        model, info = load_model(path, dev)
        model.eval()
        teacher_path = teacher or info.get("init_from")
        teacher_model = teacher_info = None
        if teacher_path:
            if teacher_path not in teachers:
                teachers[teacher_path] = load_model(teacher_path, dev)
            teacher_model, teacher_info = teachers[teacher_path]
            teacher_model.eval()
            if teacher_model.config.vocab_size != model.config.vocab_size:
                raise SelfReplayError(f"teacher {teacher_path} has vocab {teacher_model.config.vocab_size}, "
                                      f"checkpoint {path} has {model.config.vocab_size}")
        for corpus_path in corpora:
            corpus = Corpus.open(corpus_path, vocab_size=model.config.vocab_size,
                                 tokenizer_fingerprint=info.get("tokenizer_fingerprint"))
            tokens, seed = _split_for(corpus_path, [i for i in (info, teacher_info) if i], valid_tokens, split_seed)
            loader = BatchLoader(corpus, model.config.context, 1, tokens, seed)  # only its validation split is used
            metrics = evaluate(model, loader.valid_batches(batch_size, max_tokens), teacher_model, dev, autocast)
            row = {"checkpoint": path, "corpus": corpus.meta.name or corpus_path, "loss": metrics["loss"],
                   "loss_second_half": metrics["loss_second_half"]}
            if teacher_model is not None:
                row.update(teacher=teacher_path, teacher_loss=metrics["teacher_loss"],
                           delta=metrics["loss"] - metrics["teacher_loss"], kl=metrics["kl"])
            rows.append(row)
    return rows


def format_report(rows: list[dict]) -> str:
    """A plain-text table; ``delta`` > 0 on an old corpus is forgetting."""
    columns = [("checkpoint", "checkpoint"), ("corpus", "corpus"), ("loss", "loss"),
               ("loss_second_half", "loss 2nd half"), ("teacher_loss", "teacher loss"), ("delta", "delta"),
               ("kl", "KL(teacher||model)")]
    return text_table(rows, columns)


def text_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``rows`` as an aligned plain-text table of ``columns`` (key, header), leaving out columns no row has.

    Floats get 4 decimals (``delta`` signed); missing values are ``-``.
    """
    columns = [(k, h) for k, h in columns if any(k in r for r in rows)]
    cells = [[h for _, h in columns]] + [[_cell(r.get(k), signed=k == "delta") for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(v, signed: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:+.4f}" if signed else f"{v:.4f}"
    return str(v)
