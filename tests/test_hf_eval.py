"""`selfreplay eval --model`: loss, accuracy and KL on data files, multiple choice, for Hugging Face models."""

import copy
import importlib
import json

import pytest
import torch

pytest.importorskip("transformers")

from conftest import run_cli as run  # noqa: E402
from hf_fixtures import tiny_llama, tiny_tokenizer  # noqa: E402

from selfreplay.hf_data import prepare_hf_data  # noqa: E402
from selfreplay.hf_eval import evaluate_hf, score_rows  # noqa: E402
from selfreplay.hf_model import Teacher  # noqa: E402

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
    return {"dir": d, "tok": tok, "student": student, "teacher": teacher}


def _reference(model, teacher_model, rows):
    """Loss, accuracy, teacher loss and KL from full logits over the target tokens (independent of score_rows)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=rows.input_ids).logits.float(), -1)[:, :-1]
        t_logp = torch.log_softmax(teacher_model(input_ids=rows.input_ids).logits.float(), -1)[:, :-1]
    targets, mask = rows.input_ids[:, 1:], rows.loss_mask[:, 1:]
    nll = -logp.gather(-1, targets[..., None])[..., 0][mask]
    t_nll = -t_logp.gather(-1, targets[..., None])[..., 0][mask]
    kl = (t_logp.exp() * (t_logp - logp)).sum(-1)[mask]
    acc = (logp.argmax(-1) == targets)[mask].float()
    return {"loss": nll.mean().item(), "teacher_loss": t_nll.mean().item(), "kl": kl.mean().item(),
            "accuracy": acc.mean().item(), "tokens": int(mask.sum())}


def test_scores_match_a_full_logits_computation(files):
    tok, student, teacher = files["tok"], files["student"], files["teacher"]
    rows = prepare_hf_data(str(files["dir"] / "chats.jsonl"), tok, seq_len=12)
    assert len(rows) >= 3 and not rows.loss_mask.all()  # several rows, user turns masked out
    got = score_rows(student, rows, Teacher(teacher), batch_size=2, chunk_size=5)  # uneven batches and chunks
    want = _reference(student, teacher, rows)
    assert got["tokens"] == want["tokens"]
    for key in ("loss", "teacher_loss", "kl", "accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert got["delta"] == pytest.approx(want["loss"] - want["teacher_loss"], rel=1e-4)
    assert got["kl"] > 0.01
    same = score_rows(student, rows, Teacher(copy.deepcopy(student)), batch_size=4)
    assert abs(same["kl"]) < 1e-6 and abs(same["delta"]) < 1e-6 and same["loss"] == pytest.approx(got["loss"])


def test_multiple_choice_rows(files):
    from selfreplay.multiple_choice import load_questions, multiple_choice_accuracy

    tok, student = files["tok"], files["student"]
    report = evaluate_hf(student, tok, mcq=[str(files["dir"] / "mcq.jsonl")], batch_size=2)
    (row,) = report["mcq"]
    direct = multiple_choice_accuracy(student, tok, load_questions(str(files["dir"] / "mcq.jsonl")), chat=True)
    assert row["n"] == 3 and row["format"] == "chat" and row["accuracy"] == direct["accuracy"]
    plain = evaluate_hf(student, tok, mcq=[str(files["dir"] / "mcq.jsonl")], mcq_format="plain")["mcq"][0]
    assert plain["format"] == "plain"


def test_cli_eval_model_against_teacher(files, tmp_path, capsys):
    d = files["dir"]
    out_json = tmp_path / "report.json"
    code, out, err = run(["eval", "--model", str(d / "student"), "--teacher", str(d / "teacher"),
                          "--data", str(d / "chats.jsonl"), "--mcq", str(d / "mcq.jsonl"), "--seq-len", "12",
                          "--device", "cpu", "--json", str(out_json)], capsys)
    assert code == 0, err
    assert "KL(teacher||model)" in out and "accuracy" in out and "mcq.jsonl" in out
    report = json.loads(out_json.read_text())
    rows = prepare_hf_data(str(d / "chats.jsonl"), files["tok"], seq_len=12)
    want = _reference(files["student"], files["teacher"], rows)
    (data_row,) = report["data"]
    assert data_row["kl"] == pytest.approx(want["kl"], rel=1e-4) and data_row["teacher"] == str(d / "teacher")
    assert report["mcq"][0]["n"] == 3


@pytest.mark.parametrize("argv, message", [
    (["eval"], "give CHECKPOINTS"),
    (["eval", "some_run"], "--corpus is required"),
    (["eval", "some_run", "--corpus", "c", "--data", "x.jsonl"], "--data need --model"),
    (["eval", "some_run", "--model", "m"], "not both"),
])
def test_cli_eval_bad_combinations(argv, message, capsys):
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_cli_eval_model_needs_something_to_evaluate_and_lm_eval_installed(files, capsys):
    d = files["dir"]
    code, _, err = run(["eval", "--model", str(d / "student"), "--device", "cpu"], capsys)
    assert code == 2 and "nothing to evaluate" in err
    try:
        importlib.import_module("lm_eval")
    except ImportError:
        code, _, err = run(["eval", "--model", str(d / "student"), "--device", "cpu", "--lm-eval", "arc_easy"],
                           capsys)
        assert code == 2 and err.startswith("error: --lm-eval: lm-evaluation-harness is not installed")
        assert err.count("\n") == 1
