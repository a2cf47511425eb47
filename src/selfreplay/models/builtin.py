"""The built-in GPT behind the model interface: its adapter, decode steps, and run-directory checkpoints.

A built-in checkpoint is a run directory holding ``model.safetensors`` (the weights) and ``run.json`` (the
architecture under ``model`` and the provenance the trainer recorded). Decode steps for sampling:

- ``eager``: prefill the prompt in one forward pass, then one cached forward per token;
- ``static``: a one-token step whose KV buffers and shapes never change and whose position is a tensor, so one
  traced graph serves every position;
- ``compiled``: ``static`` under ``torch.compile``: on CUDA as a CUDA graph (``mode="reduce-overhead"``), the
  per-token launch overhead otherwise dominating sampling from small models; elsewhere with an int position and a
  dynamic length (one graph reading only the written cache slots; fused elementwise work, ~a quarter less time
  per CPU refill at the bench shapes, for a compilation of ~10-30 s once per process and batch size).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from selfreplay.errors import SelfReplayError
from selfreplay.models import lora
from selfreplay.models.core import CausalLM
from selfreplay.models.gpt import GPT, GPTConfig, paper_param_count

WEIGHTS = "model.safetensors"
RUN_INFO = "run.json"


class _EagerDecoder:
    """Decoding through the model's own cached forward (``module`` may be a DDP / FSDP-wrapped CausalLM)."""

    def __init__(self, module: nn.Module, net: GPT, batch_size: int):
        self.module, self.cache = module, net.new_kv_cache(batch_size)

    def prefill(self, prompts: torch.Tensor) -> torch.Tensor:
        return self.module(prompts, decode={"cache": self.cache})[:, -1]

    def step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        return self.module(token[:, None], decode={"cache": self.cache})[:, -1]


