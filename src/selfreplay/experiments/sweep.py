"""Experiment sweeps: a YAML grid of pretraining and finetuning runs, run in parallel, collected into one table.

An experiment file (``experiments/<name>.yaml``)::

    name: method_comparison            # keys the report/plot functions in selfreplay.experiments.reports
    description: one line
    prepare:                           # optional: build the tokenizer and corpora when missing
      tokenizer: {out: work_data/tok4096.json, inputs: [...], vocab_size: 4096, max_lines: 60000, shuffle_seed: 0}
      corpora:
        en: {out: work_data/en, inputs: [...], domain_token: 0, shuffle_seed: 0, max_tokens: 9000000}
    common: {log.progress: false}      # TrainConfig overrides for every run
    stages:                            # in order; a mapping name -> stage
      pretrain:
        kind: pretrain
        base: {model.d_model: 64, ...} # overrides of this stage (nested dicts or dotted keys)
        grid: {optim.lr: [1e-3, 1e-2]} # product of value lists: one run per combination
      finetune:
        kind: finetune
        from: pretrain                 # one run per upstream run (x its own grid): the model it starts from
                                       # (or no 'from' and a base model.model_name_or_path: a run dir, a hub id)
        select: {optim.lr: 1e-2}       # optional: only upstream runs whose config has these values
        variants:                      # optional: named override sets (crossed with the grid)
          plain: {}
          kl_self: {replay.method: kl, replay.source: self}
        grid: {replay.coeff: [0.1, 1]}
    scales:                            # presets, deep-merged into the above (null deletes a key)
      cpu: {stages: {pretrain: {base: {stop.tokens: 1000000}}}}
      gpu: {...}
      paper: {...}
      smoke: {...}                     # the structure in seconds, on tiny data (the test suite runs it)
    launcher: {name: slurm, partition: gpu, gpus_per_run: 1}   # optional: see selfreplay.experiments.launchers

Runs live in ``<runs_dir>/<name>/<scale>/<stage>/<run name>``. A run name is derived from its values:
``<variant>,<key>=<value>,...`` (key = the last part of the dotted key unless that is ambiguous), a finetuning
run's prefixed by its upstream run's name and ``--``. Decisions:

* A run is *finished* when its directory holds the weights and summary.json; it is skipped (after checking that
  its saved config still matches, so an edited YAML cannot silently reuse stale results). A run with a
  ``checkpoints/`` is *interrupted* and resumed. Anything else starts afresh.
* Where jobs run is the launcher (:mod:`selfreplay.experiments.launchers`: ``local``, ``slurm``, ``ray``; the
  experiment file's ``launcher:`` block); the scheduling loop is :mod:`selfreplay.experiments.scheduler`, and
  ``--status`` reads each run's state from its directory (:mod:`selfreplay.experiments.status`). Locally,
  jobs run in ``spawn``-ed processes (:mod:`selfreplay.experiments.workers`: a fresh one per run, so no
  compiled graphs or thread settings carry over), ``workers`` at a time, each with ``threads`` torch/OMP threads
  (default 1: small models are fastest that way, one per core). A job starts when its upstream run has
  finished; a failed job (or one whose process died) is recorded, its dependents are skipped, the rest continue,
  and the sweep returns the failures. The trainer holds an exclusive lock on its run directory, so two sweeps of
  one experiment never train a run twice (the second records it as failed).
* ``--workers 1`` still uses one job process; ``in_process=True`` (tests) trains in the calling process.
* SIGINT (Ctrl-C) or SIGTERM: no new run starts, the running ones write a checkpoint and stop (SIGTERM is
  forwarded to them), the results tables are written, and the sweep raises :class:`~selfreplay.train.loop.
  Interrupted` ("run the same command again to continue"): exit 130 after SIGINT, 143 after SIGTERM (128 + the
  signal, as ``pretrain`` / ``finetune``). Running it again resumes the stopped runs bit for bit. A second Ctrl-C
  stops at once, without new checkpoints.
* ``results.csv``: one row per run (stage, run, status, variant and grid values, the upstream run's values as
  ``from.<key>``, the full flattened config as ``cfg.<key>``, the final summary metrics);
  ``results_trajectories.csv``: every metrics.jsonl record of every run. Both written atomically.
"""

