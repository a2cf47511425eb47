"""``selfreplay eval``: how far a finetuned model drifted from its teacher, on old data, new data and benchmarks.

Models are run directories of either kind or Hugging Face ids / directories. Each is scored against its teacher
(``--teacher``, else the model its run started from) on held-out rows: loss, accuracy, the teacher's loss on the
same tokens, their difference (forgetting when > 0 on old data) and KL(teacher || model). Token corpora are split
as the run that trained on them recorded (their held-out rows); text / chat files are scored whole.
Multiple-choice files and lm-evaluation-harness tasks give benchmark accuracies.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from selfreplay.errors import SelfReplayError
from selfreplay.evaluate.metrics import TeacherCache, eval_chunk_size, score_models
from selfreplay.models import CausalLM, Teacher, load_model
from selfreplay.progress import progress


TEACHER_CACHE_MB = 1024  # as eval.teacher_cache_mb: a teacher's kept side of the sums, over the models scored on
# a text / chat file one after another


def _split_for(corpus_path: str, infos: list[dict], valid_tokens: Optional[int], split_seed: Optional[int]):
    """Validation split of a corpus: explicit options, else the one recorded by a run that trained on it."""
    from selfreplay.data.corpus import Corpus, corpus_identity

    ident = corpus_identity(Corpus.open(corpus_path).meta)
    recorded = next((spec for info in infos for key in ("train_corpus", "mix_corpus", "teacher_corpus",
                                                        "prev_corpus")
                     for spec in [info.get(key)] if spec and (spec.get("identity") == ident or os.path.abspath(
                         spec["path"]) == os.path.abspath(corpus_path))), None)
    tokens = valid_tokens if valid_tokens is not None else (recorded or {}).get("valid_tokens", 1_048_576)
    seed = split_seed if split_seed is not None else (recorded or {}).get("split_seed", 0)
    return int(tokens), int(seed)


def teacher_of(model: CausalLM) -> Optional[str]:
    """The model a run started from (its run.json), if recorded."""
    return model.info.get("init_from") or (model.info.get("model_name_or_path") if model.info.get("kind") ==
                                           "finetune" else None)


def load_for_eval(name: str, device, dtype: str) -> CausalLM:
    """A model in eval mode, with the run record of a selfreplay run directory of a Hugging Face model."""
    model = load_model(name, device, dtype)
    run_json = os.path.join(name, "run.json")
    if model.kind == "hf" and os.path.isfile(run_json):  # a selfreplay run directory of a Hugging Face model
        import json

        model.info.update(json.loads(open(run_json).read()))
    return model.eval()


def forgetting_report(models: Sequence[str], corpora: Sequence[str] = (), data: Sequence[str] = (),
                      teacher: Optional[str] = None, valid_tokens: Optional[int] = None,
                      split_seed: Optional[int] = None, max_tokens: Optional[int] = None, batch_size: int = 8,
                      seq_len: int = 512, split: str = "test", text_field: str = "text", device: str = "auto",
                      dtype: str = "auto", show_progress: bool = True) -> list[dict]:
    """One row per (model, data set): loss, second-half loss, accuracy, and against the teacher its loss, delta
    and KL. Built-in GPTs that share a teacher and a corpus's held-out rows are scored together, batch by batch:
    the teacher's forward and softmax run once per batch for all of them."""
    from selfreplay.train.distributed import resolve_device
    from selfreplay.train.optim import autocast_for

    if not (corpora or data):
        raise SelfReplayError("eval: nothing to score; give --corpus (token corpora) and/or --data (text / chat "
                              "files)")
    dev = resolve_device(device)
    autocast = autocast_for(dev, "auto")
    teachers: dict[str, CausalLM] = {}
    caches: dict[str, TeacherCache] = {}  # per teacher: its side of the sums, for every model scored against it
    rows: dict[tuple[str, str], dict] = {}  # (model, data set) -> its row
    bar = progress(len(models) * (len(corpora) + len(data)), "eval", "sets", show_progress)

    def teacher_for(name: str, model: CausalLM) -> tuple[Optional[str], Optional[Teacher]]:
        teacher_name = teacher or teacher_of(model)
        if not teacher_name:
            return None, None
        if teacher_name not in teachers:
            teachers[teacher_name] = load_for_eval(teacher_name, dev, dtype).requires_grad_(False)
        t = teachers[teacher_name]
        if t.vocab_size != model.vocab_size:
            raise SelfReplayError(f"teacher {teacher_name} has vocabulary {t.vocab_size}, model {name} has "
                                  f"{model.vocab_size}; KL needs the same tokenizer")
        return teacher_name, Teacher(t)

    def run(group: list[tuple[str, CausalLM]], teacher_name, teacher_obj, label: str, loader, cache=None) -> None:
        vocab = group[0][1].vocab_size
        chunk = eval_chunk_size(vocab, dev, 1024 if vocab >= 32768 else None)
        scored = score_models([m for _, m in group], loader.valid_batches(batch_size, max_tokens), teacher_obj, dev,
                              autocast, chunk, teacher_cache=cache, cache_key=label, same_shape=False)
        for (name, _), metrics in zip(group, scored):
            row = {"model": name, "data": label, "loss": metrics["loss"],
                   "loss_second_half": metrics["loss_second_half"], "accuracy": metrics["accuracy"]}
            if teacher_obj is not None:
                row.update(teacher=teacher_name, teacher_loss=metrics["teacher_loss"],
                           delta=metrics["loss"] - metrics["teacher_loss"], kl=metrics["kl"])
            rows[(name, label)] = row
            bar.update(1)

    if corpora:  # built-in GPTs: all loaded, those with one teacher and one held-out split scored together
        groups: dict[tuple, list] = {}
        for name in dict.fromkeys(models):  # a model named twice is scored once (and listed twice)
            model = load_for_eval(name, dev, dtype)
            teacher_name, teacher_obj = teacher_for(name, model)
            for label, split_key, loader in _corpus_sets(model, name, teacher_obj, corpora, valid_tokens, split_seed):
                groups.setdefault((teacher_name, label, split_key), [[], teacher_obj, loader])[0].append((name, model))
        for (teacher_name, label, _), (group, teacher_obj, loader) in groups.items():
            run(group, teacher_name, teacher_obj, label, loader)
        del groups
    for name in models if data else ():  # Hugging Face models, one at a time
        model = load_for_eval(name, dev, dtype)
        teacher_name, teacher_obj = teacher_for(name, model)
        cache = None
        if teacher_obj is not None and dev.type == "cpu":
            cache = caches.setdefault(teacher_name, TeacherCache(TEACHER_CACHE_MB << 20))
        for label, loader in _data_sets(model, name, data, batch_size, seq_len, split, text_field):
            run([(name, model)], teacher_name, teacher_obj, label, loader, cache)
    bar.close()
    labels = list(dict.fromkeys(label for _, label in rows))  # the data sets, in the order they were given
    return [rows[(name, label)] for name in models for label in labels if (name, label) in rows]


