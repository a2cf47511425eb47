"""Low-rank adapters (LoRA, Hu et al. 2022) for the built-in GPT: the "LoRA r16" baseline of the method comparison.

Each targeted ``nn.Linear`` keeps its (frozen) ``weight`` under its usual name and gains two trainable
parameters, ``lora_A`` [r, in] and ``lora_B`` [out, r] (B starts at zero, so the adapted model starts equal to
the pretrained one), plus a forward hook adding ``dropout(x) @ Aᵀ @ Bᵀ · alpha / r`` to the layer's output.
:func:`merge_lora` folds ``B @ A · alpha / r`` into the weight and removes the adapters, so a finished run saves a
plain GPT checkpoint. Inside :func:`adapters_disabled` the hooks add nothing: the model is its frozen base, which
is the teacher of a LoRA finetune (no second copy of the weights), as with peft's ``disable_adapter()``. Inside
:func:`adapters_folded` (evaluation) each adapter is folded into its weight: one matmul per layer instead of three.

Why not peft: peft wraps each layer (``qkv.base_layer.weight``, ``qkv.lora_A.default.weight``), which renames the
base weights that the trainer's drift metrics, the teacher comparison and the resumable train_state address by
name. Adapters attached in place keep every base name, resume with the ordinary state dict (the adapter tensors
are extra keys), work under torch.compile, and need no optional dependency.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from selfreplay.errors import SelfReplayError

_HOOK_ATTR = "_lora_hook"
_BASE_ATTR = "_lora_base"  # the frozen weight, kept aside while the layer's weight holds the adapter folded in


def _lora_hook(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    if not module.lora_enabled:
        return output
    x = F.dropout(inputs[0], module.lora_dropout, module.training) if module.lora_dropout else inputs[0]
    update = F.linear(F.linear(x, module.lora_A.to(x.dtype)), module.lora_B.to(x.dtype))
    return output + update * module.lora_scale


def lora_target_names(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Qualified names of the Linear layers whose last name component is in ``targets`` (e.g. qkv, out, up)."""
    targets = list(targets)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    known = sorted({name.rsplit(".", 1)[-1] for name in linears})
    unknown = [t for t in targets if t not in known]
    if unknown or not targets:
        raise SelfReplayError(f"lora.targets={targets}: expected names of the model's Linear layers "
                              f"({', '.join(known)})")
    return [name for name in linears if name.rsplit(".", 1)[-1] in targets]


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0,
               targets: Iterable[str] = ("qkv", "out", "up", "down"), seed: int = 0) -> list[str]:
    """Freeze every parameter of ``model`` and attach rank-``r`` adapters to the targeted Linear layers (in place).

    Returns the adapted layer names. ``lora_A`` is drawn N(0, 1/in_features) from ``seed``; ``lora_B`` is zero.
    """
    if r <= 0:
        raise SelfReplayError(f"lora.r={r}: must be positive to apply adapters")
    if not 0.0 <= dropout < 1.0:
        raise SelfReplayError(f"lora.dropout={dropout}: expected a probability in [0, 1)")
    names = lora_target_names(model, targets)
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    for name in names:
        layer = modules[name]
        if hasattr(layer, _HOOK_ATTR):
            raise SelfReplayError(f"lora: layer {name} already has an adapter")
        w = layer.weight
        a = torch.randn(r, layer.in_features, generator=gen) / math.sqrt(layer.in_features)
        layer.lora_A = nn.Parameter(a.to(w.device, w.dtype))
        layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, r, device=w.device, dtype=w.dtype))
        layer.lora_scale = alpha / r
        layer.lora_dropout = dropout
        layer.lora_enabled = True
        setattr(layer, _HOOK_ATTR, layer.register_forward_hook(_lora_hook))
    return names


def has_lora(model: nn.Module) -> bool:
    return any(hasattr(m, _HOOK_ATTR) for m in model.modules())


def _delta(layer: nn.Linear) -> torch.Tensor:
    """The adapter's update of the layer's weight, ``B @ A · alpha / r``, made in fp32, in the weight's dtype."""
    return ((layer.lora_B.float() @ layer.lora_A.float()) * layer.lora_scale).to(layer.weight.dtype)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base model (adapters contribute nothing) inside the block, folded adapters included."""
    layers = [m for m in model.modules() if hasattr(m, _HOOK_ATTR)]
    before = [(layer.lora_enabled, layer.weight.data) for layer in layers]
    for layer in layers:
        layer.lora_enabled = False
        if hasattr(layer, _BASE_ATTR):
            layer.weight.data = getattr(layer, _BASE_ATTR)
    try:
        yield
    finally:
        for layer, (enabled, weight) in zip(layers, before):
            layer.lora_enabled, layer.weight.data = enabled, weight


@contextlib.contextmanager
def adapters_folded(model: nn.Module):
    """Inside the block (no gradients, dropout off: evaluation) each fp32 layer's adapter is folded into a new
    weight, ``W + B @ A · alpha / r``, the sum :func:`merged_parameters` gives; the frozen weight itself is set aside,
    untouched, and is the weight again after the block (and inside :func:`adapters_disabled`). Half-precision
    weights keep their hooks: rounded to 8 bits of mantissa, the small early updates would vanish."""
    layers = [m for m in model.modules() if hasattr(m, _HOOK_ATTR) and m.lora_enabled
              and not hasattr(m, _BASE_ATTR) and m.weight.dtype in (torch.float32, torch.float64)]
    with torch.no_grad():
        for layer in layers:
            setattr(layer, _BASE_ATTR, layer.weight.data)
            layer.weight.data = layer.weight.data + _delta(layer)
            layer.lora_enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.weight.data = getattr(layer, _BASE_ATTR)
            delattr(layer, _BASE_ATTR)
            layer.lora_enabled = True


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight and remove it (in place); the model becomes a plain one."""
    for layer in model.modules():
        hook = getattr(layer, _HOOK_ATTR, None)
        if hook is None:
            continue
        layer.weight.add_(_delta(layer))
        hook.remove()
        for attr in ("lora_A", "lora_B"):
            delattr(layer, attr)
        for attr in ("lora_scale", "lora_dropout", "lora_enabled", _HOOK_ATTR):
            delattr(layer, attr)
    return model


@torch.no_grad()
def merged_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's base parameters by their usual names, adapters folded in (the model is not changed)."""
    out = {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        owner, _, attr = name.rpartition(".")
        if attr in ("lora_A", "lora_B"):
            continue
        layer = modules[owner]
        if attr == "weight" and hasattr(layer, _HOOK_ATTR):
            p = getattr(layer, _BASE_ATTR, p) + _delta(layer)
        out[name] = p
    return out
