"""Shared fixtures: two tiny synthetic "languages" as tokenized corpora, tiny-model run configs, tiny Hugging
Face model directories, and an in-process CLI runner."""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from selfreplay.data.corpus import CorpusMeta, write_corpus

# Tiny models: one thread per test process is fastest (and avoids oversubscribing the cores under xdist); runs
# deciding their threads by the rule (selfreplay.threads) see one free core, without measuring the machine's load.
torch.set_num_threads(1)
os.environ.setdefault("SELFREPLAY_FREE_CORES", "1")

VOCAB = 64
TEXT_IDS = np.arange(11, VOCAB)  # ids 0-9 are domain tokens, 10 is EOS


def one_line_error(excinfo, *words: str) -> str:
    """Assert a raised error's message is one line containing every word; return it."""
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def markov_tokens(seed: int, n: int) -> np.ndarray:
    """A stream from a sparse random Markov chain: learnable structure, different per seed ("language")."""
    rng = np.random.default_rng(seed)
    k = len(TEXT_IDS)
    successors = rng.integers(0, k, size=(k, 3))
    out = np.empty(n, dtype=np.int64)
    state = 0
    choices = rng.integers(0, 3, size=n)
    noise = rng.random(n) < 0.05
    random_states = rng.integers(0, k, size=n)
    for i in range(n):
        state = random_states[i] if noise[i] else successors[state, choices[i]]
        out[i] = TEXT_IDS[state]
    return out


def make_corpus(path: Path, seed: int, domain: int, n: int = 30_000, vocab: int = VOCAB,
                fingerprint: str = "synthetic-v1") -> str:
    meta = CorpusMeta(num_tokens=0, dtype="uint16", vocab_size=vocab, tokenizer_fingerprint=fingerprint,
                      domain_token=domain, eos_token=10, source=["synthetic"], name=path.name)
    write_corpus(markov_tokens(seed, n), path, meta)
    return str(path)


@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("corpora")
    return {"en": make_corpus(root / "en", seed=1, domain=0), "es": make_corpus(root / "es", seed=2, domain=1)}


def tiny_overrides(run_dir, train: str, **extra) -> list[str]:
    """A model and schedule small enough for a step in a few milliseconds on one CPU core.

    Finetuning: pass ``**{"model.model_name_or_path": run}`` (``init_from=run`` is still accepted here and
    translated, for tests written against the old key). Finetuning defaults to replay.method=kl: a test meaning
    plain finetuning passes ``**{"replay.method": "none"}``.
    """
    base = {"run_dir": run_dir, "data.train": train, "model.d_model": 32, "model.n_layers": 1, "model.head_dim": 16,
            "model.context": 16, "model.vocab_size": VOCAB, "data.batch_size": 16, "data.valid_tokens": 600,
            "optim.warmup_tokens": 0, "optim.lr": 3e-3, "eval.every_tokens": 16 * 16 * 10, "log.progress": False,
            "replay.batch_size": 8}
    if "init_from" in extra:
        extra["model.model_name_or_path"] = extra.pop("init_from")
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def pretrained(corpora, tmp_path_factory) -> str:
    """A tiny model pretrained on the "en" corpus (shared by finetuning tests)."""
    from selfreplay.config import TrainConfig, load_config
    from selfreplay.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "pretrain"
    train(load_config(TrainConfig, [], tiny_overrides(run_dir, corpora["en"], **{"stop.steps": 150})), "pretrain")
    return str(run_dir)


def run_cli(argv, capsys):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    from selfreplay.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_chat_jsonl(path, n=160, seed=0):
    """Synthetic chats: 'add a and b' -> 'the answer is a+b' (only the replies are targets)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"add {a} and {b}"},
                                             {"role": "assistant", "content": f"the answer is {a + b}"}]}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    """(test_train_hf, test_distributed, ...) Local model directories (tiny Llama and Qwen2 + tokenizer, saved with save_pretrained) and chat data."""
    from hf_fixtures import tiny_llama, tiny_qwen2, tiny_tokenizer

    root = tmp_path_factory.mktemp("hf")
    tok = tiny_tokenizer()
    for name, build in (("llama", tiny_llama), ("qwen2", tiny_qwen2)):
        build(len(tok), seed=0).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    text = root / "old.jsonl"  # "previous distribution" plain text for real-data replay
    text.write_text("".join(json.dumps({"text": f"Once upon a time there was a model number {i}."}) + "\n"
                            for i in range(40)))
    return {"llama": str(root / "llama"), "qwen2": str(root / "qwen2"), "chat": write_chat_jsonl(root / "chat.jsonl"),
            "text": str(text)}


@pytest.fixture
def full_disk(tmp_path):
    """A directory on its own 64 KiB tmpfs: a real filesystem that fills up (mounting it needs root)."""
    import subprocess

    mount = tmp_path / "small_fs"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                              text=True)
    except OSError as e:
        pytest.skip(f"a real full disk needs `mount -t tmpfs`: {e}")
    if done.returncode:
        pytest.skip(f"a real full disk needs `mount -t tmpfs` (root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def fill_disk(directory) -> None:
    """Fill the filesystem of ``directory`` (a ``full_disk``) to the last page with one file."""
    import errno

    with open(Path(directory) / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
