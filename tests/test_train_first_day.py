"""What a Hugging Face / TRL user expects of a run on day one, on the tiny built-in GPT: warmup in steps / ratio
that scales with the run, a warning when the schedule cannot move the weights, per-step training records
(log.every_steps), an honest live loss, the budget's final coefficient in the summary line, the best checkpoint
(checkpoint.best_metric), and names that can only be local paths refused at once."""

import logging
import re

import pytest
import torch

from conftest import one_line_error, run_cli, tiny_overrides
from selfreplay.config import FINETUNE, PRETRAIN, TrainConfig, load_config
from selfreplay.errors import SelfReplayError
from selfreplay.evaluate.metrics import read_metrics
from selfreplay.train import train

PEAK = 3e-3  # tiny_overrides' optim.lr


def _pretrain(run_dir, corpora, **extra):
    args = tiny_overrides(run_dir, corpora["en"], **{"optim.warmup_tokens": "null", **extra})
    return train(load_config(TrainConfig, [], args), PRETRAIN)


def _train_records(run_dir):
    return [r for r in read_metrics(run_dir, train_steps=True) if r.get("event") == "train"]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------------------------------ warmup


@pytest.mark.parametrize("warmup,lrs", [
    ({}, [PEAK / 2, PEAK, PEAK, PEAK]),  # default: 10% of a 20-step run = 2 steps (the paper's 10M would be ~2400)
    ({"optim.warmup_steps": 4}, [PEAK / 4, PEAK / 2, 3 * PEAK / 4, PEAK]),
    ({"optim.warmup_ratio": 0.15}, [PEAK / 3, 2 * PEAK / 3, PEAK, PEAK]),  # 15% of 20 steps = 3
])
def test_warmup_in_steps_or_ratio_and_a_default_that_scales_with_the_run(corpora, tmp_path, warmup, lrs):
    _pretrain(tmp_path / "run", corpora, **{"stop.steps": 20, "log.every_steps": 1, **warmup})
    got = [r["lr"] for r in _train_records(tmp_path / "run")]
    assert got[:4] == pytest.approx(lrs) and got[-1] == pytest.approx(PEAK)


def test_two_warmup_lengths_and_a_ratio_without_a_length_are_refused(corpora, tmp_path):
    with pytest.raises(SelfReplayError) as e:
        _pretrain(tmp_path / "a", corpora, **{"stop.steps": 5, "optim.warmup_steps": 2, "optim.warmup_ratio": 0.1})
    one_line_error(e, "optim.warmup_steps", "optim.warmup_ratio")
    with pytest.raises(SelfReplayError) as e:
        _pretrain(tmp_path / "b", corpora, **{"stop.max_time": 5, "optim.warmup_ratio": 0.1})
    one_line_error(e, "optim.warmup_ratio", "length criterion")


def test_a_run_that_ends_inside_its_warmup_or_too_slow_to_move_says_so(corpora, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="selfreplay.train.loop"):
        _pretrain(tmp_path / "warm", corpora, **{"stop.steps": 5, "optim.warmup_tokens": 10_000_000})
    lines = [r.getMessage() for r in caplog.records if "warning:" in r.getMessage()]
    assert len(lines) == 1 and "ended inside its warmup (step 5 of 39063 warmup steps)" in lines[0], lines
    assert "optim.warmup_steps" in lines[0] and "\n" not in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="selfreplay.train.loop"):
        _pretrain(tmp_path / "slow", corpora, **{"stop.steps": 5, "optim.warmup_steps": 0, "optim.lr": 1e-7})
    lines = [r.getMessage() for r in caplog.records if "warning:" in r.getMessage()]
    assert len(lines) == 1 and "add up to 5e-07" in lines[0] and "raise optim.lr" in lines[0], lines
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="selfreplay.train.loop"):
        _pretrain(tmp_path / "fine", corpora, **{"stop.steps": 5})
    assert not [r for r in caplog.records if "warning:" in r.getMessage()]


# ------------------------------------------------------------------------------------------ logging


def test_training_records_every_few_steps_are_the_means_of_their_steps(corpora, tmp_path):
    """log.every_steps=4 on a 10-step run: records at steps 4, 8 and 10 (the last, partial window), each the mean
    of the per-step losses that an identical run logging every step records."""
    _pretrain(tmp_path / "each", corpora, **{"stop.steps": 10, "log.every_steps": 1})
    _pretrain(tmp_path / "four", corpora, **{"stop.steps": 10, "log.every_steps": 4})
    each = {r["step"]: r["train_loss"] for r in _train_records(tmp_path / "each")}
    four = _train_records(tmp_path / "four")
    assert [r["step"] for r in four] == [4, 8, 10]
    for r, steps in zip(four, ([1, 2, 3, 4], [5, 6, 7, 8], [9, 10])):
        assert r["train_loss"] == pytest.approx(sum(each[s] for s in steps) / len(steps), rel=1e-5)
        assert r["tokens"] == r["step"] * 16 * 16 and r["tokens_per_s"] > 0 and r["lr"] == pytest.approx(PEAK)
        assert r["replay_coeff"] == 0.0 or "replay_coeff" in r
    # evaluation records are what read_metrics returns by default (reports and sweeps read those)
    assert all("valid_loss" in r for r in read_metrics(tmp_path / "four"))


