"""Run directories: weights, resolved config, provenance and resumable training state, all written atomically.

Layout of a run directory::

    model.safetensors   final weights
    config.yaml         the resolved TrainConfig
    run.json            provenance: model config, training corpus and its split, parent checkpoint, git commit
    metrics.jsonl       one JSON record per evaluation (written live by the trainer)
    summary.json        final metrics
    train_state/        latest resumable state (weights, optimizer, scheduler, data order, RNG); removed when done
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from safetensors.torch import load_file, save_file

from selfreplay.config import ModelConfig
from selfreplay.errors import SelfReplayError

WEIGHTS = "model.safetensors"
RUN_INFO = "run.json"
CONFIG = "config.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
TRAIN_STATE = "train_state"


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write a file under a temporary name in the same directory, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Save a module's parameters as safetensors, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
        save_file(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load safetensors weights into ``model``; a missing, corrupt or mismatched file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise SelfReplayError(f"{path}: weights file not found")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise SelfReplayError(f"{path}: corrupt weights file ({str(e).splitlines()[0]})") from None
    target = unwrap(model)
    expected = target.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        raise SelfReplayError(f"{path}: weights do not fit the model (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise SelfReplayError(f"{path}: weight {k} has shape {tuple(v.shape)}, model expects "
                                  f"{tuple(expected[k].shape)}")
    target.load_state_dict(state)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying module of a torch.compile / DDP wrapper."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def git_commit() -> Optional[str]:
    """The commit of the selfreplay source tree (with '+dirty' if modified), or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        if not commit:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def read_run_info(run_dir: str | Path) -> dict:
    """The provenance record of a finished run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SelfReplayError(f"checkpoint {run_dir}: directory not found")
    info_path = run_dir / RUN_INFO
    if not info_path.is_file() or not (run_dir / WEIGHTS).is_file():
        raise SelfReplayError(f"checkpoint {run_dir}: not a finished run directory (no {RUN_INFO} / {WEIGHTS})")
    try:
        info = json.loads(info_path.read_text())
        ModelConfig(**info["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SelfReplayError(f"checkpoint {run_dir}: corrupt {RUN_INFO} ({e})") from None
    return info


def load_model(run_dir: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the GPT saved in a run directory; returns (model, run_info)."""
    from selfreplay.model import GPT

    info = read_run_info(run_dir)
    model = GPT(ModelConfig(**info["model"]))
    load_weights(model, Path(run_dir) / WEIGHTS)
    return model.to(device), info


def save_run(run_dir: str | Path, model: torch.nn.Module, config_yaml: str, info: dict, summary: dict) -> None:
    """Write the final artefacts of a run (each file atomically, weights first)."""
    run_dir = Path(run_dir)
    save_weights(model, run_dir / WEIGHTS)
    atomic_write(run_dir / CONFIG, config_yaml)
    atomic_write_json(run_dir / RUN_INFO, info)
    atomic_write_json(run_dir / SUMMARY, summary)


def save_train_state(run_dir: str | Path, model: torch.nn.Module, state: dict) -> None:
    """Replace ``run_dir/train_state`` by a new one as a whole: built in a temp dir, then swapped in."""
    def fill(tmp: Path) -> None:
        save_weights(model, tmp / WEIGHTS)
        torch.save(state, tmp / "state.pt")

    replace_train_state(run_dir, fill)


def replace_train_state(run_dir: str | Path, fill: Callable[[Path], None]) -> None:
    """Swap in a new ``run_dir/train_state``: ``fill(tmp)`` writes it into a temp dir, which then replaces the old
    one by renames (an interrupted save leaves the old one or ``.train_state.old``, never a half-written one)."""
    run_dir = Path(run_dir)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".train_state."))
    try:
        fill(tmp)
        final = run_dir / TRAIN_STATE
        old = run_dir / ".train_state.old"
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_train_state(run_dir: str | Path, model: torch.nn.Module) -> dict:
    """Load weights into ``model`` and return the saved training state dict."""
    path = Path(run_dir) / TRAIN_STATE
    if not (path / "state.pt").is_file():
        raise SelfReplayError(f"--resume: {run_dir} has no training checkpoint ({TRAIN_STATE}/) to resume from")
    load_weights(model, path / WEIGHTS)
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # pickle errors vary
        raise SelfReplayError(f"{path}/state.pt: corrupt training state ({str(e).splitlines()[0]})") from None


def model_config_dict(cfg: ModelConfig) -> dict:
    return asdict(cfg)
