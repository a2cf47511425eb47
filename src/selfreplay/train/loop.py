"""The one training loop: pretraining and finetuning, either model kind, one process or many.

    loss = NTP(new data) + replay.coeff · term          (the term: selfreplay.replay.penalty)

Each optimizer step takes one global batch; under torchrun each rank takes rows rank, rank + world, ... and splits
them further into ``gradient_accumulation_steps`` micro-batches. Losses are sums over target tokens divided by the
global token counts, so N ranks and any accumulation make the same update as one process with the whole batch.

The step never waits for the device just to log: losses accumulate on the device and are read every
``PROGRESS_EVERY`` steps (progress, divergence check) and at evaluations. A SIGINT or SIGTERM is honoured at the
next step boundary, or (one process) at the next batch of a running evaluation, which is abandoned and redone on
resume: a checkpoint of the step boundary is written and the run exits non-zero, resumable bit for bit. A NaN or
infinite loss stops the run before anything is overwritten.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from selfreplay.config import TrainConfig, config_to_dict, config_to_yaml
from selfreplay.errors import SelfReplayError
from selfreplay.evaluate.metrics import (EvaluationAbandoned, MetricsLogger, TeacherCache, eval_chunk_size,
                                        parameter_norms, score)
from selfreplay.progress import progress
from selfreplay.train import checkpoint as ckpt
from selfreplay.train import distributed as dist
from selfreplay.train.build import Parts, chunk_size_for, total_steps
from selfreplay.train.files import RunLock, atomic_write, atomic_write_json
from selfreplay.train.ownership import claim_run_dir
from selfreplay.train import records
from selfreplay.train.records import keep_if_best, log_training_window, promote_best, warn_schedule
from selfreplay.train.signals import Diverged, Interrupted, SignalGuard
from selfreplay.train.optim import (CompiledForward, autocast_for, compile_on, lr_factor, make_optimizer,
                                    warmup_tokens_for)

PROGRESS_EVERY = 25
EARLY_LIVE_LOSS = (1, 2, 4, 8, 16)  # steps after a (re)start at which the live loss is shown before a full window
CONFIG, RUN_INFO, SUMMARY = "config.yaml", "run.json", "summary.json"
RESUME_IGNORES = ("log", "stop", "eval", "checkpoint", "distributed", "run_dir", "threads")


@dataclass
class TrainState:
    """Counters and running sums that a resumed run restores."""

    step: int = 0
    tokens: int = 0
    train_time: float = 0.0
    eval_time: float = 0.0  # seconds in evaluation (HF's eval_runtime, summed)
    next_eval_tokens: int = 0
    next_checkpoint_tokens: int = 0
    best_valid: float = float("inf")
    evals_since_best: int = 0
    prev_teacher_loss: Optional[float] = None  # the old-data loss before finetuning
    stop_reason: Optional[str] = None
    steps_since_eval: int = 0
    sums: dict = field(default_factory=dict)  # metrics summed since the last evaluation (floats when saved)
    eval_pending: bool = False  # a signal cut this step's evaluation short: a resumed run does it first
    log_sums: dict = field(default_factory=dict)  # metrics summed since the last log.every_steps record
    steps_since_log: int = 0
    lr_sum: float = 0.0  # the learning rates of every step, added up (the schedule warning)
    best_metric: Optional[float] = None  # checkpoint.best_metric's best value so far, and its step
    best_step: Optional[int] = None


class Trainer:
    """Runs one pretraining or finetuning job from its config and its parts (see :func:`build_parts`)."""

    def __init__(self, cfg: TrainConfig, parts: Parts, device: torch.device, resume: bool = False,
                 on_step: Optional[Callable[[int], None]] = None):
        self.cfg, self.parts, self.device, self.resume, self.on_step = cfg, parts, device, resume, on_step
        self.run_dir = Path(cfg.run_dir)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.main = self.rank == 0
        self.model, self.penalty, self.data, self.teacher = parts.model, parts.penalty, parts.data, parts.teacher
        self.accum = cfg.gradient_accumulation_steps
        self.autocast = autocast_for(device, cfg.precision)
        self.chunk_size = chunk_size_for(cfg, self.model.vocab_size)
        if self.penalty.method == "ewc" and not resume:  # before sharding (a resumed run restores it)
            self.penalty.estimate_fisher(self.model, cfg.replay.ewc_sequences, self.autocast)
        self.module = dist.wrap_model(self.model, cfg.distributed.strategy, device)
        if self.penalty.anchor is not None:
            self.penalty.anchor.bind(self.model)
        if self.teacher is not None:
            self.teacher.use_forward_module(self.module)
        self.forward = self.eval_forward = self.module
        if compile_on(cfg, self.model, device):  # one compiled callable per role (see optim.CompiledForward)
            self.forward = CompiledForward(self.module, "training")
            self.eval_forward = CompiledForward(self.module, "evaluation")
            if self.teacher is not None and not self.teacher.shares_weights:
                self.teacher.forward_module = CompiledForward(self.teacher.module, "teacher")
        self.eval_chunk_size = self.chunk_size  # a compiled forward or ranks' collectives: as training chunks
        if self.eval_forward is self.module and self.world == 1:
            self.eval_chunk_size = eval_chunk_size(self.model.vocab_size, device, self.chunk_size)
        self.teacher_cache = None  # the teacher is frozen and the held-out rows fixed: its results are kept
        eager = self.eval_forward is self.module  # (a compiled evaluation keeps one graph: the teacher runs each time)
        if self.teacher is not None and device.type == "cpu" and eager and cfg.eval.teacher_cache_mb > 0:
            self.teacher_cache = TeacherCache(cfg.eval.teacher_cache_mb << 20)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise SelfReplayError("no trainable parameters (check lora.targets)")
        self.optimizer = make_optimizer(cfg, self.params, device)
        self.tokens_per_step = cfg.data.batch_size * self.data.seq_len
        self.total_steps = total_steps(cfg, self.model, self.data)
        self.warmup_tokens = warmup_tokens_for(cfg.optim, self.tokens_per_step, self.total_steps)
        self.parts.info["warmup_steps"] = math.ceil(self.warmup_tokens / self.tokens_per_step)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(
            s, self.tokens_per_step, self.warmup_tokens, cfg.optim.schedule, self.total_steps))
        self.last_lr = 0.0
        self.window_start = (0.0, 0)  # (training clock, step) where the current log window began
        self.state = TrainState()
        self._finite = torch.ones((), dtype=torch.bool, device=device)
        self.guard = SignalGuard()

    # ------------------------------------------------------------------------------------------ the step
    def _shard(self, batch):
        return batch.rows(slice(self.rank, None, self.world)) if self.world > 1 else batch

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step over the global batch; returns detached loss parts (this rank's share of the global
        per-token means: summed over ranks they are the means)."""
        batch, replay = self.data.next_batch(), self.penalty.next_replay()
        if self.penalty.method == "replace":
            from selfreplay.data.batch import cat_rows

            batch, replay = cat_rows([replay, batch], self.parts.pad_id), None
        batch = self._shard(batch).to(self.device, non_blocking=True)
        if replay is not None:
            replay = (replay if self.parts.replay_per_rank else self._shard(replay)).to(self.device, non_blocking=True)
        term_rows = replay if replay is not None else batch
        counts = torch.stack((batch.num_targets(), term_rows.num_targets()))
        totals = dist.reduce_sum(counts).clamp_min(1.0) / self.world  # DDP / FSDP average gradients over ranks
        acc = torch.zeros(2, device=self.device)
        rows, r_rows = len(batch) // self.accum, (len(replay) // self.accum if replay is not None else 0)
        coeff, weight_term = self.penalty.coeff, None
        for i in range(self.accum):
            micro = batch.rows(slice(i * rows, (i + 1) * rows))
            micro_replay = replay.rows(slice(i * r_rows, (i + 1) * r_rows)) if replay is not None else None
            last = i == self.accum - 1
            with dist.no_sync(self.module, skip=not last), self.autocast():
                sums = self.penalty.sums(self.forward, micro, micro_replay)
                loss = self.penalty.loss(sums, totals[0], totals[1])
                if last and self.penalty.anchor is not None:  # l2_init / ewc: once per step, on every rank
                    weight_term = self.penalty.weight_term()
                    loss = loss + coeff * weight_term
            loss.backward()
            acc += torch.stack((sums["ntp"].detach().float(), sums["term"].detach().float()))
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.last_lr = self.scheduler.get_last_lr()[0]
        self.state.lr_sum += self.last_lr
        lr_scale = self.last_lr / self.cfg.optim.lr  # this step's LR over the peak (a float)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        shares = acc / (totals * self.world)
        if weight_term is not None:
            shares[1] = weight_term.detach().float() / self.world
        parts = {"ntp": shares[0], "loss": shares[0] + coeff * shares[1]}
        if self.penalty.has_term or weight_term is not None:
            parts["replay"] = shares[1]
        if self.penalty.budget is not None:
            self.penalty.budget.update(dist.reduce_sum(shares[1]), lr_scale)
        self._finite &= torch.isfinite(parts["loss"])
        return parts

    # ------------------------------------------------------------------------------------------ evaluation
    def _signalled(self) -> bool:
        """Whether a signal asks to abandon the running evaluation (one process only: ranks would disagree)."""
        return self.world == 1 and self.guard.received is not None

    def _score(self, loader, teacher, name: str, as_teacher: bool = False):
        return score(self.eval_forward, loader.valid_batches(self.cfg.eval.batch_size, self.cfg.eval.max_tokens),
                     teacher, self.device, self.autocast, self.eval_chunk_size, self.rank, self.world,
                     should_stop=self._signalled, teacher_cache=self.teacher_cache, cache_key=name,
                     same_shape=self.eval_forward is not self.module,  # compiled: one shape; eager: no filler rows
                     model_is_teacher=as_teacher)

    def evaluate(self) -> dict:
        """Held-out metrics of the new data (valid_*) and the old (prev_*, forgetting), drift, extra evaluators.
        Before the first update of a finetune the model is its teacher: only the teacher runs (one process, eager
        evaluation: a compiled one compiles its forward there, in its warm-up)."""
        out: dict = {}
        as_teacher = self.state.step == 0 and self.teacher is not None and self.world == 1 \
            and self.eval_forward is self.module and self.teacher.computes_like(self.model)
        valid_teacher = self.teacher if self.cfg.eval.valid_kl else None  # (no valid_kl: one pass less per token)
        with self._adapters_folded():
            valid = self._score(self.data, valid_teacher, "valid", as_teacher and valid_teacher is not None)
            prev = None if self.parts.prev is None else self._score(self.parts.prev, self.teacher, "prev", as_teacher)
        valid.pop("teacher_loss", None)
        out.update({f"valid_{k}": v for k, v in valid.items()})
        if prev is not None:
            if self.state.prev_teacher_loss is None:  # the model before finetuning (step 0)
                self.state.prev_teacher_loss = prev.get("teacher_loss", prev["loss"])
            prev.pop("teacher_loss", None)
            out.update({f"prev_{k}": v for k, v in prev.items()})
            out["prev_teacher_loss"] = self.state.prev_teacher_loss
            out["forgetting"] = out["prev_loss"] - self.state.prev_teacher_loss
        if self.model.kind == "gpt" and not dist.is_fsdp(self.module):
            out.update(self._norms())
        if self.parts.evaluators:
            with torch.no_grad(), self.autocast():
                for evaluate in self.parts.evaluators:
                    if self._signalled():
                        raise EvaluationAbandoned
                    out.update(evaluate(self.module))
        return out

    def _adapters_folded(self):
        """LoRA adapters folded into the weights while held-out data is scored (one process, eager evaluation)."""
        if self.world > 1 or self.eval_forward is not self.module or not self.model.adapter.has_lora(self.model.net):
            return contextlib.nullcontext()
        return self.model.adapter.adapters_folded(self.model.net)

    def _norms(self) -> dict:
        from selfreplay.models.lora import merged_parameters

        teacher = None if self.teacher is None else {  # a LoRA teacher's weights are the student's base weights
            k: v for k, v in self.teacher.module.net.named_parameters() if "lora_" not in k}
        return parameter_norms(merged_parameters(self.model.net), teacher, self.parts.init_params)

    # ------------------------------------------------------------------------------------------ the loop
    def run(self) -> dict:
        lock = self._lock()
        try:
            with self.guard:
                return self._run()
        finally:
            if lock is not None:
                lock.release()

    def _lock(self) -> Optional[RunLock]:
        """One writer per run directory, and only one of ours (see train.ownership): rank 0 claims it and holds the
        lock, every rank learns whether it got it."""
        lock, error = None, None
        if self.main:
            try:
                claim_run_dir(self.run_dir, self.resume)  # before any write, the lock file included
                lock = RunLock(self.run_dir).acquire()
            except SelfReplayError as e:
                error = str(e)
        error = dist.broadcast_object(error)
        if error:
            raise SelfReplayError(error)
        return lock

    def _run(self) -> dict:
        if self.resume:
            self._restore()
        elif self._finished() or ckpt.has_checkpoint(self.run_dir):
            raise SelfReplayError(f"run_dir {self.run_dir} already holds a run; use --resume or another run_dir")
        cfg, st = self.cfg, self.state  # after _restore(), which replaces the state
        if self.main:
            atomic_write(self.run_dir / CONFIG, config_to_yaml(cfg))
        logger = MetricsLogger(self.run_dir, cfg.log.wandb, cfg.log.wandb_project, cfg.log.tensorboard,
                               config_to_dict(cfg), keep_until_step=st.step if self.resume else None) \
            if self.main else None
        record: dict = {}
        try:
            if not self.resume:
                st.next_checkpoint_tokens = cfg.checkpoint.every_tokens or 0
            if not self.resume or st.eval_pending:  # the evaluation before training, or one a signal cut short
                record = self._log_eval(logger)
            bar = progress(self.total_steps, f"{self.parts.info.get('kind', 'train')} {self.run_dir.name}", "step",
                           cfg.log.progress and self.main, st.step, cfg.log.progress_every_s)
            tick = time.perf_counter()
            start_step = st.step
            clock = lambda: st.train_time + (time.perf_counter() - tick)  # noqa: E731 (training time, evals excluded)
            self.window_start = (clock(), st.step)
            while st.stop_reason is None:
                self._honour_signal(tick)
                parts = self.train_step()
                st.step += 1
                st.tokens += self.tokens_per_step
                st.steps_since_eval += 1
                st.steps_since_log += 1
                for k, v in parts.items():
                    st.sums[k] = st.sums[k] + v if k in st.sums else v
                    st.log_sums[k] = st.log_sums[k] + v if k in st.log_sums else v
                if self.on_step is not None:
                    self.on_step(st.step)
                if st.step % PROGRESS_EVERY == 0:
                    self._check_finite("training")
                if st.step % (cfg.log.every_steps or PROGRESS_EVERY) == 0:
                    log_training_window(self, logger, bar, clock)
                elif st.step - start_step in EARLY_LIVE_LOSS:
                    log_training_window(self, logger, bar, clock, peek=True)
                bar.update(1)
                st.stop_reason = self._length_or_time_stop(time.perf_counter() - tick)
                if self._eval_due() or st.stop_reason is not None:
                    st.train_time += self._elapsed(tick)
                    record = self._log_eval(logger)
                    tick = time.perf_counter()
                if self._checkpoint_due() and st.stop_reason is None:
                    st.train_time += self._elapsed(tick)
                    self.save_checkpoint()
                    tick = time.perf_counter()
            if st.steps_since_log:  # the last, partial window: the live loss ends on the run's last steps
                log_training_window(self, logger, bar, clock)
            bar.close()
        finally:
            if logger is not None:
                logger.close()
        self._check_finite("training", weights=True)
        summary = {**record, "stop_reason": st.stop_reason, "steps": st.step, "tokens": st.tokens,
                   "train_time": st.train_time, "best_valid_loss": st.best_valid,
                   "prev_loss_before": st.prev_teacher_loss}
        if self.penalty.budget is not None:
            summary["target_kl"] = self.cfg.replay.target_kl
        if st.best_step is not None:
            summary.update(best_metric=self.cfg.checkpoint.best_metric, best_metric_value=st.best_metric,
                           best_step=st.best_step)
        if self.main:
            warn_schedule(self)
        self._save_final(summary)
        return summary

    def _finished(self) -> bool:
        return (self.run_dir / SUMMARY).is_file()

    def _honour_signal(self, tick: float) -> None:
        """At a step boundary: after SIGINT / SIGTERM, write a checkpoint and stop (all ranks agree)."""
        received = self.guard.received
        if self.world > 1:
            if self.state.step % PROGRESS_EVERY:
                return
            received = dist.broadcast_object(received)
        if received is None:
            return
        self.state.train_time += self._elapsed(tick)
        self._stop_for(received)

    def _stop_for(self, received: int) -> None:
        """Write a checkpoint of this step boundary and raise :class:`Interrupted`.

        Before the first step there is nothing to keep (starting again is the same run), and an optimizer without
        state would be checkpointed as one that took a step (get_state_dict initialises it): no checkpoint then.
        """
        name = signal.Signals(received).name
        if self.state.step == 0 and not self.resume:
            raise Interrupted(f"stopped by {name} before the first step; nothing to checkpoint: run the same command "
                              f"again to start {self.run_dir} afresh", received)
        path = self.save_checkpoint()
        raise Interrupted(f"stopped by {name} at step {self.state.step}; checkpoint {path} written; continue with: "
                          f"selfreplay {self.parts.info.get('kind', 'finetune')} --resume run_dir={self.run_dir}",
                          received)

    def _check_finite(self, where: str, weights: bool = False) -> None:
        finite = bool(self._finite.item())
        if finite and weights:
            finite = all(bool(torch.isfinite(p).all()) for p in self.params)
        if not finite:
            last = ckpt.latest_checkpoint(self.run_dir)
            kept = f"the last good checkpoint {last} is untouched (--resume continues from it)" if last else \
                "no checkpoint was written"
            raise Diverged(f"{where} diverged by step {self.state.step}: the loss or the weights are NaN or infinite "
                           f"(lower optim.lr={self.cfg.optim.lr:g} or set optim.grad_clip); {kept}")

    def _eval_due(self) -> bool:
        e, st = self.cfg.eval, self.state
        return st.step % e.every_steps == 0 if e.every_steps else st.tokens >= st.next_eval_tokens

    def _checkpoint_due(self) -> bool:
        c, st = self.cfg.checkpoint, self.state
        if c.every_steps:
            return st.step % c.every_steps == 0
        return bool(c.every_tokens) and st.tokens >= st.next_checkpoint_tokens

    def _elapsed(self, tick: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - tick

    def _length_or_time_stop(self, running: float) -> Optional[str]:
        st, stop = self.state, self.cfg.stop
        if self.total_steps is not None and st.step >= self.total_steps:
            return "length"
        if stop.max_time is not None and dist.broadcast_object(st.train_time + running >= stop.max_time):
            return "max_time"
        return None

    def _log_eval(self, logger) -> dict:
        st, cfg = self.state, self.cfg
        self._check_finite("training")
        record = {"step": st.step, "tokens": st.tokens, "epoch": self.data.epochs_done, "train_time": st.train_time,
                  "lr": self.scheduler.get_last_lr()[0], **records.coeff_fields(self.penalty)}
        if st.steps_since_eval:
            record.update(records.mean_sums(self, st.sums, st.steps_since_eval))
            record["tokens_per_s"] = st.tokens / st.train_time if st.train_time > 0 else None
        source = self.penalty.source
        if source is not None:
            record["replay_sample_time"] = source.sample_seconds
        before, tick = (st.prev_teacher_loss, _rng_state()), time.perf_counter()
        try:
            record.update(self.evaluate())
        except EvaluationAbandoned:  # a signal: checkpoint the state before this evaluation, which resuming redoes
            st.prev_teacher_loss, rng = before
            _set_rng_state(rng)
            st.eval_pending = True
            self._stop_for(self.guard.received)
        st.eval_time += self._elapsed(tick)
        record["eval_time"] = st.eval_time
        if not math.isfinite(record["valid_loss"]):
            self._finite &= False
            self._check_finite("evaluation")
        if logger is not None:
            logger.log(record)
        if cfg.checkpoint.best_metric:
            keep_if_best(self, record)
        st.sums, st.steps_since_eval, st.eval_pending = {}, 0, False
        st.next_eval_tokens = st.tokens + (cfg.eval.every_tokens or 0)
        valid = record["valid_loss"]
        if valid < st.best_valid:
            st.best_valid, st.evals_since_best = valid, 0
        elif st.step > 0:
            st.evals_since_best += 1
        if st.stop_reason is None and st.step > 0:
            if cfg.stop.target_loss is not None and valid <= cfg.stop.target_loss:
                st.stop_reason = "target_loss"
            elif cfg.stop.early_stop_evals is not None and st.evals_since_best > cfg.stop.early_stop_evals:
                st.stop_reason = "early_stop"
        return record

    # ------------------------------------------------------------------------------------------ saving
    def save_checkpoint(self) -> Optional[Path]:
        """A resumable checkpoint at this step boundary (every rank takes part; rank 0 writes)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        self._check_finite("training", weights=True)
        st = self.state
        st.next_checkpoint_tokens = st.tokens + (self.cfg.checkpoint.every_tokens or 0)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        model_state, optim_state = get_state_dict(self.module, self.optimizer, options=options)
        source = self.penalty.source
        replays = dist.all_gather_object(source.state_dict() if source is not None else None)
        counters = dataclasses.asdict(st)
        for name in ("sums", "log_sums"):
            counters[name] = {k: float(dist.reduce_sum(v.detach()).item()) if isinstance(v, torch.Tensor) else v
                              for k, v in getattr(st, name).items()}
        if not self.main:
            dist.barrier()
            return None
        state = {"config": config_to_dict(self.cfg), "counters": counters, "model": model_state,
                 "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                 "data": self.data.state_dict(), "replay": replays, "world_size": self.world,
                 "penalty": self.penalty.state_dict(),
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
        path = ckpt.save_checkpoint(self.run_dir, st.step, lambda tmp: ckpt.write_state(state, tmp))
        dist.barrier()
        return path

    def _restore(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = ckpt.load_checkpoint_state(self.run_dir)
        diff = _first_difference(state["config"], config_to_dict(self.cfg), ignore=RESUME_IGNORES)
        if diff:
            raise SelfReplayError(f"--resume: config differs from the interrupted run's at '{diff}'")
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True,
                                                                                    strict=False))
        self.scheduler.load_state_dict(state["scheduler"])
        self.data.load_state_dict(state["data"])
        replays, source = state["replay"], self.penalty.source
        if source is not None and replays and replays[0] is not None:
            if len(replays) == self.world or not self.parts.replay_per_rank:
                source.load_state_dict(replays[self.rank if self.parts.replay_per_rank else 0])
        self.penalty.load_state_dict(state["penalty"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        counters = state["counters"]
        for name in ("sums", "log_sums"):
            counters[name] = {k: torch.tensor(v / self.world, device=self.device)
                              for k, v in counters.get(name, {}).items()}
        self.state = TrainState(**counters)

    def _save_final(self, summary: dict) -> None:
        """The trained model (LoRA merged unless told otherwise), run.json and summary.json; checkpoints go."""
        info = {**self.parts.info, "steps": self.state.step, "tokens": self.state.tokens, "world_size": self.world}
        from selfreplay.models import save_model

        if self.state.best_step is not None:  # the best evaluation's weights are the saved model
            info["best_step"] = self.state.best_step
            if self.main:
                promote_best(self.run_dir)
        else:
            save_model(self.model, self.module, self.run_dir, self.parts.tokenizer, self.cfg.checkpoint.merge_lora,
                       info)
        if self.main:
            atomic_write(self.run_dir / CONFIG, config_to_yaml(self.cfg))
            atomic_write_json(self.run_dir / RUN_INFO, info)
            atomic_write_json(self.run_dir / SUMMARY, summary)
            ckpt.remove_checkpoints(self.run_dir)
        dist.barrier()
        if self.main and self.cfg.checkpoint.push_to_hub:
            from selfreplay.integrations.hub import push_run

            summary["hub_url"] = push_run(self.run_dir, self.model.kind, self.cfg.checkpoint.hub_model_id,
                                          self.cfg.checkpoint.hub_private_repo)


def _rng_state() -> dict:
    """The random generators' states (an abandoned evaluation puts back those from before it)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _first_difference(a, b, ignore=(), prefix="") -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if not prefix and k in ignore:
                continue
            d = _first_difference(a.get(k), b.get(k), (), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else prefix.rstrip(".")
