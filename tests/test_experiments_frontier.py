"""The frontier experiment: every method over its grid, the ranking at new-data targets, budgets on the KL line."""

import pytest
import yaml

from selfreplay.experiments.frontier import (_budget_lines, best_at, forgetting_at, frontier_points, line_new_loss_at,
                                             ranking_lines, winners_at)
from selfreplay.experiments.reports import experiment_plot, experiment_report
from selfreplay.experiments.sweep import load_experiment, run_sweep
from test_experiments_sweep import TINY_MODEL, write_yaml


def _point(method, traj, start=3.0, new=None, forgetting=None):
    return {"method": method, "traj": traj, "start": start, "new": new, "forgetting": forgetting}


def test_forgetting_at_a_target_is_read_on_each_trajectory_and_the_best_run_wins():
    fast = _point("plain", [{"valid_loss": 8.0, "prev_loss": 3.0}, {"valid_loss": 6.0, "prev_loss": 4.0},
                            {"valid_loss": 5.0, "prev_loss": 5.0}])
    slow = _point("plain", [{"valid_loss": 8.0, "prev_loss": 3.0}, {"valid_loss": 6.5, "prev_loss": 3.2}])
    careful = _point("kl", [{"valid_loss": 8.0, "prev_loss": 3.0}, {"valid_loss": 5.0, "prev_loss": 3.1}])
    assert forgetting_at(fast, 5.5) == pytest.approx(1.5)  # halfway between (6.0, 4.0) and (5.0, 5.0)
    assert forgetting_at(slow, 5.5) is None
    best = best_at([fast, slow, careful], 5.5)
    assert best["plain"] == pytest.approx(1.5) and best["kl"] == pytest.approx(0.1 * 2.5 / 3)


def _run(method, coeff, end_new, end_prev):
    """A run of strength ``coeff`` going from (new 8.0, old 3.0) to (end_new, end_prev) in one evaluation."""
    return {"method": method, "strength": f"coeff={coeff:g}", "value": coeff, "start": 3.0,
            "traj": [{"valid_loss": 8.0, "prev_loss": 3.0}, {"valid_loss": end_new, "prev_loss": end_prev}]}


def test_the_ranking_names_the_winning_strength_and_flags_grid_edge_winners():
    inside = [_run("inside", 1, 5.0, 3.9), _run("inside", 3, 5.0, 3.3), _run("inside", 10, 5.0, 3.6)]
    # the strongest coefficient that still reaches 5.5 wins: 30 never reaches it, the optimum may lie in between
    strongest = [_run("strongest", 1, 5.0, 4.0), _run("strongest", 10, 5.0, 3.5), _run("strongest", 30, 6.0, 3.1)]
    end = [_run("end", 1, 5.0, 4.0), _run("end", 3, 5.0, 3.8)]  # the grid's last value wins
    wins = winners_at(inside + strongest + end, 5.5)
    assert wins["inside"] == {"forgetting": pytest.approx(0.3 * 2.5 / 3), "strength": "coeff=3", "edge": False}
    assert wins["strongest"]["strength"] == "coeff=10" and wins["strongest"]["edge"]
    assert wins["end"]["strength"] == "coeff=3" and wins["end"]["edge"]
    text = "\n".join(ranking_lines(inside + strongest + end, [5.5]))
    assert "| inside | 0.250 (coeff=3) |" in text and "| strongest | 0.417 (coeff=10 ⚑) |" in text
    assert "grid-edge winners (strongest, end)" in text
    alone = "\n".join(ranking_lines(inside, [5.5]))
    assert "⚑" not in alone and "no grid-edge winner" in alone
    assert "| inside | — |" in "\n".join(ranking_lines(inside, [4.0]))


def _budget_point(target, prev_kl, forgetting, new):
    return {"method": "budget", "value": target, "target_kl": target, "prev_kl": prev_kl, "forgetting": forgetting,
            "new": new, "coeff": 1.0}


