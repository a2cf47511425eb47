"""The paper's capacity findings (§5.4 frontier, §5.5a model size, §5.5b pretraining length, §5.6 size × length
grid): tables, verdicts and figures from a sweep's run directories.

A capacity finding only means something where the models the paper calls saturated are near capacity here too,
so every table shows each pretrained model's tokens per parameter (the paper's parameter count) and how much its
English loss still fell over its last doubling of tokens (:func:`saturation`); a verdict names the finding as
reproduced only where that gain is at most ``FLATTENING_GAIN``. The verdicts test the issue's expectations: best
forgetting falls ≥ 5× from the smallest to the largest width; it rises ≥ 3× from the shortest to the longest
pretraining, from ≤ 0.02 nats; every overtrained finetune ends within 0.03 nats of the mixtures' frontier; the
20-TPP model's English rises ≤ 0.1 nats while its Spanish ends ≤ 0.1 nats above the frontier's best Spanish.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

from selfreplay.experiments.results import (finetune_point, fmt, paper_loss, pyplot, results_of, save_png,
                                            status_line, table, target_of)
from selfreplay.experiments.sweep import Experiment

FLATTENING_GAIN = 0.1  # nats of loss over the last doubling of tokens: at most this is "near capacity"
SIZE_FALL = 5.0  # model size: best forgetting of the smallest width / that of the largest
LENGTH_RISE, LENGTH_START = 3.0, 0.02  # pretraining length: longest / shortest, and the shortest at most this
FRONTIER_TOLERANCE = 0.03  # nats between an overtrained finetune's endpoint and the frontier
SHORT_ENGLISH_RISE = 0.1  # the 20-TPP model's English loss may rise at most this much ...
SHORT_SPANISH_BEHIND = 0.1  # ... while its Spanish ends at most this far above the frontier's best Spanish


# ---------------------------------------------------------------------------- saturation
def _loss_at(traj: list[dict], tokens: float, key: str) -> Optional[float]:
    """``key`` at ``tokens``, interpolated linearly in log(tokens) between the two evaluations around it."""
    points = [(r["tokens"], r[key]) for r in traj if r.get(key) is not None and r.get("tokens")]
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if t0 <= tokens <= t1:
            w = math.log(tokens / t0) / math.log(t1 / t0) if t1 > t0 else 1.0
            return v0 + w * (v1 - v0)
    return None


def saturation(row: dict, traj: list[dict], key: str = "valid_loss") -> dict:
    """A pretrained model's tokens per parameter and the fall of its loss over its last doubling of tokens (None
    when no evaluation lies at or before half its tokens). Under a cosine schedule the half-way loss is read from
    the same run, before its learning rate decayed: an upper bound on what a run half as long would gain."""
    tokens = traj[-1].get("tokens") if traj else None
    params = row.get("params")
    half = _loss_at(traj, tokens / 2, key) if tokens else None
    end = traj[-1].get(key) if traj else None
    return {"tpp": tokens / float(params) if tokens and params else None,
            "gain": half - end if half is not None and end is not None else None}


def _flattening(gain: Optional[float]) -> str:
    if gain is None:
        return "unknown (no evaluation at half its tokens)"
    return f"{'flattening' if gain <= FLATTENING_GAIN else 'NOT flattening'} ({gain:.3f} nats over its last doubling)"


# ---------------------------------------------------------------------------- best coefficient per model (§5.5)
def best_by_group(exp: Experiment, group_label: Callable[[dict], Any], ft_stage: str = "finetune") -> list[dict]:
    """Per pretrained model: its saturation, and the finetune with the least forgetting among those reaching the
    Spanish target (with the coefficients that did not reach it)."""
    rows, trajs = results_of(exp)
    target = target_of(rows, ft_stage)
    by_key = {f"{r['stage']}/{r['run']}": r for r in rows}
    groups: dict[str, dict] = {}
    for r in rows:
        if r["stage"] != ft_stage or (r["stage"], r["run"]) not in trajs:
            continue
        up = by_key.get(r["upstream"], {})
        g = groups.setdefault(r["upstream"], {"label": group_label(up), "pre": up, "points": []})
        g["points"].append((r, finetune_point(r, trajs[(r["stage"], r["run"])], target)))
    out = []
    for upstream, g in groups.items():
        reached = [(r, p) for r, p in g["points"] if p["reached"]]
        best_row, best = min(reached, key=lambda rp: rp[1]["prev_loss"]) if reached else (None, None)
        pre = g["pre"]
        sat = saturation(pre, trajs.get((pre.get("stage"), pre.get("run")), []))
        out.append({"label": g["label"], "params": pre.get("params"), "start": g["points"][0][1]["start"],
                    "best": best["prev_loss"] if best else None, "forgetting": best["forgetting"] if best else None,
                    "best_coeff": _coeff(best_row) if best_row else None,
                    "failed": [_coeff(r) for r, p in g["points"] if not p["reached"]],
                    "reached": len(reached), "runs": len(g["points"]), "target": target, "points": g["points"],
                    **sat})
    return out


def _coeff(row: dict) -> Optional[float]:
    c = row.get("cfg.replay.coeff")
    return float(c) if c is not None else None


def _ratio(big: Optional[float], small: Optional[float]) -> Optional[float]:
    """big / small for forgetting values (a small value at or below zero: infinitely many times)."""
    if big is None or small is None:
        return None
    return math.inf if small <= 0 else big / small


def _outcome(found: bool, gain: Optional[float], which: str) -> str:
    """A finding is called reproduced or not only where the model it hinges on is near capacity."""
    if gain is None or gain > FLATTENING_GAIN:
        return f"not shown ({which} is not near capacity)"
    return "reproduced" if found else "NOT reproduced"


def _verdict_size(groups: list[dict]) -> str:
    if len(groups) < 2 or groups[0]["forgetting"] is None or groups[-1]["forgetting"] is None:
        return "verdict: not enough finished widths reached the target"
    small, large = groups[0], groups[-1]
    ratio = _ratio(small["forgetting"], large["forgetting"])
    found = ratio is not None and ratio >= SIZE_FALL and small["forgetting"] > LENGTH_START
    return (f"verdict: {_outcome(found, small['gain'], 'the smallest width')} — best forgetting "
            f"{fmt(small['forgetting'])} (width {small['label']}) → {fmt(large['forgetting'])} (width "
            f"{large['label']}), {_times(ratio)} lower (paper: 0.26 → 0.005, 52×; expected ≥ {SIZE_FALL:g}×); "
            f"smallest width {_flattening(small['gain'])}")


def _verdict_length(groups: list[dict]) -> str:
    if len(groups) < 2 or groups[0]["forgetting"] is None or groups[-1]["forgetting"] is None:
        return "verdict: not enough finished lengths reached the target"
    short, long_ = groups[0], groups[-1]
    ratio = _ratio(long_["forgetting"], max(short["forgetting"], 0.0))
    found = ratio is not None and ratio >= LENGTH_RISE and short["forgetting"] <= LENGTH_START
    return (f"verdict: {_outcome(found, long_['gain'], 'the longest run')} — best forgetting "
            f"{fmt(short['forgetting'])} at {fmt(short['tpp'], 0)} TPP → {fmt(long_['forgetting'])} at "
            f"{fmt(long_['tpp'], 0)} TPP, {_times(ratio)} higher (paper: ≈ 0 → 0.18; expected ≥ {LENGTH_RISE:g}× "
            f"from ≤ {LENGTH_START}); longest run {_flattening(long_['gain'])}")


def _times(ratio: Optional[float]) -> str:
    return "—" if ratio is None else ("∞×" if math.isinf(ratio) else f"{ratio:.1f}×")


def _coeff_cell(g: dict) -> Optional[str]:
    """The winning coefficient, flagged ⚑ when it is the grid's strongest (the optimum may lie beyond the grid)."""
    if g["best_coeff"] is None:
        return None
    strongest = max(_coeff(r) for r, _ in g["points"])
    return f"{g['best_coeff']:g}" + (" ⚑" if g["best_coeff"] == strongest else "")


