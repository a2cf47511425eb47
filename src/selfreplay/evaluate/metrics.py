"""Forgetting metrics, and metrics.jsonl.

:func:`score` measures a model on held-out rows of either kind of data: the mean next-token loss over target
tokens, the loss over the second half of positions (less dominated by the short-context start), the next-token
accuracy, and with a teacher its own loss on the same tokens and KL(teacher || model). Forgetting is the increase
of the old-distribution loss over the teacher's (the model before finetuning) on the same rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Optional

import torch
import torch.nn.functional as F

from selfreplay.data.batch import Batch
from selfreplay.errors import SelfReplayError
from selfreplay.replay.losses import position_sum
from selfreplay.train.files import dumps

log = logging.getLogger(__name__)
METRICS = "metrics.jsonl"
_SUMS = ("nll", "nll_half", "correct", "kl", "teacher_nll", "count", "count_half")
CPU_CHUNK_BYTES = 2 << 20  # one [positions, V] float32 tensor of a chunk: fits a core's L2 cache


class EvaluationAbandoned(Exception):
    """:func:`score` was told to stop between batches (a signal: the trainer checkpoints and redoes it later)."""


def eval_chunk_size(vocab_size: int, device, chunk_size: Optional[int] = None) -> Optional[int]:
    """Positions per chunk of :func:`score`: ``chunk_size`` when given; on a CPU so many that a chunk's [n, V]
    float32 tensors stay in the L2 cache (the log-softmaxes, the KL and the argmax of a whole batch at once stream
    each tensor through memory: 2.4x slower at a 4k vocabulary); else None (all positions at once)."""
    if chunk_size is not None or torch.device(device).type != "cpu":
        return chunk_size
    return max(16, CPU_CHUNK_BYTES // (4 * vocab_size))


def _batch_sums(hidden, head, tokens, mask, teacher: Optional[torch.Tensor], teacher_head, chunk_size,
                stored: Optional["_TeacherSide"] = None, as_teacher: bool = False) -> torch.Tensor:
    """[nll, nll over the second half, correct, kl, teacher nll, count, count of the second half] of one batch.

    ``teacher`` is the teacher's logits, or with ``teacher_head`` its hidden states (logits made chunk by chunk).
    ``stored``: the teacher's side kept from an earlier evaluation (``teacher`` is then None), or a store to fill.
    ``as_teacher``: ``hidden`` and ``head`` are the teacher's and the model computes what it computes (a
    finetune's step 0): the model's sums are the teacher's, with KL 0.
    One pass: each position's logits are made once and give every quantity.
    """
    B, T = tokens.shape
    second_half = torch.zeros_like(mask)  # at predicting position t: is the target t+1 in the second half?
    second_half[:, T // 2 - 1:] = 1.0
    logits_of = (lambda t: teacher_head(t).to(hidden.device)) if teacher_head is not None else (lambda t: t)
    with_teacher = teacher is not None or stored is not None or as_teacher

    def teacher_side(y, rest, t_logp=None) -> tuple:
        """The teacher's probabilities p, Σ p log p and NLL at these positions: kept, or made (and kept) from its
        log-probabilities ``t_logp`` (None: from its logits in ``rest``)."""
        if stored is not None and stored.filled:
            return stored.read(rest[-1])
        if t_logp is None:
            t_logp = F.log_softmax(logits_of(rest[0]).float(), dim=-1)
        slot = stored.slot(rest[-1]) if stored is not None else None
        p = t_logp.exp() if slot is None else torch.exp(t_logp, out=slot)  # (straight into the store)
        side = (p, torch.linalg.vecdot(p, t_logp), -t_logp.gather(-1, y.unsqueeze(-1)).squeeze(-1))
        if stored is not None:
            stored.write(rest[-1], *side, p_written=slot is not None)
        return side

    def quantities(logits, y, in_half, *rest):
        logp = F.log_softmax(logits.float(), dim=-1)  # once, for the loss and the KL
        target_logp = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        nll = -target_logp
        # correct: the target has the largest log-probability (a tie for it counts); amax is 6x faster than argmax
        values = [nll, nll * in_half, (target_logp >= logp.amax(-1)).float()]
        if as_teacher:
            if stored is not None and not stored.filled:
                teacher_side(y, rest, logp)  # fills the store from these log-probabilities
            values += [torch.zeros_like(nll), nll]
        elif with_teacher:
            p, p_logp, t_nll = teacher_side(y, rest)
            kl = p_logp - torch.linalg.vecdot(p, logp)  # KL(teacher || model) = Σ p log p - Σ p log q: 0 if equal
            values += [kl, t_nll]
        return torch.stack(values, -1)

    aligned = (second_half,) + ((teacher,) if teacher is not None else ())
    if stored is not None:  # each predicting position's row in the store
        rows = torch.arange(B * (T - 1), device=hidden.device).view(B, T - 1)
        aligned += (torch.cat((rows, rows.new_zeros(B, 1)), 1),)
    n = 5 if with_teacher else 3  # without a teacher, its KL and loss are 0
    sums = position_sum(hidden, head, tokens, mask, quantities, *aligned, chunk_size=chunk_size)
    sums = sums.double().expand(n)  # (a scalar 0 when no position counts)
    sums = torch.cat((sums, sums.new_zeros(5 - n)))
    half_count = (mask[:, 1:] * second_half[:, :-1]).sum()
    return torch.cat((sums, torch.stack((mask[:, 1:].sum(), half_count)).double().to(sums.device)))


class _TeacherSide:
    """What :func:`_batch_sums` needs of the teacher at each predicting position of one batch (B·(T-1) rows):
    its probabilities [.., V], Σ p log p and its NLL. Filled once, then read."""

    def __init__(self, positions: int, vocab_size: int, device):
        self.p = torch.empty(positions, vocab_size, device=device)
        self.p_logp = torch.empty(positions, device=device)
        self.nll = torch.empty(positions, device=device)
        self.filled = False

    def _span(self, rows: torch.Tensor) -> Optional[slice]:
        """The rows as a slice of the store when they are consecutive (no padding between them), else None."""
        flat = rows.reshape(-1)
        first, n = int(flat[0]), len(flat)
        return slice(first, first + n) if int(flat[-1]) - first + 1 == n else None

    def slot(self, rows: torch.Tensor) -> Optional[torch.Tensor]:
        """Where the rows' probabilities go, when they can be written in place."""
        span = self._span(rows)
        return None if span is None else self.p[span].view(*rows.shape, -1)

    def write(self, rows: torch.Tensor, p, p_logp, nll, p_written: bool = False) -> None:
        flat = rows.reshape(-1)
        if not p_written:
            self.p.index_copy_(0, flat, p.reshape(len(flat), -1))
        self.p_logp.index_copy_(0, flat, p_logp.reshape(-1))
        self.nll.index_copy_(0, flat, nll.reshape(-1))

    def read(self, rows: torch.Tensor) -> tuple:
        span = self._span(rows)
        if span is not None:  # views, no copy
            p, p_logp, nll = self.p[span], self.p_logp[span], self.nll[span]
        else:
            p, p_logp, nll = (x.index_select(0, rows.reshape(-1)) for x in (self.p, self.p_logp, self.nll))
        return p.view(*rows.shape, -1), p_logp.view(rows.shape), nll.view(rows.shape)


