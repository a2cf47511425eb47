"""Training: one loop (:mod:`.loop`) over the parts a config describes (:mod:`.build`), with checkpoints,
distributed helpers and the run directory's files.

:func:`train` is the whole of ``selfreplay pretrain`` / ``finetune``: resolve the model kind and its defaults,
check the config, build the parts, run the loop.
"""

from __future__ import annotations

from typing import Callable, Optional

from selfreplay.config import FINETUNE, PRETRAIN, TrainConfig

def model_kind_of(cfg: TrainConfig, command: str) -> str:
    """``gpt`` or ``hf``: pretraining builds a GPT; finetuning takes the kind of the model it starts from."""
    if command == PRETRAIN or not cfg.model.model_name_or_path:
        return "gpt"
    from selfreplay.models import model_kind

    return model_kind(cfg.model.model_name_or_path)


def step_flops(cfg: TrainConfig, kind: str, parts, world: int = 1) -> float:
    """Model FLOPs of one optimizer step on one rank: the built-in GPT's count (models.gpt.gpt_step_flops), else
    6 x parameters x tokens; replay rows count as data rows plus a teacher forward."""
    seq_len = getattr(parts.data, "seq_len", None) or cfg.data.seq_len or 512
    replay = cfg.replay.batch_size if parts.penalty is not None and parts.penalty.source is not None else 0
    rows, replay = cfg.data.batch_size / world, (replay or 0) / world
    if kind == "gpt":
        from selfreplay.models.gpt import GPTConfig, gpt_step_flops

        return gpt_step_flops(GPTConfig.of(cfg.model), rows, seq_len, replay, teacher_rows=replay)
    params = parts.model.num_params()["actual"]
    return (6 * (rows + replay) + 2 * replay) * params * seq_len


def recorded_threads(run_dir) -> Optional[int]:
    """The thread count a run recorded in its saved config.yaml (what a resumed run reuses), if any."""
    from pathlib import Path

    from selfreplay.errors import SelfReplayError
    from selfreplay.yamlfile import read_yaml

    try:
        saved = read_yaml(Path(run_dir) / "config.yaml")
    except SelfReplayError:  # none yet, or unreadable: the resume reports that itself
        return None
    threads = saved.get("threads") if isinstance(saved, dict) else None
    return threads if isinstance(threads, int) and not isinstance(threads, bool) and threads > 0 else None


def set_threads(cfg: TrainConfig, device, flops_per_step: Optional[float] = None, resume: bool = False) -> int:
    """CPU threads of a run, decided once and recorded in ``cfg.threads`` (so in its config.yaml and checkpoints):
    ``threads`` if given; a resumed run's recorded count (the count changes the run's bits); ``OMP_NUM_THREADS``
    if set; else the rule of :mod:`selfreplay.threads` (the work per step and the free cores). Under torchrun
    rank 0 decides for the ranks of its machine and every rank takes its answer."""
    import os

    import torch

    from selfreplay.threads import decide_threads, env_threads
    from selfreplay.train.distributed import broadcast_object, env_world

    if device.type != "cpu":
        return torch.get_num_threads()
    rank, world = env_world()[:2]
    fixed = cfg.threads or (recorded_threads(cfg.run_dir) if resume and cfg.run_dir else None) or env_threads()
    runs = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if world > 1 else 1
    threads = broadcast_object(decide_threads(flops_per_step, runs, fixed) if rank == 0 else None)
    if threads is None:  # torchrun's variables without a process group (a tool's own process)
        threads = decide_threads(flops_per_step, 1, fixed)
    torch.set_num_threads(threads)
    cfg.threads = threads
    return threads


def prepare(cfg: TrainConfig, command: str) -> tuple[TrainConfig, str, "object"]:
    """Defaults resolved per model kind, the config checked (its memory estimated), the process group joined:
    (cfg, kind, dist info)."""
    from selfreplay.train import checks
    from selfreplay.train.distributed import init_distributed
    from selfreplay.train.memory import check_run_memory

    if command not in (PRETRAIN, FINETUNE):
        raise ValueError(f"command must be pretrain or finetune, not {command!r}")
    kind = model_kind_of(cfg, command)
    checks.resolve_defaults(cfg, kind, command)
    info = init_distributed(cfg.device)
    checks.validate(cfg, kind, command, info.world_size)
    checks.check_paths(cfg)
    check_run_memory(cfg, kind, command, info.device, info.world_size)
    return cfg, kind, info


def _refuse_foreign_run_dir(cfg: TrainConfig, rank: int, resume: bool) -> None:
    """Refuse a run directory that is not ours before the slow part (rank 0 looks, every rank learns the answer:
    the others must not look while rank 0 may already be writing its marker)."""
    from selfreplay.errors import SelfReplayError
    from selfreplay.train.distributed import broadcast_object
    from selfreplay.train.ownership import check_run_dir

    error = None
    if rank == 0:
        try:
            check_run_dir(cfg.run_dir, resume)
        except SelfReplayError as e:
            error = str(e)
    error = broadcast_object(error)
    if error:
        raise SelfReplayError(error)


def train(cfg: TrainConfig, command: str = PRETRAIN, resume: bool = False,
          on_step: Optional[Callable[[int], None]] = None) -> dict:
    """Run a pretraining or finetuning job (in every rank under torchrun); returns the final summary."""
    from selfreplay.allocator import keep_freed_memory
    from selfreplay.train.build import build_parts
    from selfreplay.train.loop import Trainer

    keep_freed_memory()  # sweep workers, SLURM and Ray jobs enter here, not through the CLI
    cfg, kind, info = prepare(cfg, command)
    _refuse_foreign_run_dir(cfg, info.rank, resume)
    parts = build_parts(cfg, kind, command, info.device, info.rank, info.world_size)
    set_threads(cfg, info.device, step_flops(cfg, kind, parts, info.world_size), resume)
    return Trainer(cfg, parts, info.device, resume, on_step).run()
