"""The forgetting budget: its behaviour on a held start, a lagged student and an infeasible target, its direction on
every model kind and trainer, bad input."""

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


def _lagged_plant(need: float, start: float = 10.0, target: float = 0.05, steps: int = 300, lag: float = 8.0,
                  cosine: bool = False, noise: float = 0.0):
    """A student whose replay KL follows target · need / c with a lag of ``lag`` peak-LR steps, from 0 (the
    teacher's weights), under a 4-step warmup (or a cosine schedule with a 10% warmup); the controller reads the KL
    with lognormal batch noise of ``noise``: the KL ratio to the target after each update."""
    budget, kl, ratios = ForgettingBudget(target, start), 0.0, []
    noises = torch.randn(steps, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * noise
    warmup = steps // 10 if cosine else 4
    for t in range(steps):
        lr_scale = min(1.0, (t + 1) / warmup)
        if cosine and t >= warmup:
            lr_scale = 0.5 * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup)))
        coeff = float(budget.coeff)
        budget.update(torch.tensor(kl) * torch.exp(noises[t] - noise ** 2 / 2), lr_scale)
        ratios.append(kl / target)
        kl += lr_scale / lag * (target * need / coeff - kl)
    return ratios


def test_a_kl_at_the_target_from_the_second_update_on_leaves_the_coefficient_alone():
    budget = ForgettingBudget(target=0.05, start=10.0)
    for kl in [0.0] + [0.05] * 50:  # the first update: the teacher's own weights
        budget.update(torch.tensor(kl))
    assert float(budget.coeff) == pytest.approx(10.0, rel=0.05)
    assert float(budget.smoothed_kl) == pytest.approx(0.05, rel=1e-6)


@pytest.mark.parametrize("noise", [0.0, 0.3])
@pytest.mark.parametrize("need", [1.0, 3.0, 10.0])  # the start 10x too high, 3x too high, right
def test_a_lagged_student_settles_at_the_target_without_overshooting(need, noise):
    ratios = _lagged_plant(need, noise=noise)
    assert max(ratios[30:]) < 1.5  # after the first 10% of the steps (the issue: 2; the earlier design: 1.67)
    assert all(1 / 1.3 < r < 1.3 for r in ratios[-30:])


@pytest.mark.parametrize("noise", [0.0, 0.3])
@pytest.mark.parametrize("need", [1.0, 0.1])  # c must fall 10x / 100x
def test_a_short_cosine_run_reaches_the_target_from_a_start_far_too_high(need, noise):
    # the en_es budget's shape: 150 steps, c from 10 to ~0.1 (the earlier design ended at c 0.37, KL at 0.19x)
    ratios = _lagged_plant(need, steps=150, cosine=True, noise=noise)
    assert 1 / 1.3 < ratios[-1] < 1.3
    assert max(ratios[15:]) < 1.3


@pytest.mark.parametrize("level,holds,falls", [(1.0, True, False), (0.4, True, True), (0.05, False, True)])
def test_a_kl_on_its_way_up_holds_the_coefficient_until_it_levels_off_under_the_target(level, holds, falls):
    # a student starting to move: its KL climbs from 0 towards a level (15% of the rest of the way per step); c
    # holds while the KL climbs towards the target, falls once it levels off under it, and falls at once when the
    # KL climbs to a twentieth of the target only (c is far too high)
    budget, coeffs = ForgettingBudget(target=0.05, start=10.0), []
    for t in range(40):
        budget.update(torch.tensor(0.05 * level * (1 - 0.85 ** t)))
        coeffs.append(float(budget.coeff))
    assert (min(coeffs[:6]) >= 10.0) if holds else (coeffs[5] < 5.0)
    assert (coeffs[-1] < 2.0) if falls else (coeffs[-1] >= 10.0)


def test_through_a_warmup_the_kls_level_lowers_a_coefficient_far_too_high_and_resumes_exactly():
    # the en_es finetune from c = 10, six times its c*: through the 24-step warmup the KL climbs to 0.6 of the
    # target, its trend (from 0) predicting many times the target; holding c there cost 0.04 nats of Spanish
    # against the fixed-coefficient line. At the peak LR the same climb holds c (the start-up test above)
    def kl(t):
        return torch.tensor(0.05 * 0.6 * (1 - 0.85 ** t))

    budget, resumed = ForgettingBudget(0.05, 10.0), ForgettingBudget(0.05, 10.0)
    for t in range(24):
        budget.update(kl(t), lr_scale=(t + 1) / 24)
        if t == 11:  # a checkpoint mid-warmup
            resumed.load_state_dict(json.loads(json.dumps(budget.state_dict())))
        elif t > 11:
            resumed.update(kl(t), lr_scale=(t + 1) / 24)
    assert float(budget.coeff) < 3.0  # the trend alone: 6.2
    assert float(resumed.coeff) == float(budget.coeff)


def test_the_coefficient_rises_over_the_target_at_once_and_resumes_from_its_state():
    loud, quiet = ForgettingBudget(0.1, 2.0), ForgettingBudget(0.1, 2.0)
    for budget, kl in ((loud, 0.5), (quiet, 0.001)):
        budget.update(torch.tensor(5.0))  # the first update: held and left out of the average, whatever its value
        assert float(budget.coeff) == 2.0
        budget.update(torch.tensor(kl))
    assert float(loud.coeff) > 2.0 and float(quiet.coeff) == 2.0  # over the target: at once; under: not yet
    assert float(loud.smoothed_kl) == pytest.approx(0.5)
    resumed = ForgettingBudget(0.1, 2.0)
    resumed.load_state_dict(quiet.state_dict())
    for budget in (resumed, quiet):
        for _ in range(30):
            budget.update(torch.tensor(0.001))
    assert float(resumed.coeff) == float(quiet.coeff) < 2.0


