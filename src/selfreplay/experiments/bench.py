"""``selfreplay bench``: time and peak memory of the real training step, plain vs KL replay, either model kind.

Each method is a real :meth:`~selfreplay.train.loop.Trainer.train_step` after warm-up (compilation included in
warm-up), on random data:

- ``plain``: next-token loss only;
- ``kl_real``: plus KL(teacher || model) on stored replay rows (a teacher forward each step);
- ``kl_self``: plus KL on rows the teacher samples itself (its share of sampling is in the step time);
- ``sampling``: the replay sampler alone, in sampled tokens per second.

The built-in GPT (default) is benchmarked from a random-init "pretrained" checkpoint and a random corpus; a Hugging
Face model is a hub id, a directory, or a random-weight architecture of :data:`ARCHITECTURES`. With ``isolate``
each method runs in a fresh process, so its peak memory is its own: ``torch.cuda.max_memory_allocated`` on CUDA,
the peak resident set (``VmHWM``, reset through /proc/self/clear_refs) on a CPU; ``step_mib`` is that peak minus
what the built trainer held (weights, teacher), i.e. what a step adds.

For the built-in GPT each row also says how near the machine's limit a step is: the step's model FLOPs
(:func:`gpt_step_flops`) over its time, in GFLOP/s, and that as a share of the fp32 matmul throughput measured in the
same process with the same threads (:func:`matmul_gflops`).

Timings on a shared machine drift by more than the differences between methods: ``rounds`` repeats the methods,
interleaved in alternating order, and takes each ratio between runs of the same round (:func:`_combine_rounds`).
"""

from __future__ import annotations

import json
import math
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from selfreplay.errors import SelfReplayError
from selfreplay.models.gpt import gpt_forward_flops, gpt_step_flops  # noqa: F401 (this module's API too)

METHODS = {"plain": ["replay.method=none"], "kl_real": ["replay.method=kl"], "kl_self": ["replay.method=kl",
                                                                                         "replay.source=self"],
           "sampling": ["replay.method=kl", "replay.source=self"]}
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # bf16 dense, for model FLOPs utilisation
MAX_ROUNDS = 100  # interleaved repetitions of the methods (--rounds)
# the paper's setting on a GPU; a CPU gets a batch that finishes in seconds (BENCHMARKS.md)
GPU_DEFAULTS = ["data.batch_size=256", "replay.batch_size=64", "replay.buffer=16"]
CPU_DEFAULTS = ["data.batch_size=16", "replay.batch_size=4", "replay.buffer=16"]  # the library's default buffer
_LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                 max_position_embeddings=131072)
ARCHITECTURES = {  # Llama shapes with random weights; llama-small keeps the 128k vocabulary on a small body
    "llama-1b": _LLAMA_1B,
    "llama-small": dict(_LLAMA_1B, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4, intermediate_size=1024),
    "llama-tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=2048),
}


