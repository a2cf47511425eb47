"""Experiment sweeps: grid expansion, stage dependencies, skip/resume, the results table, a tiny end-to-end run."""

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import VOCAB, one_line_error
from selfreplay.config import TrainConfig, load_config
from selfreplay.errors import SelfReplayError
from selfreplay.evaluate.metrics import read_metrics
from selfreplay.experiments.results import RESULT_COLUMNS, read_csv
from selfreplay.experiments.sweep import (deep_merge, expand_jobs, flatten, job_status, load_experiment, run_sweep,
                                         unflatten)
from selfreplay.train import train
from selfreplay.train.checkpoint import has_checkpoint
from selfreplay.train.files import RunLock

TINY_MODEL = {"d_model": 32, "n_layers": 1, "head_dim": 16, "context": 16, "vocab_size": VOCAB}


def tiny_experiment(corpora, **changes) -> dict:
    """Pretrain at two LRs, then finetune the lr=0.003 one plainly and with KL replay at two coefficients.

    Finetuning defaults to replay.method=kl now: the plain variant says replay.method=none."""
    exp = {
        "name": "tiny",
        "common": {"log.progress": False, "data.valid_tokens": 600, "data.batch_size": 16,
                   "optim.warmup_tokens": 0, "eval.every_tokens": 16 * 16 * 10, "replay.batch_size": 8},
        "paper": {"note": "numbers for the report"},
        "stages": {
            "pretrain": {"kind": "pretrain",
                         "base": {"data.train": corpora["en"], "model": TINY_MODEL, "stop.steps": 40},
                         "grid": {"optim.lr": [3e-3, 1e-2]}},
            "finetune": {"kind": "finetune", "from": "pretrain", "select": {"optim.lr": 3e-3},
                         "base": {"data.train": corpora["es"], "stop.steps": 20, "optim.lr": 1e-3,
                                  "checkpoint.every_tokens": 16 * 16 * 5},
                         "variants": {"plain": {"replay.method": "none"}, "kl": {"replay.method": "kl"}},
                         "grid": {"replay.coeff": [1.0, 10.0]}},
        },
        "scales": {"cpu": {}, "gpu": {"stages": {"pretrain": {"grid": {"optim.lr": [1e-3]}, "base": {
            "stop.steps": None, "stop.tokens": 1000}}, "finetune": {"select": {"optim.lr": 1e-3}}}}},
    }
    return deep_merge(exp, changes)


