"""`selfreplay generate` from a Hugging Face model: the same replay-corpus format and stream as the built-in GPT's,
read back for training by `finetune` and by the TRL trainer."""

import numpy as np
import pytest

pytest.importorskip("transformers")

from conftest import one_line_error, run_cli as run  # noqa: E402
from hf_fixtures import tiny_llama, tiny_tokenizer  # noqa: E402

from selfreplay.data.corpus import Corpus  # noqa: E402
from selfreplay.errors import SelfReplayError  # noqa: E402
from selfreplay.models.core import CausalLM, Teacher  # noqa: E402
from selfreplay.models.hf import HF_ADAPTER  # noqa: E402
from selfreplay.replay.prompts import Prompts, tokenizer_prompt  # noqa: E402
from selfreplay.replay.sources import SelfGeneratedReplay, StoredReplay  # noqa: E402
from selfreplay.replay.store import generate_replay  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return CausalLM(tiny_llama(len(tok), seed=1), HF_ADAPTER)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok, model):
    d = tmp_path_factory.mktemp("tiny_llama")
    model.net.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    return str(d)


def _bos(tok) -> Prompts:
    return Prompts([tokenizer_prompt(tok, "bos")])


def test_rows_are_the_trainers_replay_stream(tmp_path, tok, model):
    out = tmp_path / "replay"
    meta = generate_replay(model, out, 6, _bos(tok), 10, batch_size=4, seed=3, show_progress=False)
    assert meta.sequence_length == 10 and not (tmp_path / "replay.partial").exists()
    rows = np.asarray(Corpus.open(out).tokens).reshape(6, 10)
    assert (rows[:, 0] == tok.bos_token_id).all()
    # chunk i is refill i of the trainer's self-generated replay with buffer x batch_size = batch_size
    stream = SelfGeneratedReplay(Teacher(model), _bos(tok), batch_size=4, length=10, buffer=1, seed=3,
                                 keep_targets=False)
    assert np.array_equal(rows[:4], stream.sample_refill(0).tokens.numpy())
    assert np.array_equal(rows[4:], stream.sample_refill(1).tokens[:2].numpy())
    assert not np.array_equal(rows[0], rows[1])  # sampled, not greedy copies


def test_interrupted_generation_resumes_to_the_same_rows(tmp_path, tok, model, monkeypatch):
    reference = tmp_path / "reference"
    generate_replay(model, reference, 5, _bos(tok), 8, batch_size=2, show_progress=False)
    original = SelfGeneratedReplay.sample_refill

    def crash_on_second_chunk(self, index):
        if index == 1:
            raise KeyboardInterrupt
        return original(self, index)

    out = tmp_path / "resumed"
    monkeypatch.setattr(SelfGeneratedReplay, "sample_refill", crash_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        generate_replay(model, out, 5, _bos(tok), 8, batch_size=2, show_progress=False)
    assert not out.exists() and (tmp_path / "resumed.partial" / "chunk_000000.npz").is_file()
    monkeypatch.setattr(SelfGeneratedReplay, "sample_refill", original)
    with pytest.raises(SelfReplayError) as e:  # other settings: refuse to mix the chunks
        generate_replay(model, out, 5, _bos(tok), 8, batch_size=2, seed=9, show_progress=False)
    one_line_error(e, "interrupted run", "seed")
    generate_replay(model, out, 5, _bos(tok), 8, batch_size=2, show_progress=False)
    assert (out / "tokens.bin").read_bytes() == (reference / "tokens.bin").read_bytes()


def test_a_multi_token_prompt_is_masked_when_replayed(tmp_path, tok, model):
    prompt = tokenizer_prompt(tok, "bos") + [5, 6, 7]  # as a chat template's prefix would be
    generate_replay(model, tmp_path / "chat", 4, Prompts([prompt]), len(prompt) + 4, show_progress=False)
    batch = StoredReplay(tmp_path / "chat", 4, shuffle=False).next_batch()
    assert batch.tokens[:, :len(prompt)].tolist() == [prompt] * 4
    assert not batch.loss_mask[:, :len(prompt)].any() and batch.loss_mask[:, len(prompt):].all()


def test_reading_replay_back_checks_the_vocabulary(tmp_path, tok, model):
    generate_replay(model, tmp_path / "r", 2, _bos(tok), 6, show_progress=False)
    with pytest.raises(SelfReplayError) as e:
        StoredReplay(tmp_path / "r", 1, vocab_size=3)
    one_line_error(e, "vocab")


def test_cli_generate_from_a_model_directory(tmp_path, model_dir, capsys):
    out = tmp_path / "cli_replay"
    code, stdout, err = run(["generate", model_dir, "--out", str(out), "--num-sequences", "3", "--length", "8",
                             "--batch-size", "2", "--device", "cpu", "--text", str(tmp_path / "samples.jsonl")],
                            capsys)
    assert code == 0, err
    assert "3 sequences of 8 tokens" in stdout and Corpus.open(out).meta.sequence_length == 8
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 3
    for argv, message in [
        (["generate", "--out", str(tmp_path / "x"), "--num-sequences", "1"], "give the MODEL"),
        (["generate", str(tmp_path / "no_model"), "--out", str(tmp_path / "x"), "--num-sequences", "1"],
         "no_model"),
        (["generate", model_dir, "--domain", "1", "--out", str(tmp_path / "x"), "--num-sequences", "1"],
         "--domain"),
    ]:
        code, _, err = run(argv, capsys)
        assert code == 2 and message in err, err


def test_replay_corpus_feeds_finetuning_and_the_trl_trainer(tmp_path, tok, model, model_dir, hf_files):
    pytest.importorskip("trl")
    from datasets import Dataset

    from selfreplay.config import FINETUNE, TrainConfig, load_config
    from selfreplay.integrations.trl import SelfReplayConfig, SelfReplaySFTTrainer
    from selfreplay.train import train

    generate_replay(model, tmp_path / "replay", 8, _bos(tok), 10, show_progress=False)
    cfg = load_config(TrainConfig, [], [f"model.model_name_or_path={model_dir}", f"data.train={hf_files['chat']}",
                                        f"run_dir={tmp_path / 'ft'}", "data.seq_len=64", "data.valid_examples=8",
                                        "data.batch_size=4", "replay.batch_size=4", f"replay.source={tmp_path}/replay",
                                        "stop.steps=2", "eval.every_steps=2", "log.progress=false",
                                        "optim.lr=3e-2", "optim.warmup_tokens=0"])
    # step 1's replay KL is at the teacher's own weights (0); after one update at lr 3e-2 the student has moved,
    # so the mean over the two steps is far above rounding (the HF defaults' warmup would keep it at ~1e-10)
    assert train(cfg, FINETUNE)["train_replay"] > 1e-3
    args = SelfReplayConfig(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                            logging_steps=1, learning_rate=3e-2, max_length=16, report_to="none", use_cpu=True,
                            save_strategy="no", disable_tqdm=True, replay_source=str(tmp_path / "replay"),
                            replay_batch_size=4)
    student = tiny_llama(len(tok), seed=1)
    trainer = SelfReplaySFTTrainer(model=student, args=args, processing_class=tok,
                                   train_dataset=Dataset.from_dict({"text": ["hello how are you"] * 8}))
    trainer.train()
    logs = [h["replay_loss"] for h in trainer.state.log_history if "replay_loss" in h]
    assert isinstance(trainer.penalty.source.inner, StoredReplay) and len(logs) == 2
    assert abs(logs[0]) < 1e-5 < logs[1]  # the student starts as the teacher, then moves away
