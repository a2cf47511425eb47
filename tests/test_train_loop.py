"""The training loop on the built-in GPT: pretraining, finetuning with every replay method and source, the frozen
teacher, bitwise resume (checkpoints, signals), stop criteria, the LR schedule and bad inputs."""

import json
import signal
from pathlib import Path

import pytest
import torch

from conftest import make_corpus, one_line_error, tiny_overrides
from selfreplay.config import TrainConfig, load_config
from selfreplay.errors import SelfReplayError
from selfreplay.evaluate.metrics import read_metrics
from selfreplay.models.builtin import WEIGHTS, load_gpt_run
from selfreplay.replay.sources import DataReplay, SelfGeneratedReplay, StoredReplay
from selfreplay.train import checkpoint as ckpt
from selfreplay.train import prepare, train
from selfreplay.train.build import build_parts
from selfreplay.train.loop import Trainer
from selfreplay.train.signals import Interrupted
from selfreplay.train.optim import lr_factor

TIME_KEYS = ("train_time", "eval_time", "tokens_per_s", "replay_sample_time")  # wall-clock: differ between identical runs


def cfg_for(run_dir, train_corpus, **extra) -> TrainConfig:
    return load_config(TrainConfig, [], tiny_overrides(run_dir, train_corpus, **extra))


def finetune_cfg(tmp_path, name, pretrained, corpora, **extra) -> TrainConfig:
    return cfg_for(tmp_path / name, corpora["es"], **{"model.model_name_or_path": pretrained, "stop.steps": 40,
                                                      **extra})


def make_trainer(cfg: TrainConfig, command: str = "finetune", **kwargs) -> Trainer:
    """What :func:`selfreplay.train.train` builds, before it runs."""
    cfg, kind, info = prepare(cfg, command)
    return Trainer(cfg, build_parts(cfg, kind, command, info.device), info.device, **kwargs)


def same_weights(a_dir, b_dir) -> None:
    a, b = load_gpt_run(a_dir).state_dict(), load_gpt_run(b_dir).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def without_time(records):
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in records]


def test_pretraining_lowers_validation_loss(pretrained):
    records = read_metrics(pretrained)
    assert records[0]["step"] == 0 and records[-1]["step"] == 150
    assert records[-1]["valid_loss"] < records[0]["valid_loss"] - 1.5
    info = json.loads((Path(pretrained) / "run.json").read_text())
    assert info["kind"] == "pretrain" and info["model_kind"] == "gpt"
    assert info["train_corpus"]["domain_token"] == 0
    assert info["git_commit"] is None or isinstance(info["git_commit"], str)
    for name in ("config.yaml", "summary.json", WEIGHTS):
        assert (Path(pretrained) / name).is_file(), name
    assert not ckpt.checkpoint_dir(pretrained).exists()  # a finished run keeps no training checkpoints


