"""Speed benchmark of the real training step: plain finetuning vs KL replay (real or self-generated).

Builds a random-token corpus and a randomly initialised "pretrained" checkpoint in a temporary directory, then
times :meth:`Trainer.train_step` after warm-up (compilation included in warm-up on CUDA). Sampling time of
self-generated replay is part of the step time, amortised over the buffer as in training.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from selfreplay import checkpoint as ckpt
from selfreplay.config import TrainConfig, config_to_yaml, load_config
from selfreplay.data import CorpusMeta, write_corpus
from selfreplay.trainer import Trainer, init_model

METHODS = {  # "sampling" times the replay sampler alone
    "sampling": [],
    "plain": [],
    "kl_real": ["replay.method=kl", "replay.source=prev"],
    "kl_self": ["replay.method=kl", "replay.source=self"],
}

# bf16 dense peak of the GPUs we report on (FLOP/s), for model FLOPs utilisation
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _fake_checkpoint(root: Path, cfg: TrainConfig) -> tuple[str, str]:
    """A random corpus big enough for the run and a random-init checkpoint that trained on it."""
    rng = np.random.default_rng(0)
    tokens_needed = (cfg.data.batch_size + cfg.replay.batch_size) * cfg.model.context * 8 + 200_000
    corpus = root / "corpus"
    write_corpus(rng.integers(11, cfg.model.vocab_size, size=tokens_needed), corpus,
                 CorpusMeta(num_tokens=0, dtype="uint16", vocab_size=cfg.model.vocab_size,
                            tokenizer_fingerprint="bench", domain_token=0, eos_token=10, name="bench"))
    model = init_model(cfg.model, 0)
    info = {"kind": "pretrain", "model": vars(cfg.model), "init_seed": 0, "tokenizer_fingerprint": "bench",
            "train_corpus": {"path": str(corpus), "name": "bench", "domain_token": 0, "valid_tokens": 1024,
                             "split_seed": 0}}
    ckpt.save_run(root / "pretrained", model, config_to_yaml(cfg), info, {})
    return str(corpus), str(root / "pretrained")


def bench_step(method: str, overrides: list[str], steps: int = 20, warmup: int = 5) -> dict:
    """Steady-state time of one optimizer step for ``method`` (plain | kl_real | kl_self)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = load_config(TrainConfig, [], ["run_dir=x", "data.train=x", "stop.steps=1", *overrides])
        corpus, pretrained = _fake_checkpoint(root, base)
        cfg = load_config(TrainConfig, [], [f"run_dir={root / 'run'}", f"data.train={corpus}",
                                            f"init_from={pretrained}", "data.valid_tokens=1024",
                                            f"stop.steps={steps + warmup}", "log.progress=false",
                                            *overrides, *METHODS[method]])
        trainer = Trainer(cfg, finetune=True)
        sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
        for _ in range(warmup):
            trainer.train_step()
        sync()
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        sync()
        seconds = (time.perf_counter() - start) / steps
        tokens = cfg.data.batch_size * cfg.model.context
        result = {"method": method, "device": str(trainer.device), "ms_per_step": seconds * 1e3,
                  "tokens_per_s": tokens / seconds, "batch": cfg.data.batch_size, "context": cfg.model.context,
                  "replay_rows": cfg.replay.batch_size if method != "plain" else 0}
        if trainer.device.type == "cuda":
            name = torch.cuda.get_device_name(trainer.device)
            peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
            flops = trainer.model.flops_per_token() * tokens / seconds
            result.update(gpu=name, tflops=flops / 1e12, mfu=flops / peak if peak else None,
                          peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30)
        return result


def bench_sampling(overrides: list[str], rounds: int = 2) -> dict:
    """Sampled tokens/s of the replay sampler: ``replay.buffer x replay.batch_size`` full-length sequences."""
    from selfreplay.replay import SelfGeneratedReplay
    from selfreplay.trainer import resolve_device, sampling_precision

    cfg = load_config(TrainConfig, [], ["run_dir=x", "data.train=x", "stop.steps=1", *overrides])
    device = resolve_device(cfg.device)
    teacher = init_model(cfg.model, 0).to(device).eval().requires_grad_(False)
    source = SelfGeneratedReplay(teacher, [0], cfg.replay.batch_size, buffer=cfg.replay.buffer, seed=0,
                                 device=device, **sampling_precision(device, cfg.precision))
    per_refill = cfg.replay.buffer * cfg.replay.batch_size * (cfg.model.context - 1)
    for _ in range(cfg.replay.buffer):  # first refill: compilation / warm-up
        source.next_batch()
    source.sample_seconds = 0.0
    for _ in range(rounds * cfg.replay.buffer):
        source.next_batch()
    return {"method": "sampling", "device": str(device), "sampled_tokens_per_s": rounds * per_refill /
            source.sample_seconds, "sequences_per_refill": cfg.replay.buffer * cfg.replay.batch_size,
            "context": cfg.model.context}


def run_bench(methods: list[str], overrides: list[str], steps: int, warmup: int) -> list[dict]:
    results = [bench_step(m, overrides, steps, warmup) for m in methods if m != "sampling"]
    plain = next((r["ms_per_step"] for r in results if r["method"] == "plain"), None)
    for r in results:
        r["relative_to_plain"] = r["ms_per_step"] / plain if plain else None
    if "sampling" in methods:
        results.append(bench_sampling(overrides))
    return results


def format_bench(results: list[dict]) -> str:
    head = f"{'method':<10} {'ms/step':>9} {'tokens/s':>11} {'x plain':>8} {'MFU':>6}"
    lines = [head, "-" * len(head)]
    for r in results:
        if r["method"] == "sampling":
            lines.append(f"sampling: {r['sampled_tokens_per_s']:,.0f} sampled tokens/s "
                         f"({r['sequences_per_refill']} sequences x {r['context']} tokens per refill)")
            continue
        mfu: Optional[float] = r.get("mfu")
        rel = r.get("relative_to_plain")
        lines.append(f"{r['method']:<10} {r['ms_per_step']:>9.1f} {r['tokens_per_s']:>11,.0f} "
                     f"{(f'{rel:.2f}' if rel else '-'):>8} {(f'{mfu:.1%}' if mfu else '-'):>6}")
    return "\n".join(lines)
