"""Where a sweep's runs train: ``local`` processes, a SLURM cluster (through submitit) or a Ray cluster.

Whatever the launcher, each run is one job that calls :func:`selfreplay.experiments.sweep._run_job` (so results
are the same), and the sweep's loop (:mod:`selfreplay.experiments.scheduler`) hands a job over once its upstream
run has finished. Settings come from the experiment file's ``launcher:`` block, overridden on the command line::

    launcher:
      name: slurm             # local | slurm | ray
      partition: gpu          # slurm: the partition (default: the cluster's default)
      time_min: 240           # slurm: time limit of one job, minutes (a run that needs longer is requeued)
      cpus_per_run: 8         # slurm / ray: CPUs of one run (default: --threads)
      gpus_per_run: 1         # slurm / ray: GPUs of one run
      tasks_per_run: 1        # slurm: processes of one run (DDP / FSDP2 over them, on the job's nodes)
      array_parallelism: 32   # slurm: the ready runs go out as one job array, at most this many at once
      signal_delay_s: 120     # slurm: USR2 this long before the time limit: checkpoint and requeue
      max_requeues: 20        # slurm: a run stopped by the scheduler is requeued at most this often
      setup: [module load cuda]  # slurm: shell lines before the run
      ray_address: auto       # ray: the cluster to join (auto: the one on this machine; host:port)
      max_retries: 3          # ray: a run whose worker dies is retried this often (from its checkpoint)
      poll_s: 10              # slurm / ray: seconds between looks at the queue

Scheduler signals: SLURM sends SIGTERM on preemption and USR2 before the time limit (``signal_delay_s``); the
job checkpoints at its next step boundary and requeues itself (``scontrol requeue``), and the requeued job resumes
bit for bit from that checkpoint. A Ray worker that gets SIGTERM checkpoints and exits, so Ray retries the task,
which resumes; one that dies outright is retried from the run's last periodic checkpoint. The sweep's own Ctrl-C /
SIGTERM sends SIGINT to the running jobs (they checkpoint and stop, not requeued) and cancels the queued ones.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import Future
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from selfreplay.errors import SelfReplayError

LAUNCHERS = ("local", "slurm", "ray")
SCHEDULER_SIGNALS = (signal.SIGTERM,)  # a cluster's: requeue (SLURM) or retry (Ray); SIGINT is the sweep's own


@dataclass
class LauncherSettings:
    """The ``launcher:`` block of an experiment file, checked (see the module docstring)."""

    name: str = "local"
    partition: Optional[str] = None
    time_min: int = 24 * 60
    cpus_per_run: Optional[int] = None
    gpus_per_run: int = 0
    tasks_per_run: int = 1
    array_parallelism: Optional[int] = None
    signal_delay_s: int = 120
    max_requeues: int = 20
    setup: list = field(default_factory=list)
    ray_address: Optional[str] = None
    max_retries: int = 3
    poll_s: Optional[float] = None

    @property
    def extra(self) -> str:
        return {"slurm": "pip install -e '.[slurm]'", "ray": "pip install -e '.[ray]'"}.get(self.name, "")


POSITIVE = ("time_min", "cpus_per_run", "tasks_per_run", "array_parallelism", "signal_delay_s", "poll_s")
NON_NEGATIVE = ("gpus_per_run", "max_requeues", "max_retries")


def launcher_settings(block: Optional[dict] = None, **overrides: Any) -> LauncherSettings:
    """Settings from an experiment's ``launcher:`` block and command-line ``overrides`` (None: not given)."""
    merged = {**(block or {}), **{k: v for k, v in overrides.items() if v is not None}}
    known = [f.name for f in fields(LauncherSettings)]
    unknown = sorted(set(merged) - set(known))
    if unknown:
        raise SelfReplayError(f"launcher.{unknown[0]}: unknown setting (expected one of {', '.join(known)})")
    name = merged.get("name", "local")
    if name not in LAUNCHERS:
        raise SelfReplayError(f"launcher {name!r}: unknown launcher (expected one of {', '.join(LAUNCHERS)})")
    for key, value in merged.items():
        if key in POSITIVE + NON_NEGATIVE:
            number = (int, float) if key == "poll_s" else int
            positive = key in POSITIVE
            if isinstance(value, bool) or not isinstance(value, number) or value < 0 or (positive and value == 0):
                raise SelfReplayError(f"launcher.{key}={value!r}: expected {'a positive' if positive else 'a'} "
                                      f"{'number' if key == 'poll_s' else 'whole number'}"
                                      f"{'' if positive else ' >= 0'}")
        elif key in ("partition", "ray_address") and not isinstance(value, str):
            raise SelfReplayError(f"launcher.{key}={value!r}: expected a string")
    if isinstance(merged.get("setup"), str):
        merged["setup"] = [merged["setup"]]
    if not isinstance(merged.get("setup", []), list) or not all(isinstance(s, str) for s in merged.get("setup", [])):
        raise SelfReplayError("launcher.setup: expected a list of shell lines")
    settings = LauncherSettings(**merged)
    if settings.tasks_per_run > 1 and name != "slurm":
        raise SelfReplayError(f"launcher.tasks_per_run={settings.tasks_per_run}: several processes per run need the "
                              f"slurm launcher (or torchrun for a single run)")
    return settings