class StaticDecoder(nn.Module):
    """One-token decode step of :class:`GPT` with static KV buffers.

    A tensor position keeps shapes, buffer addresses and the traced graph the same at every step: what CUDA graphs
    need (slots after the position may hold stale keys of an earlier batch; the model masks them). An int position
    reads only the slots written so far: compiled with a dynamic length, one graph serves positions 1.. (a CPU).
    """

    def __init__(self, model: GPT, batch_size: int, cache_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.model = model
        self.cache = model.new_kv_cache(batch_size, cache_dtype)
        for i, (k, v) in enumerate(zip(self.cache.keys, self.cache.values)):
            self.register_buffer(f"key_{i}", k, persistent=False)
            self.register_buffer(f"value_{i}", v, persistent=False)

    def forward(self, token: torch.Tensor, pos: Union[torch.Tensor, int]) -> torch.Tensor:
        """``token`` [B, 1] at position ``pos`` (long tensor [1], or an int) -> next-token logits [B, V]."""
        self.cache.pos = pos
        return self.model(token, cache=self.cache)[:, -1]


class _StaticDriver:
    """Feeds a (possibly compiled) :class:`StaticDecoder` one position at a time, prompt included."""

    def __init__(self, fn: Callable, length: int, device, cuda_graphs: bool, first: Optional[Callable] = None):
        """``first``: int positions, position 0 through it (the uncompiled step: 0 would be a graph of its own)."""
        self.fn, self.cuda_graphs, self.first = fn, cuda_graphs, first
        # one small tensor per position (not views of one arange: same strides and offset at every call)
        self.positions = list(range(length)) if first is not None else \
            [torch.full((1,), t, dtype=torch.long, device=device) for t in range(length)]

    def prefill(self, prompts: torch.Tensor) -> torch.Tensor:
        logits = None
        for i in range(prompts.shape[1]):
            logits = self.step(prompts[:, i].contiguous(), i)
        return logits

    def step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        # a CUDA-graph output is overwritten by the next replay: the caller uses it before the next call
        fn = self.first if pos == 0 and self.first is not None else self.fn
        return fn(token[:, None], self.positions[pos])


class GPTAdapter:
    """:class:`~selfreplay.models.core.Adapter` of the built-in GPT."""

    kind = "gpt"

    def __init__(self):
        self._decoders: dict[tuple, Callable] = {}  # compiled / static decode steps, reused across refills

    def hidden(self, net: GPT, tokens, attention_mask=None, position_ids=None) -> torch.Tensor:
        if position_ids is not None:
            raise SelfReplayError("the built-in GPT does not take packed examples (position_ids); "
                                  "use data.packing=none")
        return net.hidden(tokens)  # right padding needs no mask: attention is causal and padding is never a target

    def head(self, net: GPT) -> nn.Module:
        return net.head

    def cached_forward(self, net: GPT, tokens: torch.Tensor, cache) -> torch.Tensor:
        return net(tokens, cache=cache)

    def decode_modes(self, net: GPT, device: torch.device) -> tuple[str, ...]:
        return ("eager", "static", "compiled")

    def decoder(self, module: nn.Module, net: GPT, batch_size: int, length: int, mode: str):
        if mode == "eager":
            return _EagerDecoder(module, net, batch_size)
        device = net.head.weight.device
        # under autocast keep the cache in the autocast dtype: no per-step cast of the whole cache
        cache_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        key = (id(net), mode, batch_size, cache_dtype)
        fn = self._decoders.get(key)
        if fn is None:
            fn = StaticDecoder(net, batch_size, cache_dtype)
            if mode == "compiled" and device.type == "cuda":
                for buf in fn.buffers():
                    torch._dynamo.mark_static_address(buf)  # mutated in place inside the graph: keep addresses
                fn = torch.compile(fn, fullgraph=True, dynamic=False, mode="reduce-overhead")
            elif mode == "compiled":  # no graphs to replay: read only the written slots, the length dynamic
                fn = torch.compile(fn, fullgraph=True, dynamic=True)
            self._decoders[key] = fn
        cuda_graphs = mode == "compiled" and device.type == "cuda"
        first = getattr(fn, "_orig_mod", None) if mode == "compiled" and not cuda_graphs else None
        return _StaticDriver(fn, length, device, cuda_graphs, first)

    def vocab_size(self, net: GPT) -> int:
        return net.config.vocab_size

    def context(self, net: GPT) -> int:
        return net.config.context

    def blocks(self, net: GPT) -> list[nn.Module]:
        return list(net.blocks)

    def add_lora(self, model: CausalLM, r: int, alpha: float, dropout: float, targets, seed: int) -> None:
        """In-place adapters on the GPT's Linear layers (see :mod:`selfreplay.models.lora`)."""
        layers = lora.apply_lora(model.net, r, alpha, dropout, targets, seed=seed)
        model.info["lora"] = {"r": r, "alpha": alpha, "layers": layers}

    def enable_gradient_checkpointing(self, net: GPT) -> None:
        net.checkpointing = True

    def adapters_disabled(self, net: GPT):
        return lora.adapters_disabled(net)

    def adapters_folded(self, net: GPT):
        return lora.adapters_folded(net)

    def has_lora(self, net: GPT) -> bool:
        return lora.has_lora(net)

    def paper_param_count(self, net: GPT) -> int:
        return paper_param_count(net.config)


GPT_ADAPTER = GPTAdapter()


def init_gpt(shape: GPTConfig, seed: int) -> GPT:
    """A freshly initialised GPT; the same (shape, seed) always gives the same weights (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(shape)


def wrap_gpt(net: GPT, info: Optional[dict] = None) -> CausalLM:
    return CausalLM(net, GPT_ADAPTER, info)


# ------------------------------------------------------------------------------------------------ checkpoints

def is_gpt_run(path) -> bool:
    """Whether ``path`` is a run directory holding a built-in GPT checkpoint."""
    p = Path(path)
    return (p / WEIGHTS).is_file() and (p / RUN_INFO).is_file()


def read_run_info(run_dir) -> dict:
    """The provenance record (run.json) of a finished built-in run directory, checked."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SelfReplayError(f"checkpoint {run_dir}: directory not found")
    info_path = run_dir / RUN_INFO
    if not info_path.is_file() or not (run_dir / WEIGHTS).is_file():
        raise SelfReplayError(f"checkpoint {run_dir}: not a finished run directory (no {RUN_INFO} / {WEIGHTS})")
    try:
        info = json.loads(info_path.read_text())
        if not isinstance(info, dict) or not isinstance(info.get("model"), dict):
            raise KeyError("model")
        GPTConfig.of(info["model"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise SelfReplayError(f"checkpoint {run_dir}: corrupt {RUN_INFO} ({type(e).__name__}: {e})") from None
    except SelfReplayError as e:
        raise SelfReplayError(f"checkpoint {run_dir}: corrupt {RUN_INFO} ({e})") from None
    return info


def load_weights(module: nn.Module, path) -> None:
    """Load safetensors weights into ``module``: a missing, corrupt, mismatched or non-finite file is a one-line
    error."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise SelfReplayError(f"{path}: weights file not found")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise SelfReplayError(f"{path}: corrupt weights file ({str(e).splitlines()[0]})") from None
    expected = module.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise SelfReplayError(f"{path}: weights do not fit the model (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise SelfReplayError(f"{path}: weight {k} has shape {tuple(v.shape)}, model expects "
                                  f"{tuple(expected[k].shape)}")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise SelfReplayError(f"{path}: weight {k} holds NaN or infinite values (the run that wrote it "
                                  f"diverged)")
    module.load_state_dict(state)


def load_gpt_run(run_dir, device="cpu") -> CausalLM:
    """The GPT of a built-in run directory; its run.json becomes ``model.info``."""
    info = read_run_info(run_dir)
    net = GPT(GPTConfig.of(info["model"]))
    load_weights(net, Path(run_dir) / WEIGHTS)
    return wrap_gpt(net.to(device), {**info, "checkpoint": str(run_dir)})


def save_gpt_weights(net: nn.Module, path, state: Optional[dict] = None) -> None:
    """The network's weights (or a given full ``state``) as safetensors, atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    from selfreplay.train.files import atomic_file

    state = state or {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    with atomic_file(path) as tmp:
        save_file(state, str(tmp))
