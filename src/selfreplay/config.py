"""Typed run configuration: dataclasses whose defaults reproduce the paper's small-model setup.

Configs load from YAML files and ``key.sub=value`` overrides (OmegaConf does the merging and type checks);
unknown keys and mistyped values become one-line :class:`SelfReplayError` messages.
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


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _sub(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class ModelConfig:
    """The paper's decoder-only GPT (heads = d_model / head_dim)."""

    d_model: int = _f(256, "model width D")
    n_layers: int = _f(6, "number of transformer blocks L")
    head_dim: int = _f(64, "attention head dimension H (heads = d_model / head_dim)")
    context: int = _f(256, "sequence length T, domain token included")
    vocab_size: int = _f(4096, "vocabulary size V (must match the tokenizer)")


@dataclass
class DataConfig:
    """Where the training batches come from."""

    train: str = _f("", "tokenized corpus directory (from `selfreplay tokenize`) to train on")
    valid_tokens: int = _f(1_048_576, "tokens held out for validation (paper: 10M; 1M on the ~9M-token shared corpora)")
    batch_size: int = _f(256, "sequences per optimizer step")
    seed: int = _f(0, "seed of the train/valid split and the epoch shuffles (kept apart from the init seed)")
    mix: Optional[str] = _f(None, "second tokenized corpus mixed into every batch")
    mix_fraction: float = _f(0.0, "fraction of each batch's rows taken from data.mix")
    max_train_tokens: Optional[int] = _f(None, "use at most this many tokens of the corpus (after the validation split)")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (paper: AdamW 0.9/0.999, wd 0.02, 10M warmup tokens, constant)."""

    name: str = _f("adamw", "adamw | sgd")
    lr: float = _f(1e-3, "peak learning rate")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.999, "AdamW beta2")
    weight_decay: float = _f(0.02, "decoupled weight decay (AdamW) or L2 (SGD)")
    momentum: float = _f(0.0, "SGD momentum")
    warmup_tokens: int = _f(10_000_000, "linear warmup length in training tokens")
    schedule: str = _f("constant", "constant | cosine (cosine decays to 0 at the stop length)")
    grad_clip: Optional[float] = _f(None, "clip the global gradient norm to this value (off by default, as in the paper)")


@dataclass
class StopConfig:
    """When training ends. At most one length criterion (tokens, tokens_per_param, epochs, steps)."""

    tokens: Optional[int] = _f(None, "stop after this many training tokens")
    tokens_per_param: Optional[float] = _f(None, "stop after this many tokens per parameter (paper's count)")
    epochs: Optional[float] = _f(None, "stop after this many passes over the training split")
    steps: Optional[int] = _f(None, "stop after this many optimizer steps")
    target_loss: Optional[float] = _f(None, "stop once validation loss <= this (checked at every evaluation)")
    max_time: Optional[float] = _f(None, "stop after this many seconds of training time (evaluation excluded)")
    early_stop_evals: Optional[int] = _f(None, "stop after this many evaluations without a new best validation loss")


@dataclass
class ReplayConfig:
    """The forgetting penalty: loss = NTP(downstream) + coeff * term(replay)."""

    method: str = _f("none", "none | kl | ntp | kl_downstream | replace")
    coeff: float = _f(10.0, "replay coefficient c (the paper's reg.coeff)")
    fraction: float = _f(0.125, "method=replace: fraction of each downstream batch's rows replaced by replay rows")
    divergence: str = _f("forward_kl", "forward_kl (KL(teacher||student), the paper's) | reverse_kl | jsd")
    jsd_beta: float = _f(0.5, "divergence=jsd: mixture weight beta of the generalised Jensen-Shannon divergence")
    source: str = _f("prev", "prev (the checkpoint's own training corpus) | self (sampled from the teacher) | a corpus dir")
    batch_size: int = _f(64, "replay sequences per optimizer step (independent of data.batch_size)")
    buffer: int = _f(16, "source=self: replay batches sampled at once")
    temperature: float = _f(1.0, "source=self: sampling temperature")
    top_k: Optional[int] = _f(None, "source=self: sample only from the k most likely tokens")
    top_p: Optional[float] = _f(None, "source=self: nucleus sampling threshold")
    stop_at_eos: bool = _f(False, "source=self: end samples at EOS (padded, masked); default ignores EOS as the paper")
    logprobs_top_k: Optional[int] = _f(None, "keep only the teacher's top-k log-probs (+ remaining mass) as KL targets")
    domains: list = _f([], "source=self: domain token ids to prompt with (default: the checkpoint corpus's domain token)")
    shuffle: bool = _f(True, "source=<dir>: reshuffle stored replay rows every epoch (false: in the stored order)")


@dataclass
class EvalConfig:
    """Periodic evaluation on the validation split and on the previous distribution."""

    every_tokens: int = _f(10_000_000, "evaluate every this many training tokens (and at the end)")
    max_tokens: Optional[int] = _f(None, "evaluate on at most this many validation tokens per corpus (default: all)")
    batch_size: int = _f(64, "sequences per evaluation forward pass")
    prev: Optional[str] = _f(None, "previous-distribution corpus for prev_* metrics (default: the checkpoint's corpus)")


@dataclass
class LoraConfig:
    """Low-rank adapters for finetuning (merged into the weights before saving; see selfreplay.lora)."""

    r: int = _f(0, "adapter rank (0 = off: full finetuning)")
    alpha: float = _f(16.0, "adapter scale alpha (the update is B @ A * alpha / r)")
    dropout: float = _f(0.0, "dropout on the adapter's input")
    targets: list = _f(["qkv", "out", "up", "down"], "Linear layers to adapt (model.py: qkv, out, up, down, head)")


@dataclass
class LogConfig:
    """Where metrics go besides metrics.jsonl."""

    progress: bool = _f(True, "show a progress bar with the live loss")
    wandb: bool = _f(False, "log to Weights & Biases (pip install wandb)")
    wandb_project: str = _f("selfreplay", "wandb project name")
    tensorboard: bool = _f(False, "log to TensorBoard in <run_dir>/tb (pip install tensorboard)")


@dataclass
class TrainConfig:
    """One pretraining or finetuning run."""

    run_dir: str = _f("", "output directory (weights, config, metrics)")
    init_from: Optional[str] = _f(None, "checkpoint run directory to start from (finetuning); its model config is used")
    seed: int = _f(0, "seed for weight init and replay sampling (data order: data.seed)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    precision: str = _f("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16")
    compile: bool = _f(True, "torch.compile the model on CUDA")
    checkpoint_every_tokens: Optional[int] = _f(None, "save a resumable training checkpoint every this many tokens")
    model: ModelConfig = _sub(ModelConfig, "architecture (ignored when init_from is set)")
    data: DataConfig = _sub(DataConfig, "training data")
    optim: OptimConfig = _sub(OptimConfig, "optimizer and schedule")
    stop: StopConfig = _sub(StopConfig, "stop criteria")
    replay: ReplayConfig = _sub(ReplayConfig, "forgetting penalty")
    eval: EvalConfig = _sub(EvalConfig, "evaluation")
    lora: LoraConfig = _sub(LoraConfig, "low-rank adapters (finetuning only)")
    log: LogConfig = _sub(LogConfig, "logging")


C = TypeVar("C")


def _suggest(key: str, cls: type) -> str:
    """' (did you mean X?)' for the closest valid dotted key, or ''."""
    close = difflib.get_close_matches(key, list(config_keys(cls)), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def config_keys(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every dotted leaf key of a config dataclass, with its field."""
    keys: dict[str, dataclasses.Field] = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.type in _NESTED):
            keys.update(config_keys(_NESTED.get(f.type, f.type), name + "."))
        else:
            keys[name] = f
    return keys