@dataclass
class _Kept:
    tokens: torch.Tensor
    mask: torch.Tensor
    size: int
    stored: Optional[_TeacherSide] = None  # the teacher's side of the sums, or
    output: Optional[tuple] = None  # the teacher forward's (output, head), until that side is filled


class TeacherCache:
    """What the frozen teacher computes on a fixed evaluation set, kept across evaluations (and across the models
    `selfreplay eval` scores against one teacher): per batch its side of the sums (probabilities, Σ p log p, NLL)
    while they fit in ``budget_bytes``, else its forward's output while that fits. Exact: the kept tensors are the
    ones the teacher made, so each later evaluation skips the teacher's forward and softmax, with the same numbers.
    An entry keeps its batch's tokens and mask: a batch that differs under the same key is recomputed.
    """

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self._kept: dict = {}

    def get(self, key, tokens: torch.Tensor, mask: torch.Tensor, vocab_size: int, device,
            forward: Callable[[], tuple]) -> tuple:
        """(teacher output, teacher head, its kept side of the sums) of a batch; what is not kept is computed."""
        kept = self._kept.get(key)
        if kept is not None and torch.equal(kept.tokens, tokens) and torch.equal(kept.mask, mask):
            if kept.stored is not None and kept.stored.filled:
                return None, None, kept.stored
            if kept.output is not None:
                return (*kept.output, kept.stored)
        if kept is not None:  # another batch under this key
            self.used -= kept.size
            del self._kept[key]
        t_out, t_head = forward()
        B, T = tokens.shape
        for size, stored, output in ((B * (T - 1) * (vocab_size + 2) * 4, True, None),
                                     (t_out.numel() * t_out.element_size(), False, (t_out, t_head))):
            if self.used + size <= self.budget:
                stored = _TeacherSide(B * (T - 1), vocab_size, device) if stored else None
                self._kept[key] = _Kept(tokens.clone(), mask.clone(), size, stored, output)
                self.used += size
                return t_out, t_head, stored
        return t_out, t_head, None

    def filled(self, key) -> None:
        """The batch's teacher side is all written: the teacher's output is no longer needed."""
        kept = self._kept.get(key)
        if kept is not None and kept.stored is not None:
            kept.stored.filled, kept.output = True, None


