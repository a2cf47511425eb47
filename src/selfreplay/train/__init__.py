"""Training: one loop (:mod:`.loop`) over the parts a config describes (:mod:`.build`), with checkpoints,
distributed helpers and the run directory's files.

:func:`train` is the whole of ``selfreplay pretrain`` / ``finetune``: resolve the model kind and its defaults,
check the config, build the parts, run the loop.
"""

from __future__ import annotations

from typing import Callable, Optional

from selfreplay.config import FINETUNE, PRETRAIN, TrainConfig

SMALL_MODEL_PARAMS = 20_000_000  # below this, one CPU thread per run is fastest (measured in BENCHMARKS.md)


def model_kind_of(cfg: TrainConfig, command: str) -> str:
    """``gpt`` or ``hf``: pretraining builds a GPT; finetuning takes the kind of the model it starts from."""
    if command == PRETRAIN or not cfg.model.model_name_or_path:
        return "gpt"
    from selfreplay.models import model_kind

    return model_kind(cfg.model.model_name_or_path)


def set_threads(cfg: TrainConfig, device, num_params: Optional[int] = None) -> int:
    """CPU threads: ``threads``, else 1 for small models (threads wait on each other more than they help)."""
    import torch

    if device.type != "cpu":
        return torch.get_num_threads()
    threads = cfg.threads or (1 if num_params is not None and num_params < SMALL_MODEL_PARAMS else None)
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


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
    set_threads(cfg, info.device, parts.model.num_params()["actual"])
    return Trainer(cfg, parts, info.device, resume, on_step).run()
