"""The toy continual-learning demo: sequential training, replay rows, outputs, bad input."""

import json
import math
from dataclasses import replace

import pytest
import torch

from selfreplay.config import ModelConfig
from selfreplay.demo import (CPU, FULL, DemoConfig, RunResult, ToyReplay, format_table, learning_rate, make_verdict,
                             run_demo, task_steps, train_sequential)
from selfreplay.errors import SelfReplayError
from selfreplay.model import GPT
from selfreplay.toy import EOS, SEQ_LEN, TASK_TOKEN, TASKS, VOCAB_SIZE, make_tasks

TINY = replace(CPU, d_model=32, head_dim=8, batch_size=16, first_task_steps=None, steps_per_task=6, eval_every=3,
               n_train=64, n_valid=16, eval_problems=8, replay_buffer=2, warmup_steps=2, threads=1)


def test_full_preset_is_the_papers():
    assert (FULL.d_model, FULL.n_layers, FULL.head_dim, FULL.batch_size, FULL.lr) == (256, 2, 16, 2048, 1e-4)
    assert (FULL.steps_per_task, FULL.eval_every, FULL.n_train, FULL.n_valid) == (2000, 20, 65_536, 4_096)
    assert FULL.replay_coeff == 10.0 and FULL.replay_batch is None  # replay batch = training batch


@pytest.mark.parametrize("method,source", [("none", "self"), ("ntp", "self"), ("kl", "self"), ("kl", "real"),
                                           ("ntp", "real")])
def test_train_sequential_records_and_determinism(method, source):
    tasks = make_tasks(TINY.n_train, TINY.n_valid, seed=0)
    first = train_sequential(TINY, method, source, tasks, progress=False)
    steps = [r["step"] for r in first.records]
    assert steps == [0, 3, 6, 9, 12, 15, 18, 21, 24]
    assert [r["task"] for r in first.records] == ["add"] * 3 + ["reversal"] * 2 + ["sort"] * 2 + ["modadd"] * 2
    for r in first.records:
        assert r["method"] == method and set(r["accuracy"]) == set(TASKS) and set(r["val_loss"]) == set(TASKS)
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"].values())
    assert first.final_accuracy == first.records[-1]["accuracy"]
    assert first.timings["steps"] == 24 and first.timings["steps_per_second"] > 0
    again = train_sequential(TINY, method, source, tasks, progress=False)
    assert [r["val_loss"] for r in again.records] == [r["val_loss"] for r in first.records]


def test_methods_share_initialisation_and_data_order():
    tasks = make_tasks(TINY.n_train, TINY.n_valid, seed=0)
    none = train_sequential(TINY, "none", "self", tasks, progress=False)
    ntp = train_sequential(TINY, "ntp", "self", tasks, progress=False)
    assert none.records[0] == {**ntp.records[0], "method": "none"}  # step 0: same model
    assert none.records[2]["val_loss"] == ntp.records[2]["val_loss"]  # the first task has nothing to replay


def test_longer_first_task_and_schedule():
    cfg = replace(TINY, first_task_steps=9, steps_per_task=4, eval_every=4)
    assert task_steps(cfg, 4) == [9, 4, 4, 4]
    run = train_sequential(cfg, "none", progress=False)
    assert [r["step"] for r in run.records] == [0, 4, 8, 9, 13, 17, 21]
    cos = replace(CPU, warmup_steps=10)
    assert learning_rate(cos, 0, 0, 100) == pytest.approx(CPU.first_task_lr / 10)
    assert learning_rate(cos, 1, 9, 100) == pytest.approx(CPU.lr * 0.5 * (1 + math.cos(math.pi * 9 / 100)))
    assert learning_rate(FULL, 2, 1000, 2000) == FULL.lr  # the paper's: constant after warmup


def test_self_generated_replay_rows():
    torch.manual_seed(0)
    teacher = GPT(ModelConfig(d_model=32, n_layers=1, head_dim=8, context=SEQ_LEN, vocab_size=VOCAB_SIZE)).eval()
    tasks = make_tasks(32, 8, seed=0)[:3]
    replay = ToyReplay(teacher, tasks, rows=10, buffer=3, source="self", with_logprobs=True, temperature=1.0,
                       generator=torch.Generator().manual_seed(0), autocast=torch.no_grad)
    for _ in range(4):  # crosses a refill
        tokens, logprobs = replay.next_batch()
        assert tokens.shape == (10, SEQ_LEN) and logprobs.shape == (10, SEQ_LEN, VOCAB_SIZE)
        # equal shares of the previous tasks, each row prompted only by its task token
        assert tokens[:, 0].tolist() == [TASK_TOKEN["add"]] * 4 + [TASK_TOKEN["reversal"]] * 3 + \
            [TASK_TOKEN["sort"]] * 3
        assert torch.allclose(logprobs[:, :-1].exp().sum(-1), torch.ones(10, SEQ_LEN - 1))


def test_real_replay_rows_come_from_old_training_sets():
    tasks = make_tasks(32, 8, seed=0)[:2]
    replay = ToyReplay(None, tasks, rows=6, buffer=2, source="real", with_logprobs=False, temperature=1.0,
                       generator=torch.Generator().manual_seed(0), autocast=torch.no_grad)
    tokens, logprobs = replay.next_batch()
    assert logprobs is None and (tokens[:, -1] == EOS).all()
    known = {tuple(r) for t in tasks for r in t.train.tolist()}
    assert all(tuple(r) in known for r in tokens.tolist())


def test_table_and_verdict():
    names = list(TASKS)
    base = RunResult("none", "self", final_accuracy=dict(zip(names, [0.1, 0.0, 0.02, 1.0])))
    kept = RunResult("ntp", "self", final_accuracy=dict(zip(names, [0.99, 1.0, 0.97, 1.0])))
    table = format_table([base, kept], names)
    assert "without replay" in table and "with self-generated replay" in table and "97.0%" in table
    assert len(table.splitlines()) == 2 + len(names)
    verdict = make_verdict(base, kept, names)
    assert verdict.startswith("Verdict:") and "\n" not in verdict and "forgot" in verdict
    assert "inconclusive" in make_verdict(kept, kept, names)


def test_run_demo_writes_outputs(tmp_path):
    lines = []
    result = run_demo(tmp_path / "out", config=TINY, progress=False, echo=lines.append)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"metrics.jsonl", "results.json", "results.md", "demo.png"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["method"] for r in records] == ["none"] * 9 + ["kl"] * 9  # the CPU preset replays with KL
    assert set(records[0]) >= {"method", "task", "step", "accuracy", "val_loss"}
    summary = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in summary["runs"]] == ["none", "kl"]
    assert summary["verdict"] == result.verdict and result.verdict in lines
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert result.table in "\n".join(lines)


@pytest.mark.parametrize("kwargs", [{"method": "none"}, {"method": "bogus"}, {"source": "disk"},
                                    {"steps_per_task": 0}, {"eval_every": -1}, {"device": "tpu"}])
def test_bad_input(tmp_path, kwargs):
    with pytest.raises(SelfReplayError):
        run_demo(tmp_path, config=TINY, progress=False, echo=lambda s: None, **kwargs)


def test_bad_config():
    with pytest.raises(SelfReplayError):
        train_sequential(replace(TINY, batch_size=0), progress=False)
    with pytest.raises(SelfReplayError):
        train_sequential(TINY, method="replace", progress=False)
    assert isinstance(CPU, DemoConfig)
