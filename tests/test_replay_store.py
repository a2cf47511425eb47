"""Replay corpora (selfreplay.replay.store): generate -> StoredReplay round trip, resumable and deterministic
generation, refusals and bad arguments, generation from a run directory, decoded text."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import one_line_error
from selfreplay.data.corpus import Corpus
from selfreplay.errors import SelfReplayError
from selfreplay.models.builtin import RUN_INFO, WEIGHTS, save_gpt_weights, wrap_gpt
from selfreplay.models.core import Teacher
from selfreplay.models.gpt import GPT, GPTConfig
from selfreplay.replay.prompts import Prompts
from selfreplay.replay.sampling import Sampler
from selfreplay.replay.sources import REPLAY_INFO, SelfGeneratedReplay, StoredReplay
from selfreplay.replay.store import generate_from, generate_replay, weights_fingerprint, write_text

V, T = 64, 12
SHAPE = GPTConfig(d_model=32, n_layers=1, head_dim=16, context=T, vocab_size=V)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(SHAPE).eval()


def generate(net, out, n=14, domains=(0, 1), length=T, **kw):
    args = dict(batch_size=8, seed=3, tokenizer_fingerprint="fp", show_progress=False)
    args.update(kw)
    return generate_replay(wrap_gpt(net), out, n, Prompts.domains(domains, V), length, **args)


def live(net, domains=(0, 1), **kw) -> SelfGeneratedReplay:
    """The self-generated stream a training run would replay from the same teacher and seed."""
    return SelfGeneratedReplay(Teacher(wrap_gpt(net)), Prompts.domains(domains, V), length=T, seed=3, **kw)


def test_generated_corpus_holds_the_self_generated_stream(tmp_path):
    teacher = tiny_gpt()
    meta = generate(teacher, tmp_path / "replay", n=14, logprobs_top_k=5)
    assert (meta.sequence_length, meta.num_tokens, meta.vocab_size) == (T, 14 * T, V)
    stream = live(teacher, batch_size=4, buffer=2, targets_top_k=5)
    batches = [stream.next_batch() for _ in range(4)]  # two refills of 8 rows = two generation chunks
    rows = torch.cat([b.tokens for b in batches])[:14]
    values = torch.cat([b.teacher_targets.values for b in batches])[:14]
    indices = torch.cat([b.teacher_targets.indices for b in batches])[:14]

    corpus = Corpus.open(tmp_path / "replay", vocab_size=V, tokenizer_fingerprint="fp")
    assert torch.equal(torch.from_numpy(np.asarray(corpus.tokens).reshape(14, T).astype(np.int64)), rows)
    stored = StoredReplay(corpus, batch_size=2, shuffle=False)
    assert stored.has_targets
    for i in range(7):
        b = stored.next_batch()
        assert torch.equal(b.tokens, rows[2 * i:2 * i + 2])
        assert b.loss_mask is None
        assert torch.equal(b.teacher_targets.values, values[2 * i:2 * i + 2])
        assert torch.equal(b.teacher_targets.indices, indices[2 * i:2 * i + 2])
    plain = StoredReplay(corpus, batch_size=2, use_targets=False).next_batch()
    assert plain.teacher_targets is None
    assert not (tmp_path / "replay.partial").exists()
    info = json.loads((tmp_path / "replay" / REPLAY_INFO).read_text())
    assert info["prompts"] == [[0], [1]] and info["prompt_length"] == 1 and info["logprobs_top_k"] == 5
    assert info["teacher_sha256"] == weights_fingerprint(wrap_gpt(teacher)) and info["seed"] == 3
    assert info["decode"] == "eager" and info["device"] == "cpu"


def test_float16_logprobs_and_k_capped_at_the_vocabulary(tmp_path):
    generate(tiny_gpt(), tmp_path / "half", n=4, logprobs_top_k=2, logprobs_dtype="float16")
    assert np.load(tmp_path / "half" / "logprobs_values.npy").dtype == np.float16
    assert np.load(tmp_path / "half" / "logprobs_indices.npy").dtype == np.int32
    generate(tiny_gpt(), tmp_path / "all", n=2, logprobs_top_k=V + 5)
    assert np.load(tmp_path / "all" / "logprobs_values.npy").shape == (2, T, V)
    assert json.loads((tmp_path / "all" / REPLAY_INFO).read_text())["logprobs_top_k"] == V


def test_stop_at_eos_corpus_replays_its_loss_mask(tmp_path):
    teacher = tiny_gpt()
    free = live(teacher, domains=(0,), batch_size=8, buffer=1).next_batch().tokens
    eos = int(torch.mode(free[:, 1:T // 2].reshape(-1)).values)
    meta = generate(teacher, tmp_path / "eos", n=8, domains=(0,), eos_id=eos)
    assert meta.eos_token == eos
    sampled = live(teacher, domains=(0,), batch_size=8, buffer=1, eos_id=eos).next_batch()
    stored = StoredReplay(tmp_path / "eos", batch_size=8, shuffle=False).next_batch()
    assert torch.equal(stored.tokens, sampled.tokens)
    assert torch.equal(stored.loss_mask, sampled.loss_mask) and float(sampled.loss_mask.mean()) < 1


def test_multi_token_prompts_are_masked_when_replayed(tmp_path):
    net = tiny_gpt()
    generate_replay(wrap_gpt(net), tmp_path / "chat", 4, Prompts([[1, 7, 8], [2, 7, 8]]), T, batch_size=4,
                    show_progress=False)
    meta = Corpus.open(tmp_path / "chat").meta
    assert meta.domain_token is None and meta.sequence_length == T
    b = StoredReplay(tmp_path / "chat", batch_size=4, shuffle=False).next_batch()
    assert b.tokens[:, :3].tolist() == [[1, 7, 8], [2, 7, 8]] * 2
    assert torch.all(b.loss_mask[:, :3] == 0) and torch.all(b.loss_mask[:, 3:] == 1)
    # with stop-at-EOS too: the stored rows give back the sampler's own mask
    prompts = Prompts([[1, 7, 8]])
    free = SelfGeneratedReplay(Teacher(wrap_gpt(net)), prompts, 8, T, 1, seed=3).next_batch().tokens
    eos = int(torch.mode(free[:, 3:T // 2 + 2].reshape(-1)).values)
    generate_replay(wrap_gpt(net), tmp_path / "chat_eos", 8, prompts, T, batch_size=8, seed=3, eos_id=eos,
                    show_progress=False)
    sampled = SelfGeneratedReplay(Teacher(wrap_gpt(net)), prompts, 8, T, 1, seed=3, eos_id=eos).next_batch()
    stored = StoredReplay(tmp_path / "chat_eos", batch_size=8, shuffle=False).next_batch()
    assert torch.equal(stored.tokens, sampled.tokens)
    assert torch.equal(stored.loss_mask, sampled.loss_mask) and float(sampled.loss_mask[:, 3:].mean()) < 1


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


def test_a_full_disk_while_assembling_is_one_line_and_keeps_the_chunks(full_disk):
    """The sampled chunks fit on the filesystem, the assembled corpus does not: the log-probs are written without
    a memory map (whose writes would kill the process with SIGBUS), the error names the file, the chunks stay."""
    with pytest.raises(SelfReplayError) as e:
        generate(tiny_gpt(), full_disk / "replay", n=64, batch_size=16, logprobs_top_k=6)
    one_line_error(e, "no space left on the device", str(full_disk / "replay.partial" / "corpus"), "chunks are kept")
    assert len(list((full_disk / "replay.partial").glob("chunk_*.npz"))) == 4 and not (full_disk / "replay").exists()


def test_generate_refuses_existing_output_and_changed_settings(tmp_path, monkeypatch):
    teacher = tiny_gpt()
    generate(teacher, tmp_path / "done", n=4)
    with pytest.raises(SelfReplayError) as e:
        generate(teacher, tmp_path / "done", n=4)
    one_line_error(e, "exists")

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Sampler, "sample", interrupted)
        with pytest.raises(KeyboardInterrupt):
            generate(teacher, tmp_path / "part", n=4)
    with pytest.raises(SelfReplayError) as e:
        generate(teacher, tmp_path / "part", n=4, temperature=0.5)
    one_line_error(e, "temperature", "--no-resume")
    with pytest.raises(SelfReplayError) as e:  # another teacher is another setting too
        generate(tiny_gpt(1), tmp_path / "part", n=4)
    one_line_error(e, "teacher_sha256")
    generate(teacher, tmp_path / "part", n=4, temperature=0.5, resume=False)
    assert json.loads((tmp_path / "part" / REPLAY_INFO).read_text())["temperature"] == 0.5


def test_generate_deletes_only_its_own_work_files(tmp_path, monkeypatch):
    """A <out>.partial/ that generate did not write (no job.json of ours) is refused, --no-resume included; in one of
    ours, --no-resume deletes its chunks but not what else is there; a '~' path is refused, not made here."""
    teacher = tiny_gpt()
    foreign = tmp_path / "replay.partial"
    foreign.mkdir()
    (foreign / "chunk_000000.npz").write_bytes(b"mine")
    for resume in (True, False):
        with pytest.raises(SelfReplayError) as e:
            generate(teacher, tmp_path / "replay", n=4, resume=resume)
        one_line_error(e, str(foreign), "not an interrupted selfreplay generate")
    assert [p.name for p in foreign.iterdir()] == ["chunk_000000.npz"] and not (tmp_path / "replay").exists()

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Sampler, "sample", interrupted)
        with pytest.raises(KeyboardInterrupt):
            generate(teacher, tmp_path / "ours", n=4)
    work = tmp_path / "ours.partial"
    (work / "notes.txt").write_text("keep")
    generate(teacher, tmp_path / "ours", n=4, temperature=0.5, resume=False)
    assert Corpus.open(tmp_path / "ours").meta.num_tokens == 4 * T
    assert [p.name for p in work.iterdir()] == ["notes.txt"]  # its chunks and job.json went, the note stayed

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SelfReplayError) as e:
        generate(teacher, "~/replay", n=4)
    one_line_error(e, "~/replay", "'~'")
    assert not (tmp_path / "~").exists()


def test_a_corrupt_chunk_is_a_one_line_error(tmp_path, monkeypatch):
    teacher = tiny_gpt()
    real_sample, calls = Sampler.sample, []

    def flaky(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_sample(self, *args, **kwargs)

    monkeypatch.setattr(Sampler, "sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate(teacher, tmp_path / "replay", n=8, batch_size=4)
    (tmp_path / "replay.partial" / "chunk_000000.npz").write_bytes(b"not a zip")
    with pytest.raises(SelfReplayError) as e:
        generate(teacher, tmp_path / "replay", n=8, batch_size=4)
    one_line_error(e, "corrupt chunk", "delete it")


@pytest.mark.parametrize("kwargs, match", [
    ({"n": 0}, "--num-sequences"), ({"batch_size": 0}, "--batch-size"), ({"seed": -1}, "--seed"),
    ({"domains": [V]}, "vocabulary"), ({"length": T + 1}, "context"), ({"length": 1}, "length"),
    ({"logprobs_dtype": "int8"}, "logprobs_dtype"), ({"top_p": 2.0}, "top_p"), ({"temperature": 0.0}, "temperature"),
    ({"logprobs_top_k": 0}, "top_k"),
])
def test_bad_generate_arguments_are_one_line_errors(tmp_path, kwargs, match):
    with pytest.raises(SelfReplayError) as e:
        generate(tiny_gpt(), tmp_path / "x", **kwargs)
    one_line_error(e, match)
    assert not (tmp_path / "x").exists()


# --- what `selfreplay generate` calls ------------------------------------------------------------------------------

def _run_dir(path: Path, net: GPT, corpus: str = None) -> str:
    """A finished built-in run directory holding ``net`` (trained on ``corpus``, domain 0)."""
    path.mkdir(parents=True)
    save_gpt_weights(net, path / WEIGHTS)
    info = {"model": vars(SHAPE), "tokenizer_fingerprint": "synthetic-v1"}
    if corpus is not None:
        info["train_corpus"] = {"path": corpus, "domain_token": 0, "tokenizer": None}
    (path / RUN_INFO).write_text(json.dumps(info))
    return str(path)


def test_generate_from_a_run_directory_prompts_with_its_corpus_domain(tmp_path, corpora):
    net = tiny_gpt()
    run = _run_dir(tmp_path / "run", net, corpora["en"])
    meta = generate_from(run, tmp_path / "from_run", 6, batch_size=4, seed=3, device="cpu")
    assert (meta.sequence_length, meta.domain_token, meta.tokenizer_fingerprint) == (T, 0, "synthetic-v1")
    generate(net, tmp_path / "direct", n=6, domains=(0,), batch_size=4, tokenizer_fingerprint="synthetic-v1")
    a, b = Corpus.open(tmp_path / "from_run"), Corpus.open(tmp_path / "direct")
    assert np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    # --stop-at-eos takes the corpus's EOS; --domain overrides the recorded one
    eos = generate_from(run, tmp_path / "eos", 4, batch_size=4, stop_at_eos=True, device="cpu")
    assert eos.eos_token == 10
    other = generate_from(run, tmp_path / "dom", 4, domains=[3], batch_size=4, device="cpu")
    assert other.domain_token == 3
    assert np.all(np.asarray(Corpus.open(tmp_path / "dom").tokens).reshape(4, T)[:, 0] == 3)


def test_generate_from_a_run_without_a_domain_is_a_one_line_error(tmp_path):
    run = _run_dir(tmp_path / "run", tiny_gpt())
    with pytest.raises(SelfReplayError) as e:
        generate_from(run, tmp_path / "out", 4, device="cpu")
    one_line_error(e, "--domain")
    with pytest.raises(SelfReplayError) as e:
        generate_from(run, tmp_path / "out", 4, domains=[0], stop_at_eos=True, device="cpu")
    one_line_error(e, "--stop-at-eos", "EOS")


def test_write_text_decodes_every_row(tmp_path):
    generate(tiny_gpt(), tmp_path / "replay", n=3)
    n = write_text(tmp_path / "replay", tmp_path / "samples.jsonl", decode=lambda ids: " ".join(map(str, ids)))
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    rows = np.asarray(Corpus.open(tmp_path / "replay").tokens).reshape(3, T)
    assert n == 3 and [json.loads(x)["text"] for x in lines] == [" ".join(map(str, r)) for r in rows]
    with pytest.raises(SelfReplayError) as e:  # no tokenizer recorded: nothing to decode with
        write_text(tmp_path / "replay", tmp_path / "other.jsonl")
    one_line_error(e, "tokenizer")