def build_architecture(name: str, out_dir: Path, seed: int = 0) -> str:
    """Save a random-weight Llama of a named shape and a word-level tokenizer of its vocabulary to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    shape = ARCHITECTURES[name]
    specials = ("<s>", "</s>", "<pad>")
    vocab = {**{s: i for i, s in enumerate(specials)}, **{f"w{i}": i for i in range(len(specials),
                                                                                    shape["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    hf_logging.disable_progress_bar()
    LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=0, eos_token_id=1, pad_token_id=2)).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def _gpt_fixture(root: Path, overrides: list[str]) -> list[str]:
    """A random corpus and a random-init checkpoint that "trained" on it; the overrides that finetune from it."""
    from selfreplay.config import TrainConfig, load_config
    from selfreplay.data.corpus import CorpusMeta, corpus_identity, write_corpus
    from selfreplay.models.builtin import init_gpt, save_gpt_weights
    from selfreplay.models.gpt import GPTConfig
    from selfreplay.train.files import atomic_write_json

    cfg = load_config(TrainConfig, [], [o for o in overrides if o.startswith(("model.", "data.batch_size",
                                                                              "replay.batch_size"))])
    shape = GPTConfig.of(cfg.model)
    rows = (cfg.data.batch_size or 256) + (cfg.replay.batch_size or 64)
    tokens = np.random.default_rng(0).integers(11, shape.vocab_size, size=rows * shape.context * 8 + 200_000)
    meta = write_corpus(tokens, root / "corpus", CorpusMeta(0, "uint16", shape.vocab_size, "bench", 0, 10,
                                                            name="bench"))
    (root / "pretrained").mkdir()
    save_gpt_weights(init_gpt(shape, 0), root / "pretrained" / "model.safetensors")
    atomic_write_json(root / "pretrained" / "run.json", {
        "kind": "pretrain", "model": vars(shape), "init_seed": 0, "tokenizer_fingerprint": "bench",
        "train_corpus": {"path": str(root / "corpus"), "name": "bench", "identity": corpus_identity(meta),
                         "domain_token": 0, "valid_tokens": 1024, "split_seed": 0}})
    return [f"model.model_name_or_path={root / 'pretrained'}", f"data.train={root / 'corpus'}",
            "data.valid_tokens=1024"] + [o for o in overrides if not o.startswith("model.")]


def _hf_fixture(root: Path, model: str, seq_len: int, batch: int) -> list[str]:
    from selfreplay.models.hf import load_tokenizer

    if model in ARCHITECTURES:
        model = build_architecture(model, root / "model")
    tokenizer = load_tokenizer(model)
    special = set(tokenizer.all_special_ids)
    ids = [i for i in torch.randint(0, len(tokenizer), ((batch + 8) * seq_len * 2,),
                                    generator=torch.Generator().manual_seed(0)).tolist() if i not in special]
    with open(root / "random.jsonl", "w") as f:
        for start in range(0, len(ids), 256):
            f.write(json.dumps({"text": tokenizer.decode(ids[start:start + 256])}) + "\n")
    return [f"model.model_name_or_path={model}", f"data.train={root / 'random.jsonl'}", "data.valid_examples=1",
            f"replay.source={root / 'random.jsonl'}", "data.packing=stream"]


def matmul_gflops(size: int, device: torch.device, repeats: int = 5) -> float:
    """The best of ``repeats`` fp32 ``size`` x ``size`` matmuls, in GFLOP/s (2·n³ each), on this process's threads."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def _limit_fields(trainer, cfg, method: str, seconds: float, device: torch.device) -> dict:
    """``step_gflop``, ``gflops`` (achieved) and ``of_matmul`` (its share of :func:`matmul_gflops`) of a built-in
    GPT step; the matmul size is 4·d_model (256 to 4096), about the model's widest weight."""
    from selfreplay.models.gpt import GPTConfig

    shape, T = GPTConfig.of(cfg.model), trainer.data.seq_len
    replay = cfg.replay.batch_size if method != "plain" else 0
    source = trainer.penalty.source
    kept = getattr(source, "keeps_targets", False)
    flops = gpt_step_flops(shape, cfg.data.batch_size, T, replay, teacher_rows=0 if kept else replay,
                           sampled_rows=replay if method == "kl_self" else 0)
    size = min(4096, max(256, 4 * shape.d_model))
    peak = matmul_gflops(size, device)
    achieved = flops / seconds / 1e9
    return {"step_gflop": flops / 1e9, "gflops": achieved, "matmul_gflops": peak, "matmul_size": size,
            "of_matmul": achieved / peak}


