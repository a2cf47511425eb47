"""Hugging Face causal LMs behind the model interface: loading, the adapter, LoRA (peft) and saving.

Any ``AutoModelForCausalLM`` works: the adapter reads the final hidden states from ``get_decoder()`` (after the
final norm) and the head from ``get_output_embeddings()``, and decodes with the model's own KV cache, keeping only
the last position's logits (``logits_to_keep=1``: no [rows, prompt, vocab] tensor at prefill). With LoRA the
network is a peft model; its teacher is the same weights with ``disable_adapter()``.

transformers, peft and datasets are an extra (``pip install 'selfreplay[hf]'``), imported only here and only when
used.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import warnings
from typing import Optional

import torch
from torch import nn

from selfreplay.errors import SelfReplayError
from selfreplay.models.core import CausalLM

HF_EXTRA_HINT = "pip install 'selfreplay[hf]'"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def require_hf(*packages: str) -> None:
    """A one-line SelfReplayError naming the extra to install when an optional package is missing."""
    for name in packages or ("transformers",):
        try:
            importlib.import_module(name)
        except ImportError:
            raise SelfReplayError(f"Hugging Face support needs extras ({name} is not installed): "
                                  f"{HF_EXTRA_HINT}") from None


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    """``auto`` / None -> None (the checkpoint's own dtype), else a torch dtype from its name."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype if isinstance(dtype, torch.dtype) else None
    if dtype not in DTYPES:
        raise SelfReplayError(f"dtype={dtype!r}: expected auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def load_hf(name_or_path: str, dtype="auto", device="cpu", revision: Optional[str] = None,
            trust_remote_code: bool = False) -> CausalLM:
    """An ``AutoModelForCausalLM`` from a hub id or a local directory, on ``device``, as a CausalLM."""
    require_hf("transformers")
    from transformers import AutoModelForCausalLM

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" frames would flood logs and error output
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            net = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=resolve_dtype(dtype) or "auto",
                                                       revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SelfReplayError(f"model {name_or_path}: cannot load a causal LM "
                              f"({str(e).strip().splitlines()[0]})") from None
    for name, p in net.state_dict().items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise SelfReplayError(f"model {name_or_path}: weight {name} holds NaN or infinite values")
    return CausalLM(net.to(device), HF_ADAPTER, {"model_name_or_path": str(name_or_path), "revision": revision})


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: Optional[str] = None):
    """The model's tokenizer; pad token = EOS when it has none (padding is always masked out)."""
    require_hf("transformers")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise SelfReplayError(f"tokenizer {name_or_path}: cannot load ({str(e).strip().splitlines()[0]})") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise SelfReplayError(f"tokenizer {name_or_path}: has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def add_lora(model: CausalLM, r: int, alpha: float, dropout: float, targets, seed: int = 0) -> None:
    """Wrap the network in a peft LoRA model (in place): only the adapters train, the base is the teacher."""
    require_hf("peft")
    from peft import LoraConfig, get_peft_model

    if r <= 0:
        raise SelfReplayError(f"lora.r={r}: must be positive to apply adapters")
    if isinstance(targets, str) and targets != "all-linear" and "," in targets:
        targets = [m.strip() for m in targets.split(",") if m.strip()]
    elif isinstance(targets, (list, tuple)) and list(targets) == ["all-linear"]:
        targets = "all-linear"
    elif not isinstance(targets, str):
        targets = list(targets)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        task_type="CAUSAL_LM", bias="none")
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers a deprecated question
            torch.manual_seed(seed)  # the adapters' init
            model.net = get_peft_model(model.net, config)
    except ValueError as e:
        raise SelfReplayError(f"lora.targets={targets!r}: {str(e).strip().splitlines()[0]}") from None


def base_model(net: nn.Module):
    """The transformers ``PreTrainedModel`` of a network (inside a peft model: its base, LoRA layers injected)."""
    if hasattr(net, "get_base_model") and hasattr(net, "peft_config"):
        return net.get_base_model()
    return net


def peft_model(net: nn.Module):
    return net if hasattr(net, "peft_config") and hasattr(net, "disable_adapter") else None


def enable_gradient_checkpointing(net: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant, so DDP and frozen bases work)."""
    hf = base_model(net)
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    hf.config.use_cache = False


class _HFDecoder:
    """Decoding with the model's own KV cache through ``module`` (a CausalLM, possibly DDP / FSDP-wrapped)."""

    def __init__(self, module: nn.Module, cache_arg: str, keep_arg: bool):
        self.module, self.cache_arg, self.keep_arg = module, cache_arg, keep_arg
        self.cache = None

    def _call(self, tokens: torch.Tensor) -> torch.Tensor:
        kwargs = {"use_cache": True}
        if self.cache is not None:
            kwargs[self.cache_arg] = self.cache
        if self.keep_arg:
            kwargs["logits_to_keep"] = 1
        out = self.module(tokens, decode=kwargs)
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else getattr(out, "past_key_values", None)
        return out.logits[:, -1]

    def prefill(self, prompts: torch.Tensor) -> torch.Tensor:
        self.cache = None
        return self._call(prompts)

    def step(self, token: torch.Tensor, pos: int) -> torch.Tensor:
        return self._call(token[:, None])


