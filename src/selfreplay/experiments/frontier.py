"""The forgetting–learning frontier: every method's forgetting against its new-data loss, over its strength grid.

In a frontier experiment each finetuning *stage* is one method (its name is the method's label) and its grid is
the method's strength (coefficients, learning rates, LoRA ranks, fractions, budgets). Every run is a point
(new-data loss, forgetting = old-data loss − the teacher's) at its end; a method is the line through its points.
The report states, at a few new-data loss targets (``report.targets`` in the experiment file), each method's
least forgetting among its runs that reach the target — read on each run's trajectory where it first reaches the
target, interpolated between evaluations — best first, with the strength that won. A winner at an end of its grid, or
next to a grid value whose run never reached the target, is flagged: the method's optimum may lie beyond it, where
the grid has no run (extend the grid there). Budget runs (a ``budget`` stage over ``replay.target_kl``)
are also compared with the fixed-coefficient KL line (a ``kl_fixed`` stage): the held-out old-data KL against
the target, and the new-data loss against the line's at the same forgetting.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from selfreplay.experiments.results import at_target, fmt, pyplot, results_of, save_png, status_line, table
from selfreplay.experiments.sweep import Experiment, format_value

KL_LINE, BUDGET = "kl_fixed", "budget"


def _strength(row: dict) -> tuple[str, Optional[float]]:
    """The run's grid value: a label (``coeff=0.3``) and the number (for ordering), or the run name."""
    grid = {k[len("grid."):]: v for k, v in row.items() if k.startswith("grid.") and k != "grid.variant"}
    if not grid:
        return row["run"], None
    key, value = next(iter(grid.items()))
    return f"{key.split('.')[-1]}={format_value(value)}", float(value) if isinstance(value, (int, float)) else None


def frontier_points(exp: Experiment) -> tuple[list[dict], list[dict]]:
    """(result rows, one point per finished finetune: method, strength, new-data loss, forgetting, old-data KL,
    final coefficient and its trajectory of (new loss, forgetting))."""
    rows, trajs = results_of(exp)
    points = []
    for r in rows:
        traj = trajs.get((r["stage"], r["run"]))
        if r["kind"] != "finetune" or not traj:
            continue
        start = r.get("prev_loss_before")
        if start is None:
            start = traj[0].get("prev_loss")
        label, value = _strength(r)
        end = traj[-1]
        uses_coeff = r.get("cfg.replay.method") not in ("none", "replace", None)
        points.append({"method": r["stage"], "strength": label, "value": value, "new": end.get("valid_loss"),
                       "forgetting": end["prev_loss"] - start if end.get("prev_loss") is not None else None,
                       "prev_kl": end.get("prev_kl"), "coeff": end.get("replay_coeff") if uses_coeff else None,
                       "target_kl": r.get("cfg.replay.target_kl"), "start": start, "traj": traj})
    return rows, points


def forgetting_at(point: dict, target: float) -> Optional[float]:
    """The run's forgetting where its new-data loss first reaches ``target`` (None if it never does)."""
    hit = at_target(point["traj"], target, keys=("prev_loss",))
    return None if hit is None or hit["prev_loss"] is None else hit["prev_loss"] - point["start"]


def best_at(points: list[dict], target: float) -> dict[str, Optional[float]]:
    """Per method: the least forgetting among its runs reaching ``target``."""
    return {m: w["forgetting"] if w else None for m, w in winners_at(points, target).items()}


def winners_at(points: list[dict], target: float) -> dict[str, Optional[dict]]:
    """Per method: its run of least forgetting among those reaching ``target`` (None: none does) as ``forgetting``,
    ``strength`` and ``edge``: whether the winner sits at an end of the method's grid or next to a grid value that
    never reached the target (its optimum may then lie beyond the winner, where the grid has no run)."""
    out: dict[str, Optional[dict]] = {}
    for method in dict.fromkeys(p["method"] for p in points):
        runs = [p for p in points if p["method"] == method]
        reached = [(forgetting_at(p, target), i) for i, p in enumerate(runs)]
        scored = [(f, i) for f, i in reached if f is not None]
        if not scored:
            out[method] = None
            continue
        forgetting, i = min(scored)
        ordered = sorted(range(len(runs)), key=lambda j: (runs[j].get("value") is None, runs[j].get("value") or 0.0))
        at = ordered.index(i)
        neighbours = [ordered[k] for k in (at - 1, at + 1) if 0 <= k < len(ordered)]
        edge = len(runs) > 1 and (len(neighbours) < 2 or any(reached[j][0] is None for j in neighbours))
        out[method] = {"forgetting": forgetting, "strength": runs[i].get("strength"), "edge": edge}
    return out


def line_new_loss_at(line: list[dict], forgetting: float) -> Optional[float]:
    """The new-data loss of a method's line (its runs' end points) at ``forgetting``, interpolated in
    log-forgetting; None outside the line's range."""
    pts = sorted((p["forgetting"], p["new"]) for p in line if p["forgetting"] and p["forgetting"] > 0)
    if forgetting <= 0:
        return None
    for (f0, n0), (f1, n1) in zip(pts, pts[1:]):
        if f0 <= forgetting <= f1:
            w = (math.log(forgetting) - math.log(f0)) / (math.log(f1) - math.log(f0)) if f1 > f0 else 0.0
            return n0 + w * (n1 - n0)
    return None