def test_the_budget_verdicts_follow_the_runs():
    line = [{"method": "kl_fixed", "forgetting": 0.01, "new": 6.0}, {"method": "kl_fixed", "forgetting": 0.1, "new": 5.0}]
    good = _budget_lines(line + [_budget_point(0.05, 0.06, 10 ** -1.5, 5.5)])  # on the line, 1.2x its target
    assert "within ×1.5 of its target: yes" in good and "(or better than) the KL line: yes" in good
    far = _budget_lines(line + [_budget_point(0.05, 0.2, 10 ** -1.5, 5.5)])  # 4x its target
    assert "within ×1.5 of its target: NO" in far and "the KL line: yes" in far
    worse = _budget_lines(line + [_budget_point(0.05, 0.05, 10 ** -1.5, 5.6)])  # 0.1 nats above the line
    assert "within ×1.5 of its target: yes" in worse and "the KL line: NO" in worse


def test_the_kl_line_is_interpolated_in_log_forgetting():
    line = [{"forgetting": 0.01, "new": 6.0}, {"forgetting": 0.1, "new": 5.0}, {"forgetting": 1.0, "new": 4.5}]
    assert line_new_loss_at(line, 0.1) == pytest.approx(5.0)
    assert line_new_loss_at(line, 10 ** -1.5) == pytest.approx(5.5)  # halfway in log
    assert line_new_loss_at(line, 2.0) is None and line_new_loss_at(line, 0.0) is None


def test_tiny_frontier_sweep_report_and_plot(corpora, tmp_path):
    finetune = {"data.train": corpora["es"], "optim.lr": 3e-3, "stop.steps": 24}
    methods = {"plain": ({}, {"optim.lr": [1e-3, 3e-3]}),
               "l2_init": ({"replay.method": "l2_init"}, {"replay.coeff": [1e-3, 1.0]}),
               "asft": ({"replay.method": "asft"}, {"replay.coeff": [0.1]}),
               "kl_fixed": ({"replay.method": "kl", "replay.source": "self"}, {"replay.coeff": [0.3, 3.0, 30.0]}),
               "budget": ({"replay.method": "kl", "replay.source": "self", "replay.coeff": 3.0},
                          {"replay.target_kl": [0.05]})}
    tree = {"name": "frontier", "report": {"targets": [4.2, 4.0]},
            "common": {"log.progress": False, "data.valid_tokens": 600, "data.batch_size": 16, "replay.method": "none",
                       "optim.warmup_tokens": 0, "eval.every_tokens": 16 * 16 * 4, "replay.batch_size": 8},
            "stages": {"pretrain": {"kind": "pretrain", "base": {"data.train": corpora["en"], "model": TINY_MODEL,
                                                                 "stop.steps": 40, "optim.lr": 3e-3}},
                       **{name: {"kind": "finetune", "from": "pretrain", "base": {**finetune, **base}, "grid": grid}
                          for name, (base, grid) in methods.items()}}}
    exp = load_experiment(write_yaml(tmp_path / "frontier.yaml", tree), "cpu", tmp_path / "runs")
    assert exp.report == {"targets": [4.2, 4.0]}
    assert not run_sweep(exp, in_process=True, log=lambda s: None).failed
    _, points = frontier_points(exp)
    assert sorted({p["method"] for p in points}) == sorted(methods) and len(points) == 9
    text = experiment_report(str(exp.path), "cpu", tmp_path / "runs")
    assert "| plain | lr=0.001 |" in text and "| kl_fixed | coeff=30 |" in text
    assert "| method | at 4.200 | at 4.000 |" in text and "grid-edge winner" in text
    assert "forgetting budgets" in text
    budget = next(p for p in points if p["method"] == "budget")
    assert budget["target_kl"] == 0.05 and budget["coeff"] != 3.0  # the coefficient adapted
    png = experiment_plot(str(exp.path), "cpu", tmp_path / "runs", tmp_path / "frontier.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_shipped_frontier_experiment_covers_every_method():
    exp = load_experiment("experiments/frontier.yaml", "cpu", "runs")
    stages = {s.name: s for s in exp.stages}
    methods = {s.base.get("replay.method", "none") for s in exp.stages if s.kind == "finetune"}
    assert {"none", "replace", "kl_downstream", "asft", "l2_init", "ewc", "ntp", "kl"} <= methods
    assert stages["lora"].grid == {"lora.r": [4, 32]} and "optim.lr" in stages["plain"].grid
    assert stages["budget"].grid == {"replay.target_kl": [0.01, 0.05, 0.2]}
    assert yaml.safe_load(open("experiments/frontier.yaml"))["report"]["targets"]