def _slice_report(exp: Experiment, title: str, label: str, key: Callable[[dict], Any], paper_key: str,
                  verdict: Callable[[list[dict]], str]) -> str:
    groups = sorted(best_by_group(exp, key), key=lambda g: float(g["label"]))
    paper = exp.paper.get(paper_key, {})
    rows = [[f"{float(g['label']):g}", g["params"], g["tpp"], g["gain"], g["start"], g["best"], g["forgetting"],
             _coeff_cell(g), f"{g['reached']}/{g['runs']}", " ".join(f"{c:g}" for c in g["failed"]) or "—"]
            for g in groups]
    rows_all, _ = results_of(exp)
    text = [f"{title} ({exp.scale}): best English loss among KL-coefficient runs reaching Spanish "
            f"{fmt(groups[0]['target'] if groups else None)} — {status_line(rows_all)}",
            table([label, "params", "tokens/param", "gain last 2×", "English before", "best after FT", "forgetting",
                   "best coeff", "reached", "× (missed target)"], rows)]
    if paper:
        text += ["paper, in our loss convention:", table([label, "English before", "best after FT", "forgetting"], [
            [k, paper_loss(v.get("before")), paper_loss(v.get("after")), paper_loss(v.get("forgetting"))]
            for k, v in paper.items()])]
    if any((_coeff_cell(g) or "").endswith("⚑") for g in groups):
        text.append("⚑ the strongest coefficient of the grid won: that model's least forgetting may be lower still")
    text.append(verdict(groups))
    return "\n".join(text)