def test_the_live_loss_is_the_mean_of_the_last_steps_from_the_first_step(corpora, tmp_path, capsys):
    """Progress lines (no terminal: plain lines) show a loss from step 1, and the last line shows the mean of the
    run's last steps (the last training record), not an average refreshed every 25 steps."""
    _pretrain(tmp_path / "run", corpora, **{"stop.steps": 30, "log.every_steps": 8, "log.progress": "true",
                                             "log.progress_every_s": 0})
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if re.match(r"pretrain run: \d+/30 step", line)]
    first = lines[0]
    assert first.startswith("pretrain run: 1/30 step, loss=") or first.startswith("pretrain run: 2/30 step, loss="), \
        lines[:3]
    last_record = _train_records(tmp_path / "run")[-1]
    assert last_record["step"] == 30  # steps 25..30
    assert lines[-1].startswith(f"pretrain run: 30/30 step, loss={last_record['train_loss']:.3f}"), lines[-1]


def test_a_budget_runs_summary_line_names_its_target_and_final_coefficient(corpora, pretrained, tmp_path, capsys):
    args = tiny_overrides(tmp_path / "ft", corpora["es"], **{"model.model_name_or_path": pretrained,
                                                             "stop.steps": 12, "replay.target_kl": 0.05,
                                                             "replay.source": "self", "replay.buffer": 2})
    code, out, err = run_cli(["finetune", *args], capsys)
    assert code == 0, err
    final = read_metrics(tmp_path / "ft")[-1]["replay_coeff"]
    assert final != 10.0  # it moved from its start, so the line says something the config does not
    summary = out.splitlines()[-2]
    assert "target_kl=0.0500" in summary and f"replay_coeff={final:.4f}" in summary, summary


# ------------------------------------------------------------------------------------------ best checkpoint


def test_the_best_evaluation_is_the_saved_model(corpora, pretrained, tmp_path):
    """checkpoint.best_metric=prev_loss (the old data, which plain finetuning on new data forgets): the saved model
    is the weights of the best evaluation after step 0, bit for bit the model a run stopped there saves."""
    base = {"model.model_name_or_path": pretrained, "replay.method": "none", "eval.every_steps": 5}
    run = tmp_path / "best"
    summary = train(load_config(TrainConfig, [], tiny_overrides(run, corpora["es"], **base, **{
        "stop.steps": 20, "checkpoint.best_metric": "prev_loss"})), FINETUNE)
    records = [r for r in read_metrics(run) if r["step"] > 0]
    best = min(records, key=lambda r: r["prev_loss"])
    assert best["step"] < 20  # the old data is forgotten as training goes on: the best is not the last
    assert summary["best_step"] == best["step"] and summary["best_metric_value"] == best["prev_loss"]
    assert not (run / "best").exists() and not (run / "checkpoints").exists()
    short = tmp_path / "short"
    train(load_config(TrainConfig, [], tiny_overrides(short, corpora["es"], **base, **{"stop.steps": best["step"]})),
          FINETUNE)
    got, want = _weights(run / "model.safetensors"), _weights(short / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_a_best_metric_the_run_does_not_log_is_refused_with_the_ones_it_does(corpora, pretrained, tmp_path):
    with pytest.raises(SelfReplayError) as e:
        train(load_config(TrainConfig, [], tiny_overrides(tmp_path / "r", corpora["es"], **{
            "model.model_name_or_path": pretrained, "stop.steps": 4, "checkpoint.best_metric": "eval_loss"})),
            FINETUNE)
    one_line_error(e, "checkpoint.best_metric='eval_loss'", "valid_loss", "prev_loss")


# ------------------------------------------------------------------------------------------ local paths


def test_a_name_that_can_only_be_a_local_path_is_refused_at_once(corpora, pretrained, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    code, _, err = run_cli(["eval", "runs/nonexistent", "--corpus", corpora["en"]], capsys)
    assert code == 2 and err.startswith("error: model runs/nonexistent: not found"), err
    common = {"model.model_name_or_path": pretrained, "stop.steps": 2}
    for key, value, words in (("replay.source", "selff", ["replay.source=selff", "did you mean self?"]),
                              ("replay.source", "runs/old/corpus", ["replay.source=runs/old/corpus", "no such"]),
                              ("eval.prev", "old.jsonl", ["eval.prev=old.jsonl", "no such file"])):
        with pytest.raises(SelfReplayError) as e:
            train(load_config(TrainConfig, [], tiny_overrides(tmp_path / "r", corpora["es"], **common,
                                                               **{key: value})), FINETUNE)
        one_line_error(e, *words)
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_the_live_loss_and_the_training_records_go_on_across_a_resume(corpora, tmp_path, capsys):
    """Interrupted at step 7 and resumed: the training records equal an uninterrupted run's (the window of steps
    6..10 spans the interruption), and the resumed run shows its loss from its first step."""
    import os
    import signal

    from selfreplay.train.signals import Interrupted

    extra = {"stop.steps": 12, "log.every_steps": 5}
    _pretrain(tmp_path / "ref", corpora, **extra)

    def interrupt(step):
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    args = tiny_overrides(tmp_path / "run", corpora["en"], **{"optim.warmup_tokens": "null", **extra})
    with pytest.raises(Interrupted):
        train(load_config(TrainConfig, [], args), PRETRAIN, on_step=interrupt)
    capsys.readouterr()
    resumed = args + ["log.progress=true", "log.progress_every_s=0"]
    train(load_config(TrainConfig, [], resumed), PRETRAIN, resume=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pretrain run: ")]
    assert lines[0].startswith("pretrain run: 8/12 step, loss="), lines[:2]
    ref, run = _train_records(tmp_path / "ref"), _train_records(tmp_path / "run")
    assert [r["step"] for r in run] == [r["step"] for r in ref] == [5, 10, 12]
    assert [r["train_loss"] for r in run] == pytest.approx([r["train_loss"] for r in ref], rel=1e-6)
