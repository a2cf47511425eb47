"""The ``slurm`` launcher: each run of the sweep is a SLURM job submitted through submitit.

The ready runs of one round go out together, as one job array when there are several (``array_parallelism`` of
them at once). Each job runs :func:`~selfreplay.experiments.launchers.run_scheduled` with ``tasks_per_run``
tasks (DDP / FSDP2 over them, with the rendezvous submitit derives from SLURM's environment). Its job files and
logs go to ``<sweep dir>/slurm/``.

How the sweep learns a job's state without SLURM's accounting database (``sacct``, which many clusters and
test machines lack and which submitit otherwise polls): the job's outcome is the result file submitit writes
when the function returns (rank 0's); whether it is still queued, running or requeued is ``squeue``'s answer. A
job ``squeue`` no longer lists and that left no result (cancelled, killed, out of memory, node lost) has failed,
once ``poll_s`` more seconds have passed (a result written just before the job left the queue may take a moment
to show on shared storage). A requeued job keeps its id and stays in the queue, so the sweep simply waits on.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Optional

from selfreplay.errors import SelfReplayError
from selfreplay.experiments.launchers import LauncherSettings, missing_extra, new_future, run_scheduled, settle

RUNNING_STATES = {"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING"}


def _slurm(command: list[str], what: str) -> str:
    """Run a SLURM command; its first error line as a one-line error when it fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise SelfReplayError(f"launcher slurm: {what} failed ({e})") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise SelfReplayError(f"launcher slurm: {what} failed ({lines[0] if lines else f'exit {done.returncode}'})")
    return done.stdout


