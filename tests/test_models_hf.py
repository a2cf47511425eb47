"""Hugging Face models behind the model interface (selfreplay.models.hf): extras check, hidden states + head, LoRA
teacher (adapters off), full-finetuning teacher (frozen copy), saving (merged / adapter-only, atomic), load errors."""

import sys

import pytest
import torch

from conftest import one_line_error
from selfreplay.errors import SelfReplayError

pytest.importorskip("transformers")
pytest.importorskip("peft")

from hf_fixtures import tiny_llama, tiny_qwen2, tiny_tokenizer  # noqa: E402
from selfreplay.data.batch import Batch  # noqa: E402
from selfreplay.models import Teacher, load_model, save_model  # noqa: E402
from selfreplay.models.core import CausalLM  # noqa: E402
from selfreplay.models.hf import (HF_ADAPTER, add_lora, load_hf, load_tokenizer, require_hf,  # noqa: E402
                                  save_hf)
from selfreplay.replay.losses import divergence_sum, ntp_sum  # noqa: E402

VOCAB = 400


def _ids(seed=0, B=2, T=12):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _wrap(net) -> CausalLM:
    return CausalLM(net, HF_ADAPTER)


def _lora(model: CausalLM, r=4, alpha=8, targets="all-linear") -> CausalLM:
    add_lora(model, r=r, alpha=alpha, dropout=0.0, targets=targets, seed=0)
    return model


def _kl(model, teacher, ids):
    """KL(teacher || model) summed over the positions, chunked (7 positions at a time)."""
    mask = Batch(ids).mask()
    t_hidden, t_head = teacher.hidden_and_head(ids)
    return model(ids, head_fn=lambda h, head: divergence_sum(h, head, ids, mask, teacher_hidden=t_hidden,
                                                             teacher_head=t_head, chunk_size=7))


