"""``selfreplay eval --model``: how a Hugging Face model does on data files and benchmarks, and how far it drifted.

Per data file (any format of :mod:`selfreplay.hf_data`: text, chat messages, prompt/completion), on its target
tokens only (assistant replies for chats): the mean next-token loss, the next-token accuracy (argmax; the
paper's "Verilog accuracy", §5.9) and, given a teacher (the model before finetuning), the teacher's loss, the
difference (forgetting when > 0 on old data) and KL(teacher || model). Logits are computed ``chunk_size``
positions at a time, so a 128k vocabulary needs no [B, T, V] tensor.

Benchmarks: multiple-choice accuracy on local question files (:mod:`selfreplay.multiple_choice`; chat format
for models with a chat template, as in the paper), and lm-evaluation-harness tasks when it is installed.
"""

from __future__ import annotations

import importlib
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from selfreplay.errors import SelfReplayError
from selfreplay.evaluation import text_table

MCQ_FORMATS = ("auto", "chat", "plain")


@torch.no_grad()
def score_rows(model, rows, teacher=None, batch_size: int = 8, chunk_size: int = 1024,
               max_rows: Optional[int] = None, device=None) -> dict:
    """Loss, accuracy (and with a :class:`~selfreplay.hf_model.Teacher`: teacher loss, KL) on packed rows.

    ``rows`` is :class:`~selfreplay.hf_data.PackedRows`; only target tokens (``loss_mask``) count.
    """
    from selfreplay.hf_model import final_hidden_and_head

    if batch_size < 1 or chunk_size < 1:
        raise SelfReplayError(f"eval: batch_size={batch_size}, chunk_size={chunk_size}: must be positive")
    device = device if device is not None else next(model.parameters()).device
    n = len(rows) if max_rows is None else min(len(rows), max_rows)
    was_training = model.training
    model.eval()
    sums = {"nll": 0.0, "correct": 0.0, "teacher_nll": 0.0, "kl": 0.0}
    count = 0
    try:
        for start in range(0, n, batch_size):
            ids = rows.input_ids[start:min(start + batch_size, n)].to(device)
            targets_mask = rows.loss_mask[start:start + ids.shape[0], 1:].reshape(-1).to(device)
            picked = targets_mask.nonzero().squeeze(-1)
            if picked.numel() == 0:
                continue
            hidden, head = final_hidden_and_head(model, ids)
            flat_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            targets = ids[:, 1:].reshape(-1)
            if teacher is not None:
                teacher_hidden, teacher_head = teacher.hidden_and_head(ids)
                flat_teacher = teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1])
            for chunk in picked.split(chunk_size):
                logp = F.log_softmax(head(flat_hidden[chunk]).float(), dim=-1)
                y = targets[chunk]
                sums["nll"] -= float(logp.gather(-1, y[:, None]).sum())
                sums["correct"] += float((logp.argmax(-1) == y).sum())
                if teacher is not None:
                    t_chunk = flat_teacher[chunk.to(flat_teacher.device)]
                    t_logp = F.log_softmax(teacher_head(t_chunk).float(), dim=-1).to(device)
                    sums["teacher_nll"] -= float(t_logp.gather(-1, y[:, None]).sum())
                    sums["kl"] += float((t_logp.exp() * (t_logp - logp)).sum())
            count += int(picked.numel())
    finally:
        model.train(was_training)
    if count == 0:
        raise SelfReplayError("eval: the data has no target tokens")
    out = {"rows": n, "tokens": count, "loss": sums["nll"] / count, "accuracy": sums["correct"] / count}
    if teacher is not None:
        out.update(teacher_loss=sums["teacher_nll"] / count, kl=sums["kl"] / count)
        out["delta"] = out["loss"] - out["teacher_loss"]
    return out


def mcq_chat_format(tokenizer, mcq_format: str = "auto") -> bool:
    """Whether multiple-choice prompts use the chat format (``auto``: when the tokenizer has a chat template)."""
    if mcq_format not in MCQ_FORMATS:
        raise SelfReplayError(f"--mcq-format={mcq_format!r}: expected one of {', '.join(MCQ_FORMATS)}")
    return bool(getattr(tokenizer, "chat_template", None)) if mcq_format == "auto" else mcq_format == "chat"