class SlurmLauncher:
    """Submits runs with submitit, follows them with ``squeue`` and their result files (see the module docstring)."""

    default_workers = 10 ** 9  # every ready run goes to the queue: SLURM (and array_parallelism) decide

    def __init__(self, settings: LauncherSettings, folder: Path, threads: int):
        try:
            import submitit
        except ImportError:
            raise missing_extra(settings, "submitit") from None
        for command in ("sbatch", "squeue", "scancel"):
            if shutil.which(command) is None:
                raise SelfReplayError(f"launcher slurm: {command} not found on PATH (run the sweep where SLURM's "
                                      f"commands work, e.g. a login node)")
        if settings.partition is not None:
            known = _slurm(["sinfo", "-h", "-o", "%R"], "sinfo").split()
            if settings.partition not in known:
                raise SelfReplayError(f"launcher.partition={settings.partition}: no such SLURM partition (the "
                                      f"cluster has {', '.join(known) or 'none'})")
        self.settings, self.threads = settings, threads
        self.poll_s = settings.poll_s or 10.0
        self.executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params = dict(name="selfreplay", timeout_min=settings.time_min, nodes=1,
                      tasks_per_node=settings.tasks_per_run, cpus_per_task=settings.cpus_per_run or threads,
                      slurm_signal_delay_s=settings.signal_delay_s, slurm_additional_parameters={"requeue": True})
        if settings.gpus_per_run:
            params["gpus_per_node"] = settings.gpus_per_run
        if settings.partition is not None:
            params["slurm_partition"] = settings.partition
        if settings.array_parallelism is not None:
            params["slurm_array_parallelism"] = settings.array_parallelism
        if settings.setup:
            params["slurm_setup"] = list(settings.setup)
        self.executor.update_parameters(**params)
        self._jobs: dict[Future, object] = {}  # our future -> submitit job
        self._gone: dict[Future, float] = {}  # when squeue first missed a job that left no result
        self._signalled: set[Future] = set()

    # ------------------------------------------------------------------ submitting
    def start(self, starts: list) -> list[Future]:
        args = [(j.key, j.kind, j.overrides, self.threads, "slurm", self.settings.max_requeues) for j, _ in starts]
        try:
            if len(args) == 1:
                jobs = [self.executor.submit(run_scheduled, *args[0])]
            else:
                with self.executor.batch():
                    jobs = [self.executor.submit(run_scheduled, *a) for a in args]
        except Exception as e:  # sbatch refused: its message names the reason
            lines = [line for line in str(e).splitlines() if "error" in line.lower()] or str(e).splitlines()
            raise SelfReplayError(f"launcher slurm: sbatch failed ({lines[0].strip() if lines else type(e).__name__})"
                                  ) from None
        futures = [new_future() for _ in jobs]
        self._jobs.update(zip(futures, jobs))
        return futures

    # ------------------------------------------------------------------ following
    def _queue(self) -> Optional[dict[str, str]]:
        """squeue's state of each of our jobs still in the queue (job id -> state); None when squeue fails."""
        ids = sorted({str(job.job_id).split("_")[0] for job in self._jobs.values()})
        if not ids:
            return {}
        try:
            done = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(ids)], capture_output=True,
                                  text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
        if done.returncode != 0:  # e.g. every id already forgotten ("Invalid job id specified")
            return {} if "invalid job id" in done.stderr.lower() else None
        return dict(line.split(None, 1) for line in done.stdout.splitlines() if len(line.split(None, 1)) == 2)

    def _outcome(self, job) -> object:
        """The job's outcome once it left a result (rank 0's), else None."""
        first = job.task(0)
        if not first.paths.result_pickle.exists():
            return None
        try:
            return first.result()
        except Exception as e:  # the function raised (e.g. it could not be unpickled there): the last line says why
            lines = [line for line in str(e).splitlines() if line.strip()]
            return SelfReplayError(f"SLURM job {job.job_id} failed: {lines[-1] if lines else type(e).__name__} "
                                   f"(log: {first.paths.stderr})")

    def _vanished(self, future: Future, job) -> object:
        """The outcome of a job squeue no longer lists and that left no result."""
        from selfreplay.train.signals import Interrupted

        if future in self._signalled:
            return Interrupted("cancelled by the sweep before it ran", signal.SIGINT)
        return SelfReplayError(f"SLURM job {job.job_id} ended without a result (cancelled, killed or out of memory; "
                               f"log: {job.task(0).paths.stderr})")

    def wait(self, timeout: float) -> list[Future]:
        """The futures of the jobs that ended, resolved (after one look, or ``timeout`` seconds without news)."""
        deadline = time.time() + timeout
        while True:
            queue = self._queue()
            ended = []
            for future, job in list(self._jobs.items()):
                outcome = self._outcome(job)
                if outcome is None and queue is not None and job.job_id not in queue:
                    missing_since = self._gone.setdefault(future, time.time())
                    if time.time() - missing_since >= self.poll_s:
                        outcome = self._outcome(job) or self._vanished(future, job)
                elif outcome is None:
                    self._gone.pop(future, None)
                if outcome is not None:
                    del self._jobs[future]
                    self._gone.pop(future, None)
                    ended.append(settle(future, outcome))
            if ended or time.time() >= deadline:
                return ended
            time.sleep(min(self.poll_s, max(deadline - time.time(), 0)))

    # ------------------------------------------------------------------ stopping
    def send_signal(self, signum: int) -> None:
        """Ask every job once to stop: SIGINT to a running one (it checkpoints and is not requeued), a queued one
        is cancelled."""
        queue = self._queue() or {}
        for future, job in self._jobs.items():
            if future in self._signalled:
                continue
            self._signalled.add(future)
            state = queue.get(job.job_id)
            if state in RUNNING_STATES:
                subprocess.run(["scancel", f"--signal={signal.SIGINT.name[3:]}", job.job_id], capture_output=True)
            else:
                subprocess.run(["scancel", job.job_id], capture_output=True)

    def __enter__(self) -> "SlurmLauncher":
        return self

    def __exit__(self, *exc) -> None:
        """Leaving early (an error, a second Ctrl-C): the running jobs checkpoint and stop, queued ones go."""
        if self._jobs:
            self.send_signal(signal.SIGINT)

