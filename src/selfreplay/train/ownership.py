"""Which directories are ours: a run never overwrites or deletes what it did not create.

An output directory (a run directory, a demo's or a sweep's) carries a marker file from its first write
(``.selfreplay-run`` and the like), written before anything else. A directory is claimed only when it is new,
empty, already marked, or recognised as one an earlier version of the tool wrote; otherwise it is refused with one
line. ``/``, the home directory and the current working directory are never output directories. Deletions take
only names the tool writes, never follow a symbolic link, and leave a directory in place when anything else is in
it.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Callable, Iterable, Optional

from selfreplay.errors import SelfReplayError
from selfreplay.train.files import atomic_write_json, remove_stale_temporaries

RUN_MARKER = ".selfreplay-run"
# The files and folders a training run writes into its run directory (checkpoints/ is removed on its own terms).
RUN_FILES = ("config.yaml", "run.json", "summary.json", "metrics.jsonl", "model.safetensors", "model", "tb", "wandb",
             "train.log", ".lock", "best", "job.json")


def _real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _real_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def refuse_special(path, what: str) -> None:
    """``/``, the home directory and the current working directory are never an output directory (``what`` names
    the option in the message)."""
    p = Path(path)
    resolved = p.expanduser().resolve()
    special = {Path("/"): "the root directory", Path.home().resolve(): "the home directory",
               Path.cwd().resolve(): "the current working directory"}
    if resolved in special:
        raise SelfReplayError(f"{what} {path}: is {special[resolved]}, never an output directory; choose a new or "
                              f"empty directory")
    if str(p).startswith("~"):  # a literal '~' would make a folder named '~' here
        raise SelfReplayError(f"{what} {path}: starts with '~' (not expanded); give the path without it")


def is_marked(directory, marker: str) -> bool:
    """Whether ``directory`` holds our ``marker`` file (a regular file, not a link)."""
    return _real_file(Path(directory) / marker)


def check_claim(directory, marker: str, what: str, earlier: Optional[Callable[[Path], bool]] = None) -> None:
    """Refuse ``directory`` unless claiming it is safe: new, empty, marked by us, or ``earlier(directory)`` (a
    directory an earlier version of the tool wrote, before markers). Reads only."""
    d = Path(directory)
    refuse_special(d, what)
    if os.path.lexists(d) and not d.is_dir():
        raise SelfReplayError(f"{what} {d}: exists and is not a directory")
    if not d.is_dir() or is_marked(d, marker):
        return
    if any(True for _ in d.iterdir()) and not (earlier is not None and earlier(d)):
        raise SelfReplayError(f"{what} {d}: not empty and not a selfreplay {kind_of(marker)} directory; choose a "
                              f"new or empty directory")


def claim_dir(directory, marker: str, what: str, earlier: Optional[Callable[[Path], bool]] = None) -> Path:
    """Check ``directory`` (see :func:`check_claim`), create it and write ``marker`` before anything else."""
    d = Path(directory)
    check_claim(d, marker, what, earlier)
    d.mkdir(parents=True, exist_ok=True)
    if not is_marked(d, marker):
        atomic_write_json(d / marker, {"created_by": "selfreplay", "kind": kind_of(marker)})
    return d


def kind_of(marker: str) -> str:
    return marker.rsplit("-", 1)[-1]


# ------------------------------------------------------------------------------------------------ run directories

def earlier_run(run_dir) -> bool:
    """A run directory written before markers existed: a finished run (config.yaml + run.json + summary.json) or
    one holding a resumable checkpoint in a real (not linked) checkpoints/."""
    from selfreplay.train.checkpoint import CHECKPOINTS, has_checkpoint

    d = Path(run_dir)
    if all(_real_file(d / name) for name in ("config.yaml", "run.json", "summary.json")):
        return True
    return _real_dir(d / CHECKPOINTS) and has_checkpoint(d)


def check_run_dir(run_dir, resume: bool = False) -> None:
    """Refuse a run directory that is not ours before anything is built or written (reads only)."""
    from selfreplay.train.checkpoint import real_checkpoint_dir

    d = Path(run_dir)
    check_claim(d, RUN_MARKER, "run_dir", earlier_run)
    if resume and not d.is_dir():
        raise SelfReplayError(f"--resume: {d} has no training checkpoint to resume from (no such directory)")
    real_checkpoint_dir(d)


def claim_run_dir(run_dir, resume: bool = False) -> Path:
    """Check ``run_dir`` (see :func:`check_run_dir`), create it and mark it as a selfreplay run."""
    check_run_dir(run_dir, resume)
    return claim_dir(run_dir, RUN_MARKER, "run_dir", earlier_run)


def remove_run_dir(run_dir) -> bool:
    """Delete a run directory of ours: only the names a run writes; the directory itself only when nothing else is
    left in it. Returns whether it is gone (False: not ours, or something else was left)."""
    from selfreplay.train.checkpoint import remove_checkpoints

    d = Path(run_dir)
    if not _real_dir(d) or not (is_marked(d, RUN_MARKER) or earlier_run(d)):
        return False
    remove_checkpoints(d)
    remove_named(d, RUN_FILES)
    remove_stale_temporaries(d)
    return remove_if_only(d, [RUN_MARKER])


# ------------------------------------------------------------------------------------------------ deleting

def remove_tree(path) -> None:
    """Delete ``path`` (a file, or a directory with what is inside), never following a symbolic link: a link is
    removed itself, and rmtree unlinks the links inside a directory instead of entering them."""
    p = Path(path)
    if _real_dir(p):
        shutil.rmtree(p)
    elif os.path.lexists(p):
        p.unlink()


def remove_named(directory, names: Iterable[str]) -> None:
    """Delete these entries of ``directory`` where they exist (see :func:`remove_tree`)."""
    for name in names:
        remove_tree(Path(directory) / name)


def remove_if_only(directory, names: Iterable[str]) -> bool:
    """Delete ``directory`` when it holds nothing but ``names`` (those go too); returns whether it is gone."""
    d = Path(directory)
    if not _real_dir(d):
        return not os.path.lexists(d)
    if {p.name for p in d.iterdir()} - set(names):
        return False
    remove_named(d, names)
    try:
        d.rmdir()
    except OSError:  # something appeared meanwhile: leave it
        return False
    return True