def evaluate_hf(model, tokenizer, data: Sequence[str] = (), teacher=None, mcq: Sequence[str] = (),
                lm_eval_tasks: Sequence[str] = (), seq_len: int = 512, split: str = "test",
                text_field: str = "text", batch_size: int = 8, chunk_size: int = 1024,
                max_rows: Optional[int] = None, mcq_format: str = "auto", few_shot: int = 0,
                model_name: str = "model", teacher_name: Optional[str] = None) -> dict:
    """Everything ``selfreplay eval --model`` reports, on in-memory objects.

    ``teacher`` is a :class:`~selfreplay.hf_model.Teacher` (or None). Returns
    ``{"data": [row per data file], "mcq": [row per question file], "lm_eval": {task: metrics}}``.
    """
    from selfreplay.hf_data import prepare_hf_data
    from selfreplay.multiple_choice import lm_eval_harness, load_questions, multiple_choice_accuracy

    if not (data or mcq or lm_eval_tasks):
        raise SelfReplayError("eval --model: nothing to evaluate; give --data, --mcq and/or --lm-eval")
    report: dict = {"data": [], "mcq": [], "lm_eval": {}}
    for source in data:
        rows = prepare_hf_data(source, tokenizer, seq_len, split=split, text_field=text_field)
        metrics = score_rows(model, rows, teacher, batch_size, chunk_size, max_rows)
        row = {"model": model_name, "data": source, **metrics}
        if teacher is not None:
            row["teacher"] = teacher_name or "teacher"
        report["data"].append(row)
    chat = mcq_chat_format(tokenizer, mcq_format) if mcq else False
    for path in mcq:
        questions = load_questions(path, split=split)
        result = multiple_choice_accuracy(model, tokenizer, questions, batch_size=batch_size, few_shot=few_shot,
                                          chat=chat)
        report["mcq"].append({"model": model_name, "mcq": path, "format": "chat" if chat else "plain",
                              "n": result["n"], "accuracy": result["accuracy"]})
    if lm_eval_tasks:
        report["lm_eval"] = lm_eval_harness(model, tokenizer, list(lm_eval_tasks), batch_size=batch_size)
    return report


def hf_eval_report(model_name_or_path: str, data: Sequence[str] = (), teacher: Optional[str] = None,
                   dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False, **kwargs) -> dict:
    """Load the model (and teacher) from the hub or a directory, then :func:`evaluate_hf`."""
    from selfreplay.hf_model import Teacher, load_causal_lm, load_tokenizer, require_hf
    from selfreplay.trainer import resolve_device

    require_hf("transformers")
    if not (data or kwargs.get("mcq") or kwargs.get("lm_eval_tasks")):
        raise SelfReplayError("eval --model: nothing to evaluate; give --data, --mcq and/or --lm-eval")
    if kwargs.get("lm_eval_tasks"):
        require_lm_eval()  # before loading a model for nothing
    dev = resolve_device(device)
    model = load_causal_lm(model_name_or_path, dtype, dev, trust_remote_code).eval()
    tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
    teacher_obj = None
    if teacher:
        teacher_model = load_causal_lm(teacher, dtype, dev, trust_remote_code).eval().requires_grad_(False)
        vocab, teacher_vocab = (m.get_output_embeddings().weight.shape[0] for m in (model, teacher_model))
        if vocab != teacher_vocab:
            raise SelfReplayError(f"--teacher {teacher}: vocabulary {teacher_vocab} differs from the model's "
                                  f"({vocab}); KL needs the same tokenizer")
        teacher_obj = Teacher(teacher_model)
    return evaluate_hf(model, tokenizer, data, teacher_obj, model_name=model_name_or_path, teacher_name=teacher,
                       **kwargs)


def require_lm_eval() -> None:
    """A one-line error when lm-evaluation-harness is missing."""
    try:
        importlib.import_module("lm_eval")
    except ImportError:
        raise SelfReplayError("--lm-eval: lm-evaluation-harness is not installed: pip install 'lm_eval[hf]'") \
            from None


def format_hf_report(report: dict) -> str:
    """Plain-text tables of :func:`evaluate_hf`'s report; ``delta`` > 0 on old data is forgetting."""
    parts = []
    data_columns = [("data", "data"), ("tokens", "tokens"), ("loss", "loss"), ("accuracy", "accuracy"),
                    ("teacher_loss", "teacher loss"), ("delta", "delta"), ("kl", "KL(teacher||model)")]
    if report.get("data"):
        parts.append(text_table(report["data"], data_columns))
    if report.get("mcq"):
        parts.append(text_table(report["mcq"], [("mcq", "questions"), ("format", "format"), ("n", "n"),
                                            ("accuracy", "accuracy")]))
    if report.get("lm_eval"):
        rows = [{"task": task, "metric": metric.split(",")[0], "value": value}
                for task, metrics in report["lm_eval"].items() for metric, value in metrics.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in metric]
        parts.append(text_table(rows, [("task", "lm-eval task"), ("metric", "metric"), ("value", "value")]))
    return "\n\n".join(parts)
