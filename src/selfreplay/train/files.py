"""Files that are never half-written, JSON that stays JSON, one writer per run directory, and provenance.

Every file the tool writes goes through :func:`atomic_file` / :func:`atomic_dir`: it is written under a temporary
name beside its destination and renamed into place only when complete, so a kill, a full disk or an error leaves
the old file (or nothing), never a truncated one. Temporary names start with ``.`` and end in ``.tmp``;
:func:`remove_stale_temporaries` clears those left by killed processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from selfreplay.errors import SelfReplayError

TMP_SUFFIX = ".tmp"
# what mkstemp / mkdtemp name our temporaries: "." + destination (+ ".old") + "." + 8 random characters + ".tmp"
TEMP_NAME = re.compile(r"^\.(?P<name>.+?)(?:\.old)?\.[a-z0-9_]{8}\.tmp$")


def _apply_umask(path: Path, directory: bool = False) -> None:
    """mkstemp / mkdtemp create 0600 / 0700; give the final file the permissions a plain open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def disk_full(e: BaseException) -> bool:
    if type(e).__name__ == "SafetensorError":  # safetensors (and save_pretrained) report I/O errors as their own
        return f"os error {errno.ENOSPC})" in str(e) or f"os error {errno.EDQUOT})" in str(e)
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def write_array(array, file) -> None:
    """``array.tofile(file)`` (a path or an open binary file); numpy reports a short write, i.e. a full disk, as an
    OSError without errno: it becomes ENOSPC, so that :func:`disk_full` and the one-line error see it."""
    try:
        array.tofile(file)
    except OSError as e:
        if e.errno is not None:
            raise
        name = getattr(file, "name", file)
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({e})", str(name)) from None


def _no_space(path: Path) -> SelfReplayError:
    return SelfReplayError(f"no space left on the device writing {path}; nothing half-written was kept (free space "
                           f"and run again; --resume continues a training run)")


@contextlib.contextmanager
def atomic_file(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it replaces ``path``, on failure it goes
    (a full disk becomes a one-line error naming ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _apply_umask(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if disk_full(e):
            raise _no_space(path) from None
        raise


def atomic_write(path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN / infinite floats replaced by None (JSON has no NaN), recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj: Any, indent: Optional[int] = None) -> str:
    """Strict JSON (non-finite floats become null; other objects their str)."""
    return json.dumps(json_safe(obj), indent=indent, default=str, allow_nan=False)


def atomic_write_json(path, obj: Any) -> None:
    atomic_write(path, dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_dir(out_dir, replace: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir`` to fill; on success it becomes ``out_dir``.

    An existing ``out_dir`` is replaced only once the new one is complete (``replace=False``: refused); the caller
    makes sure it is ours. A symbolic link is never replaced.
    """
    out = Path(out_dir)
    if out.is_symlink():
        raise SelfReplayError(f"{out}: is a symbolic link; not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=TMP_SUFFIX))
    try:
        yield tmp
        _apply_umask(tmp, directory=True)
        if out.exists():
            if not replace:
                raise SelfReplayError(f"{out}: already exists; not overwriting it")
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old.", suffix=TMP_SUFFIX))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise _no_space(out) from None
        raise


def remove_stale_temporaries(directory, names: Optional[Callable[[str], bool]] = None) -> None:
    """Delete the temporary files and folders our writers left in ``directory`` when killed mid-write: only our
    names (``.<name>.<8 random characters>.tmp``; ``names``: only for destinations it accepts), never following a
    symbolic link."""
    d = Path(directory)
    if d.is_symlink() or not d.is_dir():
        return
    for p in d.iterdir():
        m = TEMP_NAME.match(p.name)
        if m is None or p.is_symlink() or (names is not None and not names(m["name"])):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


class RunLock:
    """An exclusive lock on a run directory (``.lock``, held with ``flock`` while the run trains).

    The kernel releases it when the process dies, so a killed run leaves no stale lock; a second process asking
    for it gets a one-line error naming the holder.
    """

    NAME = ".lock"

    def __init__(self, run_dir, what: str = "run"):
        self.path = Path(run_dir) / self.NAME
        self.what = what
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise SelfReplayError(f"{self.what} directory {self.path.parent} is in use by another process "
                                  f"(pid {holder}); wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def git_commit(source: Optional[Path] = None) -> Optional[str]:
    """The commit of the selfreplay source checkout (with '+dirty' if a tracked file changed), or None outside one.

    Read-only: ``git status`` would otherwise refresh the checkout's index (taking ``.git/index.lock``) as a side
    effect of every run; ``GIT_OPTIONAL_LOCKS=0`` tells git to write nothing. An installed copy that merely lies
    inside some other repository (a venv in a project) is not that repository's commit: None.
    """
    here = Path(source) if source is not None else Path(__file__).resolve().parents[1]
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=here, capture_output=True, text=True,
                              timeout=5, env=env).stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or not (Path(top) / "pyproject.toml").is_file() or here.resolve() != (
                Path(top) / "src" / "selfreplay").resolve():
            return None
        commit = git("rev-parse", "HEAD")
        if not commit:
            return None
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None
