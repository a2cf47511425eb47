"""End to end through the command line: tokenizer -> tokenize -> pretrain -> finetune -> eval / generate."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_cli as run
from selfreplay.cli import main
from selfreplay.config import FINETUNE, PRETRAIN, TrainConfig, config_keys, describe_config

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
        code, out, err = run(["finetune", f"run_dir={d / name}", f"model.model_name_or_path={d / 'pre'}",
                              f"data.train={d / 'es'}", "stop.steps=30", f"replay.method={method}", *TINY], capsys)
        assert code == 0, err
        assert "forgetting=" in out and f"saved {d / name}" in out
    code, out, _ = run(["eval", str(d / "plain"), str(d / "kl"), "--corpus", str(d / "en"), "--corpus", str(d / "es"),
                        "--json", str(d / "report.json")], capsys)
    assert code == 0 and "KL(teacher||model)" in out
    report = json.loads((d / "report.json").read_text())
    rows = {(r["model"].split("/")[-1], r["data"]): r for r in report}
    assert set(rows) == {(m, c) for m in ("plain", "kl") for c in ("en", "es")}
    for r in report:  # scored against the model each run started from
        assert r["teacher"] == str(d / "pre") or r["teacher"].endswith("/pre")
        assert r["delta"] == pytest.approx(r["loss"] - r["teacher_loss"]) and r["kl"] >= 0
    assert rows[("plain", "en")]["delta"] > rows[("kl", "en")]["delta"]  # KL replay forgets less
    assert rows[("plain", "es")]["delta"] < 0 and rows[("kl", "es")]["delta"] < 0  # both learn Spanish


def test_generate_then_finetune_on_the_stored_replay(workspace, capsys):
    d = workspace
    code, out, err = run(["generate", str(d / "pre"), "--out", str(d / "replay"), "--num-sequences", "16",
                          "--batch-size", "8", "--logprobs-top-k", "8"], capsys)
    assert code == 0 and "16 sequences" in out, err
    code, out, _ = run(["replay-stats", str(d / "replay"), "--teacher", str(d / "pre"), "--real", str(d / "en")],
                       capsys)
    assert code == 0 and "distinct" in out
    assert "teacher_nll" in json.loads((d / "replay-stats.json").read_text())
    code, out, err = run(["finetune", f"run_dir={d / 'stored'}", f"model.model_name_or_path={d / 'pre'}",
                          f"data.train={d / 'es'}", "stop.steps=5", "replay.method=kl",
                          f"replay.source={d / 'replay'}", *TINY], capsys)
    assert code == 0, err
    info = json.loads((d / "stored" / "run.json").read_text())
    assert info["replay"] == {"method": "kl", "source": str(d / "replay")}
    code, out, err = run(["finetune", f"run_dir={d / 'self'}", f"model.model_name_or_path={d / 'pre'}",
                          f"data.train={d / 'es'}", "stop.steps=5", "replay.method=kl", "replay.source=self", *TINY],
                         capsys)
    assert code == 0, err
    assert json.loads((d / "self" / "run.json").read_text())["replay"]["source"] == "self"


def test_resume_through_the_cli(workspace, tmp_path, capsys):
    """An interrupted run continues with `finetune --resume run_dir=...` (its saved config.yaml) to the same
    weights as an uninterrupted one."""
    import torch

    from selfreplay.config import load_config
    from selfreplay.models.builtin import load_gpt_run
    from selfreplay.train import train

    d = workspace

    def args(name):
        return [f"run_dir={tmp_path / name}", f"model.model_name_or_path={d / 'pre'}", f"data.train={d / 'es'}",
                "stop.steps=6", "checkpoint.every_steps=2", *TINY]

    code, _, err = run(["finetune", *args("straight")], capsys)
    assert code == 0, err

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_config(TrainConfig, [], args("resumed")), FINETUNE, on_step=interrupt)
    code, _, err = run(["finetune", *args("resumed")], capsys)  # without --resume: refused
    assert code == 2 and "already holds a run" in err and "--resume" in err and err.count("\n") == 1
    # stop.max_time only bounds the test's time should the resumed run not stop at stop.steps
    code, out, err = run(["finetune", "--resume", f"run_dir={tmp_path / 'resumed'}", "stop.max_time=30"], capsys)
    assert code == 0, err
    assert "steps=6" in out and "stop_reason=length" in out
    a, b = load_gpt_run(tmp_path / "straight").state_dict(), load_gpt_run(tmp_path / "resumed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = run(["finetune", "--resume", f"run_dir={tmp_path / 'resumed'}", "optim.lr=1"], capsys)
    assert code == 2 and err.count("\n") == 1  # nothing left to resume
    code, _, err = run(["finetune", "--resume"], capsys)
    assert code == 2 and "--resume: give run_dir" in err


@pytest.mark.parametrize("argv, message", [
    (["tokenize", "missing.txt", "--tokenizer", "tok.json", "--out", "x", "--domain-token", "0"],
     "tok.json: tokenizer file not found"),
    (["pretrain", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["pretrain", "data.train=x", "run_dir=r", "stop.steps=3", "stop.tokens=5"], "conflicting length criteria"),
    (["pretrain", "data.train=x", "run_dir=r"], "no stop criterion"),
    (["pretrain", "nope.yaml"], "config file nope.yaml: not found"),
    (["finetune", "init_from=nowhere", "data.train=x", "run_dir=r", "stop.steps=1"],
     "'init_from' has moved to 'model.model_name_or_path'"),
    (["finetune", "model.model_name_or_path=./nowhere", "data.train=x", "run_dir=r", "stop.steps=1"],
     "./nowhere: not found"),
    (["finetune", "data.train=x", "run_dir=r", "stop.steps=1"], "model.model_name_or_path"),
    (["pretrain", "data.train=x", "run_dir=r", "stop.steps=1", "replay.method=kl"], "replay needs a teacher"),
    (["eval", "./nowhere", "--corpus", "x"], "./nowhere: not found"),  # a path, not a hub id
    (["eval", "--corpus", "x"], "give the models"),
    (["generate", "--out", "x", "--num-sequences", "2"], "give the MODEL"),
    (["bench", "--methods", "fast"], "fast"),
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
    assert code == 2 and "vocab" in err and err.count("\n") == 1
    code, _, err = run(["pretrain", f"run_dir={tmp_path / 'r2'}", f"data.train={d / 'en'}", "stop.steps=1",
                        *TINY, "model.context=100000"], capsys)
    assert code == 2 and "too short" in err and err.count("\n") == 1
    code, _, err = run(["finetune", f"run_dir={tmp_path / 'r3'}", f"model.model_name_or_path={d / 'pre'}",
                        f"data.train={tmp_path / 'missing'}", "stop.steps=1", *TINY], capsys)
    assert code == 2 and "missing" in err and "not found" in err and err.count("\n") == 1


@pytest.mark.parametrize("command", [PRETRAIN, FINETUNE])
def test_help_lists_every_config_key(command):
    out = subprocess.run([sys.executable, "-m", "selfreplay", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    described = describe_config(TrainConfig, command)
    keys = [line.split("=")[0] for line in described.splitlines() if "=" in line]
    assert keys and set(keys) <= set(config_keys(TrainConfig))
    for key in keys:
        assert f"{key}=" in out.stdout, key
    for key in ("stop.target_loss=None", "optim.schedule='constant'", "data.batch_size=None"):
        assert key in out.stdout
    if command == FINETUNE:
        for key in ("replay.coeff=None", "replay.divergence='forward_kl'", "model.model_name_or_path=None"):
            assert key in out.stdout
        assert "model.d_model=" not in out.stdout  # the built-in GPT's shape comes from the checkpoint
    else:
        assert "model.d_model=256" in out.stdout and "replay." not in out.stdout


@pytest.mark.parametrize("argv", [["--help"], ["finetune", "--help"], ["bench", "--help"]])
def test_help_does_not_import_torch(argv):
    code = ("import sys\nfrom selfreplay.cli import main\ntry:\n    main(%r)\nexcept SystemExit as e:\n"
            "    assert not e.code, e.code\nprint('TORCH' if 'torch' in sys.modules else 'NO TORCH')\n" % argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "NO TORCH"
    assert "Usage:" in out.stdout


def test_eval_self_refuses_a_domain_that_is_not_a_domain_token(workspace, capsys):
    pre = str(workspace / "pre")
    code, _, err = run(["eval", pre, "--teacher", pre, "--self", "4", "--domain", "42"], capsys)
    assert code == 2 and err == "error: eval --domain=[42]: the built-in GPT's domain tokens are ids 0..9\n"
    code, _, err = run(["generate", pre, "--out", str(workspace / "unused"), "--num-sequences", "4", "--domain", "42"],
                       capsys)
    assert code == 2 and err == "error: generate --domain=[42]: the built-in GPT's domain tokens are ids 0..9\n"


@pytest.mark.parametrize("text", ["g", "g/samples.jsonl"])
def test_generate_text_may_not_be_the_corpus_directory(workspace, tmp_path, capsys, text):
    out = tmp_path / "g"
    code, _, err = run(["generate", str(workspace / "pre"), "--out", str(out), "--num-sequences", "4", "--text",
                        str(tmp_path / text)], capsys)
    assert code == 2 and f"--text={tmp_path / text}: would be written into the corpus directory --out={out}" in err
    assert list(tmp_path.iterdir()) == []  # refused before sampling: nothing written


def test_resume_says_what_is_missing(tmp_path, capsys):
    code, _, err = run(["pretrain", "--resume", f"run_dir={tmp_path / 'gone'}"], capsys)
    assert code == 2 and err == f"error: --resume: run_dir {tmp_path / 'gone'}: not found (no such directory)\n"
    (tmp_path / "run").mkdir()
    code, _, err = run(["pretrain", "--resume", f"run_dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and err.startswith(f"error: --resume: {tmp_path / 'run' / 'config.yaml'}: not found (the run's "
                                        f"saved config); give the run's config files and overrides again")
    code, _, err = run(["pretrain", "--resume", "run_dir="], capsys)
    assert code == 2 and err == "error: --resume: give run_dir=<the interrupted run's directory>\n"
    code, _, err = run(["pretrain", "run_dir=", "data.train=x", "stop.steps=1"], capsys)
    assert code == 2 and err.startswith("error: override 'run_dir=': run_dir needs a value") and err.count("\n") == 1
