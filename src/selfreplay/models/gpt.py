"""The paper's decoder-only GPT in one file.

Pre-norm blocks with RMSNorm without gain (eps 1e-6), RMSNorm on queries and keys, rotary position
embeddings (base 10000), a GELU MLP of width 4D, untied input/output embeddings and no biases.
Init N(0, 1/D) everywhere except the MLP down-projection, N(0, 1/(4D)).

``hidden(tokens)`` gives the final (normed) hidden states and ``head`` the output layer, so that losses can
be computed from them chunk by chunk; ``model(tokens)`` is ``head(hidden(tokens))``. Incremental decoding
uses ``new_kv_cache`` and ``model(tokens, cache=...)`` (see :class:`KVCache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from selfreplay.errors import SelfReplayError

NORM_EPS = 1e-6
SHAPE_KEYS = ("d_model", "n_layers", "head_dim", "context", "vocab_size")


@dataclass
class GPTConfig:
    """The architecture (heads = d_model / head_dim); the defaults are the paper's 6M model."""

    d_model: int = 256
    n_layers: int = 6
    head_dim: int = 64
    context: int = 256
    vocab_size: int = 4096

    @classmethod
    def of(cls, cfg) -> "GPTConfig":
        """The shape fields of any object or dict that has them (e.g. the run config's ``model`` section)."""
        get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
        values = {k: get(k) for k in SHAPE_KEYS}
        bad = [k for k, v in values.items() if not isinstance(v, int) or isinstance(v, bool)]
        if bad:
            raise SelfReplayError(f"model.{bad[0]}={values[bad[0]]!r}: expected an integer")
        return cls(**values)


def gpt_forward_flops(shape: GPTConfig, rows: int, seq_len: int, head_positions: Optional[int] = None) -> float:
    """FLOPs of the built-in GPT's forward over ``rows`` sequences of ``seq_len`` tokens: 2 per matmul weight per
    token in the blocks (qkv, out, up, down: 12·D² a layer), 2·D·V per position the head scores (``head_positions``
    a row, default all), and attention's QKᵀ and AV over the whole T×T square as the math kernel computes them
    (2·2·L·T²·D a row; a causal flash kernel skips about half). A backward costs twice a forward."""
    D, L, T = shape.d_model, shape.n_layers, seq_len
    head = T if head_positions is None else head_positions
    return rows * (2 * 12 * L * D * D * T + 2 * D * shape.vocab_size * head + 2 * 2 * L * T * T * D)


def gpt_step_flops(shape: GPTConfig, batch: int, seq_len: int, replay_rows: int = 0, teacher_rows: int = 0,
                   sampled_rows: int = 0) -> float:
    """Model FLOPs of one training step: the student's forward and backward (3x) over the data rows and
    ``replay_rows`` replay rows (the losses score T-1 positions a row), the teacher's forward over ``teacher_rows``
    (all T positions: its logits), and the forward of sampling ``sampled_rows`` rows (the step's share of
    self-generated replay; counted as one forward of the rows)."""
    student = gpt_forward_flops(shape, batch + replay_rows, seq_len, seq_len - 1)
    return 3 * student + gpt_forward_flops(shape, teacher_rows + sampled_rows, seq_len)


ROPE_BASE = 10_000.0


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without a learnable gain."""
    if _own_backward(x):
        return _RMSNormNoGain.apply(x)
    return F.rms_norm(x, (x.shape[-1],), eps=NORM_EPS)


def _own_backward(x: torch.Tensor) -> bool:
    """Training on a CPU in float32: where the norms' hand-written backward nodes replace autograd's pieces."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.requires_grad


_FUSED_RMS_NORM = hasattr(torch.ops.aten, "_fused_rms_norm")  # torch >= 2.8: the kernel F.rms_norm calls, with r


def _normed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x·r and r = 1 / sqrt(mean(x²) + eps) over the last dim, by F.rms_norm's own kernel where it exists."""
    if _FUSED_RMS_NORM:
        return torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], None, NORM_EPS)
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + NORM_EPS)
    return x * r, r


