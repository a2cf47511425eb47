"""What a run records besides its evaluations: the training windows of log.every_steps (metrics.jsonl, TensorBoard,
wandb and the live loss of the progress display), the schedule warning, and the best checkpoint
(checkpoint.best_metric). Functions of a :class:`~selfreplay.train.loop.Trainer`, kept apart so the loop reads
as the loop.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import torch

from selfreplay.errors import SelfReplayError
from selfreplay.train import distributed as dist

log = logging.getLogger("selfreplay.train.loop")  # the run's own warnings, where users and tests look for them

MIN_LR_SUM = 1e-4  # AdamW moves a weight by at most about lr per step: less in total leaves the model as it was
BEST = "best"  # in the run directory while training (ownership.RUN_FILES)


def mean_sums(trainer, sums: dict, steps: int) -> dict:
    """``train_<k>``: each running sum of the loss parts, added over ranks, divided by ``steps`` (one host read)."""
    keys = sorted(sums)
    values = dist.reduce_sum(torch.stack([torch.as_tensor(sums[k], device=trainer.device).float()
                                          for k in keys])).tolist()
    return {f"train_{k}": v / steps for k, v in zip(keys, values)}


def coeff_fields(penalty) -> dict:
    """The replay coefficient, and with a budget its smoothed KL estimate."""
    fields = {"replay_coeff": float(penalty.coeff)}
    if penalty.budget is not None:
        fields["replay_kl_smoothed"] = float(penalty.budget.smoothed_kl)
    return fields


def log_training_window(trainer, logger, bar, clock: Callable[[], float], peek: bool = False) -> None:
    """The means over the steps since the last record: the live loss of the progress display and (every
    log.every_steps steps, and at the end) a training record in metrics.jsonl, TensorBoard and wandb.
    ``peek``: only the live loss, the window goes on."""
    st = trainer.state
    means = mean_sums(trainer, st.log_sums, st.steps_since_log)
    bar.set_postfix(loss=f"{means['train_loss']:.3f}", refresh=False)
    if peek:
        return
    now, (start, start_step) = clock(), trainer.window_start
    if logger is not None and trainer.cfg.log.every_steps:
        record = {"event": "train", "step": st.step, "tokens": st.tokens, "epoch": trainer.data.epochs_done,
                  "lr": trainer.last_lr, **coeff_fields(trainer.penalty), **means,
                  "tokens_per_s": (st.step - start_step) * trainer.tokens_per_step / (now - start)
                  if now > start and st.step > start_step else None}
        logger.log(record)
    st.log_sums, st.steps_since_log = {}, 0
    trainer.window_start = (now, st.step)


def warn_schedule(trainer) -> None:
    """One line when the run could not have moved its weights: it ended inside its warmup, or its learning
    rates add up to too little for AdamW (whose update moves a weight by about the LR per step)."""
    st, o = trainer.state, trainer.cfg.optim
    warmup_steps = math.ceil(trainer.warmup_tokens / trainer.tokens_per_step)
    if st.step and st.step < warmup_steps:
        log.warning("warning: the run ended inside its warmup (step %d of %d warmup steps): its last learning "
                    "rate was %.3g, not optim.lr=%g; set a shorter optim.warmup_steps / warmup_ratio / "
                    "warmup_tokens", st.step, warmup_steps, trainer.last_lr, o.lr)
    elif st.step and o.name == "adamw" and st.lr_sum < MIN_LR_SUM:
        log.warning("warning: the learning rates of the run's %d steps add up to %.3g: AdamW moved each weight by "
                    "at most about that much, too little to change the model; raise optim.lr or train longer",
                    st.step, st.lr_sum)


def keep_if_best(trainer, record: dict) -> None:
    """checkpoint.best_metric: the weights of the best evaluation so far into ``best/`` (the model before
    training is not a candidate, as with HF Trainer's load_best_model_at_end)."""
    c, st = trainer.cfg.checkpoint, trainer.state
    value = record.get(c.best_metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        logged = ", ".join(sorted(k for k, v in record.items() if isinstance(v, float)))
        raise SelfReplayError(f"checkpoint.best_metric={c.best_metric!r}: not a metric of this run's evaluations "
                              f"({logged})")
    if st.step == 0 or not math.isfinite(value):
        return
    greater = c.greater_is_better if c.greater_is_better is not None else c.best_metric.endswith("accuracy")
    if st.best_metric is not None and not (value > st.best_metric if greater else value < st.best_metric):
        return
    from selfreplay.models import save_model

    if trainer.main:
        (trainer.run_dir / BEST).mkdir(exist_ok=True)
    save_model(trainer.model, trainer.module, trainer.run_dir / BEST, trainer.parts.tokenizer, c.merge_lora,
               dict(trainer.parts.info), keep_training=True)
    st.best_metric, st.best_step = float(value), st.step


def promote_best(run_dir: Path) -> None:
    """At the end: the best evaluation's weights become the run's saved model, and ``best/`` goes."""
    for name in ("model.safetensors", "model"):
        if (run_dir / BEST / name).exists():
            (run_dir / BEST / name).replace(run_dir / name)
    (run_dir / BEST).rmdir()
