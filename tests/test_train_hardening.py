"""Bad luck and bad input: divergence, signals, crash windows, torn files, two writers, full disks, bad values."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import fill_disk, run_cli, tiny_overrides
from selfreplay.config import FINETUNE, TrainConfig, load_config
from selfreplay.errors import SelfReplayError
from selfreplay.evaluate.metrics import read_metrics
from selfreplay.train import checkpoint as ckpt
from selfreplay.train import train

TIMING = {"train_time", "eval_time", "tokens_per_s", "replay_sample_time"}


def strict_json(text: str):
    def no_constants(name):
        raise ValueError(f"non-JSON constant {name}")

    return json.loads(text, parse_constant=no_constants)


def _finetune_args(run_dir, corpora, pretrained, **extra) -> list[str]:
    return tiny_overrides(run_dir, corpora["es"], **{"model.model_name_or_path": pretrained, "stop.steps": 20, **extra})


def _weights(run_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "model.safetensors"))


def _same_records(a, b) -> None:
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(read_metrics(a)) == strip(read_metrics(b))


# ------------------------------------------------------------------------------------------------ divergence

def test_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(corpora, pretrained, tmp_path, capsys):
    run_dir = tmp_path / "diverged"
    args = _finetune_args(run_dir, corpora, pretrained, **{"optim.lr": 1e9, "stop.target_loss": 0.01,
                                                           "checkpoint.every_steps": 1, "replay.method": "none",
                                                           "eval.every_steps": 1})
    code, _, err = run_cli(["finetune", *args], capsys)
    assert code == 2 and "diverged" in err and err.count("\n") == 1, err
    assert not (run_dir / "summary.json").exists() and not (run_dir / "model.safetensors").exists()
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        strict_json(line)  # valid JSON: no bare NaN
    good = ckpt.latest_checkpoint(run_dir)
    assert good is not None  # the last checkpoint written while the weights were finite
    state = ckpt.read_state(good)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_non_finite_weights_are_refused_on_load(pretrained, corpora, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan_run"
    shutil.copytree(pretrained, bad)
    state = load_file(str(bad / "model.safetensors"))
    state["head.weight"][0, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"))
    for argv in (["finetune", *_finetune_args(tmp_path / "ft", corpora, str(bad))],
                 ["generate", str(bad), "--out", str(tmp_path / "g"), "--num-sequences", "2"],
                 ["eval", str(bad), "--corpus", corpora["en"]]):
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and "NaN or infinite" in err and err.count("\n") == 1, (argv[0], err)


# ------------------------------------------------------------------------------------------------ signals

def _cli(args: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "selfreplay", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **popen)


def _wait_for_records(run_dir: Path, n: int, process: subprocess.Popen, timeout: float = 120) -> None:
    start = time.time()
    while len(read_metrics(run_dir, warn=False)) < n:
        assert process.poll() is None, process.communicate()
        assert time.time() - start < timeout
        time.sleep(0.05)


@pytest.mark.parametrize("sig,source", [(signal.SIGTERM, "prev"), (signal.SIGINT, "self")])
def test_a_signal_checkpoints_at_a_step_boundary_and_resumes_bitwise(corpora, pretrained, tmp_path, sig, source):
    """SIGTERM (what clusters send before a kill) or Ctrl-C: a checkpoint at the next step boundary, a one-line
    message saying how to resume, exit 128 + signal; --resume with only run_dir then ends with the same weights
    and the same metrics records as a run never interrupted."""
    extra = {"stop.steps": 300, "eval.every_steps": 40, "replay.method": "kl", "replay.source": source,
             "replay.buffer": 3}
    train(load_config(TrainConfig, [], _finetune_args(tmp_path / "ref", corpora, pretrained, **extra)), FINETUNE)
    run_dir = tmp_path / "run"
    p = _cli(["finetune", *_finetune_args(run_dir, corpora, pretrained, **extra)])
    _wait_for_records(run_dir, 2, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err
    assert f"stopped by {signal.Signals(sig).name}" in err and "--resume run_dir=" in err
    assert err.strip().count("\n") == 0, err
    assert ckpt.latest_checkpoint(run_dir) is not None and not (run_dir / "summary.json").exists()
    moved = tmp_path / "moved"  # a run directory may be moved before resuming
    shutil.move(str(run_dir), moved)
    p = _cli(["finetune", "--resume", f"run_dir={moved}"])
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    ref, got = _weights(tmp_path / "ref"), _weights(moved)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    _same_records(tmp_path / "ref", moved)


EVAL_EXTRA = {"stop.steps": 30, "eval.every_steps": 10, "eval.batch_size": 4}  # 10 batches per scoring


@pytest.fixture(scope="module")
def uninterrupted(corpora, pretrained, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(load_config(TrainConfig, [], _finetune_args(run_dir, corpora, pretrained, **EVAL_EXTRA)), FINETUNE)
    return run_dir


# the scorings of the run: (new data, old data) at steps 0, 10, 20 and 30 (the final evaluation)
@pytest.mark.parametrize("scoring,step", [(0, 0), (1, 0), (4, 20), (7, 30)])
def test_sigterm_during_an_evaluation_stops_within_a_batch_and_resumes_bitwise(corpora, pretrained, uninterrupted,
                                                                               tmp_path, monkeypatch, scoring, step):
    """The evaluation is abandoned at its next batch; the checkpoint is the step boundary before it, and the
    resumed run redoes that evaluation: the same weights and metrics records as a run never interrupted. Before
    the first step there is nothing to checkpoint: the same command starts the run again."""
    import selfreplay.train.loop as loop
    from selfreplay.train.signals import Interrupted

    real_score, scorings, pulled_after = loop.score, [], []

    def score(model, batches, *args, **kwargs):
        def watched():
            for i, batch in enumerate(batches):
                if len(scorings) == scoring and i == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                if len(scorings) == scoring and i >= 3:
                    pulled_after.append(i)
                yield batch

        try:
            return real_score(model, watched(), *args, **kwargs)
        finally:
            scorings.append(1)

    monkeypatch.setattr(loop, "score", score)
    run_dir = tmp_path / "run"
    cfg = load_config(TrainConfig, [], _finetune_args(run_dir, corpora, pretrained, **EVAL_EXTRA))
    with pytest.raises(Interrupted) as e:
        train(cfg, FINETUNE)
    assert e.value.exit_code == 128 + signal.SIGTERM and "\n" not in str(e.value)
    assert pulled_after == [3]  # the batch in hand when the signal came, then none
    assert not (run_dir / "summary.json").exists()
    if step == 0:
        assert "before the first step" in str(e.value) and ckpt.latest_checkpoint(run_dir) is None
    else:
        assert f"stopped by SIGTERM at step {step}" in str(e.value)
        assert ckpt.latest_checkpoint(run_dir).name == f"step_{step:08d}"
    monkeypatch.setattr(loop, "score", real_score)
    train(load_config(TrainConfig, [], _finetune_args(run_dir, corpora, pretrained, **EVAL_EXTRA)), FINETUNE,
          resume=step > 0)
    ref, got = _weights(uninterrupted), _weights(run_dir)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    _same_records(uninterrupted, run_dir)
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 10, 20, 30]


# ------------------------------------------------------------------------------------------------ crash windows

def test_checkpoints_are_resumable_at_every_instant(tmp_path, monkeypatch):
    """A kill between publishing a checkpoint and pointing ``latest`` at it, or while writing one, leaves the
    newest complete checkpoint findable; temporaries left by kills are cleaned on the next save."""
    def fill(step):
        return lambda d: ckpt.write_state({"counters": {"step": step}}, d)

    ckpt.save_checkpoint(tmp_path, 1, fill(1))
    from selfreplay.train import files

    original = files.atomic_write

    def killed_before_the_pointer(path, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "atomic_write", killed_before_the_pointer)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, fill(2))
    monkeypatch.setattr(ckpt, "atomic_write", original)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"  # the pointer is stale: the newest complete wins
    assert ckpt.load_checkpoint_state(tmp_path)["counters"]["step"] == 2

    def killed_while_writing(d):
        (d / "partial").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 3, killed_while_writing)
    stale = tmp_path / "checkpoints" / ".step_00000009.abc_1234.tmp"  # mkdtemp's name: 8 random characters
    stale.mkdir()  # as a kill -9 during a write leaves it
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"
    ckpt.save_checkpoint(tmp_path, 4, fill(4))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_00000004"]


def test_a_plain_rerun_refuses_to_overwrite_an_interrupted_run(corpora, pretrained, tmp_path):
    run_dir = tmp_path / "run"
    args = _finetune_args(run_dir, corpora, pretrained, **{"stop.steps": 20, "checkpoint.every_steps": 5})

    def interrupt(step):
        if step == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_config(TrainConfig, [], args), FINETUNE, on_step=interrupt)
    with pytest.raises(SelfReplayError, match="use --resume"):
        train(load_config(TrainConfig, [], args), FINETUNE)
    assert ckpt.latest_checkpoint(run_dir).name == "step_00000010"


def test_a_torn_metrics_line_does_not_stop_a_resume(corpora, pretrained, tmp_path, caplog):
    run_dir = tmp_path / "run"
    args = _finetune_args(run_dir, corpora, pretrained, **{"stop.steps": 30, "checkpoint.every_steps": 10,
                                                           "eval.every_steps": 5})
    train(load_config(TrainConfig, [], _finetune_args(tmp_path / "ref", corpora, pretrained, **{
        "stop.steps": 30, "eval.every_steps": 5})), FINETUNE)

    def interrupt(step):
        if step == 27:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_config(TrainConfig, [], args), FINETUNE, on_step=interrupt)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 26, "valid_lo')  # a kill or a full disk during an append
    train(load_config(TrainConfig, [], args), FINETUNE, resume=True)
    assert "torn" in caplog.text
    _same_records(tmp_path / "ref", run_dir)


# ------------------------------------------------------------------------------------------------ two writers

def test_a_second_writer_on_a_live_run_directory_gets_one_line(corpora, pretrained, tmp_path):
    run_dir = tmp_path / "run"
    args = _finetune_args(run_dir, corpora, pretrained, **{"stop.steps": 100000, "eval.every_steps": 200,
                                                           "checkpoint.every_steps": 50})
    live = _cli(["finetune", *args])
    try:
        _wait_for_records(run_dir, 1, live)
        time.sleep(1.0)  # a checkpoint exists: the second one could otherwise try --resume
        for second in (["finetune", *args], ["finetune", "--resume", f"run_dir={run_dir}"]):
            p = _cli(second)
            _, err = p.communicate(timeout=120)
            assert p.returncode == 2 and f"in use by another process (pid {live.pid})" in err, err
        assert live.poll() is None  # the live run goes on
    finally:
        live.send_signal(signal.SIGTERM)
        live.communicate(timeout=120)
    assert live.returncode == 128 + signal.SIGTERM


# ------------------------------------------------------------------------------------------------ full disk

def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["tokenize", "tokenizer", "generate", "checkpoint", "final"])
def test_a_full_disk_is_one_line_naming_the_path_and_leaves_nothing_half_written(corpora, pretrained, tmp_path,
                                                                                 monkeypatch, capsys, where):
    import selfreplay.data.tokenizer as tokenizer_mod
    import selfreplay.train.files as files_mod

    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"some words number {i} and more words" for i in range(300)))
    if where == "tokenize":
        run_cli(["tokenizer", "train", str(text), "--out", str(tmp_path / "tok.json"), "--vocab-size", "300"],
                capsys)
        import selfreplay.data.corpus as corpus_mod

        # the write inside the corpus's temporary directory fails (numpy writes through the file descriptor)
        monkeypatch.setattr(corpus_mod, "batch_encoder", lambda tok: _enospc)
        argv, target = ["tokenize", str(text), "--tokenizer", str(tmp_path / "tok.json"), "--out",
                        str(tmp_path / "corpus"), "--domain-token", "0"], tmp_path / "corpus"
    elif where == "tokenizer":
        monkeypatch.setattr(files_mod.os, "fsync", _enospc)
        argv, target = ["tokenizer", "train", str(text), "--out", str(tmp_path / "tok.json"), "--vocab-size",
                        "300"], tmp_path / "tok.json"
    elif where == "generate":
        monkeypatch.setattr(files_mod.os, "fsync", _enospc)
        argv, target = ["generate", pretrained, "--out", str(tmp_path / "replay"), "--num-sequences", "4",
                        "--batch-size", "2"], tmp_path / "replay.partial"
    elif where == "checkpoint":
        import safetensors.torch
        from safetensors import SafetensorError

        def full(*args, **kwargs):  # what the Rust writer raises on a full disk
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(safetensors.torch, "save_file", full)
        argv, target = ["finetune", *_finetune_args(tmp_path / "run", corpora, pretrained, **{
            "stop.steps": 6, "checkpoint.every_steps": 3})], tmp_path / "run" / "checkpoints"
    else:
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", _enospc)
        argv, target = ["finetune", *_finetune_args(tmp_path / "run", corpora, pretrained, **{"stop.steps": 3})], \
            tmp_path / "run" / "model.safetensors"
    del tokenizer_mod
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "no space left on the device" in err and err.count("\n") == 1, err
    assert str(target.parent) in err
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    if where in ("tokenize", "tokenizer", "final"):
        assert not target.exists()


@pytest.mark.parametrize("fills_at,written", [(5, "metrics.jsonl"), (40, "model.safetensors")])
def test_a_real_full_disk_while_training_is_one_line_naming_the_file(corpora, full_disk, fills_at, written):
    """The filesystem fills up during the run: the append to metrics.jsonl, or the final weights (safetensors
    reports ENOSPC as its own error), fail with one line naming the file, and no temporary stays behind."""
    run_dir = full_disk / "run"
    args = tiny_overrides(run_dir, corpora["en"], **{"stop.steps": 40, "eval.every_steps": 1 if fills_at == 5 else 40})
    with pytest.raises(SelfReplayError) as e:
        train(load_config(TrainConfig, [], args), "pretrain", on_step=lambda s: s == fills_at and fill_disk(full_disk))
    message = str(e.value)
    assert "\n" not in message and "no space left on the device" in message and str(run_dir / written) in message
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------ bad values

@pytest.mark.parametrize("override,message", [
    ("optim.beta1=1.0", "optim.beta1"), ("optim.beta2=-0.1", "optim.beta2"),
    ("optim.weight_decay=-1", "weight_decay"), ("replay.coeff=-1", "replay.coeff"),
    ("checkpoint.every_tokens=0", "checkpoint.every_tokens"), ("replay.domains=[12]", "replay.domains"),
    ("stop.tokens=100", "stop.tokens=null"),
])
def test_bad_values_are_refused_before_training(corpora, pretrained, tmp_path, capsys, override, message):
    code, _, err = run_cli(["finetune", *_finetune_args(tmp_path / "r", corpora, pretrained,
                                                        **{"stop.steps": 3}), override], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "r").exists()


def test_other_bad_inputs_are_one_line(corpora, pretrained, tmp_path, capsys):
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    bad_run = tmp_path / "bad_run"
    shutil.copytree(pretrained, bad_run)
    info = json.loads((bad_run / "run.json").read_text())
    info["model"]["d_model"] = "wide"
    (bad_run / "run.json").write_text(json.dumps(info))
    for argv, message in [(["finetune", str(listed)], "expected a mapping"),
                          (["sweep", "method_comparison", "--workers", "0"], "--workers"),
                          (["sweep", "method_comparison", "--threads", "0"], "--threads"),
                          (["eval", str(bad_run), "--corpus", corpora["en"]], "run.json"),
                          (["eval", pretrained, "--corpus", corpora["en"], "--batch-size", "0"], "--batch-size")]:
        code, _, err = run_cli(argv, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)


# ------------------------------------------------------------------------------------------------ the first hour

def test_output_files_follow_the_umask(pretrained):
    old = os.umask(0o022)
    os.umask(old)
    expected = 0o644 & ~old
    for name in ("model.safetensors", "run.json", "summary.json", "config.yaml", "metrics.jsonl"):
        assert (Path(pretrained) / name).stat().st_mode & 0o777 == expected, name


def test_progress_off_a_terminal_is_plain_lines(corpora, tmp_path, capsys):
    code, _, err = run_cli(["pretrain", *tiny_overrides(tmp_path / "p", corpora["en"], **{
        "stop.steps": 60, "log.progress": True, "log.progress_every_s": 0.0})], capsys)
    assert code == 0 and "\r" not in err
    lines = [line for line in err.splitlines() if "step" in line]
    assert lines and all("/60 step" in line for line in lines) and "loss=" in lines[-1]


def test_threads_are_the_configs_else_decided_by_the_work_and_recorded(monkeypatch):
    from selfreplay.train import set_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SELFREPLAY_FREE_CORES", "2")
    before = torch.get_num_threads()
    try:
        tiny, large, told = TrainConfig(), TrainConfig(), load_config(TrainConfig, [], ["threads=2"])
        assert set_threads(tiny, torch.device("cpu"), 1e3) == 1 and tiny.threads == 1
        assert set_threads(large, torch.device("cpu"), 1e12) == 2 and large.threads == 2
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("SELFREPLAY_FREE_CORES", "1")
        assert set_threads(told, torch.device("cpu"), 1e3) == 2  # given: wins over the rule
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert set_threads(TrainConfig(), torch.device("cpu"), 1e3) == 2  # the environment's choice
    finally:
        torch.set_num_threads(before)


def test_hugging_face_sampling_uses_the_current_cache_argument(hf_files):
    """transformers 5.2x renamed past_key_values to cache; the sampler uses whichever the model takes, with no
    deprecation warning."""
    import warnings

    from selfreplay.models.core import Teacher
    from selfreplay.models.hf import load_hf
    from selfreplay.replay.prompts import Prompts
    from selfreplay.replay.sources import SelfGeneratedReplay

    model = load_hf(hf_files["llama"], "float32", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        SelfGeneratedReplay(Teacher(model), Prompts([[0]]), 2, 6, buffer=1).next_batch()
