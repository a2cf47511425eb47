"""What each run of a sweep is doing, read from its run directory alone, whichever launcher ran it.

Every job writes ``job.json`` into its run directory (rank 0; after claiming the directory, so only into a
directory of ours): ``running`` with the host, process id, launcher and scheduler job id when it starts, then
``done``, ``stopped`` (a signal stopped it: resumable when a checkpoint is there) or ``failed`` with the one-line
reason. A job whose process died without a word (killed, out of memory, a node lost) leaves ``running``: on this
host the process id tells that it is gone; on another host the record is believed until the scheduler's next
attempt rewrites it. ``selfreplay sweep EXP --status`` prints one line per run:

* ``done``     weights and summary.json are there;
* ``running``  its job says so (and, on this host, its process lives);
* ``pending``  not started, waiting for its upstream run, or stopped with a checkpoint it will resume from;
* ``failed``   with the reason: its own error, a process that died, an upstream run that failed, or a run
  directory that is not ours.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from selfreplay.errors import SelfReplayError

JOB_RECORD = "job.json"
STATES = ("done", "running", "pending", "failed")


def scheduler_job_id() -> Optional[str]:
    """The SLURM job id (array task included) or the Ray task id of this process's job, when there is one."""
    if os.environ.get("SLURM_JOB_ID"):
        array = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
        return f"{array[0]}_{array[1]}" if all(array) else os.environ["SLURM_JOB_ID"]
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_task_id()
    except Exception:  # ray absent, or not inside a task
        pass
    return None


def write_job_record(run_dir, state: str, launcher: str, **extra) -> None:
    """Record the job's ``state`` in ``<run_dir>/job.json`` (atomically; the directory must already be ours)."""
    from selfreplay.train.files import atomic_write_json

    record = {"state": state, "launcher": launcher, "host": socket.gethostname(), "pid": os.getpid(),
              "job_id": scheduler_job_id(), "time": time.time(), **extra}
    atomic_write_json(Path(run_dir) / JOB_RECORD, record)


def read_job_record(run_dir) -> Optional[dict]:
    try:
        record = json.loads((Path(run_dir) / JOB_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def record_failure(run_dir, error: str, launcher: str) -> None:
    """The sweep's record of a job that died without one (only into a run directory of ours)."""
    from selfreplay.train.ownership import RUN_MARKER, is_marked

    record = read_job_record(run_dir) or {}
    if is_marked(run_dir, RUN_MARKER) and record.get("state") in (None, "running"):
        write_job_record(run_dir, "failed", record.get("launcher", launcher), error=error,
                         job_id=record.get("job_id"))


def _alive(record: dict) -> bool:
    """Whether the process of a ``running`` record lives (always believed on another host)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(record["pid"]), 0)
    except (ProcessLookupError, KeyError, TypeError, ValueError):
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def run_state(job, upstream_state: Optional[tuple[str, str]] = None) -> tuple[str, str]:
    """(state, detail) of one run (see the module docstring); ``upstream_state``: its upstream run's."""
    from selfreplay.experiments.sweep import job_status
    from selfreplay.train.checkpoint import latest_checkpoint
    from selfreplay.train.ownership import check_run_dir

    try:
        check_run_dir(job.run_dir)
    except SelfReplayError as e:
        return "failed", str(e)
    status = job_status(job)
    if status == "finished":
        return "done", ""
    record = read_job_record(job.run_dir) or {}
    where = f"{record.get('launcher', '?')} job {record.get('job_id') or '-'} on {record.get('host', '?')}"
    checkpoint = latest_checkpoint(job.run_dir)
    resumes = f"resumes from {checkpoint.name}" if checkpoint is not None else "starts afresh"
    state = record.get("state")
    if state == "running":
        if _alive(record):
            return "running", f"{where}, pid {record.get('pid')}"
        return "failed", f"its process (pid {record.get('pid')}, {where}) died; the next sweep {resumes}"
    if state == "failed":
        return "failed", f"{record.get('error', '?')} ({where}); the next sweep {resumes}"
    if upstream_state is not None and upstream_state[0] != "done":
        verb = "failed" if upstream_state[0] == "failed" else f"is {upstream_state[0]}"
        return ("failed" if upstream_state[0] == "failed" else "pending"), f"upstream {job.upstream} {verb}"
    if state == "stopped":
        return "pending", f"stopped ({record.get('error', 'by a signal')}); {resumes}"
    return "pending", "interrupted; " + resumes if status == "interrupted" else "not started"


def sweep_status(exp) -> list[tuple[str, str, str]]:
    """(run key, state, detail) of every run of the experiment, upstream runs first."""
    from selfreplay.experiments.sweep import expand_jobs

    states: dict[str, tuple[str, str]] = {}
    for job in expand_jobs(exp):
        states[job.key] = run_state(job, states.get(job.upstream) if job.upstream else None)
    return [(key, state, detail) for key, (state, detail) in states.items()]


def format_status(exp, rows: list[tuple[str, str, str]]) -> str:
    """The ``--status`` report: one line per run, then the count of each state."""
    width = max((len(key) for key, _, _ in rows), default=0)
    lines = [f"{state:8s} {key:{width}s}  {detail}".rstrip() for key, state, detail in rows]
    counts = ", ".join(f"{sum(1 for _, s, _ in rows if s == state)} {state}" for state in STATES)
    lines.append(f"sweep {exp.name} ({exp.scale}): {len(rows)} runs: {counts} -> {exp.root}")
    return "\n".join(lines)