def score(model, batches: Iterable[Batch], teacher=None, device="cpu", autocast: Optional[Callable] = None,
          chunk_size: Optional[int] = None, rank: int = 0, world: int = 1,
          should_stop: Optional[Callable[[], bool]] = None, teacher_cache: Optional[TeacherCache] = None,
          cache_key: Hashable = None, same_shape: bool = True, model_is_teacher: bool = False) -> dict[str, float]:
    """Loss, second-half loss, accuracy (and with a teacher: its loss and KL) over every target token.

    ``batches`` are global batches; each rank scores rows rank, rank+world, ... and the sums are added over ranks
    (every rank makes the same number of forward calls, as FSDP's collectives need). Every call has the first
    call's number of rows (``same_shape``; else at least one): a smaller (last) share is filled with copies of a row
    that count for nothing, so a compiled model sees one shape. ``should_stop`` is asked before each batch; when it
    says yes, :class:`EvaluationAbandoned` is raised (the result would be partial). ``teacher_cache`` keeps the
    teacher's results on these batches (under ``cache_key``) for the next call. ``model_is_teacher``: the model
    computes exactly what the teacher computes (a finetune before its first update): only the teacher runs, and the
    model's numbers are its own (KL 0).
    """
    return score_models([model], batches, teacher, device, autocast, chunk_size, rank, world, should_stop,
                        teacher_cache, cache_key, same_shape, model_is_teacher)[0]


@torch.no_grad()
def score_models(models: list, batches: Iterable[Batch], teacher=None, device="cpu",
                 autocast: Optional[Callable] = None, chunk_size: Optional[int] = None, rank: int = 0, world: int = 1,
                 should_stop: Optional[Callable[[], bool]] = None, teacher_cache: Optional[TeacherCache] = None,
                 cache_key: Hashable = None, same_shape: bool = True,
                 model_is_teacher: bool = False) -> list[dict[str, float]]:
    """:func:`score` of several models on the same batches, batch by batch: the teacher's forward and its side of
    the sums (probabilities, Σ p log p, NLL) are made once per batch for all of them (when no cache keeps them)."""
    from selfreplay.train.distributed import reduce_sum

    if model_is_teacher and len(models) != 1:
        raise ValueError("model_is_teacher scores one model")
    autocast = autocast or contextlib.nullcontext
    totals = [torch.zeros(len(_SUMS), dtype=torch.float64, device=device) for _ in models]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    rows = None  # the rows of every call
    try:
        for i, batch in enumerate(batches):
            if should_stop is not None and should_stop():
                raise EvaluationAbandoned
            index = torch.arange(rank, len(batch), world)  # this rank's rows
            counted = len(index)
            rows = rows or max(counted, 1)
            wanted = rows if same_shape else max(counted, 1)
            if counted < wanted:  # a ragged last batch, or this rank's share of it: weightless copies of row 0
                index = torch.cat((index, index.new_zeros(wanted - counted)))
            part = batch.rows(index).to(device, non_blocking=True)
            mask = part.mask()
            mask[counted:] = 0.0
            with autocast():
                t_out, t_head, stored = None, None, None
                if teacher is not None:
                    def forward(part=part):
                        if chunk_size is None:
                            return teacher(part.tokens, position_ids=part.position_ids), None
                        return teacher.hidden_and_head(part.tokens, position_ids=part.position_ids)

                    if teacher_cache is None:
                        t_out, t_head = forward()
                    else:
                        t_out, t_head, stored = teacher_cache.get((cache_key, i), part.tokens, mask,
                                                                  teacher.module.vocab_size, device, forward)
                    if stored is None and len(models) > 1:  # made by the first model's pass, read by the others
                        B, T = part.tokens.shape
                        stored = _TeacherSide(B * (T - 1), teacher.module.vocab_size, device)
                if model_is_teacher and t_out is not None:  # one pass: the teacher's output is the model's
                    head = t_head if t_head is not None else (lambda logits: logits)
                    totals[0] += _batch_sums(t_out, head, part.tokens, mask, None, None, chunk_size, stored, True)
                else:
                    for model, total in zip(models, totals):
                        extra = {} if stored is None else {"stored": stored}  # (without a store, the kwargs of before)
                        filled = stored is not None and stored.filled
                        total += model(part.tokens, position_ids=part.position_ids, head_fn=_batch_sums,
                                       tokens=part.tokens, mask=mask, teacher=None if filled else t_out,
                                       teacher_head=None if filled else t_head, chunk_size=chunk_size, **extra)
                        if stored is not None:
                            stored.filled = True
                if stored is not None and teacher_cache is not None:
                    teacher_cache.filled((cache_key, i))
    finally:
        for m, training in zip(models, was_training):
            m.train(training)
    return [_metrics(dict(zip(_SUMS, reduce_sum(total).tolist())), teacher is not None) for total in totals]


