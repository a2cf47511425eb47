"""CPU threads chosen by the work per step and the free cores, decided once per run (selfreplay.threads)."""

import os
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from selfreplay import threads
from selfreplay.config import PRETRAIN, TrainConfig, load_config
from selfreplay.train import train
from selfreplay.train.signals import Interrupted

# Two snapshots of /proc/stat: user nice system idle iowait irq softirq steal guest guest_nice.
BEFORE = """cpu  400 0 200 1500 200 0 0 0 50 0
cpu0 100 0 50 800 50 0 0 0 50 0
cpu1 300 0 150 700 150 0 0 0 0 0
intr 12345 0 0
ctxt 999
"""
# cpu0: +60 user (of which 40 guest, already inside user), +10 system, +5 steal, +20 idle, +5 iowait: busy 75 of
# 100 jiffies. cpu1: +100 idle only: busy 0 of 100.
AFTER = """cpu  460 0 210 1620 205 0 0 5 90 0
cpu0 160 0 60 820 55 0 0 5 90 0
cpu1 300 0 150 800 150 0 0 0 0 0
intr 23456 0 0
ctxt 1999
"""


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A private temporary directory for the claims, no forced free cores, no OMP_NUM_THREADS, 4 usable cores."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.delenv(threads.FREE_CORES_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    yield tmp_path / "tmp"
    threads.release_claim()


def test_busy_cores_from_two_proc_stat_snapshots():
    assert threads.busy_cores(BEFORE, AFTER) == pytest.approx(0.75)
    assert threads.busy_cores(BEFORE, AFTER, cpus=[0]) == pytest.approx(0.75)
    assert threads.busy_cores(BEFORE, AFTER, cpus=[1]) == 0.0
    assert threads.busy_cores(BEFORE, BEFORE) == 0.0  # no time elapsed: nothing measured busy


def test_tiny_work_gets_one_thread_and_large_work_the_free_cores():
    assert threads.choose_threads(1e3, free=8) == 1
    assert threads.choose_threads(1e12, free=8) == 8
    assert threads.choose_threads(1e12, free=3) == 3
    assert threads.choose_threads(1e12, free=1) == 1
    assert threads.choose_threads(None, free=5) == 5  # unknown work: what is free


def test_the_decision_claims_its_cores_for_later_starts(registry, monkeypatch):
    monkeypatch.setenv(threads.FREE_CORES_ENV, "2")
    assert threads.decide_threads(1e12) == 2
    claim = registry / f"selfreplay-{os.getuid()}" / "threads" / str(os.getpid())
    assert claim.read_text() == "2"
    assert threads.decide_threads(1e12, runs=2) == 1  # two runs side by side share the two cores
    assert claim.read_text() == "2"
    assert threads.decide_threads(1e12, fixed=3) == 3 and claim.read_text() == "3"
    threads.release_claim()
    assert not claim.exists()


def test_a_live_processs_claim_takes_cores_and_a_dead_ones_is_removed(registry):
    directory = threads.claims_dir()
    assert directory == registry / f"selfreplay-{os.getuid()}" / "threads"
    assert (directory.parent.stat().st_mode & 0o777, directory.stat().st_mode & 0o777) == (0o700, 0o700)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (directory / str(dead.pid)).write_text("3")
    assert threads.free_cores(directory, measure=False) == 4
    assert not (directory / str(dead.pid)).exists()
    live = subprocess.Popen(["sleep", "30"])
    try:
        (directory / str(live.pid)).write_text("3")
        assert threads.free_cores(directory, measure=False) == 1
        (directory / str(live.pid)).write_text("9")
        assert threads.free_cores(directory, measure=False) == 1  # at least one
    finally:
        live.kill()
        live.wait()


