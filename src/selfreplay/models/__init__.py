"""Models behind one interface: the built-in GPT and any Hugging Face causal LM (see :mod:`.core`).

:func:`load_model` opens what a user names as a model: a built-in run directory, a Hugging Face directory (or a
run directory holding one in ``model/``), or a hub id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from selfreplay.errors import SelfReplayError
from selfreplay.models.core import CausalLM, Teacher, causal_lm, unwrap

__all__ = ["CausalLM", "Teacher", "causal_lm", "unwrap", "load_model", "model_kind", "hf_path"]


def hf_path(name_or_path: str) -> str:
    """A selfreplay run directory that saved a Hugging Face model keeps it in ``model/``."""
    p = Path(name_or_path)
    return str(p / "model") if (p / "model" / "config.json").is_file() and not (p / "config.json").is_file() \
        else str(name_or_path)


def model_kind(name_or_path: str) -> str:
    """``gpt`` for a built-in run directory, ``hf`` for anything else (a Hugging Face directory or hub id)."""
    from selfreplay.models.builtin import is_gpt_run

    if is_gpt_run(name_or_path):
        return "gpt"
    from selfreplay.data.text import looks_local

    p = Path(name_or_path)
    if not p.exists() and looks_local(name_or_path):
        raise SelfReplayError(f"model {name_or_path}: not found (no such directory; a hub id is 'name' or "
                              f"'owner/name')")
    if p.is_dir() and not (p / "config.json").is_file() and not (p / "model" / "config.json").is_file():
        raise SelfReplayError(f"model {name_or_path}: a directory that is neither a finished selfreplay run "
                              f"(model.safetensors + run.json) nor a Hugging Face model (config.json)")
    return "hf"


def load_model(name_or_path: str, device="cpu", dtype="auto", revision: Optional[str] = None,
               trust_remote_code: bool = False) -> CausalLM:
    """The model a user names, either kind (``dtype`` / ``revision`` apply to Hugging Face models)."""
    if model_kind(name_or_path) == "gpt":
        from selfreplay.models.builtin import load_gpt_run

        return load_gpt_run(name_or_path, device)
    from selfreplay.models.hf import load_hf

    return load_hf(hf_path(name_or_path), dtype, device, revision, trust_remote_code)


def saved_param_count(name_or_path: str) -> Optional[int]:
    """Parameters in a local model's safetensors files (read from their headers, no weights loaded); None for a
    hub id or a model saved otherwise."""
    import math

    from safetensors import safe_open

    files = sorted(Path(hf_path(name_or_path)).glob("*.safetensors")) if Path(name_or_path).is_dir() else []
    total = 0
    try:
        for file in files:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    shape = f.get_slice(key).get_shape()
                    total += math.prod(shape)
    except Exception:  # noqa: BLE001 (a damaged file is reported when the model is loaded, not here)
        return None
    return total or None


def merged_state(net, state: dict) -> dict:
    """A built-in GPT's full state dict with its LoRA adapters folded into the weights (see models.lora)."""
    import torch

    for name, layer in net.named_modules():
        if hasattr(layer, "lora_scale"):
            a, b = state.pop(f"{name}.lora_A"), state.pop(f"{name}.lora_B")
            w = state[f"{name}.weight"]
            state[f"{name}.weight"] = w + ((b.float() @ a.float()) * layer.lora_scale).to(w.dtype)
    return {k: v.detach().contiguous().cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def save_model(model, module, run_dir: Path, tokenizer, merge_lora: bool, info: dict,
               keep_training: bool = False) -> None:
    """The final weights: ``model.safetensors`` (built-in GPT) or ``model/`` (save_pretrained), rank 0 writing.
    ``keep_training``: a copy in the middle of a run (a best checkpoint), so built-in LoRA is merged into a copy."""
    from selfreplay.train import distributed as dist

    if model.kind == "gpt":
        from selfreplay.models.builtin import WEIGHTS, save_gpt_weights
        from selfreplay.models.lora import has_lora, merge_lora as merge

        if has_lora(model.net):
            info.setdefault("lora", {})["merged"] = True
        if dist.is_fsdp(module) or keep_training:  # gather the shards on every rank, then fold the adapters into a plain GPT
            state = {k[len("net."):]: v for k, v in dist.gather_full_state_dict(module).items()}
            if dist.is_main():
                save_gpt_weights(model.net, run_dir / WEIGHTS, merged_state(model.net, state))
            return
        merge(model.net)
        if dist.is_main():
            save_gpt_weights(model.net, run_dir / WEIGHTS)
        return
    from selfreplay.models.hf import save_hf

    state = dist.gather_full_state_dict(module)
    state = {k[len("net."):] if k.startswith("net.") else k: v for k, v in state.items()}
    if dist.is_main():
        save_hf(model.net, tokenizer, run_dir / "model", merge_lora, state)
