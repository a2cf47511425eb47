"""Tokenized corpora on disk (selfreplay.data.corpus) and the CorpusLoader (selfreplay.data.loader): sequences as
:class:`Batch` rows, split, shuffling, mixing (floor of the fraction), resuming, bad input."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import fill_disk, one_line_error, run_cli
from selfreplay.data import corpus as corpus_module
from selfreplay.data.batch import Batch
from selfreplay.data.corpus import Corpus, CorpusMeta, tokenize_corpus, write_corpus
from selfreplay.data.loader import CorpusLoader, ShuffledWalk
from selfreplay.errors import SelfReplayError
from selfreplay.data.tokenizer import iter_text, load_tokenizer, tokenizer_fingerprint, train_tokenizer

DOCS = [f"paragraph {i} tells of {'rain' if i % 3 else 'sun'} in town {i % 7}, and ñ" for i in range(60)]


def meta(vocab: int = 8000, domain: int = 0, fp: str = "f" * 16, **kw) -> CorpusMeta:
    return CorpusMeta(num_tokens=0, dtype="", vocab_size=vocab, tokenizer_fingerprint=fp, domain_token=domain,
                      eos_token=None, source=["synthetic"], name="", **kw)


def stream_corpus(path: Path, n: int = 2000, vocab: int = 8000, domain: int = 0, fp: str = "f" * 16) -> Corpus:
    """Token i of the stream is 100 + i: a row's content tells exactly where it was cut from."""
    write_corpus(100 + np.arange(n), path, meta(vocab, domain, fp))
    return Corpus.open(path)