def _normed_grad(grad: torch.Tensor, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The gradient through y = x·r: r·(g − y·mean(g·y))."""
    return (grad - y * (grad * y).mean(-1, keepdim=True)) * r


class _RMSNormNoGain(torch.autograd.Function):
    """RMSNorm with a backward in one expression (:func:`_normed_grad`). On a CPU, autograd would otherwise
    differentiate F.rms_norm through its decomposition (pow, mean, rsqrt, mul: about 1.5× the time and a saved
    tensor per piece). The forward is F.rms_norm's own kernel, so the values are the same bits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y, r = _normed(x)
        ctx.save_for_backward(y, r)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _normed_grad(grad, *ctx.saved_tensors)


def rope_tables(context: int, head_dim: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [context, head_dim / 2]."""
    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(context, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last dim; x is [B, heads, T, head_dim], cos/sin [T, head_dim/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.type_as(x)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (x2, x1) over the last dim: RoPE's pairs, with the signs kept in the sin table."""
    h = x.shape[-1] // 2
    return torch.cat((x[..., h:], x[..., :h]), dim=-1)


class _QKNormRope(torch.autograd.Function):
    """Per-head RMSNorm and RoPE of the queries and keys, and the values passed on, as one autograd node (CPU,
    float32, training). The values are those of rms_norm then apply_rope, bit for bit (the same kernel and
    products: y1·cos + y2·(−sin) is y1·cos − y2·sin). Its backward writes the gradient of the whole projection
    once, in the layout the projection's backward reads; autograd through the pieces took ~20 passes over the
    queries and keys (zero-filled slices, their sum, a copy to that layout) at 14 tokens a row, ~17% of a demo step."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        # qkv: [3, B, heads, T, head_dim], a permuted view of the projection's [B, T, 3, heads, head_dim] output
        y, r = _normed(qkv[:2])
        cos2, sin2 = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
        ctx.save_for_backward(y, r, cos2, sin2)
        return y * cos2 + _swap_halves(y) * sin2, qkv[2].contiguous()

    @staticmethod
    def backward(ctx, grad_qk: Optional[torch.Tensor], grad_v: Optional[torch.Tensor]):
        y, r, cos2, sin2 = ctx.saved_tensors
        _, B, H, T, hd = y.shape
        grad = y.new_empty(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
        if grad_qk is None:
            grad[:2] = 0
        else:
            grad_y = grad_qk * cos2 + _swap_halves(grad_qk * sin2)  # the rotation's transpose
            grad[:2] = _normed_grad(grad_y, y, r)
        grad[2] = 0 if grad_v is None else grad_v
        return grad, None, None


def norm_rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Queries and keys normed per head and rotated, and the values, from qkv [3, B, heads, T, head_dim]."""
    if _own_backward(qkv):
        qk, v = _QKNormRope.apply(qkv, cos, sin)
        q, k = qk.unbind(0)  # one stack in backward (indexing would zero-fill and add a copy per tensor)
        return q, k, v
    q, k = apply_rope(rms_norm(qkv[:2]), cos, sin)  # queries and keys in one go (half the small ops)
    return q, k, qkv[2]


@dataclass
class KVCache:
    """Static per-layer key/value buffers for incremental decoding.

    Buffers have the full context length so shapes never change (friendly to torch.compile and CUDA graphs).
    ``pos`` is the number of tokens already written: a Python int, or a long tensor of shape [1] when a
    compiled decode step must see the same graph at every position. Slots past ``pos`` are never read with an int
    position (attention reads the written slots only: half the cache traffic of a whole sample), masked with a
    tensor one.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    pos: Union[int, torch.Tensor] = 0

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def reset(self) -> None:
        self.pos = 0


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.d_model // cfg.head_dim
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Optional[KVCache] = None,
                layer: int = 0, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = norm_rope_qkv(qkv, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif isinstance(cache.pos, int):  # eager decoding: write the chunk, attend to the written slots only
            start, end = cache.pos, cache.pos + T
            keys, values = cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end]
            keys[:, :, start:].copy_(k)
            values[:, :, start:].copy_(v)
            mask = None if T == 1 else torch.arange(end, device=x.device)[None, :] <= positions[:, None]
            y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask)
        else:  # a tensor position (one graph for every step): write there; query i sees cache slots <= positions[i]
            keys, values = cache.keys[layer], cache.values[layer]
            keys.index_copy_(2, positions, k.to(keys.dtype))
            values.index_copy_(2, positions, v.to(values.dtype))
            mask = torch.arange(cache.max_len, device=x.device)[None, :] <= positions[:, None]
            y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.down = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0, positions=None):
        x = x + self.attn(rms_norm(x), cos, sin, cache, layer, positions)
        return x + self.mlp(rms_norm(x))


MAX_LAYERS = 1024  # the deepest language models have ~100-200 blocks; a million takes hours to build one by one


def check_model_config(cfg: GPTConfig) -> None:
    for name in ("d_model", "n_layers", "head_dim", "context", "vocab_size"):
        if getattr(cfg, name) <= 0:
            raise SelfReplayError(f"model.{name}={getattr(cfg, name)}: must be positive")
    if cfg.n_layers > MAX_LAYERS:
        raise SelfReplayError(f"model.n_layers={cfg.n_layers}: at most {MAX_LAYERS} (the deepest language models "
                              f"have ~100-200 blocks)")
    if cfg.d_model % cfg.head_dim:
        raise SelfReplayError(f"model.d_model={cfg.d_model} is not a multiple of model.head_dim={cfg.head_dim}")
    if cfg.head_dim % 2:
        raise SelfReplayError(f"model.head_dim={cfg.head_dim}: rotary embeddings need an even head dimension")


class GPT(nn.Module):
    """Decoder-only transformer returning next-token logits."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        check_model_config(cfg)
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.context, cfg.head_dim)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.checkpointing = False  # gradient (activation) checkpointing of the blocks
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 1.0 / math.sqrt(self.config.d_model)
        for name, p in self.named_parameters():
            nn.init.normal_(p, std=std / 2 if name.endswith("mlp.down.weight") else std)  # 1/(4D) variance

    def forward(self, tokens: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Logits [B, T, V] for tokens [B, T]; with a cache, tokens continue the cached prefix."""
        return self.head(self.hidden(tokens, cache))

    def hidden(self, tokens: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Final hidden states [B, T, D], after the last norm (the output layer's input)."""
        T = tokens.shape[1]
        positions = None
        if cache is None:
            if T > self.config.context:
                raise SelfReplayError(f"sequence of {T} tokens exceeds the model context {self.config.context}")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            if isinstance(cache.pos, int) and cache.pos + T > self.config.context:
                raise SelfReplayError(f"sequence of {cache.pos + T} tokens exceeds the model context "
                                      f"{self.config.context}")
            positions = cache.pos + torch.arange(T, device=tokens.device)
            if isinstance(cache.pos, int):
                cos, sin = self.rope_cos[cache.pos:cache.pos + T], self.rope_sin[cache.pos:cache.pos + T]
            else:
                cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.embed(tokens)
        recompute = self.checkpointing and cache is None and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:  # keep only each block's input; recompute its activations in backward
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, i, positions)
        if cache is not None:
            cache.pos = cache.pos + T
        return rms_norm(x)

    def new_kv_cache(self, batch_size: int, dtype: Optional[torch.dtype] = None) -> KVCache:
        """Empty cache for ``batch_size`` sequences of up to ``context`` tokens."""
        cfg = self.config
        shape = (batch_size, cfg.d_model // cfg.head_dim, cfg.context, cfg.head_dim)
        device, dtype = self.head.weight.device, dtype or self.head.weight.dtype
        return KVCache([torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
                       [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)])

    def num_params(self) -> dict[str, int]:
        """Parameter counts: ``paper`` = 12·L·D² + D·V as the paper counts, ``actual`` = every weight."""
        return {"paper": paper_param_count(self.config), "actual": sum(p.numel() for p in self.parameters())}


def paper_param_count(cfg: GPTConfig) -> int:
    """The paper's parameter count 12·L·D² + D·V (one embedding; the tokens-per-parameter convention)."""
    return 12 * cfg.n_layers * cfg.d_model ** 2 + cfg.d_model * cfg.vocab_size
