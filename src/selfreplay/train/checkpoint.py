"""Resumable training checkpoints, safe at every instant, and loading one never runs code.

Layout inside a run directory::

    checkpoints/step_00000120/   one complete checkpoint, appeared by one rename:
        state.json                   the state's structure: counters, config, positions, optimizer settings
        state.safetensors            every tensor of it (weights, optimizer moments, RNG states, Fisher, ...)
    checkpoints/latest           the name of the newest complete checkpoint, replaced atomically

A new checkpoint is written into a temporary directory, renamed into place, then ``latest`` is pointed at it,
and only then are older checkpoints deleted: a kill at any moment leaves at least one complete checkpoint, and
:func:`latest_checkpoint` finds the newest complete one even if ``latest`` is missing or stale. Temporary
directories left by kills are removed on the next save. Only these names are ever deleted, never through a
symbolic link: a linked ``checkpoints/`` is refused, and ``checkpoints/`` stays when anything else is in it.

The state holds everything the loop needs to continue bit for bit: the trainable weights and optimizer state
(gathered in full, so any number of ranks can resume), the scheduler, the data and replay positions, the RNG
states, the counters and the metrics accumulated since the last evaluation. It is stored as JSON plus
safetensors, never as a pickle: reading a checkpoint someone else wrote cannot execute anything. Earlier versions
wrote ``state.pt`` (a pickle): such a checkpoint is refused with one line, never unpickled.
"""

from __future__ import annotations

import base64
import json
import math
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from selfreplay.errors import SelfReplayError
from selfreplay.train.files import atomic_dir, atomic_write, remove_stale_temporaries

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "state.json"
TENSORS = "state.safetensors"
LEGACY_STATE = "state.pt"  # the pickle earlier versions wrote: recognised, never loaded
STATE_FORMAT = 1
_NAME = re.compile(r"^step_(\d{8,})$")
_TAG = "$"  # JSON objects whose one key starts with this encode what JSON lacks (tensors, tuples, inf, ...)


# ------------------------------------------------------------------------------------------ the state file

def _encode(obj: Any, tensors: dict[str, torch.Tensor], seen: dict[int, str]) -> Any:
    """``obj`` as JSON, its tensors moved into ``tensors`` under numbered keys (shared storage stored once)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        key = f"{len(tensors):06d}"
        if not t.is_contiguous() or t.untyped_storage().data_ptr() in seen:
            t = t.contiguous().clone()  # safetensors refuses tensors that share memory
        if t.numel():
            seen[t.untyped_storage().data_ptr()] = key
        tensors[key] = t
        return {_TAG + "tensor": key}
    if isinstance(obj, np.ndarray):
        return {_TAG + "ndarray": _encode(torch.from_numpy(np.ascontiguousarray(obj)), tensors, seen)}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors, seen)
    if isinstance(obj, float) and not math.isfinite(obj):
        return {_TAG + "float": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {_TAG + "tuple": [_encode(v, tensors, seen) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, seen) for v in obj]
    if isinstance(obj, bytes):
        return {_TAG + "bytes": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith(_TAG) for k in obj):
            return {k: _encode(v, tensors, seen) for k, v in obj.items()}
        return {_TAG + "items": [[_encode(k, tensors, seen), _encode(v, tensors, seen)] for k, v in obj.items()]}
    raise TypeError(f"training state: cannot store a {type(obj).__name__}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, value), = obj.items()
        if tag == _TAG + "tensor":
            return tensors[value]
        if tag == _TAG + "ndarray":
            return _decode(value, tensors).numpy()
        if tag == _TAG + "float":
            return float(value)
        if tag == _TAG + "tuple":
            return tuple(_decode(v, tensors) for v in value)
        if tag == _TAG + "bytes":
            return base64.b64decode(value)
        if tag == _TAG + "items":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def write_state(state: dict, directory) -> None:
    """Store a training state (nested dicts / lists / tuples of tensors, numbers, strings) in ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = {"format": STATE_FORMAT, "state": _encode(state, tensors, {})}
    save_file(tensors, str(directory / TENSORS))  # a full disk: files.disk_full reads safetensors' error
    with open(directory / STATE, "w", encoding="utf-8") as f:
        json.dump(skeleton, f, allow_nan=False)


def read_state(directory) -> dict:
    """The training state stored by :func:`write_state`; a one-line error for anything else."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / STATE).is_file() and (directory / LEGACY_STATE).is_file():
        raise SelfReplayError(f"{directory / LEGACY_STATE}: a checkpoint in the pickle format of an earlier "
                              f"selfreplay, not loaded (unpickling a file can run code); finish that run with the "
                              f"version that wrote it, or start it again")
    where = directory / STATE  # the file being read, for the error
    try:
        skeleton = json.loads(where.read_text(encoding="utf-8"))
        if not isinstance(skeleton, dict) or skeleton.get("format") != STATE_FORMAT:
            raise ValueError(f"not a selfreplay training state of format {STATE_FORMAT}")
        where = directory / TENSORS
        tensors = load_file(str(where), device="cpu")
        where = directory / STATE
        return _decode(skeleton["state"], tensors)
    except Exception as e:  # JSON, safetensors and a bad structure fail in their own ways
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise SelfReplayError(f"{where}: corrupt training state ({first})") from None


# ------------------------------------------------------------------------------------------ checkpoints

def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINTS


def _complete(path: Path) -> bool:
    if _NAME.match(path.name) is None:
        return False
    return ((path / STATE).is_file() and (path / TENSORS).is_file()) or (path / LEGACY_STATE).is_file()


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
    """Write checkpoint ``step``: ``fill(tmp)`` writes its files (:func:`write_state`), then it is published and
    older ones removed."""
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
    state = read_state(path)
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