def model_size_report(exp: Experiment) -> str:
    return _slice_report(exp, "model size", "d_model", lambda up: up.get("cfg.model.d_model"), "model_size",
                         _verdict_size)


def pretrain_length_report(exp: Experiment) -> str:
    return _slice_report(exp, "pretraining length", "length (TPP)", lambda up: up.get("cfg.stop.tokens_per_param"),
                         "pretrain_length", _verdict_length)


def _slice_plot(exp: Experiment, out: Path, key: Callable[[dict], Any], label: str, title: str,
                paper_key: str, log_x: bool) -> None:
    """Ours (least forgetting per model, every coefficient as a dot, a red × where it missed the target) beside
    the paper's curve."""
    plt = pyplot()
    groups = sorted(best_by_group(exp, key), key=lambda g: float(g["label"]))
    paper = exp.paper.get(paper_key, {})
    fig, axes = plt.subplots(1, 2 if paper else 1, figsize=(10 if paper else 6.5, 4.5), squeeze=False)
    ax = axes[0][0]
    xs = [float(g["label"]) for g in groups]
    values = [p["forgetting"] for g in groups for _, p in g["points"] if p["forgetting"] is not None]
    ax.plot(xs, [g["forgetting"] if g["forgetting"] is not None else math.nan for g in groups], "o-",
            color="tab:green", label="least forgetting at the Spanish target", zorder=3)
    for x, g in zip(xs, groups):
        for _, p in g["points"]:
            ax.plot(x, p["forgetting"], "x" if not p["reached"] else ".", color="red" if not p["reached"] else "grey",
                    ms=7 if not p["reached"] else 5)
    ax.plot([], [], "x", color="red", label="coefficient that missed the target")
    ax.plot([], [], ".", color="grey", label="other coefficients")
    if log_x:
        ax.set_xscale("log")
    if values and min(values) <= 0:
        ax.set_yscale("symlog", linthresh=0.01)
        ax.axhline(0, color="black", lw=0.5)
    else:
        ax.set_yscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("English forgetting (nats)")
    ax.set_title(f"ours ({exp.scale})")
    ax.legend(fontsize=7)
    if paper:
        right = axes[0][1]
        names = list(paper)
        theirs = [max(paper_loss(paper[k].get("forgetting")), 1e-3) for k in names]
        right.plot(range(len(names)), theirs, "o-", color="black")
        right.set_xticks(range(len(names)), names, fontsize=7, rotation=20)
        right.set_yscale("log")
        if ax.get_yscale() == "log":  # one scale for both panels
            every = [v for v in values + theirs if v > 0]
            for a in (ax, right):
                a.set_ylim(min(every) / 1.5, max(every) * 1.5)
        right.set_title("paper (≈ 0 drawn at 0.001)")
        right.set_xlabel(label)
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, out)


