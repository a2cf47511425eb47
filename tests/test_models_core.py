"""The one model interface (selfreplay.models.core): CausalLM over both kinds of network, and the Teacher."""

import pytest
import torch

from selfreplay.data.batch import Batch
from selfreplay.models.builtin import init_gpt, wrap_gpt
from selfreplay.models.core import CausalLM, Teacher, causal_lm
from selfreplay.models.gpt import GPTConfig
from selfreplay.models.lora import apply_lora
from selfreplay.replay.losses import ntp_sum

VOCAB = 64
SHAPE = GPTConfig(d_model=32, n_layers=2, head_dim=16, context=16, vocab_size=VOCAB)


def _ids(seed=0, B=3, T=12, vocab=VOCAB):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _gpt(seed=0) -> CausalLM:
    return wrap_gpt(init_gpt(SHAPE, seed)).eval()


def _hf_llama() -> CausalLM:
    pytest.importorskip("transformers")
    from hf_fixtures import tiny_llama

    from selfreplay.models.hf import HF_ADAPTER

    return CausalLM(tiny_llama(VOCAB), HF_ADAPTER).eval()


@pytest.mark.parametrize("build", [_gpt, _hf_llama], ids=["gpt", "hf_llama"])
def test_logits_equal_the_head_applied_to_the_hidden_states(build):
    model = build()
    ids = _ids()
    with torch.no_grad():
        logits = model(ids)
        via_head = model(ids, head_fn=lambda h, head: head(h))
        hidden = model(ids, head_fn=lambda h, head: h)
        direct = model.net(ids) if model.kind == "gpt" else model.net(input_ids=ids).logits
    assert logits.shape == (3, 12, VOCAB) and hidden.shape == (3, 12, 32)
    torch.testing.assert_close(via_head, logits, rtol=0, atol=0)
    torch.testing.assert_close(logits, direct, rtol=1e-5, atol=1e-5)  # the network's own forward
    # head_fn gets the keyword arguments of the call
    scale = model(ids, head_fn=lambda h, head, factor: head(h) * factor, factor=2.0)
    torch.testing.assert_close(scale, 2 * logits)
    assert model.vocab_size == VOCAB and causal_lm(model) is model


def test_builtin_gpt_refuses_packed_position_ids():
    from selfreplay.errors import SelfReplayError

    model = _gpt()
    ids = _ids()
    with pytest.raises(SelfReplayError) as e:
        model(ids, position_ids=torch.zeros_like(ids))
    assert "position_ids" in str(e.value) and "\n" not in str(e.value)


def test_causal_lm_refuses_other_modules():
    with pytest.raises(TypeError):
        causal_lm(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError):
        Teacher.frozen_copy(torch.nn.Linear(2, 2))


def _train_step(model: CausalLM, ids, lr=0.5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    mask = Batch(ids).mask()
    model(ids, head_fn=lambda h, head: ntp_sum(h, head, ids, mask)).backward()
    opt.step()


def test_builtin_lora_teacher_is_the_base_model():
    model = _gpt(seed=1)
    ids = _ids(seed=2)
    with torch.no_grad():
        base_logits = model(ids)
    apply_lora(model.net, r=4, alpha=8, targets=("qkv", "out", "up", "down"), seed=0)
    assert model.adapter.has_lora(model.net)
    model.train()
    teacher = Teacher.adapters_off(model)
    assert teacher.module is model and teacher.shares_weights  # no second copy of the weights
    _train_step(model, ids)
    with torch.no_grad():
        student_logits = model(ids)
    assert (student_logits - base_logits).abs().max() > 1e-3  # the adapters moved the student
    torch.testing.assert_close(teacher(ids), base_logits)  # the teacher is still the base model
    hidden, head = teacher.hidden_and_head(ids)
    torch.testing.assert_close(head(hidden), base_logits)
    assert model.training  # the teacher pass restored train mode
    with torch.no_grad():
        torch.testing.assert_close(model(ids), student_logits)  # adapters back on afterwards
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_builtin_frozen_copy_teacher():
    model = _gpt(seed=3).train()
    ids = _ids(seed=4)
    with torch.no_grad():
        before = model(ids)
    teacher = Teacher.frozen_copy(model)
    assert teacher.module is not model and not teacher.shares_weights and not teacher.module.training
    assert not any(p.requires_grad for p in teacher.module.parameters())
    _train_step(model, ids, lr=0.1)
    torch.testing.assert_close(teacher(ids), before)
    assert teacher(ids).requires_grad is False
    assert teacher.module.vocab_size == VOCAB and teacher.device == torch.device("cpu")


@pytest.mark.parametrize("build", [_gpt, _hf_llama], ids=["gpt", "hf_llama"])
def test_a_model_computes_like_its_teacher_until_its_first_update(build):
    """Before its first update a finetune's evaluation runs only the teacher: that needs the model's logits to be
    the teacher's exactly, and any update (or another dtype) to end it."""
    model, ids = build().train(), _ids(seed=5)
    teacher = Teacher.frozen_copy(model)
    assert teacher.computes_like(model)
    with torch.no_grad():
        assert torch.equal(model(ids), teacher(ids))
    assert not Teacher.frozen_copy(model, dtype=torch.float64).computes_like(model)
    _train_step(model, ids, lr=0.1)
    assert not teacher.computes_like(model)

    lora = _gpt(seed=6).train()
    apply_lora(lora.net, r=4, alpha=8, targets=("qkv", "out", "up", "down"), seed=0)
    base = Teacher.adapters_off(lora)
    assert base.computes_like(lora) and not base.computes_like(_gpt(seed=6))
    with torch.no_grad():
        assert torch.equal(lora(ids), base(ids))  # lora_B starts at zero: the adapters add exactly nothing
    _train_step(lora, ids, lr=0.1)
    assert not base.computes_like(lora)
