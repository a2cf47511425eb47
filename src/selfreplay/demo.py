"""``selfreplay demo``: the paper's toy continual-learning experiment (§5.2), end to end.

A small transformer learns add -> reversal -> sort -> modadd one task after another. Without replay it forgets
the earlier tasks; with replay of its own samples (prompted only by the old tasks' BOS tokens, drawn from a
snapshot taken at the start of each task) it keeps them. The demo trains both runs from the same initialisation
and data order, prints a table of final accuracies and a one-line verdict, and writes into the output directory:

    metrics.jsonl   one record per evaluation: method, task being trained, step, accuracy and val loss per task
    results.json    final accuracies, timings and the configuration of both runs
    results.md      the printed table and verdict
    demo.png        accuracy per task vs step, "Without replay" | "With self-generated replay"

Per task: a fresh AdamW (its state and the warmup reset at the boundary, as in the paper), teacher = a frozen copy
of the model at the start of the task. Loss = NTP(task batch) + coeff * replay loss, where the replay loss is NTP
(the paper's toy choice) or KL(teacher || student) on the replay rows. On CUDA: bf16 autocast, a compiled loss
step, fused AdamW, all data on the GPU and no loss read-back between evaluations; the CPU path runs eager fp32.
Both runs share the first task (identical until then), and on a multi-core CPU they then run side by side.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from selfreplay.checkpoint import atomic_write
from selfreplay.config import ModelConfig
from selfreplay.errors import SelfReplayError
from selfreplay.losses import divergence_loss, next_token_loss
from selfreplay.model import GPT
from selfreplay.sampling import sample
from selfreplay.toy import SEQ_LEN, TASK_TOKEN, TASKS, VOCAB_SIZE, TaskData, evaluate_tasks, make_tasks
from selfreplay.trainer import resolve_device

METHODS = ("none", "ntp", "kl")
SOURCES = ("self", "real")


@dataclass
class DemoConfig:
    """One sequential run over the toy tasks. The defaults are the paper's configuration (``--full``)."""

    d_model: int = 256
    n_layers: int = 2
    head_dim: int = 16  # 16 heads at d_model 256
    batch_size: int = 2048
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.02
    warmup_steps: int = 200  # restarted at every task, with the optimizer state
    steps_per_task: int = 2000
    first_task_steps: Optional[int] = None  # steps on the first task (None: steps_per_task)
    first_task_lr: Optional[float] = None  # learning rate on the first task (None: lr)
    lr_schedule: str = "constant"  # constant (the paper) | cosine (to 0 at each task's end)
    eval_every: int = 20
    n_train: int = 65_536  # problems generated per task
    n_valid: int = 4_096
    eval_problems: Optional[int] = None  # validation problems evaluated per task (None: all n_valid)
    eval_batch: int = 16_384  # rows per greedy-decoding call
    replay_method: str = "ntp"  # what `selfreplay demo` compares with no replay: ntp (the paper's toy) | kl
    replay_coeff: float = 10.0
    replay_batch: Optional[int] = None  # replay rows per step, split equally among previous tasks (None: batch_size)
    replay_buffer: int = 16  # steps of replay sampled in one batched call
    replay_temperature: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = True  # torch.compile the loss step (CUDA only)
    threads: Optional[int] = None  # CPU intra-op threads, set with torch.set_num_threads (None: torch's default)


FULL = DemoConfig()

# Sized for a 2-core CPU: both runs in about 3 minutes, same phenomenon as the paper. Learning `add` from scratch
# is the slow part, so the first task gets more steps and a higher LR; the later tasks use a lower LR (less shock
# at each boundary) with a cosine decay per task. At this budget KL replay (coefficient 3) keeps every task >= 95%
# while still letting the new task be learned; NTP replay is close but less reliable (use method="ntp" to compare).
# One thread: at this size a second one helps ~1.2x on an idle machine and slows things ~3x on a busy one.
CPU = replace(FULL, d_model=64, head_dim=8, batch_size=128, first_task_steps=800, first_task_lr=1e-2,
              steps_per_task=300, lr=5e-3, lr_schedule="cosine", warmup_steps=50, eval_every=50, eval_problems=256,
              eval_batch=1024, replay_method="kl", replay_coeff=3.0, replay_batch=64, replay_buffer=32, threads=1)