def test_a_symlinked_claims_directory_is_skipped_and_nothing_outside_deleted(registry, tmp_path):
    outside = tmp_path / "outside"
    (outside / "threads").mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    victim = outside / "threads" / str(dead.pid)
    victim.write_text("keep me")
    (registry / f"selfreplay-{os.getuid()}").symlink_to(outside)
    assert threads.claims_dir() is None
    assert threads.decide_threads(1e3) == 1
    assert victim.read_text() == "keep me" and sorted(p.name for p in (outside / "threads").iterdir()) == [victim.name]


def test_a_symlink_named_as_a_dead_pid_is_not_followed(registry, tmp_path):
    directory = threads.claims_dir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (directory / str(dead.pid)).symlink_to(victim)
    assert threads.free_cores(directory, measure=False) == 4
    assert victim.read_text() == "keep me"


def test_omp_num_threads_is_a_choice_already_made(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.env_threads() == 3
    for value in ("0", "", "two"):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert threads.env_threads() is None


def _weights(run_dir):
    return load_file(str(Path(run_dir) / "model.safetensors"))


def test_a_resumed_run_keeps_the_count_of_its_first_start(corpora, tmp_path, registry, monkeypatch):
    """Decided at the first start with 2 cores free (the step is large enough for 2 threads), resumed when only 1
    is free: the resumed steps still run on 2 threads, as recorded in config.yaml, and the weights equal an
    uninterrupted 2-thread run's bit for bit."""
    before = torch.get_num_threads()
    extra = {"stop.steps": 6, "data.batch_size": 64, "model.d_model": 64, "eval.every_tokens": 10 ** 9}
    seen = []

    def interrupt(step):
        seen.append(torch.get_num_threads())
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        monkeypatch.setenv(threads.FREE_CORES_ENV, "2")
        train(load_config(TrainConfig, [], tiny_overrides(tmp_path / "ref", corpora["en"], **extra)), PRETRAIN)
        args = tiny_overrides(tmp_path / "run", corpora["en"], **extra)
        with pytest.raises(Interrupted):
            train(load_config(TrainConfig, [], args), PRETRAIN, on_step=interrupt)
        assert seen == [2, 2, 2]
        assert "threads: 2" in (tmp_path / "run" / "config.yaml").read_text()

        monkeypatch.setenv(threads.FREE_CORES_ENV, "1")
        train(load_config(TrainConfig, [], args), PRETRAIN, resume=True, on_step=interrupt)  # as a sweep resumes
        assert seen == [2] * 6
        assert "threads: 2" in (tmp_path / "run" / "config.yaml").read_text()
        ref, run = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
        assert all(torch.equal(ref[k], run[k]) for k in ref)

        fresh = tiny_overrides(tmp_path / "fresh", corpora["en"], **{**extra, "stop.steps": 1})
        train(load_config(TrainConfig, [], fresh), PRETRAIN, on_step=lambda s: seen.append(torch.get_num_threads()))
        assert seen[-1] == 1  # a new run under the same load decides anew
    finally:
        torch.set_num_threads(before)


def test_evaluating_commands_choose_by_the_forward_work_of_the_saved_model(pretrained, registry, monkeypatch):
    from selfreplay.cli import _threads
    from selfreplay.models import load_model, saved_param_count

    model = load_model(pretrained)
    assert saved_param_count(pretrained) == sum(p.numel() for p in model.net.state_dict().values())
    assert saved_param_count("owner/not-a-local-model") is None
    monkeypatch.setenv(threads.FREE_CORES_ENV, "2")
    before = torch.get_num_threads()
    try:
        _threads(None, "cpu", [pretrained], 1)  # one token a forward: tiny work
        assert torch.get_num_threads() == 1
        _threads(None, "cpu", [pretrained], 10 ** 6)
        assert torch.get_num_threads() == 2
        _threads(None, "cpu", ["owner/not-a-local-model"], 1)  # unknown size: the free cores
        assert torch.get_num_threads() == 2
        _threads(3, "cpu", [pretrained], 1)  # --threads wins
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