from __future__ import annotations

import itertools
import math
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional


from selfreplay.errors import SelfReplayError

SCALES = ("cpu", "gpu", "paper", "smoke")
STAGE_KEYS = {"kind", "base", "grid", "from", "select", "variants"}
TOP_KEYS = {"name", "description", "prepare", "common", "stages", "scales", "paper", "report", "launcher"}
IGNORED_WHEN_COMPARING = ("log", "run_dir", "threads")  # threads: the machine's, recorded by the run
BUDGET_ONLY = ("target_kl_step", "target_kl_smoothing", "target_kl_gain", "coeff_min", "coeff_max")


# ---------------------------------------------------------------------------- the experiment file
@dataclass
class Stage:
    name: str
    kind: str
    base: dict[str, Any]
    grid: dict[str, list]
    variants: dict[str, dict[str, Any]]
    upstream: Optional[str] = None
    select: dict[str, Any] = field(default_factory=dict)


@dataclass
class Experiment:
    name: str
    description: str
    scale: str
    root: Path
    path: Path
    prepare: dict
    common: dict[str, Any]
    stages: list[Stage]
    paper: dict = field(default_factory=dict)  # the paper's numbers, for the report
    report: dict = field(default_factory=dict)  # settings of the report (e.g. the frontier's loss targets)
    launcher: dict = field(default_factory=dict)  # where runs go (see selfreplay.experiments.launchers)


@dataclass
class Job:
    """One training run of the sweep."""

    stage: str
    name: str
    kind: str
    run_dir: Path
    overrides: dict[str, Any]  # dotted TrainConfig keys (run_dir and model.model_name_or_path included)
    params: dict[str, Any]  # the values that define this run: variant and grid values
    upstream: Optional[str] = None  # key of the job it starts from
    upstream_params: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


def deep_merge(base: dict, over: dict) -> dict:
    """Recursive dict merge: dicts merge, other values replace, None deletes the key."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _normalise(tree: dict, where: str) -> dict:
    """Flatten the override dicts of an experiment tree (or preset) to dotted keys, so presets merge per key."""
    tree = dict(tree)
    if isinstance(tree.get("common"), dict):
        tree["common"] = flatten(tree["common"])
    stages = tree.get("stages")
    if stages is None:
        return tree
    if not isinstance(stages, dict):
        raise SelfReplayError(f"{where}: 'stages' must be a mapping of stage name -> stage")
    new = {}
    for name, st in stages.items():
        if st is None:
            new[name] = None
            continue
        if not isinstance(st, dict):
            raise SelfReplayError(f"{where}: stage {name!r} must be a mapping")
        st = dict(st)
        for k in ("base", "grid", "select"):
            if isinstance(st.get(k), dict):
                st[k] = flatten(st[k])
        if isinstance(st.get("variants"), dict):
            st["variants"] = {v: flatten(o) if isinstance(o, dict) else o for v, o in st["variants"].items()}
        new[name] = st
    tree["stages"] = new
    return tree


def resolve_experiment_path(name_or_path: str, experiments_dir: str | Path = "experiments") -> Path:
    """A YAML path as given, or ``<experiments_dir>/<name>.yaml``."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise SelfReplayError(f"experiment file {p}: not found")
        return p
    candidate = Path(experiments_dir) / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise SelfReplayError(f"experiment {name_or_path!r}: no file {candidate} (give a YAML path or a name)")
    return candidate


