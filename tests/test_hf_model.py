"""Hugging Face models as student and teacher: extras check, LoRA teacher, frozen copy, hidden states, saving."""

import sys

import pytest
import torch

from conftest import one_line_error
from selfreplay.errors import SelfReplayError

pytest.importorskip("transformers")
pytest.importorskip("peft")

from hf_fixtures import tiny_llama, tiny_qwen2, tiny_tokenizer  # noqa: E402
from selfreplay.hf_model import (Teacher, add_lora, final_hidden_and_head, load_causal_lm,  # noqa: E402
                                 load_tokenizer, require_hf, save_hf_model)
from selfreplay.losses import chunked_divergence_loss, chunked_next_token_loss  # noqa: E402

VOCAB = 400


def _ids(seed=0, B=2, T=12):
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _kl(model, teacher, ids):
    hidden, head = final_hidden_and_head(model, ids)
    t_hidden, t_head = teacher.hidden_and_head(ids)
    return chunked_divergence_loss(hidden, head, ids, t_hidden, t_head, chunk_size=7)


def _train_step(model, ids, lr=1e-2):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    hidden, head = final_hidden_and_head(model, ids)
    chunked_next_token_loss(hidden, head, ids).backward()
    opt.step()


def test_missing_extra_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(SelfReplayError) as e:
        require_hf("transformers", "peft")
    one_line_error(e, "peft", "pip install 'selfreplay[hf]'")
    with pytest.raises(SelfReplayError) as e:
        add_lora(tiny_llama(VOCAB))
    one_line_error(e, "pip install 'selfreplay[hf]'")


def test_hidden_states_and_head_give_the_model_logits():
    model = tiny_qwen2(VOCAB)
    ids = _ids()
    hidden, head = final_hidden_and_head(model, ids)
    assert hidden.shape == (2, 12, 32)
    torch.testing.assert_close(head(hidden), model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_lora_teacher_is_the_model_with_adapters_disabled():
    base = tiny_llama(VOCAB)
    ids = _ids()
    with torch.no_grad():
        original = base(input_ids=ids).logits
    model = add_lora(base, r=4, alpha=8)
    model.train()
    teacher = Teacher.for_model(model)
    assert teacher.module is model  # no copy of the weights
    assert _kl(model, teacher, ids).item() == 0.0  # LoRA's B starts at zero: the student is the teacher
    _train_step(model, ids, lr=0.5)
    assert _kl(model, teacher, ids).item() > 1e-4
    torch.testing.assert_close(teacher.logprobs(ids), torch.log_softmax(original, -1))  # teacher unchanged
    assert model.training  # the teacher pass put the model back in train mode
    with pytest.raises(SelfReplayError) as e:
        Teacher.for_model(model, dtype="bfloat16")
    one_line_error(e, "teacher.dtype")


def test_full_finetuning_teacher_is_a_frozen_copy():
    model = tiny_llama(VOCAB).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = Teacher.for_model(model)
    assert teacher.module is not model and not teacher.module.training
    assert not any(p.requires_grad for p in teacher.module.parameters())
    ids = _ids()
    assert _kl(model, teacher, ids).item() == 0.0
    _train_step(model, ids)
    assert _kl(model, teacher, ids).item() > 1e-6
    for k, v in teacher.module.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    half = Teacher.for_model(model, dtype="bfloat16")
    assert next(half.module.parameters()).dtype == torch.bfloat16


def test_save_merged_lora_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    model = add_lora(tiny_llama(VOCAB), r=4, alpha=8)
    ids = _ids()
    _train_step(model, ids, lr=0.5)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_hf_model(model, tok, tmp_path / "merged", merge_lora=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert load_tokenizer(str(tmp_path / "merged")).pad_token_id == tok.pad_token_id
    save_hf_model(model, tok, tmp_path / "adapter", merge_lora=False)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(tiny_llama(VOCAB), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_save_full_model_replaces_atomically(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_qwen2(VOCAB, seed=3)
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    save_hf_model(model, None, out)
    assert not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    loaded = AutoModelForCausalLM.from_pretrained(out)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(SelfReplayError) as e:
        load_causal_lm(str(tmp_path / "missing"))
    one_line_error(e, "model_name_or_path")
    with pytest.raises(SelfReplayError) as e:
        add_lora(tiny_llama(VOCAB), r=0)
    one_line_error(e, "lora.r")
