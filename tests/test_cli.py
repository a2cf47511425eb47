"""End to end through the command line: tokenizer -> tokenize -> pretrain -> finetune -> eval / generate."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_cli as run
from selfreplay.cli import main

WORDS = {"en": "the of and to a in that it was he for on with as his at by had".split(),
         "es": "el la de que y en los se del las un por con una su para es al".split()}


def write_text(path, lang, lines=1500, seed=0):
    rng = np.random.default_rng(seed)
    words = WORDS[lang]
    path.write_text("\n".join(" ".join(rng.choice(words, size=rng.integers(5, 15))) for _ in range(lines)) + "\n")
    return str(path)


TINY = ["model.d_model=32", "model.n_layers=1", "model.head_dim=16", "model.context=16", "model.vocab_size=320",
        "data.batch_size=8", "data.valid_tokens=300", "optim.warmup_tokens=0", "optim.lr=3e-3",
        "eval.every_tokens=1000", "log.progress=false", "replay.batch_size=4", "replay.buffer=2"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    en, es = write_text(d / "en.txt", "en"), write_text(d / "es.txt", "es", seed=1)
    assert main(["tokenizer", "train", en, es, "--out", str(d / "tok.json"), "--vocab-size", "320"]) is None
    for lang, domain, src in (("en", 0, en), ("es", 1, es)):
        main(["tokenize", src, "--tokenizer", str(d / "tok.json"), "--out", str(d / lang),
              "--domain-token", str(domain)])
    main(["pretrain", f"run_dir={d / 'pre'}", f"data.train={d / 'en'}", "stop.steps=60", *TINY])
    return d


def test_pipeline_pretrain_finetune_eval(workspace, capsys):
    d = workspace
    for name, method in (("plain", "none"), ("kl", "kl")):
        code, out, _ = run(["finetune", f"run_dir={d / name}", f"init_from={d / 'pre'}", f"data.train={d / 'es'}",
                            "stop.steps=30", f"replay.method={method}", *TINY], capsys)
        assert code == 0 and "forgetting=" in out
    code, out, _ = run(["eval", str(d / "plain"), str(d / "kl"), "--corpus", str(d / "en"), "--corpus", str(d / "es"),
                        "--json", str(d / "report.json")], capsys)
    assert code == 0 and "KL(teacher||model)" in out
    rows = {(r["checkpoint"].split("/")[-1], r["corpus"]): r for r in json.loads((d / "report.json").read_text())}
    assert rows[("plain", "en")]["delta"] > rows[("kl", "en")]["delta"]  # KL replay forgets less
    assert rows[("plain", "es")]["delta"] < 0 and rows[("kl", "es")]["delta"] < 0  # both learn Spanish


def test_generate_then_finetune_on_the_stored_replay(workspace, capsys):
    d = workspace
    code, out, _ = run(["generate", str(d / "pre"), "--out", str(d / "replay"), "--num-sequences", "16",
                        "--batch-size", "8", "--logprobs-top-k", "8"], capsys)
    assert code == 0 and "16 sequences" in out
    code, out, _ = run(["replay-stats", str(d / "replay"), "--teacher", str(d / "pre"), "--real", str(d / "en")], capsys)
    assert code == 0 and "distinct" in out
    assert "teacher_nll" in json.loads((d / "replay-stats.json").read_text())
    code, out, err = run(["finetune", f"run_dir={d / 'stored'}", f"init_from={d / 'pre'}", f"data.train={d / 'es'}",
                          "stop.steps=5", "replay.method=kl", f"replay.source={d / 'replay'}", *TINY], capsys)
    assert code == 0, err
    code, out, err = run(["finetune", f"run_dir={d / 'self'}", f"init_from={d / 'pre'}", f"data.train={d / 'es'}",
                          "stop.steps=5", "replay.method=kl", "replay.source=self", *TINY], capsys)
    assert code == 0, err


@pytest.mark.parametrize("argv, message", [
    (["tokenize", "missing.txt", "--tokenizer", "tok.json", "--out", "x", "--domain-token", "0"], "tok.json: tokenizer file not found"),
    (["pretrain", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["pretrain", "data.train=x", "run_dir=r", "stop.steps=3", "stop.tokens=5"], "conflicting length criteria"),
    (["pretrain", "data.train=x", "run_dir=r"], "no stop criterion"),
    (["pretrain", "nope.yaml"], "config file nope.yaml: not found"),
    (["finetune", "init_from=nowhere", "data.train=x", "run_dir=r", "stop.steps=1"], "nowhere"),
    (["eval", "nowhere", "--corpus", "x"], "nowhere"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(argv, capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_corpus_inputs(workspace, tmp_path, capsys):
    d = workspace
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, _, err = run(["tokenize", str(empty), "--tokenizer", str(d / "tok.json"), "--out", str(tmp_path / "c"),
                        "--domain-token", "0"], capsys)
    assert code == 2 and "empty" in err and not (tmp_path / "c").exists()
    code, _, err = run(["pretrain", f"run_dir={tmp_path / 'r'}", f"data.train={d / 'en'}", "stop.steps=1",
                        *TINY, "model.vocab_size=64"], capsys)
    assert code == 2 and "vocab" in err
    code, _, err = run(["pretrain", f"run_dir={tmp_path / 'r2'}", f"data.train={d / 'en'}", "stop.steps=1",
                        *TINY, "model.context=100000"], capsys)
    assert code == 2 and "too short" in err


def test_help_lists_every_config_key():
    out = subprocess.run([sys.executable, "-m", "selfreplay", "finetune", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for key in ("replay.coeff=10.0", "replay.divergence='forward_kl'", "stop.target_loss=None", "model.d_model=256"):
        assert key in out.stdout
