import json
from pathlib import Path

import pytest
import torch

from conftest import make_corpus, tiny_overrides
from selfreplay.checkpoint import WEIGHTS, load_model
from selfreplay.config import TrainConfig, load_config
from selfreplay.errors import SelfReplayError
from selfreplay.metrics import read_metrics
from selfreplay.trainer import Trainer, lr_factor, train


def cfg_for(run_dir, train_corpus, **extra) -> TrainConfig:
    return load_config(TrainConfig, [], tiny_overrides(run_dir, train_corpus, **extra))


def finetune_cfg(tmp_path, name, pretrained, corpora, **extra) -> TrainConfig:
    return cfg_for(tmp_path / name, corpora["es"], init_from=pretrained, **{"stop.steps": 40, **extra})


def test_pretraining_lowers_validation_loss(pretrained):
    records = read_metrics(pretrained)
    assert records[0]["step"] == 0 and records[-1]["step"] == 150
    assert records[-1]["valid_loss"] < records[0]["valid_loss"] - 1.5
    info = json.loads((Path(pretrained) / "run.json").read_text())
    assert info["train_corpus"]["domain_token"] == 0 and info["git_commit"] is None or isinstance(info["git_commit"], str)
    assert (Path(pretrained) / "config.yaml").is_file() and (Path(pretrained) / "summary.json").is_file()


def test_finetuning_records_zero_drift_before_the_first_step(tmp_path, pretrained, corpora):
    train(finetune_cfg(tmp_path, "ft", pretrained, corpora, **{"stop.steps": 10}), finetune=True)
    first = read_metrics(tmp_path / "ft")[0]
    assert first["step"] == 0
    assert first["forgetting"] == 0.0 and first["prev_kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["valid_kl"] == pytest.approx(0.0, abs=1e-6) and first["dist_to_teacher"] == 0.0
    assert first["drift"] == 0.0


def test_kl_replay_forgets_far_less_than_plain_finetuning(tmp_path, pretrained, corpora):
    plain = train(finetune_cfg(tmp_path, "plain", pretrained, corpora), finetune=True)
    kl = train(finetune_cfg(tmp_path, "kl", pretrained, corpora, **{"replay.method": "kl"}), finetune=True)
    assert plain["forgetting"] > 0.3
    assert kl["forgetting"] < plain["forgetting"] / 3
    assert kl["valid_loss"] < read_metrics(tmp_path / "kl")[0]["valid_loss"] - 0.5


@pytest.mark.parametrize("method, extra", [
    ("ntp", {}), ("kl_downstream", {}), ("replace", {"replay.fraction": 0.25}),
    ("kl", {"replay.divergence": "reverse_kl"}), ("kl", {"replay.divergence": "jsd", "replay.jsd_beta": 0.3}),
])
def test_every_replay_method_trains(tmp_path, pretrained, corpora, method, extra):
    summary = train(finetune_cfg(tmp_path, "run", pretrained, corpora,
                                 **{"replay.method": method, "stop.steps": 15, **extra}), finetune=True)
    assert summary["steps"] == 15 and summary["train_loss"] > 0
    if method != "replace":
        assert summary["train_replay"] > 0


def test_teacher_gets_no_gradient_and_stays_frozen(tmp_path, pretrained, corpora):
    trainer = Trainer(finetune_cfg(tmp_path, "t", pretrained, corpora, **{"replay.method": "kl_downstream"}),
                      finetune=True)
    before = {k: v.clone() for k, v in trainer.setup.teacher.state_dict().items()}
    for _ in range(3):
        trainer.train_step()
    teacher = trainer.setup.teacher
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


class Crash(Exception):
    pass


def _crash_at(step):
    def hook(s):
        if s == step:
            raise Crash
    return hook


@pytest.mark.parametrize("kind", ["pretrain", "finetune_kl"])
def test_resume_ends_with_the_same_weights(tmp_path, corpora, pretrained, kind):
    def cfg(name):
        if kind == "pretrain":
            return cfg_for(tmp_path / name, corpora["en"], **{"stop.steps": 12, "checkpoint_every_tokens": 16 * 16 * 4,
                                                              "optim.schedule": "cosine"})
        return finetune_cfg(tmp_path, name, pretrained, corpora, **{"stop.steps": 12, "replay.method": "kl",
                                                                   "checkpoint_every_tokens": 16 * 16 * 4})
    finetune = kind != "pretrain"
    train(cfg("straight"), finetune=finetune)
    with pytest.raises(Crash):
        train(cfg("crashed"), finetune=finetune, on_step=_crash_at(7))  # last checkpoint: step 4
    assert (tmp_path / "crashed" / "train_state").is_dir() and not (tmp_path / "crashed" / WEIGHTS).exists()
    summary = train(cfg("crashed"), finetune=finetune, resume=True)
    assert summary["steps"] == 12
    a, _ = load_model(tmp_path / "straight")
    b, _ = load_model(tmp_path / "crashed")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    steps = [r["step"] for r in read_metrics(tmp_path / "crashed")]
    assert steps == [r["step"] for r in read_metrics(tmp_path / "straight")]


def test_resume_refuses_a_changed_config(tmp_path, corpora):
    with pytest.raises(Crash):
        train(cfg_for(tmp_path / "r", corpora["en"], **{"stop.steps": 8, "checkpoint_every_tokens": 512}),
              on_step=_crash_at(5))
    with pytest.raises(SelfReplayError, match="optim.lr"):
        train(cfg_for(tmp_path / "r", corpora["en"], **{"stop.steps": 8, "checkpoint_every_tokens": 512,
                                                        "optim.lr": 1e-2}), resume=True)


def test_stop_criteria(tmp_path, corpora):
    s = train(cfg_for(tmp_path / "target", corpora["en"], **{"stop.target_loss": 3.6, "stop.steps": 400}))
    assert s["stop_reason"] == "target_loss" and s["valid_loss"] <= 3.6 and s["steps"] < 400
    s = train(cfg_for(tmp_path / "epochs", corpora["en"], **{"stop.epochs": 0.5}))
    assert s["stop_reason"] == "length" and s["epoch"] == pytest.approx(0.5, abs=0.02)
    s = train(cfg_for(tmp_path / "time", corpora["en"], **{"stop.max_time": 0.2}))
    assert s["stop_reason"] == "max_time" and s["train_time"] >= 0.2
    s = train(cfg_for(tmp_path / "early", corpora["en"], **{"stop.early_stop_evals": 2, "optim.lr": 0.3,
                                                             "eval.every_tokens": 256}))
    assert s["stop_reason"] == "early_stop"
    s = train(cfg_for(tmp_path / "tpp", corpora["en"], **{"stop.tokens_per_param": 0.05}))
    assert s["tokens"] >= 0.05 * (12 * 32 * 32 + 32 * 64)


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 100, 400, "cosine", 12) for s in range(12)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[-1] == pytest.approx(0.0, abs=1e-9) and all(a >= b for a, b in zip(f[3:], f[4:]))
    assert [lr_factor(s, 100, 0, "constant", None) for s in range(3)] == [1.0, 1.0, 1.0]


