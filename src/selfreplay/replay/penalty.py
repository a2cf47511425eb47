"""The forgetting penalty, computed in one place for every loop, model kind and source.

    loss = NTP(new data) + coeff · term

``replay.method`` chooses the term:

- ``kl``: divergence(teacher ‖ student) on replay rows (the paper's; ``forward_kl``, ``reverse_kl`` or ``jsd``);
- ``ntp``: next-token loss on replay rows;
- ``kl_downstream``: the divergence on the new data's own rows (Learning without Forgetting);
- ``asft``: anchored SFT — the new data's NTP weighted per token by the model's detached probability of it (DFT),
  plus the divergence on the new data's rows;
- ``l2_init`` / ``ewc``: the (Fisher-weighted) squared distance from the starting weights (:mod:`.anchor`);
- ``replace``: no term; floor(fraction · batch) of each batch's rows are replay rows instead (data mixing);
- ``none``: plain finetuning.

With a :class:`~selfreplay.replay.budget.ForgettingBudget` the coefficient adapts to keep the replay KL at a target.

Replay rows come from a :mod:`~selfreplay.replay.sources` source. The teacher's targets are the logits kept by
self-generated replay when there are any, else one teacher forward: its full logits below ``chunk_size`` (None:
small vocabularies), else its hidden states, turned into logits chunk by chunk inside the student's forward.

Each term is a *sum* over target tokens; the caller divides by the global number of target tokens
(:meth:`ReplayPenalty.loss`), so several ranks and gradient accumulation give the same update as one big batch.
"""

from __future__ import annotations

from typing import Optional

import torch

from selfreplay.data.batch import Batch, cat_rows
from selfreplay.errors import SelfReplayError
from selfreplay.models.core import Teacher
from selfreplay.replay.anchor import WeightAnchor
from selfreplay.replay.budget import ForgettingBudget, check_controlled
from selfreplay.replay.losses import DIVERGENCES, divergence_sum, ntp_sum
from selfreplay.replay.sources import ReplayBatch

METHODS = ("none", "kl", "ntp", "kl_downstream", "asft", "l2_init", "ewc", "replace")
REPLAY_ROW_METHODS = ("kl", "ntp")  # methods that add replay rows to each step
SOURCE_METHODS = REPLAY_ROW_METHODS + ("replace", "ewc")  # methods that read a replay source
TEACHER_METHODS = ("kl", "kl_downstream", "asft")
DATA_TERM_METHODS = ("kl_downstream", "asft")  # the divergence on the new data's rows
WEIGHT_METHODS = ("l2_init", "ewc")


def replaced_rows(method: str, fraction: float, batch_size: int) -> int:
    """Rows of each batch that ``replace`` fills with replay (floor, as the paper's int(f · B)); 0 otherwise."""
    if method != "replace":
        return 0
    rows = int(fraction * batch_size + 1e-9)
    if not 0 < rows < batch_size:
        raise SelfReplayError(f"replay.fraction={fraction} of data.batch_size={batch_size} gives {rows} replay rows; "
                              f"expected between 1 and {batch_size - 1}")
    return rows


