"""The toy continual-learning tasks of the paper (§5.2) and their greedy-decoding evaluation.

Four arithmetic tasks on 3-digit base-10 numbers, each a 14-token sequence::

    [task-BOS, a1 a2 a3, SEP, b1 b2 b3, EQ, y1 y2 y3 y4, EOS]      (add, modadd)
    [task-BOS, a1 a2 a3, SEP, NULL NULL NULL, EQ, y1 y2 y3 y4, EOS]  (reversal, sort: one operand)

- ``add``: a + b (0..1998);  ``modadd``: (a + b) mod 1000;
- ``reversal``: a's three digits reversed (leading zeros kept: 120 -> 021);
- ``sort``: a's three digits in ascending order.

Every answer is written as exactly 4 digits, most significant first and zero-padded on the left (add 57 -> 0057,
reversal of 120 -> 0021), so all sequences have the same 14 tokens and the answer always starts at position 9.

Two-operand tasks draw distinct (a, b) pairs, so their validation problems are unseen in training; single-operand
tasks have only 1000 possible inputs, drawn with replacement (validation then overlaps training, as it must).
Everything is generated in memory from a seed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from selfreplay.data.batch import Batch
from selfreplay.errors import SelfReplayError
from selfreplay.replay.losses import token_nll

TASKS = ("add", "reversal", "sort", "modadd")
TWO_OPERAND = ("add", "modadd")

PAD, SEP, EQ, NULL, EOS = 0, 5, 6, 7, 8
TASK_TOKEN = {name: 1 + i for i, name in enumerate(TASKS)}  # 1..4: one BOS token per task
DIGIT0 = 9  # digit d is token 9 + d
VOCAB_SIZE = 19
SEQ_LEN = 14
PROMPT_LEN = 9  # task token, a, SEP, b, EQ: greedy decoding starts after EQ
ANSWER_LEN = SEQ_LEN - PROMPT_LEN  # 4 digits + EOS

_NAMES = {PAD: "<pad>", SEP: "|", EQ: "=", NULL: "_", EOS: "<eos>",
          **{tok: f"<{name}>" for name, tok in TASK_TOKEN.items()}, **{DIGIT0 + d: str(d) for d in range(10)}}


def check_task(task: str) -> None:
    if task not in TASK_TOKEN:
        raise SelfReplayError(f"unknown toy task {task!r}; expected one of {', '.join(TASKS)}")


def answer_digits(task: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The 4 answer digits [N, 4] (ints 0-9, zero-padded on the left) for operands a, b in 0..999."""
    check_task(task)
    a_digits = torch.stack((a // 100, a // 10 % 10, a % 10), dim=-1)
    if task in TWO_OPERAND:
        value = a + b if task == "add" else (a + b) % 1000
        return torch.stack((value // 1000, value // 100 % 10, value // 10 % 10, value % 10), dim=-1)
    three = a_digits.flip(-1) if task == "reversal" else a_digits.sort(dim=-1).values
    return torch.cat((torch.zeros_like(three[:, :1]), three), dim=-1)


def encode(task: str, a: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Token sequences [N, 14] of ``task`` for operands a (and b, ignored by single-operand tasks)."""
    check_task(task)
    a = torch.as_tensor(a, dtype=torch.long).reshape(-1)
    b = torch.zeros_like(a) if b is None else torch.as_tensor(b, dtype=torch.long).reshape(-1)
    if ((a < 0) | (a > 999) | (b < 0) | (b > 999)).any():
        raise SelfReplayError("toy operands must be in 0..999")
    n = a.shape[0]
    col = lambda v: torch.full((n, 1), v, dtype=torch.long)  # noqa: E731
    digits = lambda x: DIGIT0 + torch.stack((x // 100, x // 10 % 10, x % 10), dim=-1)  # noqa: E731
    second = digits(b) if task in TWO_OPERAND else col(NULL).expand(n, 3)
    return torch.cat((col(TASK_TOKEN[task]), digits(a), col(SEP), second, col(EQ),
                      DIGIT0 + answer_digits(task, a, b), col(EOS)), dim=1)


def to_text(tokens: torch.Tensor) -> str:
    """Human-readable form of one sequence, e.g. ``<add> 1 2 3 | 4 5 6 = 0 5 7 9 <eos>``."""
    return " ".join(_NAMES.get(int(t), f"?{int(t)}") for t in tokens)


@dataclass
class TaskData:
    """One task's training and validation sequences, [N, 14] long tensors."""

    name: str
    train: torch.Tensor
    valid: torch.Tensor


def make_task(task: str, n_train: int = 65_536, n_valid: int = 4_096, seed: int = 0) -> TaskData:
    """Deterministic problems of one task; two-operand tasks keep validation pairs out of training."""
    check_task(task)
    if n_train <= 0 or n_valid <= 0:
        raise SelfReplayError(f"toy task sizes must be positive (train {n_train}, valid {n_valid})")
    gen = torch.Generator().manual_seed(seed * 1000 + TASK_TOKEN[task])
    n = n_train + n_valid
    if task in TWO_OPERAND:
        if n > 1_000_000:
            raise SelfReplayError(f"toy task {task}: at most 1,000,000 distinct problems, asked for {n}")
        pairs = torch.randperm(1_000_000, generator=gen)[:n]
        a, b = pairs // 1000, pairs % 1000
    else:
        a, b = torch.randint(0, 1000, (n,), generator=gen), None
    tokens = encode(task, a, b)
    return TaskData(task, tokens[:n_train], tokens[n_train:])


def make_tasks(n_train: int = 65_536, n_valid: int = 4_096, seed: int = 0,
               tasks: tuple[str, ...] = TASKS) -> list[TaskData]:
    """The tasks in training order."""
    return [make_task(t, n_train, n_valid, seed) for t in tasks]


class ToyLoader:
    """A :class:`~selfreplay.data.batch.DataSource` over one task: ``batch_size`` training problems drawn with
    replacement by ``generator`` each step (the paper's toy sampling), its first ``n_eval`` validation problems."""

    seq_len = SEQ_LEN

    def __init__(self, task: TaskData, batch_size: int, generator: torch.Generator, n_eval: Optional[int] = None):
        self.task, self.batch_size, self.generator = task, batch_size, generator
        self.valid = task.valid[:n_eval] if n_eval else task.valid
        self.steps = 0

    @property
    def num_train_rows(self) -> int:
        return self.task.train.shape[0]

    @property
    def epochs_done(self) -> float:
        return self.steps * self.batch_size / self.num_train_rows

    def next_batch(self) -> Batch:
        rows = torch.randint(0, self.num_train_rows, (self.batch_size,), device=self.task.train.device,
                             generator=self.generator)
        self.steps += 1
        return Batch(self.task.train[rows])

    def valid_batches(self, batch_size: int, max_tokens: Optional[int] = None):
        for start in range(0, self.valid.shape[0], batch_size):
            yield Batch(self.valid[start:start + batch_size])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.steps = int(state["steps"])


@torch.no_grad()
def greedy_decode(model, prompts: torch.Tensor, steps: int = ANSWER_LEN) -> torch.Tensor:
    """Greedily extend prompts [B, P] by ``steps`` tokens with the KV cache; returns the new tokens [B, steps]."""
    cache = model.new_kv_cache(prompts.shape[0])
    logits = model(prompts, cache=cache)[:, -1]
    out = []
    for i in range(steps):
        nxt = logits.argmax(-1)
        out.append(nxt)
        if i + 1 < steps:
            logits = model(nxt[:, None], cache=cache)[:, -1]
    return torch.stack(out, dim=1)


def exact_match(predicted: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
    """Per-row bool: the predicted answer tokens [N, 5] equal the sequences' answer + EOS (positions 9..13)."""
    target = sequences[:, PROMPT_LEN:]
    if predicted.shape != target.shape:
        raise SelfReplayError(f"predicted answers {tuple(predicted.shape)} do not match targets {tuple(target.shape)}")
    return (predicted == target).all(dim=1)


def answers_right(logits: torch.Tensor, sequences: torch.Tensor) -> torch.Tensor:
    """Per-row bool from one teacher-forced forward's ``logits`` [N, 14, V]: the argmax at every answer position is
    the answer token. Greedy decoding feeds back its own argmax, so its answer equals the true one exactly when each
    argmax given the true prefix is the true token: the same exact match as :func:`greedy_decode`, in one forward."""
    return (logits[:, PROMPT_LEN - 1:-1].argmax(-1) == sequences[:, PROMPT_LEN:]).all(dim=1)


@torch.no_grad()
def evaluate_tasks(model, valid: dict[str, torch.Tensor], batch_size: int = 4096,
                   autocast: Optional[Callable] = None) -> dict[str, dict[str, float]]:
    """Per task: greedy exact-match ``accuracy`` (answer + EOS decoded from the prompt up to EQ, see
    :func:`answers_right`) and the teacher-forced next-token ``loss`` on its validation sequences, both from one
    forward of each batch.

    All tasks' rows are evaluated together in batches of ``batch_size`` (few large calls are what is fast).
    """
    autocast = autocast or contextlib.nullcontext
    rows = torch.cat(list(valid.values()))
    correct, losses = [], []
    for start in range(0, rows.shape[0], batch_size):
        chunk = rows[start:start + batch_size]
        with autocast():
            logits = model(chunk)
        correct.append(answers_right(logits, chunk))
        losses.append(token_nll(logits, chunk).mean(dim=1))
    correct_t, losses_t = torch.cat(correct).double(), torch.cat(losses).double()
    sizes = [v.shape[0] for v in valid.values()]
    acc = [c.mean() for c in correct_t.split(sizes)]
    loss = [x.mean() for x in losses_t.split(sizes)]
    values = torch.stack(acc + loss).tolist()  # one device sync for everything
    names = list(valid)
    return {"accuracy": dict(zip(names, values[:len(names)])), "loss": dict(zip(names, values[len(names):]))}