@pytest.mark.parametrize("method", ["none", "kl"])
def test_finetuning_records_zero_drift_before_the_first_step(tmp_path, pretrained, corpora, method):
    train(finetune_cfg(tmp_path, "ft", pretrained, corpora, **{"stop.steps": 10, "replay.method": method}),
          "finetune")
    first = read_metrics(tmp_path / "ft")[0]
    assert first["step"] == 0
    assert first["forgetting"] == 0.0 and first["prev_kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["valid_kl"] == pytest.approx(0.0, abs=1e-6) and first["dist_to_teacher"] == 0.0
    assert first["drift"] == 0.0


def test_without_valid_kl_the_new_data_is_scored_without_the_teacher_and_every_other_number_is_the_same(
        tmp_path, pretrained, corpora, monkeypatch):
    """eval.valid_kl=false (the frontier preset): the new data's held-out rows are scored without the teacher's side,
    so no valid_kl; every other recorded number is bit-equal to a default run's."""
    from selfreplay.train import loop

    calls = []
    real_score = loop.score

    def recording_score(model, batches, teacher=None, *args, **kwargs):
        calls.append((kwargs["cache_key"], teacher is not None))
        return real_score(model, batches, teacher, *args, **kwargs)

    monkeypatch.setattr(loop, "score", recording_score)
    records = {}
    for valid_kl in (True, False):
        calls.clear()
        train(finetune_cfg(tmp_path, f"valid_kl_{valid_kl}", pretrained, corpora,
                           **{"stop.steps": 12, "replay.method": "none", "eval.valid_kl": valid_kl}), "finetune")
        assert set(calls) == {("valid", valid_kl), ("prev", True)} and len(calls) >= 4
        records[valid_kl] = without_time(read_metrics(tmp_path / f"valid_kl_{valid_kl}"))
    assert all("valid_kl" in r for r in records[True]) and not any("valid_kl" in r for r in records[False])
    assert records[False] == [{k: v for k, v in r.items() if k != "valid_kl"} for r in records[True]]


def test_finetuning_defaults_to_kl_replay_of_the_teachers_corpus(tmp_path, pretrained, corpora):
    trainer = make_trainer(finetune_cfg(tmp_path, "default", pretrained, corpora))
    assert trainer.penalty.method == "kl" and isinstance(trainer.penalty.source, DataReplay)
    assert trainer.cfg.replay.coeff == 10.0  # the built-in GPT's default
    assert trainer.parts.info["replay"] == {"method": "kl", "source": "prev"}


def test_kl_replay_forgets_far_less_than_plain_finetuning(tmp_path, pretrained, corpora):
    plain = train(finetune_cfg(tmp_path, "plain", pretrained, corpora, **{"replay.method": "none"}), "finetune")
    kl = train(finetune_cfg(tmp_path, "kl", pretrained, corpora, **{"replay.method": "kl"}), "finetune")
    assert plain["forgetting"] > 0.3
    assert kl["forgetting"] < plain["forgetting"] / 3
    assert kl["valid_loss"] < read_metrics(tmp_path / "kl")[0]["valid_loss"] - 0.5


@pytest.fixture(scope="module")
def replay_corpus(pretrained, tmp_path_factory):
    """A replay corpus sampled from the pretrained model by `generate` (48 rows of the full context)."""
    from selfreplay.replay.prompts import Prompts
    from selfreplay.replay.store import generate_replay

    teacher = load_gpt_run(pretrained)
    out = tmp_path_factory.mktemp("replay") / "replay"
    generate_replay(teacher.eval(), out, num_sequences=8 * 2 * 3, prompts=Prompts.domains([0], 64), length=16,
                    batch_size=8 * 2, seed=0, tokenizer_fingerprint=teacher.info["tokenizer_fingerprint"],
                    show_progress=False)
    return str(out)


@pytest.mark.parametrize("method, extra, source_type", [
    ("none", {}, None),
    ("kl", {"replay.source": "prev"}, DataReplay),
    ("kl", {"replay.source": "self", "replay.buffer": 2}, SelfGeneratedReplay),
    ("kl", {"replay.source": "stored"}, StoredReplay),
    ("kl", {"replay.source": "en"}, DataReplay),  # a token corpus path: real replay
    ("ntp", {}, DataReplay),
    ("ntp", {"replay.source": "self", "replay.buffer": 2}, SelfGeneratedReplay),
    ("kl_downstream", {}, None),
    ("replace", {"replay.fraction": 0.25}, DataReplay),
    ("kl", {"replay.divergence": "reverse_kl"}, DataReplay),
    ("kl", {"replay.divergence": "jsd", "replay.jsd_beta": 0.3}, DataReplay),
])
def test_every_replay_method_trains(tmp_path, pretrained, corpora, replay_corpus, method, extra, source_type):
    extra = dict(extra)
    if extra.get("replay.source") == "stored":
        extra["replay.source"] = replay_corpus
    elif extra.get("replay.source") == "en":
        extra["replay.source"] = corpora["en"]
    trainer = make_trainer(finetune_cfg(tmp_path, "run", pretrained, corpora,
                                        **{"replay.method": method, "stop.steps": 15, **extra}))
    assert trainer.penalty.method == method
    assert (type(trainer.penalty.source) if trainer.penalty.source is not None else None) is source_type
    summary = trainer.run()
    assert summary["steps"] == 15 and summary["train_loss"] > 0
    if method in ("kl", "ntp", "kl_downstream"):
        assert summary["train_replay"] > 1e-4
        assert summary["train_loss"] == pytest.approx(summary["train_ntp"] + 10.0 * summary["train_replay"],
                                                      rel=1e-5)
    else:
        assert "train_replay" not in summary and summary["train_loss"] == pytest.approx(summary["train_ntp"])
    records = read_metrics(tmp_path / "run")
    assert records[-1]["valid_loss"] < records[0]["valid_loss"]


def test_teacher_gets_no_gradient_and_stays_frozen(tmp_path, pretrained, corpora):
    trainer = make_trainer(finetune_cfg(tmp_path, "t", pretrained, corpora, **{"replay.method": "kl_downstream"}))
    teacher = trainer.teacher
    assert not teacher.shares_weights and teacher.module is not trainer.model  # full finetuning: a frozen copy
    before = {k: v.clone() for k, v in teacher.module.state_dict().items()}
    student_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for _ in range(3):
        trainer.train_step()
    assert all(p.grad is None and not p.requires_grad for p in teacher.module.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.module.state_dict().items())
    assert any(not torch.equal(student_before[k], v) for k, v in trainer.model.state_dict().items())


def _interrupt_at(step):
    def hook(s):
        if s == step:
            raise KeyboardInterrupt
    return hook


def _at_most(steps):
    """on_step of a resumed run: fail at once (rather than loop for ever) if it runs past its stop.steps."""
    def hook(s):
        assert s <= steps, f"the resumed run went on past stop.steps={steps} (step {s})"
    return hook


@pytest.mark.parametrize("kind", ["pretrain", "finetune_kl", "finetune_kl_self", "finetune_budget", "finetune_ewc"])
def test_resume_ends_with_the_same_weights(tmp_path, corpora, pretrained, kind):
    def cfg(name):
        if kind == "finetune_budget":  # the multiplier and its smoothing state resume too
            return finetune_cfg(tmp_path, name, pretrained, corpora, **{
                "stop.steps": 12, "replay.method": "kl", "replay.source": "self", "replay.target_kl": 0.02,
                "replay.coeff": 1.0, "replay.buffer": 3, "checkpoint.every_steps": 4, "eval.every_steps": 2})
        if kind == "finetune_ewc":  # the Fisher comes from the checkpoint
            return finetune_cfg(tmp_path, name, pretrained, corpora, **{
                "stop.steps": 12, "replay.method": "ewc", "replay.source": "self", "replay.ewc_sequences": 8,
                "checkpoint.every_steps": 4})
        if kind == "pretrain":
            return cfg_for(tmp_path / name, corpora["en"], **{
                "stop.steps": 12, "checkpoint.every_tokens": 16 * 16 * 4, "optim.schedule": "cosine"})
        if kind == "finetune_kl":
            return finetune_cfg(tmp_path, name, pretrained, corpora, **{
                "stop.steps": 12, "replay.method": "kl", "checkpoint.every_tokens": 16 * 16 * 4})
        # self-generated replay: the interruption falls inside a buffer (3 batches of 8 rows per refill)
        return finetune_cfg(tmp_path, name, pretrained, corpora, **{
            "stop.steps": 12, "replay.method": "kl", "replay.source": "self", "replay.buffer": 3,
            "checkpoint.every_steps": 4})
    command = "pretrain" if kind == "pretrain" else "finetune"
    train(cfg("straight"), command)
    with pytest.raises(KeyboardInterrupt):  # raised from on_step: propagates, after the step-4 checkpoint
        train(cfg("crashed"), command, on_step=_interrupt_at(7))
    crashed = tmp_path / "crashed"
    assert ckpt.latest_checkpoint(crashed) == crashed / "checkpoints" / "step_00000004"
    assert (crashed / "checkpoints" / "step_00000004" / ckpt.STATE).is_file()
    assert not (crashed / WEIGHTS).exists() and not (crashed / "summary.json").exists()
    with pytest.raises(SelfReplayError) as e:  # starting over in it is refused
        train(cfg("crashed"), command)
    one_line_error(e, "already holds a run", "--resume")
    summary = train(cfg("crashed"), command, resume=True, on_step=_at_most(12))
    assert summary["steps"] == 12
    assert not ckpt.checkpoint_dir(crashed).exists()
    same_weights(tmp_path / "straight", crashed)
    assert without_time(read_metrics(crashed)) == without_time(read_metrics(tmp_path / "straight"))


def test_evaluation_time_is_counted_apart_from_training_and_carried_through_a_resume(tmp_path, corpora):
    # eval_time (HF's eval_runtime, summed): in every evaluation record, the summary and the checkpoint's counters
    cfg = cfg_for(tmp_path / "run", corpora["en"], **{"stop.steps": 8, "eval.every_steps": 2,
                                                        "checkpoint.every_steps": 4})
    with pytest.raises(KeyboardInterrupt):
        train(cfg, "pretrain", on_step=_interrupt_at(6))
    saved = ckpt.read_state(ckpt.latest_checkpoint(tmp_path / "run"))["counters"]
    logged = {r["step"]: r["eval_time"] for r in read_metrics(tmp_path / "run")}
    assert saved["step"] == 4 and saved["eval_time"] == logged[4]  # the checkpoint carries what was logged
    summary = train(cfg, "pretrain", resume=True, on_step=_at_most(8))
    times = [r["eval_time"] for r in read_metrics(tmp_path / "run")]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 2, 4, 6, 8]
    assert times == sorted(times) and summary["eval_time"] == times[-1] > saved["eval_time"]


