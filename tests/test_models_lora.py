"""LoRA on the built-in GPT: only adapters train, the teacher is the base with adapters off, and the saved
checkpoint is a plain merged GPT."""

import copy
import json

import pytest
import torch

from conftest import one_line_error, tiny_overrides
from selfreplay.config import TrainConfig, load_config
from selfreplay.errors import SelfReplayError
from selfreplay.models.builtin import load_gpt_run
from selfreplay.models.gpt import GPT, GPTConfig
from selfreplay.models.lora import (adapters_disabled, adapters_folded, apply_lora, has_lora, merge_lora,
                                   merged_parameters)
from selfreplay.train import prepare, train
from selfreplay.train.build import build_parts
from selfreplay.train.loop import Trainer


def _tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(d_model=32, n_layers=1, head_dim=16, context=16, vocab_size=64))


@torch.no_grad()
def _move_adapters(model):
    """As if the adapters had trained: every lora_B away from zero."""
    for n, p in model.named_parameters():
        if n.endswith("lora_B"):
            p.normal_(std=0.1)


def test_adapters_start_at_zero_and_merge_exactly():
    model = _tiny_gpt()
    tokens = torch.randint(0, 64, (3, 16))
    before = model(tokens)
    names = apply_lora(model, r=4, alpha=8, targets=["qkv", "up"])
    assert names == ["blocks.0.attn.qkv", "blocks.0.mlp.up"] and has_lora(model)
    assert torch.equal(model(tokens), before)  # B = 0: the adapted model starts as the original
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in names for x in "AB"}
    _move_adapters(model)
    adapted = model(tokens)
    assert not torch.allclose(adapted, before)
    with adapters_disabled(model):  # the LoRA teacher: the base weights exactly
        assert torch.equal(model(tokens), before)
    assert torch.equal(model(tokens), adapted)  # adapters back on after the block
    merged_view = merged_parameters(model)
    merge_lora(model)
    assert not any("lora" in n for n, _ in model.named_parameters()) and not has_lora(model)
    assert torch.allclose(model(tokens), adapted, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(merged_view[n], p, atol=1e-6)


def test_folded_adapters_compute_the_merged_model_and_give_the_frozen_weights_back():
    model = _tiny_gpt()
    tokens = torch.randint(0, 64, (3, 16))
    before = model(tokens)
    apply_lora(model, r=4, alpha=8)
    _move_adapters(model)
    frozen = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    merged = merge_lora(copy.deepcopy(model))
    with torch.no_grad(), adapters_folded(model):
        assert torch.equal(model(tokens), merged(tokens))  # the merged weights, exactly: no hook adds anything
        assert all(torch.equal(merged_parameters(model)[n], p) for n, p in merged.named_parameters())
        with adapters_disabled(model):  # the teacher inside an evaluation: the frozen weights
            assert torch.equal(model(tokens), before)
        assert torch.equal(model(tokens), merged(tokens))
    for n, p in model.named_parameters():  # the very tensors of before, bit for bit
        assert p.data_ptr() == frozen[n][0] and torch.equal(p, frozen[n][1]), n
    half = _tiny_gpt().to(torch.bfloat16)
    apply_lora(half, r=4, alpha=8)
    with adapters_folded(half):  # bf16 weights keep their hooks (a folded update would round away)
        assert all(m.lora_enabled for m in half.modules() if hasattr(m, "lora_A"))


def test_adapter_init_is_seeded():
    a, b, c = _tiny_gpt(), _tiny_gpt(), _tiny_gpt()
    apply_lora(a, 4, 8, seed=1)
    apply_lora(b, 4, 8, seed=1)
    apply_lora(c, 4, 8, seed=2)
    lora_a = lambda m: [p for n, p in m.named_parameters() if n.endswith("lora_A")]  # noqa: E731
    assert all(torch.equal(x, y) for x, y in zip(lora_a(a), lora_a(b)))
    assert not all(torch.equal(x, y) for x, y in zip(lora_a(a), lora_a(c)))


@pytest.mark.parametrize("method", ["none", "kl"])
def test_lora_finetune_trains_only_adapters_and_saves_plain_gpt(corpora, pretrained, tmp_path, method):
    run_dir = tmp_path / "ft_lora"
    cfg = load_config(TrainConfig, [], tiny_overrides(run_dir, corpora["es"], **{
        "model.model_name_or_path": pretrained, "stop.steps": 30, "lora.r": 4, "lora.alpha": 8, "optim.lr": 1e-2,
        "replay.method": method}))
    cfg, kind, info = prepare(cfg, "finetune")
    trainer = Trainer(cfg, build_parts(cfg, kind, "finetune", info.device), info.device)
    model = trainer.model
    # the teacher is the student itself with the adapters off: no second copy of the weights
    assert trainer.teacher.shares_weights and trainer.teacher.module is model
    teacher = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    adapters = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert optimised == adapters and len(adapters) == 8  # A and B on qkv, out, up, down
    first = trainer.evaluate()["valid_loss"]
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    for _ in range(10):
        trainer.train_step()
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n  # the base weights do not move
    tokens = next(iter(trainer.data.valid_batches(4))).tokens
    pretrained_model = load_gpt_run(pretrained)
    with torch.no_grad():
        adapted = model(tokens)
        assert not torch.allclose(adapted, pretrained_model(tokens), atol=1e-4)  # the adapters trained
        assert torch.equal(trainer.teacher(tokens), pretrained_model(tokens))  # adapters off: the pretrained model
    # evaluation scores the adapters folded into the weights: exactly what a merged copy scores, KL included
    trainer.cfg.eval.valid_kl = True
    folded = trainer.evaluate()
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    module = trainer.eval_forward
    trainer.eval_forward = merge_lora(copy.deepcopy(model))
    merged = trainer.evaluate()
    trainer.eval_forward = module
    keys = ("valid_loss", "valid_kl", "prev_loss", "prev_kl", "forgetting")
    assert {k: folded.get(k) for k in keys} == {k: merged.get(k) for k in keys} and folded["prev_kl"] > 0
    summary = trainer.run()
    assert summary["valid_loss"] < first  # the adapters learned the new corpus
    saved = load_gpt_run(run_dir)
    assert set(saved.state_dict()) == set(teacher)  # a plain GPT: no adapter tensors
    info = json.loads((run_dir / "run.json").read_text())
    assert info["lora"]["merged"] is True
    assert info["lora"]["r"] == 4 and info["lora"]["alpha"] == 8.0  # the run records how it was adapted
    with torch.no_grad():
        merged_out = model(tokens)  # the trainer's model, merged in place before saving
        assert not has_lora(model.net)
        assert torch.allclose(saved(tokens), merged_out, atol=1e-5)
        assert not torch.allclose(merged_out, adapted, atol=1e-4)  # it trained past the snapshot
        # untargeted weights (embeddings, head) are exactly the teacher's
        for name in ("net.embed.weight", "net.head.weight"):
            assert torch.equal(saved.state_dict()[name], teacher[name])
        qkv = "net.blocks.0.attn.qkv.weight"
        assert not torch.equal(saved.state_dict()[qkv], teacher[qkv])


def test_lora_errors(corpora, tmp_path):
    with pytest.raises(SelfReplayError) as e:
        apply_lora(_tiny_gpt(), r=4, alpha=8, targets=["q_proj"])
    one_line_error(e, "lora.targets", "qkv")
    with pytest.raises(SelfReplayError) as e:
        apply_lora(_tiny_gpt(), r=0, alpha=8)
    one_line_error(e, "lora.r=0")
    with pytest.raises(SelfReplayError) as e:
        apply_lora(_tiny_gpt(), r=4, alpha=8, dropout=1.0)
    one_line_error(e, "lora.dropout")
    model = _tiny_gpt()
    apply_lora(model, r=4, alpha=8, targets=["qkv"])
    with pytest.raises(SelfReplayError) as e:
        apply_lora(model, r=4, alpha=8, targets=["qkv"])
    one_line_error(e, "already has an adapter")
    cfg = load_config(TrainConfig, [], tiny_overrides(tmp_path / "p", corpora["en"], **{"stop.steps": 1,
                                                                                         "lora.r": 4}))
    with pytest.raises(SelfReplayError) as e:
        train(cfg, "pretrain")
    one_line_error(e, "lora.r", "finetun")
