"""Reports and figures of the paper's experiments (§5.3–5.8), computed from a sweep's run directories.

Each experiment YAML's ``name`` keys one report function (a text table with the paper's numbers beside ours
and a one-line verdict on the paper's direction) and one plot function (a PNG). Both read the sweep's results
(:func:`selfreplay.experiments.results.collect_results`), so they work on a partly finished sweep too.

Forgetting is compared at the same new-distribution (Spanish) loss: a finetune stops at ``stop.target_loss``
where the paper's does, and :func:`at_target` reads the old-distribution loss, training time and tokens at the
target by linear interpolation between the two evaluations around the first crossing (no overshoot bias).
Forgetting = old-distribution loss − the teacher's old-distribution loss before finetuning. The paper's numbers
printed beside ours are converted to our per-token loss convention first (:func:`paper_loss`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

from selfreplay.errors import SelfReplayError
from selfreplay.experiments.results import (at_target, finetune_point, fmt, paper_loss, pyplot, results_of,
                                            save_png, status_line, table, target_of, write_results)
from selfreplay.experiments.capacity import (capacity_frontier_plot, capacity_frontier_report, model_size_plot,
                                             model_size_report, pretrain_length_plot, pretrain_length_report,
                                             size_length_grid_plot, size_length_grid_report)
from selfreplay.experiments.frontier import frontier_plot, frontier_report
from selfreplay.experiments.sweep import Experiment, load_experiment


# ---------------------------------------------------------------------------- method comparison (§5.3)
def method_comparison_report(exp: Experiment) -> str:
    rows, trajs = results_of(exp)
    target = target_of(rows, "finetune")
    paper = {k: paper_loss(v) for k, v in exp.paper.get("forgetting", {}).items()}
    fts = [r for r in rows if r["stage"] == "finetune" and (r["stage"], r["run"]) in trajs]
    points = {r["grid.variant"]: finetune_point(r, trajs[(r["stage"], r["run"])], target) for r in fts}
    plain_traj = next((trajs[(r["stage"], r["run"])] for r in fts if r["grid.variant"] == "plain"), None)
    plain = points.get("plain", {}).get("forgetting")
    p_plain = paper.get("plain")
    out_rows = []
    for method, p in points.items():
        # plain finetuning's forgetting at this run's Spanish loss (the target, or where a run stopped short)
        same = at_target(plain_traj, p["valid_loss"]) if plain_traj and p["valid_loss"] is not None else None
        p["plain_same"] = same["prev_loss"] - p["start"] if same and p["start"] is not None else None
        rel = p["forgetting"] / p["plain_same"] if p["plain_same"] and p["forgetting"] is not None else None
        prel = paper[method] / p_plain if method in paper and p_plain else None
        out_rows.append([method, p["start"], p["prev_loss"], p["forgetting"], p["plain_same"], rel,
                         paper.get(method), prel, p["valid_loss"], "yes" if p["reached"] else "no",
                         round(p["tokens"] or 0),
                         p["train_time"]])
    text = [f"method comparison ({exp.scale}): English loss when Spanish reaches {fmt(target)} — "
            f"{status_line(rows)}",
            table(["method", "English before", "English at Spanish", "forgetting", "plain's at same Spanish",
                   "÷ plain", "paper forgetting", "paper ÷ plain", "Spanish", "reached", "tokens", "train s"],
                  out_rows)]
    replay = {m: p["forgetting"] for m, p in points.items() if m.startswith(("kl_", "ntp_"))}
    if plain and replay:
        worst = max(replay.values())
        text.append(f"replay forgetting / plain: {worst / plain:.3f} at worst ({max(replay, key=replay.get)}) — "
                    f"paper ≈1/20–1/40; done-when ≤ 1/5: {'yes' if worst <= plain / 5 else 'NO'}")
    lora = points.get("lora_r16", {})
    if lora.get("forgetting") is not None and lora.get("plain_same"):
        ratio = lora["forgetting"] / lora["plain_same"]
        text.append(f"LoRA r16 forgetting / plain at the same Spanish loss: {ratio:.2f}"
                    f" (paper 1.24: LoRA no better)" + ("" if lora["reached"] else
                                                       f"; LoRA stopped at Spanish {lora['valid_loss']:.3f}"))
    return "\n".join(text)


def method_comparison_plot(exp: Experiment, out: Path) -> None:
    plt = pyplot()
    rows, trajs = results_of(exp)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        t = trajs.get((r["stage"], r["run"]))
        if r["stage"] != "finetune" or not t:
            continue
        ax.plot([-x["valid_loss"] for x in t], [-x["prev_loss"] for x in t], marker=".", label=r["grid.variant"])
    ax.set_xlabel("Spanish log-likelihood (new)")
    ax.set_ylabel("English log-likelihood (old)")
    ax.set_title(f"Method comparison ({exp.scale})")
    ax.legend()
    save_png(fig, out)


# ---------------------------------------------------------------------------- high LR + replay (§5.8)
def high_lr_report(exp: Experiment) -> str:
    rows, trajs = results_of(exp)
    target = target_of(rows, "lower_lr") or target_of(rows, "replay")
    series: dict[str, list[tuple[float, dict]]] = {"lower_lr": [], "replay": []}
    for r in rows:
        t = trajs.get((r["stage"], r["run"]))
        if r["stage"] in series and t:
            x = r["cfg.optim.lr"] if r["stage"] == "lower_lr" else r["cfg.replay.fraction"]
            series[r["stage"]].append((x, finetune_point(r, t, target)))
    out_rows = []
    for stage, pts in series.items():
        for x, p in sorted(pts, key=lambda xp: -xp[0] if stage == "lower_lr" else xp[0]):
            label = f"lr {x:g}, no replay" if stage == "lower_lr" else f"lr {rows_lr(rows, 'replay'):g}, replay {x:g}"
            out_rows.append([label, p["prev_loss"], p["forgetting"], p["train_time"], round(p["tokens"] or 0),
                             "yes" if p["reached"] else "no"])
    text = [f"high LR + replay ({exp.scale}): finetuning to Spanish {fmt(target)} — {status_line(rows)}",
            table(["run", "English at target", "forgetting", "train s to target", "tokens to target", "reached"],
                  out_rows)]
    low = [p for _, p in series["lower_lr"] if p["reached"]]
    rep = [p for _, p in series["replay"] if p["reached"]]
    if low and rep:
        slowest = max(low, key=lambda p: p["train_time"])
        matching = [p for p in rep if p["forgetting"] <= slowest["forgetting"]]
        if matching:
            fastest = min(matching, key=lambda p: p["train_time"])
            speed = slowest["train_time"] / fastest["train_time"]
            tok = slowest["tokens"] / fastest["tokens"]
            text.append(f"slowest low-LR run: forgetting {slowest['forgetting']:.3f} in {slowest['train_time']:.0f} s; "
                        f"high LR + replay matches it in {fastest['train_time']:.1f} s: {speed:.1f}× faster "
                        f"({tok:.1f}× fewer tokens); paper ≈{exp.paper.get('speedup', 38)}×; done-when ≥ 5×: "
                        f"{'yes' if speed >= 5 else 'NO'}")
        else:
            text.append("no replay run reached the slowest low-LR run's forgetting: NO")
    paper_rows = [[f"lr {lr:g}, no replay", paper_loss(eng), secs] for lr, eng, secs in exp.paper.get("lower_lr", [])]
    paper_rows += [[f"lr 1e-3, replay {f:g}", paper_loss(eng), secs] for f, eng, secs in exp.paper.get("replay", [])]
    if paper_rows:
        text += ["paper, in our loss convention (English C4 → Spanish 3.3, 5.8M model, H100-class timing):",
                 table(["run", "English after", "train s"], paper_rows)]
    return "\n".join(text)


def rows_lr(rows: list[dict], stage: str) -> float:
    return next((float(r["cfg.optim.lr"]) for r in rows if r["stage"] == stage and r.get("cfg.optim.lr")), math.nan)


def high_lr_plot(exp: Experiment, out: Path) -> None:
    plt = pyplot()
    rows, trajs = results_of(exp)
    target = target_of(rows, "lower_lr")
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for stage, color, label in (("lower_lr", "tab:blue", "reduce learning rate"),
                                ("replay", "tab:red", "increase replay")):
        pts = []
        for r in rows:
            t = trajs.get((r["stage"], r["run"]))
            if r["stage"] == stage and t:
                p = finetune_point(r, t, target)
                if p["reached"] and p["train_time"]:
                    pts.append((p["train_time"], p["prev_loss"]))
        pts.sort()
        if pts:
            ax.plot(*zip(*pts), marker="o", color=color, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training time to the Spanish target (s)")
    ax.set_ylabel("English loss after finetuning")
    ax.set_title(f"High LR + replay ({exp.scale})")
    ax.legend()
    save_png(fig, out)


# ---------------------------------------------------------------------------- learning rates (§5.7)
def learning_rate_report(exp: Experiment) -> str:
    rows, trajs = results_of(exp)
    target = target_of(rows, "finetune")
    by_key = {f"{r['stage']}/{r['run']}": r for r in rows}
    out_rows = []
    for r in rows:
        t = trajs.get((r["stage"], r["run"]))
        if r["stage"] != "finetune" or not t:
            continue
        p = finetune_point(r, t, target)
        up = by_key.get(r["upstream"], {})
        lr = float(r["cfg.optim.lr"])
        out_rows.append([up.get("cfg.optim.lr"), lr, r.get("grid.variant"), p["start"], p["prev_loss"],
                         p["forgetting"], round(p["step"]) if p["step"] is not None else None,
                         lr * p["step"] if p["step"] else None,
                         "yes" if p["reached"] else "no"])
    out_rows.sort(key=lambda x: (x[2] or "", x[0] or 0, x[1]))
    text = [f"learning rates ({exp.scale}): English loss at Spanish {fmt(target)} — {status_line(rows)}",
            table(["pretrain LR", "finetune LR", "reg", "English before", "English at target", "forgetting",
                   "steps", "LR × steps", "reached"], out_rows)]
    text.append(_direction_lines(out_rows))
    paper = exp.paper.get("table")
    if paper:
        text += ["paper, in our loss convention (English after FT, start 3.21; no reg @FT 1e-6/1e-5/1e-4/1e-3 | KL "
                 "@FT 1e-6/1e-4/1e-3):",
                 table(["pretrain LR", "no reg", "KL"], [[k, paper_loss(v[0]), paper_loss(v[1])]
                                                         for k, v in paper.items()])]
    return "\n".join(text)


def _direction_lines(out_rows: list[list]) -> str:
    """Does a higher pretraining LR forget less (at each finetune LR and reg), and a lower finetune LR?"""
    cells: dict[tuple, float] = {(r[0], r[1], r[2]): r[5] for r in out_rows if r[5] is not None and r[8] == "yes"}
    pt = sorted({k[0] for k in cells})
    ft = sorted({k[1] for k in cells})
    regs = sorted({k[2] for k in cells})
    pt_ok = pt_n = ft_ok = ft_n = 0
    for reg in regs:
        for f in ft:
            vals = [cells[(p, f, reg)] for p in pt if (p, f, reg) in cells]
            pt_n += len(vals) > 1
            pt_ok += len(vals) > 1 and vals[-1] < vals[0]
        for p in pt:
            vals = [cells[(p, f, reg)] for f in ft if (p, f, reg) in cells]
            ft_n += len(vals) > 1
            ft_ok += len(vals) > 1 and vals[0] < vals[-1]
    return (f"higher pretraining LR forgets less: {pt_ok}/{pt_n} (finetune LR, reg) columns; "
            f"lower finetuning LR forgets less: {ft_ok}/{ft_n} (pretrain LR, reg) rows")


def learning_rate_plot(exp: Experiment, out: Path) -> None:
    plt = pyplot()
    rows, trajs = results_of(exp)
    target = target_of(rows, "finetune")
    by_key = {f"{r['stage']}/{r['run']}": r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    curves: dict[tuple, list] = {}
    for r in rows:
        t = trajs.get((r["stage"], r["run"]))
        if r["stage"] != "finetune" or not t:
            continue
        p = finetune_point(r, t, target)
        if p["reached"]:
            key = (by_key.get(r["upstream"], {}).get("cfg.optim.lr"), r.get("grid.variant"))
            curves.setdefault(key, []).append((float(r["cfg.optim.lr"]), p["prev_loss"], p["step"]))
    for (pt, reg), pts in sorted(curves.items(), key=lambda kv: (str(kv[0][1]), kv[0][0] or 0)):
        pts.sort()
        style = "--" if reg and reg != "none" else "-"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=f"PT {pt:g} {reg}")
        if style == "-":
            axes[1].plot([p[0] for p in pts], [p[0] * p[2] for p in pts], marker="o", label=f"PT {pt:g}")
    for ax, ylabel in zip(axes, ("English loss at the Spanish target", "finetuning LR × steps")):
        ax.set_xscale("log")
        ax.set_xlabel("finetuning LR")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"Learning rates ({exp.scale})")
    save_png(fig, out)


# ---------------------------------------------------------------------------- registry and entry points
REPORTS: dict[str, tuple[Callable[[Experiment], str], Callable[[Experiment, Path], None]]] = {
    "method_comparison": (method_comparison_report, method_comparison_plot),
    "high_lr": (high_lr_report, high_lr_plot),
    "model_size": (model_size_report, model_size_plot),
    "pretrain_length": (pretrain_length_report, pretrain_length_plot),
    "learning_rate": (learning_rate_report, learning_rate_plot),
    "capacity_frontier": (capacity_frontier_report, capacity_frontier_plot),
    "size_length_grid": (size_length_grid_report, size_length_grid_plot),
    "frontier": (frontier_report, frontier_plot),
    "forgetting_budget": (frontier_report, frontier_plot),
}


def _functions(exp: Experiment):
    if exp.name not in REPORTS:
        raise SelfReplayError(f"experiment {exp.name!r}: no report defined (known: {', '.join(REPORTS)})")
    if not exp.root.is_dir():
        raise SelfReplayError(f"experiment {exp.name!r} ({exp.scale}): no runs in {exp.root}; run "
                              f"`selfreplay sweep {exp.path} --scale {exp.scale}` first")
    return REPORTS[exp.name]


def experiment_report(name_or_path: str, scale: str = "cpu", runs_dir: str | Path = "runs") -> str:
    """The experiment's table from its run directories (also refreshes results.csv)."""
    exp = load_experiment(name_or_path, scale, runs_dir)
    report, _ = _functions(exp)
    write_results(exp)
    return report(exp)


def experiment_plot(name_or_path: str, scale: str = "cpu", runs_dir: str | Path = "runs",
                    out: Optional[str | Path] = None) -> Path:
    """Draw the experiment's figure; returns the PNG path."""
    exp = load_experiment(name_or_path, scale, runs_dir)
    _, plot = _functions(exp)
    out = Path(out) if out else exp.root / f"{exp.name}.png"
    plot(exp, out)
    return out
