"""From a run configuration to the parts the loop trains: model, teacher, data, old data, replay penalty.

The only place where the two model kinds differ in setup: the built-in GPT reads token corpora and starts from a
run directory (or a fresh init when pretraining); a Hugging Face model reads text / chat records with its own
tokenizer. Everything after this — the loop, the penalty, evaluation, checkpoints — is shared.

The old-data split is always the teacher's: a corpus the teacher trained on keeps the validation split its run
recorded, so replay never reads the teacher's held-out rows and forgetting is never measured on rows it trained on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from selfreplay.config import FINETUNE, TrainConfig
from selfreplay.errors import SelfReplayError
from selfreplay.models.core import CausalLM, Teacher
from selfreplay.replay.penalty import (REPLAY_ROW_METHODS, SOURCE_METHODS, TEACHER_METHODS, WEIGHT_METHODS, ReplayPenalty,
                                      replaced_rows)
from selfreplay.train.files import git_commit

log = logging.getLogger(__name__)
RANK_SEED_STRIDE = 1000  # self-generated replay seed of rank r = seed + RANK_SEED_STRIDE * r


@dataclass
class Parts:
    """Everything a training run needs besides its config (what :func:`build_parts` makes, or a caller builds)."""

    model: CausalLM
    data: object  # a DataSource of global batches
    penalty: Optional[ReplayPenalty] = None
    teacher: Optional[Teacher] = None
    prev: Optional[object] = None  # old data: a loader whose valid_batches() are its held-out rows
    evaluators: list[Callable] = field(default_factory=list)  # extra metrics: fn(model) -> dict
    tokenizer: object = None  # saved beside a Hugging Face model
    info: dict = field(default_factory=dict)  # provenance, written to run.json
    init_params: Optional[dict] = None  # the pretraining init (drift metrics of the built-in GPT)
    pad_id: int = 0
    replay_per_rank: bool = False  # the replay source already gives this rank's rows


def chunk_size_for(cfg: TrainConfig, vocab_size: int) -> Optional[int]:
    """``loss_chunk_size``, or by default: all positions below a 32k vocabulary, else 1024."""
    if cfg.loss_chunk_size is not None:
        return cfg.loss_chunk_size
    return None if vocab_size < 32768 else 1024


def build_parts(cfg: TrainConfig, kind: str, command: str, device: torch.device, rank: int = 0,
                world: int = 1) -> Parts:
    """The model, data, teacher and penalty of a run (defaults already resolved and checked)."""
    torch.manual_seed(cfg.seed)
    finetune = command == FINETUNE
    info: dict = {"kind": command, "model_kind": kind, "git_commit": git_commit(), "seed": cfg.seed}
    model, teacher_info, tokenizer, init_params = _model(cfg, kind, finetune, device, info)
    teacher = _teacher(cfg, kind, model, finetune)
    if cfg.lora.r > 0:
        info["lora"] = {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                        "targets": list(cfg.lora.targets), **model.info.get("lora", {})}
    info["params"] = model.num_params()  # after the adapters: "trainable" is what the optimizer updates
    if cfg.gradient_checkpointing:
        model.adapter.enable_gradient_checkpointing(model.net)
    pad_id = 0 if tokenizer is None else int(tokenizer.pad_token_id)
    r = cfg.replay
    replaced = replaced_rows(r.method, r.fraction, cfg.data.batch_size)
    data_rows, replay_rows = cfg.data.batch_size - replaced, replaced or r.batch_size
    if kind == "gpt":
        data, prev = _corpora(cfg, model, teacher_info, data_rows, replay_rows, info, finetune)
    else:
        data, prev = _records(cfg, tokenizer, data_rows, replay_rows, info)
    parts = Parts(model, data, None, teacher, prev, [], tokenizer, info, init_params, pad_id)
    source = _replay_source(cfg, parts, teacher_info, replay_rows, rank, world) \
        if r.method in SOURCE_METHODS else None
    anchor = budget = None
    if r.method in WEIGHT_METHODS:
        from selfreplay.replay.anchor import WeightAnchor

        anchor = WeightAnchor(model)  # after LoRA: the trainable weights as they start
    if r.target_kl is not None:
        from selfreplay.replay.budget import ForgettingBudget

        budget = ForgettingBudget(r.target_kl, r.coeff, r.target_kl_step, r.target_kl_smoothing, r.coeff_min,
                                  r.coeff_max, device, r.target_kl_gain)
    parts.penalty = ReplayPenalty(r.method, r.coeff, teacher, source, r.divergence, r.jsd_beta,
                                  chunk_size_for(cfg, model.vocab_size), r.fraction, pad_id, anchor, budget)
    if cfg.eval.mcq:
        parts.evaluators.append(_mcq_evaluator(cfg, tokenizer))
    return parts


# ------------------------------------------------------------------------------------------------ models

def _model(cfg: TrainConfig, kind: str, finetune: bool, device, info: dict):
    """(model, the teacher's run record, tokenizer, init params) of the run."""
    from selfreplay.models.gpt import GPTConfig

    if kind == "gpt":
        from selfreplay.models.builtin import init_gpt, load_gpt_run, wrap_gpt

        if finetune:
            model = load_gpt_run(cfg.model.model_name_or_path, "cpu")
            teacher_info = model.info
            shape = GPTConfig.of(teacher_info["model"])
            init_seed = teacher_info.get("init_seed")
            info.update(init_from=os.path.abspath(cfg.model.model_name_or_path), init_seed=init_seed,
                        teacher_corpus=teacher_info.get("train_corpus"), teacher_mix=teacher_info.get("mix_corpus"))
        else:
            shape = GPTConfig.of(cfg.model)
            model, teacher_info, init_seed = wrap_gpt(init_gpt(shape, cfg.seed)), {}, cfg.seed
            info.update(init_seed=cfg.seed)
        for k in ("d_model", "n_layers", "head_dim", "context", "vocab_size"):  # the checkpoint's shape wins
            setattr(cfg.model, k, getattr(shape, k))
        init = None
        if init_seed is not None:
            init = {k: v.to(device) for k, v in init_gpt(shape, init_seed).state_dict().items()}
        info.update(model=dataclasses.asdict(shape), params=model.num_params())
        return model.to(device), teacher_info, None, init
    from selfreplay.models import hf_path
    from selfreplay.models.hf import load_hf, load_tokenizer, require_hf

    require_hf("transformers")
    name = hf_path(cfg.model.model_name_or_path)
    tokenizer = load_tokenizer(cfg.model.tokenizer_name_or_path or name, cfg.model.trust_remote_code,
                               cfg.model.model_revision)
    sharded = cfg.distributed.strategy == "fsdp" and int(os.environ.get("WORLD_SIZE", 1)) > 1
    model = load_hf(name, cfg.model.dtype, "cpu" if sharded else device, cfg.model.model_revision,
                    cfg.model.trust_remote_code)
    info.update(model_name_or_path=cfg.model.model_name_or_path, params=model.num_params())
    return model, {}, tokenizer, None


def _teacher(cfg: TrainConfig, kind: str, model: CausalLM, finetune: bool) -> Optional[Teacher]:
    """LoRA: the base weights with adapters off; else a frozen copy when the penalty or the metrics use one (the
    built-in GPT always keeps one: small, and it gives valid_kl and drift)."""
    if not finetune:
        return None
    needs = cfg.replay.method in TEACHER_METHODS or kind == "gpt" or cfg.eval.prev is not None
    teacher = None
    if cfg.lora.r == 0 and needs:
        from selfreplay.models.hf import resolve_dtype

        teacher = Teacher.frozen_copy(model, resolve_dtype(cfg.teacher.dtype), cfg.teacher.device)
    if cfg.lora.r > 0:
        model.adapter.add_lora(model, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets, cfg.seed)
        teacher = Teacher.adapters_off(model)
    return teacher


# ------------------------------------------------------------------------------------------------ data

def _teacher_split(corpus, teacher_info: dict) -> Optional[tuple[int, int]]:
    """(valid_tokens, seed) of the teacher's split of ``corpus`` if the teacher trained on it, else None."""
    from selfreplay.data.corpus import corpus_identity

    ident = corpus_identity(corpus.meta)
    for key in ("train_corpus", "mix_corpus"):
        spec = teacher_info.get(key)
        if spec and (spec.get("identity") == ident or os.path.abspath(spec["path"]) == os.path.abspath(corpus.path)):
            return int(spec["valid_tokens"]), int(spec["split_seed"])
    return None


def _corpus_record(corpus, split: tuple[int, int]) -> dict:
    from selfreplay.data.corpus import corpus_identity

    return {"path": os.path.abspath(corpus.path), "name": corpus.meta.name, "identity": corpus_identity(corpus.meta),
            "domain_token": corpus.meta.domain_token, "valid_tokens": split[0], "split_seed": split[1],
            "tokenizer": corpus.meta.tokenizer}


def _corpora(cfg: TrainConfig, model: CausalLM, teacher_info: dict, rows: int, replay_rows: int, info: dict,
             finetune: bool):
    from selfreplay.data.corpus import Corpus
    from selfreplay.data.loader import CorpusLoader

    vocab, context = model.vocab_size, model.context
    fingerprint = teacher_info.get("tokenizer_fingerprint")
    corpus = Corpus.open(cfg.data.train, vocab_size=vocab, tokenizer_fingerprint=fingerprint)
    split = _teacher_split(corpus, teacher_info) or (cfg.data.valid_tokens, cfg.data.seed)
    mix = mix_split = None
    if cfg.data.mix and cfg.data.mix_fraction > 0:
        mix = Corpus.open(cfg.data.mix, vocab_size=vocab, tokenizer_fingerprint=corpus.meta.tokenizer_fingerprint)
        mix_split = _teacher_split(mix, teacher_info) or (cfg.data.valid_tokens, cfg.data.seed)
        info["mix_corpus"] = _corpus_record(mix, mix_split)
    loader = CorpusLoader(corpus, context, rows, split[0], cfg.data.seed, mix, cfg.data.mix_fraction,
                          cfg.data.max_train_tokens, split_seed=split[1], mix_split=mix_split)
    info.update(tokenizer_fingerprint=corpus.meta.tokenizer_fingerprint, train_corpus=_corpus_record(corpus, split))
    prev = None
    prev_path = cfg.eval.prev or (teacher_info.get("train_corpus") or {}).get("path")
    if prev_path:
        if not Path(prev_path).is_dir() and not cfg.eval.prev:
            raise SelfReplayError(f"the teacher's corpus {prev_path} (recorded in {cfg.model.model_name_or_path}/"
                                  f"run.json) is missing; pass eval.prev=<corpus dir>")
        prev_corpus = Corpus.open(prev_path, vocab_size=vocab, tokenizer_fingerprint=corpus.meta.tokenizer_fingerprint)
        # finetuning: the teacher's held-out part; pretraining (e.g. on a mixture): this run's own held-out part
        prev_split = _teacher_split(prev_corpus, teacher_info if finetune else info)
        if prev_split is None and finetune and not teacher_info.get("train_corpus"):
            raise SelfReplayError(f"eval.prev={prev_path}: the teacher's run.json records no training corpus, so its "
                                  f"held-out split is unknown; finetune a model trained by selfreplay")
        prev_split = prev_split or (cfg.data.valid_tokens, cfg.data.seed)
        prev = CorpusLoader(prev_corpus, context, replay_rows, prev_split[0], cfg.data.seed, split_seed=prev_split[1])
        info["prev_corpus"] = _corpus_record(prev_corpus, prev_split)
    return loader, prev


def _records(cfg: TrainConfig, tokenizer, rows: int, replay_rows: int, info: dict):
    from selfreplay.data.rows import RowLoader
    from selfreplay.data.text import tokenize_source

    seq_len = cfg.data.seq_len or 512
    examples, fmt = tokenize_source(cfg.data.train, tokenizer, cfg.data.split, cfg.data.text_field)
    data = RowLoader(examples, fmt, seq_len, int(tokenizer.pad_token_id), rows, cfg.data.seed,
                     cfg.data.valid_examples, cfg.data.packing, cfg.data.too_long, f"data {cfg.data.train}")
    train = cfg.data.train
    info.update(train_data=os.path.abspath(train) if os.path.exists(train) else train, format=fmt,
                packing=data.packing, valid_examples=cfg.data.valid_examples, split_seed=cfg.data.seed)
    prev = None
    if cfg.eval.prev:
        prev_examples, prev_fmt = tokenize_source(cfg.eval.prev, tokenizer, cfg.eval.prev_split, cfg.data.text_field)
        # the same file as replay.source: replay reads the training part, evaluation the held-out part
        held_out = cfg.data.valid_examples if cfg.replay.source == cfg.eval.prev else 0
        prev = RowLoader(prev_examples, prev_fmt, seq_len, int(tokenizer.pad_token_id), replay_rows, cfg.data.seed,
                         held_out, cfg.data.packing, cfg.data.too_long, f"eval.prev {cfg.eval.prev}",
                         evaluate_all=not held_out)
    return data, prev


# ------------------------------------------------------------------------------------------------ replay

def _replay_source(cfg: TrainConfig, parts: Parts, teacher_info: dict, rows: int, rank: int, world: int):
    r, model = cfg.replay, parts.model
    source = r.source
    if source == "auto":
        recorded = (teacher_info.get("train_corpus") or {}).get("path")
        source = "prev" if model.kind == "gpt" and recorded and Path(recorded).is_dir() else "self"
    parts.info["replay"] = {"method": r.method, "source": source}
    if source == "self":
        return _self_replay(cfg, parts, teacher_info, rows, rank, world)
    if source == "prev":
        if parts.prev is None:
            raise SelfReplayError("replay.source=prev: the teacher records no training corpus; set replay.source "
                                  "to a corpus / data path or 'self'")
        from selfreplay.replay.sources import DataReplay

        return DataReplay(parts.prev)  # replay walks the training split; evaluation reads the held-out rows
    return _replay_from_path(cfg, parts, source, rows)


def _self_replay(cfg: TrainConfig, parts: Parts, teacher_info: dict, rows: int, rank: int, world: int):
    from selfreplay.replay.prompts import Prompts, tokenizer_prompt
    from selfreplay.replay.sources import SelfGeneratedReplay

    r, model = cfg.replay, parts.model
    if model.kind == "gpt":
        domains = list(r.domains) or [(teacher_info.get("train_corpus") or {}).get("domain_token")]
        if domains[0] is None:
            raise SelfReplayError("replay.source=self: the checkpoint records no domain token; set replay.domains")
        prompts = Prompts.domains(domains, model.vocab_size)
        length = r.length or model.context
        eos = _eos_of(cfg) if r.stop_at_eos else None
    else:
        prompts = Prompts([tokenizer_prompt(parts.tokenizer, r.prompt)])
        length = r.length or cfg.data.seq_len or 512
        eos = None
    per_rank = r.method in REPLAY_ROW_METHODS and world > 1
    if per_rank and rows % world:
        raise SelfReplayError(f"replay.batch_size={rows}: must be divisible by the {world} ranks")
    parts.replay_per_rank = per_rank
    low = _low_precision(cfg, parts.model)
    # kept sampling logits are exact targets only where decoding and the training forward round alike (fp32);
    # under bf16 (and compiled graphs) the teacher runs again, as for real replay: both use the same targets
    keep = r.method == "kl" and {"true": True, "false": False}.get(str(r.keep_targets).lower(), not low)
    parts.info["replay"].update(prompts=prompts.rows, length=length, keeps_targets=keep)
    teacher = parts.teacher
    if teacher is None:  # ewc without a frozen copy: it samples once, at step 0, when the student is the teacher
        teacher = Teacher(parts.model)
    # ewc samples only what it uses; a buffer never holds more steps than the run takes
    steps = total_steps(cfg, model, parts.data)
    buffer = -(-r.ewc_sequences // rows) if r.method == "ewc" else min(r.buffer, steps or r.buffer)
    parts.info["replay"]["buffer"] = buffer
    return SelfGeneratedReplay(teacher, prompts, rows // world if per_rank else rows, length, buffer,
                               r.temperature, r.top_k, r.top_p, eos, parts.pad_id,
                               cfg.seed + (RANK_SEED_STRIDE * rank if per_rank else 0),
                               keep_targets=keep, max_targets_bytes=int(r.max_logprobs_gib * 2 ** 30),
                               decode=r.decode, autocast_dtype=torch.bfloat16 if low else None,
                               show_progress=cfg.log.progress and rank == 0)


def total_steps(cfg: TrainConfig, model, data) -> Optional[int]:
    """The run's optimizer steps from its length criterion (None: it stops on loss or time only)."""
    stop, tokens_per_step = cfg.stop, cfg.data.batch_size * data.seq_len
    if stop.steps is not None:
        return stop.steps
    if stop.tokens is not None:
        return math.ceil(stop.tokens / tokens_per_step)
    if stop.tokens_per_param is not None:
        counts = model.num_params()
        return math.ceil(stop.tokens_per_param * counts.get("paper", counts["actual"]) / tokens_per_step)
    if stop.epochs is not None:
        return math.ceil(stop.epochs * data.num_train_rows / cfg.data.batch_size)
    return None


def _replay_from_path(cfg: TrainConfig, parts: Parts, path: str, rows: int):
    from selfreplay.replay.sources import DataReplay, StoredReplay

    model = parts.model
    if (Path(path) / "meta.json").is_file():  # a replay corpus, or a token corpus (real replay)
        from selfreplay.data.corpus import Corpus
        from selfreplay.data.loader import CorpusLoader

        # the built-in GPT's replay must be in the tokenizer of its training data (checked against the teacher's);
        # a Hugging Face replay corpus records its model's path, which a moved or hub copy does not share
        fingerprint = parts.info.get("tokenizer_fingerprint") if model.kind == "gpt" else None
        try:
            corpus = Corpus.open(path, vocab_size=model.vocab_size, tokenizer_fingerprint=fingerprint)
        except SelfReplayError as e:
            raise SelfReplayError(f"replay.source: {e}") from None
        if corpus.meta.sequence_length is not None:
            length = cfg.replay.length or (model.context if model.kind == "gpt" else None)
            use = str(cfg.replay.keep_targets).lower() == "true"  # stored top-k targets: a lower bound of the KL
            return StoredReplay(corpus, rows, length, cfg.data.seed, cfg.replay.shuffle, use_targets=use)
        if model.kind != "gpt":
            raise SelfReplayError(f"replay.source={path}: a token corpus of the built-in GPT's tokenizer")
        return DataReplay(CorpusLoader(corpus, model.context, rows, 0, cfg.data.seed))
    if model.kind == "gpt":
        raise SelfReplayError(f"replay.source={path}: expected prev, self, or a corpus directory (selfreplay "
                              f"tokenize / generate)")
    if parts.prev is not None and path == cfg.eval.prev:
        return DataReplay(parts.prev)
    from selfreplay.data.rows import RowLoader
    from selfreplay.data.text import tokenize_source

    examples, fmt = tokenize_source(path, parts.tokenizer, "train", cfg.data.text_field)
    return DataReplay(RowLoader(examples, fmt, cfg.replay.length or cfg.data.seq_len or 512, parts.pad_id, rows,
                                cfg.data.seed, 0, cfg.data.packing, cfg.data.too_long, f"replay.source {path}"))


def _eos_of(cfg: TrainConfig) -> int:
    from selfreplay.data.corpus import Corpus

    eos = Corpus.open(cfg.data.train).meta.eos_token
    if eos is None:
        raise SelfReplayError("replay.stop_at_eos=true: the training corpus records no EOS token")
    return int(eos)


def _low_precision(cfg: TrainConfig, model: CausalLM) -> bool:
    device = next(model.parameters()).device
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def _mcq_evaluator(cfg: TrainConfig, tokenizer) -> Callable:
    from selfreplay.evaluate.multiple_choice import load_questions, mcq_evaluator

    sets = {}
    for path in cfg.eval.mcq:
        stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(str(path).rstrip("/")).stem) or "mcq"
        name, k = stem, 2
        while name in sets:
            name, k = f"{stem}_{k}", k + 1
        sets[name] = load_questions(path)
    return mcq_evaluator(sets, tokenizer, cfg.eval.mcq_format, cfg.eval.batch_size)
