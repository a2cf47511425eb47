"""CPU threads of a run: as many as its work per step can use and the machine has free, decided once at its start.

BENCHMARKS.md "Threads": on an idle machine two threads beat one at every model size measured, while with another
process keeping a core busy two threads lose 1.7-6.6x (threads wait on each other at every op): oversubscribed
cores cost far more than a spare core gains. So the count is ``min(free cores, what the work can use)``.

Free cores: the cores this process may use less the busy ones, the larger of those measured busy (two reads of
/proc/stat :data:`MEASURE_S` apart, else the load average) and those claimed by our other live processes. Runs
started together would each see an idle machine, so every process records its count while it lives in a claims
directory per user (``<tmp>/selfreplay-<uid>/threads/<pid>``), written under a lock with the decision: a later
start subtracts it. The count changes a run's floating-point sums, so a run decides once and a resumed run reuses
its first start's count (:func:`selfreplay.train.set_threads`).

``SELFREPLAY_FREE_CORES=N`` (internal, for tests) replaces the measurement: the free cores are N.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import math
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional

MEASURE_S = 0.25  # between the two reads of /proc/stat
# Each thread beyond the first needs this much work per step. BENCHMARKS.md "Threads": idle, 2 threads take 0.6x
# the time of one at 0.32 GFLOP per step, but 0.91-1.10x at 0.004-0.08 GFLOP (not worth a core another run could use).
FLOPS_PER_EXTRA_THREAD = 200e6
FREE_CORES_ENV = "SELFREPLAY_FREE_CORES"
PROC_STAT = "/proc/stat"
_IDLE_FIELDS = (3, 4)  # idle, iowait of: user nice system idle iowait irq softirq steal (guest: inside user)
_TIME_FIELDS = 8

_claimed: Optional[Path] = None  # this process's claim file


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (else the machine's), at most a cgroup's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError, IndexError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    return max(1, cores)


def cpu_times(text: str) -> dict[str, tuple[int, int]]:
    """``/proc/stat`` text -> {"cpu": (busy, total), "cpu0": ..., ...} in jiffies (idle and iowait not busy)."""
    out = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields or not fields[0].startswith("cpu"):
            continue
        times = [int(v) for v in fields[1:1 + _TIME_FIELDS]]
        idle = sum(times[i] for i in _IDLE_FIELDS if i < len(times))
        out[fields[0]] = (sum(times) - idle, sum(times))
    return out


def busy_cores(before: str, after: str, cpus: Optional[Iterable[int]] = None) -> float:
    """How many cores were busy between two ``/proc/stat`` snapshots: the sum over ``cpus`` (default: all) of each
    core's busy share of its elapsed time."""
    old, new = cpu_times(before), cpu_times(after)
    names = [f"cpu{i}" for i in cpus] if cpus is not None else [n for n in new if n != "cpu"]
    busy = 0.0
    for name in names:
        if name in old and name in new:
            elapsed = new[name][1] - old[name][1]
            if elapsed > 0:
                busy += min(1.0, max(0.0, (new[name][0] - old[name][0]) / elapsed))
    return busy


def measured_busy_cores(interval: float = MEASURE_S) -> float:
    """The cores this process may use that others keep busy now: /proc/stat over ``interval`` seconds, else the
    1-minute load average."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    try:
        before = Path(PROC_STAT).read_text()
        time.sleep(interval)
        return busy_cores(before, Path(PROC_STAT).read_text(), cpus)
    except OSError:
        with contextlib.suppress(OSError, AttributeError):
            return os.getloadavg()[0]
    return 0.0


# ------------------------------------------------------------------------------------------ claims of our runs
def claims_dir() -> Optional[Path]:
    """``<tmp>/selfreplay-<uid>/threads``, made private; None (no registry) unless both levels are real
    directories owned by this user."""
    uid = os.getuid()
    path = Path(tempfile.gettempdir()) / f"selfreplay-{uid}"
    for level in (path, path / "threads"):
        with contextlib.suppress(FileExistsError, OSError):
            level.mkdir(mode=0o700)
        try:
            st = os.lstat(level)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
            return None
    return path / "threads"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claimed_by_others(directory: Path) -> int:
    """Threads claimed by our other live processes; dead processes' claims are removed (only regular files named
    by a pid, never through a link)."""
    total = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        path = directory / entry.name
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                continue
            if not _alive(int(entry.name)):
                os.unlink(path)
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd) as f:
                total += max(0, int(f.read(32).strip() or 0))
        except (OSError, ValueError):
            continue
    return total


@contextlib.contextmanager
def _locked(directory: Optional[Path]) -> Iterator[Optional[Path]]:
    """The claims directory's lock (blocking ``flock``): one start at a time reads the claims and writes its own.
    Yields the directory, or None when there is none or it cannot be locked (then no registry)."""
    try:
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600) if directory else None
    except OSError:
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield directory if fd is not None else None
    finally:
        if fd is not None:
            os.close(fd)


def _write_claim(directory: Path, threads: int) -> None:
    global _claimed
    path = directory / str(os.getpid())
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(str(threads))
    if _claimed is None:
        atexit.register(release_claim)
    _claimed = path


def release_claim() -> None:
    """Remove this process's claim (at exit; a killed process's claim is ignored and removed by the next start)."""
    global _claimed
    path, _claimed = _claimed, None
    if path is not None and path.name == str(os.getpid()):  # not a forked child's inherited claim
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.unlink(path)


# ------------------------------------------------------------------------------------------ the rule
def free_cores(directory: Optional[Path] = None, measure: bool = True) -> int:
    """Cores free for this process: usable ones less the larger of those busy and those our other processes
    claim (at least 1). ``SELFREPLAY_FREE_CORES`` (internal, for tests) gives the answer instead."""
    forced = os.environ.get(FREE_CORES_ENV, "")
    if forced.isdigit():
        return max(1, int(forced))
    cores = usable_cores()
    claimed = claimed_by_others(directory) if directory is not None else 0
    busy = int(measured_busy_cores() + 0.5) if measure else 0  # a core busy half the time or more is taken
    return max(1, cores - max(busy, claimed))


def choose_threads(flops_per_step: Optional[float], free: int) -> int:
    """The rule: one thread, plus one per :data:`FLOPS_PER_EXTRA_THREAD` of work per step, at most ``free``
    (unknown work: ``free``)."""
    wanted = free if flops_per_step is None else 1 + int(flops_per_step // FLOPS_PER_EXTRA_THREAD)
    return max(1, min(free, wanted))


def env_threads() -> Optional[int]:
    """``OMP_NUM_THREADS`` when set to a positive count: a choice already made (a sweep's worker, the user)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def decide_threads(flops_per_step: Optional[float], runs: int = 1, fixed: Optional[int] = None) -> int:
    """Threads per run for this process's ``runs`` runs side by side (``fixed``: a count already chosen), claimed
    in the registry while the process lives. Measures the load only when the work could use a second thread."""
    with _locked(claims_dir()) as directory:
        if fixed is not None:
            threads = fixed
        elif choose_threads(flops_per_step, 2) == 1:
            threads = 1
        else:
            threads = choose_threads(flops_per_step, max(1, free_cores(directory) // runs))
        if directory is not None:
            with contextlib.suppress(OSError):
                _write_claim(directory, threads * runs)
    return threads