def starts(batch: Batch, stride: int) -> list[int]:
    """Sequence index of each row of a stream_corpus batch."""
    return [(int(r[1]) - 100) // stride for r in batch.tokens]




@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    (d / "docs.txt").write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    train_tokenizer([d / "docs.txt"], d / "tok.json", vocab_size=300)
    return d


# ------------------------------------------------------------------------------------------------ corpus on disk

@pytest.mark.parametrize("vocab,dtype,itemsize", [(4096, "uint16", 2), (65535, "uint16", 2), (65536, "uint32", 4)])
def test_dtype_follows_vocab(tmp_path, vocab, dtype, itemsize):
    tokens = np.array([0, 5, vocab - 1, 7])
    m = write_corpus(tokens, tmp_path / "c", meta(vocab))
    assert (m.dtype, m.num_tokens) == (dtype, 4)
    assert (tmp_path / "c" / "tokens.bin").stat().st_size == 4 * itemsize
    assert np.frombuffer((tmp_path / "c" / "tokens.bin").read_bytes(), dtype="<" + dtype[:1] + str(itemsize)) \
        .tolist() == tokens.tolist()  # little-endian on disk
    c = Corpus.open(tmp_path / "c", vocab_size=vocab)
    assert len(c) == 4 and c.tokens.tolist() == tokens.tolist() and c.meta == m
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["dtype"] == dtype


def test_tokenize_corpus(tok_dir, tmp_path):
    tok = load_tokenizer(tok_dir / "tok.json")
    m = tokenize_corpus([str(tok_dir / "docs.txt")], tok_dir / "tok.json", tmp_path / "en", domain_token=1,
                        shuffle_seed=0, show_progress=False)
    c = Corpus.open(tmp_path / "en", vocab_size=300, tokenizer_fingerprint=tokenizer_fingerprint(tok))
    assert (m.domain_token, m.eos_token, m.name, m.source) == (1, 10, "en", [str(tok_dir / "docs.txt")])
    ids = c.tokens.tolist()
    assert ids.count(10) == len(DOCS) and ids[-1] == 10  # every document followed by EOS
    docs, cur = [], []
    for i in ids:
        if i == 10:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert docs == list(iter_text(tok_dir / "docs.txt", shuffle_seed=0))  # the tokenizer sample's order
    corpus_module.ENCODE_CHUNK_DOCS, chunk = 7, corpus_module.ENCODE_CHUNK_DOCS  # truncation inside a later chunk
    try:
        m = tokenize_corpus([str(tok_dir / "docs.txt")], tok_dir / "tok.json", tmp_path / "en9", domain_token=0,
                            shuffle_seed=0, max_tokens=123, show_progress=False)
    finally:
        corpus_module.ENCODE_CHUNK_DOCS = chunk
    assert m.num_tokens == 123 and Corpus.open(tmp_path / "en9").tokens.tolist() == ids[:123]


def test_tokenize_errors_leave_nothing(tok_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS) + "{oops\n")
    # some chunks are written before the failure
    corpus_module.ENCODE_CHUNK_DOCS, chunk = 4, corpus_module.ENCODE_CHUNK_DOCS
    try:
        with pytest.raises(SelfReplayError) as e:
            tokenize_corpus([str(bad)], tok_dir / "tok.json", tmp_path / "out", 0, show_progress=False)
    finally:
        corpus_module.ENCODE_CHUNK_DOCS = chunk
    one_line_error(e, "bad.jsonl", f"line {len(DOCS) + 1}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no out dir, no temp dir
    (tmp_path / "empty.txt").write_text("\n\n")
    for inputs, domain, words in [([str(tmp_path / "empty.txt")], 0, ["empty"]),
                                  ([str(tmp_path / "none.txt")], 0, ["none.txt", "not found"]),
                                  ([str(tok_dir / "docs.txt")], 10, ["domain token 10"])]:
        with pytest.raises(SelfReplayError) as e:
            tokenize_corpus(inputs, tok_dir / "tok.json", tmp_path / "out", domain, show_progress=False)
        one_line_error(e, *words)
    assert not (tmp_path / "out").exists()


def test_atomic_rewrite_keeps_old_corpus_on_failure(tok_dir, tmp_path):
    stream_corpus(tmp_path / "c", n=50, vocab=300)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"nope": 1}\n')
    with pytest.raises(SelfReplayError):
        tokenize_corpus([str(tmp_path / "bad.jsonl")], tok_dir / "tok.json", tmp_path / "c", 0, show_progress=False)
    assert Corpus.open(tmp_path / "c").tokens.tolist() == list(range(100, 150))
    write_corpus(np.arange(10), tmp_path / "c", meta(300))  # a successful rewrite replaces it
    assert len(Corpus.open(tmp_path / "c")) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "c"]
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(SelfReplayError) as e:
        write_corpus(np.arange(10), tmp_path / "precious", meta(300))
    one_line_error(e, "precious", "refusing")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_tokenize_replaces_only_one_of_our_corpora(tok_dir, tmp_path, capsys, monkeypatch):
    """A directory whose files merely have a corpus's names, a symbolic link, or the working directory is never
    replaced; an earlier corpus is."""
    from conftest import run_cli

    def tokenize(out):
        return run_cli(["tokenize", str(tok_dir / "docs.txt"), "--tokenizer", str(tok_dir / "tok.json"), "--out",
                        str(out), "--domain-token", "0"], capsys)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "meta.json").write_text('{"my": "own metadata"}')
    (foreign / "tokens.bin").write_bytes(b"mine")
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("keep")
    (tmp_path / "link").symlink_to(target, target_is_directory=True)
    for out in (foreign, tmp_path / "link"):
        code, _, err = tokenize(out)
        assert code == 2 and err.count("\n") == 1 and str(out) in err and "refusing to overwrite" in err, err
    assert (foreign / "meta.json").read_text() == '{"my": "own metadata"}'
    assert (foreign / "tokens.bin").read_bytes() == b"mine"
    assert (tmp_path / "link").is_symlink() and [p.name for p in target.iterdir()] == ["notes.txt"]
    empty_cwd = tmp_path / "cwd"
    empty_cwd.mkdir()
    monkeypatch.chdir(empty_cwd)
    code, _, err = tokenize(".")
    assert code == 2 and "never an output directory" in err and list(empty_cwd.iterdir()) == []
    stream_corpus(tmp_path / "ours", n=50, vocab=300)
    code, _, err = tokenize(tmp_path / "ours")
    assert code == 0, err
    assert Corpus.open(tmp_path / "ours").meta.source == [str(tok_dir / "docs.txt")]  # replaced


