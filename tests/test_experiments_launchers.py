"""Launchers: a sweep's grid on local processes, a real single-node SLURM cluster (submitit) and a real local Ray
cluster gives the same results and bitwise equal weights; preemption (SLURM) and a dead worker (Ray) resume
bitwise; --status reads every run's state from the run directories; bad launcher input is one line.

The SLURM tests need a running cluster (``.ci/slurm-up.sh``, as ``.ci/run`` does; SLURM_CONF points at it);
the Ray tests start and stop a cluster of their own (``ray start --head --block``, loopback only). Where an
engine is missing they skip with the reason; with CI=true they fail instead.
"""

import csv
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import one_line_error, run_cli
from selfreplay.config import TrainConfig, load_config
from selfreplay.errors import SelfReplayError
from selfreplay.experiments.launchers import LauncherSettings, launcher_settings
from selfreplay.experiments.status import read_job_record, sweep_status, write_job_record
from selfreplay.experiments.sweep import expand_jobs, load_experiment, run_sweep, unflatten
from selfreplay.train import train
from selfreplay.train.checkpoint import has_checkpoint
from selfreplay.train.files import RunLock
from test_experiments_sweep import deadline, tiny_experiment, write_yaml

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Ray keeps to 127.0.0.1 (instead of rewriting it to the machine's address, where its driver would wait forever
# for a cluster that listens on loopback only); read when ray is imported, so set before any test imports it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
TIME_COLUMNS = {"train_time", "eval_time"}  # wall-clock: the columns that differ between two runs of one grid


def engine_missing(reason: str):
    """Skip where an engine is not installed here; under CI it must be there: fail."""
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


def grid(corpora, **changes) -> dict:
    """2 pretrains x 2 finetunes each (6 runs), a few steps each; finetunes checkpoint every 4 steps."""
    return tiny_experiment(corpora, stages={
        "pretrain": {"base": {"stop.steps": 12}},
        "finetune": {"select": None, "variants": {"plain": None}, "grid": {"replay.coeff": [1.0, 10.0]},
                     "base": {"stop.steps": 8, "checkpoint.every_tokens": 16 * 16 * 4}}}, **changes)


def weights(run_dir) -> dict:
    return load_file(str(Path(run_dir) / "model.safetensors"))


def assert_same_grid(reference, exp) -> None:
    """The same results.csv (but for wall-clock time and the runs' own paths) and bitwise equal final weights."""
    def table(e):
        with open(e.root / "results.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        return [{k: v.replace(str(e.root), "<root>") for k, v in r.items() if k not in TIME_COLUMNS} for r in rows]

    ref_rows, rows = table(reference), table(exp)
    assert len(rows) == 6 and all(r["status"] == "finished" for r in rows)
    assert rows == ref_rows
    for ref_job, job in zip(expand_jobs(reference), expand_jobs(exp)):
        a, b = weights(ref_job.run_dir), weights(job.run_dir)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), job.key


def reference_weights(job, tmp_path) -> dict:
    """The run trained uninterrupted in this process, elsewhere."""
    run_dir = tmp_path / "reference" / job.name
    train(load_config(TrainConfig, base=unflatten({**job.overrides, "run_dir": str(run_dir)})), job.kind)
    return weights(run_dir)


def wait_for(condition, what: str, seconds: int = 120) -> None:
    """Poll ``condition`` (from a helper thread: no SIGALRM there) until it holds; fail after ``seconds``."""
    end = time.time() + seconds
    while not condition():
        if time.time() > end:
            raise TimeoutError(f"{what} after {seconds}s")
        time.sleep(0.05)


def training(job) -> bool:
    """Whether the run's trainer has written a metrics record (it takes signals from then on)."""
    metrics = job.run_dir / "metrics.jsonl"
    return metrics.exists() and bool(metrics.read_text())


@pytest.fixture(scope="module")
def local_grid(corpora, tmp_path_factory):
    """The grid run by the local launcher: the reference of the other launchers."""
    root = tmp_path_factory.mktemp("local")
    exp = load_experiment(write_yaml(root / "tiny.yaml", grid(corpora)), "cpu", root / "runs")
    result = run_sweep(exp, workers=2, log=lambda s: None)
    assert len(result.finished) == 6 and not result.failed
    return exp


# ------------------------------------------------------------------------------------------- settings, bad input

def test_launcher_settings_merge_the_file_and_the_command_line():
    settings = launcher_settings({"name": "slurm", "partition": "gpu", "time_min": 30, "setup": "module load x"},
                                 partition="cpu", cpus_per_run=None, name=None)
    assert (settings.name, settings.partition, settings.time_min, settings.setup) == ("slurm", "cpu", 30,
                                                                                     ["module load x"])
    assert launcher_settings(None).name == "local" and launcher_settings({}, name="ray").name == "ray"
    for block, words in [({"name": "pbs"}, ("launcher 'pbs'", "expected one of local, slurm, ray")),
                         ({"partitoin": "x"}, ("launcher.partitoin", "unknown setting")),
                         ({"time_min": 0}, ("launcher.time_min=0", "positive")),
                         ({"gpus_per_run": -1}, ("launcher.gpus_per_run=-1",)),
                         ({"cpus_per_run": "4"}, ("launcher.cpus_per_run='4'",)),
                         ({"name": "ray", "tasks_per_run": 2}, ("tasks_per_run=2", "slurm launcher"))]:
        with pytest.raises(SelfReplayError) as e:
            launcher_settings(block)
        one_line_error(e, *words)


def test_bad_launcher_input_is_one_line_and_writes_nothing(corpora, tmp_path, capsys, monkeypatch):
    path = write_yaml(tmp_path / "tiny.yaml", grid(corpora))
    runs = tmp_path / "runs"

    def error(*args) -> str:
        return _cli_error(path, runs, capsys, *args)  # refused before anything was written

    assert "launcher 'pbs': unknown launcher (expected one of local, slurm, ray)" in error("--launcher", "pbs")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "submitit", None)  # not installed
        assert "pip install -e '.[slurm]'" in error("--launcher", "slurm")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "ray", None)
        assert "pip install -e '.[ray]'" in error("--launcher", "ray")