def load_experiment(name_or_path: str, scale: str = "cpu", runs_dir: str | Path = "runs",
                    experiments_dir: str | Path = "experiments") -> Experiment:
    """Read an experiment YAML and apply the ``scale`` preset."""
    from selfreplay.yamlfile import read_yaml

    path = resolve_experiment_path(name_or_path, experiments_dir)
    raw = read_yaml(path, "experiment file")
    if not isinstance(raw, dict):
        raise SelfReplayError(f"experiment file {path}: expected a mapping at the top level")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise SelfReplayError(f"experiment file {path}: unknown keys {sorted(unknown)} (expected {sorted(TOP_KEYS)})")
    if scale not in SCALES:
        raise SelfReplayError(f"--scale {scale}: expected one of {', '.join(SCALES)}")
    scales = raw.pop("scales", None) or {}
    if set(scales) - set(SCALES):
        raise SelfReplayError(f"experiment file {path}: unknown scales {sorted(set(scales) - set(SCALES))}")
    tree = _normalise(raw, str(path))
    preset = scales.get(scale)
    if preset:
        tree = deep_merge(tree, _normalise(preset, f"{path} scales.{scale}"))
    name = tree.get("name")
    if not name or not isinstance(name, str):
        raise SelfReplayError(f"experiment file {path}: 'name' is required")
    stages = []
    for sname, st in (tree.get("stages") or {}).items():
        if st is None:
            continue
        where = f"experiment file {path} (scale {scale}), stage {sname!r}"
        bad = set(st) - STAGE_KEYS
        if bad:
            raise SelfReplayError(f"{where}: unknown keys {sorted(bad)} (expected {sorted(STAGE_KEYS)})")
        kind = st.get("kind")
        if kind not in ("pretrain", "finetune"):
            raise SelfReplayError(f"{where}: kind must be pretrain or finetune, got {kind!r}")
        upstream = st.get("from")
        given_model = {**(tree.get("common") or {}), **(st.get("base") or {})}.get("model.model_name_or_path")
        if kind == "finetune" and not upstream and not given_model:
            raise SelfReplayError(f"{where}: a finetune stage needs 'from: <stage>' or a model.model_name_or_path")
        if upstream and upstream not in [s.name for s in stages]:
            raise SelfReplayError(f"{where}: 'from: {upstream}' names no earlier stage")
        grid = st.get("grid") or {}
        for k, values in grid.items():
            if not isinstance(values, list) or not values:
                raise SelfReplayError(f"{where}: grid.{k} must be a non-empty list of values")
        variants = {k: v or {} for k, v in (st.get("variants") or {}).items()} if isinstance(
            st.get("variants") or {}, dict) else st.get("variants")
        if not isinstance(variants, dict) or any(not isinstance(v, dict) for v in variants.values()):
            raise SelfReplayError(f"{where}: variants must map a name to a dict of overrides")
        stages.append(Stage(sname, kind, dict(st.get("base") or {}), dict(grid), variants, upstream,
                            dict(st.get("select") or {})))
    if not stages:
        raise SelfReplayError(f"experiment file {path}: no stages")
    return Experiment(name=name, description=tree.get("description", ""), scale=scale,
                      root=Path(runs_dir) / name / scale, path=path, prepare=tree.get("prepare") or {},
                      common=dict(tree.get("common") or {}), stages=stages, paper=tree.get("paper") or {},
                      report=tree.get("report") or {}, launcher=_launcher_block(tree.get("launcher"), path))


def _launcher_block(block: Any, path: Path) -> dict:
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise SelfReplayError(f"experiment file {path}: 'launcher' must be a mapping (name: local|slurm|ray, ...)")
    return dict(block)


# ---------------------------------------------------------------------------- the job graph
def format_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "+".join(format_value(x) for x in v)
    return str(v)


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._=+-," else "_" for c in s)


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The last dotted part of each key, or the whole key where the last parts clash."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _values_match(have: Any, want: Any) -> bool:
    if isinstance(want, list):
        return any(_values_match(have, w) for w in want)
    if isinstance(have, (int, float)) and isinstance(want, (int, float)) and not isinstance(have, bool):
        return math.isclose(float(have), float(want), rel_tol=1e-9, abs_tol=1e-12)
    return have == want


