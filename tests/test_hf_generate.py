"""`selfreplay generate --model`: replay corpora sampled from a Hugging Face model, read back for training."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from conftest import one_line_error, run_cli as run  # noqa: E402
from hf_fixtures import tiny_llama, tiny_tokenizer  # noqa: E402

from selfreplay.errors import SelfReplayError  # noqa: E402
from selfreplay.hf_generate import (generate_hf_replay_corpus, is_replay_corpus, load_replay_corpus,  # noqa: E402
                                    load_replay_rows)
from selfreplay.hf_model import Teacher  # noqa: E402
from selfreplay.hf_replay import HFSelfReplay  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok), seed=1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok, model):
    d = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return str(d)


def test_rows_are_the_trainers_replay_stream(tmp_path, tok, model):
    out = tmp_path / "replay"
    info = generate_hf_replay_corpus(model, tok, out, num_sequences=6, length=10, batch_size=4, seed=3,
                                     progress=False)
    assert is_replay_corpus(out) and not (tmp_path / "replay.partial").exists()
    assert info["num_sequences"] == 6 and info["length"] == 10 and info["prompt_ids"] == [tok.bos_token_id]
    rows = load_replay_corpus(out, vocab_size=len(tok))
    assert rows.input_ids.shape == (6, 10) and rows.input_ids.dtype == torch.long
    assert (rows.input_ids[:, 0] == tok.bos_token_id).all()
    assert not rows.loss_mask[:, 0].any() and rows.loss_mask[:, 1:].all()
    # chunk i is refill i of the trainer's self-generated replay with buffer x batch_size = batch_size
    stream = HFSelfReplay(Teacher(model), tok, batch_size=4, length=10, buffer=1, seed=3, keep_logprobs="never")
    assert torch.equal(rows.input_ids[:4], stream.sample_refill(0)[0])
    assert torch.equal(rows.input_ids[4:], stream.sample_refill(1)[0][:2])
    assert not torch.equal(rows.input_ids[0], rows.input_ids[1])  # sampled, not greedy copies


def test_interrupted_generation_resumes_to_the_same_rows(tmp_path, tok, model, monkeypatch):
    reference = tmp_path / "reference"
    generate_hf_replay_corpus(model, tok, reference, num_sequences=5, length=8, batch_size=2, progress=False)

    original = HFSelfReplay.sample_refill

    def crash_on_second_chunk(self, index):
        if index == 1:
            raise KeyboardInterrupt
        return original(self, index)

    out = tmp_path / "resumed"
    monkeypatch.setattr(HFSelfReplay, "sample_refill", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        generate_hf_replay_corpus(model, tok, out, num_sequences=5, length=8, batch_size=2, progress=False)
    assert not out.exists() and (tmp_path / "resumed.partial" / "chunk_000000.npz").is_file()
    monkeypatch.setattr(HFSelfReplay, "sample_refill", original)
    with pytest.raises(SelfReplayError) as e:  # other settings: refuse to mix the chunks
        generate_hf_replay_corpus(model, tok, out, num_sequences=5, length=8, batch_size=2, seed=9, progress=False)
    one_line_error(e, "interrupted run", "seed")
    generate_hf_replay_corpus(model, tok, out, num_sequences=5, length=8, batch_size=2, progress=False)
    for name in ("input_ids.npy", "loss_mask.npy"):
        assert np.array_equal(np.load(out / name), np.load(reference / name))
    with pytest.raises(SelfReplayError) as e:
        generate_hf_replay_corpus(model, tok, out, num_sequences=5, length=8, progress=False)
    one_line_error(e, "already exists")


def test_chat_prompt_is_masked(tmp_path, tok, model):
    from selfreplay.hf_replay import prompt_ids_for

    prompt = prompt_ids_for(tok, "chat")
    generate_hf_replay_corpus(model, tok, tmp_path / "chat", num_sequences=2, length=len(prompt) + 4,
                              prompt="chat", progress=False)
    rows = load_replay_corpus(tmp_path / "chat")
    assert rows.input_ids[:, :len(prompt)].tolist() == [prompt, prompt]
    assert not rows.loss_mask[:, :len(prompt)].any() and rows.loss_mask[:, len(prompt):].all()


def test_reading_replay_back_checks_the_vocabulary_and_other_sources(tmp_path, tok, model):
    generate_hf_replay_corpus(model, tok, tmp_path / "r", num_sequences=2, length=6, progress=False)
    with pytest.raises(SelfReplayError) as e:
        load_replay_corpus(tmp_path / "r", vocab_size=3)
    one_line_error(e, "outside the model's vocabulary")
    with pytest.raises(SelfReplayError) as e:
        load_replay_corpus(tmp_path)
    one_line_error(e, "replay.json")
    # any other source goes through hf_data: a file, or in-memory records
    (tmp_path / "old.jsonl").write_text('{"text": "Once upon a time there was a tiny language model."}\n')
    from_file = load_replay_rows(str(tmp_path / "old.jsonl"), tok, 8)
    from_records = load_replay_rows([{"text": "Once upon a time there was a tiny language model."}], tok, 8)
    assert torch.equal(from_file.input_ids, from_records.input_ids) and from_file.input_ids.shape[1] == 8


def test_cli_generate_from_a_model_directory(tmp_path, model_dir, capsys):
    out = tmp_path / "cli_replay"
    code, stdout, err = run(["generate", "--model", model_dir, "--out", str(out), "--num-sequences", "3",
                             "--length", "8", "--batch-size", "2", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "3 sequences of 8 tokens" in stdout and load_replay_corpus(out).input_ids.shape == (3, 8)
    for argv, message in [
        (["generate", "somewhere", "--model", model_dir, "--out", str(tmp_path / "x"), "--num-sequences", "1"],
         "CHECKPOINT"),
        (["generate", "--out", str(tmp_path / "x"), "--num-sequences", "1"], "give CHECKPOINT"),
        (["generate", "--model", str(tmp_path / "no_model"), "--out", str(tmp_path / "x"), "--num-sequences", "1"],
         "no_model"),
    ]:
        code, _, err = run(argv, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, err


def test_replay_corpus_feeds_the_trl_trainer(tmp_path, tok, model):
    pytest.importorskip("trl")
    from datasets import Dataset

    from selfreplay.hf_generate import RowReplay
    from selfreplay.trl_trainer import SelfReplayConfig, SelfReplaySFTTrainer

    generate_hf_replay_corpus(model, tok, tmp_path / "replay", num_sequences=8, length=10, progress=False)
    args = SelfReplayConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                            logging_steps=1, learning_rate=3e-2, max_length=16, report_to="none", use_cpu=True,
                            save_strategy="no", disable_tqdm=True, replay_source=str(tmp_path / "replay"),
                            replay_batch_size=4)
    student = tiny_llama(len(tok), seed=1)
    trainer = SelfReplaySFTTrainer(model=student, args=args, processing_class=tok,
                                   train_dataset=Dataset.from_dict({"text": ["hello how are you"] * 8}))
    trainer.train()
    logs = [h["replay_loss"] for h in trainer.state.log_history if "replay_loss" in h]
    assert isinstance(trainer.replay, RowReplay) and len(logs) == 2
    assert abs(logs[0]) < 1e-5 < logs[1]  # the student starts as the teacher, then moves away