def _cli_error(path, runs, capsys, *args) -> str:
    code, out, err = run_cli(["sweep", path, "--runs-dir", str(runs), *args], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert not runs.exists()
    return err


def test_sbatch_not_found_is_one_line(corpora, tmp_path, capsys, monkeypatch):
    try:
        import submitit  # noqa: F401
    except ImportError:
        engine_missing("submitit is not installed (pip install -e '.[slurm]')")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    err = _cli_error(write_yaml(tmp_path / "tiny.yaml", grid(corpora)), tmp_path / "runs", capsys, "--launcher", "slurm")
    assert "launcher slurm: sbatch not found on PATH" in err


def test_an_unreachable_ray_address_is_one_line(corpora, tmp_path, capsys):
    if importlib.util.find_spec("ray") is None:
        engine_missing("ray is not installed (pip install -e '.[ray]')")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = _cli_error(write_yaml(tmp_path / "tiny.yaml", grid(corpora)), tmp_path / "runs", capsys,
                     "--launcher", "ray", "--ray-address", f"127.0.0.1:{port}")
    assert f"launcher.ray_address=127.0.0.1:{port}: nothing answers there" in err


# ------------------------------------------------------------------------------------------- --status

def _record_running(run_dir) -> subprocess.Popen:
    """Another live process that claimed the run, writes its running record and holds the lock (as a job does)."""
    code = ("import sys, time\n"
            "from selfreplay.experiments.status import write_job_record\n"
            "from selfreplay.train.files import RunLock\n"
            "from selfreplay.train.ownership import claim_run_dir\n"
            "d = claim_run_dir(sys.argv[1]); RunLock(d).acquire(); write_job_record(d, 'running', 'local')\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_status_tells_done_running_pending_and_failed_with_the_reason(corpora, tmp_path, capsys):
    missing = str(tmp_path / "missing")
    tree = tiny_experiment(corpora, stages={
        "pretrain": {"grid": {"optim.lr": None, "data.train": [corpora["en"], missing]}, "base": {"stop.steps": 3}},
        "finetune": {"select": None, "variants": {"plain": None}, "base": {"stop.steps": 3},
                     "grid": {"replay.coeff": [1.0]}}})
    path = write_yaml(tmp_path / "tiny.yaml", tree)
    exp = load_experiment(path, "cpu", tmp_path / "runs")
    good, bad, good_ft, bad_ft = [j.key for j in expand_jobs(exp)]
    assert {state for _, state, _ in sweep_status(exp)} == {"pending"}

    result = run_sweep(exp, in_process=True, only=["pretrain"], log=lambda s: None)
    assert list(result.failed) == [bad]
    states = {key: (state, detail) for key, state, detail in sweep_status(exp)}
    assert states[good] == ("done", "")
    assert states[bad][0] == "failed" and "missing" in states[bad][1] and "starts afresh" in states[bad][1]
    assert read_job_record(exp.root / bad)["state"] == "failed"
    assert states[good_ft] == ("pending", "not started")
    assert states[bad_ft] == ("failed", f"upstream {bad} failed")

    job = next(j for j in expand_jobs(exp) if j.key == good_ft)
    holder = _record_running(job.run_dir)
    try:
        state, detail = dict((k, (s, d)) for k, s, d in sweep_status(exp))[good_ft]
        assert state == "running" and f"pid {holder.pid}" in detail and socket.gethostname() in detail
    finally:
        holder.kill()
        holder.wait()
    state, detail = dict((k, (s, d)) for k, s, d in sweep_status(exp))[good_ft]
    assert state == "failed" and f"its process (pid {holder.pid}" in detail and "died" in detail

    code, out, err = run_cli(["sweep", path, "--runs-dir", str(tmp_path / "runs"), "--status"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["done", good] and lines[1].split()[:2] == ["failed", bad]
    assert lines[-1].startswith("sweep tiny (cpu): 4 runs: 1 done, 0 running, 0 pending, 3 failed")

    result = run_sweep(exp, in_process=True, log=lambda s: None)  # the died run starts again and finishes
    assert result.finished == [good_ft]
    assert dict((k, s) for k, s, _ in sweep_status(exp))[good_ft] == "done"
    assert read_job_record(job.run_dir)["state"] == "done"


def test_the_sweep_records_a_job_that_died_without_a_word(corpora, tmp_path):
    tree = tiny_experiment(corpora, stages={"pretrain": {"grid": {"optim.lr": None, "stop.steps": [100000]}},
                                            "finetune": None})
    exp = load_experiment(write_yaml(tmp_path / "tiny.yaml", tree), "cpu", tmp_path / "runs")
    job = expand_jobs(exp)[0]

    def kill_once_training():
        wait_for(lambda: training(job), "the run never started")
        os.kill(int((job.run_dir / RunLock.NAME).read_text()), signal.SIGKILL)

    killer = threading.Thread(target=kill_once_training, daemon=True)
    killer.start()
    with deadline(180, "the sweep with a killed run"):
        result = run_sweep(exp, workers=1, log=lambda s: None)
    assert result.failed == {job.key: "its process died (killed by SIGKILL)"}
    record = read_job_record(job.run_dir)
    assert record["state"] == "failed" and record["error"] == "its process died (killed by SIGKILL)"
    state, detail = sweep_status(exp)[0][1:]
    assert state == "failed" and detail.startswith("its process died (killed by SIGKILL)")


# ------------------------------------------------------------------------------------------- SLURM

@pytest.fixture(scope="module")
def slurm():
    """A SLURM cluster answering here (started by .ci/slurm-up.sh); submitit installed."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        engine_missing("submitit is not installed (pip install -e '.[slurm]')")
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        engine_missing("no SLURM commands here (apt-get install slurm-wlm munge; .ci/slurm-up.sh)")
    done = subprocess.run(["sinfo", "-h", "-o", "%R %t"], capture_output=True, text=True, timeout=30)
    if done.returncode != 0 or not done.stdout.strip():
        engine_missing(f"no SLURM cluster answers (start one with .ci/slurm-up.sh): {done.stderr.strip()[:120]}")
    return done.stdout.split()[0]  # a partition


def slurm_settings(partition: str, **changes) -> LauncherSettings:
    return launcher_settings({"name": "slurm", "partition": partition, "time_min": 10, "poll_s": 1,
                              "cpus_per_run": 1, **changes})


def test_slurm_grid_equals_the_local_one(slurm, corpora, local_grid, tmp_path):
    exp = load_experiment(str(local_grid.path), "cpu", tmp_path / "runs")
    lines: list[str] = []
    with deadline(240, "the grid on SLURM"):
        result = run_sweep(exp, log=lines.append, launcher=slurm_settings(slurm))
    assert len(result.finished) == 6 and not result.failed, lines
    assert_same_grid(local_grid, exp)
    record = read_job_record(expand_jobs(exp)[0].run_dir)
    assert record["launcher"] == "slurm" and record["job_id"] and record["state"] == "done"
    again = run_sweep(exp, log=lambda s: None, launcher=slurm_settings(slurm))  # finished runs are skipped
    assert again.finished == [] and len(again.skipped) == 6


@pytest.mark.parametrize("first_signal", ["TERM", "USR2"])
def test_a_preempted_slurm_job_is_requeued_and_ends_bitwise_equal(first_signal, slurm, corpora, tmp_path):
    """scancel --signal=TERM (preemption) or USR2 (the time limit is near) on the running job: it checkpoints at
    a step boundary, requeues itself, and the requeued job (same job id) resumes to the uninterrupted weights."""
    tree = tiny_experiment(corpora, stages={"pretrain": {"grid": {"optim.lr": [3e-3]}, "base": {
        "stop.steps": 300, "eval.every_tokens": 16 * 16 * 100}}, "finetune": None})
    exp = load_experiment(write_yaml(tmp_path / "tiny.yaml", tree), "cpu", tmp_path / "runs")
    job = expand_jobs(exp)[0]
    reference = reference_weights(job, tmp_path)
    seen: dict = {}

    def preempt():
        wait_for(lambda: training(job), "the SLURM job never started training")
        seen["job_id"] = read_job_record(job.run_dir)["job_id"]
        subprocess.run(["scancel", f"--signal={first_signal}", seen["job_id"]], check=True)

    thread = threading.Thread(target=preempt, daemon=True)
    thread.start()
    with deadline(240, "the preempted run"):
        result = run_sweep(exp, log=lambda s: None, launcher=slurm_settings(slurm))
    thread.join()
    assert result.finished == [job.key] and not result.failed
    shown = subprocess.run(["scontrol", "show", "job", seen["job_id"]], capture_output=True, text=True).stdout
    assert "Restarts=1" in shown, shown  # requeued once, same job id
    log = (job.run_dir / "train.log").read_text()
    stopped = log.index("stopped by SIGTERM at step")  # USR2 too: the job takes it as SIGTERM
    assert f"--- resuming {job.key} (slurm job {seen['job_id']})" in log[stopped:], log
    got = weights(job.run_dir)
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
    summary = json.loads((job.run_dir / "summary.json").read_text())
    assert summary["steps"] == 300


def test_a_two_task_slurm_run_equals_one_process(slurm, corpora, tmp_path):
    """tasks_per_run=2: SLURM starts two tasks, they join one gloo process group (DDP) from SLURM's environment,
    and the run equals the one-process run, as under torchrun."""
    from test_train_distributed import assert_same_weights

    tree = tiny_experiment(corpora, stages={"pretrain": {"grid": {"optim.lr": [3e-3]}, "base": {
        "stop.steps": 6, "distributed.strategy": "ddp"}}, "finetune": None})
    exp = load_experiment(write_yaml(tmp_path / "tiny.yaml", tree), "cpu", tmp_path / "runs")
    job = expand_jobs(exp)[0]
    reference = reference_weights(job, tmp_path)
    with deadline(240, "the two-task run"):
        result = run_sweep(exp, log=lambda s: None, launcher=slurm_settings(slurm, tasks_per_run=2))
    assert result.finished == [job.key] and not result.failed
    run = json.loads((job.run_dir / "run.json").read_text())
    assert run.get("world_size", run.get("distributed", {}).get("world_size")) == 2, run
    assert_same_weights({k: v.float() for k, v in reference.items()},
                        {k: v.float() for k, v in weights(job.run_dir).items()})


def test_a_partition_that_does_not_exist_is_one_line(slurm, corpora, tmp_path):
    exp = load_experiment(write_yaml(tmp_path / "tiny.yaml", grid(corpora)), "cpu", tmp_path / "runs")
    with pytest.raises(SelfReplayError) as e:
        run_sweep(exp, log=lambda s: None, launcher=slurm_settings("no-such-partition"))
    one_line_error(e, "launcher.partition=no-such-partition: no such SLURM partition", slurm)
    assert not exp.root.exists()


# ------------------------------------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray cluster of our own on the loopback address (2 CPUs), stopped at the end; yields its address."""
    try:
        import ray
    except ImportError:
        engine_missing("ray is not installed (pip install -e '.[ray]')")
    from ray._private import ray_constants

    assert not ray_constants.ENABLE_RAY_CLUSTER, "ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    temp = tempfile.mkdtemp(prefix="sr-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    ray_cli = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_cli), "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address",
                             "127.0.0.1", "--port", str(port), "--temp-dir", temp, "--disable-usage-stats",
                             "--include-dashboard", "false"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        with deadline(120, "the Ray head did not start"):
            while True:
                assert head.poll() is None, "ray start --head exited"
                try:
                    ray.init(address=address, log_to_driver=False)
                    break
                except Exception:
                    time.sleep(1)
        ray.shutdown()
        yield address
    finally:
        head.send_signal(signal.SIGTERM)  # ray start --block stops the processes it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def ray_settings(address: str, **changes) -> LauncherSettings:
    return launcher_settings({"name": "ray", "ray_address": address, "cpus_per_run": 1, "poll_s": 0.5, **changes})


def test_ray_grid_equals_the_local_one(ray_cluster, corpora, local_grid, tmp_path):
    exp = load_experiment(str(local_grid.path), "cpu", tmp_path / "runs")
    lines: list[str] = []
    with deadline(240, "the grid on Ray"):
        result = run_sweep(exp, log=lines.append, launcher=ray_settings(ray_cluster))
    assert len(result.finished) == 6 and not result.failed, lines
    assert_same_grid(local_grid, exp)
    assert {read_job_record(j.run_dir)["launcher"] for j in expand_jobs(exp)} == {"ray"}


def test_a_ray_worker_killed_mid_run_is_retried_and_ends_bitwise_equal(ray_cluster, corpora, tmp_path):
    tree = tiny_experiment(corpora, stages={"pretrain": {"grid": {"optim.lr": [3e-3]}, "base": {
        "stop.steps": 200, "eval.every_tokens": 16 * 16 * 100, "checkpoint.every_steps": 10}}, "finetune": None})
    exp = load_experiment(write_yaml(tmp_path / "tiny.yaml", tree), "cpu", tmp_path / "runs")
    job = expand_jobs(exp)[0]
    reference = reference_weights(job, tmp_path)
    killed: list[int] = []

    def kill_after_a_checkpoint():
        wait_for(lambda: has_checkpoint(job.run_dir), "no checkpoint on Ray")
        pid = int((job.run_dir / RunLock.NAME).read_text())
        os.kill(pid, signal.SIGKILL)  # the worker process (the cluster runs on this machine)
        killed.append(pid)

    thread = threading.Thread(target=kill_after_a_checkpoint, daemon=True)
    thread.start()
    with deadline(240, "the run with a killed worker"):
        result = run_sweep(exp, log=lambda s: None, launcher=ray_settings(ray_cluster))
    thread.join()
    assert killed and result.finished == [job.key] and not result.failed
    assert int((job.run_dir / RunLock.NAME).read_text()) != killed[0]  # a new worker finished it
    got = weights(job.run_dir)
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
