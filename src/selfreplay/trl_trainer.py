"""TRL drop-in: ``SelfReplaySFTTrainer``, TRL's SFTTrainer plus the replay penalty against forgetting.

For people who already finetune with TRL, switching is a few lines::

    from selfreplay.trl_trainer import SelfReplayConfig, SelfReplaySFTTrainer

    args = SelfReplayConfig(output_dir="out", learning_rate=1e-5, replay_coeff=1.0, replay_batch_size=32)
    trainer = SelfReplaySFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

Each optimizer step adds ``replay_coeff`` × (forward KL from the teacher, or next-token loss) on replay sequences
to TRL's own SFT loss. The teacher is the model as it is when the trainer is built: a frozen copy, or for a PEFT
model the base with its adapters switched off (no copy). Replay is sampled from the teacher itself
(``replay_source="self"``: prompted only with BOS, temperature 1, the paper's recipe) or read from old data
(a ``datasets.Dataset``, a data file/hub id, or a replay corpus written by ``selfreplay generate --model``).
The replay term is logged as ``replay_loss`` next to TRL's metrics.

Replay settings live on :class:`SelfReplayConfig` (TRL's ``SFTConfig`` with ``replay_*`` fields, so they show up
in ``HfArgumentParser`` command lines and in saved training arguments); keyword arguments of the trainer override
them, which also lets a plain ``SFTConfig`` be used unchanged.

TRL is an optional extra imported only when the classes are first used: this module imports without it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Optional

from selfreplay.errors import SelfReplayError

TRL_MISSING = "SelfReplaySFTTrainer needs extras: pip install 'selfreplay[trl]'"
IN_MEMORY_SOURCE = "<in-memory dataset>"  # replay_source when the trainer was given a Dataset object
REPLAY_METHODS = ("kl", "ntp")
REPLAY_PROMPTS = ("bos", "chat")


@dataclass
class ReplaySettings:
    """The replay options of :class:`SelfReplayConfig` (also usable on their own, e.g. with a plain SFTConfig)."""

    replay_coeff: float = dataclasses.field(
        default=1.0, metadata={"help": "weight c of the replay term: loss = SFT loss + c * replay loss (0: off)"})
    replay_method: str = dataclasses.field(
        default="kl", metadata={"help": "kl: KL(teacher || model) on replay; ntp: next-token loss on replay"})
    replay_divergence: str = dataclasses.field(
        default="forward_kl", metadata={"help": "forward_kl (the paper's), reverse_kl or jsd, for replay_method=kl"})
    replay_source: str = dataclasses.field(
        default="self", metadata={"help": "self: sampled from the teacher; else old data: a data file, hub dataset "
                                          "id or a `selfreplay generate --model` replay corpus directory"})
    replay_batch_size: int = dataclasses.field(
        default=32, metadata={"help": "replay sequences per optimizer step and process, split evenly over the "
                                      "gradient accumulation steps"})
    replay_length: Optional[int] = dataclasses.field(
        default=None, metadata={"help": "tokens per replay sequence (default: max_length, else 512)"})
    replay_prompt: str = dataclasses.field(
        default="bos", metadata={"help": "self-generated replay prompt: bos (BOS only, the paper's) or chat (an "
                                         "empty chat up to the assistant turn)"})
    replay_buffer: int = dataclasses.field(
        default=32, metadata={"help": "optimizer steps of self-generated replay sampled at once"})
    replay_temperature: float = dataclasses.field(
        default=1.0, metadata={"help": "sampling temperature of self-generated replay (1: the teacher's own "
                                       "distribution)"})
    replay_text_field: str = dataclasses.field(
        default="text", metadata={"help": "text column of old-data replay"})
    replay_split: str = dataclasses.field(default="train", metadata={"help": "split of a hub dataset replay source"})
    replay_seed: Optional[int] = dataclasses.field(
        default=None, metadata={"help": "seed of the replay stream (default: the training seed)"})
    loss_chunk_size: int = dataclasses.field(
        default=1024, metadata={"help": "positions per chunk of the replay loss (the full logits are never built)"})

    def check(self) -> "ReplaySettings":
        """Raise a one-line SelfReplayError naming the first bad option."""
        if not isinstance(self.replay_coeff, (int, float)) or not self.replay_coeff >= 0:
            raise SelfReplayError(f"replay_coeff={self.replay_coeff!r}: expected a number >= 0")
        if self.replay_method not in REPLAY_METHODS:
            raise SelfReplayError(f"replay_method={self.replay_method!r}: expected one of {list(REPLAY_METHODS)}")
        from selfreplay.losses import DIVERGENCES

        if self.replay_divergence not in DIVERGENCES:
            raise SelfReplayError(f"replay_divergence={self.replay_divergence!r}: expected one of "
                                  f"{list(DIVERGENCES)}")
        if self.replay_prompt not in REPLAY_PROMPTS:
            raise SelfReplayError(f"replay_prompt={self.replay_prompt!r}: expected one of {list(REPLAY_PROMPTS)}")
        for name in ("replay_batch_size", "replay_buffer", "loss_chunk_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise SelfReplayError(f"{name}={getattr(self, name)!r}: expected a positive integer")
        if self.replay_length is not None and (not isinstance(self.replay_length, int) or self.replay_length < 2):
            raise SelfReplayError(f"replay_length={self.replay_length!r}: expected an integer >= 2")
        if not self.replay_temperature > 0:
            raise SelfReplayError(f"replay_temperature={self.replay_temperature!r}: expected a number > 0")
        return self


REPLAY_FIELDS = tuple(f.name for f in dataclasses.fields(ReplaySettings))


# ------------------------------------------------------------------------------------------- the TRL classes

_CLASSES: dict[str, type] = {}


def __getattr__(name: str):
    """Build the TRL subclasses on first use, so that importing this module needs no TRL."""
    if name in ("SelfReplayConfig", "SelfReplaySFTTrainer"):
        if not _CLASSES:
            _build_classes()
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _import_trl():
    try:
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        raise SelfReplayError(TRL_MISSING) from None
    return SFTConfig, SFTTrainer


def _build_classes() -> None:
    SFTConfig, SFTTrainer = _import_trl()

    config_fields = [(f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
                     for f in dataclasses.fields(ReplaySettings)]

    def __post_init__(self) -> None:
        SFTConfig.__post_init__(self)
        _settings_from(self).check()

    SelfReplayConfig = dataclasses.make_dataclass(
        "SelfReplayConfig", config_fields, bases=(SFTConfig,), namespace={"__post_init__": __post_init__})
    SelfReplayConfig.__doc__ = ("TRL's SFTConfig plus the replay options of selfreplay.trl_trainer.ReplaySettings "
                                "(replay_coeff, replay_method, replay_source, replay_batch_size, ...).")

    class SelfReplaySFTTrainer(_ReplayMixin, SFTTrainer):
        __doc__ = _ReplayMixin.__doc__

    for cls in (SelfReplayConfig, SelfReplaySFTTrainer):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__  # picklable as selfreplay.trl_trainer.<name>
    _CLASSES.update(SelfReplayConfig=SelfReplayConfig, SelfReplaySFTTrainer=SelfReplaySFTTrainer)


def _settings_from(args, overrides: Optional[dict] = None) -> ReplaySettings:
    """Replay settings from ``args`` (any fields it has), then explicit non-None ``overrides``."""
    values = {name: getattr(args, name) for name in REPLAY_FIELDS if hasattr(args, name)}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return ReplaySettings(**values)


class _ReplayMixin:
    """TRL's SFTTrainer with the replay penalty: loss = SFT loss + replay_coeff · replay loss.

    Takes every SFTTrainer argument, and keyword arguments ``replay_*`` / ``loss_chunk_size`` that override the
    config's (see :class:`ReplaySettings`); ``replay_source`` may also be a ``datasets.Dataset`` of old data.
    The teacher is the model at construction: adapters disabled for a PEFT model, a frozen copy otherwise
    (``teacher_dtype`` sets the copy's dtype, e.g. torch.bfloat16 to halve its memory).

    Gradient accumulation: ``replay_batch_size`` sequences per optimizer step are split evenly (rounded up)
    over the accumulation micro-steps, and each micro-step's replay mean is weighted like TRL's token-normalised
    SFT loss, so the penalty's size does not depend on the accumulation. Evaluation reports the SFT loss alone.
    The replay stream is not part of checkpoints: a resumed run continues with fresh samples.

    Runs on one device or data-parallel (``torchrun`` / ``accelerate launch``: DDP, each process sampling its own
    replay with seed + 1000003·rank); FSDP and DeepSpeed ZeRO-3 are refused (the replay forward needs unsharded
    weights).
    """

    def __init__(self, model, args=None, *positional, replay_coeff: Optional[float] = None,
                 replay_method: Optional[str] = None, replay_divergence: Optional[str] = None,
                 replay_source: Any = None, replay_batch_size: Optional[int] = None,
                 replay_length: Optional[int] = None, replay_prompt: Optional[str] = None,
                 replay_buffer: Optional[int] = None, replay_temperature: Optional[float] = None,
                 replay_text_field: Optional[str] = None, replay_split: Optional[str] = None,
                 replay_seed: Optional[int] = None, loss_chunk_size: Optional[int] = None,
                 teacher_dtype=None, **kwargs):
        overrides = dict(replay_coeff=replay_coeff, replay_method=replay_method,
                         replay_divergence=replay_divergence, replay_batch_size=replay_batch_size,
                         replay_length=replay_length, replay_prompt=replay_prompt, replay_buffer=replay_buffer,
                         replay_temperature=replay_temperature, replay_text_field=replay_text_field,
                         replay_split=replay_split, replay_seed=replay_seed, loss_chunk_size=loss_chunk_size)
        source_object = None
        if replay_source is not None and not isinstance(replay_source, (str, os.PathLike)):
            source_object = replay_source  # a datasets.Dataset (or list of records, PackedRows) of old data
            replay_source = IN_MEMORY_SOURCE
        overrides["replay_source"] = None if replay_source is None else str(replay_source)
        self.replay_settings = _settings_from(args, overrides).check()
        super().__init__(model, args, *positional, **kwargs)
        self._replay_source_object = source_object
        self.teacher = None
        self.replay = None  # the replay source, built lazily (first training step)
        if self.replay_settings.replay_coeff > 0:
            from selfreplay.hf_model import Teacher

            self._check_parallelism()

            self.teacher = Teacher.for_model(self.accelerator.unwrap_model(self.model), dtype=teacher_dtype)
            if self.teacher.peft_model is None:
                # SFTTrainer patches the instance's forward (fused LM head) with a closure over the *student's*
                # original forward; the deep copy would sample through it, so restore the class's forward.
                self.teacher.module.__dict__.pop("forward", None)

    def _check_parallelism(self) -> None:
        """The replay forward calls the decoder directly: fine for one device and DDP, not for sharded weights."""
        deepspeed = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if getattr(self, "is_fsdp_enabled", False) or (deepspeed is not None and deepspeed.zero_stage == 3):
            raise SelfReplayError("SelfReplaySFTTrainer: FSDP and DeepSpeed ZeRO-3 are not supported (the replay "
                                  "term needs unsharded weights); use DDP or ZeRO-1/2, or `selfreplay finetune` "
                                  "with distributed.strategy=fsdp")

    # ------------------------------------------------------------------------------------------- replay data
    def _replay_tokenizer(self):
        """The tokenizer (of a processor too): what replay is sampled and tokenized with."""
        return getattr(self, "_tokenizer", None) or getattr(self.processing_class, "tokenizer", self.processing_class)

    def replay_rows_per_micro_step(self) -> int:
        return math.ceil(self.replay_settings.replay_batch_size / max(1, self.args.gradient_accumulation_steps))

    def replay_length(self) -> int:
        s = self.replay_settings
        return s.replay_length or getattr(self.args, "max_length", None) or 512

    def _build_replay(self):
        """The replay source: self-generated by the teacher, or rows of old data; each process gets its own."""
        s, rows = self.replay_settings, self.replay_rows_per_micro_step()
        rank, world = self.args.process_index, self.args.world_size
        seed = self.args.seed if s.replay_seed is None else s.replay_seed
        if s.replay_source == "self":
            from selfreplay.hf_replay import HFSelfReplay

            accumulation = max(1, self.args.gradient_accumulation_steps)
            return HFSelfReplay(self.teacher, self._replay_tokenizer(), batch_size=rows, length=self.replay_length(),
                                buffer=s.replay_buffer * accumulation, prompt=s.replay_prompt,
                                temperature=s.replay_temperature, seed=seed + 1_000_003 * rank)
        from selfreplay.hf_generate import RowReplay, load_replay_rows
        from selfreplay.hf_model import base_causal_lm

        source = self._replay_source_object if self._replay_source_object is not None else s.replay_source
        head = base_causal_lm(self.model).get_output_embeddings()
        packed = load_replay_rows(source, self._replay_tokenizer(), self.replay_length(), split=s.replay_split,
                                  text_field=s.replay_text_field, vocab_size=int(head.weight.shape[0]))
        return RowReplay(packed, rows, seed, rank=rank, world_size=world)

    def replay_loss(self, model):
        """The replay term on the next replay batch (differentiable w.r.t. ``model``)."""
        import torch

        from selfreplay.hf_model import final_hidden_and_head
        from selfreplay.losses import chunked_divergence_loss, chunked_next_token_loss

        if self.replay is None:
            self.replay = self._build_replay()
        s = self.replay_settings
        batch = self.replay.next_batch()
        device = self.args.device
        tokens = batch.tokens.to(device)
        mask = None if batch.loss_mask is None else batch.loss_mask.to(device)
        hidden, head = final_hidden_and_head(self.accelerator.unwrap_model(model), tokens, None)
        if s.replay_method == "ntp":
            return chunked_next_token_loss(hidden, head, tokens, loss_mask=mask, chunk_size=s.loss_chunk_size)
        if batch.teacher_logprobs is not None:
            targets = {"teacher_logprobs": batch.teacher_logprobs.to(device)}
        else:
            with torch.no_grad():
                teacher_hidden, teacher_head = self.teacher.hidden_and_head(tokens, None)
            targets = {"teacher_hidden": teacher_hidden, "teacher_head": teacher_head}
        return chunked_divergence_loss(hidden, head, tokens, loss_mask=mask, divergence=s.replay_divergence,
                                       chunk_size=s.loss_chunk_size, **targets)

    # ------------------------------------------------------------------------------------------- the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not self.model.training or self.replay_settings.replay_coeff == 0:
            return result
        loss, outputs = result if return_outputs else (result, None)
        term = self.replay_loss(model)
        # TRL's SFT loss is normalised by the tokens of the whole accumulated batch when num_items_in_batch is
        # given (and Trainer then skips its own division), so weight each micro-step's mean the same way.
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + self.replay_settings.replay_coeff * term / steps
        self._metrics["train"]["replay_loss"].append(
            self.accelerator.gather_for_metrics(term.detach()).mean().item())
        return (loss, outputs) if return_outputs else loss
