"""``selfreplay bench-hf``: speed and peak memory of one Hugging Face finetuning step, plain vs KL replay.

Each step kind is a real :meth:`HFTrainer.train_step` on random-token data (packed rows of ``seq_len``):
- ``plain``: next-token loss only (no teacher in memory with full finetuning);
- ``kl_real``: plus KL(teacher || model) on ``replay_rows`` rows of stored (random) data: a teacher forward;
- ``kl_self``: the same on rows sampled by the teacher from BOS with a KV cache. With ``replay.buffer=1`` (the
  default here) every step samples its own rows, so the time per step includes the sampling and the peak includes
  the KV cache and the kept sampling log-probs (``replay.max_logprobs_gib``).

Peak memory per kind, measured over the warm-up and timed steps: on CUDA ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``; on CPU the peak resident set size (``VmHWM`` of /proc/self/status, reset through
/proc/self/clear_refs). ``step_mib`` is that peak minus the memory held once the trainer is built (weights,
teacher), so it is what a step adds: activations, logits chunks, gradients and the AdamW state (allocated at the
first step). With ``isolate`` every kind runs in a fresh process, so no kind inherits another's allocator pools.

The model is a hub id, a local directory, or a named architecture of :data:`ARCHITECTURES` (random weights, built
locally with a word-level tokenizer of the same vocabulary size).
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from selfreplay.errors import SelfReplayError

STEP_KINDS = ("plain", "kl_real", "kl_self")

# Llama shapes (random weights). llama-1b is Llama-3.2-1B's; llama-small has its 128k vocabulary on a small body, so
# that the logits dominate memory as they do at scale; llama-tiny is for tests.
_LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                 max_position_embeddings=131072)
ARCHITECTURES = {
    "llama-1b": _LLAMA_1B,
    "llama-small": dict(_LLAMA_1B, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4, intermediate_size=1024),
    "llama-tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=64, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=2048),
}
_SPECIALS = ("<s>", "</s>", "<pad>")


def build_architecture(name: str, out_dir: Path, seed: int = 0) -> str:
    """Save a random-weight Llama of a named shape and a word-level tokenizer of its vocabulary to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if name not in ARCHITECTURES:
        raise SelfReplayError(f"bench-hf: unknown architecture {name!r}; expected a hub id, a local directory or one "
                              f"of {', '.join(ARCHITECTURES)}")
    shape = ARCHITECTURES[name]
    vocab = {**{s: i for i, s in enumerate(_SPECIALS)},
             **{f"w{i}": i for i in range(len(_SPECIALS), shape["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def write_random_text(tokenizer, path: Path, tokens: int, seed: int = 0) -> str:
    """A .jsonl of text records that decode random non-special token ids (about ``tokens`` tokens in all)."""
    special = set(tokenizer.all_special_ids)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(tokenizer), (tokens,), generator=generator).tolist()
    ids = [i for i in ids if i not in special]
    with open(path, "w") as f:
        for start in range(0, len(ids), 256):
            f.write(json.dumps({"text": tokenizer.decode(ids[start:start + 256])}) + "\n")
    return str(path)


def _rss_mib(field: str) -> Optional[float]:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (None where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def bench_step_kind(kind: str, model: str, data: str, steps: int, warmup: int, overrides: Sequence[str]) -> dict:
    """Time ``steps`` optimizer steps of one kind after ``warmup`` untimed ones; their peak memory."""
    from selfreplay.config import load_config
    from selfreplay.hf_trainer import HFTrainConfig, HFTrainer

    replay = {"plain": ["replay.method=none"], "kl_real": ["replay.method=kl", f"replay.source={data}"],
              "kl_self": ["replay.method=kl", "replay.source=self"]}[kind]
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(HFTrainConfig, [], [f"model_name_or_path={model}", f"data.train={data}",
                                              f"run_dir={run_dir}", "data.valid_rows=1", "optim.warmup_tokens=0",
                                              "replay.buffer=1", "log.progress=false", *overrides, *replay,
                                              f"stop.steps={steps + warmup}"])
        trainer = HFTrainer(cfg)
        cuda = trainer.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(trainer.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(trainer.device)
            base = torch.cuda.memory_allocated(trainer.device) / 2 ** 20
        else:
            base = _rss_mib("VmRSS")
            clean_peak = _reset_peak_rss()
        for _ in range(warmup):
            trainer.train_step()
        if cuda:
            torch.cuda.synchronize(trainer.device)
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        if cuda:
            torch.cuda.synchronize(trainer.device)
        seconds = (time.perf_counter() - start) / max(steps, 1)
        if cuda:
            peak, method = torch.cuda.max_memory_allocated(trainer.device) / 2 ** 20, "cuda_max_allocated"
        elif clean_peak and _rss_mib("VmHWM") is not None:
            peak, method = _rss_mib("VmHWM"), "rss_peak"
        else:  # no /proc: the lifetime peak, loading included
            peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_lifetime_peak"
        tokens = cfg.batch_size * cfg.data.seq_len
        return {"kind": kind, "device": str(trainer.device), "ms_per_step": seconds * 1e3,
                "tokens_per_s": tokens / seconds if seconds > 0 else None, "batch_size": cfg.batch_size,
                "seq_len": cfg.data.seq_len, "replay_rows": 0 if kind == "plain" else cfg.replay.batch_size,
                "loss_chunk_size": cfg.loss_chunk_size, "lora_r": cfg.lora.r, "params": trainer.num_params,
                "trainable_params": trainer.trainable_params, "peak_mib": peak,
                "step_mib": peak - base if base is not None else None, "memory_method": method}


def _bench_in_child(queue, *args) -> None:
    try:
        queue.put(("ok", bench_step_kind(*args)))
    except BaseException as e:  # report it to the parent rather than dying silently
        queue.put(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))


def _bench_isolated(*args) -> dict:
    """:func:`bench_step_kind` in a fresh process (clean allocator and peak counters)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_bench_in_child, args=(queue, *args))
    process.start()
    import queue as queue_lib

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
        raise SelfReplayError(f"bench-hf {args[0]}: {value}")
    return value


def run_hf_bench(model: str, kinds: Sequence[str] = STEP_KINDS, batch_size: int = 8, seq_len: int = 256,
                 replay_rows: int = 4, lora_r: int = 0, chunk_size: int = 1024, steps: int = 5, warmup: int = 2,
                 device: str = "auto", isolate: bool = True, overrides: Sequence[str] = ()) -> list[dict]:
    """Benchmark each step kind; ``overrides`` are further HFTrainConfig ``key=value`` settings."""
    from selfreplay.hf_model import load_tokenizer, require_hf

    require_hf("transformers")
    unknown = [k for k in kinds if k not in STEP_KINDS]
    if unknown or not kinds:
        raise SelfReplayError(f"bench-hf --kinds: {', '.join(unknown) or 'none given'}; expected some of "
                              f"{', '.join(STEP_KINDS)}")
    if steps < 1 or warmup < 0:
        raise SelfReplayError(f"bench-hf: steps={steps}, warmup={warmup}: need steps >= 1 and warmup >= 0")
    settings = [f"batch_size={batch_size}", f"data.seq_len={seq_len}", f"replay.batch_size={replay_rows}",
                f"lora.r={lora_r}", f"loss_chunk_size={chunk_size}", f"device={device}",
                *overrides]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if model in ARCHITECTURES:
            model = build_architecture(model, root / "model")
        tokenizer = load_tokenizer(model)
        data = write_random_text(tokenizer, root / "random.jsonl", (batch_size + 4) * (seq_len + 1) * 2)
        args = [(kind, model, data, steps, warmup, settings) for kind in kinds]
        results = [_bench_isolated(*a) if isolate else bench_step_kind(*a) for a in args]
    plain = next((r for r in results if r["kind"] == "plain"), None)
    for r in results:
        r["time_vs_plain"] = r["ms_per_step"] / plain["ms_per_step"] if plain else None
        r["memory_vs_plain"] = r["step_mib"] / plain["step_mib"] if plain and plain["step_mib"] else None
    return results


def format_hf_bench(results: list[dict]) -> str:
    """A plain-text table: time, tokens/s and peak memory per step kind."""
    head = f"{'kind':<8} {'ms/step':>9} {'tokens/s':>10} {'x plain':>8} {'peak MiB':>9} {'step MiB':>9}"
    lines = [head, "-" * len(head)]
    for r in results:
        rel = r.get("time_vs_plain")
        step = r.get("step_mib")
        lines.append(f"{r['kind']:<8} {r['ms_per_step']:>9.1f} {r['tokens_per_s']:>10,.0f} "
                     f"{(f'{rel:.2f}' if rel else '-'):>8} {r['peak_mib']:>9,.0f} "
                     f"{(f'{step:,.0f}' if step is not None else '-'):>9}")
    if results:
        r = results[0]
        lines.append(f"device {r['device']}, batch {r['batch_size']} x {r['seq_len']} tokens, replay rows "
                     f"{max(x['replay_rows'] for x in results)}, loss chunk {r['loss_chunk_size']}, "
                     f"{'LoRA r=' + str(r['lora_r']) if r['lora_r'] else 'full finetuning'}, "
                     f"{r['params']:,} params; memory: {r['memory_method']}")
    return "\n".join(lines)

