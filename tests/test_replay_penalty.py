"""The one replay penalty: each method against an independent computation, exact teacher targets on every path."""

import pytest
import torch
import torch.nn.functional as F

from conftest import make_corpus
from selfreplay.config import FINETUNE, PRETRAIN, TrainConfig, load_config
from selfreplay.data.batch import Batch
from selfreplay.errors import SelfReplayError
from selfreplay.models.builtin import init_gpt, wrap_gpt
from selfreplay.models.core import Teacher
from selfreplay.models.gpt import GPTConfig
from selfreplay.replay.penalty import ReplayPenalty, replaced_rows
from selfreplay.replay.sources import ReplayBatch
from selfreplay.train import prepare, train
from selfreplay.train.build import build_parts
from selfreplay.train.loop import Trainer

SHAPE = GPTConfig(d_model=32, n_layers=1, head_dim=16, context=12, vocab_size=40)


def _models():
    student = wrap_gpt(init_gpt(SHAPE, 0))
    teacher = Teacher.frozen_copy(wrap_gpt(init_gpt(SHAPE, 1)))
    g = torch.Generator().manual_seed(0)
    data = Batch(torch.randint(11, 40, (3, 12), generator=g))
    replay = ReplayBatch(torch.randint(11, 40, (2, 12), generator=g))
    return student, teacher, data, replay


def _kl(student_logits, teacher_logits):
    t = F.log_softmax(teacher_logits, -1)
    return (t.exp() * (t - F.log_softmax(student_logits, -1))).sum(-1)[:, :-1].sum()


@pytest.mark.parametrize("chunk", [None, 5])
def test_every_method_matches_an_independent_computation(chunk):
    student, teacher, data, replay = _models()
    s_data, s_replay = student(data.tokens), student(replay.tokens)
    with torch.no_grad():
        t_data, t_replay = teacher.module(data.tokens), teacher.module(replay.tokens)
    nll = lambda logits, tok: F.cross_entropy(logits[:, :-1].reshape(-1, 40), tok[:, 1:].reshape(-1),  # noqa: E731
                                              reduction="sum")
    expected = {"kl": _kl(s_replay, t_replay), "ntp": nll(s_replay, replay.tokens),
                "kl_downstream": _kl(s_data, t_data)}
    for method, term in expected.items():
        penalty = ReplayPenalty(method, 2.0, teacher, source=object(), chunk_size=chunk)
        sums = penalty.sums(student, data, replay)
        assert float(sums["ntp"]) == pytest.approx(float(nll(s_data, data.tokens)), rel=1e-5)
        assert float(sums["term"]) == pytest.approx(float(term), rel=1e-5)
        n = torch.tensor(33.0)
        assert float(penalty.loss(sums, n, n)) == pytest.approx(float(sums["ntp"] / 33 + 2.0 * sums["term"] / 33))
    none = ReplayPenalty("none", 10.0).sums(student, data, None)
    assert float(none["term"]) == 0.0


@pytest.mark.parametrize("chunk", [None, 5])
def test_anchored_sft_is_dft_plus_the_divergence_on_the_new_data(chunk):
    """asft: Σ p(y)·NLL(y) with p detached (DFT) on the new data, plus coeff · KL(teacher ‖ student) on it."""
    student, teacher, data, _ = _models()
    logits = student(data.tokens)
    with torch.no_grad():
        t_data = teacher.module(data.tokens)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 40), data.tokens[:, 1:].reshape(-1), reduction="none")
    dft = (nll * torch.exp(-nll).detach()).sum()
    penalty = ReplayPenalty("asft", 0.1, teacher, chunk_size=chunk)
    sums = penalty.sums(student, data, None)
    assert float(sums["ntp"]) == pytest.approx(float(dft), rel=1e-5)
    assert float(sums["term"]) == pytest.approx(float(_kl(logits, t_data)), rel=1e-5)
    # the gradient is DFT's: p · ∇NLL, not ∇(p · NLL)
    grad = torch.autograd.grad(sums["ntp"], student.net.head.weight)[0]
    expected = torch.autograd.grad(dft, student.net.head.weight)[0]
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    same = ReplayPenalty("asft", 0.1, Teacher.frozen_copy(student)).sums(student, data, None)
    assert float(same["term"]) == pytest.approx(0.0, abs=1e-6)  # zero at step 0, where the student is the teacher


def test_replace_takes_the_floor_of_its_fraction_and_refuses_zero_rows():
    assert replaced_rows("replace", 0.125, 32) == 4 and replaced_rows("replace", 0.2, 32) == 6  # floor(6.4)
    assert replaced_rows("kl", 0.125, 32) == 0
    with pytest.raises(SelfReplayError, match="replay.fraction"):
        replaced_rows("replace", 0.01, 32)


def test_kept_targets_are_logits_normalised_at_use():
    """A kept target is the teacher's logits in their own dtype: shifting them changes nothing, bf16 ones are
    normalised in float32 (they sum to one)."""
    student, teacher, _, replay = _models()
    with torch.no_grad():
        logits = teacher.module(replay.tokens)
    penalty = ReplayPenalty("kl", 1.0, teacher, source=object())
    base = penalty.sums(student, None, ReplayBatch(replay.tokens, teacher_targets=logits))["term"]
    shifted = penalty.sums(student, None, ReplayBatch(replay.tokens, teacher_targets=logits + 7.0))["term"]
    recomputed = penalty.sums(student, None, replay)["term"]
    assert float(shifted) == pytest.approx(float(base), rel=1e-6) and float(recomputed) == pytest.approx(float(base))
    half = penalty.sums(student, None, ReplayBatch(replay.tokens, teacher_targets=logits.bfloat16()))["term"]
    assert float(half) == pytest.approx(float(base), rel=2e-2)