def _corpus_sets(model: CausalLM, name: str, teacher, corpora, valid_tokens, split_seed):
    """(label, split, loader with valid_batches) for every token corpus to score; models with the same split of a
    corpus score the same held-out rows."""
    if not corpora:
        return
    if model.kind != "gpt":
        raise SelfReplayError(f"eval --corpus: {name} is a Hugging Face model; token corpora are the built-in "
                              f"GPT's (use --data)")
    from selfreplay.data.corpus import Corpus
    from selfreplay.data.loader import CorpusLoader

    infos = [model.info] + ([teacher.module.info] if teacher is not None else [])
    for path in corpora:
        corpus = Corpus.open(path, vocab_size=model.vocab_size,
                             tokenizer_fingerprint=model.info.get("tokenizer_fingerprint"))
        tokens, seed = _split_for(path, infos, valid_tokens, split_seed)
        yield corpus.meta.name or path, (path, tokens, seed, model.context), \
            CorpusLoader(corpus, model.context, 1, tokens, seed)


def _data_sets(model: CausalLM, name: str, data, batch_size, seq_len, split, text_field):
    """(label, loader with valid_batches) for every text / chat file to score."""
    if model.kind != "hf":
        raise SelfReplayError(f"eval --data: {name} is a built-in GPT; score it on token corpora (--corpus)")
    from selfreplay.data.rows import RowLoader
    from selfreplay.data.text import tokenize_source
    from selfreplay.models import hf_path
    from selfreplay.models.hf import load_tokenizer

    tokenizer = load_tokenizer(hf_path(name))
    for path in data:
        examples, fmt = tokenize_source(path, tokenizer, split, text_field)
        yield path, RowLoader(examples, fmt, seq_len, int(tokenizer.pad_token_id), 1, 0, 0,
                              where=f"data {path}", evaluate_all=True)


