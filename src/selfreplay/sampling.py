"""Batched autoregressive sampling from a (frozen) model with a KV cache.

Works with any model offering ``new_kv_cache(batch_size)`` and ``model(tokens, cache=cache) -> logits``.
While sampling, the model's temperature-1 next-token log-probs at every position are the exact KL targets for
the sampled sequence, so the sampler can return them and spare the trainer a second teacher pass.

Decoding modes (``decode``):

- ``eager``: prefill the prompt in one forward pass, then one ``model(token, cache=...)`` call per token.
- ``static``: the built-in :class:`~selfreplay.model.GPT` only. A one-token decode step whose KV buffers and
  shapes never change and whose position is a tensor, so one traced graph serves every position.
- ``compiled``: ``static`` under ``torch.compile(mode="reduce-overhead")``, i.e. replayed as a CUDA graph
  (CUDA only). The per-token launch overhead otherwise dominates sampling from small models.
- ``auto``: ``compiled`` for a GPT on CUDA, ``eager`` otherwise.

Samples are deterministic given the generator's seed, the device and the decoding mode (the modes round
differently, so they may draw different tokens from the same seed).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from selfreplay.errors import SelfReplayError
from selfreplay.losses import TeacherTargets, TopKLogprobs
from selfreplay.model import GPT

DECODE_MODES = ("auto", "eager", "static", "compiled")
EOS_CHECK_EVERY = 16  # with stop-at-EOS, check every this many steps whether all rows ended (one host sync)


@dataclass
class Samples:
    """Sampled sequences; ``loss_mask`` marks real (non-padding) tokens, ``teacher_logprobs`` the KL targets."""

    tokens: torch.Tensor  # [B, L] long, prompt included
    loss_mask: Optional[torch.Tensor] = None  # [B, L] float; None = every token counts
    teacher_logprobs: Optional[TeacherTargets] = None  # per position t: log p(x_{t+1} = . | x_<=t), last row zero

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, start: int, stop: int) -> "Samples":
        """Rows ``start:stop`` (views, no copy)."""
        lp = self.teacher_logprobs
        if isinstance(lp, TopKLogprobs):
            lp = TopKLogprobs(lp.values[start:stop], lp.indices[start:stop])
        elif lp is not None:
            lp = lp[start:stop]
        mask = None if self.loss_mask is None else self.loss_mask[start:stop]
        return Samples(self.tokens[start:stop], mask, lp)


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for stream ``index`` of base ``seed`` (independent streams per chunk or buffer refill).

    Hashing (rather than ``seed + index``) keeps the streams of nearby seeds from overlapping.
    """
    digest = hashlib.blake2b(f"selfreplay:{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def make_generator(seed: int, index: int, device) -> torch.Generator:
    """A torch.Generator on ``device`` seeded from (seed, index)."""
    return torch.Generator(device=torch.device(device)).manual_seed(derive_seed(seed, index))


def check_sampling_args(temperature: float, top_k: Optional[int], top_p: Optional[float],
                        logprobs_top_k: Optional[int] = None) -> None:
    """Raise :class:`SelfReplayError` for out-of-range sampling settings."""
    if temperature is None or temperature < 0:
        raise SelfReplayError(f"temperature={temperature}: must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise SelfReplayError(f"top_k={top_k}: must be positive")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise SelfReplayError(f"top_p={top_p}: expected a value in (0, 1]")
    if logprobs_top_k is not None and logprobs_top_k < 1:
        raise SelfReplayError(f"logprobs_top_k={logprobs_top_k}: must be positive")


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(logp: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
                  generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next tokens [B] from float32 log-probs [B, V]: greedy at temperature 0, else categorical sampling."""
    if temperature == 0:
        return logp.argmax(-1)
    scaled = logp if temperature == 1 else logp / temperature  # log-probs differ from logits by a constant
    probs = F.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _TargetStore:
    """Preallocated per-position teacher targets (full log-probs or top-k), filled one position at a time.

    Allocating once (instead of stacking a list) keeps peak memory at one copy of the targets.
    """

    def __init__(self, top_k: Optional[int], dtype: torch.dtype):
        self.top_k, self.dtype = top_k, dtype
        self.full: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.indices: Optional[torch.Tensor] = None

    def put(self, t, logp: torch.Tensor, length: int) -> None:
        """Store log-probs ``logp`` ([B, V] or [B, n, V] for a slice ``t``) at position(s) ``t``."""
        B, V = logp.shape[0], logp.shape[-1]
        if self.top_k is None:
            if self.full is None:
                self.full = torch.zeros(B, length, V, dtype=self.dtype, device=logp.device)
            self.full[:, t] = logp
            return
        k = min(self.top_k, V)
        if self.values is None:
            self.values = torch.zeros(B, length, k, dtype=self.dtype, device=logp.device)
            self.indices = torch.zeros(B, length, k, dtype=torch.long, device=logp.device)
        values, indices = logp.topk(k, dim=-1)
        self.values[:, t] = values
        self.indices[:, t] = indices  # type: ignore[index]

    def result(self) -> Optional[TeacherTargets]:
        if self.top_k is None:
            return self.full
        return None if self.values is None else TopKLogprobs(self.values, self.indices)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- decode steps

class _EagerStepper:
    """Decoding through the model's own cached forward (works for any model with ``new_kv_cache``)."""

    def __init__(self, model, batch_size: int):
        self.model, self.cache = model, model.new_kv_cache(batch_size)

    def prefill(self, prompts: torch.Tensor) -> torch.Tensor:
        """Log-probs [B, P, V] at every prompt position."""
        return F.log_softmax(self.model(prompts, cache=self.cache).float(), dim=-1)

    def step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Feed ``token`` [B] at position ``pos``; log-probs [B, V] of the next token."""
        return F.log_softmax(self.model(token[:, None], cache=self.cache)[:, -1].float(), dim=-1)


class StaticDecoder(nn.Module):
    """One-token decode step of :class:`GPT` with static KV buffers and a tensor position.

    The cache position is a tensor input, so shapes, buffer addresses and the traced graph are the same at every
    step: what CUDA graphs need. The buffers are registered here so compilation treats them as static; slots
    after the position may hold stale keys from an earlier batch and are masked by the model.
    """

    def __init__(self, model: GPT, batch_size: int, cache_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.model = model
        self.cache = model.new_kv_cache(batch_size, cache_dtype)
        for i, (k, v) in enumerate(zip(self.cache.keys, self.cache.values)):
            self.register_buffer(f"key_{i}", k, persistent=False)
            self.register_buffer(f"value_{i}", v, persistent=False)

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``token`` [B, 1] at position ``pos`` (long tensor [1]) -> float32 next-token log-probs [B, V]."""
        self.cache.pos = pos
        return F.log_softmax(self.model(token, cache=self.cache)[:, -1].float(), dim=-1)


class _StaticStepper:
    """Drives a (possibly compiled) :class:`StaticDecoder`, prompt tokens included, one position at a time."""

    def __init__(self, fn: Callable, length: int, device, cuda_graphs: bool):
        self.fn, self.cuda_graphs = fn, cuda_graphs
        # one small tensor per position (not views of one arange: same strides and offset at every call)
        self.positions = [torch.full((1,), t, dtype=torch.long, device=device) for t in range(length)]

    def prefill(self, prompts: torch.Tensor) -> torch.Tensor:
        # CUDA-graph outputs are overwritten by the next replay: copy each before the next call
        return torch.stack([self.step(prompts[:, i].contiguous(), i).clone() for i in range(prompts.shape[1])], 1)

    def step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        """Feed ``token`` [B] at position ``pos``; log-probs [B, V] of the next token (valid until the next call)."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return self.fn(token[:, None], self.positions[pos])


def _unwrap(model):
    return getattr(model, "_orig_mod", model)  # a torch.compile'd module wraps the original


# ---------------------------------------------------------------------------------------------------- sampler

class Sampler:
    """Samples continuations from one model; keeps its decode steps (one per batch size) for reuse.

    Reuse one Sampler for repeated sampling: with ``decode='compiled'`` the first call per batch size compiles
    and records the CUDA graph, later calls only replay it.
    """

    def __init__(self, model, decode: str = "auto"):
        if decode not in DECODE_MODES:
            raise SelfReplayError(f"decode={decode!r}: expected one of {', '.join(DECODE_MODES)}")
        self.model, self.decode = model, decode
        self._decoders: dict[tuple, Callable] = {}

    def mode(self, device) -> str:
        """The decoding mode used on ``device`` ('auto' resolved)."""
        device = torch.device(device)
        if self.decode == "auto":
            return "compiled" if device.type == "cuda" and isinstance(_unwrap(self.model), GPT) else "eager"
        if self.decode in ("static", "compiled") and not isinstance(_unwrap(self.model), GPT):
            raise SelfReplayError(f"decode={self.decode!r} supports only the built-in GPT; use decode='eager'")
        if self.decode == "compiled" and device.type != "cuda":
            raise SelfReplayError("decode='compiled' needs CUDA (it replays CUDA graphs); use 'static' or 'eager'")
        return self.decode

    def _stepper(self, mode: str, batch_size: int, length: int, device):
        if mode == "eager":
            return _EagerStepper(self.model, batch_size)
        kind = torch.device(device).type
        # under autocast keep the cache in the autocast dtype: no per-step cast of the whole cache
        cache_dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
        key = (mode, batch_size, cache_dtype)
        fn = self._decoders.get(key)
        if fn is None:
            decoder = StaticDecoder(_unwrap(self.model), batch_size, cache_dtype)
            fn = decoder
            if mode == "compiled":
                for buf in decoder.buffers():
                    torch._dynamo.mark_static_address(buf)  # mutated in place inside the graph: keep addresses
                fn = torch.compile(decoder, mode="reduce-overhead", fullgraph=True, dynamic=False)
            self._decoders[key] = fn
        return _StaticStepper(fn, length, device, cuda_graphs=mode == "compiled")

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, length: int, temperature: float = 1.0, top_k: Optional[int] = None,
               top_p: Optional[float] = None, eos_id: Optional[int] = None, pad_id: int = 0,
               generator: Optional[torch.Generator] = None, return_logprobs: bool = False,
               logprobs_top_k: Optional[int] = None, logprobs_dtype: torch.dtype = torch.float32) -> Samples:
        """Extend ``prompts`` [B, P] to ``length`` tokens.

        temperature 0 means greedy decoding. With ``eos_id`` set, a sequence stops at its first sampled EOS
        and the rest is ``pad_id`` with loss_mask 0; otherwise EOS is an ordinary token (the paper's default:
        full-length samples). Log-probs returned are always at temperature 1 (the model's own distribution,
        unfiltered by top-k/top-p), whatever was sampled; ``logprobs_top_k`` keeps only the k largest per
        position, stored in ``logprobs_dtype`` (indices int64).
        """
        if prompts.ndim != 2:
            raise SelfReplayError(f"prompts must be [batch, prompt_length], got shape {tuple(prompts.shape)}")
        B, P = prompts.shape
        if not 0 < P <= length:
            raise SelfReplayError(f"prompt length {P} must be in [1, {length}]")
        context = getattr(getattr(_unwrap(self.model), "config", None), "context", None)
        if context is not None and length > context:
            raise SelfReplayError(f"sample length {length} exceeds the model context {context}")
        check_sampling_args(temperature, top_k, top_p, logprobs_top_k)
        device = prompts.device
        stepper = self._stepper(self.mode(device), B, length, device)
        tokens = torch.full((B, length), pad_id, dtype=torch.long, device=device)
        tokens[:, :P] = prompts
        stop = eos_id is not None
        alive = torch.ones(B, dtype=torch.bool, device=device)
        mask = torch.ones(B, length, device=device) if stop else None
        store = _TargetStore(logprobs_top_k, logprobs_dtype) if return_logprobs else None

        prompt_logp = stepper.prefill(prompts)  # [B, P, V]
        if store is not None and P > 1:
            store.put(slice(0, P - 1), prompt_logp[:, :-1], length)
        logp = prompt_logp[:, -1]
        for t in range(P, length):
            if store is not None:
                store.put(t - 1, logp, length)  # position t-1 predicts token t
            nxt = choose_tokens(logp, temperature, top_k, top_p, generator)
            if stop:
                nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
                mask[:, t] = alive.float()  # type: ignore[index]
                alive = alive & (nxt != eos_id)
            tokens[:, t] = nxt
            if t + 1 == length:
                break
            if stop and (t - P) % EOS_CHECK_EVERY == EOS_CHECK_EVERY - 1 and not bool(alive.any()):
                mask[:, t + 1:] = 0.0  # type: ignore[index]  # every row ended: the rest stays padding
                break
            logp = stepper.step(nxt, t)
        if store is not None and length == 1:
            store.put(slice(0, 1), torch.zeros_like(prompt_logp[:, :1]), length)
        out = Samples(tokens, mask)
        if store is not None:
            out.teacher_logprobs = store.result()
        return out


def sample(model, prompts: torch.Tensor, length: int, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, eos_id: Optional[int] = None, pad_id: int = 0,
           generator: Optional[torch.Generator] = None, return_logprobs: bool = False,
           logprobs_top_k: Optional[int] = None, logprobs_dtype: torch.dtype = torch.float32,
           decode: str = "eager") -> Samples:
    """One-off sampling; see :meth:`Sampler.sample`.

    Defaults to eager decoding, since compiling a decode step pays off only when it is reused: for repeated
    sampling on CUDA keep a :class:`Sampler` (as :class:`selfreplay.replay.SelfGeneratedReplay` does).
    """
    return Sampler(model, decode).sample(prompts, length, temperature, top_k, top_p, eos_id, pad_id, generator,
                                         return_logprobs, logprobs_top_k, logprobs_dtype)
