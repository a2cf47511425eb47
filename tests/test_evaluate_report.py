"""`selfreplay eval` (selfreplay.evaluate.report): loss, accuracy, delta and KL against a teacher on text / chat
files (Hugging Face models) and on token corpora (built-in GPT runs), multiple choice, and the one-line errors."""

import dataclasses
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import make_corpus
from conftest import run_cli as run
from selfreplay.data.batch import Batch

pytest.importorskip("transformers")

from hf_fixtures import tiny_llama, tiny_tokenizer  # noqa: E402
from selfreplay.data.rows import make_rows  # noqa: E402
from selfreplay.data.text import tokenize_source  # noqa: E402
from selfreplay.evaluate.metrics import score  # noqa: E402
from selfreplay.evaluate.report import benchmark_report, forgetting_report  # noqa: E402
from selfreplay.models.core import CausalLM, Teacher  # noqa: E402
from selfreplay.models.hf import HF_ADAPTER  # noqa: E402

SEQ_LEN = 64  # chats are one example per row
CHATS = [
    {"messages": [{"role": "user", "content": "Which animal barks?"},
                  {"role": "assistant", "content": "The dog barks. A small model learns to speak."}]},
    {"messages": [{"role": "user", "content": "What colour is the sky?"},
                  {"role": "assistant", "content": "The sky is blue, I am fine thank you."}]},
    {"messages": [{"role": "user", "content": "hello how are you"},
                  {"role": "assistant", "content": "I am fine thank you very much. Once upon a time."}]},
]
QUESTIONS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Madrid", "Berlin"], "answer": 0},
    {"question": "Which animal barks?", "choices": ["cat", "dog", "fish", "bird"], "answer": "B"},
    {"question": "What colour is the sky?", "choices": ["green", "red", "blue", "yellow"], "answer": 2},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_eval")
    tok = tiny_tokenizer()
    student, teacher = tiny_llama(len(tok), seed=1), tiny_llama(len(tok), seed=2)
    for name, m in (("student", student), ("teacher", teacher)):
        m.save_pretrained(str(d / name))
        tok.save_pretrained(str(d / name))
    (d / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHATS))
    (d / "mcq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QUESTIONS))
    return {"dir": d, "tok": tok, "student": student, "teacher": teacher,
            "student_dir": str(d / "student"), "teacher_dir": str(d / "teacher"), "chats": str(d / "chats.jsonl"),
            "mcq": str(d / "mcq.jsonl")}


def _logits(net, tokens):
    """The network's own forward: the built-in GPT returns logits, a transformers model an output object."""
    from selfreplay.models.gpt import GPT

    return (net(tokens) if isinstance(net, GPT) else net(input_ids=tokens).logits).float()


def _error(err: str) -> str:
    """The CLI's error: one line starting with 'error: ' (progress bars of model loading may come before it)."""
    assert "error: " in err, err
    line = err[err.index("error: "):]
    assert line.count("\n") == 1 and line.endswith("\n"), err
    return line


def _reference(model, teacher_model, batches: list[Batch]) -> dict:
    """Loss, second-half loss, accuracy, teacher loss and KL from full logits over the target tokens (independent
    of score's chunked head_fn path)."""
    sums = dict(nll=0.0, half=0.0, n_half=0.0, correct=0.0, t_nll=0.0, kl=0.0, n=0.0)
    for b in batches:
        with torch.no_grad():
            logp = F.log_softmax(_logits(model, b.tokens), -1)[:, :-1]
            t_logp = F.log_softmax(_logits(teacher_model, b.tokens), -1)[:, :-1]
        targets, mask = b.tokens[:, 1:], b.mask()[:, 1:].bool()
        T = b.tokens.shape[1]
        half = torch.zeros_like(mask)
        half[:, T // 2 - 1:] = True  # target positions >= T // 2
        nll = -logp.gather(-1, targets[..., None])[..., 0]
        t_nll = -t_logp.gather(-1, targets[..., None])[..., 0]
        kl = (t_logp.exp() * (t_logp - logp)).sum(-1)
        sums["nll"] += nll[mask].sum().item()
        sums["half"] += nll[mask & half].sum().item()
        sums["n_half"] += (mask & half).sum().item()
        sums["t_nll"] += t_nll[mask].sum().item()
        sums["kl"] += kl[mask].sum().item()
        sums["correct"] += (logp.argmax(-1) == targets)[mask].float().sum().item()
        sums["n"] += mask.sum().item()
    n = sums["n"]
    return {"loss": sums["nll"] / n, "loss_second_half": sums["half"] / sums["n_half"], "teacher_loss":
            sums["t_nll"] / n, "kl": sums["kl"] / n, "accuracy": sums["correct"] / n, "tokens": n}


def _chat_batches(files, batch_size) -> list[Batch]:
    examples, fmt = tokenize_source(files["chats"], files["tok"])
    rows = make_rows(examples, SEQ_LEN, files["tok"].pad_token_id, "none")
    assert len(rows) == 3 and not rows.loss_mask.all()  # one row per chat, user turns masked out
    return [rows.batch(torch.arange(s, min(s + batch_size, len(rows)))) for s in range(0, len(rows), batch_size)]


def _close(got: dict, want: dict, keys=("loss", "loss_second_half", "accuracy", "teacher_loss", "kl")):
    for key in keys:
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


# --- Hugging Face models on text / chat records ------------------------------------------------------------------

@pytest.mark.parametrize("chunk_size", [None, 5])
def test_score_matches_a_full_logits_computation(files, chunk_size):
    student, teacher = CausalLM(files["student"], HF_ADAPTER), CausalLM(files["teacher"], HF_ADAPTER)
    batches = _chat_batches(files, batch_size=2)  # uneven batches (2 + 1 rows), rows of different lengths
    got = score(student, batches, Teacher(teacher), chunk_size=chunk_size)
    want = _reference(files["student"], files["teacher"], batches)
    _close(got, want)
    assert got["kl"] > 0.01
    same = score(student, batches, Teacher.frozen_copy(student), chunk_size=chunk_size)
    assert abs(same["kl"]) < 1e-6 and same["teacher_loss"] == pytest.approx(same["loss"], rel=1e-6)
    assert same["loss"] == pytest.approx(got["loss"], rel=1e-6)
    alone = score(student, batches)  # without a teacher: no kl / teacher_loss
    assert "kl" not in alone and alone["loss"] == pytest.approx(got["loss"], rel=1e-6)


def test_forgetting_report_rows_of_a_data_file(files):
    rows = forgetting_report([files["student_dir"]], data=[files["chats"]], teacher=files["teacher_dir"],
                             batch_size=2, seq_len=SEQ_LEN, device="cpu", show_progress=False)
    want = _reference(files["student"], files["teacher"], _chat_batches(files, batch_size=2))
    (row,) = rows
    assert row["model"] == files["student_dir"] and row["data"] == files["chats"]
    assert row["teacher"] == files["teacher_dir"]
    _close(row, want)
    assert row["delta"] == pytest.approx(want["loss"] - want["teacher_loss"], rel=1e-4)
    # max_tokens: about that many tokens, whole batches
    first = forgetting_report([files["student_dir"]], data=[files["chats"]], batch_size=1, max_tokens=1,
                              seq_len=SEQ_LEN, device="cpu", show_progress=False)[0]
    assert first["loss"] == pytest.approx(_reference(files["student"], files["teacher"],
                                                     _chat_batches(files, batch_size=1)[:1])["loss"], rel=1e-4)
    assert "kl" not in first and "delta" not in first  # no teacher given, none recorded


def test_multiple_choice_rows(files):
    from selfreplay.evaluate.multiple_choice import load_questions, multiple_choice_accuracy

    report = benchmark_report(files["student_dir"], mcq=[files["mcq"]], batch_size=2, device="cpu")
    (row,) = report["mcq"]
    direct = multiple_choice_accuracy(files["student"], files["tok"], load_questions(files["mcq"]), chat=True)
    assert row["n"] == 3 and row["format"] == "chat" and row["accuracy"] == direct["accuracy"]
    assert row["model"] == files["student_dir"] and row["mcq"] == files["mcq"]
    plain = benchmark_report(files["student_dir"], mcq=[files["mcq"]], mcq_format="plain", device="cpu")["mcq"][0]
    direct_plain = multiple_choice_accuracy(files["student"], files["tok"], load_questions(files["mcq"]))
    assert plain["format"] == "plain" and plain["accuracy"] == direct_plain["accuracy"]


def test_cli_eval_model_against_teacher(files, tmp_path, capsys):
    out_json = tmp_path / "report.json"
    code, out, err = run(["eval", files["student_dir"], "--teacher", files["teacher_dir"], "--data", files["chats"],
                          "--seq-len", str(SEQ_LEN), "--batch-size", "2", "--device", "cpu", "--json",
                          str(out_json)], capsys)
    assert code == 0, err
    for column in ("loss", "accuracy", "teacher loss", "delta", "KL(teacher||model)"):
        assert column in out
    (row,) = json.loads(out_json.read_text())
    want = _reference(files["student"], files["teacher"], _chat_batches(files, batch_size=2))
    _close(row, want)
    assert row["teacher"] == files["teacher_dir"] and f"{row['delta']:+.4f}" in out
    # --model is the same as MODELS
    code, out2, err = run(["eval", "--model", files["student_dir"], "--teacher", files["teacher_dir"], "--data",
                           files["chats"], "--seq-len", str(SEQ_LEN), "--batch-size", "2", "--device", "cpu"], capsys)
    assert code == 0, err
    assert out2 == out


def test_cli_eval_mcq(files, tmp_path, capsys):
    code, out, err = run(["eval", files["student_dir"], "--mcq", files["mcq"], "--device", "cpu"], capsys)
    assert code == 0, err
    assert "mcq.jsonl" in out and "accuracy" in out and "chat" in out
    out_json = tmp_path / "both.json"
    code, out, err = run(["eval", files["student_dir"], "--teacher", files["teacher_dir"], "--data", files["chats"],
                          "--mcq", files["mcq"], "--seq-len", str(SEQ_LEN), "--device", "cpu", "--json",
                          str(out_json)], capsys)
    assert code == 0, err
    assert "KL(teacher||model)" in out and "mcq.jsonl" in out
    saved = out_json.read_text()
    assert "chats.jsonl" in saved  # the data rows ...
    assert "mcq.jsonl" in saved  # ... and the multiple-choice results are both in the JSON


@pytest.mark.parametrize("argv, message", [
    (["eval"], "give the models to evaluate"),
    (["eval", "some_run"], "nothing to evaluate"),
    (["eval", "some_run", "--data", "x.jsonl", "--batch-size", "0"], "--batch-size=0"),
])
def test_cli_eval_bad_arguments(argv, message, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_cli_eval_lm_eval_without_lm_eval_installed(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail even where it is installed
    code, _, err = run(["eval", files["student_dir"], "--device", "cpu", "--lm-eval", "arc_easy"], capsys)
    assert code == 2 and err.startswith("error: --lm-eval: lm-evaluation-harness is not installed"), err
    assert err.count("\n") == 1


# --- built-in GPT runs on token corpora --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt_runs(tmp_path_factory):
    """A teacher run (recording its corpus's split: 320 tokens, seed 7) and a student run started from it."""
    from selfreplay.data.corpus import Corpus, corpus_identity
    from selfreplay.models.builtin import init_gpt, save_gpt_weights
    from selfreplay.models.gpt import GPTConfig

    root = tmp_path_factory.mktemp("gpt_eval")
    corpus = make_corpus(root / "en", seed=1, domain=0, n=3000)
    shape = GPTConfig(d_model=32, n_layers=1, head_dim=16, context=16, vocab_size=64)
    meta = Corpus.open(corpus).meta
    record = {"path": os.path.abspath(corpus), "name": "en", "identity": corpus_identity(meta),
              "domain_token": 0, "valid_tokens": 320, "split_seed": 7}
    runs = {}
    for name, seed, info in (("teacher", 0, {"kind": "pretrain", "train_corpus": record}),
                             ("student", 1, {"kind": "finetune", "init_from": str(root / "teacher")})):
        d = root / name
        d.mkdir()
        net = init_gpt(shape, seed)
        save_gpt_weights(net, d / "model.safetensors")
        (d / "run.json").write_text(json.dumps({"model": dataclasses.asdict(shape), "tokenizer_fingerprint":
                                                "synthetic-v1", **info}))
        runs[name], runs[name + "_net"] = str(d), net.eval()
    runs["corpus"] = corpus
    return runs


def _corpus_batches(corpus, valid_tokens, split_seed, batch_size=8) -> list[Batch]:
    from selfreplay.data.corpus import Corpus
    from selfreplay.data.loader import CorpusLoader

    loader = CorpusLoader(Corpus.open(corpus), 16, 1, valid_tokens, split_seed)
    return list(loader.valid_batches(batch_size))


def test_cli_eval_builtin_run_on_its_corpus(gpt_runs, tmp_path, capsys):
    out_json = tmp_path / "gpt.json"
    code, out, err = run(["eval", gpt_runs["student"], "--corpus", gpt_runs["corpus"], "--batch-size", "8",
                          "--device", "cpu", "--json", str(out_json)], capsys)
    assert code == 0, err
    for column in ("loss", "accuracy", "teacher loss", "delta", "KL(teacher||model)"):
        assert column in out
    (row,) = json.loads(out_json.read_text())
    # the teacher is the run's init_from, the split the one the teacher's run recorded for the corpus
    batches = _corpus_batches(gpt_runs["corpus"], 320, 7)
    assert sum(len(b) for b in batches) == 22  # ceil(320 / 15) held-out sequences
    want = _reference(gpt_runs["student_net"], gpt_runs["teacher_net"], batches)
    assert row["teacher"] == gpt_runs["teacher"] and row["data"] == "en"
    _close(row, want)
    assert row["delta"] == pytest.approx(want["loss"] - want["teacher_loss"], rel=1e-4)
    # an explicit split: the same numbers for the recorded one, others for another seed
    same = forgetting_report([gpt_runs["student"]], [gpt_runs["corpus"]], teacher=gpt_runs["teacher"],
                             valid_tokens=320, split_seed=7, batch_size=8, device="cpu", show_progress=False)[0]
    assert same["loss"] == pytest.approx(row["loss"], rel=1e-6)
    other = forgetting_report([gpt_runs["student"]], [gpt_runs["corpus"]], valid_tokens=320, split_seed=8,
                              batch_size=8, device="cpu", show_progress=False)[0]
    _close(other, _reference(gpt_runs["student_net"], gpt_runs["teacher_net"],
                             _corpus_batches(gpt_runs["corpus"], 320, 8)))


@pytest.mark.parametrize("cache_mb", [1024, 0])
def test_models_scored_against_one_teacher_share_its_side_of_the_sums(gpt_runs, monkeypatch, cache_mb):
    """The models are scored batch by batch: the teacher runs once per held-out batch for all of them, also when
    its side of the sums would not fit a cache (262k held-out tokens at a 4k vocabulary are 4 GiB)."""
    from selfreplay.evaluate import report
    from selfreplay.models.core import Teacher

    monkeypatch.setattr(report, "TEACHER_CACHE_MB", cache_mb)
    forwards = []
    original = Teacher.hidden_and_head
    monkeypatch.setattr(Teacher, "hidden_and_head", lambda self, *a, **k: forwards.append(1) or original(self, *a, **k))
    student, teacher = gpt_runs["student"], gpt_runs["teacher"]
    rows = forgetting_report([student, teacher, student], [gpt_runs["corpus"]], teacher=teacher, batch_size=8,
                             device="cpu", show_progress=False)
    assert len(forwards) == 3  # the 3 held-out batches, once for the three models
    assert rows[0] == rows[2]
    _close(rows[0], _reference(gpt_runs["student_net"], gpt_runs["teacher_net"], _corpus_batches(
        gpt_runs["corpus"], 320, 7)))
    assert rows[1]["kl"] == 0.0 and rows[1]["delta"] == 0.0  # the teacher against itself: exactly 0


def test_cli_eval_wrong_kind_of_data_or_teacher(files, gpt_runs, capsys):
    cases = [
        (["eval", files["student_dir"], "--corpus", gpt_runs["corpus"]], "token corpora"),
        (["eval", gpt_runs["student"], "--data", files["chats"]], "built-in GPT"),
        (["eval", gpt_runs["student"], "--mcq", files["mcq"]], "built-in GPT"),
        (["eval", files["student_dir"], "--teacher", gpt_runs["teacher"], "--data", files["chats"]], "vocabulary"),
    ]
    for argv, message in cases:
        code, _, err = run(argv + ["--device", "cpu"], capsys)
        assert code == 2 and message in _error(err), (argv, err)