def test_a_full_disk_is_one_line_naming_the_corpus_and_leaves_nothing(tok_dir, full_disk, capsys):
    """A real full filesystem: numpy reports the short write of tokens.bin without an errno; the user reads
    "no space left" and the corpus's path, and no temporary directory stays behind."""
    many = tok_dir / "many.txt"  # ~50k tokens: about 100 KiB of uint16 on a 64 KiB filesystem
    many.write_text("\n".join(DOCS * 60) + "\n", encoding="utf-8")
    out = full_disk / "corpus"
    code, _, err = run_cli(["tokenize", str(many), "--tokenizer", str(tok_dir / "tok.json"), "--out", str(out),
                            "--domain-token", "0"], capsys)
    assert code == 2 and err.startswith("error: no space left on the device writing ") and err.count("\n") == 1, err
    assert str(out) in err
    assert list(full_disk.iterdir()) == []
    fill_disk(full_disk)  # write_corpus (the replay store's writer too) on a disk with no room at all
    with pytest.raises(SelfReplayError) as e:
        write_corpus(np.arange(5000) % 300, full_disk / "rows", meta(300))
    one_line_error(e, "no space left on the device", str(full_disk / "rows"))
    assert [p.name for p in full_disk.iterdir()] == ["filler"]


def test_write_corpus_errors(tmp_path):
    for tokens, m, words in [(np.array([1, 2, 300]), meta(300), ["0..299"]),
                             (np.array([-1, 2]), meta(300), ["-1"]),
                             (np.array([], dtype=np.int64), meta(300), ["empty"]),
                             (np.array([1.5, 2.0]), meta(300), ["integer"]),
                             (np.array([1, 2]), meta(300, domain=12), ["domain token 12"])]:
        with pytest.raises(SelfReplayError) as e:
            write_corpus(tokens, tmp_path / "c", m)
        one_line_error(e, *words)
    assert list(tmp_path.iterdir()) == []


def _break(path: Path, what: str) -> None:
    if what == "no meta":
        (path / "meta.json").unlink()
    elif what == "meta not json":
        (path / "meta.json").write_text("{ nope")
    elif what == "meta missing key":
        d = json.loads((path / "meta.json").read_text())
        del d["vocab_size"]
        (path / "meta.json").write_text(json.dumps(d))
    elif what == "meta bad dtype":
        d = json.loads((path / "meta.json").read_text())
        d["dtype"] = "float32"
        (path / "meta.json").write_text(json.dumps(d))
    elif what == "short tokens.bin":
        with open(path / "tokens.bin", "r+b") as f:
            f.truncate(17)
    elif what == "id >= vocab":
        (path / "tokens.bin").write_bytes(np.full(50, 4000, dtype="<u2").tobytes())
    elif what == "empty":
        d = json.loads((path / "meta.json").read_text())
        d["num_tokens"] = 0
        (path / "meta.json").write_text(json.dumps(d))
        (path / "tokens.bin").write_bytes(b"")


@pytest.mark.parametrize("what,words", [
    ("no meta", ["missing meta.json"]), ("meta not json", ["corrupt meta.json"]),
    ("meta missing key", ["corrupt metadata", "vocab_size"]), ("meta bad dtype", ["float32"]),
    ("short tokens.bin", ["corrupt tokens.bin", "17 bytes"]), ("id >= vocab", ["4000"]),
    ("empty", ["empty corpus"]),
])
def test_open_rejects_broken_corpus(tmp_path, what, words):
    stream_corpus(tmp_path / "c", n=50, vocab=300)
    _break(tmp_path / "c", what)
    with pytest.raises(SelfReplayError) as e:
        Corpus.open(tmp_path / "c")
    one_line_error(e, str(tmp_path / "c"), *words)


def test_open_checks_model(tmp_path):
    with pytest.raises(SelfReplayError) as e:
        Corpus.open(tmp_path / "nowhere")
    one_line_error(e, "nowhere", "not found")
    stream_corpus(tmp_path / "c", n=50, vocab=8000, fp="a" * 16)
    with pytest.raises(SelfReplayError) as e:
        Corpus.open(tmp_path / "c", vocab_size=4096)
    one_line_error(e, "tokenized with vocab 8000 but the model has 4096")
    with pytest.raises(SelfReplayError) as e:
        Corpus.open(tmp_path / "c", vocab_size=8000, tokenizer_fingerprint="b" * 16)
    one_line_error(e, "a" * 16, "b" * 16)