def test_a_checkpoint_from_before_the_integral_resumes_at_its_coefficient():
    old = ForgettingBudget(0.1, 1.0)
    old.load_state_dict({"log_coeff": math.log(3.0), "average": 0.05, "updates": 5.0})
    old.update(torch.tensor(0.1), lr_scale=0.0)  # no step: c stays where the checkpoint left it
    assert float(old.coeff) == pytest.approx(3.0)


def test_the_coefficient_rises_over_the_target_falls_under_it_and_stays_in_its_range():
    over, under = ForgettingBudget(0.01, 1.0), ForgettingBudget(0.01, 1.0)
    for _ in range(30):
        over.update(torch.tensor(0.5))
        under.update(torch.tensor(0.0001))
    assert float(over.coeff) > 1.0 > float(under.coeff)
    capped = ForgettingBudget(0.01, 1.0, step=100.0, coeff_max=3.0)
    with pytest.warns(UserWarning, match=r"replay.target_kl=0.01: .*replay.coeff_max=3 .* above the target"):
        for _ in range(25):  # c is checked every 25 updates
            capped.update(torch.tensor(1.0))
    assert float(capped.coeff) == pytest.approx(3.0)
    restored = ForgettingBudget(0.01, 1.0)
    restored.load_state_dict(over.state_dict())
    assert float(restored.coeff) == float(over.coeff) and float(restored.smoothed_kl) == float(over.smoothed_kl)


def test_a_feasible_target_is_not_warned_about():
    import warnings

    budget = ForgettingBudget(0.05, 1.0, coeff_min=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(50):
            budget.update(torch.tensor(0.05))


def _coeffs(run_dir) -> list[float]:
    return [r["replay_coeff"] for r in read_metrics(run_dir)]


@pytest.mark.parametrize("target,direction", [(1e-6, "up"), (10.0, "down")])
def test_a_built_in_gpt_budget_moves_the_coefficient_the_right_way(corpora, pretrained, tmp_path, target, direction):
    args = tiny_overrides(tmp_path / "run", corpora["es"], **{
        "model.model_name_or_path": pretrained, "replay.source": "self", "replay.target_kl": target,
        "replay.coeff": 1.0, "replay.target_kl_smoothing": 0.5, "stop.steps": 12, "eval.every_steps": 4})
    train(load_config(TrainConfig, [], args), FINETUNE)
    records = read_metrics(tmp_path / "run")
    coeffs = _coeffs(tmp_path / "run")
    assert coeffs[0] == 1.0 and all("replay_kl_smoothed" in r for r in records)
    assert (coeffs[-1] > 1.0) if direction == "up" else (coeffs[-1] < 1.0)
    assert records[-1]["replay_kl_smoothed"] > 1e-4


def test_the_trainer_steps_the_coefficient_at_the_pace_of_its_learning_rate(corpora, pretrained, tmp_path):
    # a target far above any KL: c falls once released, the less the lower the LR (a warmup over the whole run)
    ends = {}
    for name, warmup in (("peak", 0), ("warmup", 16 * 16 * 30)):
        args = tiny_overrides(tmp_path / name, corpora["es"], **{
            "model.model_name_or_path": pretrained, "replay.source": "self", "replay.target_kl": 10.0,
            "replay.coeff": 1.0, "replay.target_kl_smoothing": 0.5, "stop.steps": 30, "optim.warmup_tokens": warmup})
        ends[name] = train(load_config(TrainConfig, [], args), FINETUNE)["replay_coeff"]
    assert ends["peak"] < ends["warmup"] < 1.0


@pytest.mark.parametrize("target,direction", [(1e-6, "up"), (10.0, "down")])
def test_a_hugging_face_budget_moves_the_coefficient_the_right_way(hf_files, tmp_path, target, direction):
    from test_train_distributed import hf_args

    train(load_config(TrainConfig, [], hf_args(hf_files, tmp_path / "run", **{
        "replay.source": "self", "replay.target_kl": target, "replay.coeff": 1.0, "replay.target_kl_smoothing": 0.5,
        "stop.steps": 6})), FINETUNE)
    coeffs = _coeffs(tmp_path / "run")
    assert coeffs[0] == 1.0 and ((coeffs[-1] > 1.0) if direction == "up" else (coeffs[-1] < 1.0))


@pytest.mark.parametrize("override,words", [
    ("replay.target_kl=0", ["replay.target_kl=0", "positive"]),
    ("replay.target_kl=-0.1", ["replay.target_kl=-0.1"]),
    ("replay.method=ntp", ["replay.target_kl", "replay.method=ntp", "has none"]),
    ("replay.method=l2_init", ["replay.target_kl", "l2_init"]),
    ("replay.coeff=0", ["replay.coeff=0", "positive coefficient"]),
    ("replay.target_kl_gain=-1", ["replay.target_kl_gain=-1", "zero or positive"]),
    ("replay.divergence=jsd", ["replay.target_kl", "replay.divergence=jsd", "forward KL"]),
    ("replay.divergence=reverse_kl", ["replay.divergence=reverse_kl", "replay.divergence=forward_kl"]),
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
        "model.model_name_or_path": pretrained, "replay.source": "self", "replay.target_kl": 1e-4,
        "replay.coeff": 1.0, "stop.steps": 2})
    summary = train(load_config(TrainConfig, [], args), FINETUNE)
    assert summary["replay_coeff"] != 1.0 and "replay_kl_smoothed" in summary
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "target_kl: 0.0001" in config
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["replay_coeff"] == summary["replay_coeff"]
