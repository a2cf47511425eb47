"""Progress that tells the truth: a tqdm bar on a terminal, a plain line every few seconds anywhere else.

When stderr is not a terminal (nohup, CI, a log file) carriage-return frames would pile up into megabytes of log,
so :func:`progress` then prints ``desc: n/total unit, postfix, rate, eta`` every ``every_s`` seconds and at the
end. Create the display when the measured work starts (after an initial evaluation), so its rate and ETA count
that work only.
"""

from __future__ import annotations

import sys
import time
from typing import Optional


class PlainProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` as periodic plain lines."""

    def __init__(self, total: Optional[int], desc: str, unit: str, initial: int = 0, every_s: float = 30.0,
                 enabled: bool = True, stream=None, announce: bool = False):
        self.total, self.desc, self.unit, self.n, self.every_s = total, desc, unit, initial, every_s
        self.enabled, self.stream = enabled, stream or sys.stderr
        self.postfix = ""
        self._start_n, self._start = initial, time.perf_counter()
        self._last, self._printed = self._start, None
        if announce:  # a first line at once: slow work shows that it started
            self._print(self._start)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self._print(now)

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _print(self, now: float) -> None:
        if not self.enabled or self._printed == (self.n, self.postfix):
            return
        self._printed = (self.n, self.postfix)
        done = self.n - self._start_n
        rate = done / (now - self._start) if now > self._start and done > 0 else None
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.postfix:
            parts.append(self.postfix)
        if rate:
            parts.append(f"{rate:.3g} {self.unit}/s")
            if self.total:
                parts.append(f"eta {_clock((self.total - self.n) / rate)}")
        print(", ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        self._print(time.perf_counter())
        self.enabled = False


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60:02d}:{seconds % 60:02d}"


def progress(total: Optional[int] = None, desc: str = "", unit: str = "it", enabled: bool = True, initial: int = 0,
             every_s: float = 30.0, position: int = 0, announce: bool = False, leave: bool = True):
    """A progress display: tqdm on a terminal, :class:`PlainProgress` lines otherwise (``announce``: the first at
    once, rather than after ``every_s``)."""
    if enabled and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, dynamic_ncols=True, position=position,
                    leave=leave)
    return PlainProgress(total, desc, unit, initial, every_s, enabled, announce=announce)
