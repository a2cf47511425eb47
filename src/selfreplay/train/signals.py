"""How a run stops early: SIGINT / SIGTERM turned into a flag read at step boundaries (:class:`SignalGuard`), and
the errors that end a run (:class:`Interrupted` after a checkpoint, :class:`Diverged` before anything is
overwritten)."""

from __future__ import annotations

import signal
import threading
from typing import Optional

from selfreplay.errors import SelfReplayError


class Interrupted(SelfReplayError):
    """A run stopped by SIGINT / SIGTERM after writing a checkpoint (exit 128 + signal number)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum

    def __reduce__(self):  # it crosses from a sweep's worker process to the sweep
        return type(self), (str(self), self.signum)


class Diverged(SelfReplayError):
    """The loss or the weights became NaN / infinite."""


class SignalGuard:
    """Turns SIGINT / SIGTERM into a flag (the first signal received) read at step boundaries and between
    evaluation batches; a second SIGINT (Ctrl-C) stops at once, whatever came between."""

    def __init__(self):
        self.received: Optional[int] = None
        self._sigints = 0
        self._previous: dict = {}

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints > 1:
                raise KeyboardInterrupt
        if self.received is None:
            self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