def benchmark_report(name: str, mcq: Sequence[str] = (), lm_eval_tasks: Sequence[str] = (), batch_size: int = 8,
                     split: str = "test", mcq_format: str = "auto", few_shot: int = 0, device: str = "auto",
                     dtype: str = "auto") -> dict:
    """Multiple-choice accuracies and lm-evaluation-harness results of a Hugging Face model."""
    from selfreplay.evaluate.multiple_choice import (lm_eval_harness, load_questions, mcq_chat_format,
                                                     multiple_choice_accuracy, require_lm_eval)
    from selfreplay.models import hf_path
    from selfreplay.models.hf import load_tokenizer
    from selfreplay.train.distributed import resolve_device

    if lm_eval_tasks:
        require_lm_eval()  # before loading a model for nothing
    model = load_for_eval(name, resolve_device(device), dtype)
    if model.kind != "hf":
        raise SelfReplayError(f"eval --mcq / --lm-eval: {name} is a built-in GPT; benchmarks need a Hugging Face "
                              f"model and its tokenizer")
    tokenizer = load_tokenizer(hf_path(name))
    chat = mcq_chat_format(tokenizer, mcq_format) if mcq else False
    report: dict = {"mcq": [], "lm_eval": {}}
    for path in mcq:
        result = multiple_choice_accuracy(model, tokenizer, load_questions(path, split=split), batch_size,
                                          few_shot=few_shot, chat=chat)
        report["mcq"].append({"model": name, "mcq": path, "format": "chat" if chat else "plain", "n": result["n"],
                              "accuracy": result["accuracy"]})
    if lm_eval_tasks:
        from selfreplay.models.hf import base_model

        report["lm_eval"] = lm_eval_harness(base_model(model.net), tokenizer, list(lm_eval_tasks), batch_size)
    return report


def format_report(rows: list[dict]) -> str:
    """A plain-text table; ``delta`` > 0 on old data is forgetting."""
    return text_table(rows, [("model", "model"), ("data", "data"), ("loss", "loss"),
                             ("loss_second_half", "loss 2nd half"), ("accuracy", "accuracy"),
                             ("teacher_loss", "teacher loss"), ("delta", "delta"), ("kl", "KL(teacher||model)")])


def format_benchmarks(report: dict) -> str:
    parts = []
    if report.get("mcq"):
        parts.append(text_table(report["mcq"], [("model", "model"), ("mcq", "questions"), ("format", "format"),
                                                ("n", "n"), ("accuracy", "accuracy")]))
    if report.get("lm_eval"):
        rows = [{"task": task, "metric": metric.split(",")[0], "value": value}
                for task, metrics in report["lm_eval"].items() for metric, value in metrics.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in metric]
        parts.append(text_table(rows, [("task", "lm-eval task"), ("metric", "metric"), ("value", "value")]))
    return "\n\n".join(parts)


def text_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``rows`` as an aligned plain-text table of ``columns`` (key, header), leaving out columns no row has."""
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