def _metrics(s: dict, with_teacher: bool) -> dict[str, float]:
    if s["count"] == 0:
        raise SelfReplayError("evaluation: no held-out target tokens (set data.valid_tokens / data.valid_examples "
                              "> 0)")
    out = {"loss": s["nll"] / s["count"], "loss_second_half": s["nll_half"] / max(s["count_half"], 1.0),
           "accuracy": s["correct"] / s["count"]}
    if with_teacher:
        out.update(kl=s["kl"] / s["count"], teacher_loss=s["teacher_nll"] / s["count"])
    return out


@torch.no_grad()
def parameter_norms(params: dict[str, torch.Tensor], teacher: Optional[dict[str, torch.Tensor]] = None,
                    init: Optional[dict[str, torch.Tensor]] = None) -> dict[str, float]:
    """Weight norm; with a teacher, drift = ‖θ − teacher‖ / ‖teacher − init‖ (the finetuning move relative to the
    pretraining move); without one, ‖θ − init‖."""
    def norm(tensors) -> torch.Tensor:
        return torch.sqrt(sum((t.float() ** 2).sum() for t in tensors))

    out = {"weight_norm": norm(params.values()).item()}
    if teacher is not None:
        moved = norm(params[k] - teacher[k].to(params[k].device) for k in params).item()
        out["dist_to_teacher"] = moved
        if init is not None:
            pre = norm(teacher[k].float() - init[k].to(teacher[k].device).float() for k in params).item()
            out["drift"] = moved / pre if pre > 0 else float("nan")
    elif init is not None:
        out["dist_to_init"] = norm(p - init[k].to(p.device) for k, p in params.items()).item()
    return out


def read_metrics(run_dir, warn: bool = True, train_steps: bool = False) -> list[dict]:
    """The evaluation records of a run's metrics.jsonl (``train_steps``: the ``"event": "train"`` records of
    log.every_steps too); a torn or garbage line (a kill or a full disk during an append) and everything after it
    is dropped with a warning."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            if warn:
                log.warning("%s: line %d is torn or not JSON; dropping it and what follows", path, i)
            break
        if train_steps or record.get("event") != "train":
            records.append(record)
    return records


class MetricsLogger:
    """Appends one JSON record per line to metrics.jsonl (non-finite numbers as null); mirrors to wandb /
    TensorBoard when enabled. ``keep_until_step`` (resuming) first drops records written after that step."""

    def __init__(self, run_dir, wandb: bool = False, wandb_project: str = "selfreplay", tensorboard: bool = False,
                 config: Optional[dict] = None, keep_until_step: Optional[int] = None):
        from selfreplay.train.files import atomic_write

        self.path = Path(run_dir) / METRICS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [] if keep_until_step is None else [r for r in read_metrics(run_dir, train_steps=True)
                                                   if r.get("step", 0) <= keep_until_step]
        atomic_write(self.path, "".join(dumps(r) + "\n" for r in kept))
        self._file = self.path.open("ab", buffering=0)  # unbuffered: a failed append leaves nothing to flush
        self._wandb = self._tb = None
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise SelfReplayError("log.wandb=true needs wandb: pip install wandb") from None
            self._wandb = wandb_lib.init(project=wandb_project, dir=str(run_dir), config=config,
                                         name=Path(run_dir).name, resume="allow")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise SelfReplayError("log.tensorboard=true needs tensorboard: pip install tensorboard") from None
            self._tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, record: dict[str, Any]) -> None:
        try:
            line = memoryview((dumps(record) + "\n").encode())
            while line:  # a full disk: a short write, then ENOSPC
                line = line[self._file.write(line):]
        except OSError as e:
            from selfreplay.train.files import disk_full

            if disk_full(e):  # a torn last line is dropped on --resume
                raise SelfReplayError(f"no space left on the device writing {self.path}; free space and continue "
                                      f"with --resume") from None
            raise
        step = record.get("step", 0)
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()
