"""The forgetting budget: the update rule, its direction on every model kind and trainer, bad input."""

import json
import math

import pytest
import torch

from conftest import one_line_error, run_cli, tiny_overrides
from selfreplay.config import FINETUNE, TrainConfig, load_config
from selfreplay.errors import SelfReplayError
from selfreplay.evaluate.metrics import read_metrics
from selfreplay.replay.budget import ForgettingBudget
from selfreplay.train import train
from selfreplay.train.optim import lr_factor


@pytest.mark.parametrize("gain", [0.0, 1.0])
def test_the_update_is_dual_ascent_on_log_c_from_a_bias_corrected_average_at_the_pace_of_the_lr(gain):
    budget = ForgettingBudget(target=0.1, start=2.0, step=0.2, smoothing=0.9, coeff_min=0.5, coeff_max=100.0,
                              gain=gain)
    integral, average, released = math.log(2.0), 0.0, False
    kls, lr_scales = [0.0, 0.3, 0.5, 0.05, 2.0, 0.1, 0.01], [0.2, 0.6, 1.0, 1.0, 0.7, 0.3, 0.0]
    for t, (kl, lr_scale) in enumerate(zip(kls, lr_scales), start=1):
        budget.update(torch.tensor(kl), lr_scale)
        average = 0.9 * average + 0.1 * kl
        smoothed = average / (1 - 0.9 ** t)
        released = released or smoothed >= 0.1 or t > 1  # the first update's KL is at the teacher's weights: held
        error = min(max(math.log(max(smoothed, 0.1 * 1e-6) / 0.1), -2.0), 0.05) if released else 0.0
        integral = min(max(integral + 0.2 * lr_scale * error, math.log(0.5)), math.log(100.0))
        log_c = min(max(integral + gain * error, math.log(0.5)), math.log(100.0))
        assert float(budget.smoothed_kl) == pytest.approx(smoothed, rel=1e-6)  # the KL arrives as float32
        assert float(budget.coeff) == pytest.approx(math.exp(log_c), rel=1e-6)


def test_the_coefficient_holds_at_the_first_update_unless_the_kl_reaches_the_target_first():
    quiet, loud = ForgettingBudget(0.1, 2.0), ForgettingBudget(0.1, 2.0)
    quiet.update(torch.tensor(0.001))  # a student that has barely moved: the KL says nothing about c yet
    loud.update(torch.tensor(0.5))
    assert float(quiet.coeff) == pytest.approx(2.0) and float(loud.coeff) > 2.0
    quiet.update(torch.tensor(0.001))  # released
    assert float(quiet.coeff) < 2.0
    resumed = ForgettingBudget(0.1, 2.0)
    resumed.load_state_dict(loud.state_dict())
    resumed.update(torch.tensor(0.0))
    loud.update(torch.tensor(0.0))
    assert float(resumed.coeff) == float(loud.coeff)


def test_a_checkpoint_from_before_the_integral_resumes_at_its_coefficient():
    old = ForgettingBudget(0.1, 1.0)
    old.load_state_dict({"log_coeff": math.log(3.0), "average": 0.05, "updates": 5.0})
    old.update(torch.tensor(0.1), lr_scale=0.0)  # no step: c stays where the checkpoint left it
    assert float(old.coeff) == pytest.approx(3.0)


def test_the_coefficient_rises_over_the_target_falls_under_it_and_stays_in_its_range():
    over, under = ForgettingBudget(0.01, 1.0), ForgettingBudget(0.01, 1.0)
    for _ in range(10):
        over.update(torch.tensor(0.5))
        under.update(torch.tensor(0.0001))
    assert float(over.coeff) > 1.0 > float(under.coeff)
    capped = ForgettingBudget(0.01, 1.0, step=100.0, coeff_max=3.0)
    capped.update(torch.tensor(1.0))
    assert float(capped.coeff) == pytest.approx(3.0)
    restored = ForgettingBudget(0.01, 1.0)
    restored.load_state_dict(over.state_dict())
    assert float(restored.coeff) == float(over.coeff) and float(restored.smoothed_kl) == float(over.smoothed_kl)


def _coeffs(run_dir) -> list[float]:
    return [r["replay_coeff"] for r in read_metrics(run_dir)]