def open_launcher(settings: LauncherSettings, exp, threads: int, in_process: bool = False):
    """The job runner of ``settings`` for the sweep ``exp`` (a context manager; see :class:`LocalLauncher`)."""
    if settings.name == "slurm" and not in_process:
        from selfreplay.experiments.launch_slurm import SlurmLauncher

        return SlurmLauncher(settings, exp.root / "slurm", threads)
    if settings.name == "ray" and not in_process:
        from selfreplay.experiments.launch_ray import RayLauncher

        return RayLauncher(settings, threads)
    return LocalLauncher(in_process, threads, settings)


class LocalLauncher:
    """Jobs in spawned processes of this machine (:class:`~selfreplay.experiments.workers.JobProcesses`), or in
    this process (``in_process``). Every launcher has these methods: :meth:`start` a batch of (job, resume),
    :meth:`wait` for the futures that ended, :meth:`send_signal` to ask the running ones to stop."""

    def __init__(self, in_process: bool, threads: int, settings: Optional[LauncherSettings] = None):
        from selfreplay.experiments.workers import job_runner

        self.runner = job_runner(in_process, threads)
        self.default_workers = os.cpu_count() or 1
        self.poll_s = (settings.poll_s if settings is not None and settings.poll_s else 0.5)

    def start(self, starts: list) -> list[Future]:
        from selfreplay.experiments.sweep import _run_job

        return [self.runner.submit(_run_job, j.key, j.kind, j.overrides, resume) for j, resume in starts]

    def wait(self, timeout: float) -> list[Future]:
        return self.runner.wait(timeout)

    def send_signal(self, signum: int) -> None:
        self.runner.send_signal(signum)

    def __enter__(self) -> "LocalLauncher":
        self.runner.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.runner.__exit__(*exc)


# ------------------------------------------------------------------------------------------ inside a cluster job
def run_scheduled(key: str, kind: str, overrides: dict, threads: int, launcher: str, max_requeues: int = 0) -> tuple:
    """A SLURM or Ray job: train one run and return its outcome, ``("done", summary)``, ``("failed", reason)`` or
    ``("interrupted", message, signal)``. Resumes when the run directory holds a checkpoint (a requeued or retried
    job). A scheduler's SIGTERM (or SLURM's USR2) checkpoints, then requeues the SLURM job (at most
    ``max_requeues`` times) or ends the Ray worker, whose task Ray retries; nothing is returned then."""
    from selfreplay.experiments.sweep import _run_job
    from selfreplay.experiments.workers import JobSignals, STOP_SIGNALS
    from selfreplay.train.checkpoint import has_checkpoint
    from selfreplay.train.distributed import env_world
    from selfreplay.train.signals import Interrupted

    signals = JobSignals()
    previous = {sig: signal.signal(sig, signals.handle) for sig in STOP_SIGNALS}
    previous[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, lambda s, f: os.kill(os.getpid(), signal.SIGTERM))
    try:
        try:
            os.environ["OMP_NUM_THREADS"] = str(threads)
            import torch

            torch.set_num_threads(threads)
            if launcher == "slurm" and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
                from submitit.helpers import TorchDistributedEnvironment

                TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            resume = has_checkpoint(overrides["run_dir"])
            return "done", _run_job(key, kind, overrides, resume, launcher)
        finally:
            signals.raising = False
    except KeyboardInterrupt:  # a signal before the trainer took them: nothing to checkpoint
        signum = signals.received or signal.SIGINT
        error = Interrupted(f"stopped by {signal.Signals(signum).name} before training", signum)
    except Interrupted as e:
        error = e
    except SelfReplayError as e:
        return "failed", str(e)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if error.signum not in SCHEDULER_SIGNALS:
        return "interrupted", str(error), error.signum
    if launcher == "ray":
        os._exit(128 + error.signum)  # the worker dies: Ray retries the task, which resumes from the checkpoint
    if env_world()[0] != 0:
        sys.exit(128 + error.signum)  # rank 0 requeues the job
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts >= max_requeues:
        return "failed", f"{str(error).split(';')[0]}; not requeued again (requeued {restarts} times: " \
                         f"launcher.max_requeues)"
    try:
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True, timeout=60,
                       capture_output=True, text=True)
    except (OSError, KeyError, subprocess.SubprocessError) as e:
        reason = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
        return "failed", f"{str(error).split(';')[0]}; requeueing failed ({reason[0] if reason else e})"
    sys.exit(128 + error.signum)  # no result: submitit leaves the job to the requeued one


def new_future() -> Future:
    future: Future = Future()
    future.set_running_or_notify_cancel()
    return future


def settle(future: Future, outcome: Any) -> Future:
    """Resolve ``future`` from a job's outcome (see :func:`run_scheduled`) or an exception."""
    from selfreplay.train.signals import Interrupted

    kind = outcome[0] if isinstance(outcome, tuple) and outcome else None
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    elif kind == "done":
        future.set_result(outcome[1])
    elif kind == "interrupted":
        future.set_exception(Interrupted(outcome[1], outcome[2]))
    elif kind == "failed":
        future.set_exception(SelfReplayError(outcome[1]))
    else:
        future.set_exception(SelfReplayError(f"the job returned {outcome!r}"))
    return future


def missing_extra(settings: LauncherSettings, module: str) -> SelfReplayError:
    return SelfReplayError(f"launcher {settings.name}: the Python package {module!r} is not installed "
                           f"({settings.extra})")
