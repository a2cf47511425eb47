"""The ``ray`` launcher: each run of the sweep is a Ray task on the cluster at ``ray_address``.

A task asks for ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs, runs in a fresh worker process (``max_calls=1``:
nothing carries over from another run, as with the local launcher), and is retried ``max_retries`` times when
its worker dies; the retry resumes from the run's last checkpoint. Every node needs selfreplay installed in the
same Python environment, and the run directories on storage it sees. The sweep's Ctrl-C cancels the tasks
gently (Ray raises the interrupt in the task, which the trainer turns into a checkpoint at a step boundary).
"""

from __future__ import annotations

import signal
import socket
from concurrent.futures import Future
from typing import Optional

from selfreplay.errors import SelfReplayError
from selfreplay.experiments.launchers import LauncherSettings, missing_extra, new_future, run_scheduled, settle


def _check_reachable(address: str) -> None:
    """A host:port address must answer before ray.init waits on it for minutes."""
    host, _, port = address.rpartition(":")
    if address.startswith("ray://") or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise SelfReplayError(f"launcher.ray_address={address}: nothing answers there ({e.strerror or e}); start "
                              f"the cluster first (ray start --head) or give its address") from None


class RayLauncher:
    """Runs each job as a Ray task (see the module docstring)."""

    default_workers = 10 ** 9  # every ready run becomes a task: Ray queues them by their resources

    def __init__(self, settings: LauncherSettings, threads: int):
        try:
            import ray
        except ImportError:
            raise missing_extra(settings, "ray") from None
        self.ray, self.settings, self.threads = ray, settings, threads
        self.poll_s = settings.poll_s or 1.0
        address = settings.ray_address
        if address not in (None, "auto", "local"):
            _check_reachable(address)
        try:
            self._owns_connection = not ray.is_initialized()
            if self._owns_connection:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except Exception as e:  # ConnectionError, a version mismatch, ...
            line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SelfReplayError(f"launcher ray: could not join the cluster at {address or 'a new local one'} "
                                  f"({line})") from None
        self.task = ray.remote(num_cpus=settings.cpus_per_run or threads, num_gpus=settings.gpus_per_run,
                               max_retries=settings.max_retries, max_calls=1)(run_scheduled)
        self._refs: dict[Future, object] = {}  # our future -> object ref
        self._signalled: set[Future] = set()

    def start(self, starts: list) -> list[Future]:
        futures = []
        for job, _ in starts:
            future = new_future()
            self._refs[future] = self.task.remote(job.key, job.kind, job.overrides, self.threads, "ray")
            futures.append(future)
        return futures

    def _outcome(self, ref) -> object:
        from selfreplay.train.signals import Interrupted

        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return Interrupted("cancelled by the sweep before it ran", signal.SIGINT)
        except ray.exceptions.WorkerCrashedError:
            return SelfReplayError(f"its Ray worker died (retried {self.settings.max_retries} times: "
                                   f"launcher.max_retries)")
        except Exception as e:  # RayTaskError and the like: their last line is the cause
            lines = [line for line in str(e).splitlines() if line.strip()]
            return SelfReplayError(f"Ray task failed: {lines[-1] if lines else type(e).__name__}")

    def wait(self, timeout: float) -> list[Future]:
        """The futures of the tasks that ended within ``timeout`` seconds, resolved."""
        refs = {ref: future for future, ref in self._refs.items()}
        if not refs:
            return []
        ready, _ = self.ray.wait(list(refs), num_returns=1, timeout=timeout)
        if ready:  # and whatever else is ready by now
            ready, _ = self.ray.wait(list(refs), num_returns=len(refs), timeout=0)
        ended = []
        for ref in ready:
            future = refs[ref]
            del self._refs[future]
            ended.append(settle(future, self._outcome(ref)))
        return ended

    def send_signal(self, signum: Optional[int] = None) -> None:
        """Cancel every task once, gently: a running one checkpoints at its next step boundary and stops."""
        for future, ref in self._refs.items():
            if future not in self._signalled:
                self._signalled.add(future)
                self.ray.cancel(ref, force=False)

    def __enter__(self) -> "RayLauncher":
        return self

    def __exit__(self, *exc) -> None:
        if self._refs:
            self.send_signal()
        if self._owns_connection:
            self.ray.shutdown()
