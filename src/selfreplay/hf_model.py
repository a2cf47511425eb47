"""Hugging Face causal LMs as student and teacher: loading, LoRA, the frozen teacher, hidden states, saving.

The losses work on the *final hidden states* (after the final norm) and the output head, so that logits can be
computed chunk by chunk (:func:`selfreplay.losses.chunked_next_token_loss`) instead of all [B, T, V] at once.
:class:`CausalLMBody` puts both behind one ``forward`` so that DDP and FSDP2 wrappers see every call.

The teacher is the model before finetuning: with LoRA, the very same weights with the adapters switched off
(no second copy); with full finetuning, a frozen deep copy, optionally in another dtype or on another device.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from selfreplay.errors import SelfReplayError

HF_EXTRA_HINT = "pip install 'selfreplay[hf]'"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def require_hf(*packages: str) -> None:
    """Raise a one-line SelfReplayError naming the extra to install when an optional package is missing."""
    for name in packages or ("transformers",):
        try:
            importlib.import_module(name)
        except ImportError:
            raise SelfReplayError(f"Hugging Face support needs extras ({name} is not installed): "
                                  f"{HF_EXTRA_HINT}") from None


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    """``auto``/None -> None (the checkpoint's own dtype), else a torch dtype from its name."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype if isinstance(dtype, torch.dtype) else None
    if dtype not in DTYPES:
        raise SelfReplayError(f"dtype={dtype!r}: expected auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


def load_causal_lm(name_or_path: str, dtype="auto", device="cpu", trust_remote_code: bool = False):
    """An ``AutoModelForCausalLM`` from a hub id or a local directory, on ``device``."""
    require_hf("transformers")
    from transformers import AutoModelForCausalLM

    import transformers

    torch_dtype = resolve_dtype(dtype) or "auto"
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kwarg = {"dtype": torch_dtype} if (major, minor) >= (4, 56) else {"torch_dtype": torch_dtype}
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                                     **dtype_kwarg)
    except (OSError, ValueError) as e:
        raise SelfReplayError(f"model_name_or_path={name_or_path}: cannot load a causal LM "
                              f"({str(e).strip().splitlines()[0]})") from None
    return model.to(device)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The model's tokenizer; pad token = EOS when it has none (padding is always masked out)."""
    require_hf("transformers")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise SelfReplayError(f"tokenizer {name_or_path}: cannot load ({str(e).strip().splitlines()[0]})") from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise SelfReplayError(f"tokenizer {name_or_path}: has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def add_lora(model, r: int = 16, alpha: float = 32, dropout: float = 0.0, target_modules="all-linear"):
    """Wrap ``model`` in a PEFT LoRA model: only the adapters train; the base weights stay frozen (the teacher)."""
    require_hf("peft")
    from peft import LoraConfig, get_peft_model

    if r <= 0:
        raise SelfReplayError(f"lora.r={r}: must be positive for LoRA (0 means full finetuning)")
    if isinstance(target_modules, str) and target_modules != "all-linear" and "," in target_modules:
        target_modules = [m.strip() for m in target_modules.split(",") if m.strip()]
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM", bias="none")
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question (is_gradient_checkpointing)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, config)
    except ValueError as e:
        raise SelfReplayError(f"lora.target_modules={target_modules!r}: {str(e).strip().splitlines()[0]}") from None


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant, so DDP and frozen bases work)."""
    hf = base_causal_lm(model)
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.x
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    hf.config.use_cache = False


# ------------------------------------------------------------------------------------------ wrappers


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper or torch.compile (FSDP2 shards in place, nothing to unwrap)."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def base_causal_lm(model: nn.Module):
    """The transformers ``PreTrainedModel`` inside any of our wrappers (PEFT's LoRA layers stay injected)."""
    model = unwrap_parallel(model)
    if isinstance(model, CausalLMBody):
        model = model.lm
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()
    return model


def peft_model_of(model: nn.Module):
    """The PEFT model inside the wrappers, or None for full finetuning."""
    model = unwrap_parallel(model)
    if isinstance(model, CausalLMBody):
        model = model.lm
    return model if hasattr(model, "peft_config") and hasattr(model, "disable_adapter") else None


class CausalLMBody(nn.Module):
    """A causal LM behind one ``forward``, so that DDP / FSDP2 hooks see every use of the weights:

    - ``forward(input_ids, attention_mask)`` -> final hidden states [B, T, D] (after the final norm);
    - ``forward(input_ids, attention_mask, head_fn=fn)`` -> ``fn(hidden, head)``: a loss computed from the hidden
      states and the output head *inside* the forward, where FSDP2 has the head's weights gathered (the chunked
      losses call the head once per chunk, and chunk counts differ between ranks, so the head must not be an FSDP
      unit of its own);
    - ``forward(input_ids, ..., full=True, **kw)`` -> the wrapped model's own output (logits, KV cache), for sampling.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids=None, attention_mask=None, full: bool = False, head_fn: Optional[Callable] = None,
                **kwargs):
        if full:
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hf = base_causal_lm(self.lm)
        hidden = hf.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return hidden if head_fn is None else head_fn(hidden, hf.get_output_embeddings())


def final_hidden_and_head(model: nn.Module, input_ids: torch.Tensor,
                          attention_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Callable]:
    """Last hidden states after the final norm [B, T, D] and the output head (a callable [N, D] -> [N, V]).

    Works for a plain transformers model, a PEFT model, a :class:`CausalLMBody` and a DDP wrapping of one. Under
    FSDP2 the head's weights are only gathered inside the forward: use :func:`forward_with_head` there.
    """
    hf = base_causal_lm(model)
    if isinstance(unwrap_parallel(model), CausalLMBody):
        hidden = model(input_ids, attention_mask)
    else:
        hidden = hf.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                  use_cache=False).last_hidden_state
    return hidden, hf.get_output_embeddings()


def forward_with_head(model: nn.Module, input_ids: torch.Tensor, head_fn: Callable,
                      attention_mask: Optional[torch.Tensor] = None):
    """``head_fn(hidden, head)`` for any model or wrapper, computed inside the forward of a :class:`CausalLMBody`
    (DDP / FSDP2 safe: the trainer computes its losses this way)."""
    if isinstance(unwrap_parallel(model), CausalLMBody):
        return model(input_ids, attention_mask, head_fn=head_fn)
    hidden, head = final_hidden_and_head(model, input_ids, attention_mask)
    return head_fn(hidden, head)


def lm_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask=None, **kwargs):
    """The full model output (``.logits``, ``.past_key_values``) through whichever wrapper ``model`` has."""
    if isinstance(unwrap_parallel(model), CausalLMBody):
        return model(input_ids, attention_mask, full=True, **kwargs)
    return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


# ------------------------------------------------------------------------------------------ the teacher


class Teacher:
    """The frozen reference model (the model before finetuning) that the KL penalty and self-replay use.

    For a PEFT model the teacher is the same module with its adapters disabled (``disable_adapter()``), so no
    second copy of the weights exists; its hidden states go through ``forward_module`` (the DDP/FSDP-wrapped
    student, when there is one) so sharded weights are gathered. Otherwise it is a frozen deep copy in eval mode.
    """

    def __init__(self, module: nn.Module, peft_model=None, forward_module: Optional[nn.Module] = None):
        self.module = module
        self.peft_model = peft_model
        self.forward_module = forward_module if forward_module is not None else module

    @classmethod
    def for_model(cls, model: nn.Module, dtype=None, device=None) -> "Teacher":
        """The teacher of ``model`` (call before wrapping for DDP/FSDP; see :meth:`use_forward_module`)."""
        peft = peft_model_of(model)
        if peft is not None:
            if dtype is not None or device is not None:
                raise SelfReplayError("teacher.dtype / teacher.device: with LoRA the teacher is the student's own "
                                      "base weights (adapters disabled); it cannot have another dtype or device")
            return cls(model, peft)
        teacher = copy.deepcopy(unwrap_parallel(model))
        torch_dtype = resolve_dtype(dtype)
        if torch_dtype is not None:
            teacher = teacher.to(torch_dtype)
        if device is not None:
            teacher = teacher.to(device)
        teacher.eval().requires_grad_(False)
        return cls(teacher)

    def use_forward_module(self, wrapped: nn.Module) -> None:
        """LoRA: run the teacher through the DDP/FSDP-wrapped student (same weights, adapters disabled)."""
        if self.peft_model is not None:
            self.forward_module = wrapped

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @contextlib.contextmanager
    def active(self):
        """Context in which ``generate_model`` / ``forward_module`` compute the teacher: adapters off, eval mode."""
        if self.peft_model is None:
            yield
            return
        was_training = self.peft_model.training
        self.peft_model.eval()
        try:
            with self.peft_model.disable_adapter():
                yield
        finally:
            self.peft_model.train(was_training)

    @property
    def generate_model(self) -> nn.Module:
        """The module to sample from; use it inside :meth:`active` (which disables LoRA adapters)."""
        return self.forward_module

    @torch.no_grad()
    def hidden_and_head(self, input_ids: torch.Tensor, attention_mask=None) -> tuple[torch.Tensor, Callable]:
        """Teacher hidden states [B, T, D] and head, without gradients; the head runs with adapters disabled too.

        With LoRA under FSDP2 the head's weights are gathered only inside the student's forward: call the head
        from a :func:`forward_with_head` function there (as the trainer does).
        """
        device = self.device
        with self.active():
            hidden, head = final_hidden_and_head(self.forward_module, input_ids.to(device),
                                                 None if attention_mask is None else attention_mask.to(device))
        if self.peft_model is None:
            return hidden, head

        def head_without_adapters(h: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), self.active():
                return head(h)

        return hidden, head_without_adapters

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """Full teacher log-probs [B, T, V] in float32 (for tests and small vocabularies)."""
        hidden, head = self.hidden_and_head(input_ids, attention_mask)
        B, T, D = hidden.shape
        return torch.log_softmax(head(hidden.reshape(B * T, D)).float(), dim=-1).view(B, T, -1)


# ------------------------------------------------------------------------------------------ saving


def merged_lora_state_dict(state: dict[str, torch.Tensor], peft_model) -> dict[str, torch.Tensor]:
    """A plain transformers state dict from a PEFT LoRA one: W + scale · B @ A per adapted layer, keys renamed.

    Works on a full (gathered, CPU) state dict, so FSDP-sharded models merge without a second model in memory.
    """
    adapter = peft_model.active_adapter
    config = peft_model.peft_config[adapter]
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


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU of a plain, PEFT, DDP or FSDP2 model; collective under FSDP."""
    from selfreplay.distributed import gather_full_state_dict

    inner = unwrap_parallel(model)
    state = gather_full_state_dict(inner)
    if isinstance(inner, CausalLMBody):
        state = {k[len("lm."):]: v for k, v in state.items()}
    return state


def save_hf_model(model: nn.Module, tokenizer, out_dir, merge_lora: bool = False,
                  state_dict: Optional[dict] = None) -> None:
    """Write ``model`` (and its tokenizer) with ``save_pretrained`` into ``out_dir``, atomically (temp dir + rename).

    Full finetuning, or LoRA with ``merge_lora=True``: a plain model that ``AutoModelForCausalLM.from_pretrained``
    loads. LoRA with ``merge_lora=False``: the adapter only (adapter_config.json + adapter_model.safetensors),
    which ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads onto its base model when peft is installed (or
    ``peft.AutoPeftModelForCausalLM``). Under FSDP pass ``state_dict=full_state_dict(model)`` (gathered on all
    ranks) and call this on rank 0 only.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else full_state_dict(model)
    peft = peft_model_of(model)
    hf = base_causal_lm(model)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        if peft is not None and not merge_lora:
            peft.save_pretrained(str(tmp), state_dict=state)  # peft keeps the adapter entries
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
        old = out_dir.with_name(f".{out_dir.name}.old")
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _plain_skeleton(hf_model):
    """A weightless (meta-device) copy of the architecture, whose ``save_pretrained`` writes a given state dict."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(hf_model.config))
