"""Forgetting metrics and where they are written.

``evaluate`` measures a model on held-out sequences: next-token loss, the loss on the second half of
positions (less dominated by the short-context start), and KL(teacher || model). Forgetting is the increase of
the previous-distribution loss over the unmodified teacher's loss on the same sequences.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from selfreplay.errors import SelfReplayError
from selfreplay.losses import token_divergence, token_nll


@torch.no_grad()
def evaluate(model: Callable, batches: Iterable[torch.Tensor], teacher: Optional[Callable] = None,
             device: torch.device | str = "cpu", autocast: Optional[Callable] = None) -> dict[str, float]:
    """``loss``, ``loss_second_half`` and, with a teacher, ``kl`` and the teacher's own ``teacher_loss``,
    averaged over every predicted position."""
    autocast = autocast or contextlib.nullcontext
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    count = count_half = 0
    for tokens in batches:
        tokens = tokens.to(device, non_blocking=True)
        with autocast():
            logits = model(tokens)
            teacher_logits = teacher(tokens) if teacher is not None else None
        nll = token_nll(logits, tokens)  # [B, T-1]; column t predicts token t+1
        half = tokens.shape[1] // 2
        second = nll[:, half - 1:]  # predictions of tokens half .. T-1
        sums[0] += nll.double().sum()
        sums[1] += second.double().sum()
        if teacher_logits is not None:
            teacher_logprobs = torch.log_softmax(teacher_logits.float(), dim=-1)
            sums[2] += token_divergence(logits, teacher_logprobs)[:, :-1].double().sum()
            sums[3] += token_nll(teacher_logits, tokens).double().sum()
        count += nll.numel()
        count_half += second.numel()
    if count == 0:
        raise SelfReplayError("evaluation: no validation sequences (set data.valid_tokens > 0)")
    sums = sums.tolist()
    out = {"loss": sums[0] / count, "loss_second_half": sums[1] / count_half}
    if teacher is not None:
        out["kl"] = sums[2] / count
        out["teacher_loss"] = sums[3] / count
    return out


@torch.no_grad()
def parameter_norms(model: torch.nn.Module, teacher: Optional[torch.nn.Module] = None,
                    init: Optional[dict[str, torch.Tensor]] = None) -> dict[str, float]:
    """Weight norm; with a teacher, drift = ‖θ − teacher‖ / ‖teacher − init‖ (finetuning move relative to the
    pretraining move); without one, ‖θ − init‖."""
    params = dict(model.named_parameters())
    out = {"weight_norm": torch.sqrt(sum((p.float() ** 2).sum() for p in params.values())).item()}
    if teacher is not None:
        t_params = dict(teacher.named_parameters())
        moved = torch.sqrt(sum(((params[k].float() - t_params[k].float()) ** 2).sum() for k in params)).item()
        out["dist_to_teacher"] = moved
        if init is not None:
            pre = torch.sqrt(sum(((t_params[k].float() - init[k].to(t_params[k].device).float()) ** 2).sum()
                                 for k in params)).item()
            out["drift"] = moved / pre if pre > 0 else float("nan")
    elif init is not None:
        out["dist_to_init"] = torch.sqrt(sum(((p.float() - init[k].to(p.device).float()) ** 2).sum()
                                             for k, p in params.items())).item()
    return out


class MetricsLogger:
    """Appends one JSON record per line to metrics.jsonl; mirrors to wandb / TensorBoard when enabled."""

    def __init__(self, run_dir: str | Path, wandb: bool = False, wandb_project: str = "selfreplay",
                 tensorboard: bool = False, config: Optional[dict] = None, keep_until_tokens: Optional[int] = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_tokens is None:
            self.path.write_text("")
        else:  # resuming: drop records written after the checkpoint we resume from
            kept = [line for line in self._read_lines() if json.loads(line).get("tokens", 0) <= keep_until_tokens]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
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

    def _read_lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        return [line for line in self.path.read_text().splitlines() if line.strip()]

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
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


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