class HFAdapter:
    """:class:`~selfreplay.models.core.Adapter` of transformers causal LMs (plain or peft)."""

    kind = "hf"

    def hidden(self, net, tokens, attention_mask=None, position_ids=None) -> torch.Tensor:
        decoder = base_model(net).get_decoder()
        return decoder(input_ids=tokens, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state

    def head(self, net) -> nn.Module:
        return base_model(net).get_output_embeddings()

    def cached_forward(self, net, tokens, **kwargs):
        return net(input_ids=tokens, **kwargs)

    def decode_modes(self, net, device) -> tuple[str, ...]:
        return ("eager",)

    def decoder(self, module: nn.Module, net, batch_size: int, length: int, mode: str):
        params = inspect.signature(base_model(net).forward).parameters
        cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
        return _HFDecoder(module, cache_arg, "logits_to_keep" in params)

    def vocab_size(self, net) -> int:
        return int(self.head(net).weight.shape[0])

    def context(self, net) -> Optional[int]:
        return getattr(base_model(net).config, "max_position_embeddings", None)

    def blocks(self, net) -> list[nn.Module]:
        decoder = base_model(net).get_decoder()
        layers = getattr(decoder, "layers", None) or getattr(decoder, "h", None) or getattr(decoder, "blocks", None)
        if layers is None:
            raise SelfReplayError(f"distributed.strategy=fsdp: cannot find the decoder layers of "
                                  f"{type(base_model(net)).__name__} (expected .layers, .h or .blocks)")
        return list(layers)

    add_lora = staticmethod(add_lora)
    enable_gradient_checkpointing = staticmethod(enable_gradient_checkpointing)

    def adapters_disabled(self, net):
        peft = peft_model(net)
        return peft.disable_adapter() if peft is not None else contextlib.nullcontext()

    def adapters_folded(self, net):
        """peft's own merge_adapter / unmerge_adapter subtract the update again (not bit-exact): hooks stay."""
        return contextlib.nullcontext()

    def has_lora(self, net) -> bool:
        return peft_model(net) is not None


HF_ADAPTER = HFAdapter()


# ------------------------------------------------------------------------------------------------ saving

def merged_lora_state_dict(state: dict[str, torch.Tensor], peft) -> dict[str, torch.Tensor]:
    """A plain transformers state dict from a peft LoRA one: W + scale · B @ A per adapted layer, keys renamed.

    Works on a full (gathered, CPU) state dict, so FSDP-sharded models merge without a second model in memory.
    """
    adapter = peft.active_adapter
    config = peft.peft_config[adapter]
    root = config.r ** 0.5 if getattr(config, "use_rslora", False) else config.r
    scale = config.lora_alpha / root
    prefix = "base_model.model."
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        name = key[len(prefix):] if key.startswith(prefix) else key
        if ".base_layer." in name:
            stem = key[: key.index(".base_layer.")]
            name = name.replace(".base_layer.", ".")
            a, b = state.get(f"{stem}.lora_A.{adapter}.weight"), state.get(f"{stem}.lora_B.{adapter}.weight")
            if a is not None and b is not None and key.endswith("weight"):
                value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
        out[name] = value
    return out


def save_hf(net: nn.Module, tokenizer, out_dir, merge_lora: bool, state: dict[str, torch.Tensor]) -> None:
    """Write the network (and its tokenizer) with ``save_pretrained`` into ``out_dir``, atomically.

    ``state`` is the network's full state dict (gathered under FSDP). Full finetuning, or LoRA with
    ``merge_lora``: a plain model that ``AutoModelForCausalLM.from_pretrained`` loads. LoRA otherwise: the adapter
    only (adapter_config.json + adapter_model.safetensors), loaded onto its base by peft.
    """
    from selfreplay.train.files import atomic_dir

    peft = peft_model(net)
    hf = base_model(net)
    with atomic_dir(out_dir) as tmp:
        if peft is not None and not merge_lora:
            peft.save_pretrained(str(tmp), state_dict=state)
        else:
            plain = merged_lora_state_dict(state, peft) if peft is not None else state
            config = copy.deepcopy(hf.config)
            config.use_cache = True
            skeleton = _plain_skeleton(hf) if peft is not None else hf
            skeleton.save_pretrained(str(tmp), state_dict=plain)
            config.save_pretrained(str(tmp))
            if getattr(hf, "generation_config", None) is not None:
                hf.generation_config.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


def _plain_skeleton(hf_model):
    """A weightless (meta-device) copy of the architecture, whose ``save_pretrained`` writes a given state dict."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(hf_model.config))
