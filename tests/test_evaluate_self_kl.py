"""The data-free forgetting meter: KL(teacher ‖ model) on the teacher's own samples, with a bootstrap interval."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli, tiny_overrides
from selfreplay.config import FINETUNE, TrainConfig, load_config
from selfreplay.evaluate.self_kl import bootstrap_ratio, per_sequence_kl, teacher_samples
from selfreplay.models import Teacher, load_model
from selfreplay.train import train


def test_the_bootstrap_interval_holds_the_ratio_of_sums():
    rng = np.random.default_rng(0)
    counts = rng.integers(5, 20, size=200).astype(float)
    sums = counts * rng.gamma(2.0, 0.05, size=200)
    estimate, low, high = bootstrap_ratio(sums, counts, 0.95, resamples=500)
    assert estimate == pytest.approx(sums.sum() / counts.sum())
    assert low < estimate < high
    spread = np.std(sums / counts) / np.sqrt(len(sums))  # about the standard error
    assert 2 * spread < high - low < 8 * spread
    same = bootstrap_ratio(np.full(10, 0.5), np.ones(10))
    assert same == pytest.approx((0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def finetunes(corpora, pretrained, tmp_path_factory):
    root = tmp_path_factory.mktemp("selfkl")
    for name, extra in (("plain", {"replay.method": "none"}), ("kl", {"replay.method": "kl", "replay.coeff": 30.0})):
        train(load_config(TrainConfig, [], tiny_overrides(root / name, corpora["es"], **{
            "model.model_name_or_path": pretrained, "stop.steps": 40, **extra})), FINETUNE)
    return root


def test_the_per_sequence_kl_is_the_full_logit_kl_on_the_teachers_samples(pretrained, finetunes):
    teacher = Teacher(load_model(pretrained, "cpu").eval())
    model = load_model(str(finetunes / "plain"), "cpu").eval()
    batches = teacher_samples(teacher, 5, None, batch_size=2, seed=3)
    assert sum(len(b) for b in batches) == 6 and all((b.tokens[:, 0] == 0).all() for b in batches)  # "en" domain
    sums, counts = per_sequence_kl(model, teacher, batches, torch.device("cpu"), torch.no_grad)
    rows = torch.cat([b.tokens for b in batches])
    with torch.no_grad():
        t = F.log_softmax(teacher.module(rows), -1)[:, :-1]
        s = F.log_softmax(model(rows), -1)[:, :-1]
    expected = (t.exp() * (t - s)).sum(-1).sum(-1)
    np.testing.assert_allclose(sums, expected.numpy(), rtol=1e-4)
    assert (counts == rows.shape[1] - 1).all()
    again = teacher_samples(teacher, 5, None, batch_size=2, seed=3)
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(batches, again))  # seeded


def test_cli_ranks_plain_finetuning_above_kl_replay_and_the_teacher_at_zero(pretrained, finetunes, tmp_path, capsys):
    out = tmp_path / "self.json"
    code, text, err = run_cli(["eval", str(finetunes / "plain"), str(finetunes / "kl"), pretrained, "--teacher",
                               pretrained, "--self", "16", "--json", str(out)], capsys)
    assert code == 0, err
    rows = {r["model"]: r for r in json.loads(out.read_text())["self_kl"]}
    plain, kl, itself = rows[str(finetunes / "plain")], rows[str(finetunes / "kl")], rows[pretrained]
    assert plain["self_kl"] > kl["self_kl"] > 1e-4 and itself["self_kl"] == pytest.approx(0.0, abs=1e-6)
    assert plain["ci_low"] < plain["self_kl"] < plain["ci_high"] and plain["sequences"] == 16
    assert "bootstrap interval" in text


def test_under_bf16_the_meter_scores_the_teacher_itself_at_zero(pretrained):
    from selfreplay.evaluate.self_kl import self_kl_report

    # bf16 autocast emulated on the CPU: the kept fp32 sampling logits against a bf16 forward read a floor of ~4e-5
    (itself,) = self_kl_report([pretrained], 4, teacher=pretrained, batch_size=2, device="cpu", precision="bf16",
                               show_progress=False)
    assert itself["self_kl"] == 0.0 and itself["ci_high"] == 0.0


def test_cli_self_on_a_hugging_face_model(hf_files, tmp_path, capsys):
    from test_train_distributed import hf_args

    train(load_config(TrainConfig, [], hf_args(hf_files, tmp_path / "ft", **{"replay.method": "none"})), FINETUNE)
    code, text, err = run_cli(["eval", str(tmp_path / "ft"), "--self", "4", "--self-length", "12", "--prompt",
                               "chat", "--batch-size", "2"], capsys)
    assert code == 0, err
    assert str(tmp_path / "ft") in text and "[" in text


@pytest.mark.parametrize("argv,words", [(["--self", "1"], ["--self=1"]),
                                        (["--self", "4", "--teacher", "nowhere/at/all"], ["nowhere/at/all"])])
def test_bad_self_options_are_one_line(finetunes, capsys, argv, words):
    code, _, err = run_cli(["eval", str(finetunes / "plain"), *argv], capsys)
    assert code == 2 and err.count("\n") == 1, err
    for w in words:
        assert w in err, err


def test_spearman_matches_the_textbook_formula_and_handles_ties():
    from selfreplay.evaluate.self_kl import spearman

    a, b = [0.0155, 0.0158, 1.97, 0.087, 0.061, 2.37], [0.0147, 0.0145, 1.96, 0.084, 0.060, 2.37]
    d2 = sum((x - y) ** 2 for x, y in zip([1, 2, 5, 4, 3, 6], [2, 1, 5, 4, 3, 6]))
    assert spearman(a, b) == pytest.approx(1 - 6 * d2 / (6 * 35))
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)
    # ties in both: average ranks give 0.947368 (scipy.stats.spearmanr); ordinal ranks would give 0.9
    assert spearman([1, 2, 2, 3, 5], [1, 3, 2, 4, 4]) == pytest.approx(0.947368, abs=1e-6)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_the_data_free_estimate_is_compared_with_each_held_out_set():
    from selfreplay.evaluate.self_kl import compare_with_held_out

    free = [{"model": m, "self_kl": k} for m, k in [("a", 0.01), ("b", 0.1), ("c", 1.0)]]
    rows = [{"model": m, "data": "en", "kl": k, "delta": d} for m, k, d in
            [("a", 0.02, -0.1), ("b", 0.1, 0.2), ("c", 0.5, 0.3)]]
    (line,) = compare_with_held_out(free, rows)
    assert "held-out en (3 models)" in line and "ρ 1.000 with its KL" in line and "median 1.00" in line
    assert compare_with_held_out(free[:2], rows) == []  # fewer than three models: no ranking


def test_the_per_sequence_kl_runs_each_model_once_per_batch(pretrained, finetunes):
    """Two batches of three sampled rows without kept targets: two forwards of the model and two of the teacher
    (not one per row), and the same per-row sums as the teacher's kept targets give."""
    from test_evaluate_metrics import _counting_forward

    teacher = Teacher(load_model(pretrained, "cpu").eval())
    model = load_model(str(finetunes / "plain"), "cpu").eval()
    batches = teacher_samples(teacher, 6, None, batch_size=3, seed=3, keep_targets=False)
    kept = per_sequence_kl(model, teacher, teacher_samples(teacher, 6, None, batch_size=3, seed=3),
                           torch.device("cpu"), torch.no_grad)
    student_calls, teacher_calls = [], []
    _counting_forward(model, student_calls)
    _counting_forward(teacher.module, teacher_calls)
    sums, counts = per_sequence_kl(model, teacher, batches, torch.device("cpu"), torch.no_grad)
    assert student_calls == teacher_calls == [3, 3]
    assert len(sums) == 6 and (sums > 0).all()
    np.testing.assert_allclose(sums, kept[0], rtol=1e-5)
    np.testing.assert_array_equal(counts, kept[1])