def _train_step(model, ids, lr=1e-2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    mask = Batch(ids).mask()
    model(ids, head_fn=lambda h, head: ntp_sum(h, head, ids, mask, chunk_size=5)).backward()
    opt.step()


def test_missing_extra_is_a_one_line_error(monkeypatch):
    model = _wrap(tiny_llama(VOCAB))
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(SelfReplayError) as e:
        require_hf("transformers", "peft")
    one_line_error(e, "peft", "pip install 'selfreplay[hf]'")
    with pytest.raises(SelfReplayError) as e:
        _lora(model)
    one_line_error(e, "pip install 'selfreplay[hf]'")


def test_hidden_states_and_head_give_the_model_logits():
    net = tiny_qwen2(VOCAB)
    model = _wrap(net)
    ids = _ids()
    hidden, head = model(ids, head_fn=lambda h, head_: (h, head_))
    assert hidden.shape == (2, 12, 32)
    with torch.no_grad():
        want = net(input_ids=ids).logits
    torch.testing.assert_close(head(hidden), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(ids), want, rtol=1e-5, atol=1e-5)
    assert model.kind == "hf" and model.vocab_size == VOCAB and model.context == 256


def test_lora_teacher_is_the_model_with_adapters_disabled():
    model = _wrap(tiny_llama(VOCAB))
    ids = _ids()
    with torch.no_grad():
        original = model(ids)
    _lora(model)
    assert model.num_params()["trainable"] < model.num_params()["actual"]
    model.train()
    teacher = Teacher.adapters_off(model)
    assert teacher.module is model and teacher.shares_weights  # no copy of the weights
    assert _kl(model, teacher, ids).item() == 0.0  # LoRA's B starts at zero: the student is the teacher
    _train_step(model, ids, lr=0.5)
    assert _kl(model, teacher, ids).item() > 1e-4
    torch.testing.assert_close(teacher(ids), original)  # teacher unchanged
    assert model.training  # the teacher pass put the model back in train mode
    with torch.no_grad():
        assert not torch.allclose(model(ids), original, atol=1e-4)  # the adapters are back on after the teacher


def test_lora_teacher_refuses_a_dtype_or_device():
    """(was Teacher.for_model(lora_model, dtype=...)) the config check names the keys."""
    from selfreplay.config import TrainConfig, load_config
    from selfreplay.train.checks import resolve_defaults, validate

    for key in ("teacher.dtype=bfloat16", "teacher.device=cpu"):
        cfg = load_config(TrainConfig, [], ["run_dir=r", "data.train=d.jsonl", "model.model_name_or_path=m",
                                            "stop.steps=1", "lora.r=4", key])
        resolve_defaults(cfg, "hf", "finetune")
        with pytest.raises(SelfReplayError) as e:
            validate(cfg, "hf", "finetune")
        one_line_error(e, "teacher.dtype", "LoRA")


def test_full_finetuning_teacher_is_a_frozen_copy():
    model = _wrap(tiny_llama(VOCAB)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = Teacher.frozen_copy(model)
    assert teacher.module is not model and not teacher.module.training and not teacher.shares_weights
    assert not any(p.requires_grad for p in teacher.module.parameters())
    ids = _ids()
    assert _kl(model, teacher, ids).item() == 0.0
    _train_step(model, ids)
    assert _kl(model, teacher, ids).item() > 1e-6
    for k, v in teacher.module.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    half = Teacher.frozen_copy(model, dtype=torch.bfloat16)
    assert next(half.module.parameters()).dtype == torch.bfloat16
    assert next(model.parameters()).dtype == torch.float32  # the student is untouched


def _trained_lora():
    """A tiny Llama with LoRA adapters after one large step: its tokenizer, model, input ids and logits."""
    tok = tiny_tokenizer()
    model = _lora(_wrap(tiny_llama(VOCAB)))
    ids = _ids()
    _train_step(model, ids, lr=0.5)
    model.eval()
    with torch.no_grad():
        expected = model(ids)
    return tok, model, ids, expected


def test_save_merged_lora_loads_with_plain_transformers(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok, model, ids, expected = _trained_lora()
    with torch.no_grad():
        assert not torch.allclose(expected, tiny_llama(VOCAB)(input_ids=ids).logits, atol=1e-3)  # LoRA moved it
    save_hf(model.net, tok, tmp_path / "merged", merge_lora=True, state=model.net.state_dict())
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert load_tokenizer(str(tmp_path / "merged")).pad_token_id == tok.pad_token_id
    assert not any(".lora_" in k or "base_layer" in k for k in loaded.state_dict())

    save_hf(model.net, tok, tmp_path / "adapter", merge_lora=False, state=model.net.state_dict())
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(tiny_llama(VOCAB), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_engine_save_puts_the_merged_model_in_run_dir_model(tmp_path):
    """models.save_model (what the training loop calls) writes run_dir/model, which load_model opens from the run
    directory."""
    tok, model, ids, expected = _trained_lora()
    save_model(model, model, tmp_path / "run", tok, merge_lora=True, info={})
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    loaded = load_model(str(tmp_path / "run"))
    assert loaded.kind == "hf"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), expected, rtol=1e-4, atol=1e-4)


def test_save_full_model_replaces_atomically(tmp_path):
    from transformers import AutoModelForCausalLM

    net = tiny_qwen2(VOCAB, seed=3)
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    save_hf(net, None, out, merge_lora=True, state=net.state_dict())
    assert not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, net(input_ids=ids).logits)


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(SelfReplayError) as e:
        load_hf(str(tmp_path / "missing"))
    one_line_error(e, "missing", "cannot load")
    with pytest.raises(SelfReplayError) as e:
        load_model(str(tmp_path / "missing"))
    one_line_error(e, "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SelfReplayError) as e:
        load_model(str(tmp_path / "empty"))
    one_line_error(e, "empty", "neither", "config.json")
    with pytest.raises(SelfReplayError) as e:
        load_tokenizer(str(tmp_path / "missing"))
    one_line_error(e, "tokenizer", "missing")
    with pytest.raises(SelfReplayError) as e:
        _lora(_wrap(tiny_llama(VOCAB)), targets=["no_such_layer"])
    one_line_error(e, "lora.targets")


def test_add_lora_rejects_rank_zero():
    """As the built-in apply_lora does ("lora.r=0: must be positive"); the error must name lora.r."""
    with pytest.raises(SelfReplayError) as e:
        _lora(_wrap(tiny_llama(VOCAB)), r=0)
    one_line_error(e, "lora.r")


def test_load_rejects_non_finite_weights(tmp_path):
    net = tiny_llama(VOCAB)
    with torch.no_grad():
        net.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    net.save_pretrained(tmp_path / "nan")
    with pytest.raises(SelfReplayError) as e:
        load_hf(str(tmp_path / "nan"))
    one_line_error(e, "up_proj", "NaN")
