"""The one model interface of the engine: a causal LM as final hidden states plus an output head.

:class:`CausalLM` wraps the network of either kind (``net``: the built-in GPT, or any transformers
``AutoModelForCausalLM``, possibly inside a peft LoRA model) with a thin *adapter* that knows where that kind keeps
its hidden states, output head, KV cache and LoRA adapters. Everything else — losses, sampling, the teacher, DDP /
FSDP2, checkpoints — is written once against this interface.

Losses are computed from the hidden states and the head (``forward(..., head_fn=fn)`` returns ``fn(hidden, head)``)
so that a 128k vocabulary can be handled a chunk of positions at a time, and so that under FSDP2 the head runs
inside the wrapped forward, where its weights are gathered.

The teacher (:class:`Teacher`) is the model before finetuning: a frozen copy, or — with LoRA — the student's own
weights with the adapters switched off (no second copy).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Optional, Protocol

import torch
from torch import nn


class Adapter(Protocol):
    """What the engine needs to know about one kind of network (see models.builtin / models.hf):

    ``kind`` ("gpt" | "hf"); ``hidden(net, ids, attention_mask, position_ids)`` -> final hidden states;
    ``head(net)`` -> the output layer; ``cached_forward(net, ids, **kw)`` and ``decoder(module, net, rows, length,
    mode)`` -> an object with ``prefill(prompts)`` / ``step(token, pos)`` returning next-token logits [B, V];
    ``decode_modes``, ``vocab_size``, ``context``, ``blocks`` (FSDP units), ``add_lora``, ``adapters_disabled``,
    ``adapters_folded`` (evaluation), ``has_lora``, ``enable_gradient_checkpointing``.
    """

    kind: str


class CausalLM(nn.Module):
    """A causal LM behind one ``forward`` (what DDP / FSDP2 wrap and the optimizer trains).

    - ``forward(input_ids)`` -> logits [B, T, V];
    - ``forward(input_ids, head_fn=fn, **kw)`` -> ``fn(hidden, head, **kw)``: a loss or score from the final hidden
      states [B, T, D] and the output head (a module [N, D] -> [N, V]), computed inside the forward;
    - ``forward(input_ids, decode=kw)`` -> the network's own cached forward (sampling with a KV cache).
    """

    def __init__(self, net: nn.Module, adapter: Adapter, info: Optional[dict] = None):
        super().__init__()
        self.net = net
        self.adapter = adapter
        self.info = dict(info or {})  # provenance (run.json of a built-in checkpoint, hub id, ...)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, head_fn: Optional[Callable] = None,
                decode: Optional[dict] = None, **kwargs):
        if decode is not None:
            return self.adapter.cached_forward(self.net, input_ids, **decode)
        hidden = self.adapter.hidden(self.net, input_ids, attention_mask, position_ids)
        head = self.adapter.head(self.net)
        return head(hidden) if head_fn is None else head_fn(hidden, head, **kwargs)

    @property
    def kind(self) -> str:
        return self.adapter.kind

    @property
    def vocab_size(self) -> int:
        return self.adapter.vocab_size(self.net)

    @property
    def context(self) -> Optional[int]:
        return self.adapter.context(self.net)

    def num_params(self) -> dict[str, int]:
        """``actual`` (every weight), ``trainable`` and, for the built-in GPT, the paper's count ``paper``."""
        counts = {"actual": sum(p.numel() for p in self.parameters()),
                  "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad)}
        paper = getattr(self.adapter, "paper_param_count", None)
        if paper is not None:
            counts["paper"] = paper(self.net)
        return counts


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside torch.compile / DDP wrappers (FSDP2 shards in place: nothing to unwrap)."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def causal_lm(model: nn.Module) -> CausalLM:
    inner = unwrap(model)
    if not isinstance(inner, CausalLM):
        raise TypeError(f"expected a selfreplay CausalLM, got {type(inner).__name__}")
    return inner


def _hidden_and_head(hidden: torch.Tensor, head: nn.Module) -> tuple[torch.Tensor, nn.Module]:
    """A ``head_fn`` returning what it is given (one function object: a compiled forward is not re-guarded)."""
    return hidden, head


class Teacher:
    """The frozen reference model (the model before finetuning) of the replay penalty and of self-replay.

    ``module`` is a frozen copy of the student, or — with LoRA — the student itself, run with its adapters
    disabled. Under DDP / FSDP a LoRA teacher runs through the wrapped student (``use_forward_module``), so that
    sharded weights are gathered.
    """

    def __init__(self, module: CausalLM, shares_weights: bool = False):
        self.module = module
        self.shares_weights = shares_weights
        self.forward_module: Callable = module  # or, compiled, its own CompiledForward (train.optim)

    @classmethod
    def frozen_copy(cls, model: CausalLM, dtype: Optional[torch.dtype] = None, device=None) -> "Teacher":
        teacher = copy.deepcopy(causal_lm(model))
        if dtype is not None:
            teacher = teacher.to(dtype)
        if device is not None:
            teacher = teacher.to(device)
        return cls(teacher.eval().requires_grad_(False))

    @classmethod
    def adapters_off(cls, model: CausalLM) -> "Teacher":
        """The base weights of a LoRA model (call before wrapping for DDP / FSDP; see :meth:`use_forward_module`)."""
        return cls(causal_lm(model), shares_weights=True)

    def use_forward_module(self, wrapped: nn.Module) -> None:
        if self.shares_weights:
            self.forward_module = wrapped

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @torch.no_grad()
    def computes_like(self, model: CausalLM) -> bool:
        """Whether ``model`` (unwrapped) still computes exactly what the teacher computes, as before its first
        update: a frozen copy's weights all equal (same dtypes and devices), or with LoRA every adapter still
        adds zero (all of ``lora_B``)."""
        if self.shares_weights:
            return self.module is model and all(not p.any() for n, p in model.named_parameters() if "lora_B" in n)
        mine, theirs = dict(self.module.named_parameters()), dict(model.named_parameters())
        return mine.keys() == theirs.keys() and all(
            a.dtype == b.dtype and a.device == b.device and a.shape == b.shape and torch.equal(a, b)
            for a, b in ((mine[k], theirs[k]) for k in mine))

    @contextlib.contextmanager
    def active(self):
        """Inside: ``forward_module`` computes the teacher (adapters off, eval mode)."""
        if not self.shares_weights:
            yield
            return
        was_training = self.module.training
        self.module.eval()
        try:
            with self.module.adapter.adapters_disabled(self.module.net):
                yield
        finally:
            self.module.train(was_training)

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, attention_mask=None, position_ids=None, head_fn=None, **kwargs):
        """The teacher's ``forward`` (logits, or ``head_fn(hidden, head)``), without gradients."""
        device = self.device
        with self.active():
            return self.forward_module(tokens.to(device), None if attention_mask is None else
                                       attention_mask.to(device), None if position_ids is None else
                                       position_ids.to(device), head_fn=head_fn, **kwargs)

    def hidden_and_head(self, tokens: torch.Tensor, attention_mask=None, position_ids=None
                        ) -> tuple[torch.Tensor, Callable]:
        """Hidden states [B, T, D] and a head callable that runs with adapters off (for chunked losses).

        With LoRA under FSDP2 call the head from inside the student's forward (a ``head_fn``), where the shared
        weights are gathered.
        """
        hidden, head = self(tokens, attention_mask, position_ids, head_fn=_hidden_and_head)
        if not self.shares_weights:
            return hidden, head

        def head_without_adapters(h: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), self.active():
                return head(h)

        return hidden, head_without_adapters
