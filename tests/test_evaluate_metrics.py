"""Forgetting metrics (selfreplay.evaluate.metrics): score() against a by-hand computation, parameter drift, the
forgetting baseline of a finetuning run, and metrics.jsonl (truncation on resume, torn lines)."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from selfreplay.config import TrainConfig, load_config
from selfreplay.data.batch import Batch
from selfreplay.data.corpus import Corpus
from selfreplay.data.loader import CorpusLoader
from selfreplay.errors import SelfReplayError
from selfreplay.evaluate.metrics import (METRICS, MetricsLogger, TeacherCache, parameter_norms, read_metrics, score,
                                        score_models)
from selfreplay.models.builtin import load_gpt_run, wrap_gpt
from selfreplay.models.core import Teacher
from selfreplay.models.gpt import GPT, GPTConfig
from selfreplay.train import train

SHAPE = GPTConfig(d_model=32, n_layers=1, head_dim=16, context=8, vocab_size=20)


def _models():
    torch.manual_seed(0)
    model = wrap_gpt(GPT(SHAPE)).eval()
    teacher = Teacher(wrap_gpt(GPT(SHAPE)).eval().requires_grad_(False))
    batches = [Batch(torch.randint(0, 20, (3, 8))), Batch(torch.randint(0, 20, (2, 8)))]
    return model, teacher, batches


def _by_hand(model, teacher, batches, masks=None):
    nll, nll_half, kl, teacher_nll, correct = [], [], [], [], []
    for i, batch in enumerate(batches):
        tokens = batch.tokens
        with torch.no_grad():
            logp = torch.log_softmax(model(tokens).double(), -1).numpy()
            t_logp = torch.log_softmax(teacher(tokens).double(), -1).numpy()
        for b in range(tokens.shape[0]):
            for t in range(7):  # position t predicts token t+1 (labels shifted by one)
                if masks is not None and not masks[i][b, t + 1]:
                    continue
                nll.append(-logp[b, t, tokens[b, t + 1]])
                teacher_nll.append(-t_logp[b, t, tokens[b, t + 1]])
                correct.append(float(logp[b, t].argmax() == tokens[b, t + 1]))
                if t + 1 >= 4:
                    nll_half.append(nll[-1])
                kl.append((np.exp(t_logp[b, t]) * (t_logp[b, t] - logp[b, t])).sum())
    return {"loss": np.mean(nll), "loss_second_half": np.mean(nll_half), "kl": np.mean(kl),
            "teacher_loss": np.mean(teacher_nll), "accuracy": np.mean(correct)}


def _assert_matches(got, want):
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["loss_second_half"] == pytest.approx(want["loss_second_half"], rel=1e-5)
    assert got["kl"] == pytest.approx(want["kl"], rel=1e-4, abs=1e-7)
    assert got["teacher_loss"] == pytest.approx(want["teacher_loss"], rel=1e-5)
    assert got["accuracy"] == pytest.approx(want["accuracy"], rel=1e-9)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_score_matches_a_by_hand_computation(chunk_size):
    model, teacher, batches = _models()
    got = score(model, batches, teacher, chunk_size=chunk_size)
    _assert_matches(got, _by_hand(model, teacher, batches))
    without = score(model, batches)
    assert set(without) == {"loss", "loss_second_half", "accuracy"}
    assert without["loss"] == pytest.approx(got["loss"], rel=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_models_scored_together_get_their_own_numbers_from_one_teacher_pass_per_batch(chunk_size):
    """score_models: each model's numbers are the by-hand ones of that model (masked positions skipped), while the
    teacher runs once per batch for all of them."""
    model, teacher, batches = _models()
    others = [wrap_gpt(GPT(SHAPE)).eval() for _ in range(2)]
    g = torch.Generator().manual_seed(2)
    masks = [(torch.rand(b.tokens.shape, generator=g) > 0.3).float() for b in batches]
    for m in masks:
        m[:, 4:] = torch.maximum(m[:, 4:], torch.eye(m.shape[0], 4))
    masked = [Batch(b.tokens, m) for b, m in zip(batches, masks)]
    recording = _RecordingShapes(teacher.module)
    got = score_models([model, *others], masked, Teacher(recording), chunk_size=chunk_size)
    assert len(recording.shapes) == len(batches)
    for each, metrics in zip([model, *others], got):
        _assert_matches(metrics, _by_hand(each, teacher, batches, masks))
    assert len({m["loss"] for m in got}) == 3


def test_the_evaluation_chunk_keeps_a_chunks_logits_in_a_cpu_cache():
    from selfreplay.evaluate.metrics import eval_chunk_size

    assert eval_chunk_size(4096, "cpu") == 128  # 128 positions x 4096 float32 logits = 2 MiB
    assert eval_chunk_size(512, "cpu") == 1024 and eval_chunk_size(1 << 20, "cpu") == 16
    assert eval_chunk_size(4096, "cpu", 1024) == 1024  # the configured chunk wins
    assert eval_chunk_size(4096, "cuda") is None and eval_chunk_size(4096, "meta", 7) == 7


def test_score_counts_only_target_tokens():
    model, teacher, batches = _models()
    g = torch.Generator().manual_seed(1)
    masks = [(torch.rand(b.tokens.shape, generator=g) > 0.4).float() for b in batches]
    for m in masks:
        m[:, 4:] = torch.maximum(m[:, 4:], torch.eye(m.shape[0], 4))  # some second-half targets in every row
    masked = [Batch(b.tokens, m) for b, m in zip(batches, masks)]
    _assert_matches(score(model, masked, teacher), _by_hand(model, teacher, batches, masks))


def test_score_restores_the_training_mode_and_splits_rows_over_ranks():
    model, teacher, batches = _models()
    model.train()
    whole = score(model, batches, teacher)
    assert model.training
    odd = score(model, batches, teacher, rank=1, world=2)  # every rank scores rows rank, rank + world, ...
    want = score(model, [b.rows(slice(1, None, 2)) for b in batches], teacher)
    assert odd == pytest.approx(want, rel=1e-9)
    assert odd["loss"] != pytest.approx(whole["loss"], rel=1e-6)


class _RecordingShapes(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.shapes = inner, []
        self.vocab_size = inner.vocab_size

    def forward(self, input_ids, *args, **kwargs):
        self.shapes.append(tuple(input_ids.shape))
        return self.inner(input_ids, *args, **kwargs)


def test_score_fills_a_ragged_last_batch_with_rows_that_count_for_nothing():
    """Every forward (the model's, the teacher's) gets the first batch's rows: a compiled model sees one shape."""
    model, teacher, batches = _models()  # 3 rows, then 2
    recording, teacher_recording = _RecordingShapes(model), _RecordingShapes(teacher.module)
    got = score(recording, batches, Teacher(teacher_recording))
    assert recording.shapes == teacher_recording.shapes == [(3, 8), (3, 8)]
    _assert_matches(got, _by_hand(model, teacher, batches))
    even = score(recording, batches, teacher, rank=0, world=2)  # rank 0: rows 0 and 2, then row 0 and a filler
    assert recording.shapes[2:] == [(2, 8), (2, 8)]
    _assert_matches(even, _by_hand(model, teacher, [b.rows(slice(0, None, 2)) for b in batches]))
    # eager (no compiled shape to keep): no filler rows, the same numbers; an empty share still makes its call
    assert score(recording, batches, teacher, same_shape=False) == pytest.approx(got, rel=1e-6)
    assert recording.shapes[4:] == [(3, 8), (2, 8)]
    odd = score(recording, [batches[0], batches[1].rows(slice(0, 1))], teacher, rank=1, world=2, same_shape=False)
    assert recording.shapes[6:] == [(1, 8), (1, 8)]  # rank 1: row 1, then a weightless filler for its empty share
    _assert_matches(odd, _by_hand(model, teacher, [batches[0].rows(slice(1, 2))]))


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_a_teacher_cache_saves_the_teachers_forward_on_later_evaluations_with_the_same_numbers(chunk_size):
    model, teacher, batches = _models()
    g = torch.Generator().manual_seed(2)
    masks = [(torch.rand(b.tokens.shape, generator=g) > 0.3).float() for b in batches]  # rows that do not count
    masked = [Batch(b.tokens, m) for b, m in zip(batches, masks)]
    want = score(model, masked, teacher, chunk_size=chunk_size)
    _assert_matches(want, _by_hand(model, teacher, batches, masks))
    calls = _RecordingShapes(teacher.module)
    counted = Teacher(calls)
    for budget, forwards in ((1 << 20, [2, 0, 0]),  # the teacher's side of every batch fits: made once
                             (3 * 7 * 22 * 4 + 2 * 3 * 8 * 32 * 4, [2, 0, 0]),  # the first batch's side + forward
                             (0, [2, 2, 2])):  # nothing fits: the teacher runs every time
        cache = TeacherCache(budget)
        for expected in forwards:
            calls.shapes.clear()
            assert score(model, masked, counted, chunk_size=chunk_size, teacher_cache=cache, cache_key="v") == want
            assert len(calls.shapes) == expected, budget
    # other rows under the same key are recomputed, not read from the cache
    other = [Batch(torch.randint(0, 20, (3, 8), generator=g)), Batch(torch.randint(0, 20, (2, 8), generator=g))]
    assert score(model, other, teacher, chunk_size=chunk_size, teacher_cache=cache, cache_key="v") == \
        score(model, other, teacher, chunk_size=chunk_size)
    # the student moved: the cached teacher side still gives the by-hand numbers of the new student
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    cache = TeacherCache(1 << 20)
    score(model, masked, teacher, chunk_size=chunk_size, teacher_cache=cache, cache_key="v")
    _assert_matches(score(model, masked, teacher, chunk_size=chunk_size, teacher_cache=cache, cache_key="v"),
                    _by_hand(model, teacher, batches, masks))


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_a_model_that_is_its_teacher_is_scored_by_the_teacher_alone_with_the_same_numbers(chunk_size):
    model, teacher, batches = _models()
    model.net.load_state_dict(teacher.module.net.state_dict())
    masks = [(torch.rand(b.tokens.shape, generator=torch.Generator().manual_seed(3)) > 0.3).float() for b in batches]
    masked = [Batch(b.tokens, m) for b, m in zip(batches, masks)]
    want = _by_hand(model, teacher, batches, masks)
    calls = _RecordingShapes(teacher.module)
    for cache in (None, TeacherCache(1 << 20)):
        model_calls = []
        _counting_forward(model, model_calls)
        got = score(model, masked, Teacher(calls), chunk_size=chunk_size, teacher_cache=cache, cache_key="v",
                    model_is_teacher=True)
        assert model_calls == [] and len(calls.shapes) == 2
        calls.shapes.clear()
        _assert_matches(got, want)
        assert got["kl"] == 0.0 and got["loss"] == got["teacher_loss"]
    # the store that pass filled serves a student that has moved
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    _assert_matches(score(model, masked, teacher, chunk_size=chunk_size, teacher_cache=cache, cache_key="v"),
                    _by_hand(model, teacher, batches, masks))
    assert calls.shapes == []


