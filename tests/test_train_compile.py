"""torch.compile of the training loop, run with Dynamo's capture only (SELFREPLAY_COMPILE_BACKEND=eager: cheap on
the CPU): one compiled forward per role, each compiled during the warm-up and never again, with the uncompiled run's
losses; a role that keeps compiling is logged."""

import logging

import pytest
import torch

from conftest import tiny_overrides
from selfreplay.config import FINETUNE, TrainConfig, load_config
from selfreplay.evaluate.metrics import read_metrics
from selfreplay.train import prepare
from selfreplay.train.build import build_parts
from selfreplay.train.loop import Trainer


def _trainer(run_dir, pretrained, corpora, on_step=None, **extra) -> Trainer:
    # KL replay of 8 rows a step; 40 held-out rows of each data set, scored 12 + 12 + 12 + 4 (a ragged last batch)
    cfg = load_config(TrainConfig, [], tiny_overrides(run_dir, corpora["es"], **{
        "model.model_name_or_path": pretrained, "stop.steps": 30, "eval.batch_size": 12, "log.every_steps": 1,
        **extra}))
    cfg, kind, info = prepare(cfg, FINETUNE)
    return Trainer(cfg, build_parts(cfg, kind, FINETUNE, info.device), info.device, on_step=on_step)


def test_each_role_compiles_during_the_warm_up_only_and_trains_as_eager(tmp_path, pretrained, corpora, monkeypatch):
    """Training forward (grad), evaluation forward (no grad, eval mode), teacher (no grad): separate compiled
    callables; the teacher's second compile is its batch size made dynamic (8 replay rows, 12 evaluation rows).
    Four evaluations, the first before step 1: nothing compiles after the first step."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("SELFREPLAY_COMPILE_BACKEND", "eager")
    _trainer(tmp_path / "eager", pretrained, corpora).run()
    torch._dynamo.reset()  # as in a fresh process: no sizes seen by earlier tests' compiles
    counters.clear()
    after_warm_up = {}
    compiled = _trainer(tmp_path / "compiled", pretrained, corpora, compile="true",
                        on_step=lambda step: after_warm_up.setdefault("frames", counters["frames"]["total"]))
    compiled.run()
    assert counters["frames"]["total"] == after_warm_up["frames"] == 4, "a compile beyond one per role (teacher: 2)"
    roles = compiled.forward, compiled.eval_forward, compiled.teacher.forward_module
    assert {f.role: f.compiles for f in roles} == {"training": 1, "evaluation": 1, "teacher": 2}

    def records(name):
        return [{k: v for k, v in r.items() if isinstance(v, float) and "time" not in k and "per_s" not in k}
                for r in read_metrics(tmp_path / name, train_steps=True)]

    eager, got = records("eager"), records("compiled")
    assert [r["step"] for r in read_metrics(tmp_path / "compiled")] == [0, 10, 20, 30]
    assert len(got) == len(eager) == 34 and "train_replay" in got[-1]  # 30 training steps, 4 evaluations
    assert all(g == pytest.approx(e, rel=1e-6, abs=1e-9) for g, e in zip(got, eager)), (got, eager)


def test_a_role_compiling_past_its_warm_up_is_logged(monkeypatch, caplog):
    from selfreplay.train.optim import CompiledForward

    monkeypatch.setenv("SELFREPLAY_COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    forward = CompiledForward(torch.nn.Linear(4, 4), "training")
    with caplog.at_level(logging.WARNING, logger="selfreplay.train.optim"):
        forward(torch.ones(2, 4))
        forward(torch.ones(3, 4))  # a size changed: compiled again, dynamic (the warm-up allows it)
        forward(torch.ones(5, 4))
        assert forward.compiles == 2 and not caplog.records
        with torch.no_grad():  # grad mode changed: a third compile
            forward(torch.ones(5, 4))
    assert forward.compiles == 3
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile: the training forward compiled again (3 calls compiled; shapes or arguments keep changing, "
        "and past torch._dynamo.config.recompile_limit it runs eager)"]