@dataclass
class RunResult:
    """What one sequential run produced."""

    method: str
    source: str
    records: list[dict] = field(default_factory=list)  # one per evaluation
    final_accuracy: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def check_demo_config(cfg: DemoConfig) -> None:
    for name in ("d_model", "n_layers", "head_dim", "batch_size", "steps_per_task", "eval_every", "n_train",
                 "n_valid", "eval_batch", "replay_buffer"):
        if getattr(cfg, name) <= 0:
            raise SelfReplayError(f"demo {name}={getattr(cfg, name)}: must be positive")
    for name in ("eval_problems", "replay_batch", "threads"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise SelfReplayError(f"demo {name}={getattr(cfg, name)}: must be positive")
    if cfg.first_task_steps is not None and cfg.first_task_steps <= 0:
        raise SelfReplayError(f"demo first_task_steps={cfg.first_task_steps}: must be positive")
    if cfg.replay_method not in ("ntp", "kl"):
        raise SelfReplayError(f"demo replay_method={cfg.replay_method!r}: expected ntp or kl")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise SelfReplayError(f"demo lr_schedule={cfg.lr_schedule!r}: expected constant or cosine")
    if cfg.lr <= 0 or (cfg.first_task_lr is not None and cfg.first_task_lr <= 0) or cfg.replay_temperature <= 0:
        raise SelfReplayError("demo lr, first_task_lr and replay_temperature must be positive")


def _split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


class ToyReplay:
    """Replay rows for the current task: previous tasks in equal shares, fresh every step.

    ``self``: sampled at temperature 1 from the teacher, prompted only by each old task's BOS token (EOS ignored,
    full 14-token rows); ``real``: rows of the old tasks' training sets. ``buffer`` steps are produced in one call
    (one batched sampling run, or one teacher pass for KL targets on real rows) and handed out step by step.
    """

    def __init__(self, teacher: GPT, previous: list[TaskData], rows: int, buffer: int, source: str,
                 with_logprobs: bool, temperature: float, generator: torch.Generator, autocast: Callable):
        self.teacher, self.previous, self.buffer = teacher, previous, buffer
        self.source, self.with_logprobs, self.temperature = source, with_logprobs, temperature
        self.generator, self.autocast = generator, autocast
        self.shares = _split_evenly(rows, len(previous))
        self.rows = rows
        self.tokens: Optional[torch.Tensor] = None
        self.logprobs: Optional[torch.Tensor] = None
        self.next = 0
        self.seconds = 0.0

    @torch.no_grad()
    def _refill(self) -> None:
        start = time.perf_counter()
        device = self.previous[0].train.device
        if self.source == "self":
            # the same per-step pattern of task tokens, repeated: every step's slice gets equal shares
            step_prompts = torch.cat([torch.full((n,), TASK_TOKEN[t.name], dtype=torch.long, device=device)
                                      for t, n in zip(self.previous, self.shares)])
            prompts = step_prompts.repeat(self.buffer)[:, None]
            with self.autocast():
                out = sample(self.teacher, prompts, SEQ_LEN, temperature=self.temperature, generator=self.generator,
                             return_logprobs=self.with_logprobs)
            self.tokens, self.logprobs = out.tokens, out.teacher_logprobs
        else:
            picks = []
            for _ in range(self.buffer):
                for t, n in zip(self.previous, self.shares):
                    idx = torch.randint(0, t.train.shape[0], (n,), device=device, generator=self.generator)
                    picks.append(t.train[idx])
            self.tokens = torch.cat(picks)
            self.logprobs = None
            if self.with_logprobs:
                with self.autocast():
                    self.logprobs = torch.log_softmax(self.teacher(self.tokens).float(), dim=-1)
        self.next = 0
        self.seconds += time.perf_counter() - start

    def next_batch(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.tokens is None or self.next >= self.buffer:
            self._refill()
        i, n = self.next * self.rows, self.rows
        self.next += 1
        logprobs = self.logprobs[i:i + n] if self.logprobs is not None else None
        return self.tokens[i:i + n], logprobs


def _make_loss_fn(model: GPT, method: str, coeff: float) -> Callable:
    """Loss of one step: NTP on the task batch + coeff * (NTP | KL) on the replay rows, in one forward pass."""

    def loss_fn(batch: torch.Tensor, replay: Optional[torch.Tensor], teacher_logprobs: Optional[torch.Tensor]):
        tokens = batch if replay is None else torch.cat((batch, replay))
        logits = model(tokens)
        loss = next_token_loss(logits[:batch.shape[0]], batch)
        if replay is None:
            return loss
        replay_logits = logits[batch.shape[0]:]
        if method == "ntp":
            return loss + coeff * next_token_loss(replay_logits, replay)
        return loss + coeff * divergence_loss(replay_logits, teacher_logprobs, replay.shape)

    return loss_fn


def _maybe_compile(fn: Callable, device: torch.device, enabled: bool) -> Callable:
    """torch.compile on CUDA only (the CPU path stays eager); falls back to eager if compilation fails."""
    if device.type != "cuda" or not enabled:
        return fn
    compiled = torch.compile(fn, dynamic=False)
    active = [compiled]

    def call(*args):
        try:
            return active[0](*args)
        except torch._dynamo.exc.TorchDynamoException as e:  # e.g. no working Triton: keep going, eagerly
            warnings.warn(f"torch.compile failed, running eager: {str(e).splitlines()[0]}")
            active[0] = fn
            return fn(*args)

    return call


@dataclass
class FirstTask:
    """The state after the first task. Every method trains it identically (same initialisation and data order,
    nothing to replay yet), so the demo trains it once and starts the replay run from here."""

    model_state: dict[str, torch.Tensor]
    data_generator_state: torch.Tensor
    records: list[dict]
    train_seconds: float
    eval_seconds: float


def task_steps(cfg: DemoConfig, n_tasks: int) -> list[int]:
    """Optimizer steps of each task (the first may differ: learning `add` from scratch is the slow part)."""
    return [cfg.first_task_steps or cfg.steps_per_task] + [cfg.steps_per_task] * (n_tasks - 1)


def learning_rate(cfg: DemoConfig, task: int, i: int, steps: int) -> float:
    """Step i of a task: linear warmup, then constant (the paper) or cosine decay to 0 at the task's end."""
    peak = cfg.first_task_lr if task == 0 and cfg.first_task_lr else cfg.lr
    lr = peak * min(1.0, (i + 1) / cfg.warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * i / steps)) if cfg.lr_schedule == "cosine" else lr


def train_sequential(cfg: DemoConfig, method: str = "none", source: str = "self",
                     tasks: Optional[list[TaskData]] = None, progress: bool = True, label: Optional[str] = None,
                     start: Optional[FirstTask] = None, on_first_task: Optional[Callable[[FirstTask], None]] = None,
                     on_task_end: Optional[Callable[[RunResult], None]] = None, bar_position: int = 0) -> RunResult:
    """Train on the tasks one after another with the given replay method; evaluate every ``eval_every`` steps.

    ``start`` resumes after the first task (see :class:`FirstTask`); ``on_first_task`` receives that state.
    """
    check_demo_config(cfg)
    if method not in METHODS:
        raise SelfReplayError(f"replay method {method!r}: expected one of {', '.join(METHODS)}")
    if source not in SOURCES:
        raise SelfReplayError(f"replay source {source!r}: expected one of {', '.join(SOURCES)}")
    device = resolve_device(cfg.device)
    if device.type == "cpu" and cfg.threads:
        torch.set_num_threads(cfg.threads)
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    tasks = tasks if tasks is not None else make_tasks(cfg.n_train, cfg.n_valid, cfg.seed)
    tasks = [TaskData(t.name, t.train.to(device), t.valid.to(device)) for t in tasks]
    n_eval = min(cfg.eval_problems or cfg.n_valid, cfg.n_valid)
    valid = {t.name: t.valid[:n_eval] for t in tasks}
    steps = task_steps(cfg, len(tasks))
    offsets = [sum(steps[:k]) for k in range(len(tasks))]

    with torch.random.fork_rng(devices=[]):  # same initialisation for every method, global RNG left alone
        torch.manual_seed(cfg.seed)
        model = GPT(ModelConfig(d_model=cfg.d_model, n_layers=cfg.n_layers, head_dim=cfg.head_dim,
                                context=SEQ_LEN, vocab_size=VOCAB_SIZE)).to(device)
    data_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)  # same data order for every method
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed + 2)
    loss_fn = _maybe_compile(_make_loss_fn(model, method, cfg.replay_coeff), device, cfg.compile)
    replay_rows = cfg.replay_batch or cfg.batch_size

    result = RunResult(method, source)
    bar = _progress(sum(steps), label or method, progress, bar_position)
    train_seconds = eval_seconds = sample_seconds = 0.0
    task_seconds: dict[str, float] = {}
    first = 0
    if start is not None:
        model.load_state_dict(start.model_state)
        data_gen.set_state(start.data_generator_state)
        result.records = [{**r, "method": method, "source": source} for r in start.records]
        train_seconds, eval_seconds, first = start.train_seconds, start.eval_seconds, 1
        bar.update(steps[0])

    def evaluate(step: int, task: str) -> None:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        model.eval()
        metrics = evaluate_tasks(model, valid, cfg.eval_batch, autocast)
        model.train()
        eval_seconds += time.perf_counter() - t0
        result.records.append({"method": method, "source": source, "task": task, "step": step,
                               "accuracy": metrics["accuracy"], "val_loss": metrics["loss"]})
        bar.set_postfix_str(" ".join(f"{k} {v:.0%}" for k, v in metrics["accuracy"].items()))

    if start is None:
        evaluate(0, tasks[0].name)
    for k in range(first, len(tasks)):
        task, task_train_start = tasks[k], train_seconds
        bar.set_description(f"{label or method}: {task.name}")
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                      weight_decay=cfg.weight_decay, **({"fused": True} if cuda else {}))
        replay = None
        if method != "none" and k > 0:
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
            replay = ToyReplay(teacher, tasks[:k], replay_rows, cfg.replay_buffer, source, method == "kl",
                               cfg.replay_temperature, sample_gen, autocast)
        for i in range(steps[k]):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, k, i, steps[k])
            rows = torch.randint(0, task.train.shape[0], (cfg.batch_size,), device=device, generator=data_gen)
            replay_tokens, teacher_logprobs = replay.next_batch() if replay is not None else (None, None)
            with autocast():
                loss = loss_fn(task.train[rows], replay_tokens, teacher_logprobs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            done = (i + 1) % cfg.eval_every == 0 or i + 1 == steps[k]
            if done and cuda:
                torch.cuda.synchronize()  # charge queued training work to training time
            train_seconds += time.perf_counter() - t0
            if done:
                evaluate(offsets[k] + i + 1, task.name)
        task_seconds[task.name] = train_seconds - task_train_start
        if replay is not None:
            sample_seconds += replay.seconds
        if k == 0 and on_first_task is not None:
            state = {n: t.detach().clone() for n, t in model.state_dict().items()}
            on_first_task(FirstTask(state, data_gen.get_state(), [dict(r) for r in result.records],
                                    train_seconds, eval_seconds))
        if on_task_end is not None:
            on_task_end(result)
    bar.close()
    result.final_accuracy = dict(result.records[-1]["accuracy"])
    last = tasks[-1].name  # steady state: compilation and warm-up are long past
    result.timings = {"train_seconds": train_seconds, "eval_seconds": eval_seconds,
                      "replay_sample_seconds": sample_seconds, "steps": sum(steps),
                      "steps_per_second": sum(steps) / train_seconds if train_seconds else float("nan"),
                      "last_task_steps_per_second": steps[-1] / task_seconds[last] if task_seconds[last] else
                      float("nan"), "task_train_seconds": task_seconds}
    return result


def _progress(total: int, label: str, enabled: bool, position: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="step", disable=not enabled, dynamic_ncols=True, leave=True,
                position=position)


# ---------------------------------------------------------------------------------------------------------------
# The demo: two runs, a table, a verdict, a figure.

@dataclass
class DemoResult:
    """Both runs of the demo and where their outputs went."""

    runs: list[RunResult]
    table: str
    verdict: str
    out_dir: Path
    seconds: float


def replay_label(method: str, source: str) -> str:
    if method == "none":
        return "Without replay"
    what = "self-generated" if source == "self" else "real-data"
    return f"With {what} replay" + ("" if method == "ntp" else f" ({method.upper()})")


def format_table(runs: list[RunResult], task_names: list[str]) -> str:
    """Task x method table of final accuracies."""
    headers = ["task"] + [replay_label(r.method, r.source).lower() for r in runs]
    rows = [[t] + [f"{r.final_accuracy[t]:.1%}" for r in runs] for t in task_names]
    widths = [max(len(h), *(len(row[c]) for row in rows)) for c, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if j == 0 else c.rjust(w)  # noqa: E731
                                   for j, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def make_verdict(baseline: RunResult, replayed: RunResult, task_names: list[str]) -> str:
    """One line: did the baseline forget the first task, and did replay keep every task?"""
    first = task_names[0]
    forgot = baseline.final_accuracy[first]
    kept = min(replayed.final_accuracy[t] for t in task_names)
    how = replay_label(replayed.method, replayed.source).lower()
    if forgot <= 0.5 and kept >= 0.95:
        return (f"Verdict: without replay the model forgot '{first}' ({forgot:.1%} at the end); {how} kept every "
                f"task at >= {kept:.1%}.")
    return (f"Verdict: inconclusive at this size: without replay '{first}' ends at {forgot:.1%}; {how} keeps every "
            f"task at >= {kept:.1%} (expected <= 50% and >= 95%).")


def plot_runs(runs: list[RunResult], steps: list[int], task_names: list[str], path: Path) -> None:
    """Two panels like the paper's figure: accuracy per task vs step, dashed lines at task boundaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.4), sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    edges = [sum(steps[:k]) for k in range(len(steps) + 1)]
    for ax, run in zip(axes[0], runs):
        xs = [r["step"] for r in run.records]
        for j, t in enumerate(task_names):
            ax.plot(xs, [100 * r["accuracy"][t] for r in run.records], label=t, color=colors[j % len(colors)],
                    lw=1.6)
        for edge in edges[1:-1]:
            ax.axvline(edge, color="0.4", ls="--", lw=1)
        for j, t in enumerate(task_names):
            ax.text((edges[j] + edges[j + 1]) / 2, 103, t, ha="center", va="bottom", fontsize=8, color="0.3")
        ax.set_title(replay_label(run.method, run.source), pad=16)
        ax.set_xlim(0, edges[-1])
        ax.set_ylim(-2, 102)
        ax.set_xlabel("step")
        ax.grid(alpha=0.25)
    axes[0][0].set_ylabel("eval accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(task_names), frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class _Job:
    """A function run in a daemon thread (``background``) or, lazily, when its result is asked for."""

    def __init__(self, fn: Callable[[], RunResult], background: bool):
        self.fn, self.value, self.error = fn, None, None
        self.thread = threading.Thread(target=self._run, daemon=True) if background else None
        if self.thread is not None:
            self.thread.start()

    def _run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as e:  # handed to the caller by result()
            self.error = e

    def result(self) -> RunResult:
        if self.thread is None:
            return self.fn()
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


def _write_metrics(out_dir: Path, runs: list[RunResult]) -> None:
    lines = [json.dumps(rec) for run in runs for rec in run.records]
    atomic_write(out_dir / "metrics.jsonl", "\n".join(lines) + ("\n" if lines else ""))


def run_demo(out_dir: str | Path = "selfreplay-demo", full: bool = False, method: Optional[str] = None,
             source: str = "self", seed: int = 0, device: str = "auto", steps_per_task: Optional[int] = None,
             eval_every: Optional[int] = None, progress: bool = True, echo: Callable[[str], None] = print,
             config: Optional[DemoConfig] = None) -> DemoResult:
    """Train "without replay" and "with replay" (``method`` ntp | kl, ``source`` self | real) and report.

    ``full`` selects the paper's configuration (meant for a GPU), otherwise the CPU preset; ``config`` replaces
    both. ``method`` defaults to the configuration's ``replay_method``; ``steps_per_task`` / ``eval_every``
    override the chosen configuration.
    """
    cfg = config or (FULL if full else CPU)
    method = method or cfg.replay_method
    if method not in ("ntp", "kl"):
        raise SelfReplayError(f"demo replay method {method!r}: expected ntp or kl")
    if source not in SOURCES:
        raise SelfReplayError(f"demo replay source {source!r}: expected self or real")
    cfg = replace(cfg, seed=seed, device=device, replay_method=method)
    if steps_per_task is not None:
        cfg = replace(cfg, steps_per_task=steps_per_task)
    if eval_every is not None:
        cfg = replace(cfg, eval_every=eval_every)
    check_demo_config(cfg)
    dev = resolve_device(cfg.device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    echo(f"selfreplay demo: {' -> '.join(TASKS)} ({'/'.join(map(str, task_steps(cfg, len(TASKS))))} steps), "
         f"d_model {cfg.d_model}, {cfg.n_layers} layers, batch {cfg.batch_size}; no replay vs {method.upper()} "
         f"replay ({'self-generated' if source == 'self' else 'real'}, coeff {cfg.replay_coeff:g}) on {dev} -> {out}")
    tasks = make_tasks(cfg.n_train, cfg.n_valid, cfg.seed)
    names = [t.name for t in tasks]
    # The first task is the same for both runs (no replay yet): it is trained once, inside the baseline run, and
    # the replay run starts from there. On a multi-core CPU the two runs then go on side by side, one core each.
    parallel = dev.type == "cpu" and _cpu_count() >= 2
    lock, live = threading.Lock(), {}

    def save(run: RunResult) -> None:
        with lock:
            live[run.method] = run
            _write_metrics(out, [live[m] for m in ("none", method) if m in live])

    jobs: list[_Job] = []
    replay_run = lambda first: train_sequential(  # noqa: E731
        cfg, method, source, tasks, progress, replay_label(method, source), start=first, on_task_end=save,
        bar_position=1 if parallel else 0)
    baseline = train_sequential(cfg, "none", source, tasks, progress, replay_label("none", source),
                                on_first_task=lambda first: jobs.append(_Job(lambda: replay_run(first), parallel)),
                                on_task_end=save)
    runs = [baseline, jobs[0].result()]

    table = format_table(runs, names)
    verdict = make_verdict(runs[0], runs[1], names)
    seconds = time.perf_counter() - start
    plot_runs(runs, task_steps(cfg, len(names)), names, out / "demo.png")
    atomic_write(out / "results.md", f"```\n{table}\n```\n\n{verdict}\n")
    atomic_write(out / "results.json", json.dumps({
        "config": asdict(cfg), "seconds": seconds, "verdict": verdict,
        "runs": [{"method": r.method, "source": r.source, "label": replay_label(r.method, r.source),
                  "final_accuracy": r.final_accuracy, "timings": r.timings} for r in runs]}, indent=2) + "\n")
    echo("")
    echo(table)
    echo(verdict)
    for r in runs:
        t = r.timings
        echo(f"{replay_label(r.method, r.source)}: {t['steps_per_second']:.1f} steps/s, "
             f"{t['last_task_steps_per_second']:.1f} on the last task "
             f"(train {t['train_seconds']:.0f}s incl. replay sampling {t['replay_sample_seconds']:.0f}s, "
             f"eval {t['eval_seconds']:.0f}s)")
    echo(f"total {seconds:.0f}s; wrote {out / 'demo.png'}, metrics.jsonl, results.json")
    return DemoResult(runs, table, verdict, out, seconds)