def _targets(exp: Experiment, points: list[dict]) -> list[float]:
    given = (exp.report or {}).get("targets")
    if given:
        return [float(t) for t in given]
    reached = sorted(p["new"] for p in points if p["new"] is not None)
    return [round(reached[len(reached) // 2], 2)] if reached else []


def frontier_report(exp: Experiment) -> str:
    rows, points = frontier_points(exp)
    text = [f"{exp.name} ({exp.scale}): forgetting (old-data loss increase) against new-data loss — "
            f"{status_line(rows)}",
            table(["method", "strength", "new-data loss", "forgetting", "old-data KL", "final coeff"],
                  [[p["method"], p["strength"], p["new"], p["forgetting"], p["prev_kl"], p["coeff"]]
                   for p in points])]
    targets = _targets(exp, points)
    if targets:
        text += ["", *ranking_lines(points, targets)]
    budget = _budget_lines(points)
    if budget:
        text += ["", budget]
    return "\n".join(text)


def ranking_lines(points: list[dict], targets: list[float]) -> list[str]:
    """The least forgetting per method at each new-data target, best first at the first, with the winning strength
    and a flag (⚑) on grid-edge winners, and what the flags ask for."""
    wins = {t: winners_at(points, t) for t in targets}
    first = wins[targets[0]]
    order = sorted(first, key=lambda m: (first[m] is None, first[m]["forgetting"] if first[m] else 0.0))

    def cell(w: Optional[dict]) -> str:
        return "—" if w is None else f"{fmt(w['forgetting'])} ({w['strength']}{' ⚑' if w['edge'] else ''})"

    flagged = sorted({m for t in targets for m, w in wins[t].items() if w and w["edge"]}, key=order.index)
    note = (f"⚑ grid-edge winners ({', '.join(flagged)}): the winning strength is at an end of its grid or next to a "
            f"value that never reached the target; the method's optimum may lie beyond it: extend its grid there"
            if flagged else "no grid-edge winner: every winning strength has runs on both sides that reached the "
                             "target")
    return [f"least forgetting among each method's runs reaching a new-data loss, and the strength that won (best "
            f"first at {fmt(targets[0])}; — : no run reached it)",
            table(["method", *[f"at {fmt(t)}" for t in targets]], [[m, *[cell(wins[t][m]) for t in targets]]
                                                                  for m in order]),
            note]


def _budget_lines(points: list[dict]) -> str:
    line = [p for p in points if p["method"] == KL_LINE]
    runs = [p for p in points if p["method"] == BUDGET]
    if not runs:
        return ""
    out_rows, ok_kl, ok_line = [], True, True
    for p in sorted(runs, key=lambda p: p["value"] or 0.0):
        target = p["target_kl"] if p["target_kl"] is not None else p["value"]
        ratio = p["prev_kl"] / target if p["prev_kl"] is not None and target else None
        on_line = line_new_loss_at(line, p["forgetting"]) if p["forgetting"] is not None else None
        gap = p["new"] - on_line if on_line is not None else None
        ok_kl &= ratio is not None and 1 / 1.5 <= ratio <= 1.5
        ok_line &= gap is not None and gap <= 0.02
        out_rows.append([target, p["prev_kl"], ratio, p["forgetting"], p["new"], on_line, gap, p["coeff"]])
    return "\n".join([
        "forgetting budgets: the held-out old-data KL against the target, and the new-data loss against the "
        "fixed-coefficient KL line's at the same forgetting",
        table(["target_kl", "old-data KL", "÷ target", "forgetting", "new-data loss", "KL line at same forgetting",
               "gap", "final coeff"], out_rows),
        f"every budget within ×1.5 of its target: {'yes' if ok_kl else 'NO'}; every budget within 0.02 nats of "
        f"(or better than) the KL line: {'yes' if ok_line else 'NO'}"])


def frontier_plot(exp: Experiment, out: Path) -> None:
    plt = pyplot()
    _, points = frontier_points(exp)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    methods = list(dict.fromkeys(p["method"] for p in points))
    for m in methods:
        pts = sorted((p for p in points if p["method"] == m and p["forgetting"] is not None),
                     key=lambda p: (p["value"] is None, p["value"] or 0.0))
        if m == BUDGET:
            ax.scatter([p["new"] for p in pts], [p["forgetting"] for p in pts], marker="*", s=160, zorder=5,
                       color="black", label="budget (target_kl)")
            for p in pts:
                ax.annotate(p["strength"], (p["new"], p["forgetting"]), textcoords="offset points", xytext=(6, 4),
                            fontsize=8)
            continue
        style = {"linewidth": 2.5, "color": "black"} if m == KL_LINE else {}
        ax.plot([p["new"] for p in pts], [p["forgetting"] for p in pts], marker="o", label=m, **style)
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xlabel("new-data loss (nats per token)")
    ax.set_ylabel("forgetting: old-data loss increase")
    ax.set_title(f"{exp.name} ({exp.scale}): each method over its strength grid")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, out)
