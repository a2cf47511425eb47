"""Experiment reports and figures: interpolation at the target, the frontier, and a tiny method comparison."""

import pytest

from conftest import one_line_error
from selfreplay.errors import SelfReplayError
from selfreplay.experiments.capacity import frontier_gap, pareto_frontier
from selfreplay.experiments.reports import experiment_plot, experiment_report
from selfreplay.experiments.results import at_target, collect_results, finetune_point
from selfreplay.experiments.sweep import load_experiment, run_sweep
from test_experiments_sweep import TINY_MODEL, write_yaml


def test_at_target_interpolates_between_evaluations():
    traj = [{"valid_loss": 9.0, "prev_loss": 3.0, "train_time": 0.0, "tokens": 0, "step": 0},
            {"valid_loss": 7.0, "prev_loss": 3.5, "train_time": 10.0, "tokens": 100, "step": 10},
            {"valid_loss": 5.0, "prev_loss": 4.5, "train_time": 20.0, "tokens": 200, "step": 20}]
    hit = at_target(traj, 6.0)
    assert hit == {"valid_loss": 6.0, "prev_loss": 4.0, "train_time": 15.0, "tokens": 150, "step": 15}
    assert at_target(traj, 7.0)["prev_loss"] == 3.5
    assert at_target(traj, 4.0) is None
    point = finetune_point({"prev_loss_before": 3.0}, traj, 4.0)  # not reached: the run's end
    assert not point["reached"] and point["forgetting"] == pytest.approx(1.5)


def test_frontier_is_the_pareto_set():
    pts = [(2.7, 3.8), (2.8, 3.2), (2.9, 3.3), (3.0, 3.0), (3.5, 2.9)]
    front = pareto_frontier(pts)
    assert front == [(2.7, 3.8), (2.8, 3.2), (3.0, 3.0), (3.5, 2.9)]
    assert frontier_gap(front, 2.9, 3.0) == pytest.approx(-0.1)  # below the line from (2.8,3.2) to (3.0,3.0)
    assert frontier_gap(front, 4.0, 3.0) == pytest.approx(0.1)  # right of the curve: against its English end
    assert frontier_gap(front, 2.6, 3.7) == pytest.approx(-0.1)  # left of it and lower: dominates its Spanish end
    assert frontier_gap([], 3.0, 3.0) is None


def test_tiny_method_comparison_report_and_plot(corpora, tmp_path):
    tree = {
        "name": "method_comparison",
        "common": {"log.progress": False, "data.valid_tokens": 600, "data.batch_size": 16,
                   "optim.warmup_tokens": 0, "eval.every_tokens": 16 * 16 * 2, "replay.batch_size": 8},
        "paper": {"forgetting": {"plain": 0.113, "kl_real": 0.003}},
        "stages": {
            "pretrain": {"kind": "pretrain", "base": {"data.train": corpora["en"], "model": TINY_MODEL,
                                                      "stop.steps": 40, "optim.lr": 3e-3}},
            "finetune": {"kind": "finetune", "from": "pretrain",
                         "base": {"data.train": corpora["es"], "optim.lr": 3e-3, "stop.target_loss": 3.9,
                                  "stop.steps": 40, "replay.coeff": 3.0},
                         # finetuning defaults to KL replay now: the plain run says so
                         "variants": {"plain": {"replay.method": "none"},
                                      "kl_real": {"replay.method": "kl", "replay.source": "prev"}}}},
    }
    exp = load_experiment(write_yaml(tmp_path / "mc.yaml", tree), "cpu", tmp_path / "runs")
    with pytest.raises(SelfReplayError) as e:
        experiment_report(str(exp.path), "cpu", tmp_path / "runs")
    one_line_error(e, "no runs", "selfreplay sweep")
    assert not run_sweep(exp, in_process=True, log=lambda s: None).failed

    text = experiment_report(str(exp.path), "cpu", tmp_path / "runs")
    rows, traj = collect_results(exp)
    plain_traj = [t for t in traj if t["run"] == "plain"]
    plain_row = next(r for r in rows if r["run"] == "plain")
    expected = at_target(plain_traj, 3.9)["prev_loss"] - plain_row["prev_loss_before"]
    assert f"| plain | {plain_row['prev_loss_before']:.3f} |" in text
    assert f"{expected:.3f}" in text  # plain's forgetting at the target, as interpolated independently
    assert "| 0.113 |" in text  # the paper's number beside ours
    assert "done-when ≤ 1/5" in text
    png = experiment_plot(str(exp.path), "cpu", tmp_path / "runs", tmp_path / "fig.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