def test_a_signal_stops_at_the_next_step_with_a_checkpoint_and_resumes(tmp_path, corpora, pretrained):
    def cfg(name):
        return finetune_cfg(tmp_path, name, pretrained, corpora, **{"stop.steps": 10, "replay.method": "kl"})

    def send_sigint(step):
        if step == 5:
            signal.raise_signal(signal.SIGINT)  # honoured at the step boundary: no checkpointing set up at all

    train(cfg("straight"), "finetune")
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as e:
        train(cfg("stopped"), "finetune", on_step=send_sigint)
    msg = one_line_error(e, "SIGINT", "step 5", "--resume")
    assert e.value.exit_code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is handler  # the loop's handler is removed again
    assert ckpt.latest_checkpoint(tmp_path / "stopped").name == "step_00000005", msg
    train(cfg("stopped"), "finetune", resume=True, on_step=_at_most(10))
    same_weights(tmp_path / "straight", tmp_path / "stopped")


def test_resume_refuses_a_changed_config(tmp_path, corpora):
    with pytest.raises(KeyboardInterrupt):
        train(cfg_for(tmp_path / "r", corpora["en"], **{"stop.steps": 8, "checkpoint.every_tokens": 512}),
              "pretrain", on_step=_interrupt_at(5))
    with pytest.raises(SelfReplayError) as e:
        train(cfg_for(tmp_path / "r", corpora["en"], **{"stop.steps": 8, "checkpoint.every_tokens": 512,
                                                        "optim.lr": 1e-2}), "pretrain", resume=True)
    one_line_error(e, "--resume", "optim.lr")
    with pytest.raises(SelfReplayError) as e:  # nothing to resume from
        train(cfg_for(tmp_path / "empty", corpora["en"], **{"stop.steps": 8}), "pretrain", resume=True)
    one_line_error(e, "--resume", "no training checkpoint")
    # what may change on resume: stop criteria, evaluation, logging (here: a longer run)
    summary = train(cfg_for(tmp_path / "r", corpora["en"], **{"stop.steps": 10, "checkpoint.every_tokens": 512}),
                    "pretrain", resume=True, on_step=_at_most(10))
    assert summary["steps"] == 10