@contextlib.contextmanager
def deadline(seconds: int, what: str):
    """Fail (instead of hanging) when the block runs longer than ``seconds`` (SIGALRM; main thread)."""
    def expired(signum, frame):
        raise TimeoutError(f"{what}: still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def write_yaml(path, tree) -> str:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return str(path)


def test_grid_expansion_stage_dependencies_and_names(corpora, tmp_path):
    exp = load_experiment(write_yaml(tmp_path / "tiny.yaml", tiny_experiment(corpora)), "cpu", tmp_path / "runs")
    jobs = expand_jobs(exp)
    keys = [j.key for j in jobs]
    assert keys == ["pretrain/lr=0.003", "pretrain/lr=0.01",
                    "finetune/lr=0.003--plain,coeff=1", "finetune/lr=0.003--plain,coeff=10",
                    "finetune/lr=0.003--kl,coeff=1", "finetune/lr=0.003--kl,coeff=10"]
    ft = jobs[4]
    assert ft.upstream == "pretrain/lr=0.003" and ft.params == {"variant": "kl", "replay.coeff": 1.0}
    assert ft.upstream_params == {"optim.lr": 3e-3}
    assert ft.overrides["model.model_name_or_path"] == str(tmp_path / "runs" / "tiny" / "cpu" / "pretrain" /
                                                          "lr=0.003")
    assert "init_from" not in ft.overrides and "model.model_name_or_path" not in jobs[0].overrides
    assert ft.overrides["optim.lr"] == 1e-3 and ft.overrides["replay.method"] == "kl"  # own values win
    assert ft.run_dir == tmp_path / "runs" / "tiny" / "cpu" / "finetune" / "lr=0.003--kl,coeff=1"
    assert exp.paper == {"note": "numbers for the report"}

    gpu = expand_jobs(load_experiment(str(tmp_path / "tiny.yaml"), "gpu", tmp_path / "runs"))
    pre = [j for j in gpu if j.stage == "pretrain"]
    assert [j.name for j in pre] == ["lr=0.001"]
    assert pre[0].overrides["stop.tokens"] == 1000 and "stop.steps" not in pre[0].overrides  # null deletes
    assert [j.upstream for j in gpu if j.stage == "finetune"] == ["pretrain/lr=0.001"] * 4
    assert flatten({"a": {"b": 1, "c": [1, 2]}}) == {"a.b": 1, "a.c": [1, 2]}


def test_experiment_file_errors(corpora, tmp_path):
    def error_for(tree, *words):
        with pytest.raises(SelfReplayError) as e:
            expand_jobs(load_experiment(write_yaml(tmp_path / "bad.yaml", tree), "cpu", tmp_path / "runs"))
        return one_line_error(e, *words)

    base = tiny_experiment(corpora)
    error_for({**base, "stagez": {}}, "unknown keys", "stagez")
    error_for(deep_merge(base, {"stages": {"finetune": {"from": "nope"}}}), "finetune", "nope")
    error_for(deep_merge(base, {"stages": {"finetune": {"select": {"optim.lr": 0.5}}}}), "select", "matches no run")
    error_for(deep_merge(base, {"stages": {"pretrain": {"grid": {"optim.lr": 3e-3}}}}), "grid.optim.lr", "list")
    error_for(deep_merge(base, {"stages": {"pretrain": {"kind": "train"}}}), "kind", "pretrain or finetune")
    error_for(deep_merge(base, {"stages": {"finetune": {"variants": {"kl": {"replay.coeff": 1.0}},
                                                        "grid": {"replay.coeff": [1.0, 1]}}}}),
              "several runs", "named")
    with pytest.raises(SelfReplayError) as e:
        load_experiment("no_such_experiment", experiments_dir=tmp_path)
    one_line_error(e, "no_such_experiment", "no file")
    tree = deep_merge(base, {"stages": {"pretrain": {"base": {"optim.lrr": 1.0}}}})
    with pytest.raises(SelfReplayError) as e:  # config errors surface before any training starts
        run_sweep(load_experiment(write_yaml(tmp_path / "bad.yaml", tree), "cpu", tmp_path / "runs"),
                  in_process=True, log=lambda s: None)
    one_line_error(e, "pretrain/lr=0.003", "optim.lrr")
    assert not (tmp_path / "runs" / "tiny" / "cpu" / "pretrain").exists()


def test_end_to_end_skip_resume_and_results(corpora, tmp_path):
    """A tiny sweep skips a finished run, resumes an interrupted one and writes the results table."""
    path = write_yaml(tmp_path / "tiny.yaml", tiny_experiment(corpora, stages={
        "pretrain": {"grid": {"optim.lr": [3e-3]}}, "finetune": {"grid": {"replay.coeff": [1.0]}}}))
    exp = load_experiment(path, "cpu", tmp_path / "runs")
    jobs = {j.key: j for j in expand_jobs(exp)}
    # interrupt one finetune before the sweep: its upstream is trained here, the run stopped after 8 steps
    upstream, victim = jobs["pretrain/lr=0.003"], jobs["finetune/lr=0.003--kl,coeff=1"]

    def stop_at_8(step):
        if step == 8:
            raise KeyboardInterrupt

    train(load_config(TrainConfig, base=unflatten(upstream.overrides)), "pretrain")
    with pytest.raises(KeyboardInterrupt):
        train(load_config(TrainConfig, base=unflatten(victim.overrides)), "finetune", on_step=stop_at_8)
    assert job_status(victim) == "interrupted" and job_status(upstream) == "finished"
    assert has_checkpoint(victim.run_dir) and (victim.run_dir / "checkpoints" / "step_00000005").is_dir()

    lines: list[str] = []
    with deadline(60, "the sweep resuming a 20-step run"):  # a resume that never reaches its stop length
        result = run_sweep(exp, in_process=True, log=lines.append)
    assert not result.failed
    assert result.skipped == ["pretrain/lr=0.003"]
    assert sorted(result.finished) == ["finetune/lr=0.003--kl,coeff=1", "finetune/lr=0.003--plain,coeff=1"]
    assert any("start finetune/lr=0.003--kl,coeff=1 (resuming)" in line for line in lines)
    summary = json.loads((victim.run_dir / "summary.json").read_text())
    assert summary["steps"] == 20  # resumed from the step-5 checkpoint to the end
    assert not (victim.run_dir / "checkpoints").exists()  # a finished run keeps no checkpoints
    records = read_metrics(victim.run_dir)  # the evaluation records
    assert records[0]["step"] == 0 and records[-1]["step"] == 20

    # the results table: one row per run, the documented columns, numbers that match the run directories
    rows = read_csv(exp.root / "results.csv")
    with open(exp.root / "results.csv") as f:
        header = next(csv.reader(f))
    assert header[:len(RESULT_COLUMNS)] == RESULT_COLUMNS
    for col in ("grid.optim.lr", "grid.variant", "grid.replay.coeff", "from.optim.lr", "valid_loss", "prev_loss",
                "forgetting", "train_time", "steps", "params", "cfg.optim.lr", "cfg.replay.method",
                "cfg.model.d_model", "cfg.model.model_name_or_path"):
        assert col in header, col
    assert [(r["stage"], r["run"]) for r in rows] == [tuple(k.split("/")) for k in jobs]
    assert all(r["status"] == "finished" for r in rows)
    kl_row = next(r for r in rows if r["run"] == victim.name)
    assert kl_row["forgetting"] == pytest.approx(summary["forgetting"])
    assert kl_row["cfg.replay.method"] == "kl" and kl_row["from.optim.lr"] == pytest.approx(3e-3)
    assert kl_row["cfg.model.d_model"] == 32  # the checkpoint's architecture, as the run used it
    assert kl_row["cfg.model.model_name_or_path"] == str(upstream.run_dir)
    plain_row = next(r for r in rows if r["run"] == "lr=0.003--plain,coeff=1")
    assert plain_row["cfg.replay.method"] == "none"
    assert kl_row["forgetting"] < plain_row["forgetting"]  # replay keeps the old corpus
    traj = read_csv(exp.root / "results_trajectories.csv")
    assert sum(1 for t in traj if t["run"] == victim.name) == len(records)
    assert {"stage", "run", "step", "tokens", "valid_loss", "prev_loss"} <= set(traj[0])

    # a second sweep has nothing to do
    again = run_sweep(exp, in_process=True, log=lambda s: None)
    assert again.finished == [] and len(again.skipped) == len(jobs) and not again.failed

    # an edited experiment file does not silently reuse the finished run
    edited = tiny_experiment(corpora, stages={"pretrain": {"grid": {"optim.lr": [3e-3]}},
                                              "finetune": {"grid": {"replay.coeff": [1.0]},
                                                           "base": {"stop.steps": 25}}})
    exp2 = load_experiment(write_yaml(tmp_path / "tiny.yaml", edited), "cpu", tmp_path / "runs")
    with pytest.raises(SelfReplayError) as e:
        run_sweep(exp2, in_process=True, log=lambda s: None)
    one_line_error(e, "finished with a different stop", "delete")
    # ... but a setting only a forgetting budget reads does not make a fixed-coefficient run stale
    budget_tuned = tiny_experiment(corpora, stages={"pretrain": {"grid": {"optim.lr": [3e-3]}},
                                                    "finetune": {"grid": {"replay.coeff": [1.0]},
                                                                 "base": {"replay.target_kl_step": 0.5}}})
    exp3 = load_experiment(write_yaml(tmp_path / "tiny.yaml", budget_tuned), "cpu", tmp_path / "runs")
    reused = run_sweep(exp3, in_process=True, log=lambda s: None)
    assert reused.finished == [] and not reused.failed


def test_failed_run_is_recorded_and_dependents_skipped(corpora, tmp_path):
    tree = tiny_experiment(corpora, stages={
        "pretrain": {"grid": {"optim.lr": [3e-3]}, "base": {"data.train": str(tmp_path / "missing")}},
        "finetune": {"grid": {"replay.coeff": [1.0]}, "variants": {"kl": None}}})
    exp = load_experiment(write_yaml(tmp_path / "tiny.yaml", tree), "cpu", tmp_path / "runs")
    result = run_sweep(exp, in_process=True, log=lambda s: None)
    assert set(result.failed) == {"pretrain/lr=0.003", "finetune/lr=0.003--plain,coeff=1"}
    assert "upstream" in result.failed["finetune/lr=0.003--plain,coeff=1"]
    rows = read_csv(exp.root / "results.csv")
    assert [r["status"] for r in rows] == ["new", "new"]


def test_parallel_workers(corpora, tmp_path):
    """Jobs run in spawned worker processes (two at once here), each in a fresh process, into the results table."""
    tree = tiny_experiment(corpora, stages={"pretrain": {"base": {"stop.steps": 5},
                                                         "grid": {"optim.lr": [3e-3, 1e-2, 3e-2]}},
                                            "finetune": None})
    exp = load_experiment(write_yaml(tmp_path / "tiny.yaml", tree), "cpu", tmp_path / "runs")
    result = run_sweep(exp, workers=2, log=lambda s: None)
    assert sorted(result.finished) == ["pretrain/lr=0.003", "pretrain/lr=0.01", "pretrain/lr=0.03"]
    assert not result.failed
    rows = read_csv(exp.root / "results.csv")
    assert [r["steps"] for r in rows] == [5, 5, 5]
    assert len({r["valid_loss"] for r in rows}) == 3  # different learning rates, different runs
    # the run lock records the pid of the process that trained the run: three runs, three processes on two
    # workers (max_tasks_per_child=1), none of them this one
    pids = {int((j.run_dir / RunLock.NAME).read_text()) for j in expand_jobs(exp)}
    assert len(pids) == 3 and os.getpid() not in pids



def test_a_finetune_waits_for_its_upstream_while_another_upstream_finishes(corpora, tmp_path):
    """Two pretrains on two workers, a finetune after each: the short pretrain finishes while the long one is still
    running, and the long one's finetune must wait for it, not be skipped as if its upstream had failed."""
    tree = tiny_experiment(corpora, stages={
        "pretrain": {"grid": {"optim.lr": [3e-3], "stop.steps": [2, 400]}, "base": {"stop.steps": None}},
        "finetune": {"base": {"stop.steps": 2}, "variants": {"plain": None},
                     "grid": {"replay.coeff": [1.0]}}})
    exp = load_experiment(write_yaml(tmp_path / "tiny.yaml", tree), "cpu", tmp_path / "runs")
    lines: list[str] = []
    result = run_sweep(exp, workers=2, log=lines.append)
    assert not result.failed, lines
    assert sorted(result.finished) == sorted(j.key for j in expand_jobs(exp)) and len(result.finished) == 4
    order = [line.split("done ")[1].split(":")[0] for line in lines if " done " in line]
    long_pretrain, long_finetune = "pretrain/lr=0.003,steps=400", "finetune/lr=0.003,steps=400--kl,coeff=1"
    assert order.index("pretrain/lr=0.003,steps=2") < order.index(long_pretrain) < order.index(long_finetune), order

def _hold_lock(run_dir) -> subprocess.Popen:
    """Another live process holding the run directory's lock (as a trainer does while it trains, after claiming
    the directory)."""
    code = ("import sys, time\n"
            "from selfreplay.train.files import RunLock\n"
            "from selfreplay.train.ownership import claim_run_dir\n"
            "RunLock(claim_run_dir(sys.argv[1])).acquire()\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_run_held_by_a_live_process_is_not_trained_twice(corpora, tmp_path):
    tree = tiny_experiment(corpora, stages={"pretrain": {"grid": {"optim.lr": [3e-3]}, "base": {"stop.steps": 3}},
                                            "finetune": None})
    exp = load_experiment(write_yaml(tmp_path / "tiny.yaml", tree), "cpu", tmp_path / "runs")
    job = expand_jobs(exp)[0]
    holder = _hold_lock(job.run_dir)
    try:
        result = run_sweep(exp, in_process=True, log=lambda s: None)
        error = result.failed[job.key]
        assert "in use by another process" in error and f"pid {holder.pid}" in error and "\n" not in error
        assert job_status(job) == "new" and not (job.run_dir / "metrics.jsonl").exists()  # nothing was written
        # the trainer itself refuses a second writer with a one-line error
        cfg = load_config(TrainConfig, base=unflatten(job.overrides))
        with pytest.raises(SelfReplayError) as e:
            train(cfg, "pretrain")
        one_line_error(e, str(job.run_dir), "in use by another process", f"pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the dead holder's lock: no stale lock to clean up
    result = run_sweep(exp, in_process=True, log=lambda s: None)
    assert result.finished == [job.key] and not result.failed
    assert int((job.run_dir / RunLock.NAME).read_text()) == os.getpid()


def test_a_sweep_trains_only_in_directories_of_its_own(corpora, tmp_path):
    """A sweep directory or a run directory holding files that are not the sweep's is refused untouched."""
    tree = tiny_experiment(corpora, stages={"pretrain": {"grid": {"optim.lr": [3e-3, 1e-2]},
                                                         "base": {"stop.steps": 3}}, "finetune": None})
    exp = load_experiment(write_yaml(tmp_path / "tiny.yaml", tree), "cpu", tmp_path / "runs")
    exp.root.mkdir(parents=True)
    (exp.root / "notes.txt").write_text("keep")
    with pytest.raises(SelfReplayError) as e:
        run_sweep(exp, in_process=True, log=lambda s: None)
    one_line_error(e, f"sweep directory {exp.root}: not empty and not a selfreplay sweep directory")
    assert [p.name for p in exp.root.iterdir()] == ["notes.txt"]
    (exp.root / "notes.txt").unlink()
    taken, free = expand_jobs(exp)
    taken.run_dir.mkdir(parents=True)
    (taken.run_dir / "config.yaml").write_text("my: own\n")
    result = run_sweep(exp, in_process=True, log=lambda s: None)
    assert result.finished == [free.key] and list(result.failed) == [taken.key]
    assert "not empty and not a selfreplay run directory" in result.failed[taken.key]
    assert [p.name for p in taken.run_dir.iterdir()] == ["config.yaml"]
    assert (taken.run_dir / "config.yaml").read_text() == "my: own\n"


def test_a_second_trainer_in_one_process_gets_a_one_line_error(corpora, tmp_path):
    """flock is per open file: even a second trainer of this process on the same run_dir is refused."""
    from selfreplay.train.ownership import claim_run_dir

    run_dir = tmp_path / "run"
    cfg = load_config(TrainConfig, base=unflatten({
        "run_dir": str(run_dir), "data.train": corpora["en"], "model": TINY_MODEL, "stop.steps": 2,
        "log.progress": False, "data.valid_tokens": 600, "data.batch_size": 16, "optim.warmup_tokens": 0}))
    with RunLock(claim_run_dir(run_dir)):
        with pytest.raises(SelfReplayError) as e:
            train(cfg, "pretrain")
        one_line_error(e, "in use by another process", f"pid {os.getpid()}")
    assert train(cfg, "pretrain")["steps"] == 2  # released: it trains


def test_a_killed_sweep_takes_its_runs_along_with_a_checkpoint(corpora, tmp_path):
    """kill -9 of the sweep process: its worker gets SIGTERM (Linux parent-death signal), writes a checkpoint at
    a step boundary and exits; the next sweep resumes the run."""
    if not sys.platform.startswith("linux"):
        pytest.skip("parent-death signal: Linux only")
    tree = tiny_experiment(corpora, stages={"pretrain": {"grid": {"optim.lr": [3e-3]}, "base": {
        "stop.steps": 100000, "eval.every_tokens": 16 * 16 * 50}}, "finetune": None})
    path = write_yaml(tmp_path / "tiny.yaml", tree)
    job = expand_jobs(load_experiment(path, "cpu", tmp_path / "runs"))[0]
    sweep = subprocess.Popen([sys.executable, "-m", "selfreplay", "sweep", path, "--runs-dir", str(tmp_path / "runs"),
                              "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = job.run_dir / RunLock.NAME
    with deadline(120, "the run never started"):
        while not (job.run_dir / "metrics.jsonl").exists() or not (job.run_dir / "metrics.jsonl").read_text():
            time.sleep(0.1)
    worker = int(lock.read_text())
    sweep.kill()
    sweep.wait()
    with deadline(120, "the orphaned run is still training"):
        while os.path.exists(f"/proc/{worker}") and "zombie" not in open(f"/proc/{worker}/status").read():
            time.sleep(0.1)
    assert has_checkpoint(job.run_dir)


def test_ctrl_c_then_sigterm_stop_the_sweep_with_checkpoints_and_a_rerun_resumes_bitwise(corpora, tmp_path):
    """Ctrl-C at a terminal (SIGINT to the whole process group), then SIGTERM to the sweep alone (a cluster's
    scheduler, kill): the running run checkpoints and stops, no other run starts, the table says interrupted, one
    line on stderr and exit 128 + the signal; the next sweep finishes with the weights of runs never interrupted."""
    if not sys.platform.startswith("linux"):
        pytest.skip("process groups and parent-death signals: Linux only")
    from safetensors.torch import load_file

    tree = tiny_experiment(corpora, stages={"pretrain": {"grid": {"optim.lr": [3e-3, 1e-2]}, "base": {
        "stop.steps": 500, "eval.every_tokens": 16 * 16 * 100}}, "finetune": None})
    path = write_yaml(tmp_path / "tiny.yaml", tree)
    exp = load_experiment(path, "cpu", tmp_path / "runs")
    first, second = expand_jobs(exp)
    for job in (first, second):
        train(load_config(TrainConfig, base=unflatten({**job.overrides, "run_dir": str(tmp_path / "ref" / job.name)})),
              "pretrain")

    def metrics_inode() -> int:
        """The inode of the run's metrics.jsonl once it holds a record (the step-0 evaluation is over), else 0."""
        path = first.run_dir / "metrics.jsonl"
        try:
            return path.stat().st_ino if path.read_text().strip() else 0
        except FileNotFoundError:
            return 0

    for sig in (signal.SIGINT, signal.SIGTERM):
        before = metrics_inode()
        sweep = subprocess.Popen([sys.executable, "-m", "selfreplay", "sweep", path, "--runs-dir",
                                  str(tmp_path / "runs"), "--workers", "1"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        with deadline(120, "the run never started training"):
            while metrics_inode() in (0, before):  # the trainer has (re)written metrics.jsonl: it is in its loop
                assert sweep.poll() is None, sweep.communicate()
                time.sleep(0.05)
        if sig == signal.SIGINT:
            os.killpg(sweep.pid, sig)  # Ctrl-C: the terminal signals every process of the foreground group
        else:
            sweep.send_signal(sig)  # the sweep alone: it forwards the signal to its run
        out, err = sweep.communicate(timeout=120)
        assert sweep.returncode == 128 + sig, err
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert err.startswith(f"error: interrupted by {signal.Signals(sig).name}: 1 run(s) stopped with a "
                              f"checkpoint; run the same command again to continue"), err
        assert f"stopped {first.key} with a checkpoint" in out and f"start {second.key}" not in out
        assert job_status(first) == "interrupted" and job_status(second) == "new"
        assert [r["status"] for r in read_csv(exp.root / "results.csv")] == ["interrupted", "new"]

    result = run_sweep(exp, in_process=True, log=lambda s: None)
    assert sorted(result.finished) == [first.key, second.key] and not result.failed
    for job in (first, second):
        ref, got = load_file(str(tmp_path / "ref" / job.name / "model.safetensors")), \
            load_file(str(job.run_dir / "model.safetensors"))
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), job.key


def test_a_run_whose_process_is_killed_fails_alone(corpora, tmp_path):
    """kill -9 (or the out-of-memory killer) of one run's process fails that run only; the others go on."""
    import threading

    tree = tiny_experiment(corpora, stages={"pretrain": {"grid": {"optim.lr": None, "stop.steps": [100000, 5]}},
                                            "finetune": None})
    exp = load_experiment(write_yaml(tmp_path / "tiny.yaml", tree), "cpu", tmp_path / "runs")
    doomed, survivor = expand_jobs(exp)

    def kill_once_training():
        while not (doomed.run_dir / "metrics.jsonl").exists() or not (doomed.run_dir / "metrics.jsonl").read_text():
            time.sleep(0.05)
        os.kill(int((doomed.run_dir / RunLock.NAME).read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_once_training, daemon=True)
    killer.start()
    with deadline(180, "the sweep with a killed run"):
        result = run_sweep(exp, workers=2, log=lambda s: None)
    assert result.finished == [survivor.key]
    assert result.failed == {doomed.key: "its process died (killed by SIGKILL)"}
