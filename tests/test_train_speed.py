"""The GPU speed paths, run on the CPU: torch.compile of the training and decode steps, bf16 autocast, fused
AdamW, gradient checkpointing. Each is checked against the plain eager fp32 path."""

import sys
from pathlib import Path

import pytest
import torch

from conftest import make_corpus
from selfreplay.config import FINETUNE, TrainConfig, load_config
from selfreplay.train import prepare, train
from selfreplay.train.build import build_parts
from selfreplay.train.loop import Trainer

BASE = {"data.batch_size": 16, "data.valid_tokens": 600, "optim.warmup_tokens": 0, "optim.lr": 3e-3,
        "log.progress": False, "replay.batch_size": 8, "replay.buffer": 2}


def _args(**extra) -> list[str]:
    return [f"{k}={v}" for k, v in {**BASE, **extra}.items()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    en, es = make_corpus(root / "en", seed=1, domain=0), make_corpus(root / "es", seed=2, domain=1)
    train(load_config(TrainConfig, [], _args(**{
        "run_dir": root / "pre", "data.train": en, "model.d_model": 32, "model.n_layers": 2, "model.head_dim": 16,
        "model.context": 16, "model.vocab_size": 64, "stop.steps": 80, "eval.every_tokens": 10 ** 6})), "pretrain")
    return root, es


def _trainer(root: Path, es: str, name: str, **extra) -> Trainer:
    cfg = load_config(TrainConfig, [], _args(**{"run_dir": root / name, "data.train": es,
                                               "model.model_name_or_path": root / "pre", "stop.steps": 4,
                                               **extra}))
    cfg, kind, info = prepare(cfg, FINETUNE)
    return Trainer(cfg, build_parts(cfg, kind, FINETUNE, info.device), info.device)


def test_compiled_step_equals_eager_and_never_recompiles(setup):
    """torch.compile (inductor on the CPU): the first loss equals eager's within 1e-5 (later ones drift apart a
    little: AdamW's normalisation turns rounding in tiny gradients into full-size updates), and after the first
    step and evaluation there is no further compilation (a finetune compiles at most: the training forward, the
    evaluation forward, the teacher's forward (+1 when replay and evaluation batches differ in size))."""
    from torch._dynamo.utils import counters

    root, es = setup
    eager = _trainer(root, es, "eager", **{"replay.method": "kl", "replay.source": "prev"})
    losses = [float(eager.train_step()["loss"]) for _ in range(3)]
    counters.clear()
    compiled = _trainer(root, es, "compiled", compile="true", **{"replay.method": "kl", "replay.source": "prev"})
    got = [float(compiled.train_step()["loss"])]
    compiled.evaluate()
    first = counters["frames"]["total"]
    got += [float(compiled.train_step()["loss"]) for _ in range(2)]
    compiled.evaluate()
    assert counters["frames"]["total"] == first, "recompiled after the first step and evaluation"
    assert 1 <= first <= 4
    assert got[0] == pytest.approx(losses[0], rel=1e-5)
    assert got == pytest.approx(losses, rel=5e-3)


def test_bf16_autocast_fused_adamw_and_checkpointing_track_fp32(setup):
    """bf16 autocast + fused AdamW + gradient checkpointing (the CUDA defaults, forced on the CPU) train to the
    same losses as plain fp32 within bf16's precision; checkpointing alone changes nothing in fp32."""
    root, es = setup
    plain = _trainer(root, es, "fp32", **{"replay.method": "kl", "replay.source": "self"})
    ref = [float(plain.train_step()["loss"]) for _ in range(3)]
    ckpt = _trainer(root, es, "ckpt", gradient_checkpointing="true",
                    **{"replay.method": "kl", "replay.source": "self"})
    assert ckpt.model.net.checkpointing
    assert [float(ckpt.train_step()["loss"]) for _ in range(3)] == pytest.approx(ref, rel=1e-5)
    fast = _trainer(root, es, "bf16", precision="bf16", gradient_checkpointing="true",
                    **{"optim.fused": "true", "replay.method": "kl", "replay.source": "self"})
    assert fast.optimizer.defaults["fused"]
    got = [float(fast.train_step()["loss"]) for _ in range(3)]
    assert got == pytest.approx(ref, rel=2e-2)


def test_compiled_decode_step_samples_like_eager():
    """The static decode step under torch.compile (on CUDA a CUDA graph) draws the same tokens as eager decoding."""
    from selfreplay.models.builtin import init_gpt, wrap_gpt
    from selfreplay.models.gpt import GPTConfig
    from selfreplay.replay.sampling import Sampler

    model = wrap_gpt(init_gpt(GPTConfig(d_model=32, n_layers=1, head_dim=16, context=12, vocab_size=40), 0)).eval()
    prompts = torch.zeros(4, 1, dtype=torch.long)
    out = {}
    for mode in ("eager", "compiled"):
        sampler = Sampler(model, mode)
        out[mode] = sampler.sample(prompts, 12, generator=torch.Generator().manual_seed(0), keep_targets=True)
    assert torch.equal(out["eager"].tokens, out["compiled"].tokens)
    assert torch.allclose(out["eager"].teacher_targets, out["compiled"].teacher_targets, atol=1e-5)


@pytest.mark.skipif(sys.platform != "linux", reason="inductor on Linux")
def test_compiled_decode_reuses_one_graph_across_refills():
    from torch._dynamo.utils import counters

    from selfreplay.models.builtin import init_gpt, wrap_gpt
    from selfreplay.models.gpt import GPTConfig
    from selfreplay.replay.sampling import Sampler

    model = wrap_gpt(init_gpt(GPTConfig(d_model=32, n_layers=1, head_dim=16, context=10, vocab_size=40), 1)).eval()
    sampler = Sampler(model, "compiled")
    sampler.sample(torch.zeros(3, 1, dtype=torch.long), 10, generator=torch.Generator().manual_seed(0))
    counters.clear()
    for seed in (1, 2):
        sampler.sample(torch.zeros(3, 1, dtype=torch.long), 10, generator=torch.Generator().manual_seed(seed))
    assert counters["frames"]["total"] == 0


@pytest.mark.parametrize("method", [
    {"replay.method": "kl", "replay.source": "prev"},
    {"replay.method": "kl", "replay.source": "prev", "replay.target_kl": 0.01, "replay.coeff": 1.0},
    {"replay.method": "asft"}, {"replay.method": "l2_init"}, {"replay.method": "replace"},
    {"replay.method": "ntp", "replay.source": "prev", "gradient_accumulation_steps": 2},
])
def test_a_training_step_reads_nothing_back_from_the_device(setup, monkeypatch, method):
    """No .item() / float() / bool() of a tensor in the step (GPU: each would wait for the device)."""
    root, es = setup
    trainer = _trainer(root, es, "sync", **method)
    trainer.train_step()  # first calls may build things lazily
    reads, ours = [], str(Path(sys.modules["selfreplay"].__file__).parent)
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _original=original, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(ours):
                reads.append(f"{_name} at {caller}:{sys._getframe(1).f_lineno}")
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    for _ in range(3):
        trainer.train_step()
    monkeypatch.undo()
    assert reads == [], reads
