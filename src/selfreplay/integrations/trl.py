"""TRL drop-in: ``SelfReplaySFTTrainer``, TRL's SFTTrainer plus the replay penalty against forgetting.

For people who already finetune with TRL, switching is a few lines::

    from selfreplay.integrations.trl import SelfReplayConfig, SelfReplaySFTTrainer

    args = SelfReplayConfig(output_dir="out", learning_rate=1e-5, replay_coeff=1.0, replay_batch_size=32)
    trainer = SelfReplaySFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

Each optimizer step adds ``replay_coeff`` × (forward KL from the teacher, or next-token loss) on replay sequences
to TRL's own SFT loss, computed by the same :class:`~selfreplay.replay.penalty.ReplayPenalty` as ``selfreplay
finetune``; the baselines ``kl_downstream``, ``asft`` (TRL's ``loss_type="dft"`` plus the KL on the training batch),
``l2_init`` and ``ewc`` come from it too. ``replay_target_kl`` turns the coefficient into a forgetting budget
(:mod:`selfreplay.replay.budget`). The teacher is the model as it is when the trainer is built: a frozen copy, or for a PEFT
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
from pathlib import Path
from typing import Any, Optional

from selfreplay.errors import SelfReplayError

TRL_MISSING = "SelfReplaySFTTrainer needs extras: pip install 'selfreplay[trl]'"
IN_MEMORY_SOURCE = "<in-memory dataset>"  # replay_source when the trainer was given a Dataset object
REPLAY_METHODS = ("kl", "ntp", "kl_downstream", "asft", "l2_init", "ewc")
REPLAY_PROMPTS = ("bos", "chat")
PENALTY_STATE = "selfreplay_penalty"  # in each TRL checkpoint: the penalty's and replay stream's state, per process
DEFAULT_REPLAY_LENGTH = 256  # self-generated replay: sampling cost grows with it; TRL's max_length (1024) is a cap
DEFAULT_REPLAY_BUFFER = 32  # optimizer steps of replay sampled at once, at most the run's steps


def _f(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})  # HfArgumentParser passes metadata on


@dataclass
class ReplaySettings:
    """The replay options of :class:`SelfReplayConfig` (also usable on their own, e.g. with a plain SFTConfig)."""

    replay_coeff: float = _f(1.0, "weight c of the replay term: loss = SFT loss + c * replay loss (0: off)")
    replay_method: str = _f("kl", "kl: KL(teacher || model) on replay; ntp: next-token loss on replay; "
                                  "kl_downstream / asft: the KL on the training batch (asft: with loss_type=dft); "
                                  "l2_init / ewc: the (Fisher-weighted) squared distance from the start weights")
    replay_target_kl: Optional[float] = _f(None, "forgetting budget (nats per token): adapt replay_coeff so that "
                                                 "the replay KL tracks it (replay_method=kl)")
    replay_target_kl_step: float = _f(0.2, "step of log replay_coeff per optimizer step at the peak LR (see "
                                           "selfreplay.replay.budget)")
    replay_target_kl_smoothing: float = _f(0.9, "moving-average factor of the replay KL estimate")
    replay_target_kl_gain: float = _f(0.0, "proportional gain on log replay_coeff (see selfreplay.replay.budget)")
    replay_coeff_min: float = _f(1e-3, "lower clamp of an adapted replay_coeff")
    replay_coeff_max: float = _f(1e4, "upper clamp of an adapted replay_coeff")
    replay_ewc_sequences: int = _f(64, "replay_method=ewc: sequences the diagonal Fisher is estimated from")
    replay_divergence: str = _f("forward_kl", "forward_kl (the paper's), reverse_kl or jsd, for replay_method=kl")
    replay_source: str = _f("self", "self: sampled from the teacher; else old data: a data file, hub dataset id or "
                                    "a `selfreplay generate` replay corpus directory")
    replay_batch_size: int = _f(32, "replay sequences per optimizer step over all processes, split evenly (rounded "
                                    "up) over the processes and the gradient accumulation steps")
    replay_length: Optional[int] = _f(None, f"tokens per replay sequence (default: {DEFAULT_REPLAY_LENGTH}, or "
                                            f"max_length when shorter)")
    replay_prompt: str = _f("bos", "self-generated replay prompt: bos (BOS only, the paper's) or chat")
    replay_buffer: Optional[int] = _f(None, f"optimizer steps of self-generated replay sampled at once (default: "
                                            f"{DEFAULT_REPLAY_BUFFER}, at most the run's steps)")
    replay_temperature: float = _f(1.0, "sampling temperature of self-generated replay (1: the teacher's own)")
    replay_text_field: str = _f("text", "text column of old-data replay")
    replay_split: str = _f("train", "split of a hub dataset replay source")
    replay_seed: Optional[int] = _f(None, "seed of the replay stream (default: the training seed)")
    loss_chunk_size: int = _f(1024, "positions per chunk of the replay loss (the full logits are never built)")

    def check(self) -> "ReplaySettings":
        """Raise a one-line SelfReplayError naming the first bad option."""
        for name in REPLAY_FIELDS:  # NaN and infinity pass every range check below
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SelfReplayError(f"{name}={value}: expected a finite number")
        if not isinstance(self.replay_coeff, (int, float)) or not self.replay_coeff >= 0:
            raise SelfReplayError(f"replay_coeff={self.replay_coeff!r}: expected a number >= 0")
        if self.replay_method not in REPLAY_METHODS:
            raise SelfReplayError(f"replay_method={self.replay_method!r}: expected one of {list(REPLAY_METHODS)}")
        from selfreplay.replay.losses import DIVERGENCES

        if self.replay_divergence not in DIVERGENCES:
            raise SelfReplayError(f"replay_divergence={self.replay_divergence!r}: expected one of "
                                  f"{list(DIVERGENCES)}")
        if self.replay_prompt not in REPLAY_PROMPTS:
            raise SelfReplayError(f"replay_prompt={self.replay_prompt!r}: expected one of {list(REPLAY_PROMPTS)}")
        if self.replay_target_kl is not None:
            from selfreplay.replay.budget import check_budget

            if self.replay_method != "kl":
                raise SelfReplayError(f"replay_target_kl: a forgetting budget controls the replay KL; replay_method="
                                      f"{self.replay_method} has none (use replay_method='kl')")
            check_budget(self.replay_target_kl, self.replay_coeff, self.replay_target_kl_step,
                         self.replay_target_kl_smoothing, self.replay_coeff_min, self.replay_coeff_max,
                         self.replay_target_kl_gain, "replay_", divergence=self.replay_divergence)
        for name in ("replay_batch_size", "replay_buffer", "loss_chunk_size", "replay_ewc_sequences"):
            if name == "replay_buffer" and self.replay_buffer is None:
                continue
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
        if getattr(self, "bf16", None) is None and not getattr(self, "fp16", False):
            self.bf16 = _bf16_supported()  # TRL's default bf16=True fails on a CPU; left unset, use it where it works
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


def _bf16_supported() -> bool:
    """bf16 mixed precision where TRL's default would use it and the hardware has it: a CUDA GPU of Ampere or
    later (else fp32: on a CPU TRL's bf16=True is an error)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


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

    ``replay_batch_size`` is global, as the engine's: split over the processes and the accumulation micro-steps
    (rounded up); each micro-step's replay sum is divided by its target tokens times the micro-steps, so the
    penalty does not depend on the accumulation. The replay forward runs under the trainer's autocast, like the SFT
    loss. ``replay_loss`` is logged beside TRL's loss, gathered once per logging step (no sync per micro-step).
    Evaluation reports the SFT loss alone. TRL's checkpoints carry the penalty's state (a budget's coefficient and
    its average, EWC's Fisher) and the replay stream's position, per process, in ``selfreplay_penalty/``:
    ``trainer.train(resume_from_checkpoint=...)`` continues them instead of starting over.

    Runs on one device or data-parallel (``torchrun`` / ``accelerate launch``: DDP, each process sampling its own
    replay with seed + 1000·rank); FSDP and DeepSpeed ZeRO-3 are refused (the replay forward needs unsharded
    weights).
    """

    def __init__(self, model, args=None, *positional, replay_coeff: Optional[float] = None,
                 replay_method: Optional[str] = None, replay_divergence: Optional[str] = None,
                 replay_source: Any = None, replay_batch_size: Optional[int] = None,
                 replay_length: Optional[int] = None, replay_prompt: Optional[str] = None,
                 replay_buffer: Optional[int] = None, replay_temperature: Optional[float] = None,
                 replay_text_field: Optional[str] = None, replay_split: Optional[str] = None,
                 replay_seed: Optional[int] = None, loss_chunk_size: Optional[int] = None,
                 replay_target_kl: Optional[float] = None, replay_ewc_sequences: Optional[int] = None,
                 teacher_dtype=None, **kwargs):
        overrides = dict(replay_coeff=replay_coeff, replay_method=replay_method,
                         replay_divergence=replay_divergence, replay_batch_size=replay_batch_size,
                         replay_length=replay_length, replay_prompt=replay_prompt, replay_buffer=replay_buffer,
                         replay_temperature=replay_temperature, replay_text_field=replay_text_field,
                         replay_split=replay_split, replay_seed=replay_seed, loss_chunk_size=loss_chunk_size,
                         replay_target_kl=replay_target_kl, replay_ewc_sequences=replay_ewc_sequences)
        source_object = None
        if replay_source is not None and not isinstance(replay_source, (str, os.PathLike)):
            source_object = replay_source  # a datasets.Dataset (or a list of records) of old data
            replay_source = IN_MEMORY_SOURCE
        overrides["replay_source"] = None if replay_source is None else str(replay_source)
        self.replay_settings = _settings_from(args, overrides).check()
        super().__init__(model, args, *positional, **kwargs)
        if self.replay_settings.replay_method == "asft" and getattr(self.args, "loss_type", "dft") != "dft":
            self.args.loss_type = "dft"  # anchored SFT = DFT + the KL anchor: TRL computes the DFT half (read per step)
        self._replay_source_object = source_object
        self.teacher = self.penalty = None
        self._replay_sum, self._replay_steps = None, 0
        if self.replay_settings.replay_coeff > 0:
            self._check_parallelism()
            self._build_penalty(teacher_dtype)

    def _check_parallelism(self) -> None:
        """The replay forward calls the decoder directly: fine for one device and DDP, not for sharded weights."""
        deepspeed = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if getattr(self, "is_fsdp_enabled", False) or (deepspeed is not None and deepspeed.zero_stage == 3):
            raise SelfReplayError("SelfReplaySFTTrainer: FSDP and DeepSpeed ZeRO-3 are not supported (the replay "
                                  "term needs unsharded weights); use DDP or ZeRO-1/2, or `selfreplay finetune` "
                                  "with distributed.strategy=fsdp")

    def _build_penalty(self, teacher_dtype) -> None:
        from selfreplay.models.core import CausalLM, Teacher
        from selfreplay.models.hf import HF_ADAPTER, peft_model
        from selfreplay.replay.penalty import ReplayPenalty, TEACHER_METHODS

        s = self.replay_settings
        net = self.accelerator.unwrap_model(self.model)
        self.replay_model = CausalLM(net, HF_ADAPTER)  # the student, seen through the engine's model interface
        if peft_model(net) is not None:
            self.teacher = Teacher.adapters_off(self.replay_model)
        elif s.replay_method in TEACHER_METHODS or s.replay_method == "ntp" and s.replay_source == "self":
            self.teacher = Teacher.frozen_copy(self.replay_model, teacher_dtype)
            # SFTTrainer patches the instance's forward (fused LM head) with a closure over the *student's*
            # original forward; the copy would sample through it, so restore the class's forward.
            self.teacher.module.net.__dict__.pop("forward", None)
        else:  # l2_init, ewc: no copy (ewc samples its Fisher sequences once, before the first update)
            self.teacher = Teacher(self.replay_model)
        anchor = budget = None
        if s.replay_method in ("l2_init", "ewc"):
            from selfreplay.replay.anchor import WeightAnchor

            anchor = WeightAnchor(self.replay_model)
            anchor.bind(self.replay_model)
        if s.replay_target_kl is not None:
            from selfreplay.replay.budget import ForgettingBudget

            budget = ForgettingBudget(s.replay_target_kl, s.replay_coeff, s.replay_target_kl_step,
                                      s.replay_target_kl_smoothing, s.replay_coeff_min, s.replay_coeff_max,
                                      self.args.device, s.replay_target_kl_gain, "replay_")
        self.penalty = ReplayPenalty(s.replay_method, s.replay_coeff, self.teacher, source=_LazySource(self),
                                     divergence=s.replay_divergence, chunk_size=s.loss_chunk_size, anchor=anchor,
                                     budget=budget)
        self._budget_sum, self._budget_steps = None, 0

    # ------------------------------------------------------------------------------------------- checkpoints
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """TRL's optimizer and scheduler, then this process's penalty and replay-stream state beside them."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self.penalty is None:
            return
        from selfreplay.train.checkpoint import write_state
        from selfreplay.train.files import atomic_dir

        inner = self.penalty.source._inner
        state = {"penalty": self.penalty.state_dict(), "replay": inner.state_dict() if inner is not None else None}
        with atomic_dir(self._penalty_dir(output_dir)) as tmp:
            write_state(state, tmp)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        """On resume: TRL's optimizer and scheduler, then the penalty's state (the replay stream's when it is built)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.penalty is None:
            return
        from selfreplay.train.checkpoint import read_state

        folder = self._penalty_dir(checkpoint)
        if not folder.is_dir():
            raise SelfReplayError(f"{checkpoint}: no {folder.parent.name}/ with the replay penalty's state (a "
                                  f"checkpoint without the replay penalty, or of an earlier selfreplay); resuming "
                                  f"would restart the budget and re-estimate EWC's Fisher from the finetuned model")
        state = read_state(folder)
        self.penalty.load_state_dict(state["penalty"])
        self.penalty.source.pending_state = state["replay"]

    def _penalty_dir(self, checkpoint) -> Path:
        return Path(checkpoint) / PENALTY_STATE / f"rank_{self.args.process_index}"

    # ------------------------------------------------------------------------------------------- replay data
    def _replay_tokenizer(self):
        """The tokenizer (of a processor too): what replay is sampled and tokenized with."""
        return getattr(self, "_tokenizer", None) or getattr(self.processing_class, "tokenizer", self.processing_class)

    def replay_rows_per_micro_step(self) -> int:
        per = max(1, self.args.gradient_accumulation_steps) * max(1, self.args.world_size)
        return math.ceil(self.replay_settings.replay_batch_size / per)

    def replay_length(self) -> int:
        s = self.replay_settings
        return s.replay_length or min(getattr(self.args, "max_length", None) or DEFAULT_REPLAY_LENGTH,
                                      DEFAULT_REPLAY_LENGTH)

    def replay_buffer(self) -> int:
        """replay_buffer, else 32 optimizer steps, at most the run's: sampling more than the run uses is waste."""
        s = self.replay_settings
        return s.replay_buffer or max(1, min(DEFAULT_REPLAY_BUFFER, self.state.max_steps or DEFAULT_REPLAY_BUFFER))

    def _build_replay(self):
        """The replay source: self-generated by the teacher (this process's rows), or rows of old data."""
        from selfreplay.replay.sources import DataReplay, SelfGeneratedReplay, StoredReplay

        s, rows = self.replay_settings, self.replay_rows_per_micro_step()
        rank, world = self.args.process_index, self.args.world_size
        seed = self.args.seed if s.replay_seed is None else s.replay_seed
        tokenizer = self._replay_tokenizer()
        if s.replay_source == "self":
            from selfreplay.replay.prompts import Prompts, tokenizer_prompt

            self._replay_per_process = True
            buffer = self.replay_buffer() * max(1, self.args.gradient_accumulation_steps)
            if s.replay_method == "ewc":
                buffer = -(-s.replay_ewc_sequences // rows)  # sampled once: only what the Fisher uses
            return SelfGeneratedReplay(self.teacher, Prompts([tokenizer_prompt(tokenizer, s.replay_prompt)]), rows,
                                       self.replay_length(), buffer, s.replay_temperature, seed=seed + 1000 * rank,
                                       keep_targets=s.replay_method == "kl",
                                       show_progress=self.is_world_process_zero() and not self.args.disable_tqdm)
        self._replay_per_process = False  # every process reads the same rows and takes its share
        source = self._replay_source_object if self._replay_source_object is not None else s.replay_source
        if isinstance(source, str) and (Path(source) / "meta.json").is_file():
            return StoredReplay(source, rows * world, s.replay_length, seed,  # default: the stored length
                                vocab_size=self.replay_model.vocab_size)
        from selfreplay.data.rows import RowLoader
        from selfreplay.data.text import tokenize_source

        examples, fmt = tokenize_source(source, tokenizer, s.replay_split, s.replay_text_field)
        return DataReplay(RowLoader(examples, fmt, self.replay_length(), int(tokenizer.pad_token_id), rows * world,
                                    seed, where=f"replay_source {s.replay_source}"))

    def next_replay(self):
        """This process's replay rows for one micro-step, on the training device."""
        batch = self.penalty.source.inner.next_batch()
        if not self._replay_per_process and self.args.world_size > 1:
            batch = batch.rows(slice(self.args.process_index, None, self.args.world_size))
        return batch.to(self.args.device)

    # ------------------------------------------------------------------------------------------- the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if self.penalty is None or not self.model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        # TRL's SFT loss is normalised over the whole accumulated batch when num_items_in_batch is given (and the
        # Trainer then skips its own division): weight this micro-step's share of the penalty the same way
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        penalty, coeff = self.penalty, self.penalty.coeff
        if penalty.anchor is not None:  # l2_init / ewc: a term per optimizer step, 1/steps of it per micro-step
            if penalty.method == "ewc" and penalty.anchor.weights is None:
                self._estimate_fisher()
            term = penalty.weight_term()
            loss = loss + coeff * term / steps
            detached = term.detach()
        else:
            replay = self.next_replay() if penalty.adds_rows else None
            data = None if replay is not None else _batch_of(inputs)
            with self.accelerator.autocast():
                term = penalty.sums(self.replay_model, data, replay, with_ntp=False)["term"]
            term = term / ((replay if replay is not None else data).num_targets().clamp_min(1.0) * steps)
            loss = loss + coeff * term
            detached = term.detach() * steps
        self._replay_sum = detached if self._replay_sum is None else self._replay_sum + detached
        self._replay_steps += 1
        if penalty.budget is not None:
            self._budget_sum = detached if self._budget_sum is None else self._budget_sum + detached
            self._budget_steps += 1
            if self.accelerator.sync_gradients:  # the optimizer step's last micro-step: one all-reduce
                last_lr = getattr(self.lr_scheduler, "get_last_lr", None)  # the LR of the step about to be taken
                peak = self.args.learning_rate
                lr_scale = last_lr()[0] / peak if last_lr is not None and peak else 1.0
                penalty.budget.update(self.accelerator.reduce(self._budget_sum / self._budget_steps, "mean"), lr_scale)
                self._budget_sum, self._budget_steps = None, 0
        return (loss, outputs) if return_outputs else loss

    def _estimate_fisher(self) -> None:
        """ewc: the diagonal Fisher of the model as it starts (eval mode: no dropout), from replay sequences."""
        net = self.replay_model
        was_training = net.training
        net.eval()
        try:
            self.penalty.estimate_fisher(net, self.replay_settings.replay_ewc_sequences, self.accelerator.autocast)
        finally:
            net.train(was_training)

    def log(self, logs: dict, *args, **kwargs):
        """TRL's logging, plus ``replay_loss`` (the mean over the micro-steps since the last log, one gather) and
        ``replay_coeff`` (with a budget: its current value and ``replay_kl_smoothed``)."""
        if self._replay_steps and "loss" in logs:
            mean = self.accelerator.gather_for_metrics(self._replay_sum / self._replay_steps).mean()
            logs["replay_loss"] = float(mean)
            self._replay_sum, self._replay_steps = None, 0
            logs["replay_coeff"] = float(self.penalty.coeff)
            if self.penalty.budget is not None:
                logs["replay_kl_smoothed"] = float(self.penalty.budget.smoothed_kl)
        return super().log(logs, *args, **kwargs)


def _batch_of(inputs: dict):
    """TRL's collated batch as the engine's rows: its labels (-100 where not trained) are the target mask."""
    from selfreplay.data.batch import Batch

    tokens = inputs["input_ids"]
    labels = inputs.get("labels")
    mask = None if labels is None else labels != -100
    return Batch(tokens, mask, inputs.get("position_ids"))


class _LazySource:
    """The penalty's replay source, built at the first training step (the trainer's args are complete then)."""

    def __init__(self, trainer):
        self.trainer, self._inner = trainer, None
        self.pending_state: Optional[dict] = None  # a resumed checkpoint's stream position, applied when built

    @property
    def inner(self):
        if self._inner is None:
            self._inner = self.trainer._build_replay()
            if self.pending_state is not None:
                self._inner.load_state_dict(self.pending_state)
                self.pending_state = None
        return self._inner

    def next_batch(self):
        return self.inner.next_batch()

    @property
    def sample_seconds(self) -> float:
        return self._inner.sample_seconds if self._inner is not None else 0.0