_NESTED: dict[str, type] = {}


def _register_nested(*classes: type) -> None:
    for c in classes:
        _NESTED[c.__name__] = c


_register_nested(ModelConfig, DataConfig, OptimConfig, StopConfig, ReplayConfig, EvalConfig, LoraConfig,
                 LogConfig)


def load_config(cls: type[C], files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = (),
                base: Optional[dict] = None) -> C:
    """Build a ``cls`` from defaults, then ``base``, then each YAML file, then ``key.sub=value`` overrides."""
    schema = OmegaConf.structured(cls)
    layers: list[tuple[str, Any]] = []
    if base:
        layers.append(("base", base))
    for path in files:
        p = Path(path)
        if not p.is_file():
            raise SelfReplayError(f"config file {path}: not found")
        try:
            layers.append((path, OmegaConf.load(p)))
        except Exception as e:  # yaml errors carry multi-line context
            raise SelfReplayError(f"config file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    for item in overrides:
        if "=" not in item:
            raise SelfReplayError(f"override {item!r}: expected key.sub=value")
        layers.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
    merged = schema
    for origin, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except oc_errors.ConfigKeyError as e:
            key = getattr(e, "full_key", None) or str(e).splitlines()[0]
            raise SelfReplayError(f"{origin}: unknown config key '{key}'{_suggest(str(key), cls)}") from None
        except oc_errors.ValidationError as e:
            key = getattr(e, "full_key", "?")
            raise SelfReplayError(f"{origin}: bad value for '{key}': {str(e).splitlines()[0]}") from None
        except oc_errors.OmegaConfBaseException as e:
            raise SelfReplayError(f"{origin}: {str(e).splitlines()[0]}") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def describe_config(cls: type) -> str:
    """One line per dotted key: name, default and help; used as ``--help`` text."""
    defaults = config_to_dict(cls())
    lines = []
    for key, f in config_keys(cls).items():
        value: Any = defaults
        for part in key.split("."):
            value = value[part]
        lines.append(f"{key}={value!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)


LENGTH_CRITERIA = ("tokens", "tokens_per_param", "epochs", "steps")


def validate_train_config(cfg: TrainConfig, finetune: bool) -> None:
    """Cross-field checks that the type system cannot express."""
    stop = cfg.stop
    given = [k for k in LENGTH_CRITERIA if getattr(stop, k) is not None]
    if len(given) > 1:
        raise SelfReplayError(f"stop: conflicting length criteria {', '.join('stop.' + k for k in given)}; give one")
    if not given and all(getattr(stop, k) is None for k in ("target_loss", "max_time", "early_stop_evals")):
        raise SelfReplayError("stop: no stop criterion; set one of stop.tokens / tokens_per_param / epochs / steps / "
                              "target_loss / max_time / early_stop_evals")
    for k in LENGTH_CRITERIA + ("max_time", "early_stop_evals"):
        v = getattr(stop, k)
        if v is not None and v <= 0:
            raise SelfReplayError(f"stop.{k}={v}: must be positive")
    if cfg.optim.schedule not in ("constant", "cosine"):
        raise SelfReplayError(f"optim.schedule={cfg.optim.schedule!r}: expected constant or cosine")
    if cfg.optim.schedule == "cosine" and not given:
        raise SelfReplayError("optim.schedule=cosine needs a length criterion (stop.tokens/tokens_per_param/epochs/steps)")
    if cfg.optim.name not in ("adamw", "sgd"):
        raise SelfReplayError(f"optim.name={cfg.optim.name!r}: expected adamw or sgd")
    if cfg.optim.lr <= 0:
        raise SelfReplayError(f"optim.lr={cfg.optim.lr}: must be positive")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise SelfReplayError(f"precision={cfg.precision!r}: expected auto, fp32 or bf16")
    if not cfg.data.train:
        raise SelfReplayError("data.train: no training corpus given (a directory written by `selfreplay tokenize`)")
    if not cfg.run_dir:
        raise SelfReplayError("run_dir: no output directory given")
    if cfg.data.batch_size <= 0:
        raise SelfReplayError(f"data.batch_size={cfg.data.batch_size}: must be positive")
    if not 0.0 <= cfg.data.mix_fraction < 1.0:
        raise SelfReplayError(f"data.mix_fraction={cfg.data.mix_fraction}: expected a fraction in [0, 1)")
    if cfg.data.mix_fraction > 0 and not cfg.data.mix:
        raise SelfReplayError("data.mix_fraction > 0 needs data.mix (a tokenized corpus directory)")
    r = cfg.replay
    if r.method not in ("none", "kl", "ntp", "kl_downstream", "replace"):
        raise SelfReplayError(f"replay.method={r.method!r}: expected none, kl, ntp, kl_downstream or replace")
    if r.divergence not in ("forward_kl", "reverse_kl", "jsd"):
        raise SelfReplayError(f"replay.divergence={r.divergence!r}: expected forward_kl, reverse_kl or jsd")
    if not 0.0 < r.jsd_beta < 1.0:
        raise SelfReplayError(f"replay.jsd_beta={r.jsd_beta}: expected a value in (0, 1)")
    if r.method == "replace" and not 0.0 < r.fraction < 1.0:
        raise SelfReplayError(f"replay.fraction={r.fraction}: expected a fraction in (0, 1)")
    if r.method != "none" and not finetune:
        raise SelfReplayError(f"replay.method={r.method}: replay needs a teacher; use `selfreplay finetune` with init_from")
    if r.method in ("kl", "ntp") and r.batch_size <= 0:
        raise SelfReplayError(f"replay.batch_size={r.batch_size}: must be positive")
    if r.temperature <= 0:
        raise SelfReplayError(f"replay.temperature={r.temperature}: must be positive")
    if cfg.lora.r < 0:
        raise SelfReplayError(f"lora.r={cfg.lora.r}: must be >= 0 (0 = off)")
    if cfg.lora.r > 0 and not finetune:
        raise SelfReplayError("lora.r > 0: adapters are for finetuning; use `selfreplay finetune` with init_from")
    if finetune and not cfg.init_from:
        raise SelfReplayError("init_from: finetuning needs a checkpoint run directory")
