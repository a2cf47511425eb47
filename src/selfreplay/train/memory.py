"""The memory a run needs, estimated from its config before anything is built: absurd sizes become one-line
errors naming the key, instead of an allocator crash after minutes (or hours of building a million layers).

What is counted, in bytes (a lower bound: what the run cannot do without):

- the model: every parameter in the weights' dtype (fp32 for the built-in GPT, whose parameter count follows
  :class:`~selfreplay.models.gpt.GPT`: 12·L·D² + 2·D·V; a Hugging Face model's is counted on the meta device
  from its config), plus, for full finetuning, each weight's gradient and optimizer state (AdamW: two moments; SGD:
  one with momentum); a frozen teacher copy when the run keeps one; the start weights (l2_init, ewc) and the
  Fisher diagonal (ewc);
- one micro-batch's logits (rows × positions per loss chunk × vocabulary, fp32) and the activations the blocks
  keep for backward (rows × positions × width × layers × 8 values; × 1 with gradient checkpointing);
- self-generated replay: one refill's tokens, its KV cache while sampling, and the kept teacher logits when
  ``replay.keep_targets`` keeps them (at most ``replay.max_logprobs_gib``).

Not counted: LoRA adapters, the allocator's slack, temporaries, evaluation, the (memory-mapped) data. The limit is
the GPU's memory on CUDA, else the machine's RAM; the environment variable ``SELFREPLAY_MAX_MEMORY_GB`` replaces it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from selfreplay.config import FINETUNE, TrainConfig
from selfreplay.errors import SelfReplayError

LIMIT_ENV = "SELFREPLAY_MAX_MEMORY_GB"
SAVED_PER_LAYER = 8  # values per position and width a block keeps for backward: qkv 3, attention out 1, MLP up 4


@dataclass
class Shape:
    """What the estimate needs to know about a model; ``keys`` are the config keys (with their typical values)
    to blame for the model's size."""

    params: int
    vocab: int
    context: int  # positions per training row
    width: int  # hidden size (0: unknown, activations not counted)
    layers: int
    kv_width: int  # key (or value) values per position and layer in the KV cache
    weight_bytes: int
    cache_context: Optional[int] = None  # the built-in GPT's KV cache always spans its whole context
    keys: list = field(default_factory=list)  # [(key, value, typical)]


@dataclass
class Part:
    what: str
    bytes: int
    keys: list  # [(key, value, typical)]: the settings this part grows with


def human(n: float) -> str:
    """Bytes in decimal units, e.g. ``24 GB``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"


def memory_limit(device: torch.device) -> tuple[Optional[int], str]:
    """(bytes, what they are) the run must fit in: $SELFREPLAY_MAX_MEMORY_GB, the GPU's memory, or the machine's RAM
    (None where it cannot be read: nothing is checked)."""
    given = os.environ.get(LIMIT_ENV)
    if given:
        try:
            gb = float(given)
        except ValueError:
            gb = math.nan
        if not 0 < gb < math.inf:
            raise SelfReplayError(f"{LIMIT_ENV}={given!r}: expected a positive number of gigabytes")
        return int(gb * 1e9), f"{LIMIT_ENV} allows"
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, f"GPU {device} has"
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "this machine has"
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): psutil, if it is there
        try:
            import psutil

            return int(psutil.virtual_memory().total), "this machine has"
        except ImportError:
            return None, ""


def check_fits(parts: list[Part], device: torch.device, subject: str = "the run") -> None:
    """A one-line error naming the setting to lower when the parts do not fit in the device's memory."""
    limit, where = memory_limit(device)
    total = sum(p.bytes for p in parts)
    if limit is None or total <= limit:
        return
    big = max(parts, key=lambda p: p.bytes)
    key, value = _blame(big.keys)
    raise SelfReplayError(f"{key}={value}: {subject} needs ~{human(total)} ({big.what}: ~{human(big.bytes)}) but "
                          f"{where} {human(limit)}; lower it (or set {LIMIT_ENV} if the estimate is wrong)")


def _blame(keys: list) -> tuple[str, object]:
    """The key furthest above its typical value."""
    key, value, _ = max(keys, key=lambda k: (k[1] / k[2]) if isinstance(k[1], (int, float)) and k[2] else 0)
    return key, value


# ------------------------------------------------------------------------------------------------ model shapes