# ---------------------------------------------------------------------------------------------------- the loader

def test_rows_are_domain_token_plus_contiguous_slices(tmp_path):
    c = stream_corpus(tmp_path / "c", n=1000, domain=3)
    T = 16
    loader = CorpusLoader(c, context=T, batch_size=4, valid_tokens=0, seed=0)
    assert loader.num_train_rows == 1000 // (T - 1) and loader.num_valid_sequences == 0
    seen = []
    for _ in range(loader.num_train_rows // 4):
        batch = loader.next_batch()
        assert isinstance(batch, Batch) and batch.loss_mask is None and batch.position_ids is None
        b = batch.tokens
        assert b.dtype == torch.int64 and b.shape == (4, T)
        assert (b[:, 0] == 3).all()
        assert batch.num_targets().item() == 4 * (T - 1)  # every token after the domain token is a target
        for row in b:
            i = (int(row[1]) - 100) // (T - 1)
            assert row[1:].tolist() == list(range(100 + i * (T - 1), 100 + (i + 1) * (T - 1)))
            seen.append(i)
    assert len(set(seen)) == len(seen)  # no sequence twice within an epoch
    assert max(seen) < 1000 // (T - 1)  # the incomplete tail is dropped
    assert list(loader.valid_batches()) == []
    assert loader.seq_len == T


def test_split_is_deterministic_and_disjoint(tmp_path):
    c = stream_corpus(tmp_path / "c", n=3000)
    T, valid_tokens = 11, 95
    a = CorpusLoader(c, T, batch_size=4, valid_tokens=valid_tokens, seed=5)
    b = CorpusLoader(c, T, batch_size=9, valid_tokens=valid_tokens, seed=5)
    other = CorpusLoader(c, T, batch_size=4, valid_tokens=valid_tokens, seed=6)
    assert a.num_valid_sequences == math.ceil(valid_tokens / (T - 1)) == 10
    valid = [s for v in a.valid_batches(3) for s in starts(v, T - 1)]
    assert valid == sorted(valid) and len(valid) == 10
    assert valid == [s for v in b.valid_batches(3) for s in starts(v, T - 1)]  # batch size does not matter
    assert valid != [s for v in other.valid_batches(3) for s in starts(v, T - 1)]
    train = [s for _ in range(a.num_train_rows // 4 + 1) for s in starts(a.next_batch(), T - 1)]
    assert not set(train) & set(valid)
    assert set(train) | set(valid) == set(range(3000 // (T - 1)))
    assert CorpusLoader(c, T, 4, valid_tokens, seed=6, split_seed=5).valid_indices.tolist() == a.valid_indices.tolist()


def test_valid_batches_sizes_and_cap(tmp_path):
    c = stream_corpus(tmp_path / "c", n=2000)
    loader = CorpusLoader(c, 11, batch_size=4, valid_tokens=100, seed=0)
    sizes = [len(v) for v in loader.valid_batches(batch_size=4)]
    assert sizes == [4, 4, 2]
    assert [len(v) for v in loader.valid_batches(batch_size=4, max_tokens=25)] == [3]
    assert all((v.tokens[:, 0] == 0).all() for v in loader.valid_batches())


def test_epochs_reshuffle_deterministically(tmp_path):
    c = stream_corpus(tmp_path / "c", n=100 * 9)
    make = lambda seed: CorpusLoader(c, 10, batch_size=7, valid_tokens=0, seed=seed)  # noqa: E731
    a, b, other = make(1), make(1), make(2)
    assert a.num_train_rows == 100
    batches = [a.next_batch() for _ in range(30)]  # 210 rows: 2.1 epochs, crossing boundaries mid-batch
    assert all(torch.equal(x.tokens, b.next_batch().tokens) for x in batches)
    assert not all(torch.equal(x.tokens, other.next_batch().tokens) for x in batches)
    flat = [s for x in batches for s in starts(x, 9)]
    epoch0, epoch1 = flat[:100], flat[100:200]
    assert sorted(epoch0) == sorted(epoch1) == list(range(100))  # each epoch is a full pass
    assert epoch0 != epoch1  # in a new order
    assert a.epochs_done == pytest.approx(2.1)


def test_state_dict_resume(tmp_path):
    c = stream_corpus(tmp_path / "c", n=700)
    m = stream_corpus(tmp_path / "m", n=500, domain=1)
    make = lambda: CorpusLoader(c, 8, batch_size=6, valid_tokens=20, seed=3, mix=m, mix_fraction=0.5)  # noqa: E731
    a = make()
    for _ in range(25):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # plain JSON
    expected = [a.next_batch() for _ in range(20)]
    b = make()
    b.load_state_dict(state)
    assert all(torch.equal(x.tokens, b.next_batch().tokens) for x in expected)
    plain = CorpusLoader(c, 8, batch_size=6, valid_tokens=20, seed=3)
    with pytest.raises(SelfReplayError) as e:
        plain.load_state_dict(state)
    one_line_error(e, "mixing")
    with pytest.raises(SelfReplayError) as e:
        CorpusLoader(c, 8, batch_size=6, valid_tokens=100, seed=3, mix=m, mix_fraction=0.5).load_state_dict(state)
    one_line_error(e, "does not match")


def test_mixing(tmp_path):
    c = stream_corpus(tmp_path / "c", n=3000, domain=0)
    write_corpus(5000 + np.arange(1000), tmp_path / "m", meta(domain=1))
    m = Corpus.open(tmp_path / "m")
    loader = CorpusLoader(c, 11, batch_size=8, valid_tokens=50, seed=0, mix=m, mix_fraction=0.3)
    assert loader.mix_rows == 2 and loader.main_rows == 6  # floor(0.3 * 8)
    mix_alone = CorpusLoader(m, 11, batch_size=2, valid_tokens=50, seed=0)
    mix_valid = {int(r[1]) for v in mix_alone.valid_batches() for r in v.tokens}
    for _ in range(60):
        b = loader.next_batch().tokens
        assert b.shape == (8, 11)
        assert b[:6, 0].tolist() == [0] * 6 and (b[:6, 1] < 5000).all()
        assert b[6:, 0].tolist() == [1] * 2 and (b[6:, 1] >= 5000).all()
        assert not {int(x) for x in b[6:, 1]} & mix_valid  # mix rows come from the mix corpus's train split
    assert loader.epochs_done == pytest.approx(60 * 6 / loader.num_train_rows)
    assert loader.mix_epochs_done == pytest.approx(60 * 2 / mix_alone.num_train_rows)


@pytest.mark.parametrize("fraction, batch, rows", [(0.45, 8, 3), (0.125, 8, 1), (0.3, 10, 3), (0.99, 16, 15),
                                                   (0.5, 7, 3)])
def test_mixing_takes_the_floor_of_fraction_times_batch(tmp_path, fraction, batch, rows):
    """floor(fraction * batch) mix rows, as the paper's int(f * B) (0.45 of 8 is 3 rows, not round()'s 4)."""
    c = stream_corpus(tmp_path / "c", n=3000, domain=0)
    m = stream_corpus(tmp_path / "m", n=3000, domain=1)
    loader = CorpusLoader(c, 11, batch_size=batch, valid_tokens=0, seed=0, mix=m, mix_fraction=fraction)
    assert (loader.mix_rows, loader.main_rows) == (rows, batch - rows)
    b = loader.next_batch().tokens
    assert b[:, 0].tolist() == [0] * (batch - rows) + [1] * rows


def test_mixing_errors(tmp_path):
    c = stream_corpus(tmp_path / "c", n=3000, fp="a" * 16)
    other = stream_corpus(tmp_path / "o", n=3000, fp="b" * 16)
    with pytest.raises(SelfReplayError) as e:
        CorpusLoader(c, 11, 8, 0, 0, mix=other, mix_fraction=0.5)
    one_line_error(e, "different tokenizer")
    same = stream_corpus(tmp_path / "s", n=3000, fp="a" * 16)
    with pytest.raises(SelfReplayError) as e:
        CorpusLoader(c, 11, 8, 0, 0, mix=same, mix_fraction=0.1)  # 0.8 of a row: floor gives none
    one_line_error(e, "mix_fraction=0.1", "less than one row")
    with pytest.raises(SelfReplayError) as e:
        CorpusLoader(c, 11, 8, 0, 0, mix=same, mix_fraction=1.0)
    one_line_error(e, "mix_fraction")
    with pytest.raises(SelfReplayError) as e:
        CorpusLoader(c, 11, 8, 0, 0, mix_fraction=0.5)
    one_line_error(e, "mix corpus")


def test_precut_rows_are_used_as_they_are(tmp_path):
    rows = np.arange(40 * 8).reshape(40, 8) % 300
    rows[:, 0] = np.arange(40) % 2  # rows from two domains
    m = write_corpus(rows, tmp_path / "r", meta(300, domain=0))
    assert m.sequence_length == 8
    c = Corpus.open(tmp_path / "r")
    loader = CorpusLoader(c, 8, batch_size=5, valid_tokens=0, seed=0)
    assert loader.num_train_rows == 40
    got = np.concatenate([loader.next_batch().tokens.numpy() for _ in range(8)])
    assert sorted(map(tuple, got)) == sorted(map(tuple, rows))
    with pytest.raises(SelfReplayError) as e:
        CorpusLoader(c, 16, batch_size=5)
    one_line_error(e, "length 8", "context is 16")


def test_too_short(tmp_path):
    c = stream_corpus(tmp_path / "c", n=12)
    with pytest.raises(SelfReplayError) as e:
        CorpusLoader(c, 16, batch_size=1)
    one_line_error(e, "has 12 tokens: too short for one sequence")
    c = stream_corpus(tmp_path / "d", n=100)  # 11 sequences of context 10
    CorpusLoader(c, 10, batch_size=4, valid_tokens=63)  # 7 valid, 4 train: exactly one batch
    with pytest.raises(SelfReplayError) as e:
        CorpusLoader(c, 10, batch_size=4, valid_tokens=64)
    one_line_error(e, "has 100 tokens: too short for 64 validation tokens")
    with pytest.raises(SelfReplayError) as e:
        CorpusLoader(c, 10, batch_size=4, max_train_tokens=30)
    one_line_error(e, "too short", "max_train_tokens 30")


def test_max_train_tokens(tmp_path):
    c = stream_corpus(tmp_path / "c", n=1000)
    loader = CorpusLoader(c, 11, batch_size=4, valid_tokens=100, seed=0, max_train_tokens=205)
    assert loader.num_train_rows == 20
    seen = {s for _ in range(20) for s in starts(loader.next_batch(), 10)}
    assert seen == set(loader._train.indices.tolist()) and not seen & set(loader.valid_indices.tolist())


def test_shuffled_walk_runs_across_epochs_and_resumes():
    walk = ShuffledWalk(np.arange(10), seed=0, tag=1)
    taken = np.concatenate([walk.take(4) for _ in range(5)])  # 20 rows: two epochs, crossed mid-take
    assert sorted(taken[:10]) == sorted(taken[10:]) == list(range(10)) and list(taken[:10]) != list(taken[10:])
    assert walk.epochs_done == 2.0
    walk.take(3)
    state = walk.state_dict()
    expected = walk.take(7)
    again = ShuffledWalk(np.arange(10), seed=0, tag=1)
    again.load_state_dict(state, "rows")
    assert again.take(7).tolist() == expected.tolist()
    assert ShuffledWalk(np.arange(5), 0, 1, shuffle=False).take(7).tolist() == [0, 1, 2, 3, 4, 0, 1]
    with pytest.raises(SelfReplayError) as e:
        ShuffledWalk(np.arange(11), seed=0, tag=1).load_state_dict(state, "the rows")
    one_line_error(e, "does not match the rows")
    with pytest.raises(SelfReplayError) as e:
        ShuffledWalk(np.arange(0), seed=0, tag=1)
    one_line_error(e, "no rows")
