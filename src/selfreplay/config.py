"""One typed run configuration for pretraining and finetuning, whatever the model kind.

Dataclasses with the paper's defaults, loaded from YAML files and ``key.sub=value`` overrides (OmegaConf does the
merging and type checks); unknown keys, keys that moved and mistyped values become one-line
:class:`SelfReplayError` messages. A default of ``None`` documented as "X (built-in GPT) / Y (Hugging Face)" is
filled in per model kind by :func:`resolve_defaults` (the paper's small-model settings vs its §5.9 instruct run),
and the resolved config is what a run saves.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

from omegaconf import OmegaConf
from omegaconf import errors as oc_errors

from selfreplay.errors import SelfReplayError
from selfreplay.yamlfile import read_yaml

PRETRAIN, FINETUNE = "pretrain", "finetune"


def _f(default: Any, help: str, only: Optional[str] = None) -> Any:
    """A field with a help string; ``only`` = pretrain / finetune when the key applies to one command only."""
    meta = {"help": help, "only": only}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _sub(cls: type, help: str, only: Optional[str] = None) -> Any:
    return field(default_factory=cls, metadata={"help": help, "only": only})


@dataclass
class ModelConfig:
    """What to train: an existing model (finetuning), or the built-in GPT's shape (pretraining)."""

    model_name_or_path: Optional[str] = _f(None, "model to finetune: a selfreplay run directory, a Hugging Face "
                                                 "directory or hub id", FINETUNE)
    model_revision: Optional[str] = _f(None, "hub revision (branch, tag or commit) of a Hugging Face model", FINETUNE)
    dtype: str = _f("float32", "Hugging Face weights dtype: float32 (fp32 master weights) | bfloat16 | auto", FINETUNE)
    trust_remote_code: bool = _f(False, "allow custom model code from the hub", FINETUNE)
    tokenizer_name_or_path: Optional[str] = _f(None, "tokenizer (default: the model's)", FINETUNE)
    d_model: int = _f(256, "built-in GPT width D", PRETRAIN)
    n_layers: int = _f(6, "built-in GPT blocks L", PRETRAIN)
    head_dim: int = _f(64, "built-in GPT head dimension H (heads = D / H)", PRETRAIN)
    context: int = _f(256, "built-in GPT sequence length T, domain token included", PRETRAIN)
    vocab_size: int = _f(4096, "built-in GPT vocabulary size V (must match the tokenizer)", PRETRAIN)


@dataclass
class TeacherConfig:
    """The frozen model before finetuning (full finetuning; with LoRA it is the base weights, adapters off)."""

    dtype: Optional[str] = _f(None, "teacher weights dtype: null (as the student) | float32 | bfloat16")
    device: Optional[str] = _f(None, "teacher device, e.g. cuda:1 (null: the student's)")


@dataclass
class DataConfig:
    """Training data: a token corpus (built-in GPT) or text / chat records (Hugging Face models)."""

    train: str = _f("", "a `selfreplay tokenize` corpus directory (built-in GPT), or .jsonl / .parquet / .txt / a "
                        "directory / a hub dataset of text, chat messages or prompt-completion records")
    batch_size: Optional[int] = _f(None, "sequences per optimizer step, over all ranks: 256 (built-in GPT) / 128 "
                                         "(Hugging Face)")
    seed: int = _f(0, "seed of the train/valid split and the epoch shuffles (kept apart from the init seed)")
    valid_tokens: int = _f(1_048_576, "corpora: tokens held out for validation (paper: 10M)")
    valid_examples: int = _f(64, "records: examples held out for validation (split by example)")
    seq_len: Optional[int] = _f(None, "records: tokens per row (default: 512; the built-in GPT uses model.context)")
    packing: str = _f("auto", "records: auto (text: one packed stream; chats: one example per row) | stream | "
                              "examples (whole examples packed, attention kept within each) | none (one per row)")
    too_long: str = _f("drop", "records, one example per row: drop | truncate examples longer than seq_len")
    split: str = _f("train", "dataset split (hub datasets and directories)")
    text_field: str = _f("text", "field holding plain text")
    mix: Optional[str] = _f(None, "corpora: second corpus mixed into every batch")
    mix_fraction: float = _f(0.0, "corpora: fraction of each batch's rows taken from data.mix")
    max_train_tokens: Optional[int] = _f(None, "corpora: use at most this many training tokens")