@pytest.fixture(scope="module")
def pretrained_small(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    en, es = make_corpus(root / "en", seed=1, domain=0), make_corpus(root / "es", seed=2, domain=1)
    args = {"model.d_model": 32, "model.n_layers": 1, "model.head_dim": 16, "model.context": 16,
            "model.vocab_size": 64, "data.batch_size": 16, "data.valid_tokens": 600, "optim.warmup_tokens": 0,
            "optim.lr": 3e-3, "log.progress": False, "stop.steps": 60, "eval.every_tokens": 10 ** 6}
    train(load_config(TrainConfig, [], [f"{k}={v}" for k, v in {**args, "run_dir": root / "pre",
                                                                   "data.train": en}.items()]), PRETRAIN)
    return root, es


@pytest.mark.parametrize("precision,compile_,source", [
    ("fp32", "false", "prev"), ("fp32", "false", "self"), ("bf16", "false", "prev"), ("bf16", "false", "self"),
    ("bf16", "true", "self")])
def test_student_equal_to_teacher_has_zero_replay_kl_on_every_path(pretrained_small, precision, compile_, source):
    """At step 0 the student is the teacher: the replay KL is 0 to within 1e-7 whether the targets were kept from
    sampling (fp32) or recomputed (bf16 autocast, torch.compile), for real and self-generated replay alike."""
    root, es = pretrained_small
    values = {"run_dir": root / f"{precision}{compile_}{source}", "data.train": es, "stop.steps": 2,
              "model.model_name_or_path": root / "pre", "data.batch_size": 16, "data.valid_tokens": 600,
              "replay.batch_size": 8, "replay.buffer": 2, "replay.method": "kl", "replay.source": source,
              "precision": precision, "compile": compile_, "log.progress": False}
    cfg = load_config(TrainConfig, [], [f"{k}={v}" for k, v in values.items()])
    cfg, kind, info = prepare(cfg, FINETUNE)
    trainer = Trainer(cfg, build_parts(cfg, kind, FINETUNE, info.device), info.device)
    if source == "self":
        assert trainer.penalty.source.keeps_targets == (precision == "fp32")
    assert abs(float(trainer.train_step()["replay"])) < 1e-7


def test_kept_sampling_logits_spare_the_teacher_forward_and_give_the_same_kl(pretrained_small, monkeypatch):
    """fp32 self-generated replay: the sampler's logits are the KL targets, so training runs no teacher forward on
    replay rows, and on a moved student its replay KL equals the one a teacher forward gives (a batch without
    kept targets: one teacher forward); the chosen replay.decode reaches the sampler."""
    root, es = pretrained_small
    calls = []
    for name in ("__call__", "hidden_and_head"):
        original = getattr(Teacher, name)
        monkeypatch.setattr(Teacher, name, lambda self, *a, _f=original, **k: calls.append(1) or _f(self, *a, **k))
    values = {"run_dir": root / "kept", "data.train": es, "stop.steps": 3, "log.progress": False,
              "model.model_name_or_path": root / "pre", "data.batch_size": 16, "data.valid_tokens": 600,
              "replay.batch_size": 8, "replay.buffer": 3, "replay.method": "kl", "replay.source": "self",
              "replay.decode": "static"}
    cfg = load_config(TrainConfig, [], [f"{k}={v}" for k, v in values.items()])
    cfg, kind, info = prepare(cfg, FINETUNE)
    trainer = Trainer(cfg, build_parts(cfg, kind, FINETUNE, info.device), info.device)
    source = trainer.penalty.source
    assert source.decode == "static" and source.keeps_targets
    assert float(trainer.train_step()["replay"]) < 1e-7 and float(trainer.train_step()["replay"]) > 1e-4
    assert calls == []  # two steps, no teacher forward
    kept = source.next_batch()
    with torch.no_grad():
        a = trainer.penalty.sums(trainer.forward, None, kept)["term"]
        b = trainer.penalty.sums(trainer.forward, None, ReplayBatch(kept.tokens, kept.loss_mask))["term"]
    assert len(calls) == 1 and float(a) > 1e-3
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_hugging_face_prefill_computes_the_last_position_only(hf_files):
    """Sampling asks the model for one position of logits at prefill ([rows, 1, V]), not [rows, prompt, V]: a
    chat-prefix prompt of P tokens costs rows x V, not rows x P x V."""
    from hf_fixtures import tiny_tokenizer

    from selfreplay.models.hf import load_hf
    from selfreplay.replay.prompts import Prompts, tokenizer_prompt
    from selfreplay.replay.sources import SelfGeneratedReplay

    model = load_hf(hf_files["llama"], "float32", "cpu")
    shapes = []
    model.net.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.logits.shape)))
    prompt = tokenizer_prompt(tiny_tokenizer(), "bos") + [3, 5, 7, 9]  # a multi-token prompt (as a chat prefix)
    source = SelfGeneratedReplay(Teacher(model), Prompts([prompt]), batch_size=3, length=len(prompt) + 4, buffer=2)
    source.next_batch()
    assert shapes[0] == (6, 1, model.vocab_size) and all(s[1] == 1 for s in shapes)