def _rss_mib(field: str) -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def bench_method(method: str, model: Optional[str], overrides: Sequence[str], steps: int, warmup: int) -> dict:
    """Steady-state time and peak memory of one method's optimizer step (or of sampling)."""
    from selfreplay.config import FINETUNE, TrainConfig, load_config
    from selfreplay.train import prepare, set_threads, step_flops
    from selfreplay.train.build import build_parts
    from selfreplay.train.loop import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cuda = torch.cuda.is_available() and "device=cpu" not in overrides
        defaults = GPU_DEFAULTS if cuda else CPU_DEFAULTS
        base = [*defaults, *overrides]
        if model is None:
            args = _gpt_fixture(root, base)
        else:
            seq = next((int(o.split("=")[1]) for o in base if o.startswith("data.seq_len=")), 256)
            batch = next((int(o.split("=")[1]) for o in base if o.startswith("data.batch_size=")), 16)
            args = _hf_fixture(root, model, seq, batch) + base
        # stop.steps beyond the timed steps: a self-generated replay buffer is never cut to the run's length
        cfg = load_config(TrainConfig, [], [f"run_dir={root / 'run'}", "optim.warmup_tokens=0", "log.progress=false",
                                            "eval.every_steps=1000000", f"stop.steps={steps + warmup + 4096}", *args,
                                            *METHODS[method]])
        cfg, kind, info = prepare(cfg, FINETUNE)
        parts = build_parts(cfg, kind, FINETUNE, info.device)
        threads = set_threads(cfg, info.device, step_flops(cfg, kind, parts))
        trainer = Trainer(cfg, parts, info.device)
        device = info.device
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        base_mib = _reset_peak(device)
        if method == "sampling":
            return _bench_sampling(trainer, steps, sync) | {"method": method, "device": str(device)}
        source = trainer.penalty.source if method == "kl_self" else None
        for _ in range(max(warmup, 1) if source is not None else warmup):
            trainer.train_step()
        if source is not None:  # whole refill periods: each step's share of sampling, not a refill more or less
            per_step = source.state_dict()["batches"] // max(warmup, 1)
            period = source.buffer // math.gcd(source.buffer, per_step)
            steps, refills = -(-steps // period) * period, source.refills
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        sync()
        seconds = (time.perf_counter() - start) / steps
        tokens = cfg.data.batch_size * trainer.data.seq_len
        counts = parts.model.num_params()
        result = {"method": method, "kind": kind, "device": str(device), "threads": threads,
                  "ms_per_step": seconds * 1e3, "tokens_per_s": tokens / seconds, "batch": cfg.data.batch_size,
                  "seq_len": trainer.data.seq_len, "replay_rows": cfg.replay.batch_size if method != "plain" else 0,
                  "params": counts["actual"], "model": model or "built-in GPT " + "x".join(
                      str(getattr(cfg.model, k)) for k in ("d_model", "n_layers", "head_dim", "context"))}
        if source is not None:
            result.update(timed_steps=steps, refills=source.refills - refills, buffer=source.buffer)
        result.update(_peak(device, base_mib))
        if kind == "gpt":
            result.update(_limit_fields(trainer, cfg, method, seconds, device))
        if device.type == "cpu":
            result["processor"] = cpu_description()
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
            flops = 6 * counts["actual"] * tokens / seconds
            result.update(gpu=name, tflops=flops / 1e12, mfu=flops / peak if peak else None)
        return result


def _bench_sampling(trainer, rounds: int, sync) -> dict:
    source = trainer.penalty.source
    per_refill = source.rows_per_refill * (source.length - source.prompt_length)
    source.sample_refill(0)  # compilation / warm-up
    sync()
    source.sample_seconds = 0.0
    for i in range(rounds):
        source.sample_refill(i + 1)
    return {"sampled_tokens_per_s": rounds * per_refill / source.sample_seconds,
            "sequences_per_refill": source.rows_per_refill, "length": source.length, "decode": source.decode}


def _reset_peak(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2 ** 20
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _rss_mib("VmRSS")


def _peak(device: torch.device, base: Optional[float]) -> dict:
    if device.type == "cuda":
        peak, how = torch.cuda.max_memory_allocated(device) / 2 ** 20, "cuda_max_allocated"
    elif base is not None and _rss_mib("VmHWM") is not None:
        peak, how = _rss_mib("VmHWM"), "rss_peak"
    else:
        peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_lifetime_peak"
    return {"peak_mib": peak, "step_mib": peak - base if base is not None else None, "memory_method": how}


def _in_child(queue, *args) -> None:
    try:
        queue.put(("ok", bench_method(*args)))
    except BaseException as e:  # report it to the parent rather than dying silently
        queue.put(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))


def _isolated(*args) -> dict:
    """:func:`bench_method` in a fresh process (clean allocator and peak counters)."""
    import multiprocessing as mp
    import queue as queue_lib

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_in_child, args=(queue, *args))
    process.start()
    try:
        while True:  # a child that dies before reporting (killed, out of memory) must not hang the parent
            try:
                status, value = queue.get(timeout=1.0)
                break
            except queue_lib.Empty:
                if not process.is_alive():
                    status, value = "error", f"the benchmark process exited with code {process.exitcode}"
                    break
    finally:
        process.join()
    if status != "ok":
        raise SelfReplayError(f"bench {args[0]}: {value}")
    return value