@dataclass
class OptimConfig:
    """AdamW and the LR schedule (paper: betas 0.9/0.999, wd 0.02, 10M warmup tokens, then constant)."""

    name: str = _f("adamw", "adamw | sgd")
    lr: Optional[float] = _f(None, "peak learning rate: 1e-3 (built-in GPT) / 1e-5 (Hugging Face, §5.9)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: Optional[float] = _f(None, "AdamW beta2: 0.999 (built-in GPT) / 0.997 (Hugging Face, §5.9)")
    weight_decay: float = _f(0.02, "decoupled weight decay (AdamW) or L2 (SGD)")
    momentum: float = _f(0.0, "SGD momentum")
    warmup_tokens: Optional[int] = _f(None, "linear warmup length in training tokens (give at most one warmup_*; "
                                            "default: 10% of the run's length, at most 10M tokens, the paper's)")
    warmup_steps: Optional[int] = _f(None, "linear warmup length in optimizer steps (HF Trainer's warmup_steps)")
    warmup_ratio: Optional[float] = _f(None, "linear warmup as a fraction of the run's steps (HF Trainer's "
                                             "warmup_ratio; needs a length criterion)")
    schedule: str = _f("constant", "constant | cosine (decays to 0 at the stop length)")
    grad_clip: Optional[float] = _f(None, "clip the global gradient norm to this value (off, as in the paper)")
    fused: Optional[bool] = _f(None, "fused AdamW kernel (default: on CUDA)")


@dataclass
class StopConfig:
    """When training ends: at most one length criterion, plus any of the others."""

    tokens: Optional[int] = _f(None, "stop after this many training tokens")
    tokens_per_param: Optional[float] = _f(None, "stop after this many tokens per parameter (the paper's count)")
    epochs: Optional[float] = _f(None, "stop after this many passes over the training split")
    steps: Optional[int] = _f(None, "stop after this many optimizer steps")
    target_loss: Optional[float] = _f(None, "stop once validation loss <= this (our per-token convention)")
    max_time: Optional[float] = _f(None, "stop after this many seconds of training (evaluation excluded)")
    early_stop_evals: Optional[int] = _f(None, "stop after more than this many evaluations without a new best "
                                               "validation loss")


@dataclass
class ReplayConfig:
    """The forgetting penalty: loss = NTP(new data) + coeff · term(replay)."""

    method: Optional[str] = _f(None, "kl (the paper's) | ntp | kl_downstream | asft | l2_init | ewc | replace | none; "
                                     "default: kl when finetuning", FINETUNE)
    coeff: Optional[float] = _f(None, "coefficient c: 10 (built-in GPT) / 1 (Hugging Face, §5.9); asft 0.1; l2_init "
                                      "1e-3; ewc 100", FINETUNE)
    target_kl: Optional[float] = _f(None, "forgetting budget, nats per token: adapt c so that the replay KL tracks "
                                          "it (method=kl; c starts at replay.coeff)", FINETUNE)
    target_kl_step: float = _f(0.2, "target_kl: step of log c per optimizer step at the peak LR, times the error "
                                    "clamp(log(KL/target) + H · rising trend of log KL, -2, 0.05); while the LR "
                                    "warms up clamp(log(KL/target), -1, 0.05)", FINETUNE)
    target_kl_smoothing: float = _f(0.9, "target_kl: moving-average factor of the replay KL estimate (its span H = "
                                         "1 / (1 - smoothing) steps is also how far ahead the trend predicts)",
                                    FINETUNE)
    target_kl_gain: float = _f(0.0, "target_kl: proportional gain, log c = integral + gain · error", FINETUNE)
    coeff_min: float = _f(1e-3, "target_kl: lower clamp of c", FINETUNE)
    coeff_max: float = _f(1e4, "target_kl: upper clamp of c", FINETUNE)
    ewc_sequences: int = _f(64, "method=ewc: replay sequences the teacher's diagonal Fisher is estimated from",
                            FINETUNE)
    fraction: float = _f(0.125, "method=replace: fraction of each batch's rows replaced by replay rows", FINETUNE)
    divergence: str = _f("forward_kl", "forward_kl (KL(teacher||student)) | reverse_kl | jsd", FINETUNE)
    jsd_beta: float = _f(0.5, "divergence=jsd: mixture weight beta", FINETUNE)
    source: str = _f("auto", "auto (prev when the teacher's training corpus is recorded and present, else self) | "
                             "prev | self (sampled from the teacher) | a replay corpus or old-data path", FINETUNE)
    batch_size: Optional[int] = _f(None, "replay sequences per optimizer step, over all ranks: 64 (built-in GPT) / "
                                         "32 (Hugging Face)", FINETUNE)
    buffer: Optional[int] = _f(None, "source=self: replay batches sampled at once: 16 (built-in GPT) / 32 "
                                     "(Hugging Face)", FINETUNE)
    length: Optional[int] = _f(None, "source=self: tokens per replay sequence, prompt included (default: the "
                                     "training rows' length)", FINETUNE)
    prompt: str = _f("bos", "source=self, Hugging Face: bos (BOS only, the paper's) | chat (the chat template's "
                            "prefix)", FINETUNE)
    domains: list = _f([], "source=self, built-in GPT: domain tokens to prompt with (default: the teacher's "
                           "corpus's)", FINETUNE)
    temperature: float = _f(1.0, "source=self: sampling temperature", FINETUNE)
    top_k: Optional[int] = _f(None, "source=self: sample only from the k most likely tokens", FINETUNE)
    top_p: Optional[float] = _f(None, "source=self: nucleus sampling threshold", FINETUNE)
    stop_at_eos: bool = _f(False, "source=self: end samples at EOS (padded, masked); the paper ignores EOS", FINETUNE)
    decode: str = _f("auto", "source=self: auto (compiled for a built-in GPT on CUDA, else eager) | eager | static | "
                             "compiled (built-in GPT; on a CPU ~a quarter less sampling time for a one-off "
                             "compilation of ~10-30 s: pays on long runs)", FINETUNE)
    keep_targets: str = _f("auto", "reuse the teacher's logits from sampling as KL targets: auto (in fp32, while a "
                                   "buffer's fit in max_logprobs_gib) | true (also under bf16, with a ~1e-5 KL "
                                   "floor; and a stored corpus's top-k log-probs, a lower bound) | false (run the "
                                   "teacher)", FINETUNE)
    max_logprobs_gib: float = _f(1.0, "source=self: keep the sampling logits while one buffer's fit in this many GiB",
                                 FINETUNE)
    shuffle: bool = _f(True, "stored replay: reshuffle its rows every epoch", FINETUNE)


@dataclass
class EvalConfig:
    """Periodic evaluation of the new data and of the old (forgetting)."""

    every_tokens: Optional[int] = _f(None, "evaluate every this many training tokens (default 10M) and at the end")
    every_steps: Optional[int] = _f(None, "evaluate every this many optimizer steps instead")
    max_tokens: Optional[int] = _f(None, "evaluate on at most about this many held-out tokens per data set")
    batch_size: Optional[int] = _f(None, "sequences per evaluation forward pass: 64 (built-in GPT) / 8 (Hugging "
                                         "Face)")
    prev: Optional[str] = _f(None, "old data for prev_* and forgetting (default: the teacher's corpus)", FINETUNE)
    prev_split: str = _f("train", "eval.prev: dataset split", FINETUNE)
    valid_kl: bool = _f(True, "also KL(teacher || model) on the new data (valid_kl): the teacher's side of the new "
                              "data's held-out rows at every evaluation (false: its loss and accuracy only)", FINETUNE)
    teacher_cache_mb: int = _f(1024, "on a CPU, keep the teacher's probabilities on the held-out rows (its hidden "
                                     "states beyond) for later evaluations, up to this many MB (0: off)", FINETUNE)
    mcq: list = _f([], "multiple-choice question files: log mcq_<name>_accuracy", FINETUNE)
    mcq_format: str = _f("auto", "eval.mcq prompts: auto (chat when the tokenizer has a template) | chat | plain",
                         FINETUNE)


@dataclass
class LoraConfig:
    """Low-rank adapters; the teacher is the base weights with the adapters off."""

    r: int = _f(0, "adapter rank (0: full finetuning with a frozen teacher copy)", FINETUNE)
    alpha: Optional[float] = _f(None, "scale alpha (update B·A·alpha/r): r (built-in GPT, the paper's) / 2r "
                                      "(Hugging Face)", FINETUNE)
    dropout: float = _f(0.0, "dropout on the adapters' input", FINETUNE)
    targets: list = _f([], "layers to adapt: qkv,out,up,down (built-in GPT) / all-linear (Hugging Face)", FINETUNE)


@dataclass
class DistributedConfig:
    """How ranks under torchrun share the model."""

    strategy: str = _f("ddp", "ddp (replicated) | fsdp (FSDP2 fully_shard per block)")


@dataclass
class CheckpointConfig:
    """Resumable training checkpoints (--resume) and the saved model."""

    every_tokens: Optional[int] = _f(None, "save a resumable checkpoint every this many tokens")
    every_steps: Optional[int] = _f(None, "save a resumable checkpoint every this many optimizer steps")
    merge_lora: bool = _f(True, "LoRA: save merged weights (false, Hugging Face: the adapter only)", FINETUNE)
    best_metric: Optional[str] = _f(None, "keep the best evaluation's weights as the saved model (HF Trainer's "
                                          "load_best_model_at_end), by this metrics.jsonl key, e.g. valid_loss, "
                                          "forgetting, mcq_<name>_accuracy (null: the last weights)")
    greater_is_better: Optional[bool] = _f(None, "best_metric: whether larger is better (default: true for "
                                                 "*accuracy, false otherwise)")
    push_to_hub: bool = _f(False, "upload the saved model to the Hugging Face hub at the end (needs a login or "
                                  "HF_TOKEN)")
    hub_model_id: Optional[str] = _f(None, "push_to_hub: repository id, user/name (default: the run "
                                           "directory's name under your user)")
    hub_private_repo: bool = _f(True, "push_to_hub: create the repository as private")


@dataclass
class LogConfig:
    """Where metrics go besides metrics.jsonl, and the progress display."""

    progress: bool = _f(True, "progress bar (a plain line every progress_every_s when output is not a terminal)")
    progress_every_s: float = _f(30.0, "seconds between progress lines when output is not a terminal")
    every_steps: int = _f(25, "log the training loss, its parts, the replay coefficient, LR and tokens/s (means "
                              "over the steps since the last log, as TRL's logging_steps) every this many optimizer "
                              "steps to metrics.jsonl, TensorBoard and wandb; 0: only at evaluations")
    wandb: bool = _f(False, "log to Weights & Biases (pip install wandb)")
    wandb_project: str = _f("selfreplay", "wandb project name")
    tensorboard: bool = _f(False, "log to TensorBoard in <run_dir>/tb (pip install tensorboard)")


@dataclass
class TrainConfig:
    """One pretraining or finetuning run."""

    run_dir: str = _f("", "output directory (weights, config, metrics, checkpoints)")
    seed: int = _f(0, "seed of weight init, LoRA init and replay sampling (data order: data.seed)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)")
    precision: str = _f("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16")
    compile: str = _f("auto", "torch.compile the model: auto (on CUDA) | true | false")
    threads: Optional[int] = _f(None, "CPU threads (default: OMP_NUM_THREADS, else by the work per step and the "
                                      "free cores, decided at the first start and saved in config.yaml; a resume "
                                      "reuses it)")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step (per rank)")
    gradient_checkpointing: bool = _f(False, "recompute blocks in backward to save memory")
    loss_chunk_size: Optional[int] = _f(None, "positions whose logits exist at once in the losses (default: all "
                                              "below a 32k vocabulary, else 1024)")
    model: ModelConfig = _sub(ModelConfig, "the model")
    teacher: TeacherConfig = _sub(TeacherConfig, "frozen teacher", FINETUNE)
    data: DataConfig = _sub(DataConfig, "training data")
    optim: OptimConfig = _sub(OptimConfig, "optimizer and schedule")
    stop: StopConfig = _sub(StopConfig, "stop criteria")
    replay: ReplayConfig = _sub(ReplayConfig, "forgetting penalty", FINETUNE)
    eval: EvalConfig = _sub(EvalConfig, "evaluation")
    lora: LoraConfig = _sub(LoraConfig, "low-rank adapters", FINETUNE)
    distributed: DistributedConfig = _sub(DistributedConfig, "multi-GPU")
    checkpoint: CheckpointConfig = _sub(CheckpointConfig, "checkpoints")
    log: LogConfig = _sub(LogConfig, "logging")


# Keys of earlier versions: a one-line error names the new place.
MOVED_KEYS = {
    "init_from": "model.model_name_or_path", "model_name_or_path": "model.model_name_or_path",
    "tokenizer_name_or_path": "model.tokenizer_name_or_path", "torch_dtype": "model.dtype",
    "trust_remote_code": "model.trust_remote_code", "batch_size": "data.batch_size",
    "checkpoint_every_tokens": "checkpoint.every_tokens", "checkpoint_every_steps": "checkpoint.every_steps",
    "save.merge_lora": "checkpoint.merge_lora", "save": "checkpoint", "data.valid_rows": "data.valid_examples",
    "eval.max_rows": "eval.max_tokens (tokens, not rows)", "lora.target_modules": "lora.targets",
}

C = TypeVar("C")


def config_keys(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every dotted leaf key of a config dataclass, with its field."""
    keys: dict[str, dataclasses.Field] = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in hints.items():
        sub = _NESTED.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
        if sub is not None:
            keys.update(config_keys(sub, prefix + name + "."))
        else:
            keys[prefix + name] = f
    return keys


_NESTED = {c.__name__: c for c in (ModelConfig, TeacherConfig, DataConfig, OptimConfig, StopConfig, ReplayConfig,
                                   EvalConfig, LoraConfig, DistributedConfig, CheckpointConfig, LogConfig)}


def _key_error(origin: str, key: str, cls: type) -> SelfReplayError:
    moved = next((new for old, new in MOVED_KEYS.items() if key == old or key.startswith(old + ".")), None)
    if moved is not None:
        return SelfReplayError(f"{origin}: '{key}' has moved to '{moved}'")
    close = difflib.get_close_matches(key, list(config_keys(cls)), n=1)
    return SelfReplayError(f"{origin}: unknown config key '{key}'" + (f" (did you mean {close[0]}?)" if close else ""))


def _flat_keys(layer: Any, prefix: str = "") -> list[str]:
    """The dotted leaf keys a YAML / override layer sets."""
    out = []
    for k, v in layer.items_ex(resolve=False):
        out += _flat_keys(v, f"{prefix}{k}.") if OmegaConf.is_dict(v) else [f"{prefix}{k}"]
    return out


def load_config(cls: type[C], files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = (),
                base: Optional[dict] = None) -> C:
    """Build a ``cls`` from defaults, then ``base``, then each YAML file, then ``key.sub=value`` overrides."""
    schema = OmegaConf.structured(cls)
    layers: list[tuple[str, Any]] = []
    if base:
        layers.append(("base", OmegaConf.create(base)))
    for path in files:
        if not Path(path).is_file():
            raise SelfReplayError(f"config file {path}: not found")
        raw = read_yaml(path, "config file")
        if raw is not None and not isinstance(raw, dict):
            raise SelfReplayError(f"config file {path}: expected a mapping of keys at the top level, got a "
                                  f"{'list' if isinstance(raw, list) else 'scalar'}")
        layers.append((f"config file {path}", OmegaConf.create(raw or {})))
    fields = config_keys(cls)
    for item in overrides:
        if "=" not in item:
            raise SelfReplayError(f"override {item!r}: expected key.sub=value")
        key, value = item.split("=", 1)
        if not value.strip() and key in fields and not str(fields[key].type).startswith("Optional"):
            raise SelfReplayError(f"override {item!r}: {key} needs a value (an empty one means null, which {key} "
                                  f"cannot be)")
        try:
            layers.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
        except Exception as e:
            raise SelfReplayError(f"override {item!r}: {str(e).splitlines()[0]}") from None
    merged = schema
    valid = set(config_keys(cls))
    for origin, layer in layers:
        for key in _flat_keys(layer):
            if key not in valid and not any(v.startswith(key + ".") for v in valid):
                raise _key_error(origin, key, cls)
        try:
            merged = OmegaConf.merge(merged, layer)
        except oc_errors.ConfigKeyError as e:
            raise _key_error(origin, str(getattr(e, "full_key", None) or str(e).splitlines()[0]), cls) from None
        except oc_errors.ValidationError as e:
            key = getattr(e, "full_key", "?")
            raise SelfReplayError(f"{origin}: bad value for '{key}': {str(e).splitlines()[0]}") from None
        except oc_errors.OmegaConfBaseException as e:
            raise SelfReplayError(f"{origin}: {str(e).splitlines()[0]}") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def describe_config(cls: type, command: Optional[str] = None) -> str:
    """``--help`` text: one line per key (``key=default  # help``), grouped by section, only the keys that apply
    to ``command`` (pretrain / finetune)."""
    defaults = config_to_dict(cls())
    lines, section = [], None
    sections = {f.name: f.metadata.get("only") for f in dataclasses.fields(cls)}
    for key, f in config_keys(cls).items():
        top = key.split(".")[0]
        only = f.metadata.get("only") or sections.get(top)
        if command is not None and only not in (None, command):
            continue
        if "." in key and top != section:
            section = top
            lines.append(f"[{section}]")
        value: Any = defaults
        for part in key.split("."):
            value = value[part]
        lines.append(f"{key}={value!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)