def test_score_without_target_tokens_is_a_one_line_error():
    model, _, batches = _models()
    with pytest.raises(SelfReplayError, match="no held-out target tokens") as e:
        score(model, [Batch(batches[0].tokens, torch.zeros(3, 8))])
    assert "\n" not in str(e.value)
    with pytest.raises(SelfReplayError, match="no held-out"):  # rank 1's share of a one-row batch is empty
        score(model, [batches[0].rows(slice(0, 1))], rank=1, world=2)


def test_parameter_drift_ratio():
    a, b, c = (torch.nn.Linear(3, 2, bias=False) for _ in range(3))
    with torch.no_grad():
        a.weight.fill_(0.0)  # init
        b.weight.fill_(1.0)  # teacher: moved sqrt(6) from init
        c.weight.fill_(1.5)  # student: moved 0.5 * sqrt(6) from the teacher
    params, teacher, init = (dict(m.named_parameters()) for m in (c, b, a))
    out = parameter_norms(params, teacher, init)
    assert out["drift"] == pytest.approx(0.5) and out["weight_norm"] == pytest.approx(1.5 * 6 ** 0.5)
    assert out["dist_to_teacher"] == pytest.approx(0.5 * 6 ** 0.5)
    assert parameter_norms(params, teacher)["dist_to_teacher"] == pytest.approx(0.5 * 6 ** 0.5)
    assert parameter_norms(params, init=init)["dist_to_init"] == pytest.approx(1.5 * 6 ** 0.5)
    assert set(parameter_norms(params)) == {"weight_norm"}


