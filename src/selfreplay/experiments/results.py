"""A sweep's results: one row per run (results.csv), every evaluation of every run (results_trajectories.csv), and
the helpers the reports read them with: values at a new-data target, the paper's numbers in our convention, tables
and figures.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Optional

from selfreplay.errors import SelfReplayError
from selfreplay.experiments.sweep import (Experiment, Job, claim_sweep_root, expand_jobs, flatten, format_value,
                                         job_config, job_status)
from selfreplay.replay.losses import from_paper_convention

PAPER_SEQ_LEN = 256  # the paper's models: losses divided by all 256 positions


RESULT_COLUMNS = ["stage", "run", "kind", "status", "upstream", "run_dir"]
SUMMARY_KEYS = ["valid_loss", "prev_loss", "forgetting", "prev_kl", "valid_kl", "best_valid_loss",
                "prev_loss_before", "steps", "tokens", "train_time", "eval_time", "stop_reason", "drift", "params",
                "replay_coeff", "replay_kl_smoothed"]


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def collect_results(exp: Experiment, jobs: Optional[list[Job]] = None) -> tuple[list[dict], list[dict]]:
    """(rows, trajectories): one row per run of the experiment, and one row per evaluation of every run."""
    from selfreplay.evaluate.metrics import read_metrics

    jobs = jobs if jobs is not None else expand_jobs(exp)
    rows, traj = [], []
    for j in jobs:
        row: dict[str, Any] = {"stage": j.stage, "run": j.name, "kind": j.kind, "status": job_status(j),
                               "upstream": j.upstream or "", "run_dir": str(j.run_dir)}
        row.update({f"grid.{k}": v for k, v in j.params.items()})
        row.update({f"from.{k}": v for k, v in j.upstream_params.items()})
        summary = _read_json(j.run_dir / "summary.json") or {}
        info = _read_json(j.run_dir / "run.json") or {}
        for k in SUMMARY_KEYS:
            if k == "params":
                row["params"] = (info.get("params") or {}).get("paper")
            else:
                row[k] = summary.get(k)
        try:
            cfg_flat = flatten(unflatten_config(j))
        except SelfReplayError:
            cfg_flat = {}
        row.update({f"cfg.{k}": format_value(v) if isinstance(v, list) else v for k, v in cfg_flat.items()})
        rows.append(row)
        for rec in read_metrics(j.run_dir):
            traj.append({"stage": j.stage, "run": j.name, **{k: v for k, v in rec.items()
                                                            if isinstance(v, (int, float, str)) or v is None}})
    return rows, traj


def unflatten_config(job: Job) -> dict:
    from selfreplay.config import config_to_dict

    cfg_path = job.run_dir / "config.yaml"
    if cfg_path.is_file():  # the resolved config the run used (a finetune's model is the checkpoint's)
        from selfreplay.config import TrainConfig, load_config

        return config_to_dict(load_config(TrainConfig, [str(cfg_path)]))
    return config_to_dict(job_config(job))


def _csv_text(rows: list[dict], first: list[str]) -> str:
    columns = list(first)
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def write_results(exp: Experiment, jobs: Optional[list[Job]] = None) -> tuple[Path, Path]:
    """Write results.csv and results_trajectories.csv under the experiment's run root (atomically)."""
    from selfreplay.train.files import atomic_write

    rows, traj = collect_results(exp, jobs)
    claim_sweep_root(exp)
    table, trajectories = exp.root / "results.csv", exp.root / "results_trajectories.csv"
    atomic_write(table, _csv_text(rows, RESULT_COLUMNS))
    atomic_write(trajectories, _csv_text(traj, ["stage", "run", "step", "tokens"]))
    return table, trajectories


def read_csv(path: Path) -> list[dict]:
    """Rows of a results CSV with numbers parsed back (empty cells -> None)."""
    def parse(v: str) -> Any:
        if v == "":
            return None
        for t in (int, float):
            try:
                return t(v)
            except ValueError:
                pass
        return {"True": True, "False": False}.get(v, v)

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in r.items()} for r in csv.DictReader(f)]


def paper_loss(value):
    """A loss (or a difference of losses) the paper reports, in our per-token convention (× T / (T − 1))."""
    if isinstance(value, (list, tuple)):
        return [paper_loss(v) for v in value]
    if isinstance(value, str):  # "3.99 / 3.98 / ..." as read off a figure
        return " / ".join(f"{paper_loss(float(v)):.3f}" for v in value.split("/"))
    return None if value is None else from_paper_convention(value, PAPER_SEQ_LEN)



def at_target(trajectory: list[dict], target: float, keys=("prev_loss", "train_time", "tokens", "step")) -> \
        Optional[dict]:
    """Values of ``keys`` where valid_loss first reaches ``target`` (interpolated); None if it never does."""
    prev = None
    for rec in trajectory:
        v = rec.get("valid_loss")
        if v is None:
            continue
        if v <= target:
            if prev is None or prev["valid_loss"] == v:
                return {k: rec.get(k) for k in keys} | {"valid_loss": v}
            w = (prev["valid_loss"] - target) / (prev["valid_loss"] - v)
            out = {"valid_loss": target}
            for k in keys:
                a, b = prev.get(k), rec.get(k)
                out[k] = a + w * (b - a) if a is not None and b is not None else b
            return out
        prev = rec
    return None


def by_run(traj: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for t in traj:
        out.setdefault((t["stage"], t["run"]), []).append(t)
    return out


def fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float) and abs(v) >= 1000:
        return f"{v:.0f}"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 10 ** -digits or v == 0 else f"{v:.1e}"
    return str(v)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-markdown table (pastes into the README as is)."""
    cells = [[fmt(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


def target_of(rows: list[dict], stage: str) -> Optional[float]:
    for r in rows:
        if r["stage"] == stage and r.get("cfg.stop.target_loss") is not None:
            return float(r["cfg.stop.target_loss"])
    return None


def finetune_point(row: dict, traj: list[dict], target: Optional[float]) -> dict:
    """English loss, forgetting, time and tokens of one finetune, at the Spanish target when it was reached."""
    start = row.get("prev_loss_before")
    if start is None and traj:
        start = traj[0].get("prev_loss")
    hit = at_target(traj, target) if target is not None else None
    if hit is None:
        final = traj[-1] if traj else {}
        point = {"reached": False, "prev_loss": final.get("prev_loss", row.get("prev_loss")),
                 "valid_loss": final.get("valid_loss", row.get("valid_loss")),
                 "train_time": final.get("train_time"), "tokens": final.get("tokens"), "step": final.get("step")}
    else:
        point = {"reached": True, **hit}
    point["start"] = start
    point["forgetting"] = point["prev_loss"] - start if point["prev_loss"] is not None and start is not None else None
    return point


def results_of(exp: Experiment) -> tuple[list[dict], dict]:
    """Result rows, and the trajectories of the finished runs (running ones would report a moving point)."""
    rows, traj = collect_results(exp)
    finished = {(r["stage"], r["run"]) for r in rows if r["status"] == "finished"}
    return rows, {k: v for k, v in by_run(traj).items() if k in finished}


def status_line(rows: list[dict]) -> str:
    done = sum(r["status"] == "finished" for r in rows)
    return f"{done}/{len(rows)} runs finished" + ("" if done == len(rows) else " (partial results)")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, out: Path) -> None:
    """Write the PNG atomically (temp name, then rename)."""
    import os

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, out)
    import matplotlib.pyplot as plt

    plt.close(fig)