def cpu_description() -> str:
    """The CPU's model name and the SIMD level of torch's kernels here (e.g. "AMD EPYC, AVX2"): timings and the
    last digits of results differ between CPUs, so a benchmark says which one it ran on."""
    name = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:  # not Linux
        pass
    return ", ".join(x for x in (name, torch.backends.cpu.get_cpu_capability()) if x)


def run_bench(methods: Sequence[str], model: Optional[str] = None, overrides: Sequence[str] = (), steps: int = 5,
              warmup: int = 2, isolate: bool = True, rounds: int = 1) -> list[dict]:
    """Benchmark each method; ``overrides`` are finetuning ``key=value`` settings. With ``rounds`` > 1 the methods
    run that many times, interleaved in alternating order (a machine's drift lands on every method alike): each
    result is the median round's, with every round's time and ratios beside it (:func:`_combine_rounds`)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SelfReplayError(f"bench --methods: {', '.join(unknown) or 'none given'}; expected some of "
                              f"{', '.join(METHODS)}")
    if steps < 1 or warmup < 0:
        raise SelfReplayError(f"bench: steps={steps}, warmup={warmup}: need steps >= 1 and warmup >= 0")
    if not 1 <= rounds <= MAX_ROUNDS:
        raise SelfReplayError(f"bench --rounds={rounds}: expected 1 to {MAX_ROUNDS}")
    if model is not None:
        from selfreplay.models.hf import require_hf

        require_hf("transformers")
    from selfreplay.progress import progress

    bar = progress(len(methods) * rounds, "bench", "runs" if rounds > 1 else "methods", every_s=0.0)
    by_method: dict[str, list[dict]] = {m: [] for m in methods}
    for i in range(rounds):
        for m in (methods if i % 2 == 0 else list(reversed(methods))):
            args = (m, model, list(overrides), steps, warmup)
            by_method[m].append(_isolated(*args) if isolate else bench_method(*args))
            bar.update(1)
    bar.close()
    return _combine_rounds(by_method)


def _combine_rounds(by_method: dict[str, list[dict]]) -> list[dict]:
    """One result per method: its median round (the lower middle one), with every round's figure in run order
    (``rounds_ms_per_step`` or ``rounds_sampled_tokens_per_s``) and the median of the ratios of step times taken in
    the same round: against plain (``time_vs_plain``) and, for kl_self, against kl_real (``time_vs_kl_real``)."""
    def key(method: str) -> str:
        return "sampled_tokens_per_s" if method == "sampling" else "ms_per_step"

    median_round = {m: dict(sorted(runs, key=lambda r: r[key(m)])[(len(runs) - 1) // 2])
                    for m, runs in by_method.items()}
    plain = median_round.get("plain")
    results = []
    for method, runs in by_method.items():
        result = median_round[method]
        if len(runs) > 1:
            result["rounds_" + key(method)] = [r[key(method)] for r in runs]
        if method == "sampling":
            results.append(result)
            continue
        bases = {"time_vs_plain": "plain", **({"time_vs_kl_real": "kl_real"} if method == "kl_self" else {})}
        for name, base in bases.items():
            if base in by_method:
                ratios = [r["ms_per_step"] / b["ms_per_step"] for r, b in zip(runs, by_method[base])]
                result[name] = float(np.median(ratios))
                if len(runs) > 1:
                    result["rounds_" + name] = ratios
        if plain is not None:
            result["memory_vs_plain"] = result["step_mib"] / plain["step_mib"] if plain.get("step_mib") else None
        results.append(result)
    return results


def format_bench(results: list[dict]) -> str:
    """A plain-text table, and a line saying what was measured."""
    head = (f"{'method':<9} {'ms/step':>9} {'tokens/s':>11} {'x plain':>8} {'peak MiB':>9} {'step MiB':>9} {'MFU':>6} "
            f"{'GFLOP/s':>8} {'% matmul':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        if r["method"] == "sampling":
            by_round = r.get("rounds_sampled_tokens_per_s")
            lines.append(f"sampling: {r['sampled_tokens_per_s']:,.0f} sampled tokens/s ({r['sequences_per_refill']} "
                         f"sequences x {r['length']} tokens per refill, decode {r['decode']})" + (
                             "" if by_round is None else
                             "; by round: " + ", ".join(f"{x:,.0f}" for x in by_round) + " (the median shown)"))
            continue
        rel, step, mfu = r.get("time_vs_plain"), r.get("step_mib"), r.get("mfu")
        gflops, share = r.get("gflops"), r.get("of_matmul")
        lines.append(f"{r['method']:<9} {r['ms_per_step']:>9.1f} {r['tokens_per_s']:>11,.0f} "
                     f"{(f'{rel:.2f}' if rel else '-'):>8} {r['peak_mib']:>9,.0f} "
                     f"{(f'{step:,.0f}' if step is not None else '-'):>9} {(f'{mfu:.1%}' if mfu else '-'):>6} "
                     f"{(f'{gflops:,.1f}' if gflops else '-'):>8} {(f'{share:.0%}' if share else '-'):>8}")
    timed = next((r for r in results if "ms_per_step" in r), None)
    if timed:
        chip = timed.get("processor") or timed.get("gpu")
        where = timed["device"] + (f" ({chip})" if chip else "")
        lines.append(f"{timed['model']} ({timed['params']:,} params) on {where}, {timed['threads']} "
                     f"thread(s); batch {timed['batch']} x {timed['seq_len']} tokens, replay rows "
                     f"{max(r.get('replay_rows', 0) for r in results)}; memory: {timed['memory_method']}")
        sampled = next((r for r in results if "refills" in r), None)
        if sampled:
            lines.append(f"kl_self: timed over {sampled['timed_steps']} steps with {sampled['refills']} refill(s) of "
                         f"replay.buffer={sampled['buffer']} batches (whole refill periods)")
        rounds = [r for r in results if "rounds_ms_per_step" in r]
        if rounds:
            lines.append(f"median of {len(rounds[0]['rounds_ms_per_step'])} rounds (methods interleaved, alternating "
                         f"order; 'x plain': the median of same-round ratios); ms/step by round: " + "; ".join(
                             f"{r['method']} " + ", ".join(f"{t:,.0f}" for t in r["rounds_ms_per_step"])
                             for r in rounds))
        self_kl = next((r for r in results if "time_vs_kl_real" in r), None)
        if self_kl:
            by_round = self_kl.get("rounds_time_vs_kl_real")
            ratio = f"{self_kl['time_vs_kl_real']:.2f}"
            if by_round is not None:
                ratio = ", ".join(f"{x:.2f}" for x in by_round) + f" by round (median {ratio})"
            lines.append(f"kl_self / kl_real: {ratio}")
        if timed.get("matmul_gflops"):
            lines.append(f"% matmul: the step's model FLOPs per second against an fp32 {timed['matmul_size']}^2 matmul "
                         f"in the same process ({timed['matmul_gflops']:,.1f} GFLOP/s)")
    return "\n".join(lines)
