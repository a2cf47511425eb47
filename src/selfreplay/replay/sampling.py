"""Batched autoregressive sampling from a (frozen) model with a KV cache, for either model kind.

While sampling, the model's next-token logits at every position are the exact KL targets for the sampled sequence,
so the sampler can keep them (in the dtype they were computed in: lossless) and spare the trainer a second teacher
pass. Only the last prompt position's logits are computed at prefill: earlier prompt positions predict prompt
tokens, which are never targets.

Decoding modes (``decode``): ``eager`` (the network's own cached forward), and for the built-in GPT ``static``
(one traced graph for every position) and ``compiled`` (``static`` under torch.compile: a CUDA graph on CUDA);
``auto`` is ``compiled`` for a GPT on CUDA, ``eager`` otherwise. Each sampled position takes one float64 uniform
per row from the generator (:func:`choose_tokens`), so samples are deterministic given the generator's seed, the
device and the decoding mode.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from selfreplay.errors import SelfReplayError
from selfreplay.models.core import causal_lm
from selfreplay.replay.losses import TeacherTargets, TopKTargets

DECODE_MODES = ("auto", "eager", "static", "compiled")
EOS_CHECK_EVERY = 16  # with stop-at-EOS, check every this many steps whether all rows ended (one host sync)


@dataclass
class Samples:
    """Sampled rows: ``tokens`` [B, L] (prompt included), ``loss_mask`` (None: every token after the prompt's first
    counts) and the kept ``teacher_targets`` (position t: logits of token t+1; prompt positions and the last: 0)."""

    tokens: torch.Tensor
    loss_mask: Optional[torch.Tensor] = None
    teacher_targets: Optional[TeacherTargets] = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def rows(self, start: int, stop: int) -> "Samples":
        t = self.teacher_targets
        return Samples(self.tokens[start:stop], None if self.loss_mask is None else self.loss_mask[start:stop],
                       None if t is None else t[start:stop])


def derive_seed(seed: int, index: int) -> int:
    """A 63-bit seed for stream ``index`` of base ``seed`` (hashing keeps nearby seeds' streams apart)."""
    digest = hashlib.blake2b(f"selfreplay:{int(seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


def make_generator(seed: int, index: int, device) -> torch.Generator:
    return torch.Generator(device=torch.device(device)).manual_seed(derive_seed(seed, index))


def check_sampling_args(temperature: float, top_k: Optional[int], top_p: Optional[float],
                        logprobs_top_k: Optional[int] = None) -> None:
    """One-line errors for out-of-range sampling settings (NaN and infinity included)."""
    if temperature is None or not 0 <= temperature < math.inf:
        raise SelfReplayError(f"temperature={temperature}: expected a finite number >= 0 (0 = greedy)")
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
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def sample_rows(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One category per row of ``weights`` [B, V] (non-negative, any scale) by inverting its cumulative sum (float64)
    at ``uniforms`` [B] in [0, 1): the token i with cdf[i-1] <= u·total < cdf[i], so never a zero-weight one."""
    cdf = weights.double().cumsum(-1)
    total = cdf[:, -1:]
    point = torch.minimum(uniforms.double()[:, None] * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, point, right=True).squeeze(-1).clamp_(max=weights.shape[-1] - 1)  # NaN: in range


def choose_tokens(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
                  generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: greedy at temperature 0, else a categorical draw from the float32 softmax
    with one float64 uniform of ``generator`` per row (inverse CDF: torch.multinomial would draw V exponentials a
    row, a tenth of a CPU decode step at a 4k vocabulary)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits if temperature == 1 else logits / temperature
    probs = F.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
    uniforms = torch.rand(probs.shape[0], generator=generator, dtype=torch.float64, device=probs.device)
    return sample_rows(probs, uniforms)


class _TargetStore:
    """Preallocated per-position teacher targets (logits or top-k log-probs), filled one position at a time."""

    def __init__(self, rows: int, length: int, top_k: Optional[int], dtype: Optional[torch.dtype]):
        self.rows, self.length, self.top_k, self.dtype = rows, length, top_k, dtype
        self.full = self.values = self.indices = None

    def put(self, t: int, logits: torch.Tensor) -> None:
        """Targets of position ``t`` from its logits [B, V]."""
        V = logits.shape[-1]
        if self.top_k is None:
            if self.full is None:
                self.full = torch.zeros(self.rows, self.length, V, dtype=self.dtype or logits.dtype,
                                        device=logits.device)
            self.full[:, t] = logits
            return
        k = min(self.top_k, V)
        if self.values is None:
            self.values = torch.zeros(self.rows, self.length, k, dtype=self.dtype or torch.float32,
                                      device=logits.device)
            self.indices = torch.zeros(self.rows, self.length, k, dtype=torch.long, device=logits.device)
        values, indices = F.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
        self.values[:, t] = values
        self.indices[:, t] = indices

    def result(self) -> Optional[TeacherTargets]:
        if self.top_k is None:
            return self.full
        return None if self.values is None else TopKTargets(self.values, self.indices)


class Sampler:
    """Samples continuations from one model (a CausalLM, or its DDP / FSDP wrapping: ``module``).

    Reuse one Sampler for repeated sampling: static and compiled decode steps are kept per batch size.
    """

    def __init__(self, module: nn.Module, decode: str = "auto"):
        if decode not in DECODE_MODES:
            raise SelfReplayError(f"decode={decode!r}: expected one of {', '.join(DECODE_MODES)}")
        self.module, self.decode = module, decode
        self.model = causal_lm(module)

    def mode(self, device) -> str:
        """The decoding mode used on ``device`` ('auto' resolved)."""
        device = torch.device(device)
        modes = self.model.adapter.decode_modes(self.model.net, device)
        wrapped = self.module is not self.model  # a sharded / replicated wrapper: go through it
        if self.decode == "auto":
            return "compiled" if device.type == "cuda" and "compiled" in modes and not wrapped else "eager"
        if self.decode not in modes or (wrapped and self.decode != "eager"):
            raise SelfReplayError(f"decode={self.decode!r} is not available for this model; use decode='eager'")
        return self.decode

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, length: int, temperature: float = 1.0, top_k: Optional[int] = None,
               top_p: Optional[float] = None, eos_id: Optional[int] = None, pad_id: int = 0,
               generator: Optional[torch.Generator] = None, keep_targets: bool = False,
               targets_top_k: Optional[int] = None, targets_dtype: Optional[torch.dtype] = None,
               on_token: Optional[Callable[[], None]] = None) -> Samples:
        """Extend ``prompts`` [B, P] to ``length`` tokens.

        Temperature 0 is greedy. With ``eos_id`` a row stops at its first sampled EOS and the rest is ``pad_id``
        with loss_mask 0; otherwise EOS is an ordinary token (the paper's full-length samples). Kept targets are
        the model's own (temperature-1, unfiltered) logits, or with ``targets_top_k`` its k largest log-probs.
        ``on_token`` is called after each sampled position (a progress display).
        """
        if prompts.ndim != 2:
            raise SelfReplayError(f"prompts must be [batch, prompt_length], got shape {tuple(prompts.shape)}")
        B, P = prompts.shape
        if not 0 < P < length:
            raise SelfReplayError(f"sample length {length} must exceed the prompt length {P}")
        context = self.model.context
        if self.model.kind == "gpt" and length > context:
            raise SelfReplayError(f"sample length {length} exceeds the model context {context}")
        check_sampling_args(temperature, top_k, top_p, targets_top_k)
        device = prompts.device
        decoder = self.model.adapter.decoder(self.module, self.model.net, B, length, self.mode(device))
        tokens = torch.full((B, length), pad_id, dtype=torch.long, device=device)
        tokens[:, :P] = prompts
        stop = eos_id is not None
        alive = torch.ones(B, dtype=torch.bool, device=device)
        mask = torch.ones(B, length, device=device) if stop or P > 1 else None
        if mask is not None:
            mask[:, :P] = 0.0
        store = _TargetStore(B, length, targets_top_k, targets_dtype) if keep_targets else None

        logits = decoder.prefill(prompts)
        for t in range(P, length):
            if store is not None:
                store.put(t - 1, logits)  # position t-1 predicts token t
            nxt = choose_tokens(logits, temperature, top_k, top_p, generator)
            if stop:
                nxt = torch.where(alive, nxt, torch.full_like(nxt, pad_id))
                mask[:, t] = alive.float()
                alive = alive & (nxt != eos_id)
            tokens[:, t] = nxt
            if on_token is not None:
                on_token()
            if t + 1 == length:
                break
            if stop and (t - P) % EOS_CHECK_EVERY == EOS_CHECK_EVERY - 1 and not bool(alive.any()):
                mask[:, t + 1:] = 0.0  # every row ended: the rest stays padding
                break
            logits = decoder.step(nxt, t)
        return Samples(tokens, mask, None if store is None else store.result())