class ReplayPenalty:
    """``coeff · term`` of one ``method`` (see the module docstring), with its teacher and replay source."""

    def __init__(self, method: str = "kl", coeff: float = 1.0, teacher: Optional[Teacher] = None, source=None,
                 divergence: str = "forward_kl", jsd_beta: float = 0.5, chunk_size: Optional[int] = None,
                 fraction: float = 0.125, pad_id: int = 0, anchor: Optional[WeightAnchor] = None,
                 budget: Optional[ForgettingBudget] = None):
        if method not in METHODS:
            raise SelfReplayError(f"replay.method={method!r}: expected one of {', '.join(METHODS)}")
        if divergence not in DIVERGENCES:
            raise SelfReplayError(f"replay.divergence={divergence!r}: expected one of {', '.join(DIVERGENCES)}")
        if method in TEACHER_METHODS and teacher is None:
            raise SelfReplayError(f"replay.method={method}: needs a teacher (finetune a model)")
        if method in SOURCE_METHODS and source is None:
            raise SelfReplayError(f"replay.method={method}: needs a replay source")
        if (method in WEIGHT_METHODS) != (anchor is not None):
            raise ValueError(f"replay.method={method}: a WeightAnchor goes with l2_init / ewc, and only with them")
        if budget is not None and method != "kl":
            raise SelfReplayError(f"replay.target_kl: a forgetting budget controls the replay KL; replay.method="
                                  f"{method} has none (use replay.method=kl)")
        if budget is not None:
            check_controlled(divergence, budget.prefix)
        self.method, self.teacher, self.source, self.anchor, self.budget = method, teacher, source, anchor, budget
        self._coeff = float(coeff)
        self.divergence, self.jsd_beta, self.chunk_size = divergence, jsd_beta, chunk_size
        self.fraction, self.pad_id = fraction, pad_id

    @property
    def coeff(self):
        """The coefficient: a float, or with a budget a device tensor (adapted every step, no host sync)."""
        return self.budget.coeff if self.budget is not None else self._coeff

    @coeff.setter
    def coeff(self, value: float) -> None:
        self._coeff = float(value)

    @property
    def adds_rows(self) -> bool:
        return self.method in REPLAY_ROW_METHODS

    @property
    def has_term(self) -> bool:
        return self.method in REPLAY_ROW_METHODS + DATA_TERM_METHODS

    def replaced_rows(self, batch_size: int) -> int:
        return replaced_rows(self.method, self.fraction, batch_size)

    def next_replay(self) -> Optional[ReplayBatch]:
        """This step's replay rows (``replace``: the rows to put in the batch), or None."""
        if self.method in REPLAY_ROW_METHODS or self.method == "replace":
            return self.source.next_batch()
        return None

    # ------------------------------------------------------------------------------------------ the sums
    def teacher_targets(self, rows: Batch, device: torch.device) -> dict:
        """Keyword arguments of :func:`divergence_sum` describing the teacher on ``rows`` (no gradient)."""
        targets = getattr(rows, "teacher_targets", None)
        if targets is not None:
            return {"teacher": targets.to(device, non_blocking=True)}
        if self.chunk_size is None:
            return {"teacher": self.teacher(rows.tokens, position_ids=rows.position_ids).to(device)}
        hidden, head = self.teacher.hidden_and_head(rows.tokens, position_ids=rows.position_ids)
        if hidden.device != device:
            teacher_device = hidden.device

            def head_on_teacher(h: torch.Tensor, _head=head) -> torch.Tensor:
                return _head(h.to(teacher_device)).to(device)

            return {"teacher_hidden": hidden, "teacher_head": head_on_teacher}
        return {"teacher_hidden": hidden, "teacher_head": head}

    def sums(self, model, batch: Optional[Batch], replay: Optional[ReplayBatch], with_ntp: bool = True
             ) -> dict[str, torch.Tensor]:
        """One student forward over a micro-batch's data rows and replay rows: ``ntp`` (summed NLL of the data's
        target tokens; 0 without data, or when the caller has it already: ``with_ntp=False``) and ``term`` (the
        summed penalty term; 0 without one)."""
        replay = replay if self.adds_rows else None
        groups = [g for g in (batch, replay) if g is not None]
        if not groups:
            raise ValueError("nothing to compute: no data rows and no replay rows")
        device = groups[0].tokens.device
        targets = {}
        if self.method == "kl" and replay is not None:
            targets = self.teacher_targets(replay, device)
        elif self.method in DATA_TERM_METHODS and batch is not None:
            targets = self.teacher_targets(batch, device)
        both = cat_rows(groups, self.pad_id)
        return model(both.tokens, position_ids=both.position_ids, head_fn=self._head_sums, tokens=both.tokens,
                     mask=both.mask(), n_data=len(batch) if batch is not None else 0,
                     data_len=batch.tokens.shape[1] if batch is not None else 0,
                     replay_len=replay.tokens.shape[1] if replay is not None else 0, targets=targets,
                     with_ntp=with_ntp)

    def _head_sums(self, hidden: torch.Tensor, head, tokens: torch.Tensor, mask: torch.Tensor, n_data: int,
                   data_len: int, replay_len: int, targets: dict, with_ntp: bool = True) -> dict[str, torch.Tensor]:
        """The sums from the final hidden states (inside the student's forward: FSDP2 has the head gathered)."""
        zero = torch.zeros((), device=hidden.device)
        rows = slice(0, n_data), slice(0, data_len)
        ntp = ntp_sum(hidden[rows], head, tokens[rows], mask[rows], self.chunk_size, dft=self.method == "asft") \
            if n_data and with_ntp else zero
        term = zero
        if self.adds_rows and replay_len:
            rows = slice(n_data, None), slice(0, replay_len)
            if self.method == "ntp":
                term = ntp_sum(hidden[rows], head, tokens[rows], mask[rows], self.chunk_size)
            else:
                term = divergence_sum(hidden[rows], head, tokens[rows], mask[rows], kind=self.divergence,
                                      beta=self.jsd_beta, chunk_size=self.chunk_size, **targets)
        elif self.method in DATA_TERM_METHODS and n_data:
            term = divergence_sum(hidden[rows], head, tokens[rows], mask[rows], kind=self.divergence,
                                  beta=self.jsd_beta, chunk_size=self.chunk_size, **targets)
        return {"ntp": ntp, "term": term}

    def loss(self, sums: dict[str, torch.Tensor], data_targets: torch.Tensor, term_targets: torch.Tensor
             ) -> torch.Tensor:
        """NTP / data_targets + coeff · term / term_targets (the counts are global, over all ranks)."""
        loss = sums["ntp"] / data_targets.clamp_min(1.0)
        if self.has_term:
            loss = loss + self.coeff * sums["term"] / term_targets.clamp_min(1.0)
        return loss

    def weight_term(self) -> Optional[torch.Tensor]:
        """l2_init / ewc: the (unscaled) distance term, added once per optimizer step; None for other methods."""
        return self.anchor.term() if self.anchor is not None else None

    def estimate_fisher(self, model, num_sequences: int, autocast) -> None:
        """ewc: the teacher's diagonal Fisher from ``num_sequences`` replay rows (``model`` is still the teacher)."""
        from selfreplay.replay.anchor import diagonal_fisher

        batches = iter(self.source.next_batch, None)
        self.anchor.weights = diagonal_fisher(model, batches, num_sequences, autocast)

    def state_dict(self) -> dict:
        return {"coeff": self._coeff, "budget": self.budget.state_dict() if self.budget is not None else None,
                "anchor": self.anchor.state_dict() if self.anchor is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        self._coeff = float(state["coeff"])
        if self.budget is not None and state.get("budget"):
            self.budget.load_state_dict(state["budget"])
        if self.anchor is not None:
            self.anchor.load_state_dict(state.get("anchor") or {})
