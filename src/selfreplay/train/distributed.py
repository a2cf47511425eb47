"""Multi-process training under torchrun: process group setup, model wrapping (DDP or FSDP2), reductions.

``torchrun --nproc_per_node N -m selfreplay finetune cfg.yaml`` (multi-node: torchrun's ``--nnodes`` and
``--rdzv-endpoint``) sets RANK / WORLD_SIZE / LOCAL_RANK; :func:`init_distributed` reads them (NCCL on CUDA,
gloo on CPU). Without them everything here is a no-op for a single process.

Conventions of the loop: each rank takes rows rank, rank + world, ... of every global batch, samples its own
self-generated replay with seed ``seed + 1000 * rank`` (so ranks never replay the same sequences), and losses are
normalised by global token counts, so N ranks make the same update as one process with the same global batch.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from selfreplay.errors import SelfReplayError

RANK_SEED_STRIDE = 1000  # replay seed of rank r = seed + RANK_SEED_STRIDE * r


@dataclass
class DistInfo:
    """Where this process sits: its rank, the world size, its local rank and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment, (0, 1, 0) without it."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise SelfReplayError("RANK / WORLD_SIZE / LOCAL_RANK: expected integers (as torchrun sets them)") from None


def init_distributed(device: str = "auto", timeout_s: float = 1800) -> DistInfo:
    """Join the process group torchrun describes (idempotent); pick this rank's device."""
    rank, world, local = env_world()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SelfReplayError(f"device={device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise SelfReplayError(f"device={device!r}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SelfReplayError(f"device={device}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank, world, local, dev)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``, checked with a one-line error."""
    return init_distributed(name).device


def shutdown() -> None:
    """Leave the process group. DDP's and FSDP's wrappers of the model sit in reference cycles that hold the group:
    collected first, the group's threads are joined now, while the interpreter is alive. Left to the interpreter's
    exit, a gloo rank sometimes aborted after its run had finished ("terminate called without an active
    exception")."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes files and prints."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor; the input itself in a single process)."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (e.g. a decision only rank 0 can make)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap_model(model: nn.Module, strategy: str, device: Optional[torch.device] = None) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` on every block, then on the root), of a
    :class:`~selfreplay.models.core.CausalLM`; the model itself in a single process.

    FSDP2 shards parameters in place and moves the shards to this rank's device, so a model too big for one GPU
    can be loaded on the CPU first. Every rank must hold the same weights (same checkpoint, same seed for LoRA's
    init): nothing is broadcast. Mixed precision stays off here: the loop autocasts on CUDA.
    """
    if not is_distributed():
        return model
    if strategy == "ddp":
        ids = [device.index] if device is not None and device.type == "cuda" else None
        params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        no_buffer_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else \
            {"broadcast_buffers": False}  # buffers (rotary tables) are the same on every rank
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, **no_buffer_sync)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        from selfreplay.models.core import causal_lm

        inner = causal_lm(model)
        for block in inner.adapter.blocks(inner.net):
            fully_shard(block)
        fully_shard(model)  # the root unit: embeddings, final norm, output head (losses run inside its forward)
        return model
    raise SelfReplayError(f"distributed.strategy={strategy!r}: expected ddp or fsdp")


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(model, FSDPModule)


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on CPU: gathered from all ranks under FSDP2 (collective: call on every rank),
    else the module's own (DDP wrappers unwrapped)."""
    from selfreplay.models.core import unwrap

    model = unwrap(model)
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def no_sync(model: nn.Module, skip: bool):
    """Skip gradient sync (a DDP micro-step of gradient accumulation) when ``skip``; FSDP2 likewise."""
    import contextlib

    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if is_fsdp(model):
        model.set_requires_gradient_sync(not skip)
    return contextlib.nullcontext()
