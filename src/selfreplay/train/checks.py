"""Per-model-kind defaults and the cross-field checks of a run configuration, each a one-line error naming the key.

A default of ``None`` in :mod:`selfreplay.config` is filled in here: the paper's small-model settings for the
built-in GPT (§4), its instruct-model settings for Hugging Face models (§5.9).
"""

from __future__ import annotations

import math

from selfreplay.config import FINETUNE, PRETRAIN, TrainConfig, config_keys
from selfreplay.errors import SelfReplayError

LENGTH_CRITERIA = ("tokens", "tokens_per_param", "epochs", "steps")

# key: (built-in GPT, Hugging Face)
KIND_DEFAULTS = {
    "data.batch_size": (256, 128),
    "optim.lr": (1e-3, 1e-5),
    "optim.beta2": (0.999, 0.997),
    "replay.batch_size": (64, 32),
    "replay.buffer": (16, 32),
    "eval.batch_size": (64, 8),
}


KIND_DEFAULTS_COEFF = (10.0, 1.0)  # replay.coeff of kl / ntp / kl_downstream
METHOD_COEFFS = {"asft": 0.1, "l2_init": 1e-3, "ewc": 100.0}  # other methods' own scales


def _get(cfg, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _set(cfg, key: str, value) -> None:
    section, name = key.split(".")
    setattr(getattr(cfg, section), name, value)


def resolve_defaults(cfg: TrainConfig, kind: str, command: str) -> TrainConfig:
    """Fill in the ``None`` defaults that depend on the model kind (gpt | hf) and the command (in place)."""
    for key, (gpt, hf) in KIND_DEFAULTS.items():
        if _get(cfg, key) is None:
            _set(cfg, key, gpt if kind == "gpt" else hf)
    if cfg.replay.method is None:
        cfg.replay.method = "kl" if command == FINETUNE else "none"
    if cfg.replay.coeff is None:
        cfg.replay.coeff = METHOD_COEFFS.get(cfg.replay.method) or KIND_DEFAULTS_COEFF[kind != "gpt"]
    if cfg.lora.r > 0:
        if cfg.lora.alpha is None:
            cfg.lora.alpha = float(cfg.lora.r if kind == "gpt" else 2 * cfg.lora.r)
        if not cfg.lora.targets:
            cfg.lora.targets = ["qkv", "out", "up", "down"] if kind == "gpt" else ["all-linear"]
    if cfg.eval.every_tokens is None and cfg.eval.every_steps is None:
        cfg.eval.every_tokens = 10_000_000
    return cfg


def _positive(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise SelfReplayError(f"{name}={value}: must be positive")


def config_value(cfg, key: str):
    """The value of a dotted key (``optim.lr``) of a config dataclass."""
    value = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def check_finite(cfg: TrainConfig) -> None:
    """NaN and infinity pass every range check (``nan <= 0`` is False): refuse them for every float key first."""
    for key in config_keys(TrainConfig):
        value = config_value(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise SelfReplayError(f"{key}={value}: expected a finite number")


def validate(cfg: TrainConfig, kind: str, command: str, world: int = 1) -> None:
    """Cross-field checks that the type system cannot express (after :func:`resolve_defaults`)."""
    check_finite(cfg)
    if not cfg.run_dir:
        raise SelfReplayError("run_dir: no output directory given")
    if not cfg.data.train:
        raise SelfReplayError("data.train: no training data given (a `selfreplay tokenize` corpus, or text / chat "
                              "records for a Hugging Face model)")
    if command == FINETUNE and not cfg.model.model_name_or_path:
        raise SelfReplayError("model.model_name_or_path: finetuning needs a model (a selfreplay run directory, a "
                              "Hugging Face directory or hub id)")
    if command == PRETRAIN and cfg.model.model_name_or_path:
        raise SelfReplayError("model.model_name_or_path: pretraining builds a fresh built-in GPT; use `selfreplay "
                              "finetune` to train an existing model")
    _check_stop(cfg)
    _check_optim(cfg)
    _check_replay(cfg, kind, command)
    for name, value in (("data.batch_size", cfg.data.batch_size), ("gradient_accumulation_steps",
                        cfg.gradient_accumulation_steps), ("eval.batch_size", cfg.eval.batch_size),
                        ("data.seq_len", cfg.data.seq_len), ("loss_chunk_size", cfg.loss_chunk_size),
                        ("eval.every_tokens", cfg.eval.every_tokens), ("eval.every_steps", cfg.eval.every_steps),
                        ("eval.max_tokens", cfg.eval.max_tokens), ("threads", cfg.threads),
                        ("checkpoint.every_tokens", cfg.checkpoint.every_tokens),
                        ("checkpoint.every_steps", cfg.checkpoint.every_steps)):
        _positive(name, value)
    if not 0 <= cfg.eval.teacher_cache_mb <= 1 << 24:
        raise SelfReplayError(f"eval.teacher_cache_mb={cfg.eval.teacher_cache_mb}: expected megabytes from 0 (off) "
                              f"to {1 << 24}")
    if cfg.data.valid_tokens < 0 or cfg.data.valid_examples < 0:
        raise SelfReplayError("data.valid_tokens / data.valid_examples: must be >= 0")
    per_rank = world * cfg.gradient_accumulation_steps
    if cfg.data.batch_size % per_rank:
        raise SelfReplayError(f"data.batch_size={cfg.data.batch_size}: must be divisible by ranks x "
                              f"gradient_accumulation_steps = {world} x {cfg.gradient_accumulation_steps}")
    if not 0.0 <= cfg.data.mix_fraction < 1.0:
        raise SelfReplayError(f"data.mix_fraction={cfg.data.mix_fraction}: expected a fraction in [0, 1)")
    if cfg.data.mix_fraction > 0 and not cfg.data.mix:
        raise SelfReplayError("data.mix_fraction > 0 needs data.mix (a tokenized corpus directory)")
    choices = {"precision": (cfg.precision, ("auto", "fp32", "bf16")),
               "compile": (str(cfg.compile).lower(), ("auto", "true", "false")),
               "distributed.strategy": (cfg.distributed.strategy, ("ddp", "fsdp")),
               "eval.mcq_format": (cfg.eval.mcq_format, ("auto", "chat", "plain")),
               "data.too_long": (cfg.data.too_long, ("drop", "truncate")),
               "data.packing": (cfg.data.packing, ("auto", "none", "stream", "examples"))}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise SelfReplayError(f"{name}={value!r}: expected one of {', '.join(allowed)}")
    if cfg.lora.r < 0:
        raise SelfReplayError(f"lora.r={cfg.lora.r}: must be >= 0 (0 = full finetuning)")
    if cfg.lora.r > 0 and command != FINETUNE:
        raise SelfReplayError("lora.r > 0: adapters are for finetuning; use `selfreplay finetune`")
    if cfg.lora.r > 0 and cfg.lora.alpha is not None and not cfg.lora.alpha > 0:
        raise SelfReplayError(f"lora.alpha={cfg.lora.alpha}: must be positive (the adapters' scale alpha / r)")
    if cfg.log.progress_every_s < 0:
        raise SelfReplayError(f"log.progress_every_s={cfg.log.progress_every_s}: must be >= 0")
    if cfg.lora.r > 0 and not 0.0 <= cfg.lora.dropout < 1.0:
        raise SelfReplayError(f"lora.dropout={cfg.lora.dropout}: expected a probability in [0, 1)")
    if cfg.lora.r > 0 and (cfg.teacher.dtype or cfg.teacher.device):
        raise SelfReplayError("teacher.dtype / teacher.device: with LoRA the teacher is the student's base weights "
                              "(adapters disabled); leave them unset")
    if kind == "gpt" and (cfg.eval.mcq or cfg.data.packing == "examples"):
        raise SelfReplayError("eval.mcq / data.packing=examples: need a Hugging Face model and its tokenizer")


REPLAY_SOURCES = ("auto", "prev", "self")


def check_paths(cfg: TrainConfig) -> None:
    """A name that can only be a local path (see data.text.looks_local) and does not exist is refused now, not
    after a hub lookup; a replay.source close to a keyword gets a "did you mean". (After :func:`validate`: a config
    error is news even while a path is still to be created.)"""
    import difflib
    from pathlib import Path

    from selfreplay.data.text import looks_local

    named = [("data.train", cfg.data.train), ("data.mix", cfg.data.mix), ("eval.prev", cfg.eval.prev)]
    named += [("eval.mcq", m) for m in cfg.eval.mcq]
    source = cfg.replay.source
    if source not in REPLAY_SOURCES:
        named.append(("replay.source", source))
        close = difflib.get_close_matches(source, REPLAY_SOURCES, n=1, cutoff=0.6)
        if close and not Path(source).expanduser().exists():
            raise SelfReplayError(f"replay.source={source}: neither {', '.join(REPLAY_SOURCES)} nor an existing path "
                                  f"(did you mean {close[0]}?)")
    for key, value in named:
        if value and not Path(str(value)).expanduser().exists() and looks_local(str(value)):
            raise SelfReplayError(f"{key}={value}: not found (no such file or directory)")
    if cfg.checkpoint.push_to_hub:
        from selfreplay.integrations.hub import check_hub

        check_hub(cfg.checkpoint.hub_model_id)


def _check_stop(cfg: TrainConfig) -> None:
    stop = cfg.stop
    given = [k for k in LENGTH_CRITERIA if getattr(stop, k) is not None]
    if len(given) > 1:
        unset = " or ".join(f"stop.{k}=null" for k in given)
        raise SelfReplayError(f"stop: conflicting length criteria {', '.join('stop.' + k for k in given)}; give one "
                              f"(unset a YAML value with e.g. {unset})")
    if not given and all(getattr(stop, k) is None for k in ("target_loss", "max_time", "early_stop_evals")):
        raise SelfReplayError("stop: no stop criterion; set one of stop.tokens / tokens_per_param / epochs / steps / "
                              "target_loss / max_time / early_stop_evals")
    for k in LENGTH_CRITERIA + ("max_time", "early_stop_evals", "target_loss"):  # a loss is never <= 0
        _positive(f"stop.{k}", getattr(stop, k))
    if cfg.optim.schedule == "cosine" and not given:
        raise SelfReplayError("optim.schedule=cosine needs a length criterion (stop.tokens / tokens_per_param / "
                              "epochs / steps)")


def _check_optim(cfg: TrainConfig) -> None:
    o = cfg.optim
    if o.name not in ("adamw", "sgd"):
        raise SelfReplayError(f"optim.name={o.name!r}: expected adamw or sgd")
    if o.schedule not in ("constant", "cosine"):
        raise SelfReplayError(f"optim.schedule={o.schedule!r}: expected constant or cosine")
    _positive("optim.lr", o.lr, allow_none=False)
    for name, value in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        if not 0.0 <= value < 1.0:
            raise SelfReplayError(f"{name}={value}: expected a value in [0, 1)")
    for name in ("weight_decay", "momentum"):
        if getattr(o, name) < 0:
            raise SelfReplayError(f"optim.{name}={getattr(o, name)}: must be >= 0")
    warmups = [k for k in ("warmup_tokens", "warmup_steps", "warmup_ratio") if getattr(o, k) is not None]
    if len(warmups) > 1:
        raise SelfReplayError(f"optim: {' and '.join('optim.' + k for k in warmups)} both set; give one warmup length")
    for k in warmups:
        if getattr(o, k) < 0:
            raise SelfReplayError(f"optim.{k}={getattr(o, k)}: must be >= 0")
    if o.warmup_ratio is not None:
        if o.warmup_ratio >= 1:
            raise SelfReplayError(f"optim.warmup_ratio={o.warmup_ratio}: expected a fraction of the run in [0, 1)")
        if not any(getattr(cfg.stop, k) is not None for k in LENGTH_CRITERIA):
            raise SelfReplayError("optim.warmup_ratio needs a length criterion (stop.tokens / tokens_per_param / "
                                  "epochs / steps); or give optim.warmup_steps / warmup_tokens")
    _positive("optim.grad_clip", o.grad_clip)


def _check_replay(cfg: TrainConfig, kind: str, command: str) -> None:
    from selfreplay.replay.losses import DIVERGENCES
    from selfreplay.replay.penalty import METHODS
    from selfreplay.replay.sampling import DECODE_MODES

    r = cfg.replay
    if r.method not in METHODS:
        raise SelfReplayError(f"replay.method={r.method!r}: expected one of {', '.join(METHODS)}")
    if r.method != "none" and command != FINETUNE:
        raise SelfReplayError(f"replay.method={r.method}: replay needs a teacher; use `selfreplay finetune`")
    if r.divergence not in DIVERGENCES:
        raise SelfReplayError(f"replay.divergence={r.divergence!r}: expected one of {', '.join(DIVERGENCES)}")
    if not 0.0 < r.jsd_beta < 1.0:
        raise SelfReplayError(f"replay.jsd_beta={r.jsd_beta}: expected a value in (0, 1)")
    if r.coeff < 0:
        raise SelfReplayError(f"replay.coeff={r.coeff}: must be >= 0 (a negative one trains away from the teacher)")
    if r.target_kl is not None:
        from selfreplay.replay.budget import check_budget

        if r.method != "kl":
            raise SelfReplayError(f"replay.target_kl: a forgetting budget controls the replay KL; replay.method="
                                  f"{r.method} has none (use replay.method=kl)")
        check_budget(r.target_kl, r.coeff, r.target_kl_step, r.target_kl_smoothing, r.coeff_min, r.coeff_max,
                     r.target_kl_gain, divergence=r.divergence)
    _positive("replay.ewc_sequences", r.ewc_sequences, allow_none=False)
    if r.method == "replace" and not 0.0 < r.fraction < 1.0:
        raise SelfReplayError(f"replay.fraction={r.fraction}: expected a fraction in (0, 1)")
    for name in ("batch_size", "buffer", "length", "top_k"):
        _positive(f"replay.{name}", getattr(r, name))
    if r.temperature <= 0:
        raise SelfReplayError(f"replay.temperature={r.temperature}: must be positive")
    if r.top_p is not None and not 0.0 < r.top_p <= 1.0:
        raise SelfReplayError(f"replay.top_p={r.top_p}: expected a value in (0, 1]")
    if r.prompt not in ("bos", "chat"):
        raise SelfReplayError(f"replay.prompt={r.prompt!r}: expected bos or chat")
    if str(r.keep_targets).lower() not in ("auto", "true", "false"):
        raise SelfReplayError(f"replay.keep_targets={r.keep_targets!r}: expected auto, true or false")
    if r.decode not in DECODE_MODES:
        raise SelfReplayError(f"replay.decode={r.decode!r}: expected one of {', '.join(DECODE_MODES)}")
    if kind == "hf" and r.decode not in ("auto", "eager"):
        raise SelfReplayError(f"replay.decode={r.decode}: a built-in GPT option; a Hugging Face model decodes "
                              f"eagerly (auto / eager)")
    if r.max_logprobs_gib < 0:
        raise SelfReplayError(f"replay.max_logprobs_gib={r.max_logprobs_gib}: must be >= 0")
    if kind == "hf" and (r.domains or r.stop_at_eos):
        raise SelfReplayError("replay.domains / replay.stop_at_eos: built-in GPT options; a Hugging Face model's "
                              "replay is prompted by replay.prompt and ignores EOS")
    if kind == "gpt":
        from selfreplay.replay.prompts import check_domains

        check_domains(list(r.domains))
    if kind == "gpt" and r.prompt != "bos":
        raise SelfReplayError("replay.prompt=chat: needs a Hugging Face model with a chat template (the built-in "
                              "GPT is prompted by replay.domains)")
