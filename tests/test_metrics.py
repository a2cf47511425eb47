import json

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from selfreplay.checkpoint import load_model
from selfreplay.config import ModelConfig, TrainConfig, load_config
from selfreplay.data import BatchLoader, Corpus
from selfreplay.metrics import MetricsLogger, evaluate, parameter_norms, read_metrics
from selfreplay.model import GPT
from selfreplay.trainer import train


def test_evaluate_matches_a_by_hand_computation():
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=32, n_layers=1, head_dim=16, context=8, vocab_size=20)).eval()
    teacher = GPT(ModelConfig(d_model=32, n_layers=1, head_dim=16, context=8, vocab_size=20)).eval()
    batches = [torch.randint(0, 20, (3, 8)), torch.randint(0, 20, (2, 8))]
    got = evaluate(model, batches, teacher)
    nll, nll_half, kl, teacher_nll = [], [], [], []
    for tokens in batches:
        logp = torch.log_softmax(model(tokens).double(), -1).detach().numpy()
        t_logp = torch.log_softmax(teacher(tokens).double(), -1).detach().numpy()
        for b in range(tokens.shape[0]):
            for t in range(7):  # position t predicts token t+1 (labels shifted by one)
                nll.append(-logp[b, t, tokens[b, t + 1]])
                teacher_nll.append(-t_logp[b, t, tokens[b, t + 1]])
                if t + 1 >= 4:
                    nll_half.append(nll[-1])
                kl.append((np.exp(t_logp[b, t]) * (t_logp[b, t] - logp[b, t])).sum())
    assert got["loss"] == pytest.approx(np.mean(nll), rel=1e-5)
    assert got["loss_second_half"] == pytest.approx(np.mean(nll_half), rel=1e-5)
    assert got["kl"] == pytest.approx(np.mean(kl), rel=1e-4)
    assert got["teacher_loss"] == pytest.approx(np.mean(teacher_nll), rel=1e-5)


def test_parameter_drift_ratio():
    a, b, c = (torch.nn.Linear(3, 2, bias=False) for _ in range(3))
    with torch.no_grad():
        a.weight.fill_(0.0)  # init
        b.weight.fill_(1.0)  # teacher: moved sqrt(6) from init
        c.weight.fill_(1.5)  # student: moved 0.5 * sqrt(6) from the teacher
    out = parameter_norms(c, b, dict(a.named_parameters()))
    assert out["drift"] == pytest.approx(0.5) and out["weight_norm"] == pytest.approx(1.5 * 6 ** 0.5)


def test_forgetting_baseline_is_the_unmodified_teacher(tmp_path, pretrained, corpora):
    cfg = load_config(TrainConfig, [], tiny_overrides(tmp_path / "ft", corpora["es"], init_from=pretrained,
                                                      **{"stop.steps": 20}))
    summary = train(cfg, finetune=True)
    # recompute the teacher's loss on the previous corpus's held-out split independently
    teacher, info = load_model(pretrained)
    spec = info["train_corpus"]
    loader = BatchLoader(Corpus.open(spec["path"]), teacher.config.context, 1, spec["valid_tokens"],
                         spec["split_seed"])
    before = evaluate(teacher.eval(), loader.valid_batches(64))["loss"]
    assert summary["prev_loss_before"] == pytest.approx(before, rel=1e-6)
    assert summary["forgetting"] == pytest.approx(summary["prev_loss"] - before, rel=1e-6)
    assert read_metrics(tmp_path / "ft")[0]["forgetting"] == 0.0


def test_metrics_logger_truncates_on_resume(tmp_path):
    logger = MetricsLogger(tmp_path)
    for tokens in (0, 100, 200, 300):
        logger.log({"step": tokens // 100, "tokens": tokens})
    logger.close()
    MetricsLogger(tmp_path, keep_until_tokens=150).close()
    assert [r["tokens"] for r in read_metrics(tmp_path)] == [0, 100]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["step"] == 0
