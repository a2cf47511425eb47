"""Where a sweep's runs train, and how signals reach them.

Each run trains in a fresh ``spawn``-ed process of its own (no compiled graphs or thread settings carry over from
another run), or, with ``in_process`` (tests, debugging), in the calling process. Signals:

* A job process starts with SIGINT and SIGTERM blocked, so a signal during its start-up cannot kill it half-born;
  it then takes them itself. While the run trains, the trainer's guard turns them into a checkpoint at the next
  step boundary (or batch of an evaluation); before that, the job is stopped at once (nothing to lose).
* The sweep forwards SIGTERM to every job process when it gets SIGINT or SIGTERM itself: a terminal's Ctrl-C
  reaches the whole process group anyway, but a cluster's or ``kill``'s SIGTERM may reach the sweep alone.
* On Linux a job process gets SIGTERM when the sweep dies (parent-death signal), so a killed sweep leaves no run
  training on without it.

A job process that dies (killed, out of memory) fails its own run only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from concurrent.futures import Future
from typing import Callable, Iterator, Optional

from selfreplay.errors import SelfReplayError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Block SIGINT / SIGTERM in this thread meanwhile (a process started meanwhile inherits the mask)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class JobSignals:
    """In a job process, until the trainer's own guard takes over (and after it): the first SIGINT / SIGTERM
    stops the job (as a KeyboardInterrupt, raised once); later ones are only noted."""

    def __init__(self):
        self.received: Optional[int] = None
        self.raising = True

    def handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        if self.raising:
            self.raising = False
            raise KeyboardInterrupt


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this process when the sweep dies (PR_SET_PDEATHSIG); exit now if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(128 + signal.SIGTERM)


def _job_main(sender, parent: int, threads: int, fn: Callable, args: tuple) -> None:
    """A job process: take the stop signals, set the threads, run ``fn(*args)`` and send back (ok, value)."""
    from selfreplay.train.signals import Interrupted

    signals = JobSignals()
    try:
        try:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signals.handle)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # one sent during start-up arrives now
            _die_with_parent(parent)
            os.environ["OMP_NUM_THREADS"] = str(threads)
            import torch

            torch.set_num_threads(threads)
            outcome = True, fn(*args)
        finally:
            signals.raising = False
    except KeyboardInterrupt:
        name = signal.Signals(signals.received or signal.SIGINT).name
        outcome = False, Interrupted(f"stopped by {name}", signals.received or signal.SIGINT)
    except BaseException as e:  # noqa: B036 (reported to the sweep, which decides)
        outcome = False, e
    try:
        sender.send(outcome)
    except Exception as e:  # an unpicklable result, or the sweep is gone
        with contextlib.suppress(Exception):
            sender.send((False, SelfReplayError(f"{type(e).__name__} sending the run's outcome: {e}")))


def _exit_reason(code: Optional[int]) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


class JobProcesses:
    """Runs each submitted ``fn(*args)`` in its own spawned process; :meth:`wait` collects the outcomes."""

    def __init__(self, threads: int):
        import multiprocessing as mp

        self._context = mp.get_context("spawn")
        self._threads = threads
        self._running: dict[Future, tuple] = {}  # future -> (process, receiving end of its pipe)
        self._signalled: set[int] = set()

    def submit(self, fn: Callable, *args) -> Future:
        receiver, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(target=_job_main, args=(sender, os.getpid(), self._threads, fn, args))
        with _stop_signals_blocked():
            process.start()
        sender.close()
        future: Future = Future()
        future.set_running_or_notify_cancel()
        self._running[future] = (process, receiver)
        return future

    def wait(self, timeout: float) -> list[Future]:
        """The futures of the jobs that ended within ``timeout`` seconds, resolved."""
        from multiprocessing.connection import wait

        handles = {}
        for future, (process, receiver) in self._running.items():
            handles[receiver] = handles[process.sentinel] = future
        ended = {handles[h] for h in wait(list(handles), timeout)} if handles else set()
        for future in ended:
            process, receiver = self._running.pop(future)
            try:
                ok, value = receiver.recv()
            except Exception:  # nothing came: the process died, or its outcome could not be read
                process.join()
                ok, value = False, SelfReplayError(f"its process died ({_exit_reason(process.exitcode)})")
            receiver.close()
            process.join()
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        return list(ended)

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to every job process not yet sent one."""
        for process, _ in self._running.values():
            if process.pid not in self._signalled and process.is_alive():
                self._signalled.add(process.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signum)

    def __enter__(self) -> "JobProcesses":
        return self

    def __exit__(self, *exc) -> None:
        """Leaving early (an error, a second Ctrl-C): the runs still training checkpoint and stop."""
        self.send_signal(signal.SIGTERM)
        for process, receiver in self._running.values():
            process.join()
            receiver.close()
        self._running.clear()


class InlineJobs:
    """``submit`` runs the job at once in this process (``in_process``: tests, debugging)."""

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except SelfReplayError as e:
            future.set_exception(e)
        return future

    def wait(self, timeout: float) -> list[Future]:
        return []

    def send_signal(self, signum: int) -> None:
        pass

    def __enter__(self) -> "InlineJobs":
        return self

    def __exit__(self, *exc) -> None:
        pass


def job_runner(in_process: bool, threads: int):
    return InlineJobs() if in_process else JobProcesses(threads)
