"""LoRA finetuning of the built-in GPT: only adapters train, and the saved checkpoint is a plain merged GPT."""

import pytest
import torch

from conftest import one_line_error, tiny_overrides
from selfreplay.checkpoint import load_model
from selfreplay.config import ModelConfig, TrainConfig, load_config
from selfreplay.errors import SelfReplayError
from selfreplay.lora import apply_lora, merge_lora, merged_parameters
from selfreplay.model import GPT
from selfreplay.trainer import Trainer


def _tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(d_model=32, n_layers=1, head_dim=16, context=16, vocab_size=64))


def test_adapters_start_at_zero_and_merge_exactly():
    model = _tiny_gpt()
    tokens = torch.randint(0, 64, (3, 16))
    before = model(tokens)
    names = apply_lora(model, r=4, alpha=8, targets=["qkv", "up"])
    assert names == ["blocks.0.attn.qkv", "blocks.0.mlp.up"]
    assert torch.equal(model(tokens), before)  # B = 0: the adapted model starts as the original
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in names for x in "AB"}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.1)
    adapted = model(tokens)
    assert not torch.allclose(adapted, before)
    merged_view = merged_parameters(model)
    merge_lora(model)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert torch.allclose(model(tokens), adapted, atol=1e-5)
    for n, p in model.named_parameters():
        assert torch.allclose(merged_view[n], p, atol=1e-6)


def test_lora_finetune_trains_only_adapters_and_saves_plain_gpt(corpora, pretrained, tmp_path):
    run_dir = tmp_path / "ft_lora"
    cfg = load_config(TrainConfig, [], tiny_overrides(run_dir, corpora["es"], init_from=pretrained, **{
        "stop.steps": 30, "lora.r": 4, "lora.alpha": 8, "optim.lr": 1e-2}))
    trainer = Trainer(cfg, finetune=True)
    teacher = {k: v.clone() for k, v in trainer.setup.teacher.state_dict().items()}
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    adapters = {id(p) for n, p in trainer.model.named_parameters() if "lora_" in n}
    assert optimised == adapters and len(adapters) == 8  # A and B on qkv, out, up, down
    first = trainer.evaluate()["valid_loss"]
    # the base weights do not move during training: snapshot them via the state dict before the loop
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    for _ in range(10):
        trainer.train_step()
    for n, p in trainer.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    tokens = next(iter(trainer.setup.loader.valid_batches(4)))
    with torch.no_grad():
        adapted = trainer.model(tokens)
    summary = trainer.run()
    assert summary["valid_loss"] < first  # the adapters learned the new corpus
    saved, info = load_model(run_dir)
    assert set(saved.state_dict()) == set(teacher)  # a plain GPT: no adapter tensors
    assert info["lora"]["r"] == 4
    with torch.no_grad():
        merged_out = trainer.model(tokens)  # the trainer's model, merged in place before saving
        assert torch.allclose(saved(tokens), merged_out, atol=1e-5)
        assert not torch.allclose(merged_out, adapted, atol=1e-4)  # it trained past the snapshot
        # untargeted weights (embeddings, head) are exactly the teacher's
        for name in ("embed.weight", "head.weight"):
            assert torch.equal(saved.state_dict()[name], teacher[name])
        assert not torch.equal(saved.state_dict()["blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"])


def test_lora_errors(corpora, pretrained, tmp_path):
    with pytest.raises(SelfReplayError) as e:
        apply_lora(_tiny_gpt(), r=4, alpha=8, targets=["q_proj"])
    one_line_error(e, "lora.targets", "qkv")
    cfg = load_config(TrainConfig, [], tiny_overrides(tmp_path / "p", corpora["en"], **{"stop.steps": 1,
                                                                                         "lora.r": 4}))
    with pytest.raises(SelfReplayError) as e:
        Trainer(cfg, finetune=False)
    one_line_error(e, "lora.r", "finetun")