def test_stop_criteria(tmp_path, corpora):
    s = train(cfg_for(tmp_path / "target", corpora["en"], **{"stop.target_loss": 3.6, "stop.steps": 400}), "pretrain")
    assert s["stop_reason"] == "target_loss" and s["valid_loss"] <= 3.6 and s["steps"] < 400
    s = train(cfg_for(tmp_path / "epochs", corpora["en"], **{"stop.epochs": 0.5}), "pretrain")
    assert s["stop_reason"] == "length" and s["epoch"] == pytest.approx(0.5, abs=0.02)
    s = train(cfg_for(tmp_path / "time", corpora["en"], **{"stop.max_time": 0.2}), "pretrain")
    assert s["stop_reason"] == "max_time" and s["train_time"] >= 0.2
    s = train(cfg_for(tmp_path / "tpp", corpora["en"], **{"stop.tokens_per_param": 0.05}), "pretrain")
    assert s["stop_reason"] == "length" and s["tokens"] >= 0.05 * (12 * 32 * 32 + 32 * 64)  # the paper's count
    s = train(cfg_for(tmp_path / "tokens", corpora["en"], **{"stop.tokens": 1000}), "pretrain")
    assert s["stop_reason"] == "length" and s["steps"] == 4 and s["tokens"] == 4 * 16 * 16