def gpt_shape(shape, keys: list) -> Shape:
    """The built-in GPT's (a :class:`~selfreplay.models.gpt.GPTConfig`): embedding and head D·V each, per block
    qkv 3D², out D², MLP 8D²."""
    d, v = shape.d_model, shape.vocab_size
    return Shape(12 * shape.n_layers * d * d + 2 * d * v, v, shape.context, d, shape.n_layers, d, 4,
                 shape.context, keys)


def hf_shape(cfg: TrainConfig) -> Optional[Shape]:
    """A Hugging Face model's, from its config (parameters counted on the meta device: nothing allocated); None
    when the config cannot be read (loading the model reports why)."""
    from selfreplay.models import hf_path
    from selfreplay.models.hf import require_hf, resolve_dtype

    require_hf("transformers")
    from transformers import AutoConfig, AutoModelForCausalLM

    name = hf_path(cfg.model.model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(name, revision=cfg.model.model_revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
        with torch.device("meta"):
            net = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
        params = sum(p.numel() for p in net.parameters())
    except Exception:  # noqa: BLE001 - any failure here is reported by the real load, with its own message
        return None
    dtype = resolve_dtype(cfg.model.dtype) or getattr(config, "torch_dtype", None) or getattr(config, "dtype", None)
    weight_bytes = dtype.itemsize if isinstance(dtype, torch.dtype) else 2  # unknown: the smallest common
    return _hf_dims(config, params, cfg.data.seq_len or 512, weight_bytes,
                    [("model.model_name_or_path", cfg.model.model_name_or_path, None)])


def _hf_dims(config, params: int, context: int, weight_bytes: int, keys: list) -> Shape:
    """A Hugging Face config's sizes (0 where the architecture names them otherwise: not counted)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    width = int(getattr(text, "hidden_size", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    head_dim = int(getattr(text, "head_dim", 0) or 0) or (width // heads if heads else 0)
    kv_heads = int(getattr(text, "num_key_value_heads", 0) or heads)
    return Shape(params, int(getattr(text, "vocab_size", 0) or 0), context, width,
                 int(getattr(text, "num_hidden_layers", 0) or 0), kv_heads * head_dim, weight_bytes, None, keys)


def model_shape(model) -> Shape:
    """The shape of a loaded :class:`~selfreplay.models.core.CausalLM`."""
    params = sum(p.numel() for p in model.parameters())
    if model.kind == "gpt":
        return gpt_shape(model.net.config, [])
    weight = next(model.parameters())
    return _hf_dims(model.net.config, params, 512, weight.element_size(), [])


def run_shape(cfg: TrainConfig, kind: str, command: str) -> Optional[Shape]:
    """The shape of the model the run trains: the config's (pretraining), the checkpoint's (finetuning)."""
    from selfreplay.models.gpt import GPTConfig, check_model_config

    if kind == "hf":
        return hf_shape(cfg)
    if command == FINETUNE:
        from selfreplay.models.builtin import read_run_info

        info = read_run_info(cfg.model.model_name_or_path)
        return gpt_shape(GPTConfig.of(info["model"]), [("model.model_name_or_path", cfg.model.model_name_or_path,
                                                        None)])
    shape = GPTConfig.of(cfg.model)
    check_model_config(shape)
    typical = GPTConfig()
    return gpt_shape(shape, [(f"model.{k}", getattr(shape, k), getattr(typical, k))
                             for k in ("d_model", "n_layers", "vocab_size", "head_dim", "context")])


# ------------------------------------------------------------------------------------------------ the estimate

def sampling_bytes(shape: Shape, rows: int, length: int, kept_logits_bytes: int, low: bool) -> int:
    """Sampling ``rows`` sequences of ``length`` at once: their tokens, the KV cache, one step's logits."""
    act = 2 if low else 4
    cache = rows * 2 * shape.layers * (shape.cache_context or length) * shape.kv_width * act
    return rows * length * 8 + cache + rows * shape.vocab * 4 + kept_logits_bytes


def estimate(cfg: TrainConfig, kind: str, command: str, shape: Shape, device: torch.device,
             world: int = 1) -> list[Part]:
    """The parts of a run's memory (see the module docstring), per rank."""
    from selfreplay.replay.penalty import REPLAY_ROW_METHODS, SOURCE_METHODS, TEACHER_METHODS, replaced_rows
    from selfreplay.train.build import chunk_size_for
    from selfreplay.train.checks import KIND_DEFAULTS

    r, gpt = cfg.replay, kind == "gpt"
    low = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    act = 2 if low else 4
    typical = {k: v[0 if gpt else 1] for k, v in KIND_DEFAULTS.items()}
    full = cfg.lora.r == 0
    sharded = world if cfg.distributed.strategy == "fsdp" else 1
    states = 2 if cfg.optim.name == "adamw" else (1 if cfg.optim.momentum > 0 else 0)
    weights = shape.params * shape.weight_bytes
    model = weights + (weights * (1 + states) if full else 0)
    what = ("the model's weights" if not full else "the model's parameters and gradients" if not states else
            f"the model's parameters, gradients and {'AdamW' if states == 2 else 'SGD momentum'} state")
    parts = [Part(what, model // sharded, shape.keys)]
    finetune = command == FINETUNE
    if finetune and full and (r.method in TEACHER_METHODS or gpt or cfg.eval.prev is not None):
        from selfreplay.models.hf import resolve_dtype

        teacher = resolve_dtype(cfg.teacher.dtype)
        copy = shape.params * (teacher.itemsize if teacher is not None else shape.weight_bytes)
        if cfg.teacher.device is None:
            parts.append(Part("the frozen teacher", copy, shape.keys))
    if finetune and r.method in ("l2_init", "ewc"):
        parts.append(Part("the start weights" + (" and the Fisher diagonal" if r.method == "ewc" else ""),
                          shape.params * 4 * (2 if r.method == "ewc" else 1), shape.keys))
    rows = max(1, cfg.data.batch_size // (world * cfg.gradient_accumulation_steps))
    row_keys = [("data.batch_size", cfg.data.batch_size, typical["data.batch_size"])]
    ctx_keys = ([("data.seq_len", shape.context, 512)] if not gpt else shape.keys if finetune else
                [("model.context", shape.context, 256)])
    vocab_keys = [("model.vocab_size", shape.vocab, 4096)] if gpt and not finetune else shape.keys
    chunk = chunk_size_for(cfg, shape.vocab) or shape.context
    parts.append(Part("one micro-batch's logits", rows * min(chunk, shape.context) * shape.vocab * 4,
                      row_keys + ctx_keys + vocab_keys + [("loss_chunk_size", cfg.loss_chunk_size, 1024)]))
    saved = 1 if cfg.gradient_checkpointing else SAVED_PER_LAYER
    parts.append(Part("the activations kept for backward",
                      rows * shape.context * shape.width * shape.layers * saved * act,
                      row_keys + ctx_keys + shape.keys))
    if finetune and r.method in SOURCE_METHODS and _samples_itself(cfg, kind):
        replay_rows = replaced_rows(r.method, r.fraction, cfg.data.batch_size) or r.batch_size
        if r.method in REPLAY_ROW_METHODS and world > 1:
            replay_rows = max(1, replay_rows // world)
        length = r.length or (shape.context if gpt else cfg.data.seq_len or 512)
        buffer = -(-r.ewc_sequences // replay_rows) if r.method == "ewc" else r.buffer
        refill = buffer * replay_rows
        keep = r.method == "kl" and {"true": True, "false": False}.get(str(r.keep_targets).lower(), not low)
        kept = refill * length * shape.vocab * act if keep else 0
        kept = kept if kept <= r.max_logprobs_gib * 2 ** 30 else 0  # over the cap the teacher runs again instead
        keys = [("replay.buffer", r.buffer, typical["replay.buffer"]),
                ("replay.batch_size", r.batch_size, typical["replay.batch_size"]),
                ("replay.length", length, shape.context)]
        if r.method == "ewc":
            keys = [("replay.ewc_sequences", r.ewc_sequences, 64)] + keys[1:]
        parts.append(Part("one refill of self-generated replay", sampling_bytes(shape, refill, length, kept, low),
                          keys + ctx_keys))
    return parts


def _samples_itself(cfg: TrainConfig, kind: str) -> bool:
    """Whether replay is sampled from the teacher (replay.source=self, or auto without the teacher's corpus)."""
    if cfg.replay.source != "auto":
        return cfg.replay.source == "self"
    if kind != "gpt":
        return True
    from pathlib import Path

    from selfreplay.models.builtin import read_run_info

    recorded = (read_run_info(cfg.model.model_name_or_path).get("train_corpus") or {}).get("path")
    return not (recorded and Path(recorded).is_dir())


def check_run_memory(cfg: TrainConfig, kind: str, command: str, device: torch.device, world: int = 1) -> None:
    """Refuse, naming the key, a run whose estimated memory exceeds the device's (before anything is built)."""
    shape = run_shape(cfg, kind, command)
    if shape is not None:
        check_fits(estimate(cfg, kind, command, shape, device, world), device)
