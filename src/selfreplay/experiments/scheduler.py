"""The sweep's scheduling loop, whichever launcher runs the jobs (see :mod:`selfreplay.experiments.launchers`).

A job is handed to the launcher when its upstream run has finished; a failed job (or one whose process or
scheduler job died) is recorded, its dependents are skipped, the rest continue, and the sweep returns the
failures. At most ``workers`` jobs are out at once (local: the CPU count; SLURM / Ray: every ready job, the
cluster queues them). A run already finished is skipped after checking its saved config; an interrupted one
resumes. SIGINT / SIGTERM: no new job starts, the launcher asks the running ones to checkpoint and stop, the
results tables are written, and :class:`~selfreplay.train.signals.Interrupted` is raised (exit 128 + the signal).
"""

from __future__ import annotations

import signal
import time
from typing import Callable, Optional

from selfreplay.experiments.sweep import (Experiment, Job, SweepResult, check_finished_config, claim_sweep_root,
                                          expand_jobs, job_config, job_status)


def run_grid(exp: Experiment, workers: Optional[int] = None, threads: int = 1, only: Optional[list[str]] = None,
             log: Callable[[str], None] = print, in_process: bool = False, launcher=None) -> SweepResult:
    """Run every unfinished job of ``exp`` (``only``: these stages), then write the results table.

    ``in_process`` runs jobs one after another in this process (tests, debugging). After SIGINT / SIGTERM the
    running jobs checkpoint and stop, the table is written, and :class:`Interrupted` is raised.
    """
    from selfreplay.experiments.launchers import launcher_settings, open_launcher
    from selfreplay.experiments.prepare import prepare_data
    from selfreplay.experiments.results import write_results
    from selfreplay.experiments.status import record_failure
    from selfreplay.train.signals import Interrupted, SignalGuard

    settings = launcher if launcher is not None else launcher_settings(exp.launcher)
    prepare_data(exp.prepare, log)
    jobs = expand_jobs(exp)
    for j in jobs:  # fail fast on config errors before any training starts
        job_config(j)
    result = SweepResult()
    jobs_by_key = {j.key: j for j in jobs}
    pending: dict[str, Job] = {}
    for j in jobs:
        status = job_status(j)
        if status == "finished":
            check_finished_config(j)
            result.skipped.append(j.key)
        elif only is None or j.stage in only:
            pending[j.key] = j
    done = set(result.skipped)
    log(f"sweep {exp.name} ({exp.scale}): {len(jobs)} runs, {len(done)} finished, {len(pending)} to run -> "
        f"{exp.root}" + ("" if settings.name == "local" else f" (launcher {settings.name})"))
    runner = open_launcher(settings, exp, threads, in_process)  # a missing extra or sbatch: before any write
    claim_sweep_root(exp)
    start = time.time()

    def ready(j: Job) -> bool:
        return j.upstream is None or j.upstream in done

    def blocked(j: Job) -> Optional[str]:
        """The upstream run that failed or will never run (not pending, not running, not done), else None."""
        up = j.upstream
        if up is None or up in done or up in pending or up in running.values():
            return None
        return up

    def finish(key: str, error: Optional[str], summary: Optional[dict]) -> None:
        if error is None:
            done.add(key)
            result.finished.append(key)
            brief = " ".join(f"{k}={summary[k]:.4g}" for k in ("valid_loss", "prev_loss", "forgetting", "train_time")
                             if isinstance(summary.get(k), (int, float)))
            log(f"[{time.time() - start:7.0f}s] done {key}: {brief} ({summary.get('stop_reason')})")
        else:
            result.failed[key] = error
            record_failure(jobs_by_key[key].run_dir, error, settings.name)
            log(f"[{time.time() - start:7.0f}s] FAILED {key}: {error}")

    def skip_blocked() -> None:
        changed = True
        while changed:
            changed = False
            for key, j in list(pending.items()):
                up = blocked(j)
                if up is not None:
                    del pending[key]
                    result.failed[key] = f"upstream run {up} did not finish"
                    log(f"skipped {key}: upstream {up} did not finish")
                    changed = True

    running: dict = {}
    stopped: list[tuple[str, int]] = []  # (run, signal) of the runs a signal stopped
    guard = SignalGuard()  # the sweep's own SIGINT / SIGTERM (a second Ctrl-C raises KeyboardInterrupt)

    def signalled() -> Optional[int]:
        return guard.received or next((signum for _, signum in stopped), None)

    with guard, runner:
        limit = 1 if in_process else workers or runner.default_workers
        while pending or running:
            if signalled() is None:
                skip_blocked()
                batch = [j for j in pending.values() if ready(j)][: max(limit - len(running), 0)]
                starts = []
                for j in batch:
                    del pending[j.key]
                    resume = job_status(j) == "interrupted"
                    log(f"[{time.time() - start:7.0f}s] start {j.key}" + (" (resuming)" if resume else ""))
                    starts.append((j, resume))
                if starts:
                    for (j, _), fut in zip(starts, runner.start(starts)):
                        running[fut] = j.key
            if not running:
                break
            if guard.received is not None:
                runner.send_signal(signal.SIGTERM)  # each run once: it checkpoints at its next step boundary
            for fut in [f for f in running if f.done()] or runner.wait(timeout=runner.poll_s):
                key = running.pop(fut)
                try:
                    finish(key, None, fut.result())
                except Interrupted as e:
                    stopped.append((key, e.signum))
                except Exception as e:  # a SelfReplayError, or a job process that died
                    finish(key, str(e).splitlines()[0] if str(e) else type(e).__name__, None)
    signum = signalled()
    if signum is None:
        for key in pending:  # never became ready
            result.failed.setdefault(key, "upstream did not finish")
    write_results(exp, jobs)
    if signum is not None:
        raise _interrupted(signum, [jobs_by_key[key] for key, _ in stopped], result, log, time.time() - start)
    log(f"sweep {exp.name}: {len(result.finished)} run, {len(result.skipped)} already finished, "
        f"{len(result.failed)} failed; {time.time() - start:.0f}s; results in {exp.root / 'results.csv'}")
    return result


def _interrupted(signum: int, stopped: list[Job], result: SweepResult, log: Callable[[str], None], elapsed: float):
    """The one-line :class:`Interrupted` of a sweep a signal stopped (after logging each stopped run)."""
    from selfreplay.train.signals import Interrupted

    resumable = [j for j in stopped if job_status(j) == "interrupted"]
    for j in stopped:
        log(f"[{elapsed:7.0f}s] stopped {j.key}" + (" with a checkpoint" if j in resumable else
                                                   " before its first checkpoint"))
    parts = [f"{len(resumable)} run(s) stopped with a checkpoint"]
    if len(stopped) > len(resumable):
        parts.append(f"{len(stopped) - len(resumable)} before their first")
    if result.failed:
        parts.append(f"{len(result.failed)} failed")
    return Interrupted(f"interrupted by {signal.Signals(signum).name}: {', '.join(parts)}; run the same command "
                       f"again to continue", signum)