def test_early_stop_fires_after_more_than_early_stop_evals_without_improvement(tmp_path, corpora):
    s = train(cfg_for(tmp_path / "early", corpora["en"], **{"stop.early_stop_evals": 2, "optim.lr": 0.3,
                                                             "eval.every_tokens": 256}), "pretrain")
    assert s["stop_reason"] == "early_stop"
    losses = [r["valid_loss"] for r in read_metrics(tmp_path / "early")]
    best = losses.index(min(losses))
    assert len(losses) - 1 - best == 3  # the best, then 3 (> 2) evaluations without a new best
    assert s["best_valid_loss"] == min(losses)


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 100, 400, "cosine", 12) for s in range(12)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[-1] == pytest.approx(0.0, abs=1e-9) and all(a >= b for a, b in zip(f[3:], f[4:]))
    assert [lr_factor(s, 100, 0, "constant", None) for s in range(3)] == [1.0, 1.0, 1.0]
    assert [lr_factor(s, 100, 200, "constant", None) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_the_loop_applies_the_schedule(tmp_path, corpora):
    s = train(cfg_for(tmp_path / "cos", corpora["en"], **{"stop.steps": 8, "optim.schedule": "cosine",
                                                           "optim.warmup_tokens": 16 * 16 * 2,
                                                           "eval.every_steps": 1}), "pretrain")
    lrs = [r["lr"] for r in read_metrics(tmp_path / "cos")]  # the lr of the next update after each step
    expected = [3e-3 * lr_factor(step, 16 * 16, 16 * 16 * 2, "cosine", 8) for step in range(9)]
    assert lrs == pytest.approx(expected)
    assert s["lr"] == pytest.approx(0.0, abs=1e-12)


def test_bad_finetuning_inputs(tmp_path, pretrained, corpora):
    other_vocab = make_corpus(tmp_path / "big", seed=3, domain=1, vocab=128)
    with pytest.raises(SelfReplayError) as e:
        train(finetune_cfg(tmp_path, "a", pretrained, {"es": other_vocab}), "finetune")
    one_line_error(e, "vocab")
    other_tok = make_corpus(tmp_path / "tok", seed=3, domain=1, fingerprint="another")
    with pytest.raises(SelfReplayError) as e:
        train(finetune_cfg(tmp_path, "b", pretrained, {"es": other_tok}), "finetune")
    one_line_error(e, "tokeniz")
    with pytest.raises(SelfReplayError) as e:
        train(finetune_cfg(tmp_path, "c", str(tmp_path / "nope"), corpora), "finetune")
    one_line_error(e, "nope", "not found")  # a missing local path, not a hub id
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(pretrained).iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(SelfReplayError) as e:
        train(finetune_cfg(tmp_path, "d", str(broken), corpora), "finetune")
    one_line_error(e, "corrupt weights")
    with pytest.raises(SelfReplayError) as e:
        train(finetune_cfg(tmp_path, "e", pretrained, corpora, **{"replay.source": str(tmp_path / "nowhere")}),
              "finetune")
    one_line_error(e, "replay.source")
    train(cfg_for(tmp_path / "done", corpora["en"], **{"stop.steps": 2}), "pretrain")
    with pytest.raises(SelfReplayError) as e:
        train(cfg_for(tmp_path / "done", corpora["en"], **{"stop.steps": 2}), "pretrain")
    one_line_error(e, "already holds a run")


def test_generated_replay_corpus_trains_like_the_in_loop_buffer(tmp_path, pretrained, corpora, replay_corpus):
    """`generate` with batch = buffer x replay batch writes exactly the in-loop buffer's samples."""
    # SGD: at step 1 student = teacher, so the KL gradient is float noise (~1e-7) that Adam would rescale into
    # full-size updates; SGD keeps equal-up-to-rounding targets giving equal-up-to-rounding weights.
    common = {"replay.method": "kl", "replay.buffer": 2, "stop.steps": 6, "seed": 0, "optim.name": "sgd",
              "optim.lr": 0.5}
    self_run = make_trainer(finetune_cfg(tmp_path, "self", pretrained, corpora, **{"replay.source": "self",
                                                                                  **common}))
    stored_run = make_trainer(finetune_cfg(tmp_path, "stored", pretrained, corpora, **{
        "replay.source": replay_corpus, "replay.shuffle": False, **common}))
    assert isinstance(self_run.penalty.source, SelfGeneratedReplay)
    assert isinstance(stored_run.penalty.source, StoredReplay)
    sources = [self_run.penalty.source, stored_run.penalty.source]
    starts = [s.state_dict() for s in sources]
    for _ in range(6):  # the same rows in the same order (over 3 buffers)
        assert torch.equal(sources[0].next_batch().tokens, sources[1].next_batch().tokens)
    for source, start in zip(sources, starts):  # rewound: the runs replay those rows from the start
        source.load_state_dict(start)
    self_run.run()
    stored_run.run()
    a, b = load_gpt_run(tmp_path / "self"), load_gpt_run(tmp_path / "stored")
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=1e-3, rtol=0)  # rounding only; other samples differ by >1e-2