def model_size_plot(exp: Experiment, out: Path) -> None:
    _slice_plot(exp, out, lambda up: up.get("cfg.model.d_model"), "d_model (width)", "Larger models forget less",
                "model_size", log_x=False)


def pretrain_length_plot(exp: Experiment, out: Path) -> None:
    _slice_plot(exp, out, lambda up: up.get("cfg.stop.tokens_per_param"), "pretraining tokens per parameter",
                "Longer pretraining forgets more", "pretrain_length", log_x=True)


# ---------------------------------------------------------------------------- capacity frontier (§5.4)
def pareto_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto-optimal (Spanish, English) points (lower is better in both), sorted by Spanish loss."""
    best, out = math.inf, []
    for s, e in sorted(points):
        if e < best:
            out.append((s, e))
            best = e
    return out


def frontier_gap(frontier: list[tuple[float, float]], s: float, e: float) -> Optional[float]:
    """English loss above (+) or below (−, beyond the frontier) the frontier's piecewise-linear curve at Spanish
    loss ``s``; outside the curve's Spanish range, against its nearest end (a point left of the most-Spanish
    mixture and no higher in English dominates it)."""
    if not frontier:
        return None
    if s <= frontier[0][0]:
        return e - frontier[0][1]
    if s >= frontier[-1][0]:
        return e - frontier[-1][1]
    for (s0, e0), (s1, e1) in zip(frontier, frontier[1:]):
        if s0 <= s <= s1:
            return e - (e0 + (e1 - e0) * (s - s0) / (s1 - s0))
    return None


def capacity_frontier_data(exp: Experiment) -> dict:
    rows, trajs = results_of(exp)
    mixtures = []
    for r in rows:
        t = trajs.get((r["stage"], r["run"]))
        if r["stage"] != "mixtures" or not t:
            continue
        mixtures.append({"fraction": r.get("cfg.data.mix_fraction"), "spanish": t[-1].get("prev_loss"),
                         "english": t[-1].get("valid_loss"), **saturation(r, t)})
    frontier = pareto_frontier([(m["spanish"], m["english"]) for m in mixtures
                                if m["spanish"] is not None and m["english"] is not None])
    finetunes: dict[str, list[dict]] = {}
    for r in rows:
        t = trajs.get((r["stage"], r["run"]))
        if r["kind"] != "finetune" or not t:
            continue
        end = t[-1]
        finetunes.setdefault(r["stage"], []).append(
            {"coeff": _coeff(r), "start": (t[0]["valid_loss"], t[0]["prev_loss"]),
             "end": (end["valid_loss"], end["prev_loss"]), "trajectory": [(x["valid_loss"], x["prev_loss"]) for x in t],
             "gap": frontier_gap(frontier, end["valid_loss"], end["prev_loss"])})
    for fts in finetunes.values():
        fts.sort(key=lambda f: f["coeff"])
    return {"rows": rows, "mixtures": sorted(mixtures, key=lambda m: m["fraction"]), "frontier": frontier,
            "finetunes": finetunes}


def _frontier_verdict(d: dict) -> list[str]:
    lines = []
    sat = d["finetunes"].get("ft_saturated", [])
    most_english = d["mixtures"][0] if d["mixtures"] else None
    if sat and most_english:
        gaps = [f["gap"] for f in sat if f["gap"] is not None]
        on = bool(gaps) and all(abs(g) <= FRONTIER_TOLERANCE for g in gaps)
        crosses = bool(gaps) and min(gaps) < -FRONTIER_TOLERANCE
        flat = most_english["gain"] is not None and most_english["gain"] <= FLATTENING_GAIN
        what = ("reproduced" if on and flat else "not shown (the mixtures are not near capacity)" if not flat
                else "crossed" if crosses else "partly: none crosses, but not every endpoint reaches the frontier")
        lines.append(f"verdict (overtrained): {what} — endpoints {', '.join(f'{g:+.3f}' for g in gaps)} nats from "
                     f"the frontier (expected within ±{FRONTIER_TOLERANCE}); the most-English mixture "
                     f"{_flattening(most_english['gain'])} at {fmt(most_english['tpp'], 0)} TPP")
    short = d["finetunes"].get("ft_short", [])
    if short and d["frontier"]:
        kept = [f for f in short if f["end"][1] - f["start"][1] <= SHORT_ENGLISH_RISE]
        best = min(kept, key=lambda f: f["end"][0]) if kept else min(short, key=lambda f: f["end"][1] - f["start"][1])
        rise = best["end"][1] - best["start"][1]
        behind = best["end"][0] - d["frontier"][0][0]  # Spanish loss above the frontier's best Spanish
        what = ("reproduced" if rise <= SHORT_ENGLISH_RISE and behind <= SHORT_SPANISH_BEHIND else
                "partly: English kept, Spanish short of the frontier's" if rise <= SHORT_ENGLISH_RISE else
                "NOT reproduced")
        lines.append(f"verdict (20 TPP): {what} — with KL {best['coeff']:g} Spanish {best['start'][0]:.3f} → "
                     f"{best['end'][0]:.3f} ({behind:+.3f} from the frontier's best Spanish, expected ≤ "
                     f"+{SHORT_SPANISH_BEHIND}; paper +0.025) for {rise:+.3f} nats of English (expected ≤ "
                     f"+{SHORT_ENGLISH_RISE}; paper ≈ +0.06)")
    return lines


def capacity_frontier_report(exp: Experiment) -> str:
    d = capacity_frontier_data(exp)
    text = [f"capacity frontier ({exp.scale}) — {status_line(d['rows'])}",
            "pretraining mixtures (final losses; frontier = Pareto-optimal points):",
            table(["Spanish fraction", "tokens/param", "gain last 2×", "Spanish loss", "English loss", "on frontier"],
                  [[f"{m['fraction']:g}", m["tpp"], m["gain"], m["spanish"], m["english"],
                    "yes" if (m["spanish"], m["english"]) in d["frontier"] else ""] for m in d["mixtures"]])]
    for stage, fts in d["finetunes"].items():
        text += [f"{stage}: start Spanish {fmt(fts[0]['start'][0])}, English {fmt(fts[0]['start'][1])}",
                 table(["KL coeff", "Spanish end", "English end", "English − frontier (− = beyond it)"],
                       [[f["coeff"], f["end"][0], f["end"][1], f["gap"]] for f in fts])]
    if exp.paper:
        text.append("paper: overtrained (17K TPP) runs all end on the frontier (none crosses); the 20-TPP model "
                    "reaches near-frontier Spanish with ≈ +0.06 nats of English loss")
    text += _frontier_verdict(d)
    return "\n".join(text)


def capacity_frontier_plot(exp: Experiment, out: Path) -> None:
    """Figure 1's layout: the mixtures' endpoints, the frontier, the hatched region no model reached, and the
    finetuning trajectories (a marker at each end)."""
    plt = pyplot()
    d = capacity_frontier_data(exp)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    points = [(m["spanish"], m["english"]) for m in d["mixtures"] if m["spanish"] is not None]
    trajectories = [p for fts in d["finetunes"].values() for f in fts for p in f["trajectory"]]
    everything = points + trajectories
    if everything:
        s_lo, s_hi = min(p[0] for p in everything), max(p[0] for p in everything)
        e_lo, e_hi = min(p[1] for p in everything), max(p[1] for p in everything)
        pad_s, pad_e = 0.05 * (s_hi - s_lo or 1), 0.05 * (e_hi - e_lo or 1)
        ax.set_xlim(s_lo - pad_s, s_hi + pad_s)
        ax.set_ylim(e_lo - pad_e, e_hi + pad_e)
    if d["frontier"]:
        fs, fe = zip(*d["frontier"])
        xs = [ax.get_xlim()[0], *fs, ax.get_xlim()[1]]
        ys = [fe[0], *fe, fe[-1]]
        ax.fill_between(xs, [ax.get_ylim()[0]] * len(xs), ys, step=None, facecolor="none", hatch="///",
                        edgecolor="lightgrey", lw=0, label="inaccessible (beyond the frontier)")
        ax.plot(xs, ys, "k--", lw=1, label="frontier")
    if points:
        ax.scatter(*zip(*points), color="black", s=14, zorder=3, label="pretraining mixtures")
    for i, (stage, fts) in enumerate(d["finetunes"].items()):
        cmap = plt.get_cmap(["Blues", "Oranges", "Greens"][i % 3])
        for j, f in enumerate(fts):
            color = cmap(0.45 + 0.55 * j / max(1, len(fts) - 1))
            ax.plot(*zip(*f["trajectory"]), color=color, lw=1.2, label=f"{stage} KL {f['coeff']:g}")
            ax.plot(*f["end"], "o", color=color, ms=4, zorder=4)
        ax.plot(*fts[0]["start"], "*", color=cmap(0.9), ms=10, zorder=4)
    ax.set_xlabel("Spanish loss (new)")
    ax.set_ylabel("English loss (old)")
    ax.set_title(f"Capacity frontier ({exp.scale})")
    ax.legend(fontsize=6, loc="upper right")
    save_png(fig, out)


# ---------------------------------------------------------------------------- size x length grid (§5.6)
def size_length_grid_data(exp: Experiment) -> dict:
    """Per (width, tokens per parameter): the pretrained model's loss and saturation, and the forgetting of each
    finetuning variant at the Spanish target (None where it missed it)."""
    rows, trajs = results_of(exp)
    target = target_of(rows, "finetune")
    by_key = {f"{r['stage']}/{r['run']}": r for r in rows}
    cells: dict[tuple[int, float], dict] = {}
    for r in rows:
        t = trajs.get((r["stage"], r["run"]))
        if r["stage"] != "pretrain" or not t:
            continue
        key = (int(r["cfg.model.d_model"]), float(r["cfg.stop.tokens_per_param"]))
        cells[key] = {"loss": t[-1].get("valid_loss"), "gain": saturation(r, t)["gain"], "forgetting": {}}
    for r in rows:
        t = trajs.get((r["stage"], r["run"]))
        up = by_key.get(r.get("upstream") or "", {})
        if r["stage"] != "finetune" or not t or not up:
            continue
        key = (int(up["cfg.model.d_model"]), float(up["cfg.stop.tokens_per_param"]))
        point = finetune_point(r, t, target)
        if key in cells:
            cells[key]["forgetting"][r.get("grid.variant")] = point["forgetting"] if point["reached"] else None
    widths = sorted({w for w, _ in cells})
    lengths = sorted({n for _, n in cells})
    variants = sorted({v for c in cells.values() for v in c["forgetting"]}, key=lambda v: v != "none")
    return {"rows": rows, "cells": cells, "widths": widths, "lengths": lengths, "variants": variants,
            "target": target}


def size_length_grid_report(exp: Experiment) -> str:
    d = size_length_grid_data(exp)
    cells, widths, lengths = d["cells"], d["widths"], d["lengths"]
    text = [f"size × length ({exp.scale}): English forgetting at Spanish {fmt(d['target'])} (× = missed the target) — "
            f"{status_line(d['rows'])}",
            "pretraining loss (gain over the last doubling):",
            table(["d_model \\ TPP", *[f"{n:g}" for n in lengths]],
                  [[w, *[f"{fmt(cells[(w, n)]['loss'])} ({fmt(cells[(w, n)]['gain'])})" if (w, n) in cells else "—"
                         for n in lengths]] for w in widths])]
    for v in d["variants"]:
        text += [f"forgetting, {v}:", table(["d_model \\ TPP", *[f"{n:g}" for n in lengths]], [
            [w, *[_grid_cell(cells.get((w, n)), v) for n in lengths]] for w in widths])]
    paper = exp.paper.get("size_length_grid", {})
    if paper:
        text.append("paper: " + "; ".join(f"{k}: {v}" for k, v in paper.items()))
    text.append(_verdict_grid(d))
    return "\n".join(text)


def _grid_cell(cell: Optional[dict], variant: str) -> str:
    if cell is None or variant not in cell["forgetting"]:
        return "—"
    value = cell["forgetting"][variant]
    return "×" if value is None else fmt(value)


def _verdict_grid(d: dict) -> str:
    cells, widths, lengths = d["cells"], d["widths"], d["lengths"]
    plain = {k: c["forgetting"].get("none") for k, c in cells.items()}
    falls = [n for n in lengths if all(plain.get((w, n)) is not None for w in widths)
             and plain[(widths[0], n)] > plain[(widths[-1], n)]]
    complete = [n for n in lengths if all(plain.get((w, n)) is not None for w in widths)]
    kl = [c["forgetting"].get("kl") for c in cells.values() if c["forgetting"].get("kl") is not None]
    missed = sum(1 for c in cells.values() if "kl" in c["forgetting"] and c["forgetting"]["kl"] is None)
    return (f"verdict: without regularisation forgetting falls from width {widths[0] if widths else '—'} to "
            f"{widths[-1] if widths else '—'} at {len(falls)}/{len(complete)} lengths (paper: at every length); KL 10 "
            f"forgets {fmt(min(kl)) if kl else '—'} … {fmt(max(kl)) if kl else '—'} nats where it reached the target "
            f"(paper: 0.00–0.006 everywhere), and missed it in {missed}/{len(cells)} cells")


def size_length_grid_plot(exp: Experiment, out: Path) -> None:
    """One heat map per finetuning variant: forgetting over width × tokens per parameter (× = missed the target)."""
    plt = pyplot()
    d = size_length_grid_data(exp)
    cells, widths, lengths, variants = d["cells"], d["widths"], d["lengths"], d["variants"]
    fig, axes = plt.subplots(1, max(1, len(variants)), figsize=(5.2 * max(1, len(variants)), 4.2), squeeze=False)
    for ax, v in zip(axes[0], variants or ["none"]):  # one colour scale per panel: KL's is ~100x smaller
        grid = [[(cells.get((w, n)) or {}).get("forgetting", {}).get(v) for n in lengths] for w in widths]
        top = max([abs(x) for row in grid for x in row if x is not None] + [1e-3])
        values = [[math.nan if x is None else x for x in row] for row in grid]
        image = ax.imshow(values, origin="lower", cmap="viridis", vmin=0, vmax=top, aspect="auto")
        for i, row in enumerate(grid):
            for j, x in enumerate(row):
                ax.text(j, i, "×" if x is None else f"{x:.3f}", ha="center", va="center", fontsize=7,
                        color="red" if x is None else ("white" if x < top / 2 else "black"))
        ax.set_xticks(range(len(lengths)), [f"{n:g}" for n in lengths])
        ax.set_yticks(range(len(widths)), [str(w) for w in widths])
        ax.set_xlabel("pretraining tokens per parameter")
        ax.set_ylabel("d_model (width)")
        ax.set_title({"none": "no regularisation", "kl": "KL 10 (real replay)"}.get(v, v))
        fig.colorbar(image, ax=ax, label="English forgetting (nats)")
    fig.suptitle(f"Forgetting over model size × pretraining length ({exp.scale})")
    fig.tight_layout()
    save_png(fig, out)