@pytest.mark.parametrize("target,direction", [(1e-6, "up"), (10.0, "down")])
def test_a_built_in_gpt_budget_moves_the_coefficient_the_right_way(corpora, pretrained, tmp_path, target, direction):
    args = tiny_overrides(tmp_path / "run", corpora["es"], **{
        "model.model_name_or_path": pretrained, "replay.source": "self", "replay.target_kl": target,
        "replay.coeff": 1.0, "stop.steps": 12, "eval.every_steps": 4})
    train(load_config(TrainConfig, [], args), FINETUNE)
    records = read_metrics(tmp_path / "run")
    coeffs = _coeffs(tmp_path / "run")
    assert coeffs[0] == 1.0 and all("replay_kl_smoothed" in r for r in records)
    assert (coeffs[-1] > 1.0) if direction == "up" else (coeffs[-1] < 1.0)
    assert records[-1]["replay_kl_smoothed"] > 1e-4


def test_the_trainer_steps_the_coefficient_at_the_pace_of_its_learning_rate(corpora, pretrained, tmp_path):
    # a target far above any KL: every released update is log c -= step · 2 · (that step's LR / peak LR)
    args = tiny_overrides(tmp_path / "run", corpora["es"], **{
        "model.model_name_or_path": pretrained, "replay.source": "self", "replay.target_kl": 10.0,
        "replay.coeff": 1.0, "stop.steps": 10, "optim.warmup_tokens": 16 * 16 * 4, "optim.schedule": "cosine"})
    summary = train(load_config(TrainConfig, [], args), FINETUNE)
    scales = [lr_factor(s, 16 * 16, 16 * 16 * 4, "cosine", 10) for s in range(1, 10)]  # the first update holds
    assert summary["replay_coeff"] == pytest.approx(math.exp(-0.2 * 2.0 * sum(scales)), rel=1e-5)


@pytest.mark.parametrize("target,direction", [(1e-6, "up"), (10.0, "down")])
def test_a_hugging_face_budget_moves_the_coefficient_the_right_way(hf_files, tmp_path, target, direction):
    from test_train_distributed import hf_args

    train(load_config(TrainConfig, [], hf_args(hf_files, tmp_path / "run", **{
        "replay.source": "self", "replay.target_kl": target, "replay.coeff": 1.0, "stop.steps": 6})), FINETUNE)
    coeffs = _coeffs(tmp_path / "run")
    assert coeffs[0] == 1.0 and ((coeffs[-1] > 1.0) if direction == "up" else (coeffs[-1] < 1.0))


@pytest.mark.parametrize("override,words", [
    ("replay.target_kl=0", ["replay.target_kl=0", "positive"]),
    ("replay.target_kl=-0.1", ["replay.target_kl=-0.1"]),
    ("replay.method=ntp", ["replay.target_kl", "replay.method=ntp", "has none"]),
    ("replay.method=l2_init", ["replay.target_kl", "l2_init"]),
    ("replay.coeff=0", ["replay.coeff=0", "positive coefficient"]),
    ("replay.target_kl_gain=-1", ["replay.target_kl_gain=-1", "zero or positive"]),
])
def test_a_budget_that_cannot_work_is_one_line(corpora, pretrained, tmp_path, capsys, override, words):
    args = tiny_overrides(tmp_path / "run", corpora["es"], **{
        "model.model_name_or_path": pretrained, "replay.target_kl": 0.05, "stop.steps": 3})
    code, _, err = run_cli(["finetune", *args, override], capsys)
    assert code == 2 and err.count("\n") == 1, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SelfReplayError) as e:
        train(load_config(TrainConfig, [], [*args, override]), FINETUNE)
    one_line_error(e, *words)


def test_the_budget_goes_with_the_run_record(corpora, pretrained, tmp_path):
    args = tiny_overrides(tmp_path / "run", corpora["es"], **{
        "model.model_name_or_path": pretrained, "replay.source": "self", "replay.target_kl": 0.05,
        "replay.coeff": 1.0, "stop.steps": 2})
    summary = train(load_config(TrainConfig, [], args), FINETUNE)
    assert summary["replay_coeff"] != 1.0 and "replay_kl_smoothed" in summary
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "target_kl: 0.05" in config
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["replay_coeff"] == summary["replay_coeff"]
