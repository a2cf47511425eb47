"""The capacity experiments (§5.4, §5.5a, §5.5b): saturation read off a trajectory, and each YAML's ``smoke`` preset
run end to end from raw text (prepare, sweep, report, plot) — structure, not numbers."""

import lzma
import math
import os
from pathlib import Path

import numpy as np
import pytest

from selfreplay.experiments.capacity import saturation
from selfreplay.experiments.reports import experiment_plot, experiment_report
from selfreplay.experiments.results import collect_results
from selfreplay.experiments.sweep import load_experiment, run_sweep

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def test_saturation_reads_the_loss_at_half_the_tokens():
    traj = [{"tokens": 0, "valid_loss": 9.0}, {"tokens": 1000, "valid_loss": 5.0},
            {"tokens": 4000, "valid_loss": 4.0}, {"tokens": 8000, "valid_loss": 3.7}]
    assert saturation({"params": 100}, traj) == {"tpp": 80.0, "gain": pytest.approx(0.3)}
    # half of 6000 = 3000 lies between 1000 and 4000: log-linear, 5.0 - log(3)/log(4) * 1.0
    traj[-1]["tokens"] = 6000
    assert saturation({"params": 100}, traj)["gain"] == pytest.approx(5.0 - math.log(3) / math.log(4) - 3.7)
    assert saturation({"params": 100}, traj[:1] + traj[-1:])["gain"] is None  # nothing at or before half


def _language(rng, letters: str, n_words: int) -> list[str]:
    return ["".join(rng.choice(list(letters), size=rng.integers(2, 8))) for _ in range(n_words)]


@pytest.fixture(scope="module")
def raw_text(tmp_path_factory) -> Path:
    """``shared/data/{en,es}.txt.xz`` of two synthetic languages, and a working directory beside them (the YAMLs
    read ``../shared/data``)."""
    root = tmp_path_factory.mktemp("capacity")
    (root / "shared" / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, letters in (("en", "etaoinshrdlcumwf"), ("es", "eaosrnidlctumpbgyáé")):
        words = _language(rng, letters, 300)
        lines = [" ".join(rng.choice(words, size=rng.integers(5, 20))) for _ in range(1500)]
        (root / "shared" / "data" / f"{name}.txt.xz").write_bytes(lzma.compress("\n".join(lines).encode()))
    (root / "work").mkdir()
    return root / "work"


def _run_smoke(name: str, workdir: Path):
    old = os.getcwd()
    os.chdir(workdir)
    try:
        exp = load_experiment(str(EXPERIMENTS / f"{name}.yaml"), "smoke", "runs")
        result = run_sweep(exp, in_process=True, log=lambda s: None)
        assert not result.failed, result.failed
        text = experiment_report(str(EXPERIMENTS / f"{name}.yaml"), "smoke", "runs")
        png = experiment_plot(str(EXPERIMENTS / f"{name}.yaml"), "smoke", "runs")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows, _ = collect_results(exp)
        assert all(r["status"] == "finished" for r in rows)
        return exp, text, rows
    finally:
        os.chdir(old)


def _table_rows(text: str, header_word: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and header_word in line)
    out = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        out.append([c.strip() for c in line.strip("|").split("|")])
    return out


def test_model_size_smoke_preset(raw_text):
    exp, text, rows = _run_smoke("model_size", raw_text)
    assert (raw_text / "work_data" / "smoke" / "tok.json").is_file()  # prepared from the raw text
    table = _table_rows(text, "d_model")
    assert [r[0] for r in table] == ["16", "32"]  # one row per width, smallest first
    pre = {r["cfg.model.d_model"]: r for r in rows if r["stage"] == "pretrain"}
    for r in table:  # tokens per parameter as the pretraining run's own tokens / the paper's parameter count
        p = pre[int(r[0])]
        assert float(r[2]) == pytest.approx(p["tokens"] / p["params"], abs=0.01)
        assert r[8].endswith("/2")  # two coefficients per width
    assert "paper, in our loss convention" in text
    assert len([line for line in text.splitlines() if line.startswith("verdict")]) == 1


def test_pretrain_length_smoke_preset(raw_text):
    exp, text, rows = _run_smoke("pretrain_length", raw_text)
    table = _table_rows(text, "length (TPP)")
    assert [r[0] for r in table] == ["0.5", "1"]  # the smoke preset's two lengths, in order
    assert sum(r["stage"] == "finetune" for r in rows) == 4
    verdict = [line for line in text.splitlines() if line.startswith("verdict")]
    assert len(verdict) == 1 and "TPP" in verdict[0]


def test_capacity_frontier_smoke_preset(raw_text):
    exp, text, rows = _run_smoke("capacity_frontier", raw_text)
    mixtures = _table_rows(text, "Spanish fraction")
    assert [r[0] for r in mixtures] == ["0.125", "0.5", "0.875"]
    assert any(r[-1] == "yes" for r in mixtures)  # the frontier holds at least one mixture
    assert "ft_saturated: start" in text and "ft_short: start" in text
    verdicts = [line for line in text.splitlines() if line.startswith("verdict")]
    assert [v.split(":")[0] for v in verdicts] == ["verdict (overtrained)", "verdict (20 TPP)"]


def test_size_length_grid_smoke_preset(raw_text):
    exp, text, rows = _run_smoke("size_length_grid", raw_text)
    assert sum(r["stage"] == "pretrain" for r in rows) == 4 and sum(r["stage"] == "finetune" for r in rows) == 8
    loss = _table_rows(text, "d_model \\ TPP")
    assert [r[0] for r in loss] == ["16", "32"]
    pre = {(r["cfg.model.d_model"], r["cfg.stop.tokens_per_param"]): r for r in rows if r["stage"] == "pretrain"}
    assert loss[0][1].split(" ")[0] == f"{pre[(16, 0.5)]['valid_loss']:.3f}"  # the cell is that model's loss
    assert "forgetting, none:" in text and "forgetting, kl:" in text
    assert text.splitlines()[-1].startswith("verdict: without regularisation")
