"""Replay corpora: generate -> StoredReplay round trip, resumable and deterministic generation, replay_stats."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from selfreplay.config import ModelConfig
from selfreplay.data import Corpus, CorpusMeta, write_corpus
from selfreplay.errors import SelfReplayError
from selfreplay.generate import format_replay_stats, generate_replay_corpus, replay_stats
from selfreplay.losses import next_token_loss
from selfreplay.model import GPT
from selfreplay.replay import REPLAY_INFO, SelfGeneratedReplay, StoredReplay
from selfreplay.sampling import Sampler

V, T = 64, 12


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(d_model=32, n_layers=1, head_dim=16, context=T, vocab_size=V)).eval()


def generate(model, out, n=14, **kw):
    args = dict(domains=[0, 1], batch_size=8, seed=3, tokenizer_fingerprint="fp", progress=False)
    args.update(kw)
    return generate_replay_corpus(model, out, n, **args)


def test_generated_corpus_holds_the_self_generated_stream(tmp_path):
    teacher = tiny_gpt()
    meta = generate(teacher, tmp_path / "replay", n=14, logprobs_top_k=5)
    assert (meta.sequence_length, meta.num_tokens, meta.vocab_size) == (T, 14 * T, V)
    live = SelfGeneratedReplay(teacher, domains=[0, 1], batch_size=4, buffer=2, seed=3, logprobs_top_k=5)
    batches = [live.next_batch() for _ in range(4)]  # two refills of 8 rows = two generation chunks
    rows = torch.cat([b.tokens for b in batches])[:14]
    values = torch.cat([b.teacher_logprobs.values for b in batches])[:14]
    indices = torch.cat([b.teacher_logprobs.indices for b in batches])[:14]

    corpus = Corpus.open(tmp_path / "replay", vocab_size=V, tokenizer_fingerprint="fp")
    assert torch.equal(torch.from_numpy(np.asarray(corpus.tokens).reshape(14, T).astype(np.int64)), rows)
    stored = StoredReplay(corpus, batch_size=2, shuffle=False)
    assert stored.has_logprobs
    for i in range(7):
        b = stored.next_batch()
        assert torch.equal(b.tokens, rows[2 * i:2 * i + 2])
        assert b.loss_mask is None
        assert torch.equal(b.teacher_logprobs.values, values[2 * i:2 * i + 2])
        assert torch.equal(b.teacher_logprobs.indices, indices[2 * i:2 * i + 2])
    plain = StoredReplay(corpus, batch_size=2, use_logprobs=False).next_batch()
    assert plain.teacher_logprobs is None
    assert not (tmp_path / "replay.partial").exists()


def test_stop_at_eos_corpus_replays_its_loss_mask(tmp_path):
    teacher = tiny_gpt()
    free = SelfGeneratedReplay(teacher, domains=[0], batch_size=8, buffer=1, seed=3).next_batch().tokens
    eos = int(torch.mode(free[:, 1:T // 2].reshape(-1)).values)
    generate(teacher, tmp_path / "eos", n=8, domains=[0], eos_id=eos)
    live = SelfGeneratedReplay(teacher, domains=[0], batch_size=8, buffer=1, seed=3, eos_id=eos).next_batch()
    stored = StoredReplay(tmp_path / "eos", batch_size=8, shuffle=False).next_batch()
    assert torch.equal(stored.tokens, live.tokens)
    assert torch.equal(stored.loss_mask, live.loss_mask) and float(live.loss_mask.mean()) < 1


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_interrupted_generate_resumes_to_a_byte_identical_corpus(tmp_path, monkeypatch):
    teacher = tiny_gpt()
    generate(teacher, tmp_path / "a" / "replay", n=20, batch_size=4, logprobs_top_k=3)

    real_sample, calls = Sampler.sample, []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_sample(self, *args, **kwargs)

    monkeypatch.setattr(Sampler, "sample", flaky)
    out = tmp_path / "b" / "replay"
    with pytest.raises(KeyboardInterrupt):
        generate(teacher, out, n=20, batch_size=4, logprobs_top_k=3)
    assert not out.exists()
    assert len(list((tmp_path / "b" / "replay.partial").glob("chunk_*.npz"))) == 2
    generate(teacher, out, n=20, batch_size=4, logprobs_top_k=3)
    assert len(calls) == 3 + 3  # only the three missing chunks were sampled
    assert _files(out) == _files(tmp_path / "a" / "replay")
    assert {"tokens.bin", "meta.json", REPLAY_INFO, "logprobs_values.npy", "logprobs_indices.npy"} <= set(
        _files(out))
    assert not (tmp_path / "b" / "replay.partial").exists()


def test_generate_refuses_existing_output_and_changed_settings(tmp_path, monkeypatch):
    teacher = tiny_gpt()
    generate(teacher, tmp_path / "done", n=4)
    with pytest.raises(SelfReplayError, match="exists"):
        generate(teacher, tmp_path / "done", n=4)

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Sampler, "sample", interrupted)
        with pytest.raises(KeyboardInterrupt):
            generate(teacher, tmp_path / "part", n=4)
    with pytest.raises(SelfReplayError, match="temperature"):
        generate(teacher, tmp_path / "part", n=4, temperature=0.5)
    generate(teacher, tmp_path / "part", n=4, temperature=0.5, resume=False)
    assert json.loads((tmp_path / "part" / REPLAY_INFO).read_text())["temperature"] == 0.5


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 0}, "num_sequences"), ({"batch_size": 0}, "batch_size"), ({"domains": [12]}, "domain"),
    ({"context": T + 1}, "context"), ({"logprobs_dtype": "int8"}, "logprobs_dtype"), ({"top_p": 2.0}, "top_p"),
])
def test_bad_generate_arguments_are_one_line_errors(tmp_path, kwargs, match):
    with pytest.raises(SelfReplayError, match=match):
        generate(tiny_gpt(), tmp_path / "x", **kwargs)


# ---------------------------------------------------------------------------------------------- replay_stats

def _write_rows(path: Path, rows, eos=None) -> Path:
    write_corpus(np.array(rows), path, CorpusMeta(0, "uint16", V, "fp", 0, eos))
    if eos is not None:
        (path / REPLAY_INFO).write_text(json.dumps({"eos_id": eos, "prompt_length": 1}))
    return path


def test_replay_stats_on_a_hand_made_corpus(tmp_path):
    replay = _write_rows(tmp_path / "replay", [[0, 11, 12, 13, 11, 12],
                                               [1, 11, 12, 14, 15, 11],
                                               [0, 20, 20, 20, 20, 20],
                                               [0, 11, 12, 13, 11, 12]])
    write_corpus(np.array([11, 12, 13, 11, 30, 20, 20, 20, 31]), tmp_path / "real",
                 CorpusMeta(0, "uint16", V, "fp", 0, 10))
    s = replay_stats(replay, real=tmp_path / "real")
    assert (s["num_sequences"], s["sequence_length"], s["sampled_tokens"]) == (4, 6, 20)
    assert s["domains"] == {"0": 0.75, "1": 0.25}
    assert s["distinct_1"] == pytest.approx(6 / 20)
    assert s["distinct_2"] == pytest.approx(7 / 16)
    assert s["distinct_3"] == pytest.approx(7 / 12)
    assert s["distinct_4"] == pytest.approx(5 / 8)
    assert s["overlap_1"] == pytest.approx(18 / 20)
    assert s["overlap_2"] == pytest.approx(13 / 16)
    assert s["overlap_3"] == pytest.approx(7 / 12)
    assert s["overlap_4"] == pytest.approx(2 / 8)
    assert s["teacher_nll"] is None
    table = format_replay_stats(s)
    assert "0: 75.0%" in table and "0.6250" in table and "0.2500" in table
    json.dumps(s)  # plain JSON-able numbers for the CLI

    # the same rows as an array: no real corpus, no overlap columns
    arr = replay_stats(np.asarray(Corpus.open(replay).tokens).reshape(4, 6))
    assert arr["distinct_4"] == pytest.approx(5 / 8) and "overlap_4" not in arr
    assert "overlap" not in format_replay_stats(arr)


def test_replay_stats_leave_out_padding_after_eos(tmp_path):
    replay = _write_rows(tmp_path / "eos", [[0, 11, 10, 0, 0, 0], [0, 11, 12, 13, 14, 15]], eos=10)
    s = replay_stats(replay)
    assert s["sampled_tokens"] == 7
    assert s["distinct_1"] == pytest.approx(6 / 7)
    assert s["distinct_2"] == pytest.approx(1.0)
    assert s["distinct_4"] == pytest.approx(1.0)  # only the full row has 4-grams: 2 of them


def test_replay_stats_teacher_nll_is_the_mean_next_token_loss(tmp_path):
    teacher = tiny_gpt()
    generate(teacher, tmp_path / "replay", n=6)
    rows = torch.from_numpy(np.asarray(Corpus.open(tmp_path / "replay").tokens).reshape(6, T).astype(np.int64))
    s = replay_stats(tmp_path / "replay", teacher=teacher, batch_size=4)
    with torch.no_grad():
        expected = float(next_token_loss(teacher(rows), rows))
    assert s["teacher_nll"] == pytest.approx(expected, rel=1e-5)
    assert s["teacher_ppl"] == pytest.approx(np.exp(expected), rel=1e-5)
    assert s["domains"] == {"0": 0.5, "1": 0.5}
    assert "teacher NLL/token" in format_replay_stats(s)