def expand_jobs(exp: Experiment) -> list[Job]:
    """Every run of the experiment, upstream runs before the runs that start from them."""
    jobs: list[Job] = []
    by_stage: dict[str, list[Job]] = {}
    for stage in exp.stages:
        keys = list(stage.grid)
        short = _short_keys(keys)
        combos = [dict(zip(keys, values)) for values in itertools.product(*(stage.grid[k] for k in keys))]
        variants = stage.variants or {"": {}}
        own: list[tuple[str, dict, dict]] = []  # (name, params, overrides)
        for vname, vover in variants.items():
            for combo in combos:
                parts = ([vname] if vname else []) + [f"{short[k]}={format_value(v)}" for k, v in combo.items()]
                params = ({"variant": vname} if vname else {}) | combo
                own.append((_safe(",".join(parts)), params, {**stage.base, **vover, **combo}))
        if stage.upstream is None:
            parents: list[Optional[Job]] = [None]
        else:
            parents = [j for j in by_stage[stage.upstream]
                       if all(_values_match(j.overrides.get(k, j.params.get(k)), v) for k, v in stage.select.items())]
            if not parents:
                raise SelfReplayError(f"stage {stage.name!r}: select {stage.select} matches no run of stage "
                                      f"{stage.upstream!r}")
        stage_jobs = []
        for parent in parents:
            for name, params, overrides in own:
                if parent is not None and parent.name != "run":  # "run": a stage of one run adds nothing
                    name = f"{parent.name}--{name}" if name else parent.name
                name = name or "run"
                run_dir = exp.root / stage.name / name
                full = {**exp.common, **overrides, "run_dir": str(run_dir)}
                if parent is not None:
                    full["model.model_name_or_path"] = str(parent.run_dir)
                stage_jobs.append(Job(stage.name, name, stage.kind, run_dir, full, params,
                                      parent.key if parent else None,
                                      dict(parent.params) if parent else {}))
        names = [j.name for j in stage_jobs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SelfReplayError(f"stage {stage.name!r}: several runs would be named {dupes[0]!r}; "
                                  f"give the variants or grid distinct values")
        by_stage[stage.name] = stage_jobs
        jobs.extend(stage_jobs)
    return jobs


def job_config(job: Job):
    """The TrainConfig of a job (validated by load_config's type checks)."""
    from selfreplay.config import TrainConfig, load_config

    try:
        return load_config(TrainConfig, base=unflatten(job.overrides))
    except SelfReplayError as e:
        raise SelfReplayError(f"run {job.key}: {e}") from None


def job_status(job: Job) -> str:
    """``finished`` (weights + summary), ``interrupted`` (a resumable checkpoint) or ``new``."""
    from selfreplay.train.checkpoint import has_checkpoint

    d = job.run_dir
    if (d / "summary.json").is_file() and ((d / "model.safetensors").is_file() or (d / "model").is_dir()):
        return "finished"
    if has_checkpoint(d):
        return "interrupted"
    return "new"


SWEEP_MARKER = ".selfreplay-sweep"


def claim_sweep_root(exp: Experiment) -> Path:
    """Create and mark the sweep's directory (RUNS_DIR/<name>/<scale>); one that is not ours is refused (an earlier
    version's is recognised by its results.csv or a stage's folder)."""
    from selfreplay.train.ownership import claim_dir

    def earlier(d: Path) -> bool:
        return (d / "results.csv").is_file() or any((d / stage.name).is_dir() for stage in exp.stages)

    return claim_dir(exp.root, SWEEP_MARKER, "sweep directory", earlier)


def check_finished_config(job: Job) -> None:
    """A finished run must have been trained with the job's current config (else its results are stale)."""
    from selfreplay.config import TrainConfig, config_to_dict, load_config
    from selfreplay.train.loop import _first_difference

    from selfreplay.train import model_kind_of
    from selfreplay.train.checks import resolve_defaults

    saved = config_to_dict(load_config(TrainConfig, [str(job.run_dir / "config.yaml")]))
    cfg = job_config(job)  # as the run saved it: with the per-kind defaults filled in
    current = config_to_dict(resolve_defaults(cfg, model_kind_of(cfg, job.kind), job.kind))
    ignore = IGNORED_WHEN_COMPARING + (("model",) if job.kind == "finetune" else ())
    for config in (saved, current):  # a run without a budget is not stale because a budget setting changed
        replay = config.get("replay") or {}
        if replay.get("target_kl") is None:
            for key in BUDGET_ONLY:
                replay.pop(key, None)
    diff = _first_difference(saved, current, ignore=ignore)
    if diff:
        raise SelfReplayError(f"run {job.key} finished with a different {diff} than the experiment file now asks "
                              f"for; delete {job.run_dir} to rerun it")


# ---------------------------------------------------------------------------- running
def _run_job(key: str, kind: str, overrides: dict, resume: bool, launcher: str = "local") -> dict:
    """What every launcher runs: train one run (the trainer locks its directory), output appended to
    <run_dir>/train.log, the job's state in <run_dir>/job.json. Several ranks (a SLURM job of N tasks): rank 0
    alone claims the directory, writes the record and the log; the others print where their job's output goes."""
    from selfreplay.config import TrainConfig, load_config
    from selfreplay.experiments.status import scheduler_job_id, write_job_record
    from selfreplay.train import train
    from selfreplay.train.distributed import env_world
    from selfreplay.train.signals import Interrupted
    from selfreplay.train.ownership import claim_run_dir

    if env_world()[0] != 0:
        return train(load_config(TrainConfig, base=unflatten(overrides)), kind, resume=resume)
    run_dir = claim_run_dir(overrides["run_dir"], resume)  # refused unless new, empty or ours; before train.log
    write_job_record(run_dir, "running", launcher)
    with open(run_dir / "train.log", "a") as logf:
        print(f"--- {'resuming' if resume else 'starting'} {key} ({launcher} job {scheduler_job_id() or '-'})",
              file=logf, flush=True)
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = logf
        try:
            cfg = load_config(TrainConfig, base=unflatten(overrides))
            summary = train(cfg, kind, resume=resume)
            write_job_record(run_dir, "done", launcher)
            return summary
        except Interrupted as e:
            print(e, file=logf)
            write_job_record(run_dir, "stopped", launcher, error=str(e).split(";")[0])
            raise
        except SelfReplayError as e:
            write_job_record(run_dir, "failed", launcher, error=str(e))
            raise
        except Exception as e:  # keep the traceback in the run's log, one line for the sweep
            traceback.print_exc(file=logf)
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            write_job_record(run_dir, "failed", launcher, error=error)
            raise SelfReplayError(error) from None
        except BaseException as e:  # KeyboardInterrupt before the trainer takes the signals, SystemExit
            write_job_record(run_dir, "stopped", launcher, error=type(e).__name__)
            raise
        finally:
            sys.stdout, sys.stderr = old_out, old_err


@dataclass
class SweepResult:
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already finished before this sweep
    failed: dict[str, str] = field(default_factory=dict)


def run_sweep(exp: Experiment, workers: Optional[int] = None, threads: int = 1, only: Optional[list[str]] = None,
              log: Callable[[str], None] = print, in_process: bool = False, launcher=None) -> SweepResult:
    """Run every unfinished job of ``exp`` (``only``: these stages) with ``launcher`` (a
    :class:`~selfreplay.experiments.launchers.LauncherSettings`; default: the experiment file's, else local
    processes), then write the results table (see :mod:`selfreplay.experiments.scheduler`)."""
    from selfreplay.experiments.scheduler import run_grid

    return run_grid(exp, workers=workers, threads=threads, only=only, log=log, in_process=in_process,
                    launcher=launcher)