def test_bad_finetuning_inputs(tmp_path, pretrained, corpora):
    other_vocab = make_corpus(tmp_path / "big", seed=3, domain=1, vocab=128)
    with pytest.raises(SelfReplayError, match="vocab"):
        Trainer(finetune_cfg(tmp_path, "a", pretrained, {"es": other_vocab}), finetune=True)
    other_tok = make_corpus(tmp_path / "tok", seed=3, domain=1, fingerprint="another")
    with pytest.raises(SelfReplayError, match="tokeniz"):
        Trainer(finetune_cfg(tmp_path, "b", pretrained, {"es": other_tok}), finetune=True)
    with pytest.raises(SelfReplayError, match="not found"):
        Trainer(finetune_cfg(tmp_path, "c", str(tmp_path / "nope"), corpora), finetune=True)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(pretrained).iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(SelfReplayError, match="corrupt weights"):
        Trainer(finetune_cfg(tmp_path, "d", str(broken), corpora), finetune=True)
    train(cfg_for(tmp_path / "done", corpora["en"], **{"stop.steps": 2}))
    with pytest.raises(SelfReplayError, match="already holds a run"):
        train(cfg_for(tmp_path / "done", corpora["en"], **{"stop.steps": 2}))


def test_generated_replay_corpus_trains_like_the_in_loop_buffer(tmp_path, pretrained, corpora):
    """`generate` with batch = buffer x replay batch writes exactly the in-loop buffer's samples."""
    from selfreplay.checkpoint import load_model as load
    from selfreplay.generate import generate_replay_corpus

    teacher, info = load(pretrained)
    generate_replay_corpus(teacher.eval(), tmp_path / "replay", num_sequences=8 * 2 * 3, domains=[0],
                           batch_size=8 * 2, seed=0, vocab_size=64, tokenizer_fingerprint=info["tokenizer_fingerprint"],
                           progress=False)
    # SGD: at step 1 student = teacher, so the KL gradient is float noise (~1e-7) that Adam would rescale into
    # full-size updates; SGD keeps equal-up-to-rounding targets giving equal-up-to-rounding weights.
    common = {"replay.method": "kl", "replay.buffer": 2, "stop.steps": 6, "seed": 0, "optim.name": "sgd",
              "optim.lr": 0.5}
    train(finetune_cfg(tmp_path, "self", pretrained, corpora, **{"replay.source": "self", **common}), finetune=True)
    train(finetune_cfg(tmp_path, "stored", pretrained, corpora,
                       **{"replay.source": str(tmp_path / "replay"), "replay.shuffle": False, **common}),
          finetune=True)
    a, _ = load(tmp_path / "self")
    b, _ = load(tmp_path / "stored")
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-3, rtol=0)  # rounding only; other samples differ by >1e-2
