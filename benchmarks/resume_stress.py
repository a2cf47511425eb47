"""Interrupt finetuning at random points and check that resuming ends exactly where an uninterrupted run ends.

For each replay setting (plain finetuning, KL on self-generated replay) and each way a run dies (kill -9, Ctrl-C,
SIGTERM), ``--tries`` runs are interrupted at a random instant of training (drawn again when the run had already
finished) and resumed with ``--resume run_dir=...`` (or, after a kill -9 that came before the first checkpoint,
started again). Each must end with weights bitwise equal to an uninterrupted reference run and the same metrics
records (timings aside). Tiny model, CPU, one thread per run.

    python benchmarks/resume_stress.py                # 10 tries x 3 signals x 2 settings, ~10 min on 2 cores
    python benchmarks/resume_stress.py --tries 2      # a quick look
"""

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from selfreplay.data.corpus import CorpusMeta, write_corpus
from selfreplay.evaluate.metrics import read_metrics
from selfreplay.train import checkpoint as ckpt

TIMING = {"train_time", "tokens_per_s", "replay_sample_time"}
SETTINGS = {"plain": {"replay.method": "none"}, "self": {"replay.method": "kl", "replay.source": "self",
                                                         "replay.buffer": 3}}
SIGNALS = {"kill -9": signal.SIGKILL, "Ctrl-C": signal.SIGINT, "SIGTERM": signal.SIGTERM}


def markov_corpus(path: Path, seed: int, domain: int, n: int = 40_000, vocab: int = 64) -> str:
    """A learnable token stream (a sparse random Markov chain over ids 11..63; 0-9 domain tokens, 10 EOS)."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(11, vocab, size=(vocab, 3))
    tokens, state = np.empty(n, dtype=np.int64), 11
    for i, choice in enumerate(rng.integers(0, 3, size=n)):
        state = tokens[i] = successors[state, choice]
    meta = CorpusMeta(num_tokens=0, dtype="uint16", vocab_size=vocab, tokenizer_fingerprint="stress",
                      domain_token=domain, eos_token=10, source=["synthetic"], name=path.name)
    write_corpus(tokens, path, meta)
    return str(path)


def tiny(run_dir: Path, train: str, **extra) -> list[str]:
    base = {"run_dir": run_dir, "data.train": train, "model.d_model": 32, "model.n_layers": 1,
            "model.head_dim": 16, "model.context": 16, "model.vocab_size": 64, "data.batch_size": 16,
            "data.valid_tokens": 600, "optim.warmup_tokens": 0, "optim.lr": 3e-3, "log.progress": False,
            "replay.batch_size": 8, "threads": 1}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "selfreplay", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def finish(args: list[str]) -> None:
    p = cli(args)
    _, err = p.communicate()
    if p.returncode:
        raise RuntimeError(f"{' '.join(args[:2])} failed: {err.strip()}")


def same_run(ref: Path, got: Path) -> str:
    """'' when weights and metrics records match the reference, else what differs."""
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(got / "model.safetensors"))
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    if diff:
        return f"weights differ ({len(diff)} tensors, max {max((a[k] - b[k]).abs().max().item() for k in diff):.1e})"
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    if strip(read_metrics(ref)) != strip(read_metrics(got)):
        return "metrics records differ"
    return ""


def start(args: list[str], run_dir: Path) -> tuple[subprocess.Popen, float]:
    """Start a finetune; return once its initial evaluation is written (training has begun), and when that was."""
    p = cli(["finetune", *args])
    while not (run_dir / "metrics.jsonl").exists() or not read_metrics(run_dir, warn=False):
        if p.poll() is not None:
            raise RuntimeError(p.communicate()[1])
        time.sleep(0.02)
    return p, time.time()


def one_try(root: Path, setting: str, how: str, attempt: int, args_for, span: float) -> dict:
    """One interruption at a random instant of training (drawn again if the run finished first), then resume."""
    run_dir = root / f"{setting}-{how.replace(' ', '')}-{attempt}"
    args = args_for(run_dir)
    for draw in range(5):
        shutil.rmtree(run_dir, ignore_errors=True)
        p, _ = start(args, run_dir)
        delay = random.uniform(0, 0.95 * span)
        time.sleep(delay)
        p.send_signal(SIGNALS[how])
        p.communicate()
        if not (run_dir / "summary.json").exists():
            break  # interrupted mid-training
    if (run_dir / "summary.json").exists():
        outcome = "finished before the signal"
    elif ckpt.latest_checkpoint(run_dir) is None:  # kill -9 before the first checkpoint: start again
        outcome = "restarted (no checkpoint yet)"
        for path in run_dir.iterdir():
            if path.is_file():
                path.unlink()
        finish(["finetune", *args])
    else:
        outcome = f"resumed from step {int(ckpt.latest_checkpoint(run_dir).name.split('_')[1])}"
        finish(["finetune", "--resume", f"run_dir={run_dir}"])
    return {"setting": setting, "how": how, "attempt": attempt, "delay_s": round(delay, 2), "exit": p.returncode,
            "outcome": outcome, "difference": same_run(root / f"ref-{setting}", run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for the runs (default: a temporary one)")
    opts = parser.parse_args()
    random.seed(opts.seed)
    root = Path(opts.out or tempfile.mkdtemp(prefix="resume_stress_"))
    root.mkdir(parents=True, exist_ok=True)
    en, es = markov_corpus(root / "en", 1, 0), markov_corpus(root / "es", 2, 1)
    finish(["pretrain", *tiny(root / "pretrained", en, **{"stop.steps": 150})])
    schedule = {"stop.steps": 600, "eval.every_steps": 25, "checkpoint.every_steps": 50,
                "model.model_name_or_path": root / "pretrained"}
    spans = {}
    for setting, extra in SETTINGS.items():
        p, began = start(tiny(root / f"ref-{setting}", es, **schedule, **extra), root / f"ref-{setting}")
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(err)
        spans[setting] = time.time() - began
        print(f"reference {setting}: trains for {spans[setting]:.1f} s after its first evaluation", flush=True)
    jobs = [(setting, how, attempt) for setting in SETTINGS for how in SIGNALS for attempt in range(opts.tries)]
    with ThreadPoolExecutor(opts.workers) as pool:
        futures = [pool.submit(one_try, root, s, h, a,
                               lambda d, s=s: tiny(d, es, **schedule, **SETTINGS[s]), spans[s]) for s, h, a in jobs]
        results = []
        for f in futures:
            r = f.result()
            results.append(r)
            print(f"{r['setting']:5} {r['how']:8} #{r['attempt']}: signal after {r['delay_s']:5.2f} s, exit "
                  f"{r['exit']}, {r['outcome']}: {r['difference'] or 'bitwise equal, same records'}", flush=True)
    bad = [r for r in results if r["difference"]]
    interrupted = [r for r in results if not r["outcome"].startswith("finished")]
    print(f"\n{len(interrupted)} of {len(results)} runs interrupted mid-training; "
          f"{len(results) - len(bad)} of {len(results)} ended bitwise equal with the same records")
    (root / "results.json").write_text(json.dumps(results, indent=1))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
