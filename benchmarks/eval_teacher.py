"""What one held-out evaluation costs at the frontier preset's shapes (BENCHMARKS.md, "Evaluation"): a d64, 2-layer,
context-64, 4096-token GPT scored on 16,384 tokens (batches of 64 rows) without a teacher, against a teacher
computed every time, and against a teacher whose side of the sums is kept (``eval.teacher_cache_mb``, the default):
its first call fills the cache, the later ones read it. Timing only: random weights and tokens. CPU, ~30 s:

    python benchmarks/eval_teacher.py [--threads N] [--rounds R]
"""

from __future__ import annotations

import argparse
import time

import torch

from selfreplay.data.batch import Batch
from selfreplay.evaluate.metrics import TeacherCache, eval_chunk_size, score
from selfreplay.models.builtin import wrap_gpt
from selfreplay.models.core import Teacher
from selfreplay.models.gpt import GPT, GPTConfig

SHAPE = GPTConfig(d_model=64, n_layers=2, head_dim=32, context=64, vocab_size=4096)
TOKENS, ROWS = 16384, 64


def best_of(rounds: int, fn) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher_net = GPT(SHAPE)
    student = wrap_gpt(GPT(SHAPE)).eval()
    student.net.load_state_dict(teacher_net.state_dict())
    with torch.no_grad():  # a student that has moved from its teacher
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    teacher = Teacher(wrap_gpt(teacher_net).eval().requires_grad_(False))
    rows = -(-TOKENS // (SHAPE.context - 1))
    tokens = torch.randint(0, SHAPE.vocab_size, (rows, SHAPE.context))
    batches = [Batch(tokens[i:i + ROWS]) for i in range(0, rows, ROWS)]
    chunk = eval_chunk_size(SHAPE.vocab_size, "cpu")
    cache = TeacherCache(1 << 30)

    def cached():
        return score(student, batches, teacher, chunk_size=chunk, teacher_cache=cache, cache_key="valid",
                     same_shape=False)

    plain = best_of(args.rounds, lambda: score(student, batches, chunk_size=chunk, same_shape=False))
    every_time = best_of(args.rounds, lambda: score(student, batches, teacher, chunk_size=chunk, same_shape=False))
    fill = best_of(1, cached)
    kept = best_of(args.rounds, cached)
    assert cached() == score(student, batches, teacher, chunk_size=chunk, same_shape=False), "the cache changed them"
    print(f"{TOKENS} tokens, {args.threads} thread(s), best of {args.rounds}; cache {cache.used / 2**20:.0f} MB")
    for name, seconds in (("no teacher", plain), ("teacher every time", every_time), ("teacher cache: fill", fill),
                          ("teacher cache: kept", kept)):
        print(f"{name:<22} {seconds:6.3f} s  {TOKENS / seconds / 1e3:6.1f}k tokens/s")


if __name__ == "__main__":
    main()
