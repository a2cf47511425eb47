"""Resumable training checkpoints, safe at every instant.

Layout inside a run directory::

    checkpoints/step_00000120/   one complete checkpoint (state.pt), appeared by one rename
    checkpoints/latest           the name of the newest complete checkpoint, replaced atomically

A new checkpoint is written into a temporary directory, renamed into place, then ``latest`` is pointed at it,
and only then are older checkpoints deleted: a kill at any moment leaves at least one complete checkpoint, and
:func:`latest_checkpoint` finds the newest complete one even if ``latest`` is missing or stale. Temporary
directories left by kills are removed on the next save. Only these names are ever deleted, never through a
symbolic link: a linked ``checkpoints/`` is refused, and ``checkpoints/`` stays when anything else is in it.

``state.pt`` holds everything the loop needs to continue bit for bit: the trainable weights and optimizer state
(gathered in full, so any number of ranks can resume), the scheduler, the data and replay positions, the RNG
states, the counters and the metrics accumulated since the last evaluation.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from selfreplay.errors import SelfReplayError
from selfreplay.train.files import atomic_dir, atomic_write, remove_stale_temporaries

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "state.pt"
_NAME = re.compile(r"^step_(\d{8,})$")


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINTS


def _complete(path: Path) -> bool:
    return _NAME.match(path.name) is not None and (path / STATE).is_file()


def latest_checkpoint(run_dir) -> Optional[Path]:
    """The newest complete checkpoint of a run directory, or None."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8", errors="replace").strip()
        if named.parent == root and _complete(named):
            newer = [p for p in root.iterdir() if _complete(p) and p.name > named.name]
            if not newer:
                return named
    found = sorted(p for p in root.iterdir() if _complete(p))
    return found[-1] if found else None


def _ours(name: str) -> bool:
    """A name this module writes in checkpoints/ (a step directory or the pointer)."""
    return name == LATEST or _NAME.match(name) is not None


def real_checkpoint_dir(run_dir) -> Path:
    """checkpoints/ of a run directory; a symbolic link there is refused (nothing is written or deleted through it)."""
    root = checkpoint_dir(run_dir)
    if root.is_symlink():
        raise SelfReplayError(f"run_dir {run_dir}: {CHECKPOINTS}/ is a symbolic link; checkpoints are written and "
                              f"deleted only in a real directory of the run")
    return root


def save_checkpoint(run_dir, step: int, fill: Callable[[Path], None]) -> Path:
    """Write checkpoint ``step``: ``fill(tmp)`` writes its files, then it is published and older ones removed."""
    root = real_checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root, _ours)
    final = root / f"step_{step:08d}"
    with atomic_dir(final) as tmp:
        fill(tmp)
    atomic_write(root / LATEST, final.name + "\n")
    for old in root.iterdir():
        if old != final and _NAME.match(old.name) and not old.is_symlink() and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint_state(run_dir) -> dict:
    """The state of the newest complete checkpoint; a one-line error when there is none or it is unreadable."""
    path = latest_checkpoint(run_dir)
    if path is None:
        raise SelfReplayError(f"--resume: {run_dir} has no training checkpoint ({CHECKPOINTS}/) to resume from")
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle errors vary
        raise SelfReplayError(f"{path / STATE}: corrupt training state ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or "counters" not in state:
        raise SelfReplayError(f"{path / STATE}: not a selfreplay training state")
    for name, t in state.get("model", {}).items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SelfReplayError(f"{path / STATE}: weight {name} holds NaN or infinite values")
    return state


def remove_checkpoints(run_dir) -> None:
    """Delete the checkpoints of a finished run: step directories, ``latest`` and our temporaries only, then
    checkpoints/ itself if nothing else is in it (a linked checkpoints/ is left alone)."""
    root = checkpoint_dir(run_dir)
    if root.is_symlink() or not root.is_dir():
        return
    remove_stale_temporaries(root, _ours)
    for entry in root.iterdir():
        if entry.is_symlink():
            continue
        if _NAME.match(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name == LATEST and entry.is_file():
            entry.unlink()
    try:
        root.rmdir()
    except OSError:  # something of the user's is in it: leave it
        pass


def has_checkpoint(run_dir) -> bool:
    return latest_checkpoint(run_dir) is not None