def test_forgetting_baseline_is_the_unmodified_teacher(tmp_path, pretrained, corpora):
    cfg = load_config(TrainConfig, [], tiny_overrides(tmp_path / "ft", corpora["es"], **{
        "model.model_name_or_path": pretrained, "replay.method": "none", "stop.steps": 20}))
    summary = train(cfg, "finetune")
    # recompute the teacher's loss on the previous corpus's held-out split independently
    teacher = load_gpt_run(pretrained)
    spec = teacher.info["train_corpus"]
    loader = CorpusLoader(Corpus.open(spec["path"]), teacher.context, 1, spec["valid_tokens"],
                          split_seed=spec["split_seed"])
    before = score(teacher, loader.valid_batches(64))["loss"]
    assert summary["prev_loss_before"] == pytest.approx(before, rel=1e-6)
    assert summary["forgetting"] == pytest.approx(summary["prev_loss"] - before, rel=1e-6)
    assert read_metrics(tmp_path / "ft")[0]["forgetting"] == 0.0


def test_metrics_logger_truncates_on_resume(tmp_path):
    logger = MetricsLogger(tmp_path)
    for tokens in (0, 100, 200, 300):
        logger.log({"step": tokens // 100, "tokens": tokens})
    logger.close()
    MetricsLogger(tmp_path, keep_until_step=1).close()
    assert [r["tokens"] for r in read_metrics(tmp_path)] == [0, 100]
    assert json.loads((tmp_path / METRICS).read_text().splitlines()[0])["step"] == 0
    MetricsLogger(tmp_path).close()  # a fresh run starts an empty file
    assert read_metrics(tmp_path) == []


def test_metrics_logger_writes_non_finite_numbers_as_null(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log({"step": 1, "loss": float("nan"), "kl": float("inf"), "lr": 0.5})
    logger.close()
    line = (tmp_path / METRICS).read_text().strip()
    assert json.loads(line) == {"step": 1, "loss": None, "kl": None, "lr": 0.5}
    assert "NaN" not in line and "Infinity" not in line


def test_read_metrics_drops_a_torn_last_line_with_a_warning(tmp_path, caplog):
    assert read_metrics(tmp_path) == []  # no file yet
    logger = MetricsLogger(tmp_path)
    for step in (1, 2):
        logger.log({"step": step, "loss": 1.0 / step})
    logger.close()
    with (tmp_path / METRICS).open("a") as f:
        f.write('{"step": 3, "loss": 0.3')  # killed mid-append
    with caplog.at_level(logging.WARNING, logger="selfreplay.evaluate.metrics"):
        records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert any("torn" in r.getMessage() and "line 3" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="selfreplay.evaluate.metrics"):
        assert [r["step"] for r in read_metrics(tmp_path, warn=False)] == [1, 2]
    assert not caplog.records
    # resuming rewrites the file without the torn line; appends then stay readable
    logger = MetricsLogger(tmp_path, keep_until_step=2)
    logger.log({"step": 3, "loss": 0.3})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_read_metrics_stops_at_garbage_and_skips_blank_lines(tmp_path):
    (tmp_path / METRICS).write_text('{"step": 1}\n\n[1, 2]\n{"step": 3}\n')
    assert read_metrics(tmp_path, warn=False) == [{"step": 1}]  # a non-object line and what follows are dropped
    (tmp_path / METRICS).write_bytes(b'{"step": 1}\n\xff\xfe garbage\n')
    assert read_metrics(tmp_path, warn=False) == [{"step": 1}]


def _counting_forward(module, calls: list) -> None:
    """Record the batch size of every call of ``module``'s forward."""
    forward = module.forward

    def counted(input_ids, *args, **kwargs):
        calls.append(input_ids.shape[0])
        return forward(input_ids, *args, **kwargs)

    module.forward = counted


def test_an_evaluation_runs_the_model_and_the_teacher_once_per_held_out_batch(tmp_path, pretrained, corpora):
    """KL replay with eval.prev: the new data's and the old data's held-out batches, 12 rows each (40 rows: 12 + 12
    + 12 + 4), each scored with one forward of the student and one of the teacher; before the first update, when
    the student is its teacher, with the teacher's alone."""
    from selfreplay.config import FINETUNE
    from selfreplay.train import prepare
    from selfreplay.train.build import build_parts
    from selfreplay.train.loop import Trainer

    cfg = load_config(TrainConfig, [], tiny_overrides(tmp_path / "ft", corpora["es"], **{
        "model.model_name_or_path": pretrained, "replay.method": "kl", "eval.prev": corpora["en"],
        "eval.batch_size": 12, "stop.steps": 1}))
    cfg, kind, info = prepare(cfg, FINETUNE)
    trainer = Trainer(cfg, build_parts(cfg, kind, FINETUNE, info.device), info.device)
    student, teacher = [], []
    _counting_forward(trainer.model, student)
    _counting_forward(trainer.teacher.module, teacher)
    batches = [len(b) for loader in (trainer.data, trainer.parts.prev) for b in loader.valid_batches(12)]
    assert batches == [12, 12, 12, 4] * 2
    first = trainer.evaluate()  # step 0: the student is its teacher
    assert student == [] and teacher == [12, 12, 12, 4] * 2  # eager: the ragged last batch is not padded
    assert first["valid_kl"] == first["prev_kl"] == first["forgetting"] == 0.0
    assert first["prev_loss"] == first["prev_teacher_loss"]
    trainer.teacher_cache = None  # the same numbers from a pass of each model
    both = trainer._score(trainer.parts.prev, trainer.teacher, "prev")
    assert both["loss"] == first["prev_loss"] and both["accuracy"] == first["prev_accuracy"] and both["kl"] == 0.0
    trainer.train_step()
    trainer.state.step = 1
    student.clear()
    teacher.clear()
    record = trainer.evaluate()
    assert student == teacher == [12, 12, 12, 4] * 2
    assert record["prev_kl"] > 1e-4 and record["forgetting"] != 0.0
    trainer.teacher_cache = TeacherCache(1 << 30)
    assert trainer.evaluate() == record
    student.clear()
    teacher.clear()
    assert trainer.evaluate() == record  # the teacher's side is kept (the student has not moved): same numbers
    assert student == [12, 12, 12, 4] * 2 and teacher == []



def test_a_chunked_evaluation_never_imports_the_compiler():
    # torch.utils.checkpoint's first call imports torch._dynamo (seconds of every CPU run's start-up); an evaluation
    # has no backward to recompute for, so its chunks run plainly (and give the by-hand numbers)
    import subprocess
    import sys

    script = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from test_evaluate_metrics import _models
from selfreplay.evaluate.metrics import score
model, teacher, batches = _models()
got = score(model, batches, teacher=teacher, chunk_size=4)
print(json.dumps({"dynamo": "torch._dynamo" in sys.modules, **got}))
"""
    out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got.pop("dynamo") is False
    _assert_matches(got, _by_hand(*_models()))
